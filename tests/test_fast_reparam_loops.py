"""Scaled weights used inside loops and branches: ``W_eff = (θ' − m) ⊙ Π F_k`` read by a
dense or convolution use in a ``lax.scan`` body (shared by the steps), a ``cond`` branch, or
both nested, and transformations written inside the step function (hoisted before the loop).

Each case is checked in float64 against ``vmap(grad)`` (norms, per-leaf norms, a clipped-style
weighted sum, dots, the Gram matrix) with a padded row, and the plan must say ``scaled (...)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import F64, assert_rel_close
from test_fast_reparam import _check, _conv, _normal, _standardise

import jaxgrad
from jaxgrad.fast import plan
from jaxgrad.fast.hoist import SHARED_COPIES

jax.config.update("jax_enable_x64", True)

B = 4


def _wn(v, g):  # weight normalisation per output column
    return g * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))


def test_rnn_weight_normalised_inside_the_step():
    """A cell that normalises its recurrent weight at every step (as Flax and Equinox cells
    written by hand do): hoisted, then ``V`` keeps the scan's dense route with the scale on
    ``G`` and the normaliser's exact correction; ``g`` from ``A``, ``G`` and ``V``."""
    rng = np.random.default_rng(0)
    h, d, t = 5, 3, 4
    params = {
        "V": _normal(rng, h, h),
        "g": 1 + _normal(rng, h, scale=0.2),
        "U": _normal(rng, d, h),
        "o": _normal(rng, h, 2),
    }
    xs = _normal(rng, B, t, d)

    def loss(p, x):
        def step(c, x_t):
            c = jnp.tanh(c @ _wn(p["V"], p["g"]) + x_t @ p["U"])
            return c, None

        c = jax.lax.scan(step, jnp.zeros(h, F64), x)[0]
        return jnp.sum(jnp.sin(c @ p["o"]))

    routes = _check(loss, params, xs, fast=("['V']", "['U']"))
    v = routes["['V']"]
    assert v.route.startswith("scan, 4 steps, shared: scaled (mul, reduce_sum, sqrt, div)"), v
    assert "normaliser" in v.route and "in scan" in v.uses[0], v
    assert "scale of a scaled weight" in routes["['g']"].route, routes["['g']"]


def test_row_scaled_weight_in_nested_scans_and_a_branch():
    """``W * s[:, None] * M`` (a parameter per row, a constant mask per column) used by a
    scan nested in a scan, both sharing it, and by a ``cond`` branch inside the inner scan
    whose predicate depends on the example: the factors scale ``A`` and ``G`` at every step
    and are zero where the branch does not run."""
    rng = np.random.default_rng(1)
    h, t = 4, 3
    cols = jnp.asarray(np.arange(h) != 1, F64)
    params = {"W": _normal(rng, h, h), "s": 1 + _normal(rng, h, scale=0.2), "x": _normal(rng, h)}
    xs = _normal(rng, B, t, h)

    def loss(p, x):
        w = p["W"] * p["s"][:, None] * cols

        def inner(c, x_t):
            c = jnp.tanh(c @ w + x_t)
            c = jax.lax.cond(x_t[0] > 0, lambda c: jnp.sin(w @ c), lambda c: c, c)
            return c, None

        def outer(c, _):
            return jax.lax.scan(inner, c, x)[0], None

        c = jax.lax.scan(outer, p["x"], None, length=2)[0]
        return jnp.sum(c**2)

    routes = _check(loss, params, xs, fast=("['W']",))
    w = routes["['W']"]
    assert w.route.startswith("tied, 2 uses: scaled (mul)"), w  # (their cross terms too)
    assert "A and its output cotangent G" in w.route, w
    assert w.uses[0].endswith("via mul in scan in scan"), w
    assert w.uses[1].endswith("via mul in cond branch 1 in scan in scan"), w
    assert "scale of a scaled weight" in routes["['s']"].route, routes["['s']"]


