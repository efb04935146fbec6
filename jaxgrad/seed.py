"""The seed question, reproduced: ``python -m jaxgrad.seed [--json PATH]``.

"In SGD, do I backpropagate the batch's average error, or every example's error and average
the gradients?" Every number below is computed in float64 by jaxgrad's own strategies and
checked against a closed form where one exists.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import check, closed_form, grads, losses, models, naive
from jaxgrad._cli import check_writable


def _sigmoid() -> dict:
    # l(θ; x) = σ(θ + x) at θ = 0: the gradient for example x is σ'(x).
    loss = lambda theta, x: jax.nn.sigmoid(theta + x)
    xs, theta = jnp.array([0.0, 1.0]), jnp.zeros(())
    return {
        "sigmoid.mean_of_grads": float(grads.mean_of_per_example_grads(loss)(theta, xs).grads),
        "sigmoid.grad_at_mean": float(naive.grad_at_mean_input(loss)(theta, xs).grads),
    }


def _line_fit(key) -> dict:
    kx, kn = jax.random.split(key)
    x = jax.random.uniform(kx, (64,), jnp.float64, -2.0, 2.0)
    y = 3.0 * x - 1.0 + 0.1 * jax.random.normal(kn, (64,), jnp.float64)
    params = {"m": jnp.asarray(0.5), "b": jnp.asarray(0.25)}
    loss_fn = losses.supervised(models.line_fit().apply, losses.squared_error)
    by_hand = closed_form.line_fit_grad(params, x, y)
    table = check.compare(
        {
            "closed_form": lambda p, b: by_hand,
            "grad_of_mean": grads.batch_grad(loss_fn),
            "mean_of_grads": grads.mean_of_per_example_grads(loss_fn),
        },
        params,
        (x, y),
    )
    return {"line_fit.max_abs_diff": max(row.max_abs_diff for row in table.rows)}


def _linear_loss(key) -> dict:
    # J(θ) = (1/N) Σ (y_i − θ x_i): its gradient is −mean(x) whatever θ is.
    x = jax.random.normal(key, (32,), jnp.float64)
    y = 2.0 * x
    loss_fn = losses.supervised(lambda theta, x: theta * x, losses.linear_error)
    f = grads.batch_grad(loss_fn)
    at_thetas = np.array([float(f(jnp.asarray(t), (x, y)).grads) for t in (-3.0, 0.0, 0.5, 7.0)])
    spread = float(at_thetas.max() - at_thetas.min())
    return {
        "linear_loss.grad": float(at_thetas[0]),
        "linear_loss.minus_mean_x": float(closed_form.linear_loss_grad(x)),
        "linear_loss.grad_spread_over_theta": spread,
        "linear_loss.grad_varies_with_theta": bool(spread > 1e-12),
    }


def _backprop_mean_error(key) -> dict:
    k_model, k_x, k_y, k_dense = jax.random.split(key, 4)
    model = models.mlp([4, 16, 16, 3], activation="sigmoid", dtype=jnp.float64)
    params = model.init(k_model)
    x = jax.random.normal(k_x, (32, 4), jnp.float64)
    y = jax.random.randint(k_y, (32,), 0, 3)
    loss = losses.softmax_cross_entropy
    exact = grads.batch_grad(losses.supervised(model.apply, loss))(params, (x, y)).grads
    mean_error = naive.backprop_mean_error(model.apply, loss)(params, (x, y)).grads

    # One dense layer s = a W + b: the naive error is exactly the cross-covariance.
    dense = models.logistic_regression(4, num_classes=3, dtype=jnp.float64)
    w = jax.random.normal(k_dense, (4, 3), jnp.float64)
    dense_params = {"w": w, "b": jnp.zeros(3)}
    dense_exact = grads.batch_grad(losses.supervised(dense.apply, loss))(dense_params, (x, y))
    dense_exact = dense_exact.grads
    dense_naive = naive.backprop_mean_error(dense.apply, loss)(dense_params, (x, y)).grads
    errors = jax.vmap(jax.grad(loss))(jax.vmap(dense.apply, (None, 0))(dense_params, x), y)
    formula = closed_form.dense_cross_covariance(x, errors)
    return {
        "mlp.backprop_mean_error_rel_err": check.relative_error(mean_error, exact),
        "dense.cross_covariance_max_abs_diff": float(
            jnp.max(jnp.abs((dense_exact["w"] - dense_naive["w"]) - formula))
        ),
    }


def _accumulation(key) -> dict:
    # Sequences of very different lengths: microbatches hold unequal numbers of real tokens.
    k_model, k_tokens = jax.random.split(key)
    vocab, max_len, n = 16, 12, 8
    model = models.transformer(vocab_size=vocab, max_len=max_len, dtype=jnp.float64)
    params = model.init(k_model)
    tokens = jax.random.randint(k_tokens, (n, max_len), 1, vocab)
    lengths = jnp.array([12, 11, 10, 12, 2, 3, 1, 2])
    tokens = jnp.where(jnp.arange(max_len)[None] < lengths[:, None], tokens, 0)
    batch = (tokens, tokens)  # predict each token (a tagging task): targets = tokens
    loss_fn = losses.supervised(model.apply, losses.token_cross_entropy)
    exact = grads.batch_grad(loss_fn)(params, batch).grads
    accumulated = grads.accumulate_grad(loss_fn, num_microbatches=2)(params, batch).grads
    mean_of_means = naive.mean_of_microbatch_means(loss_fn, num_microbatches=2)
    mean_of_means = mean_of_means(params, batch).grads
    return {
        "accumulation.exact_max_abs_diff": check.tree_diff(accumulated, exact)[0],
        "accumulation.mean_of_means_rel_err": check.relative_error(mean_of_means, exact),
    }


def seed_results(*, seed: int = 0) -> dict:
    """Every number of the seed answer, as a flat ``{"group.name": value}`` dict (float64)."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(seed), 4)
        return {
            **_sigmoid(),
            **_line_fit(keys[0]),
            **_linear_loss(keys[1]),
            **_backprop_mean_error(keys[2]),
            **_accumulation(keys[3]),
        }


