"""Pure functional models: ``Model(init, apply)``, with ``apply`` taking ONE example.

As in ``jax.example_libraries.stax``: ``init(key) -> params`` builds a plain pytree of
arrays (dicts and lists), and ``apply(params, x) -> y`` maps one example with no batch axis.
A batch is ``jax.vmap(apply, in_axes=(None, 0))``. Nothing here knows about gradients.

Parameter layouts (other libraries' models must match these to share weights):

* dense layers: ``{"w": (in, out), "b": (out,)}``, ``y = x @ w + b``;
* convolutions: ``{"w": (kh, kw, c_in, c_out), "b": (c_out,)}``, images ``(H, W, C)``
  (a grey ``(H, W)`` image is read as ``C = 1``), SAME padding, stride 1;
* layer norm: ``{"scale": (d,), "bias": (d,)}``, epsilon ``1e-5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.keys import check_key
from jaxgrad.reduce import check_flag

PyTree = Any


class Model(NamedTuple):
    """A pure model: ``init(key) -> params`` and ``apply(params, x) -> y`` on one example."""

    init: Callable[[jax.Array], PyTree]
    apply: Callable[[PyTree, Any], Any]


def _model(init, apply) -> Model:
    """``Model(init, apply)`` whose ``init`` checks its key first (an int seed or a batch of
    keys is an error naming ``key``, not a traceback from inside ``jax.random``)."""

    def checked_init(key):
        return init(check_key(key))

    return Model(checked_init, apply)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called ``name``; raises listing the allowed names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}; got {name!r}")
    return ACTIVATIONS[name]


def _dense_init(key, fan_in: int, fan_out: int, dtype) -> dict:
    # LeCun-normal weights keep activations O(1) for tanh/sigmoid at any width.
    w = jax.random.normal(key, (fan_in, fan_out), dtype) / math.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros((fan_out,), dtype)}


def check_features(x, w, *, model: str, shape=None) -> None:
    """A clear error when one example's feature size does not match the first weight.

    ``shape``: the example's shape as the caller received it, if ``x`` is a reshaped view.
    """
    got = np.shape(x)[-1] if np.ndim(x) else None
    want = np.shape(w)[0]
    if got != want:
        shown = np.shape(x) if shape is None else f"{tuple(shape)} ({got} features flattened)"
        raise ValueError(
            f"{model}: one example must have {want} input features (the model's input size); "
            f"got an example of shape {shown}. Check the data's feature size, or that the "
            "example has no batch axis (strategies vmap over examples)"
        )


def _dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


def _check_sizes(sizes, *, name: str, minimum: int) -> tuple[int, ...]:
    sizes = tuple(sizes)
    valid = lambda s: isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
    if len(sizes) < minimum or not all(map(valid, sizes)):
        raise ValueError(f"`{name}` must be at least {minimum} positive integers; got {sizes!r}")
    return tuple(int(s) for s in sizes)


def line_fit(*, dtype=jnp.float32) -> Model:
    """The seed's line ``f(x) = m x + b`` on a scalar ``x``; params ``{"m": (), "b": ()}``."""

    def init(key):
        del key
        return {"m": jnp.zeros((), dtype), "b": jnp.zeros((), dtype)}

    def apply(params, x):
        return params["m"] * x + params["b"]

    return _model(init, apply)


def linear_regression(in_features: int, *, dtype=jnp.float32) -> Model:
    """Multivariate linear regression ``y = x · w + b``; params ``{"w": (d,), "b": ()}``."""
    (in_features,) = _check_sizes([in_features], name="in_features", minimum=1)

    def init(key):
        del key
        return {"w": jnp.zeros((in_features,), dtype), "b": jnp.zeros((), dtype)}

    def apply(params, x):
        check_features(x, params["w"], model="linear_regression")
        return x @ params["w"] + params["b"]

    return _model(init, apply)


