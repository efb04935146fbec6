"""``fit``: one training loop for plain and private SGD, on one device or a mesh.

The loop (:func:`_run`) owns what every run shares: the state, resume from the newest good
checkpoint, checkpoints, progress, evaluation, the metrics file and the stop at the first
non-finite step (:func:`jaxgrad.train.step.guarded`). An :class:`~jaxgrad.train.step.Engine`
owns the batches and the gradient: :func:`_plain_engine` for shuffled epochs and a gradient
strategy, :func:`jaxgrad.train.private.engine` for DP-SGD (Poisson draws, clipped sums, noise).

Plain epochs: each epoch's order is ``permutation(fold_in(key, epoch))`` (a pure function of
the key and the epoch), cut into batches of ``batch_size``; the last partial batch is padded
and masked, so no example is dropped and nothing recompiles. Batches run in chunks of fixed
length under ``lax.scan`` (or, with ``scan=False``, a Python loop over the jitted step);
between chunks the loop checks for a non-finite step, reports progress and writes
checkpoints. Chunks are aligned to the epoch's start, so a run resumed from any checkpoint
replays exactly the same computation and ends bit for bit where the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrad import _loops, accumulation, keys, reduce
from jaxgrad import data as data_lib
from jaxgrad import sharding as sharding_lib
from jaxgrad.fast import api as fast_api
from jaxgrad.grads import batch_grad
from jaxgrad.privacy import units as dp_units
from jaxgrad.train import checkpoint as ckpt
from jaxgrad.train import example_keys, private
from jaxgrad.train import writers as writers_lib
from jaxgrad.train.private import PrivacyConfig
from jaxgrad.train.progress import Progress, end_epoch
from jaxgrad.train.step import (
    Engine,
    TrainState,
    check_optimizer,
    guarded,
    init_state,
    step_fn,
    strategy_name,
)
from jaxgrad.train.valuation import Valuation, check_valuation

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


class _FitFields(NamedTuple):
    params: PyTree
    state: TrainState
    history: list[dict]


class FitResult(_FitFields):
    """What :func:`fit` returns: ``params, state, history = result`` unpacks it.

    Attributes:
      params: the trained parameters.
      state: the final :class:`TrainState` (params, optimizer state, step count).
      history: one dict per epoch: ``epoch``, ``step``, ``loss`` (the epoch's training loss:
        each batch's mean loss, at the parameters that batch saw, weighted by its number of
        real examples; for a scalar loss the mean over every example of the epoch, the last
        partial batch included; for ``(loss_sum, n_items)`` losses batches are weighted by
        examples, not items), ``seconds`` (since the start of this call) and the
        ``evaluate`` metrics (and ``epsilon`` for a private run).
      privacy: None for a plain run; for a private run, what the run releases about its
        guarantee after its last step: ``epsilon``, ``delta``, ``noise_multiplier`` (σ),
        ``sampling_rate``, ``steps``, ``l2_clip``, ``accountant``, ... (the CLI's ``privacy``
        record, :meth:`jaxgrad.train.PrivacyPlan.summary`).
      valuation: None, or with ``valuation=`` the ``(N,)`` float64 scores of
        :class:`jaxgrad.train.Valuation`, one per row of ``train_data``.
    """

    # Not tuple fields, so the three-way unpacking of every earlier release keeps working.
    privacy: dict | None
    valuation: np.ndarray | None

    def __new__(cls, params, state, history, privacy=None, valuation=None):
        self = super().__new__(cls, params, state, history)
        self.privacy, self.valuation = privacy, valuation
        return self

    def _replace(self, **changes):
        extra = {k: changes.pop(k, getattr(self, k)) for k in ("privacy", "valuation")}
        return FitResult(*super()._replace(**changes), **extra)

    def __repr__(self):
        return (
            f"{super().__repr__()[:-1]}, privacy={self.privacy!r}, "
            f"valuation={'None' if self.valuation is None else 'array'})"
        )


# Module level, so its compilation is shared by every fit with the same data and batch sizes.
_epoch_indices = jax.jit(data_lib.epoch_indices, static_argnums=(2, 3))


def _positive(value, name):
    return reduce.check_positive_int(value, name=name)


def _check_fit_args(params, optimizer, key) -> None:
    """Clear errors for the arguments of :func:`fit` that JAX/optax would fail on obscurely."""
    reduce.check_params(params)
    check_optimizer(optimizer)
    keys.check_key(key)


def _check_accumulation(optimizer, params, loss_fn, data, *, batch_size, private) -> None:
    """Refuses (or warns about) an optimizer that would average batch means across steps.

    ``optax.MultiSteps`` applies the mean of ``k`` steps' mean gradients, ``(1/k) Σ S_k / n_k``,
    not the gradient of the ``k`` batches together, ``Σ S_k / Σ n_k``: wrong for a
    ``(loss_sum, n_items)`` loss (batches hold different numbers of items: refused) and, for a
    scalar loss, for every group with the epoch's partial last batch (warned; with full
    batches only, exact). A DP-SGD step
    divides by the expected batch size, the same for every step, so there it is exact.
    """
    opt_state = jax.eval_shape(optimizer.init, params)
    if private:
        if accumulation.takes_count(opt_state):
            raise ValueError(
                "`optimizer` is a jaxgrad.accumulate, which divides by the batches' real item "
                "counts; a private run's counts are private (DP-SGD divides by the expected "
                "batch size). Use a larger `batch_size`, or optax.MultiSteps, which is exact "
                "for DP-SGD's steps"
            )
        return
    if not accumulation.averages_means(opt_state):
        return
    example = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), data)
    fix = (
        "Use jaxgrad.accumulate(k, inner) (it accumulates gradient sums and item counts and "
        "divides once), or strategy=functools.partial(jaxgrad.accumulate_grad, "
        "num_microbatches=k) with a k times larger `batch_size`"
    )
    if isinstance(jax.eval_shape(loss_fn, params, example), tuple):
        raise ValueError(
            "`optimizer` is or wraps optax.MultiSteps, which averages the steps' mean "
            "gradients: with a (loss_sum, n_items) loss, batches hold different numbers of items "
            "and the mean of their means is not the gradient of the accumulated batch. " + fix
        )
    if reduce.batch_size(data) % batch_size == 0:
        return
    warnings.warn(
        "`optimizer` is or wraps optax.MultiSteps, which averages the steps' mean gradients: "
        "a group of steps with a partial batch (the last of an epoch) weighs its examples more "
        "than the others. " + fix,
        UserWarning,
        stacklevel=3,
    )


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
            with reduce.batch_rows(np.flatnonzero(mask)):  # rows of `rows`, not of the real ones
                validate(jax.tree_util.tree_map(lambda x: x[mask], rows))

    return check


def _augmented(loss_fn, augment, *, privacy, loss_key):
    """``loss_fn``, or with ``augment`` the mean over ``privacy.augmentations`` copies."""
    copies = getattr(privacy, "augmentations", 1)  # (a wrong type of `privacy`: plan()'s)
    # Named before anything else: K = 0 or 1.5 is a bad K, not a missing `augment`.
    copies = reduce.check_positive_int(copies, name="augmentations")
    if copies != 1 and augment is None:
        raise ValueError(
            f"`privacy.augmentations` is {copies!r}, so `augment` (a function "
            "augment(key, example) -> example) is required; got augment=None"
        )
    if augment is None:
        return loss_fn
    if privacy is None:
        raise ValueError(
            "`augment` applies to private training (augmentation multiplicity): "
            "give `privacy=PrivacyConfig(..., augmentations=K)`"
        )
    if loss_key is None:
        raise ValueError(
            "`augment` draws each example's copies from its loss key: pass `loss_key` (e.g. "
            "loss_key=jax.random.key(1)); got loss_key=None"
        )
    keyed = example_keys._takes(loss_fn, 2) is False  # a loss that needs a key gets one
    return dp_units.augmented_loss(loss_fn, augment, copies=copies, keyed=keyed)


def _check_units_fit(privacy, mesh) -> None:
    """Refuses ``units`` where they do not apply (no privacy, a mesh)."""
    if privacy is None:
        raise ValueError(
            "`units` applies to private training (user-level DP): give "
            "`privacy=PrivacyConfig(...)`, or leave units=None"
        )
    if mesh is not None:
        raise ValueError("`units` with `mesh` is not supported; got a mesh")


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


def _data_hash(data) -> str:
    """A SHA-256 of every leaf's dtype, shape and bytes (to tell a resumed run's data apart)."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(data):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


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


