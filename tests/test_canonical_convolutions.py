"""jaxgrad._loops.canonical_convolutions: the same numbers as the program it rewrites, and
every convolution inside a loop body or branch in XLA:CPU's canonical layout.

Each program runs twice, as it is (the reference) and wrapped, in float64; the wrapped
program's jaxpr is walked for the convolutions' dimension numbers: canonical (``NHWC`` input
and output, ``HWIO`` kernel) inside a ``scan``/``while``/``cond`` at any depth, as they were
at the top level.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback
from jax.extend import core as jcore
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgrad import _loops, grads, models

jax.config.update("jax_enable_x64", True)

# On other backends the wrapper runs the program unchanged.
CPU = jax.default_backend() == "cpu"

RNG = np.random.default_rng(0)


def _normal(*shape):
    return jnp.asarray(RNG.normal(size=shape))


def _convs(f, *args):
    """``(inside a body, dimension numbers)`` of every convolution in ``f``'s jaxpr."""
    found = []

    def walk(jaxpr, inside):
        for e in jaxpr.eqns:
            if e.primitive.name == "conv_general_dilated":
                found.append((inside, e.params["dimension_numbers"]))
            inner = inside or e.primitive.name in ("scan", "while", "cond")
            for sub in jcore.jaxprs_in_params(e.params):
                walk(sub, inner)

    walk(jax.make_jaxpr(f)(*args).jaxpr, False)
    return found


def _canonical(dn):
    # Written out here, independently of _loops: N, spatial..., C / spatial..., I, O.
    nd = len(dn.lhs_spec)
    nhwc = (0, nd - 1, *range(1, nd - 1))
    return (
        dn.lhs_spec == nhwc
        and dn.out_spec == nhwc
        and dn.rhs_spec == (nd - 1, nd - 2, *range(nd - 2))
    )


def _close(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert (u.dtype, u.shape) == (v.dtype, v.shape)
        # (the canonical kernel may sum in another order: round-off of the dtype's size)
        rtol = 1e-12 if u.dtype == jnp.float64 else 1e-6
        np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol / 10)


def _check(f, *args):
    """``f`` wrapped gives ``f``'s numbers; its body convolutions are canonical (and some of
    ``f``'s were not, so the check needs the rewrite), its top-level ones as they were."""
    wrapped = _loops.canonical_convolutions(f)
    _close(jax.jit(wrapped)(*args), jax.jit(f)(*args))
    before, after = _convs(f, *args), _convs(wrapped, *args)
    assert len(after) == len(before)
    assert [dn for inside, dn in after if not inside] == [dn for inside, dn in before if not inside]
    if not CPU:
        assert after == before
        return
    assert all(_canonical(dn) for inside, dn in after if inside)
    assert any(inside and not _canonical(dn) for inside, dn in before)


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME")  # NCHW / OIHW / NCHW


X, W = _normal(2, 3, 5, 5), _normal(3, 3, 3, 3)  # 3 -> 3 channels: a conv can be a carry


# Every kind of convolution lax has, a few kinds at once: (input shape, kernel shape, keywords).
CONVS = [
    (
        (2, 4, 7, 6),
        (6, 2, 3, 2),
        dict(
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            window_strides=(2, 1),
            padding="SAME",
            feature_group_count=2,
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float64,
        ),
    ),
    # odd orders, the output's unlike the input's; dilated input and kernel, explicit padding
    (
        (7, 2, 6, 3),
        (4, 3, 2, 3),
        dict(
            dimension_numbers=("HNWC", "OHWI", "CHWN"),
            padding=((1, 2), (0, 1)),
            lhs_dilation=(1, 2),
            rhs_dilation=(2, 1),
        ),
    ),
    # depthwise, forward already canonical (its gradients are not)
    (
        (2, 6, 6, 3),
        (3, 3, 1, 3),
        dict(
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=3,
            padding="SAME",
            precision=(lax.Precision.HIGH, lax.Precision.DEFAULT),
        ),
    ),
    (
        (4, 9, 3),
        (3, 3, 4),
        dict(dimension_numbers=("NWC", "WIO", "NWC"), batch_group_count=2, window_strides=(2,)),
    ),
    (
        (5, 2, 4, 6, 3),
        (2, 3, 2, 3, 2),
        dict(dimension_numbers=("DNHWC", "HDWIO", "CNDHW"), window_strides=(1, 2, 1)),
    ),
    ((2, 3), (4, 3), dict(dimension_numbers=("NC", "OI", "NC"))),  # no spatial dimension
]


