"""Checkpoints: atomic, checksummed, restored bit for bit; resume equals an uninterrupted run."""

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import interrupt_then_resume, run_interrupted

import jaxgrad
from jaxgrad.train import CheckpointError, CheckpointWarning, checkpoint, fit, init_state


def _tree():
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.array([1e-300, -0.0])}
    state = init_state(params, optax.adam(0.1))
    return {"state": state, "key": jax.random.key(42), "raw_key": jax.random.PRNGKey(1)}


def _assert_bitwise(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_roundtrip_is_bitwise(tmp_path):
    tree = _tree()
    path = checkpoint.save(tmp_path, tree, step=7, metadata={"epoch": 1, "note": "x"})
    assert os.path.basename(path) == "ckpt-0000000007.npz"
    restored, meta = checkpoint.load(path, _tree())
    _assert_bitwise(restored, tree)
    assert meta == {"epoch": 1, "note": "x"}
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary left


def test_keeps_the_last_k(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, _tree(), step=step, keep=2)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt-0000000004.npz",
        "ckpt-0000000005.npz",
    ]


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupt_file_is_named_and_previous_used(tmp_path, damage):
    good = checkpoint.save(tmp_path, _tree(), step=1, metadata={"which": "good"})
    bad = checkpoint.save(tmp_path, _tree(), step=2, metadata={"which": "bad"})
    raw = open(bad, "rb").read()
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":  # a flipped bit inside the leaves' data
        i = raw.index(np.asarray(_tree()["state"].params["w"]).tobytes()) + 3
        raw = raw[:i] + bytes([raw[i] ^ 0x10]) + raw[i + 1 :]
    else:
        raw = b""
    open(bad, "wb").write(raw)
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} "):
        checkpoint.load(bad, _tree())
    with pytest.warns(CheckpointWarning, match=f"{bad}.*falling back"):
        tree, meta, path = checkpoint.restore_latest(tmp_path, _tree())
    assert path == good and meta == {"which": "good"}
    _assert_bitwise(tree, _tree())


def test_checksum_catches_what_zip_does_not(tmp_path, monkeypatch):
    path = checkpoint.save(tmp_path, _tree(), step=1)
    real = checkpoint._digest
    monkeypatch.setattr(checkpoint, "_digest", lambda arrays, header: real(arrays[:-1], header))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} fails its SHA-256 checksum"):
        checkpoint.load(path, _tree())


def test_nothing_usable(tmp_path):
    assert checkpoint.restore_latest(tmp_path / "none", _tree()) is None
    path = checkpoint.save(tmp_path, _tree(), step=1)
    open(path, "wb").write(b"junk")
    with (
        pytest.warns(CheckpointWarning),
        pytest.raises(CheckpointError, match="no usable checkpoint"),
    ):
        checkpoint.restore_latest(tmp_path, _tree())