def fit(
    loss_fn: Callable,
    params: PyTree,
    train_data: PyTree,
    *,
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    key: jax.Array | None = None,
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
    metric_writers: list | None = None,
    valuation: Valuation | None = None,
    units=None,
    augment: Callable | None = None,
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
      key: the PRNG key of the shuffle (epoch ``e``'s order is a function of ``(key, e)``
        only) or, with ``privacy``, of the Poisson draws and the noise
        (:func:`jaxgrad.keys.dp_keys`). With ``privacy`` it may be None: the key is then drawn
        from OS entropy (process 0's, on several processes) and kept only in the checkpoints,
        which are then secret; a resumed run takes it from there.
      strategy: a gradient-strategy factory, as for :func:`jaxgrad.train.train_step`.
      evaluate: ``evaluate(params) -> {name: float}``, called after every epoch (see
        :func:`jaxgrad.train.evaluator`).
      scan: run the batches of a chunk under ``lax.scan`` (one dispatch per chunk) instead of
        a Python loop over the jitted step. ``"auto"`` (default) scans (the one loop policy,
        :func:`jaxgrad._loops.scan_steps`, also for ``privacy``; on a CPU the step's
        convolutions are made canonical, :func:`jaxgrad._loops.canonical_convolutions`): the
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
      metrics_path: if given, every epoch's record is appended there as a JSON line (a
        :class:`jaxgrad.train.writers.JsonlWriter` that ``fit`` opens and closes).
      progress: ``"auto"`` (a tqdm bar on a terminal, silent otherwise), ``"bar"``,
        ``"plain"`` (a line per epoch on stderr) or ``"none"``.
      quiet: no progress output at all.
      privacy: a :class:`jaxgrad.train.PrivacyConfig` to train with DP-SGD instead (see
        :mod:`jaxgrad.train.private`): Poisson sampling with rate ``batch_size / N``, the
        noisy clipped gradient, σ calibrated to a target ε, ε reported per epoch (history
        key ``epsilon``; the history holds nothing else computed on the training rows).
        ``strategy`` does not apply; the loop is the same as without ``privacy`` (``scan``,
        ``steps_per_call``, checkpoints, resume, the stop before a non-finite step). ``δ ≥
        1/N`` is refused. Works with ``mesh``: one Poisson draw
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
      metric_writers: objects with ``write(record)``, given every epoch's record as it is
        appended to the history (:class:`jaxgrad.train.writers.JsonlWriter`,
        :class:`jaxgrad.train.writers.TensorBoardWriter`, or your own); ``fit`` does not
        close them.
      valuation: a :class:`jaxgrad.train.Valuation` to score every training example by its
        first-order effect on a validation loss as training runs (In-Run Data Shapley /
        TracIn, :mod:`jaxgrad.train.valuation`); the scores come back as
        ``result.valuation``. One more pass per step (the validation gradient and the
        per-example dots); refused with ``privacy`` (the scores are private statistics) and,
        for now, with ``mesh``, ``loss_key`` and ``checkpoint_dir``.
      units: with ``privacy``, user-level DP: an integer array ``(N,)``, the unit (user) id
        of every row of ``train_data``. The rows are grouped by unit
        (:func:`jaxgrad.privacy.group_units`), each unit's gradient — the *sum* of its rows'
        gradients (:func:`jaxgrad.privacy.unit_loss`) — is clipped once, the Poisson draws
        are over units and the accounting counts units: ``batch_size`` is then the expected
        number of *units* per step, an epoch is ``⌈U / batch_size⌉`` steps for ``U`` units,
        and ``result.privacy`` says ``privacy_unit: "user"`` and ``num_units``. Not with
        ``mesh``; ``loss_key`` keys reach row ``k`` of a unit as ``fold_in(k_unit, k)``.
      augment: with ``privacy``, augmentation multiplicity: ``augment(key, example) ->
        example``; every step draws ``privacy.augmentations`` (``K``) copies of each sampled
        example and its gradient is the *mean* over them, clipped once (De et al. 2022;
        :func:`jaxgrad.privacy.augmented_loss`), so the unit stays the example. The copies'
        keys come from the example's ``loss_key`` key (:func:`jaxgrad.keys.augmentation_keys`
        of ``fold_in(fold_in(loss_key, t), i)``): ``loss_key`` is required. A ``loss_fn`` that
        takes a key gets one per copy.

    Returns:
      A :class:`FitResult` ``(params, state, history)``, with ``result.privacy`` (ε, δ, σ, ...)
      for a private run and ``result.valuation`` (the scores) with ``valuation``.

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
    if key is None and privacy is not None:
        key = keys.same_in_every_process(keys.entropy_key())
        fingerprint = "os-entropy"  # secret: a resumed run takes the key from its checkpoint
    else:
        fingerprint = None
    _check_fit_args(params, optimizer, key)
    if privacy is not None and fingerprint is None:  # the noise's key: a small seed is public
        keys.check_private_key(key)
    fingerprint = fingerprint or keys.fingerprint(key)
    epochs = _positive(epochs, "epochs")
    batch_size = _positive(batch_size, "batch_size")
    keep = _positive(keep, "keep")
    loss_fn = _augmented(loss_fn, augment, privacy=privacy, loss_key=loss_key)
    loss_key = example_keys.check_loss_fn(loss_fn, loss_key)
    if privacy is not None and loss_key is not None:  # rows 0, 1 would get the noise's keys
        keys.check_distinct(key, loss_key, name="loss_key")
    if units is not None:  # one example per unit from here on: sampled, clipped, counted
        _check_units_fit(privacy, mesh)
        validate_data(loss_fn, train_data, None)  # the rows, by the row loss's own check
        train_data = dp_units.group_units(train_data, units)[0]
        loss_fn = dp_units.unit_loss(loss_fn, keyed=loss_key is not None)
    resume = reduce.check_flag(resume, name="resume")
    metric_writers = writers_lib.check_writers(metric_writers)
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
    if privacy is not None and strategy is not batch_grad:
        raise ValueError(
            "`strategy` does not apply with `privacy`: DP-SGD takes the noisy clipped gradient of "
            f"jaxgrad.privacy.sampled_dp_grad; got strategy={strategy!r}"
        )
    n = reduce.batch_size(train_data, name="train_data")
    valuation = check_valuation(
        valuation,
        privacy=privacy,
        mesh=mesh,
        loss_key=loss_key,
        checkpoint_dir=checkpoint_dir,
        loss_fn=loss_fn,
        train_data=train_data,
    )
    if batch_size > n:
        raise ValueError(
            f"`batch_size` ({batch_size}) is larger than the training set ({n} examples); "
            f"expected at most {n}"
        )
    the_plan = None
    if privacy is not None:  # settings checked (and σ calibrated) before any data is read
        the_plan = private.plan(privacy, num_examples=n, batch_size=batch_size, epochs=epochs)
        if not isinstance(the_plan.config.l2_clip, float):  # per group: a prefix of params
            fast_api.clip_groups(the_plan.config.l2_clip, params)
        if units is not None:
            the_plan = dataclasses.replace(the_plan, unit="user")
    traced = loss_fn if loss_key is None else lambda p, x: loss_fn(p, x, loss_key)
    _check_accumulation(
        optimizer, params, traced, train_data, batch_size=batch_size, private=privacy is not None
    )
    scan = _loops.scan_steps(scan)  # the one loop policy
    if mesh is not None:
        sharding_lib.check_batch(train_data, mesh=mesh)
    check = validate_data(loss_fn, train_data, mesh)
    if loss_key is not None:  # the data carries its row numbers, turned into keys per step
        wrap = example_keys.keyed_loss if privacy is None else example_keys.row_keyed_loss
        loss_fn, train_data = wrap(loss_fn), example_keys.with_rows(train_data)
        check = example_keys.row_check(check)

    steps_per_epoch = data_lib.num_batches(n, batch_size)
    chunk = min(steps_per_epoch, checkpoint_every or steps_per_epoch)
    if steps_per_call is not None:
        chunk = min(chunk, _positive(steps_per_call, "steps_per_call"))
    # BandMF noise: a privatizer heads the optimizer the steps run (its state is secret).
    run_optimizer = private.run_optimizer(optimizer, the_plan, key)
    common = {"loss_fn": loss_fn, "train_data": train_data, "optimizer": run_optimizer}
    common.update(batch_size=batch_size, chunk=chunk, scan=scan, mesh=mesh, check=check)
    scores = None if valuation is None else np.zeros(n, np.float64)
    if privacy is None:
        engine = _plain_engine(
            **common, strategy=strategy, loss_key=loss_key, valuation=valuation, scores=scores
        )
    else:
        engine = private.engine(**common, the_plan=the_plan, loss_key=loss_key)
    config = {
        "num_examples": n,
        "batch_size": batch_size,
        "chunk": chunk,
        "scan": bool(scan),
        # A resumed run must be the same run: same key and the same gradient (or privacy).
        "key": fingerprint,
        **({"loss_key": keys.fingerprint(loss_key)} if loss_key is not None else {}),
        **({"devices": int(mesh.devices.size)} if mesh is not None else {}),
        # A private run resumed on other data would reuse its noise and draws: the data's hash
        # (in memory only; memory-mapped files are not read whole) must match. Kept secret.
        **(
            {"data": _data_hash(train_data)}
            if privacy is not None and _in_memory(train_data)
            else {}
        ),
        **engine.config,
        "optimizer": _optimizer_structure(jax.eval_shape(optimizer.init, params)),
    }
    if checkpoint_dir is not None:  # only checkpoints read it: no probe otherwise
        config["optimizer_probe"] = _optimizer_probe(optimizer, params)
    try:
        result = _run(
            engine,
            config,
            params=params,
            optimizer=run_optimizer,
            key=key,
            epochs=epochs,
            evaluate=evaluate,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            keep=keep,
            resume=resume,
            metrics_path=metrics_path,
            metric_writers=metric_writers,
            progress=progress,
            quiet=quiet,
            mesh=mesh,
        )
    except NonFiniteLossError as e:  # its state is released too: no BandMF noise state in it
        e.state = private.release(e.state, the_plan)
        raise
    if the_plan is None:
        return result._replace(valuation=scores)
    return result._replace(
        state=private.release(result.state, the_plan),
        privacy=the_plan.summary(int(result.state.step)),
    )


