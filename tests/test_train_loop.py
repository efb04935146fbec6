"""jaxgrad.train.fit: epochs, masks, compile-once, equivalence, faults, metrics and progress."""

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgrad
from jaxgrad import strategies
from jaxgrad.train import NonFiniteLossError, evaluator, fit


def _problem(n=27, d=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.integers(0, classes, n)
    model = jaxgrad.models.mlp([d, 6, classes], activation="tanh", dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=classes
    )
    return model, loss_fn, (x, y)


def _fit(loss_fn, params, data, **kw):
    kw.setdefault("optimizer", optax.sgd(0.2))
    kw.setdefault("epochs", 3)
    kw.setdefault("batch_size", 8)
    kw.setdefault("key", jax.random.key(5))
    kw.setdefault("quiet", True)
    return fit(loss_fn, params, data, **kw)


@pytest.mark.parametrize("scan", [True, False])
def test_strategies_give_the_same_trajectory(scan):
    model, loss_fn, data = _problem()
    params = model.init(jax.random.key(0))
    small = {"chunk_size": 3, "num_microbatches": 3}  # uneven splits of batches of 8
    results = {
        name: _fit(
            loss_fn,
            params,
            data,
            strategy=strategies.get(name).factory(
                **{k: v for k, v in small.items() if k in strategies.get(name).options}
            ),
            scan=scan,
        )
        for name in strategies.names(exact=True, per_example=False)  # every step strategy
    }
    batch = results["batch_grad"]
    assert int(batch.state.step) == 3 * 4  # 27 examples, batches of 8: 4 per epoch
    for r in results.values():
        chex.assert_trees_all_close(r.params, batch.params, rtol=1e-10, atol=1e-12)
        losses = [h["loss"] for h in r.history]
        np.testing.assert_allclose(losses, [h["loss"] for h in batch.history], rtol=1e-10)


def test_scan_and_python_loop_agree():
    model, loss_fn, data = _problem()
    params = model.init(jax.random.key(0))
    a = _fit(loss_fn, params, data, scan=True, optimizer=optax.adam(0.05))
    b = _fit(loss_fn, params, data, scan=False, optimizer=optax.adam(0.05))
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-10, atol=1e-12)


def test_every_example_is_used_once_per_epoch():
    # With a zero learning rate the epoch's running loss is the mean over the batches seen:
    # it equals the full-data mean only if no example is dropped or repeated.
    model, loss_fn, data = _problem(n=29)
    params = model.init(jax.random.key(0))
    full = np.mean([float(loss_fn(params, (data[0][i], data[1][i]))) for i in range(29)])
    for scan in (True, False):
        r = _fit(loss_fn, params, data, optimizer=optax.sgd(0.0), batch_size=8, scan=scan)
        for h in r.history:
            np.testing.assert_allclose(h["loss"], full, rtol=1e-12)


def test_epoch_order_changes_the_result():
    model, loss_fn, data = _problem()
    params = model.init(jax.random.key(0))
    a = _fit(loss_fn, params, data, key=jax.random.key(1), epochs=1)
    b = _fit(loss_fn, params, data, key=jax.random.key(2), epochs=1)
    assert not np.allclose(a.params[0]["w"], b.params[0]["w"])


@pytest.mark.parametrize("scan", [True, False])
def test_fit_compiles_once(scan):
    model, loss_fn, data = _problem()
    counts = {}

    def run(epochs):
        traces = []

        def counted(params, example):
            traces.append(1)
            return loss_fn(params, example)

        counted.validate = loss_fn.validate
        _fit(counted, model.init(jax.random.key(0)), data, epochs=epochs, scan=scan)
        counts[epochs] = len(traces)

    run(1)
    run(4)
    assert counts[1] > 0
    assert counts[4] == counts[1]  # later epochs (with a partial last batch) reuse the compile


def test_history_metrics_and_jsonl(tmp_path):
    model, loss_fn, data = _problem()
    evaluate = evaluator(model.apply, loss_fn, {"train": data}, task="classification")
    path = tmp_path / "metrics.jsonl"
    r = _fit(loss_fn, model.init(jax.random.key(0)), data, evaluate=evaluate, metrics_path=path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len(r.history) == 3
    assert [h["epoch"] for h in lines] == [1, 2, 3]
    assert {"epoch", "step", "loss", "train_loss", "train_accuracy", "seconds"} <= set(lines[-1])
    # The evaluator's loss and accuracy, checked by hand.
    x, y = data
    logits = np.stack([np.asarray(model.apply(r.params, xi)) for xi in x])
    assert lines[-1]["train_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))
    ce = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(len(y)), y])
    assert lines[-1]["train_loss"] == pytest.approx(ce, rel=1e-10)


