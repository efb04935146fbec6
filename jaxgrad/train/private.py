"""DP-SGD for :func:`jaxgrad.train.fit` (``fit(..., privacy=PrivacyConfig(...))``).

:func:`plan` resolves a :class:`PrivacyConfig` for a data set (``q = batch_size / N``, the
planned steps, σ calibrated for them); :func:`engine` gives the one training loop its steps.
Every step samples the training set by Poisson sampling with rate ``q`` and takes the noisy
gradient of :func:`jaxgrad.privacy.sampled_dp_grad`'s parts: the draw is run in physical
batches of a fixed size (accumulated, never truncated), the clipped sums are added,
``N(0, σ²C² I)`` is added once and the sum is divided once by ``qN``. An "epoch" is
``⌈N / batch_size⌉`` steps (each example is seen once per epoch *in expectation*); the ε spent
so far is reported after every epoch (``epsilon`` in the history). Step ``t``'s sample and
noise are drawn from ``dp_keys(key, t)`` (:mod:`jaxgrad.keys`), so the privacy state is the
step count and the key: both are in every checkpoint, a resumed run continues bit for bit,
and a checkpoint written under other privacy settings (clip, σ, q, δ, accountant, planned
steps) is refused.

Other batch sources plug into the same step (``PrivacyConfig(sampling=...)``,
:mod:`jaxgrad.privacy.sources`): ``"truncated_poisson"`` (a draw cut to ``max_batch_size``
by a uniformly random subset, accounted by dp-accounting's truncated event, PLD only) and
``"without_replacement"`` (exactly ``batch_size`` examples every step, accounted under
replace-one, RDP only); each brings its own event, so the calibration, the per-epoch ε and
the run's record match the sampling actually used. A shuffled epoch is refused.
``stop_at_epsilon`` ends training after the last step whose ε stays within the budget
(:meth:`jaxgrad.privacy.Accountant.steps_within`, counted before any data is read).

Correlated noise (``PrivacyConfig(noise="bandmf", bands=b)``, :mod:`jaxgrad.privacy.bandmf`):
the batch source is cyclic Poisson over ``b`` groups, the clipped sum goes to a BandMF
privatizer heading the optimizer (:func:`run_optimizer`; its key and last ``b − 1`` noise
vectors are in the training state and the checkpoints, and :func:`release` takes them out of
what ``fit`` returns), and the accounting composes ``⌈steps / b⌉`` Poisson steps.
Adaptive (quantile) clipping (``PrivacyConfig(adaptive_clip=AdaptiveClip(...))``,
:mod:`jaxgrad.privacy.adaptive`) is the same step with two parts swapped: the clipped sum
also counts the examples left unclipped (:class:`jaxgrad.privacy.QuantileClippedSum`, the
clip norm an argument), and the privatizer (:func:`jaxgrad.privacy.quantile_privatizer`,
chained before the optimizer, so its state — the clip norm — is part of the optimizer state
the loop carries and checkpoints) noises both from the step's keys and updates the clip norm.
The step is accounted with the same ``σ`` (split between the gradient and the count).
Per-layer clipping (``PrivacyConfig(l2_clip=<a pytree prefix of the params>)``, e.g.
:func:`per_layer_clip`) clips each group of an example's gradient to its own ``C_g``; the
noise is ``N(0, σ² Σ_g C_g² I)``. Clip units larger than one row (``fit(..., units=)``: a
user's rows; ``fit(..., augment=)`` with ``augmentations=K``: an example's augmented copies)
are made examples before the plan (:mod:`jaxgrad.privacy.units`), so the draws, the clipping
and the accounting count units.

On a mesh (``fit(..., privacy=..., mesh=...)``) the step is the same computation, spread:
the Poisson sample is drawn over the whole data set from the same key in every process (one
draw for the step, never one per device or host, so the inclusions stay independent across
examples), its physical batches are sharded along the examples over the mesh's ``"data"``
axis (each process gathering only its own devices' rows,
:func:`jaxgrad.sharding.take_rows`), the clipped sums and counts are summed over devices, and
the noise is drawn once, from the step's one noise key, in the replicated result. The
parameters equal the one-device run's up to the order of the sums.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrad import data as data_lib
from jaxgrad import keys, reduce
from jaxgrad import privacy as dp
from jaxgrad import sharding as sharding_lib
from jaxgrad.fast import api as fast_api
from jaxgrad.privacy import accounting, adaptive, bandmf, noisy, sampling, sources
from jaxgrad.train import arguments
from jaxgrad.train.step import Engine, TrainState, first_carry, guarded, loop_chunk, scan_chunk


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings for :func:`jaxgrad.train.fit`.

    Give ``target_epsilon`` (σ is calibrated for the planned steps) or ``noise_multiplier``;
    with both, σ is used and must spend at most ``target_epsilon``.

    Attributes:
      l2_clip: the per-example clipping norm ``C``, or a pytree prefix of the params of
        per-group clip norms ``C_g`` (per-layer clipping: each group of an example's gradient
        clipped to its own ``C_g``, noise std ``σ √(Σ_g C_g²)``; see
        :func:`jaxgrad.fast.clipped_grad`).
      target_epsilon: the ε to spend over the whole run (at ``delta``).
      noise_multiplier: ``σ``, if not calibrated.
      delta: ``δ``.
      accountant: ``"pld"`` (default) or ``"rdp"``.
      physical_batch_size: examples per physical batch (default:
        :func:`jaxgrad.privacy.default_physical_batch_size`: the size ``≥ batch_size`` with
        the fewest expected rows per step, for large batches about ``batch_size`` plus two
        standard deviations of the realised batch size); a larger draw runs several, never
        truncated.
      nonfinite: ``"drop"`` (default: examples with a non-finite loss or gradient are left
        out; their count is not released) or ``"raise"`` (training stops with
        ``NonFiniteLossError`` before the step that met one). ``"raise"`` is outside the
        guarantee: whether and when a run stops depends on the private rows its draws met.
      method: ``"auto"`` (fast clipped sum) or ``"vmap"``.
      pld_discretization: the PLD accountant's value discretisation for calibration and the
        per-epoch ε (1e-3: an upper bound within 0.4% of the 1e-4 value for the reference
        setting, and about 10× cheaper to compute, so accounting never dominates an epoch).
      sampling: how each step's batch is chosen, with the accounting that matches it
        (:mod:`jaxgrad.privacy.sources`): ``"poisson"`` (default; rate ``batch_size / N``),
        ``"truncated_poisson"`` (the same, cut to ``max_batch_size`` by a uniformly random
        subset; PLD accountant only) or ``"without_replacement"`` (exactly ``batch_size``
        examples, drawn afresh every step; accounted under replace-one with the RDP
        accountant only: give ``accountant="rdp"``). A shuffled epoch is refused.
      max_batch_size: the cap of ``"truncated_poisson"`` (required there, refused elsewhere).
      stop_at_epsilon: a budget: training stops after the last step whose ε (at ``delta``)
        stays within it, even if ``epochs`` asks for more (the history's last record is that
        step's; a resumed run stops there too). Refused if not one step fits.
      noise: ``"gaussian"`` (default: independent noise every step) or ``"bandmf"``
        (banded matrix-factorisation noise, correlated across ``bands`` steps,
        :mod:`jaxgrad.privacy.bandmf`): the examples are split into ``bands`` groups (row
        ``i`` in group ``i mod bands``), step ``t`` Poisson-samples group ``t mod bands``
        with rate ``q = bands · batch_size / N`` (:class:`jaxgrad.privacy.CyclicPoisson`),
        and the run is accounted as ``⌈steps / bands⌉`` Poisson-sampled Gaussian steps.
        The last ``bands − 1`` noise vectors live in the training state's optimizer state
        (and the checkpoints, which are secret), never in the returned ``FitResult.state``.
      bands: ``b ≥ 1`` of ``noise="bandmf"`` (required there, refused elsewhere); at most
        the planned steps, and ``b · batch_size ≤ N``. ``bands=1`` is DP-SGD, bit for bit.
      bandmf_strategy: the strategy's coefficients: ``"optimized"`` (default: L-BFGS on the
        prefix sums' mean squared error for the planned steps,
        :func:`jaxgrad.privacy.bandmf.optimized_coefs`) or ``"sqrt"`` (the closed form
        ``(1 − x)^{-1/2}`` cut to ``b`` bands, :func:`jaxgrad.privacy.bandmf.sqrt_coefs`).
      adaptive_clip: an :class:`jaxgrad.privacy.AdaptiveClip` for adaptive (quantile)
        clipping (:mod:`jaxgrad.privacy.adaptive`): the clip norm starts at ``l2_clip`` and
        follows a quantile of the per-example norms through a noisy count. The step is
        accounted with the total ``σ`` as before; the gradient's noise multiplier is
        ``σ_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2)``. The current clip norm is carried in the optimizer
        state (``state.opt_state[0].l2_clip``, checkpointed) and reported per epoch as
        ``l2_clip`` in the history: post-processing of the noisy counts, releasable.
      augmentations: ``K``, the copies of each example that ``fit(..., augment=...)`` draws
        every step (augmentation multiplicity: the mean of their gradients is clipped once;
        :func:`jaxgrad.privacy.augmented_loss`). 1 without ``augment``.
    """

    l2_clip: float
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    accountant: str = "pld"
    physical_batch_size: int | None = None
    nonfinite: str = "drop"
    method: str = "auto"
    pld_discretization: float = 1e-3
    sampling: str = "poisson"
    max_batch_size: int | None = None
    stop_at_epsilon: float | None = None
    adaptive_clip: adaptive.AdaptiveClip | None = None
    augmentations: int = 1
    noise: str = "gaussian"
    bands: int | None = None
    bandmf_strategy: str = "optimized"


