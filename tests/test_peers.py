"""The peer comparison (``python -m jaxgrad.bench --peers``): layouts, reporting, a tiny run.

The formatting and "not installed" tests need no PyTorch; the layout tests and the small
end-to-end run are skipped, with the reason shown, when PyTorch (or a peer) is missing.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrad.bench.peers import harness, layouts, report, specs


def _record(**overrides):
    base = {
        "framework": "jaxgrad",
        "method": "clipped_grad",
        "computes": "clipped grad",
        "model": "mlp 64-32-10 tanh",
        "model_name": "mlp-tiny",
        "batch_size": 8,
        "examples_per_s": 12345.6,
        "seconds_per_call": 8 / 12345.6,
        "peak_mem_mb": 300.0,
        "working_mem_mb": 40.0,
        "ratio_to_own_plain": 1.5,
        "ratio_to_jax_batch_grad": 1.5,
        "compile_s": 0.4,
        "agrees_with_reference": True,
        "status": "ok",
    }
    return {**base, **overrides}


# --- no PyTorch needed ---------------------------------------------------------------------


def test_table_lists_every_row_with_its_status():
    records = [
        _record(),
        _record(
            framework="opacus",
            method="ghost_clip",
            examples_per_s=None,
            peak_mem_mb=None,
            ratio_to_own_plain=None,
            agrees_with_reference=None,
            status="not installed: no module 'opacus'",
        ),
        _record(framework="torch.func", method="vmap_grad", agrees_with_reference=False),
    ]
    table = report.format_table(records).splitlines()
    assert table[0].split()[:4] == ["model", "B", "framework", "method"]
    assert len(table) == 2 + len(records)
    assert "12,346" in table[2] and "yes" in table[2]
    assert "not installed: no module 'opacus'" in table[3] and " - " in table[3]
    assert " NO " in table[4]  # a disagreeing row is flagged, not hidden


def test_json_has_the_required_fields(tmp_path):
    path = tmp_path / "peers.json"
    report.write_json(path, [_record(errors={"norms": float("nan")})], meta={"wall_s": 1.0})
    data = json.loads(path.read_text())
    (record,) = data["records"]
    assert set(report.REQUIRED_FIELDS) <= set(record)
    assert record["errors"]["norms"] is None  # NaN is not valid JSON
    with pytest.raises(ValueError, match="lacks"):
        report.write_json(path, [{"framework": "x", "method": "y"}], meta={})


def test_missing_and_unsupported_peers_are_reported_not_dropped(monkeypatch):
    ghost = specs.Method("ghostlib", "magic", "norms", "no_such_module_xyz", False, "absent")
    monkeypatch.setitem(specs.PLAIN_OF, "ghostlib", ("pytorch", "backward"))
    rows = [
        harness.Row(ghost, specs.MODELS["mlp-tiny"], 4),
        harness.Row(specs.METHODS["backpack:BatchGrad"], specs.MODELS["transformer-tiny"], 4),
    ]
    records = harness.run_rows(rows, options=harness.Options(), log=lambda *_: None)
    assert [r["status"].split(":")[0] for r in records] == ["not installed", "unsupported"]
    assert "no_such_module_xyz" in records[0]["status"]
    assert all(r["examples_per_s"] is None for r in records)


def test_sweep_skips_what_would_not_fit():
    from jaxgrad.bench.peers import sweep

    rows = sweep.plan(list(specs.METHODS.values()), batch_sizes=[4096], widths=[2048])
    options = harness.Options(mem_cap_gb=8)
    reason = {
        (r.method.key, r.tags["sweep_axis"]): harness._reason_not_run(r, options) for r in rows
    }
    assert reason[("jaxgrad:per_example_grads", "batch")].startswith("skipped: would exceed 8 GB")
    assert reason[("torch.func:vmap_grad", "width")].startswith("skipped: would exceed 8 GB")
    # The fast path holds no B × P array, so it is never skipped by the estimate.
    assert not (reason[("jaxgrad:clipped_grad", "batch")] or "").startswith("skipped")


def test_layout_round_trip_is_exact_without_torch():
    from jaxgrad.bench.peers import jax_side

    for name in ("mlp-tiny", "cnn-tiny", "transformer-tiny", "rnn-tiny", "transformer-scan-tiny"):
        spec = specs.MODELS[name]
        flat = jax_side.init_weights(spec, seed=1)
        assert sum(v.size for v in flat.values()) == specs.num_params(spec)
        torch_state = layouts.to_torch_state(spec, flat)
        back = layouts.to_jax_flat(spec, torch_state)
        # And with a leading batch axis, as per-example gradients come back.
        batched = layouts.to_jax_flat(
            spec, {k: np.stack([v, 2 * v]) for k, v in torch_state.items()}
        )
        for k, v in flat.items():
            np.testing.assert_array_equal(back[k], v)
            np.testing.assert_array_equal(batched[k][1], 2 * v)


def test_bad_arguments_name_the_allowed_values(capsys):
    from jaxgrad.bench.peers import main

    with pytest.raises(SystemExit):
        main(["--peers", "--models", "resnet"])
    assert "allowed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="allowed"):
        specs.method_from_key("jaxgrad:nope")


@pytest.mark.skipif(any(d.platform == "gpu" for d in jax.devices()), reason="a GPU is present")
def test_device_gpu_without_a_gpu_is_a_clear_error():
    from jaxgrad.bench.peers import main

    with pytest.raises(SystemExit, match="JAX sees no GPU"):
        main(["--peers", "--device", "gpu"])


# --- PyTorch needed ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip(
        "torch", reason="PyTorch not installed: pip install 'jaxgrad[peers]'"
    )


# A non-square image and three channels catch any H/W or flatten-order mix-up.
LAYOUT_SPECS = [
    specs.MODELS["mlp-tiny"],
    specs.cnn_spec((8, 6, 3), (4, 5), name="cnn-odd"),
    specs.MODELS["transformer-tiny"],
    specs.MODELS["rnn-tiny"],
    specs.MODELS["transformer-scan-tiny"],
]


@pytest.mark.parametrize("spec", LAYOUT_SPECS, ids=lambda s: s.name)
def test_torch_twin_matches_jaxgrad_apply_and_per_example_grads(torch, spec):
    from torch.func import functional_call, grad, vmap

    import jaxgrad
    from jaxgrad.bench.peers import jax_side, torch_side

    flat = jax_side.init_weights(spec, seed=3)
    data = specs.make_data(spec, 5, seed=3)
    model, loss_fn = jax_side.build(spec)
    params = jax_side.load_params(spec, flat)

    logits_jax = jax.vmap(model.apply, (None, 0))(params, jnp.asarray(data["x"]))
    # torch.func cannot vmap nn.RNN's fused kernel: the RNN twin is the Python-loop one here
    # (tests/test_peers_models.py checks every RNN twin against jaxgrad's).
    net = torch_side.load_model(spec, flat, rnn_layer="loop")
    x, y = torch_side.to_torch_batch(spec, data)
    logits_torch = net(x).detach().numpy()
    np.testing.assert_allclose(logits_torch, np.asarray(logits_jax), rtol=1e-4, atol=1e-5)

    # Gradients come back through the inverse layout: compare per-example gradients.
    named = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}

    def one(p, xi, yi):
        return torch_side.per_example_loss(spec, functional_call(net, p, (xi[None],)), yi[None])[0][
            0
        ]

    torch_grads = vmap(grad(one), in_dims=(None, 0, 0))(named, x, y)
    back = layouts.to_jax_flat(spec, {k: v.numpy() for k, v in torch_grads.items()})
    want = jaxgrad.per_example_grads(loss_fn)(params, (data["x"], data["y"])).grads
    want = layouts.flatten(want)
    for k, v in want.items():
        np.testing.assert_allclose(back[k], np.asarray(v), rtol=1e-3, atol=1e-5, err_msg=k)


def test_tiny_peer_run_agrees_and_writes_json_and_plot(torch, tmp_path):
    pytest.importorskip("opacus", reason="Opacus not installed: pip install 'jaxgrad[peers]'")
    pytest.importorskip("backpack", reason="BackPACK not installed: pip install 'jaxgrad[peers]'")
    pytest.importorskip("matplotlib", reason="matplotlib not installed")
    from jaxgrad.bench.peers import main

    methods = [
        "jaxgrad:batch_grad",
        "jaxgrad:clipped_grad",
        "pytorch:backward",
        "opacus:ghost_clip",
        "backpack:BatchL2Grad",
    ]
    json_path, png = tmp_path / "peers.json", tmp_path / "peers.png"
    argv = ["--peers", "--models", "mlp-tiny", "--batch-sizes", "4", "--repeats", "1"]
    argv += ["--warmup", "0", "--min-time", "0", "--methods", ",".join(methods)]
    argv += ["--json", str(json_path), "--plot", str(png), "--quiet"]
    assert main(argv) == 0
    records = json.loads(json_path.read_text())["records"]
    assert [f"{r['framework']}:{r['method']}" for r in records] == methods
    for r in records:
        assert r["status"] == "ok", (r["framework"], r["method"], r.get("traceback"))
        assert r["agrees_with_reference"] is True, r["errors"]
        assert r["examples_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["ratio_to_own_plain"] > 0
    assert png.stat().st_size > 10_000


# --- the DP-step rows ----------------------------------------------------------------------

DP_JAX_METHODS = ["jaxgrad:dp_grad", "jax_privacy:dp_step", "optax:dpsgd"]


@pytest.mark.parametrize("key", DP_JAX_METHODS)
def test_dp_rows_time_with_noise_of_the_stated_scale(key):
    # The timed step adds N(0, σ²C²I) / B; its cross-check reruns with σ = 0. Their difference
    # is the noise: per coordinate, std σC/B. With P = 2410 coordinates the sample std is
    # within 10% of it except with probability far below 1e-9 (its relative error ≈ 1/√(2P)).
    method = specs.METHODS[key]
    if harness.package_missing(method.package):
        pytest.skip(harness.package_missing(method.package))
    from jaxgrad.bench.peers import jax_side

    spec, b, clip = specs.MODELS["mlp-tiny"], 4, 0.5
    flat = jax_side.init_weights(spec, seed=0)
    step, extract = jax_side.prepare(
        method.name, spec, flat, specs.make_data(spec, b, seed=0), l2_clip=clip
    )
    noisy = layouts.flatten(step())
    clean = extract(None)["clipped"]  # B × the σ = 0 output
    diff = np.concatenate([np.ravel(np.asarray(noisy[k]) - clean[k] / b) for k in clean])
    assert diff.size == specs.num_params(spec)
    want = specs.NOISE_MULTIPLIER * clip / b
    assert abs(diff.std() / want - 1) < 0.1, (diff.std(), want)
    assert abs(diff.mean()) < 5 * want / np.sqrt(diff.size)


def test_tiny_dp_peer_run_agrees_with_the_reference(torch, tmp_path):
    pytest.importorskip("opacus", reason="Opacus not installed: pip install 'jaxgrad[peers]'")
    pytest.importorskip("jax_privacy", reason="jax-privacy not installed: 'jaxgrad[peers]'")
    from jaxgrad.bench.peers import main

    methods = [*DP_JAX_METHODS, "opacus:dp_step", "opacus:dp_ghost"]
    json_path = tmp_path / "peers.json"
    argv = ["--peers", "--models", "mlp-tiny", "--batch-sizes", "4", "--repeats", "1"]
    argv += ["--warmup", "0", "--min-time", "0", "--methods", ",".join(methods)]
    argv += ["--json", str(json_path), "--quiet"]
    assert main(argv) == 0
    records = json.loads(json_path.read_text())["records"]
    assert [f"{r['framework']}:{r['method']}" for r in records] == methods
    for r in records:
        assert r["status"] == "ok", (r["framework"], r["method"], r.get("traceback"))
        assert r["computes"] == "noisy grad"
        # The σ = 0 rerun, times B, is the reference clipped sum.
        assert r["agrees_with_reference"] is True and set(r["errors"]) == {"clipped"}, r


# --- the per-layer and inner-product rows --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_reference():
    """The float64 reference of the tiny MLP, B = 6 in chunks of 4 (uneven Gram blocks)."""
    from jaxgrad.bench.peers import jax_side, worker

    spec = specs.MODELS["mlp-tiny"]
    flat = jax_side.init_weights(spec, seed=5)
    ref, _ = jax_side.reference(
        spec, flat, specs.make_data(spec, 6, seed=5), chunk_size=4, l2_clip=None, gram=True
    )
    return ref, worker.output_arrays(ref)


def test_reference_inner_products_and_per_layer_clips_are_consistent(tiny_reference):
    # Closed forms within the float64 reference: the Gram diagonal is the squared norms, and
    # with v the mean gradient (one item per example) ⟨g_i, v⟩ = Σ_j K_ij / B.
    ref, _ = tiny_reference
    gram, b = ref["gram"], len(ref["norms"])
    np.testing.assert_allclose(np.diag(gram), ref["norms"] ** 2, rtol=1e-12)
    np.testing.assert_allclose(gram, gram.T, rtol=0, atol=0)
    np.testing.assert_allclose(ref["dots"], gram.sum(1) / b, rtol=1e-12)
    # Each leaf's clipped sum is a sum of B vectors of norm at most C_g; and C_g is a median,
    # so it is strictly inside the leaf's range of per-example norms.
    for k, c in ref["layer_clips"].items():
        assert 0 < c and np.linalg.norm(ref["layered"][k]) <= b * c * (1 + 1e-12)


def test_the_cross_check_catches_a_wrong_layer_dot_or_gram_entry(tiny_reference, tmp_path):
    from jaxgrad.bench.peers import worker

    ref, want = tiny_reference
    path = str(tmp_path / "out.npz")

    def check(outputs):
        worker._save_outputs(path, outputs)
        return harness.compare(path, want)

    exact = check({k: ref[k] for k in ("layered", "dots", "gram")})
    assert exact["agrees_with_reference"] is True
    assert set(exact["errors"]) == {"layered", "dots", "gram"}
    # One small leaf (a bias) 1 % off is caught, though it is a tiny part of the whole vector.
    layered = {**ref["layered"], "1.b": 1.01 * ref["layered"]["1.b"]}
    assert check({"layered": layered})["agrees_with_reference"] is False
    # Flat clipping in place of per-layer clipping is caught.
    assert check({"layered": ref["clipped"]})["agrees_with_reference"] is False
    # One dot, or one Gram entry, off by 1e-3 of its Cauchy–Schwarz bound.
    dots = ref["dots"].copy()
    dots[2] += 1e-3 * ref["norms"][2] * np.sqrt(sum(np.sum(g**2) for g in ref["grad"].values()))
    assert check({"dots": dots})["errors"]["dots"] == pytest.approx(1e-3, rel=1e-6)
    gram = ref["gram"].copy()
    gram[0, 3] += 1e-3 * ref["norms"][0] * ref["norms"][3]
    assert check({"gram": gram})["agrees_with_reference"] is False


def test_per_layer_ghost_clipping_is_unsupported_by_opacus_as_the_row_says():
    # The row says "unsupported"; this checks the reason against the installed Opacus.
    pytest.importorskip("opacus", reason="Opacus not installed: pip install 'jaxgrad[peers]'")
    from opacus.optimizers import get_optimizer_class

    assert get_optimizer_class("per_layer", False, "hooks").__name__ == "DPPerLayerOptimizer"
    with pytest.raises(ValueError, match="Unsupported combination"):
        get_optimizer_class("per_layer", False, "ghost")
    reason = harness._reason_not_run(
        harness.Row(specs.METHODS["opacus:per_layer_ghost"], specs.MODELS["mlp-tiny"], 4),
        harness.Options(),
    )
    assert reason.startswith("unsupported: Opacus 1.6's ghost clipping is flat only")
