"""Data sets that ship offline, loaders for the user's own data, and epoch batching with masks.

Nothing here downloads. The bundled sets are scikit-learn's (``load_digits``,
``load_breast_cancer``, ``load_diabetes``, read from the installed package); the rest comes
from the user: arrays, ``.npz`` files, or MNIST-format IDX files (plain or gzip) at a path.
:func:`memmap` opens one array of a file (``.npy``, an uncompressed ``.npz`` member, a plain
IDX file) memory-mapped, without reading it: what data-parallel training on several hosts
uses so that each process reads only the rows it feeds (see :func:`jaxgrad.train.fit`);
:func:`load_rows` builds a standardised :class:`Dataset` on it without any process reading
the training inputs whole (statistics combined over the processes, :func:`split_statistics`).

Every loader returns a :class:`Dataset` with a seeded train/test split. Standardisation

.. math::

    \\tilde x_{ij} = (x_{ij} - \\mu_j) / \\sigma_j

uses the mean and standard deviation of the *training* split only (no test statistics leak
into training); regression targets are standardised the same way, so the reported losses
are in units of the training targets' variance (R² is unchanged by it).

Batching: the shuffle order of an epoch is a pure function of ``(key, epoch)``
(:func:`epoch_indices`), so a run resumed mid-epoch replays exactly the same batches. The
last partial batch is kept and padded with a ``False`` mask, so shapes never change.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import losses

__all__ = [
    "BUNDLED",
    "Dataset",
    "NotMappableError",
    "StandardizedRows",
    "combine_moments",
    "epoch_indices",
    "from_arrays",
    "load",
    "load_idx",
    "load_mnist1d",
    "load_npz",
    "load_rows",
    "memmap",
    "read_idx",
    "split_statistics",
    "synthetic_line",
    "train_test_split",
]

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
    scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(mean)), scale, 1.0)
    return mean, scale


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
    standardize: bool | str = True,
    dtype=np.float32,
    name: str = "arrays",
) -> Dataset:
    """A :class:`Dataset` from the user's own arrays.

    Args:
      x, y: inputs and targets with a shared leading example axis. Integer ``y`` means
        classification, float ``y`` regression (override with ``task``).
      task: ``"classification"`` or ``"regression"``; inferred from ``y``'s dtype if None.
      num_classes: for classification; ``max(y) + 1`` if None. Labels outside
        ``[0, num_classes)`` are an error.
      x_test, y_test: a given test split; otherwise a seeded split of ``x, y``.
      test_fraction: the held-out share when splitting.
      seed: the split's seed.
      standardize: ``True`` or ``"features"`` centres and scales every input feature with
        the training split's statistics; ``"global"`` uses one mean and standard deviation
        over all training inputs (better for images, whose rarely-inked border pixels would
        otherwise be blown up); ``False`` leaves inputs as they are. Regression targets are
        standardised unless this is ``False``.
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
    x, y = np.asarray(x), np.asarray(y)
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
        x_test, y_test = np.asarray(x_test), np.asarray(y_test)
        check_finite(x_test, y_test, name=f"{name} (test split)")
        if x_test.shape[1:] != x.shape[1:] or len(x_test) != len(y_test):
            raise ValueError(
                f"{name}: the test split must match the training split's example shape; got "
                f"x {x.shape}, y {y.shape} and x_test {x_test.shape}, y_test {y_test.shape}"
            )
        x_train, y_train = x, y
    else:
        x_train, y_train, x_test, y_test = train_test_split(
            x, y, test_fraction=test_fraction, seed=seed
        )
    if standardize not in STANDARDIZE:
        raise ValueError(f"`standardize` must be one of {list(STANDARDIZE)}; got {standardize!r}")
    if task is None:
        task = "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}; got {task!r}")

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
    if standardize:
        x_mean, x_scale = _fit_scale(x_train, axis=None if standardize == "global" else 0)
        x_train, x_test = (x_train - x_mean) / x_scale, (x_test - x_mean) / x_scale
    return Dataset(
        name=name,
        x_train=x_train.astype(dtype),
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


def _targets(y_train, y_test, *, task, num_classes, standardize, dtype, name):
    """Labels checked and cast to int32, or regression targets cast and standardised."""
    y_mean = y_scale = None
    if task == "classification":
        if num_classes is None:
            num_classes = int(max(y_train.max(), y_test.max())) + 1
        _check_labels(y_train, num_classes, name=name)
        _check_labels(y_test, num_classes, name=f"{name} (test split)")
        y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    else:
        num_classes = None
        y_train, y_test = y_train.astype(dtype), y_test.astype(dtype)
        if standardize:
            y_mean, y_scale = (float(v) for v in _fit_scale(y_train, axis=None))
            y_train = ((y_train - y_mean) / y_scale).astype(dtype)
            y_test = ((y_test - y_mean) / y_scale).astype(dtype)
    return y_train, y_test, num_classes, y_mean, y_scale


# --------------------------------------------------------------------------------------
# Bundled and synthetic sets.


def _sklearn(loader_name: str):
    try:
        from sklearn import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the bundled data sets are scikit-learn's; install it with "
            "`pip install scikit-learn` (or `pip install jaxgrad[cli]`)"
        ) from e
    return getattr(datasets, loader_name)(return_X_y=True)