NOISES = ("gaussian", "bandmf")


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """A :class:`PrivacyConfig` resolved for a data set: what the run will do.

    Attributes:
      config: the config, with ``noise_multiplier`` filled in.
      noise_multiplier: ``σ``.
      sampling_rate: ``q = batch_size / N``.
      steps: the planned number of steps ``epochs · ⌈N / batch_size⌉``.
      physical_batch_size: ``P``.
      source: the batch source (:mod:`jaxgrad.privacy.sources`; Poisson by default).
      num_examples: ``N``.
      stop_step: the number of steps after which training stops (``≤ steps``; fewer when
        ``stop_at_epsilon`` is spent first).
      coefs: ``noise="bandmf"``'s strategy coefficients (``bands`` floats, ``‖c‖ = 1``), or
        None.
      unit: the privacy unit: ``"example"``, or ``"user"`` for ``fit(..., units=...)`` (then
        ``num_examples`` counts units).
    """

    config: PrivacyConfig
    noise_multiplier: float
    sampling_rate: float
    steps: int
    physical_batch_size: int
    source: object = None
    num_examples: int | None = None
    stop_step: int | None = None
    coefs: tuple | None = None

    unit: str = "example"

    def compositions(self, steps: int) -> int:
        """How many of the step event ``steps`` steps compose: ``steps``, or with BandMF's
        cyclic groups ``⌈steps / bands⌉`` (the most steps one example takes part in)."""
        return self.source.participations(steps) if self.coefs is not None else steps

    def accountant(self, steps: int = 0) -> dp.Accountant:
        """A :class:`jaxgrad.privacy.Accountant` holding ``steps`` of this plan's steps."""
        c = self.config
        acc = dp.Accountant(
            accountant=c.accountant,
            delta=c.delta,
            neighboring_relation=self.source.neighboring_relation,
            pld_discretization=c.pld_discretization,
        )
        acc.record(self.step_event(), steps=self.compositions(steps))
        return acc

    def gradient_noise_multiplier(self) -> float:
        """The gradient's share ``σ_Δ`` of ``σ`` (``σ`` itself without adaptive clipping)."""
        a = self.config.adaptive_clip
        if a is None:
            return self.noise_multiplier
        return adaptive.split_noise_multiplier(
            self.noise_multiplier, count_noise_multiplier=a.count_noise_multiplier
        )

    def step_event(self):
        """One step's dp-accounting event (the batch source's)."""
        return self.source.dp_event(
            noise_multiplier=self.noise_multiplier, num_examples=self.num_examples
        )

    def epsilon(self, steps: int) -> float:
        """The ε spent after ``steps`` steps."""
        if self.source.name not in ("poisson", "cyclic_poisson"):
            return self.accountant(steps).epsilon()
        return dp.epsilon(  # BandMF: ⌈steps / b⌉ Poisson steps (jaxgrad.privacy.bandmf)
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sampling_rate,
            steps=self.compositions(steps),
            delta=self.config.delta,
            accountant=self.config.accountant,
            pld_discretization=self.config.pld_discretization,
        )

    def summary(self, steps: int) -> dict:
        """The ``privacy`` record of the CLI's JSON after ``steps`` steps."""
        c = self.config
        if self.source.name not in ("poisson", "cyclic_poisson"):
            accountant = self.accountant(steps).effective_accountant()
        else:
            # "rdp" where the PLD would not fit or cannot reach δ (as `epsilon` does)
            accountant = dp.accounting.effective_accountant(
                noise_multiplier=self.noise_multiplier,
                sampling_rate=self.sampling_rate,
                steps=self.compositions(steps),
                accountant=c.accountant,
                pld_discretization=c.pld_discretization,
                delta=c.delta,
            )
        extra = {}  # only where not the default: a Poisson run's record is unchanged
        if self.source.name == "truncated_poisson":
            extra["max_batch_size"] = self.source.max_batch_size
        if self.source.neighboring_relation != "add_or_remove_one":
            extra["neighboring_relation"] = self.source.neighboring_relation
        if c.stop_at_epsilon is not None:
            extra.update(stop_at_epsilon=c.stop_at_epsilon, stop_step=self.stop_step)
        if self.coefs is not None:
            extra.update(
                noise="bandmf",
                bands=len(self.coefs),
                bandmf_strategy=c.bandmf_strategy,
                participations=self.compositions(steps),
            )
        if c.adaptive_clip is not None:  # l2_clip is then the initial clip norm
            extra["adaptive_clip"] = {
                **dataclasses.asdict(c.adaptive_clip),
                "gradient_noise_multiplier": self.gradient_noise_multiplier(),
            }
        if not isinstance(c.l2_clip, float):  # per-group clip norms, by path, and Δ₂
            extra["l2_sensitivity"] = fast_api.clip_sensitivity(c.l2_clip)
        if self.unit != "example":
            extra.update(privacy_unit=self.unit, num_units=self.num_examples)
        if c.augmentations != 1:
            extra["augmentations"] = c.augmentations
        return {
            "epsilon": self.epsilon(steps),
            "delta": c.delta,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": steps,
            "accountant": accountant,
            "pld_discretization": c.pld_discretization if accountant == "pld" else None,
            "l2_clip": _clip_record(c.l2_clip),
            "target_epsilon": c.target_epsilon,
            "physical_batch_size": self.physical_batch_size,
            "sampling": self.source.name,
            **extra,
        }


