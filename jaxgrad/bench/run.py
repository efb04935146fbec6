"""Runs a suite of (model, batch size, strategy) rows and reports them side by side."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Iterable

import jax
import numpy as np

from jaxgrad._optional import pyplot
from jaxgrad.bench import bandwidth, suite, timing


def _progress(total: int, quiet: bool):
    """A tqdm bar on a terminal (if tqdm is installed), else nothing."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="jaxgrad.bench", unit="row", file=sys.stderr, leave=False)


def machine_description() -> dict:
    """The platform the figures were measured on."""
    device = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "jax": jax.__version__,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "python": platform.python_version(),
    }


MIN_ROUNDS, MAX_ROUNDS = 3, 25  # the interleaved rounds of one (case, batch size)


def run_suite(
    case_names: Iterable[str],
    batch_sizes: Iterable[int],
    strategy_names: Iterable[str],
    *,
    quiet: bool = False,
    min_seconds: float = 0.3,
    log=print,
    mesh=None,
) -> list[dict]:
    """Measures every strategy on every case and batch size; one record per row.

    The strategies of one (case, batch size) are timed together, in interleaved rounds
    (:func:`jaxgrad.bench.timing.interleaved`: every strategy once per round, the order
    rotated), so ``ratio_to_batch_grad`` compares medians taken under the same machine load;
    ``ratio_iqr`` is the interquartile range of the per-round ratios. The rounds go on until
    they took ``min_seconds`` per strategy on average (at least :data:`MIN_ROUNDS`, at most
    :data:`MAX_ROUNDS`). With ``mesh`` (:func:`jaxgrad.sharding.data_mesh`) each batch is
    sharded over its devices and the parameters replicated; Python-loop strategies are left
    out.
    """
    case_names, batch_sizes, strategy_names = (
        list(case_names),
        list(batch_sizes),
        list(strategy_names),
    )
    total = len(case_names) * len(batch_sizes) * len(strategy_names)
    bar = _progress(total, quiet)
    records: list[dict] = []
    started, done = time.perf_counter(), 0
    for case_name in case_names:
        case = suite.CASES[case_name]()
        params = case.model.init(jax.random.key(0))
        num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
        for batch_size in batch_sizes:
            batch = case.make_batch(batch_size)
            mask = jax.numpy.ones((batch_size,), bool)
            args = (params, batch, mask)
            if mesh is not None:
                from jaxgrad import sharding

                batch_s, mask_s = sharding.shard_batch(batch, mask, mesh=mesh)
                args = (sharding.replicate(params, mesh=mesh), batch_s, mask_s)
            fns = {
                name: suite.STRATEGIES[name](case.loss_fn, batch_size) for name in strategy_names
            }
            if mesh is not None:
                fns = {n: f for n, f in fns.items() if not getattr(f, "is_python_loop", False)}
                done += len(strategy_names) - len(fns)
                if not fns:
                    continue

            def progress(name, case_name=case_name, batch_size=batch_size):
                # called before each strategy's first (compiling) call
                nonlocal done
                if bar is not None:
                    bar.set_postfix_str(f"{case_name} B={batch_size} {name}")
                    bar.update()
                elif not quiet:
                    log(
                        f"  [{done + 1}/{total}{_eta(started, done, total)}] "
                        f"{case_name:<12} B={batch_size:<5} {name} ...",
                        file=sys.stderr,
                    )
                done += 1

            t = timing.interleaved(
                fns,
                args=args,
                rounds=MIN_ROUNDS,
                max_rounds=MAX_ROUNDS,
                min_seconds=min_seconds * len(fns),
                on_first_call=progress,
            )
            devices = 1 if mesh is None else int(mesh.devices.size)
            records.extend(
                _group_records(case, case_name, num_params, batch_size, fns, t, args, devices)
            )
    if bar is not None:
        bar.close()
    return records


def _group_records(case, case_name, num_params, batch_size, fns, t, args, devices) -> list[dict]:
    """The rows of one (case, batch size) from its interleaved timings ``t``."""
    group = []
    for name, f in fns.items():
        python_loop = getattr(f, "is_python_loop", False)
        peak = None if python_loop else timing.compiled_peak_bytes(f, *args)
        group.append(
            {
                "model": case.name,
                "case": case_name,
                "num_params": num_params,
                "batch_size": batch_size,
                "strategy": name,
                "examples_per_s": batch_size / t.seconds[name],
                "median_s": t.seconds[name],
                "compile_s": t.compile_s[name],
                "repeats": t.rounds,
                "calls_per_sample": t.calls_per_sample[name],
                "peak_mem_mb": None if peak is None else peak / 2**20,
                "devices": devices,
            }
        )
    bound_s = None
    for r in group:
        r["x_write_bound"] = None
        if r["strategy"] in suite.MATERIALISING:
            if bound_s is None:
                bound_s = bandwidth.write_bandwidth_bound(4 * batch_size * num_params)
            r["x_write_bound"] = r["median_s"] / bound_s
    reference = next((r for r in group if r["strategy"] == "batch_grad"), None)
    for r in group:
        r["ratio_to_batch_grad"] = r["ratio_iqr"] = None
        if reference is not None:
            r["ratio_to_batch_grad"] = r["examples_per_s"] / reference["examples_per_s"]
            q1, _, q3 = t.ratio_quartiles("batch_grad", r["strategy"])
            r["ratio_iqr"] = [q1, q3]
    return group


