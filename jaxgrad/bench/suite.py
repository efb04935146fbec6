"""What the benchmark runs: models with synthetic data, and the strategies to time on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import fast, losses, models, privacy, reduce, strategies


class Case(NamedTuple):
    """A model and its loss, with a function that makes a batch of a given size."""

    name: str
    model: models.Model
    loss_fn: Callable
    make_batch: Callable[[int], Any]


def _classification_batch(input_shape, num_classes, *, seed=0):
    def make(batch_size):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch_size, *input_shape), np.float32)
        y = rng.integers(0, num_classes, batch_size)
        return jnp.asarray(x), jnp.asarray(y)

    return make


def _token_batch(vocab_size, seq_len, *, seed=0):
    def make(batch_size):
        rng = np.random.default_rng(seed)
        tokens = rng.integers(1, vocab_size, (batch_size, seq_len))
        lengths = rng.integers(seq_len // 4, seq_len + 1, batch_size)
        tokens = np.where(np.arange(seq_len)[None] < lengths[:, None], tokens, 0)
        return jnp.asarray(tokens), jnp.asarray(tokens)

    return make


def mlp_case(sizes=(784, 512, 256, 10), *, activation="tanh") -> Case:
    model = models.mlp(list(sizes), activation=activation)
    loss_fn = losses.supervised(model.apply, losses.softmax_cross_entropy, num_classes=sizes[-1])
    name = f"mlp {'-'.join(map(str, sizes))} {activation}"
    return Case(name, model, loss_fn, _classification_batch((sizes[0],), sizes[-1]))


def cnn_case(image_shape=(28, 28), channels=(16, 32), *, groups=None, weight_norm=False) -> Case:
    """The CNN; with ``groups``, weight-standardised convolutions + GroupNorm (De et al. 2022);
    with ``weight_norm``, weight-normalised convolutions."""
    model = models.cnn(
        image_shape=image_shape, channels=channels, groups=groups, weight_norm=weight_norm
    )
    loss_fn = losses.supervised(model.apply, losses.softmax_cross_entropy, num_classes=10)
    name = f"cnn {'x'.join(map(str, image_shape))} c{'-'.join(map(str, channels))}"
    name += "" if groups is None else f" WS+GN{groups}"
    name += " WN" if weight_norm else ""
    return Case(name, model, loss_fn, _classification_batch(tuple(image_shape), 10))


def transformer_case(vocab_size=256, seq_len=64, d_model=64, num_layers=2) -> Case:
    model = models.transformer(
        vocab_size=vocab_size, max_len=seq_len, d_model=d_model, num_heads=4, num_layers=num_layers
    )
    loss_fn = losses.supervised(model.apply, losses.token_cross_entropy)
    name = f"transformer d{d_model} L{num_layers} T{seq_len}"
    return Case(name, model, loss_fn, _token_batch(vocab_size, seq_len))


def rnn_case(in_features=64, hidden=256, seq_len=32, num_classes=10) -> Case:
    """A tanh RNN stepped by ``lax.scan``: its weights are used inside the loop body."""
    model = models.rnn(in_features, hidden, num_classes=num_classes)
    loss_fn = losses.supervised(model.apply, losses.softmax_cross_entropy, num_classes=num_classes)
    name = f"rnn(scan) tanh H{hidden} T{seq_len}"
    return Case(name, model, loss_fn, _classification_batch((seq_len, in_features), num_classes))


def scanned_transformer_case(vocab_size=256, seq_len=64, d_model=64, num_layers=4) -> Case:
    """The transformer with its blocks stacked and run by ``lax.scan`` (as ``nn.scan`` does)."""
    model = models.transformer(
        vocab_size=vocab_size,
        max_len=seq_len,
        d_model=d_model,
        num_heads=4,
        num_layers=num_layers,
        scan_layers=True,
    )
    loss_fn = losses.supervised(model.apply, losses.token_cross_entropy)
    name = f"transformer(scan) d{d_model} L{num_layers} T{seq_len}"
    return Case(name, model, loss_fn, _token_batch(vocab_size, seq_len))


CASES: dict[str, Callable[[], Case]] = {
    "mlp": mlp_case,
    "cnn": cnn_case,
    "cnn-ws": lambda: cnn_case(groups=4),
    # Weight-normalised convolutions (not in the default run).
    "cnn-wn": lambda: cnn_case(weight_norm=True),
    "transformer": transformer_case,
    "rnn": rnn_case,
    "transformer-L4": lambda: transformer_case(num_layers=4),
    "transformer-scan": scanned_transformer_case,
    # Small versions, for the test suite and quick looks.
    "mlp-tiny": lambda: mlp_case((64, 32, 10)),
    "cnn-tiny": lambda: cnn_case((8, 8), (4, 8)),
    "cnn-ws-tiny": lambda: cnn_case((8, 8), (4, 8), groups=2),
    "cnn-wn-tiny": lambda: cnn_case((8, 8), (4, 8), weight_norm=True),
    "transformer-tiny": lambda: transformer_case(32, 8, 16, 1),
    "rnn-tiny": lambda: rnn_case(8, 16, 6, 3),
    "transformer-scan-tiny": lambda: scanned_transformer_case(32, 8, 16, 2),
}


def python_loop(loss_fn):
    """The baseline a newcomer writes: one jitted single-example gradient per example, summed
    and divided by the real item count (``Σ_i m_i n_i``), as :func:`jaxgrad.batch_grad` does."""

    @jax.jit
    def one(params, example):
        g, count = jax.grad(lambda p: reduce.as_sum_count(loss_fn(p, example)), has_aux=True)(
            params
        )
        return count, g

    def f(params, batch, mask=None):
        size = reduce.batch_size(batch)
        mask = np.ones(size, bool) if mask is None else np.asarray(mask)
        total, count = None, 0.0
        for i in np.flatnonzero(mask):
            n, g = one(params, jax.tree_util.tree_map(lambda x, i=i: x[i], batch))
            total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
            count += n
        return jax.tree_util.tree_map(lambda t: t / count, total)

    f.is_python_loop = True
    return f


def plain_vmap_grad(loss_fn):
    """What a user writes without jaxgrad: ``jax.jit(jax.vmap(jax.grad(loss), (None, 0)))``."""
    vg = jax.jit(jax.vmap(jax.grad(reduce.loss_sum_fn(loss_fn)), in_axes=(None, 0)))
    return lambda params, batch, mask=None: vg(params, batch)


def vmap_grad_then_clip(loss_fn, *, l2_clip: float = 1.0):
    """DP-SGD as usually written: materialise ``vmap(grad)``, clip each row, average over the
    real items (``Σ_i m_i n_i``, as :func:`jaxgrad.clipped_grad` does)."""

    def one(params, example, real):
        def summed(p):
            loss_sum, count = reduce.as_sum_count(loss_fn(p, example))
            return loss_sum, count * real

        return jax.grad(summed, has_aux=True)(params)[::-1]

    @jax.jit
    def f(params, batch, mask=None):
        mask = jnp.ones(reduce.batch_size(batch), bool) if mask is None else mask
        counts, g = jax.vmap(one, in_axes=(None, 0, 0))(params, batch, mask)
        norms = jnp.sqrt(reduce.row_sq_norms(g))
        scale = jnp.where(mask, fast.api.clip_factors(norms, l2_clip), 0)
        return jax.tree.map(lambda x: jnp.tensordot(scale, x, axes=1) / jnp.sum(counts), g)

    return f


def with_reference(f):
    """``f(params, batch, mask, reference=params)``: the parameters as the reference pytree
    ``v`` (any fixed params-shaped pytree costs the same)."""
    return lambda params, batch, mask=None: f(params, batch, mask, reference=params)


def _vmap_grads(loss_fn):
    """Per-example gradients of the loss sums, ``jax.vmap(jax.grad)``: leaves ``(B, P_leaf)``."""
    vg = jax.vmap(jax.grad(reduce.loss_sum_fn(loss_fn)), in_axes=(None, 0))

    def leaves(params, batch, mask):
        mask = jnp.ones(reduce.batch_size(batch), bool) if mask is None else mask
        return [x.reshape(x.shape[0], -1) for x in jax.tree.leaves(vg(params, batch))], mask

    return leaves


def vmap_grad_then_dot(loss_fn):
    """What a user writes without jaxgrad: ``vmap(grad)``, then each row dotted with ``v``
    leaf by leaf (no concatenated copy), padded rows zeroed on the ``(B,)`` result."""
    grads = _vmap_grads(loss_fn)

    @jax.jit
    def f(params, batch, mask=None):
        js, mask = grads(params, batch, mask)
        vs = [jnp.ravel(x) for x in jax.tree.leaves(params)]
        return jnp.where(mask, sum(j @ v for j, v in zip(js, vs, strict=True)), 0)

    return f


def vmap_grad_then_gram(loss_fn):
    """``vmap(grad)``, then the ``B × B`` Gram matrix ``Σ_leaf J Jᵀ`` of its rows."""
    grads = _vmap_grads(loss_fn)

    @jax.jit
    def f(params, batch, mask=None):
        js, mask = grads(params, batch, mask)
        return jnp.where(mask[:, None] & mask[None, :], sum(j @ j.T for j in js), 0)

    return f


def dp_step(loss_fn, *, l2_clip: float = 1.0, noise_multiplier: float = 1.0, batch_size: int):
    """A full DP-SGD gradient on the batch: clip, sum, add ``N(0, σ²C² I)`` once, divide by
    ``batch_size`` (:func:`jaxgrad.privacy.dp_grad`; the noise key is fixed, its draw timed)."""
    f = privacy.dp_grad(
        loss_fn,
        l2_clip=l2_clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=batch_size,
    )
    key = dp_noise_key()
    return lambda params, batch, mask=None: f(params, batch, mask, key)


DP_KEY = 17


def dp_noise_key():
    """:func:`dp_step`'s fixed noise key: ``fold_in(key(DP_KEY), 0)``, not ``key(DP_KEY)``
    itself, of the ``(0, seed)`` form ``f`` warns of at every call
    (:func:`jaxgrad.keys.check_private_key`), a warning in every timed call."""
    return jax.random.fold_in(jax.random.key(DP_KEY), 0)


# The exact strategies of the registry (jaxgrad.strategies), each variant a row; the
# approximate ones are measured for their error (python -m jaxgrad.seed), not timed.
_REGISTERED = {
    label: (record, options)
    for record in strategies.all_strategies().values()
    if record.exact
    for label, options in record.variants.items()
}

# Strategies that write a B x P array: their time is also compared with writing B x P floats.
MATERIALISING = (
    *(label for label, (record, _) in _REGISTERED.items() if record.per_example),
    "jax.vmap(jax.grad)",
)

# name -> (factory(loss_fn, batch_size) -> f(params, batch, mask)), in table order.
STRATEGIES: dict[str, Callable] = {
    **{
        label: (lambda lf, b, record=record, options=options: record.build(lf, **options))
        for label, (record, options) in _REGISTERED.items()
    },
    "jax.vmap(jax.grad)": lambda lf, b: plain_vmap_grad(lf),
    "python_loop": lambda lf, b: python_loop(lf),
    "per_example_norms": lambda lf, b: fast.per_example_norms(lf),
    "clipped_grad": lambda lf, b: fast.clipped_grad(lf, l2_clip=1.0),
    "vmap(grad)+clip": lambda lf, b: vmap_grad_then_clip(lf, l2_clip=1.0),
    "dp_grad(clip+noise)": lambda lf, b: dp_step(lf, batch_size=b),
    "per_example_dots": lambda lf, b: with_reference(fast.per_example_dots(lf)),
    "vmap(grad)+dot": lambda lf, b: vmap_grad_then_dot(lf),
    "gradient_gram": lambda lf, b: fast.gradient_gram(lf),
    "vmap(grad)+gram": lambda lf, b: vmap_grad_then_gram(lf),
}
