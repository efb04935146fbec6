"""Closed-form gradients from the seed question: independent references for the strategies.

These are written out by hand, not derived with ``jax.grad``, so tests and
``python -m jaxgrad.seed`` can check automatic differentiation against them.
"""

from __future__ import annotations

import jax.numpy as jnp


def line_fit_grad(params, x, y):
    """Gradient of the line fit's mean squared error ``J = (1/N) Σ (y_i − (m x_i + b))²``.

    .. math::

        \\frac{\\partial J}{\\partial m} = -\\frac2N \\sum_i x_i (y_i - f(x_i)), \\qquad
        \\frac{\\partial J}{\\partial b} = -\\frac2N \\sum_i (y_i - f(x_i))

    Args:
      params: ``{"m": scalar, "b": scalar}`` as made by :func:`jaxgrad.models.line_fit`.
      x: inputs, shape ``(N,)``.
      y: targets, shape ``(N,)``.

    Returns:
      ``{"m": ∂J/∂m, "b": ∂J/∂b}``.
    """
    residual = y - (params["m"] * x + params["b"])
    n = x.shape[0]
    return {"m": -2.0 / n * jnp.sum(x * residual), "b": -2.0 / n * jnp.sum(residual)}


def linear_loss_grad(x):
    """Gradient of the seed's linear loss ``J(θ) = (1/N) Σ (y_i − θ x_i)``: ``−(1/N) Σ x_i``.

    It does not depend on ``θ`` (or ``y``): the loss is linear in ``θ``.
    """
    return -jnp.mean(x)


def dense_cross_covariance(activations, errors):
    """The error of backpropagating the mean error through one dense layer ``s = a W``.

    For per-example layer inputs ``a_i`` and output errors ``g_i = ∂l_i/∂s_i`` the true
    gradient is ``(1/N) Σ a_i g_iᵀ`` and the naive one ``ā ḡᵀ``; their difference is

    .. math::

        \\frac1N \\sum_i (a_i - \\bar a)(g_i - \\bar g)^T

    Args:
      activations: ``(N, d_in)`` layer inputs.
      errors: ``(N, d_out)`` output errors.

    Returns:
      ``(d_in, d_out)``: true minus naive gradient of ``W``.
    """
    a = activations - activations.mean(0)
    g = errors - errors.mean(0)
    return a.T @ g / activations.shape[0]
