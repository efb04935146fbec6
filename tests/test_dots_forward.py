"""``per_example_dots`` by forward mode (``jax.jvp`` along the reference ``v``) and the route
it takes: forward wherever ``jax.jvp`` can differentiate the loss (fast uses, the exact
fallback's leaves, a ``while_loop`` reverse mode cannot take), the factored fast pass through
a ``custom_vjp``; exact against ``vmap(grad)``-then-dot in float64, the route asserted from
the plan and from the pass that ran."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import F64, assert_rel_close, case
from test_fast_scan import _rnn_setup, rnn_loss

import jaxgrad
from jaxgrad import reduce
from jaxgrad.fast import passes


def _dots_reference(loss, params, batch, v, args=()):
    """``(B,)`` ``⟨∇S_i, v⟩`` from per-example gradients of the loss sums (``vmap(grad)``)."""
    summed = lambda p, ex: reduce.as_sum_count(loss(p, ex, *args))[0]
    grads = jax.jit(jax.vmap(jax.grad(summed), in_axes=(None, 0)))(params, batch)
    rows = [np.reshape(g, (g.shape[0], -1)) for g in jax.tree_util.tree_leaves(grads)]
    j = np.concatenate(rows, axis=1)
    assert np.sum(np.linalg.norm(j, axis=1) > 0) >= 2  # a test that can only pass is a defect
    return j @ np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(v)])


def _reference_tree(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=np.shape(x)), F64), params)


@pytest.fixture
def ran(monkeypatch):
    """The passes ``per_example_dots`` ran while tracing: "forward" and/or "factored"."""
    taken = []

    def spy(name, fn):
        def wrapped(*a, **k):
            taken.append(name)
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(passes, "forward_dots", spy("forward", passes.forward_dots))
    monkeypatch.setattr(passes, "fast_pass", spy("factored", passes.fast_pass))
    return taken


def check(ran, way, loss, params, batch, *, mask=None, args=(), chunk_size=None, expected=None):
    """``per_example_dots`` (``"auto"``) took route ``way`` (per the plan and per the pass
    that ran) and equals ``expected`` (default: ``vmap(grad)``-then-dot); padded rows 0."""
    example = jax.tree_util.tree_map(lambda x: x[0], batch)
    assert jaxgrad.fast.plan(loss, params, example, *args).dots.way == way
    v = _reference_tree(params)
    f = jaxgrad.per_example_dots(loss, chunk_size=chunk_size)
    got = f(params, batch, mask, *args, reference=v)
    assert set(ran) == {way}, ran
    if expected is None:
        expected = _dots_reference(loss, params, batch, v, args)
    if mask is not None:
        expected = np.where(mask, expected, 0)
    assert_rel_close(got, expected)
    return v, got


def test_mlp_forward_and_forced_factored(ran):
    loss, params, batch = case("mlp")
    mask = jnp.arange(batch[0].shape[0]) != 1
    v, got = check(ran, "forward", loss, params, batch, mask=mask)
    factored = jaxgrad.per_example_dots(loss, method="factored")
    assert_rel_close(factored(params, batch, mask, reference=v), got)
    assert ran[-1] == "factored"


@pytest.mark.parametrize("channels, way", [(4, "forward"), (1, "factored")])
def test_convolutions_by_their_input_channels(ran, channels, way):
    """A convolution of 4 input channels is pushed forward; one of a 1-channel image, whose
    tangent ``conv(x, V)`` XLA:CPU is slow at, takes the factored route (by kernel offsets)."""
    rng = np.random.default_rng(4)
    params = {"k": jnp.asarray(rng.normal(size=(3, 3, channels, 2)) / 4, F64)}
    batch = jnp.asarray(rng.normal(size=(3, 5, 5, channels)), F64)
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(p, x):
        y = jax.lax.conv_general_dilated(x[None], p["k"], (2, 1), "SAME", dimension_numbers=dn)
        return jnp.sum(jnp.tanh(y) ** 2)

    check(ran, way, loss, params, batch)
    reason = jaxgrad.fast.plan(loss, params, batch[0]).dots.reason
    assert ("fewer than 4 channels" in reason) == (way == "factored"), reason


def test_scan_rnn_with_extra_argument_and_chunks_with_a_remainder(ran):
    params, batch = _rnn_setup()  # 5 examples in chunks of 2
    loss = lambda p, x, scale: rnn_loss(p, x * scale)
    mask = jnp.array([1, 1, 0, 1, 1], bool)
    args = (jnp.asarray(0.7, F64),)
    check(ran, "forward", loss, params, batch, mask=mask, args=args, chunk_size=2)


def test_fallback_leaves_and_a_while_loop_reverse_mode_cannot_take(ran):
    """Leaves the fast path cannot factor (an elementwise scale, a weight carried and changed
    by the scan) are exact in forward mode as they are; a ``while_loop`` with a trip count read
    from the example has no reverse mode at all (reference: the same loop unrolled)."""
    rng = np.random.default_rng(7)
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 3)) / 2, F64),
        "s": jnp.asarray(rng.normal(size=3), F64),
    }
    batch = jnp.asarray(rng.normal(size=(4, 3)), F64)

    def scanned(p, x):
        def step(carry, _):
            h, w = carry
            return (jnp.tanh(h @ w) * p["s"], w * 0.9), None

        (h, _), _ = jax.lax.scan(step, (x, p["w"]), None, length=3)
        return jnp.sum(h**2)

    routes = {lp.path: lp.route for lp in jaxgrad.fast.plan(scanned, params, batch[0]).leaves}
    assert routes == {"['s']": "exact fallback", "['w']": "exact fallback"}
    check(ran, "forward", scanned, params, batch)

    def looped(p, x, *, unrolled=False):  # 2 or 3 steps, by the example's first entry
        steps = 2 + (x[0] > 0)
        if unrolled:
            for k in range(3):
                x = jnp.where(k < steps, jnp.tanh(x @ p["w"]) * p["s"], x)
            return jnp.sum(x**2)
        body = lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["w"]) * p["s"])
        _, x = jax.lax.while_loop(lambda c: c[0] < steps, body, (0, x))
        return jnp.sum(x**2)

    ran.clear()
    v = _reference_tree(params)
    unrolled = lambda p, x: looped(p, x, unrolled=True)
    check(
        ran, "forward", looped, params, batch, expected=_dots_reference(unrolled, params, batch, v)
    )


def test_sum_count_loss_nan_padding_and_a_float32_leaf(ran):
    """A ``(loss_sum, n_items)`` loss (dots of the sums), a padded row whose loss is NaN (its
    dot 0), a float32 leaf dotted with a float64 reference (cast to the leaf's dtype)."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(4, 2)), F64), "b": jnp.float32(0.5)}
    x = rng.normal(size=(5, 4))
    x[3] = np.nan
    batch = jnp.asarray(x, F64)
    mask = jnp.arange(5) != 3

    def loss(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return jnp.sum(h**2), 2.0

    v = _reference_tree(params)
    got = jaxgrad.per_example_dots(loss)(params, batch, mask, reference=v)
    assert ran == ["forward"]
    clean = jnp.where(mask[:, None], batch, 0)
    expected = np.where(mask, _dots_reference(loss, params, clean, v), 0)
    assert_rel_close(got, expected, rtol=1e-6)  # (b's tangent in float32)
    # the pass alone, on the NaN row itself (no padding filled): masked after, never NaN
    direct = jax.jit(passes.forward_dots, static_argnums=0)(
        reduce.BoundLoss(loss), params, batch, mask, [v["b"], v["w"]]
    )
    assert np.isfinite(direct).all() and direct[3] == 0
    assert_rel_close(direct, expected, rtol=1e-6)


def test_custom_vjp_takes_the_factored_route_exactly(ran):
    """``jax.jvp`` cannot differentiate a ``custom_vjp`` function: the plan and the pass say
    factored, and the dots are the gradients' (the user's bwd rule, a nonlinear gradient clip,
    on a weight — a reparametrisation, its VJP per example — and on an activation)."""

    @jax.custom_vjp
    def clip_grad(h):
        return h

    clip_grad.defvjp(lambda h: (h, None), lambda _, g: (jnp.clip(g, -0.3, 0.3),))
    rng = np.random.default_rng(9)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), F64)}
    params["u"] = jnp.asarray(rng.normal(size=(4, 2)), F64)
    batch = jnp.asarray(rng.normal(size=(5, 3)), F64)

    def loss(p, x):
        return jnp.sum(jnp.sin(clip_grad(jnp.tanh(x @ clip_grad(p["w"]))) @ p["u"]))

    check(ran, "factored", loss, params, batch, mask=jnp.arange(5) != 2)


def test_bad_method_and_integer_leaves_are_named():
    loss = lambda p, x: jnp.sum(x @ p["w"])
    with pytest.raises(ValueError, match=r"`method` must be one of \['auto', 'factored', 'vmap'\]"):
        jaxgrad.per_example_dots(loss, method="forward")
    with pytest.raises(ValueError, match="`method`"):  # "factored" is for the dots only
        jaxgrad.per_example_norms(loss, method="factored")
    params = {"w": jnp.ones((2, 2)), "n": jnp.int32(3)}
    f = jaxgrad.per_example_dots(loss)
    with pytest.raises(TypeError, match=r"params\['n'\] is dtype int32"):
        f(params, jnp.ones((3, 2)), reference={"w": jnp.ones((2, 2)), "n": jnp.float32(0)})
    # an integer reference for the integer leaf: the params' own error, not the reference's
    with pytest.raises(TypeError, match=r"params\['n'\] is dtype int32"):
        f(params, jnp.ones((3, 2)), reference={"w": jnp.ones((2, 2)), "n": jnp.int32(0)})
