"""The noisy DP-SGD gradient, on the fast clipped-sum path, with noise added exactly once.

.. math::

    \\tilde g = \\frac{1}{q N} \\Big( \\sum_i m_i \\, \\mathrm{clip}_C(g_i)
        + \\mathcal N(0, \\sigma^2 C^2 I) \\Big),
    \\qquad \\mathrm{clip}_C(g) = g \\min(1, C / \\lVert g \\rVert)

Adding or removing one example changes the clipped *sum* by at most ``C`` in L2 norm, so the
noise is calibrated to the sum (std ``σC``) and added to the sum; the sum is then divided by
the *expected* batch size ``qN``, a public constant — not by the realised count ``Σ m_i``,
which depends on the data and is private. (Adding ``N(0, σ²C²)`` to the *mean* instead would
be ``qN`` times too little noise.)

The clipped sum is :func:`jaxgrad.clipped_grad` with ``reduction="sum"`` (its fast path: one
forward and one backward pass). Under accumulation over physical batches
(:func:`sampled_dp_grad`) the clipped sums are added first and the noise is drawn once, from
one key, for the whole step; under data parallelism the same holds — the noise is drawn in
the replicated result from one key, never once per device.

Non-finite per-example gradients (``nonfinite=``): a NaN or inf in one example's gradient
would make the whole sum NaN. With ``"drop"`` (the default) such an example is left out
(its contribution is 0, which keeps the sensitivity ``C``) and counted in
:attr:`DPInfo.num_nonfinite`; with ``"raise"`` ``f`` raises ``FloatingPointError`` naming
how many. The count is a diagnostic computed from private data: it is not privatised.
"""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrad import _loops, keys, reduce, sharding
from jaxgrad.fast import api as fast_api
from jaxgrad.grads import check_loss_args, validate_concrete
from jaxgrad.privacy import gaussian, sampling, threefry

PyTree = Any
NONFINITE = ("drop", "raise")  # "propagate" would make one example's NaN the whole step's


class DPInfo(NamedTuple):
    """What one noisy step saw (not privatised: diagnostics only, never to be released).

    Attributes:
      num_examples: the realised number of examples ``Σ_i m_i`` that contributed.
      num_nonfinite: examples whose gradient was not finite and were left out.
      num_physical_batches: physical batches the draw needed, ``⌈b / P⌉`` (1 for
        :func:`dp_grad`; :func:`sampled_dp_grad` runs the first even for an empty draw).
    """

    num_examples: jax.Array
    num_nonfinite: jax.Array
    num_physical_batches: jax.Array


def check_nonfinite(nonfinite):
    """The DP step's non-finite policy: ``"drop"`` or ``"raise"`` (of :func:`clipped_grad`'s)."""
    return reduce.check_choice(nonfinite, NONFINITE, name="nonfinite")


