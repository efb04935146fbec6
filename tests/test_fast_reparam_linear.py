"""Summed effective weights on the fast path: each part linear in one leaf.

Fake quantisation (the straight-through estimator ``W + stop_gradient(q(W) - W)``, or a
``custom_jvp`` rule ``(q(W), t)``) has the identity as Jacobian: the leaf's use is the
ordinary use. Merged LoRA ``W0 + A @ B``: ``W0`` likewise, ``A`` and ``B`` with the other
factor folded into ``G`` or ``A``. Every case is checked in float64 against ``vmap(grad)``
(norms, per-leaf norms, clipped-style weighted sums, dots, the Gram matrix; a (sum, count)
loss with a mask and chunks in a scan), and the plan must name the part it saw.
"""

import jax
import jax.numpy as jnp
import numpy as np
from test_fast_cases import F64
from test_fast_reparam import _check, _check_clipped_sum, _conv, _normal, _shapes_in

from jaxgrad.fast import passes, plan

jax.config.update("jax_enable_x64", True)

B = 4


def _q(w):  # fake quantisation to a grid of 1/4, clipped
    return jnp.clip(jnp.round(4 * w) / 4, -1, 1)


@jax.custom_jvp
def _ste(w):
    return _q(w)


_ste.defjvp(lambda p, t: (_ste(p[0]), t[0]))


def test_fake_quantised_dense_conv_and_table_keep_their_routes():
    """Both ways of writing the straight-through estimator, and a ``custom_jvp`` one, on a
    dense weight, a convolution kernel and an embedding table: each leaf takes its use's
    own route (no reparametrisation), exact."""
    rng = np.random.default_rng(0)
    r = lambda *shape: _normal(rng, *shape)
    params = {"E": r(7, 4), "K": r(3, 3, 4, 2), "W": r(4, 3), "U": r(3, 2)}

    def loss(p, toks):
        e = jnp.take(_ste(p["E"]), toks, axis=0)  # (4, 4)
        c = _conv(jnp.tanh(e.reshape(2, 2, 4)), p["K"] + jax.lax.stop_gradient(_q(p["K"]) - p["K"]))
        w = p["W"] + jax.lax.stop_gradient(_q(p["W"])) - jax.lax.stop_gradient(p["W"])
        h = jnp.tanh(e @ w)
        return jnp.sum(jnp.tanh(c) ** 2) + jnp.sum(jnp.sin(h @ _ste(p["U"])))

    toks = jnp.asarray(rng.integers(0, 7, size=(B, 4)))
    routes = _check(loss, params, toks, fast=("['E']", "['K']", "['W']", "['U']"))
    for path, rule in [("['E']", "gather"), ("['K']", "conv"), ("['W']", "dense")]:
        lp = routes[path]
        assert lp.route.startswith("straight-through (identity Jacobian) of a summed"), lp
        assert f"; {rule}" in lp.route and "via " in lp.uses[0], lp
    assert "(custom_jvp_call)" in routes["['U']"].route, routes["['U']"]


