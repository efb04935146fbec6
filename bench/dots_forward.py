"""per_example_dots by forward mode (``jax.jvp`` along v) against the factored fast pass
(``⟨G_i, op(A_i, V)⟩``) and the route ``"auto"`` takes (``fast.plan.dots_route``), each as
time ÷ ``batch_grad``'s, all timed together in interleaved rounds (``jaxgrad.bench.timing``)
per model and batch size, float32. "forward" is forced past the route's rule (a patched
``dots_route``), to measure what the rule decides against.

Run: PYTHONPATH=. python bench/dots_forward.py [--cases mlp cnn ...] [--sizes 32 256]
"""

from __future__ import annotations

import argparse
import importlib
import os
from unittest import mock

import jax

import jaxgrad
from jaxgrad.bench import suite, timing

plan_lib = importlib.import_module("jaxgrad.fast.plan")  # (jaxgrad.fast.plan is the function)


def forced_forward(f):
    """``f`` traced with every loss on the forward route (its first call compiles it)."""
    route = mock.patch.object(plan_lib, "dots_route", lambda program: plan_lib.DotsRoute("forward"))

    def g(*args, **kw):
        with route:
            return f(*args, **kw)

    return g


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", default=["mlp", "cnn", "cnn-ws", "transformer", "rnn"]
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    a = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    print("time ÷ batch_grad's: median of the per-round ratios [IQR], and of the CPU seconds")
    print(f"{'case':<34} {'B':>4}  {'auto':>27} {'forward':>27} {'factored':>27}")
    for name in a.cases:
        case = suite.CASES[name]()
        params = case.model.init(jax.random.key(0))
        for size in a.sizes:
            batch = case.make_batch(size)
            mask = jax.numpy.ones((size,), bool)
            fns = {
                "batch_grad": jaxgrad.batch_grad(case.loss_fn),
                "auto": suite.with_reference(jaxgrad.per_example_dots(case.loss_fn)),
                "forward": forced_forward(
                    suite.with_reference(jaxgrad.per_example_dots(case.loss_fn))
                ),
                "factored": suite.with_reference(
                    jaxgrad.per_example_dots(case.loss_fn, method="factored")
                ),
            }
            t = timing.interleaved(
                fns,
                args=(params, batch, mask),
                rounds=a.rounds,
                min_seconds=a.min_seconds * len(fns),
            )
            cells = []
            for k in ("auto", "forward", "factored"):
                lo, med, hi = t.ratio_quartiles(k, "batch_grad")
                cpu = t.cpu_seconds[k] / t.cpu_seconds["batch_grad"]
                cells.append(f"{med:5.2f} [{lo:.2f}-{hi:.2f}] cpu {cpu:4.2f}")
            row = f"{case.name:<34} {size:>4}  " + " ".join(f"{c:>27}" for c in cells)
            print(f"{row}  {t.rounds} rounds", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
