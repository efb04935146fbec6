"""The terminal table, the JSON file and the markdown summary of a peer comparison."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path

COLUMNS = (
    # header, record key, format
    ("model", "model_name", "{}"),
    ("B", "batch_size", "{}"),
    ("framework", "framework", "{}"),
    ("method", "method", "{}"),
    ("computes", "computes", "{}"),
    ("ex/s", "examples_per_s", "{:,.0f}"),
    ("peak MB", "peak_mem_mb", "{:,.0f}"),
    ("work MB", "working_mem_mb", "{:,.0f}"),
    ("x own plain", "ratio_to_own_plain", "{:.2f}"),
    ("x jax batch_grad", "ratio_to_jax_batch_grad", "{:.2f}"),
    ("compile s", "compile_s", "{:.2f}"),
    ("agrees", "agrees_with_reference", "{}"),
    ("status", "status", "{}"),
)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return fmt.format(value)


def format_table(records: list[dict], *, max_status: int = 60) -> str:
    """A fixed-width table, one line per record, numbers right-aligned.

    ``x own plain`` and ``x jax batch_grad`` are the cost per example relative to the same
    framework's plain gradient and to jaxgrad's ``batch_grad`` (lower is better; 1.00 is the
    cost of one ordinary gradient). ``work MB`` is the peak resident memory above the
    process's baseline after imports and loading (``peak MB`` is the whole process).
    """
    numeric = {"batch_size", "examples_per_s", "peak_mem_mb", "working_mem_mb"} | {
        key for _, key, fmt in COLUMNS if fmt.startswith("{:.")
    }
    rows = []
    for r in records:
        cells = [_cell(r.get(key), fmt) for _, key, fmt in COLUMNS]
        if len(cells[-1]) > max_status:
            cells[-1] = cells[-1][: max_status - 1] + "…"
        rows.append(cells)
    headers = [h for h, _, _ in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells):
        out = []
        for (_, key, _), cell, width in zip(COLUMNS, cells, widths, strict=True):
            out.append(cell.rjust(width) if key in numeric else cell.ljust(width))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


REQUIRED_FIELDS = (
    "framework",
    "method",
    "model",
    "batch_size",
    "examples_per_s",
    "peak_mem_mb",
    "ratio_to_own_plain",
    "agrees_with_reference",
    "status",
)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str | Path, records: list[dict], *, meta: dict) -> None:
    """``{"meta": {...}, "records": [one object per row]}``; every record has
    :data:`REQUIRED_FIELDS` (None where the row did not run)."""
    for r in records:
        missing = [f for f in REQUIRED_FIELDS if f not in r]
        if missing:
            raise ValueError(f"record {r.get('framework')}:{r.get('method')} lacks {missing}")
    Path(path).write_text(
        json.dumps({"meta": _jsonable(meta), "records": _jsonable(records)}, indent=1) + "\n"
    )


def machine_description() -> dict:
    """CPU model, core count and memory, from lscpu and /proc/meminfo where available."""
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per",
                "Socket(s)", "L2 cache", "L3 cache", "Flags")  # fmt: skip
        info["lscpu"] = {
            k.strip(): v.strip()
            for k, _, v in (line.partition(":") for line in lscpu.splitlines())
            if k.strip().startswith(keep) and k.strip() != "Flags"
        }
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(f.readline().split()[1])
        info["memory_gb"] = round(total_kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def versions_of(records: list[dict]) -> dict:
    """Every framework version any row reported."""
    out: dict[str, str] = {}
    for r in records:
        out.update(r.get("versions") or {})
    return dict(sorted(out.items()))


# jaxgrad's row against the peer row that computes the same thing (the targets:
# ≥ 3× Opacus ghost clipping and ≥ 3× jax_privacy's DP step).
THROUGHPUT_PAIRS = (
    ("jaxgrad:clipped_grad", "opacus:ghost_clip"),
    ("jaxgrad:dp_grad", "jax_privacy:dp_step"),
    ("jaxgrad:dp_grad", "opacus:dp_ghost"),
    ("jaxgrad:clipped_grad_per_layer", "opacus:per_layer_clip"),
    ("jaxgrad:clipped_grad_per_layer", "jax_privacy:per_layer_clip"),
    ("jaxgrad:per_example_dots", "torch.func:vmap_dots"),
    ("jaxgrad:gradient_gram", "torch.func:vmap_gram"),
)


def _throughput_ratio(ours: dict | None, theirs: dict | None) -> float | None:
    """Examples/s of ``ours`` over ``theirs``, where both ran and agreed with the reference."""
    if not (ours and theirs):
        return None
    if not (ours.get("agrees_with_reference") and theirs.get("agrees_with_reference")):
        return None
    if not (ours.get("examples_per_s") and theirs.get("examples_per_s")):
        return None
    return ours["examples_per_s"] / theirs["examples_per_s"]


def headline(records: list[dict]) -> list[str]:
    """One line per (model, batch size): the fast path and the peers, as cost ratios, and
    jaxgrad's throughput over the peer computing the same thing (:data:`THROUGHPUT_PAIRS`)."""
    lines = []
    groups: dict[tuple, dict] = {}
    for r in records:
        groups.setdefault((r["model_name"], r["batch_size"]), {})[
            f"{r['framework']}:{r['method']}"
        ] = r
    for (model, b), rows in groups.items():
        parts = []
        for key in (
            "jaxgrad:clipped_grad",
            "jaxgrad:per_example_norms",
            "jaxgrad:per_example_grads",
            "opacus:ghost_clip",
            "opacus:hooks_clip",
            "torch.func:vmap_grad",
            "backpack:BatchGrad",
            "backpack:BatchL2Grad",
        ):
            r = rows.get(key)
            if r and r.get("ratio_to_own_plain") and r.get("agrees_with_reference"):
                parts.append(f"{key} {r['ratio_to_own_plain']:.2f}x own plain")
        for ours, theirs in THROUGHPUT_PAIRS:
            ratio = _throughput_ratio(rows.get(ours), rows.get(theirs))
            if ratio is not None:
                parts.append(f"{ours}/{theirs} throughput {ratio:.2f}")
        jax_plain, torch_plain = rows.get("jaxgrad:batch_grad"), rows.get("pytorch:backward")
        if (
            jax_plain
            and torch_plain
            and jax_plain.get("examples_per_s")
            and torch_plain.get("examples_per_s")
        ):
            ratio = jax_plain["examples_per_s"] / torch_plain["examples_per_s"]
            parts.append(f"batch_grad/backward throughput {ratio:.2f}")
        if parts:
            lines.append(f"{model} B={b}: " + "; ".join(parts))
    return lines


