"""dp-accounting events: DP-SGD's, their plain data (for checkpoints), their leaf mechanisms.

One step of DP-SGD with Poisson sampling rate ``q`` and noise multiplier ``σ`` is
``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``; ``T`` steps are that event self-composed
``T`` times. A recorded run is a sequence of ``(event, count)`` pairs; :func:`leaves` unrolls
it into the mechanisms the PLD size and the lower bound look at.
"""

from __future__ import annotations

import numpy as np

from jaxgrad.privacy._accounting.checks import check_dpsgd, check_gaussian_step
from jaxgrad.privacy._accounting.library import dpa

#: The dp-accounting events an :class:`Accountant` records (and serialises), by class name.
EVENTS = (
    "NoOpDpEvent",
    "NonPrivateDpEvent",
    "GaussianDpEvent",
    "PoissonSampledDpEvent",
    "SampledWithoutReplacementDpEvent",
    "TruncatedSubsampledGaussianDpEvent",
    "SelfComposedDpEvent",
    "ComposedDpEvent",
)


def _poisson_step(sigma, q):
    lib = dpa()
    return lib.PoissonSampledDpEvent(q, lib.GaussianDpEvent(sigma))


def dp_event(*, noise_multiplier: float, sampling_rate: float, steps: int):
    """The ``dp_accounting`` event of ``steps`` Poisson-sampled Gaussian DP-SGD steps.

    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), T)``; the arguments
    are checked as for :func:`epsilon`.
    """
    sigma, q, steps = check_dpsgd(noise_multiplier, sampling_rate, steps)
    return dpa().SelfComposedDpEvent(_poisson_step(sigma, q), steps)


def poisson_event(*, noise_multiplier: float, sampling_rate: float):
    """One Poisson-sampled Gaussian step: ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``."""
    return _poisson_step(*check_gaussian_step(noise_multiplier, sampling_rate))


def event_to_data(event) -> dict:
    """A dp-accounting event as plain data (JSON-serialisable): ``{"type": name, field: ...}``.

    Example::

      >>> import dp_accounting as dpa
      >>> from jaxgrad.privacy.accounting import event_to_data
      >>> event_to_data(dpa.GaussianDpEvent(1.1))
      {'type': 'GaussianDpEvent', 'noise_multiplier': 1.1}
    """
    import attr

    name = type(event).__name__
    if name not in EVENTS or getattr(dpa(), name) is not type(event):
        raise TypeError(
            f"`event` must be one of dp-accounting's {list(EVENTS)}; got {event!r}"[:400]
        )
    data = {"type": name}
    for f in attr.fields(type(event)):
        value = getattr(event, f.name)
        if f.name == "event":
            value = event_to_data(value)
        elif f.name == "events":
            value = [event_to_data(e) for e in value]
        elif isinstance(value, (np.integer, np.floating)):
            value = value.item()
        data[f.name] = value
    return data


def event_from_data(data: dict):
    """The dp-accounting event of :func:`event_to_data`'s plain data (its inverse)."""
    if not isinstance(data, dict) or data.get("type") not in EVENTS:
        raise ValueError(
            f"an event's data must be a dict whose 'type' is one of {list(EVENTS)}; got {data!r}"[
                :400
            ]
        )
    fields = {k: v for k, v in data.items() if k != "type"}
    if "event" in fields:
        fields["event"] = event_from_data(fields["event"])
    if "events" in fields:
        fields["events"] = [event_from_data(e) for e in fields["events"]]
    return getattr(dpa(), data["type"])(**fields)


#: The largest ``σ`` accounted as given: a larger one is accounted as this one. ε falls as
#: ``σ`` grows (more noise is post-processing of less), so this σ's ε bounds a larger one's;
#: dp-accounting's arithmetic overflows on ``σ²`` beyond ~1e154.
SIGMA_ACCOUNTED_MAX = 1e100


def accounted_sigma(sigma: float) -> float:
    """The ``σ`` accounted for a given one: at most :data:`SIGMA_ACCOUNTED_MAX`."""
    return min(sigma, SIGMA_ACCOUNTED_MAX)


def _accounted(event):
    import attr

    changes = {}
    for f in attr.fields(type(event)):
        value = getattr(event, f.name)
        if f.name == "event":
            changes["event"] = _accounted(value)
        elif f.name == "events":
            changes["events"] = [_accounted(e) for e in value]
        elif f.name == "noise_multiplier" and accounted_sigma(value) != value:
            changes["noise_multiplier"] = accounted_sigma(value)
    return attr.evolve(event, **changes) if changes else event


def accounted(events):
    """``[(event, count), ...]`` with every noise multiplier above
    :data:`SIGMA_ACCOUNTED_MAX` lowered to it (a valid upper bound on ε, computable)."""
    return [(_accounted(e), c) for e, c in events]


def _leaves(event, count):
    lib = dpa()
    if isinstance(event, lib.SelfComposedDpEvent):
        yield from _leaves(event.event, count * event.count)
    elif isinstance(event, lib.ComposedDpEvent):
        for e in event.events:
            yield from _leaves(e, count)
    else:
        yield event, count


def leaves(events):
    """``(leaf, count)`` for every leaf mechanism of ``[(event, count), ...]`` (compositions
    unrolled, counts multiplied)."""
    for event, count in events:
        yield from _leaves(event, count)


def gaussian_step(leaf):
    """``(σ, q)`` of a Poisson-sampled Gaussian leaf, ``(σ, 1)`` of a plain Gaussian, else None."""
    lib = dpa()
    if isinstance(leaf, lib.PoissonSampledDpEvent) and isinstance(leaf.event, lib.GaussianDpEvent):
        return leaf.event.noise_multiplier, leaf.sampling_probability
    if isinstance(leaf, lib.GaussianDpEvent):
        return leaf.noise_multiplier, 1.0
    return None
