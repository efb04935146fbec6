"""Scaled weights in a loop: a weight-normalised RNN, ``W_hh = g ⊙ V / ‖V_o‖``.

``h_t = tanh(h_{t-1} W_hh + x_t U + b)`` over ``T`` steps (``lax.scan``), a softmax head on
``h_T``; ``W_hh`` computed before the loop ("outside") or inside the step function
("inside", as hand-written Flax and Equinox cells do). Prints the plans, then
``clipped_grad`` ÷ ``batch_grad`` (float32) over interleaved rounds
(``jaxgrad.bench.timing.interleaved``; median and interquartile range of the per-round
ratios). With
``--before DIR`` (a directory holding another version's ``jaxgrad`` package, e.g. from
``git archive <commit> jaxgrad | tar -x -C DIR``) that version's ``clipped_grad`` is timed in
the same rounds, and the per-round ratio of the two.

Run from a checkout (``PYTHONPATH=.`` for this tree's code)::

    python bench/reparam_loops.py --rounds 25 [--before DIR]
"""

import argparse
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.bench import timing  # (this tree's, loaded before any --before version)


def _load(path):
    """The ``jaxgrad`` package under ``path`` (the modules imported so far are dropped; the
    functions built from them keep working)."""
    for m in [m for m in sys.modules if m == "jaxgrad" or m.startswith("jaxgrad.")]:
        del sys.modules[m]
    sys.path.insert(0, path)
    try:
        mod = importlib.import_module("jaxgrad")
    finally:
        sys.path.remove(path)
    return mod


def _loss(hidden, inside):
    def wn(v, g):
        return g * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))

    def loss(p, ex):
        x, y = ex
        w_out = wn(p["V"], p["g"])

        def step(h, x_t):
            w = wn(p["V"], p["g"]) if inside else w_out
            return jnp.tanh(h @ w + x_t @ p["U"] + p["b"]), None

        h = jax.lax.scan(step, jnp.zeros(hidden), x)[0]
        return -jax.nn.log_softmax(h @ p["O"])[y]

    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--before", default=None)
    a = ap.parse_args()
    h, d, c = a.hidden, a.inputs, 10
    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "V": jax.random.normal(k[0], (h, h)) / np.sqrt(h),
        "g": jnp.ones(h),
        "U": jax.random.normal(k[1], (d, h)) / np.sqrt(d),
        "b": jnp.zeros(h),
        "O": jax.random.normal(k[2], (h, c)) / np.sqrt(h),
    }
    batch = (
        jax.random.normal(k[3], (a.batch, a.steps, d)),
        jax.random.randint(k[4], (a.batch,), 0, c),
    )
    mask = jnp.ones(a.batch, bool)
    versions = [("this", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
    if a.before:
        versions.append(("before", a.before))
    fs = {}
    for tag, path in versions:
        jg = _load(path)
        for form in ("outside", "inside"):
            loss = _loss(h, form == "inside")
            fs.setdefault((form, "batch_grad"), jax.jit(jg.batch_grad(loss)))
            fs[(form, tag)] = jax.jit(jg.clipped_grad(loss, l2_clip=1.0))
            one = jax.tree_util.tree_map(lambda x: x[0], batch)
            print(f"{tag}, W_hh computed {form} the step:")
            for lp in jg.fast.plan(loss, params, one).leaves:
                print(f"  {lp.path:8s} {lp.route[:100]}")
    names = {f"{form} {name}": key for key in fs for form, name in [key]}

    def q(t, num, den):
        return "{1:.2f} (IQR {0:.2f}-{2:.2f})".format(*t.ratio_quartiles(num, den))

    for form in ("outside", "inside"):
        progs = {n: fs[key] for n, key in names.items() if key[0] == form}
        t = timing.interleaved(progs, args=(params, batch, mask), rounds=a.rounds)
        base = f"{form} batch_grad"
        print(f"W_hh computed {form} the step: batch_grad {t.seconds[base] * 1e3:.1f} ms")
        for tag, _ in versions:
            name = f"{form} {tag}"
            ms = t.seconds[name] * 1e3
            print(f"  clipped_grad ({tag}) {ms:7.1f} ms, ÷ batch_grad {q(t, name, base)}")
        if a.before:
            print(f"  this ÷ before, per round: {q(t, f'{form} this', f'{form} before')}")
    print(
        f"{jax.devices()[0].device_kind} · B = {a.batch}, H = {h}, T = {a.steps}, "
        f"D = {d}, float32 · {a.rounds} rounds"
    )


if __name__ == "__main__":
    main()