def _eta(started: float, done: int, total: int) -> str:
    """``, ETA 1m05s`` from the mean time per row so far (nothing before the first row)."""
    if done == 0:
        return ""
    left = (time.perf_counter() - started) / done * (total - done)
    return f", ETA {int(left // 60)}m{int(left % 60):02d}s"


LEGEND = """\
Columns: examples/s = batch size / median seconds per call (after warm-up); x batch_grad =
examples/s over batch_grad's; the strategies of one model and batch size are timed together in
interleaved rounds (each called once per round, the order rotated), so they share the machine's
load (> 1 is faster); IQR = the interquartile range of that ratio over the rounds; compile s =
first-call (trace + XLA compile) seconds; peak MB = XLA's planned peak memory of the compiled
call (n/a for Python loops); x write = for strategies that build the B x P per-example
gradients, their time over that of writing B x P fresh float32s (the memory-bandwidth floor)."""


def _ratio(r: dict) -> str:
    return "" if r["ratio_to_batch_grad"] is None else f"{r['ratio_to_batch_grad']:.3f}"


def _iqr(r: dict) -> str:
    iqr = r.get("ratio_iqr")
    return "" if iqr is None else f"{iqr[0]:.2f}-{iqr[1]:.2f}"


def format_markdown(records: list[dict]) -> str:
    """The same rows as :func:`format_table`, as a markdown table."""
    lines = [
        "| model | B | strategy | examples/s | x batch_grad | IQR "
        "| compile s | peak MB | x write |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in records:
        peak, write = r["peak_mem_mb"], r["x_write_bound"]
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['strategy']} | "
            f"{r['examples_per_s']:.0f} | {_ratio(r)} | {_iqr(r)} | "
            f"{r['compile_s']:.2f} | {'n/a' if peak is None else f'{peak:.1f}'} | "
            f"{'' if write is None else f'{write:.2f}'} |"
        )
    return "\n".join(lines)


def plot_records(records: list[dict], path: str) -> None:
    """A bar chart of examples/s relative to batch_grad, one panel per (model, batch size)."""
    plt = pyplot()

    groups: dict = {}
    for r in records:
        groups.setdefault((r["model"], r["batch_size"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 1.2 + 0.35 * len(records)), squeeze=False)
    for ax, ((model, b), rows) in zip(axes[:, 0], groups.items(), strict=True):
        ratios = [r["ratio_to_batch_grad"] or 0.0 for r in rows]
        ax.barh([r["strategy"] for r in rows], ratios, color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{model}, B={b}", fontsize=9)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("examples/s relative to batch_grad (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(records: list[dict]) -> str:
    """A fixed-width table: one line per row, grouped by model and batch size.

    ``IQR`` is the interquartile range over the interleaved rounds of the per-round ratio to
    ``batch_grad``; ``x write`` is, for strategies that materialise the ``B × P`` per-example
    gradients, their time over that of writing ``B × P`` fresh float32s (the memory-bandwidth
    floor).
    """
    header = (
        f"{'model':<24} {'B':>5} {'strategy':<28} {'examples/s':>11} {'x batch_grad':>12} "
        f"{'IQR':>11} {'compile s':>9} {'peak MB':>9} {'x write':>7}"
    )
    lines = [header, "-" * len(header)]
    previous = None
    for r in records:
        key = (r["model"], r["batch_size"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        peak, write = r["peak_mem_mb"], r["x_write_bound"]
        lines.append(
            f"{r['model']:<24} {r['batch_size']:>5} {r['strategy']:<28} "
            f"{r['examples_per_s']:>11.0f} {_ratio(r):>12} {_iqr(r):>11} "
            f"{r['compile_s']:>9.2f} {'n/a' if peak is None else f'{peak:.1f}':>9} "
            f"{'' if write is None else f'{write:.2f}':>7}"
        )
    return "\n".join(lines)


def format_devices_table(records: list[dict]) -> str:
    """Throughput and the ratio to ``batch_grad`` per device count (``--devices``)."""
    header = (
        f"{'model':<24} {'B':>5} {'devices':>7} {'strategy':<28} {'examples/s':>11} "
        f"{'x batch_grad':>12}"
    )
    lines = [header, "-" * len(header)]
    rows = sorted(records, key=lambda r: (r["model"], r["batch_size"], r.get("devices", 1)))
    previous = None
    for r in rows:
        key = (r["model"], r["batch_size"], r.get("devices", 1))
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        ratio = r["ratio_to_batch_grad"]
        lines.append(
            f"{r['model']:<24} {r['batch_size']:>5} {r.get('devices', 1):>7} "
            f"{r['strategy']:<28} {r['examples_per_s']:>11.0f} "
            f"{'' if ratio is None else f'{ratio:.3f}':>12}"
        )
    return "\n".join(lines)
