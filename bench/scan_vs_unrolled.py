"""The issue-8 speed check: ``clipped_grad`` / ``batch_grad`` on the scan RNN, and on a 4-block
transformer written with a scan over its layers against the same stack unrolled.

Interleaved rounds (``jaxgrad.bench.timing.interleaved``: within a case, the two programs
alternate, in alternating order, a sample at least 20 ms of calls), so both share the machine's
load; prints medians and interquartile ranges (the scanned / unrolled figure pairs the two
transformers' per-round ratios by round index).

Usage: ``python bench/scan_vs_unrolled.py [ROUNDS]`` (default 15).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import fast, grads
from jaxgrad.bench import suite, timing

NAMES = ("rnn", "transformer-L4", "transformer-scan")


def main(rounds: int, batch_size: int = 64) -> None:
    times, peak = {}, {}
    for name in NAMES:  # case by case, each case's two programs interleaved
        case = suite.CASES[name]()
        params = case.model.init(jax.random.key(0))
        args = (params, case.make_batch(batch_size), jnp.ones((batch_size,), bool))
        fs = {
            "bg": grads.batch_grad(case.loss_fn),
            "clip": fast.clipped_grad(case.loss_fn, l2_clip=1.0),
        }
        t = timing.interleaved(fs, args=args, rounds=rounds, min_sample_seconds=0.02)
        for kind, f in fs.items():
            times[(name, kind)] = t.samples[kind]
            peak[(name, kind)] = timing.compiled_peak_bytes(f, *args) / 2**20
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
