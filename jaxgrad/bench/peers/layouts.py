"""Weights and gradients between jaxgrad's layout and PyTorch's, in NumPy.

jaxgrad (see :mod:`jaxgrad.models`) stores dense weights ``(in, out)`` with ``y = x @ w + b``,
convolutions HWIO on NHWC images, and its CNN's dense layer reads the last feature map
flattened in ``(H, W, C)`` order. PyTorch stores ``nn.Linear.weight`` as ``(out, in)``,
``nn.Conv2d.weight`` as OIHW on NCHW images, and ``nn.Flatten`` reads ``(C, H, W)``. Each
conversion below is a pure permutation of axes (and of the dense rows after a convolution),
so converting weights to PyTorch and gradients back is exact; gradients may carry any number
of leading (batch) axes.

The tanh RNN (:func:`jaxgrad.models.rnn`) has one bias ``b``; ``nn.RNN`` adds two,
``bias_ih_l0 + bias_hh_l0``, so ``b`` maps onto ``bias_ih_l0`` and ``bias_hh_l0`` is held at
zero and frozen (:func:`frozen_zeros`): it gets no gradient and counts in no norm. A
transformer with ``scan_layers=True`` stores every block leaf stacked over a leading layer
axis (``"blocks.mlp.w1"`` of shape ``(L, D, F)``); PyTorch has one module per block, so those
leaves are split into (and gradients stacked back from) ``"blocks.<i>.mlp.w1"``.

Flat dictionaries use ``"."``-joined paths: ``"0.w"`` for ``params[0]["w"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from jaxgrad.bench.peers.specs import ModelSpec


def flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict/list of arrays to ``{"a.0.w": array}``."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: np.asarray(tree)}
    out: dict[str, np.ndarray] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def unflatten(flat: Mapping[str, Any], template: Any, prefix: str = "") -> Any:
    """The inverse of :func:`flatten`, shaped like ``template`` (e.g. ``model.init``'s output)."""
    if isinstance(template, Mapping):
        return {
            k: unflatten(flat, v, f"{prefix}.{k}" if prefix else str(k))
            for k, v in template.items()
        }
    if isinstance(template, (list, tuple)):
        return type(template)(
            unflatten(flat, v, f"{prefix}.{i}" if prefix else str(i))
            for i, v in enumerate(template)
        )
    if prefix not in flat:
        raise KeyError(f"no array for parameter {prefix!r}; have {sorted(flat)}")
    return flat[prefix]


def _permute_last(a: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
    """Permutes the last ``len(perm)`` axes of ``a``, keeping any leading (batch) axes."""
    lead = a.ndim - len(perm)
    return a.transpose(*range(lead), *(lead + p for p in perm))


class Conversion(NamedTuple):
    """One parameter: its jaxgrad path, its PyTorch ``named_parameters`` name, and the maps."""

    jax_key: str
    torch_key: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_jax: Callable[[np.ndarray], np.ndarray]
    rank: int  # of the parameter itself (gradients may carry leading axes)


def _same(jax_key, torch_key, rank: int = 1) -> Conversion:
    return Conversion(jax_key, torch_key, lambda a: a, lambda a: a, rank)


def _dense(jax_key, torch_key) -> Conversion:
    swap = lambda a: np.swapaxes(a, -1, -2)
    return Conversion(jax_key, torch_key, swap, swap, 2)


def _conv(jax_key, torch_key) -> Conversion:
    # HWIO (kh, kw, ci, co) <-> OIHW (co, ci, kh, kw)
    return Conversion(
        jax_key,
        torch_key,
        lambda a: _permute_last(a, (3, 2, 0, 1)),
        lambda a: _permute_last(a, (2, 3, 1, 0)),
        4,
    )


def _dense_after_conv(jax_key, torch_key, h: int, w: int, c: int) -> Conversion:
    # jax rows are (h, w, c)-flattened features; torch columns are (c, h, w)-flattened.
    def to_torch(a):
        lead, out = a.shape[:-2], a.shape[-1]
        a = a.reshape(*lead, h, w, c, out)
        return _permute_last(a, (3, 2, 0, 1)).reshape(*lead, out, c * h * w)

    def to_jax(a):
        lead, out = a.shape[:-2], a.shape[-2]
        a = a.reshape(*lead, out, c, h, w)
        return _permute_last(a, (2, 3, 1, 0)).reshape(*lead, h * w * c, out)

    return Conversion(jax_key, torch_key, to_torch, to_jax, 2)


def conversions(spec: ModelSpec) -> list[Conversion]:
    """Every parameter of ``spec``, matched to the names :mod:`torch_side` gives its modules.

    For a scanned transformer the JAX keys are the per-block ones (``"blocks.<i>. ..."``);
    :func:`to_torch_state` and :func:`to_jax_flat` split and stack the layer axis around them.
    """
    c = spec.config
    if spec.kind == "rnn":
        # nn.Sequential(RNN, output of the tuple, last step, Linear): the RNN at 0, Linear at 3.
        return [
            _dense("wx", "0.weight_ih_l0"),
            _dense("wh", "0.weight_hh_l0"),
            _same("b", "0.bias_ih_l0"),
            _dense("out.w", "3.weight"),
            _same("out.b", "3.bias"),
        ]
    if spec.kind == "mlp":
        # nn.Sequential(Linear, act, Linear, act, ..., Linear): Linear i sits at index 2 i.
        out = []
        for i in range(len(c["sizes"]) - 1):
            out += [_dense(f"{i}.w", f"{2 * i}.weight"), _same(f"{i}.b", f"{2 * i}.bias")]
        return out
    if spec.kind == "cnn":
        # nn.Sequential([Conv2d, act, AvgPool2d] * n, Flatten, Linear): conv i at index 3 i.
        h, w, *_ = c["image_shape"]
        out = []
        for i, _ in enumerate(c["channels"]):
            out += [_conv(f"conv.{i}.w", f"{3 * i}.weight"), _same(f"conv.{i}.b", f"{3 * i}.bias")]
            h, w = h // 2, w // 2
        dense = 3 * len(c["channels"]) + 1
        out += [
            _dense_after_conv("dense.w", f"{dense}.weight", h, w, c["channels"][-1]),
            _same("dense.b", f"{dense}.bias"),
        ]
        return out
    out = [_same("embed", "embed.weight", 2), _same("pos", "pos.weight", 2)]
    for i in range(c["num_layers"]):
        b = f"blocks.{i}"
        for ln in ("ln1", "ln2"):
            out += [
                _same(f"{b}.{ln}.scale", f"{b}.{ln}.weight"),
                _same(f"{b}.{ln}.bias", f"{b}.{ln}.bias"),
            ]
        out += [_dense(f"{b}.attn.{n}", f"{b}.attn.{n}.weight") for n in ("wq", "wk", "wv", "wo")]
        out += [
            _dense(f"{b}.mlp.w1", f"{b}.mlp.w1.weight"),
            _same(f"{b}.mlp.b1", f"{b}.mlp.w1.bias"),
            _dense(f"{b}.mlp.w2", f"{b}.mlp.w2.weight"),
            _same(f"{b}.mlp.b2", f"{b}.mlp.w2.bias"),
        ]
    out += [
        _same("ln_f.scale", "ln_f.weight"),
        _same("ln_f.bias", "ln_f.bias"),
        _dense("head.w", "head.weight"),
        _same("head.b", "head.bias"),
    ]
    return out


def frozen_zeros(spec: ModelSpec) -> list[str]:
    """PyTorch parameters with no jaxgrad counterpart: held at zero, with no gradient."""
    return ["0.bias_hh_l0"] if spec.kind == "rnn" else []


def _scanned(spec: ModelSpec) -> bool:
    return spec.kind == "transformer" and bool(spec.config.get("scan_layers"))


_BLOCKS = "blocks."


def _unstack_layers(spec: ModelSpec, jax_flat: Mapping[str, np.ndarray]) -> dict:
    """A scanned transformer's stacked block leaves to per-block keys (others unchanged)."""
    if not _scanned(spec):
        return dict(jax_flat)
    layers = spec.config["num_layers"]
    out = {}
    for k, v in jax_flat.items():
        if not k.startswith(_BLOCKS):
            out[k] = v
            continue
        if np.shape(v)[:1] != (layers,):
            raise ValueError(
                f"scanned parameter {k!r} must have a leading layer axis of {layers}; "
                f"got shape {np.shape(v)}"
            )
        out.update({f"{_BLOCKS}{i}.{k[len(_BLOCKS) :]}": v[i] for i in range(layers)})
    return out


def _stack_layers(spec: ModelSpec, per_block: dict, convs: list[Conversion]) -> dict:
    """The inverse of :func:`_unstack_layers` for arrays with any leading (batch) axes: the
    layer axis goes right before each parameter's own axes, as ``vmap`` of a scanned model's
    gradient puts it."""
    if not _scanned(spec):
        return per_block
    rank = {cv.jax_key: cv.rank for cv in convs}
    out, stacked = {}, {}
    for k, v in per_block.items():
        if not k.startswith(_BLOCKS):
            out[k] = v
            continue
        i, rest = k[len(_BLOCKS) :].split(".", 1)
        stacked.setdefault(rest, {})[int(i)] = (v, rank[k])
    for rest, by_layer in stacked.items():
        arrays = [by_layer[i][0] for i in range(len(by_layer))]
        out[_BLOCKS + rest] = np.stack(arrays, axis=arrays[0].ndim - by_layer[0][1])
    return out


def to_torch_state(spec: ModelSpec, jax_flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """jaxgrad's flat parameters to ``{torch parameter name: array}`` (contiguous); the
    :func:`frozen_zeros` parameters are not included."""
    convs = conversions(spec)
    jax_flat = _unstack_layers(spec, jax_flat)
    missing = {cv.jax_key for cv in convs} - set(jax_flat)
    extra = set(jax_flat) - {cv.jax_key for cv in convs}
    if missing or extra:
        raise ValueError(
            f"parameters do not match the {spec.name!r} layout: missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}"
        )
    return {cv.torch_key: np.ascontiguousarray(cv.to_torch(jax_flat[cv.jax_key])) for cv in convs}


def to_jax_flat(spec: ModelSpec, torch_named: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch-named arrays (weights or gradients, any leading axes) to jaxgrad's flat layout."""
    convs = conversions(spec)
    missing = {cv.torch_key for cv in convs} - set(torch_named)
    if missing:
        raise ValueError(f"no PyTorch array for {sorted(missing)}; have {sorted(torch_named)}")
    per_block = {cv.jax_key: cv.to_jax(np.asarray(torch_named[cv.torch_key])) for cv in convs}
    return _stack_layers(spec, per_block, convs)


def to_torch_images(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    """jaxgrad's ``(B, H, W[, C])`` images to PyTorch's NCHW."""
    h, w, *rest = spec.config["image_shape"]
    c = rest[0] if rest else 1
    return np.ascontiguousarray(x.reshape(x.shape[0], h, w, c).transpose(0, 3, 1, 2))
