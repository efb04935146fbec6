"""Reparametrised weights on the fast path: ``W_eff = f(θ)`` independent of the example.

Every case is checked in float64 against ``vmap(grad)`` (norms, clipped sum, dots, Gram
matrix), and the plan must name the transformation (no exact fallback for the matrices).
"""

import jax
import jax.numpy as jnp
import numpy as np
from test_fast_cases import F64, assert_rel_close

from jaxgrad.fast import linear, passes, per_example_norms, plan

jax.config.update("jax_enable_x64", True)

B = 4


def _normal(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.normal(size=shape), F64)


def _check(loss, params, batch, *, reparam=(), fast=()):
    """The fast pass against ``vmap(grad)`` (norms, per-leaf norms, a clipped-style weighted
    sum with per-leaf weights too, dots, the Gram matrix), one compile for both; the plan's
    routes for the named leaves."""
    one = jax.tree_util.tree_map(lambda x: x[0], batch)
    routes = {lp.path: lp for lp in plan(loss, params, one).leaves}
    for path in reparam:
        assert routes[path].route.startswith("reparametrised ("), routes[path]
    for path in fast:
        assert not routes[path].fallback and "reparametrised" not in routes[path].route, routes[
            path
        ]
    leaves = jax.tree_util.tree_leaves(params)
    v = [jnp.cos(jnp.arange(x.size, dtype=F64)).reshape(x.shape) for x in leaves]
    mask = jnp.arange(B) < B - 1  # one padded row

    def parts(get):
        p = get(loss, params, batch, mask)
        c = 1 / (1 + jnp.sqrt(p.norm_sq))  # clip-like weights, then one column per leaf
        cols = c[:, None] * (1 + jnp.arange(len(leaves), dtype=F64))
        return p.norm_sq, p.leaf_sq, p.weighted(c), p.weighted(cols), p.dots(v), passes.gram(p, p)

    # the fast pass and its vmap reference as one program: one compilation, not two
    got, want = jax.jit(lambda: (parts(passes.fast_pass), parts(passes.vmap_pass)))()
    assert float(jnp.min(want[0][:-1])) > 0
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert_rel_close(x, y, rtol=1e-9)
    return routes


def _check_clipped_sum(loss, params, batch, mask):
    """``clipped_grad`` of a (sum, count) ``loss`` in chunks of 2, clipping at the median norm
    (about half the real rows clipped): its norms and clipped sum against ``vmap(grad)`` of
    each example's sum, with ``mask``'s padded rows left out."""
    from jaxgrad import clipped_grad

    # jitted: one XLA program, where eager vmap(grad) compiles every primitive on its own
    # (tests/test_fast_dots.py's reference does the same); the rest in numpy, not jnp op by op.
    per_example = jax.jit(jax.vmap(jax.grad(lambda p, ex: loss(p, ex)[0]), in_axes=(None, 0)))
    grads = [np.asarray(g) for g in jax.tree_util.tree_leaves(per_example(params, batch))]
    real = np.asarray(mask)
    flat = np.concatenate([g.reshape(B, -1) for g in grads], axis=1)
    want = np.where(real, np.linalg.norm(flat, axis=1), 0)
    clip = float(np.median(want[real]))
    c = np.where(real, np.minimum(1, clip / np.where(real, want, 1)), 0)
    f = clipped_grad(loss, l2_clip=clip, reduction="sum", return_norms=True, chunk_size=2)
    summed, norms = f(params, batch, mask)  # (returns the norms last)
    assert_rel_close(norms, want, rtol=1e-9)
    for x, g in zip(jax.tree_util.tree_leaves(summed), grads, strict=True):
        assert_rel_close(x, np.tensordot(c, g, 1), rtol=1e-9)


def _standardise(w, axes):
    mean = jnp.mean(w, axis=axes, keepdims=True)
    var = jnp.var(w, axis=axes, keepdims=True)
    return (w - mean) / jnp.sqrt(var + 1e-5)


def _conv(x, w):  # x (H, W, C), w (kh, kw, C, O): NHWC / HWIO, one example
    return jax.lax.conv_general_dilated(
        x[None], w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )[0]


