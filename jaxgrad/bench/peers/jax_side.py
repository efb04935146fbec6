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


def prepare(
    method: str, spec: ModelSpec, jax_flat, data, *, l2_clip: float, layer_clips=None, v=None
):
    """``(step, extract)`` for a JAX-side method, as :func:`torch_side.prepare` returns.

    ``layer_clips`` (flat ``{leaf: C_g}``) is for the per-layer rows, ``v`` (flat, parameter
    shaped) for the dots rows.
    """
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
    if method == "clipped_sum":  # jax_privacy's clipped gradient, no noise
        f = jax.jit(_jax_privacy_clipped_sum(loss_fn, l2_clip=l2_clip))
        step = lambda: jax.block_until_ready(f(params, batch))
        return step, lambda out: {"clipped": flat(out)}
    if method in _DP_STEPS:
        return _dp_row(_DP_STEPS[method], loss_fn, params, batch, l2_clip=l2_clip, flat=flat)
    if method in _PER_LAYER:
        # The clip norms as a tree like the params: one C_g per leaf.
        clips = layouts.unflatten({k: float(c) for k, c in layer_clips.items()}, params)
        f = _PER_LAYER[method](loss_fn, clips)
        step = lambda: jax.block_until_ready(f(params, batch))
        return step, lambda out: {"layered": flat(out)}
    if method in _INNER:
        f = _INNER[method](loss_fn)
        if method.endswith("dots"):
            v_tree = unflatten_like(v, params, jnp.float32)
            step = lambda: jax.block_until_ready(f(params, batch, reference=v_tree))
            return step, lambda out: {"dots": np.asarray(out)}
        step = lambda: jax.block_until_ready(f(params, batch))
        return step, lambda out: {"gram": np.asarray(out)}
    allowed = "batch_grad, per_example_grads, per_example_norms, clipped_grad, clipped_sum, "
    allowed += ", ".join([*_DP_STEPS, *_PER_LAYER, *_INNER])
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


def _jax_privacy_clipped_sum(loss_fn, *, l2_clip):
    """jax_privacy 2.x's ``clipping.clipped_grad``: ``f(params, batch)``, the sum over the
    batch of the per-example gradients (vmapped) clipped to ``l2_clip``."""
    from jax_privacy import clipping

    return clipping.clipped_grad(
        reduce.loss_sum_fn(loss_fn), l2_clip_norm=l2_clip, batch_argnums=1, keep_batch_dim=False
    )


def _jax_privacy_dp_step(loss_fn, params, batch, *, l2_clip, sigma):
    # jax_privacy 2.x: `clipping.clipped_grad` vmaps the per-example gradient and clips it
    # (no ghost clipping); the Gaussian noise on the sum and the division by the expected
    # batch size are what its DP-SGD recipe adds around it, written here with jax.random.
    b = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
    clipped_sum = _jax_privacy_clipped_sum(loss_fn, l2_clip=l2_clip)

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


def _jaxgrad_per_layer(loss_fn, clips):
    # Not jitted here, as the flat clipped_grad row: jaxgrad's strategies jit themselves.
    return fast_module().clipped_grad(loss_fn, l2_clip=clips, reduction="sum")


def _jax_privacy_per_layer(loss_fn, clips):
    """jax_privacy 2.0 has no per-layer clipping; its hook for reshaping a per-example
    gradient before the (global) clip, ``pre_clipping_transform``, clips each leaf to its
    ``C_g`` with its own ``clip_pytree``. The global clip norm is then ``√Σ C_g²``, which the
    per-layer clipped gradient never exceeds: the global clip changes nothing, and the
    returned callable's ``sensitivity()`` is the per-layer one."""
    from jax_privacy import clipping

    def clip_each_leaf(grad):
        return jax.tree_util.tree_map(lambda g, c: clipping.clip_pytree(g, c)[0], grad, clips)

    total = float(np.sqrt(sum(c * c for c in jax.tree_util.tree_leaves(clips))))
    return jax.jit(
        clipping.clipped_grad(
            reduce.loss_sum_fn(loss_fn),
            l2_clip_norm=total,
            batch_argnums=1,
            keep_batch_dim=False,
            pre_clipping_transform=clip_each_leaf,
        )
    )


_PER_LAYER = {
    "clipped_grad_per_layer": _jaxgrad_per_layer,
    "per_layer_clip": _jax_privacy_per_layer,
}


def _vmap_rows(loss_fn):
    """``G``: jax.vmap(jax.grad) of the loss sum, flattened to ``(B, P)``."""
    per_example = jax.vmap(jax.grad(reduce.loss_sum_fn(loss_fn)), in_axes=(None, 0))

    def rows(params, batch):
        leaves = jax.tree_util.tree_leaves(per_example(params, batch))
        return jnp.concatenate([g.reshape(g.shape[0], -1) for g in leaves], axis=1)

    return rows


