"""gradient_diversity: Yin et al.'s Δ and pairwise cosines against vmap(grad) in float64."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad


def _reference(loss_fn, params, batch, mask):
    """Materialised per-example gradients (vmap(grad)) of the real rows, reduced by NumPy."""
    grads = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))(params, batch)
    g = np.concatenate(
        [np.reshape(x, (x.shape[0], -1)) for x in jax.tree_util.tree_leaves(grads)], axis=1
    )[np.asarray(mask)]
    sq = np.sum(g * g, axis=1)
    cos = (g @ g.T) / np.sqrt(np.outer(sq, sq))
    off = ~np.eye(len(g), dtype=bool)
    return sq.sum() / np.sum(g.sum(0) ** 2), cos[off].mean(), cos


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_against_vmap_grad_with_padding(chunk_size):
    rng = np.random.default_rng(0)
    model = jaxgrad.models.mlp([4, 5, 3], activation="tanh", dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    params = model.init(jax.random.key(0))
    x, y = rng.normal(size=(8, 4)), rng.integers(0, 3, 8)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
    x_bad = np.where(mask[:, None], x, np.nan)  # padded rows hold NaN: nothing may leak
    f = jax.jit(jaxgrad.gradient_diversity(loss_fn, chunk_size=chunk_size))
    got = f(params, (x_bad, y), mask)
    diversity, mean_cosine, cosine = _reference(loss_fn, params, (x, y), mask)
    np.testing.assert_allclose(got.diversity, diversity, rtol=1e-10)
    np.testing.assert_allclose(got.mean_cosine, mean_cosine, rtol=1e-10)
    chex.assert_trees_all_close(np.asarray(got.cosine)[np.ix_(mask, mask)], cosine, rtol=1e-10)
    assert np.all(np.asarray(got.cosine)[~mask] == 0) and np.all(
        np.asarray(got.cosine)[:, ~mask] == 0
    )
    assert float(got.num_examples) == 6
    assert 1 / 6 <= float(got.diversity)  # Cauchy–Schwarz


def test_closed_forms_and_zero_gradients():
    loss = lambda w, ex: jnp.dot(ex, w)  # example i's gradient is x_i
    f = jaxgrad.gradient_diversity(loss)
    w = jnp.ones(3)
    same = f(w, jnp.tile(jnp.array([[1.0, 2.0, 2.0]]), (4, 1)))
    np.testing.assert_allclose([same.diversity, same.mean_cosine], [1 / 4, 1.0], rtol=1e-12)
    # a zero gradient is left out of the cosines (undefined), not counted as 0 or NaN
    x = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    d = f(w, x)
    np.testing.assert_allclose(d.mean_cosine, 1 / np.sqrt(2), rtol=1e-12)
    np.testing.assert_allclose(d.diversity, 3 / 5, rtol=1e-12)  # (1 + 0 + 2) / ‖(2, 1, 0)‖²
    cancel = f(w, jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
    assert np.isinf(cancel.diversity) and float(cancel.mean_cosine) == -1.0
    one = f(w, x, jnp.array([True, False, False]))
    assert np.isnan(one.mean_cosine) and float(one.diversity) == 1.0
