"""Silent wrong results the fast path must not give (issue 18).

* Values that do not depend on the example although an input of their equation does (a loop
  counter, a carry iterated on constants, an output of a ``cond`` or of a custom call that
  reads no example), used with a parameter: ``vmap`` leaves them unbatched, so their
  cotangent is the batch's; the fast path must still get every example's own.
* Complex operands of real parameters (Fourier layers).
* The ``unique_indices`` flag of the lookups the analysis writes.

Float64; norms and clipped sums (clip at the median norm, so some examples are clipped and
some are not) against ``jax.vmap(jax.grad(...))`` and numpy, with a padding mask, scalar and
``(sum, count)`` losses.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad
from jaxgrad.fast import analysis as analysis_lib
from jaxgrad.fast import linear as linear_lib
from jaxgrad.fast import plan

F64 = jnp.float64
B = 6


def _normal(rng, *shape, scale=0.5):
    return jnp.asarray(scale * rng.normal(size=shape), F64)


def _loss_sum(loss, args):
    def summed(p, x):
        out = loss(p, x, *args)
        return out[0] if isinstance(out, tuple) else out

    return summed


def _reference(loss, params, batch, mask, args):
    """Per-example gradients ``(B, P)`` by ``vmap(grad)``, padded rows zero."""
    grads = jax.jit(jax.vmap(jax.grad(_loss_sum(loss, args)), in_axes=(None, 0)))(params, batch)
    flat = np.concatenate(
        [np.asarray(g).reshape(B, -1) for g in jax.tree_util.tree_leaves(grads)], axis=1
    )
    return np.where(mask[:, None], flat, 0.0)


def _flat(tree):
    return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(tree)])


def _close(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300)
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def _call_each(fns, *args):
    """``fns`` called on ``args`` (the last one a tuple of extra arguments), in order."""
    *head, extra = args
    return tuple(fn(*head, *extra) for fn in fns)


def check(loss, params, batch, *args, more_args=()):
    """Fast norms and clipped sum against vmap(grad) + numpy, with the last row padded.

    ``more_args``: further extra-argument tuples, run by the same compiled functions (the
    clip norm is the median norm of the first).
    """
    mask = np.arange(B) < B - 1
    norms_fn = jaxgrad.per_example_norms(loss)
    both = None
    for a in (args, *more_args):
        grads = _reference(loss, params, batch, mask, a)
        norms = np.linalg.norm(grads, axis=1)
        assert np.all(norms[mask] > 0)
        if both is None:
            clip = float(np.median(norms[mask]))
            # the norms and the clipped sum as one program: one compilation, not two
            fns = (norms_fn, jaxgrad.clipped_grad(loss, l2_clip=clip, reduction="sum"))
            both = jax.jit(functools.partial(_call_each, fns))
        factors = np.where(mask, np.minimum(1.0, clip / np.where(mask, norms, 1)), 0)
        got_norms, got_sum = both(params, batch, jnp.asarray(mask), a)
        _close(got_norms, norms)
        _close(_flat(got_sum), factors @ grads)
    one = jax.tree_util.tree_map(lambda x: x[0], batch)
    return {lp.path: lp for lp in plan(loss, params, one, *args).leaves}


def _setup(seed=0, n=4):
    rng = np.random.default_rng(seed)
    params = {
        "W": _normal(rng, n, n),
        "V": _normal(rng, n, n),
        "E": _normal(rng, 5, n),
    }
    return rng, params, _normal(rng, B, n, scale=1.0)


# --- 1. values the example does not reach, though their equation reads it -------------------


def test_lookup_by_a_fori_loop_counter():
    _, params, batch = _setup()

    def loss(p, x):  # the counter is carried next to the example but never reads it
        def body(_, c):
            k, h = c
            return k + 1, jnp.tanh(h @ p["V"])

        k, h = jax.lax.fori_loop(0, 3, body, (1, x))
        return jnp.sum(jnp.sin(h * p["E"][k])) + jnp.sum(jnp.tanh(h @ p["W"]) ** 2)

    routes = check(loss, params, batch)
    assert routes["['E']"].route.startswith("gather")


def test_while_loop_counter_and_a_carry_iterated_on_constants():
    _, params, batch = _setup(1)
    z0 = jnp.linspace(-1.0, 1.0, 4, dtype=F64)

    def loss(p, x):  # z is a fixed-point iteration on constants; k a counter
        def body(c):
            k, z, h = c
            return k + 1, jnp.cos(z), jnp.tanh(1.5 * h)

        k, z, h = jax.lax.while_loop(lambda c: c[0] < 4, body, (0, z0, x))
        out = jnp.tanh(z @ p["W"]) * (h @ p["V"]) + p["E"][k % 5] * h
        return jnp.sum(out**2), 4.0

    routes = check(loss, params, batch)
    assert not routes["['W']"].fallback and not routes["['E']"].fallback


def test_while_loop_with_a_per_example_predicate_batches_every_carry():
    _, params, batch = _setup(2)
    z0 = jnp.linspace(-1.0, 1.0, 4, dtype=F64)

    def loss(p, x):  # the trip count depends on the example: vmap batches every carry
        def body(c):
            k, z, h = c
            return k + 1, jnp.cos(z), 0.8 * h

        k, z, h = jax.lax.while_loop(lambda c: jnp.sum(c[2] ** 2) > 0.3, body, (0, z0, x))
        return jnp.sum(jnp.tanh(z @ p["W"]) * (h @ p["V"])) + jnp.sum(p["E"][k % 5] ** 2)

    check(loss, params, batch)


def test_cond_on_an_extra_argument():
    _, params, batch = _setup(3)
    z0 = jnp.linspace(-1.0, 1.0, 4, dtype=F64)

    def loss(p, x, flag):  # output 0 of the cond reads no example
        a, h = jax.lax.cond(
            flag > 0, lambda x: (jnp.cos(z0), jnp.tanh(x)), lambda x: (z0**2, x**2), x
        )
        return jnp.sum(jnp.sin(a @ p["W"]) * h) + jnp.sum(h @ p["V"]), 2.0

    check(loss, params, batch, jnp.asarray(1.0, F64), more_args=[(jnp.asarray(-1.0, F64),)])


@pytest.mark.parametrize("kind", ["custom_jvp", "custom_vjp"])
def test_two_output_custom_call_with_an_output_the_example_does_not_reach(kind):
    _, params, batch = _setup(4)
    c0 = jnp.linspace(0.5, 1.5, 4, dtype=F64)

    def impl(x, c):
        return jnp.tanh(x), jnp.sin(c) + 0.5

    if kind == "custom_jvp":
        f = jax.custom_jvp(impl)
        f.defjvp(lambda p, t: (impl(*p), (t[0] / jnp.cosh(p[0]) ** 2, jnp.cos(p[1]) * t[1])))
    else:
        f = jax.custom_vjp(impl)
        f.defvjp(
            lambda x, c: (impl(x, c), (x, c)),
            lambda r, g: (g[0] / jnp.cosh(r[0]) ** 2, jnp.cos(r[1]) * g[1]),
        )

    def loss(p, x):
        h, c = f(x, c0)
        return jnp.sum(jnp.tanh(c @ p["W"]) * (h @ p["V"])) + jnp.sum((c @ p["W"]) ** 2)

    routes = check(loss, params, batch)
    assert routes["['W']"].route.startswith("tied, 2 uses")


def test_conv_after_a_scan():
    rng, _, _ = _setup(5)
    params = {"K": _normal(rng, 3, 2, 3, 3), "V": _normal(rng, 4, 4)}
    batch = _normal(rng, B, 4, scale=1.0)
    img0 = _normal(rng, 1, 2, 6, 6, scale=1.0)

    def loss(p, x):  # the image is carried next to the example and never reads it
        def step(c, _):
            img, h = c
            return (jnp.tanh(1.1 * img + 0.1), jnp.sin(h @ p["V"])), None

        (img, h), _ = jax.lax.scan(step, (img0, x), None, length=3)
        y = jax.lax.conv_general_dilated(img, p["K"], (1, 1), "VALID")  # (1, 3, 4, 4)
        return jnp.sum(jnp.tanh(y[0, :, 0, :]) * h) + jnp.sum(y[0, 1] * h[0])

    routes = check(loss, params, batch)
    assert routes["['K']"].route.startswith("conv")


def test_lookup_by_an_inner_loop_counter_inside_a_scan_body():
    rng, params, _ = _setup(6)
    batch = _normal(rng, B, 3, 4, scale=1.0)

    def loss(p, xs):
        def step(h, x):
            k, s = jax.lax.fori_loop(0, 2, lambda i, c: (c[0] + 1, c[1] + x), (1, x))
            h = jnp.tanh(h @ p["W"] + p["E"][k] * s)
            return h, h

        h, ys = jax.lax.scan(step, jnp.zeros(4, F64), xs)
        return jnp.sum(ys**2) + jnp.sum(h)

    routes = check(loss, params, batch)
    assert routes["['E']"].route.startswith("scan")


def test_sampler_loop_in_a_distillation_loss():
    """The student is fit to a teacher on samples drawn by a Langevin-style loop from a fixed
    key (an extra argument, the same for every example) and on the example itself; the same
    loop also carries the teacher's features of the example."""
    rng = np.random.default_rng(7)
    d, hdim = 4, 8
    params = {"W1": _normal(rng, d, hdim), "W2": _normal(rng, hdim, d)}
    teacher = {"T1": _normal(rng, d, hdim), "T2": _normal(rng, hdim, d)}
    batch = _normal(rng, B, d, scale=1.0)

    def student(p, z):
        return jnp.tanh(z @ p["W1"]) @ p["W2"]

    def loss(p, x, key):
        energy = lambda z: jnp.sum(jnp.tanh(z @ teacher["T1"]) ** 2)

        def body(t, c):
            z, h = c
            noise = jax.random.normal(jax.random.fold_in(key, t), z.shape, F64)
            z = z - 0.1 * jax.grad(energy)(z) + 0.05 * noise
            return z, jnp.tanh(h @ teacher["T1"]) @ teacher["T2"]

        z0 = jax.random.normal(key, (3, d), F64)
        z, h = jax.lax.fori_loop(0, 4, body, (z0, x))  # z: samples, h: features of x
        target = jnp.tanh(z @ teacher["T1"]) @ teacher["T2"]
        return jnp.sum((student(p, z) - target) ** 2) + jnp.sum((student(p, x) - h) ** 2)

    routes = check(loss, params, batch, jax.random.key(3))
    assert routes["['W1']"].route.startswith("tied, 2 uses")


