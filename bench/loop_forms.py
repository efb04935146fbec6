"""Loop forms side by side, paired (the probe behind bench/results/loops-*.txt).

For each model and batch size, two pairs of programs, each timed in interleaved rounds
(``jaxgrad.bench.timing.interleaved``: the two members back to back, in alternating order, so
they share the machine's load):

* ``accumulate_grad`` over 4 microbatches in the loop policy's form (``unroll="auto"``,
  ``jaxgrad._loops``) against its unrolled form (``unroll=4``, JAX's own unrolling: the
  benchmark's ``accumulate_grad(4 unrolled)`` row);
* ``per_example_grads(chunk_size=32)`` against unchunked ``per_example_grads`` (at B = 32 one
  chunk is the whole batch, the same program: left out).

One sample is ``n`` calls (at least ~0.1 s; ``n`` per program) divided by ``n``; each round
gives one ratio per pair (the second's time over the first's: the first's throughput relative to the
second), and the line reports the median ratio with its interquartile range over the rounds,
the median milliseconds of each program, XLA's planned temporary memory of each
(``memory_analysis``, deterministic) and the form the policy chose, with its reason.

Usage: ``python bench/loop_forms.py mlp,cnn,cnn-ws,transformer,rnn [ROUNDS] [BATCH_SIZES]``
(defaults 15 rounds, batch sizes ``32,256``).
"""

import os
import sys

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jaxgrad import _loops, grads
from jaxgrad.bench import suite, timing


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


def _policy(case, args):
    """What the policy reads off the microbatch step of ``accumulate_grad(4)``, and its form."""
    scanned = grads.accumulate_grad(case.loss_fn, num_microbatches=4, unroll=False)
    body = _loop_body(jax.make_jaxpr(scanned)(*args).jaxpr)
    step = _loops.describe_jaxpr(
        body.params["jaxpr"], body.params["num_carry"], body.params["num_consts"]
    )
    return step, _loops.form(4, "auto", step)


def _temp_mb(f, args):
    return f.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def main(names, rounds, batch_sizes):
    for name in names:
        case = suite.CASES[name]()
        params = case.model.init(jax.random.key(0))
        for B in batch_sizes:
            args = (params, case.make_batch(B), jnp.ones(B, bool))
            step, chosen = _policy(case, args)
            acc = [
                jax.jit(grads.accumulate_grad(case.loss_fn, num_microbatches=4, unroll=u))
                for u in ("auto", 4)
            ]
            pairs = {"accumulate_grad(4): policy / unrolled": acc}
            if B > 32:
                pe = [
                    jax.jit(grads.per_example_grads(case.loss_fn, chunk_size=c)) for c in (32, None)
                ]
                pairs["per_example_grads: chunk=32 / unchunked"] = pe
            form = "unrolled" if chosen.unrolled else "lax.scan"
            print(
                f"{name} B={B} [{step.flops / 1e6:.0f} MFLOP/step, {step.intensity:.0f} flops per"
                f" number handed on; policy: {form} ({chosen.reason})]",
                flush=True,
            )
            for label, (first, second) in pairs.items():
                t = timing.interleaved(
                    {"first": first, "second": second},
                    args=args,
                    rounds=rounds,
                    min_sample_seconds=0.1,
                )
                q1, q2, q3 = t.ratio_quartiles("second", "first")
                t1, t2 = t.seconds["first"], t.seconds["second"]
                n1, n2 = t.calls_per_sample["first"], t.calls_per_sample["second"]
                print(
                    f"  {label}: throughput ratio median {q2:.2f} [IQR {q1:.2f}-{q3:.2f}],"
                    f" {t1 * 1e3:.1f} / {t2 * 1e3:.1f} ms, temp {_temp_mb(first, args):.1f} /"
                    f" {_temp_mb(second, args):.1f} MB ({rounds} rounds x {n1} / {n2} calls,"
                    f" load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )


if __name__ == "__main__":
    main(
        sys.argv[1].split(","),
        int(sys.argv[2]) if len(sys.argv) > 2 else 15,
        [int(b) for b in (sys.argv[3] if len(sys.argv) > 3 else "32,256").split(",")],
    )
