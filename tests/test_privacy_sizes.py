"""Several physical batch sizes for the sampled DP step: the expected padding, the chosen
sizes, and the step's result (the same sum as with one size)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import private_key

import jaxgrad
from jaxgrad import privacy


def _binomial_rows(n, q, sizes):
    """E[rows] / qN under the exact Binomial(N, q) pmf (log-gamma), rows as the docstring."""
    b = np.arange(n + 1)
    logpmf = np.array(
        [
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + (k * math.log(q) if k else 0.0)
            + ((n - k) * math.log1p(-q) if n - k else 0.0)
            for k in b
        ]
    )
    top = sizes[-1]
    rows = np.where(
        b <= top,
        np.array([next(s for s in sizes if s >= k) if k <= top else 0 for k in b]),
        top * -(-b // top),
    )
    return float(np.sum(np.exp(logpmf) * rows)) / (n * q)


@pytest.mark.parametrize(
    ("n", "q", "sizes"), [(60000, 256 / 60000, (287,)), (4000, 0.05, (190, 200, 230))]
)
def test_expected_rows_matches_the_exact_binomial_expectation(n, q, sizes):
    got = privacy.expected_rows(num_examples=n, sampling_rate=q, physical_batch_size=sizes)
    assert got == pytest.approx(_binomial_rows(n, q, sizes), rel=5e-3)


def test_physical_batch_sizes_are_the_best_pair_and_one_size_is_the_default():
    n, q = 400, 0.1  # qN = 40, σ = 6: every smaller size searched by brute force
    assert privacy.physical_batch_sizes(num_examples=n, sampling_rate=q, count=1) == (
        privacy.default_physical_batch_size(num_examples=n, sampling_rate=q),
    )
    rows = lambda s: privacy.expected_rows(num_examples=n, sampling_rate=q, physical_batch_size=s)
    pair = privacy.physical_batch_sizes(num_examples=n, sampling_rate=q, count=2)
    p = privacy.default_physical_batch_size(num_examples=n, sampling_rate=q)
    assert pair[-1] == p  # the largest is the one default size: the memory bound kept
    best = min(rows((s, p)) for s in range(1, p))
    assert rows(pair) == pytest.approx(best, rel=1e-9)
    assert rows(pair) < rows(privacy.default_physical_batch_size(num_examples=n, sampling_rate=q))


def test_sampled_dp_grad_with_sizes_is_the_one_size_step():
    """Same key, same draw and noise: only the rows run differ (float64, order of the sum)."""
    model = jaxgrad.models.mlp([3, 4, 2], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=2
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 3))
    data, params = (x, (x[:, 0] > 0).astype(np.int32)), model.init(jax.random.key(0))
    kw = dict(l2_clip=0.5, noise_multiplier=0.7, sampling_rate=0.15, return_info=True)
    one = privacy.sampled_dp_grad(loss_fn, physical_batch_size=7, **kw)
    several = privacy.sampled_dp_grad(loss_fn, physical_batch_size=(5, 7), **kw)
    counts, drawn = set(), set()
    # Draws of ~9 (σ ≈ 2.8): keys until both sizes and the loop past the largest have run (a
    # draw of at most 5 has probability ~0.12, so 100 keys all miss it with probability 3e-6).
    for r in range(100):
        if r >= 12 and max(counts) > 1 and min(drawn) <= 5:
            break
        key = private_key(r)
        (g1, i1), (g2, i2) = one(params, data, key), several(params, data, key)
        assert tuple(map(int, i1)) == tuple(map(int, i2))
        counts.add(int(i1.num_physical_batches))
        drawn.add(int(i1.num_examples))
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert max(counts) > 1 and min(drawn) <= 5, (counts, drawn)  # both branches, the loop


@pytest.mark.parametrize("bad", [(5, 5), (8, 4), (), (0, 3)])
def test_bad_physical_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="physical_batch_size"):
        privacy.sampled_dp_grad(
            lambda w, x: jnp.dot(w, x),
            l2_clip=1.0,
            noise_multiplier=1.0,
            sampling_rate=0.1,
            physical_batch_size=bad,
        )


def test_a_physical_batch_larger_than_the_data_set_runs_its_n_rows():
    """P = 10⁹ for N = 8 asked XLA for 130 GB (out of memory); capped at N, the step is the one
    with P = N, bit for bit (same draw, noise and sum), and so is a sequence of sizes past N."""
    loss = lambda w, ex: jnp.sum((ex[0] @ w - ex[1]) ** 2)
    rng = np.random.default_rng(0)
    data, w = (rng.standard_normal((8, 3)), rng.standard_normal(8)), jnp.ones(3)
    kw = dict(l2_clip=0.7, noise_multiplier=1.3, sampling_rate=0.5, return_info=True)
    step = lambda p: privacy.sampled_dp_grad(loss, physical_batch_size=p, **kw)(
        w, data, private_key(5)
    )
    (g_n, info_n), (g_big, info_big) = step(8), step(10**9)
    np.testing.assert_array_equal(g_n, g_big)
    assert tuple(map(int, info_n)) == tuple(map(int, info_big))
    g_sizes, _ = step((2, 5, 10**9))
    np.testing.assert_allclose(g_sizes, g_n, rtol=1e-13)
    assert privacy.sampling.cap_sizes((2, 5, 10**9), 8) == (2, 5, 8)
