"""The clipped sum's cost over one gradient: clipped_grad and per_example_norms ÷ batch_grad.

Run: python bench/clip_cost.py MODEL BATCH ROUNDS (a model of ``jaxgrad.bench.suite.CASES``).
The three programs are called in turn, once per round; the ratios are of medians. Besides wall
time it reports process CPU time (all of XLA's threads), which on a shared, loaded machine
measures the work done more steadily than the wall clock. To compare two versions, run it
alternately with each on ``PYTHONPATH``.
"""

import json
import sys
import time

import jax
import numpy as np

import jaxgrad
from jaxgrad import fast
from jaxgrad.bench import suite


def main(name: str, size: int, rounds: int) -> dict:
    case = suite.CASES[name]()
    params = case.model.init(jax.random.key(0))
    batch = case.make_batch(size)
    clipped = fast.clipped_grad(case.loss_fn, l2_clip=1.0, nonfinite="propagate")
    fns = {
        "batch_grad": jax.jit(lambda p, b: jaxgrad.batch_grad(case.loss_fn)(p, b).grads),
        "clipped": jax.jit(lambda p, b: clipped(p, b)),
        "norms": jax.jit(lambda p, b: fast.per_example_norms(case.loss_fn)(p, b)),
    }
    for f in fns.values():  # compile and warm up
        jax.block_until_ready(f(params, batch))
        jax.block_until_ready(f(params, batch))
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            c, t = time.process_time(), time.perf_counter()
            jax.block_until_ready(f(params, batch))
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    med = lambda d: {k: float(np.median(v)) for k, v in d.items()}
    w, c = med(wall), med(cpu)
    return {
        "model": name,
        "B": size,
        "wall_ms": {k: round(v * 1e3, 1) for k, v in w.items()},
        "cpu_ms": {k: round(v * 1e3, 1) for k, v in c.items()},
        "wall_ratio": round(w["clipped"] / w["batch_grad"], 3),
        "cpu_ratio": round(c["clipped"] / c["batch_grad"], 3),
        "norms_cpu_ratio": round(c["norms"] / c["batch_grad"], 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
