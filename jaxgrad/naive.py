"""The orders of averaging that are wrong in general, implemented faithfully to measure them.

Averaging commutes with differentiation but not with a nonlinearity:

.. math::

    \\nabla l(\\theta; \\bar x) \\ne \\frac1N \\sum_i \\nabla l(\\theta; x_i),
    \\qquad
    \\frac1K \\sum_k \\frac{S_k}{n_k} \\ne \\frac{\\sum_k S_k}{\\sum_k n_k}

unless ``l`` is linear in ``x`` and all ``n_k`` are equal. Each function here returns a
jit-compiled ``f(params, batch, mask=None) -> GradResult`` with the same signature and result
as the exact strategies in :mod:`jaxgrad.grads`, so the two can be compared directly
(:func:`jaxgrad.check.compare`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgrad import reduce
from jaxgrad.grads import GradResult, _strategy, _validator, check_loss_fn


def _masked_mean(tree, mask):
    """The mean over the real (unmasked) rows of every leaf of a batched pytree."""
    weights = mask / jnp.maximum(jnp.sum(mask), 1)
    return jax.tree_util.tree_map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, 1), tree)


def _check_floating(batch):
    for leaf in jax.tree_util.tree_leaves(batch):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                "`grad_at_mean_input` averages every leaf of the batch, so every leaf must be "
                f"floating point; got a leaf of dtype {leaf.dtype} and shape {leaf.shape} "
                "(integer labels or tokens have no mean)"
            )


def grad_at_mean_input(loss_fn):
    """The gradient at the mean example, ``∇ l(θ; x̄, ȳ)``, instead of the mean gradient.

    Equal to :func:`jaxgrad.batch_grad` when the loss is linear in the data (e.g. the seed's
    linear error ``y − θ x``); different otherwise. For the sigmoid at inputs 0 and 1:
    ``σ'(0.5) ≈ 0.2350`` against the true ``(σ'(0) + σ'(1)) / 2 ≈ 0.2233``.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``; every leaf of the
        batch is averaged over the real (unmasked) examples, so all must be floating point.

    Returns:
      ``f(params, batch, mask=None) -> GradResult``: ``grads`` and ``loss`` at the mean
      example, ``count`` the number of real examples averaged (``norms`` is None).

    Example::

      >>> import jax, jax.numpy as jnp, jaxgrad
      >>> loss = lambda theta, x: jax.nn.sigmoid(theta * x)
      >>> g = jaxgrad.naive.grad_at_mean_input(loss)(1.0, jnp.array([0.0, 1.0])).grads
      >>> round(float(g), 4)  # 0.5 σ'(0.5), not the mean of 0·σ'(0) and 1·σ'(1)
      0.1175
    """

    def core(params, batch, mask, loss_fn=loss_fn):
        _check_floating(batch)
        # With no real example there is no mean example: like every exact strategy (a count
        # of 0), return a zero loss and gradient. The loss is evaluated at the plain mean of the
        # (padding-filled) rows, so it stays finite, and multiplied by 0.
        any_real = jnp.any(mask)
        mean_example = _masked_mean(batch, jnp.where(any_real, mask, True))

        def loss_at_mean(p):
            loss_sum, count = reduce.as_sum_count(loss_fn(p, mean_example))
            return reduce.safe_divide(loss_sum, count) * any_real.astype(loss_sum.dtype)

        loss, grads = jax.value_and_grad(loss_at_mean)(params)
        return GradResult(grads, loss, jnp.sum(mask).astype(loss.dtype))

    return _strategy(
        core,
        loss_fn=loss_fn,
        validate=_validator(loss_fn),
        name="grad_at_mean_input",
        doc=grad_at_mean_input.__doc__,
    )


def backprop_mean_error(apply_fn, output_loss):
    """Averages the output error signal over the batch, then backpropagates it.

    The exact gradient backpropagates each example's own error ``δ_i = ∂l/∂ŷ_i`` through its
    own Jacobian: ``(1/N) Σ_i J_iᵀ δ_i``. This order backpropagates the batch-mean error
    ``δ̄`` through every example's network instead: ``(1/N) Σ_i J_iᵀ δ̄``. The difference is
    a covariance between errors and Jacobians; for one dense layer ``s = a W`` it is exactly
    the cross-covariance

    .. math::

        \\frac1N \\sum_i a_i \\delta_i^T - \\bar a\\, \\bar\\delta^T
        = \\frac1N \\sum_i (a_i - \\bar a)(\\delta_i - \\bar\\delta)^T

    (see :func:`jaxgrad.closed_form.dense_cross_covariance`), which vanishes only when errors
    and activations are uncorrelated over the batch.

    Args:
      apply_fn: ``apply_fn(params, x) -> prediction`` on one example.
      output_loss: ``output_loss(prediction, target) -> scalar | (loss_sum, n_items)`` on
        one example; with counts, the mean error ``δ̄`` is backpropagated and divided by the
        global item count ``Σ_i n_i``, as the exact gradient is.

    Returns:
      ``f(params, batch, mask=None) -> GradResult`` where ``batch = (inputs, targets)``:
      these ``grads``, and the exact mean ``loss`` and ``count`` (``norms`` is None).

    Example::

      >>> import jax, jax.numpy as jnp, jaxgrad
      >>> model = jaxgrad.models.mlp([3, 4, 1], activation="sigmoid")
      >>> f = jaxgrad.naive.backprop_mean_error(model.apply, jaxgrad.losses.squared_error)
      >>> out = f(model.init(jax.random.key(0)), (jnp.ones((8, 3)), jnp.zeros((8, 1))))
      >>> float(out.count)
      8.0
    """

    check_loss_fn(apply_fn, name="apply_fn", expected="apply_fn(params, x) -> prediction")
    check_loss_fn(
        output_loss,
        name="output_loss",
        expected="output_loss(prediction, target) -> scalar | (loss_sum, n_items)",
    )

    def core(params, batch, mask):
        _check_pair(batch)  # at trace time too: the structure is static, even under jit
        inputs, targets = batch

        def mean_output(p):
            outputs = jax.vmap(apply_fn, in_axes=(None, 0))(p, inputs)
            return _masked_mean(outputs, mask), outputs

        _, pullback, outputs = jax.vjp(mean_output, params, has_aux=True)
        parts = lambda out, y: reduce.as_sum_count(output_loss(out, y))
        (sums, counts), errors = jax.vmap(jax.value_and_grad(parts, has_aux=True))(outputs, targets)
        total, count = reduce.masked_totals(sums, counts, mask)
        mean_error = _masked_mean(errors, mask)
        (grads,) = pullback(mean_error)  # (1/b) Σ_i J_iᵀ δ̄ over b real examples
        # Normalised like the exact gradient, Σ_i J_iᵀ δ_i / Σ_i n_i: equal when all δ_i agree.
        per_item = reduce.safe_divide(jnp.sum(mask).astype(count.dtype), count)
        grads = jax.tree_util.tree_map(lambda g: g * per_item.astype(g.dtype), grads)
        return GradResult(grads, reduce.safe_divide(total, count), count)

    return _strategy(
        core,
        validate=_check_pair,
        name="backprop_mean_error",
        doc=backprop_mean_error.__doc__,
    )


def _check_pair(batch, mask=None):
    del mask
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(
            f"`batch` must be a pair (inputs, targets); got a {type(batch).__name__}{size}"
        )


def mean_of_microbatch_means(loss_fn, *, num_microbatches: int):
    """The mean over microbatches of each microbatch's mean-loss gradient.

    ``(1/K) Σ_k ∇S_k / n_k`` instead of ``Σ_k ∇S_k / Σ_k n_k``: each microbatch is weighted
    equally whatever number of real items (examples, tokens) it holds. Equal to
    :func:`jaxgrad.accumulate_grad` only when every microbatch holds the same count.
    Microbatches with no real item are left out of the mean.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      num_microbatches: number of microbatches ``K``; microbatch ``k`` holds the contiguous
        rows ``k⌈B/K⌉, …, (k+1)⌈B/K⌉ − 1`` (the last ones padded, masked out, when ``K``
        does not divide ``B``; those with no real row are left out of the mean). Unlike
        :func:`jaxgrad.accumulate_grad` (interleaved rows), which rows share a microbatch
        changes the result here.

    Returns:
      ``f(params, batch, mask=None) -> GradResult``: ``grads``, ``loss`` the mean of the
      microbatch mean losses, ``count`` the real items of the whole batch (``norms`` is None).
    """
    num_microbatches = reduce.check_positive_int(num_microbatches, name="num_microbatches")

    def core(params, batch, mask, loss_fn=loss_fn):
        micro_batches, micro_masks = reduce.split_microbatches(batch, mask, num_microbatches)

        def microbatch_mean(p, micro, micro_mask):
            total, count = reduce.batch_totals(loss_fn, p, micro, micro_mask)
            return reduce.safe_divide(total, count), count

        def one(micro, micro_mask):
            (loss, count), grads = jax.value_and_grad(microbatch_mean, has_aux=True)(
                params, micro, micro_mask
            )
            return loss, count, grads

        losses, counts, grads = jax.vmap(one)(micro_batches, micro_masks)
        k = jnp.sum(counts > 0)
        mean = lambda x: reduce.safe_divide(jnp.sum(x, axis=0), k)
        return GradResult(jax.tree_util.tree_map(mean, grads), mean(losses), jnp.sum(counts))

    return _strategy(
        core,
        loss_fn=loss_fn,
        validate=_validator(loss_fn),
        name="mean_of_microbatch_means",
        doc=mean_of_microbatch_means.__doc__,
    )
