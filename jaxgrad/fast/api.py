"""Per-example norms, clipped gradients and gradient statistics without the ``B × P`` array.

Example ``i``'s gradient is ``g_i = ∇S_i``, the gradient of its loss *sum* (for a scalar loss,
of the loss itself); ``n_i`` is its item count and ``m_i`` the padding mask. Every function
takes ``method=``:

* ``"auto"`` (default) — the fast path: one forward and one backward pass of the batched loss,
  with the per-example quantities read off the traced computation (see
  :mod:`jaxgrad.fast.trace`); exact, at about the cost of one ordinary gradient;
* ``"vmap"`` — the reference: materialise every ``g_i`` with ``vmap(grad)``.

``chunk_size`` processes that many examples at a time under ``lax.scan`` (the batch need not
divide evenly), bounding peak memory on either path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.fast import passes
from jaxgrad.grads import _per_example, _strategy, _validator, check_loss_fn

PyTree = Any


def _wrap(core, loss_fn, *, name: str, doc: str | None):
    """The strategies' own wrapper: input checks, padding filled, ``jax.jit``."""
    check_loss_fn(loss_fn)
    return _strategy(
        core,
        validate=_validator(loss_fn),
        return_loss=None,
        name=name,
        doc=doc,
        loss_fn=loss_fn,
        real_params=True,  # the norms here are of real gradients (x², not |x|²)
    )


def _check_chunk(chunk_size):
    if chunk_size is not None:
        chunk_size = reduce.check_positive_int(chunk_size, name="chunk_size")
    return chunk_size


def per_example_norms(
    loss_fn, *, method: str = "auto", chunk_size: int | None = None, strict: bool = False
):
    """The L2 norm of every example's gradient over all parameters, ``‖∇S_i‖``.

    On the fast path a dense use ``s = a W`` contributes ``‖a_i‖² ‖g_i‖²`` (``g_i`` the
    cotangent of ``s``), or ``⟨A_i A_iᵀ, G_i G_iᵀ⟩`` with a sequence axis; an embedding lookup
    ``Σ_{t,s} [r_t = r_s] ⟨g_t, g_s⟩``; other parameters (biases, norm scales) their exact
    per-example gradients. No ``B × P`` array is built.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      method: ``"auto"`` (fast, exact) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.
      strict: if True, raise when a parameter leaf that is neither a vector nor small takes
        the exact fallback (a per-example copy); :func:`jaxgrad.fast.plan` shows the routes.

    Returns:
      ``f(params, batch, mask=None) -> norms`` of shape ``(B,)``; padded rows are 0.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import per_example_norms
      >>> loss = lambda w, ex: jnp.dot(ex, w)  # gradient of example i is x_i
      >>> per_example_norms(loss)(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 1.0]])).tolist()
      [5.0, 1.0]
    """
    get = passes.get_pass(method, strict)
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn):
        def body(b, m):
            parts = get(loss_fn, params, b, m)
            return jnp.sqrt(jnp.maximum(parts.norm_sq, 0)), ()

        return passes.run_chunked(body, batch, mask, chunk_size)[0]

    return _wrap(core, loss_fn, name="per_example_norms", doc=per_example_norms.__doc__)


def clip_factors(norms, l2_clip):
    """``min(1, C / ‖g_i‖)``, and 1 for a zero gradient."""
    big = norms > l2_clip
    return jnp.where(big, l2_clip / jnp.where(big, norms, 1), 1).astype(norms.dtype)


NONFINITE = ("raise", "drop", "propagate")


def check_nonfinite(nonfinite):
    """The non-finite policy, checked: ``"raise"``, ``"drop"`` or ``"propagate"``."""
    if nonfinite not in NONFINITE:
        raise ValueError(f"`nonfinite` must be one of {list(NONFINITE)}; got {nonfinite!r}")
    return nonfinite


