"""Reparametrised weights on the fast path: ``per_example_norms`` and ``clipped_grad`` over
``batch_grad`` on three programs.

* ``wn-stack``: ``L`` residual layers ``h + tanh(h @ W)`` with ``W = g ⊙ V / ‖V_o‖`` (weight
  normalisation) over ``T`` positions, a mean-pooled head (B 256, T 16, d 128, L 4);
* ``transformer``: ``E.at[pad].set(0)`` read by the token lookup and, tied, by the output
  projection ``h @ E_eff.T``; ``L`` pre-norm attention + MLP blocks, ``T`` positions (B 64,
  T 32, d 64, L 2, vocabulary 512);
* ``made``: a MADE MLP (masks ``M`` full, not a row and a column factor, built from the
  degrees as in Germain et al. 2015), Bernoulli log-likelihood, no sequence axis (B 64);
* ``lora``: ``wn-stack``'s layers with merged LoRA weights ``W0 + A @ B`` (rank 8) instead;
* ``fake-quant``: ``wn-stack``'s layers with 8-bit fake-quantised weights, the
  straight-through estimator ``W + stop_gradient(q(W) - W)``.

Timed in interleaved rounds (``jaxgrad.bench.timing.interleaved``: the median of the
per-round ratios, and its interquartile range), after printing the plan. Run from a checkout
(``PYTHONPATH=.`` for this tree's code)::

    python bench/reparam.py --model made --pairs 15
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import batch_grad, clipped_grad, per_example_norms
from jaxgrad.bench import timing
from jaxgrad.fast import plan


def wn_stack(rng, a):
    def layer(d):
        v = jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32)
        return {"v": v, "g": jnp.ones((d,), jnp.float32)}

    def weight(p):
        v = p["v"]
        return p["g"] * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))

    return _stack(rng, a, weight, layer)


def _stack(rng, a, weight, layer_params):
    """``L`` residual layers ``h + tanh(h @ weight(p_l))`` over ``T`` positions, pooled."""
    b, t, d = a.batch, a.positions, a.width
    params = {f"l{i}": layer_params(d) for i in range(a.layers)}
    params["head"] = jnp.asarray(rng.normal(size=(d, 10)) / np.sqrt(d), jnp.float32)
    batch = (
        jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
        jnp.asarray(rng.integers(0, 10, size=(b,))),
    )

    def loss(p, ex):
        h, label = ex
        for i in range(a.layers):
            h = h + jnp.tanh(h @ weight(p[f"l{i}"]))
        return -jax.nn.log_softmax(jnp.mean(h, axis=0) @ p["head"])[label]

    return loss, params, batch


def lora(rng, a):
    w = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
    layer = lambda d: {"w0": w(d, d), "a": w(d, a.rank), "b": w(a.rank, d) / 4}
    return _stack(rng, a, lambda p: p["w0"] + p["a"] @ p["b"], layer)


def fake_quant(rng, a):
    def quantised(p):  # 8 bits per tensor, the straight-through estimator
        w = p["w"]
        scale = jnp.max(jnp.abs(w)) / 127
        return w + jax.lax.stop_gradient(jnp.round(w / scale) * scale - w)

    layer = lambda d: {"w": jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32)}
    return _stack(rng, a, quantised, layer)


def transformer(rng, a):
    v, d, t, heads = a.vocab, a.width, a.positions, 4
    w = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
    params = {"E": w(v, d) * np.sqrt(v / d), "pos": w(t, d)}
    for i in range(a.layers):
        params[f"b{i}"] = {"qkv": w(d, 3 * d), "o": w(d, d), "up": w(d, 4 * d), "down": w(4 * d, d)}
    toks = jnp.asarray(rng.integers(0, v, size=(a.batch, t + 1)))

    def norm(h):
        return (h - jnp.mean(h, -1, keepdims=True)) / jnp.sqrt(jnp.var(h, -1, keepdims=True) + 1e-5)

    def loss(p, seq):
        table = p["E"].at[0].set(0.0) if a.pad else p["E"]  # the padding token's row
        x, y = seq[:-1], seq[1:]
        h = table[x] + p["pos"]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for i in range(a.layers):
            q, k, vv = jnp.split(norm(h) @ p[f"b{i}"]["qkv"], 3, axis=-1)
            q, k, vv = (z.reshape(t, heads, d // heads) for z in (q, k, vv))
            s = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(d // heads)
            att = jax.nn.softmax(jnp.where(causal, s, -1e9), axis=-1)
            h = h + jnp.einsum("hts,shd->thd", att, vv).reshape(t, d) @ p[f"b{i}"]["o"]
            h = h + jax.nn.gelu(norm(h) @ p[f"b{i}"]["up"]) @ p[f"b{i}"]["down"]
        logits = norm(h) @ table.T  # tied output projection
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    return loss, params, toks


def made(rng, a):
    d, hdim = a.inputs, a.hidden
    degrees = [np.arange(1, d + 1)] + [rng.integers(1, d, size=hdim) for _ in range(a.layers)]
    masks = [(degrees[i + 1][None, :] >= degrees[i][:, None]) for i in range(a.layers)]
    masks.append(degrees[-1][:, None] < degrees[0][None, :])  # the output: strictly
    masks = [jnp.asarray(m, jnp.float32) for m in masks]
    sizes = [d] + [hdim] * a.layers + [d]
    params = {
        f"l{i}": {
            "w": jnp.asarray(rng.normal(size=sizes[i : i + 2]) / np.sqrt(sizes[i]), jnp.float32),
            "b": jnp.zeros((sizes[i + 1],), jnp.float32),
        }
        for i in range(len(masks))
    }
    x = jnp.asarray(rng.random(size=(a.batch, d)) < 0.5, jnp.float32)

    def loss(p, x):
        h = x
        for i, m in enumerate(masks):
            h = h @ (p[f"l{i}"]["w"] * m) + p[f"l{i}"]["b"]
            h = jnp.tanh(h) if i < len(masks) - 1 else h
        return jnp.sum(jax.nn.softplus(h) - x * h)  # Bernoulli negative log-likelihood

    return loss, params, x


# model -> (builder, its default sizes)
MODELS = {
    "wn-stack": (wn_stack, dict(batch=256, positions=16, width=128, layers=4)),
    "transformer": (transformer, dict(batch=64, positions=32, width=64, layers=2)),
    "made": (made, dict(batch=64, layers=2)),
    "lora": (lora, dict(batch=256, positions=16, width=128, layers=4)),
    "fake-quant": (fake_quant, dict(batch=256, positions=16, width=128, layers=4)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=tuple(MODELS), default="transformer")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--positions", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--rank", type=int, default=8, help="lora: the rank of A @ B")
    ap.add_argument("--pairs", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--no-pad", dest="pad", action="store_false", help="a plain tied table")
    a = ap.parse_args()
    build, defaults = MODELS[a.model]
    for name, value in defaults.items():  # the model's own sizes, unless given
        if getattr(a, name) is None:
            setattr(a, name, value)
    loss, params, batch = build(np.random.default_rng(0), a)
    print(plan(loss, params, jax.tree_util.tree_map(lambda x: x[0], batch)), flush=True)
    fns = {
        "batch_grad": jax.jit(batch_grad(loss)),
        "per_example_norms": jax.jit(per_example_norms(loss)),
        "clipped_grad": jax.jit(clipped_grad(loss, l2_clip=1.0)),
    }
    t = timing.interleaved(fns, args=(params, batch), rounds=a.pairs)
    for name in ("per_example_norms", "clipped_grad"):
        q1, q2, q3 = t.ratio_quartiles(name, "batch_grad")
        print(f"{a.model} {name} / batch_grad: median {q2:.3f} (IQR {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
