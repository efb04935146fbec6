"""fit(valuation=...): In-Run Data Shapley / TracIn scores against a Python loop in float64."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import private_key

import jaxgrad
from jaxgrad.bench.valuation import flip_labels, main, roc_auc
from jaxgrad.data import epoch_indices
from jaxgrad.train import PrivacyConfig, Valuation, fit


def _problem(n=11, n_val=5, d=3, classes=3, seed=0, token=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + n_val, d))
    y = rng.integers(0, classes, n + n_val)
    model = jaxgrad.models.mlp([d, 4, classes], activation="tanh", dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=classes
    )
    if token:  # a (loss_sum, n_items) loss: example i counts 1 + i % 3 items
        plain = loss_fn

        def loss_fn(p, ex):
            (xi, yi), k = ex
            return k * plain(p, (xi, yi)), k

        w = jnp.asarray(1.0 + np.arange(n + n_val) % 3)
        data = ((x, y), w)
    else:
        data = (x, y)
    train = jax.tree_util.tree_map(lambda a: a[:n], data)
    val = jax.tree_util.tree_map(lambda a: a[n:], data)
    return model.init(jax.random.key(1)), loss_fn, train, val


def _reference(loss_fn, params, train, val, *, optimizer, lr, epochs, batch_size, key):
    """A Python loop over steps and examples, with jax.grad of single examples (float64)."""
    n = len(jax.tree_util.tree_leaves(train)[0])
    take = lambda d, i: jax.tree_util.tree_map(lambda a: a[i], d)
    sum_count = lambda p, ex: jaxgrad.reduce.as_sum_count(loss_fn(p, ex))
    grad = jax.jit(jax.grad(lambda p, ex: sum_count(p, ex)[0]))
    count = lambda ex: float(sum_count(params, ex)[1])
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(t)])
    n_val = len(jax.tree_util.tree_leaves(val)[0])
    val_items = sum(count(take(val, j)) for j in range(n_val))
    scores, opt_state, step = np.zeros(n), optimizer.init(params), 0
    for epoch in range(epochs):
        idx, mask = map(np.asarray, epoch_indices(key, epoch, n, batch_size))
        for rows, m in zip(idx, mask, strict=True):
            rows = rows[m]  # the real rows only: padding is not part of the reference
            val_grad = sum(flat(grad(params, take(val, j))) for j in range(n_val)) / val_items
            grads = [grad(params, take(train, int(i))) for i in rows]
            items = sum(count(take(train, int(i))) for i in rows)
            eta = float(lr(step)) if callable(lr) else lr
            for i, g in zip(rows, grads, strict=True):
                scores[i] += eta / items * flat(g) @ val_grad
            mean = jax.tree_util.tree_map(lambda *gs, n=items: sum(gs) / n, *grads)
            updates, opt_state = optimizer.update(mean, opt_state, params)
            params, step = optax.apply_updates(params, updates), step + 1
    return scores


@pytest.mark.parametrize(
    "case",
    [
        dict(scan=True, optimizer="sgd", token=False),
        dict(scan=False, optimizer="adam", token=False),
        dict(scan=True, optimizer="sgd", token=True, chunk_size=3),
    ],
    ids=["sgd-scan", "adam-schedule-loop", "sum-count-chunked"],
)
def test_scores_equal_a_python_loop(case):
    params, loss_fn, train, val = _problem(token=case["token"])
    if case["optimizer"] == "adam":  # TracIn's convention: the scheduled learning rate
        lr = lambda step: jnp.where(step < 3, 0.05, 0.02)  # a schedule exact in float64
        optimizer = optax.adam(lr)
    else:
        lr, optimizer = 0.3, optax.sgd(0.3)
    kw = dict(optimizer=optimizer, epochs=2, batch_size=4, key=jax.random.key(7))
    result = fit(
        loss_fn,
        params,
        train,
        **kw,
        scan=case["scan"],
        steps_per_call=2,  # 3 steps an epoch: a chunk with a padded, inactive step
        quiet=True,
        valuation=Valuation(val, learning_rate=lr, chunk_size=case.get("chunk_size")),
    )
    expected = _reference(loss_fn, params, train, val, lr=lr, **kw)
    assert result.valuation.shape == (11,) and result.valuation.dtype == np.float64
    assert np.all(expected != 0)
    # 11 rows in batches of 4: the last batch has a padding row (a copy of a real row);
    # it would add that row's term twice if padding contributed.
    np.testing.assert_allclose(result.valuation, expected, rtol=1e-9, atol=1e-13)


def test_step_values_against_jax_grad_padding_and_first_order():
    """One step's terms: against jax.grad of single examples, 0 (not NaN) on padding rows,
    and Σ_j v_j = L_val(θ_0) − L_val(θ_1) up to O(η²) (the score's sign and scale)."""
    params, loss_fn, train, val = _problem()
    lr, real = 1e-3, 7
    mask = jnp.arange(11) < real
    garbage = jax.tree_util.tree_map(lambda a: a.copy(), train)
    garbage[0][real:] = np.nan  # padding rows hold NaN: nothing may leak
    v = np.asarray(Valuation(val, learning_rate=lr).step_values(loss_fn)(params, 0, garbage, mask))
    assert np.all(v[real:] == 0)
    take = lambda d, i: jax.tree_util.tree_map(lambda a: a[i], d)
    grad = jax.jit(jax.grad(loss_fn))
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(t)])
    grads = [flat(grad(params, take(train, i))) for i in range(real)]
    val_grad = sum(flat(grad(params, take(val, j))) for j in range(5)) / 5
    np.testing.assert_allclose(v[:real], [lr / real * g @ val_grad for g in grads], rtol=1e-10)
    # one SGD step on the real rows
    step = jaxgrad.batch_grad(loss_fn)(params, take(train, slice(0, real))).grads
    after = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, step)
    mean_val = lambda p: np.mean([float(loss_fn(p, take(val, j))) for j in range(5)])
    decrease = mean_val(params) - mean_val(after)
    assert abs(decrease) > 1e-6
    np.testing.assert_allclose(v.sum(), decrease, rtol=20 * lr)