def _group_norm(h, scale, groups=2):
    c = h.shape[-1]
    g = h.reshape(*h.shape[:-1], groups, c // groups)
    g = (g - jnp.mean(g, axis=(0, 1, 3), keepdims=True)) / jnp.sqrt(
        jnp.var(g, axis=(0, 1, 3), keepdims=True) + 1e-5
    )
    return g.reshape(h.shape) * scale


def test_weight_standardised_cnn_with_group_norm():
    rng = np.random.default_rng(0)
    params = {
        "k1": _normal(rng, 3, 3, 2, 4),
        "k2": _normal(rng, 3, 3, 4, 4),
        "gn": 1 + _normal(rng, 4, scale=0.1),
        "head": _normal(rng, 4, 3, scale=0.5),
    }
    x = _normal(rng, B, 5, 5, 2)
    y = jnp.arange(B) % 3

    def loss(p, ex):
        img, label = ex
        h = jax.nn.relu(_group_norm(_conv(img, _standardise(p["k1"], (0, 1, 2))), p["gn"]))
        h = jax.nn.relu(_conv(h, _standardise(p["k2"], (0, 1, 2))))
        logits = jnp.mean(h, axis=(0, 1)) @ p["head"]
        return -jax.nn.log_softmax(logits)[label]

    routes = _check(loss, params, (x, y), fast=("['k1']", "['k2']", "['head']"))
    for path in ("['k1']", "['k2']"):  # the mean an offset, 1/σ a normaliser, per channel
        assert "per-channel centring and normaliser made of the leaf" in routes[path].route


def test_weight_normalised_conv_stack():
    rng = np.random.default_rng(1)
    params = {
        f"l{i}": {"v": _normal(rng, 3, 3, 3, 3), "g": 1 + _normal(rng, 3, scale=0.1)}
        for i in range(2)
    }
    x = _normal(rng, B, 4, 4, 3)

    def loss(p, img):
        h = img
        for i in range(2):
            v = p[f"l{i}"]["v"]
            w = p[f"l{i}"]["g"] * v / jnp.sqrt(jnp.sum(v * v, axis=(0, 1, 2), keepdims=True))
            h = jnp.tanh(_conv(h, w))
        return jnp.sum(h**2)

    routes = _check(loss, params, x, reparam=("['l0']['g']", "['l1']['g']"), fast=("['l0']['v']",))
    assert "normaliser" in routes["['l1']['v']"].route, routes["['l1']['v']"]


def test_masked_made_layer_and_merged_lora():
    rng = np.random.default_rng(2)
    d, r = 5, 2
    mask = jnp.asarray(np.tril(np.ones((d, d)), -1), F64)  # autoregressive (MADE)
    params = {
        "W": _normal(rng, d, d),
        "W0": _normal(rng, d, d),
        "A": _normal(rng, d, r),
        "Bm": _normal(rng, r, d),
    }
    x = _normal(rng, B, 3, d)  # a sequence axis: the Gram route for the effective weights

    def loss(p, seq):
        h = jnp.tanh(seq @ (p["W"] * mask))
        h = jnp.tanh(h @ (p["W0"] + p["A"] @ p["Bm"]))
        return jnp.sum(h**2)

    fast = ("['W']", "['W0']", "['A']", "['Bm']")
    routes = _check(loss, params, x, fast=fast)
    # (a full mask with 3 positions: the formed per-example gradient, times M, visibly)
    assert "full mask M: per-example gradient, times M" in routes["['W']"].route
    # (the merged LoRA weight: a sum of parts, each its leaf's own dense use, see Fold)
    assert routes["['W0']"].route.startswith("a summand (identity Jacobian)"), routes["['W0']"]
    assert "matrix on the right (folded into G)" in routes["['A']"].route, routes["['A']"]
    assert "matrix on the left (folded into A)" in routes["['Bm']"].route, routes["['Bm']"]


def test_tied_transposed_embedding_scaled_and_padded():
    """``E[tokens]`` and ``h @ (E.T * s)`` (the same table, scaled per column), with the padding
    row zeroed by a constant scatter ``E.at[0].set(0)``: a direct lookup plus a transform."""
    rng = np.random.default_rng(3)
    vocab, d = 7, 4
    params = {"E": _normal(rng, vocab, d), "s": 1 + _normal(rng, vocab, scale=0.1)}
    tokens = jnp.asarray(rng.integers(0, vocab, size=(B, 5)))

    def loss(p, toks):
        table = p["E"].at[0].set(0.0)
        h = jnp.tanh(jnp.cumsum(table[toks], axis=0))
        logits = h @ (p["E"].T * p["s"])
        return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(toks.shape[0]), toks])

    routes = _check(loss, params, tokens, reparam=("['s']",), fast=("['E']",))
    assert routes["['E']"].route.startswith("tied, 2 uses: scaled (scatter, "), routes["['E']"]


