"""jaxgrad.privacy and fit(privacy=...) under inputs the other privacy tests never use.

Hyperparameters as NumPy scalars, 0-d arrays, bools, strings and traced values; every kind of
PRNG key and things that are not one; token losses ``(loss_sum, n_items)`` (the unit of privacy
is the example); the noise checked *exactly* (not statistically) against one
``gaussian.normal`` vector however many physical batches a draw takes; the degenerate sizes
(N = 1, q = 1, q = 1e-9, P = 1, P > N); the accountants at their extremes against
dp-accounting called directly and the Gaussian mechanism's closed form; and the training
loop's and the CLI's refusals. References are Python loops over examples in float64, numpy,
``jax.random`` itself, dp-accounting and closed forms.
"""

import json
import math
import warnings

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import private_key
from scipy import optimize, stats

import jaxgrad
from jaxgrad import privacy
from jaxgrad.privacy import accounting, gaussian
from jaxgrad.train import CheckpointError, PrivacyConfig, private
from jaxgrad.train.__main__ import main


def _linear_loss(w, x):  # example i's gradient is x_i
    return jnp.dot(x, w)


def _zero_loss(params, x):  # every gradient is exactly 0: the output is the noise alone
    return 0.0 * jnp.sum(x) * sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(params))


def _clipped_sum_loop(rows, mask, clip):
    """Σ_i m_i clip_C(x_i) for the linear loss, in numpy float64."""
    total = np.zeros(rows.shape[1])
    for row, m in zip(np.asarray(rows, np.float64), np.asarray(mask), strict=True):
        if m:
            norm = np.linalg.norm(row)
            total += row * (min(1.0, clip / norm) if norm > 0 else 1.0)
    return total


def _flat(tree):
    return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(tree)])


# ------------------------------------------------------------------------------------------
# Hyperparameters: NumPy scalars and concrete 0-d arrays are numbers; bools, strings and
# traced values are not.


def test_numpy_scalars_and_0d_arrays_are_the_same_hyperparameters():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)))
    w, key = jnp.zeros(3), private_key(3)
    mask = jnp.arange(6) % 2 == 0
    want = privacy.dp_grad(_linear_loss, l2_clip=0.5, noise_multiplier=1.5, expected_batch_size=4)
    got = privacy.dp_grad(
        _linear_loss,
        l2_clip=np.float32(0.5),
        noise_multiplier=jnp.asarray(1.5),
        expected_batch_size=np.int64(4),
    )
    chex.assert_trees_all_equal(got(w, x, mask, key), want(w, x, mask, key))
    # ... and the noiseless value is the loop's clipped sum over the expected batch size.
    clean = privacy.dp_grad(
        _linear_loss, l2_clip=np.float64(0.5), noise_multiplier=np.int32(0), expected_batch_size=4
    )
    np.testing.assert_allclose(
        clean(w, x, mask, key), _clipped_sum_loop(x, mask, 0.5) / 4, rtol=1e-12, atol=1e-14
    )
    q = np.float32(0.3)  # a float32 rate is the float32 number, exactly
    a = privacy.sampled_dp_grad(
        _linear_loss, l2_clip=1.0, noise_multiplier=0.7, sampling_rate=q, physical_batch_size=2
    )
    b = privacy.sampled_dp_grad(
        _linear_loss,
        l2_clip=1.0,
        noise_multiplier=0.7,
        sampling_rate=float(q),
        physical_batch_size=jnp.asarray(2),
    )
    chex.assert_trees_all_equal(a(w, x, key), b(w, x, key))
    # Accounting: NumPy steps / δ / σ are what dp-accounting gets as Python numbers.
    eps = privacy.epsilon(
        noise_multiplier=np.float32(1.25),
        sampling_rate=jnp.asarray(0.02),
        steps=np.int64(50),
        delta=np.float64(1e-5),
        accountant="rdp",
    )
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.25)), 50)
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    sigma = privacy.calibrate_noise_multiplier(
        target_epsilon=np.float32(2.0),
        delta=1e-5,
        sampling_rate=0.02,
        steps=np.int64(50),
        accountant="rdp",
    )
    assert sigma == privacy.calibrate_noise_multiplier(
        target_epsilon=2.0, delta=1e-5, sampling_rate=0.02, steps=50, accountant="rdp"
    )


