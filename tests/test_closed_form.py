"""The closed forms against jax.grad, against finite differences, and against numpy loops."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgrad
from jaxgrad import closed_form, losses, models

F64 = jnp.float64
floats = st.floats(-10, 10, allow_nan=False)


def _line_loss(params, x, y):
    return jnp.mean((y - (params["m"] * x + params["b"])) ** 2)


def _finite_difference(f, params, h=1e-6):
    """Central differences in float64, one parameter at a time."""
    out = {}
    for name in params:
        up = dict(params, **{name: params[name] + h})
        down = dict(params, **{name: params[name] - h})
        out[name] = (f(up) - f(down)) / (2 * h)
    return out


_jit_grad = jax.jit(jax.grad(_line_loss))
_batch_grad = jaxgrad.batch_grad(
    losses.supervised(models.line_fit(dtype=F64).apply, losses.squared_error)
)


@settings(max_examples=25, deadline=None)
@given(
    m=floats,
    b=floats,
    x=hnp.arrays(np.float64, (9,), elements=floats),
    y=hnp.arrays(np.float64, (9,), elements=floats),
)
def test_line_fit_grad_matches_jax_grad_and_finite_differences(m, b, x, y):
    params = {"m": np.float64(m), "b": np.float64(b)}
    closed = closed_form.line_fit_grad(params, x, y)
    jax.tree_util.tree_map(
        lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-10),
        closed,
        _jit_grad(params, x, y),
    )
    jax.tree_util.tree_map(
        lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-10),
        closed,
        _batch_grad(params, (x, y)).grads,
    )
    loss = lambda p: float(np.mean((y - (p["m"] * x + p["b"])) ** 2))  # plain numpy
    fd = _finite_difference(loss, params)
    scale = 1 + float(np.mean((y - m * x - b) ** 2)) + float(np.mean(np.abs(x)) ** 2)
    for name in params:
        np.testing.assert_allclose(closed[name], fd[name], rtol=1e-6, atol=1e-6 * scale)


def test_line_fit_grad_by_hand():
    # m = 1, b = 0, x = (1, 2), y = (2, 2): residuals (1, 0).
    g = closed_form.line_fit_grad(
        {"m": 1.0, "b": 0.0}, jnp.array([1.0, 2.0]), jnp.array([2.0, 2.0])
    )
    np.testing.assert_allclose(g["m"], -2 / 2 * (1 * 1 + 2 * 0))
    np.testing.assert_allclose(g["b"], -2 / 2 * (1 + 0))


@settings(max_examples=20, deadline=None)
@given(theta=floats, x=hnp.arrays(np.float64, (7,), elements=floats))
def test_linear_loss_grad_matches_jax_grad_and_does_not_depend_on_theta(theta, x):
    y = np.linspace(-1, 1, 7)
    loss = lambda t: jnp.mean(y - t * x)
    np.testing.assert_allclose(closed_form.linear_loss_grad(x), -x.mean(), atol=1e-12)
    np.testing.assert_allclose(jax.grad(loss)(theta), closed_form.linear_loss_grad(x), atol=1e-12)
    np.testing.assert_allclose(jax.grad(loss)(theta + 3.0), jax.grad(loss)(theta), atol=1e-12)


def test_dense_cross_covariance_against_numpy_loop():
    rng = np.random.default_rng(0)
    a, g = rng.normal(size=(10, 4)), rng.normal(size=(10, 3))
    true = sum(np.outer(a[i], g[i]) for i in range(10)) / 10
    naive = np.outer(a.mean(0), g.mean(0))
    np.testing.assert_allclose(
        closed_form.dense_cross_covariance(jnp.asarray(a), jnp.asarray(g)), true - naive, atol=1e-14
    )
    # Uncorrelated by construction (an error that is constant over the batch): zero.
    const = np.tile(g[:1], (10, 1))
    np.testing.assert_allclose(closed_form.dense_cross_covariance(a, const), 0, atol=1e-14)
