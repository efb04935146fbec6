"""The built-in benchmark on tiny models: records, ratios, JSON, argument errors."""

import json
import re

import pytest

import jaxgrad
from jaxgrad import privacy
from jaxgrad.bench import __main__ as bench_main
from jaxgrad.bench import run, suite, timing


def test_run_suite_records_every_row_with_ratio_to_batch_grad():
    strategies = ["batch_grad", "per_example_grads", "accumulate_grad(4 micro)", "python_loop"]
    records = run.run_suite(["mlp-tiny"], [8, 12], strategies, quiet=True, min_seconds=0.0)
    assert [(r["batch_size"], r["strategy"]) for r in records] == [
        (b, s) for b in (8, 12) for s in strategies
    ]
    for r in records:
        assert r["examples_per_s"] == pytest.approx(r["batch_size"] / r["median_s"])
        assert r["examples_per_s"] > 0 and r["compile_s"] >= 0
    batch_rows = [r for r in records if r["strategy"] == "batch_grad"]
    assert all(r["ratio_to_batch_grad"] == 1.0 for r in batch_rows)
    per_example = next(r for r in records if r["strategy"] == "per_example_grads")
    batch = next(r for r in records if r["strategy"] == "batch_grad")
    # The per-example program holds B x P gradients; batch_grad holds one P.
    assert per_example["peak_mem_mb"] > batch["peak_mem_mb"]
    assert next(r for r in records if r["strategy"] == "python_loop")["peak_mem_mb"] is None
    assert "mlp 64-32-10 tanh" in run.format_table(records)


def test_every_strategy_computes_what_it_says():
    import jax
    import jax.numpy as jnp
    import numpy as np

    case = suite.CASES["cnn-tiny"]()
    params = case.model.init(jax.random.key(0))
    batch = case.make_batch(6)
    per_example = suite.plain_vmap_grad(case.loss_fn)(params, batch)
    flat = np.concatenate([np.reshape(g, (6, -1)) for g in jax.tree.leaves(per_example)], 1)
    norms = np.linalg.norm(flat, axis=1)
    scale = np.minimum(1.0, 1.0 / norms)  # the benchmark clips at l2_clip = 1
    expected = {
        "mean": jax.tree.map(lambda g: g.mean(0), per_example),
        "clipped": jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1) / 6, per_example),
    }
    v = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])  # the reference: params
    for name, factory in suite.STRATEGIES.items():
        out = factory(case.loss_fn, 6)(params, batch)
        if isinstance(out, jaxgrad.GradResult):
            out = out.grads
        if name == "per_example_norms":
            np.testing.assert_allclose(out, norms, rtol=2e-4)
            continue
        if name in ("per_example_dots", "vmap(grad)+dot"):
            np.testing.assert_allclose(out, flat @ v, rtol=2e-4, atol=1e-5, err_msg=name)
            continue
        if name in ("gradient_gram", "vmap(grad)+gram"):
            np.testing.assert_allclose(out, flat @ flat.T, rtol=2e-4, atol=1e-5, err_msg=name)
            continue
        if name.startswith(("per_example_grads", "jax.vmap")):
            out = jax.tree.map(lambda g: g.mean(0), out)
        reference = expected["clipped" if "clip" in name else "mean"]
        if name.startswith("dp_grad"):  # + the noise N(0, (σC)² I) / B, σ = C = 1, drawn once
            zeros = jax.tree.map(jnp.zeros_like, params)
            noise = privacy.add_noise(zeros, jax.random.key(suite.DP_KEY), stddev=1.0)
            reference = jax.tree.map(lambda r, z: r + z / 6, reference, noise)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=name)


def test_main_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--models", "mlp-tiny", "--batch-sizes", "4", "--strategies", "batch_grad,python_loop"]
    assert bench_main.main([*argv, "--min-seconds", "0", "--quiet", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert {"model", "batch_size", "strategy", "examples_per_s", "ratio_to_batch_grad"} <= set(
        data["records"][0]
    )
    assert data["machine"]["cpu_count"] >= 1
    assert "examples/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "resnet"], "allowed: mlp"),
        (["--strategies", "magic"], "allowed: batch_grad"),
        (["--batch-sizes", "0"], "positive integers"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_main.main(argv)
    assert message in capsys.readouterr().err


def test_measure_reports_median_and_compile_time():
    calls = []
    m = timing.measure(lambda: calls.append(1), min_repeats=4, max_repeats=4, min_seconds=0)
    assert m.repeats == 4 and len(calls) == 5 and m.seconds >= 0


def test_main_legend_progress_markdown_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    md, png = tmp_path / "bench.md", tmp_path / "bench.png"
    argv = ["--models", "mlp-tiny", "--batch-sizes", "4", "--strategies", "batch_grad,python_loop"]
    assert (
        bench_main.main([*argv, "--min-seconds", "0", "--markdown", str(md), "--plot", str(png)])
        == 0
    )
    captured = capsys.readouterr()
    assert "Columns: examples/s = batch size / median seconds" in captured.out
    # a progress count on stderr (not a terminal): [1/2] then [2/2, ETA ...]
    assert "[1/2]" in captured.err and re.search(r"\[2/2, ETA \d+m\d\ds\]", captured.err)
    rows = md.read_text().splitlines()
    assert rows[0].startswith("| model | B | strategy") and len(rows) == 4
    assert "| batch_grad |" in rows[2] and "| 1.000 |" in rows[2]  # its own ratio
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as info:
        bench_main.main([*argv, "--json", str(tmp_path / "missing" / "x.json")])
    assert info.value.code == 2 and "--json" in capsys.readouterr().err
