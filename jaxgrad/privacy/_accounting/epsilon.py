"""ε of DP-SGD steps, or of any recorded events, by dp-accounting, guarded against breakdown.

Three guards around every ε: a PLD too large to build is not built, and where the PLD
cannot reach ``δ`` (it answers ``inf``: dp-accounting drops its tails' mass) it does not
answer (:mod:`.pld_size`: the RDP accountant answers, and says so); an ε below what one
step alone spends (:func:`epsilon_lower_bound`, closed form) is refused as a numerical
breakdown.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxgrad.privacy._accounting.checks import check_delta_range, check_dpsgd, check_gaussian_step
from jaxgrad.privacy._accounting.events import (
    accounted,
    accounted_sigma,
    dp_event,
    gaussian_step,
    leaves,
)
from jaxgrad.privacy._accounting.library import dpa, dpa_accountant, make_accountant, quiet_absl
from jaxgrad.privacy._accounting.pld_size import (
    COARSER,
    RDP_ANSWERS,
    check_rdp_fallback,
    events_pld_fit,
    pld_fits,
    size_situation,
    unreachable_situation,
    warn_fallback,
)


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
      accountant: ``"pld"`` (default) or ``"rdp"``. A PLD larger than the limits
        (:func:`pld_size`; small ``σ``) is not built, and a PLD that answers ``inf`` (a
        ``δ`` below the tail mass dp-accounting drops, ~1e-15 over many steps) is not
        believed: the RDP accountant answers instead, with an
        :class:`AccountingFallbackWarning`.
      pld_discretization: the PLD accountant's value discretisation interval.

    Returns:
      ε as a float; a ``σ`` above :data:`SIGMA_ACCOUNTED_MAX` (1e100) gets that σ's ε,
      which bounds its own.

    Example::

      >>> from jaxgrad.privacy import epsilon
      >>> round(epsilon(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=14063,
      ...               delta=1e-5, accountant="rdp"), 3)
      2.597
    """
    sigma, q, steps = check_dpsgd(noise_multiplier, sampling_rate, steps)
    delta = check_delta_range(delta)
    make_accountant(accountant, pld_discretization=pld_discretization)  # checks both
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    sigma = accounted_sigma(sigma)
    eps, _, why = dpsgd_fallback(sigma, q, steps, delta, accountant, pld_discretization)
    if why is not None:
        warn_fallback(why[0], RDP_ANSWERS, remedy=why[1], stacklevel=2)
    return eps


def dpsgd_fallback(sigma, q, steps, delta, accountant, vdi, pld_eps=None):
    """``(ε, used, why)``: ε of ``steps`` DP-SGD steps as :func:`epsilon` computes it, the
    accountant that answered, and why RDP answered in the PLD's place (``(situation,
    remedy)`` for :func:`warn_fallback`; None where it did not): :func:`_answer`.

    ``pld_eps``: ``σ ->`` the PLD's guarded ε at these settings, where the caller memoises
    it (calibration); :func:`dpsgd_epsilon` by default.
    """

    def eps_of(used):
        if used == "pld" and pld_eps is not None:
            return pld_eps(sigma)
        return dpsgd_epsilon(sigma, q, steps, delta, used, vdi)

    fits = lambda: pld_fits(sigma, q, steps, vdi)
    too_large = lambda size: size_situation(sigma, q, steps, vdi, size)
    return _answer(accountant, delta, fits, too_large, eps_of)


def _answer(accountant, delta, fits, too_large, eps_of, rdp_supported=True):
    """``(ε, used, why)``: the one fallback policy of every ε.

    ``accountant`` answers, except where it is the PLD and either its size would pass the
    limits (``fits() -> (fits, size)``; ``too_large(size)`` says why, and RDP answers) or
    it answers ``ε = inf`` at ``delta`` (its truncated tails exceed δ) where RDP, if it
    analyses every step (``rdp_supported``), answers a finite ε: a valid bound.
    ``eps_of(accountant)`` is the guarded ε by that accountant; ``why`` is ``(situation,
    remedy)`` for :func:`warn_fallback`, None where the accountant asked for answered.
    """
    if accountant == "rdp":
        return eps_of("rdp"), "rdp", None
    fit, size = fits()
    if not fit:
        why = too_large(size), COARSER
        return eps_of("rdp"), "rdp", why
    eps = eps_of("pld")
    if eps < math.inf or not rdp_supported:
        return eps, "pld", None
    rdp = eps_of("rdp")
    if rdp == math.inf:  # (a step without noise is inf to both)
        return eps, "pld", None
    return rdp, "rdp", (unreachable_situation(delta), None)