def per_layer_clip(params, *, l2_clip: float):
    """Per-layer clip norms with the flat clip's sensitivity: ``C / √L`` for each of ``L`` layers.

    A *layer* is a container (dict, list, tuple) of the params whose children are all arrays
    (a dense layer's ``{"w", "b"}``); an array beside other containers is a layer of its own.
    Every layer gets ``C_g = C / √L``, so ``√(Σ_g C_g²) = C``: the same noise as flat clipping
    at ``C``, each layer clipped by its own norm (a layer with large gradients can no longer
    take the whole budget). What ``python -m jaxgrad.train --dp --per-layer-clip`` uses.

    Args:
      params: the params (or their shapes, ``jax.eval_shape(model.init, key)``).
      l2_clip: ``C > 0``, the total.

    Returns:
      A pytree prefix of ``params`` with one clip norm per layer, for
      ``PrivacyConfig(l2_clip=...)``.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.train.private import per_layer_clip
      >>> layer = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
      >>> per_layer_clip([layer, layer, layer, layer], l2_clip=1.0)
      [0.5, 0.5, 0.5, 0.5]
    """
    c = reduce.check_positive_float(l2_clip, name="l2_clip")
    containers = (dict, list, tuple)

    def is_layer(x):
        children = x.values() if isinstance(x, dict) else x
        return (
            isinstance(x, containers)
            and bool(x)
            and not any(isinstance(v, containers) for v in children)
        )

    ones = jax.tree_util.tree_map(lambda _: 1.0, params, is_leaf=is_layer)
    count = len(jax.tree_util.tree_leaves(ones))
    if count == 0:
        raise ValueError("`params` has no layers to clip")
    return jax.tree_util.tree_map(lambda _: float(c / np.sqrt(count)), ones)


