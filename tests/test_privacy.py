"""jaxgrad.privacy: accounting against dp-accounting, the noise, the sampler, equivalences.

Statistical tests are two-sided at a stated false-alarm rate (1e-6 each), with fixed keys:
they are deterministic, and a wrong normalisation (noise on the mean instead of the sum,
noise once per physical batch, a fixed-size sampler) is off by far more than the bound.
"""

import math

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import private_key
from scipy import stats

import jaxgrad
from jaxgrad import privacy
from jaxgrad.privacy import gaussian

ALPHA = 1e-6  # false-alarm rate of every statistical test here

# ------------------------------------------------------------------------------------------
# Accounting.


def _direct(sigma, q, steps, delta, accountant):
    acc = (
        dp_accounting.rdp.RdpAccountant()
        if accountant == "rdp"
        else dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    )
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("sigma,q,steps,delta", [(0.8, 0.01, 500, 1e-5), (2.0, 0.05, 200, 1e-6)])
def test_epsilon_matches_dp_accounting_called_directly(accountant, sigma, q, steps, delta):
    eps = privacy.epsilon(
        noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta, accountant=accountant
    )
    assert eps == pytest.approx(_direct(sigma, q, steps, delta, accountant), rel=1e-9)


def test_epsilon_reference_values():
    kw = dict(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=14063, delta=1e-5)
    assert privacy.epsilon(**kw, accountant="rdp") == pytest.approx(2.597, abs=1e-3)
    assert privacy.epsilon(**kw, accountant="pld") == pytest.approx(2.382, abs=1e-3)


def test_epsilon_grows_with_steps_and_edge_cases():
    kw = dict(noise_multiplier=1.0, sampling_rate=0.01, delta=1e-5, accountant="rdp")
    e = [privacy.epsilon(steps=t, **kw) for t in (0, 10, 100, 1000)]
    assert e[0] == 0.0 and e[1] < e[2] < e[3]
    assert privacy.epsilon(**{**kw, "noise_multiplier": 0.0}, steps=5) == math.inf


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibrate_noise_multiplier_hits_the_target(accountant):
    kw = dict(delta=1e-5, sampling_rate=0.02, steps=100, accountant=accountant)
    kw.update(pld_discretization=1e-3) if accountant == "pld" else None
    sigma = privacy.calibrate_noise_multiplier(target_epsilon=2.0, **kw)
    eps = lambda s: privacy.epsilon(noise_multiplier=s, **kw)
    assert eps(sigma) <= 2.0
    assert eps(sigma - 0.01) > 2.0 * 0.98  # tight: a little less noise nearly spends it all


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(accountant="moments"), "accountant"),
        (dict(delta=0.0), "delta"),
        (dict(steps=-1), "steps"),
        (dict(sampling_rate=1.5), "sampling_rate"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
    ],
)
def test_epsilon_bad_arguments(kwargs, match):
    kw = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5)
    with pytest.raises(ValueError, match=match):
        privacy.epsilon(**{**kw, **kwargs})


def test_calibrate_bad_arguments():
    kw = dict(target_epsilon=1.0, delta=1e-5, sampling_rate=0.01, steps=10)
    with pytest.raises(ValueError, match="target_epsilon"):
        privacy.calibrate_noise_multiplier(**{**kw, "target_epsilon": 0})
    with pytest.raises(ValueError, match="steps"):
        privacy.calibrate_noise_multiplier(**{**kw, "steps": 0})


# ------------------------------------------------------------------------------------------
# The sampler.


def test_poisson_inclusion_frequencies_match_q():
    n, q, draws = 40, 0.15, 4000
    keys = jax.random.split(jax.random.key(1), draws)
    draw = jax.vmap(
        lambda k: privacy.poisson_sample(k, num_examples=n, sampling_rate=q, physical_batch_size=8)
    )(keys)
    hits = np.asarray(draw.mask).sum(axis=0)
    # Pearson chi-square over the n independent Binomial(draws, q) inclusion counts.
    chi2 = np.sum((hits - draws * q) ** 2 / (draws * q * (1 - q)))
    assert stats.chi2.sf(chi2, n) > ALPHA and stats.chi2.cdf(chi2, n) > ALPHA
    # The realised batch size is Binomial(n, q), not fixed.
    counts = np.asarray(draw.count)
    assert counts.std() > 0
    z = (counts.mean() - n * q) / math.sqrt(n * q * (1 - q) / draws)
    assert abs(z) < stats.norm.isf(ALPHA / 2)


