"""The jit-compiled train step: any gradient strategy, any optax optimizer.

One step is

.. math::

    g = \\mathrm{strategy}(\\theta, B, m), \\qquad
    (u, s') = \\mathrm{opt.update}(g, s, \\theta), \\qquad \\theta' = \\theta + u

where ``m`` is the batch's padding mask. The step compiles once per batch shape: a partial
last batch is padded and masked, never a new shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgrad import reduce
from jaxgrad.grads import batch_grad

PyTree = Any


class TrainState(NamedTuple):
    """What a train step carries: parameters, optimizer state and the number of steps taken."""

    params: PyTree
    opt_state: optax.OptState
    step: jax.Array


def init_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """The state before the first step: ``optimizer.init(params)`` and ``step = 0``."""
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def loss_and_grad_fn(loss_fn, strategy: Callable = batch_grad):
    """``f(params, batch, mask) -> (mean_loss, grads)`` from a strategy factory.

    A factory that takes ``return_loss`` (every one in :mod:`jaxgrad.grads`) reports the loss
    with its gradient; for one that does not (e.g. ``lambda f: my_grad(f)``) the masked mean
    loss is computed by a separate forward pass.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      strategy: ``strategy(loss_fn, **options) -> f(params, batch, mask=None) -> grads``;
        bind options with ``functools.partial``, e.g.
        ``partial(jaxgrad.accumulate_grad, num_microbatches=4)``.
    """
    if not callable(strategy):
        raise TypeError(
            "`strategy` must be a gradient-strategy factory such as jaxgrad.batch_grad; "
            f"got {strategy!r}"
        )
    if _accepts(strategy, "return_loss"):
        return strategy(loss_fn, return_loss=True)
    grad_fn = strategy(loss_fn)

    def mean_loss(params, batch, mask):
        return reduce.safe_divide(*reduce.batch_totals(loss_fn, params, batch, mask))

    def f(params, batch, mask):
        return mean_loss(params, batch, mask), grad_fn(params, batch, mask)

    return f


def step_fn(loss_fn, optimizer: optax.GradientTransformation, *, strategy: Callable = batch_grad):
    """The un-jitted ``step(state, batch, mask) -> (state, mean_loss)``; see :func:`train_step`."""
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"`optimizer` must be an optax.GradientTransformation (e.g. optax.sgd(0.1)); got "
            f"{type(optimizer).__name__}"
        )
    grad = loss_and_grad_fn(loss_fn, strategy)

    def step(state: TrainState, batch, mask):
        loss, grads = grad(state.params, batch, mask)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), loss

    return step


def train_step(
    loss_fn, optimizer: optax.GradientTransformation, *, strategy: Callable = batch_grad
):
    """A jit-compiled SGD step for any gradient strategy and any optax optimizer.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      optimizer: an optax ``GradientTransformation``.
      strategy: a gradient-strategy factory: :func:`jaxgrad.batch_grad` (default),
        :func:`jaxgrad.mean_of_per_example_grads`, :func:`jaxgrad.accumulate_grad` (bind
        ``num_microbatches`` with ``functools.partial``), a clipped one, or your own
        ``strategy(loss_fn) -> f(params, batch, mask=None) -> grads``.

    Returns:
      ``step(state, batch, mask) -> (state, mean_loss)``, jit-compiled, where ``state`` is a
      :class:`TrainState` (see :func:`init_state`) and ``mask`` is a boolean vector over the
      batch (False = padding). It compiles once per batch shape.

    Example::

      >>> import jax, jax.numpy as jnp, optax, jaxgrad
      >>> from jaxgrad.train import init_state, train_step
      >>> model = jaxgrad.models.line_fit()
      >>> loss_fn = jaxgrad.losses.supervised(model.apply, jaxgrad.losses.squared_error)
      >>> opt = optax.sgd(0.1)
      >>> step = train_step(loss_fn, opt, strategy=jaxgrad.mean_of_per_example_grads)
      >>> state = init_state(model.init(jax.random.key(0)), opt)
      >>> x = jnp.linspace(-1, 1, 8)
      >>> state, loss = step(state, (x, 2 * x + 1), jnp.ones(8, bool))
      >>> int(state.step)
      1
    """
    return jax.jit(step_fn(loss_fn, optimizer, strategy=strategy))
