"""The jit-compiled train step: any gradient strategy, any optax optimizer.

One step is

.. math::

    g = \\mathrm{strategy}(\\theta, B, m), \\qquad
    (u, s') = \\mathrm{opt.update}(g, s, \\theta), \\qquad \\theta' = \\theta + u

where ``m`` is the batch's padding mask. The step compiles once per batch shape: a partial
last batch is padded and masked, never a new shape. In ``fit`` the step is :func:`guarded`,
and a chunk of such steps runs in one of two forms, shared by plain and private training:
one jitted ``lax.scan`` (:func:`scan_chunk`) or a Python loop over the jitted step
(:func:`loop_chunk`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgrad import _loops, accumulation, reduce
from jaxgrad.grads import GradResult, batch_grad

PyTree = Any


class TrainState(NamedTuple):
    """What a train step carries: parameters, optimizer state and the number of steps taken."""

    params: PyTree
    opt_state: optax.OptState
    step: jax.Array


class Engine(NamedTuple):
    """How :func:`jaxgrad.train.fit`'s one loop makes its steps: plain or private, one device
    or a mesh. The loop owns everything else (resume, checkpoints, progress, evaluation, the
    stop at a non-finite step); an engine owns the batches and the gradient.

    Attributes:
      config: what a resumed run must match (written into every checkpoint).
      steps_per_epoch: steps in one epoch.
      chunk: steps run per call of ``run_chunk`` (a chunk ends on an epoch's last step).
      epoch_chunks: ``epoch_chunks(key, epoch) -> [inputs, ...]``, one per chunk.
      run_chunk: ``run_chunk(state, key, inputs) -> (state, bad, loss_sum, count)``: the
        chunk's steps, ``bad`` the step count of the first failed step (or −1), the loss
        summed over the chunk's examples and their number.
      record: ``record(steps, loss_sum, count) -> dict``: what the epoch's history record
        says of training (besides ``epoch``, ``step``, ``seconds`` and the evaluation).
      failure: ``failure(bad, epoch) -> str``: why step ``bad + 1`` stopped training.
      last_step: if set, training ends once ``state.step`` reaches it (a DP run whose budget,
        ``stop_at_epsilon``, is spent before ``epochs``); the engine marks the steps after it
        inactive.
    """

    config: dict
    steps_per_epoch: int
    chunk: int
    epoch_chunks: Callable
    run_chunk: Callable
    record: Callable
    failure: Callable
    last_step: int | None = None


def init_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    """The state before the first step: ``optimizer.init(params)`` and ``step = 0``."""
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def check_optimizer(optimizer):
    """Checks ``optimizer`` is an optax optimizer: anything with ``init`` and ``update``.

    Duck-typed, as optax itself is: a ``GradientTransformation``, a chain, and wrappers that
    are not ``GradientTransformation`` instances but behave as one (``optax.MultiSteps``).

    Raises:
      TypeError: naming ``optimizer`` and what it got.
    """
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        hint = f" (e.g. optax.{optimizer}(1e-3))" if isinstance(optimizer, str) else ""
        raise TypeError(
            "`optimizer` must be an optax GradientTransformation with init and update "
            f"(e.g. optax.sgd(0.1)){hint}; got {optimizer!r}"[:300]
        )
    return optimizer


def strategy_name(strategy) -> str:
    """A strategy factory's name, looking through ``functools.partial``."""
    return getattr(strategy, "__name__", None) or getattr(
        getattr(strategy, "func", None), "__name__", type(strategy).__name__
    )


def _check_strategy_output(loss, grads, params, strategy) -> None:
    """Trace-time check that a strategy gave a scalar loss and a gradient shaped like params."""
    name = strategy_name(strategy)
    same = jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params) and all(
        jnp.shape(g) == jnp.shape(p)
        for g, p in zip(
            jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params), strict=True
        )
    )
    if not same:
        shapes = lambda t: [jnp.shape(x) for x in jax.tree_util.tree_leaves(t)][:6]
        raise ValueError(
            f"`strategy` ({name}) must give one gradient shaped like `params` (the gradient of "
            f"the batch's mean loss); got leaf shapes {shapes(grads)} for params of shapes "
            f"{shapes(params)}. Per-example gradients (jaxgrad.per_example_grads) are not a "
            "step's gradient: use jaxgrad.mean_of_per_example_grads"
        )
    if jnp.shape(loss) != ():
        raise ValueError(
            f"`strategy` ({name}) must give a scalar mean loss in its GradResult; got shape "
            f"{jnp.shape(loss)}"
        )


