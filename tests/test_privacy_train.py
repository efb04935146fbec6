"""DP-SGD training: fit(privacy=...), the CLI's --dp, MNIST-1D, and resume of the privacy state."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import interrupt_then_resume, private_key

import jaxgrad
from jaxgrad import privacy
from jaxgrad.train import PrivacyConfig, run_config
from jaxgrad.train.__main__ import main


def _problem(n=120, seed=0):
    model = jaxgrad.models.mlp([6, 8, 3], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6))
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    return model, loss_fn, (x, y)


FIT = dict(epochs=3, batch_size=20, progress="none")


def _fit(loss_fn, params, data, config, **kw):
    return jaxgrad.train.fit(
        loss_fn,
        params,
        data,
        optimizer=optax.adam(0.05),
        privacy=config,
        **{"key": private_key(5), **FIT, **kw},
    )


CONFIG = PrivacyConfig(l2_clip=0.7, noise_multiplier=1.2, accountant="rdp")


@pytest.fixture(scope="module")
def whole():
    """One uninterrupted private run, shared by the tests below (compiling is the slow part)."""
    model, loss_fn, data = _problem()
    params = model.init(jax.random.key(1))
    return loss_fn, params, data, _fit(loss_fn, params, data, CONFIG)


def test_fit_private_is_the_documented_loop_and_reports_epsilon(whole):
    loss_fn, params, data, result = whole
    # Reference: the loop written out with the (separately tested) noisy gradient.
    q, steps = 20 / 120, 3 * 6
    grad_fn = privacy.sampled_dp_grad(
        loss_fn, l2_clip=0.7, noise_multiplier=1.2, sampling_rate=q, physical_batch_size=20
    )
    opt = optax.adam(0.05)
    p, s = params, opt.init(params)
    dev = jax.tree_util.tree_map(jnp.asarray, data)
    for t in range(steps):
        g = grad_fn(p, dev, jax.random.fold_in(private_key(5), t))
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
    chex.assert_trees_all_close(result.params, p, rtol=1e-10, atol=1e-12)
    assert int(result.state.step) == steps
    eps = [r["epsilon"] for r in result.history]
    want = [
        privacy.epsilon(
            noise_multiplier=1.2, sampling_rate=q, steps=6 * e, delta=1e-5, accountant="rdp"
        )
        for e in (1, 2, 3)
    ]
    assert eps == pytest.approx(want, rel=1e-12) and eps[0] < eps[1] < eps[2]


def test_fit_private_calibrates_sigma_to_the_target():
    config = PrivacyConfig(l2_clip=1.0, target_epsilon=4.0, accountant="rdp")
    plan = jaxgrad.train.private.plan(config, num_examples=120, batch_size=20, epochs=3)
    assert plan.steps == 18 and plan.sampling_rate == pytest.approx(1 / 6)
    spent = plan.epsilon(plan.steps)
    assert 4.0 * 0.97 < spent <= 4.0  # (fit with a target ε runs in the CLI test below)


def test_fit_private_at_a_delta_below_the_plds_reach_calibrates_by_rdp():
    """At δ = 1e-15 dp-accounting's PLD (fit's default) answers ε = inf at every σ near the
    answer: the plan's σ is RDP's (it was 198, spending ε = 0.018 of 2), its ε and record
    say RDP, and dp-accounting's RDP, called directly, certifies the target."""
    import dp_accounting as dpa

    config = PrivacyConfig(l2_clip=1.0, target_epsilon=2.0, delta=1e-15)
    with pytest.warns(privacy.AccountingFallbackWarning, match="answers ε = inf"):
        plan = jaxgrad.train.private.plan(config, num_examples=1438, batch_size=32, epochs=1)
        record = plan.summary(plan.steps)
    q, steps, sigma = plan.sampling_rate, plan.steps, plan.noise_multiplier
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    assert record["epsilon"] == acc.get_epsilon(1e-15) <= 2.0
    assert record["accountant"] == "rdp" and 1 < sigma < 2


