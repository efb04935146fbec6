"""``python -m jaxgrad.bench [--json PATH]``: the built-in suite, a table, optional JSON.

With ``--peers`` or ``--sweep`` the comparison with PyTorch, Opacus and BackPACK runs
instead (``pip install "jaxgrad[peers]"``); with ``--dp`` a full DP-SGD step against a
non-private step (:mod:`jaxgrad.bench.dp`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from jaxgrad._cli import check_writable
from jaxgrad._optional import require
from jaxgrad.bench import allocator, run, suite

DEFAULT_CASES = ["mlp", "cnn", "cnn-ws", "transformer", "rnn"]
DEFAULT_BATCH_SIZES = [32, 256]


def _names(value: str, allowed, what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown or value!r}; allowed: {', '.join(allowed)}"
        )
    return names


def _positive_ints(flag: str):
    """An argparse type: comma-separated positive integers, the error naming ``flag``."""

    def parse(value: str) -> list[int]:
        try:
            sizes = [int(v) for v in value.split(",")]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise argparse.ArgumentTypeError(
                f"{flag} must be positive integers separated by commas; got {value!r}"
            )
        return sizes

    return parse


_batch_sizes = _positive_ints("--batch-sizes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgrad.bench",
        description="Time every gradient strategy side by side: examples/s, compile time, "
        "XLA-planned peak memory and the ratio to batch_grad measured in the same run.",
    )
    p.add_argument(
        "--models",
        type=lambda v: _names(v, list(suite.CASES), "model"),
        default=DEFAULT_CASES,
        help=f"comma-separated, from {', '.join(suite.CASES)} (default: {','.join(DEFAULT_CASES)})",
    )
    p.add_argument(
        "--batch-sizes", type=_batch_sizes, default=DEFAULT_BATCH_SIZES, help="default: 32,256"
    )
    p.add_argument(
        "--strategies",
        type=lambda v: _names(v, list(suite.STRATEGIES), "strategy"),
        default=list(suite.STRATEGIES),
        help=f"comma-separated, from: {', '.join(suite.STRATEGIES)} (default: all)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.3,
        help="timed seconds per row on average: the interleaved rounds of a model and batch "
        "size go on until they took this times the rows (3 rounds at least, 25 at most)",
    )
    p.add_argument("--json", metavar="PATH", help="write one record per row as JSON here")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown here")
    p.add_argument("--plot", metavar="PATH", help="write a bar chart here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--peers", action="store_true", help="compare with torch.func/Opacus/BackPACK")
    p.add_argument("--sweep", action="store_true", help="scaling sweep over batch size, width")
    p.add_argument(
        "--dp",
        action="store_true",
        help="a full DP-SGD step against a non-private step, interleaved, with the cost of "
        "the noise alone (default models mlp,cnn,cnn-ws,transformer,rnn, batch sizes 256,1024)",
    )
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds for --dp")
    p.add_argument(
        "--devices",
        type=_positive_ints("--devices"),
        help="data-parallel over these device counts, e.g. 1,2,4,8 (on a CPU, emulated "
        "devices; one subprocess per count)",
    )
    allocator.add_flag(p)
    p.add_argument("--mesh-devices", type=int, help=argparse.SUPPRESS)  # set by --devices
    return p


DEVICES_NOTE = (
    "Emulated CPU devices (--xla_force_host_platform_device_count) share this machine's cores: "
    "their absolute examples/s mean little; only the ratios within one device count do."
)


def _run_devices(argv: list[str], counts: list[int]) -> list[dict]:
    """Re-runs this command once per device count, in a subprocess that can see them all."""
    import os
    import subprocess
    import tempfile

    rest, skip = [], False
    for a in argv:  # drop --devices and --json; every child writes its own JSON
        if skip:
            skip = False
        elif a in ("--devices", "--json"):
            skip = True
        elif not a.startswith(("--devices=", "--json=")):
            rest.append(a)
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={max(counts)}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            path = os.path.join(tmp, f"devices-{count}.json")
            cmd = [sys.executable, "-m", "jaxgrad.bench", *rest, "--mesh-devices", str(count)]
            # the children's own tables are not shown; their records are, together
            subprocess.run(
                [*cmd, "--json", path, "--quiet"], env=env, check=True, stdout=subprocess.DEVNULL
            )
            with open(path) as f:
                records.extend(json.load(f)["records"])
    return records


SUITE = "the benchmark suite (python -m jaxgrad.bench without --peers or --sweep)"


def _refuse_flags_of_the_other_mode(argv, parser, other_parser, *, mode, other) -> None:
    """A flag that only the other mode takes is an error naming both modes (argparse alone
    says "unrecognized arguments" under this mode's usage)."""
    options = lambda p: {s for action in p._actions for s in action.option_strings}
    foreign = options(other_parser) - options(parser)
    for flag in (a.split("=", 1)[0] for a in argv):
        if flag in foreign:
            parser.error(f"{flag} is for {other}, not for {mode}")


def main(argv: list[str] | None = None) -> int:
    from jaxgrad.bench import peers

    argv = sys.argv[1:] if argv is None else argv
    given = lambda flag: any(a == flag or a.startswith(flag + "=") for a in argv)
    parser, peers_parser = build_parser(), peers.build_parser()
    if "--peers" in argv or "--sweep" in argv:
        peer_modes = " and ".join(f for f in ("--peers", "--sweep") if f in argv)
        if given("--dp"):  # else the peers' parser says "unrecognized arguments: --dp"
            parser.error(
                f"--dp and {peer_modes} are different modes (--dp times a DP-SGD step against "
                "a non-private one; --peers and --sweep compare with PyTorch, Opacus and "
                "BackPACK): give one of them"
            )
        _refuse_flags_of_the_other_mode(argv, peers_parser, parser, mode=peer_modes, other=SUITE)
        return peers.main(argv)
    _refuse_flags_of_the_other_mode(
        argv, parser, peers_parser, mode=SUITE, other="--peers or --sweep"
    )
    args = parser.parse_args(argv)
    _check_outputs(args, parser)
    # Before JAX runs anything: arenas that threads already hold keep their own limits.
    allocator.apply_flag(args, parser)
    start = time.perf_counter()
    if not (math.isfinite(args.min_seconds) and args.min_seconds >= 0):
        parser.error(f"--min-seconds must be a non-negative finite number; got {args.min_seconds}")
    if args.mesh_devices is not None and args.mesh_devices < 1:
        parser.error(f"--mesh-devices must be a positive integer; got {args.mesh_devices}")
    if args.dp:
        if args.rounds < 1:
            parser.error(f"--rounds must be a positive integer; got {args.rounds}")
        flags = ("--strategies", "--min-seconds", "--devices", "--markdown", "--plot")
        ignored = [f for f in flags if given(f)]
        if ignored or args.mesh_devices is not None:
            parser.error(
                f"{', '.join(ignored) or '--mesh-devices'}: not for --dp (which times the DP-SGD "
                "step against the non-private step over --rounds, for --models and --batch-sizes)"
            )
        return _run_dp(args, given, start)
    mesh = None
    if args.mesh_devices is not None:
        from jaxgrad import sharding

        mesh = sharding.data_mesh(args.mesh_devices)
    if given("--rounds"):
        parser.error("--rounds sets the interleaved rounds of --dp; add --dp or drop it")
    if args.devices is not None:
        records = _run_devices(argv, args.devices)
    else:
        records = run.run_suite(
            args.models,
            args.batch_sizes,
            args.strategies,
            quiet=args.quiet,
            min_seconds=args.min_seconds,
            mesh=mesh,
        )
    machine = run.machine_description()
    if args.devices is not None or mesh is not None:
        print(run.format_devices_table(records))
        if machine["device"].startswith("cpu"):
            print("\n" + DEVICES_NOTE)
    else:
        print(run.format_table(records))
        print("\n" + run.LEGEND)
    _footer(
        machine,
        records,
        args,
        start,
        " Medians of interleaved rounds after warm-up; ratios from this run.",
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(run.format_markdown(records) + "\n")
    if args.plot:
        run.plot_records(records, args.plot)
    return 0


def _run_dp(args, given, start: float) -> int:
    """``--dp``: the DP step against the non-private step (:mod:`jaxgrad.bench.dp`)."""
    from jaxgrad.bench import dp

    models = args.models if given("--models") else dp.DEFAULT_MODELS
    sizes = args.batch_sizes if given("--batch-sizes") else dp.DEFAULT_BATCH_SIZES
    records = dp.run(models, sizes, rounds=args.rounds, quiet=args.quiet)
    machine = run.machine_description()
    print("\n".join(dp.format_record(r) for r in records))
    print("\n" + dp.NOTE)
    _footer(machine, records, args, start, "")
    return 0


def _footer(machine: dict, records: list, args, start: float, note: str) -> None:
    """The machine line every table ends with, and ``--json`` (machine and records)."""
    print(
        f"\n{machine['device']} · {machine['cpu_count']} CPUs · jax {machine['jax']} · "
        f"{time.perf_counter() - start:.0f} s.{note}"
        + (" Freed memory reused (--reuse-memory)." if getattr(args, "reuse_memory", False) else "")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "records": records}, f, indent=2)


def _check_outputs(args, parser) -> None:
    """Unwritable output paths fail before the (long) run, not after it."""

    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        check_writable(flag, path, parser)
    if args.plot:
        try:
            require("matplotlib", package="matplotlib", extra="cli", needed_for="--plot")
        except ImportError as e:
            parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
