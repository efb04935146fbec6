"""Adaptive (quantile) clipping: the clip norm follows a quantile of the per-example norms.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
Clipping" (NeurIPS 2021). At step ``t`` every sampled example is clipped to ``C_t``; besides
the clipped sum the step releases a noisy count of the examples that were *not* clipped,
and moves ``C`` geometrically towards the target quantile ``γ`` of the per-example norms:

.. math::

    c_t = \\sum_i m_i \\big( \\mathbb 1[\\lVert g_i \\rVert \\le C_t] - \\tfrac12 \\big),
    \\qquad
    \\tilde b_t = \\frac{c_t + \\mathcal N(0, \\sigma_b^2)}{B_e} + \\tfrac12,
    \\qquad
    C_{t+1} = C_t \\exp\\big(-\\eta_C (\\tilde b_t - \\gamma)\\big)

(``B_e`` the public expected batch size; ``E[b̃_t]`` is the fraction of the batch at or
below ``C_t``, so ``C`` grows while fewer than ``γ`` are and shrinks while more are). The
gradient is the usual noisy clipped sum, with the *gradient* noise multiplier ``σ_Δ``:
``(S_t + N(0, σ_Δ² C_t² I)) / B_e``.

**How σ is split (paper, Theorem 1).** The count is *centred* (``1[·] − ½``, the paper's
trick), so one example moves ``c_t`` by at most ``½``. One example's contribution to the
pair ``(S_t, c_t)`` is then at most ``(C_t, ½)``; in units of each part's noise it is a
vector of norm at most ``√(σ_Δ⁻² + (2σ_b)⁻²)``. The step — one sampled batch, one release
of both parts — is therefore exactly one (sampled) Gaussian mechanism with noise multiplier

.. math::

    \\sigma = \\big(\\sigma_\\Delta^{-2} + (2\\sigma_b)^{-2}\\big)^{-1/2}
    \\quad\\Longleftrightarrow\\quad
    \\sigma_\\Delta = \\big(\\sigma^{-2} - (2\\sigma_b)^{-2}\\big)^{-1/2}
    \\quad (\\sigma_b > \\sigma / 2)

So a run is calibrated and accounted exactly as a flat-clipping run with the *total* ``σ``
(the step's dp-accounting event is unchanged in form: ``PoissonSampledDpEvent(q,
GaussianDpEvent(σ))``, or the batch source's); :func:`split_noise_multiplier` gives the
gradient's share ``σ_Δ > σ``, slightly more gradient noise than flat clipping at the same
ε. The same argument holds for every neighbouring relation a batch source uses (replace-one
doubles both parts). The paper's default ``σ_b = B_e / 20`` (std 0.05 on ``b̃``) is used
when none is given.

**What may be released.** ``C_t`` is computed from the noisy counts alone (and ``C_0``): it
is post-processing of the step's DP outputs and may be published with the parameters (the
training history of :func:`jaxgrad.train.fit` reports it per epoch as ``l2_clip``). The
count's noise key is :func:`jaxgrad.keys.clip_count_key` of the step — never the gradient
noise's key, whose Threefry counters draw the gradient noise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgrad import keys, reduce
from jaxgrad.fast import api as fast_api
from jaxgrad.privacy import gaussian, noisy

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AdaptiveClip:
    """Settings of adaptive (quantile) clipping, for :class:`jaxgrad.train.PrivacyConfig`.

    The clip norm starts at ``PrivacyConfig.l2_clip`` and follows the ``target_quantile``
    of the per-example gradient norms (module :mod:`jaxgrad.privacy.adaptive`).

    Attributes:
      target_quantile: ``γ`` in (0, 1): the fraction of examples to leave unclipped (the
        paper's default 0.5, the median).
      learning_rate: ``η_C > 0`` of the geometric update ``C ← C exp(−η_C (b̃ − γ))``
        (the paper's 0.2).
      count_noise_multiplier: ``σ_b``, the std of the count's noise (default: the paper's
        ``B_e / 20``); must exceed ``σ / 2``. The gradient noise multiplier is then
        ``σ_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2)`` (:func:`split_noise_multiplier`).

    Example::

      >>> from jaxgrad.privacy import AdaptiveClip
      >>> AdaptiveClip(target_quantile=0.7).resolve(noise_multiplier=1.0,
      ...                                           expected_batch_size=200).count_noise_multiplier
      10.0
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float | None = None

    def resolve(self, *, noise_multiplier: float, expected_batch_size: float) -> AdaptiveClip:
        """These settings checked, with ``count_noise_multiplier`` filled in (``B_e / 20``).

        Raises:
          ValueError: ``target_quantile`` outside (0, 1), ``learning_rate ≤ 0``, or a
            ``count_noise_multiplier`` that leaves no budget for the gradient (``≤ σ / 2``).
        """
        quantile = reduce.check_positive_float(self.target_quantile, name="target_quantile")
        if not quantile < 1:
            raise ValueError(
                f"`target_quantile` must lie in (0, 1) (the fraction of examples left "
                f"unclipped); got {self.target_quantile!r}"
            )
        rate = reduce.check_positive_float(self.learning_rate, name="learning_rate")
        b_e = reduce.check_positive_float(expected_batch_size, name="expected_batch_size")
        sigma_b = self.count_noise_multiplier
        default = sigma_b is None
        sigma_b = b_e / 20 if default else sigma_b
        sigma_b = reduce.check_nonnegative_float(sigma_b, name="count_noise_multiplier")
        try:
            split_noise_multiplier(noise_multiplier, count_noise_multiplier=sigma_b)
        except ValueError as e:
            if not default:
                raise
            raise ValueError(
                f"{e} (the default: the paper's expected batch size / 20 = {b_e:g} / 20); "
                "give a larger `count_noise_multiplier`, or use larger batches"
            ) from None
        return AdaptiveClip(quantile, rate, sigma_b)