def test_stop_gradient_broadcast_concat_and_debug_print():
    rng = np.random.default_rng(4)
    params = {"W": _normal(rng, 3, 4), "U": _normal(rng, 2, 4), "V": _normal(rng, 4, 2)}
    x = _normal(rng, B, 5)

    def loss(p, xi):
        jax.debug.print("W has {n} entries", n=p["W"].size)
        cat = jnp.concatenate([p["W"], p["U"]], axis=0)  # (5, 4): two leaves in one weight
        h = jnp.tanh(xi @ cat)
        h = h @ jax.lax.stop_gradient(p["V"]) + h @ p["V"][None, None][0, 0]
        return jnp.sum(h**2)

    routes = _check(loss, params, x, fast=("['W']", "['U']", "['V']"))
    assert "a block of a concatenate: its slice of A" in routes["['W']"].route


def test_only_stop_gradient_is_unused():
    params = {"W": jnp.ones((3, 2), F64)}
    p = plan(lambda q, x: jnp.sum(x @ jax.lax.stop_gradient(q["W"])), params, jnp.ones(3, F64))
    assert p.leaves[0].route == "unused"


def test_transform_with_a_non_fast_use_falls_back_visibly():
    """``x * (W * M)`` elementwise: the effective weight has no fast use, so the leaf takes
    the exact fallback and says why."""
    rng = np.random.default_rng(5)
    params = {"W": _normal(rng, 4)}
    x = _normal(rng, B, 4)
    loss = lambda p, xi: jnp.sum(jnp.tanh(xi * (p["W"] * 2.0)))
    (lp,) = plan(loss, params, x[0]).leaves
    assert lp.fallback and "mul" in lp.reason
    assert_rel_close(
        per_example_norms(loss)(params, x), per_example_norms(loss, method="vmap")(params, x)
    )


def test_a_weight_rounded_in_place_is_weighted_and_dotted_per_example():
    """``reduce_precision(W)`` (fake low precision): JAX rounds its cotangent and tangent,
    so its VJP is not linear: the weighted sum and the dots apply it per example (one VJP
    of the weighted sum was 2e-2 off at 4 mantissa bits), and the dots take no forward mode."""
    rng = np.random.default_rng(12)
    params = {"W": _normal(rng, 3, 3, scale=0.5), "V": _normal(rng, 3, 2, scale=0.5)}
    x = _normal(rng, B, 5, 3, scale=0.5)

    def loss(p, xi):
        w = jax.lax.reduce_precision(p["W"], exponent_bits=8, mantissa_bits=4)
        return jnp.sum(jnp.tanh(xi @ w) @ p["V"])

    _check(loss, params, x, reparam=("['W']",))
    p = plan(loss, params, x[0])
    assert p.dots.way == "factored" and "reduce_precision" in p.dots.reason, p.dots
    (w,) = [lp for lp in p.leaves if lp.path == "['W']"]
    assert "clipped sum: those, weighted" in w.route, w


def test_complex_effective_weight_falls_back_and_integer_results_carry_no_gradient():
    """``re + 1j im`` (a spectral weight) is example-independent but complex: the rules' real
    forms assume a real parameter, so its leaves fall back; ``argmax(W)`` is an integer result
    of a parameter (no gradient) and ``W[argmax(W)]`` a lookup the same for every example."""
    rng = np.random.default_rng(6)
    params = {"re": _normal(rng, 3, 4), "im": _normal(rng, 3, 4), "W": _normal(rng, 4, 2)}
    x = _normal(rng, B, 4)

    def loss(p, xi):
        h = jnp.real(jnp.fft.rfft(xi) @ (p["re"] + 1j * p["im"]))
        k = jnp.argmax(p["W"][:, 0])
        return jnp.sum(jnp.tanh(h @ p["W"] + p["W"][k]) ** 2)

    routes = _check(loss, params, x, fast=("['W']",))
    assert routes["['re']"].fallback and "complex" in routes["['re']"].reason, routes["['re']"]