_BUILDERS = {
    "dp_grad": lambda **kw: privacy.dp_grad(
        _linear_loss,
        **{"l2_clip": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 4.0, **kw},
    ),
    "sampled_dp_grad": lambda **kw: privacy.sampled_dp_grad(
        _linear_loss,
        **{"l2_clip": 1.0, "noise_multiplier": 1.0, "sampling_rate": 0.1, **kw},
        **({} if "physical_batch_size" in kw else {"physical_batch_size": 4}),
    ),
    "epsilon": lambda **kw: privacy.epsilon(
        **{"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": 1e-5, **kw},
        accountant="rdp",
    ),
    "calibrate_noise_multiplier": lambda **kw: privacy.calibrate_noise_multiplier(
        **{"target_epsilon": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": 1e-5, **kw},
        accountant="rdp",
    ),
    "dp_event": lambda **kw: privacy.dp_event(
        **{"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, **kw}
    ),
    "default_physical_batch_size": lambda **kw: privacy.default_physical_batch_size(
        **{"num_examples": 100, "sampling_rate": 0.1, **kw}
    ),
}


@pytest.mark.parametrize(
    "builder,name",
    [
        ("dp_grad", "l2_clip"),
        ("dp_grad", "noise_multiplier"),
        ("dp_grad", "expected_batch_size"),
        ("sampled_dp_grad", "sampling_rate"),
        ("sampled_dp_grad", "physical_batch_size"),
        ("epsilon", "noise_multiplier"),
        ("epsilon", "steps"),
        ("epsilon", "delta"),
        ("calibrate_noise_multiplier", "target_epsilon"),
        ("dp_event", "noise_multiplier"),
        ("dp_event", "steps"),
        ("default_physical_batch_size", "num_examples"),
    ],
)
@pytest.mark.parametrize("bad", [True, "1", None, float("nan"), -1, np.ones(2)])
def test_bad_hyperparameters_are_refused_by_name(builder, name, bad):
    if name in ("steps",) and isinstance(bad, float):
        bad = 1.5  # NaN is not an integer either; a float is refused as such
    with pytest.raises(ValueError, match=f"`{name}`"):
        _BUILDERS[builder](**{name: bad})


_OPTIONS = {
    "accountant": lambda v: privacy.epsilon(
        noise_multiplier=1.0, sampling_rate=0.1, steps=10, delta=1e-5, accountant=v
    ),
    "neighboring_relation": lambda v: privacy.Accountant(delta=1e-5, neighboring_relation=v),
    "nonfinite": lambda v: privacy.dp_grad(
        _linear_loss, l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=4.0, nonfinite=v
    ),
    "reduction": lambda v: jaxgrad.clipped_grad(_linear_loss, l2_clip=1.0, reduction=v),
    "strategy": lambda v: privacy.bandmf.strategy_coefs(2, steps=4, strategy=v),
    "noise": lambda v: private.plan(
        PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, noise=v),
        num_examples=100,
        batch_size=10,
        epochs=1,
    ),
}


@pytest.mark.parametrize("name", sorted(_OPTIONS))
@pytest.mark.parametrize("value", [np.array(["pld", "rdp"]), np.array(["rdp"])], ids=["2", "1"])
def test_an_array_for_a_string_option_is_refused_by_name(name, value):
    """``option in ("pld", "rdp")`` compares an array elementwise: a 2-element array failed
    with NumPy's "truth value ... is ambiguous", naming nothing, and a 1-element one passed
    the check as if it were the string."""
    with pytest.raises(ValueError, match=rf"`{name}` must be one of \["):
        _OPTIONS[name](value)


def test_a_traced_hyperparameter_is_refused_by_name():
    build = lambda s: privacy.dp_grad(
        _linear_loss, l2_clip=1.0, noise_multiplier=s, expected_batch_size=2.0
    )
    with pytest.raises(ValueError, match=r"`noise_multiplier`.*traced"):
        jax.jit(lambda s: build(s)(jnp.zeros(2), jnp.ones((3, 2)), None, jax.random.key(0)))(1.0)
    with pytest.raises(ValueError, match=r"`steps`.*traced"):
        jax.jit(
            lambda t: privacy.epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=t, delta=1e-5)
        )(3)