def load_digits(*, standardize: bool | str = "global", **kwargs) -> Dataset:
    """scikit-learn's bundled 8x8 digits: 1797 images as 64 features, 10 classes.

    Standardised with one mean and scale over all training pixels by default (see
    :func:`from_arrays`); other keyword arguments go to :func:`from_arrays`.
    """
    x, y = _sklearn("load_digits")
    return from_arrays(
        x,
        y,
        task="classification",
        num_classes=10,
        name="digits",
        standardize=standardize,
        **kwargs,
    )


def load_breast_cancer(**kwargs) -> Dataset:
    """scikit-learn's bundled Wisconsin breast cancer set: 569 examples, 30 features, 2 classes."""
    x, y = _sklearn("load_breast_cancer")
    return from_arrays(x, y, task="classification", num_classes=2, name="breast_cancer", **kwargs)


def load_diabetes(**kwargs) -> Dataset:
    """scikit-learn's bundled diabetes regression set: 442 examples, 10 features."""
    x, y = _sklearn("load_diabetes")
    return from_arrays(x, y, task="regression", name="diabetes", **kwargs)


def synthetic_line(
    *,
    num_examples: int = 512,
    slope: float = 2.0,
    intercept: float = -0.5,
    noise: float = 0.001,
    seed: int = 0,
    test_fraction: float = 0.2,
    dtype=np.float32,
) -> Dataset:
    """The seed's line fit: ``y = slope · x + intercept + noise · ε``, ``x ~ U(-1, 1)``.

    ``ε ~ N(0, 1)``.

    Not standardised, so a fitted :func:`jaxgrad.models.line_fit` recovers ``slope`` (m) and
    ``intercept`` (b) directly.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, num_examples)
    y = slope * x + intercept + noise * rng.standard_normal(num_examples)
    return from_arrays(
        x,
        y,
        task="regression",
        test_fraction=test_fraction,
        seed=seed,
        standardize=False,
        dtype=dtype,
        name="line",
    )


def load_mnist1d(
    *,
    num_examples: int = 10000,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool | str = "global",
    dtype=np.float32,
) -> Dataset:
    """MNIST-1D (Greydanus, 2020), generated locally: 10 classes of 40-sample 1-D signals.

    The ``mnist1d`` package draws each example from one of ten digit-like templates with
    random padding, scaling, shear, translation and correlated noise; nothing is downloaded
    (``pip install mnist1d``, in the ``privacy`` extra). Large enough to spend a meaningful
    ε in DP-SGD, small enough to generate in seconds per 10 000 examples (about 4000 per
    second on one core).

    Args:
      num_examples: examples to generate (train and test together).
      seed: the generator's seed (the same seed gives the same data set).
      test_fraction: the held-out share (mnist1d's own split).
      standardize: as for :func:`from_arrays` (one global mean and scale by default).
      dtype: the float dtype of the inputs.

    Returns:
      The :class:`Dataset`.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MNIST-1D is generated by the `mnist1d` package; install it with "
            "`pip install mnist1d` (or `pip install jaxgrad[privacy]`)"
        ) from e
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 10:
        raise ValueError(f"`num_examples` must be an integer >= 10; got {num_examples!r}")
    args = get_dataset_args()
    args.num_samples, args.seed = num_examples, seed
    args.train_split = 1.0 - _check_fraction(test_fraction)
    raw = make_dataset(args)
    return from_arrays(
        raw["x"],
        np.asarray(raw["y"], np.int64),
        x_test=raw["x_test"],
        y_test=np.asarray(raw["y_test"], np.int64),
        task="classification",
        num_classes=10,
        standardize=standardize,
        dtype=dtype,
        name="mnist1d",
    )


