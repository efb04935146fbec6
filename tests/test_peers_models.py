"""The peer rows of the RNN (scan), the scanned transformer, the DP rows on every model, and
the per-layer clipping and inner-product rows.

Each row is prepared and run here, in this process (the subprocess harness is covered by
``test_peers.py``), and its outputs go through the harness's own cross-check
(``harness.compare``) against the float64 ``vmap(grad)`` reference of ``jax_side.reference``:
per-example norms, clipped sums (flat and per layer), DP steps rerun with ``σ = 0``, dots and
Gram matrices must all agree to ``harness.RTOL``. A layout, bias or clipping mistake is an
O(1) error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrad.bench.peers import harness, jax_side, layouts, specs, worker

B = 5
NEW_MODELS = ["rnn-tiny", "transformer-scan-tiny"]
DP_METHODS = [k for k, m in specs.METHODS.items() if m.computes == "noisy grad"]
JAX_DP_PEERS = {"jax_privacy:dp_step", "optax:dpsgd"}


def _skip_if_missing(method: specs.Method) -> None:
    missing = harness.package_missing(method.package)
    if missing:
        pytest.skip(missing)
    if method.framework not in specs.JAX_FRAMEWORKS:
        pytest.importorskip("torch", reason="PyTorch not installed: pip install 'jaxgrad[peers]'")


_REFERENCES: dict[str, tuple] = {}


def _reference(name: str):
    """Weights, data, reference outputs and l2_clip (the median norm) for a tiny model."""
    if name not in _REFERENCES:
        spec = specs.MODELS[name]
        flat = jax_side.init_weights(spec, seed=2)
        data = specs.make_data(spec, B, seed=2)
        # Chunks of 2: the reference's chunked passes (and Gram blocks) are exercised.
        ref, l2_clip = jax_side.reference(spec, flat, data, chunk_size=2, l2_clip=None, gram=True)
        _REFERENCES[name] = (spec, flat, data, worker.output_arrays(ref), l2_clip, ref)
    return _REFERENCES[name][:5]


def _run_row(key: str, name: str, tmp_path) -> dict:
    """One row as the worker runs it (step, extract, norms from per-example gradients) and
    the harness's comparison with the reference."""
    method = specs.METHODS[key]
    spec, flat, data, reference, l2_clip = _reference(name)
    if method.framework in specs.JAX_FRAMEWORKS:
        side = jax_side
    else:
        from jaxgrad.bench.peers import torch_side as side
    layer_clips, v = _REFERENCES[name][5]["layer_clips"], _REFERENCES[name][5]["grad"]
    step, extract = side.prepare(
        method.name, spec, flat, data, l2_clip=l2_clip, layer_clips=layer_clips, v=v
    )
    if side is jax_side and method.computes == "noisy grad":
        # The check reruns the step's construction with σ = 0 (no need to compile the noisy
        # one here; test_peers.py checks its noise).
        outputs = extract(None)
    else:
        step()  # a second call must not accumulate into the first (zero_grad, hooks)
        outputs = extract(step())
    if "per_example" in outputs:
        outputs = {
            **worker._derive_from_per_example(outputs.pop("per_example"), l2_clip),
            **outputs,
        }
    path = str(tmp_path / "outputs.npz")
    worker._save_outputs(path, outputs)
    return harness.compare(path, reference)


def _row_cases():
    # Every peer (PyTorch-side) row of the new models, and the DP rows on the CNN and the
    # transformer. jaxgrad's own rows are jaxgrad's strategies, tested against the same kind
    # of reference in its own tests (test_fast_scan.py for the scanned models); the JAX DP
    # peers' code does not depend on the model, so one model (the CNN) keeps the compile
    # time of this file down.
    torch_side = [k for k, m in specs.METHODS.items() if m.framework not in specs.JAX_FRAMEWORKS]
    for name in NEW_MODELS:
        for key in torch_side:
            if not specs.METHODS[key].why_not(specs.MODELS[name]):
                yield key, name
    for name in ("cnn-tiny", "transformer-tiny"):
        for key in DP_METHODS:
            if (key in JAX_DP_PEERS and name != "cnn-tiny") or key == "jaxgrad:dp_grad":
                continue  # jaxgrad's dp_grad: tests/test_privacy.py
            yield key, name
    for key, names in SPREAD.items():
        yield from ((key, name) for name in names)


# The per-layer and inner-product rows beyond the ones above: each JAX-side row on one model
# (its code does not depend on the model, but its layouts do: the stacked leaves of the
# scanned transformer, the RNN's scan), the cheap PyTorch rows on more, and the JAX DP peers
# on the RNN and the transformer. The CLI loop in docs/benchmarks.md runs every method on
# every tiny model.
SPREAD = {
    "jaxgrad:clipped_grad_per_layer": ["transformer-scan-tiny"],
    "jax_privacy:per_layer_clip": ["cnn-tiny"],
    "opacus:per_layer_clip": ["mlp-tiny", "cnn-tiny", "transformer-tiny"],
    "jaxgrad:per_example_dots": ["rnn-tiny"],
    "jaxgrad:gradient_gram": ["transformer-tiny"],
    "jax:vmap_dots": ["mlp-tiny"],
    "jax:vmap_gram": ["mlp-tiny"],
    "torch.func:vmap_dots": ["mlp-tiny", "cnn-tiny", "transformer-tiny"],
    "torch.func:vmap_gram": ["mlp-tiny", "cnn-tiny", "transformer-tiny"],
    "jax_privacy:dp_step": ["rnn-tiny"],
    "optax:dpsgd": ["transformer-tiny"],
}