def logistic_regression(in_features: int, *, num_classes: int = 2, dtype=jnp.float32) -> Model:
    """Logistic regression: a scalar logit for 2 classes, else ``num_classes`` softmax logits.

    Params ``{"w": (d,), "b": ()}`` for the binary case, ``{"w": (d, C), "b": (C,)}`` otherwise.
    """
    (in_features, num_classes) = _check_sizes(
        [in_features, num_classes], name="in_features, num_classes", minimum=2
    )
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be at least 2; got {num_classes}")
    shape = (in_features,) if num_classes == 2 else (in_features, num_classes)

    def init(key):
        del key
        return {"w": jnp.zeros(shape, dtype), "b": jnp.zeros(shape[1:], dtype)}

    def apply(params, x):
        check_features(x, params["w"], model="logistic_regression")
        return x @ params["w"] + params["b"]

    return _model(init, apply)


def mlp(sizes: Sequence[int], *, activation: str = "tanh", dtype=jnp.float32) -> Model:
    """A multilayer perceptron; ``sizes = (in, hidden..., out)``, no activation on the output.

    Params: a list of dense layers ``[{"w": (in, h1), "b": (h1,)}, ...]``. The input is
    flattened, so an ``(8, 8)`` image works with ``sizes[0] == 64``.

    Example::

      >>> import jax, jaxgrad
      >>> model = jaxgrad.models.mlp([784, 512, 256, 10], activation="tanh")
      >>> params = model.init(jax.random.key(0))
      >>> model.apply(params, jax.numpy.zeros(784)).shape
      (10,)
    """
    sizes = _check_sizes(sizes, name="sizes", minimum=2)
    act = get_activation(activation)

    def init(key):
        keys = jax.random.split(key, len(sizes) - 1)
        return [
            _dense_init(k, a, b, dtype) for k, a, b in zip(keys, sizes, sizes[1:], strict=False)
        ]

    def apply(params, x):
        h = jnp.reshape(x, (-1,))
        check_features(h, params[0]["w"], model="mlp", shape=np.shape(x))
        for layer in params[:-1]:
            h = act(_dense(layer, h))
        return _dense(params[-1], h)

    return _model(init, apply)


