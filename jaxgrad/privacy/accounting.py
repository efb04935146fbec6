"""(ε, δ) of DP-SGD, and σ for a target ε, by the ``dp-accounting`` library.

One step of DP-SGD with Poisson sampling rate ``q`` and noise multiplier ``σ`` is the
sampled Gaussian mechanism ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``; ``T`` steps are
that event self-composed ``T`` times. Two accountants:

* ``"pld"`` (default) — privacy loss distributions, the tighter bound; its ε is an upper
  bound whose slack shrinks with ``pld_discretization`` (the value discretisation interval;
  1e-4 by default: ε = 2.3818 for the reference below, against 2.3906 at 1e-3, in about a
  second);
* ``"rdp"`` — Rényi DP over dp-accounting's default orders, looser but fast.

Reference (Abadi et al. 2016's MNIST setting): ``σ = 1.1``, ``q = 256/60000``, 14063 steps
(60 epochs), ``δ = 1e-5`` → RDP ε ≈ 2.597, PLD ε ≈ 2.382.

This accounting holds only for Poisson sampling (:func:`jaxgrad.privacy.poisson_sample`);
shuffled fixed-size batches are a different mechanism and must not be accounted with it.
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np

from jaxgrad import reduce
from jaxgrad._optional import require
from jaxgrad.privacy.sampling import check_sampling_rate

ACCOUNTANTS = ("pld", "rdp")


def _dpa():
    """The ``dp_accounting`` module, imported on first use (the ``privacy`` extra)."""
    return require(
        "dp_accounting", package="dp-accounting", extra="privacy", needed_for="privacy accounting"
    )


def _check_accountant(accountant):
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {list(ACCOUNTANTS)}; got {accountant!r}")
    return accountant


def _check_delta(delta):
    value = reduce.as_number(delta, name="delta")
    if not 0 < value < 1:
        raise ValueError(f"`delta` must be a number in (0, 1); got {delta!r}")
    return value


def _check_steps(steps):
    value = reduce.as_number(steps, name="steps", integer=True)
    if value < 0:
        raise ValueError(f"`steps` must be a non-negative integer; got {steps!r}")
    return value


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def dp_event(*, noise_multiplier: float, sampling_rate: float, steps: int):
    """The ``dp_accounting`` event of ``steps`` Poisson-sampled Gaussian DP-SGD steps.

    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), T)``; the arguments
    are checked as for :func:`epsilon`.
    """
    noise_multiplier = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    sampling_rate = check_sampling_rate(sampling_rate)
    steps = _check_steps(steps)
    dpa = _dpa()
    step = dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier))
    return dpa.SelfComposedDpEvent(step, steps)


def make_accountant(accountant: str = "pld", *, pld_discretization: float = 1e-4):
    """A fresh ``dp_accounting`` accountant: ``"pld"`` or ``"rdp"``."""
    _check_accountant(accountant)
    if accountant == "rdp":
        return _dpa().rdp.RdpAccountant()
    vdi = reduce.check_positive_float(pld_discretization, name="pld_discretization")
    return _dpa().pld.PLDAccountant(value_discretization_interval=vdi)


def epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    pld_discretization: float = 1e-4,
) -> float:
    """The ε of ``steps`` DP-SGD steps at ``δ`` (Poisson sampling, Gaussian noise).

    Args:
      noise_multiplier: ``σ ≥ 0`` (noise std over the clip norm); 0 gives ``inf``.
      sampling_rate: ``q`` in (0, 1].
      steps: ``T ≥ 0``; 0 steps spend ε = 0.
      delta: ``δ`` in (0, 1).
      accountant: ``"pld"`` (default) or ``"rdp"``.
      pld_discretization: the PLD accountant's value discretisation interval.

    Returns:
      ε as a float.

    Example::

      >>> from jaxgrad.privacy import epsilon
      >>> round(epsilon(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=14063,
      ...               delta=1e-5, accountant="rdp"), 3)
      2.597
    """
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    q = check_sampling_rate(sampling_rate)
    steps = _check_steps(steps)
    delta = _check_delta(delta)
    acc = make_accountant(accountant, pld_discretization=pld_discretization)
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    try:
        with _quiet_absl():
            acc.compose(dp_event(noise_multiplier=sigma, sampling_rate=q, steps=steps))
            eps = float(acc.get_epsilon(delta))
    except (ArithmeticError, MemoryError, ValueError) as e:  # overflow; a PLD too large
        raise ValueError(
            f"dp-accounting's {accountant!r} accountant cannot evaluate `noise_multiplier` "
            f"{noise_multiplier!r} (q = {q}, {steps} steps): it raised {type(e).__name__}: {e}"
            + (
                "; try accountant='rdp' or a coarser pld_discretization"
                if accountant == "pld"
                else ""
            )
        ) from e
    lower = epsilon_lower_bound(noise_multiplier=sigma, sampling_rate=q, delta=delta)
    if not eps >= lower - 1e-12 * (1 + lower):
        raise ValueError(
            f"dp-accounting's {accountant!r} accountant returned ε = {eps!r} for "
            f"`noise_multiplier` {noise_multiplier!r} (q = {q}, {steps} steps, δ = {delta}), "
            f"below the lower bound {lower:.6g} that one step alone spends: its computation "
            "broke down numerically (σ this small gives no meaningful privacy)"
        )
    return eps


def epsilon_lower_bound(*, noise_multiplier: float, sampling_rate: float, delta: float) -> float:
    """A closed-form lower bound on the ε of any number ``T ≥ 1`` of DP-SGD steps at ``δ``.

    One step's outputs with and without an example are ``(1−q) N(0, σ²) + q N(1, σ²)`` and
    ``N(0, σ²)`` (per unit of sensitivity), at total variation distance
    ``TV = q (2Φ(1/(2σ)) − 1) = q erf(1 / (2√2 σ))``. The hockey-stick divergence satisfies
    ``δ(ε) ≥ TV − (e^ε − 1)``, and ``T`` steps spend at least what the first one does, so

    .. math::

        \\varepsilon(\\delta) \\ge \\log\\big(1 + \\max(0, q\\,\\mathrm{erf}(1/(2\\sqrt2\\,\\sigma))
            - \\delta)\\big)

    Loose, but it catches an accountant whose arithmetic broke down (``dp-accounting``'s RDP
    accountant returns ε = 0 once ``1/σ²`` overflows, e.g. at ``σ = 1e-155``).

    Example::

      >>> from jaxgrad.privacy.accounting import epsilon_lower_bound
      >>> round(epsilon_lower_bound(noise_multiplier=1e-3, sampling_rate=0.01, delta=1e-5), 5)
      0.00994
    """
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    q = check_sampling_rate(sampling_rate)
    delta = _check_delta(delta)
    if sigma == 0:
        return math.log1p(max(0.0, q - delta))
    with np.errstate(over="ignore", divide="ignore"):
        tv = q * math.erf(float(np.float64(1.0) / (2 * math.sqrt(2) * np.float64(sigma))))
    return math.log1p(max(0.0, tv - delta))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "pld",
    pld_discretization: float = 1e-4,
    tol: float = 1e-3,
) -> float:
    """The smallest ``σ`` whose ``steps`` steps spend at most ``target_epsilon`` at ``δ``.

    Brent's method over σ (``dp_accounting.calibrate_dp_mechanism``); the result satisfies
    ``epsilon(σ, ...) ≤ target_epsilon`` with the same accountant, within ``tol`` in σ.

    Args:
      target_epsilon: ε > 0 to spend over the whole run.
      delta: ``δ`` in (0, 1).
      sampling_rate: ``q`` in (0, 1].
      steps: the planned number of steps ``T ≥ 1``.
      accountant: ``"pld"`` (default) or ``"rdp"``.
      pld_discretization: the PLD accountant's value discretisation interval.
      tol: the tolerance on σ.

    Returns:
      σ as a float.

    Example::

      >>> from jaxgrad.privacy import calibrate_noise_multiplier, epsilon
      >>> s = calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sampling_rate=0.01,
      ...                                steps=1000, accountant="rdp")
      >>> epsilon(noise_multiplier=s, sampling_rate=0.01, steps=1000, delta=1e-5,
      ...         accountant="rdp") <= 3.0
      True
    """
    target = reduce.check_positive_float(target_epsilon, name="target_epsilon")
    delta = _check_delta(delta)
    q = check_sampling_rate(sampling_rate)
    steps = _check_steps(steps)
    if steps == 0:
        raise ValueError("`steps` must be at least 1 to calibrate a noise multiplier; got 0")
    tol = reduce.check_positive_float(tol, name="tol")
    _check_accountant(accountant)
    try:
        with _quiet_absl():  # RDP warns for every order it drops at small σ; ε is an upper bound
            sigma = _dpa().calibrate_dp_mechanism(
                lambda: make_accountant(accountant, pld_discretization=pld_discretization),
                lambda s: dp_event(noise_multiplier=s, sampling_rate=q, steps=steps),
                target,
                delta,
                tol=tol,
            )
    except (ArithmeticError, MemoryError) as e:  # a σ tried overflowed, or its PLD was too large
        raise ValueError(
            f"dp-accounting's {accountant!r} accountant failed while calibrating σ for "
            f"`target_epsilon` {target_epsilon!r} (q = {q}, {steps} steps, δ = {delta}): "
            f"{type(e).__name__}: {e}"
            + (
                "; try accountant='rdp' or a coarser pld_discretization"
                if accountant == "pld"
                else ""
            )
        ) from e
    sigma = float(sigma)
    # Brent's method trusts the accountant at every σ it tries: check the answer with the
    # guarded epsilon (which refuses an ε that broke down numerically).
    spent = epsilon(
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        delta=delta,
        accountant=accountant,
        pld_discretization=pld_discretization,
    )
    if spent > target * (1 + 1e-9):
        raise ValueError(
            f"calibration found `noise_multiplier` {sigma!r}, which spends ε = {spent!r} > "
            f"`target_epsilon` {target!r}; dp-accounting's search failed for this setting"
        )
    return sigma