def check_sum_precision(params, *, name: str = "params") -> None:
    """Refuses parameters narrower than float32 in a DP step's clipped sum (works traced).

    Also the noise's own check (:func:`add_noise`, ``name="total"``): a sum held in bfloat16
    rounds ``S + N(0, σ²C²)`` back to its spacing, which at ``|S| = 3000`` is 16 — noise of
    std 1 vanished entirely, and the "noisy" sum was ``S`` itself.

    The sum is computed in the parameters' dtype, and rounding ``S`` to a spacing of up to
    ``|S| · eps`` (``eps = 2⁻⁷`` in bfloat16, ``2⁻¹⁰`` in float16) moves it by more than the
    clip norm ``C`` once ``|S| > C / eps``: 10016 and 10017 examples of gradient 1 round to
    9984 and 10048 in bfloat16, 64 apart for ``C = 1``, and noise below the spacing is
    rounded away, so the noise calibrated to ``C`` would not hide one example. (In float32
    the spacing reaches ``C`` only at ``|S| = 2²⁴ C``, far below ``σC`` for real batches:
    the floating-point caveat of docs/privacy.md.)

    Raises:
      TypeError: naming the leaf, its dtype and what to do.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
            raise TypeError(
                f"`{name}` leaf {jax.tree_util.keystr(path) or '(root)'} has dtype {dtype}: a "
                "DP step's clipped sum is computed and noised in the parameters' dtype, and its "
                "rounding "
                f"(spacing |S|·{float(jnp.finfo(dtype).eps):g}) exceeds the clip norm once "
                f"|S| > {1 / float(jnp.finfo(dtype).eps):g}·C, so the noise would not hide one "
                f"example; expected float32 or float64 `{name}` (cast them for DP training, "
                f"e.g. jax.tree.map(lambda p: p.astype(jnp.float32), {name}))"
            )


class ClippedSum:
    """The clipped-sum part of a DP step: ``f(params, batch, mask, *args) -> (S, b, bad)``.

    .. math::

        S = \\sum_i m_i \\, \\mathrm{clip}_C(g_i) \\quad (\\text{over the examples kept by
        the non-finite policy}), \\qquad \\Delta_2 = C

    where ``b`` is the number of examples kept and ``bad`` the number dropped for a non-finite
    loss or gradient (:func:`jaxgrad.fast.clipped_grad`'s ``"drop"`` policy: an empty sum is 0;
    non-finite parameters give NaN). Adding or removing one example moves ``S`` by at most
    :attr:`sensitivity` in L2 norm: what a privatizer calibrates its noise to.

    Per-group (per-layer) clipping: ``l2_clip`` a pytree prefix of the params with clip norms
    ``C_g`` (:func:`jaxgrad.fast.clipped_grad`): each group of an example's gradient is
    clipped to its own ``C_g``, so the example's whole clipped gradient has norm at most
    ``Δ₂ = √(Σ_g C_g²)``. Units: ``units=`` (one id per row) clips each unit's *summed*
    gradient once (:func:`jaxgrad.fast.clipped_grad`'s ``units=``): adding or removing one
    unit moves ``S`` by at most ``Δ₂``; ``b`` and ``bad`` then count rows.

    Attributes:
      sensitivity: the L2 sensitivity ``Δ₂`` of the sum: ``C``, or ``√(Σ_g C_g²)``.
    """

    def __init__(self, loss_fn, *, l2_clip, method="auto", chunk_size=None):
        l2_clip = fast_api.check_l2_clip(l2_clip)
        self.sensitivity = fast_api.clip_sensitivity(l2_clip)
        self._parts = fast_api.clipped_parts(
            loss_fn,
            l2_clip=l2_clip,
            reduction="sum",
            nonfinite="drop",
            method=method,
            chunk_size=chunk_size,
        )

    def __call__(self, params, batch, mask, *args, units=None):
        check_sum_precision(params)
        parts = self._parts(params, batch, mask, *args, units=units)
        return parts.total, parts.num_kept, jnp.sum(parts.dropped, dtype=jnp.int32)


def noise_stddev(
    noise_multiplier: float, sensitivity: float, *, names=("noise_multiplier", "l2_clip")
) -> float:
    """``σΔ``: the standard deviation of the noise on a sum of L2 sensitivity ``Δ``.

    Where a private step forms its noise's scale from the user's ``σ`` and clip norm; both
    already checked finite, their product may still overflow float64, and then
    :func:`add_noise` would refuse a ``stddev`` the user never passed.

    Args:
      noise_multiplier: ``σ ≥ 0``, checked.
      sensitivity: ``Δ > 0``, checked (:func:`jaxgrad.fast.clip_sensitivity`).
      names: the user's names of the two, for the error.

    Raises:
      ValueError: ``σΔ`` overflows float64, naming both arguments.

    Example::

      >>> from jaxgrad.privacy.noisy import noise_stddev
      >>> noise_stddev(2.0, 0.5)
      1.0
    """
    stddev = noise_multiplier * sensitivity
    if not math.isfinite(stddev):
        sigma, delta = names
        raise ValueError(
            f"`{sigma}` × `{delta}` (the noise's standard deviation σΔ on the clipped sum) "
            f"must be a finite number; got σ={noise_multiplier:g} (from `{sigma}`) and "
            f"Δ={sensitivity:g} (from `{delta}`), whose product overflows float64; expected "
            f"σΔ below {sys.float_info.max:g}"
        )
    return stddev


def add_noise(total: PyTree, key, *, stddev) -> PyTree:
    """``total + N(0, stddev² I)``: one independent normal per coordinate, all from one ``key``.

    The normals are :func:`jaxgrad.privacy.gaussian.normal` ``(key, (N,), dtype)`` (``N`` the
    number of coordinates, ``dtype`` the widest float dtype of the leaves, at least float32)
    cut into the leaves in order: leaf ``ℓ`` takes counters ``o_ℓ .. o_ℓ + n_ℓ − 1``. Their
    tails are not cut: ``|z|`` reaches 9.155 (``jax.random.normal``'s float32 values stop
    at 5.42), and the residual ``δ`` to add is ``(1 + e^ε) T d 2⁻⁶⁴`` for ``T`` steps on ``d``
    coordinates (:mod:`jaxgrad.privacy.gaussian`). With a Threefry key (JAX's default) each
    leaf's share is computed where it is added (:func:`jaxgrad.privacy.gaussian.normal_at`:
    fused with the addition, no ``N``-vector written); any other key draws the vector.

    Args:
      total: a pytree of float arrays (the clipped sum).
      key: the PRNG key; used once, for this whole tree.
      stddev: the noise's standard deviation ``σC ≥ 0`` (a number, or a traced scalar).

    Raises:
      TypeError: a leaf that is not a real floating-point array, or one narrower than
        float32 (:func:`check_sum_precision`: the noise would be rounded away); ``key`` not
        one PRNG key.
      ValueError: ``stddev`` negative, not finite, or past the sum dtype's range.

    Warns:
      SeededKeyWarning: a concrete ``key`` of ``jax.random.key(seed)``'s form
      (:func:`jaxgrad.keys.check_private_key`).

    Returns:
      A pytree like ``total``.
    """
    key = keys.check_private_key(key)
    stddev = reduce.check_if_known(reduce.check_nonnegative_float, stddev, name="stddev")
    leaves, treedef = jax.tree_util.tree_flatten(total)
    for x in leaves:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(
                "`total` leaves must be real floating-point arrays (the noise would be rounded "
                f"or cast away); got dtype {jnp.result_type(x)}"
            )
    check_sum_precision(total, name="total")  # bfloat16 / float16 would round the noise away
    if not leaves or (isinstance(stddev, float) and stddev == 0):
        return total  # σ = 0: nothing to draw
    dtype = jnp.result_type(jnp.float32, *leaves)
    largest = float(jnp.finfo(dtype).max)
    if isinstance(stddev, float) and stddev > largest:  # σ z would be ±inf in `dtype`
        raise ValueError(
            f"`stddev` (σΔ: noise_multiplier × the clip norm, for dp_grad, sampled_dp_grad and "
            f"the privatizers) must be at most {dtype.name}'s largest number {largest:g}, the "
            f"sum's dtype; got {stddev:g}: every noise coordinate would be ±inf. Expected a "
            "smaller `noise_multiplier` or clip norm, or float64 parameters"
        )
    sizes = [x.size for x in leaves]
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    if threefry.is_threefry(key):
        draw = lambda x, start: gaussian.normal_at(key, start, x.shape, dtype)
    else:
        flat = gaussian.normal(key, (sum(sizes),), dtype)
        draw = lambda x, start: flat[start : start + x.size].reshape(x.shape)
    noisy = [
        x + (stddev * draw(x, start)).astype(x.dtype)
        for x, start in zip(leaves, offsets, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def noised_average(total: PyTree, key, *, stddev, expected_batch_size) -> PyTree:
    """``(total + N(0, stddev² I)) / expected_batch_size``: a step's one draw, one division.

    .. math::

        \\tilde g = \\frac{1}{B_e} \\big( S + \\mathcal N(0, \\text{stddev}^2 I) \\big)

    The last stage of every DP-SGD gradient here (:func:`dp_grad`, :func:`sampled_dp_grad`,
    the sharded training step), for a clipped sum ``S`` computed another way (e.g. summed
    over several devices or physical batches): :func:`add_noise`, then the division by the
    public ``B_e = qN`` — never by the realised count, which is private.

    Args:
      total: the clipped sum ``S``, a pytree of float arrays.
      key: the PRNG key of the noise (:func:`add_noise`).
      stddev: ``σC ≥ 0``.
      expected_batch_size: ``B_e = qN > 0`` (a number, or a traced scalar).

    Returns:
      A pytree like ``total``.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy import noised_average
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> noised_average(jnp.array([2.0, 4.0]), entropy_key(), stddev=0.0,
      ...                expected_batch_size=4).tolist()
      [0.5, 1.0]
    """
    expected_batch_size = reduce.check_if_known(
        reduce.check_positive_float, expected_batch_size, name="expected_batch_size"
    )
    return averaged(add_noise(total, key, stddev=stddev), expected_batch_size)


def averaged(total: PyTree, expected_batch_size) -> PyTree:
    """``total / B_e``, leaf by leaf in the leaf's dtype.

    Raises:
      ValueError: a known ``B_e`` below the smallest normal number of a leaf's dtype (its
        reciprocal overflows that dtype: every coordinate would come out ±inf or NaN).
    """

    def divide(t):
        tiny = float(jnp.finfo(t.dtype).tiny)
        if not isinstance(expected_batch_size, jax.core.Tracer) and expected_batch_size < tiny:
            raise ValueError(
                f"`expected_batch_size` must be at least {tiny:g}, the smallest normal "
                f"{jnp.dtype(t.dtype).name} (the gradients' dtype), or the average overflows "
                f"it; got {expected_batch_size!r}"
            )
        return t / jnp.asarray(expected_batch_size, t.dtype)

    return jax.tree_util.tree_map(divide, total)


class PrivatizerState(NamedTuple):
    """The state of :func:`gaussian_privatizer`: its key and the number of sums it noised."""

    key: jax.Array
    count: jax.Array


def gaussian_privatizer(
    *, noise_multiplier: float, l2_sensitivity: float, expected_batch_size: float, key
):
    """An optax transformation that turns a clipped *sum* into a private average gradient.

    .. math::

        u_t = \\frac{1}{B_e} \\big( S_t + \\mathcal N(0, \\sigma^2 \\Delta_2^2 I) \\big),
        \\qquad \\text{noise key } = \\mathrm{split}(\\mathrm{fold\\_in}(K, t))[1]

    It receives the clipped *sum* ``S_t`` (e.g. :func:`jaxgrad.clipped_grad` with
    ``reduction="sum"``), adds noise calibrated to the sum's sensitivity ``Δ₂`` (the clip
    norm) once, and divides by the public ``B_e = qN`` — so noise on the mean (``B_e`` times
    too little) cannot be written with it. Chain it before any optimizer; the key lives in
    its state, so an optimizer state holding it is secret (checkpoints included). Step ``t``'s
    noise key is :func:`jaxgrad.keys.dp_keys`'s, the same as :func:`jaxgrad.train.fit`'s.

    Args:
      noise_multiplier: ``σ ≥ 0``.
      l2_sensitivity: ``Δ₂ > 0``, the sensitivity of the sum (the clip norm ``C``).
      expected_batch_size: ``B_e = qN > 0``.
      key: the PRNG key of the noise.

    Returns:
      An ``optax.GradientTransformation``.

    Example::

      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> from jaxgrad.privacy import gaussian_privatizer
      >>> tx = optax.chain(gaussian_privatizer(noise_multiplier=0.0, l2_sensitivity=1.0,
      ...                                      expected_batch_size=4, key=entropy_key()),
      ...                  optax.sgd(1.0))
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([2.0, 4.0]), state)  # a clipped sum
      >>> updates.tolist()
      [-0.5, -1.0]
    """
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    delta2 = reduce.check_positive_float(l2_sensitivity, name="l2_sensitivity")
    b_e = reduce.check_positive_float(expected_batch_size, name="expected_batch_size")
    stddev = noise_stddev(sigma, delta2, names=("noise_multiplier", "l2_sensitivity"))
    key = keys.check_private_key(key)  # held in the state: concrete, inspected now

    def init_fn(params):
        del params
        return PrivatizerState(key, jnp.zeros((), jnp.int32))

    def update_fn(sums, state, params=None):
        del params
        _, noise_key = keys.dp_keys(state.key, state.count)
        noisy = noised_average(sums, noise_key, stddev=stddev, expected_batch_size=b_e)
        return noisy, PrivatizerState(state.key, state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


class BandMFState(NamedTuple):
    """The state of :func:`bandmf_privatizer`: its key, the number of sums it noised, and
    the last ``b − 1`` noise vectors (secret: with them the last steps' sums are exposed)."""

    key: jax.Array
    count: jax.Array
    history: PyTree


def bandmf_privatizer(
    *, coefs, noise_multiplier: float, l2_sensitivity: float, expected_batch_size: float, key
):
    """:func:`gaussian_privatizer` with banded matrix-factorisation (BandMF) noise.

    .. math::

        u_t = \\frac{1}{B_e} \\big( S_t + w_t \\big), \\qquad
        w_t = \\frac{1}{c_0} \\Big( z_t - \\sum_{j=1}^{b-1} c_j w_{t-j} \\Big), \\qquad
        z_t \\sim \\mathcal N(0, \\sigma^2 \\Delta_2^2 I)

    so the noise across steps is ``C⁻¹ z`` for the banded Toeplitz strategy ``C`` of
    ``coefs`` (:mod:`jaxgrad.privacy.bandmf`): ``Cov = σ²Δ₂² C⁻¹C⁻ᵀ``. ``z_t`` is exactly the
    noise :func:`gaussian_privatizer` would add at step ``t`` (same key schedule,
    :func:`jaxgrad.keys.dp_keys`), so with ``coefs=[1.]`` the two give the same bits. Its
    state carries the key and the last ``b − 1`` noise vectors: an optimizer state holding
    it is secret (checkpoints included). Its guarantee needs each example to take part at
    most once in any ``b`` consecutive steps (:class:`jaxgrad.privacy.sources.CyclicPoisson`,
    accounted by :func:`jaxgrad.privacy.bandmf.dp_event`).

    Args:
      coefs: the strategy ``c`` (``b`` numbers, ``c_0 > 0``, ``‖c‖ = 1``;
        :func:`jaxgrad.privacy.bandmf.sqrt_coefs` or ``optimized_coefs``).
      noise_multiplier: ``σ ≥ 0``.
      l2_sensitivity: ``Δ₂ > 0``, the sensitivity of one sum (the clip norm ``C``).
      expected_batch_size: ``B_e > 0``, the public divisor.
      key: the PRNG key of the noise.

    Returns:
      An ``optax.GradientTransformation``.

    Example::

      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> from jaxgrad.privacy import bandmf_privatizer
      >>> tx = bandmf_privatizer(coefs=[0.6, 0.8], noise_multiplier=0.0, l2_sensitivity=1.0,
      ...                        expected_batch_size=2, key=entropy_key())
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([2.0, 4.0]), state)  # a clipped sum
      >>> updates.tolist(), state.history.shape  # the last b - 1 = 1 noise vectors
      ([1.0, 2.0], (1, 2))
    """
    from jaxgrad.privacy import bandmf

    c = bandmf.check_coefs(coefs)
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    delta2 = reduce.check_positive_float(l2_sensitivity, name="l2_sensitivity")
    b_e = reduce.check_positive_float(expected_batch_size, name="expected_batch_size")
    stddev = noise_stddev(sigma, delta2, names=("noise_multiplier", "l2_sensitivity"))
    key = keys.check_private_key(key)  # held in the state: concrete, inspected now

    def init_fn(params):
        return BandMFState(key, jnp.zeros((), jnp.int32), bandmf.init_history(params, c.size))

    def update_fn(sums, state, params=None):
        del params
        _, noise_key = keys.dp_keys(state.key, state.count)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, sums)
        z = add_noise(zeros, noise_key, stddev=stddev)  # add_noise's very normals
        w, history = bandmf.correlated_noise(z, state.history, c)
        noisy = averaged(jax.tree_util.tree_map(jnp.add, sums, w), b_e)
        return noisy, BandMFState(state.key, state.count + 1, history)

    return optax.GradientTransformation(init_fn, update_fn)


