"""jaxgrad: every way to average gradients in SGD, as pure, jit-compiled JAX.

The gradient of the batch's mean loss equals the mean of the per-example gradients
(differentiation is linear); averaging *before* a nonlinearity does not. jaxgrad makes each
order a pure function, proves the equivalences and measures the differences.
"""

from jaxgrad import (
    check,
    closed_form,
    data,
    losses,
    models,
    naive,
    privacy,
    reduce,
    sharding,
    strategies,
    train,
)
from jaxgrad._loops import canonical_convolutions
from jaxgrad.accumulation import accumulate
from jaxgrad.fast import (
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
from jaxgrad.grads import (
    GradResult,
    accumulate_grad,
    batch_grad,
    mean_of_per_example_grads,
    per_example_grads,
)
from jaxgrad.models import Model

__version__ = "0.1.0"

__all__ = [
    "GradMoments",
    "GradResult",
    "GradStats",
    "GradientDiversity",
    "Model",
    "accumulate",
    "accumulate_grad",
    "batch_grad",
    "canonical_convolutions",
    "check",
    "clipped_grad",
    "closed_form",
    "data",
    "grad_stats",
    "gradient_diversity",
    "gradient_gram",
    "losses",
    "mean_of_per_example_grads",
    "models",
    "naive",
    "per_example_dots",
    "per_example_grads",
    "per_example_moments",
    "per_example_norms",
    "privacy",
    "reduce",
    "sharding",
    "strategies",
    "train",
]