def test_weight_standardised_conv_in_a_branch():
    """A weight-standardised kernel (per output channel: the mean an offset, ``1/σ`` a
    normaliser) used in one branch of a ``cond`` on the example: the convolution's own
    route, one kernel offset at a time, with the exact per-channel corrections."""
    rng = np.random.default_rng(2)
    params = {"k": _normal(rng, 3, 3, 2, 3), "o": _normal(rng, 3)}
    imgs = _normal(rng, B, 4, 4, 2)

    def loss(p, img):
        w = _standardise(p["k"], (0, 1, 2))
        conv = lambda x: jnp.tanh(_conv(x, w))
        other = lambda x: jnp.tanh(x[..., :1]) * jnp.ones(3)
        h = jax.lax.cond(img[0, 0, 0] < 0, conv, other, img)  # (examples 1 and 2: branch 1)
        return jnp.sum(jnp.sin(h @ p["o"]))

    routes = _check(loss, params, imgs, fast=("['k']",))
    k = routes["['k']"]
    assert k.route.startswith("cond branch 1: scaled ("), k
    assert "per-channel centring and normaliser made of the leaf" in k.route, k


def test_masked_weight_and_scaled_table_looked_up_inside_a_scan():
    """A full mask and a scaled, scattered lookup table read inside a scan body have no scaled
    form there (a lookup's factors are gathered at its rows at the top level only): both take
    the reparametrised VJP route, exact, and the plan names the user's line of the lookup
    (``E[t]``, a ``dynamic_slice`` rewritten as a gather), not the library's."""
    rng = np.random.default_rng(3)
    h, vocab, t = 4, 6, 3
    params = {"W": _normal(rng, h, h), "E": _normal(rng, vocab, h), "s": _normal(rng, vocab)}
    tokens = jnp.asarray(rng.integers(0, vocab, size=(B, t)))

    def loss(p, tok):
        w = p["W"] * jnp.tril(jnp.ones((h, h), F64))
        e = p["E"].at[0].set(0.0) * p["s"][:, None]

        def step(c, i):
            return jnp.tanh(e[i] + c @ w), None

        return jnp.sum(jnp.sin(jax.lax.scan(step, jnp.zeros(h, F64), tok)[0]))

    routes = _check(loss, params, tokens, reparam=("['W']", "['E']", "['s']"))
    assert routes["['E']"].uses[0].startswith("gather @ test_fast_reparam_loops.py:"), routes


@pytest.mark.parametrize("before", [5, 7])
def test_hoisted_chain_keeps_program_order(before):
    """A transformation chained over several equations (``w = V * s``, ``w + 0.5 w``) after
    ``before`` equations on the carry: the hoisted equations are emitted in program order
    (the moved set was iterated in hash order, which for indices past the set's table size
    put a reader before its producer: a ``KeyError`` in the re-trace, or a stale value)."""
    rng = np.random.default_rng(5)
    h, d, t = 4, 3, 3
    params = {"V": _normal(rng, h, h), "s": 1 + _normal(rng, h, scale=0.2), "W": _normal(rng, d, h)}
    xs = _normal(rng, B, t, d)

    def loss(p, x):
        def step(c, x_t):
            for _ in range(before):
                c = jnp.sin(c)
            w = p["V"] * p["s"]
            w = w + 0.5 * w
            return jnp.tanh(c @ w + x_t @ p["W"]), None

        return jnp.sum(jnp.sin(jax.lax.scan(step, jnp.ones(h, F64), x)[0]))

    _check(loss, params, xs, reparam=("['V']", "['s']"))


def test_weight_normalised_conv_inside_the_step():
    """A vocoder-style convolution whose kernel is weight-normalised inside the step
    function, applied to every frame: hoisted, then the kernel keeps the conv route over
    the scan's steps (folded into the convolution's batch axis) with the scale on ``G`` and
    the normaliser's exact correction."""
    rng = np.random.default_rng(5)
    params = {"V": _normal(rng, 2, 2, 2, 3), "g": 1 + _normal(rng, 3, scale=0.2)}
    xs = _normal(rng, B, 2, 3, 3, 2)  # (B, steps, H, W, C)

    def loss(p, x):
        def step(c, x_t):
            w = p["g"] * p["V"] / jnp.sqrt(jnp.sum(p["V"] ** 2, axis=(0, 1, 2)))
            return c + jnp.sum(jnp.tanh(_conv(x_t, w)) ** 2), None

        return jax.lax.scan(step, 0.0, x)[0]

    routes = _check(loss, params, xs, fast=("['V']",))
    v = routes["['V']"].route
    assert v.startswith("scan, 2 steps, shared: scaled (") and "normaliser" in v, v
    assert "conv: one kernel offset at a time" in v, v


