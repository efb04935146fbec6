"""Poisson sampling under ``jax.jit``: a fixed physical shape, a mask, and no dropped examples.

DP-SGD's accounting (:mod:`jaxgrad.privacy.accounting`) assumes *Poisson* sampling: each of
the ``N`` examples is in a step's batch independently with probability ``q``, so the realised
batch size ``b ~ Binomial(N, q)`` varies from step to step. A shuffled fixed-size batch is not
Poisson sampling and its ε would be wrong.

Under jit the sample is held as the indices of the drawn examples, padded to a fixed length,
and the count ``b``. It is consumed in *physical batches* of a fixed size ``P`` with a mask:
batch ``k`` holds drawn examples ``kP, ..., kP + P − 1``. A step runs ``⌈b / P⌉`` physical
batches (a ``lax.while_loop`` with a data-dependent trip count and fixed shapes), so a draw
larger than ``P`` is accumulated over several physical batches; nothing is truncated and
nothing recompiles.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import keys, reduce
from jaxgrad.privacy import threefry


class PoissonSample(NamedTuple):
    """One Poisson draw over a data set (see :func:`poisson_sample`).

    Attributes:
      indices: ``(⌈N/P⌉ · P,)`` int32: the drawn example indices in increasing order, then
        filler (index 0) up to the padded length.
      count: the realised batch size ``b = Σ_i m_i`` (int32 scalar).
      mask: ``(N,)`` bool: whether each example was drawn.
    """

    indices: jax.Array
    count: jax.Array
    mask: jax.Array


def check_sampling_rate(sampling_rate) -> float:
    q = reduce.as_number(sampling_rate, name="sampling_rate")
    if not math.isfinite(q) or not 0 < q <= 1:
        raise ValueError(f"`sampling_rate` must be a number in (0, 1]; got {sampling_rate!r}")
    return q


# The inclusion draw reads Threefry blocks 2⁶³ + i; the noise (gaussian.normal, add_noise) reads
# blocks 0, 1, 2, ... of its key. Without the offset, one key given to both poisson_sample and
# dp_grad made noise coordinate i a function of example i's own inclusion bits (at q = 0.05
# the noise at the drawn examples' coordinates averaged +2.1, elsewhere −0.1).
INCLUSION_OFFSET = 2**63
# For keys of other implementations (rbg), whose bits are not addressed by counter: the draw
# reads bits of fold_in(key, tag) instead of the key's own first ones, which the noise reads.
_INCLUSION_TAG = 0x73616D70  # "samp"


# The draw's other randomness — which drawn examples a truncated draw keeps, the batch drawn
# without replacement — comes from keys made of the words of Threefry blocks 2⁶² + c of the
# sample key: read by no noise of that key (blocks 0, 1, ..., one per parameter), named by no
# fold_in or split (blocks < 2³²), apart from the inclusion draw's (2⁶³ + i). A key derived
# by fold_in / split from a block the noise reads would be a function of a released noise
# coordinate (a permutation from split(key)[1], noise word 1, let one noisy coordinate of a
# zero gradient narrow a batch of 10 of 200 from 2e16 candidates to ~4000).
TRUNCATION_BLOCK = 2**62
WITHOUT_REPLACEMENT_BLOCK = 2**62 + 1
# For keys of other implementations (rbg): fold_in(key, tag), an independent stream.
_DRAW_TAGS = {TRUNCATION_BLOCK: 2**32 - 1, WITHOUT_REPLACEMENT_BLOCK: 0x776F7270}  # "worp"


def draw_key(sample_key, block: int):
    """The key made of Threefry block ``block`` of ``sample_key`` (``TRUNCATION_BLOCK`` or
    ``WITHOUT_REPLACEMENT_BLOCK``): independent of the inclusion draw and of any noise drawn
    from the same key (the block's two words are a key as ``split``'s children are); for a
    key of another implementation, ``fold_in(sample_key, tag)``.

    Args:
      sample_key: a PRNG key (typed, or raw ``uint32``).
      block: :data:`TRUNCATION_BLOCK` or :data:`WITHOUT_REPLACEMENT_BLOCK`.

    Returns:
      A key of the same kind (typed or raw) and implementation as ``sample_key``.
    """
    if not threefry.is_threefry(sample_key):
        return jax.random.fold_in(sample_key, _DRAW_TAGS[block])
    y0, y1 = threefry.words_at(sample_key, block, (1,))
    data = jnp.concatenate([y0, y1])
    if keys.is_typed_key(sample_key):
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(sample_key))
    return data


def inclusion_mask(key, *, sampling_rate: float, num_examples: int):
    """``m_i = [U_i < q]`` for ``N`` independent 64-bit uniforms ``U_i``: exactly rate ``q``.

    .. math::

        U_i = (h_i 2^{32} + l_i) / 2^{64}, \\qquad
        \\Pr(m_i) = \\lfloor q \\, 2^{64} \\rfloor / 2^{64} \\in (q - 2^{-64}, q]

    with ``(h_i, l_i)`` the two words of Threefry block ``2⁶³ + i`` (:func:`threefry.words_at`,
    fused) for a Threefry key, or ``jax.random.bits(fold_in(key, tag), (2, N), uint32)`` for
    any other key: never the bits the noise of the same key reads (its blocks ``0, 1, …``,
    :func:`jaxgrad.privacy.gaussian.normal`), so a key given both to the draw and to
    :func:`jaxgrad.privacy.dp_grad` cannot tie a noise coordinate to an example's inclusion.
    The comparison is on integers, so the inclusion probability is exactly ``q`` for every
    ``q ≥ 2⁻¹²`` (``q 2⁶⁴`` is then an integer) and never above it, and the draw does not
    depend on ``jax_enable_x64``. (``jax.random.bernoulli`` compares a float32 uniform on a
    ``2⁻²³`` grid in the default mode: its rate is ``⌈q 2²³⌉ / 2²³ ≥ q`` — 1.2e-7 for any
    ``q`` below that, e.g. 12× too many examples at ``q = 10⁻⁸`` — and a privacy accountant
    told ``q`` would understate ε.)

    Args:
      key: a PRNG key.
      sampling_rate: ``q`` in (0, 1].
      num_examples: ``N``.

    Returns:
      A bool array of shape ``(N,)``.

    Example::

      >>> import jax
      >>> from jaxgrad.privacy import inclusion_mask
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> m = inclusion_mask(entropy_key(), sampling_rate=0.25, num_examples=100_000)
      >>> m.shape, abs(float(m.mean()) - 0.25) < 0.01
      ((100000,), True)
    """
    key = keys.check_private_key(key)  # the draw: a public one amplifies nothing
    n = reduce.check_positive_int(num_examples, name="num_examples")
    q = check_sampling_rate(sampling_rate)
    if q == 1.0:
        return jnp.ones((n,), bool)
    threshold = math.floor(q * 2.0**64)  # exact: scaling a float64 by 2**64 does not round
    t_hi, t_lo = np.uint32(threshold >> 32), np.uint32(threshold & 0xFFFFFFFF)
    if threefry.is_threefry(key):
        hi, lo = threefry.words_at(key, INCLUSION_OFFSET, (n,))
    else:
        hi, lo = jax.random.bits(jax.random.fold_in(key, _INCLUSION_TAG), (2, n), jnp.uint32)
    return (hi < t_hi) | ((hi == t_hi) & (lo < t_lo))


def poisson_sample(key, *, num_examples: int, sampling_rate: float, physical_batch_size: int):
    """Draws every example independently with probability ``q``: one DP-SGD step's batch.

    .. math::

        m_i \\sim \\mathrm{Bernoulli}(q) \\text{ independently (:func:`inclusion_mask`)}, \\qquad
        b = \\sum_i m_i \\sim \\mathrm{Binomial}(N, q)

    Args:
      key: a PRNG key; the draw is a pure function of it.
      num_examples: ``N``, the size of the data set.
      sampling_rate: ``q`` in (0, 1] (``expected_batch_size / N``).
      physical_batch_size: ``P``; the index array is padded to a multiple of it so that
        :func:`physical_batch` can slice any of the ``⌈b / P⌉`` batches.

    Returns:
      A :class:`PoissonSample` ``(indices, count, mask)``.

    Example::

      >>> import jax
      >>> from jaxgrad.privacy import poisson_sample
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> s = poisson_sample(entropy_key(), num_examples=10, sampling_rate=0.5,
      ...                    physical_batch_size=4)
      >>> int(s.count) == int(s.mask.sum()), s.indices.shape
      (True, (12,))
    """
    key = keys.check_key(key)
    n = reduce.check_positive_int(num_examples, name="num_examples")
    q = check_sampling_rate(sampling_rate)
    p = reduce.check_positive_int(physical_batch_size, name="physical_batch_size")
    if -(-n // p) * p >= 2**31:  # the positions and indices are int32
        raise ValueError(
            f"`num_examples` ({n}), padded to a multiple of `physical_batch_size` ({p}), must be "
            f"below 2**31: the sampled indices are int32"
        )
    mask = inclusion_mask(key, sampling_rate=q, num_examples=n)
    return compact(mask, padded=-(-n // p) * p)


def compact(mask, *, padded: int) -> PoissonSample:
    """The :class:`PoissonSample` of an inclusion ``mask``: its examples' indices, increasing,
    padded with index 0 to length ``padded``, and their count."""
    n = mask.shape[0]
    # jnp.nonzero(mask, size=padded, fill_value=0), as one cumulative sum and one scatter:
    # drawn example i goes to position (number drawn before it); the rest stay 0.
    position = jnp.cumsum(mask, dtype=jnp.int32)
    count = position[-1]
    target = jnp.where(mask, position - 1, padded)  # out of range: dropped
    indices = (
        jnp.zeros((padded,), jnp.int32).at[target].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    )
    return PoissonSample(indices, count, mask)


def default_physical_batch_size(*, num_examples: int, sampling_rate: float) -> int:
    """The physical batch size ``P ≥ qN`` that runs the fewest rows per step on average.

    The realised batch ``b ~ Binomial(N, q)`` exceeds its mean ``qN`` about half the time, so
    ``P = qN`` runs two physical batches (mostly padding) on half the steps: ~1.5× the rows.
    A step runs ``P ⌈b / P⌉`` rows; this returns the ``P`` in ``[qN, qN + 4σ]``
    (``σ² = Nq(1−q)``) minimising its expectation, with ``b`` approximated as normal:

    .. math::

        \\mathbb E \\lceil b / P \\rceil = \\sum_{k \\ge 0} \\Pr(b > kP)

    For ``N = 60000`` that is about ``qN + 2σ``: 1.15× the rows of ``qN`` at ``qN = 256``
    (against 1.48× for ``P = qN``), 1.09× at 1024. Never more than ``N``.

    Example::

      >>> from jaxgrad.privacy import default_physical_batch_size
      >>> default_physical_batch_size(num_examples=60000, sampling_rate=256 / 60000)
      287
    """
    n = reduce.check_positive_int(num_examples, name="num_examples")
    q = check_sampling_rate(sampling_rate)
    mean, std = n * q, math.sqrt(n * q * (1 - q))
    low = max(1, min(n, math.ceil(mean)))
    if std == 0:
        return low

    def rows(size: int) -> float:
        trips, k = 0.0, 0
        while k * size < mean + 8 * std:  # Pr(b > kP), continuity-corrected
            trips += 0.5 * math.erfc((k * size + 0.5 - mean) / (std * math.sqrt(2)))
            k += 1
        return size * trips

    candidates = range(low, min(n, math.ceil(mean + 4 * std)) + 1)
    return min(candidates, key=rows)


def _normal_draw(n: int, q: float):
    """``(mean, std, cdf)`` of ``b ~ Binomial(N, q)`` approximated as normal, ``cdf(x) =
    Pr(b ≤ x)`` continuity-corrected (vectorised over ``x``)."""
    mean, std = n * q, math.sqrt(n * q * (1 - q))

    def cdf(x):
        x = np.asarray(x, np.float64)
        z = (x + 0.5 - mean) / (std * math.sqrt(2))
        return 0.5 * np.vectorize(math.erfc)(-z)

    return mean, std, cdf


def check_physical_sizes(physical_batch_size) -> tuple[int, ...]:
    """``P`` as a tuple of strictly increasing positive sizes ``(P_1, ..., P_K)``: an int is
    ``(P,)``."""
    if isinstance(physical_batch_size, (tuple, list)):
        sizes = tuple(
            reduce.check_positive_int(s, name="physical_batch_size") for s in physical_batch_size
        )
        if not sizes or any(a >= b for a, b in itertools.pairwise(sizes)):
            raise ValueError(
                "`physical_batch_size` must be a positive int or a non-empty sequence of "
                f"strictly increasing positive ints; got {physical_batch_size!r}"
            )
        return sizes
    return (reduce.check_positive_int(physical_batch_size, name="physical_batch_size"),)


def cap_sizes(sizes: tuple[int, ...], num_examples: int) -> tuple[int, ...]:
    """Physical batch sizes capped at ``N``: no draw holds more than the ``N`` examples, so a
    physical batch of ``P > N`` rows would add ``P − N`` rows of padding (exact zeros) — the
    same sum at the cost of ``P`` rows (``P = 10⁹`` asked for 130 GB before it was capped).

    Example::

      >>> from jaxgrad.privacy.sampling import cap_sizes
      >>> cap_sizes((4, 16, 100), 8)
      (4, 8)
    """
    return tuple(sorted({min(s, num_examples) for s in sizes}))


def expected_rows(*, num_examples: int, sampling_rate: float, physical_batch_size) -> float:
    """Expected rows one step runs, over the expected batch ``qN``: the padding overhead.

    With sizes ``P_1 < ... < P_K`` (one size: ``K = 1``) a draw of ``b`` examples runs the
    smallest ``P_j ≥ b`` rows, or for ``b > P_K`` the ``⌈b / P_K⌉`` physical batches of
    ``P_K`` (:func:`jaxgrad.privacy.sampled_dp_grad`):

    .. math::

        \\frac{1}{qN}\\Big(\\sum_j P_j \\Pr(P_{j-1} < b \\le P_j)
            + P_K \\sum_{k \\ge 1} \\Pr(b > k P_K)\\Big)

    with ``b ~ Binomial(N, q)`` approximated as normal (continuity-corrected).

    Example::

      >>> from jaxgrad.privacy import expected_rows
      >>> round(expected_rows(num_examples=60000, sampling_rate=256 / 60000,
      ...                     physical_batch_size=287), 2)
      1.15
    """
    n = reduce.check_positive_int(num_examples, name="num_examples")
    q = check_sampling_rate(sampling_rate)
    sizes = check_physical_sizes(physical_batch_size)
    mean, std, cdf = _normal_draw(n, q)
    if std == 0:
        b = round(mean)
        top = sizes[-1]
        rows = next((s for s in sizes if s >= b), top * -(-b // top))
        return rows / mean
    return _rows(np.asarray(sizes, np.float64), mean, std, cdf) / mean


def _rows(sizes, mean, std, cdf) -> float:
    """Expected rows of sorted ``sizes`` (see :func:`expected_rows`)."""
    below = cdf(sizes)
    rows = float(sizes[0] * below[0] + np.sum(sizes[1:] * np.diff(below)))
    top, k = float(sizes[-1]), 1
    rows += top * (1.0 - float(below[-1]))  # b > P_K: its first batch of P_K ...
    while k * top < mean + 8 * std:  # ... and the batches after it
        rows += top * (1.0 - float(cdf(k * top)))
        k += 1
    return rows


def physical_batch_sizes(*, num_examples: int, sampling_rate: float, count: int) -> tuple:
    """``count`` physical batch sizes with the fewest expected rows per step.

    A step of :func:`jaxgrad.privacy.sampled_dp_grad` given these sizes runs the smallest
    one that holds its draw (a ``lax.switch`` over ``count`` compiled clipped sums), so the
    padding falls from ~``2σ`` rows (one size, :func:`default_physical_batch_size`) to about
    ``4σ / count``; each size is compiled once. The sizes minimise :func:`expected_rows`
    exactly over a grid of the integers in ``[qN − 4σ, P]`` (dynamic programming), the largest
    being the one default size ``P``, so the memory bound is unchanged; ``count=1``
    is ``(default_physical_batch_size(...),)``. Not ``fit``'s default: the switch costs
    ~4 % at equal rows (MLP), which eats most of the rows saved, and the step's time then
    tells which of ``count`` bins the private count ``b`` fell in (docs/privacy.md, "What the
    physical batches reveal"; docs/benchmarks.md).

    Example::

      >>> from jaxgrad.privacy import expected_rows, physical_batch_sizes
      >>> sizes = physical_batch_sizes(num_examples=60000, sampling_rate=256 / 60000, count=4)
      >>> len(sizes), expected_rows(num_examples=60000, sampling_rate=256 / 60000,
      ...                           physical_batch_size=sizes) < 1.06
      (4, True)
    """
    n = reduce.check_positive_int(num_examples, name="num_examples")
    q = check_sampling_rate(sampling_rate)
    count = reduce.check_positive_int(count, name="count")
    single = default_physical_batch_size(num_examples=n, sampling_rate=q)
    mean, std, cdf = _normal_draw(n, q)
    if count == 1 or std == 0:
        return (single,)
    low = max(1, math.floor(mean - 4 * std))
    step = max(1, -(-(single - low) // 400))  # at most ~400 grid points: K · 400² work
    grid = np.unique(np.append(np.arange(low, single + 1, step), single)).astype(np.float64)
    below = cdf(grid)
    # best[i]: least Σ P_j Pr(P_{j-1} < b ≤ P_j) over size sets ending at grid[i] (with j sizes)
    best, back = grid * below, []
    for _ in range(count - 1):
        # extend a set ending at i' < i by grid[i]: + grid[i] (F(grid[i]) − F(grid[i']))
        step_cost = grid[None, :] * (below[None, :] - below[:, None])
        total = np.where(np.triu(np.ones_like(step_cost), 1) > 0, best[:, None] + step_cost, np.inf)
        back.append(np.argmin(total, axis=0))
        best = np.min(total, axis=0)
    # The largest size is the one default size P: the memory bound and P stay as they were.
    tail = np.where(
        grid == single, _rows(np.array([single]), mean, std, cdf) - single * below, np.inf
    )
    i = int(np.argmin(best + tail))
    chosen = [i]
    for b in reversed(back):
        i = int(b[i])
        chosen.append(i)
    return tuple(sorted({int(grid[i]) for i in chosen}))


def num_physical_batches(count, physical_batch_size: int):
    """``⌈b / P⌉``: physical batches needed to hold a draw of ``b`` examples."""
    return (count + physical_batch_size - 1) // physical_batch_size


def physical_batch(sample: PoissonSample, k, *, physical_batch_size: int):
    """Indices and mask of physical batch ``k`` of a draw: drawn examples ``kP .. kP + P − 1``.

    Rows past the draw's end are masked out (their index is a filler, which the gradient
    strategies replace by a real row).

    Returns:
      ``(indices, mask)`` of shape ``(P,)``, int32 and bool.
    """
    p = physical_batch_size
    start = k * p
    idx = jax.lax.dynamic_slice(sample.indices, (start,), (p,))
    mask = start + jnp.arange(p) < sample.count
    return idx, mask
