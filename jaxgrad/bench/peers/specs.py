"""What the peer comparison runs: model specs, their data, and the (framework, method) rows.

Everything here is plain Python and NumPy, so the orchestrating process never needs to
import PyTorch; each framework is imported only inside its own worker subprocess.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """One architecture, built identically on the JAX and the PyTorch side.

    ``kind`` is ``"mlp"``, ``"cnn"``, ``"transformer"`` or ``"rnn"``; ``config`` holds the
    keyword arguments of the matching :mod:`jaxgrad.models` constructor (``sizes`` for the
    MLP; ``seq_len`` for the RNN is the data's, not the model's). A transformer with
    ``scan_layers=True`` stacks its blocks and runs them with ``lax.scan`` on the JAX side;
    PyTorch has no scan, so its twin is the same unrolled network.
    """

    name: str
    kind: str
    config: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        c = self.config
        if self.kind == "mlp":
            return f"mlp {'-'.join(map(str, c['sizes']))} {c['activation']}"
        if self.kind == "cnn":
            image = "x".join(map(str, c["image_shape"]))
            return f"cnn {image} c{'-'.join(map(str, c['channels']))}"
        if self.kind == "rnn":
            return f"rnn(scan) {c['activation']} I{c['in_features']} H{c['hidden']} T{c['seq_len']}"
        name = "transformer(scan)" if c.get("scan_layers") else "transformer"
        return f"{name} d{c['d_model']} L{c['num_layers']} T{c['max_len']} V{c['vocab_size']}"


def mlp_spec(sizes=(784, 512, 256, 10), *, activation="tanh", name="mlp") -> ModelSpec:
    return ModelSpec(name, "mlp", {"sizes": tuple(sizes), "activation": activation})


def cnn_spec(image_shape=(28, 28), channels=(16, 32), *, name="cnn") -> ModelSpec:
    # The same defaults as ``jaxgrad.bench``'s own CNN case: relu, 3x3 SAME, 10 classes.
    return ModelSpec(
        name,
        "cnn",
        {
            "image_shape": tuple(image_shape),
            "channels": tuple(channels),
            "num_classes": 10,
            "activation": "relu",
            "kernel_size": 3,
        },
    )


def transformer_spec(
    vocab_size=256,
    seq_len=64,
    d_model=64,
    num_layers=2,
    num_heads=4,
    *,
    scan_layers=False,
    name="transformer",
) -> ModelSpec:
    config = {
        "vocab_size": vocab_size,
        "max_len": seq_len,
        "d_model": d_model,
        "num_heads": num_heads,
        "num_layers": num_layers,
    }
    if scan_layers:
        config["scan_layers"] = True
    return ModelSpec(name, "transformer", config)


def rnn_spec(in_features=64, hidden=256, seq_len=32, num_classes=10, *, name="rnn") -> ModelSpec:
    # The same defaults as ``jaxgrad.bench``'s RNN case: tanh, stepped by ``lax.scan``,
    # classifying the last state.
    return ModelSpec(
        name,
        "rnn",
        {
            "in_features": in_features,
            "hidden": hidden,
            "seq_len": seq_len,
            "num_classes": num_classes,
            "activation": "tanh",
        },
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        mlp_spec(),
        cnn_spec(),
        transformer_spec(),
        rnn_spec(),
        # As ``jaxgrad.bench``'s scanned case: four blocks run by ``lax.scan``.
        transformer_spec(num_layers=4, scan_layers=True, name="transformer-scan"),
        # Small versions, for the tests and quick looks.
        mlp_spec((64, 32, 10), name="mlp-tiny"),
        cnn_spec((8, 8), (4, 8), name="cnn-tiny"),
        transformer_spec(32, 8, 16, 1, 2, name="transformer-tiny"),
        rnn_spec(8, 16, 6, 3, name="rnn-tiny"),
        transformer_spec(32, 8, 16, 2, 2, scan_layers=True, name="transformer-scan-tiny"),
    )
}


def sweep_mlp_spec(width: int) -> ModelSpec:
    """The sweep's MLP: ``784-width-width/2-10`` tanh (``width=512`` is the default MLP)."""
    return mlp_spec((784, width, max(width // 2, 1), 10), name=f"mlp-w{width}")


def spec_from_name(name: str) -> ModelSpec:
    """A named model, or a sweep MLP ``mlp-w<width>``; raises listing the allowed names."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith("mlp-w") and name[5:].isdigit() and int(name[5:]) > 0:
        return sweep_mlp_spec(int(name[5:]))
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)} or mlp-w<width>")


def num_params(spec: ModelSpec) -> int:
    """The parameter count P, from the shapes alone (no framework needed)."""
    c = spec.config
    if spec.kind == "mlp":
        s = c["sizes"]
        return sum(a * b + b for a, b in itertools.pairwise(s))
    if spec.kind == "cnn":
        h, w, *rest = c["image_shape"]
        c_in, k, total = (rest[0] if rest else 1), c["kernel_size"], 0
        for c_out in c["channels"]:
            total += k * k * c_in * c_out + c_out
            c_in, h, w = c_out, h // 2, w // 2
        return total + h * w * c_in * c["num_classes"] + c["num_classes"]
    if spec.kind == "rnn":
        i, h, k = c["in_features"], c["hidden"], c["num_classes"]
        return i * h + h * h + h + h * k + k
    d, v, t, f = c["d_model"], c["vocab_size"], c["max_len"], 4 * c["d_model"]
    block = 4 * d + 4 * d * d + d * f + f + f * d + d
    return v * d + t * d + c["num_layers"] * block + 2 * d + d * v + v


def make_data(spec: ModelSpec, batch_size: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The batch both frameworks see: ``{"x", "y"}`` NumPy arrays in jaxgrad's layout.

    Images are ``(B, H, W)`` (grey) or ``(B, H, W, C)``; sequences ``(B, T, in_features)``;
    token batches are ``(B, T)`` int32
    with padding (id 0) after a random length, and next-token targets (padding where the
    next token is padding or past the end).
    """
    rng = np.random.default_rng(seed)
    c = spec.config
    if spec.kind == "mlp":
        x = rng.standard_normal((batch_size, c["sizes"][0]), np.float32)
        y = rng.integers(0, c["sizes"][-1], batch_size).astype(np.int32)
    elif spec.kind == "rnn":
        x = rng.standard_normal((batch_size, c["seq_len"], c["in_features"]), np.float32)
        y = rng.integers(0, c["num_classes"], batch_size).astype(np.int32)
    elif spec.kind == "cnn":
        x = rng.standard_normal((batch_size, *c["image_shape"]), np.float32)
        y = rng.integers(0, c["num_classes"], batch_size).astype(np.int32)
    else:
        t, v = c["max_len"], c["vocab_size"]
        tokens = rng.integers(1, v, (batch_size, t))
        # At least two real tokens, so every sequence has at least one real target.
        lengths = rng.integers(max(t // 4, 2), t + 1, batch_size)
        x = np.where(np.arange(t)[None] < lengths[:, None], tokens, 0).astype(np.int32)
        y = np.concatenate([x[:, 1:], np.zeros((batch_size, 1), np.int32)], axis=1)
    return {"x": x, "y": y}


@dataclass(frozen=True)
class Method:
    """One row kind: a framework's way to compute something.

    ``computes`` is what it returns: ``"grad"`` (the mean-loss gradient),
    ``"per-example grads"`` (the ``B × P`` array), ``"norms"`` (per-example gradient norms)
    or ``"clipped grad"`` (the sum of per-example gradients clipped to ``l2_clip``), or
    ``"noisy grad"`` (a full DP-SGD step's gradient: ``(clipped sum + N(0, σ²C²I)) / B``,
    timed with ``σ = NOISE_MULTIPLIER`` and cross-checked with ``σ = 0`` through the same
    code, its output times ``B`` against the reference clipped sum).
    ``materialises`` says whether it holds a ``B × P`` array (the sweep skips those that
    would not fit). ``package`` is the module that must be importable. ``unsupported`` maps a
    model kind (or ``"transformer-scan"``, see :func:`variant`) to why the method cannot run
    it (the row says so); ``notes`` maps one to how the method runs it where that differs from
    the other models (copied into the row).
    ``"per-layer clipped grad"`` (each parameter leaf ``g`` of every example clipped to its own
    ``C_g``, summed), ``"dots"`` (``⟨∇S_i, v⟩`` for a parameter-shaped ``v``: the batch's mean
    gradient) or ``"gram"`` (the ``B × B`` matrix ``⟨∇S_i, ∇S_j⟩``).
    """

    framework: str
    name: str
    computes: str
    package: str
    materialises: bool
    description: str
    unsupported: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.framework}:{self.name}"

    def why_not(self, spec: ModelSpec) -> str | None:
        """Why this method cannot run ``spec`` (None if it can)."""
        return self.unsupported.get(variant(spec), self.unsupported.get(spec.kind))

    def note(self, spec: ModelSpec) -> str | None:
        """How this method runs ``spec`` where that differs from the other models."""
        return self.notes.get(variant(spec), self.notes.get(spec.kind))


def variant(spec: ModelSpec) -> str:
    """``spec.kind``, or ``"transformer-scan"`` for a transformer whose blocks are scanned."""
    return "transformer-scan" if spec.config.get("scan_layers") else spec.kind


# The DP-step rows time with this noise multiplier (the noise is part of the step's cost);
# their cross-check reruns the same code with 0 and compares ``B ×`` the output with the
# reference clipped sum (noise can only be checked statistically: the privacy tests do that).
NOISE_MULTIPLIER = 1.0

# Frameworks whose rows run on the JAX side (``jax_side``); every other one is PyTorch.
JAX_FRAMEWORKS = frozenset({"jaxgrad", "jax", "jax_privacy", "optax"})

# Which framework's plain gradient each framework is compared with (``ratio_to_own_plain``).
PLAIN_OF = {
    "jaxgrad": ("jaxgrad", "batch_grad"),
    "jax": ("jaxgrad", "batch_grad"),
    "jax_privacy": ("jaxgrad", "batch_grad"),
    "optax": ("jaxgrad", "batch_grad"),
    "pytorch": ("pytorch", "backward"),
    "torch.func": ("pytorch", "backward"),
    "opacus": ("pytorch", "backward"),
    "backpack": ("pytorch", "backward"),
}

_BACKPACK_NO_ATTENTION = (
    "BackPACK's extensions need an nn.Sequential of supported layers; attention "
    "(a product of two activations) and LayerNorm have none"
)

# Opacus cannot hook inside nn.RNN (its fused kernel); its RNN layers are opacus.layers.DPRNN.
_OPACUS_RNN = {"rnn": "opacus.layers.DPRNN (nn.RNN's maths, a Python loop of RNNLinear layers)"}
_OPACUS_GHOST_RNN = {
    "rnn": "opacus.layers.DPRNN; Opacus 1.6 has no ghost-norm sampler for its RNNLinear layers "
    "(used T times each), so they get per-sample gradients (fast gradient clipping, hook "
    "mode); only the output nn.Linear is ghost-clipped"
}

# Per-layer clipping: one C_g per parameter leaf of jaxgrad's params (Opacus: per parameter
# tensor, the same groups); a scanned transformer stacks its blocks' leaves, one leaf per
# kind of block parameter, which Opacus (one tensor per block) cannot group.
_OPACUS_PER_LAYER_SCAN = {
    "transformer-scan": "the groups are jaxgrad's leaves, and a scanned transformer's leaf "
    "stacks L blocks' tensors; Opacus's per_layer clipping takes one norm per parameter tensor "
    "and cannot clip several tensors as one group"
}
_OPACUS_NO_PER_LAYER_GHOST = {
    kind: "Opacus 1.6's ghost clipping is flat only: get_optimizer_class raises ValueError for "
    "clipping='per_layer' with grad_sample_mode='ghost', and "
    "GradSampleModuleFastGradientClipping takes one max_grad_norm"
    for kind in ("mlp", "cnn", "transformer", "rnn")
}
_JAX_PRIVACY_PER_LAYER = (
    "jax_privacy 2.0 has no per-layer option; its way to it: clipping.clipped_grad (vmap) with "
    "pre_clipping_transform clipping each leaf to C_g (clipping.clip_pytree) and "
    "l2_clip_norm = √Σ C_g² (then a no-op; it states the sensitivity)"
)
_TORCH_FUNC_RNN = {
    "rnn": "torch.func.vmap has no batching rule for nn.RNN (a shape error); the "
    "same tanh cell stepped by a Python loop"
}

METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("jaxgrad", "batch_grad", "grad", "jax", False, "jaxgrad.batch_grad"),
        Method(
            "jaxgrad", "per_example_grads", "per-example grads", "jax", True,
            "jaxgrad.per_example_grads (vmap(grad))",
        ),
        Method(
            "jaxgrad", "per_example_norms", "norms", "jax", False,
            "jaxgrad.fast.per_example_norms",
        ),
        Method(
            "jaxgrad", "clipped_grad", "clipped grad", "jax", False,
            "jaxgrad.fast.clipped_grad(reduction='sum', return_norms=True)",
        ),
        Method(
            "jaxgrad", "dp_grad", "noisy grad", "jax", False,
            "jaxgrad.privacy.dp_grad: fast clipped sum + N(0, σ²C²I) once, / B",
        ),
        Method(
            "jax_privacy", "clipped_sum", "clipped grad", "jax_privacy", True,
            "jax_privacy.clipping.clipped_grad (vmap(grad), clip, sum; keep_batch_dim=False)",
        ),
        Method(
            "jax_privacy", "dp_step", "noisy grad", "jax_privacy", False,
            "jax_privacy.clipping.clipped_grad (vmap) + N(0, σ²C²I), / B",
        ),
        Method(
            "optax", "dpsgd", "noisy grad", "optax", True,
            "vmap(grad) + optax.contrib.dpsgd (learning rate 1: the update is -gradient)",
        ),
        Method("pytorch", "backward", "grad", "torch", False, "loss.backward() on the mean loss"),
        Method(
            "torch.func", "vmap_grad", "per-example grads", "torch", True,
            "torch.func.vmap(torch.func.grad(loss)) over functional_call",
            notes=_TORCH_FUNC_RNN,
        ),
        Method(
            "opacus", "hooks_clip", "clipped grad", "opacus", True,
            "GradSampleModule hooks + DPOptimizer.clip_and_accumulate (noise 0)",
            notes=_OPACUS_RNN,
        ),
        Method(
            "opacus", "ghost_clip", "clipped grad", "opacus", False,
            "GradSampleModuleFastGradientClipping(use_ghost_clipping=True): two backward passes",
            notes=_OPACUS_GHOST_RNN,
        ),
        Method(
            "backpack", "BatchGrad", "per-example grads", "backpack", True,
            "backpack.extensions.BatchGrad",
            unsupported={"transformer": _BACKPACK_NO_ATTENTION},
        ),
        Method(
            "backpack", "BatchL2Grad", "norms", "backpack", False,
            "backpack.extensions.BatchL2Grad",
            unsupported={"transformer": _BACKPACK_NO_ATTENTION},
        ),
        Method(
            "opacus", "dp_step", "noisy grad", "opacus", True,
            "PrivacyEngine.make_private (hooks) + DPOptimizer.pre_step: clip, noise, / B",
            notes=_OPACUS_RNN,
        ),
        Method(
            "opacus", "dp_ghost", "noisy grad", "opacus", False,
            "ghost clipping (two backward passes) + DPOptimizerFastGradientClipping.pre_step",
            notes=_OPACUS_GHOST_RNN,
        ),
        # Per-layer clipping: the clipped sum, each group g clipped to its own C_g.
        Method(
            "jaxgrad", "clipped_grad_per_layer", "per-layer clipped grad", "jax", False,
            "jaxgrad.fast.clipped_grad(l2_clip={leaf: C_g}, reduction='sum')",
        ),
        Method(
            "jax_privacy", "per_layer_clip", "per-layer clipped grad", "jax_privacy", True,
            _JAX_PRIVACY_PER_LAYER,
        ),
        Method(
            "opacus", "per_layer_clip", "per-layer clipped grad", "opacus", True,
            "make_private(clipping='per_layer', max_grad_norm=[C_g], hooks) + "
            "DPPerLayerOptimizer.clip_and_accumulate (noise 0)",
            unsupported=_OPACUS_PER_LAYER_SCAN, notes=_OPACUS_RNN,
        ),
        Method(
            "opacus", "per_layer_ghost", "per-layer clipped grad", "opacus", False,
            "ghost clipping per layer", unsupported=_OPACUS_NO_PER_LAYER_GHOST,
        ),
        # Inner products of the per-example gradients with v (the batch's mean gradient), and
        # with each other.
        Method(
            "jaxgrad", "per_example_dots", "dots", "jax", False,
            "jaxgrad.fast.per_example_dots(reference=v)",
        ),
        Method(
            "jax", "vmap_dots", "dots", "jax", True,
            "jax.vmap(jax.grad) then each row dotted with v",
        ),
        Method(
            "torch.func", "vmap_dots", "dots", "torch", True,
            "torch.func.vmap(torch.func.grad) then each row dotted with v",
            notes=_TORCH_FUNC_RNN,
        ),
        Method("jaxgrad", "gradient_gram", "gram", "jax", False, "jaxgrad.fast.gradient_gram"),
        Method("jax", "vmap_gram", "gram", "jax", True, "jax.vmap(jax.grad) then G Gᵀ"),
        Method(
            "torch.func", "vmap_gram", "gram", "torch", True,
            "torch.func.vmap(torch.func.grad) then G Gᵀ", notes=_TORCH_FUNC_RNN,
        ),
    )
}  # fmt: skip


def method_from_key(key: str) -> Method:
    """``"framework:method"`` to its :class:`Method`; raises listing the allowed keys."""
    if key not in METHODS:
        raise ValueError(f"unknown method {key!r}; allowed: {', '.join(METHODS)}")
    return METHODS[key]
