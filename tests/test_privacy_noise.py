"""jaxgrad.privacy.gaussian: DP noise whose tails are not cut at float32's inverse-CDF limit.

References: ``scipy.special.ndtri`` / ``erfinv`` in float64 on the grid point each crafted bit
pattern stands for (computed in numpy from the integer), ``jax.extend.random.threefry2x32_p``
for the counters' words, and ``scipy.stats`` for the distribution. Statistical tests are
two-sided at a false-alarm rate of 1e-6 with fixed keys and seeds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import private_key
from jax.extend.random import threefry2x32_p
from scipy import special, stats

from jaxgrad import privacy
from jaxgrad.privacy import gaussian

ALPHA = 1e-6
TOP = np.uint64(2**63 - 1)


def _crafted(seed=0, n=20_000):
    """63-bit integers m with every count of leading zeros 0..62, and the extreme patterns."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(0, 63, n).astype(np.uint64)
    m = rng.integers(0, 2**63, n, dtype=np.uint64) >> shift
    m |= (np.uint64(1) << (np.uint64(62) - shift)) * (rng.random(n) < 0.5)  # the leading one
    extreme = np.array([0, 1, 2, 3, 2**32 - 1, 2**32, 2**62 - 1, 2**62, 2**63 - 2, 2**63 - 1])
    return np.concatenate([m, extreme.astype(np.uint64)])


def _words(m, sign):
    y0 = ((sign.astype(np.uint64) << np.uint64(31)) | (m >> np.uint64(32))).astype(np.uint32)
    return y0, (m & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _reference(m, sign):
    """(-1)^s Φ̄⁻¹((m + ½) 2⁻⁶⁴) in float64: ndtri in the tail, erfinv of 2(½ − u) at the centre."""
    u = (m.astype(np.float64) + 0.5) * 2.0**-64
    gap = ((TOP - m).astype(np.float64) + 0.5) * 2.0**-64  # ½ − u, without cancellation
    z = np.where(u > 0.25, np.sqrt(2) * special.erfinv(2 * gap), -special.ndtri(u))
    return np.where(sign == 1, -z, z)


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.float64, 1e-14)])
def test_quantile_map_matches_scipy_on_crafted_bit_patterns(dtype, rtol):
    """Max relative error over both tails, the extremes and the centre: measured 3.6e-7
    (float32) and 1.1e-15 (float64); bounds 1e-6 and 1e-14."""
    m = _crafted()
    sign = np.random.default_rng(1).integers(0, 2, m.size)
    y0, y1 = _words(m, sign)
    want = _reference(m, sign)
    assert np.all(want != 0) and np.abs(want).min() < 1e-15  # the centre is really probed
    got = np.asarray(jax.jit(lambda a, b: gaussian.normal_from_words(a, b, dtype))(y0, y1))
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=0)
    # Monotone in m on each side (a sorted grid maps to sorted quantiles, down to the last bit).
    order = np.argsort(m)
    for s in (0, 1):
        z = np.asarray(gaussian.normal_from_words(*_words(m[order], np.full(m.size, s)), dtype))
        assert np.all(np.diff(z) <= 0) if s == 0 else np.all(np.diff(z) >= 0)