def test_delta_at_and_beyond_its_bounds():
    for delta in (0.0, 1.0, 1.5, -1e-9, float("inf")):
        with pytest.raises(ValueError, match="`delta`"):
            privacy.epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=10, delta=delta)
        with pytest.raises(ValueError, match="`delta`"):
            privacy.calibrate_noise_multiplier(
                target_epsilon=1.0, sampling_rate=0.1, steps=10, delta=delta
            )


# ------------------------------------------------------------------------------------------
# Keys.


def test_every_kind_of_one_key_works_and_the_noise_is_its_normal_vector():
    """Legacy uint32[2], typed Threefry and RBG keys: the noise of a zero gradient is
    σC · gaussian.normal(key, (D,)) / B_e for that very key (one vector, cut into leaves)."""
    params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
    x = jnp.ones((5, 2))
    f = privacy.dp_grad(_zero_loss, l2_clip=0.8, noise_multiplier=1.5, expected_batch_size=2.5)
    for key in (
        jax.random.key_data(private_key(7)),  # the legacy uint32[2] form
        private_key(7),
        private_key(7, impl="rbg"),
        private_key(7, impl="unsafe_rbg"),
    ):
        z = np.asarray(gaussian.normal(key, (10,), jnp.float64))
        np.testing.assert_allclose(
            _flat(f(params, x, None, key)), 0.8 * 1.5 * z / 2.5, rtol=1e-13, atol=1e-15
        )
    chex.assert_trees_all_equal(
        f(params, x, None, jax.random.key_data(private_key(7))), f(params, x, None, private_key(7))
    )


_KEY_USERS = {
    "dp_grad": lambda k: privacy.dp_grad(
        _linear_loss, l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=2.0
    )(jnp.zeros(2), jnp.ones((3, 2)), None, k),
    "sampled_dp_grad": lambda k: privacy.sampled_dp_grad(
        _linear_loss, l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, physical_batch_size=2
    )(jnp.zeros(2), jnp.ones((3, 2)), k),
    "add_noise": lambda k: privacy.add_noise(jnp.zeros(3), k, stddev=1.0),
    "inclusion_mask": lambda k: privacy.inclusion_mask(k, sampling_rate=0.5, num_examples=4),
    "poisson_sample": lambda k: privacy.poisson_sample(
        k, sampling_rate=0.5, num_examples=4, physical_batch_size=2
    ),
}


@pytest.mark.parametrize("user", sorted(_KEY_USERS))
def test_not_one_key_is_refused_by_name(user):
    use = _KEY_USERS[user]
    for seed in (0, np.int64(3)):
        with pytest.raises(TypeError, match=r"`key` must be one PRNG key.*seed, not a key"):
            use(seed)
    for not_a_key in (None, 0.5, np.array([0, 1], np.int32), jnp.zeros(5, jnp.uint32)):
        with pytest.raises(TypeError, match="`key` must be one PRNG key"):
            use(not_a_key)
    for batch in (jax.random.split(jax.random.key(0)), jax.random.split(jax.random.PRNGKey(0))):
        with pytest.raises(ValueError, match="`key` must be one PRNG key; got a batch"):
            use(batch)