def test_merged_lora_tied_transposed_and_on_the_left():
    """``W0 + A @ B`` with a sequence axis: ``A`` shared by two layers (one used transposed:
    ``B`` then meets ``A`` of that use), ``W0`` used directly too (tied uses), a third
    merged weight ``W_frozen - 0.5 C @ B3`` on the left of its use, a fourth written as
    PyTorch's ``W0 + (B4 A4)ᵀ`` (the product transposed before the sum). Exact, and no
    ``(B, d, d)`` per-example weight is formed."""
    rng = np.random.default_rng(1)
    d, rank = 9, 2  # (9 > the 8 positions of W0's uses: no (B, 9, 9) factor either)
    r = lambda *shape: _normal(rng, *shape)
    params = {"W0": r(d, d), "A": r(d, rank), "B1": r(rank, d), "B2": r(rank, d)}
    params.update(C=r(d, rank), B3=r(rank, d), A4=r(rank, d), B4=r(d, rank))
    frozen = r(d, d)

    def loss(p, seq):  # seq (2, d)
        h = jnp.tanh(seq @ (p["W0"] + p["A"] @ p["B1"]))
        h = jnp.tanh(h @ (p["W0"] + p["A"] @ p["B2"]).T)
        h = jnp.tanh((frozen - 0.5 * (p["C"] @ p["B3"])) @ h.T)  # a frozen W0, scaled
        h = jnp.tanh(h.T @ (frozen + (p["B4"] @ p["A4"]).T))
        return jnp.sum(h**2) + jnp.sum(jnp.sin(seq @ p["W0"]))

    x = r(B, 2, d)
    routes = _check(loss, params, x, fast=tuple(f"['{k}']" for k in params))
    a, w0 = routes["['A']"], routes["['W0']"]
    assert a.route.startswith("tied, 2 uses: times a parameter matrix on the right"), a
    assert "(folded into G)" in a.route and "(folded into A)" in a.route, a
    assert w0.route.startswith("tied, 3 uses: a summand (identity Jacobian)"), w0
    assert "on the right times a scalar (folded into A)" in routes["['C']"].route
    assert "matrix on the left (folded into A)" in routes["['B1']"].route
    assert "matrix on the left (folded into G)" in routes["['B2']"].route
    assert "(folded into A)" in routes["['B4']"].route, routes["['B4']"]
    run = lambda p: passes.fast_pass(loss, p, x, jnp.ones(B, bool)).norm_sq
    assert (B, d, d) not in _shapes_in(jax.make_jaxpr(run)(params).jaxpr)


def test_lora_and_fake_quantisation_in_a_scan_with_sum_count_mask_and_chunks():
    """A recurrent step that merges its LoRA weight and fake-quantises its input weight at
    every step (hoisted before the loop), a (sum, count) loss: the fast pass with a padded
    row, and ``clipped_grad`` in chunks, against ``vmap(grad)`` of each example's sum."""
    rng = np.random.default_rng(2)
    d, rank, t = 4, 2, 3
    r = lambda *shape: _normal(rng, *shape)
    params = {"W0": r(d, d), "A": r(d, rank), "Bm": r(rank, d), "U": r(3, d), "o": r(d)}

    def loss(p, ex):
        xs, n = ex

        def step(c, x):
            w = p["W0"] + (4 / rank) * (p["A"] @ p["Bm"])  # LoRA's alpha / r
            u = p["U"] + jax.lax.stop_gradient(_q(p["U"]) - p["U"])
            return jnp.tanh(c @ w + x @ u), None

        c = jax.lax.scan(step, jnp.zeros(d, F64), xs)[0]
        return jnp.sin(c @ p["o"]) * n, n  # (sum, count): the count varies by example

    batch = (r(B, t, 3), jnp.arange(1.0, B + 1.0))
    routes = {k: lp.route for k, lp in _check(loss, params, batch, fast=("['A']",)).items()}
    assert routes["['A']"].startswith("scan, 3 steps, shared: times a parameter matrix"), routes
    assert routes["['U']"].startswith("scan, 3 steps, shared: straight-through"), routes
    assert routes["['W0']"].startswith("scan, 3 steps, shared: a summand"), routes

    _check_clipped_sum(loss, params, batch, jnp.arange(B) != 1)