def raise_nonfinite(bad, *, name: str, private: bool = False) -> None:
    """``nonfinite="raise"``'s host side: a ``FloatingPointError`` if any example was bad.

    ``bad`` is the per-example bool mask (rows are named) or, for a private step, a count (the
    rows of a private batch are never named). Under the caller's ``jax.jit`` ``bad`` is traced:
    nothing can be raised there, and the policy's result is NaN (see :func:`clipped_grad`).
    """
    if isinstance(bad, jax.core.Tracer):
        return
    if private:
        count = int(bad)
        if count:
            raise FloatingPointError(
                f"{name}: {count} example(s) of this batch have a non-finite (NaN or inf) loss "
                "or gradient, which no clipping can bound; check the data and the parameters, "
                "or pass nonfinite='drop' to leave such examples out"
            )
        return
    rows = np.flatnonzero(np.asarray(bad))
    if rows.size:
        raise FloatingPointError(
            f"{name}: {rows.size} of {bad.shape[0]} examples have a non-finite "
            f"loss or gradient norm (rows {rows[:5].tolist()}"
            f"{', ...' if rows.size > 5 else ''}), which no clipping can bound; check "
            "the inputs and parameters, or pass nonfinite='drop' to leave such examples "
            "out (or 'propagate' for a NaN result)"
        )


class ClippedParts(NamedTuple):
    """Everything one clipped reduction computes (see :func:`clipped_parts`).

    Attributes:
      loss: the unclipped loss, reduced as the gradient is.
      total: the clipped sum (``"sum"``) or mean (``"mean"``) of the kept examples.
      norms: ``(B,)`` unclipped per-example gradient norms (non-finite ones stay so).
      dropped: ``(B,)`` bool, real examples whose loss or gradient norm is not finite.
      num_kept: the number of real examples in ``total``.
    """

    loss: jax.Array
    total: PyTree
    norms: jax.Array
    dropped: jax.Array
    num_kept: jax.Array


def clipped_parts(
    loss_fn,
    *,
    l2_clip: float,
    reduction: str = "mean",
    nonfinite: str = "raise",
    method: str = "auto",
    chunk_size: int | None = None,
    strict: bool = False,
):
    """``f(params, batch, mask=None, *args) -> ClippedParts``: the one clipped reduction.

    What :func:`clipped_grad` and the DP-SGD step (:mod:`jaxgrad.privacy`) both run; the
    non-finite policy and its rules are :func:`clipped_grad`'s. Nothing is raised here
    (``"raise"`` gives the result of ``"propagate"``; the caller raises on ``dropped``).
    """
    l2_clip = reduce.check_positive_float(l2_clip, name="l2_clip")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"`reduction` must be one of ['mean', 'sum']; got {reduction!r}")
    nonfinite = check_nonfinite(nonfinite)
    get = passes.get_pass(method, strict)
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn):
        def one(b, m):
            parts = get(loss_fn, params, b, m)
            norms = jnp.sqrt(parts.norm_sq)
            ok = m & jnp.isfinite(norms) & jnp.isfinite(parts.sums)
            # A real example whose gradient cannot be clipped (non-finite norm) weighs NaN, so
            # every leaf of the sum is NaN: a NaN norm would otherwise read as "not above the
            # clip" (factor 1) and add the finite leaves of that gradient unclipped, and an inf
            # one would weigh 0. (A finite gradient of a non-finite loss clips as usual.)
            finite = jnp.isfinite(norms)
            c = jnp.where(m, jnp.where(finite, clip_factors(norms, l2_clip), jnp.nan), 0)
            totals = (parts.weighted(c), jnp.sum(parts.counts), jnp.sum(parts.sums))
            return (norms, m & ~ok), totals

        def body(b, m):
            rows, totals = one(b, m)
            if nonfinite != "drop":
                return rows, (*totals, jnp.sum(m))
            ok = m & ~rows[1]

            def again():  # the kept rows only; dropped ones become copies of a kept row
                _, kept = one(reduce.fill_padding(b, ok), ok)
                return jax.tree_util.tree_map(lambda t: jnp.where(jnp.any(ok), t, 0), kept)

            totals = jax.lax.cond(jnp.any(rows[1]), again, lambda: totals)
            return rows, (*totals, jnp.sum(ok))

        (norms, bad), (total, count, loss, kept) = passes.run_chunked(body, batch, mask, chunk_size)
        if reduction == "mean":
            total, loss = reduce.safe_divide((total, loss), count)
        # The all-dropped rule: the kept examples are reduced as any examples are, so an empty
        # sum is 0 and an empty mean is NaN (a mean of nothing), never a silent 0. Parameters
        # that are not finite make every example bad: the result is NaN whatever the policy
        # (they are public, so saying so reveals nothing about the examples).
        # (With no row kept at all the result is set, not computed: a filler row copied into
        # an all-padding batch may be NaN, and 0 × NaN would leak it.)
        none = kept == 0
        nan = (none & jnp.any(mask) & (reduction == "mean")) | ~reduce.all_finite(params)
        total, loss = jax.tree_util.tree_map(
            lambda t: jnp.where(nan, jnp.nan, jnp.where(none, 0, t)).astype(t.dtype), (total, loss)
        )
        return ClippedParts(loss, total, norms, bad, kept.astype(jnp.int32))

    return _wrap(core, loss_fn, name="clipped_grad", doc=clipped_parts.__doc__)