def split_noise_multiplier(noise_multiplier: float, *, count_noise_multiplier: float) -> float:
    """The gradient's noise multiplier ``σ_Δ`` when the count takes ``σ_b`` of a total ``σ``.

    .. math::

        \\sigma_\\Delta = \\big(\\sigma^{-2} - (2\\sigma_b)^{-2}\\big)^{-1/2}

    (Andrew et al. 2021, Theorem 1: the centred count has sensitivity ½, so it is a Gaussian
    mechanism of multiplier ``2σ_b``, and the two compose into one of multiplier ``σ``.)
    ``σ = 0`` (no privacy) gives ``σ_Δ = 0`` with any ``σ_b``.

    Args:
      noise_multiplier: the total ``σ ≥ 0`` the step is accounted with.
      count_noise_multiplier: ``σ_b``, the count noise's std; ``> σ / 2`` when ``σ > 0``.

    Returns:
      ``σ_Δ`` (a float, ``≥ σ``).

    Raises:
      ValueError: ``σ_b ≤ σ / 2`` (the count would take the whole budget), naming it.

    Example::

      >>> from jaxgrad.privacy import split_noise_multiplier
      >>> round(split_noise_multiplier(1.0, count_noise_multiplier=5.0), 6)  # (1 - 0.01)^-½
      1.005038
    """
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    sigma_b = reduce.check_nonnegative_float(count_noise_multiplier, name="count_noise_multiplier")
    if sigma == 0:
        return 0.0
    if not 2 * sigma_b > sigma:
        raise ValueError(
            f"`count_noise_multiplier` must exceed noise_multiplier / 2 = {sigma / 2:.6g}, or "
            "the count would spend the whole budget and leave none for the gradient "
            f"(σ_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2)); got {count_noise_multiplier!r}"
        )
    # σ (1 − (σ / 2σ_b)²)^(-1/2): the same number, without σ⁻², which underflows to 0 (and
    # divided by zero) from σ ≈ 1e154.
    return sigma / math.sqrt(1 - (sigma / (2 * sigma_b)) ** 2)


class QuantileSum(NamedTuple):
    """What :class:`QuantileClippedSum` gives: the clipped sum and the centred count.

    Attributes:
      grads: ``S = Σ_i m_i clip_C(g_i)`` (sensitivity ``C``).
      count: ``c = Σ_i m_i (1[‖g_i‖ ≤ C] − ½)`` (sensitivity ½); an example dropped by the
        non-finite policy counts as clipped (``−½``).
    """

    grads: PyTree
    count: jax.Array


def _scaled(loss_fn):
    """``loss_fn / C`` (its sum only, for a ``(sum, n)`` pair), ``1/C`` a traced argument."""

    def scaled(params, example, inv_clip, *args):
        out = loss_fn(params, example, *args)
        if isinstance(out, tuple):
            return (out[0] * inv_clip, *out[1:])
        return out * inv_clip

    return scaled


