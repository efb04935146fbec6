"""The PyTorch side: jaxgrad's models rebuilt as ``nn.Module``s, and each peer's method.

Imported only inside a worker subprocess (it imports torch). Every method is prepared into
a ``step()`` (the timed call) and an ``extract(out)`` that turns the last step's result into
NumPy arrays in jaxgrad's layout for the cross-check; extraction is never timed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxgrad.bench.peers import layouts, specs
from jaxgrad.bench.peers.specs import ModelSpec

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}; got {name!r}")
    return _ACTIVATIONS[name]()


class _Attention(nn.Module):
    """jaxgrad's attention: no biases, padding keys masked, a query always sees itself."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self, name, nn.Linear(d_model, d_model, bias=False))

    def forward(self, x, allowed):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        out = torch.softmax(scores, dim=-1) @ v
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


class _FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x):
        # jax.nn.gelu's default is the tanh approximation.
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model, eps=1e-5), nn.LayerNorm(d_model, eps=1e-5)
        self.attn, self.mlp = _Attention(d_model, num_heads), _FeedForward(d_model, 4 * d_model)

    def forward(self, x, allowed):
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """:func:`jaxgrad.models.transformer` (pre-LN, causal, pad id 0) on a ``(B, T)`` batch."""

    def __init__(self, *, vocab_size, max_len, d_model, num_heads, num_layers, pad_id=0):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, d_model)
        # Positions as an embedding of arange(T), so Opacus and BackPACK see a known layer.
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, num_heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens):
        b, t = tokens.shape
        real = tokens != self.pad_id
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=tokens.device)
        allowed = (real[:, None, :] & causal) | eye
        # Materialised (not .expand): Opacus's embedding norm sampler needs contiguous ids.
        positions = torch.arange(t, device=tokens.device).repeat(b, 1)
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x, allowed)
        return self.head(self.ln_f(x))


