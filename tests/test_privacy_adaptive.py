"""Adaptive (quantile) clipping (Andrew et al. 2021): the parts against independent
references, the σ split against dp-accounting, the training loop's state and resume."""

import functools
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import interrupt_then_resume, private_key

import jaxgrad
from jaxgrad import keys, privacy
from jaxgrad.privacy import AdaptiveClip, adaptive, gaussian, sampling, threefry
from jaxgrad.train import PrivacyConfig, checkpoint

N, D = 40, 3


def _linear_problem(seed=0):
    """loss = x·w: example i's gradient is x_i whatever w, with norms spread over 0.1..10."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((N, D))
    x = u / np.linalg.norm(u, axis=1, keepdims=True) * np.exp(rng.uniform(-2.3, 2.3, N))[:, None]
    return (lambda w, ex: jnp.dot(ex, w)), x


def _mlp_problem():
    model = jaxgrad.models.mlp([5, 6, 3], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 5))
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    return loss_fn, (x, y), model.init(jax.random.key(1))


ADAPTIVE = AdaptiveClip(target_quantile=0.3, learning_rate=0.4, count_noise_multiplier=2.0)


def _fit(loss_fn, params, data, config, **kw):
    kw = {"epochs": 3, "batch_size": 10, "progress": "none", "key": private_key(5), **kw}
    return jaxgrad.train.fit(
        loss_fn, params, data, optimizer=optax.adam(0.05), privacy=config, **kw
    )


def test_sigma_split_composes_to_one_gaussian_in_dp_accounting():
    """The gradient's Gaussian (σ_Δ, sensitivity C) and the centred count's (σ_b, sensitivity
    ½, i.e. multiplier 2σ_b) compose, in dp-accounting's own RDP and PLD accountants, to the
    Gaussian of multiplier σ that the step is accounted with; an uncentred count
    (sensitivity 1) would not."""
    from dp_accounting import dp_event as ev
    from dp_accounting import pld, rdp

    def eps(event, accountant):
        acc = (
            rdp.RdpAccountant()
            if accountant == "rdp"
            else pld.PLDAccountant(value_discretization_interval=1e-3)
        )
        return acc.compose(event).get_epsilon(1e-5)

    for sigma, sigma_b in [(1.0, 0.6), (0.8, 3.0), (2.5, 1.3)]:
        sigma_grad = privacy.split_noise_multiplier(sigma, count_noise_multiplier=sigma_b)
        assert sigma_grad > sigma
        both = ev.ComposedDpEvent([ev.GaussianDpEvent(sigma_grad), ev.GaussianDpEvent(2 * sigma_b)])
        uncentred = ev.ComposedDpEvent(
            [ev.GaussianDpEvent(sigma_grad), ev.GaussianDpEvent(sigma_b)]
        )
        for accountant in ("rdp", "pld"):
            one = eps(ev.GaussianDpEvent(sigma), accountant)
            assert eps(both, accountant) == pytest.approx(one, rel=2e-3)
            assert eps(uncentred, accountant) > one * 1.01
    assert privacy.split_noise_multiplier(0.0, count_noise_multiplier=0.0) == 0.0


def _count_reference(x, mask, clip):
    norms = np.linalg.norm(x, axis=1)
    return float(np.sum(np.where(mask, (norms <= clip) - 0.5, 0.0)))


def test_quantile_clipped_sum_against_a_per_example_loop():
    """The clipped sum and the centred count at a traced clip norm, under jit (one
    compilation for every C), against jax.grad per example; a non-finite example is dropped
    (and counts as clipped); a (sum, n) loss is the same."""
    loss_fn, x = _linear_problem()
    x = x.copy()
    x[7, 1] = np.nan
    mask = np.arange(N) % 4 != 0
    part = privacy.QuantileClippedSum(loss_fn)
    traces = []

    @jax.jit
    def run(clip):
        traces.append(1)
        return part(jnp.ones(D), jnp.asarray(x), jnp.asarray(mask), clip)

    grads = {i: np.asarray(jax.grad(loss_fn)(jnp.ones(D), x[i])) for i in np.flatnonzero(mask)}
    for clip in (0.3, 1.0, 4.0):
        (total, count), kept, bad = run(clip)
        ref, ref_count = np.zeros(D), 0.0
        for g in grads.values():
            norm = np.linalg.norm(g)
            if np.isfinite(norm):
                ref += g * min(1, clip / norm)
            ref_count += (norm <= clip) - 0.5  # NaN <= clip is False: clipped
        chex.assert_trees_all_close(total, ref, rtol=1e-12, atol=1e-14)
        assert float(count) == ref_count
        assert int(bad) == 1 and int(kept) == int(mask.sum()) - 1
    assert len(traces) == 1
    pair = privacy.QuantileClippedSum(lambda w, ex: (jnp.dot(ex, w), 1))
    (t2, c2), _, _ = pair(jnp.ones(D), jnp.asarray(x), jnp.asarray(mask), 1.0)
    (t1, c1), _, _ = run(1.0)
    chex.assert_trees_all_close(t2, t1, rtol=1e-12)
    assert float(c2) == float(c1)


def test_clip_trajectory_in_fit_equals_the_papers_update_given_the_same_noise():
    """fit's clip norms (per epoch in the history, and in the final state) equal a numpy
    replay of C ← C exp(−η((c + σ_b z)/B_e + ½ − γ)) over the same Poisson draws and count
    noise z (from keys.clip_count_key); the linear loss makes norms independent of w. The
    same on a one-device mesh (the host-driven DP loop)."""
    loss_fn, x = _linear_problem()
    config = PrivacyConfig(
        l2_clip=1.0, noise_multiplier=1.1, accountant="rdp", adaptive_clip=ADAPTIVE
    )
    run = functools.partial(
        jaxgrad.train.fit,
        loss_fn,
        jnp.zeros(D),
        x,
        optimizer=optax.sgd(0.1),
        privacy=config,
        epochs=3,
        batch_size=10,
        progress="none",
        key=private_key(5),
    )
    result, on_mesh = run(), run(mesh=jaxgrad.sharding.data_mesh(1))
    q, b_e, clip, trajectory = 10 / N, 10.0, 1.0, []
    for t in range(12):
        sample_key, _ = keys.dp_keys(private_key(5), t)
        mask = np.asarray(sampling.inclusion_mask(sample_key, sampling_rate=q, num_examples=N))
        z = float(gaussian.normal(keys.clip_count_key(private_key(5), t), (), jnp.float64))
        b = (_count_reference(x, mask, clip) + 2.0 * z) / b_e + 0.5
        clip *= math.exp(-0.4 * (b - 0.3))
        trajectory.append(clip)
    assert len(set(trajectory)) == 12  # the norm moved at every step
    for r in (result, on_mesh):
        np.testing.assert_allclose([h["l2_clip"] for h in r.history], trajectory[3::4], rtol=1e-12)
    chex.assert_trees_all_close(on_mesh.params, result.params, rtol=1e-12)
    assert float(result.state.opt_state[0].l2_clip) == pytest.approx(trajectory[-1], rel=1e-12)
    assert result.privacy["adaptive_clip"]["gradient_noise_multiplier"] == pytest.approx(
        (1.1**-2 - 4.0**-2) ** -0.5
    )
    # Accounted with the total σ: the same ε as flat clipping.
    assert result.history[-1]["epsilon"] == pytest.approx(
        privacy.epsilon(
            noise_multiplier=1.1, sampling_rate=q, steps=12, delta=1e-5, accountant="rdp"
        )
    )


def test_without_noise_the_clip_converges_to_the_empirical_quantile():
    """σ = σ_b = 0 and the whole data set every step: from 100× too large and 100× too small,
    C ends at the empirical γ-quantile n_(k) of the norms (k = ⌈γN⌉, γN not an integer),
    within the last multiplicative step: |log(C / n_(k))| ≤ η / N."""
    loss_fn, x = _linear_problem(seed=3)
    norms = np.linalg.norm(x, axis=1)
    part = privacy.QuantileClippedSum(loss_fn)
    eta = 0.2
    for gamma in (0.31, 0.79):
        settings = AdaptiveClip(target_quantile=gamma, learning_rate=eta, count_noise_multiplier=0)
        tx = privacy.quantile_privatizer(
            noise_multiplier=0.0, initial_clip=1.0, expected_batch_size=N, adaptive_clip=settings
        )

        @jax.jit
        def steps(state, tx=tx):
            def one(state, t):
                sums, _, _ = part(jnp.ones(D), jnp.asarray(x), None, state.l2_clip)
                k = jax.random.key(0)
                noise_key, count_key = keys.dp_keys(k, t)[1], keys.clip_count_key(k, t)
                return tx.update(sums, state, noise_key=noise_key, count_key=count_key)[1], None

            return jax.lax.scan(one, state, jnp.arange(600))[0]

        quantile = np.sort(norms)[math.ceil(gamma * N) - 1]
        for start in (100 * quantile, quantile / 100):
            clip = float(steps(adaptive.AdaptiveClipState(jnp.asarray(start))).l2_clip)
            assert abs(math.log(clip / quantile)) <= eta / N + 1e-12, (gamma, start, clip)


def test_gradient_noise_std_is_the_gradients_share_times_the_clip():
    """The privatizer's gradient noise has std σ_Δ C / B_e, not σ C / B_e: the sample std of
    200,000 coordinates is within 6 standard errors of it (false alarm < 1e-8; σ_Δ/σ = 1.81
    is hundreds of standard errors away)."""
    sigma, sigma_b, clip, b_e, d = 1.0, 0.6, 2.5, 4.0, 200_000
    tx = privacy.quantile_privatizer(
        noise_multiplier=sigma,
        initial_clip=clip,
        expected_batch_size=b_e,
        adaptive_clip=AdaptiveClip(count_noise_multiplier=sigma_b),
    )
    state = tx.init(jnp.zeros(d))
    zeros = privacy.QuantileSum(jnp.zeros(d), jnp.zeros(()))
    g, _ = tx.update(zeros, state, noise_key=private_key(1), count_key=private_key(2))
    expected = privacy.split_noise_multiplier(sigma, count_noise_multiplier=sigma_b) * clip / b_e
    assert expected / (sigma * clip / b_e) == pytest.approx(1.809, abs=1e-3)
    std_error = expected / math.sqrt(2 * d)
    assert abs(float(jnp.std(g)) - expected) < 6 * std_error


def test_the_count_noise_key_is_none_of_the_steps_other_keys():
    """fold_in(noise_key, j) would be the gradient noise's counter j: the count key shares
    no Threefry block with the step's sample key, noise key, their first counters, or the
    neighbouring steps' keys."""
    k = jax.random.key(11)
    for t in (0, 1, 7):
        count = tuple(np.asarray(jax.random.key_data(keys.clip_count_key(k, t))).tolist())
        taken = set()
        for s in (t - 1, t, t + 1):
            for sub in keys.dp_keys(k, max(s, 0)):
                taken.add(tuple(np.asarray(jax.random.key_data(sub)).tolist()))
                y0, y1 = threefry.words_at(sub, 0, (4096,))
                taken.update(zip(np.asarray(y0).tolist(), np.asarray(y1).tolist(), strict=True))
        assert count not in taken
        bad = jax.random.key_data(jax.random.fold_in(keys.dp_keys(k, t)[1], 1))
        assert tuple(np.asarray(bad).tolist()) in taken  # the check can fail


