"""The clipped sum's cost over one gradient: clipped_grad and per_example_norms ÷ batch_grad.

Run: python bench/clip_cost.py MODEL BATCH ROUNDS [reuse] (a model of
``jaxgrad.bench.suite.CASES``; ``reuse``: first ``allocator.reuse_freed_memory()``, so that no
program page-faults its temporaries in at every call).
The three programs are timed in interleaved rounds (``jaxgrad.bench.timing.interleaved``: one
sample of each per round, the order rotated); the ratios are of medians. Besides wall
time it reports process CPU time (all of XLA's threads), which on a shared, loaded machine
measures the work done more steadily than the wall clock. To compare two versions, run it
alternately with each on ``PYTHONPATH``.
"""

import json
import sys

import jax

import jaxgrad
from jaxgrad import fast
from jaxgrad.bench import allocator, suite, timing


def programs(name: str, size: int):
    """``(fns, params, batch)``: batch_grad, clipped_grad (C = 1) and per_example_norms of
    model ``name`` at batch size ``size``, jitted (``clip_faults.py`` measures the same)."""
    case = suite.CASES[name]()
    params = case.model.init(jax.random.key(0))
    batch = case.make_batch(size)
    clipped = fast.clipped_grad(case.loss_fn, l2_clip=1.0, nonfinite="propagate")
    fns = {
        "batch_grad": jax.jit(lambda p, b: jaxgrad.batch_grad(case.loss_fn)(p, b).grads),
        "clipped": jax.jit(lambda p, b: clipped(p, b)),
        "norms": jax.jit(lambda p, b: fast.per_example_norms(case.loss_fn)(p, b)),
    }
    return fns, params, batch


def main(name: str, size: int, rounds: int) -> dict:
    fns, params, batch = programs(name, size)
    t = timing.interleaved(fns, args=(params, batch), rounds=rounds)
    w, c = t.seconds, t.cpu_seconds
    q1, _, q3 = t.ratio_quartiles("clipped", "batch_grad")  # the ratio within each round
    return {
        "model": name,
        "B": size,
        "wall_ms": {k: round(v * 1e3, 1) for k, v in w.items()},
        "cpu_ms": {k: round(v * 1e3, 1) for k, v in c.items()},
        "wall_ratio": round(w["clipped"] / w["batch_grad"], 3),
        "wall_ratio_iqr": [round(q1, 3), round(q3, 3)],
        "cpu_ratio": round(c["clipped"] / c["batch_grad"], 3),
        "norms_cpu_ratio": round(c["norms"] / c["batch_grad"], 3),
    }


if __name__ == "__main__":
    reuse = sys.argv[4:] == ["reuse"]
    if reuse and not allocator.reuse_freed_memory():  # before JAX runs anything
        sys.exit("reuse: this C library has no mallopt (not glibc)")
    print(json.dumps({**main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])), "reuse": reuse}))