_EXPLANATIONS = {
    "sigmoid.mean_of_grads": "mean of σ'(0), σ'(1): the true average gradient",
    "sigmoid.grad_at_mean": "σ'(0.5): the gradient at the mean input (wrong)",
    "line_fit.max_abs_diff": "closed form vs grad of mean vs mean of grads",
    "linear_loss.grad": "gradient of (1/N) Σ (y − θx)",
    "linear_loss.minus_mean_x": "−mean(x), the closed form",
    "linear_loss.grad_spread_over_theta": "max − min of the gradient over θ ∈ {−3, 0, 0.5, 7}",
    "linear_loss.grad_varies_with_theta": "a linear loss has a constant gradient",
    "mlp.backprop_mean_error_rel_err": "averaged error backpropagated through a sigmoid MLP, "
    "‖naive − exact‖ / ‖exact‖",
    "dense.cross_covariance_max_abs_diff": "naive error of one dense layer vs (1/N)Σ(a−ā)(g−ḡ)ᵀ",
    "accumulation.exact_max_abs_diff": "accumulate_grad vs batch_grad, unequal token counts",
    "accumulation.mean_of_means_rel_err": "mean of the means of 2 microbatches (45, 8 real "
    "tokens) vs batch_grad",
}


def format_results(results: dict) -> str:
    """The results as an aligned two-column table with a one-line explanation each."""
    width = max(map(len, results))
    lines = []
    for name, value in results.items():
        shown = str(value).lower() if isinstance(value, bool) else f"{value: .6g}"
        lines.append(f"{name:<{width}}  {shown:>13}   {_EXPLANATIONS.get(name, '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxgrad.seed",
        description="Reproduce the seed answer: mean of gradients vs gradient of the mean.",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for the random data")
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**63:  # a 64-bit key seed (the run is in float64, x64 on)
        parser.error(f"--seed must be an integer in [0, 2**63 - 1]; got {args.seed}")
    check_writable("--json", args.json, parser)
    results = seed_results(seed=args.seed)
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
