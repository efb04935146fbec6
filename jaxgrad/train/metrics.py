"""Evaluation metrics over whole data splits, jit-compiled: loss, accuracy, R².

.. math::

    \\mathrm{accuracy} = \\frac{1}{N} \\sum_i [\\hat y_i = y_i], \\qquad
    R^2 = 1 - \\frac{\\sum_i (y_i - \\hat y_i)^2}{\\sum_i (y_i - \\bar y)^2}

A scalar output is a binary logit (class 1 where it is positive) for classification and
the prediction for regression; a vector output is a row of class logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxgrad import reduce

TASKS = ("classification", "regression")


def evaluator(
    apply: Callable,
    loss_fn: Callable,
    splits: Mapping[str, tuple],
    *,
    task: str,
    chunk_size: int = 1024,
) -> Callable[..., dict[str, float]]:
    """``evaluate(params) -> {"<split>_loss", "<split>_accuracy" | "<split>_r2", ...}``.

    Args:
      apply: ``apply(params, x) -> prediction`` on one example.
      loss_fn: ``loss_fn(params, (x, y))``, as trained; its mean over the split is reported.
      splits: named batches ``(x, y)``, e.g. ``{"train": ds.train, "test": ds.test}``.
      task: ``"classification"`` (accuracy) or ``"regression"`` (R²).
      chunk_size: examples evaluated at a time (``lax.map``), bounding memory on big splits.

    Returns:
      ``evaluate(params)``, returning Python floats.
    """
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}; got {task!r}")

    @jax.jit
    def measure(params, x, y):
        def one(example):
            ex_x, ex_y = example
            loss_sum, count = reduce.as_sum_count(loss_fn(params, (ex_x, ex_y)))
            pred = apply(params, ex_x)
            if task == "classification":
                label = jnp.argmax(pred) if jnp.ndim(pred) else (pred > 0).astype(jnp.int32)
                score = (label == ex_y).astype(loss_sum.dtype)
            else:
                score = jnp.sum(pred).astype(loss_sum.dtype)
            return loss_sum, count, score

        n = x.shape[0]
        sums, counts, scores = jax.lax.map(one, (x, y), batch_size=min(chunk_size, n))
        out = {"loss": jnp.sum(sums) / jnp.sum(counts)}
        if task == "classification":
            out["accuracy"] = jnp.mean(scores)
        else:
            target = y.reshape(n).astype(scores.dtype)
            total = jnp.sum((target - jnp.mean(target)) ** 2)
            out["r2"] = 1 - jnp.sum((target - scores) ** 2) / total
        return out

    splits = {name: tuple(jnp.asarray(a) for a in batch) for name, batch in splits.items()}

    def evaluate(params) -> dict[str, float]:
        result = {}
        for name, (x, y) in splits.items():
            for metric, value in measure(params, x, y).items():
                result[f"{name}_{metric}"] = float(value)
        return result

    return evaluate
