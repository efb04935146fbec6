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

from jaxgrad import _loops, reduce

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
      task: ``"classification"`` (accuracy) or ``"regression"`` (R²; with several outputs the
        pooled ``1 − Σ‖y_i − ŷ_i‖² / Σ‖y_i − ȳ‖²``; NaN when the targets have no spread,
        e.g. a split of one example, where R² is undefined).
      chunk_size: examples evaluated at a time (``lax.map``), bounding memory on big splits.

    Returns:
      ``evaluate(params)``, returning Python floats.
    """
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}; got {task!r}")
    chunk_size = reduce.check_positive_int(chunk_size, name="chunk_size")

    @_loops.jit
    def measure(params, x, y):
        def one(example):
            ex_x, ex_y = example
            loss_sum, count = reduce.as_sum_count(loss_fn(params, (ex_x, ex_y)))
            pred = apply(params, ex_x)
            if task == "classification":
                label = jnp.argmax(pred) if jnp.ndim(pred) else (pred > 0).astype(jnp.int32)
                score = (label == ex_y).astype(loss_sum.dtype)
            else:
                if jnp.size(pred) != jnp.size(ex_y):
                    raise ValueError(
                        f"`apply` gives a prediction of shape {jnp.shape(pred)} for a target of "
                        f"shape {jnp.shape(ex_y)}; R² needs one prediction per target value"
                    )
                score = jnp.reshape(pred, jnp.shape(ex_y)).astype(loss_sum.dtype)
            return loss_sum, count, score

        n = x.shape[0]
        sums, counts, scores = jax.lax.map(one, (x, y), batch_size=min(chunk_size, n))
        out = {"loss": jnp.sum(sums) / jnp.sum(counts)}
        if task == "classification":
            out["accuracy"] = jnp.mean(scores)
        else:
            # Several outputs: pooled, Σ over examples and outputs of the squared errors
            # against Σ of the squared deviations from each output's mean.
            target = y.astype(scores.dtype)
            total = jnp.sum((target - jnp.mean(target, axis=0)) ** 2)
            residual = jnp.sum((target - scores) ** 2)
            # Targets with no spread (one example, or all equal) leave R² undefined: NaN.
            out["r2"] = jnp.where(total > 0, 1 - residual / jnp.where(total > 0, total, 1), jnp.nan)
        return out

    splits = {name: tuple(jnp.asarray(a) for a in batch) for name, batch in splits.items()}

    def evaluate(params) -> dict[str, float]:
        result = {}
        for name, (x, y) in splits.items():
            for metric, value in measure(params, x, y).items():
                result[f"{name}_{metric}"] = float(value)
        return result

    return evaluate