def test_every_kind_of_convolution_and_its_gradient_in_a_scan_body():
    # Each convolution, its value and both gradients (the backward convolutions, in other
    # dimension orders: the case the rewrite is for) computed in one scan body; and an
    # integer and a bfloat16 -> float32 convolution.
    operands = [(_normal(*xs), _normal(*ws)) for xs, ws, _ in CONVS]
    xi = jnp.asarray(RNG.integers(-3, 4, (2, 3, 5, 5)), jnp.int32)
    wi = jnp.asarray(RNG.integers(-3, 4, (4, 3, 2, 2)), jnp.int32)
    x16, w16 = _normal(2, 3, 5, 5).astype(jnp.bfloat16), _normal(4, 3, 2, 2).astype(jnp.bfloat16)

    def f(operands, xi, wi, x16, w16):
        def body(scale, _):
            outs = []
            for (x, w), (_, _, kw) in zip(operands, CONVS, strict=True):
                kw = {"window_strides": (1,) * (x.ndim - 2), "padding": "VALID", **kw}
                y, back = jax.vjp(lambda x, w, kw=kw: lax.conv_general_dilated(x, w, **kw), x, w)
                outs.append((y, back(jnp.sin(scale * y))))
            other = dict(window_strides=(1, 1), padding="VALID")
            outs.append(lax.conv_general_dilated(xi, wi, **other, preferred_element_type=jnp.int64))
            outs.append(
                lax.conv_general_dilated(x16, w16, **other, preferred_element_type=jnp.float32)
            )
            return scale + 0.5, outs

        return lax.scan(body, 1.0, None, length=2)

    _check(f, operands, xi, wi, x16, w16)


def _nested(x, w, p):
    # scan in cond in while
    def step(c):
        i, acc = c
        scanned = lambda a: lax.scan(lambda a, _: (_conv(a, w) / 3, jnp.sum(a)), a, None, length=2)
        y, s = lax.cond(p, scanned, lambda a: (a, jnp.zeros(2)), x)
        return i + 1, acc + jnp.sum(y) + jnp.sum(s)

    return lax.while_loop(lambda c: c[0] < 2, step, (0, 0.0))


PROGRAMS = {
    "while": lambda x, w: lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, _conv(c[1], w) / 3), (0, x)
    ),
    "cond": lambda x, w: lax.cond(jnp.sum(x) > 0, lambda: _conv(x, w), lambda: 2 * x),
    "switch": lambda x, w: [
        lax.switch(i, [lambda: _conv(x, w), lambda: _conv(2 * x, w), lambda: x]) for i in (0, 1, 2)
    ],
    "fori_loop": lambda x, w: lax.fori_loop(0, 3, lambda i, c: _conv(c, w) / (i + 3), x),
    "map": lambda x, w: lax.map(lambda a: _conv(a[None], w)[0], x),
    "map_batch_size": lambda x, w: lax.map(lambda a: _conv(a[None], w)[0], x, batch_size=2),
    "scan_reverse_unroll": lambda x, w: lax.scan(
        lambda c, s: (_conv(c, w) * s, jnp.sum(c)), x, jnp.arange(1.0, 4.0), reverse=True, unroll=2
    ),
    "nested": lambda x, w: _nested(x, w, True),
    # a top-level convolution, kept as it is, then a body's
    "top_level": lambda x, w: lax.scan(
        lambda c, _: (_conv(c, w) / 3, None),
        lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "IOHW", "NCHW")),
        None,
        length=2,
    ),
}


def test_every_loop_and_branch():
    # (one program of them all: one compilation)
    _check(lambda x, w: {name: f(x, w) for name, f in PROGRAMS.items()}, X, W)
    straight = lambda x, w: _conv(_conv(x, w), w)  # no body: nothing to rewrite
    assert _convs(_loops.canonical_convolutions(straight), X, W) == _convs(straight, X, W)


def _calls(x, w):
    """A scan body calling the convolution through every wrapper JAX has."""

    @jax.custom_jvp
    def jvp_conv(x, w):
        return _conv(x, w)

    jvp_conv.defjvp(lambda p, t: (jvp_conv(*p), _conv(t[0], p[1]) + _conv(p[0], t[1])))

    @jax.custom_vjp
    def vjp_conv(x, w):
        return _conv(x, w)

    vjp_conv.defvjp(lambda x, w: (_conv(x, w), (x, w)), lambda r, g: jax.vjp(_conv, *r)[1](g))

    def solve_conv(x, w):  # x solves (1 + 0.01 conv) y = x, with the identity as solver
        solve = lambda matvec, b: b
        return lax.custom_linear_solve(lambda v: v + 0.01 * _conv(v, w), x, solve, solve)

    calls = [
        jax.jit(_conv),
        jax.checkpoint(_conv),
        jvp_conv,
        vjp_conv,
        jax.named_call(_conv, name="c"),
        solve_conv,
    ]

    def body(c, _):
        return c + sum(jnp.sum(jnp.sin(call(x, w))) for call in calls), None

    return lax.scan(body, 0.0, None, length=2)[0]


