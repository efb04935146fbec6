"""``--sweep``: how each method scales with batch size and with model width.

Two one-dimensional sweeps of the MLP ``784-w-w/2-10`` (tanh): batch size at ``w = 512``
(the default MLP) and width at one batch size. They show where materialising the
``B × P`` per-example array stops fitting in memory (those rows are recorded as
``skipped: would exceed N GB`` rather than run) and whether the fast path's cost stays a
constant multiple of ``batch_grad``'s as ``B`` and ``P`` grow.
"""

from __future__ import annotations

from collections.abc import Iterable

from jaxgrad.bench.peers.harness import Row
from jaxgrad.bench.peers.specs import Method, sweep_mlp_spec

DEFAULT_BATCH_SIZES = (32, 128, 512, 1024, 2048, 4096)
DEFAULT_WIDTHS = (128, 256, 512, 1024, 2048)
BATCH_SWEEP_WIDTH = 512


def plan(
    methods: Iterable[Method],
    *,
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    widths: Iterable[int] = DEFAULT_WIDTHS,
    width_batch_size: int = 512,
) -> list[Row]:
    """The rows of both sweeps, smallest first, every method at every point."""
    methods, batch_sizes, widths = list(methods), sorted(set(batch_sizes)), sorted(set(widths))
    if width_batch_size < 1:
        raise ValueError(f"`width_batch_size` must be a positive integer; got {width_batch_size}")
    rows = []
    spec = sweep_mlp_spec(BATCH_SWEEP_WIDTH)
    for b in batch_sizes:
        tags = {"sweep_axis": "batch", "width": BATCH_SWEEP_WIDTH}
        rows += [Row(m, spec, b, tags) for m in methods]
    for w in widths:
        tags = {"sweep_axis": "width", "width": w}
        rows += [Row(m, sweep_mlp_spec(w), width_batch_size, tags) for m in methods]
    return rows