def _clip_record(l2_clip):
    """``C``, or per-group clip norms as ``{path: C_g}`` (JSON keeps strings, not tuples)."""
    if isinstance(l2_clip, float):
        return l2_clip
    flat = jax.tree_util.tree_flatten_with_path(l2_clip)[0]
    return {jax.tree_util.keystr(path): c for path, c in flat}


def plan(config: PrivacyConfig, *, num_examples: int, batch_size: int, epochs: int) -> PrivacyPlan:
    """Resolves ``config`` for ``num_examples`` examples: ``q``, the steps, and σ (calibrated).

    Raises:
      ValueError: a bad setting, naming it; neither or both of ``target_epsilon`` and
        ``noise_multiplier``.
    """
    if not isinstance(config, PrivacyConfig):
        raise TypeError(f"`privacy` must be a PrivacyConfig; got {type(config).__name__}")
    n = reduce.check_positive_int(num_examples, name="num_examples")
    batch_size = reduce.check_positive_int(batch_size, name="batch_size")
    epochs = reduce.check_positive_int(epochs, name="epochs")
    arguments.check_batch_size(batch_size, n)
    if config.target_epsilon is None and config.noise_multiplier is None:
        raise ValueError(
            "give `target_epsilon` (σ is calibrated) or `noise_multiplier`; got neither"
        )
    target = config.target_epsilon
    if target is not None:
        target = reduce.check_positive_float(target, name="target_epsilon")
    source = sources.batch_source(
        config.sampling,
        num_examples=n,
        batch_size=batch_size,
        max_batch_size=config.max_batch_size,
    )
    q = batch_size / n
    steps = epochs * data_lib.num_batches(n, batch_size)
    source = _bandmf_source(config, source, num_examples=n, batch_size=batch_size, steps=steps)
    q = source.sampling_rate if config.noise == "bandmf" else q
    if config.physical_batch_size is None:  # (not `or`: 0 is an error, not the default)
        physical = source.default_physical_batch_size(n)
    else:
        physical = reduce.check_positive_int(config.physical_batch_size, name="physical_batch_size")
    given = 1.0 if config.noise_multiplier is None else config.noise_multiplier
    _check_mechanism(config, given, q, num_examples=n)
    augmentations = reduce.check_positive_int(config.augmentations, name="augmentations")
    stop = config.stop_at_epsilon
    if stop is not None:
        stop = reduce.check_positive_float(stop, name="stop_at_epsilon")
    if config.adaptive_clip is not None:
        _check_adaptive(config, given, source.expected_batch_size(n))
    coefs = None
    if config.noise == "bandmf":  # after every cheap check: the optimisation takes seconds
        coefs = tuple(
            float(v)
            for v in bandmf.strategy_coefs(
                source.groups, steps=steps, strategy=config.bandmf_strategy
            )
        )
    draft = PrivacyPlan(config, given, q, steps, physical, source, n, coefs=coefs)
    draft.accountant()  # refuses a sampling the accountant cannot account (naming which can)
    sigma = _noise_multiplier(draft, target)
    sigma = reduce.check_nonnegative_float(sigma, name="noise_multiplier")
    adaptive_clip = config.adaptive_clip
    if adaptive_clip is not None:  # σ_b filled in, checked against the calibrated σ
        adaptive_clip = adaptive_clip.resolve(
            noise_multiplier=sigma, expected_batch_size=source.expected_batch_size(n)
        )
    resolved = dataclasses.replace(
        config,
        l2_clip=fast_api.check_l2_clip(config.l2_clip),
        augmentations=augmentations,
        noise_multiplier=sigma,
        delta=float(config.delta),  # checked by dp.epsilon above
        target_epsilon=target,
        pld_discretization=reduce.check_positive_float(
            config.pld_discretization, name="pld_discretization"
        ),
        stop_at_epsilon=stop,
        adaptive_clip=adaptive_clip,
    )
    the_plan = PrivacyPlan(resolved, sigma, q, steps, physical, source, n, steps, coefs)
    return the_plan if stop is None else _stopping(the_plan, stop)


