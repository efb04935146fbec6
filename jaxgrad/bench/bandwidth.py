"""The memory-bandwidth floor of materialising per-example gradients.

Any method that writes a ``B × P`` array of per-example gradients takes at least as long as
writing ``B × P`` fresh floats to memory. :func:`write_bandwidth_bound` measures that floor on
the current device: a jitted op that produces a fresh array of the given size from a tiny
input (so reading costs nothing), best of several repeats.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


@functools.cache
def _writer(num_floats: int):
    @jax.jit
    def write(x):
        # An iota scaled by a runtime scalar: XLA cannot constant-fold it, and the output is
        # a fresh buffer, so the time is that of writing num_floats float32s.
        return jax.lax.iota(jnp.float32, num_floats) * x

    return write


def write_bandwidth_bound(num_bytes: int, *, repeats: int = 7) -> float:
    """Seconds to write ``num_bytes`` of fresh float32 data: a lower bound for ``B × P`` methods.

    Args:
      num_bytes: how many bytes to write (rounded down to whole float32s, at least one).
      repeats: timed runs after one warm-up; the best (minimum) is returned, the figure least
        disturbed by other work on the machine.

    Returns:
      The best wall-clock time in seconds.

    Example::

      >>> from jaxgrad.bench.bandwidth import write_bandwidth_bound
      >>> seconds = write_bandwidth_bound(1 << 20)  # 1 MiB: 262,144 float32s
      >>> seconds > 0
      True
    """
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 1:
        raise ValueError(f"`num_bytes` must be a positive integer; got {num_bytes!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive integer; got {repeats!r}")
    write = _writer(max(1, num_bytes // 4))
    x = jnp.float32(1.0)
    jax.block_until_ready(write(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = write(x)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
        del out
    return best