def test_transformations_of_the_slices_a_scan_is_scanned_over():
    """A layer stack run by ``lax.scan`` over stacked weights that transforms each layer's
    slice in the step function (merged LoRA ``W0_l + A_l B_l`` times a shared scale, in a
    reverse scan; weight-standardised convolution kernels; weight normalisation in the outer
    scan of two, read by the inner one): the transformation is a function of the step, the
    same for every example, computed for every step before the loop (``jax.vmap`` over the
    stacked axis), and the stacked weights take the reparametrised route (the scaled one
    for weight normalisation) instead of the exact fallback."""
    rng = np.random.default_rng(7)
    layers, d, r = 3, 4, 2
    lora = {
        "w0": _normal(rng, layers, d, d),
        "a": _normal(rng, layers, d, r),
        "b": _normal(rng, layers, r, d),
        "s": 1 + _normal(rng, d, scale=0.2),
    }

    def lora_stack(p, x):
        def layer(h, w):
            w0, a, b = w
            return jnp.tanh(h @ ((w0 + a @ b) * p["s"])), None

        xs = (p["w0"], p["a"], p["b"])
        return jnp.sum(jnp.sin(jax.lax.scan(layer, x, xs, reverse=True)[0]))

    routes = _check(lora_stack, lora, _normal(rng, B, d), reparam=("['w0']", "['a']", "['b']"))
    assert "in scan" in routes["['a']"].uses[0], routes["['a']"]

    kernels = {"k": _normal(rng, layers, 2, 2, 2, 2), "head": _normal(rng, 2, 3)}

    def conv_stack(p, x):
        def layer(h, k):
            return jnp.tanh(_conv(h, _standardise(k, (0, 1, 2)))), None

        h = jax.lax.scan(layer, x, p["k"])[0]
        return jnp.sum(jnp.sin(jnp.mean(h, axis=(0, 1)) @ p["head"]))

    _check(conv_stack, kernels, _normal(rng, B, 3, 3, 2), reparam=("['k']",))

    normed = {"v": _normal(rng, layers, d, d), "g": 1 + _normal(rng, layers, d, scale=0.2)}

    def nested(p, xs):  # xs (T, d): every layer runs a recurrence over the sequence
        def layer(seq, w):
            w = _wn(*w)
            step = lambda c, x_t: (jnp.tanh(c @ w + x_t), jnp.tanh(c @ w + x_t))
            return jax.lax.scan(step, jnp.zeros(d, F64), seq)[1], None

        return jnp.sum(jnp.sin(jax.lax.scan(layer, xs, (p["v"], p["g"]))[0]))

    routes = _check(nested, normed, _normal(rng, B, 3, d), reparam=("['g']",), fast=("['v']",))
    # (V_l scaled by g_l / ‖V_l‖ at step l, the normaliser's correction per layer and channel)
    assert "scaled (mul, reduce_sum, sqrt, div)" in routes["['v']"].route, routes["['v']"]


