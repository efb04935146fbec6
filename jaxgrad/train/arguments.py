"""The checks of :func:`jaxgrad.train.fit`'s arguments, and the loss and data they make.

Each check gives a clear error, naming the argument, for what JAX or optax would fail on
obscurely or late. :func:`jaxgrad.train.fit` calls them in a fixed order (the first bad
argument is the one named), and settles the privacy plan before :func:`prepared_data` reads
any data.
"""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np

from jaxgrad import accumulation, keys, reduce
from jaxgrad import sharding as sharding_lib
from jaxgrad._paths import file_write_error
from jaxgrad.data import arrays as data_arrays
from jaxgrad.grads import batch_grad
from jaxgrad.privacy import units as dp_units
from jaxgrad.train import example_keys
from jaxgrad.train import writers as writers_lib
from jaxgrad.train.step import check_optimizer


def run_key(key, *, params, optimizer, privacy):
    """The run's PRNG key, checked with the parameters and the optimizer, and its fingerprint.

    Args:
      key: ``fit``'s ``key``; with ``privacy`` and no key, one is drawn from OS entropy (the
        same in every process).
      params: the initial parameters.
      optimizer: the optax optimizer.
      privacy: the :class:`jaxgrad.train.PrivacyConfig`, or None.

    Returns:
      ``(key, fingerprint)``: the fingerprint the checkpoints record (``"os-entropy"`` for a
      drawn key, which is secret: a resumed run takes the key from its checkpoint).
    """
    if key is None and privacy is not None:
        key = keys.same_in_every_process(keys.entropy_key())
        fingerprint = "os-entropy"
    else:
        fingerprint = None
    reduce.check_params(params)
    check_optimizer(optimizer)
    keys.check_key(key)
    if privacy is not None and fingerprint is None:  # the noise's key: a small seed is public
        keys.check_private_key(key)
    return key, fingerprint or keys.fingerprint(key)


def example_loss(loss_fn, train_data, *, augment, privacy, key, loss_key, units, mesh):
    """The loss of one example as the steps take it, its loss key and the rows it applies to.

    Args:
      loss_fn, train_data, augment, privacy, key, loss_key, units, mesh: ``fit``'s.

    Returns:
      ``(loss_fn, loss_key, train_data)``: with ``augment`` the mean over the augmented
      copies; with ``units`` one example per unit from here on (sampled, clipped, counted),
      the rows grouped by unit; ``loss_key`` checked, or None.
    """
    if privacy is not None:
        _check_public_preprocessing(train_data)
    loss_fn = _augmented(loss_fn, augment, privacy=privacy, loss_key=loss_key)
    loss_key = example_keys.check_loss_fn(loss_fn, loss_key)
    if privacy is not None and loss_key is not None:  # rows 0, 1 would get the noise's keys
        keys.check_distinct(key, loss_key, name="loss_key")
    if units is not None:
        _check_units_fit(privacy, mesh)
        validate_data(loss_fn, train_data, None)  # the rows, by the row loss's own check
        train_data = dp_units.group_units(train_data, units)[0]
        loss_fn = dp_units.unit_loss(loss_fn, keyed=loss_key is not None)
    return loss_fn, loss_key, train_data


def loop_options(
    *,
    metric_writers,
    quiet,
    metrics_path,
    evaluate,
    strategy,
    privacy,
):
    """The loop's switches and hooks, checked.

    Args:
      metric_writers, quiet, metrics_path, evaluate, strategy, privacy: ``fit``'s
        (``metrics_path``: a file that can be written, checked before the first epoch rather
        than at its end).

    Returns:
      ``(metric_writers, quiet)``, checked.
    """
    metric_writers = writers_lib.check_writers(metric_writers)
    quiet = reduce.check_flag(quiet, name="quiet")
    if metrics_path is not None:
        if not isinstance(metrics_path, (str, os.PathLike)):
            raise TypeError(
                f"`metrics_path` must be a file path (str or os.PathLike); got {metrics_path!r}"
            )
        if (why := file_write_error(metrics_path, "metrics.jsonl")) is not None:
            raise ValueError(f"`metrics_path` {os.fspath(metrics_path)!r}{why}")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(
            f"`evaluate` must be a function evaluate(params) -> {{name: number}}; got {evaluate!r}"
        )
    if privacy is not None and strategy is not batch_grad:
        raise ValueError(
            "`strategy` does not apply with `privacy`: DP-SGD takes the noisy clipped gradient of "
            f"jaxgrad.privacy.sampled_dp_grad; got strategy={strategy!r}"
        )
    return metric_writers, quiet


def checkpoint_options(*, checkpoint_dir, checkpoint_every, keep, resume):
    """``(checkpoint_every, keep, resume)``, checked: each needs a ``checkpoint_dir``.

    Returns:
      ``checkpoint_every`` (None or a positive integer), ``keep`` (default 3) and ``resume``
      (default True).

    Raises:
      ValueError: one of them given without ``checkpoint_dir`` (it would be ignored: no
        checkpoint is written or read without one), or not of its type.
    """
    if checkpoint_every is not None:
        checkpoint_every = reduce.check_positive_int(checkpoint_every, name="checkpoint_every")
    if keep is not None:
        keep = reduce.check_positive_int(keep, name="keep")
    if resume is not None:
        resume = reduce.check_flag(resume, name="resume")
    given = {"checkpoint_every": checkpoint_every, "keep": keep, "resume": resume}
    if checkpoint_dir is None and (ignored := [k for k, v in given.items() if v is not None]):
        raise ValueError(
            f"{' and '.join(f'`{k}` ({given[k]})' for k in ignored)} "
            f"{'needs' if len(ignored) == 1 else 'need'} `checkpoint_dir`: no checkpoint is "
            "written or read without one; pass checkpoint_dir=... or leave them out"
        )
    keep = 3 if keep is None else keep
    resume = True if resume is None else resume
    return checkpoint_every, keep, resume


