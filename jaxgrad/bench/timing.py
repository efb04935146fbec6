"""Timing and memory for the benchmarks: programs timed side by side in interleaved rounds.

Every comparison of programs by speed in ``python -m jaxgrad.bench`` (the default table and
``--dp``) and in the probe scripts ``bench/*.py`` goes through :func:`interleaved`, so that
figures compared with each other are taken under the same machine load; the peers (one library
per subprocess) keep their worker's loop.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

# The clocks, module attributes so that a test can substitute a deterministic one.
_wall_clock = time.perf_counter
_cpu_clock = time.process_time

MAX_CALLS_PER_SAMPLE = 1000  # the cap on the calls that make one sample of a very fast program


class Timings(NamedTuple):
    """What :func:`interleaved` measured, each field a dict keyed by program name.

    ``seconds``: median wall seconds of one call over the rounds; ``cpu_seconds``: the same
    for the process's CPU time (all of XLA's threads: on a shared machine, a steadier measure
    of the work done); ``compile_s``: the first call's time minus the median (tracing and XLA
    compilation, at least 0); ``rounds``: how many rounds ran (every program has one sample
    per round); ``calls_per_sample``: the calls timed together as one sample; ``samples``:
    the wall seconds per call of each round, in round order.
    """

    seconds: dict[str, float]
    cpu_seconds: dict[str, float]
    compile_s: dict[str, float]
    rounds: int
    calls_per_sample: dict[str, int]
    samples: dict[str, tuple[float, ...]]

    def ratio_quartiles(self, numerator: str, denominator: str) -> tuple[float, float, float]:
        """Quartiles (25 %, median, 75 %) over the rounds of
        ``time(numerator) / time(denominator)`` within each round: the spread of a ratio
        whose two times shared each round's machine load.

        ``ratio_quartiles("batch_grad", name)`` is ``name``'s throughput relative to
        ``batch_grad``'s.
        """
        for which, name in (("numerator", numerator), ("denominator", denominator)):
            if name not in self.samples:
                raise KeyError(f"{which} {name!r} is not a timed program; got {list(self.samples)}")
        ratios = [
            a / b for a, b in zip(self.samples[numerator], self.samples[denominator], strict=True)
        ]
        if len(ratios) == 1:
            return (ratios[0],) * 3
        q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return q1, q2, q3


def interleaved(
    programs: Mapping[str, Callable[..., Any]],
    *,
    args: tuple | Callable[[str, int], tuple] = (),
    rounds: int,
    min_seconds: float = 0.0,
    max_rounds: int = 25,
    min_sample_seconds: float = 1e-3,
    on_first_call: Callable[[str], None] | None = None,
) -> Timings:
    """Times several programs side by side: one sample of each per round, medians over rounds.

    Each program is first called once (tracing and compilation: ``compile_s`` is that call's
    time minus the median), then warmed up: one call, or three if the first was under
    ``min_sample_seconds`` (the call after compilation is sometimes slower than the next).

    Then come the rounds. A round takes one sample of every program: ``n`` calls in a row,
    each blocked on (:func:`jax.block_until_ready`: the latency of a call, not pipelined
    throughput), the sample's time divided by ``n``. ``n`` is 1 unless the fastest warm-up
    call took less than ``min_sample_seconds``; then it is
    ``⌈min_sample_seconds / fastest warm-up call⌉`` (at most :data:`MAX_CALLS_PER_SAMPLE`),
    so that a sample of a microsecond program is not dominated by the clock reads and the
    Python between samples, nor by one scheduler hiccup. The order rotates: round ``r`` starts
    with program ``r mod K`` of the ``K`` and goes on cyclically, so that over ``K`` rounds
    every program takes every position once: none is always first (after the Python between
    rounds) or always last. With two programs it alternates ``ab, ba, ab, ...``; with more,
    a program still mostly follows the same neighbour (the one before it in ``programs``),
    a deterministic order that balances the positions exactly every ``K`` rounds.
    A change of machine load then moves all the programs' samples of a round together, and
    ratios of their medians, or the per-round ratios of :meth:`Timings.ratio_quartiles`, compare
    programs under the same conditions, where timing one program after another compares them
    under different ones.

    At least ``rounds`` rounds run; more are added while the timed seconds of all the
    rounds so far (all programs together) are below ``min_seconds``, up to ``max_rounds``.

    Args:
      programs: name -> callable, in the order of the first round; e.g. jitted functions.
      args: the positional arguments of every call: one tuple for all programs and rounds,
        or a function ``args(name, r) -> tuple`` called before each sample (outside the
        timed region) with the program's name and the round ``r = 0, 1, ...``; ``r = -1``
        for the first and the warm-up calls. For a fresh PRNG key per round, e.g.
        ``lambda name, r: (params, jax.random.fold_in(key, r + 1))``. The calls of one
        sample share their arguments.
      rounds: the least number of rounds (a positive integer).
      min_seconds: add rounds until the rounds took this long in all (0: exactly
        ``rounds`` rounds).
      max_rounds: no rounds are added past this many (``rounds`` always run).
      min_sample_seconds: a sample of a program faster than this is several calls (above).
      on_first_call: called with each program's name before its first (compiling) call,
        e.g. to report progress.

    Returns:
      :class:`Timings`: per name, the median seconds per call (wall and CPU), the compile
      seconds, the calls per sample and the per-round samples, and the number of rounds.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.bench import timing
      >>> x = jnp.ones((64, 64))
      >>> fns = {"x @ x": jax.jit(lambda x: x @ x), "x @ x @ x": jax.jit(lambda x: x @ x @ x)}
      >>> t = timing.interleaved(fns, args=(x,), rounds=3)
      >>> t.rounds, sorted(t.seconds), t.compile_s["x @ x"] >= 0
      (3, ['x @ x', 'x @ x @ x'], True)
      >>> low, median, high = t.ratio_quartiles("x @ x @ x", "x @ x")  # time ratio per round
      >>> draw = {"normal": jax.jit(lambda k: jax.random.normal(k, (1000,)))}
      >>> key = jax.random.key(0)
      >>> t = timing.interleaved(  # a new key every round
      ...     draw, args=lambda name, r: (jax.random.fold_in(key, r + 1),), rounds=2
      ... )
      >>> len(t.samples["normal"])
      2
    """
    _check(programs, rounds, min_seconds, max_rounds, min_sample_seconds)
    names = list(programs)
    arguments = args if callable(args) else (lambda name, r: args)
    first = {}
    for name in names:
        if on_first_call is not None:
            on_first_call(name)
        first[name] = _sample(programs[name], arguments(name, -1), 1)[0]
    number = {}
    for name in names:
        number[name] = _calls_per_sample(programs[name], arguments(name, -1), min_sample_seconds)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    spent, r = 0.0, 0
    while r < rounds or (spent < min_seconds and r < max_rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            w, c = _sample(programs[name], arguments(name, r), number[name])
            wall[name].append(w)
            cpu[name].append(c)
            spent += w * number[name]
        r += 1
    seconds = {name: statistics.median(wall[name]) for name in names}
    return Timings(
        seconds=seconds,
        cpu_seconds={name: statistics.median(cpu[name]) for name in names},
        compile_s={name: max(first[name] - seconds[name], 0.0) for name in names},
        rounds=r,
        calls_per_sample=number,
        samples={name: tuple(wall[name]) for name in names},
    )


def _calls_per_sample(f, args: tuple, min_sample_seconds: float) -> int:
    """The warm-up calls, and from the fastest the calls that make one sample."""
    warm = _sample(f, args, 1)[0]
    if warm < min_sample_seconds:
        warm = min(warm, *(_sample(f, args, 1)[0] for _ in range(2)))
    return min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(min_sample_seconds / max(warm, 1e-9))))


def _sample(f, args: tuple, number: int) -> tuple[float, float]:
    """Wall and CPU seconds per call of ``number`` calls of ``f(*args)``, each blocked on."""
    cpu_start, start = _cpu_clock(), _wall_clock()
    for _ in range(number):
        jax.block_until_ready(f(*args))
    return (_wall_clock() - start) / number, (_cpu_clock() - cpu_start) / number


def _check(programs, rounds, min_seconds, max_rounds, min_sample_seconds) -> None:
    if not isinstance(programs, Mapping) or not programs:
        raise ValueError(f"programs must be a non-empty mapping name -> callable; got {programs!r}")
    not_callable = [name for name, f in programs.items() if not callable(f)]
    if not_callable:
        raise TypeError(f"programs must map names to callables; not callable: {not_callable}")
    for name, value in (("rounds", rounds), ("max_rounds", max_rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    for name, value in (("min_seconds", min_seconds), ("min_sample_seconds", min_sample_seconds)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative finite number; got {value!r}")


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
