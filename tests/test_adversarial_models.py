"""Models and losses as users write them (Flax linen, Equinox, hand-written JAX), not as
jaxgrad's own tests do.

Every number is compared, in float64, with a Python loop of ``jax.grad`` over single examples
(the independent reference), with norms and clipping done in NumPy; where the fast path's
plan is the point, the route it reports is checked too.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import private_key

import jaxgrad
from jaxgrad import reduce
from jaxgrad.fast import clipped_grad, grad_stats, per_example_moments, per_example_norms, plan
from jaxgrad.privacy import dp_grad

jax.config.update("jax_enable_x64", True)

TOL = {"rtol": 1e-9, "atol": 1e-9}
tm = jax.tree_util.tree_map


def _flat(tree):
    leaves = [np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def _f64(tree):
    return tm(lambda x: jnp.asarray(x, jnp.float64) if eqx.is_inexact_array(x) else x, tree)


def _reference(loss, params, batch, args=(), *, clip=1.0, mask=None):
    """Per-example gradients by a loop of ``jax.grad``; norms, clipped sum in NumPy."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    real = np.ones(size, bool) if mask is None else np.asarray(mask)
    grads, sums = [], []
    # One compile for every example, not the loss's ops dispatched one by one.
    one = jax.jit(
        jax.value_and_grad(lambda p, ex: reduce.as_sum_count(loss(p, ex, *args)), has_aux=True)
    )
    for i in range(size):
        ex = tm(lambda x, i=i: x[i], batch)
        (s, _), g = one(params, ex)
        grads.append(_flat(g) * real[i])
        sums.append(float(s) * real[i])
    grads = np.stack(grads)
    norms = np.linalg.norm(grads, axis=1)
    factors = np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))
    return grads, norms, factors @ grads, np.array(sums)


def _check_fast(loss, params, batch, args=(), *, clip=1.0, mask=None, chunk_size=None):
    """The fast path's norms, clipped sum and statistics against the loop."""
    grads, norms, clipped, sums = _reference(loss, params, batch, args, clip=clip, mask=mask)
    f = clipped_grad(
        loss,
        l2_clip=clip,
        reduction="sum",
        return_loss=True,
        return_norms=True,
        chunk_size=chunk_size,
    )
    loss_sum, got, got_norms = f(params, batch, mask, *args)
    np.testing.assert_allclose(float(loss_sum), sums.sum(), **TOL)
    np.testing.assert_allclose(_flat(got), clipped, **TOL)
    np.testing.assert_allclose(np.asarray(got_norms), norms, **TOL)
    real = np.ones(len(norms), bool) if mask is None else np.asarray(mask)
    stats = grad_stats(loss, chunk_size=chunk_size)(params, batch, mask, *args)
    mean = grads[real].mean(axis=0)
    trace_cov = np.sum((grads[real] - mean) ** 2) / (real.sum() - 1)
    np.testing.assert_allclose(float(stats.trace_cov), trace_cov, rtol=1e-8)
    return grads, norms, clipped


def _route(p, path):
    (leaf,) = [lp for lp in p.leaves if lp.path == path]
    return leaf


# ------------------------------------------------------------------ row lookups by scalar index


class _TiedLM(eqx.Module):
    emb: eqx.nn.Embedding
    norm: eqx.nn.LayerNorm
    lin: eqx.nn.Linear

    def __call__(self, tokens):
        e = jax.vmap(self.emb)(tokens)  # eqx's Embedding looks up ONE token: weight[i]
        h = jax.vmap(self.norm)(jnp.tanh(jax.vmap(self.lin)(e)))
        return h @ self.emb.weight.T  # tied unembedding


def test_equinox_embedding_under_vmap_is_an_embedding_use_not_a_table_copy():
    # Was: `.emb.weight` took the exact fallback ("a gather that is not a whole-row
    # lookup": vmap of weight[i] indexes the row's own axis at 0 too), a per-example copy of
    # the whole table. The numbers were right; the memory was B × vocabulary × width.
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    vocab, width, size, steps = 7, 4, 5, 6
    model = _TiedLM(
        eqx.nn.Embedding(vocab, width, key=keys[0]),
        eqx.nn.LayerNorm(width),
        eqx.nn.Linear(width, width, key=keys[1]),
    )
    params, static = eqx.partition(_f64(model), eqx.is_inexact_array)
    tokens = jax.random.randint(keys[2], (size, steps), 0, vocab)
    tokens = tokens.at[0].set(3).at[1, :2].set(-1)  # repeated rows; a negative index

    def loss(p, t):
        logits = eqx.combine(p, static)(t)
        logp = jax.nn.log_softmax(logits[:-1])
        return -jnp.sum(jnp.take_along_axis(logp, jnp.clip(t[1:], 0)[:, None], axis=1))

    route = _route(plan(loss, params, tokens[0]), ".emb.weight")
    assert not route.fallback and route.route.startswith("tied, 2 uses"), route
    assert any(u.startswith("gather") for u in route.uses), route
    mask = jnp.array([True, True, True, False, True])
    _check_fast(loss, params, tokens, clip=2.0, mask=mask, chunk_size=3)