def test_strided_dilated_and_1d_convolutions_standardised():
    """Per-example kernel gradients one offset at a time, in every layout: an OIHW kernel
    with strides and dilation (VALID), a 1-D WIO kernel with explicit padding."""
    assert linear.UNROLL_OFFSETS < 10
    rng = np.random.default_rng(7)
    # (k2 has 10 kernel offsets: a loop over them; k1 has 3: unrolled, see UNROLL_OFFSETS)
    params = {"k2": _normal(rng, 4, 2, 5, 2), "k1": _normal(rng, 3, 4, 2)}
    x = _normal(rng, B, 2, 9, 8)

    def loss(p, img):
        w = _standardise(p["k2"], (1, 2, 3))  # per output channel O of OIHW
        h = jax.lax.conv_general_dilated(
            img[None],
            w,
            (2, 1),
            "VALID",
            rhs_dilation=(1, 2),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )[0]  # (4, 3, 6)
        seq = jnp.tanh(h.reshape(4, -1).T)  # (24, 4): positions x channels
        w1 = _standardise(p["k1"], (0, 1))
        out = jax.lax.conv_general_dilated(
            seq[None], w1, (2,), ((1, 2),), dimension_numbers=("NWC", "WIO", "NWC")
        )[0]
        return jnp.sum(jnp.tanh(out) ** 2)

    routes = _check(loss, params, x, fast=("['k2']", "['k1']"))
    assert "conv: one kernel offset at a time" in routes["['k2']"].route, routes["['k2']"]
    assert routes["['k1']"].route.startswith("scaled ("), routes["['k1']"]


def test_weight_normalised_cnn_sum_count_mask_chunks():
    """``models.cnn(weight_norm=True)`` with a (sum, count) loss, a padded row and chunks:
    the norms and the clipped sum against ``vmap(grad)`` of each example's loss sum."""
    from jaxgrad import models

    model = models.cnn(
        image_shape=(4, 4), channels=(2, 3), num_classes=3, weight_norm=True, dtype=F64
    )
    params = model.init(jax.random.key(0))
    for i, layer in enumerate(params["conv"]):  # g ≠ ‖V‖: the scale matters
        layer["g"] = layer["g"] * (1.5 + i)
    rng = np.random.default_rng(8)
    batch = (_normal(rng, B, 4, 4), jnp.arange(B) % 3)
    mask = jnp.arange(B) != 1

    def loss(p, ex):
        img, label = ex
        ce = -jax.nn.log_softmax(model.apply(p, img))[label]
        return ce * (1 + label), 1 + label  # (sum, count): the count varies by example

    _check_clipped_sum(loss, params, batch, mask)
    one = jax.tree_util.tree_map(lambda x: x[0], batch)
    convs = [lp for lp in plan(loss, params, one).leaves if lp.path.startswith("['conv']")]
    kernels = [lp for lp in convs if lp.path.endswith("['w']")]
    scales = [lp for lp in convs if lp.path.endswith("['g']")]
    assert len(kernels) == len(scales) == 2
    for lp in kernels:  # V: the convolution's own route, its G scaled, a normaliser
        assert lp.route.startswith("scaled (mul, reduce_sum, rsqrt)"), lp
        assert "normaliser" in lp.route and "kernel offset" in lp.route, lp
    for lp in scales:  # g: from A, G and V, then the transformation's VJP
        assert "separable, one block per index of axis 3 of the" in lp.route, lp
        assert "scale of a scaled weight" in lp.route, lp


