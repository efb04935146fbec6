"""Speed and memory of jaxgrad.fast against batch_grad and vmap(grad), float32, side by side:
per model, the programs timed together in interleaved rounds (``jaxgrad.bench.timing``).

Run: /work/venv/bin/python bench/fast_measure.py [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxgrad
from jaxgrad.bench import timing
from jaxgrad.bench.bandwidth import write_bandwidth_bound
from jaxgrad.fast import clipped_grad, per_example_norms


def peak_bytes(f, *args):
    """Compiled temp + output bytes (XLA's static buffer assignment) of ``f`` jitted."""
    m = jax.jit(f).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes


def mlp_case(size):
    model = jaxgrad.models.mlp([784, 512, 256, 10], activation="tanh")
    loss = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.softmax_cross_entropy)
    k1, k2 = jax.random.split(jax.random.key(0))
    batch = (jax.random.normal(k1, (size, 784)), jnp.arange(size) % 10)
    return loss, model.init(k2), batch


def cnn_case(size):
    model = jaxgrad.models.cnn(image_shape=(28, 28), channels=(16, 32), num_classes=10)
    loss = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.softmax_cross_entropy)
    k1, k2 = jax.random.split(jax.random.key(0))
    batch = (jax.random.normal(k1, (size, 28, 28)), jnp.arange(size) % 10)
    return loss, model.init(k2), batch


def transformer_case(size):
    model = jaxgrad.models.transformer(
        vocab_size=512, max_len=32, d_model=64, num_heads=4, num_layers=2
    )
    loss = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.token_cross_entropy)
    k1, k2 = jax.random.split(jax.random.key(0))
    tokens = jax.random.randint(k1, (size, 32), 1, 512)
    tokens = tokens.at[::4, 20:].set(0)  # some padding
    return loss, model.init(k2), (tokens, jnp.roll(tokens, -1, axis=1))


def vmap_clip(loss, l2_clip):
    """Plain JAX vmap(grad) + clip + mean, the baseline a user would write."""
    summed = jaxgrad.reduce.loss_sum_fn(loss)

    @jax.jit
    def f(params, batch):
        g = jax.vmap(jax.grad(summed), in_axes=(None, 0))(params, batch)
        leaves = jax.tree_util.tree_leaves(g)
        sq = sum(jnp.sum(x.reshape(x.shape[0], -1) ** 2, 1) for x in leaves)
        c = jnp.minimum(1.0, l2_clip / jnp.sqrt(sq))
        return jax.tree_util.tree_map(lambda x: jnp.tensordot(c, x, 1) / x.shape[0], g)

    return f


def plain_vmap_grad(loss):
    summed = jaxgrad.reduce.loss_sum_fn(loss)
    return jax.jit(jax.vmap(jax.grad(summed), in_axes=(None, 0)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="mlp,cnn,transformer")
    args = parser.parse_args()
    r = args.repeats
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__}, {device}, float32, medians of {r} interleaved rounds")
    for name, make in [("mlp", mlp_case), ("cnn", cnn_case), ("transformer", transformer_case)]:
        if name not in args.only.split(","):
            continue
        loss, params, batch = make(256)
        mask = jnp.ones(256, bool)
        fns = {
            "batch_grad": jaxgrad.batch_grad(loss),
            "clipped_grad": clipped_grad(loss, l2_clip=1.0),
            "per_example_norms": per_example_norms(loss),
        }
        if not args.quick:  # these take (params, batch): the mask is dropped
            for label, f in (
                ("vmap(grad)+clip", vmap_clip(loss, 1.0)),
                ("per_example_grads", jaxgrad.per_example_grads(loss)),
                ("plain vmap(grad)", plain_vmap_grad(loss)),
            ):
                fns[label] = lambda p, b, m, f=f: f(p, b)
        t = timing.interleaved(fns, args=(params, batch, mask), rounds=r).seconds
        t_bg, t_cg = t["batch_grad"], t["clipped_grad"]
        print(
            f"\n[{name}] B=256  batch_grad {t_bg * 1e3:.2f} ms  clipped_grad {t_cg * 1e3:.2f} ms"
            f"  per_example_norms {t['per_example_norms'] * 1e3:.2f} ms"
        )
        print(f"  throughput clipped_grad / batch_grad = {t_bg / t_cg:.2f}")
        if not args.quick:
            t_vc = t["vmap(grad)+clip"]
            print(f"  vmap(grad)+clip {t_vc * 1e3:.2f} ms -> speed-up {t_vc / t_cg:.1f}x")
            t_pe, t_pv = t["per_example_grads"], t["plain vmap(grad)"]
            n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
            bw = write_bandwidth_bound(256 * n_params * 4)
            print(
                f"  jaxgrad.per_example_grads {t_pe * 1e3:.2f} ms, plain vmap(grad) "
                f"{t_pv * 1e3:.2f} ms (ratio {t_pe / t_pv:.2f}); writing B x P = "
                f"{256 * n_params * 4 / 1e6:.0f} MB takes >= {bw * 1e3:.2f} ms"
            )
        for size in (256, 2048):
            lf, p, b = make(size)
            m = jnp.ones(size, bool)
            mem_bg = peak_bytes(jaxgrad.batch_grad(lf), p, b, m)
            mem_cg = peak_bytes(clipped_grad(lf, l2_clip=1.0), p, b, m)
            print(
                f"  B={size}: peak bytes batch_grad {mem_bg / 1e6:.1f} MB, clipped_grad "
                f"{mem_cg / 1e6:.1f} MB, ratio {mem_cg / mem_bg:.2f}"
            )


if __name__ == "__main__":
    main()