def _check_mechanism(config: PrivacyConfig, sigma: float, q: float, *, num_examples: int):
    """Checks σ, δ, the accountant, the clip, ``nonfinite`` and ``method`` (errors naming
    the setting) before anything is calibrated or trained."""
    dp.epsilon(
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=0,
        delta=config.delta,
        accountant=config.accountant,
        pld_discretization=config.pld_discretization,
    )
    # δ ≥ 1/N certifies nothing (publishing one random example in full is (0, 1/N)-DP).
    dp.accounting.check_delta(config.delta, num_examples=num_examples)
    dp.dp_grad(
        lambda p, x: p,
        l2_clip=config.l2_clip,
        noise_multiplier=sigma,
        expected_batch_size=1.0,
        nonfinite=config.nonfinite,
        method=config.method,
    )


def _noise_multiplier(draft: PrivacyPlan, target) -> float:
    """σ: the one given (checked against ``target_epsilon`` when both are: a resolved plan),
    or calibrated to ``target_epsilon`` over the draft's steps."""
    config, source, steps = draft.config, draft.source, draft.steps
    sigma = config.noise_multiplier
    if sigma is None and source.name in ("poisson", "cyclic_poisson"):
        return dp.calibrate_noise_multiplier(
            target_epsilon=target,
            delta=config.delta,
            sampling_rate=draft.sampling_rate,
            steps=draft.compositions(steps),
            accountant=config.accountant,
            pld_discretization=config.pld_discretization,
        )
    if sigma is None:
        return accounting.calibrate_event_noise(
            lambda s: source.dp_event(noise_multiplier=s, num_examples=draft.num_examples),
            target_epsilon=target,
            delta=config.delta,
            steps=steps,
            accountant=config.accountant,
            neighboring_relation=source.neighboring_relation,
            pld_discretization=config.pld_discretization,
        )
    if target is not None:
        spent = dataclasses.replace(draft, noise_multiplier=sigma).epsilon(steps)
        if spent > target * (1 + 1e-9):
            raise ValueError(
                f"`noise_multiplier` {sigma!r} spends ε = {spent:.4g} over the planned {steps} "
                f"steps, more than `target_epsilon` {config.target_epsilon!r}"
            )
    return sigma


def _stopping(the_plan: PrivacyPlan, stop: float) -> PrivacyPlan:
    """The plan stopped after the last step within ``stop_at_epsilon``: with σ given, "train
    until the budget is spent" is the point, so the steps that fit are counted now, before
    any data is touched, rather than the run refused."""
    steps, coefs = the_plan.steps, the_plan.coefs
    fit = the_plan.accountant().steps_within(
        stop, the_plan.step_event(), max_steps=the_plan.compositions(steps)
    )
    if coefs is not None:  # k participations of each group: the first k · b steps
        fit = min(steps, fit * len(coefs))
    if fit == 0:
        raise ValueError(
            f"`stop_at_epsilon` {stop!r} is spent by the first step (ε = "
            f"{the_plan.epsilon(1):.4g} at δ = {the_plan.config.delta}): not one step fits; "
            "raise the budget or `noise_multiplier`"
        )
    return dataclasses.replace(the_plan, stop_step=fit)