def effective_accountant(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "pld",
    pld_discretization: float = 1e-4,
    delta: float | None = None,
) -> str:
    """The accountant :func:`epsilon` uses for these arguments: ``"rdp"`` where it falls back.

    ``"pld"`` only when asked for and the PLD fits :data:`PLD_MAX_STEP_POINTS` and
    :data:`PLD_MAX_POINTS` (:func:`pld_size`) and, given ``delta``, answers a finite ε at
    it (that takes computing the PLD's ε); a record of the run should name this one.

    Example::

      >>> from jaxgrad.privacy.accounting import effective_accountant
      >>> kw = dict(sampling_rate=0.01, steps=1000)
      >>> effective_accountant(noise_multiplier=1.0, **kw), effective_accountant(
      ...     noise_multiplier=0.01, **kw)
      ('pld', 'rdp')
    """
    sigma, q, steps = check_dpsgd(noise_multiplier, sampling_rate, steps)
    make_accountant(accountant, pld_discretization=pld_discretization)  # checks both
    if accountant == "rdp" or sigma == 0 or steps == 0:
        return accountant
    sigma = accounted_sigma(sigma)
    if delta is None:
        return "pld" if pld_fits(sigma, q, steps, pld_discretization)[0] else "rdp"
    delta = check_delta_range(delta)
    return dpsgd_fallback(sigma, q, steps, delta, accountant, pld_discretization)[1]


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
    sigma, q = check_gaussian_step(noise_multiplier, sampling_rate)
    delta = check_delta_range(delta)
    if sigma == 0:
        return math.log1p(max(0.0, q - delta))
    with np.errstate(over="ignore", divide="ignore"):
        tv = q * math.erf(float(np.float64(1.0) / (2 * math.sqrt(2) * np.float64(sigma))))
    return math.log1p(max(0.0, tv - delta))


def _events_lower_bound(events, delta):
    """The largest one-step lower bound (:func:`epsilon_lower_bound`) over the Poisson-sampled
    and plain Gaussian steps recorded (a composition spends at least what any part does)."""
    bound = 0.0
    for leaf, c in leaves(events):
        step = gaussian_step(leaf)
        if c == 0 or step is None:
            continue
        sigma, q = step
        if q > 0:
            bound = max(
                bound, epsilon_lower_bound(noise_multiplier=sigma, sampling_rate=q, delta=delta)
            )
    return bound


def _below(eps, lower):
    """Whether ``eps`` falls below the lower bound (beyond round-off): a breakdown."""
    return not eps >= lower - 1e-12 * (1 + lower)


def _compose(accountant, vdi, relation, events, delta, subject, hint=""):
    """ε of ``[(event, count), ...]`` by ``accountant``, exactly as asked (no size check);
    its arithmetic failing is a ValueError that names ``subject``."""
    try:
        with quiet_absl():
            if accountant == "rdp":
                return _rdp_epsilon(relation, events, delta)
            acc = dpa_accountant(accountant, vdi, relation)
            for event, count in events:
                acc.compose(event, count)
            return float(acc.get_epsilon(delta))
    except (ArithmeticError, MemoryError, ValueError) as e:  # overflow
        raise ValueError(
            f"dp-accounting's {accountant!r} accountant cannot evaluate {subject}: it raised "
            f"{type(e).__name__}: {e}{hint}"
        ) from e


def _rdp_epsilon(relation, events, delta):
    """ε of ``[(event, count), ...]`` by dp-accounting's RDP accountant, as its ``compose``
    and ``get_epsilon`` give it: RDP composes by addition, the accountant adding ``count``
    times each event's curve over its orders, so each event's curve is computed once per
    process (:func:`_event_rdp`) and summed here. Searches over step counts (a budget's last
    step, σ for a target ε) ask for the same events with many counts; one subsampled
    without replacement takes ~0.5 s of CPU to analyse."""
    orders = dpa_accountant("rdp", None, relation).orders
    rdp = np.zeros_like(orders)
    for event, count in events:
        try:
            curve = _cached_event_rdp(event, relation)
        except TypeError:  # an event holding a list (ComposedDpEvent) is not hashable
            curve = _event_rdp(event, relation)
        rdp += count * curve
    return float(dpa().rdp.compute_epsilon(orders, rdp, delta)[0])


