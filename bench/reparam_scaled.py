"""Scaled weights on the fast path: a weight-normalised transformer-like dense stack.

``L`` residual layers ``h + tanh(h @ W)`` with ``W = g ⊙ V / ‖V_o‖`` over ``T`` positions, a
mean-pooled head; ``per_example_norms`` and ``clipped_grad`` over ``batch_grad``, timed in
interleaved rounds (``jaxgrad.bench.timing.interleaved``; ``--pairs`` rounds): the median and
interquartile range of the per-round time ratios, after printing the plan.

Run from a checkout (``PYTHONPATH=.`` for this tree's code)::

    python bench/reparam_scaled.py --pairs 12
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import batch_grad, clipped_grad, per_example_norms
from jaxgrad.bench import timing
from jaxgrad.fast import plan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=12, help="interleaved rounds")
    a = ap.parse_args()
    b, t, d = a.batch, a.positions, a.width
    rng = np.random.default_rng(0)
    params = {
        f"l{i}": {
            "v": jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32),
            "g": jnp.ones((d,), jnp.float32),
        }
        for i in range(a.layers)
    }
    params["head"] = jnp.asarray(rng.normal(size=(d, 10)) / np.sqrt(d), jnp.float32)
    batch = (
        jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
        jnp.asarray(rng.integers(0, 10, size=(b,))),
    )

    def loss(p, ex):
        h, label = ex
        for i in range(a.layers):
            v, g = p[f"l{i}"]["v"], p[f"l{i}"]["g"]
            h = h + jnp.tanh(h @ (g * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))))
        return -jax.nn.log_softmax(jnp.mean(h, axis=0) @ p["head"])[label]

    print(plan(loss, params, jax.tree_util.tree_map(lambda x: x[0], batch)), flush=True)
    fns = {
        "batch_grad": jax.jit(batch_grad(loss)),
        "per_example_norms": jax.jit(per_example_norms(loss)),
        "clipped_grad": jax.jit(clipped_grad(loss, l2_clip=1.0)),
    }
    t = timing.interleaved(fns, args=(params, batch), rounds=a.pairs)
    for name in ("per_example_norms", "clipped_grad"):
        q1, q2, q3 = t.ratio_quartiles(name, "batch_grad")
        print(f"{name} / batch_grad: median {q2:.3f} (IQR {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
