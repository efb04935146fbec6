"""Batch sources of a DP step, each with the dp-accounting event that matches it.

A DP-SGD step's privacy depends on how its batch is chosen, so each way of choosing is one
part that both draws the batch (under ``jax.jit``: a fixed-shape :class:`PoissonSample`,
consumed in physical batches by :func:`jaxgrad.privacy.noisy.sampled_clipped_sum`) and
names its accounting (``dp_event``, for :class:`jaxgrad.privacy.Accountant`):

=====================  =====================================================  ==================
source                 one step's event (``σ`` = noise std / ``C``)           neighbours
=====================  =====================================================  ==================
:class:`Poisson`       ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``       add or remove one
:class:`TruncatedPoisson` ``TruncatedSubsampledGaussianDpEvent(N, q, B, σ)``  add or remove one
:class:`WithoutReplacement` ``SampledWithoutReplacementDpEvent(N, B,           replace one
                       GaussianDpEvent(σ / 2))``
=====================  =====================================================  ==================

``C`` is the clip norm, the clipped sum's sensitivity to adding or removing one example.
Replacing one example moves the sum by up to ``‖clip(g) − clip(g')‖ ≤ 2C``, so under the
replace-one relation the same noise is ``σ/2`` per unit of sensitivity (as dp-accounting's
own truncated analysis does: ``from_truncated_subsampled_gaussian_mechanism`` uses
``noise_multiplier / 2`` with ``REPLACE_ONE``).

A shuffled epoch (each example exactly once per epoch, in fixed-size batches) is none of
these: it is not Poisson sampling, its ε computed as if it were would be wrong, and
:func:`batch_source` refuses it.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp

from jaxgrad import keys, reduce
from jaxgrad.privacy import sampling
from jaxgrad.privacy._accounting.events import poisson_event
from jaxgrad.privacy._accounting.library import dpa

SAMPLINGS = ("poisson", "truncated_poisson", "without_replacement")
#: Names a user might try that are not a sampling with an accounting here.
_REFUSED = ("shuffle", "shuffled", "shuffling", "epoch", "permutation", "fixed")


def _check_batch(value, name, num_examples=None):
    b = reduce.check_positive_int(value, name=name)
    if num_examples is not None and b > num_examples:
        raise ValueError(
            f"`{name}` ({b}) is larger than the data set ({num_examples} examples); expected at "
            f"most {num_examples}"
        )
    return b


@dataclasses.dataclass(frozen=True)
class Poisson:
    """Poisson sampling: every example in independently with probability ``q``.

    .. math::

        m_i \\sim \\mathrm{Bernoulli}(q), \\qquad b = \\textstyle\\sum_i m_i
        \\sim \\mathrm{Binomial}(N, q), \\qquad B_e = qN

    The draw is :func:`jaxgrad.privacy.poisson_sample`; a draw of any size is run in as
    many physical batches as it needs. Event ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``
    under add or remove one.

    Example::

      >>> import jax
      >>> from jaxgrad.privacy.sources import Poisson
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> s = Poisson(sampling_rate=0.5).sample(entropy_key(), num_examples=10,
      ...                                       physical_batch_size=4)
      >>> s.indices.shape, int(s.count) == int(s.mask.sum())
      ((12,), True)
    """

    sampling_rate: float
    name = "poisson"
    neighboring_relation = "add_or_remove_one"

    def __post_init__(self):
        object.__setattr__(self, "sampling_rate", sampling.check_sampling_rate(self.sampling_rate))

    def expected_batch_size(self, num_examples: int) -> float:
        """``B_e = qN``: the public divisor of the step's noisy sum."""
        return self.sampling_rate * num_examples

    def default_physical_batch_size(self, num_examples: int) -> int:
        """:func:`jaxgrad.privacy.default_physical_batch_size`."""
        return sampling.default_physical_batch_size(
            num_examples=num_examples, sampling_rate=self.sampling_rate
        )

    def sample(self, key, *, num_examples: int, physical_batch_size: int):
        """One step's draw (a pure function of ``key``)."""
        return sampling.poisson_sample(
            key,
            num_examples=num_examples,
            sampling_rate=self.sampling_rate,
            physical_batch_size=physical_batch_size,
        )

    def dp_event(self, *, noise_multiplier: float, num_examples: int):
        """One step's event: ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``."""
        reduce.check_positive_int(num_examples, name="num_examples")
        return poisson_event(noise_multiplier=noise_multiplier, sampling_rate=self.sampling_rate)