class QuantileClippedSum:
    """The clipped-sum part of an adaptive-clipping step:
    ``f(params, batch, mask, l2_clip, *args) -> (QuantileSum(S, c), b, bad)``.

    .. math::

        S = \\sum_i m_i \\, \\mathrm{clip}_C(g_i), \\qquad
        c = \\sum_i m_i \\big(\\mathbb 1[\\lVert g_i \\rVert \\le C] - \\tfrac12\\big),
        \\qquad \\Delta = (C, \\tfrac12)

    as :class:`jaxgrad.privacy.ClippedSum` (the one clipped reduction of the fast path, its
    non-finite ``"drop"`` policy), but with the clip norm ``C`` a traced argument, so a
    changing ``C`` never recompiles: the loss is divided by ``C`` and clipped to 1, then the
    sum multiplied by ``C`` (``C · clip₁(g/C) = clip_C(g)`` exactly in real arithmetic).
    ``b`` is the number of examples kept, ``bad`` the number dropped.

    Args:
      loss_fn: ``loss_fn(params, example, *args) -> scalar | (loss_sum, n_items)``.
      method: ``"auto"`` (fast) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.privacy import QuantileClippedSum
      >>> part = QuantileClippedSum(lambda w, x: jnp.dot(x, w))  # example i's gradient is x_i
      >>> (s, c), kept, bad = part(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 0.5]]), None, 1.0)
      >>> [round(float(v), 6) for v in s], float(c)  # [0.6, 0.8] + [0, 0.5]; (0 − ½) + (1 − ½)
      ([0.6, 1.3], 0.0)
    """

    def __init__(self, loss_fn, *, method="auto", chunk_size=None):
        self._parts = fast_api.clipped_parts(
            _scaled(loss_fn),
            l2_clip=1.0,
            reduction="sum",
            nonfinite="drop",
            method=method,
            chunk_size=chunk_size,
        )

    def __call__(self, params, batch, mask, l2_clip, *args):
        noisy.check_sum_precision(params)  # as ClippedSum
        mask = reduce.check_mask(mask, reduce.batch_size(batch))
        # (a traced clip is the adaptive state's, positive by construction: next_clip)
        l2_clip = reduce.check_if_known(reduce.check_positive_float, l2_clip, name="l2_clip")
        dtype = jnp.result_type(jnp.float32, *jax.tree_util.tree_leaves(params))
        clip = jnp.asarray(l2_clip, dtype)
        parts = self._parts(params, batch, mask, 1 / clip, *args)
        total = jax.tree_util.tree_map(lambda t: t * clip.astype(t.dtype), parts.total)
        # parts.norms are ‖g_i‖ / C; a dropped example (non-finite) is not "unclipped".
        unclipped = mask & ~parts.dropped & (parts.norms <= 1)
        count = jnp.sum(jnp.where(mask, unclipped.astype(dtype) - 0.5, 0))
        return QuantileSum(total, count), parts.num_kept, jnp.sum(parts.dropped, dtype=jnp.int32)


def next_clip(
    l2_clip,
    count,
    key,
    *,
    target_quantile: float,
    learning_rate: float,
    count_noise_multiplier: float,
    expected_batch_size,
):
    """The geometric update of the clip norm from the step's noisy centred count.

    .. math::

        \\tilde b = \\frac{c + \\sigma_b z}{B_e} + \\tfrac12, \\quad z \\sim \\mathcal N(0, 1),
        \\qquad C' = C \\exp\\big(-\\eta_C (\\tilde b - \\gamma)\\big)

    ``z`` is :func:`jaxgrad.privacy.gaussian.normal` of ``key`` (tails not cut).

    Args:
      l2_clip: ``C``, the clip norm the count was taken at (a scalar array).
      count: ``c = Σ_i m_i (1[‖g_i‖ ≤ C] − ½)`` (:class:`QuantileClippedSum`).
      key: the count noise's key (:func:`jaxgrad.keys.clip_count_key`).
      target_quantile: ``γ``.
      learning_rate: ``η_C``.
      count_noise_multiplier: ``σ_b``.
      expected_batch_size: ``B_e`` (public).

    Returns:
      ``C'``, a scalar of ``l2_clip``'s dtype.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy.adaptive import next_clip
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> c = next_clip(jnp.float32(1.0), 5.0, entropy_key(), target_quantile=0.5,
      ...               learning_rate=0.2, count_noise_multiplier=0.0, expected_batch_size=10)
      >>> round(float(c), 6)  # all 10 unclipped: b = 1, C' = exp(-0.2 · 0.5)
      0.904837
    """
    clip = jnp.asarray(l2_clip)
    z = gaussian.normal(keys.check_private_key(key), (), clip.dtype)
    noisy_fraction = (count + count_noise_multiplier * z) / expected_batch_size + 0.5
    return (clip * jnp.exp(-learning_rate * (noisy_fraction - target_quantile))).astype(clip.dtype)


class AdaptiveClipState(NamedTuple):
    """The state of :func:`quantile_privatizer`: the clip norm ``C_t`` of the next step (no
    key: the keys come with each update, so this state may be released)."""

    l2_clip: jax.Array


