"""``fit``: epochs of jit-compiled SGD with shuffling, padding masks, checkpoints and resume.

Each epoch's order is ``permutation(fold_in(key, epoch))`` (a pure function of the key and
the epoch), cut into batches of ``batch_size``; the last partial batch is padded and masked,
so no example is dropped and nothing recompiles. Batches run in chunks of fixed length under
``lax.scan`` (or, with ``scan=False``, a Python loop over the jitted step); between chunks the
loop checks for a non-finite loss, reports progress and writes checkpoints. Chunks are
aligned to the epoch's start, so a run resumed from any checkpoint replays exactly the same
computation and ends bit for bit where the uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrad import data as data_lib
from jaxgrad import reduce
from jaxgrad import sharding as sharding_lib
from jaxgrad.grads import batch_grad
from jaxgrad.train import checkpoint as ckpt
from jaxgrad.train import example_keys, private
from jaxgrad.train.private import PrivacyConfig
from jaxgrad.train.progress import Progress, end_epoch
from jaxgrad.train.step import TrainState, check_optimizer, init_state, step_fn, strategy_name

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """Training stopped at a non-finite loss.

    Attributes:
      step: the 1-based number of the step whose loss was not finite.
      state: the :class:`TrainState` before that step (the last good one).
      checkpoint: the last good checkpoint on disk, or None.
    """

    def __init__(self, message: str, *, step: int, state: TrainState, checkpoint: str | None):
        super().__init__(message)
        self.step, self.state, self.checkpoint = step, state, checkpoint


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      params: the trained parameters.
      state: the final :class:`TrainState` (params, optimizer state, step count).
      history: one dict per epoch: ``epoch``, ``step``, ``loss`` (the epoch's training loss:
        each batch's mean loss, at the parameters that batch saw, weighted by its number of
        real examples; for a scalar loss the mean over every example of the epoch, the last
        partial batch included; for ``(loss_sum, n_items)`` losses batches are weighted by
        examples, not items), ``seconds`` (since the start of this call) and the
        ``evaluate`` metrics.
    """

    params: PyTree
    state: TrainState
    history: list[dict]


# Module level, so its compilation is shared by every fit with the same data and batch sizes.
_epoch_indices = jax.jit(data_lib.epoch_indices, static_argnums=(2, 3))


def _all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (a scalar bool)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def _guarded(step):
    """The step inside the loop: a padded (inactive) step or one after a non-finite loss is
    a no-op, and the first non-finite loss records the step count where it happened."""

    def body(carry, batch, mask, active):
        state, bad = carry
        new, loss = step(state, batch, mask)
        # A finite loss is not enough: an update can still make the parameters or the
        # optimizer state non-finite, and such a state must never be kept or checkpointed.
        finite = jnp.isfinite(loss) & _all_finite(new)
        ok = active & (bad < 0) & finite
        bad = jnp.where(active & (bad < 0) & ~finite, state.step, bad)
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state)
        count = jnp.sum(mask).astype(loss.dtype)
        return (state, bad), jnp.where(ok, loss * count, 0)

    return body


def _positive(value, name):
    return reduce.check_positive_int(value, name=name)


def _check_fit_args(params, optimizer, key) -> None:
    """Clear errors for the arguments of :func:`fit` that JAX/optax would fail on obscurely."""
    reduce.check_params(params)
    check_optimizer(optimizer)
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and np.shape(key) == (2,)
    if not ((typed and np.shape(key) == ()) or raw):
        raise TypeError(
            f"`key` must be one PRNG key, e.g. jax.random.key(0); got {key!r}"
            + (" (an int is a seed, not a key)" if isinstance(key, int) else "")
        )


def _has_convolution(loss_fn, params, data) -> bool:
    """Whether one example's loss runs a convolution (read off its jaxpr; no row is read)."""
    example = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), data)
    return "conv_general_dilated" in str(jax.make_jaxpr(loss_fn)(params, example))


def _in_memory(data) -> bool:
    """Whether every leaf of ``data`` is an in-memory array (not memory-mapped or lazy)."""
    return all(
        isinstance(x, jax.Array) or (isinstance(x, np.ndarray) and not isinstance(x, np.memmap))
        for x in jax.tree_util.tree_leaves(data)
    )