def test_fit_private_resume_is_bit_for_bit_and_refuses_changed_privacy(whole, tmp_path):
    loss_fn, params, data, whole = whole
    config = CONFIG
    # interrupted at the end of epoch 2, before its checkpoint
    saved, resumed = interrupt_then_resume(
        functools.partial(_fit, loss_fn, params, data, config), tmp_path, at_evaluate=2
    )
    assert len(saved) == 1  # epoch 1 only
    chex.assert_trees_all_equal(resumed.params, whole.params)
    assert [r["epsilon"] for r in resumed.history] == [r["epsilon"] for r in whole.history]
    for changed in (
        PrivacyConfig(l2_clip=0.5, noise_multiplier=1.2, accountant="rdp"),
        PrivacyConfig(l2_clip=0.7, noise_multiplier=1.0, accountant="rdp"),
        PrivacyConfig(l2_clip=0.7, noise_multiplier=1.2, accountant="pld"),
    ):
        with pytest.raises(ValueError, match="privacy settings changed"):
            _fit(loss_fn, params, data, changed, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="privacy settings changed"):  # planned steps
        _fit(loss_fn, params, data, config, checkpoint_dir=tmp_path, epochs=4)
    # Another loss would replay the same draws and noise on another computation.
    with pytest.raises(ValueError, match="`loss_fn` differs from the private run"):
        _fit(lambda p, ex: 1.5 * loss_fn(p, ex), params, data, config, checkpoint_dir=tmp_path)


def test_loss_fingerprint_sees_the_program_and_its_constants():
    model, loss_fn, data = _problem()
    params = model.init(jax.random.key(1))

    def shifted(by):  # a loss closing over an array
        shift = jnp.full(6, by)
        return lambda p, ex: loss_fn(p, (ex[0] + shift, ex[1]))

    fingerprint = lambda f: run_config.loss_fingerprint(f, params, data)
    assert fingerprint(shifted(0.5)) == fingerprint(shifted(0.5))  # rebuilt: the same
    assert fingerprint(shifted(0.5)) != fingerprint(shifted(0.25))
    assert fingerprint(loss_fn) != fingerprint(shifted(0.5))
    other = jaxgrad.models.mlp([6, 8, 3], activation="relu", dtype=jnp.float64)
    tanh_loss = jaxgrad.losses.supervised(
        other.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    assert fingerprint(loss_fn) != fingerprint(tanh_loss)


@pytest.mark.parametrize("on_mesh", [False, True])
def test_fit_private_nonfinite_examples(on_mesh):
    """Dropped and counted (every step's count against the draws), or stopped at the first
    step that draws one; the same on a (one-device) mesh, whose DP loop is the host's."""
    model, loss_fn, (x, y) = _problem()
    x = x.copy()
    x[::4, 0] = np.nan  # 30 bad examples
    bad = np.isnan(x[:, 0])
    params = model.init(jax.random.key(1))
    mesh = jaxgrad.sharding.data_mesh(1) if on_mesh else None
    config = PrivacyConfig(l2_clip=0.7, noise_multiplier=1.2, accountant="rdp")
    result = _fit(loss_fn, params, (x, y), config, epochs=1, mesh=mesh)
    # The reference: step t's draw is poisson_sample(split(fold_in(key, t))[0]), key = fit's.
    p = privacy.default_physical_batch_size(num_examples=120, sampling_rate=20 / 120)
    drawn_bad = []
    for t in range(6):
        sample_key, _ = jax.random.split(jax.random.fold_in(private_key(5), t))
        s = privacy.poisson_sample(
            sample_key, num_examples=120, sampling_rate=20 / 120, physical_batch_size=p
        )
        drawn_bad.append(int(np.sum(np.asarray(s.mask) & bad)))
    assert sum(drawn_bad) > 0
    # The count of dropped examples is computed on private rows without noise: not released.
    assert "nonfinite" not in result.history[0]
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(result.params))
    # Reference: the steps written out with the (separately tested) dropping noisy gradient.
    grad_fn = privacy.sampled_dp_grad(
        loss_fn, l2_clip=0.7, noise_multiplier=1.2, sampling_rate=20 / 120, physical_batch_size=p
    )
    opt = optax.adam(0.05)
    ref, opt_state = params, opt.init(params)
    for t in range(6):
        g = grad_fn(ref, (x, y), jax.random.fold_in(private_key(5), t))
        updates, opt_state = opt.update(g, opt_state, ref)
        ref = optax.apply_updates(ref, updates)
    chex.assert_trees_all_close(result.params, ref, rtol=1e-10, atol=1e-12)
    first = next(t for t, k in enumerate(drawn_bad) if k)
    strict = PrivacyConfig(l2_clip=0.7, noise_multiplier=1.2, accountant="rdp", nonfinite="raise")
    with pytest.raises(FloatingPointError, match=rf"step {first + 1} \(epoch 1\) .*non-finite"):
        _fit(loss_fn, params, (x, y), strict, epochs=1, mesh=mesh)


