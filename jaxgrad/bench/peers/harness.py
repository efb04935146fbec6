"""Runs every row in its own subprocess, under time and memory caps, and cross-checks it.

For each model the weights are made once (jaxgrad's ``init`` with a seed) and saved to an
``.npz``; for each model the data is made once at the largest batch size and every row reads
its first ``B`` examples, so both frameworks see identical arrays. For each (model, batch
size) a float64 reference (plain ``jax.vmap(jax.grad)``, chunked) fixes ``l2_clip`` at the
median per-example norm and gives the norms, clipped sum and mean gradient that every row's
outputs are compared with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxgrad.bench.peers import specs
from jaxgrad.bench.peers.specs import Method, ModelSpec

WORKER = Path(__file__).resolve().parent / "worker.py"

# Relative error allowed between a float32 row and the float64 reference: float32 rounding
# through a few layers and a batch sum, with headroom; a layout or clipping bug is O(1).
RTOL = 2e-4

INSTALL_HINT = 'pip install "jaxgrad[peers]" (see the README for the CPU-only torch pin)'


@dataclass(frozen=True)
class Options:
    """How rows are run. ``mem_cap_gb`` bounds one row's RSS (it is killed above it, and a
    row whose ``B × P`` estimate exceeds it is skipped); ``time_cap_s`` bounds one row."""

    threads: int = max(os.cpu_count() or 1, 1)
    repeats: int = 5
    warmup: int = 1
    min_time: float = 0.05
    device: str = "cpu"
    seed: int = 0
    mem_cap_gb: float = 12.0
    time_cap_s: float = 300.0
    workdir: str | None = None
    reuse_memory: bool = False  # allocator.reuse_freed_memory in each row's process first


@dataclass(frozen=True)
class Row:
    """One measurement; ``tags`` are copied into its record (e.g. the sweep axis)."""

    method: Method
    spec: ModelSpec
    batch_size: int
    tags: dict = field(default_factory=dict)


def package_missing(package: str) -> str | None:
    """Why ``package`` cannot be imported here, or None (checked without importing it)."""
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"not installed: no module {package!r}; {INSTALL_HINT}"


def estimated_bytes(row: Row) -> int:
    """A lower bound on a materialising row's peak: its ``B × P`` float32 array, about three
    times over (the framework's array, the layout conversion's copy, temporaries)."""
    if not row.method.materialises:
        return 0
    return 3 * 4 * row.batch_size * specs.num_params(row.spec)


def _thread_env(threads: int, device: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    flags = env.get("XLA_FLAGS", "")
    eigen = "true" if threads > 1 else "false"
    # (XLA has no thread-count flag: one thread is Eigen's multi-threading off)
    env["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen={eigen}".strip()
    env["JAX_PLATFORMS"] = "cuda" if device == "gpu" else "cpu"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_worker(job: dict, *, options: Options) -> dict:
    """Runs one job in a fresh process, killing it past the time or memory cap."""
    job_path = Path(job["result_path"]).with_suffix(".job.json")
    job_path.write_text(json.dumps(job))
    cap_kb = options.mem_cap_gb * 2**20
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(job_path)],
        env=_thread_env(options.threads, options.device),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    start, killed = time.monotonic(), None
    while proc.poll() is None:
        if _rss_kb(proc.pid) > cap_kb:
            killed = f"killed: resident memory exceeded the {options.mem_cap_gb:g} GB cap"
        elif time.monotonic() - start > options.time_cap_s:
            killed = f"timeout: exceeded the {options.time_cap_s:g} s cap"
        if killed:
            proc.kill()
            break
        time.sleep(0.05)
    log = proc.communicate()[0] or ""
    if killed:
        return {"status": killed}
    result_path = Path(job["result_path"])
    if not result_path.exists():
        tail = log.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"status": f"failed: worker died ({tail[0][:200]})", "log": log[-3000:]}
    return json.loads(result_path.read_text())


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    scale = max(float(np.linalg.norm(want)), 1e-30)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / scale)


def _tree(d: dict, kind: str) -> dict[str, np.ndarray]:
    return {k[len(kind) + 1 :]: v for k, v in d.items() if k.startswith(kind + "/")}


def compare(outputs_path: str, reference: dict[str, np.ndarray]) -> dict:
    """Each of a row's outputs against the reference: relative error per kind, and overall
    agreement (None if the row produced nothing comparable).

    Norms are compared per example, the per-layer clipped sum per layer (the largest relative
    error of any leaf), dots and Gram entries relative to their Cauchy–Schwarz bound
    (``|⟨g_i, v⟩| ≤ ‖g_i‖ ‖v‖``, ``|⟨g_i, g_j⟩| ≤ ‖g_i‖ ‖g_j‖``, which is what float32
    rounding scales with), so one wrong example, leaf or entry cannot hide in a long vector;
    gradients and clipped sums as one vector.
    """
    errors: dict[str, float] = {}
    with np.load(outputs_path) as got:
        got = dict(got)
    norms = reference["norms"]
    if "norms" in got:
        rel = np.abs(got["norms"] - norms) / np.maximum(np.abs(norms), 1e-30)
        errors["norms"] = float(rel.max())
    if "dots" in got:
        v_norm = np.sqrt(sum(np.sum(np.square(a)) for a in _tree(reference, "grad").values()))
        bound = np.maximum(norms * v_norm, 1e-30)
        errors["dots"] = float(np.max(np.abs(got["dots"] - reference["dots"]) / bound))
    if "gram" in got:
        if "gram" not in reference or got["gram"].shape != reference["gram"].shape:
            errors["gram"] = float("inf")
        else:
            bound = np.maximum(np.outer(norms, norms), 1e-30)
            errors["gram"] = float(np.max(np.abs(got["gram"] - reference["gram"]) / bound))
    layered, want_layered = _tree(got, "layered"), _tree(reference, "layered")
    if layered:
        if set(layered) != set(want_layered):
            errors["layered"] = float("inf")
        else:
            errors["layered"] = max(
                _relative_error(layered[k], want_layered[k]) for k in want_layered
            )
    for kind in ("grad", "clipped"):
        keys = sorted(k for k in reference if k.startswith(kind + "/"))
        if any(k in got for k in keys):
            missing = [k for k in keys if k not in got]
            if missing:
                errors[kind] = float("inf")
                continue
            flat = lambda d, keys=keys: np.concatenate([np.ravel(d[k]) for k in keys])
            errors[kind] = _relative_error(flat(got), flat(reference))
    if not errors:
        return {"agrees_with_reference": None, "errors": {}}
    return {
        "agrees_with_reference": all(e <= RTOL for e in errors.values()),
        "errors": errors,
    }


def _prepare_inputs(rows: list[Row], workdir: Path, options: Options, log) -> dict:
    """Weights per model and data per model (at its largest batch), saved once."""
    from jaxgrad.bench.peers import jax_side  # imports JAX: only the parent's setup needs it

    paths = {}
    for spec in {r.spec.name: r.spec for r in rows}.values():
        largest = max(r.batch_size for r in rows if r.spec.name == spec.name)
        weights = workdir / f"weights-{spec.name}.npz"
        data = workdir / f"data-{spec.name}.npz"
        np.savez(weights, **jax_side.init_weights(spec, seed=options.seed))
        np.savez(data, **specs.make_data(spec, largest, seed=options.seed))
        paths[spec.name] = (str(weights), str(data))
        log(f"[peers] {spec.describe()}: {specs.num_params(spec):,} parameters")
    return paths


def _base_record(row: Row, options: Options) -> dict:
    return {
        "framework": row.method.framework,
        "method": row.method.name,
        "computes": row.method.computes,
        "model": row.spec.describe(),
        "model_name": row.spec.name,
        "num_params": specs.num_params(row.spec),
        "batch_size": row.batch_size,
        "examples_per_s": None,
        "seconds_per_call": None,
        "peak_mem_mb": None,
        "baseline_mem_mb": None,
        "working_mem_mb": None,
        "compile_s": None,
        "first_call_s": None,
        "ratio_to_own_plain": None,
        "ratio_to_jax_batch_grad": None,
        "agrees_with_reference": None,
        "errors": {},
        "threads": options.threads,
        "device": None,
        "status": None,
        "note": row.method.note(row.spec),
        **row.tags,
    }


def _reason_not_run(row: Row, options: Options) -> str | None:
    why_not = row.method.why_not(row.spec)
    if why_not:
        return f"unsupported: {why_not}"
    missing = package_missing(row.method.package)
    if missing:
        return missing
    if estimated_bytes(row) > options.mem_cap_gb * 2**30:
        return (
            f"skipped: would exceed {options.mem_cap_gb:g} GB "
            f"(B × P = {row.batch_size} × {specs.num_params(row.spec):,} float32, "
            f"~{estimated_bytes(row) / 2**30:.1f} GB)"
        )
    return None


def run_rows(rows: Iterable[Row], *, options: Options, log: Callable = print) -> list[dict]:
    """Runs ``rows`` (reference first for each model and batch size); one record per row,
    including the rows that could not run, with the reason in ``status``."""
    rows = list(rows)
    with tempfile.TemporaryDirectory(prefix="jaxgrad-peers-", dir=options.workdir) as tmp:
        workdir = Path(tmp)
        inputs = _prepare_inputs(rows, workdir, options, log)
        references: dict[tuple[str, int], _Reference] = {}
        # The Gram matrix is the reference's one quadratic cost: only where a row needs it.
        gram = {(r.spec.name, r.batch_size) for r in rows if r.method.computes == "gram"}
        records = []
        for i, row in enumerate(rows):
            key = (row.spec.name, row.batch_size)
            weights, data = inputs[row.spec.name]
            reason = _reason_not_run(row, options)
            if key not in references and reason is None:
                references[key] = _reference(row, weights, data, workdir, options, gram=key in gram)
                status = references[key].status
                log(f"[peers] reference {row.spec.name} B={row.batch_size}: {status}")
            ref = references.get(key, _Reference(None, None, None, None, "not needed"))
            reference, l2_clip, ref_status = ref.outputs, ref.l2_clip, ref.status
            record = _base_record(row, options)
            # The machine may be shared: the load when the row started says how much to trust it.
            record["l2_clip"], record["loadavg_1m"] = l2_clip, os.getloadavg()[0]
            if reason is None and l2_clip is None:
                reason = f"failed: no reference ({ref_status})"
            if reason is not None:
                record["status"] = reason
            else:
                stem = workdir / f"row{i}"
                job = {
                    "kind": "row",
                    "framework": row.method.framework,
                    "method": row.method.name,
                    "model": row.spec.name,
                    "batch_size": row.batch_size,
                    "weights_path": weights,
                    "data_path": data,
                    "l2_clip": l2_clip,
                    "layer_clips": ref.layer_clips,
                    "reference_path": ref.path,
                    "threads": options.threads,
                    "device": options.device
                    if row.method.framework in specs.JAX_FRAMEWORKS
                    else "cpu",
                    "repeats": options.repeats,
                    "warmup": options.warmup,
                    "min_time": options.min_time,
                    "reuse_memory": options.reuse_memory,
                    "result_path": str(stem) + ".result.json",
                    "outputs_path": str(stem) + ".outputs.npz",
                }
                _fill(record, run_worker(job, options=options), job, reference)
            records.append(record)
            log(_progress_line(i + 1, len(rows), record))
    add_ratios(records)
    return records


class _Reference(NamedTuple):
    outputs: dict | None  # the arrays harness.compare reads
    l2_clip: float | None
    layer_clips: dict | None  # {leaf: C_g}
    path: str | None  # the outputs' .npz (the dots rows read v from it)
    status: str


def _reference(row: Row, weights, data, workdir: Path, options: Options, *, gram: bool):
    stem = workdir / f"reference-{row.spec.name}-{row.batch_size}"
    # Float64 per-example gradients of one chunk: keep them to about 256 MB.
    chunk = int(max(1, min(256, 2**28 // (8 * specs.num_params(row.spec)))))
    job = {
        "kind": "reference",
        "model": row.spec.name,
        "batch_size": row.batch_size,
        "weights_path": weights,
        "data_path": data,
        "chunk_size": chunk,
        "gram": gram,
        "threads": options.threads,
        "result_path": str(stem) + ".result.json",
        "outputs_path": str(stem) + ".outputs.npz",
    }
    # The reference always runs on the CPU, in float64, in two chunked passes over the batch:
    # it is not a measurement, so it gets a longer time cap than a row.
    ref_options = {
        **options.__dict__,
        "device": "cpu",
        "time_cap_s": max(600.0, 4 * options.time_cap_s),
    }
    result = run_worker(job, options=Options(**ref_options))
    if result["status"] != "ok":
        return _Reference(None, None, None, None, result["status"])
    with np.load(job["outputs_path"]) as ref:
        outputs = dict(ref)
    return _Reference(outputs, result["l2_clip"], result["layer_clips"], job["outputs_path"], "ok")


def _fill(record: dict, result: dict, job: dict, reference: dict) -> None:
    record["status"] = result["status"]
    if result["status"] != "ok":
        if "traceback" in result:
            record["traceback"] = result["traceback"]
        return
    seconds = result["seconds_per_call"]
    record.update(
        examples_per_s=job["batch_size"] / seconds,
        seconds_per_call=seconds,
        samples_s=result["samples_s"],
        first_call_s=result["first_call_s"],
        # JAX compiles on the first call; PyTorch has nothing to compile (eager).
        compile_s=(
            max(result["first_call_s"] - seconds, 0.0)
            if job["framework"] in specs.JAX_FRAMEWORKS
            else None
        ),
        peak_mem_mb=result["peak_mem_mb"],
        baseline_mem_mb=result["baseline_mem_mb"],
        working_mem_mb=max(result["peak_mem_mb"] - result["baseline_mem_mb"], 0.0),
        device=result.get("device"),
        versions=result.get("versions", {}),
    )
    if "device_peak_mem_mb" in result:
        record["device_peak_mem_mb"] = result["device_peak_mem_mb"]
    record.update(compare(job["outputs_path"], reference))
    if record["agrees_with_reference"] is False:
        record["status"] = "ok (DISAGREES with the reference)"


def add_ratios(records: list[dict]) -> None:
    """``ratio_to_own_plain`` and ``ratio_to_jax_batch_grad``: seconds per example of the row
    over that of the plain gradient (same model and batch size), so 3.0 means three times
    the cost of one ordinary gradient."""
    time_of = {
        (r["framework"], r["method"], r["model_name"], r["batch_size"]): r["seconds_per_call"]
        for r in records
        if r["seconds_per_call"]
    }
    for r in records:
        if not r["seconds_per_call"]:
            continue
        own = specs.PLAIN_OF.get(r["framework"])
        plain = time_of.get((*own, r["model_name"], r["batch_size"])) if own else None
        jax_plain = time_of.get(("jaxgrad", "batch_grad", r["model_name"], r["batch_size"]))
        r["ratio_to_own_plain"] = r["seconds_per_call"] / plain if plain else None
        r["ratio_to_jax_batch_grad"] = r["seconds_per_call"] / jax_plain if jax_plain else None


def _progress_line(done: int, total: int, r: dict) -> str:
    speed = f"{r['examples_per_s']:,.0f} ex/s" if r["examples_per_s"] else ""
    return (
        f"[peers {done}/{total}] {r['model_name']} B={r['batch_size']} "
        f"{r['framework']}:{r['method']} {speed} {r['status']}"
    )