def test_unwritable_metrics_path_is_refused_before_training(tmp_path):
    """A directory, or a path under a file, was found only by open() after the first epoch
    (a raw IsADirectoryError); now fit refuses it, naming `metrics_path`, before any step."""
    model, loss_fn, data = _problem()
    (tmp_path / "afile").write_text("x")
    evaluated = []
    for bad, message in (
        (tmp_path, r"`metrics_path` '[^']*' is a directory; expected a file name"),
        (tmp_path / "afile" / "m.jsonl", r"'[^']*afile' is a file, not a directory"),
        (tmp_path / "no" / "m.jsonl", r"the directory '[^']*no' does not exist"),
    ):
        with pytest.raises(ValueError, match=message):
            _fit(
                loss_fn,
                model.init(jax.random.key(0)),
                data,
                metrics_path=bad,
                evaluate=lambda p: evaluated.append(1) or {},
            )
    with pytest.raises(TypeError, match="`metrics_path` must be a file path"):
        _fit(loss_fn, model.init(jax.random.key(0)), data, metrics_path=3)
    assert not evaluated and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_regression_r2():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=40)
    model = jaxgrad.models.linear_regression(3, dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.squared_error)
    evaluate = evaluator(model.apply, loss_fn, {"train": (x, y)}, task="regression")
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.zeros(())}
    pred = x @ np.asarray(params["w"])
    expected = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    assert evaluate(params)["train_r2"] == pytest.approx(expected, rel=1e-12)


def test_bad_input():
    model, loss_fn, (x, y) = _problem()
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"`batch_size` \(28\) is larger than the training set"):
        _fit(loss_fn, params, (x, y), batch_size=28)
    bad = y.copy()
    bad[4] = 7
    with pytest.raises(
        ValueError, match=r"labels .* must lie in \[0, 3\).*0 below, 1 above.*row 4\)"
    ):
        _fit(loss_fn, params, (x, bad))
    with pytest.raises(ValueError, match="`epochs` must be a positive integer; got 0"):
        _fit(loss_fn, params, (x, y), epochs=0)
    with pytest.raises(ValueError, match="`progress` must be one of"):
        _fit(loss_fn, params, (x, y), progress="fancy", quiet=False)


@pytest.mark.parametrize("scan", [True, False])
def test_non_finite_loss_stops_with_the_step(tmp_path, scan):
    # Linear regression with a huge learning rate: the loss grows ~1e40 per step, overflows.
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(27, 3)), rng.normal(size=27))
    model = jaxgrad.models.linear_regression(3, dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.squared_error)
    params = model.init(jax.random.key(0))
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at step (\d+) \(epoch") as info:
        _fit(
            loss_fn,
            params,
            data,
            optimizer=optax.sgd(1e20),
            epochs=10,
            scan=scan,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
        )
    err = info.value
    assert 3 <= err.step < 40
    assert f"at step {err.step} (" in str(err)
    # The parameters handed back and the last checkpoint are from before the bad step.
    assert int(err.state.step) == err.step - 1
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(err.state.params))
    assert err.checkpoint is not None and f"the last good checkpoint is {err.checkpoint}" in str(
        err
    )
    from jaxgrad.train import checkpoint

    tree, meta = checkpoint.load(err.checkpoint, {"state": err.state, "key": jax.random.key(5)})
    assert meta["step"] < err.step
    assert all(
        np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree["state"].params)
    )


def test_progress_output(capsys):
    model, loss_fn, data = _problem()
    params = model.init(jax.random.key(0))
    _fit(loss_fn, params, data, quiet=True, progress="plain")
    assert capsys.readouterr().err == ""
    _fit(loss_fn, params, data, quiet=False)  # "auto" off a terminal: silent
    assert capsys.readouterr().err == ""
    _fit(loss_fn, params, data, quiet=False, progress="plain")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[0].startswith("epoch 1  step 4  loss ")
    # per-epoch time as well as the cumulative one; the epoch times add up to the total
    times = [re.search(r"\(([\d.]+) s this epoch, ([\d.]+) s in all\)", line) for line in err]
    assert all(times), err
    total = sum(float(m[1]) for m in times)
    assert abs(total - float(times[-1][2])) <= 0.05 * len(times) + 1e-9


# --- issue 11: arguments JAX/optax would reject obscurely ------------------------------------


def test_fit_names_bad_optimizer_key_and_params():
    model, loss_fn, data = _problem()
    params = model.init(jax.random.key(0))
    with pytest.raises(TypeError, match=r"`optimizer` must be an optax .*optax\.adam\(1e-3\)"):
        _fit(loss_fn, params, data, optimizer="adam")
    with pytest.raises(TypeError, match=r"`key` must be one PRNG key.*an int is a seed"):
        _fit(loss_fn, params, data, key=0)
    with pytest.raises(ValueError, match="`params` has no array leaves"):
        _fit(loss_fn, {}, data)
    with pytest.raises(TypeError, match=r"params\[2\]\['step'\] is dtype int"):
        _fit(loss_fn, [*params, {"step": jnp.array(0)}], data)
    # a legacy uint32 key is still a key
    _fit(loss_fn, params, data, key=jax.random.PRNGKey(1), epochs=1)
