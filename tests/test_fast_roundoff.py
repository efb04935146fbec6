"""Round-off of the sequence-axis and lookup norm forms when per-position contributions cancel.

Example ``i``'s gradient ``Σ_t a_t g_tᵀ`` is made small by cancellation: the rows ``a_t`` are
(almost) equal and the cotangents ``g_t = c_t v`` have ``Σ_t c_t = δ_i`` with ``δ_i`` down to
1e-4. The Gram form ``⟨AAᵀ, GGᵀ⟩`` squares that conditioning (relative errors ~1e-7 here); the
norms must match a Python loop over examples and ``method="vmap"`` to 1e-10 in float64,
example by example (relative to each example's own norm).
"""

import jax
import jax.numpy as jnp
import numpy as np
from test_fast_cases import F64, assert_rel_close, reference_grads

from jaxgrad.fast import clipped_grad, gradient_gram, per_example_norms, plan

DELTAS = np.array([1e-1, 1e-2, 1e-3, 3e-4, 1e-4])


def _cancelling_batch(rng, t=4, k=16):
    rows = rng.normal(size=(len(DELTAS), 1, k)) + 1e-7 * rng.normal(size=(len(DELTAS), t, k))
    c = np.tile(np.resize([1.0, -1.0], t), (len(DELTAS), 1))
    c[:, -1] += DELTAS  # Σ_t c_t = δ_i
    return jnp.asarray(rows, F64), jnp.asarray(c, F64)


def _check_norms(loss, params, batch):
    """The norms, the Gram matrix's diagonal (whole and by chunks of 2) and the norms of
    one-row units, each example against the loop relative to its own (small) norm."""
    norms = np.linalg.norm(reference_grads(loss, params, batch), axis=1)
    singles = jnp.arange(len(norms))
    found = [per_example_norms(loss, method=m)(params, batch) for m in ("auto", "vmap")]
    found.append(per_example_norms(loss)(params, batch, units=singles))
    for chunk_size in (None, 2):
        found.append(jnp.sqrt(jnp.diag(gradient_gram(loss, chunk_size=chunk_size)(params, batch))))
    for got in found:
        for i, norm in enumerate(norms):
            assert_rel_close(got[i], norm)
    return plan(loss, params, tuple(x[0] for x in batch))


def test_cancelling_positions_sequence_axis():
    rng = np.random.default_rng(50)
    params = {"w": jnp.asarray(rng.normal(size=(16, 16)), F64)}
    v = jnp.asarray(rng.normal(size=16), F64)

    def loss(p, ex):
        x, c = ex
        return jnp.sum(c * ((x @ p["w"]) @ v))

    p = _check_norms(loss, params, _cancelling_batch(rng))
    assert "Gram" in p.leaves[0].route  # 4 positions, 16 x 16: the Gram route is the one taken


def test_cancelling_positions_tied_uses():
    rng = np.random.default_rng(51)
    params = {"w": jnp.asarray(rng.normal(size=(16, 16)), F64)}
    v = jnp.asarray(rng.normal(size=16), F64)

    def loss(p, ex):  # the same weight used twice, as x W and as W xᵀ, each over 2 positions
        x, c = ex
        first = jnp.sum(c[:2] * ((x[:2] @ p["w"]) @ v))
        second = jnp.sum(c[2:] * (v @ (p["w"].T @ x[2:].T)))
        return first + second

    p = _check_norms(loss, params, _cancelling_batch(rng))
    assert len(p.leaves[0].uses) == 2 and not p.leaves[0].fallback


