"""The fast path on models jaxgrad did not write (Flax, Equinox, hand-written JAX) and on
structures it must fall back for (parameters inside custom_jvp, scan), against per-example
``jax.grad`` (and, for Equinox, against ``method="vmap"``)."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import F64, assert_rel_close, case, flat, reference_grads

from jaxgrad.fast import clipped_grad, grad_stats, passes


def check_against_reference(loss, params, batch, mask=None):
    """Fast norms and clipped mean against per-example ``jax.grad`` (a loop) and numpy."""
    g = reference_grads(loss, params, batch)
    m = np.ones(g.shape[0], bool) if mask is None else np.asarray(mask)
    ref_norms = np.linalg.norm(g, axis=1) * m
    assert np.sum(ref_norms > 0) >= 2  # a test that can only pass is a defect
    clip = float(np.median(ref_norms[ref_norms > 0]))
    got, norms = clipped_grad(loss, l2_clip=clip, return_norms=True)(params, batch, mask)
    factors = np.where(ref_norms > clip, clip / np.maximum(ref_norms, 1e-300), 1.0) * m
    assert_rel_close(norms, ref_norms)
    assert_rel_close(flat(got), factors @ g / m.sum())


def kinds(loss, params, batch):
    """``{param path: kind-or-'exact'}`` from the jaxpr analysis."""
    an = passes.analyse(loss, params, batch)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    out = {paths[j]: "exact" for j in an.exact}
    out.update({paths[j]: "+".join(u.kind for u in uses) for j, uses in an.fast.items()})
    out.update({paths[j]: "reparam" for j in an.reparam})
    return out


def test_analysis_routes_weights_fast_and_small_params_exact():
    got = kinds(*case("transformer"))
    assert got["['embed']"] == "gather"
    for name in ("wq", "wk", "wv", "wo"):
        assert got[f"['blocks'][0]['attn']['{name}']"] == "dense"
    assert got["['head']['w']"] == "dense"
    assert got["['blocks'][0]['ln1']['scale']"] == "exact"
    assert kinds(*case("tied"))["['embed']"] == "gather+dense"
    assert kinds(*case("cnn"))["['conv'][0]['w']"] == "conv"


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), strides=(2, 2), padding="VALID", param_dtype=F64)(x)
        x = jax.nn.relu(x).reshape(-1)
        x = nn.LayerNorm(param_dtype=F64)(nn.Dense(8, param_dtype=F64)(x))
        return nn.Dense(3, param_dtype=F64)(jax.nn.gelu(x))


def test_flax_linen_model():
    net = FlaxNet()
    x = jax.random.normal(jax.random.key(1), (6, 7, 7, 2), F64)
    y = jnp.arange(6) % 3
    params = net.init(jax.random.key(2), x[0])

    def loss(p, ex):
        logits = net.apply(p, ex[0])
        return -jax.nn.log_softmax(logits)[ex[1]]

    got = kinds(loss, params, (x, y))
    assert got["['params']['Conv_0']['kernel']"] == "conv"
    assert got["['params']['Dense_0']['kernel']"] == "dense"
    check_against_reference(loss, params, (x, y), jnp.array([1, 1, 0, 1, 1, 1], bool))


def test_equinox_model():
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    model = eqx.nn.Sequential(
        [
            eqx.nn.Conv1d(2, 3, kernel_size=3, padding=1, key=k1, dtype=F64),
            eqx.nn.Lambda(lambda h: jnp.tanh(h).reshape(-1)),
            eqx.nn.MLP(15, 2, width_size=6, depth=2, activation=jax.nn.softplus, key=k2, dtype=F64),
        ]
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, ex):
        return jnp.sum((eqx.combine(p, static)(ex[0]) - ex[1]) ** 2)

    batch = (jax.random.normal(k3, (5, 2, 5), F64), jnp.ones((5, 2), F64))
    got = kinds(loss, params, batch)
    assert sum(v == "dense" for v in got.values()) == 3  # eqx Linear: W @ x, W on the left
    assert sum(v == "conv" for v in got.values()) == 1
    check_against_reference(loss, params, batch)
    stats = grad_stats(loss)(params, batch)
    ref = grad_stats(loss, method="vmap")(params, batch)
    assert_rel_close(stats.trace_cov, ref.trace_cov)


@jax.custom_jvp
def scaled(x, w):
    return x * w


scaled.defjvp(
    lambda primals, tangents: (
        scaled(*primals),
        tangents[0] * primals[1] + primals[0] * tangents[1],
    )
)


def test_param_inside_custom_jvp_falls_back_exactly_and_scan_is_lifted():
    k = jax.random.split(jax.random.key(4), 4)
    params = {
        "w": jax.random.normal(k[0], (3, 3), F64),
        "scale": jax.random.normal(k[1], (3,), F64),
        "stack": jax.random.normal(k[2], (2, 3, 3), F64) / 2,
    }

    def loss(p, x):
        h = scaled(jnp.tanh(x @ p["w"]), p["scale"])
        h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])
        return jnp.sum(h**2)

    batch = jax.random.normal(k[3], (4, 3), F64)
    got = kinds(loss, params, batch)
    # the scanned-over stack is a dense use lifted over the steps (one slice per step)
    assert got == {"['w']": "dense", "['scale']": "exact", "['stack']": "dense"}
    check_against_reference(loss, params, batch)


def test_conv_layouts_dilation_groups_and_sequence_conv():
    k = jax.random.split(jax.random.key(5), 3)
    params = {
        "w": jax.random.normal(k[0], (4, 2, 3, 3), F64),  # OIHW, 2 groups of 2 channels
        "v": jax.random.normal(k[1], (5, 4, 2), F64),  # OIW, 1-d conv over a sequence
    }

    def loss(p, x):  # x: (C=4, H=7, W=7), NCHW
        y = jax.lax.conv_general_dilated(
            x[None],
            p["w"],
            (2, 1),
            [(1, 0), (2, 2)],
            rhs_dilation=(1, 2),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            feature_group_count=2,
        )[0]
        z = jax.lax.conv_general_dilated(
            jnp.tanh(y).mean(axis=1)[None],
            p["v"],
            (1,),
            "SAME",
            dimension_numbers=("NCH", "OIH", "NCH"),
        )
        return jnp.sum(jnp.sin(z))

    batch = jax.random.normal(k[2], (4, 4, 7, 7), F64)
    assert set(kinds(loss, params, batch).values()) == {"conv"}
    check_against_reference(loss, params, batch)


def test_param_reused_through_reshape_and_on_both_sides():
    k = jax.random.split(jax.random.key(6), 3)
    params = {"w": jax.random.normal(k[0], (4, 4), F64) / 2, "u": jax.random.normal(k[1], (16,))}

    def loss(p, x):
        h = jnp.tanh(x @ p["w"])
        h = jnp.tanh(p["w"].T @ h)  # second use of w, through a transpose, on the left
        # u on both sides, the same for every example: a product of two parts of the
        # effective weight, each the dense use with the other folded in (summed.Fold)
        gram = p["u"].reshape(4, 4) @ p["u"].reshape(4, 4)
        return jnp.sum((h @ gram) ** 2)

    batch = jax.random.normal(k[2], (5, 4), F64)
    assert kinds(loss, params, batch) == {"['w']": "dense+dense", "['u']": "dense+dense"}
    check_against_reference(loss, params, batch)


@pytest.mark.parametrize("mode", ["clip", "fill"])
def test_gather_modes_and_multi_dim_tables(mode):
    k = jax.random.split(jax.random.key(7), 2)
    params = {"table": jax.random.normal(k[0], (3, 4, 2), F64)}

    def loss(p, idx):  # idx (T, 2) picks rows (i, j) of a 3-d table; some out of range
        rows = p["table"].at[idx[:, 0], idx[:, 1]].get(mode=mode, fill_value=0.0)
        return jnp.sum(jnp.tanh(rows.sum(0)) ** 2) + jnp.sum(rows[0] * rows[-1])

    batch = jax.random.randint(k[1], (5, 6, 2), 0, 5)
    check_against_reference(loss, params, batch)


def test_checkpointed_layers_are_inlined_and_exact():
    rng = np.random.default_rng(11)
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 4)), F64),
        "v": jnp.asarray(rng.normal(size=(4,))),
    }

    @jax.checkpoint
    def layer(w, x):
        return jnp.tanh(x @ w)

    loss = lambda p, x: jnp.sum(layer(p["w"], x) * p["v"]) ** 2
    batch = jnp.asarray(rng.normal(size=(5, 3)), F64)
    assert kinds(loss, params, batch) == {"['w']": "dense", "['v']": "exact"}
    check_against_reference(loss, params, batch)


def test_uses_whose_output_is_the_same_for_every_example():
    # A position-embedding lookup with constant indices and a product with a constant: the
    # outputs carry no batch axis, but their cotangents still differ per example.
    rng = np.random.default_rng(12)
    params = {
        "pos": jnp.asarray(rng.normal(size=(5, 2)), F64),
        "w": jnp.asarray(rng.normal(size=(2, 2)), F64),
    }
    const = jnp.asarray(rng.normal(size=(2,)), F64)

    def loss(p, x):
        h = x + p["pos"][jnp.arange(3)] + const @ p["w"]
        return jnp.sum(jnp.tanh(h) ** 2)

    batch = jnp.asarray(rng.normal(size=(4, 3, 2)), F64)
    assert kinds(loss, params, batch) == {"['pos']": "gather", "['w']": "dense"}
    check_against_reference(loss, params, batch)
