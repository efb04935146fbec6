"""Page faults and kernel time per call of batch_grad, clipped_grad and per_example_norms.

Run: python bench/clip_faults.py MODEL BATCH [reuse] (a model of ``jaxgrad.bench.suite.CASES``;
``reuse``: first ``allocator.reuse_freed_memory()``). Each program is warmed up (3 calls),
then called 10 times; ``resource.getrusage`` gives the minor page faults (in MiB of 4 KiB
pages), the system (kernel) and the user CPU time per call, and XLA's planned temporaries
(``Compiled.memory_analysis()``). A program whose temporaries glibc maps afresh at every call
faults them all in again: system time that ``clip_cost.py``'s CPU time includes.
"""

import json
import resource
import sys

from jaxgrad.bench import allocator


def main(name: str, size: int) -> dict:
    import jax
    from clip_cost import programs  # (this directory: run as a script)

    fns, params, batch = programs(name, size)
    out = {}
    for key, f in fns.items():
        temp = f.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
        for _ in range(3):
            jax.block_until_ready(f(params, batch))
        r0, n = resource.getrusage(resource.RUSAGE_SELF), 10
        for _ in range(n):
            jax.block_until_ready(f(params, batch))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out[key] = {
            "temp_MiB": round(temp / 2**20, 1),
            "faulted_MiB": round((r1.ru_minflt - r0.ru_minflt) / n * 4096 / 2**20, 1),
            "sys_ms": round((r1.ru_stime - r0.ru_stime) / n * 1e3, 1),
            "user_ms": round((r1.ru_utime - r0.ru_utime) / n * 1e3, 1),
        }
    return {"model": name, "B": size, **out}


if __name__ == "__main__":
    reuse = sys.argv[3:] == ["reuse"]
    if reuse and not allocator.reuse_freed_memory():  # before JAX runs anything
        sys.exit("reuse: this C library has no mallopt (not glibc)")
    print(json.dumps({**main(sys.argv[1], int(sys.argv[2])), "reuse": reuse}))