def _row_check(validate):
    """``check(rows, mask)`` for :func:`jaxgrad.sharding.take_rows`: validates the real rows."""
    if validate is None:
        return None

    def check(rows, mask):
        if np.any(mask):
            validate(jax.tree_util.tree_map(lambda x: x[mask], rows))

    return check


def validate_data(loss_fn, data, mesh):
    """Validates ``data`` with ``loss_fn.validate`` up front, or returns the per-batch check.

    In-memory data (or any data without a mesh) is validated whole before training. File-backed
    data on a mesh is never read whole: each process validates the rows it feeds, as it
    gathers them (the returned ``check``).
    """
    validate = getattr(loss_fn, "validate", None)
    if validate is None:
        return None
    if mesh is None or _in_memory(data):
        validate(data)
        return None
    return _row_check(validate)


def _fingerprint(key) -> str:
    """A short hash of a PRNG key's data, to tell runs with different seeds apart."""
    data = np.asarray(
        jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    )
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def _non_finite_rows(data, mesh, idx, mask, batch: int) -> str:
    """The rows of batch ``batch`` whose floating-point data are NaN or inf, as text ("" for
    none, or for data on a mesh, which is not read whole here)."""
    if mesh is not None:
        return ""
    rows = np.asarray(idx)[batch][np.asarray(mask)[batch]]
    bad = np.zeros(len(rows), bool)
    for leaf in jax.tree_util.tree_leaves(data):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            values = np.asarray(leaf[rows]).reshape(len(rows), -1)
            bad |= ~np.isfinite(values).all(axis=1)
    found = sorted(int(r) for r in rows[bad])
    return ", ".join(map(str, found[:5])) + (", ..." if len(found) > 5 else "")


def _fit_private(*args, strategy, scan, steps_per_call, checkpoint_every, mesh, **kwargs):
    """``fit(..., privacy=...)``: the DP-SGD loop of :mod:`jaxgrad.train.private`."""
    for name, value in (("checkpoint_every", checkpoint_every), ("steps_per_call", steps_per_call)):
        if value is not None:
            raise ValueError(
                f"`{name}` does not apply with `privacy` (one chunk per epoch); got {value!r}"
            )
    if strategy is not batch_grad:
        raise ValueError(
            "`strategy` does not apply with `privacy`: DP-SGD takes the noisy clipped gradient of "
            f"jaxgrad.privacy.sampled_dp_grad; got strategy={strategy!r}"
        )
    del scan
    return private.fit_private(*args, **kwargs, fingerprint=_fingerprint, mesh=mesh)