def test_add_noise_refuses_integer_leaves_and_a_bad_stddev():
    key = private_key(0)
    with pytest.raises(TypeError, match="`total` leaves must be real floating"):
        privacy.add_noise({"w": jnp.zeros(3), "n": jnp.zeros(2, jnp.int32)}, key, stddev=2.0)
    for stddev in (-1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="`stddev`"):
            privacy.add_noise(jnp.zeros(3), key, stddev=stddev)
    # A traced stddev is the caller's (under jit): the same as the concrete one.
    traced = jax.jit(lambda s: privacy.add_noise(jnp.zeros(3), key, stddev=s))(2.0)
    np.testing.assert_allclose(traced, privacy.add_noise(jnp.zeros(3), key, stddev=2.0))


# ------------------------------------------------------------------------------------------
# The unit of privacy and the noise.


def _token_problem(n=7, t=5, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, t, d))
    valid = rng.random((n, t)) < 0.6
    valid[:, 0] = True

    def loss(w, ex):  # (Σ over the example's real tokens, number of real tokens)
        xs, v = ex
        return jnp.sum(jnp.where(v, 3.0 * jnp.tanh(xs @ w) ** 2, 0.0)), jnp.sum(v)

    w = jnp.asarray(rng.standard_normal(d))
    return loss, w, (jnp.asarray(x), jnp.asarray(valid))


@pytest.mark.parametrize("clip", [1e6, 0.4])
def test_a_token_loss_is_clipped_per_example_not_per_token(clip):
    """g_i = ∇ Σ_t l_{i,t} (the example's loss *sum*) is clipped as one vector, so one
    example moves the clipped sum by at most C whatever its token count."""
    loss, w, (x, v) = _token_problem()
    grads = [
        np.asarray(jax.grad(lambda w, i=i: loss(w, (x[i], v[i]))[0])(w)) for i in range(len(x))
    ]
    want = sum(g * min(1.0, clip / np.linalg.norm(g)) for g in grads)
    f = privacy.dp_grad(loss, l2_clip=clip, noise_multiplier=0.0, expected_batch_size=3.0)
    np.testing.assert_allclose(f(w, (x, v), None, private_key(0)), want / 3.0, rtol=1e-11)
    # The whole data set drawn (q = 1) in physical batches of 2: the same sum, over qN = 7.
    s = privacy.sampled_dp_grad(
        loss, l2_clip=clip, noise_multiplier=0.0, sampling_rate=1.0, physical_batch_size=2
    )
    np.testing.assert_allclose(s(w, (x, v), private_key(0)), want / 7.0, rtol=1e-11)
    if clip < 1:  # sensitivity: removing any one example changes the sum by at most C
        for i in range(len(x)):
            keep = jnp.arange(len(x)) != i
            diff = (f(w, (x, v), None, private_key(0)) - f(w, (x, v), keep, private_key(0))) * 3
            assert np.linalg.norm(diff) <= clip * (1 + 1e-12)