def _conv(p: dict, x: jax.Array) -> jax.Array:
    # lax.conv needs a batch dimension; a size-1 one is folded into the vmap batch by
    # conv's batching rule, so vmap(apply) runs one batched convolution.
    y = jax.lax.conv_general_dilated(
        x[None], p["w"].astype(x.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y[0] + p["b"]


def _standardize(w: jax.Array) -> jax.Array:
    """Weight standardisation: each output channel's ``k × k × c_in`` weights centred and
    scaled to unit variance (a function of the parameters only; Qiao et al. 2019)."""
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = ((w - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
    return (w - mean) * jax.lax.rsqrt(var + 1e-5)


def _weight_normalize(v: jax.Array, g: jax.Array) -> jax.Array:
    """Weight normalisation: each output channel's kernel ``V_o`` rescaled to norm ``g_o``."""
    return g * v * jax.lax.rsqrt(jnp.sum(v * v, axis=(0, 1, 2), keepdims=True))


def _group_norm(p: dict, x: jax.Array, groups: int) -> jax.Array:
    """GroupNorm of one example's ``(H, W, C)`` map: statistics over ``H, W`` and the channels
    of each of ``groups`` groups, never over the batch (so per-example gradients stay one
    example's)."""
    h, w, c = x.shape
    g = x.reshape(h, w, groups, c // groups)
    mean = g.mean(axis=(0, 1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(0, 1, 3), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + 1e-5)
    return g.reshape(h, w, c) * p["scale"] + p["bias"]


def _avg_pool(x: jax.Array) -> jax.Array:
    h, w, c = x.shape
    return x[: h - h % 2, : w - w % 2].reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


def cnn(
    *,
    image_shape: Sequence[int] = (8, 8),
    channels: Sequence[int] = (8, 16),
    num_classes: int = 10,
    activation: str = "relu",
    kernel_size: int = 3,
    groups: int | None = None,
    weight_norm: bool = False,
    dtype=jnp.float32,
) -> Model:
    """A small CNN: ``[conv kxk (SAME) → activation → 2x2 average pool] × len(channels) → dense``.

    Images are ``(H, W)`` grey or ``(H, W, C)``. Params
    ``{"conv": [{"w": (k, k, c_in, c_out), "b": (c_out,)}, ...], "dense": {"w", "b"}}``; the
    dense layer reads the last feature map flattened in ``(H, W, C)`` order.

    With ``groups``, the DP recipe of De et al. (2022): every convolution is weight-standardised,
    ``Ŵ = (W − mean W) / std W`` per output channel, and followed by GroupNorm over ``groups``
    groups of channels, ``γ (x − μ_g) / σ_g + β``, statistics per example (each layer gains
    ``"scale"`` and ``"bias"`` of shape ``(c_out,)``; ``groups`` must divide every channel count).

    With ``weight_norm``, every convolution is weight-normalised (Salimans & Kingma 2016, as in
    the conv stacks of vocoders): ``W_o = g_o V_o / ‖V_o‖`` per output channel ``o``, ``"w"``
    holding ``V`` and a new ``"g"`` of shape ``(c_out,)`` initialised to ``‖V_o‖`` (so that
    ``W = V`` at initialisation).

    Example::

      >>> import jax, jaxgrad
      >>> model = jaxgrad.models.cnn(image_shape=(28, 28))
      >>> model.apply(model.init(jax.random.key(0)), jax.numpy.zeros((28, 28))).shape
      (10,)
    """
    image_shape = tuple(image_shape)
    if len(image_shape) == 2:
        image_shape = (*image_shape, 1)
    h, w, c_in = _check_sizes(image_shape, name="image_shape", minimum=3)
    channels = _check_sizes(channels, name="channels", minimum=1)
    act = get_activation(activation)
    weight_norm = check_flag(weight_norm, name="weight_norm")
    if groups is not None:
        if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"`groups` must be a positive integer or None; got {groups!r}")
        if any(c % groups for c in channels):
            raise ValueError(f"`groups` ({groups}) must divide every channel count; got {channels}")
    for _ in channels:
        h, w = h // 2, w // 2
    if h == 0 or w == 0:
        raise ValueError(
            f"`image_shape` {tuple(image_shape)} is too small for {len(channels)} 2x2 poolings"
        )
    flat = h * w * channels[-1]

    def init(key):
        keys = jax.random.split(key, len(channels) + 1)
        convs = []
        for k, a, b in zip(keys, (c_in, *channels[:-1]), channels, strict=False):
            fan_in = kernel_size * kernel_size * a
            wk = jax.random.normal(k, (kernel_size, kernel_size, a, b), dtype) / math.sqrt(fan_in)
            convs.append({"w": wk, "b": jnp.zeros((b,), dtype)})
            if groups is not None:
                convs[-1].update(scale=jnp.ones((b,), dtype), bias=jnp.zeros((b,), dtype))
            if weight_norm:
                convs[-1]["g"] = jnp.sqrt(jnp.sum(wk * wk, axis=(0, 1, 2)))
        return {"conv": convs, "dense": _dense_init(keys[-1], flat, num_classes, dtype)}

    def apply(params, x):
        # lax.conv needs equal dtypes; promote like a dense layer would (e.g. float64 images).
        dtype = jnp.result_type(x, params["conv"][0]["w"])
        x = jnp.reshape(x, image_shape).astype(dtype)
        for layer in params["conv"]:
            if weight_norm:
                layer = {**layer, "w": _weight_normalize(layer["w"], layer["g"])}
            if groups is None:
                x = _avg_pool(act(_conv(layer, x)))
            else:
                x = _conv({"w": _standardize(layer["w"]), "b": layer["b"]}, x)
                x = _avg_pool(act(_group_norm(layer, x, groups)))
        return _dense(params["dense"], x.reshape(-1))

    return _model(init, apply)


def _layer_norm(p: dict, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def transformer(
    *,
    vocab_size: int,
    max_len: int,
    d_model: int = 32,
    num_heads: int = 2,
    num_layers: int = 1,
    d_ff: int | None = None,
    num_outputs: int | None = None,
    causal: bool = True,
    pad_id: int = 0,
    dtype=jnp.float32,
    scan_layers: bool = False,
) -> Model:
    """A tiny pre-layer-norm transformer over one token sequence, with a padding mask.

    ``apply(params, tokens)`` takes int tokens of shape ``(T,)``, ``T <= max_len``; tokens equal
    to ``pad_id`` are padding: no position attends to them. A token outside
    ``[0, vocab_size)`` makes the output NaN (never a silently clamped lookup). Returns
    per-token logits
    ``(T, num_outputs)`` (``num_outputs`` defaults to ``vocab_size``, i.e. a language model).

    Params::

      {"embed": (V, D), "pos": (max_len, D),
       "blocks": [{"ln1": ln, "attn": {"wq", "wk", "wv", "wo": (D, D)},
                   "ln2": ln, "mlp": {"w1": (D, F), "b1": (F,), "w2": (F, D), "b2": (D,)}}],
       "ln_f": ln, "head": {"w": (D, num_outputs), "b": (num_outputs,)}}

    With ``scan_layers=True`` the blocks are one pytree with every leaf stacked over a
    leading layer axis and ``apply`` runs them with ``lax.scan`` (as ``nn.scan`` stacks
    write them; same maths, one compiled block).

    Example::

      >>> import jax, jaxgrad
      >>> model = jaxgrad.models.transformer(vocab_size=50, max_len=16)
      >>> tokens = jax.numpy.array([5, 7, 9, 0, 0])  # two padding tokens
      >>> model.apply(model.init(jax.random.key(0)), tokens).shape
      (5, 50)
    """
    vocab_size, max_len, d_model, num_heads, num_layers = _check_sizes(
        [vocab_size, max_len, d_model, num_heads, num_layers],
        name="vocab_size, max_len, d_model, num_heads, num_layers",
        minimum=5,
    )
    if d_model % num_heads:
        raise ValueError(f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads})")
    d_ff = d_ff or 4 * d_model
    num_outputs = num_outputs or vocab_size
    head_dim = d_model // num_heads
    ln = lambda: {"scale": jnp.ones((d_model,), dtype), "bias": jnp.zeros((d_model,), dtype)}

    def init(key):
        k_embed, k_pos, k_head, *k_blocks = jax.random.split(key, 3 + num_layers)
        blocks = []
        for kb in k_blocks:
            kq, kk, kv, ko, k1, k2 = jax.random.split(kb, 6)
            square = lambda k: jax.random.normal(k, (d_model, d_model), dtype) / math.sqrt(d_model)
            mlp1, mlp2 = (
                _dense_init(k1, d_model, d_ff, dtype),
                _dense_init(k2, d_ff, d_model, dtype),
            )
            blocks.append(
                {
                    "ln1": ln(),
                    "attn": {
                        "wq": square(kq),
                        "wk": square(kk),
                        "wv": square(kv),
                        "wo": square(ko),
                    },
                    "ln2": ln(),
                    "mlp": {"w1": mlp1["w"], "b1": mlp1["b"], "w2": mlp2["w"], "b2": mlp2["b"]},
                }
            )
        head = _dense_init(k_head, d_model, num_outputs, dtype)
        if scan_layers:
            blocks = jax.tree_util.tree_map(lambda *ls: jnp.stack(ls), *blocks)
        return {
            "embed": jax.random.normal(k_embed, (vocab_size, d_model), dtype) * 0.1,
            "pos": jax.random.normal(k_pos, (max_len, d_model), dtype) * 0.1,
            "blocks": blocks,
            "ln_f": ln(),
            "head": head,
        }

    def attention(p, x, allowed):
        t = x.shape[0]
        split = lambda y: y.reshape(t, num_heads, head_dim).transpose(1, 0, 2)
        q, k, v = split(x @ p["wq"]), split(x @ p["wk"]), split(x @ p["wv"])
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        out = jax.nn.softmax(scores, axis=-1) @ v
        return out.transpose(1, 0, 2).reshape(t, d_model) @ p["wo"]

    def apply(params, tokens):
        t = tokens.shape[0]
        if t > max_len:
            raise ValueError(f"`tokens` has length {t}; the model's `max_len` is {max_len}")
        real = tokens != pad_id
        allowed = real[None, :]
        if causal:
            allowed = allowed & jnp.tril(jnp.ones((t, t), bool))
        # A padding query must still attend somewhere, or its softmax row is all -inf.
        allowed = allowed | jnp.eye(t, dtype=bool)
        # An out-of-vocabulary token reads NaN rather than being clamped to the last row.
        embedded = jnp.take(params["embed"], tokens, axis=0, mode="fill", fill_value=jnp.nan)
        x = embedded + params["pos"][:t]

        def block_fn(x, block):
            x = x + attention(block["attn"], _layer_norm(block["ln1"], x), allowed)
            m = block["mlp"]
            h = jax.nn.gelu(_layer_norm(block["ln2"], x) @ m["w1"] + m["b1"])
            return x + h @ m["w2"] + m["b2"], None

        if scan_layers:
            x = jax.lax.scan(block_fn, x, params["blocks"])[0]
        else:
            for block in params["blocks"]:
                x = block_fn(x, block)[0]
        return _layer_norm(params["ln_f"], x) @ params["head"]["w"] + params["head"]["b"]

    return _model(init, apply)


def rnn(
    in_features: int,
    hidden: int,
    *,
    num_classes: int,
    activation: str = "tanh",
    dtype=jnp.float32,
) -> Model:
    """An Elman RNN over one sequence, stepped by ``lax.scan``, classifying its last state.

    .. math::

        h_t = \\phi(x_t W_x + h_{t-1} W_h + b), \\qquad
        \\text{logits} = h_T W_o + b_o, \\qquad h_0 = 0.

    ``apply(params, xs)`` takes ``xs`` of shape ``(T, in_features)``.

    Params::

      {"wx": (in_features, hidden), "wh": (hidden, hidden), "b": (hidden,),
       "out": {"w": (hidden, num_classes), "b": (num_classes,)}}

    Example::

      >>> import jax, jaxgrad
      >>> model = jaxgrad.models.rnn(3, 8, num_classes=2)
      >>> model.apply(model.init(jax.random.key(0)), jax.numpy.ones((5, 3))).shape
      (2,)
    """
    in_features, hidden, num_classes = _check_sizes(
        [in_features, hidden, num_classes], name="in_features, hidden, num_classes", minimum=3
    )
    act = get_activation(activation)

    def init(key):
        kx, kh, ko = jax.random.split(key, 3)
        return {
            "wx": jax.random.normal(kx, (in_features, hidden), dtype) / math.sqrt(in_features),
            "wh": jax.random.normal(kh, (hidden, hidden), dtype) / math.sqrt(hidden),
            "b": jnp.zeros((hidden,), dtype),
            "out": _dense_init(ko, hidden, num_classes, dtype),
        }

    def apply(params, xs):
        step = lambda h, x: (act(x @ params["wx"] + h @ params["wh"] + params["b"]), None)
        h = jax.lax.scan(step, jnp.zeros((hidden,), xs.dtype), xs)[0]
        return _dense(params["out"], h)

    return _model(init, apply)