def quantile_privatizer(
    *,
    noise_multiplier: float,
    initial_clip: float,
    expected_batch_size: float,
    adaptive_clip: AdaptiveClip | None = None,
    nonfinite: str = "drop",
):
    """An optax transformation: a :class:`QuantileSum` in, a private average gradient out,
    and the clip norm of the next step in its state.

    .. math::

        u_t = \\frac{1}{B_e}\\big(S_t + \\mathcal N(0, \\sigma_\\Delta^2 C_t^2 I)\\big),
        \\qquad C_{t+1} = C_t \\exp\\big(-\\eta_C (\\tilde b_t - \\gamma)\\big)

    with ``σ_Δ = split_noise_multiplier(σ, σ_b)`` and ``b̃_t`` from :func:`next_clip`; the
    step as a whole is the Gaussian mechanism of multiplier ``σ`` (account it as a
    flat-clipping step with ``noise_multiplier``). Read ``state.l2_clip`` for the next
    :class:`QuantileClippedSum`. ``update(sums, state, params=None, *, noise_key,
    count_key, num_nonfinite=0)``: step ``t``'s keys are
    ``jaxgrad.keys.dp_keys(K, t)[1]`` and ``jaxgrad.keys.clip_count_key(K, t)`` (what
    :func:`jaxgrad.train.fit` uses); ``num_nonfinite > 0`` under ``nonfinite="raise"``
    makes the update NaN.

    Args:
      noise_multiplier: the total ``σ ≥ 0`` of the step.
      initial_clip: ``C_0 > 0``.
      expected_batch_size: ``B_e = qN > 0``.
      adaptive_clip: the :class:`AdaptiveClip` settings (default ``AdaptiveClip()``).
      nonfinite: ``"drop"`` or ``"raise"``, as for :func:`jaxgrad.privacy.dp_grad`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; chain an optimizer after it.

    Example::

      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxgrad import keys
      >>> from jaxgrad.privacy import AdaptiveClip, QuantileClippedSum, quantile_privatizer
      >>> part = QuantileClippedSum(lambda w, x: jnp.dot(x, w))
      >>> private = quantile_privatizer(noise_multiplier=1.0, initial_clip=1.0,
      ...     expected_batch_size=4, adaptive_clip=AdaptiveClip(count_noise_multiplier=2.0))
      >>> tx = optax.chain(private, optax.sgd(0.1))
      >>> w, k = jnp.zeros(2), jax.random.key(0)
      >>> state = tx.init(w)
      >>> sums, _, _ = part(w, jnp.ones((4, 2)), None, state[0].l2_clip)
      >>> u, state = tx.update(sums, state, w, noise_key=keys.dp_keys(k, 0)[1],
      ...                      count_key=keys.clip_count_key(k, 0))
      >>> u.shape, state[0].l2_clip.shape
      ((2,), ())
    """
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    c0 = reduce.check_positive_float(initial_clip, name="initial_clip")
    b_e = reduce.check_positive_float(expected_batch_size, name="expected_batch_size")
    settings = (adaptive_clip or AdaptiveClip()).resolve(
        noise_multiplier=sigma, expected_batch_size=b_e
    )
    sigma_grad = split_noise_multiplier(
        sigma, count_noise_multiplier=settings.count_noise_multiplier
    )
    nonfinite = noisy.check_nonfinite(nonfinite)
    noisy.noise_stddev(sigma_grad, c0, names=("noise_multiplier", "initial_clip"))  # C_0's

    def init_fn(params):
        dtype = jnp.result_type(jnp.float32, *jax.tree_util.tree_leaves(params))
        return AdaptiveClipState(jnp.asarray(c0, dtype))

    def update_fn(sums, state, params=None, *, noise_key, count_key, num_nonfinite=0, **extra):
        del params, extra
        if not isinstance(sums, QuantileSum):
            raise TypeError(
                "quantile_privatizer's `updates` must be the QuantileSum of a "
                f"QuantileClippedSum (the clipped sum and the count); got {type(sums).__name__}"
            )
        keys.check_distinct(  # (concrete keys only: under jit there is nothing to compare)
            noise_key,
            count_key,
            name="count_key",
            key_name="noise_key",
            why="The count's noise would be entry 0 of the gradient noise's own normals, not "
            "independent of it: pass keys.clip_count_key(K, t) and keys.dp_keys(K, t)[1]",
        )
        clip = state.l2_clip
        grads = noisy._privatize(
            sums.grads,
            None,
            num_nonfinite,
            noise_key,
            nonfinite=nonfinite,
            stddev=sigma_grad * clip,
            expected_batch_size=b_e,
        )
        new = next_clip(
            clip,
            sums.count,
            count_key,
            target_quantile=settings.target_quantile,
            learning_rate=settings.learning_rate,
            count_noise_multiplier=settings.count_noise_multiplier,
            expected_batch_size=b_e,
        )
        return grads, AdaptiveClipState(new)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = [
    "AdaptiveClip",
    "AdaptiveClipState",
    "QuantileClippedSum",
    "QuantileSum",
    "next_clip",
    "quantile_privatizer",
    "split_noise_multiplier",
]
