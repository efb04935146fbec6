"""DP-SGD training for :func:`jaxgrad.train.fit` (``fit(..., privacy=PrivacyConfig(...))``).

Every step samples the training set by Poisson sampling with rate ``q = batch_size / N`` and
takes the noisy gradient of :func:`jaxgrad.privacy.sampled_dp_grad`: the draw is run in
physical batches of a fixed size (accumulated, never truncated), the clipped sums are added,
``N(0, σ²C² I)`` is added once and the sum is divided once by ``qN``. An "epoch" is
``⌈N / batch_size⌉`` steps (each example is seen once per epoch *in expectation*).

``σ`` is either given or calibrated before training for the planned number of steps
(:func:`jaxgrad.privacy.calibrate_noise_multiplier`); the ε spent so far is reported after
every epoch (``epsilon`` in the history). Step ``t``'s sample and noise are drawn from
``fold_in(key, t)``, so the privacy state is the step count and the key: both are in every
checkpoint, a resumed run continues bit for bit, and a checkpoint written under other privacy
settings (clip, σ, q, δ, accountant, planned steps) is refused.

On a mesh (``fit(..., privacy=..., mesh=...)``) the step is the same computation, spread:
the Poisson sample is drawn over the whole data set from ``fold_in(key, t)`` — the same key,
hence the same draw, in every process (one draw for the step, never one per device or host,
so the inclusions stay independent across examples) — its physical batches are sharded
along the examples over the mesh's ``"data"`` axis (each process gathering only its own
devices' rows, :func:`jaxgrad.sharding.take_rows`), the clipped sums and counts are summed
over devices, and the noise is drawn once, from the step's one noise key, in the replicated
result. The parameters equal the one-device run's up to the order of the sums.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrad import privacy as dp
from jaxgrad import reduce
from jaxgrad import sharding as sharding_lib
from jaxgrad.privacy import noisy, sampling
from jaxgrad.train import checkpoint as ckpt
from jaxgrad.train import example_keys
from jaxgrad.train.progress import Progress, end_epoch
from jaxgrad.train.step import TrainState, init_state


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
      nonfinite: ``"drop"`` (default: examples with a non-finite gradient are left out and
        counted in the history's ``nonfinite``) or ``"raise"`` (training stops with
        ``FloatingPointError`` before the step that met one).
      method: ``"auto"`` (fast clipped sum) or ``"vmap"``.
      pld_discretization: the PLD accountant's value discretisation for calibration and the
        per-epoch ε (1e-3: an upper bound within 0.4% of the 1e-4 value for the reference
        setting, and about 10× cheaper to compute, so accounting never dominates an epoch).
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


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """A :class:`PrivacyConfig` resolved for a data set: what the run will do.

    Attributes:
      config: the config, with ``noise_multiplier`` filled in.
      noise_multiplier: ``σ``.
      sampling_rate: ``q = batch_size / N``.
      steps: the planned number of steps ``epochs · ⌈N / batch_size⌉``.
      physical_batch_size: ``P``.
    """

    config: PrivacyConfig
    noise_multiplier: float
    sampling_rate: float
    steps: int
    physical_batch_size: int

    def epsilon(self, steps: int) -> float:
        """The ε spent after ``steps`` steps."""
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
        return {
            "epsilon": self.epsilon(steps),
            "delta": c.delta,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": steps,
            "accountant": c.accountant,
            "pld_discretization": c.pld_discretization if c.accountant == "pld" else None,
            "l2_clip": c.l2_clip,
            "target_epsilon": c.target_epsilon,
            "physical_batch_size": self.physical_batch_size,
            "sampling": "poisson",
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
    q = batch_size / n
    if config.physical_batch_size is None:  # (not `or`: 0 is an error, not the default)
        physical = dp.default_physical_batch_size(num_examples=n, sampling_rate=q)
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
    dp.dp_grad(  # checks the clip, nonfinite and method
        lambda p, x: p,
        l2_clip=config.l2_clip,
        noise_multiplier=given,
        expected_batch_size=1.0,
        nonfinite=config.nonfinite,
        method=config.method,
    )
    sigma = config.noise_multiplier
    if sigma is None:
        sigma = dp.calibrate_noise_multiplier(
            target_epsilon=target,
            delta=config.delta,
            sampling_rate=q,
            steps=steps,
            accountant=config.accountant,
            pld_discretization=config.pld_discretization,
        )
    elif target is not None:  # both given (e.g. a resolved plan): σ must do
        spent = dp.epsilon(
            noise_multiplier=sigma,
            sampling_rate=q,
            steps=steps,
            delta=config.delta,
            accountant=config.accountant,
            pld_discretization=config.pld_discretization,
        )
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
    )
    return PrivacyPlan(resolved, sigma, q, steps, physical)


def fit_private(
    loss_fn,
    params,
    train_data,
    *,
    privacy: PrivacyConfig,
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    evaluate=None,
    checkpoint_dir=None,
    keep: int = 3,
    resume: bool = True,
    metrics_path=None,
    progress: str = "auto",
    quiet: bool = False,
    fingerprint=None,
    mesh=None,
    loss_key=None,
):
    """The DP-SGD loop behind ``fit(..., privacy=...)``; see :func:`jaxgrad.train.fit`."""
    from jaxgrad.train.loop import FitResult, validate_data  # loop imports this

    n = reduce.batch_size(train_data, name="train_data")
    the_plan = plan(privacy, num_examples=n, batch_size=batch_size, epochs=epochs)
    c = the_plan.config
    if mesh is not None:
        sharding_lib.check_batch(train_data, mesh=mesh)
    check = validate_data(loss_fn, train_data, mesh)
    if loss_key is not None:  # rows travel with the data; the step's key is a loss argument
        loss_fn, train_data = (
            example_keys.row_keyed_loss(loss_fn),
            example_keys.with_rows(train_data),
        )
        check = example_keys.row_check(check)
    grad_fn = dp.sampled_dp_grad(
        loss_fn,
        l2_clip=c.l2_clip,
        noise_multiplier=the_plan.noise_multiplier,
        sampling_rate=the_plan.sampling_rate,
        physical_batch_size=the_plan.physical_batch_size,
        nonfinite="drop",
        return_info=True,
        method=c.method,
    )
    steps_per_epoch = -(-n // batch_size)
    stop_on_bad = c.nonfinite == "raise"
    config = {
        "num_examples": n,
        "batch_size": batch_size,
        "key": fingerprint(key) if fingerprint else None,
        **({"loss_key": fingerprint(loss_key)} if loss_key is not None and fingerprint else {}),
        "privacy": {
            **the_plan.summary(0),
            "planned_steps": the_plan.steps,
            "nonfinite": c.nonfinite,
            "method": c.method,
        },
    }
    del config["privacy"]["epsilon"], config["privacy"]["steps"]
    if mesh is not None:
        config["devices"] = int(mesh.devices.size)

    def step_args(step):  # the loss's extra argument: this step's loss key, if any
        return () if loss_key is None else (jax.random.fold_in(loss_key, step),)

    @jax.jit
    def run_epoch(state, data, key):
        def one(carry, _):
            state, bad_step = carry
            g, info = grad_fn(
                state.params, data, jax.random.fold_in(key, state.step), *step_args(state.step)
            )
            updates, opt_state = optimizer.update(g, state.opt_state, state.params)
            new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
            stop = (bad_step >= 0) | (stop_on_bad & (info.num_nonfinite > 0))
            bad_step = jnp.where((bad_step < 0) & stop, state.step, bad_step)
            state = jax.tree_util.tree_map(lambda a, b: jnp.where(stop, b, a), new, state)
            return (state, bad_step), info.num_nonfinite

        (state, bad_step), nonfinite = jax.lax.scan(
            one, (state, jnp.int32(-1)), None, length=steps_per_epoch
        )
        return state, bad_step, jnp.sum(nonfinite)

    state = init_state(params, optimizer)
    history, start_epoch, last = [], 0, None
    if checkpoint_dir is not None:
        ckpt.prepare_directory(checkpoint_dir)
    if checkpoint_dir is not None and not resume and ckpt.list_checkpoints(checkpoint_dir):
        raise ckpt.CheckpointError(
            f"`checkpoint_dir` {os.fspath(checkpoint_dir)!r} already holds checkpoints of another "
            "run; with resume=False use an empty directory"
        )
    if checkpoint_dir is not None and resume:
        restored = ckpt.restore_latest(checkpoint_dir, {"state": state, "key": key})
        if restored is not None:
            tree, meta, last = restored
            old_devices = (meta.get("config") or {}).get("devices", 1)
            if mesh is not None and old_devices != config["devices"]:
                raise ckpt.CheckpointError(
                    f"checkpoint {last} was written by a run on {old_devices} device(s); this "
                    f"run has `mesh` with {config['devices']}. Resume on the same device count "
                    "(the order of the sums depends on it), or use another checkpoint_dir"
                )
            if meta.get("config") != config:
                old = (meta.get("config") or {}).get("privacy")
                if old != config["privacy"]:
                    changed = _changes(old, config["privacy"]) if old else "it was not private"
                    why = (
                        f"the privacy settings changed ({changed}); the accounting of the steps "
                        "already taken would be wrong. Resume with the same privacy settings"
                    )
                else:
                    why = (
                        f"the run changed ({_changes(meta.get('config') or {}, config)}). "
                        "Resume with the same data, batch_size and key"
                    )
                raise ckpt.CheckpointError(
                    f"checkpoint {last} was written by another run: {why}, or use another "
                    "checkpoint_dir"
                )
            state, key = tree["state"], tree["key"]
            start_epoch, history = meta["epoch"], meta["history"]

    if mesh is None:
        device_data = jax.tree_util.tree_map(jnp.asarray, train_data)
    else:
        state = sharding_lib.replicate(state, mesh=mesh)
        device_data = None
        run_epoch = _sharded_epoch(
            loss_fn,
            train_data,
            the_plan,
            optimizer=optimizer,
            steps_per_epoch=steps_per_epoch,
            stop_on_bad=stop_on_bad,
            mesh=mesh,
            check=check,
            step_args=step_args,
        )
    metrics_file = open(metrics_path, "a") if metrics_path is not None else None
    bar = Progress(epochs * steps_per_epoch, mode=progress, quiet=quiet, initial=int(state.step))
    start = time.perf_counter()
    try:
        for epoch in range(start_epoch, epochs):
            before = int(state.step)
            new_state, bad_step, nonfinite = run_epoch(state, device_data, key)
            bad_step = int(bad_step)
            if bad_step >= 0:
                raise FloatingPointError(
                    f"step {bad_step + 1} (epoch {epoch + 1}) met an example with a non-finite "
                    "(NaN or inf) gradient and privacy nonfinite='raise'; training stopped "
                    "before that step. Check the data, or use nonfinite='drop'"
                )
            state = new_state
            bar.update(int(state.step) - before)
            record = {
                "epoch": epoch + 1,
                "step": int(state.step),
                "epsilon": the_plan.epsilon(int(state.step)),
                "nonfinite": int(nonfinite),
            }
            end_epoch(
                record,
                params=sharding_lib.local_replica(state.params),
                evaluate=evaluate,
                start=start,
                history=history,
                bar=bar,
                metrics_file=metrics_file,
            )
            if checkpoint_dir is not None and mesh is not None and jax.process_index() != 0:
                last = ckpt.path_for(checkpoint_dir, int(state.step))  # process 0 writes
            elif checkpoint_dir is not None:
                meta = {"epoch": epoch + 1, "history": history, "config": config}
                last = ckpt.save(
                    checkpoint_dir,
                    {"state": sharding_lib.local_replica(state), "key": key},
                    step=int(state.step),
                    metadata=meta,
                    keep=keep,
                )
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return FitResult(state.params, state, history)


def _changes(old: dict, new: dict) -> str:
    """``"name: old -> new"`` for every key whose value differs between two config dicts."""
    keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def _sharded_epoch(
    loss_fn,
    train_data,
    the_plan,
    *,
    optimizer,
    steps_per_epoch,
    stop_on_bad,
    mesh,
    check,
    step_args,
):
    """``run_epoch(state, data, key)`` on ``mesh``: :func:`jaxgrad.privacy.sampled_dp_grad`'s
    step, with its physical batches gathered on the host and sharded over the devices.

    Step ``t``: ``sample_key, noise_key = split(fold_in(key, t))`` as in ``sampled_dp_grad``;
    the Poisson draw over all ``N`` examples comes from ``sample_key`` and is computed the same
    in every process (same key, same program), its ``⌈b / P⌉`` physical batches are padded to
    a multiple of the device count (masked rows) and sharded along the examples, their
    clipped ``(sum, count)`` pairs are added (each a sum over devices), then ``N(0, σ²C² I)``
    from ``noise_key`` is added once to the replicated sum and the whole is divided by
    ``qN``. Fixed shapes: one compiled physical-batch function and one update, however large
    the draw.
    """
    c = the_plan.config
    n = reduce.batch_size(train_data, name="train_data")
    q, p = the_plan.sampling_rate, the_plan.physical_batch_size
    stddev = the_plan.noise_multiplier * c.l2_clip
    devices = mesh.shape["data"]
    width = -(-p // devices) * devices
    batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    clipped = noisy.clipped_sum_dropping_nonfinite(loss_fn, l2_clip=c.l2_clip, method=c.method)

    @jax.jit
    def draw(key, step):  # this process's copy of the step's one draw
        sample_key, _ = jax.random.split(jax.random.fold_in(key, step))
        sample = sampling.poisson_sample(
            sample_key, num_examples=n, sampling_rate=q, physical_batch_size=p
        )
        return sample.indices, sample.count

    @jax.jit
    def accumulate(params, acc, batch, mask, step):
        batch, mask = jax.lax.with_sharding_constraint((batch, mask), batch_spec)
        return jax.tree_util.tree_map(jnp.add, acc, clipped(params, batch, mask, *step_args(step)))

    @jax.jit
    def update(state, total, key):
        _, noise_key = jax.random.split(jax.random.fold_in(key, state.step))
        # once, on the replicated sum
        g = noisy.noised_average(total, noise_key, stddev=stddev, expected_batch_size=q * n)
        updates, opt_state = optimizer.update(g, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)

    def run_epoch(state, data, key):
        del data
        local_key, global_key = key, sharding_lib.replicate(key, mesh=mesh)
        zeros = None
        nonfinite = 0
        for _ in range(steps_per_epoch):
            indices, count = draw(local_key, int(state.step))
            indices, count = np.asarray(indices), int(count)
            if zeros is None:
                shapes = jax.eval_shape(
                    clipped,
                    state.params,
                    jax.tree_util.tree_map(
                        lambda x: jax.ShapeDtypeStruct((width, *x.shape[1:]), x.dtype),
                        train_data,
                    ),
                    jax.ShapeDtypeStruct((width,), bool),
                    *step_args(state.step),
                )
                zeros = sharding_lib.replicate(
                    jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                    mesh=mesh,
                )
            acc = zeros
            for k in range(int(sampling.num_physical_batches(count, p))):
                idx = indices[k * p : (k + 1) * p]
                mask = k * p + np.arange(p) < count
                idx = np.concatenate([idx, np.full(width - p, idx[0], idx.dtype)])
                mask = np.concatenate([mask, np.zeros(width - p, bool)])
                batch, mask = sharding_lib.take_rows(train_data, idx, mask, mesh=mesh, check=check)
                acc = accumulate(state.params, acc, batch, mask, state.step)
                sharding_lib.serialize_across_processes(acc)
            total, _, bad = acc
            bad = int(bad)
            if stop_on_bad and bad:
                return state, np.int32(int(state.step)), nonfinite
            nonfinite += bad
            state = update(state, total, global_key)
            # The epoch's last update would otherwise still run when the caller's next
            # program (evaluation, the next epoch's key) issues its own collectives.
            sharding_lib.serialize_across_processes(state)
        return state, np.int32(-1), nonfinite

    return run_epoch


__all__ = ["PrivacyConfig", "PrivacyPlan", "fit_private", "plan"]