def _valued(body, loss_fn, valuation):
    """``body`` whose per-step output also carries the batch rows' valuation terms (zero
    for a step not taken: inactive, or not finite), computed at the parameters the step saw."""
    values = valuation.step_values(loss_fn)

    def valued(carry, batch, mask, active):
        v = values(carry[0].params, carry[0].step, batch, mask)
        new, w = body(carry, batch, mask, active=active)
        taken = new[0].step != carry[0].step
        return new, (w, jnp.where(taken, v, 0))

    return valued


def _plain_engine(
    *,
    loss_fn,
    train_data,
    optimizer,
    strategy,
    batch_size,
    chunk,
    scan,
    mesh,
    check,
    loss_key,
    valuation=None,
    scores=None,
) -> Engine:
    """Shuffled epochs and a gradient strategy: the steps of plain :func:`fit`; with
    ``valuation``, each chunk's valuation terms are added to ``scores`` (host, by row)."""
    n = reduce.batch_size(train_data, name="train_data")
    steps_per_epoch = data_lib.num_batches(n, batch_size)
    chunks_per_epoch = math.ceil(steps_per_epoch / chunk)
    padded_steps = chunks_per_epoch * chunk
    if mesh is not None:
        devices = mesh.shape["data"]
        # Each batch is padded to a multiple of the device count with masked-out rows.
        width = -(-batch_size // devices) * devices
        batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    step = step_fn(loss_fn, optimizer, strategy=strategy)

    def weighted(state, batch, mask):  # the guard's (state, loss, weight)
        new, loss = step(state, batch, mask)
        return new, loss, jnp.sum(mask).astype(loss.dtype)

    body = guarded(weighted)
    if loss_key is not None:
        keyed = body

        def body(carry, batch, mask, active):
            data, rows = batch
            row_keys = keys.row_keys(loss_key, carry[0].step, rows)
            return keyed(carry, (data, row_keys), mask, active=active)

    if mesh is not None:
        inner = body

        def body(carry, batch, mask, active):
            batch, mask = sharding_lib.constrain((batch, mask), batch_spec)
            return inner(carry, batch, mask, active=active)

    if valuation is not None:
        body = _valued(body, loss_fn, valuation)

    def totals(out):  # a chunk's stacked step outputs: the loss sum, and the valuation terms
        return (jnp.sum(out[0]), out[1]) if valuation is not None else (jnp.sum(out), None)

    epoch_batches = {}  # epoch -> (steps, batch_size) rows, to name a bad batch's rows

    def epoch_chunks(key, epoch):
        idx, mask = _epoch_indices(key, epoch, n, batch_size)
        epoch_batches.clear()
        epoch_batches[epoch] = (idx, mask)
        if mesh is not None and width != batch_size:
            idx, mask = np.asarray(idx), np.asarray(mask)
            idx = np.concatenate([idx, np.repeat(idx[:, :1], width - batch_size, 1)], 1)
            mask = np.concatenate([mask, np.zeros((len(mask), width - batch_size), bool)], 1)
        pad = padded_steps - steps_per_epoch
        active = np.arange(padded_steps) < steps_per_epoch
        bw = idx.shape[1]
        idx = np.concatenate([np.asarray(idx), np.zeros((pad, bw), np.asarray(idx).dtype)])
        mask = np.concatenate([np.asarray(mask), np.zeros((pad, bw), bool)])
        shape = (chunks_per_epoch, chunk)
        idx, mask = idx.reshape(*shape, bw), mask.reshape(*shape, bw)
        return list(zip(idx, mask, active.reshape(shape), strict=True))

    if scan and mesh is None:
        device_data = jax.tree_util.tree_map(jnp.asarray, train_data)

        @jax.jit
        @_loops.canonical_convolutions
        def scan_chunk(state, data, idx, mask, active):
            def f(carry, xs):
                i, m, a = xs
                return body(carry, data_lib.take(data, i), m, active=a)

            (state, bad), out = jax.lax.scan(f, (state, jnp.int32(-1)), (idx, mask, active))
            return state, bad, *totals(out)

        def run(state, idx, mask, active):
            return scan_chunk(state, device_data, idx, mask, active)

    elif scan:
        # On a mesh the data never goes to the devices whole: every chunk's batches are
        # gathered on the host, each process reading only its own devices' rows.
        @jax.jit
        @_loops.canonical_convolutions
        def scan_batches(state, batches, mask, active):
            def f(carry, xs):
                b, m, a = xs
                return body(carry, b, m, active=a)

            (state, bad), out = jax.lax.scan(f, (state, jnp.int32(-1)), (batches, mask, active))
            return state, bad, *totals(out)

        def run(state, idx, mask, active):
            batches, mask = sharding_lib.take_rows(train_data, idx, mask, mesh=mesh, check=check)
            active = sharding_lib.replicate(active, mesh=mesh)
            return scan_batches(state, batches, mask, active)

    else:
        host_data = None if mesh is not None else jax.tree_util.tree_map(np.asarray, train_data)
        jit_body = jax.jit(_loops.canonical_convolutions(functools.partial(body, active=True)))

        def run(state, idx, mask, active):
            carry, outs = (state, jnp.int32(-1)), []
            for i, m in zip(idx[active], mask[active], strict=True):
                if mesh is None:
                    batch = data_lib.take(host_data, i)
                else:
                    batch, m = sharding_lib.take_rows(train_data, i, m, mesh=mesh, check=check)
                carry, out = jit_body(carry, batch, m)
                if mesh is not None:
                    sharding_lib.serialize_across_processes(carry)
                outs.append(out)
            if valuation is None:
                return carry[0], carry[1], sum(outs), None
            values = np.zeros((len(idx), *np.shape(mask)[1:]))  # inactive steps: 0
            if outs:
                values[np.asarray(active)] = np.stack([np.asarray(v) for _, v in outs])
            return carry[0], carry[1], sum(w for w, _ in outs), values

    def run_chunk(state, key, inputs):
        del key  # the batches are the chunk's inputs
        idx, mask, active = inputs
        before = int(state.step)
        new, bad, loss_sum, values = run(state, idx, mask, active)
        if values is not None:  # padding rows and steps not taken hold 0
            np.add.at(scores, np.asarray(idx).ravel(), np.asarray(values, np.float64).ravel())
        done = int(new.step) - before
        return new, bad, float(loss_sum), int(np.sum(mask[:done]))

    def record(steps, loss_sum, count):
        del steps
        return {"loss": loss_sum / max(count, 1)}

    def failure(bad, epoch):
        batch_no = bad - epoch * steps_per_epoch + 1
        rows = _non_finite_rows(train_data, mesh, *epoch_batches[epoch], batch_no - 1)
        hint = (
            f"The batch holds non-finite data in rows {rows} of `train_data`: drop or impute them."
            if rows
            else "Lower the learning rate or check the data."
        )
        return (
            "the training loss (or the updated parameters or optimizer state) became non-finite "
            f"(NaN or inf) at step {bad + 1} (epoch {epoch + 1}, batch {batch_no} of "
            f"{steps_per_epoch}); training stopped with the parameters from before that step. "
            + hint
        )

    config = {"strategy": strategy_name(strategy)}
    return Engine(config, steps_per_epoch, chunk, epoch_chunks, run_chunk, record, failure)


def _optimizer_structure(opt_state) -> str:
    """The optimizer's state, named by its parts: ``"ScaleByAdamState, EmptyState (5 arrays)"``.

    Recorded in every checkpoint, so a run resumed with another optimizer is told so, not
    that the checkpoint "holds 15 arrays; the template has 6 leaves".
    """
    names = []

    def visit(x):
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            names.append(type(x).__name__)
        if isinstance(x, (tuple, list)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)

    visit(opt_state)
    leaves = len(jax.tree_util.tree_leaves(opt_state))
    return f"{', '.join(names) or type(opt_state).__name__} ({leaves} arrays)"


def _optimizer_probe(optimizer, params) -> str:
    """A fingerprint of the optimizer's hyperparameters: its first two updates on a fixed
    probe (parameters and gradients made from the parameters' shapes, not their values),
    rounded to 4 significant digits and hashed.

    optax keeps hyperparameters in closures, out of reach; what they do is not. A changed
    learning rate, beta, weight decay or schedule changes these updates; rounding keeps
    the same optimizer's fingerprint stable across devices (a rare round-off across a digit
    only gives a spurious warning, never a refusal).
    """
    import hashlib

    def pattern(x, a, b):
        i = jnp.arange(np.prod(x.shape, dtype=int)).reshape(x.shape)
        return ((i % a) - b + 0.5).astype(x.dtype) * 0.3

    def run(p):
        p = jax.tree_util.tree_map(lambda x: pattern(x, 7, 3), p)
        g = jax.tree_util.tree_map(lambda x: pattern(x, 5, 2), p)
        state = optimizer.init(p)
        u1, state = optimizer.update(g, state, p)
        u2, _ = optimizer.update(jax.tree_util.tree_map(lambda x: -0.7 * x, g), state, p)
        return u1, u2

    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    try:
        updates = jax.jit(run)(zeros)
    except Exception:  # an optimizer that needs extra update arguments: no fingerprint
        return "unknown"
    values = [np.asarray(x, np.float64).ravel()[:256] for x in jax.tree_util.tree_leaves(updates)]
    digits = np.concatenate(values) if values else np.zeros(0)
    rounded = ",".join(f"{v:.4g}" for v in digits)
    return hashlib.sha256(rounded.encode()).hexdigest()[:16]


def _config_changes(old: dict, new: dict, *, secret=()) -> str:
    """``"name: old -> new"`` for every key whose value differs between two config dicts (the
    values of ``secret`` keys named, not shown)."""
    changed = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    show = lambda k, v: "(secret)" if k in secret else repr(v)
    return ", ".join(f"{k}: {show(k, old.get(k))} -> {show(k, new.get(k))}" for k in changed)


def _restore(checkpoint_dir, template, config, *, mesh, epochs):
    """The newest good checkpoint's ``(tree, meta, path)`` if it belongs to this run, or None.

    Raises:
      CheckpointError: a checkpoint written by another run (another device count, other
        privacy settings, data, batch size, key, ...), or past this run's ``epochs``.
    """
    candidates = ckpt.list_checkpoints(checkpoint_dir)
    if candidates:
        # Before the arrays are read: another optimizer's state would not fit the template.
        try:
            newest = (ckpt.read_metadata(candidates[-1]).get("config") or {}).get("optimizer")
        except ckpt.CheckpointError:
            newest = None  # a corrupt newest file: restore_latest names it and falls back
        if newest is not None and newest != config["optimizer"]:
            raise ckpt.CheckpointError(
                f"checkpoint {candidates[-1]} was written by a run with another `optimizer`: "
                f"its optimizer state is {newest}; this run's optimizer makes "
                f"{config['optimizer']}. Resume with the same optimizer, or use another "
                "checkpoint_dir (or resume=False)"
            )
    restored = ckpt.restore_latest(checkpoint_dir, template)
    if restored is None:
        return None
    tree, meta, path = restored
    old = dict(meta.get("config") or {})
    config = dict(config)
    for name in ("optimizer", "optimizer_probe"):  # not recorded by older checkpoints
        if name not in old:
            config.pop(name, None)
    probe_old, probe_new = old.pop("optimizer_probe", None), config.pop("optimizer_probe", None)
    if probe_old is not None and "unknown" not in (probe_old, probe_new) and probe_old != probe_new:
        if "privacy" in config:  # the steps to come would reuse the noise of steps released
            raise ckpt.CheckpointError(
                f"checkpoint {path}: the optimizer's hyperparameters differ from the private run "
                "that wrote it (its updates on a fixed probe gradient changed). A private run "
                "resumed with other hyperparameters would replay the same noise and draws on "
                "another computation, which the accounting counts once: resume with the same "
                "optimizer, or start a new run in another checkpoint_dir"
            )
        warnings.warn(
            f"checkpoint {path}: the optimizer's hyperparameters seem to differ from the run that "
            "wrote it (the same optimizer type, but its updates on a fixed probe gradient "
            "changed: the learning rate, a beta, the weight decay or a schedule?). Resuming with "
            "the new ones; to continue the old run exactly, pass the same optimizer",
            ckpt.CheckpointWarning,
            stacklevel=4,
        )
    if mesh is not None and old.get("devices") != config["devices"]:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written by a run on {old.get('devices', 1)} device(s); this "
            f"run has `mesh` with {config['devices']} device(s). Resume on the same device count "
            "(the batches and the order of the sums depend on it), or use another checkpoint_dir"
        )
    if old != config:
        if old.get("privacy") != config.get("privacy"):
            changed = (
                _config_changes(old["privacy"], config["privacy"])
                if old.get("privacy") and config.get("privacy")
                else "one run is private and the other is not"
            )
            why = (
                f"the privacy settings changed ({changed}); the accounting of the steps already "
                "taken would be wrong. Resume with the same privacy settings"
            )
        else:
            # A private run's key is secret: even a hash of it is not printed.
            secret = ("key", "data") if "privacy" in config else ()
            why = (
                f"the run changed ({_config_changes(old, config, secret=secret)}). Resume with "
                "the same data, batch_size, key, checkpoint_every/steps_per_call and scan"
            )
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written by another run: {why}, or use another "
            "checkpoint_dir (or resume=False)"
        )
    ckpt.check_resume_epoch(meta["epoch"], epochs, path)
    return tree, meta, path


