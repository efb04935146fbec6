"""σ for a target ε: the smallest noise multiplier whose steps spend at most the budget.

:func:`calibrate_noise_multiplier` for DP-SGD's Poisson steps: Brent's method by the RDP
accountant first (cheap at every σ), then, for the PLD, a search downwards from there that
builds only PLDs within the limits of :mod:`.pld_size`. :func:`calibrate_event_noise` for
any batch source's event: bisection, each ε by :func:`.epsilon.events_epsilon`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from jaxgrad import reduce
from jaxgrad.privacy._accounting.accountant import Accountant
from jaxgrad.privacy._accounting.checks import (
    check_accountant,
    check_calibration_steps,
    check_delta_range,
)
from jaxgrad.privacy._accounting.epsilon import dpsgd_epsilon, dpsgd_fallback, events_epsilon
from jaxgrad.privacy._accounting.events import dp_event
from jaxgrad.privacy._accounting.library import dpa, make_accountant, quiet_absl
from jaxgrad.privacy._accounting.pld_size import (
    pld_fits,
    size_situation,
    unreachable_situation,
    warn_fallback,
)
from jaxgrad.privacy.sampling import check_sampling_rate


class _Target(NamedTuple):
    """What :func:`calibrate_noise_multiplier` calibrates for (its checked arguments)."""

    epsilon: float
    delta: float
    q: float
    steps: int
    vdi: float
    tol: float


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

    Brent's method over σ; the result satisfies ``epsilon(σ, ...) ≤ target_epsilon`` with
    the same arguments, within ``tol`` in σ. The RDP accountant's σ comes first (cheap at
    every σ); the PLD accountant's search starts there and steps down, building only PLDs
    within the limits of :func:`pld_size` — so a large target (small σ) never exhausts
    memory. Where the PLD at RDP's σ is already too large, or cannot reach ``δ`` there (it
    answers ``inf``: ``δ`` below the tail mass dp-accounting drops), RDP's σ is returned;
    where the PLD's answer lies below the smallest σ whose PLD fits, that σ is returned
    (each with an :class:`AccountingFallbackWarning`; ``epsilon`` then uses the same
    accountant).

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
    delta = check_delta_range(delta)
    q = check_sampling_rate(sampling_rate)
    steps = check_calibration_steps(steps)
    tol = reduce.check_positive_float(tol, name="tol")
    check_accountant(accountant)
    vdi = reduce.check_positive_float(pld_discretization, name="pld_discretization")
    t = _Target(target, delta, q, steps, vdi, tol)
    # RDP first: cheap at every σ Brent's method may try (the PLD's size grows without
    # bound as σ → 0), and the upper end of the PLD's search.
    sigma = _brent(t, "rdp", target_epsilon)
    pld_eps = functools.cache(lambda s: dpsgd_epsilon(s, q, steps, delta, "pld", vdi))
    if accountant == "pld":
        sigma = _calibrate_pld(t, sigma, pld_eps)
    _check_spent(t, sigma, accountant, pld_eps)
    return sigma


def _brent(t, name, target_epsilon):
    """σ by dp-accounting's own search (Brent's method) with the ``name`` accountant."""
    try:
        with quiet_absl():  # RDP warns for every order it drops at small σ
            return float(
                dpa().calibrate_dp_mechanism(
                    lambda: make_accountant(name, pld_discretization=t.vdi),
                    lambda s: dp_event(noise_multiplier=s, sampling_rate=t.q, steps=t.steps),
                    t.epsilon,
                    t.delta,
                    tol=t.tol,
                )
            )
    except dpa().mechanism_calibration.NoBracketIntervalFoundError as e:
        # RDP's largest order α bounds its ε below by about log(1/δ)/(α − 1) at any σ.
        raise ValueError(
            f"`target_epsilon` {target_epsilon!r} is out of reach: dp-accounting's {name!r} "
            f"accountant finds no `noise_multiplier` up to 2**30 that spends at most it "
            f"(q = {t.q}, {t.steps} steps, δ = {t.delta}); its ε stays above the target at "
            "every σ it tries. Raise `target_epsilon` (or `delta`)"
        ) from e
    except (ArithmeticError, MemoryError) as e:  # a σ tried overflowed
        raise ValueError(
            f"dp-accounting's {name!r} accountant failed while calibrating σ for "
            f"`target_epsilon` {target_epsilon!r} (q = {t.q}, {t.steps} steps, δ = {t.delta}): "
            f"{type(e).__name__}: {e}"
        ) from e


def _check_spent(t, sigma, accountant, pld_eps):
    """Refuses a σ that spends more than the target: Brent's method trusts the accountant at
    every σ it tries, so the answer is checked with the guarded ε, by the accountant
    :func:`epsilon` would use for it."""
    spent = dpsgd_fallback(sigma, t.q, t.steps, t.delta, accountant, t.vdi, pld_eps)[0]
    if spent > t.epsilon * (1 + 1e-9):
        raise ValueError(
            f"calibration found `noise_multiplier` {sigma!r}, which spends ε = {spent!r} > "
            f"`target_epsilon` {t.epsilon!r}; dp-accounting's search failed for this setting"
        )


def _calibrate_pld(t, sigma_rdp, eps):
    """σ by the PLD accountant, searched only where its PLD fits the limits (else RDP's σ).

    ``eps(σ)`` is the PLD's guarded ε, memoised: each one costs seconds, so none is
    computed twice (dp-accounting's own search evaluates the bracket's ends again).
    Its fallback warnings name :func:`calibrate_noise_multiplier`'s line.
    """
    what = "σ is calibrated with the RDP accountant instead (a valid, looser upper bound)"
    fits, size = pld_fits(sigma_rdp, t.q, t.steps, t.vdi)
    if not fits:  # the PLD's answer is (almost always) below RDP's, where it is larger still
        situation = size_situation(sigma_rdp, t.q, t.steps, t.vdi, size)
        warn_fallback(situation, what, stacklevel=2)
        return sigma_rdp
    if eps(sigma_rdp) == math.inf:
        # δ is below the tail mass the PLD drops: it reaches δ only at a far larger σ (its
        # ε there far below the target), while RDP certifies the target at its own σ; the
        # PLD answers inf there, so `epsilon` accounts RDP's σ by RDP too.
        warn_fallback(unreachable_situation(t.delta), what, remedy=None, stacklevel=2)
        return sigma_rdp
    hi = sigma_rdp
    for _ in range(30):  # the PLD bound may exceed RDP's (rarely): more σ, a smaller PLD
        if eps(hi) <= t.epsilon:
            break
        hi *= 2
    lo, hi, stopped = _pld_bracket(t, hi, eps)
    return hi if stopped else _certified_root(t, lo, hi, eps)


def _pld_bracket(t, hi, eps):
    """``(lo, hi, False)`` with ``eps(lo) > target ≥ eps(hi)``, or ``(lo, σ, True)`` where the
    answer stops at ``σ``, the smallest whose PLD fits (certified by the PLD).

    The PLD's σ is usually 5-20 % below RDP's: step down by 0.8 until the PLD spends more
    than the target, for a narrow bracket (a wide one makes Brent's method try small σ,
    whose PLDs cost the most).
    """
    lo = 0.8 * hi
    while True:
        fits, size = pld_fits(lo, t.q, t.steps, t.vdi)
        if not fits:
            bad, good = _smallest_fitting(t, lo, hi)
            if eps(good) <= t.epsilon:  # the PLD's answer lies where its PLD is too large
                what = (
                    f"σ stops at {good:.6g}, the smallest σ whose PLD fits, which the PLD "
                    "certifies (the exact answer is smaller)"
                )
                situation = size_situation(bad, t.q, t.steps, t.vdi, size)
                warn_fallback(situation, what, stacklevel=3)
                return lo, good, True
            return good, hi, False
        if eps(lo) > t.epsilon:
            return lo, hi, False
        hi, lo = lo, 0.8 * lo


def _smallest_fitting(t, bad, good):
    """``(bad, good)`` within ``tol``: σ whose PLD does not fit, and one whose PLD does
    (bisection in log σ, by sizes alone)."""
    for _ in range(60):
        if good - bad <= t.tol:
            break
        mid = math.sqrt(bad * good)
        bad, good = (bad, mid) if pld_fits(mid, t.q, t.steps, t.vdi)[0] else (mid, good)
    return bad, good


def _certified_root(t, lo, hi, eps):
    """The crossing ``eps(σ) = target`` in ``[lo, hi]`` by Brent's method, as a σ that spends
    at most the target."""
    from scipy import optimize

    # (a PLD answering inf below δ's reach counts as spending twice the target: Brent's
    # method needs finite values, and only their signs bracket the crossing)
    root = optimize.brentq(lambda s: min(eps(s), 2 * t.epsilon) - t.epsilon, lo, hi, xtol=t.tol)
    # Brent's root is within tol of the crossing but may spend a hair more than the
    # target: then the next σ up, or the bracket's upper end (known to be within it).
    for sigma in (root, root + t.tol, hi):
        if eps(sigma) <= t.epsilon:
            return sigma
    return hi  # unreachable: eps(hi) <= target


def calibrate_event_noise(
    make_event,
    *,
    target_epsilon: float,
    delta: float,
    steps: int,
    accountant: str = "pld",
    neighboring_relation: str = "add_or_remove_one",
    pld_discretization: float = 1e-4,
    tol: float = 1e-3,
) -> float:
    """The smallest ``σ`` (within ``tol``) whose ``steps`` steps of ``make_event(σ)`` spend at
    most ``target_epsilon``: :func:`calibrate_noise_multiplier` for any batch source's event.

    ε falls as ``σ`` grows: bisection between a ``σ`` that spends too much and one that
    fits, each ε by :class:`Accountant` (its PLD size guard and RDP fallback). A ``σ`` whose
    ε cannot be evaluated (a PLD too large to build, with no RDP analysis to fall back on)
    counts as spending too much, so the answer is always one whose ε was computed and fits.

    Args:
      make_event: ``σ -> `` one step's dp-accounting event (e.g. a batch source's
        ``dp_event`` with ``num_examples`` bound).
      target_epsilon: ε > 0 over the ``steps`` steps.
      delta: ``δ`` in (0, 1).
      steps: ``T ≥ 1``.
      accountant: ``"pld"`` or ``"rdp"``.
      neighboring_relation: as for :class:`Accountant`.
      pld_discretization: the PLD's value discretisation interval.
      tol: the tolerance on ``σ``.

    Returns:
      σ as a float.

    Example::

      >>> import dp_accounting as dpa
      >>> from jaxgrad.privacy.accounting import calibrate_event_noise
      >>> event = lambda s: dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(s))
      >>> s = calibrate_event_noise(event, target_epsilon=3.0, delta=1e-5, steps=1000,
      ...                           accountant="rdp")
      >>> 0.6 < s < 0.9
      True
    """
    target = reduce.check_positive_float(target_epsilon, name="target_epsilon")
    delta = check_delta_range(delta)
    steps = check_calibration_steps(steps)
    tol = reduce.check_positive_float(tol, name="tol")
    acc = Accountant(
        accountant=accountant,
        neighboring_relation=neighboring_relation,
        pld_discretization=pld_discretization,
    )
    acc.record(make_event(1.0), steps=0)  # refuses an event this accountant cannot account
    settings = dict(
        accountant=acc.accountant, vdi=acc.pld_discretization, relation=acc.neighboring_relation
    )

    @functools.cache
    def spent(sigma):
        try:
            return events_epsilon(((make_event(sigma), steps),), delta, warn=False, **settings)
        except ValueError:  # cannot be evaluated: treated as too little noise
            return math.inf

    return _bisect_sigma(spent, target, tol, f"over {steps} steps at δ = {delta}")


def _bisect_sigma(spent, target, tol, setting):
    """The smallest σ (within ``tol``) with ``spent(σ) ≤ target``, ``spent`` falling in σ:
    doubling up from 1 to a σ that fits, halving down to one that does not, then bisection."""
    hi = 1.0
    while spent(hi) > target:
        hi *= 2
        if hi > 2.0**60:
            raise ValueError(
                f"no `noise_multiplier` up to 2**60 spends at most `target_epsilon` {target!r} "
                f"{setting}"
            )
    lo = hi / 2
    while spent(lo) <= target and lo > tol:
        hi, lo = lo, lo / 2
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(mid) <= target else (mid, hi)
    return hi
