"""BandMF: banded matrix-factorisation noise, its strategy, its cyclic batch source, its
amplified accounting and its place in fit (jaxgrad.privacy.bandmf)."""

import dataclasses
import functools
import json
import math
from pathlib import Path

import chex
import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from helpers import private_key, run_interrupted

import jaxgrad
from jaxgrad import keys, privacy
from jaxgrad.privacy import bandmf, sources
from jaxgrad.train import PrivacyConfig, checkpoint


def _prefix_error(coefs, n):
    """numpy, dense: ‖c‖² · ‖A C⁻¹‖_F² / n for the all-ones lower-triangular A."""
    c = bandmf.strategy_matrix(coefs, n)
    a = np.tril(np.ones((n, n)))
    return np.sum((a @ np.linalg.inv(c)) ** 2) / n * np.sum(np.asarray(coefs) ** 2)


# --------------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------------


def test_sqrt_coefs_are_the_normalised_series_of_one_over_sqrt_one_minus_x():
    for b in (1, 2, 5):
        # (1 - x)^(-1/2) = Σ_j binom(2j, j) (x/4)^j
        series = np.array([math.comb(2 * j, j) / 4**j for j in range(b)])
        np.testing.assert_allclose(bandmf.sqrt_coefs(b), series / np.linalg.norm(series))
    # Untruncated (b = n) it is A^(1/2): C C = A, the prefix-sum matrix.
    n = 6
    c = bandmf.strategy_matrix(bandmf.sqrt_coefs(n), n) * np.linalg.norm(
        [math.comb(2 * j, j) / 4**j for j in range(n)]
    )
    np.testing.assert_allclose(c @ c, np.tril(np.ones((n, n))), atol=1e-12)


def test_loss_and_inverse_coefs_against_the_dense_matrices():
    n = 12
    for coefs in ([1.0], bandmf.sqrt_coefs(3), [0.6, -0.64, 0.48]):
        coefs = np.asarray(coefs) / np.linalg.norm(coefs)
        inv = np.linalg.inv(bandmf.strategy_matrix(coefs, n))
        np.testing.assert_allclose(bandmf.inverse_coefs(coefs, n), inv[:, 0], atol=1e-12)
        assert float(bandmf.loss(coefs, n)) == pytest.approx(_prefix_error(coefs, n), rel=1e-12)
    assert float(bandmf.loss([1.0], n)) == pytest.approx((n + 1) / 2)  # independent noise


def test_optimized_coefs_lower_the_error_and_match_jax_privacy():
    n, b = 48, 4
    c = bandmf.optimized_coefs(b, steps=n)
    assert np.linalg.norm(c) == pytest.approx(1.0) and c[0] > 0
    assert _prefix_error(c, n) < 0.99 * _prefix_error(bandmf.sqrt_coefs(b), n)
    # a stationary point: no coordinate direction lowers the dense error
    for j in range(b):
        for h in (1e-4, -1e-4):
            moved = c.copy()
            moved[j] += h
            assert _prefix_error(moved / np.linalg.norm(moved), n) >= _prefix_error(c, n) - 1e-9
    np.testing.assert_array_equal(bandmf.optimized_coefs(1, steps=n), [1.0])


# --------------------------------------------------------------------------------------------
# The noise
# --------------------------------------------------------------------------------------------


def test_streaming_noise_equals_the_dense_solve():
    n, b, d = 9, 3, 4
    c = bandmf.sqrt_coefs(b)
    z = np.random.default_rng(0).standard_normal((n, d))
    tree = {"a": jnp.zeros(d - 1), "b": jnp.zeros(())}
    history = bandmf.init_history(tree, b)
    out = []
    for t in range(n):
        w, history = bandmf.correlated_noise({"a": z[t, :-1], "b": z[t, -1]}, history, c)
        out.append(np.concatenate([w["a"], [w["b"]]]))
    np.testing.assert_allclose(
        np.stack(out), np.linalg.solve(bandmf.strategy_matrix(c, n), z), atol=1e-12
    )
    assert history["a"].shape == (b - 1, d - 1)


def _run_privatizer(tx, like, steps, key):
    """Updates of ``tx`` for ``steps`` zero sums, from a state whose key is ``key``."""

    def body(state, _):
        u, state = tx.update(jax.tree_util.tree_map(jnp.zeros_like, like), state)
        return state, u

    state = tx.init(like)._replace(key=key)
    return jax.lax.scan(body, state, None, length=steps)[1]