def _vmap_dots(loss_fn):
    rows = _vmap_rows(loss_fn)

    @jax.jit
    def vmap_dots(params, batch, reference):
        v = jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(reference)])
        return rows(params, batch) @ v

    return vmap_dots


def _vmap_gram(loss_fn):
    rows = _vmap_rows(loss_fn)

    @jax.jit
    def vmap_gram(params, batch):
        g = rows(params, batch)
        return g @ g.T

    return vmap_gram


_INNER = {
    "per_example_dots": lambda loss_fn: fast_module().per_example_dots(loss_fn),
    "gradient_gram": lambda loss_fn: fast_module().gradient_gram(loss_fn),
    "vmap_dots": _vmap_dots,
    "vmap_gram": _vmap_gram,
}


def group_clip(norms: np.ndarray) -> float:
    """A group's ``C_g`` for per-layer clipping: the median of its nonzero per-example norms
    (about half the examples clipped; 1 where every example's gradient there is zero). Zeros
    are left out because a leaf can get no gradient from many examples (attention's query and
    key weights when a sequence has one real token), and a clip norm must be positive."""
    nonzero = norms[norms > 0]
    return float(np.median(nonzero)) if nonzero.size else 1.0


def reference(
    spec: ModelSpec, jax_flat, data, *, chunk_size: int, l2_clip: float | None, gram=False
):
    """The float64 answers every row is checked against, computed independently of
    ``jaxgrad.fast``: per-example gradients by ``vmap(grad)`` chunk by chunk (so no
    ``B × P`` array is held), then in NumPy their norms, the clipped sum, the mean gradient
    ``v``, the per-layer clipped sum, the dots ``⟨g_i, v⟩`` and (``gram=True``) the Gram
    matrix ``⟨g_i, g_j⟩``, a block of chunk pairs at a time.

    ``l2_clip=None`` picks the median norm, so about half the examples are clipped; each
    leaf's ``C_g`` (``outputs["layer_clips"]``) is :func:`group_clip` of its norms.
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
    starts = range(0, len(y), chunk_size)

    def chunks():  # (start, {leaf: (n, leaf size) float64})
        for i in starts:
            sl = slice(i, i + chunk_size)
            g = layouts.flatten(grads_of(params, (jnp.asarray(x[sl]), jnp.asarray(y[sl]))))
            yield i, {k: v.reshape(len(v), -1) for k, v in g.items()}

    # Pass 1: every leaf's per-example norms and the sum.
    leaf_sq, total = {}, {}
    for _, g in chunks():
        for k, v in g.items():
            leaf_sq.setdefault(k, []).append(np.einsum("ij,ij->i", v, v))
            total[k] = total.get(k, 0) + v.sum(0)
    leaf_sq = {k: np.concatenate(v) for k, v in leaf_sq.items()}
    norms = np.sqrt(sum(leaf_sq.values()))
    if l2_clip is None:
        l2_clip = float(np.median(norms))
    layer_clips = {k: group_clip(np.sqrt(sq)) for k, sq in leaf_sq.items()}
    count = float(np.sum(count_of((jnp.asarray(x), jnp.asarray(y)))))
    v = {k: t / count for k, t in total.items()}

    # Pass 2: clipped sums (flat and per layer) and the dots with v.
    factor = lambda n, c: np.minimum(1.0, c / np.maximum(n, 1e-300))
    flat_factors = factor(norms, l2_clip)
    clipped = dict.fromkeys(total, 0.0)
    layered = dict.fromkeys(total, 0.0)
    dots = np.zeros(len(y))
    for i, g in chunks():
        sl = slice(i, i + chunk_size)
        for k, rows in g.items():
            clipped[k] = clipped[k] + flat_factors[sl] @ rows
            layer_factors = factor(np.sqrt(leaf_sq[k][sl]), layer_clips[k])
            layered[k] = layered[k] + layer_factors @ rows
            dots[sl] += rows @ v[k]
    shapes = {k: np.shape(a) for k, a in jax_flat.items()}
    shaped = lambda d: {k: np.reshape(a, shapes[k]) for k, a in d.items()}
    outputs = {
        "norms": norms,
        "clipped": shaped(clipped),
        "grad": shaped(v),
        "layered": shaped(layered),
        "layer_clips": layer_clips,
        "dots": dots,
    }
    if gram:
        outputs["gram"] = _gram(chunks, len(y))
    return outputs, l2_clip


def _gram(chunks, size: int) -> np.ndarray:
    """``G Gᵀ`` from chunks of ``G``'s rows: each block of a pair of chunks, the second pass
    over the chunks recomputing them (``K (K + 1) / 2`` chunk gradients for ``K`` chunks)."""
    out = np.zeros((size, size))
    for i, gi in chunks():
        for j, gj in chunks():
            if j > i:
                break
            block = sum(gi[k] @ gj[k].T for k in gi)
            out[i : i + len(block), j : j + block.shape[1]] = block
            out[j : j + block.shape[1], i : i + len(block)] = block.T
    return out
