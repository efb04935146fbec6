"""Tied parameters whose uses contract different axes (none, some, all): float64, exact.

Every case compares the fast path with ``method="vmap"`` and with an independent Python loop
over single examples, to 1e-10 relative, for the norms and the clipped sum.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import F64, check_against_loop, flat

from jaxgrad.fast import clipped_grad, per_example_norms


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), F64)


def _w_and_wt_contracted(w, x, m):
    h = jnp.tanh(x @ w)  # (N,), contracts axis 0 of W
    return jnp.sum(h**2) + jnp.einsum("ij,ji->", w.T, m)  # W.T with both axes contracted


def _w_and_elementwise(w, x, m):
    return jnp.sum(jnp.tanh(x @ w) ** 2) + jnp.sum(w * m)


def _w_and_outer(w, x, m):
    v = m[:, 0]  # (K,)
    t = jnp.einsum("ij,k->ijk", w, v)  # no contraction at all
    return jnp.sum(jnp.tanh(x @ w) ** 2) + jnp.sum(jnp.sin(t))


def _w_both_sides(w, x, m):
    h = jnp.tanh(x @ w)  # (N,) contracts axis 0
    return jnp.sum(jnp.tanh(w @ h) * x) + jnp.vdot(w, m)  # contracts axis 1; and all axes


def _w_sequence_and_row(w, x, m):
    seq = jnp.stack([x, 2 * x, jnp.cos(x)])  # (T, K)
    h = jnp.tanh(seq @ w)  # (T, N)
    return jnp.sum(h**2) + jnp.sum(jnp.tanh(w.T @ x) * m[0, :])


def _cancelling(w, x, m):
    del m
    return jnp.dot(x @ w, jnp.ones(w.shape[1], w.dtype)) - jnp.sum(x @ w)  # gradient 0


CASES = {
    "w_and_wt_contracted": _w_and_wt_contracted,
    "w_and_elementwise": _w_and_elementwise,
    "w_and_outer": _w_and_outer,
    "w_both_sides": _w_both_sides,
    "w_sequence_and_row": _w_sequence_and_row,
}


def _setup(fn, size=5, k=4, n=4):
    rng = np.random.default_rng(20)
    params = {"w": _normal(rng, k, n) / 2, "m": _normal(rng, k, n)}
    # the per-example data: x_i, and M_i (a per-example matrix) for the uses that take one
    batch = (_normal(rng, size, k), _normal(rng, size, k, n))

    def loss(p, ex):
        x, m = ex
        return fn(p["w"], x, m * p["m"][0, 0])

    return loss, params, batch


@pytest.mark.parametrize("name", sorted(CASES))
def test_tied_norms_and_clipped_sum(name):
    check_against_loop(*_setup(CASES[name]))


def test_cancelling_tied_uses_give_zero_not_nan():
    loss, params, batch = _setup(_cancelling)
    norms = per_example_norms(loss)(params, batch)
    assert np.all(np.isfinite(norms))
    assert np.max(np.abs(norms)) < 1e-6
    got = clipped_grad(loss, l2_clip=1.0, reduction="sum")(params, batch)
    assert np.all(np.isfinite(flat(got)))
