"""Row by row: a standardised training split that no process reads whole."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from jaxgrad.data.arrays import (
    Dataset,
    _check_fraction,
    _check_numeric,
    _check_seed,
    _class_labels,
    _num_test,
    _scale_rule,
    _split_indices,
    _targets,
    _task_of,
    check_finite,
    check_standardize,
    given_statistics,
    marked,
)
from jaxgrad.data.files import _idx_files, _idx_images, _idx_labels, memmap
from jaxgrad.data.registry import FROM_PATH


class StandardizedRows:
    """A read-only array-like over the rows of ``base`` that standardises the rows it reads.

    ``rows[i] = ((base[index[i]] / divide) - mean) / scale`` in float64, then cast to
    ``dtype`` — the same operations, in the same order, as :func:`from_arrays` applies to a
    whole array, so a row read here equals that row of the in-memory :class:`Dataset`. Only
    the rows indexed are read from ``base`` (a :func:`memmap`, say); what
    :func:`jaxgrad.sharding.take_rows` needs (``shape``, ``dtype``, integer-array indexing).

    Args:
      base: an array-like with a leading example axis (``shape``, ``dtype``, indexing).
      rows: the rows of ``base`` this array holds, in order (a split); all of them if None.
      divide: divide the raw values by this first (255 for ``uint8`` pixels), or None.
      mean, scale: the standardisation statistics (broadcast against a row), or None.
      dtype: the dtype of what is returned.

    Example::

      >>> import numpy as np, jaxgrad
      >>> x = jaxgrad.data.StandardizedRows(
      ...     np.arange(6.0).reshape(3, 2), rows=[2, 0], mean=1.0, scale=2.0, dtype=np.float64)
      >>> x.shape, x[[0]].tolist()
      ((2, 2), [[1.5, 2.0]])
    """

    def __init__(self, base, *, rows=None, divide=None, mean=None, scale=None, dtype=np.float32):
        self.base = base
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        self.divide, self.mean, self.scale = divide, mean, scale
        self.dtype = np.dtype(dtype)
        size = len(base) if self.rows is None else len(self.rows)
        self.shape = (size, *base.shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index)
        if not np.issubdtype(index.dtype, np.integer):
            raise TypeError(
                f"StandardizedRows is indexed by integer row indices; got {index.dtype} "
                f"of shape {index.shape}"
            )
        raw = self.base[index if self.rows is None else self.rows[index]]
        a = np.asarray(raw).astype(np.float64)
        if self.divide is not None:
            a = a / self.divide
        if self.mean is not None:
            a = (a - self.mean) / self.scale
        return a.astype(self.dtype)

    def __array__(self, dtype=None, copy=None):
        whole = self[np.arange(len(self))]  # reads every row
        return whole if dtype is None else whole.astype(dtype)

    def __repr__(self):
        return f"StandardizedRows(shape={self.shape}, dtype={self.dtype})"


def _moments(a: np.ndarray, *, pooled: bool):
    """``(count, mean, m2)`` of float64 ``a`` over its rows (over all its values if
    ``pooled``), ``m2 = Σ (a - mean)²``; numpy's two-pass mean, no cancellation."""
    if pooled:
        a = a.reshape(-1)
    mean = a.mean(axis=0)
    return a.shape[0], mean, ((a - mean) ** 2).sum(axis=0)


def combine_moments(parts):
    """Combines per-block ``(count, mean, m2)`` into those of all the blocks together.

    Chan, Golub and LeVeque's pairwise update, for any number of blocks at once:

    .. math::

        n = \\sum_p n_p, \\quad \\mu = \\frac{1}{n} \\sum_p n_p \\mu_p, \\quad
        M_2 = \\sum_p \\left(M_{2,p} + n_p (\\mu_p - \\mu)^2\\right)

    where ``m2 = Σ (x - mean)²`` (so the variance is ``m2 / n``). Unlike
    ``Σx² / n - μ²`` it loses no digits when the mean is large against the spread. Empty
    blocks (``n_p = 0``) are skipped.

    Args:
      parts: an iterable of ``(count, mean, m2)``; ``mean`` and ``m2`` broadcast together.

    Returns:
      ``(count, mean, m2)`` of the union, ``mean`` and ``m2`` as float64 arrays.
    """
    parts = [(float(n), np.asarray(m, np.float64), np.asarray(s, np.float64)) for n, m, s in parts]
    parts = [p for p in parts if p[0] > 0]
    if not parts:
        raise ValueError("`parts` holds no non-empty block; expected at least one")
    n = sum(p[0] for p in parts)
    mean = sum(p[0] * p[1] for p in parts) / n
    m2 = sum(p[2] + p[0] * (p[1] - mean) ** 2 for p in parts)
    return n, mean, m2


