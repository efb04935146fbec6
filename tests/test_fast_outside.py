"""Outside programs that once broke the fast path, each reduced to its cause, against
``jax.vmap(jax.grad(...))`` in float64."""

import jax
import jax.numpy as jnp
import numpy as np
from test_fast_cases import assert_rel_close
from test_fast_dots import _vmap_grads

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