def test_fit_private_bad_arguments():
    model, loss_fn, data = _problem()
    params = model.init(jax.random.key(1))
    with pytest.raises(ValueError, match="target_epsilon"):
        _fit(loss_fn, params, data, PrivacyConfig(l2_clip=1.0))
    with pytest.raises(ValueError, match="l2_clip"):
        _fit(loss_fn, params, data, PrivacyConfig(l2_clip=-1.0, noise_multiplier=1.0))
    with pytest.raises(ValueError, match="strategy"):
        _fit(
            loss_fn,
            params,
            data,
            PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0),
            strategy=jaxgrad.mean_of_per_example_grads,
        )
    with pytest.raises(ValueError, match="noise_multiplier"):  # σ too small for the target
        _fit(
            loss_fn,
            params,
            data,
            PrivacyConfig(l2_clip=1.0, noise_multiplier=0.3, target_epsilon=1.0),
        )


def test_fit_private_refuses_rows_standardised_with_their_own_statistics(tmp_path):
    """Standardised with the training split's own mean and scale, every row depends on every
    other: the clipped sum of two neighbouring data sets differs by more than C (checked
    here, in float64, with numpy's statistics and per-example gradients), so a private fit
    refuses such arrays (and numpy views of them: a slice, a row subset by reshape) and
    takes the same rows loaded raw or with given statistics."""
    model, loss_fn, (x, y) = _problem(n=60)
    x = np.abs(x) * 4.0  # positive inputs of mean ~3: centring them moves every row
    x[0] = 40.0  # an outlier, whose removal moves the mean and scale of all the others
    params = model.init(jax.random.key(1))
    one = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))

    def clipped_sum(x_std, y_rows):
        g = one(params, (jnp.asarray(x_std), jnp.asarray(y_rows)))
        flat = np.concatenate([np.reshape(v, (len(y_rows), -1)) for v in jax.tree.leaves(g)], 1)
        return np.minimum(1.0, 1.0 / np.linalg.norm(flat, axis=1)) @ flat  # C = 1

    standardise = lambda a: (a - a.mean()) / a.std()  # "global": one mean and scale
    moved = clipped_sum(standardise(x), y) - clipped_sum(standardise(x[1:]), y[1:])
    assert np.linalg.norm(moved) > 1.0  # one example moved the sum by more than C

    config = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, accountant="rdp")
    kw = dict(x_test=x[:5], y_test=y[:5], task="classification", num_classes=3)
    for standardize in (True, "global", "features"):
        ds = jaxgrad.data.from_arrays(x, y, standardize=standardize, dtype=np.float64, **kw)
        for data in (ds.train, (ds.x_train[:40], ds.y_train[:40]), {"x": ds.x_train}):
            with pytest.raises(ValueError, match=r"`train_data`.* own statistics.*standardize="):
                _fit(loss_fn, params, data, config, epochs=1)
    regression = jaxgrad.data.from_arrays(x, x[:, 0] * 2.0, task="regression")
    assert not jaxgrad.data.own_statistics(x) and jaxgrad.data.own_statistics(regression.y_train)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    rows = jaxgrad.data.load_rows("npz", tmp_path / "d.npz", num_classes=3)
    assert jaxgrad.data.own_statistics(rows.x_train)
    given = {"mean": 3.0, "std": 2.0}
    for standardize in (False, given):
        ds = jaxgrad.data.from_arrays(x, y, standardize=standardize, dtype=np.float64, **kw)
        assert not jaxgrad.data.own_statistics(ds.x_train)
        _fit(loss_fn, params, ds.train, config, epochs=1)