def test_separable_axes_match_the_jacobian_blocks():
    """The plan's "separable along axis d" against the Jacobian of ``f`` itself: along a
    claimed axis every leaf entry moves one slice of the effective weight at most; along any
    other axis (for these transformations) some entry moves two."""
    from jaxgrad.fast import analysis

    rng = np.random.default_rng(9)
    r = lambda *shape: _normal(rng, *shape)
    cases = [  # (f, params, the axes of f(params) it is separable along)
        (lambda p: _standardise(p["W"], (0, 1)), {"W": r(4, 3, 2)}, (2,)),
        (
            lambda p: p["g"] * p["V"] / jnp.linalg.norm(p["V"], axis=0),
            {"V": r(4, 3), "g": r(3)},
            (1,),
        ),
        (lambda p: p["W"] * jnp.tril(jnp.ones((4, 4))), {"W": r(4, 4)}, (0, 1)),
        (lambda p: p["E"].T * p["s"], {"E": r(3, 4), "s": r(3)}, (1,)),
        (lambda p: (p["W"] - p["W"].mean()) / p["W"].std(), {"W": r(4, 3)}, ()),
        (lambda p: p["W"] * p["W"].sum(1, keepdims=True), {"W": r(4, 3)}, (0,)),
        (lambda p: p["W"] + p["A"] @ p["B"], {"W": r(4, 3), "A": r(4, 2), "B": r(2, 3)}, ()),
        (lambda p: p["W"] * p["W"].T, {"W": r(4, 4)}, ()),
    ]
    for f, params, axes in cases:
        loss = lambda p, x, f=f: [jnp.sum(jnp.tensordot(x, f(p), axes=1))]
        an = analysis.analyse(loss, params, jnp.ones(4, F64))
        tf, n = an.transform, an.num_params
        (v,) = [v for v in range(len(tf.outputs)) if an.uses[n + v]]
        assert tf.blocks[v] == axes, (f, tf.blocks)
        shape = f(params).shape
        for d in range(len(shape)):
            worst = 0  # the most slices along d one leaf entry moves
            for jac in jax.tree_util.tree_leaves(jax.jacobian(f)(params)):
                nonzero = np.moveaxis(np.abs(np.asarray(jac)) > 0, d, 0)
                per_slice = nonzero.reshape(shape[d], -1, *jac.shape[len(shape) :]).any(axis=1)
                worst = max(worst, int(per_slice.sum(axis=0).max()))
            assert (worst <= 1) == (d in axes), (f, d, worst)


def _shapes_in(jaxpr) -> set:
    """Every value's shape in a jaxpr and its sub-jaxprs (loops, branches, custom calls)."""
    from jax.extend import core as jcore

    out = set()
    for e in jaxpr.eqns:
        out.update(tuple(v.aval.shape) for v in e.outvars if hasattr(v.aval, "shape"))
        for sub in jcore.jaxprs_in_params(e.params):
            out |= _shapes_in(sub)
    return out


def _scaled_losses():
    """Dense uses of ``θ ⊙ (scale)`` with a sequence axis: per output column (a parameter,
    inverted), per input row (a parameter), a constant outer-product mask, a scalar
    parameter; each a factor on one side of the use."""
    d, k, t = 6, 5, 2  # (T(d + k) ≤ d k: the Gram route, no per-example gradient)
    rows = jnp.asarray(np.arange(d) % 3 != 0, F64)  # a mask as an outer product
    cols = jnp.asarray(np.arange(k) != 2, F64)

    def loss(p, seq):
        w = p["W"] * (rows[:, None] * cols[None, :]) * p["r"][:, None] / p["c"] * p["a"]
        h = jnp.tanh(seq @ w)
        u = jnp.tanh(h[0] @ (p["U"].T * p["r"]))  # a transposed leaf, no sequence axis
        return jnp.sum(h**2) + jnp.sum(u * jnp.arange(d))

    return loss, (d, k, t)


def test_scaled_dense_weights_keep_their_routes():
    """``θ ⊙ F`` with every factor along one side of the dense use: ``θ`` keeps the dense
    rules on a scaled ``A``/``G`` (no reparametrisation), the scales' gradients are exact."""
    loss, (d, k, t) = _scaled_losses()
    rng = np.random.default_rng(10)
    params = {
        "W": _normal(rng, d, k),
        "U": _normal(rng, d, k),
        "r": 1 + _normal(rng, d, scale=0.2),
        "c": 2 + _normal(rng, k, scale=0.2),
        "a": jnp.asarray(1.3, F64),
    }
    routes = _check(loss, params, _normal(rng, B, t, d), fast=("['W']", "['U']"))
    assert routes["['W']"].route.startswith("scaled (mul, div): the scale folded into its kept")
    assert "Gram" in routes["['W']"].route and "via mul" in routes["['W']"].uses[0]
    assert "output cotangent G" in routes["['U']"].route, routes["['U']"]
    for path in ("['r']", "['c']", "['a']"):
        lp = routes[path]
        assert "scale of a scaled weight" in lp.route and "effective weight (" not in lp.route