def test_scaled_and_concatenated_slices_of_a_layer_stack_stay_factored():
    """Layer stacks whose step ``l`` reads a scaled or concatenated slice: standardised dense
    weights (a centre and a normaliser made of the slice), ``V_l`` scaled by its row of a
    stacked ``s`` and read transposed, rows of two stacks concatenated. Each factor scales
    step ``l``'s ``A`` or ``G`` (and each block meets its slice of ``A``) on the lifted use,
    never the step-major arrays as captured: exact against ``vmap(grad)``, no ``B × |W|``
    array of the effective weight."""
    rng = np.random.default_rng(10)
    layers, t, d = 3, 4, 4
    x = _normal(rng, B, t, d)

    def stack(weights, transform, apply=lambda h, w: h @ w):
        def loss(p, x):
            def layer(h, w):
                return h + jnp.tanh(apply(h, transform(*w))), None

            return jnp.sum(jnp.sin(jax.lax.scan(layer, x, tuple(p[k] for k in weights))[0]))

        return loss

    standardised = stack(("v",), lambda v: _standardise(v, (0,)))
    routes = _check(standardised, {"v": _normal(rng, layers, d, d)}, x, fast=("['v']",))
    assert "scaled (" in routes["['v']"].route, routes["['v']"]
    rows = stack(("v", "s"), lambda v, s: v * s[:, None], apply=lambda h, w: h @ w.T)
    params = {"v": _normal(rng, layers, d, d), "s": 1 + _normal(rng, layers, d, scale=0.2)}
    routes = _check(rows, params, x, fast=("['v']",))
    assert routes["['v']"].route.startswith("scan, 3 steps, one slice per step: scaled (mul)")
    joined = stack(("a", "b"), lambda a, b: jnp.concatenate([a, b], 0))
    params = {"a": _normal(rng, layers, 1, d), "b": _normal(rng, layers, d - 1, d)}
    routes = _check(joined, params, x, fast=("['a']", "['b']"))
    assert "a block of a concatenate: its slice of A" in routes["['b']"].route, routes


def test_what_a_layer_stack_must_not_compute_for_every_step_stays_in_the_loop():
    """A DropConnect mask drawn from each layer's ``rbg`` key (random bits drawn under
    ``jax.vmap`` over the layers are not the bits drawn step by step: computed before the
    loop, the fast path differentiated another loss, norms 20-130 % off), exact against
    ``vmap(grad)``; and a slice normalised by a 120-step power iteration (as
    ``flax.linen.SpectralNorm(n_steps=...)`` unrolls it), a chain the hoist's grouping read
    recursively, past Python's recursion limit: planned (its short form is checked against
    ``vmap(grad)`` in tests/test_fast_reparam.py)."""
    rng = np.random.default_rng(11)
    layers, d = 3, 4
    params = {"w": _normal(rng, layers, d, d)}
    x = _normal(rng, B, d)
    layer_keys = jax.random.split(jax.random.key(7, impl="rbg"), layers)

    def dropconnect(p, x):
        def layer(h, wk):
            w, k = wk
            return jnp.tanh(h @ (w * jax.random.bernoulli(k, 0.7, w.shape))), None

        return jnp.sum(jnp.sin(jax.lax.scan(layer, x, (p["w"], layer_keys))[0]))

    _check(dropconnect, params, x)
    u0 = jnp.linspace(0.2, 1.0, d, dtype=F64)

    def spectral(p, x):
        def layer(h, w):
            u = u0
            for _ in range(120):
                v = u @ w
                v = v / jnp.sqrt(jnp.sum(v * v))
                u = w @ v
                u = u / jnp.sqrt(jnp.sum(u * u))
            u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
            return jnp.tanh(h @ (w / (u @ w @ v))), None

        return jnp.sum(jnp.sin(jax.lax.scan(layer, x, p["w"])[0]))

    (leaf,) = plan(spectral, params, x[0]).leaves
    assert leaf.route.startswith("tied, 2 uses: scaled (div)"), leaf