def _bandmf_source(config, source, *, num_examples, batch_size, steps):
    """``noise="bandmf"``'s batch source (cyclic Poisson over ``bands`` groups), checked;
    ``source`` itself for Gaussian noise."""
    reduce.check_choice(config.noise, NOISES, name="noise")
    if config.noise != "bandmf":
        if config.bands is not None:
            raise ValueError(
                f"`bands` applies only to noise='bandmf'; got bands={config.bands!r} with "
                f"noise={config.noise!r}"
            )
        return source
    if config.bands is None:
        raise ValueError("noise='bandmf' needs `bands` (the number of bands b >= 1); got None")
    if config.sampling != "poisson":
        raise ValueError(
            "noise='bandmf' samples its own way (cyclic Poisson over `bands` groups); "
            f"leave `sampling` at 'poisson'; got sampling={config.sampling!r}"
        )
    reduce.check_choice(config.bandmf_strategy, bandmf.STRATEGIES, name="bandmf_strategy")
    b = bandmf.check_bands(config.bands, steps=steps)
    if b * batch_size > num_examples:
        raise ValueError(
            f"`bands` ({b}) times `batch_size` ({batch_size}) must be at most the training set "
            f"({num_examples} examples): each step samples one of {b} groups of about "
            f"{num_examples // b} examples with rate bands * batch_size / N"
        )
    return sources.CyclicPoisson(sampling_rate=b * batch_size / num_examples, groups=b)


def run_optimizer(optimizer, the_plan: PrivacyPlan | None, key):
    """The optimizer the DP steps run: ``optimizer`` itself, or headed by the privatizer that
    carries state across steps, ``optax.chain(privatizer, optimizer)``: adaptive clipping's
    (:func:`jaxgrad.privacy.quantile_privatizer`, its state the clip norm) or BandMF's
    (:func:`jaxgrad.privacy.bandmf_privatizer`, its state the noise key and the last
    ``b − 1`` noise vectors; step ``t``'s ``z_t`` is Gaussian noise's, from
    ``dp_keys(key, t)``). :func:`release` takes BandMF's secret state out again."""
    if the_plan is None:
        return optimizer
    c = the_plan.config
    expected = the_plan.source.expected_batch_size(the_plan.num_examples)
    if c.adaptive_clip is not None:
        privatizer = adaptive.quantile_privatizer(
            noise_multiplier=the_plan.noise_multiplier,
            initial_clip=c.l2_clip,
            expected_batch_size=expected,
            adaptive_clip=c.adaptive_clip,
            nonfinite=c.nonfinite,
        )
    elif the_plan.coefs is not None:
        with keys.checked_seed(key):  # fit warned about this key: once is enough
            privatizer = noisy.bandmf_privatizer(
                coefs=the_plan.coefs,
                noise_multiplier=the_plan.noise_multiplier,
                l2_sensitivity=fast_api.clip_sensitivity(c.l2_clip),
                expected_batch_size=expected,
                key=key,
            )
    else:
        return optimizer
    return optax.chain(privatizer, optimizer)


def release(state: TrainState, the_plan: PrivacyPlan | None) -> TrainState:
    """``state`` without BandMF's privatizer state (its key and noise history are secret:
    with them the last steps' clipped sums could be recovered)."""
    if the_plan is None or the_plan.coefs is None:
        return state
    return state._replace(opt_state=state.opt_state[1])


def _check_adaptive(config, sigma, expected_batch_size):
    """``adaptive_clip``'s type and settings, before σ is calibrated (σ_b against the given
    σ, or only the settings when σ is calibrated later)."""
    a = config.adaptive_clip
    if not isinstance(a, adaptive.AdaptiveClip):
        raise TypeError(
            f"`adaptive_clip` must be a jaxgrad.privacy.AdaptiveClip (or None); got {a!r}"
        )
    if not isinstance(config.l2_clip, (int, float)) or isinstance(config.l2_clip, bool):
        raise TypeError(
            "`adaptive_clip` needs one initial clip norm `l2_clip` (a number); got "
            f"{config.l2_clip!r}"
        )
    if config.noise != "gaussian":
        raise ValueError(
            "`adaptive_clip` works with independent noise only (noise='gaussian'); got "
            f"noise={config.noise!r}"
        )
    if config.noise_multiplier is None:  # σ not known yet: the settings alone
        a = dataclasses.replace(a, count_noise_multiplier=a.count_noise_multiplier or 1.0)
        sigma = 0.0
    a.resolve(noise_multiplier=sigma, expected_batch_size=expected_batch_size)