def test_bands_1_is_the_gaussian_privatizer_bit_for_bit():
    like = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2, jnp.float32)}
    kw = dict(noise_multiplier=1.3, l2_sensitivity=0.5, expected_batch_size=7.0)
    key = private_key(3)
    ours = privacy.bandmf_privatizer(coefs=[1.0], key=key, **kw)
    theirs = privacy.gaussian_privatizer(key=key, **kw)
    sums = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2, jnp.float32)}
    s1, s2 = ours.init(like), theirs.init(like)
    update1, update2 = jax.jit(ours.update), jax.jit(theirs.update)
    for _ in range(3):
        u1, s1 = update1(sums, s1)
        u2, s2 = update2(sums, s2)
        chex.assert_trees_all_equal(u1, u2)
        assert not np.allclose(u1["w"], sums["w"] / 7.0)  # noise was added


def test_realised_noise_has_the_intended_covariance_across_steps():
    """R runs × d coordinates = M independent draws of the n-step noise vector; every entry of
    the empirical covariance is within 5.6 standard errors of σ²Δ² C⁻¹C⁻ᵀ (CLT; with the
    21 entries Bonferroni-bounded, false-alarm rate ≤ 21 · P(|N(0,1)| > 5.6) < 1e-6)."""
    n, b, d, runs, sigma, clip = 6, 3, 50, 400, 1.5, 0.8
    c = bandmf.sqrt_coefs(b)
    tx = privacy.bandmf_privatizer(
        coefs=c,
        noise_multiplier=sigma,
        l2_sensitivity=clip,
        expected_batch_size=1.0,
        key=private_key(0),
    )
    keys = jax.random.split(jax.random.key(11), runs)
    w = jax.vmap(lambda k: _run_privatizer(tx, jnp.zeros(d), n, k))(keys)  # (runs, n, d)
    w = np.asarray(w).transpose(0, 2, 1).reshape(-1, n)  # M × n
    m = w.shape[0]
    empirical = w.T @ w / m  # the mean is 0: not estimated

    def z_scores(cov):
        var = np.outer(np.diag(cov), np.diag(cov)) + cov**2  # Var(w_j w_k) for Gaussians
        return np.abs(empirical - cov) / np.sqrt(var / m)

    cinv = np.linalg.inv(bandmf.strategy_matrix(c, n))
    intended = (sigma * clip) ** 2 * cinv @ cinv.T
    threshold = scipy.stats.norm.isf(1e-6 / 2 / (n * (n + 1) // 2))
    assert threshold < 5.6
    assert np.max(z_scores(intended)) < 5.6
    # The test has power: independent noise of the same variances is rejected.
    assert np.max(z_scores(np.diag(np.diag(intended)))) > 5.6


# --------------------------------------------------------------------------------------------
# The batch source and the accounting
# --------------------------------------------------------------------------------------------


def test_cyclic_poisson_draws_only_the_steps_group_and_is_poisson_for_one_group():
    n, b, q = 23, 4, 0.5  # 4 does not divide 23: groups of 6, 6, 6 and 5 rows
    src = sources.CyclicPoisson(sampling_rate=q, groups=b)
    assert src.expected_batch_size(n) == pytest.approx(q * n / b)
    draws = 400
    steps = jnp.arange(draws)
    masks = np.asarray(
        jax.jit(
            jax.vmap(
                lambda t: (
                    src.sample(
                        jax.random.key(t), num_examples=n, physical_batch_size=4, step=t
                    ).mask
                )
            )
        )(steps)
    )  # (draws, n): which rows each step drew
    rows = np.arange(n)
    assert not np.any(masks & (rows[None, :] % b != np.arange(draws)[:, None] % b))
    counts = masks.sum(0)
    # each row is drawn in Binomial(draws / b, q) of its group's steps: within 5.3 standard
    # deviations (23 rows: false-alarm rate < 23 · 1.2e-7 < 3e-6)
    mean, std = draws / b * q, math.sqrt(draws / b * q * (1 - q))
    assert np.max(np.abs(counts - mean)) < 5.3 * std
    one = sources.CyclicPoisson(sampling_rate=q, groups=1)
    poisson = sources.Poisson(sampling_rate=q)
    for t in range(3):
        a = one.sample(private_key(t), num_examples=n, physical_batch_size=4, step=t)
        p = poisson.sample(private_key(t), num_examples=n, physical_batch_size=4)
        chex.assert_trees_all_equal(a, p)


def test_amplified_event_is_the_dp_accounting_composition():
    sigma, q, n, b, delta = 0.9, 0.2, 50, 4, 1e-5
    event = bandmf.dp_event(noise_multiplier=sigma, sampling_rate=q, steps=n, bands=b)
    step = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
    assert event == dpa.SelfComposedDpEvent(step, 13)  # ⌈50 / 4⌉
    direct = dpa.rdp.RdpAccountant()
    for _ in range(13):
        direct.compose(step)
    ours = dpa.rdp.RdpAccountant().compose(event)
    assert ours.get_epsilon(delta) == pytest.approx(direct.get_epsilon(delta), rel=1e-12)
    # fit's plan accounts the same ⌈steps / b⌉ participations
    the_plan = jaxgrad.train.private.plan(
        PrivacyConfig(
            l2_clip=1.0,
            noise_multiplier=sigma,
            accountant="rdp",
            noise="bandmf",
            bands=b,
            bandmf_strategy="sqrt",
        ),
        num_examples=200,
        batch_size=10,  # q = 4 · 10 / 200 = 0.2
        epochs=3,  # 60 steps: 15 participations
    )
    assert the_plan.sampling_rate == pytest.approx(q)
    acc = dpa.rdp.RdpAccountant().compose(step, 15)
    assert the_plan.epsilon(60) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert the_plan.summary(60)["participations"] == 15


def test_amplified_accounting_matches_jax_privacy():
    analysis = pytest.importorskip("jax_privacy.accounting.analysis")
    accountants = pytest.importorskip("jax_privacy.accounting.accountants")
    n_examples, batch, b, sigma, steps = 400, 10, 4, 1.0, 37
    theirs = analysis.DpsgdTrainingAccountant(
        dp_accountant_config=accountants.RdpAccountantConfig()
    ).compute_epsilon(
        steps,
        analysis.DpParams(
            noise_multipliers=sigma,
            num_samples=n_examples,
            delta=1e-5,
            batch_size=batch,
            cycle_length=b,
        ),
    )
    event = bandmf.dp_event(
        noise_multiplier=sigma, sampling_rate=batch * b / n_examples, steps=steps, bands=b
    )
    ours = accountants.RdpAccountantConfig().create_accountant().compose(event)
    assert ours.get_epsilon(1e-5) == pytest.approx(theirs, rel=1e-12)


# --------------------------------------------------------------------------------------------
# In fit
# --------------------------------------------------------------------------------------------


def _problem(n=40):
    model = jaxgrad.models.mlp([5, 6, 3], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 5))
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    return loss_fn, (x, y), model.init(jax.random.key(1))


def _fit(privacy_config, **kw):
    loss_fn, data, params = _problem()
    kw = {"epochs": 2, "batch_size": 10, "progress": "none", "key": private_key(5), **kw}
    return jaxgrad.train.fit(
        loss_fn, params, data, optimizer=optax.adam(0.05), privacy=privacy_config, **kw
    )


BASE = dict(l2_clip=0.7, noise_multiplier=1.1, accountant="rdp")


def test_fit_with_one_band_is_dp_sgd_bit_for_bit():
    # key=jax.random.key(5): fit warns once; the privatizer it builds with that key, no more
    with pytest.warns(keys.SeededKeyWarning) as plain_warnings:
        plain = _fit(PrivacyConfig(**BASE), key=jax.random.key(5))
    with pytest.warns(keys.SeededKeyWarning) as banded_warnings:
        banded = _fit(PrivacyConfig(**BASE, noise="bandmf", bands=1), key=jax.random.key(5))
    for caught in (plain_warnings, banded_warnings):
        assert sum(c.category is keys.SeededKeyWarning for c in caught) == 1
    chex.assert_trees_all_equal(banded.params, plain.params)
    assert banded.history == plain.history
    # the released state has the optimizer's state only, as DP-SGD's does
    chex.assert_trees_all_equal(banded.state.opt_state, plain.state.opt_state)


def test_fit_with_bands_resumes_bit_for_bit_and_releases_no_noise_state(tmp_path):
    config = PrivacyConfig(**BASE, noise="bandmf", bands=2, bandmf_strategy="sqrt")
    whole = _fit(config)
    assert jax.tree_util.tree_structure(whole.state.opt_state) == jax.tree_util.tree_structure(
        optax.adam(0.05).init(whole.params)
    )
    assert whole.privacy["noise"] == "bandmf" and whole.privacy["sampling"] == "cyclic_poisson"
    # stopped at the end of epoch 2, before its last checkpoint (fit evaluates first)
    *_, path = run_interrupted(
        functools.partial(_fit, config, checkpoint_every=3), tmp_path, at_evaluate=2
    )
    # The checkpoint (secret) holds the noise history: after step t, w_{t-1}, the noise of
    # the privatizer alone from the run's key (dp_keys(key, s) for s < t).
    tx = privacy.bandmf_privatizer(  # the run's own key, to draw its noise
        coefs=bandmf.sqrt_coefs(2),
        noise_multiplier=1.1,
        l2_sensitivity=0.7,
        expected_batch_size=1.0,
        key=private_key(5),
    )
    chain = optax.chain(tx, optax.adam(0.05))
    template = jaxgrad.train.TrainState(whole.params, chain.init(whole.params), jnp.int32(0))
    tree, meta = checkpoint.load(path, {"state": template, "key": jax.random.key(0)})
    # (the strategy is in the run's config: a resume under another one is refused)
    assert meta["config"]["privacy"]["bandmf_coefs"] == pytest.approx(list(bandmf.sqrt_coefs(2)))
    t = meta["step"]
    noise = _run_privatizer(tx, whole.params, t, private_key(5))
    saved = tree["state"].opt_state[0]
    assert int(saved.count) == t
    chex.assert_trees_all_close(
        jax.tree_util.tree_map(lambda h: h[0], saved.history),
        jax.tree_util.tree_map(lambda w: w[-1], noise),
        rtol=1e-12,
    )
    resumed = _fit(config, checkpoint_dir=tmp_path, checkpoint_every=3)
    chex.assert_trees_all_equal(resumed.params, whole.params)


@pytest.mark.parametrize(
    ("changes", "kw", "match"),
    [
        ({"bands": 0}, {}, "`bands` must be"),
        ({"bands": 9}, {}, r"`bands` \(9\) is larger than the number of steps \(8\)"),
        ({"bands": 5}, {}, r"`bands` \(5\) times `batch_size` \(10\) must be at most"),
        ({"bands": None}, {}, "noise='bandmf' needs `bands`"),
        ({"noise": "blt", "bands": 2}, {}, "`noise` must be one of"),
        ({"noise": "gaussian", "bands": 2}, {}, "`bands` applies only to noise='bandmf'"),
        ({"bands": 2, "sampling": "truncated_poisson", "max_batch_size": 20}, {}, "sampling"),
        ({"bands": 2, "bandmf_strategy": "best"}, {}, "`bandmf_strategy` must be one of"),
    ],
)
def test_bad_bandmf_settings_are_refused_before_training(changes, kw, match):
    config = PrivacyConfig(**{**BASE, "noise": "bandmf", **changes})
    with pytest.raises(ValueError, match=match):
        jaxgrad.train.private.plan(config, num_examples=40, batch_size=10, epochs=2, **kw)


def test_bad_coefs_and_sources_are_refused():
    kw = dict(noise_multiplier=1.0, l2_sensitivity=1.0, expected_batch_size=1.0)
    with pytest.raises(ValueError, match=r"L2 norm 1.*got norm 1\.25"):
        privacy.bandmf_privatizer(coefs=[1.0, 0.75], key=private_key(0), **kw)
    with pytest.raises(ValueError, match=r"`coefs\[0\]` must be > 0"):
        privacy.bandmf_privatizer(coefs=[0.0, 1.0], key=private_key(0), **kw)
    with pytest.raises(ValueError, match="1-D"):
        privacy.bandmf_privatizer(coefs=[[1.0]], key=private_key(0), **kw)
    src = sources.CyclicPoisson(sampling_rate=0.5, groups=3)
    with pytest.raises(ValueError, match="needs `step`"):
        src.sample(private_key(0), num_examples=10, physical_batch_size=4)
    with pytest.raises(ValueError, match=r"`groups` \(3\) is larger than the data set \(2"):
        src.expected_batch_size(2)
    with pytest.raises(ValueError, match="`bands` must be"):
        bandmf.sqrt_coefs(0)


def test_calibration_and_stop_at_epsilon_count_participations():
    config = PrivacyConfig(
        l2_clip=1.0,
        target_epsilon=2.0,
        accountant="rdp",
        noise="bandmf",
        bands=4,
        bandmf_strategy="sqrt",
    )
    the_plan = jaxgrad.train.private.plan(config, num_examples=400, batch_size=10, epochs=2)
    assert the_plan.steps == 80
    direct = privacy.calibrate_noise_multiplier(
        target_epsilon=2.0, delta=1e-5, sampling_rate=0.1, steps=20, accountant="rdp"
    )
    assert the_plan.noise_multiplier == pytest.approx(direct)
    budget = PrivacyConfig(**{**BASE, "noise": "bandmf", "bands": 4, "bandmf_strategy": "sqrt"})
    spent = jaxgrad.train.private.plan(budget, num_examples=400, batch_size=10, epochs=2)
    stop = jaxgrad.train.private.plan(
        dataclasses.replace(budget, stop_at_epsilon=spent.epsilon(12) * (1 + 1e-9)),
        num_examples=400,
        batch_size=10,
        epochs=2,
    )
    assert stop.stop_step == 12  # 3 participations of each of the 4 groups


# --------------------------------------------------------------------------------------------
# The one-run audit (Steinke, Nasr, Jagielski 2023) of a BandMF fit
# --------------------------------------------------------------------------------------------


def test_bandmf_fit_audit_stays_below_its_claim_and_too_little_noise_exceeds_it():
    """1000 Dirac canaries in a linear model, 200 guesses, δ = 1e-5, 95% confidence: the
    correct run's ε lower bound stays below its claim (false alarm ≤ 5%); the same run with
    σ/10 (claim unchanged) is caught."""
    m, r, delta, clip, target = 1000, 200, 1e-5, 1.0, 2.0
    kx, ky = jax.random.split(jax.random.key(42))
    data = (jax.random.normal(kx, (300, m)) / math.sqrt(m), 0.05 * jax.random.normal(ky, (300,)))
    params = {"w": jnp.zeros(m), "b": jnp.zeros(())}

    def loss(p, ex):
        x, y = ex
        return (jnp.dot(x, p["w"]) + p["b"] - y) ** 2

    claims, sigmas = [], []

    def run(config):
        def train(loss_fn, params, rows):
            n = jaxgrad.reduce.batch_size(rows)
            result = jaxgrad.train.fit(
                loss_fn,
                params,
                rows,
                optimizer=optax.sgd(1.0),
                epochs=6,
                batch_size=n // 4,  # two groups: q ≈ 1/2 within each
                key=private_key(55555),
                privacy=config,
                quiet=True,
            )
            claims.append(result.history[-1]["epsilon"])
            sigmas.append(result.privacy["noise_multiplier"])
            return result.params

        return privacy.audit.audit(
            train,
            params,
            data,
            loss,
            l2_clip=clip,
            num_canaries=m,
            num_guesses=r,
            delta=delta,
            key=jax.random.key(1000),
        )

    kw = dict(l2_clip=clip, delta=delta, noise="bandmf", bands=2, bandmf_strategy="sqrt")
    correct = run(PrivacyConfig(target_epsilon=target, **kw))
    assert claims[0] == pytest.approx(target, rel=1e-2)
    assert correct.epsilon_lower < claims[0], correct
    # σ/10 of the σ the correct run calibrated and used (calibrating it again here cost
    # seconds of accounting and computed the same number)
    sigma = sigmas[0]
    broken = run(PrivacyConfig(noise_multiplier=sigma / 10, **kw))  # same canaries, same rows
    assert broken.epsilon_lower > target, broken


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_cli_bands(tmp_path, capsys):
    from jaxgrad.train.__main__ import main

    out = tmp_path / "out.json"
    line = ["--data", "line", "--dp", "--noise-multiplier", "1", "--accountant", "rdp"]
    line += ["--batch-size", "64", "--x64", "--epochs", "2", "--insecure-dp-seed", "1"]
    assert main([*line, "--bands", "3", "--bandmf-strategy", "sqrt", "--json", str(out)]) == 0
    pv = json.loads(out.read_text())["privacy"]
    assert (pv["noise"], pv["bands"], pv["sampling"]) == ("bandmf", 3, "cyclic_poisson")
    assert pv["participations"] == -(-pv["steps"] // 3)
    assert pv["epsilon"] == pytest.approx(
        privacy.epsilon(
            noise_multiplier=1.0,
            sampling_rate=pv["sampling_rate"],
            steps=pv["participations"],
            delta=1e-5,
            accountant="rdp",
        )
    )
    doc = (Path(__file__).parents[1] / "docs" / "privacy.md").read_text()
    table = doc.split("### What a `--dp` run releases", 1)[1]
    assert all(f"`privacy.{k}`" in table for k in pv), sorted(pv)
    for args, message in [
        (["--data", "line", "--bands", "2"], "--bands needs --dp"),
        ([*line, "--bandmf-strategy", "sqrt"], "--bandmf-strategy needs --bands"),
        ([*line, "--bands", "0"], "--bands must be"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([*args, "--quiet"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err