def _event_rdp(event, relation) -> np.ndarray:
    """One ``event``'s RDP curve under ``relation`` (a fresh RDP accountant's, read-only)."""
    acc = dpa_accountant("rdp", None, relation)
    acc.compose(event, 1)
    curve = acc.rdp
    curve.flags.writeable = False
    return curve


_cached_event_rdp = functools.lru_cache(maxsize=256)(_event_rdp)


def dpsgd_epsilon(sigma, q, steps, delta, accountant, vdi):
    """ε of ``steps`` DP-SGD steps by ``accountant`` exactly as asked (no size check),
    guarded against breakdown."""
    subject = f"`noise_multiplier` {sigma!r} (q = {q}, {steps} steps)"
    hint = "; try accountant='rdp' or a coarser pld_discretization" if accountant == "pld" else ""
    event = dp_event(noise_multiplier=sigma, sampling_rate=q, steps=steps)
    eps = _compose(accountant, vdi, "add_or_remove_one", [(event, 1)], delta, subject, hint)
    lower = epsilon_lower_bound(noise_multiplier=sigma, sampling_rate=q, delta=delta)
    if _below(eps, lower):
        raise ValueError(
            f"dp-accounting's {accountant!r} accountant returned ε = {eps!r} for "
            f"`noise_multiplier` {sigma!r} (q = {q}, {steps} steps, δ = {delta}), "
            f"below the lower bound {lower:.6g} that one step alone spends: its computation "
            "broke down numerically (σ this small gives no meaningful privacy)"
        )
    return eps


def events_accountant(events, accountant, vdi):
    """``(name, size)``: the accountant ε of ``events`` uses, ``"rdp"`` where the PLD asked
    for would not fit (``size`` from :func:`events_pld_fit`; None unless the PLD was sized)."""
    if accountant == "rdp" or not events:
        return accountant, None
    fits, size = events_pld_fit(accounted(events), vdi)
    return ("pld" if fits else "rdp"), size


def events_epsilon(events, delta, *, accountant, vdi, relation, warn=True):
    """ε of ``[(event, count), ...]`` at ``δ`` (0 for none): by ``accountant``, or by RDP
    where its PLD would not fit or cannot reach ``δ`` (:func:`events_fallback`; with a
    warning if ``warn``), guarded against breakdown."""
    eps, _, why = events_fallback(events, delta, accountant=accountant, vdi=vdi, relation=relation)
    if warn and why is not None:  # from here: 1 this, 2 Accountant.epsilon, 3 its caller
        warn_fallback(why[0], RDP_ANSWERS, remedy=why[1], stacklevel=3)
    return eps


def events_fallback(events, delta, *, accountant, vdi, relation):
    """``(ε, used, why)`` of ``[(event, count), ...]`` at ``δ``, as :func:`dpsgd_fallback`:
    RDP answers where the PLD would not fit (refused if an event has no RDP analysis), and
    where the PLD answers ``inf`` but RDP, given every event, a finite ε; a noise multiplier
    above :data:`SIGMA_ACCOUNTED_MAX` is accounted as that one."""
    if not events:
        return 0.0, accountant, None
    used, size = events_accountant(events, accountant, vdi)
    events = accounted(events)
    rdp = dpa_accountant("rdp", vdi, relation)
    eps, used, why = _answer(
        accountant,
        delta,
        lambda: (used == accountant, size),
        lambda size: check_rdp_fallback(events, size, vdi, relation),
        lambda a: _compose(a, vdi, relation, events, delta, "the recorded events"),
        rdp_supported=all(rdp.supports(e) for e, _ in events),
    )
    lower = _events_lower_bound(events, delta)
    if _below(eps, lower):
        raise ValueError(
            f"dp-accounting's {used!r} accountant returned ε = {eps!r} (δ = {delta}), "
            f"below the lower bound {lower:.6g} that one recorded step alone spends: its "
            "computation broke down numerically"
        )
    return eps, used, why
