"""The naive orders: equal to the exact gradient where the maths says so, different elsewhere.

References are written independently: numpy formulas, closed forms and loops over single
examples with ``jax.grad`` on one example.
"""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgrad
from jaxgrad import closed_form, losses, models, naive

F64 = jnp.float64
RTOL, ATOL = 1e-10, 1e-12


def assert_close(a, b, rtol=RTOL, atol=ATOL):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def dsigmoid(x):
    return sigmoid(x) * (1.0 - sigmoid(x))


# ----------------------------------------------------------------- grad_at_mean_input


def test_seed_sigmoid_numbers():
    """σ'(0.5) ≈ 0.2350 at the mean input against (σ'(0) + σ'(1)) / 2 ≈ 0.2233."""
    loss = lambda theta, x: jax.nn.sigmoid(theta + x)
    xs = jnp.array([0.0, 1.0])
    at_mean = jax.jit(naive.grad_at_mean_input(loss))(0.0, xs).grads
    exact = jax.jit(jaxgrad.batch_grad(loss))(0.0, xs).grads
    np.testing.assert_allclose(at_mean, dsigmoid(0.5), rtol=1e-12)
    np.testing.assert_allclose(exact, (dsigmoid(0.0) + dsigmoid(1.0)) / 2, rtol=1e-12)
    assert round(float(at_mean), 4) == 0.2350
    assert round(float(exact), 4) == 0.2233