def test_valuation_is_refused_with_privacy_and_unsupported_options(tmp_path):
    params, loss_fn, train, val = _problem()
    kw = dict(optimizer=optax.sgd(0.1), epochs=1, batch_size=4, key=private_key(0))
    v = Valuation(val, learning_rate=0.1)
    private = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(ValueError, match="`valuation` cannot be used with `privacy`"):
        fit(loss_fn, params, train, **kw, privacy=private, valuation=v)
    with pytest.raises(ValueError, match="`checkpoint_dir`"):
        fit(loss_fn, params, train, **kw, checkpoint_dir=tmp_path, valuation=v)
    with pytest.raises(TypeError, match=r"`valuation` must be a jaxgrad\.train\.Valuation"):
        fit(loss_fn, params, train, **kw, valuation=val)
    with pytest.raises(ValueError, match=r"`valuation\.val_data` must hold examples shaped"):
        fit(
            loss_fn,
            params,
            train,
            **kw,
            valuation=Valuation((val[0][:, :2], val[1]), learning_rate=1.0),
        )
    with pytest.raises(ValueError, match="`learning_rate` must be a positive"):
        Valuation(val, learning_rate=-0.1)
    bad_labels = (val[0], val[1] + 10)
    with pytest.raises(ValueError, match="label"):
        fit(loss_fn, params, train, **kw, valuation=Valuation(bad_labels, learning_rate=1.0))


def test_plain_fit_returns_no_scores():
    params, loss_fn, train, _ = _problem()
    result = fit(
        loss_fn,
        params,
        train,
        optimizer=optax.sgd(0.1),
        epochs=1,
        batch_size=4,
        key=jax.random.key(0),
        quiet=True,
    )
    assert result.valuation is None
    params_out, _, history = result  # the three-way unpacking still works
    assert len(history) == 1 and params_out is result.params


def test_roc_auc_against_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=60), 1)  # ties on purpose
    positive = rng.random(60) < 0.3
    np.testing.assert_allclose(
        roc_auc(scores, positive), metrics.roc_auc_score(positive, scores), rtol=1e-12
    )
    with pytest.raises(ValueError, match="`positive` needs both classes"):
        roc_auc(scores, np.zeros(60, bool))


def test_demo_runs_at_a_tiny_size(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "v.json", tmp_path / "v.png"
    argv = ["--train-size", "96", "--epochs", "2", "--val-size", "40"]
    assert main([*argv, "--json", str(out_json), "--plot", str(out_png)]) == 0
    figures = json.loads(out_json.read_text())
    assert figures["num_train"] == 96 and figures["num_flipped"] == 10
    assert 0 <= figures["auc_lowest_value"] <= 1 and out_png.stat().st_size > 0
    y = np.arange(50) % 10
    noisy, flipped = flip_labels(y, fraction=0.1, num_classes=10, seed=0)
    assert flipped.sum() == 5 and np.all((noisy != y) == flipped)
