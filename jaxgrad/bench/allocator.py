"""The process's C allocator, tuned for timing XLA:CPU programs (no JAX import here: a
subprocess can load this file alone, before anything else)."""

from __future__ import annotations

import ctypes

# glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def reuse_freed_memory(*, limit: int = 1 << 30, libc=None) -> bool:
    """Makes glibc's ``malloc`` keep freed memory and hand it out again: no page faults on
    the buffers XLA:CPU allocates and frees at every call.

    XLA:CPU allocates one program's temporary buffer with ``malloc`` at every call. glibc
    serves a block above its mmap threshold (dynamic, at most 32 MiB; any block above 64 MiB
    in a thread's arena) with a fresh ``mmap`` and unmaps it when freed, so every call
    page-faults the whole buffer in again: kernel time proportional to the temporaries, on
    top of the computation. Measured (``resource.getrusage``, per call, a loaded 2-core CPU):
    the RNN at B = 256, ``batch_grad`` 27 MiB of temporaries (under the threshold: reused)
    and 2.6 ms of system time, ``clipped_grad`` 49 MiB faulted in at every call and 25 ms of
    system time (user time 63 ms against 54 ms); at B = 1024 both fault (107 and 194 MiB).
    With one arena, no mmap below ``limit`` bytes and no trimming below it, the freed
    blocks are reused and both spend under 15 ms in the kernel.

    Process-wide, so never done on import: call it first thing, before JAX runs anything
    (arenas that threads already hold keep their 64 MiB limit). Memory the process freed
    then stays with it (its peak resident set, up to ``limit`` unreturned).

    Args:
      limit: the mmap and trim thresholds in bytes (a C ``int``; default 1 GiB).
      libc: the C library (for tests); default the process's own.

    Returns:
      Whether it was applied (False where the C library has no ``mallopt``: not glibc).

    Example::

      >>> from jaxgrad.bench import allocator
      >>> class FakeLibc:  # records the calls instead of changing this process
      ...     def __init__(self): self.calls = []
      ...     def mallopt(self, param, value): self.calls.append((param, value)); return 1
      >>> libc = FakeLibc()
      >>> allocator.reuse_freed_memory(limit=1 << 30, libc=libc), libc.calls[0]
      (True, (-8, 1))
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit < 1 << 31:
        raise ValueError(f"`limit` must be an int in [1, 2**31 - 1] (bytes); got {limit!r}")
    if libc is None:
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, limit), (_M_TRIM_THRESHOLD, limit))
    return all([mallopt(param, value) == 1 for param, value in settings])


def add_flag(parser) -> None:
    """Adds ``--reuse-memory`` to an ``argparse`` parser (every ``python -m jaxgrad.bench``
    mode has it; :func:`apply_flag` acts on it)."""
    parser.add_argument(
        "--reuse-memory",
        action="store_true",
        help="first make glibc's malloc keep freed memory (allocator.reuse_freed_memory): no "
        "program then page-faults its XLA temporaries in at every call, which otherwise adds "
        "kernel time to those above glibc's mmap threshold (32 MiB) only",
    )


def apply_flag(args, parser) -> bool:
    """``--reuse-memory``: :func:`reuse_freed_memory` in this process (call it before JAX
    runs anything), or the parser's error where the C library has no ``mallopt``. Returns
    whether the flag was given."""
    if args.reuse_memory and not reuse_freed_memory():
        parser.error("--reuse-memory: this C library has no mallopt (it is not glibc)")
    return args.reuse_memory
