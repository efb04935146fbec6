"""Per-leaf gradient norms of the fast pass, and per-layer (group-wise) clipping: float64, exact.

The references are ``vmap(grad)`` per leaf and a Python loop over single examples that clips
every group of every example separately.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrad import losses, models
from jaxgrad.fast import passes

jax.config.update("jax_enable_x64", True)
F64 = jnp.float64


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), F64)


def _mlp():
    model = models.mlp([5, 4, 3], dtype=F64)
    rng = np.random.default_rng(0)
    batch = (_normal(rng, 6, 5), jnp.asarray(rng.integers(0, 3, 6)))
    loss = lambda p, ex: losses.softmax_cross_entropy(model.apply(p, ex[0]), ex[1])
    return loss, model.init(jax.random.key(0)), batch


def _tied():
    rng = np.random.default_rng(1)
    params = {"emb": _normal(rng, 7, 4), "w": _normal(rng, 4, 4) / 2}

    def loss(p, toks):  # the embedding is read by a gather and by the output matmul
        h = jnp.tanh(p["emb"][toks[:-1]] @ p["w"])
        return losses.softmax_cross_entropy(h @ p["emb"].T, toks[1:]).sum()

    return loss, params, jnp.asarray(rng.integers(0, 7, (5, 4)))


def _cnn():
    model = models.cnn(image_shape=(6, 6), channels=(3,), num_classes=3, dtype=F64)
    rng = np.random.default_rng(2)
    batch = (_normal(rng, 4, 6, 6), jnp.asarray(rng.integers(0, 3, 4)))
    loss = lambda p, ex: losses.softmax_cross_entropy(model.apply(p, ex[0]), ex[1])
    return loss, model.init(jax.random.key(2)), batch


def _rnn():
    model = models.rnn(3, 4, num_classes=3, dtype=F64)
    rng = np.random.default_rng(3)
    batch = (_normal(rng, 5, 6, 3), jnp.asarray(rng.integers(0, 3, 5)))
    loss = lambda p, ex: losses.softmax_cross_entropy(model.apply(p, ex[0]), ex[1])
    return loss, model.init(jax.random.key(3)), batch


MODELS = {"mlp": _mlp, "tied": _tied, "cnn": _cnn, "rnn": _rnn}


def _vmap_leaf_sq(loss, params, batch, mask):
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
    cols = [jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads)]
    return jnp.where(mask[:, None], jnp.stack(cols, axis=1), 0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_per_leaf_norms_match_vmap_grad(name, method):
    loss, params, batch = MODELS[name]()
    size = jax.tree.leaves(batch)[0].shape[0]
    mask = jnp.arange(size) != 1  # a padded row reads 0
    parts = passes.get_pass(method)(loss, params, batch, mask)
    want = _vmap_leaf_sq(loss, params, batch, mask)
    assert parts.leaf_sq.shape == (size, len(jax.tree.leaves(params)))
    np.testing.assert_allclose(parts.leaf_sq, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(parts.leaf_sq.sum(axis=1), parts.norm_sq, rtol=1e-10, atol=1e-12)
    if name == "tied" and method == "auto":  # the tied leaf is on the fast route, two uses
        assert len(passes.analyse(loss, params, batch).fast[0]) == 2


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_weighted_takes_one_weight_per_example_and_leaf(method):
    loss, params, batch = _mlp()
    mask = jnp.ones(6, bool)
    parts = passes.get_pass(method)(loss, params, batch, mask)
    c = jnp.asarray(np.random.default_rng(4).uniform(size=(6, 4)), F64)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
    leaves, treedef = jax.tree.flatten(grads)
    want = treedef.unflatten([jnp.tensordot(c[:, j], g, 1) for j, g in enumerate(leaves)])
    for got, ref in zip(jax.tree.leaves(parts.weighted(c)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
