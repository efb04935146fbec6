"""``jaxgrad.accumulate``: accumulation across optimizer calls, divided once by the total count.

The reference is one big batch: ``batch_grad`` over the union of the microbatches, one optax
step. ``optax.MultiSteps`` on the same microbatches is measured to differ (the error the
library exists to expose), and ``fit`` refuses it for ``(loss_sum, n_items)`` losses.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgrad
from jaxgrad import reduce
from jaxgrad.train import fit

jax.config.update("jax_enable_x64", True)

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _token_loss(w, example):
    """A (sum, count) token loss: squared error over the example's real tokens."""
    x, y, length = example  # x: (T, D), y: (T,)
    real = jnp.arange(x.shape[0]) < length
    return jnp.sum(jnp.where(real, (x @ w - y) ** 2, 0.0)), jnp.sum(real)


def _tokens(n=6, t=4, d=3, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (n, t, d))
    y = jax.random.normal(k2, (n, t))
    return x, y, jnp.array([4, 1, 1, 3, 2, 4])[:n]  # uneven token counts


def _rows(batch, rows):
    return jax.tree_util.tree_map(lambda x: x[np.asarray(rows)], batch)


def test_accumulate_equals_one_big_batch_where_multisteps_does_not():
    w = jnp.array([0.3, -0.2, 0.5])
    batch = _tokens()
    micro = [[0, 1], [2, 3], [4, 5]]  # 5, 4 and 6 tokens
    inner = optax.adam(0.1)
    batch_grad = jaxgrad.batch_grad(_token_loss)
    grad = lambda p, b: batch_grad(p, b).grads

    # Two rounds, so the inner state (Adam's moments) carries over between applications.
    big, big_state = w, inner.init(w)
    ours, our_state = w, jaxgrad.accumulate(3, inner).init(w)
    multi = optax.MultiSteps(inner, every_k_schedule=3)
    theirs, their_state = w, multi.init(w)
    update = jax.jit(jaxgrad.accumulate(3, inner).update)
    for _ in range(2):
        u, big_state = inner.update(grad(big, batch), big_state, big)
        big = optax.apply_updates(big, u)
        for k, rows in enumerate(micro):
            part = _rows(batch, rows)
            count = reduce.batch_totals(_token_loss, ours, part, jnp.ones(2, bool))[1]
            u, our_state = update(grad(ours, part), our_state, ours, count=count)
            if k < 2:  # no update before the k-th call, as with MultiSteps
                np.testing.assert_array_equal(u, jnp.zeros(3))
            ours = optax.apply_updates(ours, u)
            u, their_state = multi.update(grad(theirs, part), their_state, theirs)
            theirs = optax.apply_updates(theirs, u)
    np.testing.assert_allclose(ours, big, **TOL)
    assert np.max(np.abs(np.asarray(theirs) - np.asarray(big))) > 1e-3


def test_accumulate_needs_the_count_and_checks_arguments():
    opt = jaxgrad.accumulate(2, optax.sgd(0.1))
    state = opt.init(jnp.zeros(2))
    with pytest.raises(TypeError, match="`count` is required"):
        opt.update(jnp.ones(2), state, jnp.zeros(2))
    with pytest.raises(ValueError, match="`count` must be a scalar; got shape \\(2,\\)"):
        opt.update(jnp.ones(2), state, jnp.zeros(2), count=jnp.ones(2))
    with pytest.raises(ValueError, match="every_k"):
        jaxgrad.accumulate(0, optax.sgd(0.1))
    with pytest.raises(TypeError, match="`inner` must be an optax optimizer"):
        jaxgrad.accumulate(2, "adam")


@pytest.mark.parametrize(
    "count", [True, np.bool_(True), jnp.array(True), -1, -0.5, np.nan, np.inf, "3", 1 + 2j]
)
def test_accumulate_refuses_a_known_count_that_is_no_item_count(count):
    opt = jaxgrad.accumulate(2, optax.sgd(0.1))
    state = opt.init(jnp.zeros(2))
    with pytest.raises(ValueError, match="`count` must be a non-negative finite number"):
        opt.update(jnp.ones(2), state, jnp.zeros(2), count=count)


