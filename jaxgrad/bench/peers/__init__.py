"""``python -m jaxgrad.bench --peers | --sweep``: jaxgrad side by side with its peers.

PyTorch plain backward, ``torch.func`` ``vmap(grad)``, Opacus (per-sample hooks with
clipping, and ghost clipping) and BackPACK (``BatchGrad``, ``BatchL2Grad``) against
jaxgrad's ``batch_grad``, ``per_example_grads``, ``per_example_norms`` and ``clipped_grad``,
on the same models, weights and data, each row in its own process, every answer checked
against a float64 reference. DP-SGD steps too: jaxgrad's ``privacy.dp_grad`` against
jax_privacy's ``clipping.clipped_grad``, ``optax.contrib.dpsgd`` and Opacus (``make_private``
with hooks, and ghost clipping), timed with noise and checked with ``σ = 0``. Per-layer
clipping (each parameter leaf clipped to its own ``C_g``): jaxgrad's ``clipped_grad`` with a
pytree ``l2_clip`` against Opacus's ``clipping="per_layer"`` and jax_privacy's
``pre_clipping_transform``. Inner products of the per-example gradients: jaxgrad's
``per_example_dots`` (with the batch's mean gradient) and ``gradient_gram`` against
``jax.vmap(jax.grad)`` and ``torch.func`` then a product. ``--sweep`` scales batch size and
width instead.

Install the peers with ``pip install "jaxgrad[peers]"``; a peer that is missing is
reported as such in the table, never dropped.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

from jaxgrad.bench import allocator
from jaxgrad.bench.peers import harness, specs

DEFAULT_MODELS = ["mlp", "cnn", "transformer", "rnn", "transformer-scan"]
DEFAULT_BATCH_SIZES = [64, 256]


def _csv(kind: str, allowed=None, convert=str):
    def parse(value: str):
        try:
            items = [convert(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            items = []
        if not items:
            raise argparse.ArgumentTypeError(
                f"{kind}: expected a comma-separated list; got {value!r}"
            )
        if allowed is not None:
            unknown = [i for i in items if not allowed(i)]
            if unknown:
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {unknown}; allowed: {allowed.names}"
                )
        if convert is int and min(items) < 1:
            raise argparse.ArgumentTypeError(f"{kind} must be positive integers; got {value!r}")
        return items

    return parse


class _Allowed:
    def __init__(self, names, extra=None):
        self.names, self.extra = ", ".join(names), extra
        self._set = set(names)

    def __call__(self, item) -> bool:
        return item in self._set or bool(self.extra and self.extra(item))


def _is_sweep_model(name: str) -> bool:
    try:
        specs.spec_from_name(name)
        return True
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgrad.bench --peers",
        description=__doc__.split("\n\n")[0],
    )
    mode = p.add_argument_group("what to run")
    mode.add_argument("--peers", action="store_true", help="the side-by-side comparison")
    mode.add_argument("--sweep", action="store_true", help="batch size and width scaling (MLP)")
    mode.add_argument(
        "--models",
        type=_csv("model", _Allowed([*specs.MODELS, "mlp-w<width>"], _is_sweep_model)),
        default=DEFAULT_MODELS,
        help=f"--peers: comma-separated, from {', '.join(specs.MODELS)} "
        f"(default: {','.join(DEFAULT_MODELS)})",
    )
    mode.add_argument(
        "--batch-sizes",
        type=_csv("batch size", convert=int),
        default=None,
        help=f"default: {','.join(map(str, DEFAULT_BATCH_SIZES))} (--peers); "
        "32,128,512,1024,2048,4096 (--sweep)",
    )
    mode.add_argument(
        "--methods",
        type=_csv("method", _Allowed(list(specs.METHODS))),
        default=list(specs.METHODS),
        help=f"comma-separated framework:method keys (default: all): {', '.join(specs.METHODS)}",
    )
    mode.add_argument(
        "--widths",
        type=_csv("width", convert=int),
        default=None,
        help="--sweep: MLP widths 784-w-w/2-10 (default: 128,256,512,1024,2048)",
    )
    mode.add_argument(
        "--no-width-sweep", action="store_true", help="--sweep: the batch-size sweep only"
    )
    mode.add_argument(
        "--sweep-batch-size",
        type=int,
        default=512,
        help="--sweep: the batch size of the width sweep (default: 512)",
    )
    how = p.add_argument_group("how")
    how.add_argument(
        "--device",
        choices=["cpu", "gpu"],
        default="cpu",
        help="where the JAX side runs (PyTorch stays on the CPU)",
    )
    how.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads for every framework (default: all cores)",
    )
    how.add_argument("--repeats", type=int, default=5, help="timed samples; the median is kept")
    how.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    how.add_argument(
        "--min-time",
        "--min-seconds",
        dest="min_time",
        type=float,
        default=0.05,
        help="each timed sample repeats the call for at least this many seconds",
    )
    how.add_argument(
        "--mem-cap-gb", type=float, default=None, help="per row (default: 12; sweep 14)"
    )
    how.add_argument(
        "--time-cap-s", type=float, default=None, help="per row (default: 300; sweep 120)"
    )
    how.add_argument("--seed", type=int, default=0, help="weights and data")
    allocator.add_flag(how)  # applied in every row's own process (harness.Options)
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="one record per row")
    out.add_argument("--plot", metavar="PATH", help="PNG: throughput and memory against batch size")
    out.add_argument("--markdown", metavar="PATH", help="summary with command, versions, machine")
    out.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _check_device(device: str) -> None:
    if device != "gpu":
        return
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        raise SystemExit(
            "--device gpu: JAX sees no GPU here (jax.devices() = "
            f"{jax.devices()}); install a CUDA jaxlib or use --device cpu"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m jaxgrad.bench --peers|--sweep``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.peers or args.sweep):
        args.peers = True
    for name in ("threads", "repeats", "sweep_batch_size"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be a positive integer; got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be a non-negative integer; got {args.warmup}")
    if not (math.isfinite(args.min_time) and args.min_time >= 0):
        parser.error(f"--min-time must be a non-negative finite number; got {args.min_time}")
    for name in ("mem_cap_gb", "time_cap_s"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be a positive finite number; got {value}")
    _check_device(args.device)
    allocator.apply_flag(args, parser)  # here: it fails now if it cannot apply in the rows
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    options = harness.Options(
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        min_time=args.min_time,
        device=args.device,
        seed=args.seed,
        mem_cap_gb=args.mem_cap_gb or (14.0 if args.sweep else 12.0),
        time_cap_s=args.time_cap_s or (120.0 if args.sweep else 300.0),
        reuse_memory=args.reuse_memory,
    )
    methods = [specs.method_from_key(k) for k in args.methods]
    if args.sweep:
        from jaxgrad.bench.peers import sweep

        rows = sweep.plan(
            methods,
            batch_sizes=args.batch_sizes or sweep.DEFAULT_BATCH_SIZES,
            widths=[] if args.no_width_sweep else (args.widths or sweep.DEFAULT_WIDTHS),
            width_batch_size=args.sweep_batch_size,
        )
    else:
        batch_sizes = args.batch_sizes or DEFAULT_BATCH_SIZES
        rows = [
            harness.Row(m, specs.spec_from_name(model), b)
            for model in args.models
            for b in batch_sizes
            for m in methods
        ]
    start, load_before = time.perf_counter(), os.getloadavg()
    records = harness.run_rows(rows, options=options, log=log)
    wall = time.perf_counter() - start

    from jaxgrad.bench.peers import report

    print(report.format_table(records))
    for line in report.headline(records):
        print(line)
    command = "python -m jaxgrad.bench " + shlex.join(argv)
    meta = {
        "command": command,
        "wall_s": wall,
        "threads": options.threads,
        "repeats": options.repeats,
        "warmup": options.warmup,
        "device": options.device,
        "rtol": harness.RTOL,
        "reuse_memory": options.reuse_memory,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine": report.machine_description(),
        "versions": report.versions_of(records),
    }
    if args.json:
        report.write_json(args.json, records, meta=meta)
    if args.plot:
        from jaxgrad.bench.peers import plot

        try:
            plot.plot(records, args.plot, sweep=args.sweep)
        except ValueError as e:  # nothing ran: the table and JSON still say why
            print(f"--plot {args.plot}: not written: {e}", file=sys.stderr)
            args.plot = None
    if args.markdown:
        plot_name = os.path.relpath(args.plot, Path(args.markdown).parent) if args.plot else None
        report.write_markdown(
            args.markdown, records, command=command, meta=meta, plot_name=plot_name
        )
    return 0


__all__ = ["main"]
