"""Data valuation during training: every example's first-order In-Run Data Shapley / TracIn score.

:func:`jaxgrad.train.fit` with ``valuation=Valuation(val_data, learning_rate=...)`` scores each
training example by how much it lowered the validation loss, to first order, over the steps
it took part in. ``fit``'s step at parameters ``θ_t`` on batch ``B_t`` (padding mask ``m``,
item counts ``n_j``) is

.. math::

    \\theta_{t+1} = \\theta_t
        - \\frac{\\eta_t}{N_t} \\sum_{j \\in B_t} m_j \\nabla S_j(\\theta_t),
    \\qquad N_t = \\sum_{j \\in B_t} m_j n_j,

for plain SGD with learning rate ``η_t`` (``S_j`` is example ``j``'s loss sum; for a scalar
loss, its loss, and ``N_t`` the number of real examples). A first-order Taylor expansion of the
validation loss ``L_val`` (the mean loss over ``val_data``) splits its change into one term
per example:

.. math::

    L_{val}(\\theta_t) - L_{val}(\\theta_{t+1}) \\approx
    \\sum_{j \\in B_t} \\underbrace{\\frac{\\eta_t}{N_t} m_j
        \\langle \\nabla S_j(\\theta_t), \\nabla L_{val}(\\theta_t) \\rangle}_{=: v_{j,t}},
    \\qquad
    \\mathrm{score}_i = \\sum_{t : i \\in B_t} v_{i,t}.

``v_{i,t}`` is the first-order In-Run Data Shapley value of example ``i`` at step ``t``
(Wang, Mittal, Song, Jia 2024, "Data Shapley in One Training Run": the Shapley value of a
utility that is linear in the batch's members is each member's own term) and the TracIn term
(Pruthi et al. 2020) with the step's per-example learning rate ``η_t / N_t``. Its sign: a
*positive* score lowered the validation loss (helpful), a negative one raised it (a
mislabelled example's gradient points against the validation gradient). The issue's
``−η⟨∇ℓ_i, ∇L_val⟩`` is the first-order *change* of ``L_val``; the score is its negation,
so the lowest scores are the harmful examples.

What it is and is not:

* **First-order**: the second-order terms (``η² gᵀ H g``, the interactions between examples of
  one batch) are left out; with a small learning rate the sum of a step's ``v_{j,t}`` is the
  validation loss's decrease up to ``O(η_t²)``.
* **η_t** is what you pass as ``learning_rate``: a float, or a schedule ``step -> lr``
  evaluated at ``t`` (0 for the first step, as optax counts). For ``optax.sgd(lr)`` (no
  momentum) that is the step's learning rate and the expansion above is the step's own. For
  Adam, momentum or any preconditioner the step is not ``−η g``; the score then follows TracIn:
  the inner product with the validation gradient scaled by the scheduled learning rate, the
  optimiser's preconditioning and momentum ignored.
* The gradients are the unclipped gradients of the training ``loss_fn`` at the parameters the
  step saw, whatever ``strategy`` computes the step; ``∇L_val`` is :func:`jaxgrad.batch_grad` of
  the same loss over all of ``val_data`` at the same ``θ_t``, and ``⟨∇S_j, ∇L_val⟩`` comes from
  :func:`jaxgrad.per_example_dots` (one more pass over the batch, forward mode: the batch's
  losses pushed along ``∇L_val``; no per-example gradient is formed).
* Padding rows and steps that were not taken (an epoch's padded steps, the step that stopped
  training at a non-finite loss) contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.fast import passes
from jaxgrad.fast.api import per_example_dots
from jaxgrad.grads import batch_grad

PyTree = Any


class Valuation:
    """Scores every training example of :func:`jaxgrad.train.fit` by its first-order effect on
    a validation loss (In-Run Data Shapley / TracIn; maths in :mod:`jaxgrad.train.valuation`).

    .. math::

        \\mathrm{score}_i = \\sum_{t : i \\in B_t} \\frac{\\eta_t}{N_t}
            \\langle \\nabla S_i(\\theta_t), \\nabla L_{val}(\\theta_t) \\rangle

    Positive scores lowered the validation loss; the lowest scores flag harmful examples
    (mislabelled, out of distribution). ``fit`` returns them as ``result.valuation``, an
    ``(N,)`` float64 array in the order of ``train_data``'s rows (0 for a row never in a batch).

    Args:
      val_data: the held-out set whose mean loss is the utility, a pytree with a leading
        example axis shaped like ``train_data``'s (all of it is one batch of
        :func:`jaxgrad.batch_grad` at every step: keep it to a few hundred rows).
      learning_rate: ``η_t``: a positive float, or a schedule ``step -> lr`` (an optax
        schedule), as the optimiser's; for a non-SGD optimiser its scheduled learning rate
        (TracIn's convention).
      method: ``"auto"`` (forward mode, or the fast path for a loss with a ``custom_vjp``)
        or ``"vmap"``, for :func:`jaxgrad.per_example_dots`.
      chunk_size: examples per chunk for :func:`jaxgrad.per_example_dots` (peak memory).

    Example::

      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from jaxgrad.train import Valuation, fit
      >>> loss = lambda w, ex: (jnp.dot(ex[0], w) - ex[1]) ** 2
      >>> x = np.random.default_rng(0).normal(size=(16, 3))
      >>> y = x @ np.array([1.0, -1.0, 0.5])
      >>> y[0] = -3 * y[0]  # one bad label
      >>> result = fit(loss, jnp.zeros(3), (x[:12], y[:12]), optimizer=optax.sgd(0.05),
      ...     epochs=10, batch_size=4, key=jax.random.key(1), progress="none",
      ...     valuation=Valuation((x[12:], y[12:]), learning_rate=0.05))
      >>> int(result.valuation.argmin())  # the bad label scores lowest
      0
    """

    def __init__(
        self,
        val_data: PyTree,
        *,
        learning_rate: float | Callable[[Any], Any],
        method: str = "auto",
        chunk_size: int | None = None,
    ):
        reduce.batch_size(val_data, name="val_data")
        if not callable(learning_rate):
            learning_rate = reduce.check_positive_float(learning_rate, name="learning_rate")
        method = passes.check_method(method)
        if chunk_size is not None:
            chunk_size = reduce.check_positive_int(chunk_size, name="chunk_size")
        self.val_data = val_data
        self.learning_rate = learning_rate
        self.method = method
        self.chunk_size = chunk_size

    def __repr__(self):
        size = reduce.batch_size(self.val_data, name="val_data")
        return f"Valuation(<{size} validation rows>, learning_rate={self.learning_rate!r})"

    def step_values(self, loss_fn) -> Callable:
        """``f(params, step, batch, mask) -> v`` of shape ``(B,)``: every row's term
        ``v_{j,t} = (η_t / N_t) m_j ⟨∇S_j(θ_t), ∇L_val(θ_t)⟩`` of one step (0 where padded).

        Pure and traceable: ``fit`` calls it inside its jitted step, before the update.

        Example::

          >>> import jax.numpy as jnp
          >>> from jaxgrad.train import Valuation
          >>> loss = lambda w, x: jnp.dot(x, w)  # ∇S_j = x_j; ∇L_val = mean of val rows
          >>> v = Valuation(jnp.array([[1.0, 0.0]]), learning_rate=0.5).step_values(loss)
          >>> x = jnp.array([[2.0, 1.0], [0.0, 3.0]])
          >>> v(jnp.ones(2), 0, x, None).tolist()  # (0.5 / 2) ⟨x_j, (1, 0)⟩
          [0.5, 0.0]
        """
        val_grad = batch_grad(loss_fn)
        dots = per_example_dots(loss_fn, method=self.method, chunk_size=self.chunk_size)
        val_data, learning_rate = self.val_data, self.learning_rate

        def f(params, step, batch, mask):
            if mask is None:
                mask = jnp.ones((reduce.batch_size(batch),), bool)
            reference = val_grad(params, val_data).grads
            d = dots(params, batch, mask, reference=reference)
            count = reduce.batch_totals(loss_fn, params, batch, mask)[1]
            lr = learning_rate(step) if callable(learning_rate) else learning_rate
            lr = jnp.asarray(lr, d.dtype)
            return jnp.where(mask, reduce.safe_divide(lr * d, count), 0)

        return f


def check_valuation(valuation, *, privacy, mesh, loss_key, checkpoint_dir, loss_fn, train_data):
    """``fit``'s ``valuation=``, checked against the rest of the run; returns it (or None).

    Raises:
      TypeError: ``valuation`` is not a :class:`Valuation`.
      ValueError: a private run (the scores are per-example statistics of the private rows,
        computed without noise: a private run never releases them), a mesh, a ``loss_key`` or
        checkpoints (not supported with valuation yet), or validation data the loss refuses.
    """
    if valuation is None:
        return None
    if not isinstance(valuation, Valuation):
        raise TypeError(
            "`valuation` must be a jaxgrad.train.Valuation(val_data, learning_rate=...); "
            f"got {type(valuation).__name__}"
        )
    if privacy is not None:
        raise ValueError(
            "`valuation` cannot be used with `privacy`: the scores are per-example statistics "
            "of the private training rows, computed without noise, and a private run releases "
            "nothing computed on its rows outside its (ε, δ) guarantee. Value the data in a "
            "separate, non-private run (or on public data)"
        )
    unsupported = {
        "mesh": mesh is not None,
        "loss_key": loss_key is not None,
        "checkpoint_dir": checkpoint_dir is not None,
    }
    for name, given in unsupported.items():
        if given:
            raise ValueError(
                f"`valuation` is not supported together with `{name}` yet (the scores are "
                f"accumulated on one host for one uninterrupted run); got {name} set. Run the "
                f"valuation without `{name}`"
            )
    example = lambda d: jax.tree_util.tree_map(lambda x: np.shape(x)[1:], d)
    if jax.tree_util.tree_structure(valuation.val_data) != jax.tree_util.tree_structure(
        train_data
    ) or example(valuation.val_data) != example(train_data):
        raise ValueError(
            "`valuation.val_data` must hold examples shaped like `train_data`'s; got "
            f"{example(valuation.val_data)}, expected {example(train_data)}"
        )
    validate = getattr(loss_fn, "validate", None)
    if validate is not None:
        validate(valuation.val_data)
    return valuation