def test_docstring_sigmoid_example():
    loss = lambda theta, x: jax.nn.sigmoid(theta * x)
    g = naive.grad_at_mean_input(loss)(1.0, jnp.array([0.0, 1.0])).grads
    np.testing.assert_allclose(g, 0.5 * dsigmoid(0.5), rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    theta=st.floats(-3, 3),
    x=hnp.arrays(np.float64, (6,), elements=st.floats(-5, 5)),
    y=hnp.arrays(np.float64, (6,), elements=st.floats(-5, 5)),
)
def test_seed_linear_loss_equals_exact_and_closed_form(theta, x, y):
    loss = lambda t, ex: ex[1] - t * ex[0]  # J = (1/N) Σ (y − θ x): linear in the data
    at_mean = _gami(loss)(jnp.float64(theta), (x, y)).grads
    exact = _bg(loss)(jnp.float64(theta), (x, y)).grads
    np.testing.assert_allclose(at_mean, exact, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(at_mean, closed_form.linear_loss_grad(x), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(at_mean, -np.mean(x), rtol=RTOL, atol=ATOL)


@functools.cache
def _gami(loss):
    return jax.jit(naive.grad_at_mean_input(loss))


@functools.cache
def _bg(loss):
    return jax.jit(jaxgrad.batch_grad(loss))


def _linreg(key, n=6, d=3):
    model = models.linear_regression(d, dtype=F64)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w": jax.random.normal(k1, (d,), F64), "b": jnp.float64(0.3)}
    x = jax.random.normal(k2, (n, d), F64)
    y = jax.random.normal(k3, (n,), F64)
    return model, params, (x, y)


def test_linear_model_linear_error_equal_squared_error_not():
    model, params, batch = _linreg(jax.random.key(1))
    linear = losses.supervised(model.apply, losses.linear_error)
    assert_close(
        naive.grad_at_mean_input(linear)(params, batch).grads,
        jaxgrad.batch_grad(linear)(params, batch).grads,
    )
    # Squared error is NOT linear in the data: (y − w·x)² at the mean ≠ mean of the squares.
    squared = losses.supervised(model.apply, losses.squared_error)
    at_mean = naive.grad_at_mean_input(squared)(params, batch).grads
    exact = jaxgrad.batch_grad(squared)(params, batch).grads
    assert max_abs_diff(at_mean, exact) > 1e-2
    # ... and the at-mean value is exactly the closed form at (x̄, ȳ).
    x, y = map(np.asarray, batch)
    r = y.mean() - (x.mean(0) @ np.asarray(params["w"]) + 0.3)
    assert_close(at_mean, {"w": -2 * r * x.mean(0), "b": -2 * r})


def test_grad_at_mean_input_nonlinear_model_differs():
    model = models.mlp([3, 4, 1], activation="sigmoid", dtype=F64)
    params = model.init(jax.random.key(0))
    loss = losses.supervised(model.apply, losses.linear_error)
    x = jax.random.normal(jax.random.key(1), (5, 3), F64)
    batch = (x, jnp.zeros((5, 1)))
    assert (
        max_abs_diff(
            naive.grad_at_mean_input(loss)(params, batch).grads,
            jaxgrad.batch_grad(loss)(params, batch).grads,
        )
        > 1e-4
    )
    # One example, or identical examples: the mean input IS the input.
    same = (jnp.tile(x[:1], (5, 1)), jnp.zeros((5, 1)))
    assert_close(
        naive.grad_at_mean_input(loss)(params, same), jaxgrad.batch_grad(loss)(params, same)
    )  # the whole result: grads, loss and count (5 examples)


def test_grad_at_mean_input_mask_averages_real_rows_only():
    loss = lambda t, x: jax.nn.sigmoid(t * x)
    x = jnp.array([0.0, 1.0, 7.0, 2.0])
    mask = jnp.array([True, True, False, True])
    g, loss_value, count, norms = naive.grad_at_mean_input(loss)(0.5, x, mask)
    np.testing.assert_allclose(g, 1.0 * dsigmoid(0.5), rtol=1e-12)  # x̄ = 1
    np.testing.assert_allclose(loss_value, sigmoid(0.5), rtol=1e-12)
    assert float(count) == 3.0 and norms is None  # 3 real examples averaged


def test_grad_at_mean_input_rejects_integer_leaves():
    model = models.mlp([3, 4, 3], dtype=F64)
    loss = losses.supervised(model.apply, losses.softmax_cross_entropy)
    batch = (jnp.ones((4, 3)), jnp.array([0, 1, 2, 1]))
    with pytest.raises(TypeError, match=r"`grad_at_mean_input`.*floating point.*int"):
        naive.grad_at_mean_input(loss)(model.init(jax.random.key(0)), batch)


# ----------------------------------------------------------------- backprop_mean_error


def _dense_case(key, n=6):
    model = models.mlp([3, 2], dtype=F64)  # one dense layer, s = a W + b
    k1, k2, k3 = jax.random.split(key, 3)
    params = model.init(k1)
    x = jax.random.normal(k2, (n, 3), F64)
    y = jax.random.normal(k3, (n, 2), F64) + x[:, :2] ** 2  # errors correlated with inputs
    return model, params, (x, y)


def test_backprop_mean_error_single_dense_layer_is_off_by_cross_covariance():
    model, params, (x, y) = _dense_case(jax.random.key(2))
    f = jax.jit(naive.backprop_mean_error(model.apply, losses.squared_error))
    naive_grads = f(params, (x, y)).grads
    # Independent numpy: δ_i = 2 (ŷ_i − y_i), exact ∂W = (1/N) Σ a_i δ_iᵀ, naive = ā δ̄ᵀ.
    xa, w, b = np.asarray(x), np.asarray(params[0]["w"]), np.asarray(params[0]["b"])
    delta = 2 * (xa @ w + b - np.asarray(y))
    exact_w = sum(np.outer(xa[i], delta[i]) for i in range(len(xa))) / len(xa)
    np.testing.assert_allclose(naive_grads[0]["w"], np.outer(xa.mean(0), delta.mean(0)), atol=1e-12)
    np.testing.assert_allclose(naive_grads[0]["b"], delta.mean(0), atol=1e-12)
    exact = jaxgrad.batch_grad(losses.supervised(model.apply, losses.squared_error))
    exact = exact(params, (x, y)).grads
    np.testing.assert_allclose(exact[0]["w"], exact_w, atol=1e-12)
    diff = np.asarray(exact[0]["w"] - naive_grads[0]["w"])
    np.testing.assert_allclose(
        diff, closed_form.dense_cross_covariance(x, jnp.asarray(delta)), atol=1e-12
    )
    assert np.abs(diff).max() > 1e-2  # a real difference, not 0 == 0


def test_backprop_mean_error_equal_for_one_example_or_identical_examples():
    model = models.mlp([3, 5, 2], activation="tanh", dtype=F64)
    params = model.init(jax.random.key(0))
    loss = losses.supervised(model.apply, losses.squared_error)
    f = naive.backprop_mean_error(model.apply, losses.squared_error)
    x = jax.random.normal(jax.random.key(1), (4, 3), F64)
    y = jax.random.normal(jax.random.key(2), (4, 2), F64)
    one = (x[:1], y[:1])
    assert_close(f(params, one), jaxgrad.batch_grad(loss)(params, one))
    same = (jnp.tile(x[:1], (4, 1)), jnp.tile(y[:1], (4, 1)))
    assert_close(f(params, same), jaxgrad.batch_grad(loss)(params, same))
    # Distinct examples through a nonlinear network: different gradient, same loss and count.
    (g_naive, l_naive, c_naive, _), (g_exact, l_exact, c_exact, _) = (
        f(params, (x, y)),
        jaxgrad.batch_grad(loss)(params, (x, y)),
    )
    np.testing.assert_allclose(l_naive, l_exact, rtol=RTOL)
    assert float(c_naive) == float(c_exact) == 4.0
    assert max_abs_diff(g_naive, g_exact) > 1e-3


def test_backprop_mean_error_mask_equals_removed_rows():
    model, params, (x, y) = _dense_case(jax.random.key(3))
    f = naive.backprop_mean_error(model.apply, losses.squared_error)
    mask = np.array([True, False, True, True, False, True])
    assert_close(f(params, (x, y), jnp.asarray(mask)), f(params, (x[mask], y[mask])))
    assert_close(jax.jit(f)(params, (x, y), jnp.asarray(mask)), f(params, (x[mask], y[mask])))


def test_backprop_mean_error_rejects_non_pair_batch():
    model, params, (x, y) = _dense_case(jax.random.key(3))
    f = naive.backprop_mean_error(model.apply, losses.squared_error)
    with pytest.raises(TypeError, match=r"`batch` must be a pair \(inputs, targets\)"):
        f(params, (x, y, y))
    with pytest.raises(ValueError, match=r"`batch` leaves must share a leading axis"):
        f(params, (x, y[:3]))


# ----------------------------------------------------------------- mean_of_microbatch_means


def microbatch_reference(loss_fn, params, batch, mask, k):
    """(1/K') Σ_k ∇S_k / n_k over non-empty contiguous microbatches, by a loop over examples."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    per = -(-n // k)
    grad_one = jax.jit(jax.grad(lambda p, ex: _sum(loss_fn(p, ex))))
    count_one = jax.jit(lambda p, ex: _count(loss_fn(p, ex)))
    means = []
    for start in range(0, per * k, per):
        g_sum, c_sum = None, 0.0
        for i in range(start, min(start + per, n)):
            if not mask[i]:
                continue
            ex = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
            g = jax.tree_util.tree_map(np.asarray, grad_one(params, ex))
            g_sum = g if g_sum is None else jax.tree_util.tree_map(np.add, g_sum, g)
            c_sum += float(count_one(params, ex))
        if c_sum > 0:
            means.append(jax.tree_util.tree_map(lambda s, c=c_sum: s / c, g_sum))
    return jax.tree_util.tree_map(lambda *ms: sum(ms) / len(ms), *means)


def _sum(out):
    return out[0] if isinstance(out, tuple) else out


def _count(out):
    return out[1] if isinstance(out, tuple) else 1.0


def _mlp_case():
    model = models.mlp([3, 4, 2], activation="tanh", dtype=F64)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 3), F64)
    y = jax.random.normal(jax.random.key(2), (8, 2), F64)
    return losses.supervised(model.apply, losses.squared_error), params, (x, y)


def test_mean_of_microbatch_means_equal_counts_equals_exact():
    loss, params, batch = _mlp_case()
    exact = jaxgrad.batch_grad(loss)(params, batch)
    for k in (2, 8):
        mmm = naive.mean_of_microbatch_means(loss, num_microbatches=k)
        acc = jaxgrad.accumulate_grad(loss, num_microbatches=k)
        assert_close(mmm(params, batch), acc(params, batch))
        assert_close(mmm(params, batch), exact)


def test_mean_of_microbatch_means_unequal_counts_differs_and_matches_formula():
    loss, params, batch = _mlp_case()
    # 8 rows in 3 microbatches of 3: the last holds 2 real rows.
    mmm = naive.mean_of_microbatch_means(loss, num_microbatches=3)(params, batch).grads
    assert_close(mmm, microbatch_reference(loss, params, batch, np.ones(8, bool), 3))
    acc = jaxgrad.accumulate_grad(loss, num_microbatches=3)(params, batch).grads
    assert max_abs_diff(mmm, acc) > 1e-4
    # Masks make the counts unequal too.
    mask = np.array([True, True, True, True, True, False, False, False])
    out = naive.mean_of_microbatch_means(loss, num_microbatches=2)(params, batch, jnp.asarray(mask))
    mmm = out.grads
    assert_close(mmm, microbatch_reference(loss, params, batch, mask, 2))
    assert float(out.count) == 5.0  # the whole batch's real rows
    exact = jaxgrad.batch_grad(loss)(params, batch, jnp.asarray(mask)).grads
    assert max_abs_diff(mmm, exact) > 1e-4


def test_mean_of_microbatch_means_skips_empty_microbatches():
    loss, params, batch = _mlp_case()
    mask = np.array([True, True, False, False, True, True, True, True])
    f = naive.mean_of_microbatch_means(loss, num_microbatches=4)
    grads, loss_value, *_ = f(params, batch, jnp.asarray(mask))
    assert_close(grads, microbatch_reference(loss, params, batch, mask, 4))
    # The three non-empty microbatches hold 2 real rows each: equal counts, so exact.
    exact, exact_loss, *_ = jaxgrad.batch_grad(loss)(params, batch, jnp.asarray(mask))
    assert_close(grads, exact)
    np.testing.assert_allclose(loss_value, exact_loss, rtol=RTOL)


def test_variable_length_sequences_accumulate_exact_microbatch_means_not():
    model = models.transformer(vocab_size=6, max_len=5, d_model=8, num_heads=2, dtype=F64)
    params = model.init(jax.random.key(0))
    tokens = np.array(jax.random.randint(jax.random.key(1), (4, 6), 1, 6))
    for i, n in enumerate([5, 1, 4, 2]):  # microbatches of 2: 6 tokens and 6 tokens
        tokens[i, n + 1 :] = 0
    loss = lambda p, seq: losses.token_cross_entropy(model.apply(p, seq[:-1]), seq[1:])
    mmm = jax.jit(naive.mean_of_microbatch_means(loss, num_microbatches=2))
    # Jitted: one compiled program each, not the transformer's ops dispatched one by one.
    batch_grad = jax.jit(jaxgrad.batch_grad(loss))
    exact = batch_grad(params, jnp.asarray(tokens))
    assert_close(mmm(params, jnp.asarray(tokens)), exact)  # equal token counts: equal (loss too)
    exact = exact.grads
    tokens[1, 2:] = tokens[0, 2:]  # row 1 grows to 5 targets: microbatches of 10 and 6
    tokens = jnp.asarray(tokens)
    exact = batch_grad(params, tokens).grads
    acc = jax.jit(jaxgrad.accumulate_grad(loss, num_microbatches=2))(params, tokens).grads
    assert_close(acc, exact)
    got = mmm(params, tokens).grads
    assert_close(got, microbatch_reference(loss, params, tokens, np.ones(4, bool), 2))
    assert max_abs_diff(got, exact) > 1e-4


@functools.cache
def _mmm(k):
    loss, *_ = _mlp_case_cached()
    return jax.jit(naive.mean_of_microbatch_means(loss, num_microbatches=k))


@functools.cache
def _mlp_case_cached():
    return _mlp_case()


@settings(max_examples=15, deadline=None)
@given(k=st.sampled_from([1, 2, 3, 5]), mask=hnp.arrays(bool, (8,)))
def test_mean_of_microbatch_means_random_splits_match_formula(k, mask):
    loss, params, batch = _mlp_case_cached()
    got = _mmm(k)(params, batch, jnp.asarray(mask)).grads
    if not mask.any():
        assert_close(got, jax.tree_util.tree_map(jnp.zeros_like, params), atol=0)
    else:
        assert_close(got, microbatch_reference(loss, params, batch, mask, k))


def test_naive_bad_input():
    loss, params, batch = _mlp_case()
    with pytest.raises(ValueError, match=r"`num_microbatches` must be a positive integer; got 0"):
        naive.mean_of_microbatch_means(loss, num_microbatches=0)
    for f in (
        naive.mean_of_microbatch_means(loss, num_microbatches=2),
        naive.grad_at_mean_input(loss),
        naive.backprop_mean_error(loss.apply, losses.squared_error),
    ):
        with pytest.raises(ValueError, match=r"`mask` must have shape \(8,\)"):
            f(params, batch, jnp.ones(7, bool))
        with pytest.raises(TypeError, match=r"`mask` must be boolean"):
            f(params, batch, jnp.ones(8))
        with pytest.raises(ValueError, match=r"`batch` is empty"):
            f(params, (batch[0][:0], batch[1][:0]))


def test_backprop_mean_error_with_token_counts_is_exact_for_identical_sequences_only():
    model = models.transformer(vocab_size=12, max_len=6, dtype=jnp.float64)
    params = model.init(jax.random.key(0))
    seq = jnp.array([[3, 4, 5, 6, 0, 0]])
    exact_f = jax.jit(
        jaxgrad.batch_grad(losses.supervised(model.apply, losses.token_cross_entropy))
    )
    naive_f = jax.jit(jaxgrad.naive.backprop_mean_error(model.apply, losses.token_cross_entropy))
    same = (jnp.repeat(seq, 3, 0),) * 2
    jaxgrad.check.assert_equivalent(exact_f, naive_f, params, same)
    varied = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 0, 0, 0, 0], [9, 10, 11, 1, 2, 0]])
    assert (
        jaxgrad.check.tree_diff(
            naive_f(params, (varied, varied)).grads, exact_f(params, (varied, varied)).grads
        )[0]
        > 1e-6
    )


def test_grad_at_mean_input_with_no_real_example_is_zero_like_the_exact_strategies():
    # Before issue 11 it returned the gradient at an all-zero "mean example" (here 0.25).
    loss = lambda theta, x: jax.nn.sigmoid(theta * x + 1.0)
    batch, mask = jnp.array([0.5, 2.0]), jnp.array([False, False])
    g, value, count, _ = naive.grad_at_mean_input(loss)(1.0, batch, mask)
    assert float(g) == 0.0 and float(value) == 0.0 and float(count) == 0.0
    assert float(g) == float(jaxgrad.batch_grad(loss)(1.0, batch, mask).grads)
    # With one real example it is that example's gradient: sigma'(2) * 0.5 (closed form).
    s = jax.nn.sigmoid(1.5)
    g1 = naive.grad_at_mean_input(loss)(1.0, batch, jnp.array([True, False])).grads
    np.testing.assert_allclose(float(g1), s * (1 - s) * 0.5, rtol=1e-12)