def test_a_layer_stack_of_merged_lora_weights_is_folded_step_by_step():
    """A layer stack scanned over merged LoRA weights, ``W_l = W0_l + s A_l B_l`` (merged in
    the step function and hoisted, a ``vmap`` over the stacked axis: batch axes of the
    product), and a stack merged before the loop, ``A`` stacked on its middle axis and one
    ``B`` shared by every layer, read transposed: ``B_l`` (or ``A_l``) is folded into step
    ``l``'s ``G`` (or ``A``), no ``B × |W|`` array, exact against ``vmap(grad)``."""
    rng = np.random.default_rng(4)
    layers, d, rank, t = 3, 4, 2, 3
    r = lambda *shape: _normal(rng, *shape)
    params = {"W0": r(layers, d, d), "A": r(layers, d, rank), "Bm": r(layers, rank, d)}

    def merged_in_the_step(p, x):
        def layer(h, w):
            w0, a, b = w
            return h + jnp.tanh(h @ (w0 + 0.5 * (a @ b))), None

        h = jax.lax.scan(layer, x, (p["W0"], p["A"], p["Bm"]), reverse=True)[0]
        return jnp.sum(jnp.sin(h))

    routes = _check(merged_in_the_step, params, r(B, t, d), fast=("['A']", "['Bm']", "['W0']"))
    stack = "scan, 3 steps, one slice per step: "
    assert routes["['A']"].route.startswith(stack + "times a parameter matrix on the right"), routes
    assert routes["['Bm']"].route.startswith(stack + "times a parameter matrix on the left"), routes
    assert routes["['W0']"].route.startswith(stack + "a summand"), routes

    shared = {"W0": r(layers, d, d), "A": r(rank, layers, d), "Bm": r(rank, d)}

    def merged_before(p, x):
        w = p["W0"] - jnp.einsum("rlk,rn->lkn", p["A"], p["Bm"])
        h = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w.T), None), x, w)[0]
        return jnp.sum(jnp.sin(h))

    routes = _check(merged_before, shared, r(B, d), fast=("['A']", "['Bm']", "['W0']"))
    assert "(folded into A)" in routes["['A']"].route, routes["['A']"]
    assert "(folded into G)" in routes["['Bm']"].route, routes["['Bm']"]


def test_per_head_lora_read_by_a_use_that_sums_over_the_heads():
    """A per-head LoRA on an attention output projection, ``O_h = O0_h + A_h B_h`` (a batch
    axis ``h`` of the product), read by ``einsum("thk,hkd->td")``, which contracts over
    ``h``: ``B_h`` folded into ``G`` differs per head, so the folded use keeps ``h``
    (``G'_{t,h} = G_t B_hᵀ``) instead of summing it away (norms 11 % off, the clipped sum
    2.4 times too large, before). At the top level and in a layer stack."""
    rng = np.random.default_rng(5)
    heads, k, d, rank, t = 2, 2, 4, 2, 3
    r = lambda *shape: _normal(rng, *shape)
    params = {"O0": r(heads, k, d), "A": r(heads, k, rank), "Bm": r(heads, rank, d)}

    def merged(o0, a, b):
        return o0 + jnp.einsum("hkr,hrd->hkd", a, b)

    def top(p, v):  # v (t, heads, k): one example's attention values
        return jnp.sum(jnp.sin(jnp.einsum("thk,hkd->td", v, merged(p["O0"], p["A"], p["Bm"]))))

    leaves = ("['A']", "['Bm']", "['O0']")
    routes = _check(top, params, r(B, t, heads, k), fast=leaves)
    assert "(folded into G)" in routes["['A']"].route, routes["['A']"]
    stacked = {key: jnp.stack([x, 0.5 * x]) for key, x in params.items()}
    stacked["Q"] = r(2, d, heads, k)

    def stack(p, x):
        def layer(h, w):
            q, o0, a, b = w
            v = jnp.tanh(jnp.einsum("td,dhk->thk", h, q))
            return h + jnp.einsum("thk,hkd->td", v, merged(o0, a, b)), None

        xs = (p["Q"], p["O0"], p["A"], p["Bm"])
        return jnp.sum(jnp.sin(jax.lax.scan(layer, x, xs)[0]))

    _check(stack, stacked, r(B, t, d), fast=leaves)