def _with_grad(f):
    # The wrapped function of a gradient: the backward convolutions are in the loop body.
    return lambda x, w: (f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1))(x, w))


def test_calls_inside_a_body_and_their_gradients():
    # jax.checkpoint's body is an open jaxpr: it was re-bound unrewritten; custom_linear_solve's
    # jaxprs are a named tuple (its rules read jaxprs.solve): the wrapper passed a plain one.
    _check(_with_grad(_calls), X, W)


def test_gradient_and_vmap_of_the_wrapped_function():
    def f(x, w):
        return jnp.sum(
            jnp.sin(lax.scan(lambda c, _: (_conv(c, w) / 3, None), x, None, length=2)[0])
        )

    wrapped = _loops.canonical_convolutions(f)
    both = lambda g: jax.jit(
        lambda x, w, xs: (jax.grad(g, (0, 1))(x, w), jax.vmap(g, (0, None))(xs, w))
    )
    xs = jnp.stack([X, -2 * X])
    _close(both(wrapped)(X, W, xs), both(f)(X, W, xs))
    # (Only the numbers: the gradient of the wrapped function transposes the canonical
    # convolution into non-canonical backward ones; jaxgrad wraps the gradient instead.)


def test_effects_and_odd_carries_survive():
    seen, ordered = [], []

    def f(x, params):
        def body(c, s):
            i, flag, weak, a = c
            a = _conv(a, params["w"]) / 3 * s
            jax.debug.callback(lambda v: seen.append(float(v)), jnp.sum(a))
            io_callback(lambda v: ordered.append(float(v)), None, jnp.max(a), ordered=True)
            return (i + 1, jnp.logical_not(flag), weak + 1, a), {"sum": jnp.sum(a), "none": None}

        init = (jnp.int32(0), True, 1.0, x)  # 1.0: a weak-typed carry
        return lax.scan(body, init, jnp.arange(1.0, 3.0))

    # The wrapped function closes over tracers of an outer jit (params); the output holds None.
    params = {"w": W, "unused": None}
    ref = jax.jit(f)(X, params)
    wrapped = jax.jit(lambda x, params: _loops.canonical_convolutions(lambda x: f(x, params))(x))
    _close(wrapped(X, params), ref)
    for calls in (seen, ordered):  # one call per step, in each run
        assert len(calls) == 4
        np.testing.assert_allclose(calls[2:], calls[:2], rtol=1e-12)
    assert jax.eval_shape(wrapped, X, params)[0][2].weak_type is ref[0][2].weak_type is True
    # A batch of no examples.
    _check(lambda x, w: lax.scan(lambda c, _: (_conv(c, w), None), x, None, length=2), X[:0], W)


def test_carries_typed_by_a_mesh():
    # On an Explicit mesh a carry's type holds its sharding; in a shard_map it holds the mesh
    # axes it varies over. The re-traced body must give the same types (it dropped both).
    body = lambda x, w: lax.scan(lambda c, _: (_conv(c, w) / 3, None), x, None, length=2)[0]
    mesh = jax.make_mesh((1,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        _check(body, jax.device_put(X, NamedSharding(mesh, P("d"))), W)

    def varying(x, w):  # the carry varies over 'd'; psum's value does not
        return lax.scan(
            lambda c, _: (_conv(c, w) / 3 + lax.psum(jnp.sum(c), "d"), None), x, None, length=2
        )[0]

    auto = jax.make_mesh((1,), ("d",), axis_types=(AxisType.Auto,))
    mapped = lambda f: jax.shard_map(f, mesh=auto, in_specs=(P("d"), P()), out_specs=P("d"))
    _close(
        jax.jit(mapped(_loops.canonical_convolutions(varying)))(X, W),
        jax.jit(mapped(varying))(X, W),
    )


def test_accumulate_grad_scanned_has_canonical_body_convolutions():
    # tests/test_loops.py checks the scanned CNN's numbers against a Python loop; this, that
    # its scan body's convolutions (forward and backward) reach XLA:CPU canonical.
    model = models.cnn(image_shape=(8, 8), channels=(2, 3), dtype=jnp.float64)
    params = jax.eval_shape(model.init, jax.random.key(0))  # (traced only: shapes suffice)
    loss = lambda p, ex: -jax.nn.log_softmax(model.apply(p, ex[0]))[ex[1]]
    batch = (jax.ShapeDtypeStruct((6, 8, 8), jnp.float64), jnp.arange(6) % 3)
    f = grads.accumulate_grad(loss, num_microbatches=2, unroll=False)
    inside = [dn for inside, dn in _convs(f, params, batch) if inside]
    assert len(inside) == 5  # 2 layers' forward and kernel gradients, the 2nd's input gradient
    assert all(_canonical(dn) for dn in inside) is CPU
