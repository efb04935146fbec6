"""Timing and memory of one jitted function: compile time apart, median after warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Any, NamedTuple

import jax


class Measurement(NamedTuple):
    """One function on one input.

    ``seconds`` is the median wall time of a call after warm-up (outputs blocked on);
    ``compile_s`` the first call's extra time (tracing + XLA compilation);
    ``peak_bytes`` the XLA-planned peak of the compiled program (arguments + outputs +
    temporaries, from ``Compiled.memory_analysis()``), or None where there is no single
    program (a Python loop).
    """

    seconds: float
    compile_s: float
    repeats: int
    peak_bytes: int | None


def compiled_peak_bytes(f, *args) -> int | None:
    """XLA's planned peak memory for ``jax.jit(f)(*args)``: arguments, outputs and temporaries.

    Deterministic and independent of the allocator and of other processes, unlike RSS, so
    two strategies can be compared on a shared machine. Returns None where the backend does
    not report it.
    """
    try:
        stats = jax.jit(f).lower(*args).compile().memory_analysis()
    except Exception:  # a function that is not one program (a Python loop) has no analysis
        return None
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def measure(
    f, *args: Any, min_repeats: int = 3, max_repeats: int = 25, min_seconds: float = 0.3
) -> Measurement:
    """Times ``f(*args)``: one warm-up call (its time minus the median is the compile time),
    then repeats until ``min_repeats`` and ``min_seconds`` are both reached, at most
    ``max_repeats``; returns the median.
    """
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < min_seconds):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return Measurement(median, max(first - median, 0.0), len(times), None)
