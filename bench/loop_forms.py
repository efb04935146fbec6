"""Loop forms side by side (the probe behind bench/results/loops-*.txt).

For each model and B in (32, 256), interleaved rounds of ``accumulate_grad`` over 4
microbatches in every loop form — ``unroll="auto"`` (the policy, ``jaxgrad._loops``),
``True`` (fenced unroll), ``4`` (JAX's own unroll: the unrolled form the benchmark's
``accumulate_grad(4 unrolled)`` row times), ``2`` (partial unroll) and ``False``
(``lax.scan``) — and ``per_example_grads`` unchunked and with ``chunk_size=32``. Prints, per
row, the median and the minimum seconds per call of each form and every form's throughput
over the unrolled form's (from the minima: on a shared machine the least-disturbed call).

Usage: ``python bench/loop_forms.py mlp,cnn,transformer,rnn [rounds] [pe]`` (``pe``: only the
per_example_grads rows).
"""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jaxgrad import _loops, grads
from jaxgrad.bench import suite


def _loop_body(jaxpr):
    """The scan over the microbatches: the first scan of length 4, at any depth."""
    for e in jaxpr.eqns:
        if e.primitive.name == "scan" and e.params["length"] == 4:
            return e
        for sub in jcore.jaxprs_in_params(e.params):
            found = _loop_body(sub)
            if found is not None:
                return found
    return None


rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
pe_only = sys.argv[3:] == ["pe"]  # only per_example_grads, unchunked and chunk_size=32
for name in sys.argv[1].split(","):
    case = suite.CASES[name]()
    p = case.model.init(jax.random.key(0))
    for B in (32, 256):
        b = case.make_batch(B)
        m = jnp.ones(B, bool)
        acc = {
            u: jax.jit(grads.accumulate_grad(case.loss_fn, num_microbatches=4, unroll=u))
            for u in ("auto", True, 4, 2, False)
        }
        fs = {} if pe_only else {f"acc[{u}]": f for u, f in acc.items()}
        fs["pe"] = jax.jit(grads.per_example_grads(case.loss_fn))
        fs["pe32"] = jax.jit(grads.per_example_grads(case.loss_fn, chunk_size=32))
        for f in fs.values():
            jax.block_until_ready(f(p, b, m))
        t = {k: [] for k in fs}
        for r in range(rounds):
            for k, f in list(fs.items()) if r % 2 else list(fs.items())[::-1]:
                s = time.perf_counter()
                jax.block_until_ready(f(p, b, m))
                t[k].append(time.perf_counter() - s)
        lo = {k: min(v) for k, v in t.items()}
        med = {k: statistics.median(v) for k, v in t.items()}
        body = _loop_body(jax.make_jaxpr(acc[False])(p, b, m).jaxpr)
        step = _loops.describe_jaxpr(
            body.params["jaxpr"], body.params["num_carry"], body.params["num_consts"]
        )
        load = os.getloadavg()[0]
        chosen = _loops.form(4, "auto", step)
        line = f"{name} B={B} [{step.flops / 1e6:.0f} MFLOP/step, {step.intensity:.0f} flops"
        line += f" per number handed on, conv {step.convolution}; policy: unrolled"
        line += f" {chosen.unrolled}; load {load:.1f}] ms median/min: "
        line += " ".join(f"{k} {med[k] * 1e3:.1f}/{lo[k] * 1e3:.1f}" for k in fs)
        line += (
            ""
            if pe_only
            else " | x unrolled (min): "
            + " ".join(f"{k} {lo['acc[4]'] / lo[k]:.2f}" for k in fs if k.startswith("acc"))
        )
        line += f" | pe32/pe {lo['pe'] / lo['pe32']:.2f}"
        print(line, flush=True)
