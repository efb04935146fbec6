"""Gradient accumulation across optimizer calls that divides once, by the global item count.

``optax.MultiSteps(inner, k)`` averages the ``k`` gradients it is given: with microbatch
means ``g_k = S_k / n_k`` it applies ``(1/K) Σ_k S_k / n_k``, which is not the gradient of the
big batch, ``Σ_k S_k / Σ_k n_k``, unless every microbatch holds the same number of items
(tokens of a ``(loss_sum, n_items)`` loss, real rows of a partial last batch).
:func:`accumulate` is the same wrapper with the counts: each call passes its item count, the
wrapper adds ``n_k g_k = ∇S_k`` and ``n_k`` separately and applies ``inner`` once, on
``Σ_k ∇S_k / Σ_k n_k``.

Within one call, :func:`jaxgrad.accumulate_grad` already does this over microbatches of one
batch; :func:`accumulate` is for accumulation across calls (batches loaded one at a time, or
``jaxgrad.train.fit``'s consecutive steps).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgrad import reduce

PyTree = Any


class AccumulateState(NamedTuple):
    """The state of :func:`accumulate`.

    Attributes:
      mini_step: calls since ``inner`` was last applied (0 to ``every_k - 1``).
      grad_sum: ``Σ_k n_k g_k``, the accumulated gradient *sum*, shaped like the params.
      count: ``Σ_k n_k``, the accumulated item count.
      inner_state: the state of ``inner``.
    """

    mini_step: jax.Array
    grad_sum: PyTree
    count: jax.Array
    inner_state: optax.OptState


def accumulate(every_k: int, inner) -> optax.GradientTransformationExtraArgs:
    """An optax transformation that applies ``inner`` every ``every_k`` calls, on the exact mean.

    Call ``k`` passes the mean gradient ``g_k`` of its batch (what every jaxgrad strategy
    returns) and that batch's item count ``n_k = Σ_i m_i n_i`` as ``count=``; on call
    ``every_k`` the wrapper applies ``inner`` to

    .. math::

        \\bar g = \\frac{\\sum_k n_k g_k}{\\sum_k n_k} = \\frac{\\sum_k \\nabla S_k}{\\sum_k n_k},

    the gradient of one big batch made of all ``every_k`` batches, and returns zero updates on
    the other calls (as ``optax.MultiSteps`` does). A count of 0 with a zero gradient (a batch
    of padding only) adds nothing. A count that cannot be an item count follows the
    strategies' rule (docs/non-finite.md): known when ``update`` is called (not traced), a
    bool, a non-scalar, a negative, NaN or inf count is an error; traced, a negative, NaN or
    inf count, or 0 with a nonzero gradient, makes the accumulated gradient, hence the
    update, NaN (which ``fit`` refuses to keep).

    ``jaxgrad.train.fit(..., optimizer=accumulate(k, inner))`` passes the counts itself: ``k``
    consecutive steps make one update.

    Args:
      every_k: how many calls make one update of ``inner``, an integer >= 1.
      inner: the optax optimizer applied to the accumulated mean.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update(grads, state, params=None, *,
      count, **extra_args)`` needs ``count`` (a scalar, integer or real, ``>= 0``); other extra
      arguments go to ``inner``.

    Raises:
      From ``update``: TypeError for a missing ``count``, or a traced one that is not an
      integer or a real number; ValueError for one that is not a scalar, or is known and not a
      finite number ``>= 0`` (a bool, a string, negative, NaN or inf).

    Example::

      >>> import jax.numpy as jnp, optax, jaxgrad
      >>> loss = lambda w, ex: (jnp.sum(ex * w), ex.shape[0])  # (sum, count)
      >>> opt = jaxgrad.accumulate(2, optax.sgd(1.0))
      >>> w = jnp.zeros(1); state = opt.init(w)
      >>> r1 = jaxgrad.batch_grad(loss)(w, jnp.array([[1.0]]))          # 1 item, mean 1
      >>> r2 = jaxgrad.batch_grad(loss)(w, jnp.array([[4.0], [4.0], [4.0]]))  # 3 items, mean 4
      >>> u, state = opt.update(r1.grads, state, w, count=r1.count)
      >>> u, state = opt.update(r2.grads, state, w, count=r2.count)
      >>> float(u[0])  # -(1 + 12) / 4, not MultiSteps' -(1 + 4) / 2
      -3.25
    """
    every_k = reduce.check_positive_int(every_k, name="every_k")
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise TypeError(
            f"`inner` must be an optax optimizer (with init and update), e.g. optax.adam(1e-3); "
            f"got {inner!r}"[:300]
        )
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return AccumulateState(
            mini_step=jnp.zeros((), jnp.int32),
            # Summed in at least float32 (reduce.count_dtype): a bfloat16 sum of n_k g_k
            # rounds each count (257 to 256), and the mean is cast back to the parameter's.
            grad_sum=jax.tree_util.tree_map(
                lambda p: jnp.zeros(jnp.shape(p), reduce.count_dtype(jnp.result_type(p))), params
            ),
            count=jnp.zeros((), jnp.result_type(float)),
            inner_state=inner.init(params),
        )

    def update(updates, state, params=None, *, count=None, **extra_args):
        if count is None:
            raise TypeError(
                "`count` is required: jaxgrad.accumulate(...).update(grads, state, params, "
                "count=n) with n the number of items behind `grads` (Σ_i m_i n_i: real examples, "
                "or real tokens of a (loss_sum, n_items) loss), so the accumulated gradient is "
                "divided once by the total count"
            )
        if jnp.shape(count) != ():
            raise ValueError(f"`count` must be a scalar; got shape {jnp.shape(count)}")
        # A count known now is checked now (a bool, a string, negative, NaN, inf: an error
        # naming it); a traced one can only follow the strategies' rule below.
        reduce.check_if_known(reduce.check_nonnegative_float, count, name="count")
        dtype = jnp.result_type(count)
        if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
            raise TypeError(f"`count` must be an integer or a real number; got dtype {dtype}")
        count = jnp.asarray(count, state.count.dtype)
        # The strategies' rule for (sum, count) pairs: a count that cannot be an item count
        # (negative, NaN, inf, or 0 behind a nonzero gradient) makes this call's gradient sum
        # and count NaN, so the accumulated mean is NaN rather than a wrong number.
        nonzero = jnp.any(
            jnp.stack([jnp.any(g != 0) for g in jax.tree_util.tree_leaves(updates)] or [False])
        )
        count = count * reduce.nan_if_bad_count(count, nonzero)
        grad_sum = jax.tree_util.tree_map(
            lambda s, g: s + g.astype(s.dtype) * count.astype(s.dtype), state.grad_sum, updates
        )
        total = state.count + count

        def apply(_):
            mean = jax.tree_util.tree_map(
                lambda m, g: m.astype(jnp.result_type(g)),
                reduce.safe_divide(grad_sum, total),
                updates,
            )
            new, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            return new, AccumulateState(
                jnp.zeros_like(state.mini_step),
                jax.tree_util.tree_map(jnp.zeros_like, grad_sum),
                jnp.zeros_like(total),
                inner_state,
            )

        def wait(_):
            zero = jax.tree_util.tree_map(jnp.zeros_like, updates)
            return zero, AccumulateState(state.mini_step + 1, grad_sum, total, state.inner_state)

        return jax.lax.cond(state.mini_step + 1 >= every_k, apply, wait, None)

    return optax.GradientTransformationExtraArgs(init, update)


def _states(opt_state, kind) -> list:
    return [
        s
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
        if isinstance(s, kind)
    ]


def takes_count(opt_state) -> bool:
    """Whether an optimizer's state holds an :func:`accumulate` (so ``update`` needs ``count``)."""
    return bool(_states(opt_state, AccumulateState))


def averages_means(opt_state) -> bool:
    """Whether an optimizer's state holds ``optax.MultiSteps``'s: it averages batch means."""
    return bool(_states(opt_state, optax.MultiStepsState))
