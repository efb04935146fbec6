"""Gradient statistics against numpy on the materialised per-example gradients."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import assert_rel_close, case, flat, materialised

import jaxgrad
from jaxgrad.fast import grad_stats, per_example_moments


def numpy_stats(g):
    b = g.shape[0]
    mean = g.mean(axis=0)
    trace_cov = np.sum(np.var(g, axis=0, ddof=1))
    grad_sq = mean @ mean - trace_cov / b
    return mean, trace_cov, grad_sq


@pytest.mark.parametrize(
    ("name", "method"), [("mlp", "auto"), ("mlp", "vmap"), ("cnn", "auto"), ("tied", "auto")]
)
def test_grad_stats_match_numpy(name, method):
    loss, params, batch = case(name)
    g = materialised(name)
    mask = np.ones(g.shape[0], bool)
    mask[-1] = False
    stats = grad_stats(loss, method=method)(params, batch, jnp.asarray(mask))
    real = g[mask]
    mean, trace_cov, grad_sq = numpy_stats(real)
    assert_rel_close(stats.trace_cov, trace_cov)
    assert_rel_close(stats.grad_sq_norm, grad_sq)
    assert_rel_close(stats.noise_scale, trace_cov / grad_sq)
    assert_rel_close(stats.snr, grad_sq * real.shape[0] / trace_cov)
    assert_rel_close(stats.norms, np.linalg.norm(g, axis=1) * mask)
    assert float(stats.num_examples) == mask.sum()
    batch_mean = jaxgrad.batch_grad(loss)(params, batch, jnp.asarray(mask)).grads
    assert_rel_close(flat(stats.mean), flat(batch_mean))
    if name in ("mlp", "cnn", "plain"):  # one item per example: mean gradient is ḡ
        assert_rel_close(flat(stats.mean), mean)


def test_single_example_gives_nan_covariance():
    loss, params, batch = case("mlp")
    mask = jnp.zeros(7, bool).at[0].set(True)
    stats = grad_stats(loss)(params, batch, mask)
    assert np.isnan(stats.trace_cov) and np.isnan(stats.noise_scale)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_per_example_moments(chunk_size):
    loss, params, batch = case("mlp")
    g = materialised("mlp")
    mask = np.array([True, False, True, True, True, True, False])
    m = per_example_moments(loss, chunk_size=chunk_size)(params, batch, jnp.asarray(mask))
    assert_rel_close(flat(m.grad_sum), g[mask].sum(axis=0))
    assert_rel_close(flat(m.grad_sq_sum), (g[mask] ** 2).sum(axis=0))
    assert_rel_close(m.norms, np.linalg.norm(g, axis=1) * mask)
    assert float(m.count) == mask.sum()