@pytest.mark.parametrize("physical_batch_size", [1, 3, 70])
def test_noise_is_one_normal_vector_per_step_exactly_under_accumulation(physical_batch_size):
    """A zero-gradient loss: the step is exactly σC·z/(qN), z = normal(split(key)[1], (D,)),
    whether the draw takes one physical batch or a dozen."""
    params = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(5)}
    n, q, sigma, clip = 40, 0.5, 1.3, 0.7
    f = privacy.sampled_dp_grad(
        _zero_loss,
        l2_clip=clip,
        noise_multiplier=sigma,
        sampling_rate=q,
        physical_batch_size=physical_batch_size,
        return_info=True,
    )
    for seed in range(3):
        key = private_key(seed)
        g, info = f(params, jnp.ones((n, 2)), key)
        assert int(info.num_physical_batches) == -(-int(info.num_examples) // physical_batch_size)
        z = np.asarray(gaussian.normal(jax.random.split(key)[1], (11,), jnp.float64))
        np.testing.assert_allclose(_flat(g), sigma * clip * z / (q * n), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "n,q,p",
    [(1, 1.0, 1), (1, 0.5, 3), (5, 1.0, 7), (6, 1.0, 1), (9, 0.6, 1), (12, 1e-9, 4), (8, 0.5, 100)],
)
def test_degenerate_sizes_against_a_loop(n, q, p):
    """N = 1, q = 1 (every example), q = 1e-9 (nearly always none), P = 1, P > N."""
    rows = jnp.asarray(np.random.default_rng(n).standard_normal((n, 3)))
    key = private_key(n + p)
    f = privacy.sampled_dp_grad(
        _linear_loss,
        l2_clip=0.9,
        noise_multiplier=0.0,
        sampling_rate=q,
        physical_batch_size=p,
        return_info=True,
    )
    g, info = f(jnp.zeros(3), rows, key)
    mask = privacy.inclusion_mask(jax.random.split(key)[0], sampling_rate=q, num_examples=n)
    if q == 1.0:
        assert bool(jnp.all(mask))
    assert int(info.num_examples) == int(np.sum(mask))
    np.testing.assert_allclose(g, _clipped_sum_loop(rows, mask, 0.9) / (q * n), atol=1e-13)
    assert 1 <= privacy.default_physical_batch_size(num_examples=n, sampling_rate=q) <= n


# ------------------------------------------------------------------------------------------
# Accounting at the extremes.


def _direct(sigma, q, steps, delta, accountant):
    acc = (
        dp_accounting.rdp.RdpAccountant()
        if accountant == "rdp"
        else dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    )
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize(
    "sigma,q,steps",
    [
        (1.0, 1.0, 1),
        (2.0, 1.0, 9),
        (5.0, 0.3, 1),
        (50.0, 0.5, 10),
        (0.6, 1e-6, 1000),
        (1e6, 0.1, 5),
    ],
)
def test_epsilon_at_the_extremes_is_dp_accounting_called_directly(accountant, sigma, q, steps):
    eps = privacy.epsilon(
        noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=1e-5, accountant=accountant
    )
    assert eps == pytest.approx(_direct(sigma, q, steps, 1e-5, accountant), rel=1e-12, abs=1e-15)


def test_pld_epsilon_at_q_1_is_the_gaussian_mechanisms_closed_form():
    """q = 1: T steps of σ are one Gaussian mechanism of σ/√T, whose exact (ε, δ) curve is
    δ(ε) = Φ(−εs + 1/(2s)) − e^ε Φ(−εs − 1/(2s)) (Balle & Wang 2018), s = σ/√T. The PLD
    accountant's ε is an upper bound within its discretisation."""
    sigma, steps, delta = 2.0, 9, 1e-5
    s = sigma / math.sqrt(steps)
    curve = lambda e: (
        stats.norm.cdf(-e * s + 0.5 / s) - math.exp(e) * stats.norm.cdf(-e * s - 0.5 / s)
    )
    exact = optimize.brentq(lambda e: curve(e) - delta, 1e-6, 100, xtol=1e-12)
    eps = privacy.epsilon(
        noise_multiplier=sigma, sampling_rate=1.0, steps=steps, delta=delta, accountant="pld"
    )
    assert exact <= eps <= exact + 2e-3
    assert (
        privacy.epsilon(  # RDP is looser, never tighter
            noise_multiplier=sigma, sampling_rate=1.0, steps=steps, delta=delta, accountant="rdp"
        )
        >= exact
    )


def test_epsilon_lower_bound_is_one_steps_total_variation():
    """The closed form against a numerical total variation of the two one-step outputs, and
    below every ε the accountants give (they are upper bounds on the true ε)."""
    from scipy import integrate

    from jaxgrad.privacy.accounting import epsilon_lower_bound

    for sigma, q in [(0.5, 0.3), (1.0, 1.0), (3.0, 0.01)]:

        def gap(y, s=sigma, q=q):  # |mixture − N(0, σ²)| density
            mixture = (1 - q) * stats.norm.pdf(y, 0, s) + q * stats.norm.pdf(y, 1, s)
            return abs(mixture - stats.norm.pdf(y, 0, s))

        tv = 0.5 * integrate.quad(gap, -40, 40, points=[0.5], limit=200)[0]
        for delta in (1e-5, 1e-2):
            lower = epsilon_lower_bound(noise_multiplier=sigma, sampling_rate=q, delta=delta)
            assert lower == pytest.approx(math.log1p(max(0.0, tv - delta)), rel=1e-7, abs=1e-12)
            for accountant in ("rdp", "pld"):
                assert lower <= _direct(sigma, q, 3, delta, accountant)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # dp-accounting overflowing
def test_epsilon_refuses_an_accountant_that_broke_down():
    """dp-accounting's RDP accountant returns ε = 0 for σ = 1e-160 (1/σ² overflows): a
    privacy claim of ε = 0 for no noise at all. Never passed on; its overflows at huge σ are
    avoided."""
    kw = dict(sampling_rate=0.01, steps=10, delta=1e-5)
    assert _direct(1e-160, 0.01, 10, 1e-5, "rdp") == 0  # the accountant's own answer
    with pytest.raises(ValueError, match=r"`noise_multiplier` 1e-160.*broke down"):
        privacy.epsilon(noise_multiplier=1e-160, accountant="rdp", **kw)
    # σ = 1e160 overflows dp-accounting's arithmetic: it is accounted as 1e100 (ε falls as σ
    # grows), dp-accounting's own ε there, silently (test_privacy_accounting.py has 1e200).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = privacy.epsilon(noise_multiplier=1e160, accountant="pld", **kw)
    assert got == _direct(1e100, 0.01, 10, 1e-5, "pld")
    # A PLD too large to build is not attempted: RDP answers, and says so.
    with pytest.warns(accounting.AccountingFallbackWarning, match="RDP accountant instead"):
        fallback = privacy.epsilon(noise_multiplier=1e-20, accountant="pld", **kw)
    # Where the accountant works, it is what the test above compares: 5.5e40 for 1e-20.
    for got in (fallback, privacy.epsilon(noise_multiplier=1e-20, accountant="rdp", **kw)):
        assert got == pytest.approx(_direct(1e-20, 0.01, 10, 1e-5, "rdp"), rel=1e-12)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("target,q,steps", [(1.0, 1.0, 1), (1e-6, 0.01, 10), (0.05, 1.0, 1)])
def test_calibrate_at_the_extremes(accountant, target, q, steps):
    sigma = privacy.calibrate_noise_multiplier(
        target_epsilon=target, delta=1e-5, sampling_rate=q, steps=steps, accountant=accountant
    )
    assert _direct(sigma, q, steps, 1e-5, accountant) <= target
    assert _direct(sigma * 0.99, q, steps, 1e-5, accountant) > target * 0.95


# ------------------------------------------------------------------------------------------
# fit(privacy=...) and the CLI.


def _fit_problem(n=30):
    model = jaxgrad.models.mlp([3, 2], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=2
    )
    x = np.random.default_rng(0).standard_normal((n, 3))
    return loss_fn, model.init(jax.random.key(0)), (x, (x[:, 0] > 0).astype(np.int32))


def test_plan_refuses_physical_batch_size_0_and_a_bad_method_up_front():
    kw = dict(num_examples=100, batch_size=10, epochs=2)
    for p in (0, False, -3, 2.5):
        config = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, physical_batch_size=p)
        with pytest.raises(ValueError, match="`physical_batch_size`"):
            private.plan(config, **kw)
    with pytest.raises(ValueError, match="`method`"):
        private.plan(PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, method="fast"), **kw)