def test_row_and_column_lookups_by_scalar_index_and_stacked_layers_in_a_loop():
    # W[i] with a scalar i is a `dynamic_slice`, which took the exact fallback; so did
    # fori_loop over stacked layers, Ws[i] at step i.
    rng = np.random.default_rng(1)
    params = {
        "E": jnp.asarray(rng.normal(size=(6, 4))),
        "Ws": jnp.asarray(rng.normal(size=(3, 4, 4)) * 0.5),
        "v": jnp.asarray(rng.normal(size=(5,))),
    }
    tokens = jnp.asarray(rng.integers(0, 6, size=(5, 3))).at[0].set(2)
    tokens = tokens.at[1, 2].set(9)  # out of range: clamped, as dynamic_slice clamps

    def loss(p, t):
        h = p["E"][t[0]] + p["E"][t[1]] * p["E"][t[2]]  # rows, one of them repeated
        col = p["E"][:, t[1] % 4]  # a column
        h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["Ws"][i] + p["v"][i]), h)
        return jnp.sum(h * col[:4]) + p["v"][t[0] % 5] ** 2

    p = plan(loss, params, tokens[0])
    for path in ("['E']", "['Ws']", "['v']"):
        assert not _route(p, path).fallback, p
    assert "gather" in _route(p, "['Ws']").route, p
    _check_fast(loss, params, tokens, clip=0.5)


def test_blocks_of_a_weight_split_or_sliced_out_are_dense_uses():
    # A fused QKV weight split in three (`jnp.split`: one `split` equation), a block W[1:3], a
    # strided V[::3], a reversed W[:, ::-1]: each took the exact fallback (a per-example copy
    # of the leaf). Blocks that do not overlap have no cross terms; those that do (V[1::4]
    # and V[1:3] share row 1; the reversal reads all of W) keep theirs.
    rng = np.random.default_rng(14)
    d, h = 4, 2
    shapes = {"qkv": (d, 3 * h), "o": (h, d), "W": (d, d), "V": (6, d)}
    params = {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}
    batch = (jnp.asarray(rng.normal(size=(4, 3, d))), jnp.asarray(rng.normal(size=(4,))))

    def loss(p, ex):
        x, y = ex
        wq, wk, wv = jnp.split(p["qkv"], 3, axis=1)
        a = jax.nn.softmax((x @ wq) @ (x @ wk).T) @ (x @ wv)
        out = a @ p["o"] + x @ p["W"][:, ::-1] + x[:, 1:3] @ p["W"][1:3]
        out = out + x[:, ::2] @ p["V"][::3] + x @ p["V"][1::4].T @ p["V"][1:3]
        return jnp.sum(jnp.tanh(out)) * y

    p = plan(loss, params, tm(lambda x: x[0], batch))
    assert not p.fallbacks, p
    assert _route(p, "['qkv']").route.startswith("3 disjoint blocks: dense"), p
    assert _route(p, "['V']").route.startswith("2 disjoint blocks: "), p
    _check_fast(loss, params, batch, clip=3.0, mask=jnp.array([True, False, True, True]))


