"""Transformed weights in a loop, computed before the loop ("outside") or in the step
function ("inside", as hand-written Flax and Equinox cells and layer stacks do).

Models (``--model``):

* ``rnn``: a weight-normalised RNN, ``h_t = tanh(h_{t-1} W_hh + x_t U + b)`` over ``T``
  steps (``lax.scan``) with ``W_hh = g ⊙ V / ‖V_o‖``, a softmax head on ``h_T``;
* ``wn-stack``: a residual stack of ``L`` weight-normalised dense layers on ``T`` tokens,
  run by ``lax.scan`` over the stacked ``V_l, g_l``;
* ``ws-conv-stack``: a residual stack of ``L`` 3x3 convolutions with weight-standardised
  kernels, scanned over the stacked kernels;
* ``lora-stack``: a residual stack of ``L`` dense layers with merged LoRA weights
  ``W0_l + A_l B_l`` (rank 8), scanned over ``W0, A, B``.

Prints the plans, then ``clipped_grad`` ÷ ``batch_grad`` (float32) over interleaved rounds
(``jaxgrad.bench.timing.interleaved``; median and interquartile range of the per-round
ratios), with ``vmap(grad)``-then-clip as the materialised reference. With
``--before DIR`` (a directory holding another version's ``jaxgrad`` package, e.g. from
``git archive <commit> jaxgrad | tar -x -C DIR``) that version's ``clipped_grad`` is timed in
the same rounds, and the per-round ratio of the two.

Run from a checkout (``PYTHONPATH=.`` for this tree's code)::

    python bench/reparam_loops.py --model rnn --rounds 25 [--before DIR]
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


MODELS = ("rnn", "wn-stack", "ws-conv-stack", "lora-stack")


def _wn(v, g):
    return g * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))


def _standardise(k):
    return (k - k.mean((0, 1, 2))) / jnp.sqrt(k.var((0, 1, 2)) + 1e-5)


def _head(h, w, y):
    return -jax.nn.log_softmax(h @ w)[y]


def _rnn(k, a):
    h, d = a.hidden, a.inputs
    params = {
        "V": jax.random.normal(k[0], (h, h)) / np.sqrt(h),
        "g": jnp.ones(h),
        "U": jax.random.normal(k[1], (d, h)) / np.sqrt(d),
        "b": jnp.zeros(h),
        "O": jax.random.normal(k[2], (h, 10)) / np.sqrt(h),
    }

    def loss(inside):
        def fn(p, ex):
            x, y = ex
            w_out = _wn(p["V"], p["g"])

            def step(c, x_t):
                w = _wn(p["V"], p["g"]) if inside else w_out
                return jnp.tanh(c @ w + x_t @ p["U"] + p["b"]), None

            return _head(jax.lax.scan(step, jnp.zeros(h), x)[0], p["O"], y)

        return fn

    return params, (a.batch, a.steps, d), loss


def _stack(k, a, weights, transform, apply, example):
    """A residual stack of ``a.layers`` layers scanned over the stacked ``weights``, each
    layer's weight ``transform(*slices)`` computed in the body or before the loop."""
    params = {**weights, "O": jax.random.normal(k[4], (a.hidden, 10)) / np.sqrt(a.hidden)}
    names = sorted(weights)

    def loss(inside):
        def fn(p, ex):
            x, y = ex
            stacked = [p[n] for n in names]
            if not inside:
                stacked = jax.vmap(transform)(*stacked)

            def layer(c, w):
                w = transform(*w) if inside else w
                return c + jnp.tanh(apply(c, w)), None

            c = jax.lax.scan(layer, x, stacked)[0]
            return _head(c.reshape(-1, a.hidden).mean(0), p["O"], y)

        return fn

    return params, (a.batch, *example), loss


def _model(name, k, a):
    h, n = a.hidden, a.layers
    normal = lambda i, *shape: jax.random.normal(k[i], (n, *shape)) / np.sqrt(shape[-2])
    if name == "rnn":
        return _rnn(k, a)
    if name == "wn-stack":
        weights = {"V": normal(0, h, h), "g": jnp.ones((n, h))}
        return _stack(k, a, weights, _wn, jnp.dot, (a.steps, h))  # (sorted: V, g)
    if name == "ws-conv-stack":
        weights = {"K": normal(0, 3, 3, h, h)}
        conv = lambda c, w: jax.lax.conv_general_dilated(
            c[None], w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )[0]
        return _stack(k, a, weights, _standardise, conv, (a.image, a.image, h))
    weights = {"A": normal(1, h, 8), "B": normal(2, 8, h) / 4, "W0": normal(0, h, h)}
    return _stack(k, a, weights, lambda a_, b_, w0: w0 + a_ @ b_, jnp.dot, (a.steps, h))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rnn", choices=MODELS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=None, help="rnn, stacks: 128; convs: 16")
    ap.add_argument("--steps", type=int, default=16, help="time steps (rnn), tokens (stacks)")
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--before", default=None)
    a = ap.parse_args()
    if a.hidden is None:
        a.hidden = 16 if a.model == "ws-conv-stack" else 128
    k = jax.random.split(jax.random.key(0), 6)
    params, shape, make_loss = _model(a.model, k, a)
    batch = (jax.random.normal(k[5], shape), jnp.arange(a.batch) % 10)
    mask = jnp.ones(a.batch, bool)
    versions = [("this", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
    if a.before:
        versions.append(("before", a.before))
    fs = {}
    for tag, path in versions:
        jg = _load(path)
        for form in ("outside", "inside"):
            loss = make_loss(form == "inside")
            fs.setdefault((form, "batch_grad"), jax.jit(jg.batch_grad(loss)))
            fs.setdefault(
                (form, "vmap"), jax.jit(jg.clipped_grad(loss, l2_clip=1.0, method="vmap"))
            )
            fs[(form, tag)] = jax.jit(jg.clipped_grad(loss, l2_clip=1.0))
            one = jax.tree_util.tree_map(lambda x: x[0], batch)
            print(f"{tag}, the weights transformed {form} the step:")
            for lp in jg.fast.plan(loss, params, one).leaves:
                print(f"  {lp.path:8s} {lp.route[:100]}")
    names = {f"{form} {name}": key for key in fs for form, name in [key]}

    def q(t, num, den):
        return "{1:.2f} (IQR {0:.2f}-{2:.2f})".format(*t.ratio_quartiles(num, den))

    for form in ("outside", "inside"):
        progs = {n: fs[key] for n, key in names.items() if key[0] == form}
        t = timing.interleaved(progs, args=(params, batch, mask), rounds=a.rounds)
        base = f"{form} batch_grad"
        print(f"transformed {form} the step: batch_grad {t.seconds[base] * 1e3:.1f} ms")
        for tag in [tag for tag, _ in versions] + ["vmap"]:
            name = f"{form} {tag}"
            ms = t.seconds[name] * 1e3
            print(f"  clipped_grad ({tag}) {ms:7.1f} ms, ÷ batch_grad {q(t, name, base)}")
        if a.before:
            print(f"  this ÷ before, per round: {q(t, f'{form} this', f'{form} before')}")
    print(
        f"{jax.devices()[0].device_kind} · {a.model}: B = {a.batch}, H = {a.hidden}, "
        f"T = {a.steps}, L = {a.layers}, float32 · {a.rounds} rounds"
    )


if __name__ == "__main__":
    main()
