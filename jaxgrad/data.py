"""Data sets that ship offline, loaders for the user's own data, and epoch batching with masks.

Nothing here downloads. The bundled sets are scikit-learn's (``load_digits``,
``load_breast_cancer``, ``load_diabetes``, read from the installed package); the rest comes
from the user: arrays, ``.npz`` files, or MNIST-format IDX files (plain or gzip) at a path.
:func:`memmap` opens one array of a file (``.npy``, an uncompressed ``.npz`` member, a plain
IDX file) memory-mapped, without reading it: what data-parallel training on several hosts
uses so that each process reads only the rows it feeds (see :func:`jaxgrad.train.fit`).

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
    "epoch_indices",
    "from_arrays",
    "load",
    "load_idx",
    "load_mnist1d",
    "load_npz",
    "memmap",
    "read_idx",
    "synthetic_line",
    "train_test_split",
]

TASKS = ("classification", "regression")
STANDARDIZE = (True, False, "features", "global")


class Dataset(NamedTuple):
    """A train/test split ready for training.

    Attributes:
      name: where it came from (``"digits"``, a file name, ...).
      x_train, y_train, x_test, y_test: numpy arrays with a leading example axis.
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
    n_test = min(max(1, round(n * test_fraction)), n - 1) if n > 1 else 0
    if n_test < 1:
        raise ValueError(
            f"`x` holds {n} example(s); a train/test split needs at least 2 (one for each "
            "side). Pass more data, or train on it directly with jaxgrad.train.fit"
        )
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _fit_scale(a: np.ndarray, axis=0):
    mean = a.mean(axis=axis)
    scale = a.std(axis=axis)
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

    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    x_mean = x_scale = None
    if standardize:
        x_mean, x_scale = _fit_scale(x_train, axis=None if standardize == "global" else 0)
        x_train, x_test = (x_train - x_mean) / x_scale, (x_test - x_mean) / x_scale
    return Dataset(
        name,
        x_train.astype(dtype),
        y_train,
        x_test.astype(dtype),
        y_test,
        task,
        num_classes,
        x_mean,
        x_scale,
        y_mean,
        y_scale,
    )


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
            raise ValueError(
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
        raise ValueError(
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
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"`path` must be a directory of IDX files; got {directory!r}")
    found = {k: _find_idx(directory, stem) for k, stem in _IDX_NAMES.items()}
    missing = [_IDX_NAMES[k] for k in ("x_train", "y_train") if found[k] is None]
    if missing:
        raise FileNotFoundError(
            f"{directory}: missing {', '.join(missing)} (optionally .gz); an IDX data set "
            f"needs {_IDX_NAMES['x_train']} and {_IDX_NAMES['y_train']}"
        )

    def images(p):
        a = read_idx(p)
        return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a

    def labels(p):
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