def engine(
    loss_fn,
    train_data,
    the_plan: PrivacyPlan,
    *,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    chunk: int,
    scan: bool,
    mesh,
    check,
    loss_key,
) -> Engine:
    """The DP-SGD steps of :func:`jaxgrad.train.fit` (``privacy=...``), as parts.

    Step ``t``: ``(sample_key, noise_key) = dp_keys(key, t)`` (:mod:`jaxgrad.keys`); the batch
    source draws a Poisson sample of the whole training set from ``sample_key``; its physical
    batches' clipped sums are added (:class:`jaxgrad.privacy.ClippedSum`, sensitivity ``C``);
    the privatizer adds ``N(0, σ²C² I)`` from ``noise_key`` once and divides by ``qN``; then
    the optimizer. On one device the draw and its physical batches run in a
    ``lax.while_loop`` (:func:`jaxgrad.privacy.noisy.sampled_clipped_sum`); on a mesh the draw
    is computed the same in every process, and its physical batches are gathered on the host
    (each process its own devices' rows) and sharded over the ``"data"`` axis, their clipped
    sums added over devices, and the noise drawn once in the replicated sum. With
    ``nonfinite="raise"`` a step that met a non-finite example is NaN, which the loop's guard
    stops before (as it stops any step whose update is not finite).
    """
    c = the_plan.config
    n = reduce.batch_size(train_data, name="train_data")
    source, p = the_plan.source, the_plan.physical_batch_size
    steps_per_epoch = data_lib.num_batches(n, batch_size)
    last_step = the_plan.stop_step
    if c.adaptive_clip is None:
        clipped = noisy.ClippedSum(loss_fn, l2_clip=c.l2_clip, method=c.method)

        def clip_args(state):
            return ()
    else:  # the clip norm is an argument, read from the privatizer's state
        clipped = adaptive.QuantileClippedSum(loss_fn, method=c.method)

        def clip_args(state):
            return (state.opt_state[0].l2_clip,)

    transform = _transform(the_plan, optimizer, expected_batch_size=source.expected_batch_size(n))

    def loss_args(step):  # the loss's extra argument: this step's loss key, if any
        return () if loss_key is None else (keys.loss_step_key(loss_key, step),)

    def update(state, total, bad, key):
        updates, opt_state = transform(state, total, bad, key)
        new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
        return new, jnp.zeros(()), 0.0  # no loss: it would be computed on private rows

    config = {
        "privacy": {
            **the_plan.summary(0),
            "planned_steps": the_plan.steps,
            "nonfinite": c.nonfinite,
            "method": c.method,
        }
    }
    del config["privacy"]["epsilon"], config["privacy"]["steps"]
    config["privacy"].pop("participations", None)
    if the_plan.coefs is not None:  # a resumed run must noise with the same strategy
        config["privacy"]["bandmf_coefs"] = list(the_plan.coefs)

    def epoch_chunks(key, epoch):
        del key  # every step draws its own batch
        index = np.arange(data_lib.num_batches(steps_per_epoch, chunk) * chunk)
        # Steps past the budget's last (stop_at_epsilon) are inactive: never applied.
        active = (index < steps_per_epoch) & (epoch * steps_per_epoch + index < last_step)
        return list(active.reshape(-1, chunk))

    latest = {}  # the clip norm after the last chunk run (adaptive clipping): released

    def record(steps, loss_sum, count):
        del loss_sum, count
        return {"epsilon": the_plan.epsilon(steps), **latest}

    def failure(bad, epoch):
        return (
            f"step {bad + 1} (epoch {epoch + 1}) would have made the parameters or the "
            "optimizer state non-finite (NaN or inf): its draw met an example with a non-finite "
            "gradient under privacy nonfinite='raise', or its update overflowed; training "
            "stopped before that step. Check the data and the learning rate, or use "
            "nonfinite='drop'"
        )

    if mesh is None:
        draw_and_clip = noisy.sampled_clipped_sum(clipped, source=source, physical_batch_size=p)

        def step(state, data, key):
            sample_key, _ = keys.dp_keys(key, state.step)
            args = (*clip_args(state), *loss_args(state.step))
            total, _, bad, _ = draw_and_clip(state.params, data, sample_key, *args, step=state.step)
            return update(state, total, bad, key)

        run_chunk = _local_chunks(guarded(step), train_data, scan=scan)
    else:
        run_chunk = _mesh_chunks(
            clipped,
            update,
            train_data,
            the_plan,
            mesh=mesh,
            check=check,
            loss_args=loss_args,
            clip_args=clip_args,
        )
    if c.adaptive_clip is not None:
        run_chunk = _reporting_clip(run_chunk, latest)
    return Engine(
        config,
        steps_per_epoch,
        chunk,
        epoch_chunks,
        run_chunk,
        record,
        failure,
        last_step,
    )


def _transform(the_plan: PrivacyPlan, optimizer, *, expected_batch_size):
    """A step's privatizer and optimizer: ``transform(state, total, bad, key) -> (updates,
    opt_state)`` from the clipped sum. Independent Gaussian noise is added here from the
    step's noise key; adaptive clipping's and BandMF's privatizers head ``optimizer``
    (:func:`run_optimizer`) and get the step's keys as extra arguments (the count's from
    :func:`jaxgrad.keys.clip_count_key`, never the gradient's) or hold their own."""
    c = the_plan.config
    if c.adaptive_clip is not None:

        def transform(state, total, bad, key):
            _, noise_key = keys.dp_keys(key, state.step)
            count_key = keys.clip_count_key(key, state.step)
            return optimizer.update(
                total,
                state.opt_state,
                state.params,
                noise_key=noise_key,
                count_key=count_key,
                num_nonfinite=bad,
            )

    elif the_plan.coefs is not None:

        def transform(state, total, bad, key):
            del key  # BandMF's privatizer draws z_t from its own state (the same key)
            total = noisy.poison_nonfinite(total, bad, nonfinite=c.nonfinite)
            return optimizer.update(total, state.opt_state, state.params)

    else:
        privatize = functools.partial(
            noisy._privatize,
            nonfinite=c.nonfinite,
            stddev=noisy.noise_stddev(
                the_plan.noise_multiplier, fast_api.clip_sensitivity(c.l2_clip)
            ),
            expected_batch_size=expected_batch_size,
        )

        def transform(state, total, bad, key):
            _, noise_key = keys.dp_keys(key, state.step)
            g = privatize(total, None, bad, noise_key)
            return optimizer.update(g, state.opt_state, state.params)

    return transform


