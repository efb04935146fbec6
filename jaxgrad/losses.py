"""Per-example losses on one prediction and one target, and :func:`supervised` to bind a model.

Each loss maps ONE example's prediction and target to a scalar, or, for
:func:`token_cross_entropy`, to a ``(loss_sum, n_real_tokens)`` pair that the reducers in
:mod:`jaxgrad.reduce` divide once by the global count.

Labels outside ``[0, num_classes)`` make the integer-label losses return NaN rather than a
silently wrong number; :func:`supervised` with ``num_classes`` also rejects them before any
computation with an error naming the label.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrad import reduce

PyTree = Any


def _check_same_shape(prediction, target, *, loss: str) -> None:
    """Elementwise losses pair prediction and target entry by entry: their shapes must match
    (or both hold one number), since broadcasting ``(3,)`` against ``(3, 1)`` would silently
    compare every entry with every other."""
    p, t = jnp.shape(prediction), jnp.shape(target)
    if p != t and not (math.prod(p) == 1 and math.prod(t) == 1):
        raise ValueError(
            f"{loss}: one example's prediction and target must have the same shape; got "
            f"prediction {p} and target {t}. Reshape the targets so that one example's target "
            f"has the model's output shape {p}"
        )


def squared_error(prediction, target):
    """``Σ (prediction − target)²`` over the output's elements (a scalar output: ``(ŷ − y)²``).

    ``prediction`` and ``target`` must have the same shape (or both hold one number).
    """
    _check_same_shape(prediction, target, loss="squared_error")
    return jnp.sum((jnp.ravel(prediction) - jnp.ravel(target)) ** 2)


def linear_error(prediction, target):
    """The seed's linear error ``y − f(x)``: linear in the prediction (and in ``θ`` for ``θ x``)."""
    _check_same_shape(prediction, target, loss="linear_error")
    return jnp.sum(jnp.ravel(target) - jnp.ravel(prediction))


def _checked(loss, label, num_classes):
    # NaN in the gradient as well as the value: ``where(valid, loss, nan)`` would zero the
    # bad label's gradient, silently dropping the example from the batch gradient.
    valid = (label >= 0) & (label < num_classes)
    return loss * jnp.where(valid, 1, jnp.nan).astype(loss.dtype)


def softmax_cross_entropy(logits, label):
    """``−log softmax(logits)[label]`` for an integer ``label``; NaN if out of range."""
    label = jnp.asarray(label)
    if label.shape != logits.shape[:-1]:
        raise ValueError(
            f"softmax_cross_entropy: one example's integer label must have shape "
            f"{logits.shape[:-1]} for logits of shape {logits.shape}; got a label of shape "
            f"{label.shape} (labels of shape (B, 1)? use y.reshape(-1) or y[:, 0])"
        )
    if not (jnp.issubdtype(label.dtype, jnp.integer) or label.dtype == jnp.bool_):
        raise TypeError(
            f"softmax_cross_entropy: the label must be an integer class index; got dtype "
            f"{label.dtype} (one-hot or soft labels? use optax.losses.softmax_cross_entropy)"
        )
    num_classes = logits.shape[-1]
    safe = jnp.clip(label, 0, num_classes - 1)
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, safe)
    return _checked(loss, label, num_classes)


def binary_cross_entropy(logit, label):
    """Binary cross-entropy from one logit and a label in ``{0, 1}`` (floats in [0, 1] allowed).

    A label outside ``[0, 1]`` gives NaN (value and gradient), never a finite wrong number.
    """
    label = jnp.asarray(label)
    _check_same_shape(logit, label, loss="binary_cross_entropy")
    logit, label = jnp.ravel(logit), jnp.ravel(label)
    loss = jnp.sum(optax.losses.sigmoid_binary_cross_entropy(logit, label.astype(logit.dtype)))
    valid = jnp.all((label >= 0) & (label <= 1))
    return loss * jnp.where(valid, 1, jnp.nan).astype(loss.dtype)


def token_cross_entropy(logits, targets, *, pad_id: int = 0):
    """Token-level cross-entropy over one padded sequence: ``(Σ_real CE_t, n_real_tokens)``.

    Args:
      logits: ``(T, C)`` per-token logits.
      targets: ``(T,)`` int targets; positions equal to ``pad_id`` are padding and count for
        nothing.
      pad_id: the padding id.

    Returns:
      ``(loss_sum, n_real_tokens)``, both scalars.
    """
    targets = jnp.asarray(targets)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_cross_entropy: `targets` must have shape {logits.shape[:-1]} for logits of "
            f"shape {logits.shape}; got {targets.shape}"
        )
    real = targets != pad_id
    # Padding positions get label 0, so a pad_id outside the classes (e.g. -1) is not NaN.
    per_token = jax.vmap(softmax_cross_entropy)(logits, jnp.where(real, targets, 0))
    return jnp.sum(jnp.where(real, per_token, 0)), jnp.sum(real).astype(
        reduce.count_dtype(logits.dtype)
    )