def clipped_grad(
    loss_fn,
    *,
    l2_clip: float,
    reduction: str = "mean",
    return_norms: bool = False,
    return_loss: bool = False,
    nonfinite: str = "raise",
    method: str = "auto",
    chunk_size: int | None = None,
    strict: bool = False,
):
    """The sum or mean of per-example gradients, each clipped to L2 norm ``l2_clip`` (DP-SGD).

    .. math::

        \\bar g = \\frac{1}{\\sum_i m_i n_i} \\sum_i m_i \\, g_i \\min(1, C / \\lVert g_i \\rVert)

    ``reduction="mean"`` divides by the number of real *items* ``Σ_i m_i n_i`` (examples for a
    scalar loss, real tokens for a ``(sum, count)`` token loss), so that with a large clip it
    equals :func:`jaxgrad.batch_grad`; ``"sum"`` returns the clipped sum (DP-SGD implementations
    that divide by the expected batch size add their noise to this and divide themselves).
    The norms are those of the gradient of each example's loss *sum*.

    On the fast path the clipped sum of a dense use is ``Aᵀ diag(c) G`` — the weight-gradient
    matmul of an ordinary backward pass, reweighted — so no per-example gradient is formed.

    Non-finite examples: clipping bounds each example's influence, but an example whose loss
    or gradient norm is NaN or inf cannot be scaled to norm ``C`` (``0 × inf`` is NaN), so it
    would make the whole result NaN. ``nonfinite`` says what happens instead:

    * ``"raise"`` (default): a ``FloatingPointError`` naming the examples, when ``f`` is called
      eagerly; under the caller's own ``jax.jit`` nothing can be raised and the result is NaN,
      as with ``"propagate"``;
    * ``"drop"``: such examples are treated as padding — left out of the sum and of the item
      count — and the rest is exact; their norms (``return_norms=True``) stay non-finite, so
      ``jnp.sum(~jnp.isfinite(norms))`` counts them. If every real example is dropped, the
      kept examples are reduced as any are: an empty mean is NaN (never a silent 0) and an
      empty sum is 0. (Costs a second pass, only when something was dropped.)
    * ``"propagate"``: the result is NaN.

    The same policy, with the same rules, serves the DP-SGD step (:mod:`jaxgrad.privacy`).
    Parameters that are not finite make the result NaN under every policy: every example's
    gradient is then meaningless, and a sum of nothing would read as a real (zero) gradient.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      l2_clip: the clipping norm ``C > 0``.
      reduction: ``"mean"`` or ``"sum"``.
      return_norms: if True, the unclipped per-example norms are returned last.
      return_loss: if True, the (unclipped) loss is returned first, reduced as the gradient
        is: ``Σ_i m_i S_i / Σ_i m_i n_i`` for ``"mean"``, ``Σ_i m_i S_i`` for ``"sum"``.
      nonfinite: ``"raise"``, ``"drop"`` or ``"propagate"`` (see above).
      method: ``"auto"`` (fast, exact) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.
      strict: if True, raise when a parameter leaf that is neither a vector nor small takes
        the exact fallback (a per-example copy); :func:`jaxgrad.fast.plan` shows the routes.

    Returns:
      ``f(params, batch, mask=None) -> grads``; ``(loss, grads)`` with ``return_loss``,
      ``(grads, norms)`` with ``return_norms``, ``(loss, grads, norms)`` with both.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import clipped_grad
      >>> loss = lambda w, ex: jnp.dot(ex, w)
      >>> f = clipped_grad(loss, l2_clip=1.0, reduction="sum")
      >>> g = f(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 0.5]]))  # [0.6, 0.8] + [0, 0.5]
      >>> [round(float(v), 6) for v in g]
      [0.6, 1.3]
    """
    parts = clipped_parts(
        loss_fn,
        l2_clip=l2_clip,
        reduction=reduction,
        nonfinite=nonfinite,
        method=method,
        chunk_size=chunk_size,
        strict=strict,
    )
    return_norms = reduce.check_flag(return_norms, name="return_norms")
    return_loss = reduce.check_flag(return_loss, name="return_loss")

    def f(params, batch, mask=None, *args):
        loss, grads, norms, bad, _ = parts(params, batch, mask, *args)
        if nonfinite == "raise":
            raise_nonfinite(bad, name="clipped_grad")
        out = (grads,)
        if return_loss:
            out = (loss, *out)
        if return_norms:
            out = (*out, norms)
        return out[0] if len(out) == 1 else out

    f.__name__ = f.__qualname__ = "clipped_grad"
    f.__doc__ = clipped_grad.__doc__
    return f