@dataclasses.dataclass(frozen=True)
class TruncatedPoisson:
    """Poisson sampling cut to at most ``B`` examples: a fixed maximum batch.

    .. math::

        b = \\textstyle\\sum_i m_i,\\ m_i \\sim \\mathrm{Bernoulli}(q); \\quad
        \\text{kept} = \\begin{cases} \\text{all } b & b \\le B \\\\
            \\text{a uniformly random } B\\text{-subset of them} & b > B \\end{cases}

    Which drawn examples are kept depends only on the draw and on an independent key
    (:func:`jaxgrad.privacy.sampling.draw_key` of the step's sample key: a uniformly random
    permutation of the ``N`` rows, the first ``B`` drawn in its order), never on the data.
    The inclusion mask is :func:`jaxgrad.privacy.poisson_sample`'s from the same key, so a
    draw that fits is exactly the Poisson draw. The divisor stays ``B_e = qN`` (public).

    Accounted by dp-accounting's ``TruncatedSubsampledGaussianDpEvent(N, q, B, σ)`` under
    add or remove one (its PLD is the mixture of the Poisson-sampled Gaussian and, when a
    draw is truncated and the added example displaces another, a sensitivity-``2C`` part;
    https://arxiv.org/abs/2508.15089). Only dp-accounting's PLD accountant has this event:
    with ``accountant="rdp"`` it is refused.

    Example::

      >>> import jax
      >>> from jaxgrad.privacy.sources import TruncatedPoisson
      >>> src = TruncatedPoisson(sampling_rate=0.5, max_batch_size=3)
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> int(src.sample(entropy_key(), num_examples=100, physical_batch_size=3).count)
      3
    """

    sampling_rate: float
    max_batch_size: int
    name = "truncated_poisson"
    neighboring_relation = "add_or_remove_one"

    def __post_init__(self):
        object.__setattr__(self, "sampling_rate", sampling.check_sampling_rate(self.sampling_rate))
        object.__setattr__(
            self, "max_batch_size", _check_batch(self.max_batch_size, "max_batch_size")
        )

    def expected_batch_size(self, num_examples: int) -> float:
        """``B_e = qN`` (the Poisson draw's expectation; public)."""
        return self.sampling_rate * num_examples

    def default_physical_batch_size(self, num_examples: int) -> int:
        """The Poisson default, at most ``B`` (a draw never needs more)."""
        return min(
            self.max_batch_size,
            sampling.default_physical_batch_size(
                num_examples=num_examples, sampling_rate=self.sampling_rate
            ),
        )

    def sample(self, key, *, num_examples: int, physical_batch_size: int):
        """One step's draw, at most ``B`` examples (a pure function of ``key``)."""
        key = keys.check_key(key)
        n = reduce.check_positive_int(num_examples, name="num_examples")
        p = reduce.check_positive_int(physical_batch_size, name="physical_batch_size")
        b = _check_batch(self.max_batch_size, "max_batch_size", n)
        if b < (expected := self.expected_batch_size(n)):
            # Private and accounted, but the divisor stays B_e = qN while most draws keep only
            # B rows: the noiseless gradient is shrunk by about B / B_e, a silent step size.
            warnings.warn(
                f"`max_batch_size` ({b}) is below the expected batch size qN = "
                f"{expected:g}: most draws are cut to {b} examples while the "
                f"clipped sum is still divided by qN, so the gradient is shrunk by about "
                f"{b / expected:.2f}; expected a cap at or above qN (a few "
                "standard deviations above it truncates almost never)",
                UserWarning,
                stacklevel=2,
            )
        mask = sampling.inclusion_mask(key, sampling_rate=self.sampling_rate, num_examples=n)
        order = jax.random.permutation(sampling.draw_key(key, sampling.TRUNCATION_BLOCK), n)
        drawn = mask[order]
        keep = drawn & (jnp.cumsum(drawn, dtype=jnp.int32) <= b)  # the first B in `order`
        kept = jnp.zeros((n,), bool).at[order].set(keep)
        return sampling.compact(kept, padded=-(-b // p) * p)

    def dp_event(self, *, noise_multiplier: float, num_examples: int):
        """One step's event: ``TruncatedSubsampledGaussianDpEvent(N, q, B, σ)``."""
        n = reduce.check_positive_int(num_examples, name="num_examples")
        sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
        b = _check_batch(self.max_batch_size, "max_batch_size", n)
        return dpa().TruncatedSubsampledGaussianDpEvent(n, self.sampling_rate, b, sigma)


@dataclasses.dataclass(frozen=True)
class WithoutReplacement:
    """A fixed-size batch: ``B`` of the ``N`` examples, uniformly without replacement.

    .. math::

        S \\sim \\mathrm{Uniform}\\{S \\subseteq [N] : |S| = B\\}, \\qquad B_e = B

    drawn independently at every step (the first ``B`` of a uniformly random permutation
    drawn with :func:`jaxgrad.privacy.sampling.draw_key` of the step's sample key, never
    from bits that noise drawn with the same key reads) — not a shuffled epoch, whose
    batches are disjoint. The batch size is public, so the neighbouring relation is replace
    one example (``N`` public), under which the clipped sum moves by up to ``2C``: the event is
    ``SampledWithoutReplacementDpEvent(N, B, GaussianDpEvent(σ / 2))`` (Wang, Balle and
    Kasiviswanathan 2019, Theorem 27), accounted by dp-accounting's RDP accountant only
    (``accountant="rdp"``, ``neighboring_relation="replace_one"``). Its ε is not comparable
    with an add-or-remove ε: replace-one is the weaker neighbouring notion for the same ε
    (one replacement is a removal and an addition).

    Example::

      >>> import jax
      >>> from jaxgrad.privacy.sources import WithoutReplacement
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> s = WithoutReplacement(batch_size=4).sample(entropy_key(), num_examples=10,
      ...                                            physical_batch_size=4)
      >>> int(s.count), int(s.mask.sum())
      (4, 4)
    """

    batch_size: int
    name = "without_replacement"
    neighboring_relation = "replace_one"

    def __post_init__(self):
        object.__setattr__(self, "batch_size", _check_batch(self.batch_size, "batch_size"))

    def expected_batch_size(self, num_examples: int) -> float:
        """``B_e = B`` (every batch has exactly ``B`` examples)."""
        _check_batch(self.batch_size, "batch_size", num_examples)
        return float(self.batch_size)

    def default_physical_batch_size(self, num_examples: int) -> int:
        """``B``: one physical batch per step."""
        return _check_batch(self.batch_size, "batch_size", num_examples)

    def sample(self, key, *, num_examples: int, physical_batch_size: int):
        """One step's ``B`` examples (a pure function of ``key``)."""
        key = keys.check_private_key(key)  # the draw (the others' is inclusion_mask's)
        n = reduce.check_positive_int(num_examples, name="num_examples")
        p = reduce.check_positive_int(physical_batch_size, name="physical_batch_size")
        b = _check_batch(self.batch_size, "batch_size", n)
        # Not permutation(key): its bits would be noise words of the same key.
        order = jax.random.permutation(
            sampling.draw_key(key, sampling.WITHOUT_REPLACEMENT_BLOCK), n
        )
        chosen = order[:b]
        mask = jnp.zeros((n,), bool).at[chosen].set(True)
        return sampling.compact(mask, padded=-(-b // p) * p)

    def dp_event(self, *, noise_multiplier: float, num_examples: int):
        """One step's event: ``SampledWithoutReplacementDpEvent(N, B, GaussianDpEvent(σ/2))``."""
        n = reduce.check_positive_int(num_examples, name="num_examples")
        sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
        b = _check_batch(self.batch_size, "batch_size", n)
        lib = dpa()
        # Replace-one moves the clipped sum by up to 2C: σC of noise is σ/2 per unit of it.
        return lib.SampledWithoutReplacementDpEvent(n, b, lib.GaussianDpEvent(sigma / 2))


@dataclasses.dataclass(frozen=True)
class CyclicPoisson:
    """Cyclic Poisson sampling over ``b`` groups: the batch source of amplified BandMF.

    .. math::

        m_i^{(t)} = [\\, i \\bmod b = t \\bmod b \\,] \\cdot \\mathrm{Bernoulli}(q),
        \\qquad B_e = qN / b

    Row ``i`` belongs to group ``i mod b``; step ``t`` draws only from group ``t mod b``,
    each of its examples independently with probability ``q`` (the inclusion mask is
    :func:`jaxgrad.privacy.inclusion_mask`'s from the step's sample key, restricted to the
    group, so with ``b = 1`` the draw is :class:`Poisson`'s, bit for bit). An example takes
    part only in steps ``b`` apart, at most ``⌈n / b⌉`` times in ``n`` steps: with a
    ``b``-banded strategy (:func:`jaxgrad.privacy.bandmf_privatizer`) the run is as private as
    ``⌈n / b⌉`` steps of ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``
    (:func:`jaxgrad.privacy.bandmf.dp_event`). When ``b`` does not divide ``N`` the groups
    hold ``⌊N/b⌋`` or ``⌈N/b⌉`` rows (none is discarded: each example's analysis depends
    only on ``q``); the divisor is the cycle's mean ``qN / b`` at every step (public).
    Neighbours: one example's row zeroed, or added or removed at a fixed row (the others
    keep their groups), accounted as add or remove one.

    Example::

      >>> import jax
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> from jaxgrad.privacy.sources import CyclicPoisson
      >>> s = CyclicPoisson(sampling_rate=1.0, groups=3).sample(
      ...     entropy_key(), num_examples=7, physical_batch_size=4, step=1)
      >>> s.indices[: int(s.count)].tolist()  # rows 1, 4 (mod 3 = step mod 3)
      [1, 4]
    """

    sampling_rate: float
    groups: int
    name = "cyclic_poisson"
    neighboring_relation = "add_or_remove_one"

    def __post_init__(self):
        object.__setattr__(self, "sampling_rate", sampling.check_sampling_rate(self.sampling_rate))
        object.__setattr__(self, "groups", reduce.check_positive_int(self.groups, name="groups"))

    def _check_groups(self, num_examples):
        n = reduce.check_positive_int(num_examples, name="num_examples")
        if self.groups > n:
            raise ValueError(
                f"`groups` ({self.groups}) is larger than the data set ({n} examples); "
                f"expected at most {n} (a group would be empty)"
            )
        return n

    def expected_batch_size(self, num_examples: int) -> float:
        """``B_e = qN / b``: the mean over a cycle of the steps' expected batch sizes."""
        return self.sampling_rate * self._check_groups(num_examples) / self.groups

    def default_physical_batch_size(self, num_examples: int) -> int:
        """The Poisson default for a group of ``⌈N / b⌉`` rows."""
        n = self._check_groups(num_examples)
        return sampling.default_physical_batch_size(
            num_examples=-(-n // self.groups), sampling_rate=self.sampling_rate
        )

    def participations(self, steps: int) -> int:
        """``⌈n / b⌉``: the most of ``steps`` steps one example takes part in."""
        return -(-int(steps) // self.groups)

    def sample(self, key, *, num_examples: int, physical_batch_size: int, step=None):
        """Step ``step``'s draw from group ``step mod b`` (a pure function of ``key``, ``step``)."""
        key = keys.check_key(key)
        n = self._check_groups(num_examples)
        p = reduce.check_positive_int(physical_batch_size, name="physical_batch_size")
        if step is None:
            raise ValueError("CyclicPoisson.sample needs `step` (its group is step mod groups)")
        mask = sampling.inclusion_mask(key, sampling_rate=self.sampling_rate, num_examples=n)
        if self.groups > 1:
            rows = jnp.arange(n, dtype=jnp.int32)
            mask = mask & (rows % self.groups == jnp.asarray(step, jnp.int32) % self.groups)
        group = -(-n // self.groups)  # the largest group's rows
        return sampling.compact(mask, padded=-(-group // p) * p)

    def dp_event(self, *, noise_multiplier: float, num_examples: int):
        """One *participation*'s event, ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``;
        ``n`` steps compose :meth:`participations` ``(n)`` of them."""
        self._check_groups(num_examples)
        return poisson_event(noise_multiplier=noise_multiplier, sampling_rate=self.sampling_rate)


SOURCES = (Poisson, TruncatedPoisson, WithoutReplacement, CyclicPoisson)


def check_source(source, *, stepped: bool = True):
    """Checks ``source`` is a batch source (one of :data:`SOURCES`, or an object with their
    ``sample`` and ``expected_batch_size``); ``stepped=False`` where the caller cannot pass
    the training step (``sampled_dp_grad``'s ``f``), which a :class:`CyclicPoisson` draw
    needs. Returns it.

    Raises:
      TypeError, ValueError: naming ``source``.
    """
    if not all(callable(getattr(source, m, None)) for m in ("sample", "expected_batch_size")):
        names = ", ".join(f"jaxgrad.privacy.{c.__name__}(...)" for c in SOURCES)
        raise TypeError(f"`source` must be a batch source ({names}); got {source!r}")
    if isinstance(source, CyclicPoisson) and not stepped:
        raise ValueError(
            "`source` CyclicPoisson draws from step t's group, and this `f` has no step to "
            "pass: use `jaxgrad.train.fit(..., privacy=PrivacyConfig(noise='bandmf', "
            "bands=b))` or `jaxgrad.privacy.noisy.sampled_clipped_sum(...)(..., step=t)`; "
            f"got {source!r}"
        )
    return source


def step_kwargs(source, step) -> dict:
    """``{"step": step}`` for a source whose draw depends on the step (:class:`CyclicPoisson`),
    else ``{}``."""
    return {"step": step} if isinstance(source, CyclicPoisson) else {}


def batch_source(
    sampling_name: str = "poisson",
    *,
    num_examples: int,
    batch_size: int,
    max_batch_size: int | None = None,
):
    """The batch source ``sampling_name`` for batches of (expected) size ``batch_size``.

    ``"poisson"``: rate ``q = batch_size / N``; ``"truncated_poisson"``: the same, cut to
    ``max_batch_size``; ``"without_replacement"``: exactly ``batch_size``. A shuffled epoch
    is refused: no accounting here matches it.

    Raises:
      ValueError: an unknown or refused sampling, a missing or misplaced
        ``max_batch_size``, sizes out of range.

    Example::

      >>> from jaxgrad.privacy.sources import batch_source
      >>> batch_source("truncated_poisson", num_examples=1000, batch_size=10,
      ...              max_batch_size=20)
      TruncatedPoisson(sampling_rate=0.01, max_batch_size=20)
    """
    n = reduce.check_positive_int(num_examples, name="num_examples")
    b = _check_batch(batch_size, "batch_size", n)
    if not (isinstance(sampling_name, str) and sampling_name in SAMPLINGS):  # not an array
        why = (
            ": a shuffled epoch (each example once per epoch) is not Poisson sampling, and "
            "accounting it as if it were would understate ε; no accounting here matches it"
            if isinstance(sampling_name, str) and sampling_name.lower() in _REFUSED
            else ""
        )
        raise ValueError(f"`sampling` must be one of {list(SAMPLINGS)}; got {sampling_name!r}{why}")
    if sampling_name == "truncated_poisson":
        if max_batch_size is None:
            raise ValueError(
                "sampling='truncated_poisson' needs `max_batch_size` (the cap on a draw); got None"
            )
        cap = _check_batch(max_batch_size, "max_batch_size", n)
        return TruncatedPoisson(sampling_rate=b / n, max_batch_size=cap)
    if max_batch_size is not None:
        raise ValueError(
            f"`max_batch_size` applies only to sampling='truncated_poisson'; got "
            f"max_batch_size={max_batch_size!r} with sampling={sampling_name!r}"
        )
    if sampling_name == "without_replacement":
        return WithoutReplacement(batch_size=b)
    return Poisson(sampling_rate=b / n)


__all__ = [
    "SAMPLINGS",
    "CyclicPoisson",
    "Poisson",
    "TruncatedPoisson",
    "WithoutReplacement",
    "batch_source",
    "check_source",
    "step_kwargs",
]