def check_labels(labels, num_classes: int, *, name: str = "labels", allow_binary_floats=True):
    """Raises if class labels are of the wrong kind or out of range; the one label check.

    Integer labels must lie in ``[0, num_classes)``; float labels are allowed only for two
    classes (binary cross-entropy, with ``allow_binary_floats``) and must lie in ``[0, 1]``.

    Raises:
      TypeError: labels of another dtype. ValueError: naming how many are out of range (below
      and above it) and the first such row; never a label's value (labels are private data,
      and messages end up in logs).
    """
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        low, high, closed = 0, num_classes, False
    elif allow_binary_floats and np.issubdtype(labels.dtype, np.floating) and num_classes == 2:
        low, high, closed = 0.0, 1.0, True
    else:
        floats = " (or floats in [0, 1] for 2 classes)" if allow_binary_floats else ""
        raise TypeError(
            f"{name} must be integers{floats}; got dtype {labels.dtype} with "
            f"num_classes={num_classes}"
        )
    bad = ~((labels >= low) & ((labels <= high) if closed else (labels < high)))
    if bad.any():
        interval = f"[{low}, {high}]" if closed else f"[{low}, {high})"
        # the row in the batch the user passed, also for a piece of it (reduce.batch_rows)
        row = reduce.batch_row(int(np.flatnonzero(bad.reshape(len(labels), -1).any(axis=1))[0]))
        below = int(np.sum(labels < low))
        raise ValueError(
            f"{name} must lie in {interval}; got {int(bad.sum())} outside it ({below} below, "
            f"{int(bad.sum()) - below} above or NaN; the first in row {row})"
        )


class supervised:
    """Binds a model to a loss: ``loss_fn(params, (x, y)) = loss(apply(params, x), y)``.

    Args:
      apply: ``apply(params, x) -> prediction`` for one example.
      loss: one of this module's losses, or any ``loss(prediction, target)``.
      num_classes: if given, integer labels must lie in ``[0, num_classes)``; the strategies
        call :meth:`validate` on every concrete batch, so a bad label fails with an error
        naming it instead of producing NaN or a wrong gradient.

    Example::

      >>> import jax, jax.numpy as jnp, jaxgrad
      >>> model = jaxgrad.models.mlp([4, 8, 3])
      >>> loss_fn = jaxgrad.losses.supervised(
      ...     model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3)
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 1, 0]))
      >>> grads = jaxgrad.batch_grad(loss_fn)(model.init(jax.random.key(0)), batch).grads
    """

    def __init__(self, apply, loss, *, num_classes: int | None = None):
        if num_classes is not None:
            num_classes = reduce.check_positive_int(num_classes, name="num_classes")
        self.apply, self.loss, self.num_classes = apply, loss, num_classes

    def __call__(self, params, example):
        x, y = example
        prediction = self.apply(params, x)
        if self.num_classes is not None:
            self._check_scores(jnp.shape(prediction))
        return self.loss(prediction, y)

    def _check_scores(self, shape) -> None:
        """The prediction's last axis must hold ``num_classes`` class scores (or one logit for
        2 classes): the labels are checked against ``num_classes``, so a model with fewer
        outputs would be indexed past its logits (a NaN loss, or, under privacy's
        ``nonfinite="drop"``, those examples silently dropped from every step)."""
        k = self.num_classes
        if (shape and shape[-1] == k) or (k == 2 and (not shape or shape[-1] == 1)):
            return
        raise ValueError(
            f"supervised(num_classes={k}): the model's prediction for one example has shape "
            f"{shape}; its last axis must hold the {k} class scores"
            + (" (or one logit, for 2 classes)" if k == 2 else "")
            + ": pass num_classes equal to the model's number of outputs, or build the model "
            f"with {k} outputs"
        )

    def validate(self, batch, mask=None) -> None:
        """Raises if a real (unmasked) example's label is out of range or of the wrong kind.

        Integer labels must lie in ``[0, num_classes)``; float labels are allowed only for two
        classes (binary cross-entropy) and must lie in ``[0, 1]``. Padded rows (``mask``
        False) are not checked, so they may carry an ignore label such as -100.
        """
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"`batch` must be a pair (inputs, targets); got {type(batch).__name__}")
        if self.num_classes is None:
            return
        labels, kept = np.asarray(batch[1]), None
        if mask is not None:
            kept = np.flatnonzero(np.asarray(mask, bool))
            labels = labels[kept]
        with reduce.batch_rows(kept):  # the first bad one's row in `batch`, not among the kept
            check_labels(labels, self.num_classes, name="labels (`batch[1]`)")

    def __repr__(self):
        name = getattr(self.loss, "__name__", repr(self.loss))
        return f"supervised({getattr(self.apply, '__qualname__', self.apply)}, {name})"