# --- 2. complex operands of real parameters ----------------------------------------------


def test_fno_spectral_layer():
    rng = np.random.default_rng(8)
    n, cin, cout, modes = 16, 2, 3, 5
    params = {"R": _normal(rng, modes, cin, cout), "P": _normal(rng, cin, cout)}
    batch = _normal(rng, B, n, cin, scale=1.0)

    def loss(p, x):  # x: (n, cin)
        x_ft = jnp.fft.rfft(x, axis=0)[:modes]  # (modes, cin) complex
        out_ft = jnp.einsum("mi,mio->mo", x_ft, p["R"])  # real weights on the modes
        out_ft = jnp.pad(out_ft, ((0, n // 2 + 1 - modes), (0, 0)))
        y = jnp.fft.irfft(out_ft, n=n, axis=0) + x @ p["P"]
        return jnp.sum(jnp.tanh(y) ** 2), float(n)

    routes = check(loss, params, batch)
    assert "2 real positions" in routes["['R']"].route


def test_real_weights_times_a_complex_vector():
    rng = np.random.default_rng(9)
    params = {"W": _normal(rng, 5, 8), "V": _normal(rng, 8, 3)}
    batch = _normal(rng, B, 8, scale=1.0)

    def loss(p, x):
        y = p["W"] @ jnp.fft.fft(x)  # (5,) complex
        y = jnp.abs(y) ** 2 + jnp.real(y) * jnp.imag(y)
        z = jnp.fft.fft(jnp.tanh(x)) @ p["V"]  # complex on the other side
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.imag(z) ** 2)

    routes = check(loss, params, batch)
    for leaf in ("['W']", "['V']"):
        assert "2 real positions" in routes[leaf].route


def test_real_weights_tied_to_complex_and_real_operands_and_casts():
    rng = np.random.default_rng(11)
    params = {"W": _normal(rng, 5, 8), "C": _normal(rng, 8, 8), "E": _normal(rng, 6, 8)}
    batch = _normal(rng, B, 8, scale=1.0)

    def loss(p, x):
        y = jnp.abs(p["W"] @ jnp.fft.fft(x)) ** 2 + jnp.tanh(p["W"] @ x)  # W tied
        z = p["C"].T.astype(jnp.complex128) @ jnp.fft.ifft(x)  # C cast to complex
        e = p["E"].astype(jnp.complex128)[jnp.argmax(x) % 6]  # a lookup of complex rows
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.real(z * jnp.conj(z[::-1]) * e))

    routes = check(loss, params, batch)
    assert routes["['W']"].route.startswith("tied, 2 uses: complex operand")
    assert "2 real positions" in routes["['C']"].route
    assert routes["['E']"].fallback and "complex" in routes["['E']"].reason


def test_spectral_layer_inside_a_scan():
    rng = np.random.default_rng(12)
    n, modes = 8, 3
    params = {"R": _normal(rng, modes, 4, 4), "U": _normal(rng, 4, 4)}
    batch = _normal(rng, B, 3, n, 4, scale=1.0)  # 3 steps of an (n, 4) field

    def loss(p, xs):
        def step(u, x):
            u_ft = jnp.fft.rfft(u + x, axis=0)[:modes]
            v_ft = jnp.einsum("mi,mio->mo", u_ft, p["R"])
            v_ft = jnp.pad(v_ft, ((0, n // 2 + 1 - modes), (0, 0)))
            u = jnp.tanh(jnp.fft.irfft(v_ft, n=n, axis=0) + u @ p["U"])
            return u, jnp.sum(u**2)

        u, ys = jax.lax.scan(step, jnp.zeros((n, 4), F64), xs)
        return jnp.sum(ys) + jnp.sum(jnp.sin(u)), 3.0

    routes = check(loss, params, batch)
    assert routes["['R']"].route.startswith("scan, 3 steps, shared: complex operand")


# --- 3. the unique-indices flag -----------------------------------------------------------


def test_lookups_lifted_over_steps_are_not_marked_unique():
    """A row lookup ``E[t]`` is one gather per step, trivially unique and sorted; lifted over
    the steps of a scan it picks T rows per example, which repeat (and are not sorted): the
    scatter-add that transposes it must not be told they are unique (XLA may then drop
    repeated updates on an accelerator)."""
    rng, params, _ = _setup(10)
    tokens = jnp.asarray(rng.integers(0, 2, size=(B, 7)))  # rows 0 and 1 only: repeats

    def loss(p, toks):
        def step(h, t):
            h = jnp.tanh(h @ p["W"] + p["E"][t])
            return h, h

        h, ys = jax.lax.scan(step, jnp.zeros(4, F64), toks)
        return jnp.sum(ys**2) + jnp.sum(p["E"][toks[0]] * h)

    one = jax.tree_util.tree_map(lambda x: x[0], tokens)
    an = analysis_lib.analyse(loss, params, one)
    (lifted,) = [u for u in an.fast[0] if u.site == "scan"]  # "E" sorts first
    assert lifted.steps == 7
    assert not lifted.op.params["unique_indices"]
    assert not lifted.op.params["indices_are_sorted"]
    # the gradient through the lifted lookup, with repeated rows, is the sum of the steps'
    rows = np.array([0, 1, 1, 0, 0, 1, 1])
    a = jnp.asarray(np.stack([rows, 0 * rows], axis=-1)[None])  # (row, column 0) per step
    assert a.shape[1:] == lifted.op.in_avals[1].shape
    g = _normal(rng, 1, *lifted.op.out_avals[0].shape)
    got = linear_lib.per_example_grads(lifted.op, 0, a, g)[0]
    expected = np.zeros((5, 4))
    np.add.at(expected, rows, np.asarray(g[0]).reshape(7, 4))
    _close(got, expected)
    check(loss, params, tokens)


def _indexed_ops(jaxpr, out):
    """Every gather/scatter in a jaxpr and its sub-jaxprs: ``(name, unique, lookups)``, with
    ``lookups`` the number of index vectors per batch group (1: trivially unique)."""
    for e in jaxpr.eqns:
        if "unique_indices" in e.params:
            dn = e.params["dimension_numbers"]
            batching = getattr(
                dn, "start_indices_batching_dims", getattr(dn, "scatter_indices_batching_dims", ())
            )
            shape = e.invars[1].aval.shape[:-1]  # the last axis holds the index vector
            lookups = int(np.prod([n for d, n in enumerate(shape) if d not in batching]))
            out.append((e.primitive.name, e.params["unique_indices"], lookups))
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            _indexed_ops(sub, out)
    return out


def test_fast_pass_marks_only_single_lookups_unique():
    """The jaxprs of the fast functions on lookups inside a scan with repeated tokens (the
    materialised lookup route, a lookup by the loop counter, a lookup at the top level): a
    gather or scatter-add told its indices are unique looks up one row per example (a
    counter's ``E[i]``, written as a one-index gather); every other has the flag off."""
    rng = np.random.default_rng(3)
    # E: 2 rows, 7 lookups (T² > 8 rows: the lookup's per-example gradient is formed)
    params = {"W": _normal(rng, 4, 4), "E": _normal(rng, 2, 4), "P": _normal(rng, 3, 4)}
    tokens = jnp.asarray(np.tile([0, 1, 1, 0, 0, 1, 1], (B, 1)))  # every example repeats

    def loss(p, toks):
        def step(h, xs):
            i, t = xs
            h = jnp.tanh(h @ p["W"] + p["E"][t] + p["P"][i % 3])
            return h, h

        h, ys = jax.lax.scan(step, jnp.zeros(4, F64), (jnp.arange(7), toks))
        return jnp.sum(ys**2) + jnp.sum(p["P"][toks % 3] * h)

    mask = jnp.asarray(np.arange(B) < B - 1)
    fns = [
        jaxgrad.per_example_norms(loss),
        jaxgrad.clipped_grad(loss, l2_clip=1.0, reduction="sum"),
        lambda p, b, m: jaxgrad.per_example_dots(loss)(p, b, m, reference=p),
    ]
    ops = []
    for f in fns:
        _indexed_ops(jax.make_jaxpr(f)(params, tokens, mask).jaxpr, ops)
    assert any(lookups > 1 for _, _, lookups in ops)  # the repeated lookups are there
    assert all(lookups == 1 for _, unique, lookups in ops if unique), ops
    check(loss, params, tokens)


def test_a_custom_vjp_on_a_weight_whose_bwd_is_not_linear():
    """A ``custom_vjp`` transformation of a weight (a gradient clip, the user's bwd rule)
    has a VJP that is not linear in the cotangent: ``Σ_i c_i bwd(∇_i) ≠ bwd(Σ_i c_i ∇_i)``,
    so the clipped sum must apply it per example (flat and per-leaf clip norms)."""

    @jax.custom_vjp
    def clip_grad(w):
        return w

    clip_grad.defvjp(lambda w: (w, None), lambda _, g: (jnp.clip(g, -0.2, 0.2),))
    rng = np.random.default_rng(4)
    params = {"W": _normal(rng, 3, 4, scale=1.0), "u": _normal(rng, 4, scale=1.0)}
    batch = _normal(rng, B, 3, scale=2.0)

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ clip_grad(p["W"])) * p["u"]) ** 2

    check(loss, params, batch)
    assert "clipped sum: those, weighted" in str(plan(loss, params, batch[0]))
    mask = np.arange(B) < B - 1
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, batch)
    norms = {k: np.linalg.norm(np.asarray(g).reshape(B, -1), axis=1) for k, g in grads.items()}
    clips = {k: float(np.median(n[mask])) for k, n in norms.items()}  # some rows clipped
    per_layer = jaxgrad.clipped_grad(loss, l2_clip=clips, reduction="sum")
    got = per_layer(params, batch, jnp.asarray(mask))
    for k, g in grads.items():
        factor = np.where(mask, np.minimum(1.0, clips[k] / norms[k]), 0)
        _close(got[k], np.tensordot(factor, np.asarray(g), 1))


def test_nonlinear_custom_vjp_in_a_scan_body_on_tied_uses_and_a_custom_jvp_derivative():
    """A ``custom_vjp`` whose bwd is far from linear (a scaled sign) is applied per step in a
    scan body and once to the sum of two uses' cotangents, never to a sum over examples or
    per use; a ``custom_jvp`` weight whose rule's derivative (2) is not its primal's (1) is
    differentiated by the rule. Norms, clipped sum, Gram matrix, dots."""

    @jax.custom_vjp
    def sign_grad(w):
        return w

    sign_grad.defvjp(lambda w: (w, None), lambda _, g: (0.05 * jnp.sign(g),))

    @jax.custom_jvp
    def twice(w):
        return w

    twice.defjvp(lambda primals, tangents: (primals[0], 2.0 * tangents[0]))
    rng, params, batch = _setup(7)
    params = {"W": params["W"], "V": params["V"], "u": params["E"][0]}

    def loss(p, x):
        w = sign_grad(p["V"])  # one call, two uses: bwd of the summed cotangent
        step = lambda h, _: (jnp.tanh(h @ sign_grad(p["W"])), None)  # bwd per step
        h, _ = jax.lax.scan(step, x, None, length=2)
        return jnp.sum(jnp.tanh(h @ w) @ w * twice(p["u"])) ** 2

    check(loss, params, batch)
    mask = np.arange(B) < B - 1
    grads = _reference(loss, params, batch, mask, ())
    _close(jaxgrad.gradient_gram(loss)(params, batch, jnp.asarray(mask)), grads @ grads.T)
    v = jax.tree_util.tree_map(lambda x: _normal(rng, *x.shape), params)
    dots = jaxgrad.per_example_dots(loss)  # the factored route: jax.jvp takes no custom_vjp
    _close(dots(params, batch, jnp.asarray(mask), reference=v), grads @ _flat(v))