def test_cancelling_lookups_of_one_row():
    """An embedding row looked up at several positions whose cotangents nearly cancel: the
    pairwise same-row form Σ_{t,s} [r_t = r_s] ⟨g_t, g_s⟩ kept only rounding noise (norms up
    to 20× too large at δ = 1e-9); each row's sum is formed, then squared."""
    rng = np.random.default_rng(52)
    params = {"e": jnp.asarray(rng.normal(size=(10, 16)), F64)}
    v = jnp.asarray(rng.normal(size=16), F64)
    tokens = jnp.tile(jnp.array([5, 5, 3, 3, 7, 1]), (len(DELTAS), 1))
    c = np.tile([1.0, -1.0, 2.0, -2.0, 0.0, 0.0], (len(DELTAS), 1))
    c[:, 1] -= DELTAS  # row 5's cotangents sum to -δ_i v; row 3's to 0
    c[:, 3] -= 1e-9

    def loss(p, ex):
        t, w = ex
        return jnp.sum(w[:, None] * p["e"][t] * v)

    p = _check_norms(loss, params, (tokens, jnp.asarray(c, F64)))
    assert "same-row" in p.leaves[0].route


def _check_unit_norms(loss, params, batch, units, rtol):
    """Each row's unit norm (whole and by chunks of 2) and the clipped sum with those units,
    against the loop's summed gradients, each relative to its own unit's (small) norm."""
    units = np.asarray(units)
    grads = reference_grads(loss, params, batch)
    sums = np.stack([grads[units == u].sum(axis=0) for u in units])
    want = np.linalg.norm(sums, axis=1)
    for chunk_size in (None, 2):
        got = per_example_norms(loss, chunk_size=chunk_size)(params, batch, units=units)
        for i, norm in enumerate(want):
            assert_rel_close(got[i], norm, rtol=rtol)
    clip = float(np.median(want))
    f = clipped_grad(loss, l2_clip=clip, reduction="sum")
    got = np.concatenate(
        [np.ravel(x) for x in jax.tree_util.tree_leaves(f(params, batch, units=units))]
    )
    assert_rel_close(got, (grads * np.minimum(1, clip / want)[:, None]).sum(axis=0), rtol=rtol)


def test_units_whose_rows_cancel():
    """Two rows of a unit with gradients g and -(1 + δ) g: the Gram sum over the unit's pairs
    kept rounding noise (the whole norm at δ = 1e-10); such a batch forms each unit's gradient
    by a weighted pass instead."""
    rng = np.random.default_rng(53)
    params = {"w": jnp.asarray(rng.normal(size=(16, 8)) / 4, F64), "b": jnp.zeros(8, F64)}
    x0 = rng.normal(size=16)
    x = jnp.asarray(np.stack([x0, x0, x0, x0, rng.normal(size=16)]), F64)

    def loss(p, ex):
        xe, c = ex
        return c * jnp.sum(jnp.tanh(xe @ p["w"] + p["b"]))

    for delta in (1e-2, 1e-6, 1e-10):
        c = jnp.asarray([1.0, -(1 + delta), 2.0, -2.0 * (1 + 3 * delta), 1.0], F64)
        _check_unit_norms(loss, params, (x, c), [0, 0, 1, 1, 2], rtol=max(1e-12, 1e-15 / delta))


def test_units_of_rows_whose_positions_cancel():
    """Units of two rows, each row's four positions cancelling to 1e-5 of their terms: the
    Gram entries between the rows round to ~1e-6 of the unit's squared norm (the square of
    the conditioning), which the rows' pairwise diagonals betray; the units' gradients are
    formed (rounding ~1e-11)."""
    rng = np.random.default_rng(54)
    a, a2 = rng.normal(size=16), rng.normal(size=16)
    params = {"w": jnp.asarray(rng.normal(size=(16, 16)) / 4, F64)}
    v = jnp.asarray(rng.normal(size=16), F64)

    def loss(p, ex):
        x, c = ex
        return jnp.sum(c[:, None] * (x @ p["w"]) * v)

    x = jnp.asarray(np.stack([np.stack([a, a, a2, a2])] * 4), F64)
    c = [[1.0, -(1 + 1e-5 * (i + 1)), 0.5, -0.5 * (1 + 1e-5)] for i in range(4)]
    _check_unit_norms(loss, params, (x, jnp.asarray(c, F64)), [0, 0, 1, 1], rtol=1e-9)
