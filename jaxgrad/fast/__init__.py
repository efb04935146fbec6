"""Per-example norms, clipped gradients and gradient statistics at the cost of one gradient.

See :mod:`jaxgrad.fast.api` for the functions and :mod:`jaxgrad.fast.analysis` for how the
structure of an arbitrary JAX loss is read off its jaxpr. The pass itself
(:func:`jaxgrad.fast.passes.fast_pass`) runs in three steps: :mod:`~jaxgrad.fast.capture`
(every use's ``A`` and ``G`` from one forward and backward pass), :mod:`~jaxgrad.fast.operands`
(those arrays as the rules read them, with scaled weights' factors) and
:mod:`~jaxgrad.fast.execute` (each leaf's :class:`~jaxgrad.fast.plan.Route` executed on them).
"""

from jaxgrad.fast.api import (
    GradientDiversity,
    GradMoments,
    GradStats,
    clipped_grad,
    grad_stats,
    gradient_diversity,
    gradient_gram,
    per_example_dots,
    per_example_moments,
    per_example_norms,
)
from jaxgrad.fast.plan import LeafPlan, Plan, plan

__all__ = [
    "GradMoments",
    "GradStats",
    "GradientDiversity",
    "LeafPlan",
    "Plan",
    "clipped_grad",
    "grad_stats",
    "gradient_diversity",
    "gradient_gram",
    "per_example_dots",
    "per_example_moments",
    "per_example_norms",
    "plan",
]