def test_the_extreme_patterns_reach_beyond_8_and_the_documented_bound():
    """All 63 bits 0 gives ±Φ̄⁻¹(2⁻⁶⁵) = ±9.155; ``jax.random.normal``'s float32 values stop
    at √2 erf⁻¹(1 − 2⁻²⁴) = 5.42, so a test for |z| > 8 fails for the old sampler."""
    zero = np.zeros(2, np.uint32)
    for dtype in (jnp.float32, jnp.float64):
        y0 = zero | np.array([0, 2**31], np.uint32)
        z = np.asarray(gaussian.normal_from_words(y0, zero, dtype))
        np.testing.assert_allclose(z, [gaussian.MAX_ABS, -gaussian.MAX_ABS], rtol=1e-5)
    np.testing.assert_allclose(gaussian.MAX_ABS, -special.ndtri(2.0**-65), rtol=1e-5)
    assert gaussian.MAX_ABS > 8 > np.sqrt(2) * special.erfinv(1 - 2.0**-24)
    # The mass beyond the support, the documented residual per coordinate: 2⁻⁶⁴ ≈ 5.4e-20.
    np.testing.assert_allclose(2 * stats.norm.sf(gaussian.MAX_ABS), 2.0**-64, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_deep_tail_has_the_gaussian_conditional_distribution(dtype):
    """Words whose top 31 bits (after the sign) are 0: u is uniform on (0, 2⁻³²), so z is
    Z | Φ̄(Z) < 2⁻³² (|z| from 6.23 to 9.155), and Φ̄(z) 2³² must be uniform: KS at 1e-6."""
    y1 = np.random.default_rng(2).integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    for top, sign in ((0, 1.0), (2**31, -1.0)):
        y0 = np.full(y1.size, top, np.uint32)
        z = sign * np.asarray(gaussian.normal_from_words(y0, y1, dtype), np.float64)
        assert z.min() > 6.2
        assert stats.kstest(stats.norm.sf(z) * 2.0**32, "uniform").pvalue > ALPHA


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_sampler_is_standard_normal(dtype):
    """1M draws (float32 and float64): KS, and the rate of |z| > 4 (Poisson, ~63 expected)."""
    z = np.asarray(gaussian.normal(jax.random.key(0), (1_000_000,), dtype), np.float64)
    assert stats.kstest(z, "norm").pvalue > ALPHA
    lam = z.size * 2 * stats.norm.sf(4.0)
    count = int(np.sum(np.abs(z) > 4.0))
    assert (
        stats.poisson.cdf(count, lam) > ALPHA / 2 and stats.poisson.sf(count - 1, lam) > ALPHA / 2
    )


def test_threefry_and_other_keys_apply_the_same_map():
    """Threefry: counter j's two words (threefry2x32_p, across the 32-bit carry); rbg: the
    words of jax.random.bits(key, (2, n)). Both equal the numpy/scipy map of those words."""
    key = jax.random.key(5)
    k0, k1 = jax.random.key_data(key)
    j = np.arange(2**32 - 5, 2**32 + 6, dtype=np.uint64)
    y0, y1 = (
        np.asarray(w)
        for w in threefry2x32_p.bind(
            k0, k1, jnp.asarray((j >> 32).astype(np.uint32)), jnp.asarray(j.astype(np.uint32))
        )
    )
    m = ((y0.astype(np.uint64) & np.uint64(2**31 - 1)) << np.uint64(32)) | y1
    got = np.asarray(jax.jit(lambda k: gaussian.normal_at(k, 2**32 - 5, (11,), jnp.float64))(key))
    np.testing.assert_allclose(got, _reference(m, y0 >> 31), rtol=1e-14)
    np.testing.assert_allclose(  # (jit may fuse multiply-adds: the last bit can differ)
        got, gaussian.normal_from_words(jnp.asarray(y0), jnp.asarray(y1), jnp.float64), rtol=1e-15
    )
    rbg = jax.random.key(5, impl="rbg")
    y0, y1 = (np.asarray(w) for w in jax.random.bits(rbg, (2, 1000), jnp.uint32))
    m = ((y0.astype(np.uint64) & np.uint64(2**31 - 1)) << np.uint64(32)) | y1
    got = np.asarray(gaussian.normal(rbg, (1000,), jnp.float64))
    np.testing.assert_allclose(got, _reference(m, y0 >> 31), rtol=1e-14)


def test_add_noise_draws_each_counter_once_and_leaves_are_independent():
    """Leaf ℓ takes counters o_ℓ .. o_ℓ + n_ℓ − 1 of one stream: the tree's noise is the
    stream cut into the leaves (reference: threefry2x32_p words and the scipy map), no value
    repeats (a reused counter would), and two big leaves are uncorrelated (|r| √n below the
    two-sided 1e-6 normal quantile)."""
    key = jax.random.key(8)
    tree = {"a": jnp.zeros((300, 400)), "b": jnp.zeros(7), "c": jnp.zeros((2, 60_000))}
    noisy = jax.jit(lambda t, k: privacy.add_noise(t, k, stddev=2.0))(tree, key)
    leaves = jax.tree_util.tree_leaves(noisy)
    flat = np.concatenate([np.ravel(x) for x in leaves])
    k0, k1 = jax.random.key_data(key)
    y0, y1 = (
        np.asarray(w)
        for w in threefry2x32_p.bind(
            k0, k1, jnp.zeros(flat.size, jnp.uint32), jnp.arange(flat.size, dtype=jnp.uint32)
        )
    )
    m = ((y0.astype(np.uint64) & np.uint64(2**31 - 1)) << np.uint64(32)) | y1
    np.testing.assert_allclose(flat, 2.0 * _reference(m, y0 >> 31), rtol=1e-13)
    assert np.unique(flat).size == flat.size
    a, c = np.ravel(leaves[0]), np.ravel(leaves[2])
    r = np.corrcoef(a[: c.size], c)[0, 1]
    assert abs(r) * np.sqrt(c.size) < stats.norm.isf(ALPHA / 2)


def test_add_noise_works_without_x64_and_matches_the_x64_float32_values():
    tree = {"w": jnp.zeros((3, 5), jnp.float32)}
    key = private_key(3)
    with_x64 = np.asarray(privacy.add_noise(tree, key, stddev=1.0)["w"])
    with jax.enable_x64(False):
        without = np.asarray(jax.jit(lambda t: privacy.add_noise(t, key, stddev=1.0))(tree)["w"])
        assert without.dtype == np.float32
    np.testing.assert_allclose(without, with_x64, rtol=1e-6)  # float32 rounding (jit, eager)


def test_normal_from_words_bad_arguments():
    w = jnp.zeros(3, jnp.uint32)
    with pytest.raises(ValueError, match="`dtype` must be float32 or float64; got int32"):
        gaussian.normal_from_words(w, w, jnp.int32)
    with pytest.raises(TypeError, match="`y0` and `y1` must be uint32 arrays of one shape"):
        gaussian.normal_from_words(w.astype(jnp.int32), w)
    with pytest.raises(TypeError, match=r"got uint32\[3\] and uint32\[2\]"):
        gaussian.normal_from_words(w, w[:2])
    with pytest.raises(ValueError, match="offset"):
        gaussian.normal_at(jax.random.key(0), -1, (3,))
