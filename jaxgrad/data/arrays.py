"""Data sets from arrays: :class:`Dataset`, checks, the seeded split and standardisation."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from jaxgrad import losses, reduce

TASKS = ("classification", "regression")
STANDARDIZE = (True, False, "features", "global")


class Dataset(NamedTuple):
    """A train/test split ready for training.

    Attributes:
      name: where it came from (``"digits"``, a file name, ...).
      x_train, y_train, x_test, y_test: numpy arrays with a leading example axis
        (``x_train`` a :class:`StandardizedRows` from :func:`load_rows`).
      task: ``"classification"`` (integer labels) or ``"regression"`` (float targets).
      num_classes: the number of classes for classification, else ``None``.
      x_mean, x_scale: the training statistics the inputs were standardised with (``None``
        when not standardised); ``x_raw = x * x_scale + x_mean``.
      y_mean, y_scale: the same for regression targets.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str
    num_classes: int | None
    x_mean: np.ndarray | None = None
    x_scale: np.ndarray | None = None
    y_mean: float | None = None
    y_scale: float | None = None

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """The training split as a batch ``(x, y)``."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """The test split as a batch ``(x, y)``."""
        return self.x_test, self.y_test

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one input example."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self):
        classes = f", num_classes={self.num_classes}" if self.num_classes else ""
        return (
            f"Dataset({self.name!r}, {self.task}{classes}, train={len(self.x_train)}, "
            f"test={len(self.x_test)}, features={self.feature_shape})"
        )


# --------------------------------------------------------------------------------------
# Checks.


def check_finite(x, y=None, *, name: str = "data") -> None:
    """Raises ``ValueError`` if ``x`` or ``y`` hold NaN or inf, naming the bad rows and columns.

    Args:
      x: inputs with a leading example axis.
      y: optional targets with the same leading axis.
      name: how to call the data in the message (a file name, say).
    """
    x = np.asarray(x)
    parts = []
    bad_rows = np.zeros(len(x), bool)
    if np.issubdtype(x.dtype, np.inexact):
        bad_x = ~np.isfinite(x.reshape(len(x), -1))
        if bad_x.any():
            rows, cols = bad_x.any(axis=1), bad_x.any(axis=0)
            bad_rows |= rows
            parts.append(
                f"inputs: {int(bad_x.sum())} values in {int(rows.sum())} rows and "
                f"{int(cols.sum())} columns (columns {_head(np.flatnonzero(cols))})"
            )
    if y is not None:
        y = np.asarray(y)
        if np.issubdtype(y.dtype, np.inexact):
            bad_y = ~np.isfinite(y.reshape(len(y), -1)).all(axis=1)
            if bad_y.any():
                bad_rows |= bad_y
                parts.append(f"targets: {int(bad_y.sum())} rows")
    if parts:
        raise ValueError(
            f"{name} contains non-finite values (NaN or inf) in {int(bad_rows.sum())} of "
            f"{len(x)} rows (rows {_head(np.flatnonzero(bad_rows))}); "
            + "; ".join(parts)
            + ". Drop or impute them before training."
        )


def _head(indices, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (", ..." if len(indices) > limit else "")


def _check_labels(y: np.ndarray, num_classes: int, *, name: str) -> None:
    losses.check_labels(y, num_classes, name=f"{name}: labels", allow_binary_floats=False)


def _check_numeric(a: np.ndarray, *, name: str, what: str) -> None:
    """Raises a TypeError naming ``name`` unless ``a`` holds real numbers (bool, int, float)."""
    if a.dtype.kind not in "biuf":
        hint = (
            " (the imaginary part would be dropped; split it into two real columns)"
            if a.dtype.kind == "c"
            else " (encode strings and categories as numbers first)"
        )
        raise TypeError(f"{name} must hold real numbers ({what}); got dtype {a.dtype}{hint}")


# The start of the warning on float targets that are all whole numbers (a statistic of the
# rows: the command line silences it under --dp).
WHOLE_NUMBERS = "`y` holds floats that are all whole numbers"


# Labels are "sparse" when num_classes, inferred as max(label) + 1, is over SPARSE_MIN_CLASSES
# and fewer than half of those classes occur: e.g. labels 0, 10**6 and 10**6 + 2 (ids, not
# class indices) would make a model with a million outputs. A rule on counts only (the labels'
# values are not shown): a few missing classes of a small problem stay silent.
SPARSE_MIN_CLASSES = 1000


class SparseLabelsWarning(UserWarning):
    """``num_classes`` inferred from labels of which fewer than half the classes occur
    (:data:`SPARSE_MIN_CLASSES`); ``python -m jaxgrad.train`` makes it an error."""


def _task_of(y: np.ndarray, task, num_classes):
    """``(task, num_classes)``: the task inferred from ``y``'s dtype when None, both checked.

    Integer and boolean labels are classes (False = 0, True = 1); floats are regression
    targets — with a warning when every float is a whole number (``0., 1., 2.``: class
    labels saved as floats?). ``num_classes`` is a positive integer, and only for
    classification.
    """
    if task is None:
        task = "classification" if y.dtype.kind in "biu" else "regression"
        if task == "regression" and _whole_numbers(y):
            # Counts only: the values are the private rows' labels, and warnings end up in logs.
            distinct = len(np.unique(y))
            warnings.warn(
                f"{WHOLE_NUMBERS} ({distinct} distinct values), so it is taken as "
                "regression targets (float `y` means regression). If they are class labels, "
                "pass task='classification' (python -m jaxgrad.train: --task classification) "
                "or store them as integers; task='regression' (--task regression) says they "
                "are targets and silences this warning",
                UserWarning,
                stacklevel=3,
            )
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}; got {task!r}")
    if num_classes is not None:
        if task != "classification":
            raise ValueError(
                f"`num_classes` ({num_classes!r}) is for classification; the task is {task!r} "
                f"(`y` has dtype {y.dtype}: integer or boolean labels are classes, floats are "
                "regression targets). Pass integer labels, or drop num_classes"
            )
        num_classes = reduce.check_positive_int(num_classes, name="num_classes")
    return task, num_classes


def _whole_numbers(y: np.ndarray) -> bool:
    """Whether a float ``y`` holds only finite whole numbers (a label's values)."""
    return y.dtype.kind == "f" and y.size > 0 and bool(np.all(np.isfinite(y) & (np.mod(y, 1) == 0)))


def _check_seed(seed) -> int:
    """A seed of numpy's generator: a non-negative integer."""
    value = reduce.as_number(seed, name="seed", integer=True)
    if value < 0:
        raise ValueError(f"`seed` must be a non-negative integer; got {seed!r}")
    return value


def _check_fraction(test_fraction) -> float:
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ValueError(f"`test_fraction` must be a number in (0, 1); got {test_fraction!r}")
    return float(test_fraction)


# --------------------------------------------------------------------------------------
# Splitting and standardising.


def train_test_split(x, y, *, test_fraction: float = 0.2, seed: int = 0):
    """A seeded random split: ``round(n * test_fraction)`` examples (at least 1) go to test.

    Args:
      x, y: arrays with the same leading axis.
      test_fraction: the share of examples held out, in (0, 1).
      seed: the numpy seed of the permutation; the same seed gives the same split.

    Returns:
      ``(x_train, y_train, x_test, y_test)``.
    """
    test_fraction = _check_fraction(test_fraction)
    seed = _check_seed(seed)
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    if len(y) != n:
        raise ValueError(f"`x` and `y` must have the same length; got {n} and {len(y)}")
    n_test = _num_test(n, test_fraction)
    if n_test < 1:
        raise ValueError(
            f"`x` holds {n} example(s); a train/test split needs at least 2 (one for each "
            "side). Pass more data, or train on it directly with jaxgrad.train.fit"
        )
    train, test = _split_indices(n, n_test, seed)
    return x[train], y[train], x[test], y[test]


def _split_indices(n: int, n_test: int, seed: int):
    """``(train, test)`` row indices of :func:`train_test_split`'s seeded permutation."""
    order = np.random.default_rng(seed).permutation(n)
    return order[n_test:], order[:n_test]


def _num_test(n: int, test_fraction: float) -> int:
    return min(max(1, round(n * test_fraction)), n - 1) if n > 1 else 0


def _fit_scale(a: np.ndarray, axis=0):
    return _scale_rule(a.mean(axis=axis), a.std(axis=axis))


def _scale_rule(mean, scale):
    # Constant columns (e.g. the blank border pixels of digits) are centred, not divided by 0.
    # A column is constant when its spread is 0 or rounding noise of its mean (at most 1e-12
    # of |mean|); a feature of tiny magnitude (values ~1e-13, say) is not constant, and is
    # scaled like any other.
    scale = np.where(scale > 1e-12 * np.abs(mean), scale, 1.0)
    return mean, scale


# The names a mapping of given statistics may hold (``standardize={"mean": ..., ...}``).
GIVEN_STATISTICS = ("mean", "std", "y_mean", "y_std")


def given_statistics(stats: Mapping, *, feature_shape: tuple, task: str, name: str = "data"):
    """``(x_mean, x_scale, y_mean, y_scale)`` from statistics the caller gives, checked.

    Given statistics are fixed before the data is seen (a public range, another data set's
    values), so standardising with them depends on no row of the training split: what
    differentially private training needs, where the training split's own mean and standard
    deviation would make every row depend on every other one.

    Args:
      stats: a mapping with ``mean`` and ``std`` (arrays broadcastable to one input of shape
        ``feature_shape``; finite; ``std > 0``) and, for regression only, optionally
        ``y_mean`` and ``y_std`` together (scalars) for the targets, which stay as they are
        without them.
      feature_shape: the shape of one input example.
      task: ``"classification"`` or ``"regression"``.
      name: how to call the data in messages.

    Returns:
      ``(x_mean, x_scale, y_mean, y_scale)``: float64 arrays, the ``y_*`` floats or ``None``.

    Raises:
      ValueError: a missing or unknown name, a shape that does not broadcast to one input,
        a non-finite value, a ``std`` that is not positive, target statistics for labels.

    Example::

      >>> import jaxgrad
      >>> stats = {"mean": 0.5, "std": [1.0, 2.0]}
      >>> jaxgrad.data.given_statistics(stats, feature_shape=(2,), task="classification")
      (array(0.5), array([1., 2.]), None, None)
    """
    where = f"{name}: `standardize` statistics"
    unknown = sorted(set(stats) - set(GIVEN_STATISTICS))
    missing = [k for k in ("mean", "std") if k not in stats]
    if unknown or missing:
        raise ValueError(
            f"{where} must hold `mean` and `std` (and optionally `y_mean` and `y_std` for "
            f"regression targets); got {sorted(stats)}"
        )
    if ("y_mean" in stats) != ("y_std" in stats):
        raise ValueError(f"{where}: `y_mean` and `y_std` go together; got {sorted(stats)}")
    if "y_mean" in stats and task != "regression":
        raise ValueError(
            f"{where}: `y_mean` and `y_std` standardise regression targets; this data set has "
            "class labels"
        )
    out = {}
    for key in stats:
        try:
            a = np.asarray(stats[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: `{key}` must be numbers; got {stats[key]!r}") from None
        want = () if key.startswith("y_") else tuple(feature_shape)
        try:
            fits = np.broadcast_shapes(a.shape, want) == want
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"{where}: `{key}` has shape {a.shape}; expected a shape that broadcasts to "
                f"one {'target' if key.startswith('y_') else 'input'}, {want}"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: `{key}` holds non-finite values (NaN or inf)")
        if key.endswith("std") and not np.all(a > 0):
            raise ValueError(f"{where}: `{key}` must be > 0 everywhere; its minimum is {a.min()}")
        out[key] = a
    y_mean = float(out["y_mean"]) if "y_mean" in out else None
    y_scale = float(out["y_std"]) if "y_std" in out else None
    return out["mean"], out["std"], y_mean, y_scale


def check_standardize(standardize) -> None:
    """Raises unless ``standardize`` is one of :data:`STANDARDIZE` or a mapping of given
    statistics (:func:`given_statistics` checks its contents)."""
    if not isinstance(standardize, Mapping) and standardize not in STANDARDIZE:
        raise ValueError(
            f"`standardize` must be one of {list(STANDARDIZE)} or a mapping of given statistics "
            f"{{'mean': ..., 'std': ...}}; got {standardize!r}"
        )


def _rectangular(value, *, name: str) -> np.ndarray:
    """``np.asarray(value)``, or a ValueError naming ``name`` for a ragged nested list."""
    try:
        return np.asarray(value)
    except ValueError as e:
        if "inhomogeneous" not in str(e) and "sequence" not in str(e):
            raise
        lengths = [len(r) if hasattr(r, "__len__") else "a scalar" for r in list(value)[:6]]
        raise ValueError(
            f"`{name}` must be one rectangular array, every example the same shape; got a "
            f"ragged nested sequence (the first rows' lengths: {lengths}). Pad the rows to one "
            "length (and mask the padding in the loss), or pass a numpy array"
        ) from None


# The training arrays jaxgrad standardised with their own split's statistics (``standardize``
# True, "features" or "global"): every row is then a function of every other row, outside
# any privacy accounting, so ``fit(privacy=...)`` refuses them (:func:`own_statistics`).
# Held weakly and by identity: the arrays a Dataset hands out and numpy views of them (a
# slice, a reshape), as users pass them on; a copy made of them is the user's to vouch for.
_OWN_STATISTICS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def mark_own_statistics(*arrays) -> None:
    """Records ``arrays`` as standardised with their own training split's statistics."""
    for a in arrays:
        _OWN_STATISTICS[id(a)] = a


def own_statistics(array) -> bool:
    """Whether ``array`` is a training array a jaxgrad loader standardised with its own
    split's statistics (``standardize=True``, ``"features"`` or ``"global"``), or a numpy
    view of one: then it may not be trained on privately (each row depends on every other
    row). A copy is not recognised.

    Example::

      >>> import numpy as np, jaxgrad
      >>> x, y = np.random.rand(50, 3), np.arange(50) % 2
      >>> jaxgrad.data.own_statistics(jaxgrad.data.from_arrays(x, y).x_train)
      True
      >>> ds = jaxgrad.data.from_arrays(x, y, standardize=False)
      >>> jaxgrad.data.own_statistics(ds.x_train)
      False
    """
    # A view (a slice, a reshape) of such an array is one too: numpy sets a view's ``base``
    # to the array owning the memory, also for a view of a view, so one step reaches it.
    base = array.base if isinstance(array, np.ndarray) else None
    return any(_OWN_STATISTICS.get(id(a)) is a for a in (array, base) if a is not None)


def from_arrays(
    x,
    y,
    *,
    task: str | None = None,
    num_classes: int | None = None,
    x_test=None,
    y_test=None,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool | str | Mapping = True,
    dtype=np.float32,
    name: str = "arrays",
) -> Dataset:
    """A :class:`Dataset` from the user's own arrays.

    Args:
      x, y: inputs and targets with a shared leading example axis. Integer ``y`` means
        classification, float ``y`` regression (override with ``task``).
      task: ``"classification"`` or ``"regression"``; inferred from ``y``'s dtype if None.
      num_classes: for classification; ``max(y) + 1`` if None, with a
        :class:`SparseLabelsWarning` when that is over 1,000 classes and fewer than half of
        them occur (labels that are ids, not class indices). Labels outside
        ``[0, num_classes)`` are an error.
      x_test, y_test: a given test split; otherwise a seeded split of ``x, y``.
      test_fraction: the held-out share when splitting.
      seed: the split's seed.
      standardize: ``True`` or ``"features"`` centres and scales every input feature with
        the training split's statistics; ``"global"`` uses one mean and standard deviation
        over all training inputs (better for images, whose rarely-inked border pixels would
        otherwise be blown up); ``False`` leaves inputs as they are. Regression targets are
        standardised unless this is ``False``. A mapping ``{"mean": ..., "std": ...}`` (and
        optionally ``"y_mean"``, ``"y_std"``) standardises with those given statistics instead
        of the training split's (:func:`given_statistics`): what DP training needs.
      dtype: the float dtype of the inputs (and regression targets).
      name: a name for messages.

    Returns:
      The :class:`Dataset`.

    Raises:
      ValueError: non-finite values (naming the rows/columns), mismatched lengths, labels
        out of range, an unknown task.

    Example::

      >>> import numpy as np, jaxgrad
      >>> ds = jaxgrad.data.from_arrays(np.random.rand(50, 3), np.arange(50) % 2)
      >>> ds.task, ds.num_classes, len(ds.x_train), len(ds.x_test)
      ('classification', 2, 40, 10)
    """
    try:
        float_dtype = np.dtype(dtype)
    except TypeError:
        float_dtype = None
    if float_dtype is None or not np.issubdtype(float_dtype, np.floating):
        raise TypeError(
            f"`dtype` must be a floating-point dtype (inputs are standardised, so an integer "
            f"dtype would truncate them); got {dtype!r}"
        )
    x, y = _rectangular(x, name="x"), _rectangular(y, name="y")
    _check_numeric(x, name=f"{name}: `x`", what="the inputs")
    _check_numeric(y, name=f"{name}: `y`", what="class labels or regression targets")
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ValueError(
            f"{name}: `x` and `y` must share a leading example axis; got shapes {x.shape} "
            f"and {y.shape}"
        )
    if len(x) == 0:
        raise ValueError(f"{name}: no examples (leading axis 0)")
    check_finite(x, y, name=name)
    if (x_test is None) != (y_test is None):
        raise ValueError("`x_test` and `y_test` must be given together")
    if x_test is not None:
        x_test, y_test = _rectangular(x_test, name="x_test"), _rectangular(y_test, name="y_test")
        _check_numeric(x_test, name=f"{name}: `x_test`", what="the inputs")
        _check_numeric(y_test, name=f"{name}: `y_test`", what="labels or targets")
        check_finite(x_test, y_test, name=f"{name} (test split)")
        if x_test.shape[1:] != x.shape[1:] or len(x_test) != len(y_test):
            raise ValueError(
                f"{name}: the test split must match the training split's example shape; got "
                f"x {x.shape}, y {y.shape} and x_test {x_test.shape}, y_test {y_test.shape}"
            )
    check_standardize(standardize)
    task, num_classes = _task_of(y, task, num_classes)
    if task == "classification":  # before the split: errors name the rows of `y` as given
        y, y_test, num_classes = _class_labels(y, y_test, num_classes, name=name)
    if x_test is not None:
        x_train, y_train = x, y
    else:
        x_train, y_train, x_test, y_test = train_test_split(
            x, y, test_fraction=test_fraction, seed=seed
        )
    given = None
    if isinstance(standardize, Mapping):
        given = given_statistics(standardize, feature_shape=x.shape[1:], task=task, name=name)

    y_train, y_test, num_classes, y_mean, y_scale = _targets(
        y_train,
        y_test,
        task=task,
        num_classes=num_classes,
        standardize=standardize,
        dtype=dtype,
        name=name,
    )
    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    x_mean = x_scale = None
    if given is not None:
        x_mean, x_scale = given[:2]
    elif standardize:
        x_mean, x_scale = _fit_scale(x_train, axis=None if standardize == "global" else 0)
    if x_mean is not None:
        x_train, x_test = (x_train - x_mean) / x_scale, (x_test - x_mean) / x_scale
    with np.errstate(over="ignore"):
        x_train, x_test = x_train.astype(dtype), x_test.astype(dtype)
    # The values were finite before the cast: anything non-finite now overflowed ``dtype``.
    for what, a in (("x", x_train), ("y", y_train), ("x_test", x_test), ("y_test", y_test)):
        if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
            raise ValueError(
                f"{name}: `{what}` overflows `dtype` {np.dtype(dtype).name} (its largest finite "
                f"value is {np.finfo(dtype).max:g}); pass a wider dtype or standardize=True"
            )
    ds = Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        task=task,
        num_classes=num_classes,
        x_mean=x_mean,
        x_scale=x_scale,
        y_mean=y_mean,
        y_scale=y_scale,
    )
    return marked(ds, standardize)


def marked(ds: Dataset, standardize) -> Dataset:
    """``ds``, its training arrays recorded (:func:`mark_own_statistics`) where ``standardize``
    standardised them with the training split's own statistics (not given ones)."""
    if standardize and not isinstance(standardize, Mapping):
        mark_own_statistics(ds.x_train)
        if ds.y_mean is not None:  # regression targets, standardised the same way
            mark_own_statistics(ds.y_train)
    return ds


def _class_labels(y, y_test, num_classes, *, name):
    """``(y, y_test, num_classes)``: class labels as integers, checked, the classes counted.

    Called on the arrays as the user gave them (``y_test`` None unless given), so an error
    names a row of the user's ``y`` or ``y_test``, not of a shuffled split.
    """
    given = [("`y`", y)] + ([] if y_test is None else [("`y_test`", y_test)])
    # Booleans are the classes 0 and 1; floats are classes if all are whole numbers
    # (task="classification" given for labels saved as 0., 1., 2.).
    for split, labels in given:
        if labels.dtype.kind == "f" and not _whole_numbers(labels):
            fractional = int(np.sum(np.mod(labels, 1) != 0))
            raise ValueError(
                f"{name}: {split} holds floats that are not all whole numbers ({fractional} "
                f"of {labels.size} have a fractional part), so they cannot be class labels "
                "(task='classification'); pass integer labels, or task='regression'"
            )
    y, y_test = (
        a if a is None or not (a.dtype == bool or a.dtype.kind == "f") else a.astype(np.int64)
        for a in (y, y_test)
    )
    inferred = num_classes is None
    if inferred:
        num_classes = int(max(a.max() for a in (y, y_test) if a is not None)) + 1
    _check_labels(y, num_classes, name=name)
    if y_test is not None:
        _check_labels(y_test, num_classes, name=f"{name} (test split)")
    if inferred and num_classes > SPARSE_MIN_CLASSES:
        present = len(np.unique(np.concatenate([a.ravel() for a in (y, y_test) if a is not None])))
        if present < num_classes / 2:
            warnings.warn(
                f"{name}: without `num_classes` the classes are counted as the largest label + 1 "
                f"= {num_classes}, but only {present} distinct labels occur: the model would have "
                f"{num_classes} outputs, most for classes never seen. Remap the labels to "
                f"0..{present - 1} "
                "(np.unique(y, return_inverse=True)), or pass `num_classes` if that many "
                "classes is meant",
                SparseLabelsWarning,
                stacklevel=3,
            )
    if num_classes > 2**31:
        raise ValueError(
            f"{name}: {num_classes} classes; labels are stored as int32, so at most 2**31"
        )
    return y, y_test, num_classes


def _targets(y_train, y_test, *, task, num_classes, standardize, dtype, name):
    """Labels checked and cast to int32, or regression targets cast and standardised (with
    the training split's statistics, or with ``y_mean``, ``y_std`` of given statistics)."""
    y_mean = y_scale = None
    if task == "classification":  # (checked by _class_labels)
        y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    else:
        num_classes = None
        # Standardised in float64 and cast after: cast first, targets with a large offset
        # (1e8 + noise, say) would lose their spread to float32 rounding (ulp 8 at 1e8).
        y_train, y_test = y_train.astype(np.float64), y_test.astype(np.float64)
        if isinstance(standardize, Mapping):
            y_mean, y_scale = standardize.get("y_mean"), standardize.get("y_std")
            y_mean, y_scale = (None, None) if y_mean is None else (float(y_mean), float(y_scale))
        elif standardize:
            y_mean, y_scale = (float(v) for v in _fit_scale(y_train, axis=None))
        if y_mean is not None:
            y_train, y_test = (y_train - y_mean) / y_scale, (y_test - y_mean) / y_scale
        with np.errstate(over="ignore"):  # an overflow is named by the caller
            y_train, y_test = y_train.astype(dtype), y_test.astype(dtype)
    return y_train, y_test, num_classes, y_mean, y_scale
