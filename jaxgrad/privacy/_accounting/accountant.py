"""The :class:`Accountant`: the events a loop of your own records, ε so far, steps left.

It holds ``(event, count)`` pairs (any batch source's dp-accounting event), answers ε by
:func:`.epsilon.events_epsilon` (the same guards as :func:`epsilon`) and how many more steps
fit a budget, and serialises to plain data for checkpoints.
"""

from __future__ import annotations

from jaxgrad import reduce
from jaxgrad.privacy._accounting.checks import (
    ACCOUNTANTS,
    check_accountant,
    check_delta_range,
    check_relation,
    check_steps,
)
from jaxgrad.privacy._accounting.epsilon import (
    events_accountant,
    events_epsilon,
    events_fallback,
)
from jaxgrad.privacy._accounting.events import event_from_data, event_to_data, poisson_event
from jaxgrad.privacy._accounting.library import dpa_accountant


def appended(events: tuple, event, count: int) -> tuple:
    """``events`` (``(event, count)`` pairs) with ``count`` more of ``event``: added to the
    last pair's count where it is the same event (a small state, a fast compose)."""
    if count == 0:
        return events
    if events and events[-1][0] == event:
        return (*events[:-1], (event, events[-1][1] + count))
    return (*events, (event, count))


class Accountant:
    """The privacy spent so far by a loop of your own: record each step's event, ask for ε.

    .. math::

        \\varepsilon(\\delta) = \\varepsilon_{\\mathcal A}\\big(\\textstyle\\bigcirc_k\\,
            E_k^{\\circ c_k}\\big)

    the ε at ``δ`` that dp-accounting's accountant ``𝒜`` gives for the composition of the
    recorded events ``E_k`` (each ``c_k`` times, in order; different events compose). A
    step of DP-SGD with Poisson sampling is ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``
    (``record(noise_multiplier=σ, sampling_rate=q)``); other batch sources give their own
    event (:mod:`jaxgrad.privacy.sources`). The accountant reuses :func:`epsilon`'s guards:
    a PLD larger than :data:`PLD_MAX_STEP_POINTS` / :data:`PLD_MAX_POINTS` is not built and
    the RDP accountant answers (with an :class:`AccountingFallbackWarning`; refused if an
    event has no RDP analysis), as it does where the PLD answers ``inf`` at ``δ`` (below
    the tail mass it drops) but RDP a finite ε; and an ε below what one recorded Poisson
    step alone spends is refused as a numerical breakdown.

    Its state is plain data (:meth:`state_dict`, JSON-serialisable: the settings and the
    events with their counts), so it can be written into a checkpoint and resumed exactly
    (:meth:`from_state`); consecutive equal events are held once with their count.

    Args:
      accountant: ``"pld"`` (default; privacy loss distributions, tighter) or ``"rdp"``.
      delta: the default ``δ`` of :meth:`epsilon` and :meth:`steps_within` (optional).
      neighboring_relation: ``"add_or_remove_one"`` (default; Poisson and truncated Poisson
        sampling) or ``"replace_one"`` (fixed-size sampling without replacement). Events
        that dp-accounting cannot account under it are refused when recorded.
      pld_discretization: the PLD accountant's value discretisation interval.

    Example::

      >>> from jaxgrad.privacy import Accountant
      >>> acc = Accountant(accountant="rdp", delta=1e-5)
      >>> acc.record(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=14063)
      >>> round(acc.epsilon(), 3)
      2.597
      >>> Accountant.from_state(acc.state_dict()).epsilon() == acc.epsilon()
      True
    """

    def __init__(
        self,
        *,
        accountant: str = "pld",
        delta: float | None = None,
        neighboring_relation: str = "add_or_remove_one",
        pld_discretization: float = 1e-4,
    ):
        self.accountant = check_accountant(accountant)
        self.neighboring_relation = check_relation(neighboring_relation)
        self.pld_discretization = reduce.check_positive_float(
            pld_discretization, name="pld_discretization"
        )
        self.delta = None if delta is None else check_delta_range(delta)
        self._events: tuple = ()  # (event, count) pairs, in the order recorded

    @property
    def events(self) -> tuple:
        """The recorded ``(event, count)`` pairs, in order."""
        return self._events

    @property
    def steps(self) -> int:
        """The number of events recorded (with their counts)."""
        return sum(c for _, c in self._events)

    def _event(self, event, noise_multiplier, sampling_rate):
        if event is None:
            if noise_multiplier is None or sampling_rate is None:
                raise ValueError(
                    "give a dp-accounting `event`, or `noise_multiplier` and `sampling_rate` "
                    f"(a Poisson-sampled Gaussian step); got event=None, noise_multiplier="
                    f"{noise_multiplier!r}, sampling_rate={sampling_rate!r}"
                )
            return poisson_event(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate)
        if noise_multiplier is not None or sampling_rate is not None:
            raise ValueError(
                "give either `event` or `noise_multiplier` and `sampling_rate`, not both; got "
                f"event={event!r}, noise_multiplier={noise_multiplier!r}"[:300]
            )
        event_to_data(event)  # checks it is an event this accountant can hold
        return event

    def _check_supported(self, event):
        vdi, relation = self.pld_discretization, self.neighboring_relation
        accountants = [a for a in ACCOUNTANTS if dpa_accountant(a, vdi, relation).supports(event)]
        if self.accountant not in accountants:
            other = (
                f"accountant={accountants[0]!r} can"
                if accountants
                else "no accountant can (under this relation)"
            )
            raise ValueError(
                f"`event` {event!r} cannot be accounted by dp-accounting's "
                f"{self.accountant!r} accountant under neighboring_relation="
                f"{self.neighboring_relation!r}; {other}. Poisson sampling is accounted under "
                "'add_or_remove_one', fixed-size sampling without replacement under "
                "'replace_one' (RDP only), truncated Poisson by the PLD only"
            )

    def record(self, event=None, /, *, noise_multiplier=None, sampling_rate=None, steps: int = 1):
        """Records ``steps`` more steps of ``event`` (or of a Poisson-sampled Gaussian).

        Args:
          event: a dp-accounting event (one of :data:`EVENTS`), e.g. a batch source's
            ``dp_event``; or None with ``noise_multiplier`` and ``sampling_rate``.
          noise_multiplier: ``σ`` of a Poisson-sampled Gaussian step.
          sampling_rate: its ``q``.
          steps: how many times ``event`` happened (``≥ 0``).

        Raises:
          ValueError: an event dp-accounting cannot account with these settings (naming
            the accountant or relation that can), or bad arguments.
        """
        event = self._event(event, noise_multiplier, sampling_rate)
        steps = check_steps(steps)
        self._check_supported(event)
        self._events = appended(self._events, event, steps)

    def _delta(self, delta):
        if delta is None:
            if self.delta is None:
                raise ValueError("give `delta` (this Accountant was made with delta=None)")
            return self.delta
        return check_delta_range(delta)

    def effective_accountant(self, events=None, delta: float | None = None) -> str:
        """The accountant :meth:`epsilon` uses: ``"rdp"`` where the PLD would not fit or,
        at ``δ`` (default: the accountant's, if any), answers ``inf`` while RDP does not
        (that takes computing ε)."""
        events = self.events if events is None else events
        delta = self.delta if delta is None else check_delta_range(delta)
        if delta is None:
            return events_accountant(events, self.accountant, self.pld_discretization)[0]
        return events_fallback(events, delta, **self._settings())[1]

    def _settings(self):
        """This accountant's keyword arguments of :func:`events_epsilon`."""
        return dict(
            accountant=self.accountant,
            vdi=self.pld_discretization,
            relation=self.neighboring_relation,
        )

    def epsilon(self, delta: float | None = None) -> float:
        """The ε spent by the recorded events at ``δ`` (default: the accountant's ``delta``).

        Returns:
          ε as a float (0 with nothing recorded, ``inf`` for a step without noise).
        """
        # Called here, not through a helper: its fallback warning names our caller's line.
        return events_epsilon(self.events, self._delta(delta), **self._settings())

    def steps_within(
        self,
        target_epsilon: float,
        event=None,
        /,
        *,
        noise_multiplier=None,
        sampling_rate=None,
        delta: float | None = None,
        max_steps: int = 2**31 - 1,
    ) -> int:
        """How many more steps of ``event`` fit the budget: the largest ``k`` with
        ``ε(recorded ∘ event^k) ≤ target_epsilon``.

        .. math::

            k^\\star = \\max\\{k \\le k_{\\max} : \\varepsilon(E_1^{c_1} \\circ \\dots
                \\circ E^{k}) \\le \\varepsilon_{\\text{target}}\\}

        ε grows with ``k``: found by doubling, then bisection (``O(log k)`` evaluations),
        each by the accountant :meth:`epsilon` would use after recording them, and checked
        at the answer (``k`` fits, ``k + 1`` does not, unless ``k = max_steps``).

        Args:
          target_epsilon: the budget ``ε > 0``.
          event: a dp-accounting event, or None with ``noise_multiplier`` and
            ``sampling_rate`` (a Poisson-sampled Gaussian step).
          noise_multiplier: ``σ`` of a Poisson step.
          sampling_rate: its ``q``.
          delta: ``δ`` (default: the accountant's).
          max_steps: the largest answer.

        Returns:
          ``k ≥ 0`` (0: the budget is already spent, or not one more step fits).

        Example::

          >>> from jaxgrad.privacy import Accountant
          >>> acc = Accountant(accountant="rdp", delta=1e-5)
          >>> k = acc.steps_within(2.0, noise_multiplier=1.1, sampling_rate=0.01)
          >>> acc.record(noise_multiplier=1.1, sampling_rate=0.01, steps=k)
          >>> acc.epsilon() <= 2.0
          True
        """
        target = reduce.check_positive_float(target_epsilon, name="target_epsilon")
        event = self._event(event, noise_multiplier, sampling_rate)
        self._check_supported(event)
        delta = self._delta(delta)
        limit = reduce.check_positive_int(max_steps, name="max_steps")

        def spent(k):
            events = appended(self.events, event, k)
            return events_epsilon(events, delta, warn=False, **self._settings())

        if spent(0) > target:
            return 0
        good, bad = 0, 1
        while bad < limit and spent(bad) <= target:  # ε(k) ≤ target for every k ≤ good
            good, bad = bad, min(2 * bad, limit)
        if bad == limit and spent(limit) <= target:
            return limit
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if spent(mid) <= target else (good, mid)
        return good

    def state_dict(self) -> dict:
        """The accountant as plain data (JSON-serialisable): settings and ``(event, count)``s."""
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "neighboring_relation": self.neighboring_relation,
            "pld_discretization": self.pld_discretization,
            "events": [[event_to_data(e), int(c)] for e, c in self._events],
        }

    @classmethod
    def from_state(cls, state: dict) -> Accountant:
        """The accountant whose :meth:`state_dict` is ``state`` (every event re-checked)."""
        if not isinstance(state, dict) or set(state) != {
            "accountant",
            "delta",
            "neighboring_relation",
            "pld_discretization",
            "events",
        }:
            raise ValueError(f"`state` must be an Accountant.state_dict(); got {state!r}"[:300])
        acc = cls(
            accountant=state["accountant"],
            delta=state["delta"],
            neighboring_relation=state["neighboring_relation"],
            pld_discretization=state["pld_discretization"],
        )
        for data, count in state["events"]:
            acc.record(event_from_data(data), steps=count)
        return acc

    def __repr__(self):
        return (
            f"Accountant(accountant={self.accountant!r}, delta={self.delta!r}, "
            f"neighboring_relation={self.neighboring_relation!r}, steps={self.steps})"
        )