def test_sampler_masks_counts_and_physical_batches_agree():
    n, p = 23, 4
    for seed in range(20):
        s = privacy.poisson_sample(
            private_key(seed), num_examples=n, sampling_rate=0.4, physical_batch_size=p
        )
        mask, count = np.asarray(s.mask), int(s.count)
        assert count == mask.sum() and s.indices.shape == (24,)
        np.testing.assert_array_equal(np.asarray(s.indices)[:count], np.flatnonzero(mask))
        k = int(privacy.num_physical_batches(s.count, p))
        assert k == math.ceil(count / p)
        seen = []
        for j in range(k):
            idx, m = privacy.physical_batch(s, j, physical_batch_size=p)
            seen += list(np.asarray(idx)[np.asarray(m)])
        assert sorted(seen) == list(np.flatnonzero(mask))  # every drawn example exactly once


@pytest.mark.parametrize(("n", "p"), [(2**31, 256), (2**31 - 1, 256)])
def test_sampler_refuses_data_sets_beyond_int32_indices(n, p):
    # Checked before anything is drawn: N rows past 2**31 would wrap the int32 positions.
    with pytest.raises(ValueError, match=r"`num_examples` \(\d+\).*below 2\*\*31"):
        privacy.poisson_sample(
            private_key(0), num_examples=n, sampling_rate=1e-6, physical_batch_size=p
        )


# ------------------------------------------------------------------------------------------
# The noisy gradient.


def _mlp_problem(n=12, seed=0):
    model = jaxgrad.models.mlp([5, 7, 3], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, 5), jnp.float64)
    y = jax.random.randint(ky, (n,), 0, 3)
    return loss_fn, model.init(kp), (x, y)


def _zero_grad_loss(w, ex):
    return 0.0 * jnp.sum(w["a"]) * jnp.sum(ex) + 0.0 * jnp.sum(w["b"])


def _std_within_bound(samples, expected_std):
    """Two-sided chi-square test of the variance (mean known to be 0)."""
    samples = np.asarray(samples).ravel()
    stat = np.sum(samples**2) / expected_std**2
    dof = samples.size
    assert stats.chi2.sf(stat, dof) > ALPHA and stats.chi2.cdf(stat, dof) > ALPHA, (
        np.std(samples),
        expected_std,
    )


def test_noise_std_is_sigma_c_over_expected_batch_size():
    sigma, clip, b_e = 1.3, 0.7, 16.0
    params = {"a": jnp.zeros((50, 4)), "b": jnp.zeros(7)}
    f = privacy.dp_grad(
        _zero_grad_loss, l2_clip=clip, noise_multiplier=sigma, expected_batch_size=b_e
    )
    batch = jnp.ones((10, 3))
    outs = [f(params, batch, None, k) for k in jax.random.split(jax.random.key(2), 40)]
    samples = np.concatenate([np.concatenate([o["a"].ravel(), o["b"]]) for o in outs])
    _std_within_bound(samples, sigma * clip / b_e)
    # Noise on the mean (sum-calibrated noise divided by b_e twice, or not at all) fails:
    with pytest.raises(AssertionError):
        _std_within_bound(samples, sigma * clip)


def test_noised_average_is_the_sum_plus_normals_over_the_expected_batch():
    # Reference: gaussian.normal's N-vector cut into the leaves in order, in numpy.
    total = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([1.0, -2.0])}
    key = private_key(7)
    got = privacy.noised_average(total, key, stddev=0.3, expected_batch_size=2.5)
    z = np.asarray(gaussian.normal(key, (8,), jnp.float64))
    np.testing.assert_allclose(
        got["a"], (np.arange(6.0).reshape(2, 3) + 0.3 * z[:6].reshape(2, 3)) / 2.5, rtol=1e-14
    )
    np.testing.assert_allclose(got["b"], (np.array([1.0, -2.0]) + 0.3 * z[6:]) / 2.5, rtol=1e-14)
    for bad in (0, -1.0, float("nan"), "4"):
        with pytest.raises(ValueError, match="`expected_batch_size` must be a positive"):
            privacy.noised_average(total, key, stddev=0.3, expected_batch_size=bad)
    # Positive but below the smallest normal float32: its reciprocal overflows float32, and
    # every coordinate of the average would be inf (float64 leaves take it: 1e-30 is normal).
    small = {"a": jnp.ones(2, jnp.float32)}
    with pytest.raises(ValueError, match=r"`expected_batch_size` must be at least 1.17549e-38"):
        privacy.noised_average(small, key, stddev=0.0, expected_batch_size=1e-39)
    np.testing.assert_array_equal(
        privacy.noised_average(total, key, stddev=0.0, expected_batch_size=1e-39)["b"],
        np.array([1.0, -2.0]) / 1e-39,
    )