def test_what_is_not_folded_falls_back_visibly_and_stopped_reads_are_no_uses():
    """A LoRA product reshaped into a convolution kernel keeps the reparametrised (VJP) route,
    named (one transposed before the sum is folded); a power iteration on the weight whose
    results are stopped (as ``flax.linen.SpectralNorm`` runs it) reads the weight but is no
    use."""
    rng = np.random.default_rng(3)
    r = lambda *shape: _normal(rng, *shape)
    params = {"W0": r(4, 4), "A": r(4, 2), "Bm": r(2, 4), "K0": r(3, 3, 2, 2)}
    params.update(P=r(6, 2), Q=r(2, 6), S=r(4, 3))
    u0 = r(3)  # (flax keeps u in its batch_stats: not a parameter)

    def spectral(w, u, steps=2):  # flax.linen.SpectralNorm's _spectral_normalize
        for _ in range(steps):
            v = u @ w.T
            v = v / jnp.linalg.norm(v)
            u = v @ w
            u = u / jnp.linalg.norm(u)
        u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        return w / (v @ w @ u)

    def loss(p, ex):
        x, img = ex  # (4,), (4, 4, 2)
        h = jnp.tanh(x @ (p["W0"] + (p["A"] @ p["Bm"]).T))
        c = _conv(img, p["K0"] + (p["P"] @ p["Q"]).reshape(3, 3, 2, 2))
        return jnp.sum(jnp.tanh(c) ** 2) + jnp.sum(jnp.tanh(h @ spectral(p["S"], u0)) ** 2)

    routes = {lp.path: lp for lp in plan(loss, params, (r(4), r(4, 4, 2))).leaves}
    for path in ("['P']", "['Q']", "['K0']"):
        assert routes[path].route.startswith("reparametrised ("), routes[path]
    for path in ("['A']", "['Bm']"):
        assert "of a summed weight" in routes[path].route, routes[path]
    s = routes["['S']"]
    assert len(s.uses) == 2 and not s.fallback, s  # (σ = vᵀ S u and the layer; not 2 + 4)


@jax.custom_jvp
def _ste_clipped(w):  # a straight-through rounding whose tangent is masked: not the identity
    return _q(w)


_ste_clipped.defjvp(lambda p, t: (_ste_clipped(p[0]), t[0] * (jnp.abs(p[0]) < 0.5)))


def test_sums_that_only_look_like_identities_and_reads_that_only_look_dead():
    """Adversarial sums and stops, each exact against ``vmap(grad)``: ``W + sg(W) - W`` (a
    Jacobian of zero, as two summands of opposite sign), ``V + 0 * V``, a ``custom_jvp``
    whose tangent is masked (not straight-through: reparametrised), ``W0 + α/r · A Aᵀ``
    (one leaf in both factors, the scalar on the first), a leaf read only through
    ``stop_gradient`` (gradient exactly 0), a product feeding both a ``stop_gradient`` and
    the loss (live), and an ``argmax`` of a parameter product picking rows of a table (the
    product dead, the lookup not)."""
    rng = np.random.default_rng(4)
    r = lambda *shape: _normal(rng, *shape)
    params = {"W": r(3, 3), "V": r(3, 3), "C": r(3, 3), "W0": r(3, 3), "A": r(3, 2)}
    params.update(S=r(3, 3), E=r(3, 2), o=r(3))
    sg = jax.lax.stop_gradient

    def loss(p, x):  # x (2, 3)
        h = jnp.tanh(x @ (p["W"] + sg(p["W"]) - p["W"]) + x @ (p["V"] + 0 * p["V"]))
        h = jnp.tanh(h @ _ste_clipped(p["C"]) + x @ sg(p["S"]))
        h = jnp.tanh(h @ (p["W0"] + 2 / 4 * p["A"] @ p["A"].T))  # alpha / r first
        z = h @ p["W0"]
        rows = p["E"][jnp.argmax(x @ p["S"] @ p["W0"], axis=-1)]  # (2, 2)
        return jnp.sum(jnp.sin(z @ p["o"])) + jnp.sum(sg(z) * z) + jnp.sum(rows * x[:, :2])

    routes = _check(loss, params, r(B, 2, 3), fast=("['V']", "['A']", "['W0']", "['E']"))
    assert routes["['C']"].route.startswith("reparametrised (custom_jvp_call)"), routes["['C']"]
    assert "times a scalar (folded into G)" in routes["['A']"].route, routes["['A']"]
    assert routes["['S']"].route == "unused", routes["['S']"]  # (read through sg and argmax)
    w = routes["['W']"].route  # (+1 and -1 times the same uses: the sum is the zero gradient)
    assert w.startswith("tied, 2 uses:") and "identity Jacobian times a scalar" in w, w