def test_scaled_route_forms_no_per_example_weight():
    """The scaled route's program (norms, clipped sum, dots) holds no ``(B, d, k)``
    value; the materialised route of a full mask (not one-sided) does: the check can fail."""
    loss, (d, k, t) = _scaled_losses()
    rng = np.random.default_rng(11)
    params = {"W": _normal(rng, d, k), "U": _normal(rng, d, k), "r": _normal(rng, d)}
    params.update(c=_normal(rng, k), a=jnp.asarray(2.0, F64))
    x, mask = _normal(rng, B, t, d), jnp.ones(B, bool)
    full = jnp.asarray(np.tril(np.ones((d, k))), F64)
    masked = lambda p, seq: jnp.sum(jnp.tanh(seq @ (p["W"] * full)) ** 2)

    def shapes(f, p):  # (the Gram matrix's dense rule may form them by shape: not read)
        def run(p):
            parts = passes.fast_pass(f, p, x, mask)
            v = jax.tree_util.tree_leaves(p)
            return parts.norm_sq, parts.weighted(parts.norm_sq), parts.dots(v)

        found = _shapes_in(jax.make_jaxpr(run)(p).jaxpr)
        return {tuple(s for s in shape if s != 1) for shape in found}  # unit axes dropped

    per_example = {(B, d, k), (B, k, d)}
    assert not per_example & shapes(loss, params)
    assert per_example & shapes(masked, {"W": params["W"]})


def test_weight_normalised_dense_with_a_sequence_axis():
    """Weight normalisation per output column (``g_o V_o / ‖V_o‖``) and a Frobenius-normalised
    weight (``F / ‖F‖``, one channel: the whole matrix) on dense uses with a sequence axis:
    the leaves keep the dense rules, the normalisers' corrections exact, no ``(B, d, k)``."""
    d, k, t = 6, 5, 2
    rng = np.random.default_rng(12)
    params = {
        "V": _normal(rng, d, k),
        "g": 1 + _normal(rng, k, scale=0.3),
        "F": _normal(rng, k, 4),
    }

    def loss(p, seq):
        w = p["g"] * p["V"] / jnp.sqrt(jnp.sum(p["V"] ** 2, axis=0, keepdims=True))
        h = jnp.tanh(seq @ w)
        return jnp.sum(jnp.tanh(h @ (p["F"] / jnp.linalg.norm(p["F"]))) ** 2)

    x = _normal(rng, B, t, d)
    routes = _check(loss, params, x, reparam=("['g']",), fast=("['V']", "['F']"))
    for path in ("['V']", "['F']"):
        assert routes[path].route.startswith("scaled ("), routes[path]
        assert "normaliser" in routes[path].route and "Gram" in routes[path].route
    run = lambda p: passes.fast_pass(loss, p, x, jnp.ones(B, bool)).norm_sq
    found = {
        tuple(s for s in shape if s != 1) for shape in _shapes_in(jax.make_jaxpr(run)(params).jaxpr)
    }
    assert not {(B, d, k), (B, k, d)} & found


def test_scaled_offsets_batched_heads_and_a_tied_table():
    """A parameter offset (``(W - b) * s``: ``b`` gets ``-Σ s ⊙ ∇W_eff`` per column), per-head
    scales on a ``dot_general`` batch axis, and a table both looked up and scaled by column
    (``E.T * es``: tied uses, their cross terms exact)."""
    rng = np.random.default_rng(13)
    r = lambda *shape: _normal(rng, *shape)
    params = {"W": r(3, 4), "b": r(4), "s": r(4), "H": r(2, 3, 4), "hs": r(2)}
    params.update(E=r(7, 4), es=r(7))

    def loss(p, seq):
        h = jnp.tanh(seq @ ((p["W"] - p["b"]) * p["s"]))
        heads = jnp.einsum("td,hdk->htk", seq, p["H"] * p["hs"][:, None, None] * p["s"])
        logits = jnp.tanh(heads[0] @ (p["E"].T * p["es"]))
        rows = jnp.take(p["E"], jnp.arange(1, 6), axis=0)[:, :1]
        return jnp.sum(h**2) + jnp.sum(jnp.tanh(heads) ** 2) + jnp.sum(logits * rows)

    routes = _check(loss, params, r(B, 5, 3), fast=("['W']", "['H']", "['E']"))
    assert routes["['E']"].route.startswith("tied, 2 uses: scaled (mul)"), routes["['E']"]
    for path in ("['b']", "['s']", "['hs']", "['es']"):
        assert "scale of a scaled weight" in routes[path].route, routes[path]


