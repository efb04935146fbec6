"""Training: a jit-compiled train step for any gradient strategy and optax optimizer, and
:func:`fit`, which runs shuffled, masked epochs under ``lax.scan`` with evaluation,
checkpoints, resume and progress. ``python -m jaxgrad.train`` trains the bundled models.
"""

from jaxgrad.train import checkpoint
from jaxgrad.train.checkpoint import CheckpointError, CheckpointWarning
from jaxgrad.train.loop import FitResult, NonFiniteLossError, fit
from jaxgrad.train.metrics import evaluator
from jaxgrad.train.private import PrivacyConfig, PrivacyPlan
from jaxgrad.train.step import TrainState, init_state, loss_and_grad_fn, train_step
from jaxgrad.train.valuation import Valuation

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "FitResult",
    "NonFiniteLossError",
    "PrivacyConfig",
    "PrivacyPlan",
    "TrainState",
    "Valuation",
    "checkpoint",
    "evaluator",
    "fit",
    "init_state",
    "loss_and_grad_fn",
    "train_step",
]