def test_noise_is_added_once_under_accumulation():
    """With many physical batches per step the noise std is still σC/(qN), not √K times it."""
    sigma, clip, q, n = 0.9, 2.0, 0.5, 64
    params = {"a": jnp.zeros((40, 5)), "b": jnp.zeros(3)}
    f = privacy.sampled_dp_grad(
        _zero_grad_loss,
        l2_clip=clip,
        noise_multiplier=sigma,
        sampling_rate=q,
        physical_batch_size=4,
        return_info=True,
    )
    data = jnp.ones((n, 3))
    samples = []
    for k in jax.random.split(jax.random.key(3), 40):
        g, info = f(params, data, k)
        assert int(info.num_physical_batches) >= 5
        samples.append(np.concatenate([g["a"].ravel(), g["b"]]))
    _std_within_bound(np.concatenate(samples), sigma * clip / (q * n))


def test_dp_grad_without_noise_equals_batch_grad_rescaled():
    loss_fn, params, batch = _mlp_problem()
    mask = jnp.arange(12) % 3 != 0
    f = privacy.dp_grad(loss_fn, l2_clip=1e6, noise_multiplier=0.0, expected_batch_size=5.5)
    got = f(params, batch, mask, private_key(0))
    count = int(mask.sum())
    want = jaxgrad.batch_grad(loss_fn)(params, batch, mask).grads
    chex.assert_trees_all_close(
        jax.tree_util.tree_map(lambda g: g * 5.5 / count, got), want, rtol=1e-12, atol=1e-14
    )


def test_dp_grad_matches_loop_over_examples_with_clipping():
    loss_fn, params, (x, y) = _mlp_problem(n=9, seed=4)
    clip, b_e = 0.3, 7.0
    f = privacy.dp_grad(loss_fn, l2_clip=clip, noise_multiplier=0.0, expected_batch_size=b_e)
    got = f(params, (x, y), None, private_key(0))
    want = jax.tree_util.tree_map(jnp.zeros_like, params)
    for i in range(9):
        g = jax.grad(loss_fn)(params, (x[i], y[i]))
        norm = math.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree_util.tree_leaves(g)))
        scale = min(1.0, clip / norm)
        want = jax.tree_util.tree_map(lambda w, v: w + scale * v / b_e, want, g)  # noqa: B023
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)


def test_dp_grad_noise_with_same_key_is_the_same_and_added_to_the_sum():
    loss_fn, params, batch = _mlp_problem()
    kw = dict(l2_clip=0.5, expected_batch_size=6.0)
    noisy = privacy.dp_grad(loss_fn, noise_multiplier=1.5, **kw)
    clean = privacy.dp_grad(loss_fn, noise_multiplier=0.0, **kw)
    key = private_key(7)
    diff = jax.tree_util.tree_map(
        jnp.subtract, noisy(params, batch, None, key), clean(params, batch, None, key)
    )
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    want = privacy.add_noise(zeros, key, stddev=1.5 * 0.5)
    chex.assert_trees_all_close(diff, jax.tree_util.tree_map(lambda w: w / 6.0, want), atol=1e-12)
    chex.assert_trees_all_equal(noisy(params, batch, None, key), noisy(params, batch, None, key))


