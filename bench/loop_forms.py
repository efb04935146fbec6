"""Loop forms side by side (the probe behind bench/results/loops-probe.txt).

For each model and B in (32, 256), interleaved rounds of accumulate_grad over 4 microbatches
with unroll="auto" (jaxgrad._loops policy), unroll=4 (JAX's own unroll) and unroll=False
(lax.scan), and per_example_grads unchunked and with chunk_size=32 (not for the transformer).

Usage: ``python bench/loop_forms.py rnn,cnn-ws,transformer,cnn,mlp``
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxgrad import grads
from jaxgrad.bench import suite

for name in sys.argv[1].split(","):
    case = suite.CASES[name]()
    p = case.model.init(jax.random.key(0))
    for B in (32, 256):
        b = case.make_batch(B)
        m = jnp.ones(B, bool)
        fs = {
            "policy": jax.jit(grads.accumulate_grad(case.loss_fn, num_microbatches=4)),
            "unroll=4": jax.jit(grads.accumulate_grad(case.loss_fn, num_microbatches=4, unroll=4)),
            "scan": jax.jit(grads.accumulate_grad(case.loss_fn, num_microbatches=4, unroll=False)),
        }
        if name != "transformer":
            fs["pe"] = jax.jit(grads.per_example_grads(case.loss_fn))
            fs["pe32"] = jax.jit(grads.per_example_grads(case.loss_fn, chunk_size=32))
        for f in fs.values():
            jax.block_until_ready(f(p, b, m))
        t = {k: [] for k in fs}
        for r in range(5):
            for k, f in list(fs.items()) if r % 2 else list(fs.items())[::-1]:
                s = time.perf_counter()
                jax.block_until_ready(f(p, b, m))
                t[k].append(time.perf_counter() - s)
        med = {k: statistics.median(v) for k, v in t.items()}
        line = f"{name} B={B} " + " ".join(f"{k} {v * 1e3:.1f}ms" for k, v in med.items())
        ratio = med["unroll=4"] / med["policy"], med["unroll=4"] / med["scan"]
        line += f" | policy/unrolled throughput {ratio[0]:.2f} scan/unrolled {ratio[1]:.2f}"
        if "pe" in med:
            line += f" pe32/pe {med['pe'] / med['pe32']:.2f}"
        print(line, flush=True)
