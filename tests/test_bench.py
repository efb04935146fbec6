"""The built-in benchmark on tiny models: records, ratios, JSON, argument errors."""

import ctypes
import json
import re
import resource
import subprocess
import sys

import pytest

import jaxgrad
from jaxgrad import privacy
from jaxgrad.bench import __main__ as bench_main
from jaxgrad.bench import allocator, run, suite, timing


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
    assert all(r["ratio_iqr"] == [1.0, 1.0] for r in batch_rows)  # its own rounds, interleaved
    for r in records:
        assert r["repeats"] >= run.MIN_ROUNDS and r["ratio_iqr"][0] <= r["ratio_iqr"][1]
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
            noise = privacy.add_noise(zeros, suite.dp_noise_key(), stddev=1.0)
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


class _FakeClock:
    """A clock that only the programs advance: each call costs its stated seconds exactly, a
    program's first call 10 more (its "compilation"), and CPU time runs at twice the wall."""

    def __init__(self, cost):
        self.now, self.cost, self.calls, self.seen = 0.0, cost, [], set()

    def program(self, name):
        def f(r):
            self.calls.append((name, r))
            self.now += self.cost(name, r) + (10.0 if name not in self.seen else 0.0)
            self.seen.add(name)

        return f


def _fake_interleaved(monkeypatch, cost, names=("fast", "slow"), **kwargs):
    clock = _FakeClock(cost)
    monkeypatch.setattr(timing, "_wall_clock", lambda: clock.now)
    monkeypatch.setattr(timing, "_cpu_clock", lambda: 2 * clock.now)
    rounds_seen = []

    def args(name, r):
        rounds_seen.append((name, r))
        return (r,)

    programs = {name: clock.program(name) for name in names}
    return timing.interleaved(programs, args=args, **kwargs), clock, rounds_seen


def test_interleaved_rotates_rounds_and_separates_compile_time(monkeypatch):
    # slow costs 3 s a call, fast 1 s, but fast's round 2 is disturbed (load: 50 s).
    cost = lambda name, r: 3.0 if name == "slow" else (50.0 if r == 2 else 1.0)
    t, clock, rounds_seen = _fake_interleaved(monkeypatch, cost, rounds=4, min_sample_seconds=0.0)
    # first (compiling) call and warm-up call of each, then rounds 0-3, the order rotated
    expected = [("fast", -1), ("slow", -1)] * 2
    expected += [("fast", 0), ("slow", 0), ("slow", 1), ("fast", 1)]
    expected += [("fast", 2), ("slow", 2), ("slow", 3), ("fast", 3)]
    assert clock.calls == expected and rounds_seen == expected  # args() once per call here
    assert t.rounds == 4 and t.calls_per_sample == {"fast": 1, "slow": 1}
    assert t.samples == {"fast": (1.0, 1.0, 50.0, 1.0), "slow": (3.0,) * 4}
    assert t.seconds == {"fast": 1.0, "slow": 3.0}  # the disturbed round does not move it
    assert t.cpu_seconds == {"fast": 2.0, "slow": 6.0}
    assert t.compile_s == {"fast": 10.0, "slow": 10.0}  # first call (11, 13) minus median
    q1, q2, q3 = t.ratio_quartiles("slow", "fast")
    # ratios 3, 3, 0.06, 3 (inclusive quartiles): the disturbed round moves only the first
    assert (q2, q3) == (3.0, 3.0) and q1 == pytest.approx(0.06 + 0.75 * (3.0 - 0.06))
    assert t.ratio_quartiles("slow", "fast") != t.ratio_quartiles("fast", "slow")


