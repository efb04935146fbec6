"""The JAX side: jaxgrad's strategies on the shared weights and data, and the reference.

Imported only inside a worker subprocess. ``jaxgrad.fast`` is imported lazily, when a row
that needs it runs, so a missing or broken fast path fails that row and no other. The
environment variable ``JAXGRAD_PEERS_FAST_MODULE`` names another module with the same
``per_example_norms`` / ``clipped_grad`` API (the tests use it to run a stand-in).
"""

from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrad
from jaxgrad import losses, models, reduce
from jaxgrad.bench.peers import layouts
from jaxgrad.bench.peers.specs import ModelSpec

FAST_MODULE_ENV = "JAXGRAD_PEERS_FAST_MODULE"


def build(spec: ModelSpec) -> tuple[models.Model, object]:
    """``(model, loss_fn)`` for ``spec``: cross-entropy, or token cross-entropy (sum, count)."""
    c = dict(spec.config)
    if spec.kind == "mlp":
        model = models.mlp(list(c["sizes"]), activation=c["activation"])
        return model, losses.supervised(
            model.apply, losses.softmax_cross_entropy, num_classes=c["sizes"][-1]
        )
    if spec.kind == "cnn":
        model = models.cnn(**c)
        return model, losses.supervised(
            model.apply, losses.softmax_cross_entropy, num_classes=c["num_classes"]
        )
    model = models.transformer(**c)
    return model, losses.supervised(model.apply, losses.token_cross_entropy)


def init_weights(spec: ModelSpec, *, seed: int) -> dict[str, np.ndarray]:
    """jaxgrad's own initialisation with ``seed``, on the CPU, as a flat dict of arrays."""
    model, _ = build(spec)
    with jax.default_device(jax.devices("cpu")[0]):
        params = model.init(jax.random.key(seed))
    return {k: np.asarray(v) for k, v in layouts.flatten(params).items()}


def load_params(spec: ModelSpec, jax_flat: dict[str, np.ndarray], *, dtype=jnp.float32):
    model, _ = build(spec)
    template = jax.eval_shape(model.init, jax.random.key(0))
    return unflatten_like(jax_flat, template, dtype)


def unflatten_like(flat, template, dtype):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, dtype), layouts.unflatten(flat, template)
    )


def fast_module():
    """``jaxgrad.fast`` (or the module named by ``$JAXGRAD_PEERS_FAST_MODULE``)."""
    return importlib.import_module(os.environ.get(FAST_MODULE_ENV) or "jaxgrad.fast")


def prepare(method: str, spec: ModelSpec, jax_flat, data, *, l2_clip: float):
    """``(step, extract)`` for a jaxgrad method, as :func:`torch_side.prepare` returns."""
    _, loss_fn = build(spec)
    params = load_params(spec, jax_flat)
    batch = (jnp.asarray(data["x"]), jnp.asarray(data["y"]))
    flat = lambda tree: {k: np.asarray(v) for k, v in layouts.flatten(tree).items()}

    if method == "batch_grad":
        f = jaxgrad.batch_grad(loss_fn)
        return (lambda: jax.block_until_ready(f(params, batch))), lambda g: {"grad": flat(g)}
    if method == "per_example_grads":
        f = jaxgrad.per_example_grads(loss_fn)
        step = lambda: jax.block_until_ready(f(params, batch))
        return step, lambda g: {"per_example": flat(g)}
    if method == "per_example_norms":
        f = fast_module().per_example_norms(loss_fn)
        step = lambda: jax.block_until_ready(f(params, batch))
        return step, lambda n: {"norms": np.asarray(n)}
    if method == "clipped_grad":
        f = fast_module().clipped_grad(loss_fn, l2_clip=l2_clip, reduction="sum", return_norms=True)
        step = lambda: jax.block_until_ready(f(params, batch))
        return step, lambda out: {"clipped": flat(out[0]), "norms": np.asarray(out[1])}
    allowed = "batch_grad, per_example_grads, per_example_norms, clipped_grad"
    raise ValueError(f"jaxgrad `method` must be one of {allowed}; got {method!r}")


def reference(spec: ModelSpec, jax_flat, data, *, chunk_size: int, l2_clip: float | None):
    """The float64 answers every row is checked against, computed independently of
    ``jaxgrad.fast``: per-example gradients by ``vmap(grad)`` chunk by chunk (so no
    ``B × P`` array is held), their norms, the clipped sum and the mean gradient.

    ``l2_clip=None`` picks the median norm, so about half the examples are clipped.
    Returns ``(outputs, l2_clip)``.
    """
    jax.config.update("jax_enable_x64", True)
    _, loss_fn = build(spec)
    params = load_params(spec, jax_flat, dtype=jnp.float64)
    x = data["x"].astype(np.float64) if data["x"].dtype.kind == "f" else data["x"]
    y = data["y"]
    # Plain jax.vmap(jax.grad), not jaxgrad's strategies: the reference must not share code
    # with what it checks.
    grads_of = jax.jit(jax.vmap(jax.grad(reduce.loss_sum_fn(loss_fn)), in_axes=(None, 0)))
    count_of = jax.jit(jax.vmap(lambda ex: reduce.as_sum_count(loss_fn(params, ex))[1]))

    def chunks():
        for i in range(0, len(y), chunk_size):
            sl = slice(i, i + chunk_size)
            yield grads_of(params, (jnp.asarray(x[sl]), jnp.asarray(y[sl])))

    norms = np.concatenate([np.sqrt(np.asarray(reduce.row_sq_norms(g))) for g in chunks()])
    if l2_clip is None:
        l2_clip = float(np.median(norms))
    factors = np.minimum(1.0, l2_clip / np.maximum(norms, 1e-300))
    clipped = total = None
    for i, g in zip(range(0, len(y), chunk_size), chunks(), strict=True):
        c = jnp.asarray(factors[i : i + chunk_size])
        weighted = jax.tree.map(lambda leaf, c=c: jnp.tensordot(c, leaf, 1), g)
        summed = jax.tree.map(lambda leaf: leaf.sum(0), g)
        clipped = weighted if clipped is None else jax.tree.map(jnp.add, clipped, weighted)
        total = summed if total is None else jax.tree.map(jnp.add, total, summed)
    count = float(np.sum(count_of((jnp.asarray(x), jnp.asarray(y)))))
    outputs = {
        "norms": norms,
        "clipped": {k: np.asarray(v) for k, v in layouts.flatten(clipped).items()},
        "grad": {k: np.asarray(v) / count for k, v in layouts.flatten(total).items()},
    }
    return outputs, l2_clip
