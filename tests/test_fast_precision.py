"""Mixed precision: bfloat16 / float16 params or activations, norms accumulated in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import reference_grads

from jaxgrad.fast import clipped_grad, per_example_norms


def _loss(p, ex):
    x, y = ex
    h = jnp.tanh(x.astype(p["w1"].dtype) @ p["w1"] + p["b1"])
    seq = jnp.stack([h, 2 * h, jnp.sin(h)])  # a sequence axis: the Gram / outer routes
    out = jnp.sum(jnp.tanh(seq @ p["w2"]), axis=0)
    return jnp.sum((out.astype(jnp.float32) - y) ** 2)


def _cast_activations_loss(p, ex):  # float32 params, bfloat16 compute
    low = jax.tree_util.tree_map(lambda w: w.astype(jnp.bfloat16), p)
    return _loss(low, ex)


@pytest.mark.parametrize(
    ("dtype", "loss"),
    [
        (jnp.bfloat16, _loss),
        (jnp.float16, _loss),
        (jnp.float32, _cast_activations_loss),
    ],
    ids=["bf16-params", "f16-params", "bf16-activations"],
)
def test_low_precision_norms_are_float32_and_close(dtype, loss):
    rng = np.random.default_rng(40)
    params = {
        "w1": jnp.asarray(rng.normal(size=(6, 5)) / 2, dtype),
        "b1": jnp.asarray(rng.normal(size=5) / 4, dtype),
        "w2": jnp.asarray(rng.normal(size=(5, 3)) / 2, dtype),
    }
    batch = (jnp.asarray(rng.normal(size=(4, 6)), jnp.float32), jnp.zeros((4, 3), jnp.float32))
    norms = per_example_norms(loss)(params, batch)
    assert norms.dtype == jnp.float32
    # reference: a Python loop over examples of the same low-precision program, in float64
    loop = reference_grads(loss, params, batch).astype(np.float64)
    expected = np.linalg.norm(loop, axis=1)
    assert np.all(np.isfinite(np.asarray(norms)))
    np.testing.assert_allclose(np.asarray(norms), expected, rtol=3e-2)
    clip = float(np.median(expected))
    got = clipped_grad(loss, l2_clip=clip, reduction="sum")(params, batch)
    flat = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(got)])
    ref = np.minimum(1.0, clip / expected) @ loop
    np.testing.assert_allclose(flat, ref, rtol=5e-2, atol=5e-2 * np.max(np.abs(ref)))