def test_interleaved_min_seconds_sample_size_and_errors(monkeypatch):
    cost = lambda name, r: 3.0 if name == "slow" else 1.0
    # 4 s a round: 2 rounds at least, then more until 20 s are spent (5 rounds)
    t, _, _ = _fake_interleaved(
        monkeypatch, cost, rounds=2, min_seconds=20.0, min_sample_seconds=0.0
    )
    assert t.rounds == 5
    t, _, _ = _fake_interleaved(
        monkeypatch, cost, rounds=2, min_seconds=1e9, max_rounds=7, min_sample_seconds=0.0
    )
    assert t.rounds == 7
    # a sample of the 1 s program is 3 calls of it, one args() call for the sample; being
    # under min_sample_seconds, it was warmed up by 3 calls (slow by 1)
    t, clock, rounds_seen = _fake_interleaved(monkeypatch, cost, rounds=2, min_sample_seconds=2.5)
    assert t.calls_per_sample == {"fast": 3, "slow": 1} and t.seconds == {"fast": 1.0, "slow": 3.0}
    assert len(clock.calls) == 2 + (3 + 1) + 2 * (3 + 1)
    assert len(rounds_seen) == 2 + 2 + 2 * 2  # once per first call, warm-up and sample
    with pytest.raises(ValueError, match="rounds must be a positive integer; got 0"):
        timing.interleaved({"f": print}, rounds=0)
    with pytest.raises(ValueError, match="programs must be a non-empty mapping"):
        timing.interleaved({}, rounds=1)
    with pytest.raises(ValueError, match="min_seconds must be a non-negative finite"):
        timing.interleaved({"f": print}, rounds=1, min_seconds=-1.0)
    with pytest.raises(KeyError, match="denominator 'g' is not a timed program"):
        t.ratio_quartiles("fast", "g")


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


class _FakeLibc:
    """Records ``mallopt`` calls instead of changing this process's allocator."""

    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


def test_reuse_freed_memory_sets_one_arena_and_both_thresholds():
    libc = _FakeLibc()
    assert allocator.reuse_freed_memory(limit=12345, libc=libc) is True
    # glibc's M_ARENA_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)
    assert libc.calls == [(-8, 1), (-3, 12345), (-1, 12345)]
    assert allocator.reuse_freed_memory(libc=_FakeLibc(result=0)) is False  # refused
    assert allocator.reuse_freed_memory(libc=object()) is False  # not glibc
    for bad in (0, 1 << 31, 2.0, True):
        with pytest.raises(ValueError, match="`limit`"):
            allocator.reuse_freed_memory(limit=bad, libc=_FakeLibc())


# Allocates, touches and frees a 96 MiB block twice (above glibc's largest dynamic mmap
# threshold, 32 MiB) and prints the page faults of the second time; with "reuse", after
# loading allocator.py alone (no JAX) and applying it.
_FAULTS = """
import ctypes, importlib.util, resource, sys
libc = ctypes.CDLL(None)
if sys.argv[1] == "reuse":
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.reuse_freed_memory()
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 96 << 20
for i in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="glibc's mallopt only")
def test_reuse_freed_memory_stops_page_faults_on_a_reallocated_block():
    def faults(mode):
        cmd = [sys.executable, "-c", _FAULTS, mode, allocator.__file__]
        return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    pages = (96 << 20) // resource.getpagesize()
    assert faults("default") > pages // 2  # mmapped afresh: every page faulted in again
    assert faults("reuse") < pages // 20  # the freed block is handed out again


def test_main_reuse_memory_is_applied_before_anything_runs(monkeypatch, capsys):
    events = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: events.append("reuse") or True)

    def suite_runs(*args, **kwargs):
        events.append("suite")
        raise KeyboardInterrupt  # stop here: the order is what is checked

    monkeypatch.setattr(run, "run_suite", suite_runs)
    argv = ["--models", "mlp-tiny", "--batch-sizes", "4", "--quiet"]
    with pytest.raises(KeyboardInterrupt):
        bench_main.main([*argv, "--reuse-memory"])
    assert events == ["reuse", "suite"]
    # --peers took no --reuse-memory (its own parser refused it): applied here first, then
    # handed to every row's process, where the frameworks allocate (harness.Options).
    from jaxgrad.bench.peers import harness

    def rows_run(rows, *, options, log):
        events.append(("rows", options.reuse_memory))
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_rows", rows_run)
    peers = ["--peers", "--models", "mlp", "--batch-sizes", "4", "--quiet"]
    for flag in ([], ["--reuse-memory"]):
        with pytest.raises(KeyboardInterrupt):
            bench_main.main([*peers, *flag])
    assert events[2:] == [("rows", False), "reuse", ("rows", True)]
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: False)
    for args in (argv, peers):
        with pytest.raises(SystemExit):
            bench_main.main([*args, "--reuse-memory"])
        assert "no mallopt" in capsys.readouterr().err