def _allgather_f64(vector: np.ndarray) -> np.ndarray:
    """``vector`` of every process, stacked ``(process_count, L)``, exactly.

    Sent as its uint32 bit pattern, so float64 survives without ``jax_enable_x64``.
    """
    vector = np.ascontiguousarray(vector, np.float64)
    if jax.process_count() == 1:
        return vector[None]
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(vector.view(np.uint32))
    return (
        np.ascontiguousarray(np.asarray(got, np.uint32))
        .reshape(jax.process_count(), -1)
        .view(np.float64)
    )


def split_statistics(x, *, pooled: bool = False, chunk_rows: int = 65536):
    """The mean and standard deviation of ``x`` over all processes, each reading only its block.

    Process ``p`` of ``P`` reads rows ``[p N / P, (p + 1) N / P)`` of ``x`` (chunk by chunk)
    and computes their ``(count, mean, m2)`` in float64 (:func:`combine_moments` over the
    chunks); one all-gather of these few numbers gives every process the same combined
    statistics, equal to numpy's over the whole of ``x`` up to float64 round-off.

    Args:
      x: an array-like of float64 rows (e.g. a :class:`StandardizedRows` without statistics).
      pooled: one mean and deviation over all values (``standardize="global"``) instead of
        one per feature.
      chunk_rows: rows read at once.

    Returns:
      ``(mean, std, nonfinite)``: float64 arrays (scalars if ``pooled``) and the number of
      rows holding NaN or inf, summed over processes.
    """
    n, procs, me = len(x), jax.process_count(), jax.process_index()
    block = np.arange(me * n // procs, (me + 1) * n // procs)
    rows = getattr(x, "rows", None)
    if rows is not None:  # read the block in file order
        block = block[np.argsort(rows[block], kind="stable")]
    parts, bad = [], 0
    for start in range(0, len(block), chunk_rows):
        a = np.asarray(x[block[start : start + chunk_rows]], np.float64)
        bad += int((~np.isfinite(a.reshape(len(a), -1))).any(axis=1).sum())
        parts.append(_moments(a, pooled=pooled))
    shape = () if pooled else tuple(x.shape[1:])
    if parts:
        count, mean, m2 = combine_moments(parts)
    else:
        count, mean, m2 = 0.0, np.zeros(shape), np.zeros(shape)
    size = int(np.prod(shape))
    packed = np.concatenate([[count, bad], np.ravel(mean), np.ravel(m2)])
    gathered = _allgather_f64(packed)
    count, mean, m2 = combine_moments(
        (g[0], g[2 : 2 + size].reshape(shape), g[2 + size :].reshape(shape)) for g in gathered
    )
    return mean, np.sqrt(m2 / count), int(gathered[:, 1].sum())


def load_rows(
    name: str,
    path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool | str | Mapping | None = None,
    dtype=np.float32,
    num_classes: int | None = None,
    task: str | None = None,
) -> Dataset:
    """:func:`load` for data-parallel training on several processes: the training inputs
    stay on disk, memory-mapped, and are standardised as their rows are read.

    The same :class:`Dataset` as ``load(name, path=path, ...)`` — the same split, the same
    targets, the same standardisation — except that ``x_train`` is a
    :class:`StandardizedRows` over a :func:`memmap` of the file: each process reads only the
    rows it is asked for (:func:`jaxgrad.train.fit` with a ``mesh`` asks for its own
    devices' rows of each batch). The statistics are :func:`split_statistics`: each process
    reads its ``1 / P`` block of the training split once, and one all-gather of
    ``(count, mean, m2)`` gives every process the whole split's mean and scale (equal to the
    in-memory ones up to float64 round-off, so the standardised float32 rows agree but for a
    rare last-bit rounding). The targets (one number per example) and the test split are
    read whole by every process.

    Args:
      name: ``"npz"`` (an ``.npz`` whose input array, ``x`` or ``x_train``, is stored
        uncompressed: ``np.savez``) or ``"idx"`` (a directory of IDX files, the training
        images not gzipped).
      path: the file or directory.
      seed, test_fraction, standardize, dtype: as for :func:`from_arrays`; ``standardize``
        defaults to what :func:`load` uses (``True`` for npz, ``"global"`` for idx); given
        statistics apply to the inputs as read (IDX ``uint8`` pixels scaled to [0, 1]).
      num_classes: for classification (default: inferred for npz, 10 for idx).
      task: ``"classification"`` or ``"regression"`` for npz (default: from ``y``'s dtype).

    Returns:
      The :class:`Dataset`, ``x_train`` a :class:`StandardizedRows`.

    Raises:
      NotMappableError: the training inputs are compressed (save them with ``np.savez``, or
        gunzip the IDX file; or load them whole with :func:`load`).
      ValueError: as :func:`load`; non-finite training inputs are found by every process
        (their count, summed over processes).
    """
    if name not in FROM_PATH:
        raise ValueError(f"`name` must be one of {list(FROM_PATH)} (files); got {name!r}")
    test_fraction = _check_fraction(test_fraction)
    seed = _check_seed(seed)
    if standardize is None:
        standardize = True if name == "npz" else "global"
    check_standardize(standardize)
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise TypeError(f"`dtype` must be a floating-point dtype; got {dtype!r}")
    path = os.fspath(path)
    x_test = y_test = divide = None
    if name == "npz":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such .npz file: {path}")
        label = os.path.basename(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = set(f.files)
                if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                    x_key, y = "x_train", f["y_train"]
                    x_test, y_test = f["x_test"], f["y_test"]
                elif {"x", "y"} <= keys:
                    x_key, y = "x", f["y"]
                else:
                    raise ValueError(
                        f"{path}: expected arrays named x, y or x_train, y_train, x_test, "
                        f"y_test; got {sorted(keys)}"
                    )
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from None
        x = memmap(path, key=x_key)  # task: given, or (None) from y's dtype
    else:
        found = _idx_files(path)
        label = os.path.basename(os.path.normpath(path))
        x = memmap(found["x_train"])
        divide = 255.0 if x.dtype == np.uint8 else None
        y, task = _idx_labels(found["y_train"]), "classification"
        num_classes = 10 if num_classes is None else num_classes
        if found["x_test"] is not None and found["y_test"] is not None:
            x_test, y_test = _idx_images(found["x_test"]), _idx_labels(found["y_test"])
    _check_numeric(x, name=f"{label}: `x`", what="the inputs")
    _check_numeric(y, name=f"{label}: `y`", what="class labels or regression targets")
    for what, a in (("x_test", x_test), ("y_test", y_test)):
        if a is not None:
            _check_numeric(np.asarray(a), name=f"{label}: `{what}`", what="the test split")
    task, num_classes = _task_of(y, task, num_classes)
    n = len(x)
    if x.ndim == 0 or y.ndim == 0 or len(y) != n or n == 0:
        raise ValueError(
            f"{label}: `x` and `y` must share a non-empty leading example axis; got shapes "
            f"{x.shape} and {y.shape}"
        )
    # Targets checked as the user gave them, before the split: errors name rows of `y`.
    check_finite(np.zeros((n, 0)), y, name=f"{label} (targets)")
    if y_test is not None:
        check_finite(np.zeros((len(y_test), 0)), y_test, name=f"{label} (test split)")
    if task == "classification":
        y_test = None if y_test is None else np.asarray(y_test)
        y, y_test, num_classes = _class_labels(np.asarray(y), y_test, num_classes, name=label)
    if x_test is None:
        n_test = _num_test(n, test_fraction)
        if n_test < 1:
            raise ValueError(f"{label} holds {n} example(s); a train/test split needs at least 2")
        train_rows, test_rows = _split_indices(n, n_test, seed)
        y_train, y_test = y[train_rows], y[test_rows]
        x_test = StandardizedRows(x, rows=test_rows, divide=divide, dtype=np.float64)
        x_test = x_test[np.arange(n_test)]
    else:
        train_rows, y_train = None, y
        x_test = np.asarray(x_test).astype(np.float64)
        if x_test.shape[1:] != x.shape[1:] or len(x_test) != len(y_test):
            raise ValueError(
                f"{label}: the test split must match the training split's example shape; got "
                f"x {x.shape}, y {y.shape} and x_test {x_test.shape}, y_test {y_test.shape}"
            )
    check_finite(x_test, y_test, name=f"{label} (test split)")
    raw = StandardizedRows(x, rows=train_rows, divide=divide, dtype=np.float64)
    mean, std, bad = split_statistics(raw, pooled=standardize == "global")
    if bad:
        raise ValueError(
            f"{label}: the training inputs contain non-finite values (NaN or inf) in {bad} "
            "rows. Drop or impute them before training."
        )
    x_mean = x_scale = None
    if isinstance(standardize, Mapping):  # given statistics: the split's are not used
        x_mean, x_scale, _, _ = given_statistics(
            standardize, feature_shape=x.shape[1:], task=task, name=label
        )
    elif standardize:
        x_mean, x_scale = _scale_rule(mean, std)
    if x_mean is not None:
        x_test = (x_test - x_mean) / x_scale
    y_train, y_test, num_classes, y_mean, y_scale = _targets(
        y_train,
        y_test,
        task=task,
        num_classes=num_classes,
        standardize=standardize,
        dtype=dtype,
        name=label,
    )
    x_train = StandardizedRows(
        x, rows=train_rows, divide=divide, mean=x_mean, scale=x_scale, dtype=dtype
    )
    ds = Dataset(
        name=label,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test.astype(dtype),
        y_test=y_test,
        task=task,
        num_classes=num_classes,
        x_mean=x_mean,
        x_scale=x_scale,
        y_mean=y_mean,
        y_scale=y_scale,
    )
    return marked(ds, standardize)