def _reporting_clip(run_chunk, latest):
    """``run_chunk`` that keeps the clip norm it ended with in ``latest["l2_clip"]`` (for
    the epoch's record: post-processing of the noisy counts)."""

    def run(state, key, active):
        out = run_chunk(state, key, active)
        latest["l2_clip"] = float(sharding_lib.local_replica(out[0].opt_state[0].l2_clip))
        return out

    return run


def _local_chunks(body, train_data, *, scan: bool):
    """``run_chunk`` on one device: the data on the device whole, the steps under
    ``lax.scan`` or (``scan=False``) a Python loop over the jitted step."""
    # The data set is an argument, never a closed-over constant: as a constant it was
    # compiled into the executable (188 MB for the benchmark's 60000 MNIST rows).
    data = jax.tree_util.tree_map(jnp.asarray, train_data)
    scanned = scan_chunk(lambda carry, a, *inputs: body(carry, *inputs, active=a))
    looped = loop_chunk(body)

    def run_chunk(state, key, active):
        if scan:
            state, bad = scanned(state, jnp.asarray(active), data, key)
        else:
            state, bad, _ = looped(state, itertools.repeat((data, key), int(np.sum(active))))
        return state, bad, 0.0, 0

    return run_chunk


def _mesh_chunks(clipped, update, train_data, the_plan, *, mesh, check, loss_args, clip_args):
    """``run_chunk`` on ``mesh``: each step's draw computed the same in every process, its
    physical batches gathered on the host (each process only its own devices' rows, padded
    to a multiple of the device count) and sharded over the ``"data"`` axis, their clipped
    ``(sum, count, bad)`` added over devices, then the noise drawn once, from the step's one
    noise key, in the replicated sum. Fixed shapes: one compiled physical-batch function and
    one update, however large the draw."""
    n = reduce.batch_size(train_data, name="train_data")
    source = the_plan.source
    (p,) = sampling.cap_sizes((the_plan.physical_batch_size,), n)  # as sampled_clipped_sum
    width = sharding_lib.device_multiple(p, mesh.shape["data"])
    batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    @jax.jit
    def draw(key, step):  # this process's copy of the step's one draw
        sample_key, _ = keys.dp_keys(key, step)
        return source.sample(
            sample_key, num_examples=n, physical_batch_size=p, **sources.step_kwargs(source, step)
        )

    @jax.jit
    def accumulate(params, acc, batch, mask, step, extra):
        batch, mask = sharding_lib.constrain((batch, mask), batch_spec)
        part = clipped(params, batch, mask, *extra, *loss_args(step))
        return jax.tree_util.tree_map(jnp.add, acc, part)

    finish = jax.jit(functools.partial(guarded(update), active=True))

    def zeros_like_sum(state):
        example = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((width, *x.shape[1:]), x.dtype), train_data
        )
        mask = jax.ShapeDtypeStruct((width,), bool)
        args = (*clip_args(state), *loss_args(state.step))
        shapes = jax.eval_shape(clipped, state.params, example, mask, *args)
        zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        return sharding_lib.replicate(zeros, mesh=mesh)

    def run_chunk(state, key, active):
        local_key, global_key = key, sharding_lib.replicate(key, mesh=mesh)
        carry = first_carry(state)
        zeros = None
        for _ in range(int(np.sum(active))):
            state = carry[0]
            sample = draw(local_key, int(state.step))
            zeros = zeros_like_sum(state) if zeros is None else zeros
            acc = zeros
            for k in range(int(dp.num_physical_batches(int(sample.count), p))):
                # The batch source's own k-th physical batch, padded for the devices.
                idx, mask = sharding_lib.pad_indices(
                    *sampling.physical_batch(sample, k, physical_batch_size=p), mesh.shape["data"]
                )
                batch, mask = sharding_lib.take_rows(train_data, idx, mask, mesh=mesh, check=check)
                acc = accumulate(state.params, acc, batch, mask, state.step, clip_args(state))
                sharding_lib.serialize_across_processes(acc)
            total, _, bad = acc
            carry, _ = finish(carry, total, bad, global_key)
            # The update would otherwise still run when the caller's next program (evaluation,
            # the next step's draw) issues its own collectives.
            sharding_lib.serialize_across_processes(carry)
            if int(carry[1]) >= 0:
                break
        return carry[0], carry[1], 0.0, 0

    return run_chunk


__all__ = [
    "PrivacyConfig",
    "PrivacyPlan",
    "engine",
    "per_layer_clip",
    "plan",
    "release",
    "run_optimizer",
]
