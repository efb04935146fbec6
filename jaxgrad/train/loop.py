"""``fit``: one training loop for plain and private SGD, on one device or a mesh.

:func:`fit` checks its arguments (:mod:`jaxgrad.train.arguments`), makes an
:class:`~jaxgrad.train.step.Engine` that owns the batches and the gradient
(:func:`jaxgrad.train.plain.engine` for shuffled epochs and a gradient strategy,
:func:`jaxgrad.train.private.engine` for DP-SGD: Poisson draws, clipped sums, noise), records
what makes the run the same run (:mod:`jaxgrad.train.run_config`) and hands them to the one
loop (:func:`jaxgrad.train.driver.drive`), which owns what every run shares: the state, resume
from the newest good checkpoint (:mod:`jaxgrad.train.resume`), checkpoints, progress,
evaluation, the metrics file and the stop at the first non-finite step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxgrad import _loops, reduce
from jaxgrad import data as data_lib
from jaxgrad.fast import api as fast_api
from jaxgrad.grads import batch_grad
from jaxgrad.train import arguments, plain, private
from jaxgrad.train.arguments import validate_data
from jaxgrad.train.driver import drive
from jaxgrad.train.private import PrivacyConfig
from jaxgrad.train.result import FitResult, NonFiniteLossError
from jaxgrad.train.run_config import run_config
from jaxgrad.train.valuation import Valuation, check_valuation

PyTree = Any


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
    keep: int | None = None,
    resume: bool | None = None,
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
        convolutions are made canonical, :func:`jaxgrad.canonical_convolutions`); the two
        are timed in docs/training.md.
      steps_per_call: the chunk length (default: a whole epoch, or ``checkpoint_every`` if
        smaller); between chunks progress is reported and non-finite losses caught.
      checkpoint_dir: if given, checkpoints are written there and, with ``resume``, the run
        continues from the newest good one.
      checkpoint_every: write a checkpoint at the first chunk end at or after every multiple
        of this many steps (default: every epoch); always at the end.
      keep: how many checkpoints to keep (default 3; only with ``checkpoint_dir``).
      resume: continue from the newest good checkpoint in ``checkpoint_dir`` if there is one
        (default True; only with ``checkpoint_dir``).
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
        called as ``loss_fn(params, example, key)`` with ``key = fold_in(fold_in(fold_in(
        loss_key, 0x6C6F7373), t), i)`` for the example at row ``i`` of ``train_data`` at step
        ``t``: a different key for every example and step, independent of batching, devices
        and processes (see :mod:`jaxgrad.train.example_keys`); with ``privacy`` too, where the
        block ``0x6C6F7373`` keeps these keys apart from the DP's even for a ``loss_key``
        derived from ``key`` (:mod:`jaxgrad.keys`).
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
        of :func:`jaxgrad.keys.row_keys`' key of row ``i`` at step ``t``): ``loss_key`` is
        required. A ``loss_fn`` that takes a key gets one per copy.

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
    key, fingerprint = arguments.run_key(key, params=params, optimizer=optimizer, privacy=privacy)
    epochs = reduce.check_positive_int(epochs, name="epochs")
    batch_size = reduce.check_positive_int(batch_size, name="batch_size")
    loss_fn, loss_key, train_data = arguments.example_loss(
        loss_fn,
        train_data,
        augment=augment,
        privacy=privacy,
        key=key,
        loss_key=loss_key,
        units=units,
        mesh=mesh,
    )
    checkpoint_every, keep, resume = arguments.checkpoint_options(
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep=keep, resume=resume
    )
    metric_writers, quiet = arguments.loop_options(
        metric_writers=metric_writers,
        quiet=quiet,
        metrics_path=metrics_path,
        evaluate=evaluate,
        strategy=strategy,
        privacy=privacy,
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
    arguments.check_batch_size(batch_size, n)
    # Settings checked (and σ calibrated) before any data is read.
    the_plan = _privacy_plan(privacy, params, n, batch_size=batch_size, epochs=epochs, units=units)
    arguments.check_accumulation(
        optimizer,
        params,
        loss_fn,
        train_data,
        batch_size=batch_size,
        loss_key=loss_key,
        private=privacy is not None,
    )
    scan = _loops.scan_steps(scan)  # the one loop policy
    example_loss, examples = loss_fn, train_data  # as the user's loss takes them
    loss_fn, train_data, check = arguments.prepared_data(
        loss_fn, train_data, mesh=mesh, loss_key=loss_key, privacy=privacy
    )
    chunk = _chunk_length(n, batch_size, checkpoint_every, steps_per_call)
    # BandMF noise: a privatizer heads the optimizer the steps run (its state is secret).
    run_optimizer = private.run_optimizer(optimizer, the_plan, key)
    common = {"loss_fn": loss_fn, "train_data": train_data, "optimizer": run_optimizer}
    common.update(batch_size=batch_size, chunk=chunk, scan=scan, mesh=mesh, check=check)
    scores = None if valuation is None else np.zeros(n, np.float64)
    if privacy is None:
        engine = plain.engine(
            **common, strategy=strategy, loss_key=loss_key, valuation=valuation, scores=scores
        )
    else:
        engine = private.engine(**common, the_plan=the_plan, loss_key=loss_key)
    config = run_config(
        engine,
        num_examples=n,
        batch_size=batch_size,
        scan=scan,
        key_fingerprint=fingerprint,
        loss_key=loss_key,
        mesh=mesh,
        private=privacy is not None,
        example_loss=example_loss,
        examples=examples,
        train_data=train_data,
        optimizer=optimizer,
        params=params,
        checkpoint_dir=checkpoint_dir,
    )
    try:
        result = drive(
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


def _privacy_plan(privacy, params, n, *, batch_size, epochs, units):
    """The private run's plan (its settings checked, σ calibrated), or None for a plain run."""
    if privacy is None:
        return None
    the_plan = private.plan(privacy, num_examples=n, batch_size=batch_size, epochs=epochs)
    if not isinstance(the_plan.config.l2_clip, float):  # per group: a prefix of params
        fast_api.clip_groups(the_plan.config.l2_clip, params)
    if units is not None:
        the_plan = dataclasses.replace(the_plan, unit="user")
    return the_plan


def _chunk_length(n, batch_size, checkpoint_every, steps_per_call) -> int:
    """Steps per chunk: a whole epoch, or ``checkpoint_every`` or ``steps_per_call`` if
    smaller."""
    steps_per_epoch = data_lib.num_batches(n, batch_size)
    chunk = min(steps_per_epoch, checkpoint_every or steps_per_epoch)
    if steps_per_call is not None:
        chunk = min(chunk, reduce.check_positive_int(steps_per_call, name="steps_per_call"))
    return chunk


__all__ = ["FitResult", "NonFiniteLossError", "fit", "validate_data"]