def test_sampled_dp_grad_without_noise_is_the_clipped_sum_of_the_draw():
    physical_batch_size = 5  # the draw (~12 of 30) spans several physical batches, the last partial
    loss_fn, params, data = _mlp_problem(n=30, seed=5)
    q, clip = 0.4, 0.5
    f = privacy.sampled_dp_grad(
        loss_fn,
        l2_clip=clip,
        noise_multiplier=0.0,
        sampling_rate=q,
        physical_batch_size=physical_batch_size,
        return_info=True,
    )
    key = private_key(11)
    got, info = f(params, data, key)
    sample = privacy.poisson_sample(
        jax.random.split(key)[0], num_examples=30, sampling_rate=q, physical_batch_size=1
    )
    assert int(info.num_examples) == int(sample.count)
    assert int(info.num_physical_batches) == math.ceil(int(sample.count) / physical_batch_size)
    ref = jaxgrad.clipped_grad(loss_fn, l2_clip=clip, reduction="sum", method="vmap")
    want = ref(params, data, sample.mask)
    chex.assert_trees_all_close(
        got, jax.tree_util.tree_map(lambda w: w / (q * 30), want), rtol=1e-12, atol=1e-14
    )
    # And with a clip above every norm: x qN / count it is batch_grad of the drawn examples.
    big = privacy.sampled_dp_grad(
        loss_fn,
        l2_clip=1e6,
        noise_multiplier=0.0,
        sampling_rate=q,
        physical_batch_size=physical_batch_size,
    )(params, data, key)
    chex.assert_trees_all_close(
        jax.tree_util.tree_map(lambda g: g * q * 30 / int(sample.count), big),
        jaxgrad.batch_grad(loss_fn)(params, data, sample.mask).grads,
        rtol=1e-12,
        atol=1e-14,
    )


def test_nonfinite_examples_are_dropped_and_counted():
    loss_fn, params, (x, y) = _mlp_problem(n=8, seed=6)
    bad_x = x.at[2, 0].set(jnp.nan).at[5, 1].set(jnp.inf)
    kw = dict(l2_clip=0.5, noise_multiplier=0.7, expected_batch_size=4.0)
    f = privacy.dp_grad(loss_fn, **kw, return_info=True)
    key = private_key(1)
    got, info = f(params, (bad_x, y), None, key)
    keep = jnp.array([i not in (2, 5) for i in range(8)])
    want, _ = f(params, (x, y), keep, key)
    assert int(info.num_nonfinite) == 2 and int(info.num_examples) == 6
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
    # Every example bad: the noise alone, still finite.
    all_bad, info = f(params, (jnp.full_like(x, jnp.nan), y), None, key)
    assert int(info.num_nonfinite) == 8
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    noise = privacy.add_noise(zeros, key, stddev=0.7 * 0.5)
    chex.assert_trees_all_close(all_bad, jax.tree_util.tree_map(lambda v: v / 4.0, noise))


def test_nonfinite_raise():
    loss_fn, params, (x, y) = _mlp_problem(n=8, seed=6)
    kw = dict(l2_clip=0.5, noise_multiplier=0.7, expected_batch_size=4.0, nonfinite="raise")
    f = privacy.dp_grad(loss_fn, **kw)
    f(params, (x, y), None, private_key(0))  # fine
    with pytest.raises(FloatingPointError, match="an example of this batch has a non-finite"):
        f(params, (x.at[3, 0].set(jnp.nan), y), None, private_key(0))
    # Under the caller's jit nothing can be raised: the policy's result is NaN, as for
    # clipped_grad(nonfinite="raise"), and a finite batch is unaffected.
    jitted = jax.jit(f)
    bad = jitted(params, (x.at[3, 0].set(jnp.nan), y), None, private_key(0))
    assert all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree_util.tree_leaves(bad))
    chex.assert_trees_all_close(
        jitted(params, (x, y), None, private_key(0)), f(params, (x, y), None, private_key(0))
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(l2_clip=0.0), "l2_clip"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(expected_batch_size=0), "expected_batch_size"),
        (dict(nonfinite="ignore"), "nonfinite"),
    ],
)
def test_dp_grad_bad_arguments(kwargs, match):
    kw = dict(l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=8)
    with pytest.raises(ValueError, match=match):
        privacy.dp_grad(_zero_grad_loss, **{**kw, **kwargs})


def test_sampled_dp_grad_bad_arguments():
    kw = dict(l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.1, physical_batch_size=8)
    with pytest.raises(ValueError, match="sampling_rate"):
        privacy.sampled_dp_grad(_zero_grad_loss, **{**kw, "sampling_rate": 0.0})
    with pytest.raises(ValueError, match="physical_batch_size"):
        privacy.sampled_dp_grad(_zero_grad_loss, **{**kw, "physical_batch_size": 0})
