"""Per-example norms and the clipped sum of a small conv-in-scan model: the fast route against
the exact fallback it replaced (the kernel a per-example copy, forced here by withholding the
conv lift) and vmap(grad).

Two models: ``shared``, one kernel applied at every step of a scan over T frames (the steps
folded into the convolution's batch axis), and ``stacked``, a residual stack of T layers
whose kernels the scan is scanned over (as ``nn.scan`` over conv blocks writes it: each
step's kernel on the top-level convolution route, ``jaxgrad.fast.trace.stepwise``).

Run: ``PYTHONPATH=. python bench/conv_in_scan.py [B] [T] [rounds] [shared|stacked]``;
float32, CPU.
"""

import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrad
from jaxgrad.bench import timing
from jaxgrad.fast import trace

B, T, ROUNDS = (int(a) for a in [*sys.argv[1:4], "64", "8", "9"][:3])
MODEL = (sys.argv[4:] or ["shared"])[0]
H, C_IN, C_OUT = 16, 8, 16
NHWC = ("NHWC", "HWIO", "NHWC")


def shared_loss(p, ex):
    x, y = ex  # x: (T, H, H, C_IN)

    def step(h, xt):
        z = jax.lax.conv_general_dilated(xt[None], p["k"], (1, 1), "SAME", dimension_numbers=NHWC)
        return h + jnp.tanh(z[0]).mean((0, 1)), None

    h, _ = jax.lax.scan(step, jnp.zeros(C_OUT), x)
    return jnp.sum((h @ p["w"] - y) ** 2)


def stacked_loss(p, ex):
    x, y = ex  # x: (H, H, C_IN); p["k"]: (T, 3, 3, C_IN, C_IN), one kernel per layer

    def layer(h, k):
        z = jax.lax.conv_general_dilated(h[None], k, (1, 1), "SAME", dimension_numbers=NHWC)
        return h + jnp.tanh(z[0]), None

    h, _ = jax.lax.scan(layer, x, p["k"])
    return jnp.sum((h.mean((0, 1)) @ p["w"] - y) ** 2)


rng = np.random.default_rng(0)
if MODEL == "shared":
    loss, kernel, image = shared_loss, (3, 3, C_IN, C_OUT), (B, T, H, H, C_IN)
elif MODEL == "stacked":
    C_OUT = C_IN
    loss, kernel, image = stacked_loss, (T, 3, 3, C_IN, C_IN), (B, H, H, C_IN)
else:
    sys.exit(f"model must be 'shared' or 'stacked'; got {MODEL!r}")
params = {
    "k": jnp.asarray(rng.normal(size=kernel) / 8, jnp.float32),
    "w": jnp.asarray(rng.normal(size=(C_OUT, 10)) / 4, jnp.float32),
}
batch = (
    jnp.asarray(rng.normal(size=image), jnp.float32),
    jnp.asarray(rng.normal(size=(B, 10)), jnp.float32),
)
lift = trace.lift_over_steps


def no_conv_lift(eqn, *a, **k):  # the exact fallback, as before convolutions were lifted
    return None if eqn.primitive.name == "conv_general_dilated" else lift(eqn, *a, **k)


def compiled(f, fallback=False):
    jitted = jax.jit(f)
    if not fallback:
        return jitted.lower(params, batch).compile()
    with mock.patch.object(trace, "lift_over_steps", no_conv_lift):
        return jitted.lower(params, batch).compile()


example = jax.tree_util.tree_map(lambda a: a[0], batch)
print(jaxgrad.fast.plan(loss, params, example))
with mock.patch.object(trace, "lift_over_steps", no_conv_lift):
    print(jaxgrad.fast.plan(loss, params, example))

norms = lambda m: lambda p, b: jaxgrad.per_example_norms(loss, method=m)(p, b)
clip = lambda m: lambda p, b: jaxgrad.clipped_grad(loss, l2_clip=1.0, method=m)(p, b)
mean_loss = lambda p, b: jnp.mean(jax.vmap(loss, (None, 0))(p, b))
programs = {
    "batch_grad": compiled(lambda p, b: jaxgrad.batch_grad(loss)(p, b).grads),
    # Plain JAX: its scan body's backward convolutions stay in XLA:CPU's naive form (jaxgrad's
    # strategies rewrite them: jaxgrad.canonical_convolutions).
    "jax.grad": compiled(jax.grad(mean_loss)),
    "norms fast": compiled(norms("auto")),
    "norms fallback": compiled(norms("auto"), fallback=True),
    "norms vmap": compiled(norms("vmap")),
    "clipped fast": compiled(clip("auto")),
    "clipped fallback": compiled(clip("auto"), fallback=True),
    "clipped vmap": compiled(clip("vmap")),
}
n_fast, n_fb = programs["norms fast"](params, batch), programs["norms fallback"](params, batch)
print(
    "max rel. difference of the norms, fast vs fallback:",
    float(jnp.max(jnp.abs(n_fast - n_fb) / n_fb)),
)
t = timing.interleaved(programs, args=(params, batch), rounds=ROUNDS)
print(f"{MODEL}: B={B} T={T} {H}x{H}x{C_IN} -> {C_OUT}, 3x3 SAME, float32, {t.rounds} rounds")
for name in programs:
    q = t.ratio_quartiles(name, "batch_grad")
    print(
        f"{name:18s} {1e3 * t.seconds[name]:9.1f} ms  cpu {1e3 * t.cpu_seconds[name]:9.1f} ms"
        f"  x batch_grad {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}]"
    )
for what in ("norms", "clipped"):
    q = t.ratio_quartiles(f"{what} fallback", f"{what} fast")
    print(f"{what}: fallback / fast time {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}] (per-round quartiles)")
