"""The arguments of the accounting: δ (and δ < 1/N), steps, the accountant's name.

Every entry point of :mod:`jaxgrad.privacy.accounting` checks its arguments with these, in
the order it lists them, so a bad value is named the same way wherever it is passed.
"""

from __future__ import annotations

from jaxgrad import reduce
from jaxgrad.privacy.sampling import check_sampling_rate

ACCOUNTANTS = ("pld", "rdp")
#: The neighbouring relations an :class:`Accountant` accounts under: add or remove one example
#: (Poisson and truncated Poisson sampling, whose batch size is private), or replace one (a
#: fixed-size batch, whose size — and so the data set's — is public).
RELATIONS = ("add_or_remove_one", "replace_one")


def check_accountant(accountant):
    return reduce.check_choice(accountant, ACCOUNTANTS, name="accountant")


def check_relation(relation):
    return reduce.check_choice(relation, RELATIONS, name="neighboring_relation")


def check_delta_range(delta):
    """``δ`` in ``(0, 1)``, whatever the data set's size (see :func:`check_delta`)."""
    value = reduce.as_number(delta, name="delta")
    if not 0 < value < 1:
        raise ValueError(f"`delta` must be a number in (0, 1); got {delta!r}")
    return value


def check_steps(steps):
    value = reduce.as_number(steps, name="steps", integer=True)
    if value < 0:
        raise ValueError(f"`steps` must be a non-negative integer; got {steps!r}")
    return value


def check_calibration_steps(steps):
    """``steps ≥ 1``: a noise multiplier is calibrated over at least one step."""
    steps = check_steps(steps)
    if steps == 0:
        raise ValueError("`steps` must be at least 1 to calibrate a noise multiplier; got 0")
    return steps


def check_gaussian_step(noise_multiplier, sampling_rate):
    """``(σ ≥ 0, q in (0, 1])`` of a Poisson-sampled Gaussian step."""
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    return sigma, check_sampling_rate(sampling_rate)


def check_dpsgd(noise_multiplier, sampling_rate, steps):
    """``(σ ≥ 0, q in (0, 1], T ≥ 0)`` of ``T`` DP-SGD steps."""
    return (*check_gaussian_step(noise_multiplier, sampling_rate), check_steps(steps))


def check_delta(delta, *, num_examples: int) -> float:
    """``δ`` for a data set of ``N`` privacy units, refused unless ``δ < 1/N``.

    ``(ε, δ)``-DP lets a mechanism fail outright with probability ``δ``. A mechanism that
    publishes one example chosen uniformly at random, in full, is ``(0, 1/N)``-DP (for any
    set of outputs, adding or removing one example changes its probability by at most
    ``1/N``), so a guarantee with ``δ ≥ 1/N`` also covers a release of some individual's
    complete record: it certifies nothing. ``δ`` must be much smaller than ``1/N`` (Dwork and
    Roth 2014, *The Algorithmic Foundations of Differential Privacy*, §2.3: "values of δ on
    the order of 1/‖x‖₁ are very dangerous"; Ponomareva et al. 2023, *How to DP-fy ML*,
    §5.3, "δ ≪ 1/n"); a common choice is ``δ ≤ 1/N^1.1`` (5.5e-6 for ``N = 60000``).

    Refuse rather than warn: a run at ``δ ≥ 1/N`` would publish an ``(ε, δ)`` that reads as
    a guarantee and is none, and a warning is lost in a training log. Values between
    ``1/N^1.1`` and ``1/N`` are accepted silently (``δ = 10⁻⁵`` on MNIST's 60 000 examples,
    the field's reference setting, is one of them; a warning on every such run would
    teach users to ignore warnings).

    ``N`` counts privacy units — examples, or users under user-level DP — not rows.

    Args:
      delta: ``δ`` in ``(0, 1/N)``.
      num_examples: ``N ≥ 1``.

    Returns:
      ``δ`` as a float.

    Raises:
      ValueError: ``δ`` outside ``(0, 1)``, or ``δ ≥ 1/N`` (the message says why and what
        to use instead).

    Example::

      >>> from jaxgrad.privacy.accounting import check_delta
      >>> check_delta(1e-5, num_examples=60000)
      1e-05
      >>> check_delta(1e-3, num_examples=60000)
      Traceback (most recent call last):
      ...
      ValueError: `delta` 0.001 is at least 1/N = 1.667e-05 for N = 60000 examples: ...
    """
    value = check_delta_range(delta)
    n = reduce.check_positive_int(num_examples, name="num_examples")
    if value * n >= 1:
        raise ValueError(
            f"`delta` {delta!r} is at least 1/N = {1 / n:.4g} for N = {n} examples: a "
            "mechanism that publishes one random example in full is (0, 1/N)-DP, so such a "
            f"δ certifies nothing; use δ well below 1/N, e.g. δ ≤ 1/N^1.1 = {n**-1.1:.2g} "
            "(Dwork and Roth 2014, §2.3)"
        )
    return value