class GradStats(NamedTuple):
    """Statistics of the per-example gradients ``g_i = ∇S_i`` of one batch (see :func:`grad_stats`).

    Attributes:
      mean: ``Σ_i m_i g_i / Σ_i m_i n_i``, the gradient of the mean loss (= ``batch_grad``).
      loss: the mean loss ``Σ_i m_i S_i / Σ_i m_i n_i``.
      norms: ``(B,)`` per-example gradient norms ``‖g_i‖`` (0 where padded).
      num_examples: ``b = Σ_i m_i``, the number of real examples.
      trace_cov: ``tr Σ``, the unbiased trace of the per-example gradient covariance.
      grad_sq_norm: ``|G|²``, the unbiased estimate of the squared norm of the true gradient.
      noise_scale: ``B_simple = tr Σ / |G|²`` (McCandlish et al., 2018).
      snr: ``|G|² / (tr Σ / b) = b / B_simple``, signal over the variance of the batch mean.
    """

    mean: PyTree
    loss: jax.Array
    norms: jax.Array
    num_examples: jax.Array
    trace_cov: jax.Array
    grad_sq_norm: jax.Array
    noise_scale: jax.Array
    snr: jax.Array


def grad_stats(
    loss_fn, *, method: str = "auto", chunk_size: int | None = None, strict: bool = False
):
    """Mean gradient, per-example norms, gradient covariance trace and noise scale in one pass.

    With ``b = Σ_i m_i`` real examples, per-example gradients ``g_i = ∇S_i`` and their mean
    ``ḡ = (1/b) Σ_i m_i g_i``:

    .. math::

        \\operatorname{tr}\\Sigma = \\frac{1}{b-1} \\sum_i m_i \\lVert g_i - \\bar g \\rVert^2
            = \\frac{\\sum_i m_i \\lVert g_i \\rVert^2 - b \\lVert \\bar g \\rVert^2}{b - 1},
        \\qquad
        |G|^2 = \\lVert \\bar g \\rVert^2 - \\frac{\\operatorname{tr}\\Sigma}{b},

    both unbiased (``E‖ḡ‖² = |G|² + tr Σ / b``), and the simple noise scale of McCandlish et
    al. (2018), "An Empirical Model of Large-Batch Training", ``B_simple = tr Σ / |G|²``, and
    ``snr = |G|² / (tr Σ / b) = b / B_simple``. With ``b < 2`` the covariance is undefined and
    the statistics are NaN; ``|G|²`` (so ``B_simple``) may be negative when noise dominates.
    The per-example gradients are those of each example's loss *sum*, so for a token loss the
    statistics are per sequence; ``mean`` is still divided by the item count, as
    :func:`jaxgrad.batch_grad` is. ``tr Σ`` is computed from ``Σ‖g_i‖²`` and ``‖ḡ‖²``: in float32
    it loses precision when the noise is tiny compared with the mean.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      method: ``"auto"`` (fast, exact) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.
      strict: if True, raise when a parameter leaf that is neither a vector nor small takes
        the exact fallback (a per-example copy); :func:`jaxgrad.fast.plan` shows the routes.

    Returns:
      ``f(params, batch, mask=None) -> GradStats``.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import grad_stats
      >>> loss = lambda w, ex: jnp.dot(ex, w)
      >>> s = grad_stats(loss)(jnp.ones(1), jnp.array([[1.0], [3.0]]))
      >>> float(s.trace_cov), float(s.grad_sq_norm)  # var(1, 3) = 2; 2² − 2/2 = 3
      (2.0, 3.0)
    """
    get = passes.get_pass(method, strict)
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn):
        def body(b, m):
            parts = get(loss_fn, params, b, m)
            ones = m.astype(parts.sums.dtype)
            totals = (parts.weighted(ones), jnp.sum(parts.sums), jnp.sum(parts.counts))
            return parts.norm_sq, totals

        norm_sq, (grad_sum, loss_sum, count) = passes.run_chunked(body, batch, mask, chunk_size)
        dtype = norm_sq.dtype
        b = jnp.sum(mask).astype(dtype)
        sum_sq = sum(jnp.sum(g.astype(dtype) ** 2) for g in jax.tree_util.tree_leaves(grad_sum))
        mean_sq = sum_sq / b**2  # ‖ḡ‖²
        trace_cov = (jnp.sum(norm_sq) - b * mean_sq) / (b - 1)
        trace_cov = jnp.where(b > 1, trace_cov, jnp.nan)
        grad_sq_norm = mean_sq - trace_cov / b
        return GradStats(
            mean=reduce.safe_divide(grad_sum, count),
            loss=reduce.safe_divide(loss_sum, count),
            norms=jnp.sqrt(norm_sq),
            num_examples=b,
            trace_cov=trace_cov,
            grad_sq_norm=grad_sq_norm,
            noise_scale=trace_cov / grad_sq_norm,
            snr=grad_sq_norm * b / trace_cov,
        )

    return _wrap(core, loss_fn, name="grad_stats", doc=grad_stats.__doc__)