def fit(
    loss_fn: Callable,
    params: PyTree,
    train_data: PyTree,
    *,
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    strategy: Callable = batch_grad,
    evaluate: Callable[[PyTree], Mapping[str, float]] | None = None,
    scan: bool | str = "auto",
    steps_per_call: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    resume: bool = True,
    metrics_path: str | os.PathLike | None = None,
    progress: str = "auto",
    quiet: bool = False,
    privacy: PrivacyConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    loss_key: jax.Array | None = None,
) -> FitResult:
    """Trains ``params`` on ``train_data`` for ``epochs`` epochs of minibatch SGD.

    Every step is ``θ ← θ + optimizer.update(strategy(loss_fn)(θ, batch, mask))``, jit-compiled
    once for the batch shape.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``; if it has a
        ``validate(batch)`` method (:func:`jaxgrad.losses.supervised`), the whole training set
        is validated first (e.g. labels out of the model's classes).
      params: the initial parameters.
      train_data: the training set, a pytree with a leading example axis, e.g. ``(x, y)``.
      optimizer: any optax ``GradientTransformation``.
      epochs: the total number of epochs (a resumed run continues up to it).
      batch_size: examples per batch, at most the size of ``train_data``.
      key: the PRNG key of the shuffle; epoch ``e``'s order is a function of ``(key, e)`` only.
      strategy: a gradient-strategy factory, as for :func:`jaxgrad.train.train_step`.
      evaluate: ``evaluate(params) -> {name: float}``, called after every epoch (see
        :func:`jaxgrad.train.evaluator`).
      scan: run the batches of a chunk under ``lax.scan`` (one dispatch per chunk) instead of
        a Python loop over the jitted step. ``"auto"`` (default) scans unless the loss has a
        convolution and the backend is the CPU, where XLA runs a convolution inside a loop
        body many times slower (17x for the benchmark's CNN); for dense models on the CPU the
        scan took 137-181 µs per step against 215-435 µs for the Python loop (digits MLP,
        batch 32).
      steps_per_call: the chunk length (default: a whole epoch, or ``checkpoint_every`` if
        smaller); between chunks progress is reported and non-finite losses caught.
      checkpoint_dir: if given, checkpoints are written there and, with ``resume``, the run
        continues from the newest good one.
      checkpoint_every: write a checkpoint at the first chunk end at or after every multiple
        of this many steps (default: every epoch); always at the end.
      keep: how many checkpoints to keep.
      resume: continue from the newest good checkpoint in ``checkpoint_dir`` if there is one.
      metrics_path: if given, every epoch's record is appended there as a JSON line.
      progress: ``"auto"`` (a tqdm bar on a terminal, silent otherwise), ``"bar"``,
        ``"plain"`` (a line per epoch on stderr) or ``"none"``.
      quiet: no progress output at all.
      privacy: a :class:`jaxgrad.train.PrivacyConfig` to train with DP-SGD instead (see
        :mod:`jaxgrad.train.private`): Poisson sampling with rate ``batch_size / N``, the
        noisy clipped gradient, σ calibrated to a target ε, ε reported per epoch (history
        key ``epsilon``). ``strategy``, ``checkpoint_every`` and ``steps_per_call`` do not
        apply (checkpoints are written every epoch). Works with ``mesh``: one Poisson draw
        per step over the whole data set, from a key every process derives the same way
        (never one draw per device or host), its physical batches sharded over the devices,
        the noise drawn once in the replicated result.
      mesh: train data-parallel over this mesh's ``"data"`` axis (see
        :func:`jaxgrad.sharding.data_mesh`): every batch is sharded along its examples,
        padded (masked out) to a multiple of the device count, and the parameters are
        replicated; the gradient is the same ``(sum, count)`` reduction, summed over devices.
        The batches are gathered on the host chunk by chunk
        (:func:`jaxgrad.sharding.take_rows`), never the whole data set on the devices; what
        each step sees does not depend on the process count. With several processes
        (:func:`jaxgrad.sharding.initialize`) every process calls ``fit`` with the same
        arguments and reads only the rows its own devices hold: pass ``train_data`` as
        memory-mapped files (:func:`jaxgrad.data.memmap`) and no process loads the whole
        data set (in-memory arrays work too, but then each process has loaded them whole).
        In-memory data is validated whole up front; memory-mapped data is validated row by
        row as each process gathers it. With ``scan`` a chunk of this process's rows is
        held at once (``steps_per_call`` bounds it). Process 0 writes the checkpoints (the
        replicated state, in the usual format; resuming needs ``checkpoint_dir`` visible to
        every process) and all of them read it on resume.

      loss_key: a PRNG key for randomness inside the loss (dropout). When given, the loss is
        called as ``loss_fn(params, example, key)`` with ``key = fold_in(fold_in(loss_key, t),
        i)`` for the example at row ``i`` of ``train_data`` at step ``t``: a different key for
        every example and step, independent of batching, devices and processes (see
        :mod:`jaxgrad.train.example_keys`); with ``privacy`` too.

    Returns:
      A :class:`FitResult` ``(params, state, history)``.

    Raises:
      ValueError: ``batch_size`` larger than the data set, bad labels, a checkpoint from a
        differently configured run.
      NonFiniteLossError: a loss became NaN or inf; names the step; parameters and the last
        good checkpoint are those before it.

    Example::

      >>> import jax, optax, jaxgrad
      >>> ds = jaxgrad.data.load("digits")
      >>> model = jaxgrad.models.mlp([64, 64, 10])
      >>> loss_fn = jaxgrad.losses.supervised(
      ...     model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=10)
      >>> result = jaxgrad.train.fit(
      ...     loss_fn, model.init(jax.random.key(0)), ds.train, optimizer=optax.adam(1e-2),
      ...     epochs=2, batch_size=64, key=jax.random.key(1))
      >>> len(result.history)
      2
    """
    _check_fit_args(params, optimizer, key)
    epochs = _positive(epochs, "epochs")
    batch_size = _positive(batch_size, "batch_size")
    keep = _positive(keep, "keep")
    loss_key = example_keys.check_loss_fn(loss_fn, loss_key)
    resume = reduce.check_flag(resume, name="resume")
    quiet = reduce.check_flag(quiet, name="quiet")
    if checkpoint_every is not None:
        checkpoint_every = _positive(checkpoint_every, "checkpoint_every")
        if checkpoint_dir is None:
            raise ValueError(
                f"`checkpoint_every` ({checkpoint_every}) needs `checkpoint_dir`; got "
                "checkpoint_dir=None (no checkpoint would be written)"
            )
    if evaluate is not None and not callable(evaluate):
        raise TypeError(
            f"`evaluate` must be a function evaluate(params) -> {{name: number}}; got {evaluate!r}"
        )
    if privacy is not None:
        return _fit_private(
            loss_fn,
            params,
            train_data,
            privacy=privacy,
            optimizer=optimizer,
            epochs=epochs,
            batch_size=batch_size,
            key=key,
            strategy=strategy,
            evaluate=evaluate,
            scan=scan,
            steps_per_call=steps_per_call,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            keep=keep,
            resume=resume,
            metrics_path=metrics_path,
            progress=progress,
            quiet=quiet,
            mesh=mesh,
            loss_key=loss_key,
        )
    n = reduce.batch_size(train_data, name="train_data")
    if scan == "auto":
        traced = loss_fn if loss_key is None else lambda p, x: loss_fn(p, x, loss_key)
        scan = not (jax.default_backend() == "cpu" and _has_convolution(traced, params, train_data))
    elif not isinstance(scan, bool):
        raise ValueError(f"`scan` must be True, False or 'auto'; got {scan!r}")
    if batch_size > n:
        raise ValueError(
            f"`batch_size` ({batch_size}) is larger than the training set ({n} examples); "
            f"expected at most {n}"
        )
    check = validate_data(loss_fn, train_data, mesh)
    if loss_key is not None:  # the data carries its row numbers, turned into keys per step
        loss_fn, train_data = example_keys.keyed_loss(loss_fn), example_keys.with_rows(train_data)
        check = example_keys.row_check(check)

    if mesh is not None:
        sharding_lib.check_batch(train_data, mesh=mesh)
        devices = mesh.shape["data"]
        # Each batch is padded to a multiple of the device count with masked-out rows.
        width = -(-batch_size // devices) * devices
        batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    steps_per_epoch = data_lib.num_batches(n, batch_size)
    chunk = steps_per_epoch
    if checkpoint_dir is not None and checkpoint_every is not None:
        chunk = min(chunk, _positive(checkpoint_every, "checkpoint_every"))
    if steps_per_call is not None:
        chunk = min(chunk, _positive(steps_per_call, "steps_per_call"))
    every = checkpoint_every or steps_per_epoch
    chunks_per_epoch = math.ceil(steps_per_epoch / chunk)
    padded_steps = chunks_per_epoch * chunk
    config = {
        "num_examples": n,
        "batch_size": batch_size,
        "chunk": chunk,
        "scan": bool(scan),
        # A resumed run must be the same run: same seed and same gradient strategy.
        "key": _fingerprint(key),
        **({"loss_key": _fingerprint(loss_key)} if loss_key is not None else {}),
        **({"devices": int(mesh.devices.size)} if mesh is not None else {}),
        "strategy": strategy_name(strategy),
    }

    state = init_state(params, optimizer)
    start_epoch, start_chunk, history = 0, 0, []
    epoch_loss, epoch_count = 0.0, 0
    last_checkpoint = None
    if checkpoint_dir is not None:
        ckpt.prepare_directory(checkpoint_dir)
    if checkpoint_dir is not None and not resume and ckpt.list_checkpoints(checkpoint_dir):
        raise ckpt.CheckpointError(
            f"`checkpoint_dir` {os.fspath(checkpoint_dir)!r} already holds checkpoints of another "
            "run; with resume=False use an empty directory, so a later resume cannot pick up "
            "the wrong run"
        )
    if checkpoint_dir is not None and resume:
        restored = ckpt.restore_latest(checkpoint_dir, {"state": state, "key": key})
        if restored is not None:
            tree, meta, last_checkpoint = restored
            if mesh is not None and meta.get("config", {}).get("devices") != config["devices"]:
                raise ckpt.CheckpointError(
                    f"checkpoint {last_checkpoint} was written by a run on "
                    f"{meta.get('config', {}).get('devices', 1)} device(s); this run has `mesh` "
                    f"with {config['devices']}. Resume on the same device count (the batches "
                    "and the order of the sums depend on it), or use another checkpoint_dir"
                )
            if meta.get("config") != config:
                raise ckpt.CheckpointError(
                    f"checkpoint {last_checkpoint} was written by a run configured as "
                    f"{meta.get('config')}; this run is {config}. Resume with the same data, "
                    "batch_size, checkpoint_every/steps_per_call and scan, or use another "
                    "checkpoint_dir (or resume=False)"
                )
            state, key = tree["state"], tree["key"]
            if mesh is not None:
                state = sharding_lib.replicate(state, mesh=mesh)
            start_epoch, start_chunk = meta["epoch"], meta["chunk"]
            ckpt.check_resume_epoch(start_epoch, epochs, last_checkpoint)
            history, epoch_loss, epoch_count = (
                meta["history"],
                meta["epoch_loss"],
                meta["epoch_count"],
            )

    body = _guarded(step_fn(loss_fn, optimizer, strategy=strategy))
    if loss_key is not None:
        keyed = body

        def body(carry, batch, mask, active):
            data, rows = batch
            keys = example_keys.keys_for(loss_key, carry[0].step, rows)
            return keyed(carry, (data, keys), mask, active)

    if mesh is not None:
        state = sharding_lib.replicate(state, mesh=mesh)
        inner = body

        def body(carry, batch, mask, active):
            batch, mask = jax.lax.with_sharding_constraint((batch, mask), batch_spec)
            return inner(carry, batch, mask, active)

    if scan and mesh is None:
        device_data = jax.tree_util.tree_map(jnp.asarray, train_data)

        @jax.jit
        def scan_chunk(state, data, idx, mask, active):
            def f(carry, xs):
                i, m, a = xs
                return body(carry, data_lib.take(data, i), m, a)

            (state, bad), weighted = jax.lax.scan(f, (state, jnp.int32(-1)), (idx, mask, active))
            return state, bad, jnp.sum(weighted)

        def run_chunk(state, idx, mask, active):
            return scan_chunk(state, device_data, idx, mask, active)

    elif scan:
        # On a mesh the data never goes to the devices whole: every chunk's batches are
        # gathered on the host, each process reading only its own devices' rows.
        @jax.jit
        def scan_batches(state, batches, mask, active):
            def f(carry, xs):
                return body(carry, *xs)

            xs = (batches, mask, active)
            (state, bad), weighted = jax.lax.scan(f, (state, jnp.int32(-1)), xs)
            return state, bad, jnp.sum(weighted)

        def run_chunk(state, idx, mask, active):
            batches, mask = sharding_lib.take_rows(
                train_data, np.asarray(idx), np.asarray(mask), mesh=mesh, check=check
            )
            active = sharding_lib.replicate(np.asarray(active), mesh=mesh)
            return scan_batches(state, batches, mask, active)

    else:
        host_data = None if mesh is not None else jax.tree_util.tree_map(np.asarray, train_data)
        jit_body = jax.jit(body)

        def run_chunk(state, idx, mask, active):
            carry, total = (state, jnp.int32(-1)), []
            for i, m, a in zip(idx, mask, active, strict=False):
                if not a:
                    break
                if mesh is None:
                    batch = data_lib.take(host_data, i)
                else:
                    batch, m = sharding_lib.take_rows(train_data, i, m, mesh=mesh, check=check)
                carry, weighted = jit_body(carry, batch, m, True)
                if mesh is not None:
                    sharding_lib.serialize_across_processes(carry)
                total.append(weighted)
            return carry[0], carry[1], sum(total)

    def save(epoch_next, chunk_next):
        meta = {
            "epoch": epoch_next,
            "chunk": chunk_next,
            "step": int(state.step),
            "history": history,
            "epoch_loss": epoch_loss,
            "epoch_count": epoch_count,
            "config": config,
        }
        if mesh is not None and jax.process_index() != 0:
            return ckpt.path_for(checkpoint_dir, int(state.step))
        return ckpt.save(
            checkpoint_dir,
            {"state": sharding_lib.local_replica(state), "key": key},
            step=int(state.step),
            metadata=meta,
            keep=keep,
        )

    metrics_file = None
    if metrics_path is not None:
        metrics_file = open(metrics_path, "a")
    total_steps = epochs * steps_per_epoch
    bar = Progress(total_steps, mode=progress, quiet=quiet, initial=int(state.step))
    start = time.perf_counter()
    try:
        for epoch in range(start_epoch, epochs):
            idx, mask = _epoch_indices(key, epoch, n, batch_size)
            epoch_batches = (idx, mask)  # (steps, batch_size) rows, to name a bad batch's rows
            if mesh is not None and width != batch_size:
                idx, mask = np.asarray(idx), np.asarray(mask)
                idx = np.concatenate([idx, np.repeat(idx[:, :1], width - batch_size, 1)], 1)
                mask = np.concatenate([mask, np.zeros((len(mask), width - batch_size), bool)], 1)
            pad = padded_steps - steps_per_epoch
            active = np.arange(padded_steps) < steps_per_epoch
            if scan:
                bw = idx.shape[1]
                idx = jnp.concatenate([idx, jnp.zeros((pad, bw), idx.dtype)])
                mask = jnp.concatenate([mask, jnp.zeros((pad, bw), bool)])
                shape = (chunks_per_epoch, chunk)
                idx, mask = idx.reshape(*shape, bw), mask.reshape(*shape, bw)
                active = jnp.asarray(active.reshape(shape))
            else:
                idx, mask = np.asarray(idx), np.asarray(mask)
                idx = [idx[c * chunk : (c + 1) * chunk] for c in range(chunks_per_epoch)]
                mask = [mask[c * chunk : (c + 1) * chunk] for c in range(chunks_per_epoch)]
                active = active.reshape(chunks_per_epoch, chunk)
            first = start_chunk if epoch == start_epoch else 0
            if first == 0:
                epoch_loss, epoch_count = 0.0, 0
            for c in range(first, chunks_per_epoch):
                before = int(state.step)
                new_state, bad, weighted = run_chunk(state, idx[c], mask[c], active[c])
                bad = int(bad)
                if bad >= 0:
                    batch_no = bad - epoch * steps_per_epoch + 1
                    where = (
                        f"; the last good checkpoint is {last_checkpoint}"
                        if last_checkpoint
                        else ""
                    )
                    rows = _non_finite_rows(train_data, mesh, *epoch_batches, batch_no - 1)
                    hint = (
                        f"The batch holds non-finite data in rows {rows} of `train_data`: "
                        "drop or impute them."
                        if rows
                        else "Lower the learning rate or check the data."
                    )
                    raise NonFiniteLossError(
                        "the training loss (or the updated parameters or optimizer state) "
                        f"became non-finite (NaN or inf) at step {bad + 1} "
                        f"(epoch {epoch + 1}, batch {batch_no} of {steps_per_epoch}); training "
                        f"stopped with the parameters from before that step{where}. {hint}",
                        step=bad + 1,
                        state=new_state,
                        checkpoint=last_checkpoint,
                    )
                state = new_state
                done = int(state.step) - before
                epoch_loss += float(weighted)
                epoch_count += int(np.sum(np.asarray(mask[c])[:done]))
                bar.update(done)
                last_chunk = c == chunks_per_epoch - 1
                if last_chunk:
                    record = {
                        "epoch": epoch + 1,
                        "step": int(state.step),
                        "loss": epoch_loss / max(epoch_count, 1),
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
                if checkpoint_dir is not None:
                    final = last_chunk and epoch == epochs - 1
                    if final or int(state.step) // every > before // every:
                        nxt = (epoch + 1, 0) if last_chunk else (epoch, c + 1)
                        last_checkpoint = save(*nxt)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return FitResult(state.params, state, history)