@pytest.mark.parametrize(("key", "name"), list(_row_cases()), ids=lambda v: v)
def test_row_agrees_with_the_float64_reference(key, name, tmp_path):
    _skip_if_missing(specs.METHODS[key])
    result = _run_row(key, name, tmp_path)
    assert result["agrees_with_reference"] is True, result["errors"]
    want = {
        "grad": {"grad"},
        "per-example grads": {"norms", "clipped"},
        "norms": {"norms"},
        "clipped grad": {"clipped"},
        "noisy grad": {"clipped"},
        "per-layer clipped grad": {"layered"},
        "dots": {"dots"},
        "gram": {"gram"},
    }[specs.METHODS[key].computes]
    assert want <= set(result["errors"]), result


def test_the_cross_check_catches_a_wrong_rnn_bias(tmp_path, monkeypatch):
    # The torch twin with bias_hh_l0 trainable (the double-counted bias nn.RNN has) must fail
    # the norms check: the cross-check can tell.
    pytest.importorskip("torch", reason="PyTorch not installed")
    pytest.importorskip("backpack", reason="BackPACK not installed")
    monkeypatch.setattr(layouts, "frozen_zeros", lambda spec: [])
    monkeypatch.setattr(layouts, "to_torch_state", _state_with_zero_bias_hh)
    result = _run_row("backpack:BatchL2Grad", "rnn-tiny", tmp_path)
    assert result["agrees_with_reference"] is False and result["errors"]["norms"] > 1e-3


_to_torch_state = layouts.to_torch_state


def _state_with_zero_bias_hh(spec, jax_flat):
    state = _to_torch_state(spec, jax_flat)
    return {**state, "0.bias_hh_l0": np.zeros_like(state["0.bias_ih_l0"])}


@pytest.mark.parametrize("layer", ["torch", "opacus", "loop", "backpack"])
def test_every_rnn_twin_computes_jaxgrads_rnn(layer):
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    if layer in ("opacus", "backpack"):
        pytest.importorskip(layer, reason=f"{layer} not installed")
    from jaxgrad.bench.peers import torch_side

    spec, flat, data, _, _ = _reference("rnn-tiny")
    model, _ = jax_side.build(spec)
    params = jax_side.load_params(spec, flat, dtype=jnp.float64)
    want = jax.vmap(model.apply, (None, 0))(params, jnp.asarray(data["x"], jnp.float64))
    net = torch_side.load_model(spec, flat, rnn_layer=layer).double()
    x, _ = torch_side.to_torch_batch(spec, data)
    got = net(x.double()).detach().numpy()
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-10, atol=1e-12)
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen == ["0.bias_hh_l0"] and not torch.any(net[0].bias_hh_l0)


def test_scanned_layout_round_trips_and_matches_the_unrolled_one():
    scanned, unrolled = (
        specs.MODELS["transformer-scan-tiny"],
        specs.transformer_spec(32, 8, 16, 2, 2, name="unrolled"),
    )
    flat = jax_side.init_weights(scanned, seed=4)
    assert flat["blocks.mlp.w1"].shape == (2, 16, 64)
    per_block = {k: v for k, v in flat.items() if not k.startswith("blocks.")}
    for k, v in flat.items():
        if k.startswith("blocks."):
            per_block.update({f"blocks.{i}.{k[7:]}": v[i] for i in range(2)})
    state = layouts.to_torch_state(scanned, flat)
    for k, v in layouts.to_torch_state(unrolled, per_block).items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    # Gradients with a leading batch axis stack back under it: (B, L, ...).
    batched = layouts.to_jax_flat(scanned, {k: np.stack([v, 3 * v]) for k, v in state.items()})
    for k, v in flat.items():
        np.testing.assert_array_equal(batched[k][1], 3 * v, err_msg=k)
    with pytest.raises(ValueError, match="leading layer axis of 2"):
        layouts.to_torch_state(scanned, {**flat, "blocks.ln1.scale": flat["blocks.ln1.scale"][0]})


def test_jax_privacy_clipped_sum_row_agrees_with_the_reference(tmp_path):
    # jax_privacy's own clipped gradient (no noise), checked like every clipped-grad row.
    _skip_if_missing(specs.METHODS["jax_privacy:clipped_sum"])
    result = _run_row("jax_privacy:clipped_sum", "cnn-tiny", tmp_path)
    assert result["agrees_with_reference"] is True and set(result["errors"]) == {"clipped"}
