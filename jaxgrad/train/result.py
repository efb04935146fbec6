"""What :func:`jaxgrad.train.fit` returns (:class:`FitResult`) and what it raises at a
non-finite step (:class:`NonFiniteLossError`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxgrad.train.step import TrainState

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """Training stopped at a non-finite loss.

    Attributes:
      step: the 1-based number of the step whose loss was not finite.
      state: the :class:`TrainState` before that step (the last good one).
      checkpoint: the last good checkpoint on disk, or None.
    """

    def __init__(self, message: str, *, step: int, state: TrainState, checkpoint: str | None):
        super().__init__(message)
        self.step, self.state, self.checkpoint = step, state, checkpoint


class _FitFields(NamedTuple):
    params: PyTree
    state: TrainState
    history: list[dict]


class FitResult(_FitFields):
    """What :func:`fit` returns: ``params, state, history = result`` unpacks it.

    Attributes:
      params: the trained parameters.
      state: the final :class:`TrainState` (params, optimizer state, step count).
      history: one dict per epoch: ``epoch``, ``step``, ``loss`` (the epoch's training loss:
        each batch's mean loss, at the parameters that batch saw, weighted by its number of
        real examples; for a scalar loss the mean over every example of the epoch, the last
        partial batch included; for ``(loss_sum, n_items)`` losses batches are weighted by
        examples, not items), ``seconds`` (since the start of this call) and the
        ``evaluate`` metrics (and ``epsilon`` for a private run).
      privacy: None for a plain run; for a private run, what the run releases about its
        guarantee after its last step: ``epsilon``, ``delta``, ``noise_multiplier`` (σ),
        ``sampling_rate``, ``steps``, ``l2_clip``, ``accountant``, ... (the CLI's ``privacy``
        record, :meth:`jaxgrad.train.PrivacyPlan.summary`).
      valuation: None, or with ``valuation=`` the ``(N,)`` float64 scores of
        :class:`jaxgrad.train.Valuation`, one per row of ``train_data``.
    """

    # Not tuple fields, so the three-way unpacking of every earlier release keeps working.
    privacy: dict | None
    valuation: np.ndarray | None

    def __new__(cls, params, state, history, privacy=None, valuation=None):
        self = super().__new__(cls, params, state, history)
        self.privacy, self.valuation = privacy, valuation
        return self

    def _replace(self, **changes):
        extra = {k: changes.pop(k, getattr(self, k)) for k in ("privacy", "valuation")}
        return FitResult(*super()._replace(**changes), **extra)

    def __repr__(self):
        return (
            f"{super().__repr__()[:-1]}, privacy={self.privacy!r}, "
            f"valuation={'None' if self.valuation is None else 'array'})"
        )
