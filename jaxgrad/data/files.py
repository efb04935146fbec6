"""The user's own files: ``.npz`` and MNIST-format IDX, read whole or memory-mapped."""

from __future__ import annotations

import gzip
import os

import numpy as np

from jaxgrad.data.arrays import Dataset, from_arrays


def load_npz(path, **kwargs) -> Dataset:
    """A :class:`Dataset` from an ``.npz`` file: ``x, y`` or ``x_train, y_train, x_test, y_test``.

    Read with ``allow_pickle=False``: object arrays are refused. Keyword arguments go to
    :func:`from_arrays`.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: a directory; a file that is not an .npz (zip) archive, such as a ``.npy``
        array or a text file (said so, rather than numpy's "pickled data"); an archive that is
        truncated or corrupt, holds object arrays, or lacks ``x, y``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; expected an .npz file")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such .npz file: {path}") from None
    if head[:2] != b"PK":  # not a zip archive; numpy would call a text file "pickled" data
        raise ValueError(_not_npz(path, head))
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if "allow_pickle" not in str(e):  # a member numpy cannot read: corrupt
            raise ValueError(f"{path}: not a readable .npz file (corrupt: {e})") from None
        # Only an archive member that is an object array gets here.
        raise ValueError(
            f"{path}: holds object (pickled) arrays, which are not read (they can run code); "
            "store x and y as numeric arrays"
        ) from None
    except Exception as e:  # zipfile/zlib/EOF errors of a truncated or corrupt archive
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


def _not_npz(path: str, head: bytes) -> str:
    """Why the file ``path``, starting with the bytes ``head``, is not an .npz archive."""
    expected = "expected an .npz archive of arrays x and y (np.savez(path, x=x, y=y))"
    if not head:
        return f"{path}: the file is empty; {expected}"
    if head.startswith(b"\x93NUMPY"):
        return f"{path}: a .npy file (one array), not an .npz archive; {expected}"
    return f"{path}: not an .npz archive (it starts with {head!r}: a text or CSV file?); {expected}"


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
    its own devices' rows. The file's size and modification time are recorded: a file
    changed on disk since is an error when rows are gathered (:func:`check_unchanged`), not
    rows read as zeros. The values are the file's as stored (no split, no
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

    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(
            f"`path` must be a file path (str or os.PathLike) of an .npy, .npz or IDX file; got "
            f"{type(path).__name__} {path!r}"[:300]
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`path` must be a file; got {path!r}")
    opened = os.stat(path)  # before reading: a change from here on is caught when rows are read
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":  # a zip: an .npz archive
        if key is None:
            raise ValueError(f"{path} is an .npz archive: pass `key`, the member to map")
        try:
            with zipfile.ZipFile(path) as z:
                names = [n.removesuffix(".npy") for n in z.namelist()]
                if key not in names:
                    raise ValueError(f"{path}: no member {key!r} (`key`); it holds {names}")
                info = z.getinfo(key + ".npy")
        except zipfile.BadZipFile as e:
            raise ValueError(
                f"`path` {path!r} starts as an .npz (zip) archive but cannot be read as one: "
                f"truncated or corrupt ({e}; {os.path.getsize(path)} bytes). Write it again, "
                "e.g. with np.savez"
            ) from e
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
            return _stamped(_memmap_npy(path, f, start), path, opened)
    if key is not None:
        raise ValueError(f"`key` is only for .npz archives; {path} is not one (got key={key!r})")
    if head[:4] == b"\x93NUM":
        with open(path, "rb") as f:
            return _stamped(_memmap_npy(path, f, 0), path, opened)
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
        mapped = np.memmap(path, dtype, mode="r", offset=4 + 4 * ndim, shape=shape)
        return _stamped(mapped, path, opened)
    raise ValueError(
        f"{path}: not an .npy, .npz or IDX file (it starts with {head!r}); expected one of them"
    )


def _stamped(mapped: np.memmap, path: str, opened: os.stat_result) -> np.memmap:
    """``mapped`` with its file's size and modification time when it was opened, which
    :func:`check_unchanged` compares with the file's now."""
    mapped._jaxgrad_opened = (path, opened.st_size, opened.st_mtime_ns)
    return mapped


def check_unchanged(data) -> None:
    """Fails if ``data`` reads a file, opened by :func:`memmap`, that changed on disk since.

    A file rewritten or truncated under a memory map is read as its new bytes, or as zeros
    past its new end, without any error; this compares the file's size and modification time
    with those recorded by :func:`memmap` (one ``os.stat``). ``data`` may be the memmap, a
    view of it, or anything whose ``base`` is (a :class:`StandardizedRows`); anything else
    passes. A file removed since is no error: the map still holds its bytes. Cheap, not a
    checksum: a rewrite of the same size within the file system's timestamp resolution (a
    few milliseconds) goes unnoticed. :func:`jaxgrad.sharding.take_rows` (``fit`` on a mesh)
    calls it on every leaf before it gathers a batch.

    Args:
      data: an array-like.

    Raises:
      ValueError: the file's size or modification time changed, naming the path.
    """
    for _ in range(8):  # views of views: a short chain of ``base``
        opened = getattr(data, "_jaxgrad_opened", None)
        if opened is not None:
            break
        data = getattr(data, "base", None)
        if data is None:
            return
    else:
        return
    path, size, mtime_ns = opened
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return
    if (now.st_size, now.st_mtime_ns) != (size, mtime_ns):
        raise ValueError(
            f"{path} changed on disk since jaxgrad.data.memmap opened it ({size} bytes then, "
            f"{now.st_size} now; modified since): its rows would be read as the new bytes, or "
            "as zeros past a shorter file's end. Leave the file unchanged while training, or "
            "open it again and start over"
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
                f"holding {int(np.sum(y != np.round(y)))} non-integer (or non-finite) values "
                f"of {y.size}, which would be truncated"
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