def check_batch_size(batch_size: int, n: int) -> None:
    """Refuses a ``batch_size`` larger than the ``n`` examples of the training set."""
    if batch_size > n:
        raise ValueError(
            f"`batch_size` ({batch_size}) is larger than the training set ({n} examples); "
            f"expected at most {n}"
        )


def check_accumulation(optimizer, params, loss_fn, data, *, batch_size, loss_key, private):
    """Refuses (or warns about) an optimizer that would average batch means across steps.

    ``optax.MultiSteps`` applies the mean of ``k`` steps' mean gradients, ``(1/k) Σ S_k / n_k``,
    not the gradient of the ``k`` batches together, ``Σ S_k / Σ n_k``: wrong for a
    ``(loss_sum, n_items)`` loss (batches hold different numbers of items: refused) and, for a
    scalar loss, for every group with the epoch's partial last batch (warned, at the caller of
    ``fit``; with full batches only, exact). A DP-SGD step divides by the expected batch size,
    the same for every step, so there it is exact.

    Args:
      optimizer, params, batch_size: ``fit``'s.
      loss_fn, data, loss_key: the example loss and rows of :func:`example_loss`.
      private: whether the run is private.

    Raises:
      ValueError: a ``jaxgrad.accumulate`` in a private run; ``optax.MultiSteps`` with a
        ``(loss_sum, n_items)`` loss.
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
    traced = loss_fn if loss_key is None else lambda p, x: loss_fn(p, x, loss_key)
    fix = (
        "Use jaxgrad.accumulate(k, inner) (it accumulates gradient sums and item counts and "
        "divides once), or strategy=functools.partial(jaxgrad.accumulate_grad, "
        "num_microbatches=k) with a k times larger `batch_size`"
    )
    if isinstance(jax.eval_shape(traced, params, example), tuple):
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
        stacklevel=3,  # fit's caller: this function is called by fit itself
    )


def prepared_data(loss_fn, train_data, *, mesh, loss_key, privacy):
    """The loss and the rows as the steps take them, validated, and the per-batch row check.

    Args:
      loss_fn, train_data, loss_key: those of :func:`example_loss`.
      mesh, privacy: ``fit``'s.

    Returns:
      ``(loss_fn, train_data, check)``: with ``loss_key`` the data carries its row numbers,
      turned into keys per step; ``check`` as :func:`validate_data` returns it (for keyed
      rows, of the bare data).
    """
    train_data = sharding_lib.placed_untyped(train_data)
    if mesh is not None:
        sharding_lib.check_batch(train_data, mesh=mesh)
    check = validate_data(loss_fn, train_data, mesh)
    if loss_key is not None:
        wrap = example_keys.keyed_loss if privacy is None else example_keys.row_keyed_loss
        loss_fn, train_data = wrap(loss_fn), example_keys.with_rows(train_data)
        check = example_keys.row_check(check)
    return loss_fn, train_data, check


def in_memory(data) -> bool:
    """Whether every leaf of ``data`` is an in-memory array (not memory-mapped or lazy)."""
    return all(
        isinstance(x, jax.Array) or (isinstance(x, np.ndarray) and not isinstance(x, np.memmap))
        for x in jax.tree_util.tree_leaves(data)
    )


def validate_data(loss_fn, data, mesh):
    """Validates ``data`` with ``loss_fn.validate`` up front, or returns the per-batch check.

    In-memory data (or any data without a mesh) is validated whole before training. File-backed
    data on a mesh is never read whole: each process validates the rows it feeds, as it
    gathers them (the returned ``check``).
    """
    validate = getattr(loss_fn, "validate", None)
    if validate is None:
        return None
    if mesh is None or in_memory(data):
        validate(data)
        return None
    return _row_check(validate)


def _row_check(validate):
    """``check(rows, mask)`` for :func:`jaxgrad.sharding.take_rows`: validates the real rows."""

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


def _check_public_preprocessing(train_data) -> None:
    """Refuses private training on rows a jaxgrad loader standardised with the training
    split's own statistics (:func:`jaxgrad.data.own_statistics`): each row then depends on
    every other, and one example's removal moves the clipped sum by more than ``C``."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(train_data)[0]:
        if data_arrays.own_statistics(leaf):
            raise ValueError(
                f"`train_data`{jax.tree_util.keystr(path)} was standardised with the training "
                "split's own statistics (a jaxgrad loader's standardize=True, 'features' or "
                "'global'): every row then depends on every other row, outside the privacy "
                "accounting. Load it with standardize=False (the inputs as they are, e.g. "
                "digits' public 0-16 pixel range) or with statistics fixed before seeing the "
                "data, standardize={'mean': ..., 'std': ...}"
            )


def _check_units_fit(privacy, mesh) -> None:
    """Refuses ``units`` where they do not apply (no privacy, a mesh)."""
    if privacy is None:
        raise ValueError(
            "`units` applies to private training (user-level DP): give "
            "`privacy=PrivacyConfig(...)`, or leave units=None"
        )
    if mesh is not None:
        raise ValueError("`units` with `mesh` is not supported; got a mesh")