def _exact(loss, params, x):
    """Norms, a masked clipped sum and dots of ``loss``'s fast pass against a jitted float64
    ``vmap(grad)`` of each example (a padded row, clipped at the median norm)."""
    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))
    grads = [np.asarray(g) for g in jax.tree_util.tree_leaves(per_example(params, x))]
    mask = jnp.arange(B) < B - 1
    real = np.asarray(mask)
    flat = np.where(real[:, None], np.concatenate([g.reshape(B, -1) for g in grads], 1), 0)
    norms = np.linalg.norm(flat, axis=1)
    assert np.min(norms[real]) > 0
    assert_rel_close(jaxgrad.per_example_norms(loss)(params, x, mask), norms, rtol=1e-9)
    clip = float(np.median(norms[real]))
    c = np.where(real, np.minimum(1, clip / np.where(real, norms, 1)), 0)
    summed = jaxgrad.clipped_grad(loss, l2_clip=clip, reduction="sum")(params, x, mask)
    for got, g in zip(jax.tree_util.tree_leaves(summed), grads, strict=True):
        assert_rel_close(got, np.tensordot(c, g, 1), rtol=1e-9)
    v = jax.tree_util.tree_map(
        lambda a: jnp.cos(jnp.arange(a.size, dtype=F64)).reshape(a.shape), params
    )
    want = flat @ np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(v)])
    assert_rel_close(jaxgrad.per_example_dots(loss)(params, x, mask, reference=v), want, rtol=1e-9)


def test_a_shared_weight_transformed_with_each_layers_slice_is_hoisted():
    """A layer stack whose body builds its weight from a parameter it closes over and the
    layer's slice: a shared layer gated per layer, ``g_l · S`` (ALBERT-style), and a shared
    base plus per-layer LoRA, ``S + A_l B`` (relaxed recursive transformers). Left in the loop
    ``S`` would take the exact fallback; the ``L`` copies of ``S`` stacked before the loop are
    within :data:`jaxgrad.fast.hoist.SHARED_COPIES`, so every leaf keeps a factored route."""
    rng = np.random.default_rng(12)
    layers, t, d, r = 3, 3, 3, 2
    params = {
        "S": _normal(rng, d, d),
        "g": 1 + _normal(rng, layers, scale=0.2),
        "A": _normal(rng, layers, d, r),
        "B": _normal(rng, r, d),
        "V": _normal(rng, d, 2),
    }
    x = _normal(rng, B, t, d)

    def stack(weight, xs):
        def loss(p, x):
            step = lambda h, w: (jnp.tanh(h @ weight(p, w)), None)
            return jnp.sum(jnp.sin(jax.lax.scan(step, x, xs(p))[0] @ p["V"]))

        return loss

    gated = stack(lambda p, g: g * p["S"], lambda p: p["g"])
    lora = stack(lambda p, a: p["S"] + a @ p["B"], lambda p: p["A"])
    for loss, leaves in ((gated, ("S", "g")), (lora, ("S", "A", "B"))):
        routes = {lp.path: lp.route for lp in plan(loss, params, x[0]).leaves}
        for k in leaves:
            assert routes[f"['{k}']"].startswith("reparametrised ("), routes
        _exact(loss, params, x)


def test_a_shared_weight_scaled_by_each_step_stays_in_the_loop():
    """``W * c_t`` for a weight the loop closes over and a step's scalar (a sampler loop's
    constant schedule) is a function of the step too, but computed for every step before the
    loop it would be ``T`` copies of ``W`` whose per-example VJP costs more than the fallback:
    it stays in the loop (``W`` on the exact fallback, its per-example copy ``B × |W|``,
    exact) even below :data:`jaxgrad.fast.hoist.SHARED_COPIES` steps, which only a group
    reading a layer's own parameter slices gets, while a layer stack's stacked
    transformation is hoisted."""
    rng = np.random.default_rng(8)
    d, steps = 3, 50
    assert steps < SHARED_COPIES
    params = {"w": _normal(rng, d, d), "s": _normal(rng, steps, d, d, scale=0.1)}

    def loss(p, x):
        def step(h, xs):
            c_t, s_t = xs
            return jnp.tanh(h @ (p["w"] * c_t) + h @ (s_t * c_t)), None

        xs = (jnp.linspace(1.0, 0.1, steps), p["s"])
        return jnp.sum(jax.lax.scan(step, x, xs)[0] ** 2)

    routes = {lp.path: lp.route for lp in plan(loss, params, jnp.ones(d, F64)).leaves}
    assert routes["['w']"].startswith("exact fallback"), routes
    assert routes["['s']"].startswith("scan, 50 steps, one slice per step: scaled (mul)"), routes
    _exact(loss, params, _normal(rng, B, d))
