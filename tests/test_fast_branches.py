"""``cond``/``switch`` branches and custom derivatives: exact, with the route in the plan.

Float64; norms and clipped sums against ``method="vmap"`` and a Python loop over examples.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import F64, assert_rel_close, flat
from test_fast_scan import _check, _normal, _routes

import jaxgrad
from jaxgrad import reduce
from jaxgrad.fast import passes, per_example_norms, plan


def _setup():
    rng = np.random.default_rng(50)
    return {"w": _normal(rng, 4, 4), "s": _normal(rng, 4)}, _normal(rng, 7, 4, scale=1.0)


def test_switch_with_per_example_index_and_a_use_outside():
    params, batch = _setup()

    def loss(p, x):
        branches = [
            lambda x: jnp.tanh(x @ p["w"]),
            lambda x: jnp.sin(p["w"] @ x) * p["s"],  # W on the other side, and a scale
            lambda x: x,  # W not used at all
        ]
        h = jax.lax.switch(jnp.argmax(x) % 3, branches, x)
        return jnp.sum(h**2) + jnp.sum(jnp.tanh(x @ p["w"]))

    assert len(set(np.asarray(jnp.argmax(batch, axis=1) % 3))) == 3  # every branch taken
    routes = _routes(_check(loss, params, batch))
    assert routes["['w']"].startswith("tied, 3 uses")


def test_cond_with_a_predicate_shared_by_all_examples():
    params, batch = _setup()

    def loss(p, x):  # the predicate reads only params: one branch for the whole batch
        h = jax.lax.cond(p["s"][0] > 0, lambda x: x @ p["w"], lambda x: -(x @ p["w"].T), x)
        return jnp.sum(jnp.tanh(h) ** 2)

    for sign in (1.0, -1.0):
        p = {**params, "s": params["s"].at[0].set(sign)}
        routes = _routes(_check(loss, p, batch))
        assert routes["['w']"].startswith("tied, 2 uses")


def test_custom_vjp_falls_back_visibly_and_keeps_its_rule():
    params, batch = _setup()

    @jax.custom_vjp
    def scaled_matmul(x, w):
        return x @ w

    # the custom rule halves W's gradient: inlining the function body would be wrong
    scaled_matmul.defvjp(
        lambda x, w: (x @ w, (x, w)), lambda r, g: (r[1] @ g, 0.5 * jnp.outer(r[0], g))
    )

    def loss(p, x):
        return jnp.sum(jnp.tanh(scaled_matmul(x, p["w"])) ** 2) + jnp.sum(p["s"] * x)

    p = _check(loss, params, batch)
    (w,) = [lp for lp in p.leaves if lp.path == "['w']"]
    assert w.fallback and "the `custom_vjp` function `scaled_matmul`" in w.reason, w
    assert "bwd rule" in w.reason, w
    assert per_example_norms(loss)(params, batch).shape == (7,)


def test_custom_rules_closing_over_traced_values_are_materialised_exactly():
    # A rule that closes over a value traced with the loss (the DEQ pattern: a custom_vjp
    # given `lambda w: f(x, w)`; a custom_gradient defined in the loss) keeps that trace's
    # tracers: the fast path, which binds the rule again, materialises instead, and says so.
    params, batch = _setup()

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def apply(f, w):
        return f(w)

    apply.defvjp(lambda f, w: (f(w), w), lambda f, w, g: (jax.vjp(f, w)[1](g)[0],))

    def implicit(p, x):
        return jnp.sum(apply(lambda w: jnp.tanh(x @ w), p["w"]) * p["s"])

    def gated(p, x):
        m = jax.lax.stop_gradient(jnp.sum(p["s"] ** 2))

        @jax.custom_gradient
        def act(h):
            return jnp.tanh(h), lambda g: (g * m * (1 - jnp.tanh(h) ** 2),)

        return jnp.sum(act(x @ p["w"]) * p["s"])

    for loss in (implicit, gated):
        p = plan(loss, params, batch[0])
        assert all("closes over a value traced" in lp.reason for lp in p.leaves), p
        grads = np.stack([flat(jax.grad(loss)(params, x)) for x in batch])
        assert_rel_close(
            per_example_norms(loss)(params, batch), np.linalg.norm(grads, axis=1), 1e-12
        )
        gram = jaxgrad.gradient_gram(loss)(params, batch)
        assert_rel_close(gram, grads @ grads.T, 1e-12)


def test_a_callback_that_cannot_be_batched_names_the_fix():
    # A host-side projection (straight-through gradient) of W: `vmap(grad)` keeps W unbatched,
    # but the exact fallback batches a copy of W per example, and a `pure_callback` without
    # `vmap_method` cannot be batched. The error says so and how to fix the call.
    params, batch = _setup()
    params = {**params, "w": jnp.stack([params["w"], params["w"].T[::-1]])}

    def project(w, vmap_method=None):
        clip = lambda a: np.clip(np.asarray(a), -0.4, 0.4)
        out = jax.ShapeDtypeStruct(w.shape, w.dtype)
        return jax.pure_callback(clip, out, w, vmap_method=vmap_method)

    def make(vmap_method):
        @jax.custom_vjp
        def proj(w):
            return project(w, vmap_method)

        proj.defvjp(lambda w: (project(w, vmap_method), None), lambda _, g: (g,))

        def loss(p, x):  # in a layer stack, the projection's rule runs on the exact fallback
            layer = lambda h, w: (jnp.tanh(h @ proj(w)), None)
            return jnp.sum(jax.lax.scan(layer, x, p["w"])[0] ** 2) + jnp.sum(p["s"] * x)

        return loss

    with pytest.raises(NotImplementedError, match=r"vmap_method='sequential'.*method='vmap'"):
        per_example_norms(make(None))(params, batch)
    ref = [np.linalg.norm(flat(jax.grad(make(None))(params, x))) for x in batch]
    assert_rel_close(per_example_norms(make(None), method="vmap")(params, batch), ref, 1e-12)
    assert_rel_close(per_example_norms(make("sequential"))(params, batch), ref, 1e-12)


def test_cond_inside_a_scan_body():
    """A ``cond`` in a scan body, by a per-example predicate (a select under ``vmap``) and by
    the step counter (one branch per step for the whole batch): each branch's uses are
    captured at every step (zero cotangent where another branch ran) and lifted over the
    steps, exact against a loop over examples."""
    rng = np.random.default_rng(51)
    params = {"w": _normal(rng, 4, 4), "v": _normal(rng, 4, 4)}
    batch = _normal(rng, 5, 6, 4, scale=1.0)  # 5 examples of 6 steps

    def loss(p, xs):
        def step(h, ix):
            i, x = ix
            h = jax.lax.cond(
                jnp.sum(x) > 0,
                lambda h: jnp.tanh(h @ p["w"] + x),
                lambda h: jnp.sin(x @ p["v"].T) * h,
                h,
            )
            h = jax.lax.cond(i % 2 == 0, lambda h: h @ p["v"], lambda h: h, h)
            return h, h

        _, ys = jax.lax.scan(step, jnp.ones(4, xs.dtype) / 2, (jnp.arange(6), xs))
        return jnp.sum(jnp.tanh(ys) ** 2)

    p = _check(loss, params, batch)
    (v,) = [lp for lp in p.leaves if lp.path == "['v']"]
    assert not v.fallback and v.route.startswith("tied, 2 uses"), v
    assert any(u.endswith("in cond branch 1 in scan") for u in v.uses), v.uses
    (w,) = [lp for lp in p.leaves if lp.path == "['w']"]
    assert w.route.startswith("scan, 6 steps, shared; cond branch 1: dense"), w


def _exact_on_one_pass(loss, params, batch, mask):
    """Norms, the clipped sum, dots with a reference and the Gram matrix, all from ONE fast
    pass (the parts ``per_example_norms``, ``clipped_grad``, ``per_example_dots`` and
    ``gradient_gram`` read), against ``vmap(grad)`` in float64."""
    summed = lambda p, ex: reduce.as_sum_count(loss(p, ex))[0]
    j = jax.jit(jax.vmap(jax.grad(summed), in_axes=(None, 0)))(params, batch)
    j = np.concatenate([np.reshape(x, (x.shape[0], -1)) for x in jax.tree.leaves(j)], axis=1)
    j = j * np.asarray(mask)[:, None]
    norms = np.linalg.norm(j, axis=1)
    assert np.sum(norms > 0) >= 3
    clip = float(np.median(norms[norms > 0]))
    ref = [jnp.cos(jnp.arange(x.size, dtype=F64)).reshape(x.shape) for x in jax.tree.leaves(params)]

    @jax.jit
    def fast(params, batch, mask):
        parts = passes.fast_pass(loss, params, batch, mask)
        c = jnp.minimum(1.0, clip / jnp.maximum(jnp.sqrt(parts.norm_sq), 1e-300))
        return parts.norm_sq, parts.weighted(c), parts.dots(ref), passes.gram(parts, parts)

    norm_sq, total, dots, gram = fast(params, batch, mask)
    assert_rel_close(np.sqrt(norm_sq), norms)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(total)])
    assert_rel_close(flat, np.minimum(1.0, clip / np.maximum(norms, 1e-300)) @ j)
    assert_rel_close(dots, j @ np.concatenate([np.ravel(x) for x in ref]))
    assert_rel_close(gram, j @ j.T)


def _frames_setup():
    rng = np.random.default_rng(52)
    params = {
        "a": _normal(rng, 4, 4),  # in a scan inside a branch
        "b": _normal(rng, 4, 4),  # in a cond inside a branch
        "c": _normal(rng, 2, 4, 4),  # a stack scanned over, in a scan in a branch in a scan
        "d": _normal(rng, 3, 4, 4),  # scanned over by a scan, read in a branch in its body
        "f": _normal(rng, 2, 4, 4),  # scanned over by a scan in a branch
        "e": _normal(rng, 6, 4),  # looked up in a scan inside a branch
    }
    xs = _normal(rng, 5, 3, 4, scale=1.0)  # 5 examples of 3 steps
    tokens = jnp.asarray([[1, 1, 4], [0, 2, 2], [5, 5, 5], [3, 1, 3], [2, 0, 2]])  # repeats
    return params, (xs, tokens)


def _frames_loss(p, ex, flag=1.0):
    """Frames nested in every order: a scan in a branch, a cond in a branch, a scan in a
    branch in a scan, by a per-example index and by one shared by every example (``flag``,
    the step counter)."""
    xs, tokens = ex

    def rnn(h):  # a scan over the example's steps, reading ``a`` and the table ``e``
        step = lambda h, xt: (jnp.tanh(h @ p["a"] + xt[0] * p["e"][xt[1]]),) * 2
        return jax.lax.scan(step, h, (xs, tokens))[1][-1]

    stack = lambda w, x: lambda h: jax.lax.scan(lambda g, v: (jnp.tanh(g @ v + x),) * 2, h, w)[0]
    h = jax.lax.cond(jnp.sum(xs[0]) > 0, rnn, stack(p["f"], 0.0), jnp.ones(4, xs.dtype) / 2)
    inner = lambda h: jax.lax.cond(xs[1, 0] > 0, lambda h: h @ p["b"], lambda h: -(h @ p["b"].T), h)
    h = jax.lax.cond(flag > 0, inner, jnp.cos, h)  # per-example index in a shared one

    def layer(h, ixw):  # the stack ``c`` scanned over by a loop in a branch in a loop
        i, x, w = ixw
        h = jax.lax.cond(i % 2 == 0, stack(p["c"], x), lambda h: jnp.sin(h @ w), h)  # by step
        return h, h

    ys = jax.lax.scan(layer, h, (jnp.arange(3), xs, p["d"]))[1]
    return jnp.sum(jnp.tanh(ys) ** 2), jnp.sum(tokens > 1) + 1  # a (sum, count) loss


def test_frames_nested_in_any_order_are_fast_and_exact():
    """Scan in cond, cond in cond, scan in cond in scan: captured by the one evaluator and
    shown fast in the plan, with every frame; exact against ``vmap(grad)`` in float64 with a
    mask and a (sum, count) loss. A lookup lifted over a scan's steps is not marked unique
    (the steps repeat tokens)."""
    params, batch = _frames_setup()
    _exact_on_one_pass(_frames_loss, params, batch, jnp.asarray([True, True, False, True, True]))

    example = jax.tree.map(lambda x: x[0], batch)
    leaves = {lp.path: lp for lp in plan(_frames_loss, params, example).leaves}
    assert not any(lp.fallback for lp in leaves.values()), leaves
    a, b, c, d, e, f = (leaves[f"['{k}']"] for k in "abcdef")
    assert a.route.startswith("cond branch 1; scan, 3 steps, shared: dense"), a
    assert b.route.startswith("tied, 2 uses"), b
    assert b.uses[1].endswith("in cond branch 1 in cond branch 1"), b.uses
    assert c.route.startswith("scan, 3 steps, shared; cond branch 1; nested scan, 2 steps, one"), c
    assert d.route.startswith("scan, 3 steps, one slice per step; cond branch 0: dense"), d
    assert f.route.startswith("cond branch 0; scan, 2 steps, one slice per step: dense"), f
    assert e.uses[0].startswith("gather") and e.uses[0].endswith("in scan in cond branch 1"), e
    an = passes.analyse(_frames_loss, params, batch)
    assert not an.fast[4][0].op.params["unique_indices"]


@jax.custom_jvp
def _half_layer(x, w):
    return jnp.tanh(x @ w)


@_half_layer.defjvp
def _half_layer_jvp(primals, tangents):  # half the derivative for w: walking the body is wrong
    (x, w), (dx, dw) = primals, tangents
    y = _half_layer(x, w)
    return y, (1 - y**2) * (dx @ w + 0.5 * (x @ dw))


@jax.custom_jvp
def _same_for_all(x, w):  # the value does not read x; the rule's tangent does
    return jnp.tanh(jnp.sum(w, axis=0))


_same_for_all.defjvp(lambda p, t: (_same_for_all(*p), p[0] @ t[1] + 0.0 * t[0]))


@jax.custom_jvp
def _quantise(w):  # a straight-through estimator: rounded value, identity derivative
    return jnp.round(4 * w) / 4


_quantise.defjvp(lambda p, t: (_quantise(*p), t[0]))


def test_custom_jvp_rule_is_read_linearised_and_kept():
    """A parameter operand of a ``custom_jvp`` call is read through the user's rule (its
    tangent map, the map ``jax.grad`` transposes), not the function's body: fast where the
    tangent map uses it densely, at the top level and in a scan, exact against
    ``vmap(grad)`` with a rule that is not the body's derivative, an output the example does
    not reach but the rule's tangent does, and a straight-through estimator."""
    rng = np.random.default_rng(53)
    params = {"w": _normal(rng, 4, 4), "u": _normal(rng, 4, 4), "v": _normal(rng, 4, 3)}
    batch = _normal(rng, 5, 3, 4, scale=1.0)

    def loss(p, xs):
        step = lambda h, x: (_half_layer(h + x, p["w"]),) * 2
        h = jax.lax.scan(step, _half_layer(xs[0], p["w"]), xs)[0]
        h = h + _same_for_all(xs[1], p["u"])
        return jnp.sum(jnp.sin(h @ _quantise(p["v"])) ** 2)

    _exact_on_one_pass(loss, params, batch, jnp.asarray([True, False, True, True, True]))
    leaves = {lp.path: lp for lp in plan(loss, params, batch[0]).leaves}
    w, u, v = leaves["['w']"], leaves["['u']"], leaves["['v']"]
    assert w.route.startswith("tied, 2 uses"), w
    assert w.uses[1].endswith("(_half_layer_jvp) in custom_jvp rule in scan"), w.uses
    assert u.route == "custom_jvp rule: dense: |a|²|g|²", u
    # (the straight-through estimator's tangent map is the identity: v's use is the dense use)
    assert v.route.startswith("straight-through (identity Jacobian) of a summed weight"), v
    assert v.route.endswith("dense: |a|²|g|²"), v