def loss_and_grad_fn(loss_fn, strategy: Callable = batch_grad):
    """``f(params, batch, mask) -> (mean_loss, grads)`` from a strategy factory.

    A strategy whose ``f`` returns a :class:`jaxgrad.GradResult` (every one in
    :mod:`jaxgrad.grads` and :mod:`jaxgrad.naive`) reports the loss with its gradient; for one
    that returns the gradient alone (a user's own, :func:`jaxgrad.clipped_grad`) the masked
    mean loss is computed by a separate forward pass (in the same jit, XLA shares it).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      strategy: ``strategy(loss_fn, **options) -> f(params, batch, mask=None)`` returning a
        ``GradResult`` or the gradient; bind options with ``functools.partial``, e.g.
        ``partial(jaxgrad.accumulate_grad, num_microbatches=4)``.
    """
    if not callable(strategy):
        raise TypeError(
            "`strategy` must be a gradient-strategy factory such as jaxgrad.batch_grad; "
            f"got {strategy!r}"
        )
    grad_fn = strategy(loss_fn)

    def f(params, batch, mask):
        out = grad_fn(params, batch, mask)
        if isinstance(out, GradResult):
            loss, grads = out.loss, out.grads
        else:
            loss = reduce.safe_divide(*reduce.batch_totals(loss_fn, params, batch, mask))
            grads = out
        _check_strategy_output(loss, grads, params, strategy)
        return loss, grads

    return f


def step_fn(loss_fn, optimizer: optax.GradientTransformation, *, strategy: Callable = batch_grad):
    """The un-jitted ``step(state, batch, mask) -> (state, mean_loss)``; see :func:`train_step`."""
    check_optimizer(optimizer)
    grad = loss_and_grad_fn(loss_fn, strategy)

    def step(state: TrainState, batch, mask):
        loss, grads = grad(state.params, batch, mask)
        extra = {}
        if accumulation.takes_count(state.opt_state):
            # jaxgrad.accumulate divides once by the count of every batch it accumulates: the
            # batch's item count (a forward pass XLA shares with the gradient's, in one jit).
            extra["count"] = reduce.batch_totals(loss_fn, state.params, batch, mask)[1]
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), loss

    return step


def guarded(step):
    """The step inside the training loop, made safe to run blindly over a chunk of steps.

    ``step(state, *inputs) -> (new_state, loss, weight)``; the guarded
    ``body((state, bad), *inputs, active) -> ((state, bad), loss · weight)`` keeps ``state``
    for a padded (inactive) step or any step after a failed one, and records in ``bad`` the
    step count of the first step whose loss (or updated parameters or optimizer state) is not
    finite. One guard for plain and private training: a finite loss is not enough, since an
    update can still make the state non-finite, and such a state is never kept or
    checkpointed.
    """

    def body(carry, *inputs, active):
        state, bad = carry
        new, loss, weight = step(state, *inputs)
        finite = jnp.isfinite(loss) & reduce.all_finite(new)
        ok = active & (bad < 0) & finite
        bad = jnp.where(active & (bad < 0) & ~finite, state.step, bad)
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state)
        return (state, bad), jnp.where(ok, loss * weight, 0)

    return body


def first_carry(state):
    """A chunk's first carry for a :func:`guarded` body: ``state`` and no failed step (−1)."""
    return state, jnp.int32(-1)


def scan_chunk(step, totals=lambda outs: ()):
    """A chunk of :func:`guarded` steps as one jitted ``lax.scan`` (its convolutions
    canonical: :func:`jaxgrad._loops.jit`), from :func:`first_carry`.

    Args:
      step: ``step((state, bad), x, *args) -> ((state, bad), out)``: one guarded step from
        its slice ``x`` of the scanned inputs and the arguments every step shares.
      totals: ``totals(outs) -> tuple``, the stacked step outputs reduced in the same jit
        (default: none returned).

    Returns:
      ``run(state, xs, *args) -> (state, bad, *totals(outs))``. The shared arguments (the
      data set) stay arguments, never constants compiled into the program.
    """

    @_loops.jit
    def run(state, xs, *args):
        def f(carry, x):
            return step(carry, x, *args)

        (state, bad), outs = jax.lax.scan(f, first_carry(state), xs)
        return state, bad, *totals(outs)

    return run


def loop_chunk(body, each=None):
    """A chunk of :func:`guarded` steps as a Python loop over one jitted step (``fit``'s
    ``scan=False``), from :func:`first_carry`: only the steps taken are run, all active.

    Args:
      body: the guarded ``body((state, bad), *inputs, active)``.
      each: ``each((state, bad))`` after every step (a wait across processes), or None.

    Returns:
      ``run(state, inputs) -> (state, bad, outs)``: ``inputs`` yields one tuple of the
      body's inputs per step (read as the steps run), ``outs`` is the list of their outputs.
    """
    one = _loops.jit(functools.partial(body, active=True))

    def run(state, inputs):
        carry, outs = first_carry(state), []
        for x in inputs:
            carry, out = one(carry, *x)
            if each is not None:
                each(carry)
            outs.append(out)
        return *carry, outs

    return run


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
        ``strategy(loss_fn) -> f(params, batch, mask=None) -> grads`` (or a
        :class:`jaxgrad.GradResult`).

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
