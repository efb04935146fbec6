"""python -m jaxgrad.bench --dp: the DP step against the non-private step, on tiny models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import private_key

from jaxgrad.bench import __main__ as bench_main
from jaxgrad.bench import dp, suite
from jaxgrad.privacy import gaussian


def _setup(name, b):
    case = suite.CASES[name]()
    params = case.model.init(jax.random.key(0))
    return case, params, case.make_batch(b)


def test_dp_step_without_noise_or_clipping_is_the_non_private_step():
    case, params, batch = _setup("mlp-tiny", 8)
    opt, fns = dp.programs(case, 8, l2_clip=1e6, noise_multiplier=0.0)
    state = opt.init(params)
    key = jax.random.key(1)
    plain = fns["non-private step"](params, state, batch, key)
    private = fns["DP step"](params, state, batch, key)
    for a, b in zip(jax.tree.leaves(private), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_noise_ceiling_program_is_the_non_private_step_plus_the_dp_noise():
    """(ceiling − non-private) is −lr · σC/B · one normal vector; with σ = 0 they are equal."""
    case, params, batch = _setup("mlp-tiny", 8)
    key = jax.random.key(2)
    sigma, clip, lr = 1.5, 0.5, 0.1  # dp.programs' optimizer is optax.sgd(0.1)
    opt, fns = dp.programs(case, 8, l2_clip=clip, noise_multiplier=sigma)
    state = opt.init(params)
    plain, _ = fns["non-private step"](params, state, batch, key)
    noisy, _ = fns["non-private step + noise"](params, state, batch, key)
    diff = np.concatenate(
        [
            np.ravel(a - b)
            for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(plain), strict=True)
        ]
    )
    z = np.asarray(gaussian.normal(key, (diff.size,), diff.dtype))
    # float32 parameters: the difference of two updated values carries their rounding (~1e-7).
    np.testing.assert_allclose(diff, -lr * sigma * clip / 8 * z, rtol=1e-5, atol=3e-7)


def test_noise_program_is_sigma_c_times_one_normal_vector():
    case, params, batch = _setup("cnn-tiny", 4)
    opt, fns = dp.programs(case, 4, l2_clip=0.5, noise_multiplier=2.0)
    key = jax.random.key(3)
    noise = fns["noise"](params, opt.init(params), batch, key)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(noise)])
    dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(params))
    want = 1.0 * gaussian.normal(key, (flat.size,), dtype)  # float32 here: jit rounds apart
    np.testing.assert_allclose(flat, want, rtol=1e-6, atol=1e-7)


def test_old_noise_program_is_jax_random_normal_and_the_new_one_reaches_further():
    """The baseline row is jax.random.normal's vector (cut at |z| = 5.42 in float32); the
    DP noise is the uncut-tail sampler's, a different vector from the same key."""
    case, params, batch = _setup("cnn-tiny", 4)
    opt, fns = dp.programs(case, 4, l2_clip=0.5, noise_multiplier=2.0)
    key = jax.random.key(3)
    state = opt.init(params)
    old = fns["noise, jax.random.normal"](params, state, batch, key)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(old)])
    dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(params))
    want = 1.0 * np.asarray(jax.random.normal(key, (flat.size,), dtype))
    np.testing.assert_allclose(flat, want, rtol=1e-6, atol=1e-7)
    new = fns["noise"](params, state, batch, key)
    flat_new = np.concatenate([np.ravel(x) for x in jax.tree.leaves(new)])
    assert np.mean(np.abs(flat_new - flat) > 1e-3) > 0.99


def test_main_dp_prints_ratios_and_writes_json(tmp_path, capsys):
    path = tmp_path / "dp.json"
    argv = ["--dp", "--models", "mlp-tiny", "--batch-sizes", "8", "--rounds", "2"]
    assert bench_main.main([*argv, "--json", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("DP/non-private throughput") == 1 and "interleaved" in out
    assert out.count("jax.random.normal's") == 2  # the row's figure and the note
    assert "sampled DP step" in out
    records = json.loads(path.read_text())["records"]
    assert [r["batch_size"] for r in records] == [8]
    for r in records:
        assert set(r["median_s"]) == set(dp.ROWS) and r["rounds"] == 2
        m = r["median_s"]
        assert r["dp_over_nonprivate_throughput"] == pytest.approx(
            m["non-private step"] / m["DP step"]
        )
        assert r["meets_target"] == (r["dp_over_nonprivate_throughput"] >= dp.TARGET)
        assert r["noise_over_jax_normal_time"] == pytest.approx(
            m["noise"] / m["noise, jax.random.normal"]
        )
        assert r["noise_ceiling_throughput"] == pytest.approx(
            m["non-private step"] / m["non-private step + noise"]
        )
        assert r["sampled_over_nonprivate_throughput"] == pytest.approx(
            m["non-private step"] / m["sampled DP step"]
        )
        assert r["sampled_over_ceiling"] == pytest.approx(
            m["non-private step + noise"] / m["sampled DP step"]
        )
        assert r["fit_over_sampled_time"] == pytest.approx(
            m["fit(privacy) step"] / m["sampled DP step"]
        )
        assert r["padding"] == pytest.approx(r["physical_batch_size"] / 8)
        assert r["expected_padding"] >= r["padding"]
        assert r["padded_over_dp_time"] == pytest.approx(m["DP step, P rows"] / m["DP step"])
        assert r["sampled_over_ceiling"] == pytest.approx(
            r["dp_over_ceiling"] / r["padded_over_dp_time"] / r["sampled_over_padded_time"]
        )


def test_fit_steps_are_fit_privacy_steps():
    # The bench's "fit(privacy) step" runs FIT_STEPS steps of fit's own engine: the same
    # parameters as fit(privacy=...) after as many steps, from the same key.
    from jaxgrad.train import PrivacyConfig, fit

    case = suite.CASES["mlp-tiny"]()
    params = case.model.init(jax.random.key(0))
    data = case.make_batch(4 * dp.FIT_STEPS)  # batch 4: FIT_STEPS steps make one epoch
    opt = optax.sgd(0.1)
    key = private_key(5)
    got = dp.fit_steps(case, 4, data, opt=opt)(params, opt.init(params), data, key)
    want = fit(
        case.loss_fn,
        params,
        data,
        optimizer=opt,
        epochs=1,
        batch_size=4,
        key=key,
        privacy=PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0),
        progress="none",
        quiet=True,
    ).state
    assert int(got.step) == dp.FIT_STEPS == int(want.step)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got.params, want.params
    )


def test_main_dp_bad_rounds(capsys):
    with pytest.raises(SystemExit):
        bench_main.main(["--dp", "--rounds", "0"])
    assert "--rounds must be a positive integer; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --rounds without --dp would be ignored: refused
        bench_main.main(["--rounds", "3", "--models", "mlp-tiny"])
    assert "--rounds sets the interleaved rounds of --dp" in capsys.readouterr().err