def _finish(nonfinite, return_info, name):
    """The host side of ``f``: ``nonfinite="raise"``'s error, then the info stripped."""
    return_info = reduce.check_flag(return_info, name="return_info")

    def finish(grads, info):
        if nonfinite == "raise":
            fast_api.raise_nonfinite(info.num_nonfinite, name=name, private=True)
        return (grads, info) if return_info else grads

    return finish


def poison_nonfinite(grads, bad, *, nonfinite):
    """With ``nonfinite="raise"``, ``grads`` made NaN when the step met ``bad > 0`` non-finite
    examples (what a caller's own ``jax.jit`` sees, where nothing can be raised)."""
    if nonfinite != "raise":
        return grads
    return jax.tree_util.tree_map(lambda g: jnp.where(bad > 0, jnp.nan, g), grads)


def _privatize(total, count, bad, noise_key, *, nonfinite, stddev, expected_batch_size):
    """The step's last part: noise once on the sum, one division by ``B_e``, then the
    non-finite policy (:func:`poison_nonfinite`)."""
    grads = noised_average(total, noise_key, stddev=stddev, expected_batch_size=expected_batch_size)
    return poison_nonfinite(grads, bad, nonfinite=nonfinite)


def dp_grad(
    loss_fn,
    *,
    l2_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    nonfinite: str = "drop",
    return_info: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
):
    """The DP-SGD gradient of one Poisson-sampled batch: clip, sum, add noise once, divide.

    .. math::

        \\tilde g = \\frac{1}{B_e} \\Big( \\sum_i m_i \\, g_i \\min(1, C / \\lVert g_i \\rVert)
            + \\mathcal N(0, \\sigma^2 C^2 I) \\Big)

    with ``B_e = qN`` the *expected* batch size (public), not the realised ``Σ m_i``. ``batch``
    and ``mask`` must come from Poisson sampling (:func:`poisson_sample`) for the accounting of
    :func:`jaxgrad.privacy.epsilon` to hold; a draw larger than the physical batch must be
    accumulated, not cut: use :func:`sampled_dp_grad`, which does both. ``g_i`` is the
    gradient of example ``i``'s loss *sum* (for a token loss the unit of privacy is the
    sequence). The composition of :class:`ClippedSum` and :func:`noised_average`.

    Per-layer clipping: ``l2_clip`` may be a pytree prefix of the params (``{"layer1": 1.0,
    "layer2": 0.5}``); each group of each example's gradient is clipped to its own ``C_g``
    and the noise std on the sum is ``σ √(Σ_g C_g²)``, the sum's sensitivity
    (:class:`ClippedSum`).

    Units (user-level DP): ``f(..., units=ids)`` with one integer id per row (in ``[0, B)``;
    rows with equal ids form a unit) clips each unit's *summed* gradient ``Σ_{i∈u} g_i`` once
    and the noise is calibrated to one unit: the privacy unit is then the unit, so the batch
    must hold whole units drawn by Poisson sampling over units (rate ``q``, ``B_e = qU`` for
    ``U`` units), and the accounting counts units. Not with a pytree ``l2_clip``.
    :func:`jaxgrad.train.fit` (``units=``) does the grouping and the sampling.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``; a loss with a
        ``validate`` method (:func:`jaxgrad.losses.supervised`) has the batch checked first.
      l2_clip: the clipping norm ``C > 0``, or a pytree prefix of the params of per-group
        clip norms ``C_g > 0``.
      noise_multiplier: ``σ ≥ 0``; the noise std on the sum is ``σC``.
      expected_batch_size: ``B_e = qN > 0``, the divisor.
      nonfinite: ``"drop"`` (default: leave out examples with a non-finite loss or gradient
        and count them; the sum of none is 0) or ``"raise"`` (``FloatingPointError`` when
        ``f`` is called eagerly; under the caller's ``jax.jit`` the result is NaN). Either
        way, non-finite parameters give a NaN gradient, never noise alone.
      return_info: if True, ``f`` returns ``(grads, DPInfo)``.
      method: ``"auto"`` (fast clipped sum) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.

    Returns:
      ``f(params, batch, mask, key, *args, units=None) -> grads`` (or ``(grads, info)``);
      ``mask=None`` means all rows are real, ``key`` seeds the noise, and extra arguments are
      passed to every call ``loss_fn(params, example, *args)``, as for
      :func:`jaxgrad.batch_grad`.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy import dp_grad
      >>> loss = lambda w, ex: jnp.dot(ex, w)  # gradient of example i is x_i
      >>> f = dp_grad(loss, l2_clip=1.0, noise_multiplier=0.0, expected_batch_size=4)
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> g = f(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 0.5]]), None, entropy_key())
      >>> [round(float(v), 6) for v in g]  # ([0.6, 0.8] + [0, 0.5]) / 4
      [0.15, 0.325]
    """
    clipped = ClippedSum(loss_fn, l2_clip=l2_clip, method=method, chunk_size=chunk_size)
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    b_e = reduce.check_positive_float(expected_batch_size, name="expected_batch_size")
    nonfinite = check_nonfinite(nonfinite)
    stddev = noise_stddev(sigma, clipped.sensitivity)

    @jax.jit
    @sharding.auto_axes
    @_loops.canonical_convolutions
    def core(params, batch, mask, key, args, units):
        total, count, bad = clipped(params, batch, mask, *args, units=units)
        grads = _privatize(
            total, count, bad, key, nonfinite=nonfinite, stddev=stddev, expected_batch_size=b_e
        )
        return grads, DPInfo(count, bad, jnp.int32(1))

    finish = _finish(nonfinite, return_info, "dp_grad")

    def f(params, batch, mask, key, *args, units=None):
        check_loss_args(loss_fn, args, name="dp_grad", call="f(params, batch, mask, key, *args)")
        size = reduce.batch_size(batch)
        mask = reduce.check_mask(mask, size)
        if units is not None:
            units = fast_api.check_units(units, size)
        validate_concrete(getattr(loss_fn, "validate", None), batch, mask)
        return finish(*core(params, batch, mask, keys.check_private_key(key), args, units))

    f.__name__ = f.__qualname__ = "dp_grad"
    f.__doc__ = dp_grad.__doc__
    return f