def test_template_mismatch(tmp_path):
    path = checkpoint.save(tmp_path, _tree(), step=1)
    other = _tree()
    other["state"] = other["state"]._replace(params={"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
    with pytest.raises(CheckpointError, match=r"leaf .*'w'.* has shape \(2, 3\).*expects \(3, 2\)"):
        checkpoint.load(path, other)
    with pytest.raises(CheckpointError, match="holds 10 arrays; the template has 1 leaves"):
        checkpoint.load(path, jnp.zeros(3))


def test_crash_mid_write_keeps_the_latest(tmp_path, monkeypatch):
    good = checkpoint.save(tmp_path, _tree(), step=1)

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, _tree(), step=2)
    assert checkpoint.list_checkpoints(tmp_path) == [good]
    assert os.listdir(tmp_path) == [os.path.basename(good)]
    monkeypatch.undo()
    _, _, path = checkpoint.restore_latest(tmp_path, _tree())
    assert path == good


# ----------------------------------------------------------------------------------------
# Resume.


def _problem():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(27, 4)), rng.integers(0, 3, 27)
    model = jaxgrad.models.mlp([4, 6, 3], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    return model.init(jax.random.key(0)), loss_fn, (x, y)


def _run(checkpoint_dir, *, scan=True, epochs=2, scaled=1.0, **kw):
    params, loss_fn, data = _problem()
    return fit(
        loss_fn if scaled == 1.0 else lambda p, ex: scaled * loss_fn(p, ex),
        params,
        data,
        optimizer=optax.adam(0.05),
        epochs=epochs,
        batch_size=4,
        key=jax.random.key(3),
        scan=scan,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=3,
        quiet=True,
        **kw,
    )


@pytest.mark.parametrize("scan", [True, False])
def test_resume_mid_epoch_is_bitwise_identical(tmp_path, scan):
    full = _run(tmp_path / "full", scan=scan)
    # 27 examples in batches of 4: 7 steps an epoch, in chunks of 3; the 2nd checkpoint is
    # at step 6, in the middle of epoch 1.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # the same run: nothing to warn about
        saved, resumed = interrupt_then_resume(
            functools.partial(_run, scan=scan), tmp_path / "cut", at_save=2
        )
    assert saved[-1].endswith("ckpt-0000000006.npz")
    _assert_bitwise(resumed.state, full.state)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(resumed.history) == strip(full.history)
    # A finished run resumes to the same end without taking a step.
    again = _run(tmp_path / "cut", scan=scan)
    _assert_bitwise(again.state, full.state)


def test_resume_skips_a_corrupt_latest(tmp_path):
    full = _run(tmp_path / "full")
    *_, latest = run_interrupted(_run, tmp_path / "cut", at_save=4)
    open(latest, "r+b").truncate(100)
    with pytest.warns(CheckpointWarning, match=latest):
        resumed = _run(tmp_path / "cut")
    _assert_bitwise(resumed.state, full.state)


def test_resume_with_another_configuration_is_refused(tmp_path):
    _run(tmp_path, epochs=1)
    params, loss_fn, data = _problem()
    with pytest.raises(
        ValueError, match=r"written by another run: the run changed \(.*batch_size: 4 -> 5"
    ):
        fit(
            loss_fn,
            params,
            data,
            optimizer=optax.adam(0.05),
            epochs=2,
            batch_size=5,
            key=jax.random.key(3),
            checkpoint_dir=tmp_path,
            quiet=True,
        )
    # Another seed is another run, too.
    with pytest.raises(
        ValueError,
        match=r"written by another run: the run changed \(.*key: '[0-9a-f]+' -> '[0-9a-f]+'",
    ):
        _fit_into(loss_fn, params, data, tmp_path, batch_size=4, key=jax.random.key(4))
    # resume=False refuses a directory holding another run's checkpoints (a later resume
    # would pick up the wrong run), and starts afresh in an empty one.
    with pytest.raises(ValueError, match=r"already holds checkpoints of another run"):
        _fit_into(loss_fn, params, data, tmp_path, batch_size=5, resume=False)
    r = _fit_into(loss_fn, params, data, tmp_path / "fresh", batch_size=5, resume=False)
    assert int(r.state.step) == 6


def test_resume_with_another_loss_warns_at_the_callers_line(tmp_path):
    _run(tmp_path, epochs=1)
    with pytest.warns(CheckpointWarning, match="`loss_fn` seems to differ") as caught:
        _run(tmp_path, epochs=2, scaled=2.0)
    assert caught[0].filename == __file__


def test_resume_on_other_data_warns_at_the_callers_line(tmp_path, monkeypatch):
    """Other targets of the same shape: a plain run resumes, warned at fit's caller (a
    private one is refused: tests/test_privacy_train.py). Checkpoints that did not record
    the data's hash (older ones) are not compared."""
    params, loss_fn, (x, y) = _problem()
    kw = dict(optimizer=optax.adam(0.05), batch_size=4, key=jax.random.key(3), quiet=True)
    kw.update(checkpoint_dir=tmp_path, checkpoint_every=3)
    fit(loss_fn, params, (x, y), epochs=1, **kw)
    newest = checkpoint.list_checkpoints(tmp_path)[-1]
    assert len(checkpoint.read_metadata(newest)["config"]["data"]) == 16
    other = (x, (y + 1) % 3)
    with pytest.warns(CheckpointWarning) as caught:
        resumed = fit(loss_fn, params, other, epochs=2, **kw)
    [warning] = caught
    assert "the training data differs from the run that wrote it" in str(warning.message)
    assert newest in str(warning.message)
    assert warning.filename == __file__
    assert int(resumed.state.step) == 14

    # An older checkpoint, with no data hash: resumed on other data without a word.
    import jaxgrad.train.loop as loop

    real = loop.run_config
    monkeypatch.setattr(loop, "run_config", lambda *a, **k: {**real(*a, **k), "data": None})
    fit(loss_fn, params, (x, y), epochs=1, **{**kw, "checkpoint_dir": tmp_path / "old"})
    monkeypatch.setattr(loop, "run_config", real)
    meta = checkpoint.read_metadata(checkpoint.list_checkpoints(tmp_path / "old")[-1])
    assert meta["config"]["data"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        fit(loss_fn, params, other, epochs=2, **{**kw, "checkpoint_dir": tmp_path / "old"})


def test_a_keyed_loss_is_fingerprinted_too(tmp_path):
    params, loss_fn, data = _problem()

    def noisy_loss(scale):  # a loss that takes a key (dropout-like)
        return lambda p, ex, key: loss_fn(p, ex) * (1 + scale * jax.random.uniform(key))

    kw = dict(optimizer=optax.adam(0.05), batch_size=4, key=jax.random.key(3), quiet=True)
    kw.update(loss_key=jax.random.key(9), checkpoint_dir=tmp_path, checkpoint_every=3)
    fit(noisy_loss(0.1), params, data, epochs=1, **kw)
    meta = checkpoint.read_metadata(checkpoint.list_checkpoints(tmp_path)[-1])
    assert meta["config"]["loss"].startswith(jax.__version__ + ":")
    with pytest.warns(CheckpointWarning, match="`loss_fn` seems to differ"):
        fit(noisy_loss(0.2), params, data, epochs=2, **kw)


def _fit_into(loss_fn, params, data, directory, *, batch_size, key=None, resume=True):
    return fit(
        loss_fn,
        params,
        data,
        optimizer=optax.adam(0.05),
        epochs=1,
        batch_size=batch_size,
        key=jax.random.key(3) if key is None else key,
        checkpoint_dir=directory,
        resume=resume,
        quiet=True,
    )


# --- issue 11 ------------------------------------------------------------------------------


def test_every_bit_flip_falls_back_or_names_the_file(tmp_path):
    tree = _tree()
    older = checkpoint.save(tmp_path, tree, step=1)
    newer = checkpoint.save(tmp_path, tree, step=2)
    raw = open(newer, "rb").read()
    rng = np.random.default_rng(0)
    positions = np.unique(np.concatenate([np.arange(0, 64), rng.integers(0, len(raw), 160)]))
    for pos in positions:
        for bit in (0, 7):
            flipped = bytearray(raw)
            flipped[pos] ^= 1 << bit
            with open(newer, "wb") as f:
                f.write(bytes(flipped))
            # Either the flip is harmless (zip metadata), or the newer file is refused with a
            # CheckpointWarning and the older one restored: never another exception.
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                restored, _, path = checkpoint.restore_latest(tmp_path, tree)
            assert path in (older, newer)
            _assert_bitwise(restored, tree)


def test_prepare_directory_fails_clearly_and_cleans_stale_tmp_files(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(CheckpointError, match="is a file; expected a directory"):
        checkpoint.prepare_directory(a_file)
    d = tmp_path / "ckpts"
    d.mkdir()
    (d / "ckpt-0000000009.npz").mkdir()
    with pytest.raises(CheckpointError, match=r"ckpt-0000000009\.npz is not a regular file"):
        checkpoint.prepare_directory(d)
    with pytest.raises(CheckpointError, match="not a regular file"):  # fit fails before training
        _run(d)
    (d / "ckpt-0000000009.npz").rmdir()
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = d / f".ckpt-0000000003.npz.tmp-{dead}"
    mine = d / f".ckpt-0000000004.npz.tmp-{os.getpid()}"
    stale.write_bytes(b"partial")
    mine.write_bytes(b"in progress")
    checkpoint.prepare_directory(d)
    assert not stale.exists() and mine.exists()
    if os.geteuid() != 0:  # root writes anywhere
        d.chmod(0o500)
        try:
            with pytest.raises(CheckpointError, match="is not writable"):
                checkpoint.prepare_directory(d)
        finally:
            d.chmod(0o700)


def test_directory_writability_is_tried_not_read_off_permission_bits(tmp_path):
    """fit's checkpoint directory under a regular file its owner may write and execute, or in
    /proc (whose bits root passes), fails before training, not at the first save."""
    a_file = tmp_path / "afile"
    a_file.write_text("")
    a_file.chmod(0o755)
    assert os.access(a_file, os.W_OK | os.X_OK)  # the bits say yes
    with pytest.raises(CheckpointError, match=r"afile/sub' is not writable: .*Not a directory"):
        _run(a_file / "sub", epochs=1)
    with pytest.raises(CheckpointError, match=r"'/proc/jaxgrad-x' is not writable: \S"):
        checkpoint.prepare_directory("/proc/jaxgrad-x")
    new = tmp_path / "new" / "ckpt"
    checkpoint.prepare_directory(new)  # made, written to, and left empty
    assert new.is_dir() and os.listdir(new) == []


def test_non_finite_parameters_with_a_finite_loss_are_never_checkpointed(tmp_path):
    params, loss_fn, data = _problem()
    # The third update multiplies by NaN: its loss (computed before the update) is finite.
    opt = optax.chain(
        optax.sgd(0.1), optax.scale_by_schedule(lambda n: jnp.where(n >= 2, jnp.nan, 1.0))
    )
    with pytest.raises(jaxgrad.train.NonFiniteLossError, match="at step 3") as info:
        fit(
            loss_fn,
            params,
            data,
            optimizer=opt,
            epochs=2,
            batch_size=4,
            key=jax.random.key(3),
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
            quiet=True,
        )
    assert info.value.checkpoint.endswith("ckpt-0000000002.npz")
    for path in checkpoint.list_checkpoints(tmp_path):
        arrays, _ = checkpoint.read(path)
        assert all(np.isfinite(a).all() for a in arrays if np.issubdtype(a.dtype, np.floating))
    state = info.value.state
    assert int(state.step) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))
