"""Programs, pytrees and bad inputs the strategies were not written against.

Every strategy is compared, in float64, with a Python loop of ``jax.grad`` over single
examples (the independent reference); bad inputs must fail with an error that names the
argument.
"""

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad
from jaxgrad import reduce
from jaxgrad.fast import clipped_grad, grad_stats, per_example_moments, per_example_norms

jax.config.update("jax_enable_x64", True)

TOL = {"rtol": 1e-9, "atol": 1e-9}


def _flat(tree):
    leaves = [np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def _loop(loss, params, batch):
    """Per-example gradients, loss sums and counts by a Python loop of ``jax.grad``."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    grads, sums, counts = [], [], []
    pair = lambda p, ex: reduce.as_sum_count(loss(p, ex))
    # jitted: one program for every example, where eager grad compiles each primitive alone
    value_and_grad = jax.jit(jax.value_and_grad(pair, has_aux=True))
    for i in range(size):
        ex = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
        (s, n), g = value_and_grad(params, ex)
        grads.append(g)
        sums.append(float(s))
        counts.append(float(n))
    return grads, np.array(sums), np.array(counts)


def _assert_close(got, want):
    got, want = _flat(got), _flat(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)


def _check_every_strategy(loss, params, batch, *, clip=1.0, fast_only=False, mask=None):
    """The strategies against the loop: ``batch_grad`` and the fast clipped sum, norms and
    loss always; with ``fast_only=False`` also ``accumulate_grad``, chunked
    ``per_example_grads``, ``per_example_moments``, chunked fast norms, the chunked ``vmap``
    clipped mean and ``grad_stats``. With a ``mask`` the loop runs over the real rows only,
    and padded rows must come out as zeros."""
    tm = jax.tree_util.tree_map
    if mask is not None:
        real = np.asarray(mask)
        grads, sums, counts = _loop(loss, params, tm(lambda x: x[real], batch))
        zero = tm(np.zeros_like, grads[0])
        rows = iter(grads)
        grads = [next(rows) if r else zero for r in real]
        sums = np.bincount(np.flatnonzero(real), sums, len(real))
        counts = np.bincount(np.flatnonzero(real), counts, len(real))
        batch = (batch, jnp.asarray(real))
    else:
        grads, sums, counts = _loop(loss, params, batch)
        batch = (batch,)
    norms = np.array([np.linalg.norm(_flat(g)) for g in grads])
    total = counts.sum()
    mean = tm(lambda *g: sum(g) / total, *grads)
    factors = np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))
    clipped = tm(lambda *g: sum(c * x for c, x in zip(factors, g, strict=True)), *grads)
    stacked = tm(lambda *g: np.stack(g), *grads)
    f = clipped_grad(loss, l2_clip=clip, reduction="sum", return_loss=True, return_norms=True)
    vmap_clip = clipped_grad(loss, l2_clip=clip, method="vmap", nonfinite="drop", chunk_size=2)

    # Every strategy's results as one jitted program: one compilation, not up to eight.
    def results(params, batch):
        exact = jaxgrad.batch_grad(loss)(params, *batch)
        out = {"mean": exact.grads, "count": exact.count, "fast": f(params, *batch)}
        if fast_only:
            return out
        rows = jaxgrad.per_example_grads(loss, chunk_size=2)(params, *batch)
        stats = grad_stats(loss)(params, *batch)
        return {
            **out,
            "accumulated": jaxgrad.accumulate_grad(loss, num_microbatches=2)(params, *batch).grads,
            "rows": (rows.grads, rows.norms),
            "grad_sum": per_example_moments(loss, chunk_size=2)(params, *batch).grad_sum,
            "norms": per_example_norms(loss, chunk_size=2)(params, *batch),
            "vmap_clip": vmap_clip(params, *batch),
            "stats": (stats.mean, stats.norms),
        }

    got = jax.jit(results)(params, batch)
    _assert_close(got["mean"], mean)
    np.testing.assert_allclose(float(got["count"]), total, **TOL)
    loss_sum, fast, fast_norms = got["fast"]  # the fast path
    _assert_close(fast, clipped)
    _assert_close(fast_norms, norms)
    np.testing.assert_allclose(float(loss_sum), sums.sum(), **TOL)
    if fast_only:
        return
    _assert_close(got["accumulated"], mean)
    _assert_close(got["rows"][0], stacked)
    _assert_close(got["rows"][1], norms)
    _assert_close(got["grad_sum"], tm(lambda x: x * total, mean))
    _assert_close(got["norms"], norms)
    _assert_close(got["vmap_clip"], tm(lambda x: x / total, clipped))
    _assert_close(got["stats"][0], mean)
    _assert_close(got["stats"][1], norms)


B, D, H = 5, 4, 3


def _data(seed=0, seq=None):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k[0], (B, D) if seq is None else (B, seq, D))
    y = jax.random.normal(k[1], (B,))
    w = jax.random.normal(k[2], (D, H)) * 0.5
    v = jax.random.normal(k[3], (H,))
    return x, y, w, v


# ---------------------------------------------------------------------------- empty leaves


def test_zero_size_parameter_leaves_on_every_strategy():
    """An empty leaf (a zero-width layer, an empty conv kernel) has an empty gradient; the
    chunked reducers and the fast rules must not divide by its size."""
    x, y, w, v = _data(seq=6)

    def loss(p, ex):
        xs, t = ex
        conv = jax.lax.conv_general_dilated(xs.T[None], p["k"], (1,), "SAME")  # (1, 0, 6)
        return (
            (jnp.sum(jnp.tanh(xs @ p["w"]) @ p["v"]) - t) ** 2
            + jnp.sum(jnp.tanh(xs @ p["w0"]))
            + jnp.sum(conv)
            + jnp.sum(p["z"])
        )

    params = {
        "w": w,
        "v": v,
        "w0": jnp.zeros((D, 0)),  # a dense use with no output features
        "k": jnp.zeros((0, D, 3)),  # a convolution with no output channels
        "z": jnp.zeros((0, 2)),  # an elementwise use
        "none": None,
    }
    _check_every_strategy(loss, params, (x, y))


# ---------------------------------------------------------------------------- pytrees


class _Pair(NamedTuple):
    w: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Data:
    w: jax.Array
    v: jax.Array


class _Module(eqx.Module):
    w: jax.Array
    v: jax.Array
    act: str = eqx.field(static=True, default="tanh")


def test_params_as_namedtuple_dataclass_and_equinox_module():
    x, y, w, v = _data(1)

    def loss(p, ex):
        act = getattr(jnp, p["m"].act)
        h = act(ex[0] @ p["nt"].w) + act(ex[0] @ p["dc"].w) * act(ex[0] @ p["m"].w)
        return (h @ (p["nt"].v + p["dc"].v * p["m"].v) - ex[1]) ** 2

    params = {"nt": _Pair(w, v), "dc": _Data(w * 0.5, v), "m": _Module(w * 2, v * 0.5)}
    _check_every_strategy(loss, params, (x, y), fast_only=True)


def test_dict_examples_with_int_bool_and_unused_leaves():
    x, y, w, v = _data(2)

    def loss(p, ex):
        h = jnp.tanh(ex["x"] @ p["w"])
        h = jnp.where(ex["flag"], h, -h)
        return (h[ex["i"]] * p["v"][ex["i"]] - ex["y"]) ** 2, ex["n"]

    batch = {
        "x": x,
        "y": y,
        "flag": jnp.array([True, False, True, True, False]),
        "i": jnp.array([0, 1, 2, 0, 1]),
        "n": jnp.array([1, 2, 3, 1, 2]),  # integer item counts
        "unused": jnp.ones((B, 7, 2)),
    }
    _check_every_strategy(loss, {"w": w, "v": v}, batch)


# ---------------------------------------------------------------------------- custom rules


@jax.custom_vjp
def _lin(w, x):
    return x @ w


_lin.defvjp(lambda w, x: (x @ w, (w, x)), lambda res, ct: (2.0 * jnp.outer(res[1], ct), None))


@jax.custom_jvp
def _sin_lin(w, x):
    return jnp.sin(x @ w)


@_sin_lin.defjvp
def _sin_lin_jvp(primals, tangents):
    w, x = primals
    dw, _ = tangents
    return jnp.sin(x @ w), 5.0 * (x @ dw)  # deliberately not the true derivative


def test_user_custom_rules_are_used_exactly_as_jax_grad_uses_them():
    x, y, w, v = _data(3)

    def loss(p, ex):
        a = jnp.tanh(_lin(p["w"], ex[0])) @ p["v"]
        b = jnp.sum(_sin_lin(p["w"], ex[0]) * p["v"])
        c = jax.nn.gelu(ex[0] @ p["w"]) + jax.nn.relu(ex[0] @ p["w"])
        return (a + b + jnp.sum(c) - ex[1]) ** 2

    _check_every_strategy(loss, {"w": w, "v": v}, (x, y), fast_only=True)


def test_double_backprop_loss():
    """A loss holding ``jax.grad`` of the model (a gradient penalty): W appears transposed
    in the inner backward pass, and its uses there are uses like any other."""
    x, y, w, v = _data(4, seq=3)

    def loss(p, ex):
        f = lambda xs: jnp.sum(jnp.tanh(xs @ p["w"]) * p["v"])
        return (f(ex[0]) - ex[1]) ** 2 + 0.3 * jnp.sum(jax.grad(f)(ex[0]) ** 2)

    _check_every_strategy(loss, {"w": w, "v": v}, (x, y), fast_only=True)


# ---------------------------------------------------------------------------- bad inputs


def test_complex_parameters_are_rejected_by_the_norm_functions_and_named():
    """The norms are Σ x² (not Σ |x|²), so a complex leaf would give complex "norms"."""
    x, y, w, v = _data(5)
    params = {"w": w.astype(jnp.complex128), "v": v}
    loss = lambda p, ex: jnp.sum(jnp.abs(ex[0] @ p["w"]) ** 2 * p["v"])
    for f in (
        per_example_norms(loss),
        per_example_norms(loss, method="vmap"),
        clipped_grad(loss, l2_clip=1.0),
        grad_stats(loss),
        per_example_moments(loss),
    ):
        with pytest.raises(TypeError, match=r"params\['w'\].*complex128"):
            f(params, (x, y))
    # the gradient strategies themselves differentiate complex leaves as jax.grad does
    want = sum(jax.grad(loss)(params, (x[i], y[i]))["w"] for i in range(B)) / B
    got = jaxgrad.batch_grad(loss)(params, (x, y)).grads["w"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


@pytest.mark.parametrize("bad", [lambda s: {"loss": s}, lambda s: [s, 1.0, 2.0], lambda s: "loss"])
def test_loss_returning_a_dict_or_object_is_a_named_error(bad):
    x, y, w, _ = _data(6)
    loss = lambda p, ex: bad(jnp.sum(ex[0] @ p["w"]))
    for f in (jaxgrad.batch_grad(loss), per_example_norms(loss), jaxgrad.per_example_grads(loss)):
        with pytest.raises(TypeError, match="`loss_fn` must return a scalar or a pair"):
            f({"w": w}, (x, y))


def test_loss_fn_that_is_not_callable_is_named_at_construction():
    for make in (jaxgrad.batch_grad, per_example_norms, grad_stats):
        with pytest.raises(TypeError, match=r"`loss_fn` must be a function.*float"):
            make(3.0)
    with pytest.raises(TypeError, match=r"`loss_fn` must be a function.*NoneType"):
        clipped_grad(None, l2_clip=1.0)
    with pytest.raises(TypeError, match=r"`output_loss` must be a function.*int"):
        jaxgrad.naive.backprop_mean_error(lambda p, x: x, 3)


@pytest.mark.parametrize("clip", [np.float32(0.5), jnp.float32(0.5), np.array(0.5), np.int64(1)])
def test_l2_clip_as_numpy_or_jax_scalar(clip):
    x, y, w, v = _data(7)
    loss = lambda p, ex: (jnp.tanh(ex[0] @ p["w"]) @ p["v"] - ex[1]) ** 2
    params = {"w": w, "v": v}
    want = clipped_grad(loss, l2_clip=float(clip))(params, (x, y))
    _assert_close(clipped_grad(loss, l2_clip=clip)(params, (x, y)), want)


@pytest.mark.parametrize("clip", [True, "1", np.ones(2), jnp.array(-1.0), float("inf")])
def test_bad_l2_clip_is_named(clip):
    with pytest.raises(ValueError, match="`l2_clip` must be a positive finite number"):
        clipped_grad(lambda p, ex: jnp.sum(p * ex), l2_clip=clip)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_propagate_makes_every_leaf_nan_not_some_leaves_unclipped(method):
    """An inf input whose loss is finite (tanh saturates) gives a NaN norm; that example
    cannot be clipped, so "propagate" must not add its finite leaves unclipped."""
    x, y, w, v = _data(8)
    x = x.at[2, 1].set(jnp.inf)
    loss = lambda p, ex: (jnp.tanh(ex[0] @ p["w"]) @ p["v"] - ex[1]) ** 2
    params = {"w": w, "v": v}
    f = clipped_grad(loss, l2_clip=1.0, nonfinite="propagate", method=method, return_norms=True)
    grads, norms = f(params, (x, y))
    assert np.isnan(norms[2]) and np.all(np.isfinite(np.delete(np.asarray(norms), 2)))
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isnan(np.asarray(leaf)))
    # "drop" leaves exactly that example out: the loop over the other four
    keep = np.array([True, True, False, True, True])
    grads_ref, _, _ = _loop(loss, params, (x[keep], y[keep]))
    n = np.array([np.linalg.norm(_flat(g)) for g in grads_ref])
    c = np.minimum(1.0, 1.0 / n)
    want = jax.tree_util.tree_map(
        lambda *g: sum(ci * gi for ci, gi in zip(c, g, strict=True)) / 4, *grads_ref
    )
    _assert_close(
        clipped_grad(loss, l2_clip=1.0, nonfinite="drop", method=method)(params, (x, y)), want
    )


# ---------------------------------------------------------------------------- lookups


@pytest.mark.parametrize("rows", [7, 2])  # the same-row Gram route and the materialised one
def test_out_of_bounds_lookups_in_every_gather_mode(rows):
    """``x[idx]`` gathers in PROMISE_IN_BOUNDS mode: an out-of-bounds lookup reads the
    clamped row but its scatter-add transpose drops the update, so ``jax.grad`` gives that
    row nothing. Only CLIP mode sends the gradient to the clamped row."""
    k = jax.random.split(jax.random.PRNGKey(9), 2)
    table = jax.random.normal(k[0], (rows, 3))
    idx = jnp.array([[0, -1, 9, 1, 1, 0], [1, 1, -7, 0, 0, 0], [-9, 0, 1, 2, 1, 0]])
    y = jax.random.normal(k[1], (3,))

    def loss(p, ex):
        i, t = ex
        a = p["e"][i]  # PROMISE_IN_BOUNDS (negative indices wrapped first)
        b = jnp.take(p["e"], i, axis=0, mode="clip")
        c = jnp.take(p["e"], i, axis=0, mode="fill", fill_value=0.0)
        d = jnp.take(p["e"], i, axis=0, mode="wrap")
        tied = jnp.tanh(a) @ p["e"].T  # the table also as an output projection
        return (jnp.sum(jnp.sin(a) * b) + jnp.sum(c * d) + jnp.sum(tied) - t) ** 2

    _check_every_strategy(loss, {"e": table}, (idx, y), fast_only=True)


# ---------------------------------------------------------------------------- losses


def test_loss_helpers_name_bad_labels_and_shapes():
    from jaxgrad import losses

    x = jnp.arange(15.0).reshape(5, 3) / 10
    w = jnp.full((3, 4), 0.1)
    apply = lambda p, xi: xi @ p
    sce = losses.supervised(apply, losses.softmax_cross_entropy)
    with pytest.raises(TypeError, match="softmax_cross_entropy: the label must be an integer"):
        jaxgrad.batch_grad(sce)(w, (x, jnp.array([0.0, 1, 2, 3, 1])))
    bce = losses.supervised(apply, losses.binary_cross_entropy)  # 4 logits, 1 label each
    with pytest.raises(
        ValueError, match=r"binary_cross_entropy: .* prediction \(4,\) and target \(\)"
    ):
        jaxgrad.batch_grad(bce)(w, (x, jnp.array([0.0, 1, 1, 0, 1])))
    tok = lambda p, ex: losses.token_cross_entropy(ex[0] @ p, ex[1], pad_id=-1)
    xs = jnp.ones((5, 6, 3))
    with pytest.raises(ValueError, match=r"`targets` must have shape \(6,\).*got \(5,\)"):
        jaxgrad.batch_grad(tok)(w, (xs, jnp.zeros((5, 5), int)))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="`num_classes` must be a positive integer"):
            losses.supervised(apply, losses.softmax_cross_entropy, num_classes=bad)
    # a well-formed token loss, padded sequences included, on every strategy
    targets = jnp.array(
        [[0, 1, -1, -1, -1, -1], [-1] * 6, [3] * 6, [2, -1] * 3, [1, 2, 3, 0, 1, 2]]
    )
    xs = jnp.arange(5 * 6 * 3.0).reshape(5, 6, 3) / 50
    _check_every_strategy(tok, w, (xs, targets))


# ---------------------------------------------------------------------------- PRNG keys


def test_typed_prng_keys_in_the_batch_with_padding():
    """Per-example dropout keys kept in the batch as typed keys (``jax.random.key``): padded
    rows are refilled with a real row's key bits, on every strategy."""
    x, y, w, v = _data(10)
    keys = jax.random.split(jax.random.key(0), B)

    def loss(p, ex):
        xi, t, key = ex
        keep = jax.random.bernoulli(key, 0.7, (H,))
        return (jnp.where(keep, jnp.tanh(xi @ p["w"]), 0) @ p["v"] / 0.7 - t) ** 2

    mask = np.array([True, False, True, True, False])
    _check_every_strategy(loss, {"w": w, "v": v}, (x, y, keys), mask=mask)


@pytest.mark.parametrize("leaf", [np.array(["a"] * B), np.array([None] * B), "text"])
def test_batch_leaf_that_is_not_numeric_is_named(leaf):
    x, _, w, _ = _data(11)
    loss = lambda p, ex: jnp.sum(ex[0] @ p)
    for f in (jaxgrad.batch_grad(loss), per_example_norms(loss)):
        with pytest.raises(TypeError, match=r"`batch` leaf batch\[1\] is .*numeric"):
            f(w, (x, leaf))


def test_float64_params_of_a_float32_loss_keep_float64_norms():
    """The gradients of float64 parameters are float64 even when the loss is cast to
    float32; the fast path's norms (and so its clip factors) must not be rounded to float32
    where the vmap path's are not."""
    x, y, w, v = _data(12)
    loss = lambda p, ex: ((jnp.tanh(ex[0] @ p["w"]) @ p["v"] - ex[1]) ** 2).astype(jnp.float32)
    params = {"w": w, "v": v}
    grads, _, _ = _loop(loss, params, (x, y))
    want = np.array([np.linalg.norm(_flat(g)) for g in grads])
    for method in ("auto", "vmap"):
        got = per_example_norms(loss, method=method)(params, (x, y))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-13)


