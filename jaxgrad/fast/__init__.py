"""Per-example norms, clipped gradients and gradient statistics at the cost of one gradient.

See :mod:`jaxgrad.fast.api` for the functions and :mod:`jaxgrad.fast.analysis` for how the
structure of an arbitrary JAX loss is read off its jaxpr.
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