class LoopRNN(nn.Module):
    """A one-layer tanh ``nn.RNN`` (``batch_first``, ``h_0 = 0``) stepped by a Python loop.

    Same parameter names and maths as ``nn.RNN``; ``torch.func.vmap`` has no batching rule
    for ``nn.RNN``'s fused kernel (it fails with a shape error), so the ``torch.func`` row
    runs this, as a ``torch.func`` user would write it. Returns ``(outputs, h_T[None])``.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.weight_ih_l0 = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.zeros(hidden_size))
        self.bias_hh_l0 = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.weight_hh_l0.shape[0])
        outputs = []
        for t in range(x.shape[1]):
            h = torch.tanh(
                F.linear(x[:, t], self.weight_ih_l0, self.bias_ih_l0)
                + F.linear(h, self.weight_hh_l0, self.bias_hh_l0)
            )
            outputs.append(h)
        return torch.stack(outputs, 1), h[None]


class _TupleFirst(nn.Module):
    """An RNN's ``(outputs, h_n)`` to ``outputs`` (BackPACK's ``ReduceTuple(0)``)."""

    def forward(self, pair):
        return pair[0]


class _LastStep(nn.Module):
    """``(B, T, H)`` to ``(B, H)`` (BackPACK's ``Slicing((slice(None), -1))``)."""

    def forward(self, x):
        return x[:, -1]


# Which recurrent layer each kind of row gets for the RNN model (same parameter names):
# PyTorch's own nn.RNN where it works, Opacus's DPRNN for Opacus (its hooks cannot see inside
# nn.RNN; ModuleValidator asks for DPRNN), the loop for torch.func.
RNN_LAYERS = ("torch", "opacus", "loop", "backpack")


def _rnn_model(c: dict, layer: str) -> nn.Module:
    if layer not in RNN_LAYERS:
        raise ValueError(f"`rnn_layer` must be one of {RNN_LAYERS}; got {layer!r}")
    i, h = c["in_features"], c["hidden"]
    if c["activation"] != "tanh":
        raise ValueError(f"the RNN twin is tanh only; got activation {c['activation']!r}")
    if layer == "opacus":
        from opacus.layers import DPRNN

        rnn = DPRNN(i, h, batch_first=True, nonlinearity="tanh")
    elif layer == "loop":
        rnn = LoopRNN(i, h)
    else:
        rnn = nn.RNN(i, h, batch_first=True, nonlinearity="tanh")
    if layer == "backpack":
        from backpack.custom_module.reduce_tuple import ReduceTuple
        from backpack.custom_module.slicing import Slicing

        first, last = ReduceTuple(index=0), Slicing((slice(None), -1))
    else:
        first, last = _TupleFirst(), _LastStep()
    return nn.Sequential(rnn, first, last, nn.Linear(h, c["num_classes"]))


def build_model(spec: ModelSpec, *, rnn_layer: str = "torch") -> nn.Module:
    """The PyTorch twin of ``spec``; parameter names match :func:`layouts.conversions`.

    ``rnn_layer`` picks the RNN model's recurrent layer (see :data:`RNN_LAYERS`); a scanned
    transformer's twin is the unrolled one (PyTorch has no scan).
    """
    c = spec.config
    if spec.kind == "mlp":
        s, layers = c["sizes"], []
        for i, (a, b) in enumerate(itertools.pairwise(s)):
            layers.append(nn.Linear(a, b))
            if i < len(s) - 2:
                layers.append(_activation(c["activation"]))
        return nn.Sequential(*layers)
    if spec.kind == "cnn":
        h, w, *rest = c["image_shape"]
        c_in, k, layers = (rest[0] if rest else 1), c["kernel_size"], []
        for c_out in c["channels"]:
            # SAME padding for an odd kernel at stride 1 is k // 2 on every side.
            layers += [nn.Conv2d(c_in, c_out, k, padding=k // 2), _activation(c["activation"])]
            layers.append(nn.AvgPool2d(2))
            c_in, h, w = c_out, h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(h * w * c_in, c["num_classes"])]
        return nn.Sequential(*layers)
    if spec.kind == "rnn":
        return _rnn_model(c, rnn_layer)
    if spec.kind == "transformer":
        return Transformer(
            vocab_size=c["vocab_size"],
            max_len=c["max_len"],
            d_model=c["d_model"],
            num_heads=c["num_heads"],
            num_layers=c["num_layers"],
        )
    raise ValueError(f"`spec.kind` must be mlp, cnn, transformer or rnn; got {spec.kind!r}")


def load_model(
    spec: ModelSpec, jax_flat: dict[str, np.ndarray], *, rnn_layer: str = "torch"
) -> nn.Module:
    """``spec``'s PyTorch model holding jaxgrad's weights ``jax_flat``; the parameters with
    no jaxgrad counterpart (:func:`layouts.frozen_zeros`) are zero and frozen."""
    model = build_model(spec, rnn_layer=rnn_layer)
    state = layouts.to_torch_state(spec, jax_flat)
    frozen = set(layouts.frozen_zeros(spec))
    # By parameter name, not load_state_dict: Opacus's DPRNN renames its parameters to
    # nn.RNN's names (weight_ih_l0, ...) but its state_dict inside a container does not.
    named = dict(model.named_parameters())
    if set(named) != set(state) | frozen:
        raise ValueError(
            f"the PyTorch {spec.name!r} model's parameters {sorted(named)} do not match the "
            f"converted weights {sorted(state)} and frozen zeros {sorted(frozen)}"
        )
    with torch.no_grad():
        for name, p in named.items():
            if name in frozen:
                p.zero_().requires_grad_(False)
            else:
                p.copy_(torch.from_numpy(state[name]))
    return model


def to_torch_batch(spec: ModelSpec, data: dict[str, np.ndarray]):
    """The shared batch as PyTorch inputs: NCHW images, int64 labels and tokens."""
    x = data["x"]
    if spec.kind == "cnn":
        x = layouts.to_torch_images(spec, x)
    # Standard NCHW strides: NumPy gives a size-1 channel axis the stride 1, which PyTorch
    # reads as channels_last and propagates to later activations, where Opacus 1.6's conv
    # per-sample gradients (an as_strided unfold that assumes NCHW-contiguous) are silently
    # wrong. A DataLoader batch has standard strides; so does this.
    x = torch.from_numpy(np.ascontiguousarray(x)).clone(memory_format=torch.contiguous_format)
    if spec.kind == "transformer":
        x = x.long()
    return x, torch.from_numpy(data["y"]).long()


def per_example_loss(spec: ModelSpec, logits, y):
    """``(S_i, n_i)``: each example's summed loss and item count, as jaxgrad's losses define."""
    if spec.kind != "transformer":
        return F.cross_entropy(logits, y, reduction="none"), torch.ones_like(y, dtype=logits.dtype)
    real = y != 0
    ce = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view_as(y)
    return (ce * real).sum(-1), real.sum(-1).to(logits.dtype)


def _named_grads(model: nn.Module, attr: str = "grad") -> dict[str, np.ndarray]:
    return {
        name: getattr(p, attr).detach().numpy().astype(np.float32)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


Prepared = tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]


def prepare(
    method: str,
    spec: ModelSpec,
    jax_flat: dict[str, np.ndarray],
    data,
    *,
    l2_clip: float,
    layer_clips: dict[str, float] | None = None,
    v: dict[str, np.ndarray] | None = None,
) -> Prepared:
    """``(step, extract)`` for ``method`` (a PyTorch-side method name) on the shared weights.

    ``extract(out)`` returns any of ``"grad"`` (jax-flat mean gradient), ``"per_example"``
    (jax-flat, leading batch axis), ``"norms"``, ``"clipped"`` (jax-flat clipped sum),
    ``"layered"`` (jax-flat per-layer clipped sum), ``"dots"`` and ``"gram"``.
    ``layer_clips`` (jax-flat ``{leaf: C_g}``) is for the per-layer row, ``v`` (jax-flat) for
    the dots row.
    """
    # Each method with the RNN layer it can run (see RNN_LAYERS; other models ignore it).
    factories = {
        "backward": (_plain_backward, "torch"),
        "vmap_grad": (_func_vmap_grad, "loop"),
        "vmap_dots": (_func_vmap_dots, "loop"),
        "vmap_gram": (_func_vmap_gram, "loop"),
        "hooks_clip": (_opacus_hooks_clip, "opacus"),
        "ghost_clip": (_opacus_ghost_clip, "opacus"),
        "per_layer_clip": (_opacus_per_layer_clip, "opacus"),
        "BatchGrad": (_backpack_batch_grad, "backpack"),
        "BatchL2Grad": (_backpack_batch_l2, "backpack"),
        "dp_step": (_opacus_dp_step, "opacus"),
        "dp_ghost": (_opacus_dp_ghost, "opacus"),
    }
    if method not in factories:
        raise ValueError(
            f"PyTorch-side `method` must be one of {sorted(factories)}; got {method!r}"
        )
    factory, rnn_layer = factories[method]
    model = load_model(spec, jax_flat, rnn_layer=rnn_layer)
    x, y = to_torch_batch(spec, data)
    to_jax = lambda named: layouts.to_jax_flat(spec, named)
    extras = {}
    if method == "per_layer_clip":
        extras["layer_clips"] = _torch_named(spec, _required(layer_clips, "layer_clips", method))
    if method == "vmap_dots":
        v = layouts.to_torch_state(spec, _required(v, "v", method))
        extras["v"] = {k: torch.from_numpy(np.asarray(a, np.float32)) for k, a in v.items()}
    return factory(spec, model, x, y, to_jax, l2_clip=l2_clip, **extras)


def _required(value, name: str, method: str):
    if value is None:
        raise ValueError(f"method {method!r} needs `{name}`; got None")
    return value


def _torch_named(spec: ModelSpec, jax_named: dict[str, float]) -> dict[str, float]:
    """A number per jaxgrad leaf to the same number per PyTorch parameter (one to one, except
    for a scanned transformer, whose stacked leaves have no single PyTorch parameter)."""
    if specs.variant(spec) == "transformer-scan":
        raise ValueError("a scanned transformer's leaves stack several PyTorch parameters")
    return {cv.torch_key: float(jax_named[cv.jax_key]) for cv in layouts.conversions(spec)}


def _plain_backward(spec, model, x, y, to_jax, *, l2_clip):
    def step():
        model.zero_grad(set_to_none=True)
        sums, counts = per_example_loss(spec, model(x), y)
        (sums.sum() / counts.sum()).backward()

    return step, lambda _: {"grad": to_jax(_named_grads(model))}


def _func_per_example(spec, model):
    """``(params, f)``: ``f(params, x, y)`` is ``{name: (B, ...)}``, the per-example gradients
    of the loss sums by ``torch.func.vmap(torch.func.grad)``."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_one(p, xi, yi):
        logits = functional_call(model, p, (xi[None],))
        return per_example_loss(spec, logits, yi[None])[0][0]

    return params, vmap(grad(loss_one), in_dims=(None, 0, 0))


def _func_vmap_grad(spec, model, x, y, to_jax, *, l2_clip):
    params, per_example = _func_per_example(spec, model)

    def step():
        return per_example(params, x, y)

    return step, lambda out: {"per_example": to_jax({k: v.numpy() for k, v in out.items()})}


def _func_vmap_dots(spec, model, x, y, to_jax, *, l2_clip, v):
    # What a torch.func user writes: the per-example gradients, then one matrix-vector
    # product per parameter.
    params, per_example = _func_per_example(spec, model)

    def step():
        grads = per_example(params, x, y)
        return sum(g.flatten(1) @ v[k].flatten() for k, g in grads.items())

    return step, lambda dots: {"dots": dots.numpy()}


def _func_vmap_gram(spec, model, x, y, to_jax, *, l2_clip):
    params, per_example = _func_per_example(spec, model)

    def step():
        rows = torch.cat([g.flatten(1) for g in per_example(params, x, y).values()], dim=1)
        return rows @ rows.T

    return step, lambda gram: {"gram": gram.numpy()}


def _opacus_hooks_clip(spec, model, x, y, to_jax, *, l2_clip):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=l2_clip,
        expected_batch_size=len(y),
        loss_reduction="sum",
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        sums, _ = per_example_loss(spec, gsm(x), y)
        sums.sum().backward()
        optimizer.clip_and_accumulate()  # per-sample norms, clip factors, clipped sum

    def extract(_):
        return {
            "clipped": to_jax(_named_grads(model, "summed_grad")),
            "per_example": to_jax(_named_grads(model, "grad_sample")),
        }

    return step, extract


def _opacus_private(model, x, y, **options):
    """``PrivacyEngine.make_private`` as the Opacus DP rows call it: ``(module, optimizer)``.

    A loader of the whole batch (it fixes the expected batch size B: no Poisson sampling, every
    row sees the same batch), SGD with learning rate 0 over the trainable parameters (the rows
    return gradients, never apply them), per-sample hooks, summed losses; ``options`` (noise
    multiplier, clip norms, clipping mode) go to ``make_private`` as they are.
    """
    from opacus import PrivacyEngine

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    gsm, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
        data_loader=loader,
        poisson_sampling=False,
        loss_reduction="sum",
        grad_sample_mode="hooks",
        **options,
    )
    return gsm, optimizer


def _opacus_per_layer_clip(spec, model, x, y, to_jax, *, l2_clip, layer_clips):
    # Opacus's per-layer clipping as a user asks for it: make_private with one max_grad_norm
    # per trainable parameter, in the optimizer's order. Its clip_and_accumulate is the
    # clipped sum, as in opacus:hooks_clip (no noise, no optimizer step).
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    gsm, optimizer = _opacus_private(
        model,
        x,
        y,
        noise_multiplier=0.0,
        max_grad_norm=[layer_clips[name] for name in trainable],
        clipping="per_layer",
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        sums, _ = per_example_loss(spec, gsm(x), y)
        sums.sum().backward()
        optimizer.clip_and_accumulate()

    return step, lambda _: {"layered": to_jax(_named_grads(model, "summed_grad"))}


def _ghost_clipped_backward(gsm, zero_grad, spec, x, y):
    """What opacus.utils.fast_gradient_clipping_utils.DPTensorFastGradientClipping.backward
    does, without its optimizer: a first backward for the norms, then a second, reweighted one
    (hooks off) that leaves the clipped sum in the parameters' ``.grad``."""
    zero_grad(set_to_none=True)
    sums, _ = per_example_loss(spec, gsm(x), y)
    sums.sum().backward(retain_graph=True)
    zero_grad(set_to_none=True)
    coefficients = gsm.get_clipping_coef()
    gsm.disable_hooks()
    (coefficients * sums).sum().backward()
    gsm.enable_hooks()


def _opacus_ghost_clip(spec, model, x, y, to_jax, *, l2_clip):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=l2_clip, use_ghost_clipping=True, loss_reduction="sum"
    )

    def step():
        _ghost_clipped_backward(gsm, gsm.zero_grad, spec, x, y)
        return gsm.per_sample_gradient_norms

    def extract(norms):
        return {"clipped": to_jax(_named_grads(model)), "norms": norms.detach().numpy()}

    return step, extract


def _divide_grads(model, batch_size):
    # With loss_reduction="sum" Opacus's pre_step leaves the noisy *sum* in p.grad (it divides
    # by the expected batch size only for "mean"); dividing here gives the JAX rows' gradient.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.grad.div_(batch_size)


def _noisy_extract(model, optimizer, step, batch_size, to_jax):
    """The DP-step rows' cross-check: the step is timed with ``σ = NOISE_MULTIPLIER``; here it
    reruns once with the optimizer's ``noise_multiplier`` set to 0 and returns ``B ×`` the
    resulting gradient as the clipped sum (compared with the float64 reference)."""

    def extract(_):
        sigma, optimizer.noise_multiplier = optimizer.noise_multiplier, 0.0
        try:
            step()
        finally:
            optimizer.noise_multiplier = sigma
        grads = _named_grads(model)
        return {"clipped": to_jax({k: batch_size * v for k, v in grads.items()})}

    return extract


def _opacus_dp_step(spec, model, x, y, to_jax, *, l2_clip):
    from jaxgrad.bench.peers.specs import NOISE_MULTIPLIER

    # The optimizer's pre_step is the DP part of a step (clip and accumulate, add N(0, σ²C²I)
    # once, divide by B), without the SGD update, as the JAX rows return the noisy gradient
    # without applying it.
    gsm, optimizer = _opacus_private(
        model, x, y, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=l2_clip
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        sums, _ = per_example_loss(spec, gsm(x), y)
        sums.sum().backward()
        optimizer.pre_step()
        _divide_grads(model, len(y))

    return step, _noisy_extract(model, optimizer, step, len(y), to_jax)


def _opacus_dp_ghost(spec, model, x, y, to_jax, *, l2_clip):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from jaxgrad.bench.peers.specs import NOISE_MULTIPLIER

    gsm = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=l2_clip, use_ghost_clipping=True, loss_reduction="sum"
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=l2_clip,
        expected_batch_size=len(y),
        loss_reduction="sum",
    )

    def step():
        # The same two backward passes as opacus:ghost_clip, then the optimizer's pre_step:
        # the clipped sum plus N(0, σ²C²I) once, divided by B.
        _ghost_clipped_backward(gsm, optimizer.zero_grad, spec, x, y)
        optimizer.pre_step()
        _divide_grads(model, len(y))

    return step, _noisy_extract(model, optimizer, step, len(y), to_jax)


def _backpack_setup(spec, model):
    from backpack import extend

    if spec.kind == "transformer":
        raise NotImplementedError("BackPACK does not support attention")
    return extend(model), extend(nn.CrossEntropyLoss(reduction="sum"))


def _backpack_batch_grad(spec, model, x, y, to_jax, *, l2_clip):
    from backpack import backpack
    from backpack.extensions import BatchGrad

    model, loss_fn = _backpack_setup(spec, model)

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        with backpack(BatchGrad()):
            loss.backward()

    return step, lambda _: {"per_example": to_jax(_named_grads(model, "grad_batch"))}


def _backpack_batch_l2(spec, model, x, y, to_jax, *, l2_clip):
    from backpack import backpack
    from backpack.extensions import BatchL2Grad

    model, loss_fn = _backpack_setup(spec, model)

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        with backpack(BatchL2Grad()):
            loss.backward()
        # Squared norms per parameter, summed over parameters: the per-example norm.
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.stack([p.batch_l2 for p in trainable]).sum(0).sqrt()

    return step, lambda norms: {"norms": norms.detach().numpy()}