# --------------------------------------------------------------------------------------
# Files: .npz and IDX.


def load_npz(path, **kwargs) -> Dataset:
    """A :class:`Dataset` from an ``.npz`` file: ``x, y`` or ``x_train, y_train, x_test, y_test``.

    Read with ``allow_pickle=False``: object arrays are refused. Keyword arguments go to
    :func:`from_arrays`.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"no such .npz file: {path}") from None
    except ValueError as e:
        raise ValueError(f"{path}: cannot read as .npz without pickle ({e})") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory; expected an .npz file") from None
    except Exception as e:  # zipfile/zlib/EOF errors of an empty, truncated or corrupt file
        raise ValueError(
            f"{path}: not a readable .npz file (empty, truncated or corrupt: "
            f"{type(e).__name__}: {e})"
        ) from None
    keys = sorted(arrays)
    if {"x_train", "y_train", "x_test", "y_test"} <= set(keys):
        return from_arrays(
            arrays["x_train"],
            arrays["y_train"],
            x_test=arrays["x_test"],
            y_test=arrays["y_test"],
            name=os.path.basename(path),
            **kwargs,
        )
    if {"x", "y"} <= set(keys):
        return from_arrays(arrays["x"], arrays["y"], name=os.path.basename(path), **kwargs)
    raise ValueError(
        f"{path}: expected arrays named x, y or x_train, y_train, x_test, y_test; got {keys}"
    )


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path) -> np.ndarray:
    """Reads one IDX file (the MNIST format), plain or gzip-compressed.

    The header is two zero bytes, a type code (``0x08`` ubyte, ``0x09`` byte, ``0x0B`` short,
    ``0x0C`` int, ``0x0D`` float, ``0x0E`` double), the number of dimensions, then each
    dimension as a big-endian int32; the data follows, big-endian.

    Raises:
      ValueError: a bad header, or a file whose size does not match its header (truncated),
        naming the file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (expected 2 zero bytes, a type code in "
            f"{[hex(c) for c in _IDX_DTYPES]} and a dimension count; got {raw[:4]!r})"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} of {dtype} ({expected} bytes in all); "
            f"the file holds {len(raw)} bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class NotMappableError(ValueError):
    """A file (a compressed ``.npz`` member, a gzip IDX file) that cannot be memory-mapped."""