def test_a_value_shared_by_every_example_goes_in_extra_arguments():
    loss = lambda p, ex, t: jnp.sum(p * ex["x"]) * t
    batch = {"x": jnp.arange(6.0).reshape(3, 2)}
    with pytest.raises(ValueError, match=r"scalar leaf .* extra loss argument"):
        jaxgrad.batch_grad(lambda p, ex: loss(p, ex, ex["t"]))(jnp.ones(2), {**batch, "t": 0.5})
    want = 0.5 * np.mean(np.asarray(batch["x"]), axis=0)
    np.testing.assert_allclose(jaxgrad.batch_grad(loss)(jnp.ones(2), batch, None, 0.5).grads, want)
    got = clipped_grad(loss, l2_clip=100.0)(jnp.ones(2), batch, None, 0.5)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("identity", ["sharding_constraint", "device_put", "barrier"])
def test_identity_annotations_of_a_weight_keep_it_dense(identity):
    """A sharding constraint, a device placement or a scheduling barrier on a weight only
    annotates its value: the weight keeps the dense route (it went through its VJP, formed
    per example), exact against the loop."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    annotate = {
        "sharding_constraint": lambda w: jax.lax.with_sharding_constraint(
            w, NamedSharding(mesh, PartitionSpec())
        ),
        "device_put": lambda w: jax.device_put(w, jax.devices()[0]),
        "barrier": jax.lax.optimization_barrier,
    }[identity]
    x, y, w, v = _data(seq=3)

    def loss(p, ex):
        xe, ye = ex
        return (jnp.sum(jnp.tanh(xe @ annotate(p["w"])) @ p["v"]) - ye) ** 2

    params = {"w": w, "v": v}
    assert "dense" in str(jaxgrad.fast.plan(loss, params, (x[0], y[0]))).split("['w']")[1]
    _check_every_strategy(loss, params, (x, y), clip=0.5, fast_only=True)
    per_example_norms(loss, strict=True)(params, (x, y))  # no leaf takes the fallback