def test_fused_gate_weights_split_outside_and_inside_a_scan_body():
    # A GRU with its three gates' weights fused in one leaf, split before the scan (Wx) and in
    # its body (Wh), and a layer stack scanned over fused weights split per layer (Ws): the
    # parts are disjoint blocks, so no cross terms between them.
    rng = np.random.default_rng(21)
    d, h, steps = 3, 4, 5
    shapes = {"Wx": (d, 3 * h), "Wh": (h, 3 * h), "Ws": (2, h, 2 * h), "o": (h,)}
    params = {k: jnp.asarray(rng.normal(size=s) * 0.5) for k, s in shapes.items()}
    batch = (jnp.asarray(rng.normal(size=(4, steps, d))), jnp.asarray(rng.normal(size=(4,))))

    def loss(p, ex):
        x, y = ex
        xz, xr, xh = jnp.split(p["Wx"], 3, axis=1)

        def step(hid, xt):
            hz, hr, hh = jnp.split(p["Wh"], 3, axis=1)
            z = jax.nn.sigmoid(xt @ xz + hid @ hz)
            r = jax.nn.sigmoid(xt @ xr + hid @ hr)
            hid = (1 - z) * hid + z * jnp.tanh(xt @ xh + (r * hid) @ hh)
            return hid, hid @ p["o"]

        hid, out = jax.lax.scan(step, jnp.zeros(h), x)

        def layer(hid, w):
            gate, cand = jnp.split(w, 2, axis=1)
            return jax.nn.sigmoid(hid @ gate) * jnp.tanh(hid @ cand), None

        hid, _ = jax.lax.scan(layer, hid, p["Ws"])
        return jnp.sum((out - y) ** 2) + jnp.sum(hid)

    p = plan(loss, params, tm(lambda x: x[0], batch))
    assert not p.fallbacks, p
    for path, k in (("['Wx']", 3), ("['Wh']", 3), ("['Ws']", 2)):
        assert _route(p, path).route.startswith(f"{k} disjoint blocks: scan"), p
    _check_fast(loss, params, batch, clip=1.0)


# ------------------------------------------------------------------------- low-precision batches


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_parameters_and_batches(dtype):
    # Was: "`batch` leaf batch[0] is dtype bfloat16; every leaf of `batch` must be a numeric
    # ... array" (ml_dtypes' bfloat16 has NumPy kind "V", as structured dtypes do).
    rng = np.random.default_rng(2)
    params = {"W": rng.normal(size=(3, 4)) * 0.5, "b": rng.normal(size=(4,))}
    batch = (rng.normal(size=(4, 2, 3)), rng.normal(size=(4,)))

    def loss(p, ex):
        x, y = ex
        return jnp.mean((jnp.tanh(x @ p["W"] + p["b"]).sum(-1) - y) ** 2)

    _, norms, clipped, _ = _reference(loss, _f64(params), _f64(batch), clip=1.0)
    low = tm(lambda x: jnp.asarray(x, dtype), (params, batch))
    for method in ("auto", "vmap"):
        got = per_example_norms(loss, method=method)(*low)
        np.testing.assert_allclose(np.asarray(got, np.float64), norms, rtol=3e-2)
        g = clipped_grad(loss, l2_clip=1.0, reduction="sum", method=method)(*low)
        assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(g))
        np.testing.assert_allclose(_flat(g), clipped, rtol=5e-2, atol=5e-2)
    # A DP step refuses them: its clipped sum, formed in the parameters' dtype, rounds by
    # more than the clip norm (see test_privacy_parts), so it names the leaf instead.
    step = dp_grad(loss, l2_clip=1.0, noise_multiplier=0.0, expected_batch_size=2.0)
    with pytest.raises(TypeError, match=r"leaf \['W'\] has dtype .*float32 or float64"):
        step(*low, None, private_key(0))


def test_float16_gradient_entries_above_256_have_finite_norms_on_every_path():
    # Was, on method="vmap" and in per_example_moments: the squares were summed in float16,
    # where 300² is inf, so a finite gradient had an infinite norm: clipped_grad raised
    # FloatingPointError and dp_grad silently dropped the example as non-finite (a DP step
    # now refuses float16 parameters outright).
    w = jnp.ones(3, jnp.float16)
    x = jnp.array([[300.0, 1.0, 2.0], [0.5, 0.1, 0.2]], jnp.float16)
    loss = lambda w, ex: jnp.dot(ex, w)  # example i's gradient is x_i
    rows = np.asarray(x, np.float64)
    norms = np.linalg.norm(rows, axis=1)
    clipped = (np.minimum(1.0, 1.0 / norms)[:, None] * rows).sum(axis=0)
    for method in ("auto", "vmap"):
        got = per_example_norms(loss, method=method)(w, x)
        np.testing.assert_allclose(np.asarray(got, np.float64), norms, rtol=1e-3)
        g = clipped_grad(loss, l2_clip=1.0, reduction="sum", method=method)(w, x)
        np.testing.assert_allclose(np.asarray(g, np.float64), clipped, rtol=2e-3)
        f = dp_grad(
            loss,
            l2_clip=1.0,
            noise_multiplier=0.0,
            expected_batch_size=1.0,
            method=method,
            return_info=True,
        )
        with pytest.raises(TypeError, match="float32 or float64"):  # (a DP step refuses
            f(w, x, None, private_key(0))  # float16 parameters, see test_privacy_parts)
    moments = per_example_moments(loss)(w, x)
    np.testing.assert_allclose(np.asarray(moments.norms, np.float64), norms, rtol=1e-3)