class GradMoments(NamedTuple):
    """Sums over the real examples of a batch, from materialised per-example gradients.

    Attributes:
      grad_sum: ``Σ_i m_i g_i``.
      grad_sq_sum: ``Σ_i m_i g_i ⊙ g_i`` (elementwise squares; the diagonal second moment).
      norms: ``(B,)`` per-example norms ``‖g_i‖`` (0 where padded).
      loss_sum: ``Σ_i m_i S_i``.
      count: ``Σ_i m_i n_i``.
    """

    grad_sum: PyTree
    grad_sq_sum: PyTree
    norms: jax.Array
    loss_sum: jax.Array
    count: jax.Array


def per_example_moments(loss_fn, *, chunk_size: int | None = None):
    """Sum, elementwise sum of squares and norms of per-example gradients, chunk by chunk.

    The exact ``vmap(grad)`` path, reduced as it goes: with ``chunk_size`` only one chunk's
    per-example gradients (``chunk_size × P``) exist at a time; the batch need not divide
    evenly (the remainder is its own, smaller chunk). The elementwise variance of the
    gradients is ``grad_sq_sum / b − (grad_sum / b)²`` for ``b`` real examples.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      chunk_size: examples per chunk (all at once when None).

    Returns:
      ``f(params, batch, mask=None) -> GradMoments``.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import per_example_moments
      >>> loss = lambda w, ex: jnp.dot(ex, w)
      >>> m = per_example_moments(loss, chunk_size=2)(jnp.ones(1), jnp.arange(5.0)[:, None])
      >>> m.grad_sum.tolist(), m.grad_sq_sum.tolist()  # 0+1+2+3+4, 0+1+4+9+16
      ([10.0], [30.0])
    """
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn):
        def body(b, m):
            sums, counts, grads = _per_example(loss_fn, params, b, m, None)  # rows masked
            norm_sq = reduce.row_sq_norms(grads)
            totals = (
                jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads),
                jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), grads),
                jnp.sum(sums),
                jnp.sum(counts),
            )
            return jnp.sqrt(norm_sq), totals

        norms, (g_sum, g_sq, loss_sum, count) = passes.run_chunked(body, batch, mask, chunk_size)
        return GradMoments(g_sum, g_sq, norms, loss_sum, count)

    return _wrap(core, loss_fn, name="per_example_moments", doc=per_example_moments.__doc__)
