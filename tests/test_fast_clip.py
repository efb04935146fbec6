"""Clipped gradients (DP-SGD style): the fast path against numpy on materialised gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import CASES, assert_rel_close, case, flat, materialised

import jaxgrad
from jaxgrad.fast import clipped_grad


def numpy_clipped(g, clip, mask, counts, reduction):
    norms = np.linalg.norm(g, axis=1)
    factors = np.where(norms > clip, clip / np.maximum(norms, 1e-300), 1.0) * mask
    total = factors @ g
    return (total / np.sum(counts * mask) if reduction == "mean" else total), norms * mask


@functools.cache
def item_counts(name):
    """The case's per-example item counts, once per session: jitted, where an eager vmap
    compiles every primitive of the model on its own."""
    loss, params, batch = case(name)
    count = lambda p, ex: jaxgrad.reduce.as_sum_count(loss(p, ex))[1]
    return np.asarray(jax.jit(jax.vmap(count, in_axes=(None, 0)))(params, batch))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_clipped_mean_matches_numpy(name):
    loss, params, batch = case(name)
    g = materialised(name)
    size = g.shape[0]
    mask = np.ones(size, bool)
    mask[1] = False
    clip = float(np.median(np.linalg.norm(g, axis=1)))  # about half the examples clipped
    f = clipped_grad(loss, l2_clip=clip, return_norms=True)
    got, norms = f(params, batch, jnp.asarray(mask))
    expected, expected_norms = numpy_clipped(g, clip, mask, item_counts(name), "mean")
    assert_rel_close(flat(got), expected)
    assert_rel_close(norms, expected_norms)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params)


@pytest.mark.parametrize(("method", "chunk_size"), [("auto", 3), ("vmap", None)])
def test_clipped_sum_methods_and_chunks(method, chunk_size):
    loss, params, batch = case("transformer")
    g = materialised("transformer")
    mask = np.array([True, True, False, True])
    clip = 0.5 * float(np.max(np.linalg.norm(g, axis=1)))
    f = clipped_grad(loss, l2_clip=clip, reduction="sum", method=method, chunk_size=chunk_size)
    expected, _ = numpy_clipped(g, clip, mask, item_counts("transformer"), "sum")
    assert_rel_close(flat(f(params, batch, jnp.asarray(mask))), expected)


def test_large_clip_is_batch_grad_with_token_counts():
    # The mean divides by the real items (tokens here), so without clipping it is batch_grad.
    loss, params, batch = case("tied")
    mask = jnp.array([True, True, True, False, True])
    got = clipped_grad(loss, l2_clip=1e12)(params, batch, mask)
    assert_rel_close(flat(got), flat(jaxgrad.batch_grad(loss)(params, batch, mask).grads))


def test_under_outer_jit_with_a_traced_value_in_the_loss():
    loss, params, batch = case("mlp")

    @jax.jit
    def both(p, b, scale):
        scaled = lambda q, ex: loss(q, ex) * scale  # closes over a tracer of the outer jit
        fast = clipped_grad(scaled, l2_clip=0.3)(p, b)
        return fast, clipped_grad(scaled, l2_clip=0.3, method="vmap")(p, b)

    fast, ref = both(params, batch, 2.0)
    assert_rel_close(flat(fast), flat(ref))
    g = 2.0 * materialised("mlp")
    expected, _ = numpy_clipped(g, 0.3, np.ones(g.shape[0]), np.ones(g.shape[0]), "mean")
    assert_rel_close(flat(fast), expected)


def test_every_example_clipped_has_norm_at_most_clip():
    loss, params, batch = case("cnn")
    clip = 1e-3
    got = clipped_grad(loss, l2_clip=clip, reduction="sum")(params, batch)
    size = materialised("cnn").shape[0]
    assert np.linalg.norm(flat(got)) <= size * clip * (1 + 1e-12)


@pytest.mark.parametrize("clip", [0, -1.0, float("nan"), float("inf"), "1", True, None])
def test_bad_clip(clip):
    with pytest.raises(ValueError, match="`l2_clip` must be a positive finite number"):
        clipped_grad(lambda p, x: p * x, l2_clip=clip)


def test_bad_reduction_and_method():
    with pytest.raises(ValueError, match=r"`reduction` must be one of \['mean', 'sum'\]"):
        clipped_grad(lambda p, x: p * x, l2_clip=1.0, reduction="max")
    with pytest.raises(
        ValueError, match=r"`method` must be one of \['auto', 'vmap'\]; got 'ghost'"
    ):
        clipped_grad(lambda p, x: p * x, l2_clip=1.0, method="ghost")


def test_bad_mask_and_batch():
    loss, params, batch = case("mlp")
    f = clipped_grad(loss, l2_clip=1.0)
    with pytest.raises(
        ValueError, match=r"`mask` must have shape \(7,\) to match the batch; got \(6,\)"
    ):
        f(params, batch, jnp.ones(6, bool))
    with pytest.raises(ValueError, match="`batch` leaves must share a leading axis"):
        f(params, (batch[0], batch[1][:3]))


# --- issue 11: a non-finite example, return_loss ---------------------------------------------


def _nan_case():
    loss = lambda w, ex: jnp.sum(jnp.tanh(ex @ w))
    w = jnp.arange(6.0).reshape(3, 2) / 10
    x = jnp.arange(12.0).reshape(4, 3) / 7
    return loss, w, x.at[2, 1].set(jnp.nan)


def _loop_clipped(loss, w, rows, clip):  # reference: a Python loop over single examples
    total = jnp.zeros_like(w)
    for x in rows:
        g = jax.grad(loss)(w, x[None])
        total = total + g * min(1.0, clip / float(jnp.linalg.norm(g)))
    return total


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_nonfinite_example_raises_by_default_and_names_the_row(method):
    loss, w, x = _nan_case()
    with pytest.raises(FloatingPointError, match=r"1 of 4 examples .*rows \[2\]"):
        clipped_grad(loss, l2_clip=0.5, method=method)(w, x)


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_nonfinite_drop_leaves_the_example_out(method, chunk_size):
    loss, w, x = _nan_case()
    f = clipped_grad(
        loss,
        l2_clip=0.5,
        nonfinite="drop",
        return_norms=True,
        method=method,
        chunk_size=chunk_size,
    )
    g, norms = f(w, x)
    kept = [0, 1, 3]
    want = _loop_clipped(loss, w, x[jnp.array(kept)], 0.5) / len(kept)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-10)
    assert int(jnp.sum(~jnp.isfinite(norms))) == 1  # the count of dropped examples
    # The same as masking the example out by hand.
    masked = clipped_grad(loss, l2_clip=0.5, method=method)(
        w, x.at[2].set(0.0), jnp.array([True, True, False, True])
    )
    np.testing.assert_allclose(np.asarray(g), np.asarray(masked), rtol=1e-10)


def test_nonfinite_drop_of_every_example_is_nan_not_zero():
    loss, w, x = _nan_case()
    g = clipped_grad(loss, l2_clip=0.5, nonfinite="drop")(w * jnp.nan, x)
    assert np.isnan(np.asarray(g)).all()
    g = clipped_grad(loss, l2_clip=0.5, nonfinite="propagate")(w, x)
    assert np.isnan(np.asarray(g)).all()
    with pytest.raises(ValueError, match="`nonfinite`"):
        clipped_grad(loss, l2_clip=0.5, nonfinite="ignore")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_clipped_grad_return_loss(reduction):
    loss, w, x = _nan_case()
    x = x.at[2, 1].set(0.3)
    value, g, norms = clipped_grad(
        loss, l2_clip=0.5, reduction=reduction, return_loss=True, return_norms=True
    )(w, x)
    total = sum(float(loss(w, r[None])) for r in x)
    np.testing.assert_allclose(float(value), total / 4 if reduction == "mean" else total)
    assert norms.shape == (4,)
    np.testing.assert_allclose(
        np.asarray(g),
        np.asarray(clipped_grad(loss, l2_clip=0.5, reduction=reduction)(w, x)),
        rtol=1e-12,
    )


# A dense use's weighted sum Σ_i c_i ∇_W S_i is one 2-D matmul of the examples' rows
# (linear.dense_rows); other layouts (dot batch dims) take the use's batched VJP.
DENSE_LAYOUTS = {
    "x @ W": ((3, 4), (4, 5), (((1,), (0,)), ((), ())), 1),
    "W @ x": ((5, 4), (4, 3), (((1,), (0,)), ((), ())), 0),
    "two contracted axes, swapped": ((3, 2, 4), (4, 2, 5), (((1, 2), (1, 0)), ((), ())), 1),
    "no positions": ((4,), (4, 5), (((0,), (0,)), ((), ())), 1),
    "W @ x.T, out (W's free, positions)": ((6, 4), (3, 4), (((1,), (1,)), ((), ())), 0),
    "dot batch axis (VJP route)": ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,))), 1),
}


@pytest.mark.parametrize("layout", sorted(DENSE_LAYOUTS))
def test_dense_weighted_sum_in_every_layout(layout):
    """``linear.weighted_grad`` of a ``dot_general`` use, examples at axis 0 or (step-major, as
    a scan captures them) axis 1, against ``Σ_i c_i jax.grad(⟨G_i, op(A_i, W)⟩)`` in float64."""
    from jaxgrad.fast import linear
    from jaxgrad.fast.program import Eqn

    lhs, rhs, dims, pos = DENSE_LAYOUTS[layout]
    shapes = [lhs, rhs]
    op = lambda a, w: jax.lax.dot_general(*((w, a) if pos == 0 else (a, w)), dims)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=shapes[pos]))
    a_ex = jnp.zeros(shapes[1 - pos], jnp.float64)
    e = jax.make_jaxpr(op)(a_ex, w).jaxpr.eqns[0]
    avals = [v.aval for v in e.invars]
    eqn = Eqn(e.primitive, e.params, [], [], avals, [v.aval for v in e.outvars])
    size = 3
    a = rng.normal(size=(size, *a_ex.shape))
    g = rng.normal(size=(size, *eqn.out_avals[0].shape))
    c = rng.uniform(0.1, 1.0, size)
    one = lambda a_i, g_i: jax.grad(lambda v: jnp.sum(op(a_i, v) * g_i))(w)
    expected = jnp.tensordot(c, jax.vmap(one)(a, g), 1)
    for axis in {0, min(1, a.ndim - 1, g.ndim - 1)}:
        a_in, g_in = jnp.moveaxis(jnp.asarray(a), 0, axis), jnp.moveaxis(jnp.asarray(g), 0, axis)
        got = linear.weighted_grad(eqn, pos, a_in, g_in, jnp.asarray(c), axis=axis)
        assert_rel_close(got, expected)
        two_d = linear.dense_rows(eqn, pos, a_in, g_in, axis) is not None
        assert two_d == ("VJP" not in layout)


def test_conv_route_keeps_its_per_example_gradient_when_small(monkeypatch):
    """A convolution whose kernel is no larger than its per-example input and output forms
    and keeps its per-example gradient where a weighted sum is taken (the clipped sum reads
    it); a kernel larger than them is contracted again. Both clip exactly (float64, vs
    vmap)."""
    from jaxgrad.fast import plan

    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x[None], k, (1, 1), "SAME", dimension_numbers=dn
    )[0]

    def loss(p, x):  # k1: 54 entries on a (6, 6, 2) image; k2: 600 on a (2, 2, 3) map
        h = jnp.tanh(conv(x, p["k1"]))[::3, ::3]
        return jnp.sum(jnp.tanh(conv(h, p["k2"])) ** 2)

    rng = np.random.default_rng(0)
    params = {"k1": rng.normal(size=(3, 3, 2, 3)) / 3, "k2": rng.normal(size=(5, 5, 3, 8)) / 6}
    params = jax.tree_util.tree_map(jnp.asarray, params)
    batch = jnp.asarray(rng.normal(size=(4, 6, 6, 2)))
    routes = {lp.path: lp.route for lp in plan(loss, params, batch[0]).leaves}
    kept = "; weighted sum: per-example gradient formed and kept"
    assert routes["['k1']"] == "conv: one kernel offset at a time" + kept
    assert routes["['k2']"] == "conv: one kernel offset at a time"
    clip = 0.5 * float(np.median(jaxgrad.per_example_norms(loss, method="vmap")(params, batch)))
    f = lambda m: clipped_grad(loss, l2_clip=clip, reduction="sum", method=m)(params, batch)
    contracted = _record_contractions(monkeypatch)
    assert_rel_close(flat(f("auto")), flat(f("vmap")))
    assert contracted == [(5, 5, 3, 8)]  # k1's sum read off its kept gradients


def _record_contractions(monkeypatch):
    """The weight shapes ``linear.weighted_grad`` (A and G contracted again) is called for."""
    from jaxgrad.fast import linear

    calls, original = [], linear.weighted_grad
    record = lambda eqn, pos, *a, **k: (
        calls.append(eqn.in_avals[pos].shape) or original(eqn, pos, *a, **k)
    )
    monkeypatch.setattr(linear, "weighted_grad", record)
    return calls


def test_tied_uses_weighted_sum_reads_their_formed_gradient(monkeypatch):
    """Tied uses of a 3-D weight (no outer form) have their per-example gradient formed for
    the norm; the clipped sum reads it (no use contracted again), exact against vmap."""

    def loss(p, x):  # x (5, 3); w (3, 2, 4) read by two dense uses
        h = jnp.tanh(jnp.einsum("tk,kab->tab", x, p["w"]))
        return jnp.sum(jnp.tanh(jnp.einsum("tab,kab->tk", h, p["w"])) ** 2)

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2, 4)))}
    batch = jnp.asarray(rng.normal(size=(6, 5, 3)))
    f = lambda m: clipped_grad(loss, l2_clip=0.3, reduction="sum", method=m)(params, batch)
    contracted = _record_contractions(monkeypatch)
    assert_rel_close(flat(f("auto")), flat(f("vmap")))
    assert contracted == []