def _load(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values) if values else "?"


def write_markdown(
    path: str | Path, records: list[dict], *, command: str, meta: dict, plot_name: str | None
) -> None:
    """The committed summary: the exact command, versions, the machine, the table."""
    machine = meta.get("machine", {})
    lines = [
        "# jaxgrad against torch.func, Opacus, BackPACK, jax_privacy and optax",
        "",
        "Produced by",
        "",
        f"    {command}",
        "",
        f"Total wall time: {meta.get('wall_s', 0):.0f} s. Threads per framework: "
        f"{meta.get('threads')} (torch.set_num_threads, OMP/MKL env, XLA_FLAGS, CPU affinity).",
        f"Repeats: median of {meta.get('repeats')} after {meta.get('warmup')} warm-up call(s) "
        "(the first call, which compiles for JAX, is excluded and reported as compile s).",
        "Every row ran in its own process; `peak MB` is that process's peak resident memory, "
        "`work MB` the part above its baseline after imports and loading the model and data "
        "(for JAX it includes XLA compilation).",
        "`x own plain` / `x jax batch_grad`: time per example relative to the same "
        "framework's plain gradient / to jaxgrad's batch_grad (lower is better).",
        "`agrees`: the row's per-example norms, clipped sum (l2_clip = median norm), "
        "per-layer clipped sum (each leaf's C_g = the median of its nonzero per-example norms), "
        "dots with v = the batch's mean gradient, Gram matrix or gradient matched a float64 "
        f"`jax.vmap(jax.grad)` reference to {meta.get('rtol')} relative error (dots and Gram "
        "entries relative to their Cauchy–Schwarz bound, the per-layer sum leaf by leaf).",
        f"Load average (1, 5, 15 min) before: {_load(meta.get('loadavg_before'))}, after: "
        f"{_load(meta.get('loadavg_after'))}; each record's `loadavg_1m` is the load when it "
        "started (the machine may be shared).",
        "",
        "## Versions",
        "",
        *(f"- {k}: {v}" for k, v in meta.get("versions", {}).items()),
        "",
        "## Machine",
        "",
        f"- platform: {machine.get('platform')}",
        f"- memory: {machine.get('memory_gb')} GB",
        *(f"- {k}: {v}" for k, v in machine.get("lscpu", {}).items()),
        "",
        "## Headline",
        "",
        *(f"- {line}" for line in headline(records)),
        "",
        "## Results",
        "",
        "```",
        format_table(records, max_status=200),
        "```",
    ]
    notes = {
        (r["framework"], r["method"], r["model_name"]): r["note"] for r in records if r.get("note")
    }
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {f}:{m} on {model}: {note}" for (f, m, model), note in notes.items()]
    if plot_name:
        lines += ["", f"![throughput and memory against batch size]({plot_name})"]
    Path(path).write_text("\n".join(lines) + "\n")
