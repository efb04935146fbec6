"""fit(valuation=...): In-Run Data Shapley / TracIn scores against a Python loop in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgrad
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
            mean = jax.tree_util.tree_map(lambda *gs: sum(gs) / items, *grads)
            updates, opt_state = optimizer.update(mean, opt_state, params)
            params, step = optax.apply_updates(params, updates), step + 1
    return scores


@pytest.mark.parametrize(
    "case",
    [
        dict(scan=True, optimizer="sgd", token=False),
        dict(scan=False, optimizer="adam", token=False),
        dict(scan=True, optimizer="sgd", token=True),
    ],
    ids=["sgd-scan", "adam-schedule-loop", "sum-count"],
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
        valuation=Valuation(val, learning_rate=lr),
    )
    expected = _reference(loss_fn, params, train, val, lr=lr, **kw)
    assert result.valuation.shape == (11,) and result.valuation.dtype == np.float64
    assert np.all(expected != 0)
    # 11 rows in batches of 4: the last batch has a padding row (a copy of a real row);
    # it would add that row's term twice if padding contributed.
    np.testing.assert_allclose(result.valuation, expected, rtol=1e-9, atol=1e-13)


def test_a_step_s_scores_are_its_first_order_validation_loss_decrease():
    """Σ_j v_j = L_val(θ_0) − L_val(θ_1) up to O(η²): sign and scale of the score."""
    params, loss_fn, train, val = _problem()
    mean_val = lambda p: jaxgrad.reduce.safe_divide(
        *jaxgrad.reduce.batch_totals(loss_fn, p, val, jnp.ones(5, bool))
    )
    for lr in (1e-3, 1e-4):
        result = fit(
            loss_fn,
            params,
            train,
            optimizer=optax.sgd(lr),
            epochs=1,
            batch_size=11,  # one step on the whole set
            key=jax.random.key(0),
            quiet=True,
            valuation=Valuation(val, learning_rate=lr),
        )
        decrease = float(mean_val(params) - mean_val(result.params))
        assert abs(decrease) > 0
        np.testing.assert_allclose(result.valuation.sum(), decrease, rtol=20 * lr)


def test_step_values_masks_padding():
    params, loss_fn, train, val = _problem()
    values = Valuation(val, learning_rate=0.5).step_values(loss_fn)
    mask = jnp.arange(11) < 7
    garbage = jax.tree_util.tree_map(lambda a: a.copy(), train)
    garbage[0][7:] = np.nan  # padding rows hold NaN: nothing may leak
    v_masked = np.asarray(values(params, 0, garbage, mask))
    v_head = np.asarray(values(params, 0, jax.tree_util.tree_map(lambda a: a[:7], train), None))
    assert np.all(v_masked[7:] == 0)
    np.testing.assert_allclose(v_masked[:7], v_head, rtol=1e-12)


def test_valuation_is_refused_with_privacy_and_unsupported_options(tmp_path):
    params, loss_fn, train, val = _problem()
    kw = dict(optimizer=optax.sgd(0.1), epochs=1, batch_size=4, key=jax.random.key(0))
    v = Valuation(val, learning_rate=0.1)
    private = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(ValueError, match="`valuation` cannot be used with `privacy`"):
        fit(loss_fn, params, train, **kw, privacy=private, valuation=v)
    with pytest.raises(ValueError, match="`checkpoint_dir`"):
        fit(loss_fn, params, train, **kw, checkpoint_dir=tmp_path, valuation=v)
    with pytest.raises(TypeError, match="`valuation` must be a jaxgrad.train.Valuation"):
        fit(loss_fn, params, train, **kw, valuation=val)
    with pytest.raises(ValueError, match="`valuation.val_data` must hold examples shaped"):
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
    p, state, history = result  # the three-way unpacking still works
    assert len(history) == 1