def test_accumulate_traced_counts_follow_the_strategies_nan_rule():
    """Under jit the count is not known: two calls (g1, n1), (g2, n2) give the update
    -lr (n1 g1 + n2 g2) / (n1 + n2), written out by hand, or NaN where a count is negative,
    NaN, inf, or 0 behind a nonzero gradient (docs/non-finite.md); 0 behind a zero gradient
    (padding only) adds nothing."""
    lr = 0.5
    opt = jaxgrad.accumulate(2, optax.sgd(lr))
    w = jnp.zeros(2, jnp.float64)

    @jax.jit
    def two_calls(g1, n1, g2, n2):
        state = opt.init(w)
        _, state = opt.update(g1, state, w, count=n1)
        return opt.update(g2, state, w, count=n2)[0]

    g1, g5 = np.array([1.0, -2.0]), np.array([5.0, 0.0])
    for n1, g2, n2, want in [
        (3.0, g5, 2.0, -lr * (3 * g1 + 2 * g5) / 5),
        (3, g5, 2, -lr * (3 * g1 + 2 * g5) / 5),  # integer counts
        (3.0, np.zeros(2), 0.0, -lr * g1),  # a batch of padding only adds nothing
        (3.0, g5, -1.0, np.full(2, np.nan)),  # not (3 g1 - g5) / 2
        (3.0, g5, np.nan, np.full(2, np.nan)),
        (3.0, g5, np.inf, np.full(2, np.nan)),
        (3.0, np.zeros(2), np.inf, np.full(2, np.nan)),
        (3.0, g5, 0.0, np.full(2, np.nan)),  # 0 items behind a nonzero gradient
        (0.0, g5, 2.0, np.full(2, np.nan)),  # the same, on the first call
    ]:
        got = np.asarray(two_calls(jnp.asarray(g1), n1, jnp.asarray(g2), n2))
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"counts ({n1}, {n2})")
    with pytest.raises(TypeError, match="`count` must be an integer or a real number"):
        two_calls(jnp.asarray(g1), 3.0, jnp.asarray(g5), True)


def test_fit_with_accumulate_makes_one_exact_step_per_k_batches():
    """3 batches of 2 rows per epoch, accumulated: one SGD step on all 6 rows per epoch."""
    w = jnp.array([0.3, -0.2, 0.5])
    data = _tokens()
    kwargs = dict(epochs=2, batch_size=2, key=jax.random.key(3), quiet=True, scan=True)
    result = fit(_token_loss, w, data, optimizer=jaxgrad.accumulate(3, optax.sgd(0.2)), **kwargs)
    expected = w
    for _ in range(2):
        expected = expected - 0.2 * jaxgrad.batch_grad(_token_loss)(expected, data).grads
    np.testing.assert_allclose(result.params, expected, **TOL)


def test_fit_refuses_multisteps_with_sum_count_losses_and_warns_for_partial_batches():
    w = jnp.zeros(3)
    multi = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3)
    kwargs = dict(epochs=1, key=jax.random.key(0), quiet=True)
    with pytest.raises(ValueError, match=r"MultiSteps.*jaxgrad\.accumulate"):
        fit(_token_loss, w, _tokens(), optimizer=multi, batch_size=2, **kwargs)
    # Wrapped in a chain, it is found all the same (by its state).
    chained = optax.chain(optax.clip(1.0), multi.gradient_transformation())
    with pytest.raises(ValueError, match="MultiSteps"):
        fit(_token_loss, w, _tokens(), optimizer=chained, batch_size=2, **kwargs)

    x, y = jnp.ones((5, 3)), jnp.ones(5)
    scalar = lambda w, ex: (ex[0] @ w - ex[1]) ** 2
    with pytest.warns(UserWarning, match="partial batch"):
        fit(scalar, w, (x, y), optimizer=multi, batch_size=2, **kwargs)
    with warnings.catch_warnings():  # full batches only: the mean of means is exact
        warnings.simplefilter("error")
        fit(scalar, w, (x[:4], y[:4]), optimizer=multi, batch_size=2, **kwargs)


def test_bfloat16_parameters_sum_counts_in_float32():
    """Two mean gradients of exactly 1 with counts 257 and 1: the accumulated mean is 1. In
    bfloat16, n g with n = 257 rounds to 256 and the update came out -0.9921875."""
    opt = jaxgrad.accumulate(2, optax.sgd(1.0))
    w = jnp.zeros(1, jnp.bfloat16)
    state = opt.init(w)
    _, state = opt.update(jnp.ones(1, jnp.bfloat16), state, w, count=257)
    update, _ = opt.update(jnp.ones(1, jnp.bfloat16), state, w, count=1)
    assert update.dtype == jnp.bfloat16 and float(update[0]) == -1.0
