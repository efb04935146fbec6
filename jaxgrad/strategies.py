"""The registry of gradient strategies: one record per strategy, read by the CLIs, the
benchmark and the tests.

Every strategy is a factory ``make(loss_fn, **options) -> f`` whose
``f(params, batch, mask=None, *args)`` returns a :class:`jaxgrad.GradResult`. A
:class:`Strategy` record says what the factory computes and which options it takes, so code that
offers "every strategy" (``python -m jaxgrad.train --strategy``, ``python -m jaxgrad.bench
--strategies``, the equivalence tests) reads this one table instead of keeping its own list:

* ``exact``: its ``grads`` equal the gradient of the global mean loss
  ``∇ Σ_i m_i S_i / Σ_i m_i n_i`` for every loss (for a per-example strategy: every row equals
  that example's gradient). The others, in :mod:`jaxgrad.naive`, average before a nonlinearity
  and differ in general; each is equal where its docstring says (a loss linear in the data,
  identical examples, equal counts).
* ``per_example``: ``grads`` has a leading batch axis, so it is not a training step's gradient.
* ``options``: the keyword options, with the value used when a caller gives none.
* ``variants``: named option settings worth running (the benchmark times those of the exact
  strategies, the tests check each); ``{name: {}}`` at least.

Adding a strategy is one :func:`register` call next to its definition in this module.

Example::

  >>> import jax.numpy as jnp, jaxgrad
  >>> sorted(jaxgrad.strategies.names(exact=True))
  ['accumulate_grad', 'batch_grad', 'mean_of_per_example_grads', 'per_example_grads']
  >>> record = jaxgrad.strategies.get("accumulate_grad")
  >>> loss = lambda p, ex: (p * ex[0] - ex[1]) ** 2
  >>> out = record.build(loss)(2.0, (jnp.arange(4.0), jnp.ones(4)))  # num_microbatches=4
  >>> float(out.grads), float(out.count)
  (11.0, 4.0)
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from jaxgrad import grads, naive


class Strategy(NamedTuple):
    """One registered gradient strategy.

    Attributes:
      name: the registry key, the factory's own name (e.g. ``"accumulate_grad"``).
      make: the factory, ``make(loss_fn, **options) -> f(params, batch, mask=None, *args)``
        returning a :class:`jaxgrad.GradResult`.
      exact: whether ``grads`` equals the exact gradient (see the module docstring).
      per_example: whether ``grads`` has a leading batch axis.
      options: ``{keyword: value used when none is given}`` for every option ``make`` takes.
      variants: ``{label: options}``, named settings the benchmark times (exact strategies) and
        the tests check.
      summary: one line: what it computes.
      aliases: other names :func:`get` accepts (the train CLI's short names).
    """

    name: str
    make: Callable
    exact: bool
    per_example: bool
    options: Mapping[str, Any]
    variants: Mapping[str, Mapping[str, Any]]
    summary: str
    aliases: tuple[str, ...] = ()

    def factory(self, **options):
        """``make`` with its options bound, the registered defaults filling those not given:
        a ``strategy(loss_fn) -> f`` for :func:`jaxgrad.train.fit` (named as ``make`` is).

        Raises:
          TypeError: naming an option this strategy does not take, and the ones it does.
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(
                f"strategy `{self.name}` takes the options {sorted(self.options) or 'none'}; "
                f"got {unknown}"
            )
        options = {**self.options, **options}
        return functools.partial(self.make, **options) if options else self.make

    def build(self, loss_fn, **options):
        """``make(loss_fn, **options)`` with the registered defaults: the strategy's ``f``."""
        return self.factory(**options)(loss_fn)


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Adds ``strategy`` to the registry; the CLI, the benchmark and the tests then offer it.

    Raises:
      TypeError: ``strategy`` is not a :class:`Strategy`.
      ValueError: naming its names or aliases that are already registered.
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"`strategy` must be a jaxgrad.strategies.Strategy; got {strategy!r}")
    taken = {n for s in _REGISTRY.values() for n in (s.name, *s.aliases)}
    clash = sorted(taken & {strategy.name, *strategy.aliases})
    if clash:
        raise ValueError(f"`strategy` names {clash} are already registered")
    _REGISTRY[strategy.name] = strategy
    return strategy


