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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrad import keys, reduce
from jaxgrad import privacy as dp
from jaxgrad import sharding as sharding_lib
from jaxgrad.privacy import accounting, noisy, sampling, sources
from jaxgrad.train.step import Engine, TrainState, guarded


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD settings for :func:`jaxgrad.train.fit`.

    Give ``target_epsilon`` (σ is calibrated for the planned steps) or ``noise_multiplier``;
    with both, σ is used and must spend at most ``target_epsilon``.

    Attributes:
      l2_clip: the per-example clipping norm ``C``.
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
    """

    config: PrivacyConfig
    noise_multiplier: float
    sampling_rate: float
    steps: int
    physical_batch_size: int
    source: object = None
    num_examples: int | None = None
    stop_step: int | None = None

    def accountant(self, steps: int = 0) -> dp.Accountant:
        """A :class:`jaxgrad.privacy.Accountant` holding ``steps`` of this plan's steps."""
        c = self.config
        acc = dp.Accountant(
            accountant=c.accountant,
            delta=c.delta,
            neighboring_relation=self.source.neighboring_relation,
            pld_discretization=c.pld_discretization,
        )
        acc.record(self.step_event(), steps=steps)
        return acc

    def step_event(self):
        """One step's dp-accounting event (the batch source's)."""
        return self.source.dp_event(
            noise_multiplier=self.noise_multiplier, num_examples=self.num_examples
        )

    def epsilon(self, steps: int) -> float:
        """The ε spent after ``steps`` steps."""
        if self.source.name != "poisson":
            return self.accountant(steps).epsilon()
        return dp.epsilon(
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sampling_rate,
            steps=steps,
            delta=self.config.delta,
            accountant=self.config.accountant,
            pld_discretization=self.config.pld_discretization,
        )

    def summary(self, steps: int) -> dict:
        """The ``privacy`` record of the CLI's JSON after ``steps`` steps."""
        c = self.config
        if self.source.name != "poisson":
            accountant = self.accountant(steps).effective_accountant()
        else:
            accountant = dp.accounting.effective_accountant(  # "rdp" where PLD would not fit
                noise_multiplier=self.noise_multiplier,
                sampling_rate=self.sampling_rate,
                steps=steps,
                accountant=c.accountant,
                pld_discretization=c.pld_discretization,
            )
        extra = {}  # only where not the default: a Poisson run's record is unchanged
        if self.source.name == "truncated_poisson":
            extra["max_batch_size"] = self.source.max_batch_size
        if self.source.neighboring_relation != "add_or_remove_one":
            extra["neighboring_relation"] = self.source.neighboring_relation
        if c.stop_at_epsilon is not None:
            extra.update(stop_at_epsilon=c.stop_at_epsilon, stop_step=self.stop_step)
        return {
            "epsilon": self.epsilon(steps),
            "delta": c.delta,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": steps,
            "accountant": accountant,
            "pld_discretization": c.pld_discretization if accountant == "pld" else None,
            "l2_clip": c.l2_clip,
            "target_epsilon": c.target_epsilon,
            "physical_batch_size": self.physical_batch_size,
            "sampling": self.source.name,
            **extra,
        }


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
    if batch_size > n:
        raise ValueError(
            f"`batch_size` ({batch_size}) is larger than the training set ({n}); "
            f"expected at most {n}"
        )
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
    if config.physical_batch_size is None:  # (not `or`: 0 is an error, not the default)
        physical = source.default_physical_batch_size(n)
    else:
        physical = reduce.check_positive_int(config.physical_batch_size, name="physical_batch_size")
    steps = epochs * -(-n // batch_size)
    given = 1.0 if config.noise_multiplier is None else config.noise_multiplier
    dp.epsilon(  # checks σ, δ and the accountant before calibrating or training
        noise_multiplier=given,
        sampling_rate=q,
        steps=0,
        delta=config.delta,
        accountant=config.accountant,
        pld_discretization=config.pld_discretization,
    )
    # δ ≥ 1/N certifies nothing (publishing one random example in full is (0, 1/N)-DP).
    dp.accounting.check_delta(config.delta, num_examples=n)
    dp.dp_grad(  # checks the clip, nonfinite and method
        lambda p, x: p,
        l2_clip=config.l2_clip,
        noise_multiplier=given,
        expected_batch_size=1.0,
        nonfinite=config.nonfinite,
        method=config.method,
    )
    stop = config.stop_at_epsilon
    if stop is not None:
        stop = reduce.check_positive_float(stop, name="stop_at_epsilon")
    draft = PrivacyPlan(config, given, q, steps, physical, source, n)
    draft.accountant()  # refuses a sampling the accountant cannot account (naming which can)
    sigma = config.noise_multiplier
    if sigma is None and source.name == "poisson":
        sigma = dp.calibrate_noise_multiplier(
            target_epsilon=target,
            delta=config.delta,
            sampling_rate=q,
            steps=steps,
            accountant=config.accountant,
            pld_discretization=config.pld_discretization,
        )
    elif sigma is None:
        sigma = accounting.calibrate_event_noise(
            lambda s: source.dp_event(noise_multiplier=s, num_examples=n),
            target_epsilon=target,
            delta=config.delta,
            steps=steps,
            accountant=config.accountant,
            neighboring_relation=source.neighboring_relation,
            pld_discretization=config.pld_discretization,
        )
    elif target is not None:  # both given (e.g. a resolved plan): σ must do
        spent = dataclasses.replace(draft, noise_multiplier=sigma).epsilon(steps)
        if spent > target * (1 + 1e-9):
            raise ValueError(
                f"`noise_multiplier` {sigma!r} spends ε = {spent:.4g} over the planned {steps} "
                f"steps, more than `target_epsilon` {config.target_epsilon!r}"
            )
    sigma = reduce.check_nonnegative_float(sigma, name="noise_multiplier")
    resolved = dataclasses.replace(
        config,
        l2_clip=reduce.check_positive_float(config.l2_clip, name="l2_clip"),
        noise_multiplier=sigma,
        delta=float(config.delta),  # checked by dp.epsilon above
        target_epsilon=target,
        pld_discretization=reduce.check_positive_float(
            config.pld_discretization, name="pld_discretization"
        ),
        stop_at_epsilon=stop,
    )
    the_plan = PrivacyPlan(resolved, sigma, q, steps, physical, source, n, steps)
    if stop is None:
        return the_plan
    # Stop early rather than refuse: with σ given, "train until the budget is spent" is the
    # point; the steps that fit are counted now, before any data is touched.
    fit = the_plan.accountant().steps_within(stop, the_plan.step_event(), max_steps=steps)
    if fit == 0:
        raise ValueError(
            f"`stop_at_epsilon` {stop!r} is spent by the first step (ε = "
            f"{the_plan.epsilon(1):.4g} at δ = {config.delta}): not one step fits; raise the "
            "budget or `noise_multiplier`"
        )
    return dataclasses.replace(the_plan, stop_step=fit)


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
    stddev = the_plan.noise_multiplier * c.l2_clip
    steps_per_epoch = -(-n // batch_size)
    last_step = the_plan.stop_step
    clipped = noisy.ClippedSum(loss_fn, l2_clip=c.l2_clip, method=c.method)
    privatize = functools.partial(
        noisy._privatize,
        nonfinite=c.nonfinite,
        stddev=stddev,
        expected_batch_size=source.expected_batch_size(n),
    )

    def loss_args(step):  # the loss's extra argument: this step's loss key, if any
        return () if loss_key is None else (keys.step_key(loss_key, step),)

    def update(state, total, bad, noise_key):
        g = privatize(total, None, bad, noise_key)
        updates, opt_state = optimizer.update(g, state.opt_state, state.params)
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

    def epoch_chunks(key, epoch):
        del key  # every step draws its own batch
        index = np.arange(-(-steps_per_epoch // chunk) * chunk)
        # Steps past the budget's last (stop_at_epsilon) are inactive: never applied.
        active = (index < steps_per_epoch) & (epoch * steps_per_epoch + index < last_step)
        return list(active.reshape(-1, chunk))

    def record(steps, loss_sum, count):
        del loss_sum, count
        return {"epsilon": the_plan.epsilon(steps)}

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
            sample_key, noise_key = keys.dp_keys(key, state.step)
            total, _, bad, _ = draw_and_clip(state.params, data, sample_key, *loss_args(state.step))
            return update(state, total, bad, noise_key)

        run_chunk = _local_chunks(guarded(step), train_data, scan=scan)
    else:
        run_chunk = _mesh_chunks(
            clipped, update, train_data, the_plan, mesh=mesh, check=check, loss_args=loss_args
        )
    return Engine(
        config, steps_per_epoch, chunk, epoch_chunks, run_chunk, record, failure, last_step
    )


def _local_chunks(body, train_data, *, scan: bool):
    """``run_chunk`` on one device: the data on the device whole, the steps under
    ``lax.scan`` or (``scan=False``: convolutions on a CPU) a Python loop over the jitted
    step."""
    data = jax.tree_util.tree_map(jnp.asarray, train_data)

    if scan:

        @jax.jit
        def scan_chunk(state, key, active):
            def f(carry, a):
                return body(carry, data, key, active=a)

            (state, bad), _ = jax.lax.scan(f, (state, jnp.int32(-1)), active)
            return state, bad

        def run_chunk(state, key, active):
            state, bad = scan_chunk(state, key, jnp.asarray(active))
            return state, bad, 0.0, 0

        return run_chunk

    one = jax.jit(functools.partial(body, active=True))

    def run_chunk(state, key, active):
        carry = (state, jnp.int32(-1))
        for _ in range(int(np.sum(active))):
            carry, _ = one(carry, data, key)
        return carry[0], carry[1], 0.0, 0

    return run_chunk


def _mesh_chunks(clipped, update, train_data, the_plan, *, mesh, check, loss_args):
    """``run_chunk`` on ``mesh``: each step's draw computed the same in every process, its
    physical batches gathered on the host (each process only its own devices' rows, padded
    to a multiple of the device count) and sharded over the ``"data"`` axis, their clipped
    ``(sum, count, bad)`` added over devices, then the noise drawn once, from the step's one
    noise key, in the replicated sum. Fixed shapes: one compiled physical-batch function and
    one update, however large the draw."""
    n = reduce.batch_size(train_data, name="train_data")
    source, p = the_plan.source, the_plan.physical_batch_size
    devices = mesh.shape["data"]
    width = -(-p // devices) * devices
    batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    @jax.jit
    def draw(key, step):  # this process's copy of the step's one draw
        sample_key, _ = keys.dp_keys(key, step)
        return source.sample(sample_key, num_examples=n, physical_batch_size=p)

    @jax.jit
    def accumulate(params, acc, batch, mask, step):
        batch, mask = sharding_lib.constrain((batch, mask), batch_spec)
        return jax.tree_util.tree_map(jnp.add, acc, clipped(params, batch, mask, *loss_args(step)))

    def finish_step(state, total, bad, key):
        _, noise_key = keys.dp_keys(key, state.step)
        return update(state, total, bad, noise_key)

    finish = jax.jit(functools.partial(guarded(finish_step), active=True))

    def zeros_like_sum(params, step):
        example = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((width, *x.shape[1:]), x.dtype), train_data
        )
        mask = jax.ShapeDtypeStruct((width,), bool)
        shapes = jax.eval_shape(clipped, params, example, mask, *loss_args(step))
        zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        return sharding_lib.replicate(zeros, mesh=mesh)

    def run_chunk(state, key, active):
        local_key, global_key = key, sharding_lib.replicate(key, mesh=mesh)
        carry = (state, jnp.int32(-1))
        zeros = None
        for _ in range(int(np.sum(active))):
            state = carry[0]
            sample = draw(local_key, int(state.step))
            zeros = zeros_like_sum(state.params, state.step) if zeros is None else zeros
            acc = zeros
            for k in range(int(dp.num_physical_batches(int(sample.count), p))):
                # The batch source's own k-th physical batch, padded for the devices.
                idx, mask = map(
                    np.asarray, sampling.physical_batch(sample, k, physical_batch_size=p)
                )
                idx = np.concatenate([idx, np.full(width - p, idx[0], idx.dtype)])
                mask = np.concatenate([mask, np.zeros(width - p, bool)])
                batch, mask = sharding_lib.take_rows(train_data, idx, mask, mesh=mesh, check=check)
                acc = accumulate(state.params, acc, batch, mask, state.step)
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


__all__ = ["PrivacyConfig", "PrivacyPlan", "engine", "plan"]
