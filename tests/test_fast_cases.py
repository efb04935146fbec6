"""Small float64 models shared by the tests of :mod:`jaxgrad.fast` (helpers only, no tests)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrad

F64 = jnp.float64


def np_params(init, seed):
    """Random params shaped like ``init``'s, drawn with numpy (no XLA compile in the tests)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(init, jax.random.key(0))

    def draw(path, s):
        if len(s.shape) >= 2:
            return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), F64)
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.1 * rng.normal(size=s.shape), F64)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def mlp_case(key, size=7):
    model = jaxgrad.models.mlp([6, 5, 4, 3], activation="tanh", dtype=F64)
    loss = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.softmax_cross_entropy)
    rng = np.random.default_rng(1)
    batch = (jnp.asarray(rng.normal(size=(size, 6)), F64), jnp.arange(size) % 3)
    return loss, np_params(model.init, 2), batch


def cnn_case(key, size=5):
    model = jaxgrad.models.cnn(image_shape=(6, 6), channels=(3, 4), num_classes=3, dtype=F64)
    loss = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.softmax_cross_entropy)
    rng = np.random.default_rng(3)
    batch = (jnp.asarray(rng.normal(size=(size, 6, 6)), F64), jnp.arange(size) % 3)
    return loss, np_params(model.init, 4), batch


def transformer_case(key, size=4, length=6):
    model = jaxgrad.models.transformer(
        vocab_size=11, max_len=8, d_model=8, num_heads=2, num_layers=1, dtype=F64
    )
    loss = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.token_cross_entropy)
    tokens = np.random.default_rng(5).integers(1, 11, (size, length))
    tokens[1, length // 2 :] = 0  # a padded sequence
    targets = np.roll(tokens, -1, axis=1)
    return loss, np_params(model.init, 6), (jnp.asarray(tokens), jnp.asarray(targets))


def embedding_init(seed, vocab=13, dim=5, classes=3):
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.normal(size=(vocab, dim)), F64),
        "out": jnp.asarray(rng.normal(size=(dim, classes)) / np.sqrt(dim), F64),
    }


def embedding_loss(params, example):
    """Bag of embeddings → mean → linear classifier; repeated tokens share a table row."""
    tokens, label = example
    h = jnp.mean(params["embed"][tokens], axis=0)
    return jaxgrad.losses.softmax_cross_entropy(h @ params["out"], label)


def embedding_case(key, size=6, length=5):
    del key
    tokens = np.random.default_rng(7).integers(0, 4, (size, length))  # few ids: many repeats
    return embedding_loss, embedding_init(8), (jnp.asarray(tokens), jnp.arange(size) % 3)


def tied_loss(params, example):
    """A tiny tied-weight language model: the embedding table is also the output head."""
    tokens, targets = example
    h = jnp.tanh(params["embed"][tokens] @ params["mix"] + params["b"])
    logits = h @ params["embed"].T
    return jaxgrad.losses.token_cross_entropy(logits, targets)


def tied_case(key, size=5, length=4, vocab=9, dim=4):
    del key
    rng = np.random.default_rng(9)
    params = {
        "embed": jnp.asarray(rng.normal(size=(vocab, dim)), F64),
        "mix": jnp.asarray(rng.normal(size=(dim, dim)) / 2, F64),
        "b": jnp.zeros((dim,), F64),
    }
    tokens = rng.integers(1, vocab, (size, length))
    tokens[0, 2:] = 0
    return tied_loss, params, (jnp.asarray(tokens), jnp.asarray(np.roll(tokens, -1, axis=1)))


def plain_loss(params, example):
    """Hand-written JAX: W on the left of a matvec, an einsum with a head axis, a scalar gate."""
    x, y = example
    h = jnp.tanh(params["w1"] @ x)  # (H,) = (H, D) @ (D,)
    heads = jnp.einsum("hd,hde->he", h.reshape(2, -1), params["w2"])
    z = jax.nn.relu(heads.reshape(-1)) * params["gate"]
    return jnp.sum((z @ params["w3"] - y) ** 2)


def plain_case(key, size=6):
    del key
    rng = np.random.default_rng(10)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), F64)
    params = {"w1": normal(4, 3), "w2": normal(2, 2, 3), "gate": normal(), "w3": normal(6, 2)}
    return plain_loss, params, (normal(size, 3), normal(size, 2))


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
    grads = jaxgrad.per_example_grads(loss)(params, batch).grads
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


def check_against_loop(loss_fn, params, batch):
    """Norms and the median-clipped sum, fast path and ``method="vmap"``, against a Python loop."""
    loop = reference_grads(loss_fn, params, batch)
    norms = np.linalg.norm(loop, axis=1)
    assert np.all(norms > 0)
    clip = float(np.median(norms))

    def results(params, batch):  # the four results as one program: one compilation, not four
        return {
            method: (
                jaxgrad.per_example_norms(loss_fn, method=method)(params, batch),
                jaxgrad.clipped_grad(loss_fn, l2_clip=clip, reduction="sum", method=method)(
                    params, batch
                ),
            )
            for method in ("auto", "vmap")
        }

    for got_norms, clip_sum in jax.jit(results)(params, batch).values():
        assert_rel_close(got_norms, norms)
        assert_rel_close(flat(clip_sum), np.minimum(1.0, clip / norms) @ loop)