def sampled_clipped_sum(clipped, *, physical_batch_size, sampling_rate=None, source=None):
    """``f(params, data, sample_key, *args, step=None) -> (S, b, bad, ⌈b/P⌉)``: one draw of a
    batch source over ``data``, run in physical batches of ``P`` rows and their clipped sums
    added (``step``: the training step, for a source whose draw depends on it,
    :class:`jaxgrad.privacy.sources.CyclicPoisson`).

    The batch source (``source``, :mod:`jaxgrad.privacy.sources`; or Poisson sampling at
    ``sampling_rate``) and the clipped sum of a DP step, composed: a ``lax.while_loop`` over
    the ``⌈b / P⌉`` physical batches (fixed shapes, no recompilation, no drawn example
    dropped however large the draw); the first runs outside the loop. With several sizes
    ``P_1 < ... < P_K`` (:func:`jaxgrad.privacy.physical_batch_sizes`) ``P = P_K``, and the
    first batch is the smallest ``P_j ≥ min(b, P_K)`` rows of the draw (a ``lax.switch``
    over ``K`` compiled clipped sums: less padding, the same sum).
    """
    sizes = sampling.check_physical_sizes(physical_batch_size)
    if (source is None) == (sampling_rate is None):
        raise ValueError("give exactly one of `sampling_rate` (Poisson) and `source`")
    from jaxgrad.privacy import sources

    if source is None:
        source = sources.Poisson(sampling_rate=sampling_rate)
    source = sources.check_source(source)

    def f(params, data, sample_key, *args, step=None):
        n = reduce.batch_size(data, name="data")
        sizes_n = sampling.cap_sizes(sizes, n)  # P > N: the same sum, N rows
        p = sizes_n[-1]
        sample = source.sample(
            sample_key, num_examples=n, physical_batch_size=p, **sources.step_kwargs(source, step)
        )
        steps = sampling.num_physical_batches(sample.count, p)

        def batch(k, size):  # batch k of `size` rows (k = 0 only for a size below P)
            idx, mask = sampling.physical_batch(sample, k, physical_batch_size=size)
            return clipped(params, jax.tree_util.tree_map(lambda a: a[idx], data), mask, *args)

        first = None
        if len(sizes_n) > 1:  # the smallest size holding the first min(b, P) rows
            which = jnp.searchsorted(jnp.asarray(sizes_n), jnp.minimum(sample.count, p))
            branches = [lambda s=s: batch(jnp.int32(0), s) for s in sizes_n]
            first = lambda: jax.lax.switch(which, branches)
        # The first physical batch runs outside the loop (jaxgrad._loops.peeled_sum: XLA:CPU
        # compiles a loop body several times slower); it holds the whole draw on almost every
        # step (see default_physical_batch_size). A draw of 0 examples runs it fully masked.
        total, count, bad = _loops.peeled_sum(lambda k: batch(k, p), steps, first=first)
        return total, count, bad, steps

    return f


