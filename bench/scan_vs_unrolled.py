"""The issue-8 speed check: ``clipped_grad`` / ``batch_grad`` on the scan RNN, and on a 4-block
transformer written with a scan over its layers against the same stack unrolled.

Interleaved rounds (within a case, the two programs alternate, in alternating order, one
warm-up call each), so both share the machine's load; prints medians and interquartile ranges.

Usage: ``python bench/scan_vs_unrolled.py [ROUNDS]`` (default 15).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import fast, grads
from jaxgrad.bench import suite, timing

NAMES = ("rnn", "transformer-L4", "transformer-scan")


def main(rounds: int, batch_size: int = 64) -> None:
    fs = {}
    for name in NAMES:
        case = suite.CASES[name]()
        params = case.model.init(jax.random.key(0))
        args = (params, case.make_batch(batch_size), jnp.ones((batch_size,), bool))
        fs[(name, "bg")] = (grads.batch_grad(case.loss_fn), args)
        fs[(name, "clip")] = (fast.clipped_grad(case.loss_fn, l2_clip=1.0), args)
    for f, a in fs.values():
        jax.block_until_ready(f(*a))
    peak = {k: timing.compiled_peak_bytes(f, *a) / 2**20 for k, (f, a) in fs.items()}
    times = {k: [] for k in fs}
    for name in NAMES:  # case by case: a call after another model's would start cold
        calls = 5 if name == "rnn" else 1
        for r in range(rounds):
            for kind in ("bg", "clip") if r % 2 == 0 else ("clip", "bg"):
                f, a = fs[(name, kind)]
                jax.block_until_ready(f(*a))
                t = time.perf_counter()
                for _ in range(calls):
                    jax.block_until_ready(f(*a))
                times[(name, kind)].append((time.perf_counter() - t) / calls)
    ratio = {n: np.array(times[(n, "clip")]) / np.array(times[(n, "bg")]) for n in NAMES}
    iqr = lambda x: (
        f"{np.median(x):.3f} (IQR {np.percentile(x, 25):.3f}-{np.percentile(x, 75):.3f})"
    )
    for n in NAMES:
        print(
            f"{n:17s} batch_grad {np.median(times[(n, 'bg')]) * 1e3:7.1f} ms  clipped_grad "
            f"{np.median(times[(n, 'clip')]) * 1e3:7.1f} ms  clipped/batch {iqr(ratio[n])}  "
            f"planned peak MB {peak[(n, 'bg')]:.1f} / {peak[(n, 'clip')]:.1f}"
        )
    print(
        "scanned / unrolled (of the two ratios): "
        + iqr(ratio["transformer-scan"] / ratio["transformer-L4"])
    )
    print(
        f"{jax.devices()[0].device_kind} · B = {batch_size} · {rounds} rounds; "
        "targets: rnn <= 1.5, scanned / unrolled <= 1.1"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
