"""Data parallelism: every strategy on 1, 2, 4 and 8 devices, and training over 2 processes.

The multi-device checks run in subprocesses (tests/_sharding_worker.py) with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, so the rest of the suite keeps its one
CPU device. One subprocess covers every strategy on every mesh; one pair of processes covers
multi-process training over loopback; one more covers DP-SGD training on meshes.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import private_key, shared

import jaxgrad
from jaxgrad import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_sharding_worker.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[-1][len("RESULT ") :])


def _run_worker(*args: str) -> dict:
    """The worker's result in a fresh process (its own emulated devices)."""
    proc = subprocess.run(
        [sys.executable, WORKER, *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _result(proc.stdout)


@pytest.fixture(scope="module")
def strategies(tmp_path_factory):
    return shared(tmp_path_factory, "strategies", lambda _: _run_worker("strategies"))[0]


def test_every_strategy_equals_one_device_float64(strategies):
    errors = strategies["errors"]
    # 2 cases x 6 strategies x 4 meshes, each against the unsharded float64 result.
    assert len(errors) == 2 * 6 * 4
    bad = {k: v for k, v in errors.items() if not v <= 1e-12}
    assert not bad, bad


def test_sharded_batch_grad_equals_python_loop(strategies):
    loop = strategies["loop_errors"]
    assert len(loop) == 2 * 4
    bad = {k: v for k, v in loop.items() if not v <= 1e-12}
    assert not bad, bad


def test_dp_grad_sharded_equals_one_device_and_noise_is_drawn_once(strategies):
    dp = strategies["dp"]
    # Zero gradients: the result is the noise alone, N(0, (σC)²) from the key, over B_e.
    assert dp["noise_vs_numpy"] <= 1e-12, dp
    for d in (1, 2, 4, 8):
        assert dp[f"grad/{d}"] <= 1e-12, dp
        # Bit for bit the one-device noise: drawn once, not once per device (a sum of D draws
        # from one key would be D times it, from split keys another draw).
        assert dp[f"noise_exact/{d}"], dp


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    return shared(tmp_path_factory, "private", lambda d: _run_worker("private", str(d)))[0]


def test_private_fit_on_meshes_equals_one_device(private_run):
    # 50 examples, expected batch 12, physical batches of 5: padded to 6 on 2 devices and 8
    # on 4 (where a device can hold only padding), in float64. The Poisson draws and the
    # noise come from the same keys on every mesh, so only the order of the clipped sums
    # differs (per device, then across devices): ~1e-16 per step, 10 steps of Adam; 1e-12
    # leaves three orders of magnitude for that round-off and fails for any other change
    # (a different draw, noise drawn per device, a different divisor).
    run = private_run
    for d in ("1", "2", "4"):
        assert run["errors"][d] <= 1e-12, run["errors"]
        # The accounting does not depend on the devices: the same ε after every epoch.
        assert run["epsilons"][d] == run["epsilons"]["ref"] and run["steps"][d] == 10
    assert run["epsilons"]["ref"][0] < run["epsilons"]["ref"][1]


def test_private_fit_on_a_mesh_resumes_bit_for_bit(private_run):
    run = private_run
    assert run["checkpoints_before_resume"] == 1  # interrupted in epoch 2
    assert run["resume_bitwise"] and run["resume_epsilons"] == run["epsilons"]["2"]
    message = run["resume_other_devices"]
    assert message and "on 2 device(s)" in message and "`mesh` with 4" in message, message


def test_private_fit_on_a_mesh_draws_the_noise_once(private_run):
    # A loss with zero gradients and one SGD step of learning rate 1 on 4 devices: the
    # parameters are exactly -σC z / (qN) for the one normal vector z of the step's noise key
    # (the independent reference, computed in the worker). Noise drawn on every device and
    # summed would be 2x it (√4 in std), drawn from per-device keys another vector.
    noise = private_run["noise"]["4"]
    assert noise["error"] <= 1e-12, noise
    # And statistically: the std over 2000 parameters is σC/(qN) within 10% (the sample std
    # has a relative standard error of 1/√4000 = 1.6%: a false alarm is a 6σ event, ~1e-9).
    assert abs(noise["std_ratio"] - 1) < 0.1, noise


def test_private_fit_reads_memory_mapped_data(private_run):
    # The same 2-device run with the data memory-mapped from an uncompressed .npz: bit for bit.
    assert private_run["memmap_private_equal"]


def test_cli_dp_with_devices_equals_one_device(private_run):
    cli = private_run["cli"]
    assert cli["devices"] == [1, 2]
    one, two = cli["params"]
    for k in one:
        assert abs(two[k] - one[k]) <= 1e-12 * abs(one[k]), cli["params"]
    assert cli["privacy"][0] == cli["privacy"][1]
    n = len(jaxgrad.data.load("line").x_train)
    assert cli["privacy"][0]["steps"] == 2 * -(-n // 40)


def test_sharded_batch_with_per_example_keys_is_validated_per_device(strategies):
    assert strategies["keyed_error"] <= 1e-12, strategies["keyed_error"]


def test_fit_loss_key_on_four_devices_equals_one(strategies):
    assert strategies["loss_key_mesh_error"] <= 1e-12, strategies["loss_key_mesh_error"]


def test_per_example_outputs_stay_sharded(strategies):
    for name, (spec, devices) in strategies["sharded_outputs"].items():
        expected = "P()" if devices == 1 else "P('data',)"
        assert spec == expected, name


def test_no_gather_of_the_batch(strategies):
    # The only all-gathers allowed are of one element per device (the first real row's
    # position); the batch has 16 rows, its gradient rows would be 16 x P.
    gathers = strategies["gathers"]
    assert len(gathers) == 6 * 3
    bad = {k: size for k, (size, devices) in gathers.items() if size > devices}
    assert not bad, bad


@pytest.mark.parametrize(
    "case, words",
    [
        ("feature_axis", ["axis 1", "leading"]),
        ("no_axis", ["no axis named 'data'", "('model',)"]),
        ("too_many_devices", ["`num_devices` is 16", "8 devices"]),
        ("process_id", ["`process_id`", "[0, 2)", "got 2"]),
        ("coordinator", ["`coordinator`", "HOST:PORT", "'localhost'"]),
        ("sharded_label", ["label", "[0, 3)", "1 above", "row 5"]),  # of the batch
        ("sharded_label_keyed", ["label", "[0, 3)", "1 above", "row 5"]),
    ],
)
def test_bad_inputs_name_the_argument(strategies, case, words):
    message = strategies["bad"][case]
    assert message is not None, f"{case}: no error raised"
    for word in words:
        assert word in message, message
    if case.startswith("sharded_label"):  # the label's value (7) is private: never echoed
        assert "7" not in message, message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Both processes' results of the worker's ``train`` and their shared directory."""
    return shared(tmp_path_factory, "two_processes", lambda d: _two_processes("train", d))


@pytest.fixture(scope="module")
def two_process_cli_run(tmp_path_factory):
    """Both processes' results of the worker's ``cli`` and their shared directory."""
    return shared(tmp_path_factory, "two_processes_cli", lambda d: _two_processes("cli", d))


def _two_processes(mode, tmp_path):
    """Both processes' results of the worker's ``mode``, run in ``tmp_path``.

    Their output goes to files, not pipes: a process blocked writing into a full pipe that
    nobody reads (this one waits on the other process first) stops answering the collectives,
    and the pair hangs."""
    coordinator = f"127.0.0.1:{_free_port()}"
    logs = [(tmp_path / f"process{i}.out", tmp_path / f"process{i}.err") for i in range(2)]
    procs = []
    try:
        for i, (out, err) in enumerate(logs):
            with open(out, "w") as stdout, open(err, "w") as stderr:
                command = [WORKER, mode, str(i), "2", coordinator, str(tmp_path)]
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-X", "faulthandler", *command],
                        env=_env(),
                        stdout=stdout,
                        stderr=stderr,
                    )
                )
        outs = []
        for p, (out, _) in zip(procs, logs, strict=True):
            try:
                p.wait(timeout=600)
            except subprocess.TimeoutExpired:
                for q in procs:  # faulthandler prints every thread's stack on SIGABRT
                    q.send_signal(signal.SIGABRT)
                    q.wait(timeout=60)
            # The whole message (gloo's, faulthandler's stack), without the list of modules.
            errors = [_tail(e) for _, e in logs]
            assert p.returncode == 0, "\n\n".join(errors)
            outs.append(_result(out.read_text()))
    finally:
        for p in procs:
            p.kill()
    return outs


def _tail(path, size=3000):
    lines = path.read_text().splitlines()
    lines = [x for x in lines if not x.startswith("Extension modules")]
    return f"{path.name}:\n" + "\n".join(lines)[-size:]


def test_two_processes_train_like_one(two_process_run):
    outs, tmp_path = two_process_run
    for out in outs:
        assert out["process_count"] == 2 and out["devices"] == 4
        assert out["resume_bitwise"], "resumed 2-process run differs from the uninterrupted one"
        assert "multiple of the process count" in out["odd_mesh"]
    assert outs[0]["loss"] == outs[1]["loss"]
    # A closed-over array no process holds whole: fingerprinted (not "unknown"), alike.
    spread = {out["spread_fingerprint"] for out in outs}
    assert len(spread) == 1 and "unknown" not in spread, spread

    from _sharding_worker import private_training_problem, training_problem

    loss_fn, params, data, kw = training_problem()
    # Each process read exactly its own devices' rows of every batch (the data set was never
    # materialised whole: the worker's RowCounter refuses it). Reference: the documented
    # epoch order, each batch of 25 padded to 28 rows (4 devices) by repeating its first
    # index, process p holding rows 14p .. 14p + 13 of every batch.
    n = len(data[0])
    for p, out in enumerate(outs):
        want = []
        for epoch in range(kw["epochs"]):
            idx, _ = jaxgrad.data.epoch_indices(kw["key"], epoch, n, kw["batch_size"])
            idx = np.asarray(idx)
            idx = np.concatenate([idx, np.repeat(idx[:, :1], 3, axis=1)], axis=1)
            want.extend(idx[:, 14 * p : 14 * p + 14].ravel().tolist())
        assert out["reads"] == [sorted(want)] * 2, f"process {p} read other rows"

    # The same run on this process's single device.
    ref = jaxgrad.train.fit(loss_fn, params, data, **kw)
    got = np.load(tmp_path / "params.npz")
    ref_leaves = jax.tree_util.tree_leaves(ref.params)
    assert len(got.files) == len(ref_leaves)
    # float32 round-off: the gradient sums are associated differently (per device, then
    # across devices), so each step's gradient differs by a few ulps (float32 eps = 1.2e-7);
    # 12 SGD steps of lr 0.1 barely amplify that (measured: at most 1.9e-7 of the largest
    # parameter of each leaf). The tolerance is 2e-6 of it, about 16 ulps.
    for i, r in enumerate(ref_leaves):
        r = np.asarray(r)
        np.testing.assert_allclose(got[f"arr_{i}"], r, rtol=0, atol=2e-6 * np.max(np.abs(r)))
    assert abs(outs[0]["loss"] - ref.history[-1]["loss"]) <= 2e-6 * abs(ref.history[-1]["loss"])

    # DP-SGD over the 2 processes: the same Poisson draws (one per step, from the step's key,
    # not one per process), each process reading only its half of every physical batch.
    # The workers run in float32 (no x64; the Bernoulli draws depend on it): so does the
    # reference here.
    dp_loss, dp_params, dp_data, dp_kw = private_training_problem()
    q, p_size = dp_kw["batch_size"] / n, dp_kw["privacy"].physical_batch_size
    drawn = set()
    with jax.enable_x64(False):
        for t in range(dp_kw["epochs"] * -(-n // dp_kw["batch_size"])):
            sample_key, _ = jax.random.split(jax.random.fold_in(dp_kw["key"], t))
            sample = jaxgrad.privacy.poisson_sample(
                sample_key, num_examples=n, sampling_rate=q, physical_batch_size=p_size
            )
            drawn |= set(np.flatnonzero(np.asarray(sample.mask)).tolist())
        dp_ref = jaxgrad.train.fit(dp_loss, dp_params, dp_data, **dp_kw)
    reads = [out["dp_reads"] for out in outs]
    for leaf in range(2):
        both = set(reads[0][leaf]) | set(reads[1][leaf])
        assert drawn <= both <= drawn | {0}  # index 0: the filler of a partial physical batch
        # 10 rows per physical batch, padded to 12: 6 for each process's 2 devices.
        assert len(reads[0][leaf]) == len(reads[1][leaf])
        assert len(set(reads[0][leaf])) < len(drawn) and len(set(reads[1][leaf])) < len(drawn)
    assert outs[0]["dp_epsilon"] == outs[1]["dp_epsilon"]
    assert outs[0]["dp_epsilon"] == [r["epsilon"] for r in dp_ref.history]
    got = np.load(tmp_path / "dp_params.npz")
    # float32 round-off, as above: the clipped sums are associated per device, then across
    # devices; the sample and the noise are identical (drawn from the same keys), so only
    # those few-ulp differences of each step's sum remain (measured: at most 9.2e-8 of the
    # largest parameter of each leaf after 12 steps); the tolerance is 2e-6 of it.
    for i, r in enumerate(jax.tree_util.tree_leaves(dp_ref.params)):
        r = np.asarray(r)
        np.testing.assert_allclose(
            got[f"arr_{i}"], r, rtol=0, atol=2e-6 * np.max(np.abs(r)), err_msg=f"leaf {i}"
        )


# fit on a 2 x 2 ("data", "model") mesh spanning both processes, parameters sharded over
# both axes (tests/_sharding_worker.py `sharded_checkpoints`; sorted by name).
SHARDED_SPECS = ["P('model',)", "P('data', None)", "P('model', None)", "P(None, 'model')"]


def test_two_processes_resume_sharded_state_bit_for_bit(two_process_run):
    outs, _ = two_process_run
    for out in outs:
        run = out["sharded"]
        # No process holds any parameter whole, so each wrote its own pieces with orbax.
        assert run["whole_here"] == [False] * 4, run
        assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(run["state_files"]), run
        # Interrupted in epoch 2 (after epoch 1's checkpoint, step 2), resumed: the same state
        # (parameters, Adam's moments, step), bit for bit in every piece, and still sharded.
        assert run["before_resume"] == ["ckpt-0000000002.orbax"], run
        assert run["bitwise"], run
        assert run["specs"] == SHARDED_SPECS, run


def test_two_processes_fall_back_from_a_corrupt_sharded_checkpoint(two_process_run):
    outs, _ = two_process_run
    for out in outs:
        run = out["sharded"]
        assert run["after_resume"] == ["ckpt-0000000002.orbax", "ckpt-0000000004.orbax"], run
        # The newest lost its array chunks: both processes name it in a warning and restore
        # epoch 1's (step 2).
        assert run["fallback"] == ["ckpt-0000000002.orbax", 1, 2], run
        assert len(run["warnings"]) == 1 and "ckpt-0000000004.orbax" in run["warnings"][0], run


def test_two_processes_with_sharded_parameters_train_like_one_device(two_process_run):
    import optax
    from _sharding_worker import _token_problem

    _, tmp_path = two_process_run
    got = np.load(tmp_path / "sharded_params.npz")
    # The same fit on this process's one device, in float32 as in the workers.
    with jax.enable_x64(False):
        loss, params, batch, _ = _token_problem(vocab=64, width=16, dtype="float32")
        kw = dict(optimizer=optax.adam(0.05), key=jax.random.key(5), epochs=2, batch_size=8)
        ref = jaxgrad.train.fit(loss, params, tuple(map(np.asarray, batch)), **kw, quiet=True)
    assert sorted(got.files) == sorted(ref.params)
    # float32 round-off: the gradient sums are associated differently (per device, over the
    # model axis, then across processes); 4 Adam steps of lr 0.05 (measured: at most
    # 1.3e-7 of the largest parameter of each leaf, which the 4 steps move by 5-34%).
    # Tolerance: 2e-6 of it, about 16 ulps.
    for k, r in ref.params.items():
        r = np.asarray(r)
        np.testing.assert_allclose(got[k], r, rtol=0, atol=2e-6 * np.max(np.abs(r)), err_msg=k)


def test_cli_on_two_processes_reads_its_rows_and_trains_like_one(two_process_cli_run, tmp_path):
    outs, directory = two_process_cli_run
    from _sharding_worker import CLI_ARGS, cli_problem

    from jaxgrad.train.__main__ import main

    arrays = cli_problem()
    # Each process read, of the memory-mapped training inputs, exactly its block of the
    # statistics pass (rows 75p .. 75p + 74 of 150) and its devices' rows of every batch
    # (batches of 25 padded to 28 by repeating the first index; process p holds rows
    # 14p .. 14p + 13), from the documented epoch order; nothing else, never the whole set.
    n, key = 150, jax.random.split(jax.random.key(0))[1]  # the CLI's shuffle key, seed 0
    for p, out in enumerate(outs):
        want = list(range(75 * p, 75 * p + 75))
        for epoch in range(2):
            idx = np.asarray(jaxgrad.data.epoch_indices(key, epoch, n, 25)[0])
            idx = np.concatenate([idx, np.repeat(idx[:, :1], 3, axis=1)], axis=1)
            want.extend(idx[:, 14 * p : 14 * p + 14].ravel().tolist())
        assert out["cli_reads"] == [sorted(want)], f"process {p} read other rows"
        code, message = out["cli_compressed"]
        assert code == 2 and "compressed" in message and "np.savez" in message, message
        # The combined statistics: numpy's over the whole training split, float64 (the
        # combination is exact but for a few roundings of numbers of order 1).
        x, y = arrays["x_train"], arrays["y_train"]
        ref = [x.mean(), x.std(), y.astype(np.float32).mean(), y.astype(np.float32).std()]
        got = out["cli_stats"]
        np.testing.assert_allclose(got[:2], ref[:2], rtol=1e-12)
        # The targets are standardised as in one process: in float32 (data.arrays._targets).
        np.testing.assert_allclose(got[2:], ref[2:], rtol=1e-6)

    # The same command in this process on one device, with today's whole loading.
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    assert main([*CLI_ARGS, "--data-path", str(path), "--json", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((directory / "cli2.json").read_text())
    assert (one["devices"], two["devices"], two["processes"]) == (1, 4, 2)
    # float32 round-off: the gradient sums are associated per device, then across devices,
    # and the standardised inputs may differ in their last bit (statistics equal to float64
    # round-off, then each row rounded to float32); 12 SGD steps of lr 0.1 barely amplify
    # a few ulps. Tolerance: 2e-6 of the larger parameter, about 16 float32 ulps.
    scale = max(abs(v) for v in one["params"].values())
    for k, v in one["params"].items():
        assert abs(two["params"][k] - v) <= 2e-6 * scale, (one["params"], two["params"])
    assert two["final"]["test_loss"] == pytest.approx(one["final"]["test_loss"], rel=1e-5)
    assert "train_loss" not in two["final"]  # the mapped training split is not evaluated whole


def test_combined_statistics_equal_numpy_over_the_whole_split(tmp_path):
    # Blocks of uneven sizes (one empty), a large mean against the spread (where
    # Σx²/n − mean² would lose digits): the combination equals numpy's float64 statistics.
    rng = np.random.default_rng(1)
    x = rng.normal(1e4, 0.5, (101, 3))
    cuts = [0, 7, 7, 50, 101]
    parts = [
        (b - a, x[a:b].mean(0), ((x[a:b] - x[a:b].mean(0)) ** 2).sum(0))
        for a, b in itertools.pairwise(cuts)
        if b > a
    ]
    count, mean, m2 = jaxgrad.data.combine_moments([(0, np.zeros(3), np.zeros(3)), *parts])
    assert count == 101
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(m2 / count), x.std(0), rtol=1e-12)
    # Read in chunks through the row view (one process here), per feature and pooled.
    rows = np.random.default_rng(2).permutation(101)[:80]
    view = jaxgrad.data.StandardizedRows(x, rows=rows, dtype=np.float64)
    for pooled, axis in ((False, 0), (True, None)):
        mean, std, bad = jaxgrad.data.split_statistics(view, pooled=pooled, chunk_rows=9)
        np.testing.assert_allclose(mean, x[rows].mean(axis), rtol=1e-12)
        np.testing.assert_allclose(std, x[rows].std(axis), rtol=1e-12)
        assert bad == 0


def test_load_rows_matches_load(tmp_path):
    # One process: the row-by-row data set equals the in-memory one (same split, targets,
    # standardisation); float32 rows may differ in their last bit (statistics equal to
    # float64 round-off). Compressed inputs are refused by name.
    rng = np.random.default_rng(0)
    x, y = rng.normal(3, 2, (103, 5)), rng.integers(0, 4, 103)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ref = jaxgrad.data.load("npz", path=tmp_path / "a.npz", seed=1)
    got = jaxgrad.data.load_rows("npz", tmp_path / "a.npz", seed=1)
    assert isinstance(got.x_train, jaxgrad.data.StandardizedRows)
    assert (got.task, got.num_classes, got.x_train.shape) == (ref.task, 4, ref.x_train.shape)
    np.testing.assert_array_equal(got.y_train, ref.y_train)
    np.testing.assert_array_equal(got.y_test, ref.y_test)
    np.testing.assert_allclose(got.x_mean, ref.x_mean, rtol=1e-12)
    np.testing.assert_allclose(got.x_scale, ref.x_scale, rtol=1e-12)
    for a, b in ((np.asarray(got.x_train), ref.x_train), (got.x_test, ref.x_test)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-7 * np.max(np.abs(b)))
    np.testing.assert_array_equal(got.x_train[[5, 0]], np.asarray(got.x_train)[[5, 0]])
    np.savez_compressed(tmp_path / "c.npz", x=x, y=y)
    with pytest.raises(jaxgrad.data.NotMappableError, match=r"np\.savez"):
        jaxgrad.data.load_rows("npz", tmp_path / "c.npz")
    x[4, 2] = np.nan
    np.savez(tmp_path / "n.npz", x=x, y=y)
    with pytest.raises(ValueError, match="non-finite"):
        jaxgrad.data.load_rows("npz", tmp_path / "n.npz", seed=1)


def test_one_device_helpers_match_plain_strategy():
    # In this process (one CPU device): shard_batch pads to a multiple of 1 (nothing) and
    # the result equals the unsharded call; a mask of the wrong shape is rejected by name.
    mesh = sharding.data_mesh()
    loss = lambda w, ex: (w * ex[0] - ex[1]) ** 2
    batch = (np.arange(5.0), np.ones(5))
    sb, sm = sharding.shard_batch(batch, mesh=mesh)
    got = jaxgrad.batch_grad(loss)(sharding.replicate(2.0, mesh=mesh), sb, sm).grads
    # closed form: mean(2 x (2 x - 1)) over x = 0..4
    x = np.arange(5.0)
    assert float(got) == pytest.approx(np.mean(2 * x * (2 * x - 1)), rel=1e-6)
    with pytest.raises(ValueError, match="`mask` must have shape"):
        sharding.shard_batch(batch, np.ones(4, bool), mesh=mesh)
    with pytest.raises(TypeError, match=r"`mesh` must be a jax\.sharding\.Mesh"):
        sharding.shard_batch(batch, mesh="data")
    with pytest.raises(ValueError, match="`num_devices` must be a positive integer"):
        sharding.data_mesh(0)


def test_outputs_are_matched_to_parameters_by_place_not_only_by_shape():
    # On a jax.make_mesh mesh (Explicit axes; one device here) outputs are resharded back by
    # their place in the result: the per-example gradient of a bias b (8,) has the shape
    # (B, 8) of a weight v, and is still sharded by example, while gradients keep their
    # parameter's spec; per-example norms (B,) are sharded by example although c is (B,).
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",))
    size = 16
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    params = {
        "w": put(np.full((3, size), 0.1), P(None, "data")),
        "v": put(np.full((size, 8), 0.1), P()),
        "b": put(np.zeros(8), P()),
        "c": put(np.full(size, 0.1), P()),  # (B,): shaped like the per-example norms
    }
    batch = put(np.ones((size, 3)), P("data"))
    loss = lambda p, x: jnp.sum(jnp.tanh(jnp.tanh(x @ p["w"] + p["c"]) @ p["v"] + p["b"]))
    spec = lambda tree: {k: tuple(jax.typeof(x).sharding.spec) for k, x in tree.items()}
    per_example = spec(jaxgrad.per_example_grads(loss)(params, batch).grads)
    assert per_example == {
        "w": ("data", None, None),
        "v": ("data", None, None),
        "b": ("data", None),
        "c": ("data", None),
    }
    mean = spec(jaxgrad.batch_grad(loss)(params, batch).grads)
    assert mean == {"w": (None, "data"), "v": (None, None), "b": (None,), "c": (None,)}
    norms = jaxgrad.per_example_norms(loss)(params, batch)
    assert tuple(jax.typeof(norms).sharding.spec) == ("data",)


def test_interleaved_microbatches_hold_rows_k_mod_k():
    # Reference: numpy strided slices of the padded batch (padding repeats row 0, masked).
    x = np.arange(10.0)
    micro, micro_mask = jaxgrad.reduce.split_microbatches(
        {"x": jax.numpy.asarray(x)}, jax.numpy.ones(10, bool), 3, interleave=True
    )
    padded = np.concatenate([x, [x[0], x[0]]])
    real = np.arange(12) < 10
    for k in range(3):
        np.testing.assert_array_equal(micro["x"][k], padded[k::3])
        np.testing.assert_array_equal(micro_mask[k], real[k::3])


def test_devices_table_groups_by_device_count():
    from jaxgrad.bench import run

    rows = [
        {
            "model": "m",
            "batch_size": 8,
            "devices": d,
            "strategy": s,
            "examples_per_s": v,
            "ratio_to_batch_grad": r,
        }
        for d, s, v, r in [
            (2, "batch_grad", 10.0, 1.0),
            (1, "batch_grad", 20.0, 1.0),
            (2, "clipped_grad", 5.0, 0.5),
        ]
    ]
    lines = run.format_devices_table(rows).splitlines()
    assert [line.split()[2] for line in lines[2:] if line] == ["1", "2", "2"]
    assert lines[-1].split()[-1] == "0.500"


def test_take_rows_gathers_by_index_in_native_byte_order():
    # One process, one device: the whole batch is this process's; reference: numpy indexing.
    mesh = sharding.data_mesh()
    x = np.arange(24, dtype=">f4").reshape(6, 4)  # big-endian, as an IDX file stores it
    y = np.arange(6) * 10
    idx = np.array([[5, 0, 5], [2, 2, 1]])
    (bx, by), m = sharding.take_rows((x, y), idx, mesh=mesh)
    assert bx.shape == (2, 3, 4) and bx.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(bx), x[idx].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(by), y[idx])
    assert np.asarray(m).all()
    seen = []
    sharding.take_rows((x, y), idx[0], idx[0] != 0, mesh=mesh, check=lambda r, k: seen.append(k))
    np.testing.assert_array_equal(seen[0], [True, False, True])
    with pytest.raises(ValueError, match="`mask` must have the shape of `indices`"):
        sharding.take_rows(x, idx, np.ones(3, bool), mesh=mesh)
    with pytest.raises(ValueError, match="`indices` must be an integer array"):
        sharding.take_rows(x, np.array([0.5]), mesh=mesh)
    for bad in ([0, 6], [-1, 0]):  # past the end, and a negative index (numpy would wrap it)
        with pytest.raises(ValueError, match=r"`indices` must lie in \[0, 6\)"):
            sharding.take_rows((x, y), np.array(bad), mesh=mesh)


def test_memory_mapped_data_is_validated_row_by_row(tmp_path):
    # A bad label in a memory-mapped set is found as the rows are gathered (the set is not
    # read whole up front), with the same message as for in-memory data, which counts the
    # bad labels and never shows their value.
    import optax

    x = np.random.default_rng(0).standard_normal((20, 3))
    y = np.arange(20) % 3
    y[13] = 90210
    np.savez(tmp_path / "d.npz", x=x, y=y)
    mapped = tuple(jaxgrad.data.memmap(tmp_path / "d.npz", key=k) for k in ("x", "y"))
    model = jaxgrad.models.mlp([3, 3])
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    kw = dict(optimizer=optax.sgd(0.1), epochs=1, batch_size=20, key=private_key(0))
    mesh = sharding.data_mesh()
    with pytest.raises(ValueError, match="labels") as in_memory:
        jaxgrad.train.fit(loss_fn, model.init(jax.random.key(1)), (x, y), mesh=mesh, **kw)
    for privacy in (None, jaxgrad.train.PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0)):
        with pytest.raises(ValueError, match="labels") as lazy:
            jaxgrad.train.fit(
                loss_fn, model.init(jax.random.key(1)), mapped, mesh=mesh, privacy=privacy, **kw
            )
        for message in (str(lazy.value), str(in_memory.value)):
            assert "[0, 3)" in message and "1 above" in message, message
            assert "row 13" in message, message  # of the data set, not of the gathered rows
            assert "90210" not in message, message


def _write_idx(path, array):
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    path.write_bytes(header + array.tobytes())


def test_load_rows_reads_idx_like_load_idx(tmp_path):
    # uint8 pixels scaled by 1/255 and standardised with one pooled mean and scale, a seeded
    # split (no test files): the same data set as load_idx, up to float32's last bit.
    import gzip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 4, 4), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", (np.arange(40) % 10).astype(np.uint8))
    ref = jaxgrad.data.load("idx", path=tmp_path, seed=2)
    got = jaxgrad.data.load_rows("idx", tmp_path, seed=2)
    assert got.x_train.shape == ref.x_train.shape == (32, 4, 4) and got.num_classes == 10
    np.testing.assert_allclose(got.x_mean, ref.x_mean, rtol=1e-12)
    np.testing.assert_allclose(got.x_scale, ref.x_scale, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(got.x_train), ref.x_train, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.x_test, ref.x_test, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got.y_train, ref.y_train)
    path = tmp_path / "train-images-idx3-ubyte"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    with pytest.raises(jaxgrad.data.NotMappableError, match="gunzip"):
        jaxgrad.data.load_rows("idx", tmp_path)