def memmap(path, *, key: str | None = None) -> np.memmap:
    """One array of a file, memory-mapped read-only: rows are read from disk when indexed.

    Nothing is read but the header, so ``memmap(path)[indices]`` touches only those rows;
    :func:`jaxgrad.train.fit` with a ``mesh`` gathers every batch this way, each process only
    its own devices' rows. The values are the file's as stored (no split, no
    standardisation, no scaling of ``uint8`` pixels: do that in the model or the loss).

    Args:
      path: an ``.npy`` file; an ``.npz`` file whose member ``key`` is stored uncompressed
        (``np.savez``, not ``np.savez_compressed``); or a plain (not gzip) IDX file.
      key: the member of an ``.npz`` file (``"x_train"``, ...); only for ``.npz``.

    Returns:
      A read-only :class:`numpy.memmap` (IDX data in its big-endian dtype).

    Raises:
      ValueError: a compressed ``.npz`` member or gzip IDX file (neither can be read row by
        row: load it whole with :func:`load_npz` / :func:`read_idx`, or store it
        uncompressed), a missing member, an unknown format, a truncated file.

    Example::

      >>> import os, tempfile, numpy as np, jaxgrad
      >>> path = os.path.join(tempfile.mkdtemp(), "x.npz")
      >>> np.savez(path, x=np.arange(12.0).reshape(6, 2))
      >>> x = jaxgrad.data.memmap(path, key="x")
      >>> x.shape, x[[4, 1]].tolist()
      ((6, 2), [[8.0, 9.0], [2.0, 3.0]])
    """
    import zipfile

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`path` must be a file; got {path!r}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":  # a zip: an .npz archive
        if key is None:
            raise ValueError(f"{path} is an .npz archive: pass `key`, the member to map")
        with zipfile.ZipFile(path) as z:
            names = [n.removesuffix(".npy") for n in z.namelist()]
            if key not in names:
                raise ValueError(f"{path}: no member {key!r} (`key`); it holds {names}")
            info = z.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise NotMappableError(
                f"{path}: member {key!r} is compressed, so its rows cannot be read in place; "
                "save it with np.savez (not savez_compressed), or load it whole with load_npz"
            )
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: corrupt zip entry for member {key!r}")
            name_len, extra_len = (int.from_bytes(local[i : i + 2], "little") for i in (26, 28))
            start = info.header_offset + 30 + name_len + extra_len
            return _memmap_npy(path, f, start)
    if key is not None:
        raise ValueError(f"`key` is only for .npz archives; {path} is not one (got key={key!r})")
    if head[:4] == b"\x93NUM":
        with open(path, "rb") as f:
            return _memmap_npy(path, f, 0)
    if head[:2] == b"\x1f\x8b":
        raise NotMappableError(
            f"{path} is gzip-compressed, so its rows cannot be read in place; gunzip it, or "
            "load it whole with read_idx"
        )
    if len(head) == 4 and head[:2] == b"\x00\x00" and head[2] in _IDX_DTYPES:
        dtype, ndim = _IDX_DTYPES[head[2]], head[3]
        with open(path, "rb") as f:
            dims = f.read(4 + 4 * ndim)[4:]
        if len(dims) != 4 * ndim:
            raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions)")
        shape = tuple(int(d) for d in np.frombuffer(dims, ">u4"))
        expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
        if os.path.getsize(path) != expected:
            raise ValueError(
                f"{path}: IDX header says shape {shape} of {dtype} ({expected} bytes in all); "
                f"the file holds {os.path.getsize(path)} bytes (truncated or corrupt)"
            )
        return np.memmap(path, dtype, mode="r", offset=4 + 4 * ndim, shape=shape)
    raise ValueError(
        f"{path}: not an .npy, .npz or IDX file (it starts with {head!r}); expected one of them"
    )


def _memmap_npy(path: str, f, start: int) -> np.memmap:
    """The ``.npy`` array whose header starts at byte ``start`` of the open file ``f``."""
    f.seek(start)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read_header(f)
    except ValueError as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if dtype.hasobject:
        raise ValueError(f"{path}: object arrays cannot be memory-mapped (or read without pickle)")
    offset = f.tell()
    if offset + int(np.prod(shape)) * dtype.itemsize > os.path.getsize(path):
        raise ValueError(f"{path}: truncated array data (shape {shape} of {dtype})")
    order = "F" if fortran else "C"
    return np.memmap(path, dtype, mode="r", offset=offset, shape=shape, order=order)


_IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: str, stem: str) -> str | None:
    for candidate in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    return None


def _idx_files(directory: str) -> dict:
    """The IDX files of a data-set directory by role (``x_train``, ...; None if absent)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"`path` must be a directory of IDX files; got {directory!r}")
    found = {k: _find_idx(directory, stem) for k, stem in _IDX_NAMES.items()}
    missing = [_IDX_NAMES[k] for k in ("x_train", "y_train") if found[k] is None]
    if missing:
        raise FileNotFoundError(
            f"{directory}: missing {', '.join(missing)} (optionally .gz); an IDX data set "
            f"needs {_IDX_NAMES['x_train']} and {_IDX_NAMES['y_train']}"
        )
    return found


def _idx_images(p):
    a = read_idx(p)
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a


def _idx_labels(p):
    y = read_idx(p)
    if not np.issubdtype(y.dtype, np.integer):
        whole = np.isfinite(y).all() and (y == np.round(y)).all()
        if not whole:
            raise ValueError(
                f"{p}: class labels must be whole numbers; got an IDX file of {y.dtype} "
                f"holding non-integer values (e.g. {y[y != np.round(y)].flat[0]}), which "
                "would be truncated"
            )
    return y.astype(np.int64)


def load_idx(
    path, *, num_classes: int = 10, standardize: bool | str = "global", **kwargs
) -> Dataset:
    """MNIST-format IDX files from a directory the user gives; never downloads.

    The directory must hold ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``
    (each optionally ``.gz``); if ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``
    are there too they are the test split, otherwise a seeded split of the training files
    is. ``uint8`` pixels are scaled to [0, 1], then standardised with one mean and scale
    over all training pixels by default.

    Args:
      path: the directory.
      num_classes: labels must lie in ``[0, num_classes)``.
      **kwargs: passed to :func:`from_arrays` (``standardize``, ``seed``, ``dtype``, ...).
    """
    directory = os.fspath(path)
    found = _idx_files(directory)
    images, labels = _idx_images, _idx_labels
    x, y = images(found["x_train"]), labels(found["y_train"])
    test = {}
    if found["x_test"] is not None and found["y_test"] is not None:
        test = {"x_test": images(found["x_test"]), "y_test": labels(found["y_test"])}
    return from_arrays(
        x,
        y,
        task="classification",
        num_classes=num_classes,
        name=os.path.basename(os.path.normpath(directory)),
        standardize=standardize,
        **test,
        **kwargs,
    )


# --------------------------------------------------------------------------------------
# Row by row: a training split that no process loads whole.


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
    standardize: bool | str | None = None,
    dtype=np.float32,
    num_classes: int | None = None,
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
        defaults to what :func:`load` uses (``True`` for npz, ``"global"`` for idx).
      num_classes: for classification (default: inferred for npz, 10 for idx).

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
    if standardize is None:
        standardize = True if name == "npz" else "global"
    if standardize not in STANDARDIZE:
        raise ValueError(f"`standardize` must be one of {list(STANDARDIZE)}; got {standardize!r}")
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
        x = memmap(path, key=x_key)
        task = "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
    else:
        found = _idx_files(path)
        label = os.path.basename(os.path.normpath(path))
        x = memmap(found["x_train"])
        divide = 255.0 if x.dtype == np.uint8 else None
        y, task = _idx_labels(found["y_train"]), "classification"
        num_classes = 10 if num_classes is None else num_classes
        if found["x_test"] is not None and found["y_test"] is not None:
            x_test, y_test = _idx_images(found["x_test"]), _idx_labels(found["y_test"])
    n = len(x)
    if x.ndim == 0 or y.ndim == 0 or len(y) != n or n == 0:
        raise ValueError(
            f"{label}: `x` and `y` must share a non-empty leading example axis; got shapes "
            f"{x.shape} and {y.shape}"
        )
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
    check_finite(np.zeros((len(y_train), 0)), y_train, name=f"{label} (training targets)")
    check_finite(x_test, y_test, name=f"{label} (test split)")
    raw = StandardizedRows(x, rows=train_rows, divide=divide, dtype=np.float64)
    mean, std, bad = split_statistics(raw, pooled=standardize == "global")
    if bad:
        raise ValueError(
            f"{label}: the training inputs contain non-finite values (NaN or inf) in {bad} "
            "rows. Drop or impute them before training."
        )
    x_mean = x_scale = None
    if standardize:
        x_mean, x_scale = _scale_rule(mean, std)
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
    return Dataset(
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


# --------------------------------------------------------------------------------------
# By name.

BUNDLED: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "breast_cancer": load_breast_cancer,
    "diabetes": load_diabetes,
    "line": synthetic_line,
    "mnist1d": load_mnist1d,
}
FROM_PATH: dict[str, Callable[..., Dataset]] = {"npz": load_npz, "idx": load_idx}
NAMES = (*BUNDLED, *FROM_PATH)


def load(name: str, *, path=None, **kwargs) -> Dataset:
    """A data set by name: one of :data:`NAMES`.

    Args:
      name: ``"digits"``, ``"breast_cancer"``, ``"diabetes"``, ``"line"`` (bundled or
        synthetic), or ``"npz"`` / ``"idx"`` with a ``path``.
      path: the file (``npz``) or directory (``idx``).
      **kwargs: the loader's options (``seed``, ``test_fraction``, ``standardize``, ``dtype``).

    Example::

      >>> import jaxgrad
      >>> jaxgrad.data.load("digits", seed=0)
      Dataset('digits', classification, num_classes=10, train=1438, test=359, features=(64,))
    """
    if name in BUNDLED:
        if path is not None:
            raise ValueError(f"data set {name!r} is bundled and takes no `path`; got {path!r}")
        return BUNDLED[name](**kwargs)
    if name in FROM_PATH:
        if path is None:
            raise ValueError(f"data set {name!r} needs a `path`")
        return FROM_PATH[name](path, **kwargs)
    raise ValueError(f"unknown data set {name!r}; expected one of {list(NAMES)}")


# --------------------------------------------------------------------------------------
# Batching.


def num_batches(num_examples: int, batch_size: int) -> int:
    """``ceil(num_examples / batch_size)``: the last partial batch is kept."""
    return -(-num_examples // batch_size)


def epoch_indices(key: jax.Array, epoch, num_examples: int, batch_size: int):
    """The example indices and padding mask of every batch of one epoch.

    The order is ``permutation(fold_in(key, epoch))``: a pure function of ``key`` and
    ``epoch``, so a run resumed in the middle of an epoch replays the same batches. The
    last batch is padded to ``batch_size`` with a real example (finite for every loss),
    masked out.

    Args:
      key: a PRNG key (typed or raw).
      epoch: the epoch number.
      num_examples: the size of the data set.
      batch_size: examples per batch.

    Returns:
      ``(indices, mask)`` of shape ``(num_batches, batch_size)``, int32 and bool.
    """
    n_batches = num_batches(num_examples, batch_size)
    order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    total = n_batches * batch_size
    padded = jnp.concatenate([order, jnp.full((total - num_examples,), order[0])])
    mask = jnp.arange(total) < num_examples
    shape = (n_batches, batch_size)
    return padded.astype(jnp.int32).reshape(shape), mask.reshape(shape)


def take(data: Any, indices):
    """Rows ``indices`` of every leaf of ``data`` (works for numpy and jax arrays)."""
    return jax.tree_util.tree_map(lambda a: a[indices], data)
