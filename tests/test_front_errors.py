"""Clear errors for the first hour's mistakes: each names the argument (or flag), what it got
and what was expected — and never a traceback from deep inside JAX, zipfile or argparse."""

import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import private_key

import jaxgrad
from jaxgrad import privacy as dp
from jaxgrad import sharding
from jaxgrad.bench import __main__ as bench_main
from jaxgrad.fast import plan
from jaxgrad.seed import main as seed_main
from jaxgrad.train import CheckpointError, CheckpointWarning, fit
from jaxgrad.train.__main__ import build_parser
from jaxgrad.train.__main__ import main as train_main

jax.config.update("jax_enable_x64", True)

W, BATCH = jnp.ones(2), jnp.ones((4, 2))
WITH_SCALE = lambda w, ex, scale: (ex @ w) * scale
PLAIN = lambda w, ex: ex @ w


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("batch_grad", lambda loss, *a: jaxgrad.batch_grad(loss)(W, BATCH, None, *a)),
        (
            "dp_grad",
            lambda loss, *a: dp.dp_grad(
                loss, l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=4
            )(W, BATCH, None, private_key(0), *a),
        ),
        (
            "sampled_dp_grad",
            lambda loss, *a: dp.sampled_dp_grad(
                loss, l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, physical_batch_size=4
            )(W, BATCH, private_key(0), *a),
        ),
        ("plan", lambda loss, *a: plan(loss, W, BATCH[0], *a)),
    ],
)
def test_extra_loss_arguments_missing_or_surplus_are_named(name, call):
    with pytest.raises(TypeError, match=rf"`{name}`.*got 0 extra argument.*takes 1 extra"):
        call(WITH_SCALE)
    with pytest.raises(TypeError, match=rf"`{name}`.*got 1 extra argument.*takes 0 extra"):
        call(PLAIN, 2.0)
    call(WITH_SCALE, 2.0)  # the right number goes through


def test_sharding_arguments_are_named():
    for mesh in ("cpu", None):
        with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh.*got"):
            sharding.replicate(W, mesh=mesh)
    with pytest.raises(TypeError, match=r"`coordinator` must be a string 'HOST:PORT'.*1234"):
        sharding.initialize(1234)


def test_a_second_initialize_says_so():
    """In a fresh process (initialize must come before any device use): the second call is
    named as such, not JAX's "must be called before any JAX calls"."""
    code = (
        "from jaxgrad import sharding\n"
        "sharding.initialize('localhost:18476', num_processes=1, process_id=0)\n"
        "try:\n"
        "    sharding.initialize()\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    ).stdout
    assert "ERROR `initialize` was already called in this process" in out


def test_memmap_of_a_truncated_npz_or_none(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.arange(600.0).reshape(300, 2))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"`path` .*cut.npz.* truncated or corrupt"):
        jaxgrad.data.memmap(cut, key="x")
    with pytest.raises(TypeError, match=r"`path` must be a file path.*got NoneType None"):
        jaxgrad.data.memmap(None)


def test_ragged_lists_in_from_arrays():
    with pytest.raises(ValueError, match=r"`x` must be one rectangular array.*\[2, 1\]"):
        jaxgrad.data.from_arrays([[1.0, 2.0], [3.0]], [0, 1])
    with pytest.raises(ValueError, match=r"`y` must be one rectangular array"):
        jaxgrad.data.from_arrays(np.ones((2, 2)), [[0], [1, 2]])


def test_float_labels_that_are_whole_numbers():
    x = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 3
    with pytest.warns(UserWarning, match=r"whole numbers.*task='classification'"):
        ds = jaxgrad.data.from_arrays(x, y.astype(float))
    assert ds.task == "regression"
    # The warning counts the labels' values and never shows one (they are private rows).
    with pytest.warns(UserWarning, match=r"all whole numbers \(3 distinct values\)") as w:
        jaxgrad.data.from_arrays(x, (y * 1000 + 4711).astype(float))
    assert not any(v in str(w[0].message) for v in ("4711", "5711", "6711"))
    ds = jaxgrad.data.from_arrays(x, y.astype(float), task="classification")
    assert ds.task == "classification" and ds.num_classes == 3
    assert sorted(np.unique(np.concatenate([ds.y_train, ds.y_test]))) == [0, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxgrad.data.from_arrays(x, y.astype(float), task="regression")
    with pytest.raises(ValueError, match=r"not all whole numbers \(\d+ of \d+ have a fr") as e:
        jaxgrad.data.from_arrays(x, y + 0.375, task="classification")
    assert "375" not in str(e.value)


@pytest.mark.parametrize("main", [seed_main, bench_main.main])
def test_json_to_a_directory_names_it(main, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--json", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--json {str(tmp_path)!r} is a directory; expected a file name" in err


def test_train_help_states_each_default_once():
    text = build_parser().format_help()
    options = text.split("\n  -")
    assert not [o for o in options if o.count("default") > 1]
    assert "(default: False)" not in text


def _npz(tmp_path, name, y):
    x = np.random.default_rng(0).normal(size=(len(y), 4))
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x, y=y)
    return ["--data", "npz", "--data-path", str(path), "--batch-size", "8", "--epochs", "1"]


def test_train_cli_label_shapes_task_and_lr(tmp_path, capsys):
    y = np.arange(40) % 3
    cases = [
        (np.eye(3, dtype=np.int64)[y], r"got shape \(40, 3\): they look one-hot.*argmax"),
        (y[:, None], r"got shape \(40, 1\): store y\[:, 0\]"),
    ]
    for labels, message in cases:
        with pytest.raises(SystemExit):
            train_main([*_npz(tmp_path, "bad", labels), "--quiet"])
        assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        train_main(["--lr", "1e39", "--quiet"])
    assert "--lr 1e+39 is outside float32's range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--task", "regression", "--quiet"])
    assert "--task is for --data npz" in capsys.readouterr().err

    out = tmp_path / "cls.json"
    args = _npz(tmp_path, "floats", y.astype(float))
    assert train_main([*args, "--task", "classification", "--json", str(out), "--quiet"]) == 0
    summary = json.loads(out.read_text())
    assert "test_accuracy" in summary["history"][-1]


def test_resume_with_another_optimizer_or_learning_rate(tmp_path):
    x = jax.random.normal(jax.random.key(0), (16, 3))
    data, loss = (x, x @ jnp.array([1.0, 2.0, 3.0])), lambda w, ex: (ex[0] @ w - ex[1]) ** 2
    kw = dict(epochs=1, batch_size=4, key=jax.random.key(1), checkpoint_dir=tmp_path, quiet=True)
    fit(loss, jnp.zeros(3), data, optimizer=optax.adam(0.1), **kw)
    with pytest.raises(CheckpointError, match=r"another `optimizer`.*ScaleByAdamState.*Empty"):
        fit(loss, jnp.zeros(3), data, optimizer=optax.sgd(0.1), **kw)
    with pytest.warns(CheckpointWarning, match="hyperparameters seem to differ"):
        fit(loss, jnp.zeros(3), data, optimizer=optax.adam(0.2), **kw)
    with warnings.catch_warnings():  # the same optimizer resumes quietly
        warnings.simplefilter("error")
        fit(loss, jnp.zeros(3), data, optimizer=optax.adam(0.1), **kw)
