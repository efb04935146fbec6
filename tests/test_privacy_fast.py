"""jaxgrad.privacy.threefry: the noise is JAX's own Threefry stream, the sampler its raw bits.

References: ``jax.random.normal`` (the rolled Threefry primitive JAX lowers for the CPU) and
``jax.extend.random.threefry2x32_p`` applied to counters computed in numpy. Statistical tests
are two-sided at a false-alarm rate of 1e-6 with fixed keys.
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import private_key
from jax.extend.random import threefry2x32_p
from scipy import stats

import jaxgrad
from jaxgrad import privacy
from jaxgrad.privacy import gaussian, sampling, threefry

ALPHA = 1e-6


def test_threefry2x32_matches_jax_primitive_across_the_32_bit_carry():
    key = jax.random.key(5)
    k0, k1 = jax.random.key_data(key)
    idx = np.arange(2**32 - 5, 2**32 + 6, dtype=np.uint64)  # the high word changes midway
    hi, lo = (idx >> 32).astype(np.uint32), (idx & 0xFFFFFFFF).astype(np.uint32)
    want = threefry2x32_p.bind(k0, k1, jnp.asarray(hi), jnp.asarray(lo))
    got = jax.jit(threefry.threefry2x32)(k0, k1, jnp.asarray(hi), jnp.asarray(lo))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # normal_at derives those counters itself from the offset: the same bits.
    z = jax.jit(lambda k: threefry.normal_at(k, 2**32 - 5, (11,), jnp.float32))(key)
    bits = np.asarray(want[0]) ^ np.asarray(want[1])
    u = (bits >> 9 | np.uint32(0x3F800000)).view(np.float32) - np.float32(1)
    lowest = np.nextafter(np.float32(-1), np.float32(0))
    u = np.maximum(lowest, u * (np.float32(1) - lowest) + lowest)
    from scipy.special import erfinv

    np.testing.assert_allclose(np.asarray(z), np.sqrt(2) * erfinv(u.astype(np.float64)), rtol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("offset,shape", [(0, (7, 3)), (5, (4,)), (1000, (2, 3, 5))])
def test_normal_at_is_a_slice_of_jax_random_normal(dtype, offset, shape):
    key = jax.random.key(11)
    size = int(np.prod(shape))
    want = jax.random.normal(key, (offset + size + 9,), dtype)[offset : offset + size]
    got = jax.jit(lambda k: threefry.normal_at(k, offset, shape, dtype))(key)
    assert got.shape == shape and got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got).ravel(), np.asarray(want))


def test_add_noise_is_one_normal_vector_cut_into_the_leaves():
    key = jax.random.key(3)
    tree = {"w": jnp.ones((6, 4), jnp.float32), "b": jnp.arange(5.0, dtype=jnp.float32)}
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    z = np.asarray(gaussian.normal(key, (29,), jnp.float32))
    pieces, start = [], 0
    for x in leaves:
        pieces.append(np.asarray(x) + 0.5 * z[start : start + x.size].reshape(x.shape))
        start += x.size
    want = jax.tree_util.tree_unflatten(treedef, pieces)
    got = jax.jit(lambda t, k: privacy.add_noise(t, k, stddev=0.5))(tree, key)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-7)


def test_add_noise_is_the_same_under_either_threefry_partitionable_setting():
    """The fused Threefry words depend on the counter only, whatever the setting."""
    tree = {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    key = jax.random.key(7)
    for partitionable in (False, True):
        with jax.threefry_partitionable(partitionable):
            got = jax.jit(lambda t, k: privacy.add_noise(t, k, stddev=1.5))(tree, key)
            want = 1.5 * np.asarray(gaussian.normal(key, (14,), jnp.float32))
        flat = np.concatenate([np.asarray(got["b"]), np.asarray(got["w"]).ravel()])
        np.testing.assert_allclose(flat, want, rtol=1e-6, atol=1e-7)


def test_add_noise_with_another_key_impl_and_a_raw_key():
    tree = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(2)}
    for key in (private_key(1, impl="rbg"), jax.random.key_data(private_key(1))):
        got = privacy.add_noise(tree, key, stddev=2.0)
        flat = jnp.concatenate([got["b"], got["w"].ravel()])  # leaves in tree order: b, w
        want = 2.0 * gaussian.normal(key, (14,), jnp.float64)
        np.testing.assert_allclose(flat, want, rtol=1e-12)
    assert threefry.is_threefry(jax.random.PRNGKey(1))
    assert not threefry.is_threefry(jax.random.key(1, impl="rbg"))


def test_dp_grad_noise_is_one_normal_vector_times_sigma_c_over_b():
    """The noise on the whole gradient: exactly one N(0, I) vector over all coordinates."""
    model = jaxgrad.models.mlp([5, 4, 3], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 5), jnp.float64)
    batch = (x, jnp.arange(6) % 3)
    kw = dict(l2_clip=0.5, expected_batch_size=4.0)
    key = private_key(9)
    noisy = privacy.dp_grad(loss_fn, noise_multiplier=1.5, **kw)(params, batch, None, key)
    clean = privacy.dp_grad(loss_fn, noise_multiplier=0.0, **kw)(params, batch, None, key)
    pairs = zip(jax.tree_util.tree_leaves(noisy), jax.tree_util.tree_leaves(clean), strict=True)
    diff = np.concatenate([np.ravel(a - b) for a, b in pairs])
    z = np.asarray(gaussian.normal(key, (diff.size,), jnp.float64))
    np.testing.assert_allclose(diff, 1.5 * 0.5 * z / 4.0, rtol=1e-9, atol=1e-15)


def test_normal_at_far_offset_is_standard_normal():
    """Kolmogorov-Smirnov and a variance test on 200k draws from beyond the 2**32 carry."""
    z = np.asarray(
        jax.jit(lambda k: threefry.normal_at(k, 2**32 - 100_000, (200_000,), jnp.float32))(
            jax.random.key(21)
        ),
        np.float64,
    )
    assert stats.kstest(z, "norm").pvalue > ALPHA
    chi2 = np.sum(z**2)
    assert stats.chi2.sf(chi2, z.size) > ALPHA and stats.chi2.cdf(chi2, z.size) > ALPHA
    assert abs(z.mean()) * np.sqrt(z.size) < stats.norm.isf(ALPHA / 2)


def test_normal_at_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="dtype"):
        threefry.normal_at(key, 0, (3,), jnp.int32)
    with pytest.raises(ValueError, match="offset"):
        threefry.normal_at(key, -1, (3,), jnp.float32)
    with pytest.raises(ValueError, match="offset"):
        threefry.normal_at(key, 2**64 - 2, (3,), jnp.float32)


# ------------------------------------------------------------------------------------------
# The sampler's Bernoulli draw and compaction.


def _mask_reference(hi, lo, q):
    """``[hi·2³² + lo < ⌊q·2⁶⁴⌋]`` in exact rational and Python-integer arithmetic."""
    threshold = math.floor(Fraction(q) * 2**64)
    words = [(int(h) << 32) | int(lo_) for h, lo_ in zip(hi, lo, strict=True)]
    return np.array([w < threshold for w in words])


@pytest.mark.parametrize("q", [1e-15, 2.0**-12, 0.003, 0.37, 1.0 - 2.0**-40, 1.0])
def test_inclusion_mask_is_an_integer_threshold_on_the_64_threefry_bits(q):
    n = 3001
    for seed in range(3):
        key = jax.random.key(seed)
        k0, k1 = jax.random.key_data(key)
        hi, lo = threefry2x32_p.bind(  # blocks 2**63 + i: counter words (2**31, i)
            k0, k1, jnp.full(n, 2**31, jnp.uint32), jnp.arange(n, dtype=jnp.uint32)
        )
        want = _mask_reference(np.asarray(hi), np.asarray(lo), q)
        got = jax.jit(lambda k: privacy.inclusion_mask(k, sampling_rate=q, num_examples=n))(key)
        np.testing.assert_array_equal(got, want)


def test_inclusion_mask_near_the_threshold_and_without_x64():
    """Words just below / at the threshold (same high word), and the same draw in float32 mode."""
    key = private_key(4)
    k0, k1 = jax.random.key_data(key)
    n = 200_000
    hi, lo = (
        np.asarray(w)
        for w in threefry2x32_p.bind(
            k0, k1, jnp.full(n, 2**31, jnp.uint32), jnp.arange(n, dtype=jnp.uint32)
        )
    )
    # A threshold whose high word some counter shares: both branches of the comparison act.
    j = int(np.argmax(hi > 0))
    for t in ((int(hi[j]) << 32) | int(lo[j]), ((int(hi[j]) << 32) | int(lo[j])) + 1):
        q = t / 2**64
        want = _mask_reference(hi, lo, q)
        assert want.sum() > 0
        got = privacy.inclusion_mask(key, sampling_rate=q, num_examples=n)
        np.testing.assert_array_equal(got, want)
        with jax.enable_x64(False):
            np.testing.assert_array_equal(
                privacy.inclusion_mask(key, sampling_rate=q, num_examples=n), want
            )


def test_inclusion_mask_with_another_key_impl():
    rbg = private_key(1, impl="rbg")
    n, q = 1001, 0.3
    tagged = jax.random.fold_in(rbg, sampling._INCLUSION_TAG)  # not the noise's own bits
    hi, lo = (np.asarray(w) for w in jax.random.bits(tagged, (2, n), jnp.uint32))
    got = privacy.inclusion_mask(rbg, sampling_rate=q, num_examples=n)
    np.testing.assert_array_equal(got, _mask_reference(hi, lo, q))


def test_inclusion_mask_bad_arguments():
    key = private_key(0)
    for bad in (0.0, -0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="sampling_rate"):
            privacy.inclusion_mask(key, sampling_rate=bad, num_examples=10)
    with pytest.raises(ValueError, match="num_examples"):
        privacy.inclusion_mask(key, sampling_rate=0.1, num_examples=0)


def test_poisson_sample_is_the_compacted_inclusion_mask():
    n, q, p = 1001, 0.3, 64
    for key in [private_key(s) for s in range(4)] + [private_key(1, impl="rbg")]:
        s = jax.jit(
            lambda k: privacy.poisson_sample(
                k, num_examples=n, sampling_rate=q, physical_batch_size=p
            )
        )(key)
        mask = np.asarray(privacy.inclusion_mask(key, sampling_rate=q, num_examples=n))
        np.testing.assert_array_equal(s.mask, mask)
        assert int(s.count) == int(mask.sum())
        want = np.zeros(1024, np.int32)
        want[: int(mask.sum())] = np.flatnonzero(mask)
        np.testing.assert_array_equal(s.indices, want)


@pytest.mark.parametrize("n,b", [(60000, 256), (60000, 1024), (1000, 10), (50, 50)])
def test_default_physical_batch_size_runs_fewer_rows(n, b):
    """Against the exact Binomial(n, q): fewer rows per step than P = b, one batch mostly."""
    q = b / n
    p = privacy.default_physical_batch_size(num_examples=n, sampling_rate=q)
    assert b <= p <= n
    k = np.arange(n + 1)
    pmf = stats.binom.pmf(k, n, q)
    rows = lambda size: np.sum(np.ceil(k / size) * size * pmf)
    assert rows(p) <= rows(b) * 1.001
    if n == 60000:  # ~1.5x the rows with P = b; one physical batch on >= 95% of steps
        assert rows(p) < 0.8 * rows(b) and stats.binom.cdf(p, n, q) > 0.95
        assert min(rows(c) for c in range(b, b + 200)) > 0.99 * rows(p)  # near the best


def test_fit_plan_takes_the_default_physical_batch_size():
    from jaxgrad.train.private import PrivacyConfig, plan

    cfg = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0)
    got = plan(cfg, num_examples=60000, batch_size=256, epochs=1)
    want = privacy.default_physical_batch_size(num_examples=60000, sampling_rate=256 / 60000)
    assert got.physical_batch_size == want > 256
    cfg = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, physical_batch_size=64)
    assert plan(cfg, num_examples=60000, batch_size=256, epochs=1).physical_batch_size == 64
    with pytest.raises(ValueError, match="sampling_rate"):
        privacy.default_physical_batch_size(num_examples=10, sampling_rate=0.0)


def test_sampled_dp_grad_empty_draw_and_first_batch_outside_the_loop():
    """An empty draw runs its first physical batch fully masked: the noise alone (here 0)."""
    model = jaxgrad.models.mlp([3, 2], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=2
    )
    params = model.init(jax.random.key(0))
    x = jnp.full((30, 3), jnp.nan).at[1:].set(1.0)  # the filler row (index 0) is not finite
    data = (x, jnp.arange(30) % 2)
    f = privacy.sampled_dp_grad(
        loss_fn,
        l2_clip=1.0,
        noise_multiplier=0.0,
        sampling_rate=1e-9,
        physical_batch_size=4,
        return_info=True,
    )
    g, info = f(params, data, private_key(0))
    assert int(info.num_examples) == 0 and int(info.num_physical_batches) == 0
    for leaf in jax.tree_util.tree_leaves(g):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_one_key_for_the_draw_and_the_noise_keeps_them_independent(impl):
    """A loop that gives the same key to poisson_sample and dp_grad: the draw read the bits the
    noise reads (Threefry block i, or rbg's first bits), so noise coordinate i was a function
    of example i's inclusion — at q = ½ its sign. With every gradient 0 the output is the
    noise alone: its mean over the drawn examples' coordinates minus the mean over the others
    is N(0, 1/n₁ + 1/n₀) if they are independent (it was ≈ 1.6); 5 standard deviations is a
    false alarm with probability 6e-7."""
    n, q = 1000, 0.5
    loss = lambda w, x: jnp.dot(w, x) * 0.0  # every per-example gradient is exactly 0
    f = privacy.dp_grad(
        loss, l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=1.0, method="vmap"
    )
    key = private_key(123, impl=impl)
    mask = np.asarray(
        privacy.poisson_sample(key, num_examples=n, sampling_rate=q, physical_batch_size=n).mask
    )
    z = np.asarray(f(jnp.zeros(n), jnp.zeros((2, n)), None, key))  # the noise, n coordinates
    n1, n0 = mask.sum(), (~mask).sum()
    assert min(n1, n0) > n / 4
    gap = z[mask].mean() - z[~mask].mean()
    assert abs(gap) < 5 * np.sqrt(1 / n1 + 1 / n0), gap
