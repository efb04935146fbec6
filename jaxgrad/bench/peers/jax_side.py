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
from jaxgrad.bench.peers import layouts, specs
from jaxgrad.bench.peers.specs import ModelSpec

FAST_MODULE_ENV = "JAXGRAD_PEERS_FAST_MODULE"


def build(spec: ModelSpec) -> tuple[models.Model, object]:
    """``(model, loss_fn)`` for ``spec``: cross-entropy, or token cross-entropy (sum, count)."""
    c = dict(spec.config)
    if spec.kind == "rnn":
        model = models.rnn(
            c["in_features"], c["hidden"], num_classes=c["num_classes"], activation=c["activation"]
        )
        return model, losses.supervised(
            model.apply, losses.softmax_cross_entropy, num_classes=c["num_classes"]
        )
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
        return (lambda: jax.block_until_ready(f(params, batch))), lambda out: {
            "grad": flat(out.grads)
        }
    if method == "per_example_grads":
        f = jaxgrad.per_example_grads(loss_fn)
        step = lambda: jax.block_until_ready(f(params, batch))
        return step, lambda out: {"per_example": flat(out.grads)}
    if method == "per_example_norms":
        f = fast_module().per_example_norms(loss_fn)
        step = lambda: jax.block_until_ready(f(params, batch))
        return step, lambda n: {"norms": np.asarray(n)}
    if method == "clipped_grad":
        f = fast_module().clipped_grad(loss_fn, l2_clip=l2_clip, reduction="sum", return_norms=True)
        step = lambda: jax.block_until_ready(f(params, batch))
        return step, lambda out: {"clipped": flat(out[0]), "norms": np.asarray(out[1])}
    if method in _DP_STEPS:
        return _dp_row(_DP_STEPS[method], loss_fn, params, batch, l2_clip=l2_clip, flat=flat)
    allowed = "batch_grad, per_example_grads, per_example_norms, clipped_grad, " + ", ".join(
        _DP_STEPS
    )
    raise ValueError(f"JAX-side `method` must be one of {allowed}; got {method!r}")


def _dp_row(make, loss_fn, params, batch, *, l2_clip, flat):
    """A DP-step row: the step is timed with ``σ = NOISE_MULTIPLIER``; the cross-check reruns
    the same construction with ``σ = 0`` (untimed) and returns ``B ×`` its output as the
    clipped sum, which the harness compares with the float64 reference."""
    b = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
    noisy = make(loss_fn, params, batch, l2_clip=l2_clip, sigma=specs.NOISE_MULTIPLIER)
    check = make(loss_fn, params, batch, l2_clip=l2_clip, sigma=0.0)

    def extract(_):
        return {"clipped": {k: b * v for k, v in flat(check()).items()}}

    return (lambda: jax.block_until_ready(noisy())), extract


def _jaxgrad_dp_step(loss_fn, params, batch, *, l2_clip, sigma):
    from jaxgrad import privacy

    b = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
    f = jax.jit(
        privacy.dp_grad(loss_fn, l2_clip=l2_clip, noise_multiplier=sigma, expected_batch_size=b)
    )
    key = jax.random.key(1)
    return lambda: f(params, batch, None, key)


def _jax_privacy_dp_step(loss_fn, params, batch, *, l2_clip, sigma):
    # jax_privacy 2.x: `clipping.clipped_grad` vmaps the per-example gradient and clips it
    # (no ghost clipping); the Gaussian noise on the sum and the division by the expected
    # batch size are what its DP-SGD recipe adds around it, written here with jax.random.
    from jax_privacy import clipping

    b = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
    clipped_sum = clipping.clipped_grad(
        reduce.loss_sum_fn(loss_fn), l2_clip_norm=l2_clip, batch_argnums=1, keep_batch_dim=False
    )

    @jax.jit
    def f(params, batch, key):
        total = clipped_sum(params, batch)
        leaves, treedef = jax.tree_util.tree_flatten(total)
        keys = jax.random.split(key, len(leaves))
        noisy = [
            (x + sigma * l2_clip * jax.random.normal(k, x.shape, x.dtype)) / b
            for x, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, noisy)

    key = jax.random.key(1)
    return lambda: f(params, batch, key)


def _optax_dpsgd_step(loss_fn, params, batch, *, l2_clip, sigma):
    # optax.contrib.dpsgd takes the B × P per-example gradients, clips, sums, adds noise and
    # divides by B; with learning rate 1 (and no momentum) its update is minus that gradient.
    import optax

    per_example = jax.vmap(jax.grad(reduce.loss_sum_fn(loss_fn)), in_axes=(None, 0))
    tx = optax.contrib.dpsgd(
        learning_rate=1.0, l2_norm_clip=l2_clip, noise_multiplier=sigma, seed=1
    )
    state = tx.init(params)

    @jax.jit
    def f(params, batch, state):
        updates, _ = tx.update(per_example(params, batch), state, params)
        return jax.tree_util.tree_map(jnp.negative, updates)

    return lambda: f(params, batch, state)


_DP_STEPS = {
    "dp_grad": _jaxgrad_dp_step,
    "dp_step": _jax_privacy_dp_step,
    "dpsgd": _optax_dpsgd_step,
}


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
