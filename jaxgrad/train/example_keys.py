"""Randomness inside the loss (dropout) for :func:`jaxgrad.train.fit`: one key per example.

With ``fit(..., loss_key=L)`` the loss is called as ``loss_fn(params, example, key)`` with

.. math::

    \\text{key}_{t,i} = \\mathrm{fold\\_in}(\\mathrm{fold\\_in}(\\mathrm{fold\\_in}(L,
    \\lambda), t), i), \\qquad \\lambda = \\texttt{0x6C6F7373}

for the example at row ``i`` of the training set at step ``t`` (:mod:`jaxgrad.keys`; ``λ``
keeps them apart from a private run's DP keys even when ``L`` derives from its ``key``): a
different key for every example and step, a function of ``(L, t, i)`` only — not of the
batch it lands in, its place there, the devices or the processes — so every strategy
(per-example gradients and clipping included) sees each example's own randomness, a mesh run
draws the same masks as one device, and a resumed run the same as an uninterrupted one.

The training set travels with its row numbers, ``(data, rows)``. The plain step turns a
batch's row numbers into keys (:func:`jaxgrad.keys.row_keys`) and :func:`keyed_loss` hands
each example its key; the DP-SGD step, which gathers its rows inside
:func:`jaxgrad.privacy.sampled_dp_grad`, passes the step's loss key
(:func:`jaxgrad.keys.loss_step_key`) as an extra loss argument and :func:`row_keyed_loss`
folds each example's row into it.
"""

from __future__ import annotations

import inspect

import numpy as np

from jaxgrad import keys, reduce


def _takes(fn, count: int) -> bool | None:
    """Whether ``fn`` accepts ``count`` positional arguments (None: its signature is unknown)."""
    try:
        inspect.signature(fn).bind(*([None] * count))
    except TypeError:
        return False
    except ValueError:
        return None
    return True


def check_loss_fn(loss_fn, loss_key):
    """``loss_key``, checked, or None; refuses a loss whose arity does not match it.

    Raises:
      TypeError: ``loss_key`` not one PRNG key; ``loss_key`` given to a loss that takes no key
        argument, or a loss that needs a key with no ``loss_key``.
    """
    if loss_key is None:
        if _takes(loss_fn, 2) is False and _takes(loss_fn, 3):
            raise TypeError(
                "`loss_fn` takes a third argument (a key, e.g. for dropout); pass `loss_key` "
                "(e.g. loss_key=jax.random.key(1)) and fit calls loss_fn(params, example, key) "
                "with a different key for every example and step"
            )
        return None
    loss_key = keys.check_key(loss_key, name="loss_key")
    if _takes(loss_fn, 3) is False:
        raise TypeError(
            "`loss_key` is given, so `loss_fn` is called as loss_fn(params, example, key); got "
            f"a loss_fn with signature {inspect.signature(loss_fn)}, which takes no key"
        )
    return loss_key


def with_rows(data):
    """``(data, rows)``: the training set with each example's row number (int32)."""
    n = reduce.batch_size(data, name="train_data")
    if n >= 2**31:
        raise ValueError(f"`train_data` has {n} examples; loss_key supports fewer than 2**31")
    return data, np.arange(n, dtype=np.int32)


def keyed_loss(loss_fn):
    """``loss(params, (example, key)) = loss_fn(params, example, key)``, keeping ``validate``."""

    def loss(params, example_and_key):
        example, key = example_and_key
        return loss_fn(params, example, key)

    return _validating_first(loss, loss_fn)


def row_keyed_loss(loss_fn):
    """``loss(params, (example, row), step_key) = loss_fn(params, example, fold_in(step_key,
    row))``, keeping ``validate``: the keys of :func:`jaxgrad.keys.row_keys`, given the step's
    loss key (:func:`jaxgrad.keys.loss_step_key`)."""

    def loss(params, example_and_row, step_key):
        example, row = example_and_row
        return loss_fn(params, example, keys.row_key(step_key, row))

    return _validating_first(loss, loss_fn)


def _validating_first(loss, loss_fn):
    """``loss`` with ``loss_fn``'s ``validate`` (if any) applied to a batch's first part, the
    bare data of a ``(data, keys or rows)`` batch."""
    validate = getattr(loss_fn, "validate", None)
    if validate is not None:
        loss.validate = lambda batch, mask=None: validate(batch[0], mask)
    return loss


def row_check(check):
    """A row check of the bare data (:func:`jaxgrad.train.arguments.validate_data`) for
    ``(data, rows)`` batches; None stays None."""
    if check is None:
        return None
    return lambda rows, mask: check(rows[0], mask)
