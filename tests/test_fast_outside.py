"""Outside programs that once broke the fast path, each reduced to its cause, against
``jax.vmap(jax.grad(...))`` in float64."""

import jax
import jax.numpy as jnp
import numpy as np
from test_fast_cases import assert_rel_close
from test_fast_dots import _flat, _vmap_grads

import jaxgrad

jax.config.update("jax_enable_x64", True)


def test_byte_tokens_index_a_table_longer_than_their_dtype_reaches():
    # uint8 tokens (a byte-level model) into a table of 300 rows: gather_rows built the last
    # valid row, 299, in the index dtype, an OverflowError at trace time. A gather caps its
    # clamp at the dtype's largest value; so does the rule now.
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, size=(4, 3)), jnp.uint8).at[0, :2].set(255)
    params = {
        "E": jnp.asarray(rng.normal(size=(300, 2))),
        "W": jnp.asarray(rng.normal(size=(2, 2))),
    }

    def loss(p, t):
        h = jnp.tanh(p["E"][t] @ p["W"])
        z = jnp.take(p["E"], t, axis=0, mode="fill", fill_value=0.0)
        return jnp.sum(h**2) + jnp.sum(jnp.sin(z))

    j = _vmap_grads(loss, params, tokens)
    assert_rel_close(jaxgrad.per_example_norms(loss)(params, tokens), np.linalg.norm(j, axis=1))


def test_power_iteration_spectral_norm_and_a_weight_norm_tied_transposed_in_a_scan():
    # Not a past failure: two reparametrisations as GAN critics and autoencoders write them,
    # kept on their fast routes (a scan inside the transformation; a normalised weight used
    # four times, transposed and inside a scan body), checked on norms and a clipped sum.
    rng = np.random.default_rng(1)
    d, h, steps = 3, 4, 4
    shapes = {"W": (d, h), "S": (h, d), "g": (h,), "v": (d,)}
    params = {k: jnp.asarray(rng.normal(size=s) * 0.5) for k, s in shapes.items()}
    batch = (jnp.asarray(rng.normal(size=(5, steps, d))), jnp.asarray(rng.normal(size=(5,))))

    def spectral(w):  # σ(w) by three power iterations, u and v not stopped
        def it(_, u):
            u = w.T @ (w @ u)
            return u / jnp.linalg.norm(u)

        u = jax.lax.fori_loop(0, 3, it, jnp.ones(w.shape[1]))
        return w / jnp.linalg.norm(w @ u)

    def loss(p, ex):
        x, y = ex
        wn = p["W"] * (1 + p["g"]) / jnp.maximum(jnp.linalg.norm(p["W"], axis=0), 1e-6)
        back = jnp.tanh(jnp.tanh(x @ wn) @ wn.T)
        step = lambda c, b: (jnp.tanh(jnp.tanh(c @ wn) @ wn.T + b), None)
        c, _ = jax.lax.scan(step, jnp.zeros(d), back)
        out = jnp.tanh((back + c) @ spectral(p["W"]) @ spectral(p["S"]))
        return jnp.sum((out @ p["v"] - y) ** 2)

    plan = jaxgrad.fast.plan(loss, params, jax.tree_util.tree_map(lambda a: a[0], batch))
    assert not plan.fallbacks, plan
    mask = np.array([True, True, False, True, True])
    j = _vmap_grads(loss, params, batch) * mask[:, None]
    norms = np.linalg.norm(j, axis=1)
    clip = float(np.median(norms[mask]))  # clips some rows, not others
    f = jaxgrad.clipped_grad(loss, l2_clip=clip, reduction="sum", return_norms=True)
    total, got = f(params, batch, jnp.asarray(mask))
    assert_rel_close(got, norms)
    assert_rel_close(_flat(total), np.minimum(1.0, clip / np.maximum(norms, 1e-300)) @ j)