def sampled_dp_grad(
    loss_fn,
    *,
    l2_clip: float,
    noise_multiplier: float,
    sampling_rate: float | None = None,
    physical_batch_size: int,
    source=None,
    nonfinite: str = "drop",
    return_info: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
):
    """One whole DP-SGD step's gradient: Poisson-sample the data set, clip, sum, noise once.

    Draws a Poisson sample of ``data`` with rate ``q`` (:func:`poisson_sample`), runs it in
    ``⌈b / P⌉`` physical batches of size ``P`` (a ``lax.while_loop``: fixed shapes, no
    recompilation, no example dropped however large the draw), adds their clipped sums,
    then adds ``N(0, σ²C² I)`` once and divides once by ``qN``:

    .. math::

        \\tilde g = \\frac{1}{qN} \\Big( \\sum_{k=1}^{\\lceil b/P \\rceil} \\sum_{i \\in k}
            \\mathrm{clip}_C(g_i) + \\mathcal N(0, \\sigma^2 C^2 I) \\Big)

    The composition of the Poisson batch source (:func:`sampled_clipped_sum`), the clipped sum
    (:class:`ClippedSum`) and the noise (:func:`noised_average`); ``key`` is split into the
    draw's key and the noise's (:func:`jaxgrad.keys.dp_keys` of a step). The whole data set
    must fit on the device (it is gathered from, row by row).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``; a loss with a
        ``validate`` method has the whole data set checked first.
      l2_clip: the clipping norm ``C > 0``, or a pytree prefix of the params of per-group
        clip norms ``C_g > 0`` (noise std ``σ √(Σ_g C_g²)``, see :func:`dp_grad`).
      noise_multiplier: ``σ ≥ 0``.
      sampling_rate: ``q`` in (0, 1]; the expected batch size is ``qN``.
      physical_batch_size: ``P``, examples per physical batch (memory bound, not privacy);
        or strictly increasing sizes ``(P_1, ..., P_K)``
        (:func:`jaxgrad.privacy.physical_batch_sizes`): the first batch is the smallest
        ``P_j`` holding the draw (a ``lax.switch``; draws past ``P_K`` go on in batches of
        ``P_K``), cutting the padding to ~``4σ / K`` rows for ``K`` compilations of the
        clipped sum. A size above the data set's ``N`` runs ``N`` rows (the same sum). The
        rows run, and so the step's time, follow the private count ``b`` (one size: whether
        ``b > P``; ``K`` sizes: which of ``K`` bins): nothing released depends on them, and
        timing is outside the threat model (docs/privacy.md, "What the physical batches
        reveal").
      source: instead of ``sampling_rate``, a batch source of
        :mod:`jaxgrad.privacy.sources` (truncated Poisson, sampling without replacement):
        its draw, divided by its ``expected_batch_size``; account the steps with its
        ``dp_event`` (:class:`jaxgrad.privacy.Accountant`).
      nonfinite: ``"drop"`` (default) or ``"raise"``, as for :func:`dp_grad`.
      return_info: if True, ``f`` returns ``(grads, DPInfo)``.
      method: ``"auto"`` (fast clipped sum) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.

    Returns:
      ``f(params, data, key, *args) -> grads`` (or ``(grads, info)``); the sample and the
      noise are pure functions of ``key``; extra arguments reach every call
      ``loss_fn(params, example, *args)``, as for :func:`jaxgrad.batch_grad`.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy import sampled_dp_grad
      >>> loss = lambda w, ex: jnp.dot(ex, w)
      >>> f = sampled_dp_grad(loss, l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.1,
      ...                     physical_batch_size=8, return_info=True)
      >>> from jaxgrad.keys import entropy_key  # secret: key(0) would warn
      >>> g, info = f(jnp.ones(3), jnp.ones((100, 3)), entropy_key())
      >>> g.shape, int(info.num_physical_batches) == -(-int(info.num_examples) // 8)
      ((3,), True)
    """
    clipped = ClippedSum(loss_fn, l2_clip=l2_clip, method=method, chunk_size=chunk_size)
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    if (source is None) == (sampling_rate is None):
        raise ValueError(
            "give exactly one of `sampling_rate` (Poisson sampling) and `source`; got "
            f"sampling_rate={sampling_rate!r}, source={source!r}"
        )
    from jaxgrad.privacy import sources

    if source is None:
        source = sources.Poisson(sampling_rate=sampling.check_sampling_rate(sampling_rate))
    source = sources.check_source(source, stepped=False)  # (f takes no step)
    p = sampling.check_physical_sizes(physical_batch_size)
    nonfinite = check_nonfinite(nonfinite)
    stddev = noise_stddev(sigma, clipped.sensitivity)
    draw_and_clip = sampled_clipped_sum(clipped, source=source, physical_batch_size=p)

    @jax.jit
    @sharding.auto_axes
    @_loops.canonical_convolutions
    def core(params, data, key, args):
        sample_key, noise_key = keys.split_step_key(key)
        total, count, bad, steps = draw_and_clip(params, data, sample_key, *args)
        b_e = source.expected_batch_size(reduce.batch_size(data, name="data"))
        grads = _privatize(
            total,
            count,
            bad,
            noise_key,
            nonfinite=nonfinite,
            stddev=stddev,
            expected_batch_size=b_e,
        )
        return grads, DPInfo(count, bad, steps)

    finish = _finish(nonfinite, return_info, "sampled_dp_grad")

    def f(params, data, key, *args):
        check_loss_args(loss_fn, args, name="sampled_dp_grad", call="f(params, data, key, *args)")
        validate_concrete(getattr(loss_fn, "validate", None), data)
        return finish(*core(params, data, keys.check_private_key(key), args))

    f.__name__ = f.__qualname__ = "sampled_dp_grad"
    f.__doc__ = sampled_dp_grad.__doc__
    return f