def test_adaptive_run_resumes_bit_for_bit_and_refuses_other_settings(tmp_path):
    """Interrupted mid-epoch and resumed (in chunks of 3 steps), an adaptive run ends with the
    same parameters, optimizer state and clip norm as the uninterrupted one; a resume with
    other adaptive settings is refused."""
    loss_fn, data = _linear_problem()
    params = jnp.zeros(D)
    config = PrivacyConfig(
        l2_clip=0.7, noise_multiplier=1.1, accountant="rdp", adaptive_clip=ADAPTIVE
    )
    whole = _fit(loss_fn, params, data, config)
    assert whole.history[0]["l2_clip"] != whole.history[1]["l2_clip"]
    # stopped at the end of epoch 2, before its last checkpoint (fit evaluates first)
    saved, resumed = interrupt_then_resume(
        functools.partial(_fit, loss_fn, params, data, config, checkpoint_every=3),
        tmp_path,
        at_evaluate=2,
    )
    assert len(saved) == 2
    chex.assert_trees_all_equal(resumed.state, whole.state)
    assert [r["l2_clip"] for r in resumed.history] == [r["l2_clip"] for r in whole.history]
    other = PrivacyConfig(
        l2_clip=0.7,
        noise_multiplier=1.1,
        accountant="rdp",
        adaptive_clip=AdaptiveClip(target_quantile=0.6, count_noise_multiplier=2.0),
    )
    with pytest.raises(checkpoint.CheckpointError, match="adaptive_clip"):
        _fit(loss_fn, params, data, other, epochs=4, checkpoint_dir=tmp_path, checkpoint_every=3)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (AdaptiveClip(target_quantile=1.0), r"`target_quantile` must lie in \(0, 1\).*1\.0"),
        (AdaptiveClip(target_quantile=0.0), "`target_quantile`"),
        (AdaptiveClip(target_quantile=float("nan")), "`target_quantile`"),
        (AdaptiveClip(learning_rate=-0.2), "`learning_rate`.*-0.2"),
        (AdaptiveClip(count_noise_multiplier=-1.0), "`count_noise_multiplier`"),
        (AdaptiveClip(count_noise_multiplier=0.5), r"`count_noise_multiplier` must exceed.*0\.55"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(settings, match):
    loss_fn, data, params = _mlp_problem()
    config = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.1, adaptive_clip=settings)
    with pytest.raises(ValueError, match=match):
        _fit(loss_fn, params, data, config)