# ------------------------------------------------------------------------------- named errors


def test_plan_checks_params_as_the_strategies_do():
    # Was: "Cannot determine dtype of <custom_jvp ...>" for a whole Equinox module, and an
    # integer leaf was reported "unused" (which every strategy refuses).
    model = eqx.nn.MLP(3, 1, 4, 1, key=jax.random.PRNGKey(0))
    x = jnp.ones(3)
    with pytest.raises(TypeError, match=r"params\.activation.*eqx\.partition"):
        plan(lambda m, ex: m(ex)[0], model, x)
    with pytest.raises(TypeError, match=r"`loss_fn` must be a function"):
        plan("loss", {"w": x}, x)
    with pytest.raises(TypeError, match=r"params\['step'\] is dtype int"):
        plan(lambda p, ex: jnp.dot(p["w"], ex), {"w": x, "step": jnp.arange(2)}, x)
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    assert len(plan(lambda p, ex: jnp.sum(ex), params, x).leaves) == 4


def test_a_one_element_loss_is_named_with_its_shape():
    loss = lambda w, x: (x @ w)[None]  # shape (1,), e.g. a Dense(1) output
    with pytest.raises(TypeError, match=r"got shape \(1,\) \(squeeze a one-element loss"):
        per_example_norms(loss)(jnp.ones(2), jnp.ones((3, 2)))


# ---------------------------------------------------------------- BatchNorm and extra arguments


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
        return nn.Dense(1, param_dtype=jnp.float64)(nn.relu(x))[..., 0]


def _bn_problem():
    model = _BNNet()
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 3))
    variables = model.init(jax.random.PRNGKey(4), x[0], False)
    stats = _f64(tm(lambda s: s + 0.3, variables["batch_stats"]))  # not the identity
    return model, variables["params"], stats, x


def test_dp_grad_passes_extra_loss_arguments_like_every_strategy():
    # Was: dp_grad's f took (params, batch, mask, key) only, so BatchNorm running statistics
    # passed alongside the parameters (as every other strategy takes them) had no way in.
    model, params, stats, x = _bn_problem()

    def loss(p, ex, batch_stats):  # eval mode: the running averages
        return (model.apply({"params": p, "batch_stats": batch_stats}, ex, False) - 1.0) ** 2

    _, _, clipped, _ = _reference(loss, params, x, (stats,), clip=0.5)
    f = dp_grad(loss, l2_clip=0.5, noise_multiplier=0.0, expected_batch_size=4.0)
    np.testing.assert_allclose(_flat(f(params, x, None, private_key(0), stats)), clipped / 4, **TOL)
    key = private_key(1)
    noisy = dp_grad(loss, l2_clip=0.5, noise_multiplier=1.0, expected_batch_size=4.0)
    closed = lambda p, ex: loss(p, ex, stats)
    same = dp_grad(closed, l2_clip=0.5, noise_multiplier=1.0, expected_batch_size=4.0)
    np.testing.assert_allclose(
        _flat(noisy(params, x, None, key, stats)), _flat(same(params, x, None, key)), **TOL
    )
    _check_fast(loss, params, x, (stats,), clip=0.5)
    routes = plan(loss, params, x[0], stats)  # extra arguments reach plan's loss too
    assert _route(routes, "['Dense_0']['kernel']").route.startswith("dense"), routes


def test_batchnorm_in_training_mode_is_per_example_as_documented():
    # loss_fn sees ONE example, so training-mode BatchNorm normalises each example by its own
    # statistics (docs/models.md, "BatchNorm"): exactly the loop's per-example
    # gradients, and not the gradient of the batch-statistics loss.
    model, params, stats, x = _bn_problem()

    def loss(p, ex):
        out, _ = model.apply(
            {"params": p, "batch_stats": stats}, ex[None], True, mutable=["batch_stats"]
        )
        return (out[0] - 1.0) ** 2

    grads, _, _, _ = _reference(loss, params, x)
    got = jaxgrad.per_example_grads(loss)(params, x).grads
    stacked = np.concatenate([np.asarray(g).reshape(len(x), -1) for g in jax.tree.leaves(got)], 1)
    np.testing.assert_allclose(stacked, grads, **TOL)

    def batch_loss(p):  # what a user training with batch statistics differentiates
        out, _ = model.apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])
        return jnp.mean((out - 1.0) ** 2)

    assert not np.allclose(_flat(jax.grad(batch_loss)(params)), grads.mean(axis=0))
