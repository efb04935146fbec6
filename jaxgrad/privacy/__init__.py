"""Differentially private SGD: Poisson sampling, the noisy clipped gradient, accounting.

One DP-SGD step samples each of the ``N`` examples independently with probability ``q``
(:func:`poisson_sample`), clips every example's gradient to norm ``C``, sums them on the fast
path (:func:`jaxgrad.clipped_grad`), adds ``N(0, σ²C² I)`` once and divides by the expected
batch size ``qN`` (:func:`dp_grad`, :func:`sampled_dp_grad`; :func:`noised_average` for a
clipped sum computed another way). The ε spent is computed by
``dp-accounting`` (:func:`epsilon`), and ``σ`` for a target ε by
:func:`calibrate_noise_multiplier`. Needs the ``privacy`` extra (``dp-accounting``).

Batch sources other than Poisson sampling, each with its own accounting event, are in
:mod:`jaxgrad.privacy.sources` (:class:`TruncatedPoisson`, :class:`WithoutReplacement`); an
:class:`Accountant` records the events of a loop of your own and answers ε and
``steps_within`` a budget. Correlated noise across steps (banded matrix factorisation,
BandMF, with its amplified accounting) is :mod:`jaxgrad.privacy.bandmf`,
:func:`bandmf_privatizer` and :class:`CyclicPoisson`. Adaptive (quantile) clipping, whose
clip norm follows a quantile of the per-example norms through a noisy count composed into the
same Gaussian step, is in :mod:`jaxgrad.privacy.adaptive`.

With optax, the noisy gradient is an ordinary gradient::

    grads = f(params, batch, mask, key)           # f = dp_grad(...)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

(any optax optimizer: post-processing of a private gradient stays private).
"""

from jaxgrad.privacy import adaptive, audit, bandmf, sources
from jaxgrad.privacy.accounting import (
    Accountant,
    AccountingFallbackWarning,
    calibrate_noise_multiplier,
    check_delta,
    dp_event,
    effective_accountant,
    epsilon,
)
from jaxgrad.privacy.adaptive import (
    AdaptiveClip,
    AdaptiveClipState,
    QuantileClippedSum,
    QuantileSum,
    quantile_privatizer,
    split_noise_multiplier,
)
from jaxgrad.privacy.noisy import (
    BandMFState,
    ClippedSum,
    DPInfo,
    PrivatizerState,
    add_noise,
    bandmf_privatizer,
    dp_grad,
    gaussian_privatizer,
    noised_average,
    sampled_dp_grad,
)
from jaxgrad.privacy.sampling import (
    PoissonSample,
    default_physical_batch_size,
    expected_rows,
    inclusion_mask,
    num_physical_batches,
    physical_batch,
    physical_batch_sizes,
    poisson_sample,
)
from jaxgrad.privacy.sources import (
    CyclicPoisson,
    Poisson,
    TruncatedPoisson,
    WithoutReplacement,
    batch_source,
)
from jaxgrad.privacy.units import augmented_loss, group_units, unit_loss

__all__ = [
    "Accountant",
    "AccountingFallbackWarning",
    "AdaptiveClip",
    "AdaptiveClipState",
    "BandMFState",
    "ClippedSum",
    "CyclicPoisson",
    "DPInfo",
    "Poisson",
    "PoissonSample",
    "PrivatizerState",
    "QuantileClippedSum",
    "QuantileSum",
    "TruncatedPoisson",
    "WithoutReplacement",
    "adaptive",
    "add_noise",
    "audit",
    "augmented_loss",
    "bandmf",
    "bandmf_privatizer",
    "batch_source",
    "calibrate_noise_multiplier",
    "check_delta",
    "default_physical_batch_size",
    "dp_event",
    "dp_grad",
    "effective_accountant",
    "epsilon",
    "expected_rows",
    "gaussian_privatizer",
    "group_units",
    "inclusion_mask",
    "noised_average",
    "num_physical_batches",
    "physical_batch",
    "physical_batch_sizes",
    "poisson_sample",
    "quantile_privatizer",
    "sampled_dp_grad",
    "sources",
    "split_noise_multiplier",
    "unit_loss",
]
