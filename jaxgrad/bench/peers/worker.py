"""One row (or one reference) in a fresh process: ``python worker.py JOB.json``.

Run as a script by :mod:`jaxgrad.bench.peers.harness`, never imported by it. Each row gets
its own process so that its peak resident memory is its own: the worker records its RSS once
the framework is imported and the model, weights and data are loaded (the baseline), resets
the kernel's high-water mark (``/proc/self/clear_refs``), runs, and reports the new
high-water mark. A PyTorch worker never imports JAX: the ``jaxgrad`` package ``__init__``
files (which import JAX) are bypassed by registering bare package modules for the few
NumPy-only files it needs.

The job is a JSON object (see ``harness._job``); the result is written as JSON to
``job["result_path"]`` and the arrays for the cross-check to ``job["outputs_path"]``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np

_PEERS_DIR = Path(__file__).resolve().parent


def _bare_packages() -> None:
    """Lets ``import jaxgrad.bench.peers.X`` load X without running any package ``__init__``."""
    for name, path in (
        ("jaxgrad", _PEERS_DIR.parent.parent),
        ("jaxgrad.bench", _PEERS_DIR.parent),
        ("jaxgrad.bench.peers", _PEERS_DIR),
    ):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets the RSS high-water mark (Linux); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _pin_threads(threads: int) -> None:
    # The thread-count env vars are set by the parent (they must be set before import);
    # pinning to `threads` cores as well stops any framework from using more.
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:threads])
    except (AttributeError, OSError):
        pass


def _time(step, *, warmup: int, repeats: int, min_time: float):
    """First call (compile for JAX), ``warmup`` more calls, then ``repeats`` timed samples
    of ``number`` calls each (enough calls for ``min_time`` seconds); returns the median."""
    start = time.perf_counter()
    out = step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        start = time.perf_counter()
        out = step()
        last = time.perf_counter() - start
    estimate = last if warmup else first
    number = max(1, int(np.ceil(min_time / max(estimate, 1e-6))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            out = step()
        samples.append((time.perf_counter() - start) / number)
    return out, first, statistics.median(samples), samples, number


def _derive_from_per_example(per_example: dict, l2_clip: float, chunk: int = 256) -> dict:
    """Norms and the clipped sum from per-example gradients, in float64, chunk by chunk
    (the batch × parameters array is never copied whole)."""
    b = next(iter(per_example.values())).shape[0]
    sq = np.zeros(b)
    for g in per_example.values():
        for i in range(0, b, chunk):
            part = g[i : i + chunk].reshape(min(chunk, b - i), -1).astype(np.float64)
            sq[i : i + chunk] += np.einsum("ij,ij->i", part, part)
    norms = np.sqrt(sq)
    factors = np.minimum(1.0, l2_clip / np.maximum(norms, 1e-300))
    clipped = {}
    for k, g in per_example.items():
        total = np.zeros(g.shape[1:])
        for i in range(0, b, chunk):
            total += np.tensordot(factors[i : i + chunk], g[i : i + chunk].astype(np.float64), 1)
        clipped[k] = total
    return {"norms": norms, "clipped": clipped}


# What a row or the reference may output: flat parameter-shaped dicts (saved as
# "kind/leaf"), and plain arrays.
TREE_OUTPUTS = ("grad", "clipped", "layered")
ARRAY_OUTPUTS = ("norms", "dots", "gram")


def output_arrays(outputs: dict) -> dict[str, np.ndarray]:
    """A row's (or the reference's) outputs as the flat ``{name: array}`` the cross-check
    (``harness.compare``) reads; anything else (the reference's ``layer_clips``) is left out."""
    arrays = {}
    for kind in TREE_OUTPUTS:
        for k, v in outputs.get(kind, {}).items():
            arrays[f"{kind}/{k}"] = np.asarray(v)
    arrays.update({k: np.asarray(outputs[k]) for k in ARRAY_OUTPUTS if k in outputs})
    return arrays


def _save_outputs(path: str, outputs: dict) -> list[str]:
    arrays = output_arrays(outputs)
    np.savez(path, **arrays)
    return sorted({k.split("/")[0] for k in arrays})


def _reference_v(path: str) -> dict[str, np.ndarray]:
    """The dots rows' ``v``: the reference's float64 mean gradient (flat)."""
    with np.load(path) as ref:
        return {k[len("grad/") :]: ref[k] for k in ref.files if k.startswith("grad/")}


def _framework_versions(framework: str) -> dict:
    from jaxgrad.bench.peers import specs

    versions = {"python": sys.version.split()[0], "numpy": np.__version__}
    if framework in specs.JAX_FRAMEWORKS:
        import jax

        import jaxgrad

        versions.update(
            jax=jax.__version__, jaxlib=jax.lib.__version__, jaxgrad=jaxgrad.__version__
        )
        if framework != "jaxgrad":
            from importlib.metadata import version

            versions[framework.replace("_", "-")] = version(framework.replace("_", "-"))
    else:
        import torch

        versions["torch"] = torch.__version__
        if framework == "opacus":
            import opacus

            versions["opacus"] = opacus.__version__
        if framework == "backpack":
            from importlib.metadata import version

            versions["backpack-for-pytorch"] = version("backpack-for-pytorch")
    return versions


def _run(job: dict) -> dict:
    from jaxgrad.bench.peers import specs
    from jaxgrad.bench.peers.specs import spec_from_name

    spec = spec_from_name(job["model"])
    weights = dict(np.load(job["weights_path"]))
    with np.load(job["data_path"]) as data:
        data = {k: v[: job["batch_size"]] for k, v in data.items()}
    result = {"device": "cpu"}

    if job["kind"] == "reference":
        from jaxgrad.bench.peers import jax_side

        outputs, l2_clip = jax_side.reference(
            spec,
            weights,
            data,
            chunk_size=job["chunk_size"],
            l2_clip=job.get("l2_clip"),
            gram=job.get("gram", False),
        )
        _save_outputs(job["outputs_path"], outputs)
        return {**result, "status": "ok", "l2_clip": l2_clip, "layer_clips": outputs["layer_clips"]}

    framework, method = job["framework"], job["method"]
    if framework in specs.JAX_FRAMEWORKS:
        import jax

        from jaxgrad.bench.peers import jax_side as side

        if job["device"] == "gpu":
            if not any(d.platform == "gpu" for d in jax.devices()):
                raise RuntimeError(f"--device gpu: JAX sees no GPU (devices: {jax.devices()})")
            # TF32 matmuls (the GPU default) are not float32 and would fail the cross-check.
            jax.config.update("jax_default_matmul_precision", "highest")
        result["device"] = str(jax.devices()[0].device_kind)
    else:
        import torch

        torch.set_num_threads(job["threads"])
        torch.set_num_interop_threads(1)
        from jaxgrad.bench.peers import torch_side as side

        result["torch_threads"] = torch.get_num_threads()

    v = _reference_v(job["reference_path"]) if job.get("reference_path") else None
    step, extract = side.prepare(
        method, spec, weights, data, l2_clip=job["l2_clip"], layer_clips=job.get("layer_clips"), v=v
    )
    baseline_kb = _status_kb("VmRSS") or _peak_kb()
    peak_was_reset = _reset_peak()

    out, first, median, samples, number = _time(
        step, warmup=job["warmup"], repeats=job["repeats"], min_time=job["min_time"]
    )
    peak_kb = _peak_kb()
    if framework in specs.JAX_FRAMEWORKS and job["device"] == "gpu":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        result["device_peak_mem_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20

    outputs = extract(out)
    if "per_example" in outputs:
        derived = _derive_from_per_example(outputs.pop("per_example"), job["l2_clip"])
        # A method's own norms/clipped sum (Opacus computes its clipped sum) win over derived.
        outputs = {**derived, **outputs}
    produced = _save_outputs(job["outputs_path"], outputs)
    return {
        **result,
        "status": "ok",
        "seconds_per_call": median,
        "samples_s": samples,
        "calls_per_sample": number,
        "first_call_s": first,
        "baseline_mem_mb": baseline_kb / 1024,
        "peak_mem_mb": peak_kb / 1024 if peak_was_reset else max(peak_kb, baseline_kb) / 1024,
        "peak_includes_imports": not peak_was_reset,
        "produced": produced,
        "versions": _framework_versions(framework),
    }


def _jax_frameworks() -> frozenset:
    """``specs.JAX_FRAMEWORKS``, read from the file: importing it as ``jaxgrad.bench.peers.specs``
    before deciding on the bare packages would run ``jaxgrad/__init__`` (and import JAX)."""
    import importlib.util

    loader = importlib.util.spec_from_file_location("_peers_specs", _PEERS_DIR / "specs.py")
    module = importlib.util.module_from_spec(loader)
    sys.modules["_peers_specs"] = module  # dataclasses look their module up
    loader.loader.exec_module(module)
    return module.JAX_FRAMEWORKS


def _reuse_freed_memory() -> None:
    """``allocator.reuse_freed_memory`` (``--reuse-memory``), loaded from its file before any
    framework is imported (a PyTorch worker never imports ``jaxgrad``)."""
    import importlib.util

    path = _PEERS_DIR.parent / "allocator.py"
    loader = importlib.util.spec_from_file_location("_peers_allocator", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    if not module.reuse_freed_memory():
        raise RuntimeError("--reuse-memory: this C library has no mallopt (it is not glibc)")


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        job = json.load(f)
    if job.get("reuse_memory"):  # first: before any framework allocates
        _reuse_freed_memory()
    _pin_threads(job["threads"])
    if job.get("framework") not in _jax_frameworks() and job["kind"] != "reference":
        _bare_packages()
    else:
        sys.path.insert(0, str(_PEERS_DIR.parent.parent.parent))
    try:
        result = _run(job)
    except Exception as e:  # every failure becomes a row's status, never a crash
        result = {
            "status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[
                :300
            ],
            "traceback": traceback.format_exc()[-3000:],
        }
    with open(job["result_path"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