def test_plan_takes_numpy_values_and_records_python_numbers():
    config = PrivacyConfig(
        l2_clip=np.float32(0.5),
        target_epsilon=np.float32(3.0),
        delta=np.float32(1e-5),
        accountant="rdp",
        physical_batch_size=np.int64(12),
    )
    the_plan = private.plan(config, num_examples=100, batch_size=10, epochs=2)
    summary = the_plan.summary(the_plan.steps)
    json.dumps(summary)  # plain Python numbers, not NumPy ones
    assert summary["delta"] == float(np.float32(1e-5)) and summary["physical_batch_size"] == 12
    direct = _direct(the_plan.noise_multiplier, 0.1, 20, float(np.float32(1e-5)), "rdp")
    assert summary["epsilon"] == pytest.approx(direct, rel=1e-12) and direct <= 3.0


def test_resume_refuses_changed_privacy_naming_what_changed(tmp_path):
    loss_fn, params, data = _fit_problem()
    base = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, accountant="rdp")

    def fit(config, **kw):
        return jaxgrad.train.fit(
            loss_fn,
            params,
            data,
            optimizer=optax.sgd(0.1),
            key=private_key(1),
            privacy=config,
            progress="none",
            **{"epochs": 1, "batch_size": 10, "checkpoint_dir": tmp_path, **kw},
        )

    fit(base)
    cases = [
        (
            PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, accountant="rdp", delta=1e-6),
            {},
            "delta",
        ),
        (base, {"batch_size": 5}, "sampling_rate"),
        (PrivacyConfig(l2_clip=2.0, noise_multiplier=1.0, accountant="rdp"), {}, "l2_clip"),
        (PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0), {}, "accountant"),
    ]
    for config, kw, name in cases:
        with pytest.raises(CheckpointError, match=rf"privacy settings changed \(.*{name}: "):
            fit(config, **kw)
    with pytest.raises(CheckpointError, match="resume=False"):
        fit(base, resume=False)
    with pytest.raises(CheckpointError, match="is a file"):
        fit(base, checkpoint_dir=tmp_path / next(p.name for p in tmp_path.iterdir()))
    assert fit(base).history[-1]["step"] == 3  # the same settings resume (nothing left to do)


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--noise-multiplier", "1", "--delta", "0"], "--delta"),
        (["--noise-multiplier", "1", "--delta", "1"], "--delta"),
        (["--noise-multiplier", "nan"], "--noise-multiplier"),
        (["--noise-multiplier", "-1"], "--noise-multiplier"),
        (["--target-epsilon", "inf"], "--target-epsilon"),
        (["--target-epsilon", "-2"], "--target-epsilon"),
        (["--noise-multiplier", "1", "--l2-clip", "nan"], "--l2-clip"),
        (["--noise-multiplier", "1", "--physical-batch-size", "0"], "--physical-batch-size"),
    ],
)
def test_cli_dp_bad_values_name_the_flag(args, flag, capsys, monkeypatch):
    monkeypatch.setattr(jaxgrad.train, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        main(["--data", "breast_cancer", "--dp", "--quiet", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag} must be" in err and "Traceback" not in err


def test_cli_dp_resume_with_changed_delta_is_a_message(tmp_path, capsys):
    args = ["--data", "breast_cancer", "--dp", "--noise-multiplier", "1", "--epochs", "1"]
    args += ["--batch-size", "128", "--accountant", "rdp", "--quiet"]
    args += ["--checkpoint-dir", str(tmp_path)]
    assert main(args) == 0
    assert main([*args, "--delta", "1e-6"]) == 2
    assert "privacy settings changed (delta: 1e-05 -> 1e-06)" in capsys.readouterr().err
    assert main([*args, "--no-resume"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_cli_dp_sigma_0_writes_strict_json(tmp_path):
    """σ = 0 spends ε = ∞: the JSON says "inf" (``Infinity`` is not JSON; strict parsers,
    jq or JavaScript's JSON.parse, refuse the whole file)."""
    out, lines = tmp_path / "out.json", tmp_path / "m.jsonl"
    args = ["--data", "breast_cancer", "--dp", "--noise-multiplier", "0", "--epochs", "1"]
    args += ["--batch-size", "128", "--quiet", "--json", str(out), "--metrics-jsonl", str(lines)]
    assert main(args) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads(out.read_text(), parse_constant=refuse)
    assert summary["privacy"]["epsilon"] == "inf" and summary["history"][-1]["epsilon"] == "inf"
    assert summary["privacy"]["noise_multiplier"] == 0.0
    record = json.loads(lines.read_text().splitlines()[-1], parse_constant=refuse)
    assert record["epsilon"] == "inf"