def test_cli_dp_writes_the_privacy_record(tmp_path):
    out = tmp_path / "out.json"
    args = ["--model", "mlp", "--data", "digits", "--dp", "--target-epsilon", "8"]
    args += ["--delta", "1e-5", "--l2-clip", "1.0", "--accountant", "rdp", "--epochs", "1"]
    args += ["--batch-size", "128", "--hidden", "16", "--json", str(out), "--quiet"]
    assert main(args) == 0
    summary = json.loads(out.read_text())
    pv = summary["privacy"]
    n = 1438
    assert pv["sampling_rate"] == pytest.approx(128 / n) and pv["steps"] == -(-n // 128)
    assert pv["accountant"] == "rdp" and pv["delta"] == 1e-5 and pv["l2_clip"] == 1.0
    direct = privacy.epsilon(
        noise_multiplier=pv["noise_multiplier"],
        sampling_rate=pv["sampling_rate"],
        steps=pv["steps"],
        delta=1e-5,
        accountant="rdp",
    )
    assert pv["epsilon"] == pytest.approx(direct) and 7.7 < pv["epsilon"] <= 8.0
    assert summary["history"][-1]["epsilon"] == pytest.approx(pv["epsilon"])


@pytest.mark.parametrize(
    "args,match",
    [
        (["--target-epsilon", "8"], "need"),
        (["--dp"], "exactly one"),
        (["--dp", "--noise-multiplier", "1", "--strategy", "clipped"], "strategy"),
        (["--dp", "--noise-multiplier", "1", "--l2-clip", "0"], "--l2-clip"),
    ],
)
def test_cli_dp_errors(args, match, capsys):
    with pytest.raises(SystemExit):
        main(["--data", "digits", *args, "--quiet"])
    assert match in capsys.readouterr().err


def test_mnist1d_is_generated_offline_and_seeded():
    a = jaxgrad.data.load("mnist1d", num_examples=200, seed=3)
    b = jaxgrad.data.load_mnist1d(num_examples=200, seed=3)
    assert a.x_train.shape == (160, 40) and a.x_test.shape == (40, 40) and a.num_classes == 10
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert set(np.unique(a.y_train)) <= set(range(10)) and len(np.unique(a.y_train)) == 10
    c = jaxgrad.data.load("mnist1d", num_examples=200, seed=4)
    assert not np.array_equal(a.x_train, c.x_train)
    with pytest.raises(ValueError, match="num_examples"):
        jaxgrad.data.load_mnist1d(num_examples=5)


def test_mnist1d_signals_are_the_generators_without_its_own_statistics():
    """mnist1d's make_dataset standardises with the mean and std of all its signals (every
    row a function of every other one); the loader gives the same signals under a fixed
    map, which reads none of them."""
    import mnist1d.data

    from jaxgrad.data import bundled

    ds = jaxgrad.data.load("mnist1d", num_examples=200, seed=3, standardize=False, dtype=np.float64)
    x = np.concatenate([ds.x_train, ds.x_test]) * bundled.MNIST1D_STD + bundled.MNIST1D_MEAN
    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed, args.train_split = 200, 3, 0.8
    reference = mnist1d.data.make_dataset(args)
    want = np.concatenate([reference["x"], reference["x_test"]])
    np.testing.assert_allclose((x - x.mean()) / x.std(), want, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(ds.y_train, reference["y"])
    assert not jaxgrad.data.own_statistics(ds.x_train)
    assert 0.9 < np.std(ds.x_train) < 1.1 and abs(np.mean(ds.x_train)) < 0.1


def test_a_private_fit_given_a_small_seed_key_warns_before_training():
    """fit(privacy=..., key=jax.random.key(5)) ran silently: its key data is (0, 5), so every
    draw and noise vector is reproducible by whoever tries the seeds below 2**32, and the ε
    it reported certified nothing (the CLI labels such a run "private": false). A key from
    OS entropy, or any key with a non-zero leading word, runs quietly. (``keep=0`` stops
    each call right after the key is checked: no training.)"""
    import warnings

    from jaxgrad import keys

    model, loss_fn, data = _problem(n=20)
    params = model.init(jax.random.key(1))
    stop = dict(keep=0, epochs=1, batch_size=5, progress="none")
    with pytest.warns(keys.SeededKeyWarning, match=r"jax\.random\.key\(seed\).*key=None"):
        with pytest.raises(ValueError, match="keep"):
            _fit(loss_fn, params, data, CONFIG, key=jax.random.key(5), **stop)
    secret = jax.random.wrap_key_data(np.array([0x9E3779B9, 5], np.uint32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", keys.SeededKeyWarning)
        for key in (None, secret):
            with pytest.raises(ValueError, match="keep"):
                jaxgrad.train.fit(
                    loss_fn,
                    params,
                    data,
                    optimizer=optax.sgd(0.1),
                    key=key,
                    privacy=CONFIG,
                    **stop,
                )
        with pytest.raises(ValueError, match="keep"):  # not private: a seed is the shuffle's
            jaxgrad.train.fit(
                loss_fn, params, data, optimizer=optax.sgd(0.1), key=jax.random.key(5), **stop
            )
    # Every implementation's seeded form; OS-entropy keys are not (a false alarm of this
    # test has probability 2**-32 per key).
    assert all(keys.is_seeded(jax.random.key(5, impl=i)) for i in ("threefry2x32", "rbg"))
    assert not any(keys.is_seeded(keys.entropy_key(i)) for i in ["rbg"] + ["threefry2x32"] * 50)
