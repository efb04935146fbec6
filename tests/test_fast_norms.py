"""Per-example gradient norms: the fast path against vmap(grad) and a Python loop, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import CASES, assert_rel_close, case, materialised, reference_grads

from jaxgrad.fast import per_example_norms


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_norms_match_materialised(name):
    loss, params, batch = case(name)
    fast = per_example_norms(loss)(params, batch)
    assert fast.dtype == jnp.float64
    expected = np.linalg.norm(materialised(name), axis=1)
    assert np.all(expected > 0)  # a test that can only pass is a defect
    assert_rel_close(fast, expected)


@pytest.mark.parametrize("name", ["mlp", "tied"])
def test_vmap_method_matches_python_loop(name):
    loss, params, batch = case(name)
    loop = np.linalg.norm(reference_grads(loss, params, batch), axis=1)
    assert_rel_close(per_example_norms(loss, method="vmap")(params, batch), loop)


@pytest.mark.parametrize("method", ["auto"])
def test_masked_rows_are_zero_and_others_unchanged(method):
    loss, params, batch = case("transformer")
    mask = jnp.array([True, True, False, True])
    masked = per_example_norms(loss, method=method)(params, batch, mask)
    expected = np.linalg.norm(materialised("transformer"), axis=1) * np.asarray(mask)
    assert float(masked[2]) == 0.0
    assert_rel_close(masked, expected)


@pytest.mark.parametrize(
    ("method", "chunk_size"), [("auto", 1), ("auto", 3), ("vmap", 3), ("auto", 50)]
)
def test_chunked_norms_with_remainder(method, chunk_size):
    loss, params, batch = case("mlp")
    mask = jnp.array([True] * 5 + [False, True])
    expected = np.linalg.norm(materialised("mlp"), axis=1) * np.asarray(mask)
    got = per_example_norms(loss, method=method, chunk_size=chunk_size)(params, batch, mask)
    assert_rel_close(got, expected)


def test_norms_under_outer_jit():
    loss, params, batch = case("mlp")
    got = jax.jit(per_example_norms(loss))(params, batch)
    assert_rel_close(got, np.linalg.norm(materialised("mlp"), axis=1))


def test_unknown_method_lists_allowed():
    with pytest.raises(ValueError, match=r"`method` must be one of \['auto', 'vmap'\]; got 'fast'"):
        per_example_norms(lambda p, x: p * x, method="fast")


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (jnp.ones((3,), bool), ValueError, r"`mask` must have shape \(7,\)"),
        (jnp.ones((7,), jnp.float32), TypeError, "`mask` must be boolean"),
    ],
)
def test_bad_mask(mask, error, match):
    loss, params, batch = case("mlp")
    with pytest.raises(error, match=match):
        per_example_norms(loss)(params, batch, mask)


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer"):
        per_example_norms(lambda p, x: p * x, chunk_size=chunk_size)
