"""Small float64 models shared by the tests of :mod:`jaxgrad.fast` (not a test module)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrad

F64 = jnp.float64


def mlp_case(key, size=7):
    model = jaxgrad.models.mlp([6, 5, 4, 3], activation="tanh", dtype=F64)
    loss = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.softmax_cross_entropy)
    kx, kp = jax.random.split(key)
    batch = (jax.random.normal(kx, (size, 6), F64), jnp.arange(size) % 3)
    return loss, model.init(kp), batch


def cnn_case(key, size=5):
    model = jaxgrad.models.cnn(image_shape=(6, 6), channels=(3, 4), num_classes=3, dtype=F64)
    loss = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.softmax_cross_entropy)
    kx, kp = jax.random.split(key)
    batch = (jax.random.normal(kx, (size, 6, 6), F64), jnp.arange(size) % 3)
    return loss, model.init(kp), batch


def transformer_case(key, size=4, length=6):
    model = jaxgrad.models.transformer(
        vocab_size=11, max_len=8, d_model=8, num_heads=2, num_layers=1, dtype=F64
    )
    loss = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.token_cross_entropy)
    kt, kp = jax.random.split(key)
    tokens = jax.random.randint(kt, (size, length), 1, 11)
    tokens = tokens.at[1, length // 2 :].set(0)  # a padded sequence
    return loss, model.init(kp), (tokens, jnp.roll(tokens, -1, axis=1))


def embedding_init(key, vocab=13, dim=5, classes=3):
    k1, k2 = jax.random.split(key)
    return {
        "embed": jax.random.normal(k1, (vocab, dim), F64),
        "out": jax.random.normal(k2, (dim, classes), F64) / np.sqrt(dim),
    }


def embedding_loss(params, example):
    """Bag of embeddings → mean → linear classifier; repeated tokens share a table row."""
    tokens, label = example
    h = jnp.mean(params["embed"][tokens], axis=0)
    return jaxgrad.losses.softmax_cross_entropy(h @ params["out"], label)


def embedding_case(key, size=6, length=5):
    kt, kp = jax.random.split(key)
    tokens = jax.random.randint(kt, (size, length), 0, 4)  # few ids: many repeats
    return embedding_loss, embedding_init(kp), (tokens, jnp.arange(size) % 3)


def tied_loss(params, example):
    """A tiny tied-weight language model: the embedding table is also the output head."""
    tokens, targets = example
    h = jnp.tanh(params["embed"][tokens] @ params["mix"] + params["b"])
    logits = h @ params["embed"].T
    return jaxgrad.losses.token_cross_entropy(logits, targets)


def tied_case(key, size=5, length=4, vocab=9, dim=4):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "embed": jax.random.normal(k1, (vocab, dim), F64),
        "mix": jax.random.normal(k2, (dim, dim), F64) / 2,
        "b": jnp.zeros((dim,), F64),
    }
    tokens = jax.random.randint(k3, (size, length), 1, vocab).at[0, 2:].set(0)
    return tied_loss, params, (tokens, jnp.roll(tokens, -1, axis=1))


def plain_loss(params, example):
    """Hand-written JAX: W on the left of a matvec, an einsum with a head axis, a scalar gate."""
    x, y = example
    h = jnp.tanh(params["w1"] @ x)  # (H,) = (H, D) @ (D,)
    heads = jnp.einsum("hd,hde->he", h.reshape(2, -1), params["w2"])
    z = jax.nn.relu(heads.reshape(-1)) * params["gate"]
    return jnp.sum((z @ params["w3"] - y) ** 2)


def plain_case(key, size=6):
    k = jax.random.split(key, 5)
    params = {
        "w1": jax.random.normal(k[0], (4, 3), F64),
        "w2": jax.random.normal(k[1], (2, 2, 3), F64),
        "gate": jnp.asarray(1.5, F64),
        "w3": jax.random.normal(k[2], (6, 2), F64),
    }
    batch = (jax.random.normal(k[3], (size, 3), F64), jax.random.normal(k[4], (size, 2), F64))
    return plain_loss, params, batch


CASES = {
    "mlp": mlp_case,
    "cnn": cnn_case,
    "transformer": transformer_case,
    "embedding": embedding_case,
    "tied": tied_case,
    "plain": plain_case,
}


@functools.cache
def case(name):
    """``(loss_fn, params, batch)`` of the named case, built once per test session."""
    return CASES[name](jax.random.key(0))


@functools.cache
def materialised(name, mask_key=None):
    """The case's per-example gradients ``(B, P)`` from ``jaxgrad.per_example_grads`` (vmap)."""
    loss, params, batch = case(name)
    grads = jaxgrad.per_example_grads(loss)(params, batch)
    leaves = jax.tree_util.tree_leaves(grads)
    return np.concatenate([np.reshape(g, (g.shape[0], -1)) for g in leaves], axis=1)


def reference_grads(loss_fn, params, batch):
    """Per-example gradients by a Python loop over single examples (independent of vmap)."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    summed = jaxgrad.reduce.loss_sum_fn(loss_fn)
    grad = jax.jit(jax.grad(summed))
    rows = []
    for i in range(size):
        example = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
        g = grad(params, example)
        rows.append(np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(g)]))
    return np.stack(rows)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(tree)])


def assert_rel_close(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(np.max(np.abs(expected)), 1e-300)
    err = np.max(np.abs(actual - expected)) / scale if actual.size else 0.0
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"