def test_concatenated_blocks_keep_their_routes():
    """Parameters concatenated into one weight (along a contracted axis, a free axis with a
    constant block, a convolution's input channels; one leaf in two blocks): each
    block's use on its slice of ``A`` or ``G``, exact, with no ``(B, 6, 3)`` effective-weight
    gradient; a CLS token concatenated to the example falls back (a vector)."""
    rng = np.random.default_rng(14)
    r = lambda *shape: _normal(rng, *shape)
    params = {"cls": r(6), "W": r(4, 3), "U": r(2, 3), "Q": r(3, 2), "K": r(3, 2)}
    params.update(C1=r(3, 3, 2, 2), C2=r(3, 3, 1, 2))

    def loss(p, seq):
        toks = jnp.concatenate([p["cls"][None], seq], axis=0)
        h = jnp.tanh(toks @ jnp.concatenate([p["W"][:2], p["U"], p["W"][2:]], axis=0))
        qk = h @ jnp.concatenate([p["Q"], p["K"], jnp.zeros((3, 1))], axis=1)
        img = jnp.tanh(qk[:4, :3].reshape(2, 2, 3))
        c = _conv(img, jnp.concatenate([p["C1"], p["C2"]], axis=2))
        return jnp.sum(qk**2) + jnp.sum(jnp.tanh(c) ** 2)

    x = r(B, 4, 6)
    routes = _check(loss, params, x, fast=("['W']", "['U']", "['Q']", "['K']", "['C1']", "['C2']"))
    assert routes["['W']"].route.startswith("2 disjoint blocks: a block of a concatenate")
    assert "its slice of G" in routes["['Q']"].route and routes["['cls']"].fallback
    run = lambda p: passes.fast_pass(loss, p, x, jnp.ones(B, bool)).norm_sq
    found = {tuple(s for s in sh if s != 1) for sh in _shapes_in(jax.make_jaxpr(run)(params).jaxpr)}
    assert not {(B, 6, 3), (B, 3, 6)} & found


def test_a_transformation_reading_a_direct_use_of_its_weight_counts_it_once():
    """``W / σ(W)`` with ``σ = u W v`` (spectral normalisation with a stopped power iteration,
    as ``flax.linen.SpectralNorm`` writes it) and ``tanh(W) − W[:, idx] / 2``: ``u W`` and
    ``W[:, idx]`` are fast uses of ``W`` whose outputs are the same for every example (their
    gradients go by their own routes), so the transformation ``f`` reads their results as
    constants; differentiated through them too, ``σ``'s share was counted twice (norms 34 %
    off). At the top level (the VJP route) and in a layer stack scanned over its weights
    (``W_l / σ_l``: the scaled route, ``1 / σ_l`` a factor with no gradient of its own)."""
    rng = np.random.default_rng(9)
    d = 4
    u, v = jnp.linspace(0.2, 1.0, d, dtype=F64), jnp.linspace(1.0, -0.3, d, dtype=F64)
    idx = jnp.array([2, 0, 3, 1])
    x = _normal(rng, B, d)

    def spectral(p, x):
        return jnp.sum(jnp.sin(jnp.tanh(x @ (jnp.tanh(p["w"]) / (u @ p["w"] @ v)))))

    def gathered(p, x):
        return jnp.sum(jnp.sin(x @ (jnp.tanh(p["w"]) - 0.5 * p["w"][:, idx])))

    def stacked(p, x):
        layer = lambda h, w: (jnp.tanh(h @ (w / (u @ w @ v))), None)
        return jnp.sum(jnp.sin(jax.lax.scan(layer, x, p["ws"])[0]))

    for loss, params in [
        (spectral, {"w": _normal(rng, d, d)}),
        (gathered, {"w": _normal(rng, d, d)}),
    ]:
        _check(loss, params, x, reparam=tuple(f"['{k}']" for k in params))
    routes = _check(stacked, {"ws": _normal(rng, 3, d, d)}, x, fast=("['ws']",))
    assert routes["['ws']"].route.startswith("tied, 2 uses: scaled (div)"), routes