def get(name: str) -> Strategy:
    """The registered strategy called ``name`` (or with ``name`` among its aliases).

    Raises:
      KeyError: naming ``name`` and every registered name.
    """
    for s in _REGISTRY.values():
        if name == s.name or name in s.aliases:
            return s
    raise KeyError(f"no gradient strategy named {name!r}; registered: {', '.join(_REGISTRY)}")


def names(*, exact: bool | None = None, per_example: bool | None = None) -> list[str]:
    """The registered names, in registration order, optionally only the (in)exact or the
    (not) per-example ones."""
    return [
        s.name
        for s in _REGISTRY.values()
        if (exact is None or s.exact == exact)
        and (per_example is None or s.per_example == per_example)
    ]


def all_strategies() -> Mapping[str, Strategy]:
    """Every registered strategy, ``{name: Strategy}``, read-only, in registration order."""
    return types.MappingProxyType(_REGISTRY)


def _backprop_mean_error(loss_fn):
    """:func:`jaxgrad.naive.backprop_mean_error` of a :func:`jaxgrad.losses.supervised` loss,
    which carries the model's ``apply`` and the per-output ``loss`` it averages the error of."""
    if not (callable(getattr(loss_fn, "apply", None)) and callable(getattr(loss_fn, "loss", None))):
        raise TypeError(
            "strategy `backprop_mean_error` needs the model and the output loss separately: "
            "a loss from jaxgrad.losses.supervised(apply, loss), or call "
            f"jaxgrad.naive.backprop_mean_error(apply_fn, output_loss); got {loss_fn!r}"[:300]
        )
    return naive.backprop_mean_error(loss_fn.apply, loss_fn.loss)


_backprop_mean_error.__name__ = "backprop_mean_error"

register(
    Strategy(
        "batch_grad",
        grads.batch_grad,
        exact=True,
        per_example=False,
        options={},
        variants={"batch_grad": {}},
        summary="grad of the global mean loss: one forward and one backward pass",
        aliases=("batch",),
    )
)
register(
    Strategy(
        "per_example_grads",
        grads.per_example_grads,
        exact=True,
        per_example=True,
        options={"chunk_size": None},
        variants={"per_example_grads": {}, "per_example_grads(chunk=32)": {"chunk_size": 32}},
        summary="every example's gradient, vmap(grad), with their norms",
    )
)
register(
    Strategy(
        "mean_of_per_example_grads",
        grads.mean_of_per_example_grads,
        exact=True,
        per_example=False,
        options={"chunk_size": None},
        variants={"mean_of_per_example_grads": {}},
        summary="the mean of the per-example gradients (materialised), with their norms",
        aliases=("per-example",),
    )
)
register(
    Strategy(
        "accumulate_grad",
        grads.accumulate_grad,
        exact=True,
        per_example=False,
        options={"num_microbatches": 4, "unroll": "auto"},
        variants={
            "accumulate_grad(4 micro)": {"num_microbatches": 4},
            # jaxgrad._loops' policy (above), the plain scan (its convolutions canonical:
            # _loops.canonical_convolutions) and JAX's own unrolling side by side.
            "accumulate_grad(4 scanned)": {"num_microbatches": 4, "unroll": False},
            "accumulate_grad(4 unrolled)": {"num_microbatches": 4, "unroll": 4},
        },
        summary="(sum, count) accumulated over microbatches (jaxgrad._loops' policy), divided once",
        aliases=("accumulate",),
    )
)
register(
    Strategy(
        "grad_at_mean_input",
        naive.grad_at_mean_input,
        exact=False,
        per_example=False,
        options={},
        variants={"grad_at_mean_input": {}},
        summary="the gradient at the mean example (equal when the loss is linear in the data)",
    )
)
register(
    Strategy(
        "backprop_mean_error",
        _backprop_mean_error,
        exact=False,
        per_example=False,
        options={},
        variants={"backprop_mean_error": {}},
        summary="the batch-mean output error backpropagated (needs a losses.supervised loss)",
    )
)
register(
    Strategy(
        "mean_of_microbatch_means",
        naive.mean_of_microbatch_means,
        exact=False,
        per_example=False,
        options={"num_microbatches": 4},
        variants={"mean_of_microbatch_means": {}},
        summary="the mean of microbatch mean-loss gradients (equal when the counts are equal)",
    )
)
