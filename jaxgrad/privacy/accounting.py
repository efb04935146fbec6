"""(ε, δ) of DP-SGD, and σ for a target ε, by the ``dp-accounting`` library.

One step of DP-SGD with Poisson sampling rate ``q`` and noise multiplier ``σ`` is the
sampled Gaussian mechanism ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``; ``T`` steps are
that event self-composed ``T`` times. Two accountants:

* ``"pld"`` (default) — privacy loss distributions, the tighter bound; its ε is an upper
  bound whose slack shrinks with ``pld_discretization`` (the value discretisation interval;
  1e-4 by default: ε = 2.3818 for the reference below, against 2.3906 at 1e-3, in about a
  second);
* ``"rdp"`` — Rényi DP over dp-accounting's default orders, looser but fast.

The PLD's arrays grow as ``σ`` shrinks (one step's privacy loss spans ~``1/(2σ²)`` in
steps of ``pld_discretization``; composing ``T`` steps spreads it ~``T`` times wider): at
``σ = 0.01`` one step alone holds 6e7 points, and ``calibrate_noise_multiplier(
target_epsilon=1e6)`` used to be killed at 23.5 GB. :func:`pld_size` estimates the sizes
in closed form before anything is built; above :data:`PLD_MAX_STEP_POINTS` /
:data:`PLD_MAX_POINTS`, :func:`epsilon` and :func:`calibrate_noise_multiplier` answer with
the RDP accountant instead (a valid, looser upper bound) and say so with an
:class:`AccountingFallbackWarning`. So they do where the PLD answers ``ε = inf``: it drops
its tails' mass (up to ~1e-15 over many steps), so a smaller ``δ`` is out of its reach
(at ``δ = 1e-15``, ``q = 32/1438``, 45 steps, RDP's σ = 1.55 meets ε = 2; the PLD first
answers a finite ε at σ ≈ 198).

Reference (Abadi et al. 2016's MNIST setting): ``σ = 1.1``, ``q = 256/60000``, 14063 steps
(60 epochs), ``δ = 1e-5`` → RDP ε ≈ 2.597, PLD ε ≈ 2.382.

This accounting holds only for Poisson sampling (:func:`jaxgrad.privacy.poisson_sample`);
shuffled fixed-size batches are a different mechanism and must not be accounted with it.
Other batch sources (:mod:`jaxgrad.privacy.sources`) bring their own events; an
:class:`Accountant` records any sequence of events as a loop runs (same guards), answers ε
and how many more steps fit a budget, and serialises to plain data for checkpoints.

The parts live in :mod:`jaxgrad.privacy._accounting`, one idea a module; this module hands
their public names on (import them from here, or from :mod:`jaxgrad.privacy`).
"""

from __future__ import annotations

from jaxgrad.privacy._accounting.accountant import Accountant
from jaxgrad.privacy._accounting.calibrate import calibrate_event_noise, calibrate_noise_multiplier
from jaxgrad.privacy._accounting.checks import ACCOUNTANTS, RELATIONS, check_delta
from jaxgrad.privacy._accounting.epsilon import effective_accountant, epsilon, epsilon_lower_bound
from jaxgrad.privacy._accounting.events import (
    EVENTS,
    dp_event,
    event_from_data,
    event_to_data,
    poisson_event,
)
from jaxgrad.privacy._accounting.library import make_accountant
from jaxgrad.privacy._accounting.pld_size import (
    PLD_MAX_POINTS,
    PLD_MAX_STEP_POINTS,
    AccountingFallbackWarning,
    PLDSize,
    pld_size,
)

__all__ = [
    "ACCOUNTANTS",
    "EVENTS",
    "PLD_MAX_POINTS",
    "PLD_MAX_STEP_POINTS",
    "RELATIONS",
    "Accountant",
    "AccountingFallbackWarning",
    "PLDSize",
    "calibrate_event_noise",
    "calibrate_noise_multiplier",
    "check_delta",
    "dp_event",
    "effective_accountant",
    "epsilon",
    "epsilon_lower_bound",
    "event_from_data",
    "event_to_data",
    "make_accountant",
    "pld_size",
    "poisson_event",
]