def _run(
    engine: Engine,
    config: dict,
    *,
    params,
    optimizer,
    key,
    epochs,
    evaluate,
    checkpoint_dir,
    checkpoint_every,
    keep,
    resume,
    metrics_path,
    metric_writers,
    progress,
    quiet,
    mesh,
) -> FitResult:
    """The one training loop: epochs of chunks of an engine's steps, with everything around."""
    steps_per_epoch, chunk = engine.steps_per_epoch, engine.chunk
    every = checkpoint_every or steps_per_epoch
    chunks_per_epoch = math.ceil(steps_per_epoch / chunk)
    state = init_state(params, optimizer)
    # The state's sharding on the mesh: parameters the caller sharded (over a model axis,
    # FSDP-style) keep it, and so does their optimizer state; the rest is replicated.
    state_layout = None if mesh is None else sharding_lib.layout(state, mesh=mesh)
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
        restored = _restore(
            checkpoint_dir, {"state": state, "key": key}, config, mesh=mesh, epochs=epochs
        )
        if restored is not None:
            tree, meta, last_checkpoint = restored
            state, key = tree["state"], tree["key"]
            start_epoch, start_chunk, history = meta["epoch"], meta["chunk"], meta["history"]
            epoch_loss, epoch_count = meta["epoch_loss"], meta["epoch_count"]
    if mesh is not None:
        state = sharding_lib.place(state, state_layout)

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
        leaves = jax.tree_util.tree_leaves(state)
        if any(isinstance(x, jax.Array) and not x.is_fully_replicated for x in leaves):
            # Sharded state (parameters over a model axis, FSDP): no process holds it whole,
            # so every process writes its pieces, with orbax.
            tree = {"state": state, "key": key}
            return ckpt.save_sharded(
                checkpoint_dir, tree, step=int(state.step), metadata=meta, keep=keep
            )
        if mesh is not None and jax.process_index() != 0:
            path = ckpt.path_for(checkpoint_dir, int(state.step))  # process 0 writes
        else:
            path = ckpt.save(
                checkpoint_dir,
                {"state": sharding_lib.local_replica(state), "key": key},
                step=int(state.step),
                metadata=meta,
                keep=keep,
            )
        if mesh is not None:
            # The others wait for process 0's file: one that went on could list the directory
            # (a resumed fit) before it is there, train from another step and issue other
            # collectives than process 0 (gloo's "collective mismatch" abort).
            sharding_lib.sync_processes(f"checkpoint {int(state.step)}")
        return path

    own = [writers_lib.JsonlWriter(metrics_path)] if metrics_path is not None else []
    writers = own + list(metric_writers)
    bar = Progress(epochs * steps_per_epoch, mode=progress, quiet=quiet, initial=int(state.step))
    start = time.perf_counter()
    try:
        for epoch in range(start_epoch, epochs):
            if engine.last_step is not None and int(state.step) >= engine.last_step:
                break  # the engine's budget is spent (a resumed run stops here too)
            chunks = engine.epoch_chunks(key, epoch)
            first = start_chunk if epoch == start_epoch else 0
            if first == 0:
                epoch_loss, epoch_count = 0.0, 0
            for c in range(first, chunks_per_epoch):
                before = int(state.step)
                new_state, bad, loss_sum, count = engine.run_chunk(state, key, chunks[c])
                bad = int(bad)
                if bad >= 0:
                    where = (
                        f" (the last good checkpoint is {last_checkpoint})"
                        if last_checkpoint
                        else ""
                    )
                    raise NonFiniteLossError(
                        engine.failure(bad, epoch) + where,
                        step=bad + 1,
                        state=new_state,
                        checkpoint=last_checkpoint,
                    )
                state = new_state
                epoch_loss, epoch_count = epoch_loss + loss_sum, epoch_count + count
                bar.update(int(state.step) - before)
                last_chunk = c == chunks_per_epoch - 1
                if last_chunk:
                    steps = int(state.step)
                    record = {
                        "epoch": epoch + 1,
                        "step": steps,
                        **engine.record(steps, epoch_loss, epoch_count),
                    }
                    end_epoch(
                        record,
                        params=sharding_lib.local_replica(state.params),
                        evaluate=evaluate,
                        # A private run's wall-clock times follow its realised (private)
                        # batch sizes: not released.
                        start=None if "privacy" in config else start,
                        history=history,
                        bar=bar,
                        writers=writers,
                    )
                if checkpoint_dir is not None:
                    stopped = engine.last_step is not None and int(state.step) >= engine.last_step
                    final = last_chunk and (epoch == epochs - 1 or stopped)
                    if final or int(state.step) // every > before // every:
                        nxt = (epoch + 1, 0) if last_chunk else (epoch, c + 1)
                        last_checkpoint = save(*nxt)
    finally:
        bar.close()
        for writer in own:
            writer.close()
    return FitResult(state.params, state, history)