def test_bad_types_and_cli_flags_are_refused():
    loss_fn, data, params = _mlp_problem()
    with pytest.raises(
        TypeError, match=r"`adaptive_clip` must be a jaxgrad\.privacy\.AdaptiveClip"
    ):
        _fit(
            loss_fn,
            params,
            data,
            PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, adaptive_clip=0.5),
        )
    with pytest.raises(ValueError, match=r"must exceed.*the default: the paper's"):
        # the default σ_b = B_e / 20 = 0.5 is too small for σ = 1.1: the error says so
        _fit(
            loss_fn,
            params,
            data,
            PrivacyConfig(l2_clip=1.0, noise_multiplier=1.1, adaptive_clip=AdaptiveClip()),
        )
    from jaxgrad.train.__main__ import main

    for flags in (
        ["--adaptive-clip-quantile", "0.5"],  # without --dp
        ["--dp", "--noise-multiplier", "1", "--adaptive-clip-lr", "0.1"],  # without the quantile
        ["--dp", "--noise-multiplier", "1", "--adaptive-clip-quantile", "2"],
    ):
        with pytest.raises(SystemExit) as info:
            main(["--data", "digits", "--quiet", *flags])
        assert info.value.code == 2


def test_cli_releases_the_clip_norm_per_epoch_and_the_split(tmp_path):
    """--dp --adaptive-clip-quantile: the JSON's history holds l2_clip (released: computed
    from the noisy counts) and its privacy record the settings and σ_Δ."""
    import json

    from jaxgrad.train.__main__ import main

    out = tmp_path / "out.json"
    args = ["--data", "line", "--dp", "--noise-multiplier", "1", "--accountant", "rdp"]
    args += ["--batch-size", "64", "--epochs", "2", "--x64", "--quiet", "--json", str(out)]
    assert main([*args, "--adaptive-clip-quantile", "0.6", "--count-noise-multiplier", "3"]) == 0
    result = json.loads(out.read_text())
    clips = [r["l2_clip"] for r in result["history"]]
    assert len(clips) == 2 and clips[0] != clips[1] and clips[0] != 1.0
    record = result["privacy"]["adaptive_clip"]
    assert record["target_quantile"] == 0.6 and record["count_noise_multiplier"] == 3.0
    assert record["gradient_noise_multiplier"] == pytest.approx((1 - 1 / 36) ** -0.5)
    doc = (Path(__file__).parents[1] / "docs" / "privacy.md").read_text()
    for key in ("history[].l2_clip", *(f"privacy.adaptive_clip.{k}" for k in record)):
        assert f"`{key}`" in doc  # the table of everything the --dp JSON releases


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf")])
def test_quantile_clipped_sum_refuses_a_clip_norm_that_is_not_positive(clip):
    """A clip norm known at the call (not the adaptive state's, traced) is checked: 0 dropped
    every example as non-finite, -1 clipped at +1, NaN and inf made the sum NaN."""
    part = privacy.QuantileClippedSum(lambda w, x: jnp.dot(x, w))
    with pytest.raises(ValueError, match="`l2_clip` must be a positive finite number"):
        part(jnp.zeros(2), jnp.ones((3, 2)), None, clip)
