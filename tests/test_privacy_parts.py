"""The DP step as parts (clipped sum with its sensitivity, privatizer, key schedule), the one
non-finite policy, and the behaviours the one training loop gives plain and private runs alike."""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import interrupt_then_resume, private_key, run_interrupted

import jaxgrad
from jaxgrad import keys, privacy
from jaxgrad.train import NonFiniteLossError, PrivacyConfig, checkpoint, run_config


def _problem(n=40, seed=0):
    model = jaxgrad.models.mlp([5, 6, 3], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5))
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    return model, loss_fn, (x, y), model.init(jax.random.key(1))


def _clipped_sum_reference(loss_fn, params, data, mask, clip):
    """numpy: each example's jax.grad, the non-finite ones left out, clipped, summed."""
    grad = jax.jit(jax.grad(loss_fn))  # compiled once for the loop
    total = jax.tree_util.tree_map(np.zeros_like, params)
    for i in np.flatnonzero(mask):
        example = jax.tree_util.tree_map(lambda a, i=i: a[i], data)
        g = grad(params, example)
        norm = np.linalg.norm(np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(g)]))
        if np.isfinite(norm):
            factor = min(1, clip / norm)
            total = jax.tree_util.tree_map(lambda t, v, f=factor: t + v * f, total, g)
    return total


def test_clipped_sum_part_carries_its_sensitivity_and_drops_nonfinite_examples():
    _, loss_fn, (x, y), params = _problem()
    x = x.copy()
    x[[3, 17], 2] = np.nan
    mask = np.arange(40) % 5 != 0
    part = privacy.ClippedSum(loss_fn, l2_clip=0.3)
    assert part.sensitivity == 0.3
    total, kept, bad = part(params, (x, y), jnp.asarray(mask))
    assert int(bad) == 2 and int(kept) == int(mask.sum()) - 2
    ref = _clipped_sum_reference(loss_fn, params, (x, y), mask, 0.3)
    chex.assert_trees_all_close(total, ref, rtol=1e-10, atol=1e-12)


def test_one_nonfinite_policy_all_dropped_and_nonfinite_params():
    """An empty sum is 0 and an empty mean NaN, in clipped_grad and the DP step alike; params
    that are not finite give NaN under every policy (never a gradient of noise alone)."""
    _, loss_fn, (x, y), params = _problem(n=6)
    nan_x = np.full_like(x, np.nan)
    summed = jaxgrad.clipped_grad(loss_fn, l2_clip=1.0, reduction="sum", nonfinite="drop")
    mean = jaxgrad.clipped_grad(loss_fn, l2_clip=1.0, reduction="mean", nonfinite="drop")
    for leaf in jax.tree_util.tree_leaves(summed(params, (nan_x, y))):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    assert all(np.isnan(v).all() for v in jax.tree_util.tree_leaves(mean(params, (nan_x, y))))
    dp = privacy.dp_grad(
        loss_fn, l2_clip=1.0, noise_multiplier=0.0, expected_batch_size=3.0, return_info=True
    )
    g, info = dp(params, (nan_x, y), None, private_key(0))
    assert int(info.num_nonfinite) == 6
    for leaf in jax.tree_util.tree_leaves(g):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    bad_params = jax.tree_util.tree_map(lambda v: v.at[(0,) * v.ndim].set(jnp.nan), params)
    sampled = privacy.sampled_dp_grad(
        loss_fn, l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, physical_batch_size=4
    )
    for f in (
        lambda p: summed(p, (x, y)),
        lambda p: jaxgrad.clipped_grad(loss_fn, l2_clip=1.0, nonfinite="propagate")(p, (x, y)),
        lambda p: privacy.dp_grad(
            loss_fn, l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=3.0
        )(p, (x, y), None, private_key(0)),
        lambda p: sampled(p, (x, y), private_key(0)),
    ):
        assert all(np.isnan(v).all() for v in jax.tree_util.tree_leaves(f(bad_params)))


def test_dp_steps_refuse_out_of_range_labels():
    """Every other entry point refuses a label outside the classes; the DP steps used to drop
    such an example as non-finite (a whole class could vanish silently)."""
    _, loss_fn, (x, y), params = _problem(n=8)
    y = y.copy()
    y[2] = 7
    dp = privacy.dp_grad(loss_fn, l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=4.0)
    with pytest.raises(ValueError, match=r"labels .* must lie in \[0, 3\)"):
        dp(params, (x, y), None, private_key(0))
    sampled = privacy.sampled_dp_grad(
        loss_fn, l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, physical_batch_size=4
    )
    with pytest.raises(ValueError, match=r"labels .* must lie in \[0, 3\)"):
        sampled(params, (x, y), private_key(0))


def test_gaussian_privatizer_noises_the_sum_once_and_divides_by_the_public_size():
    """u_t = (S_t + N(0, σ²Δ² I)) / B_e with step t's noise key split(fold_in(K, t))[1]; chained
    with optax.sgd it is the DP-SGD update. σ = 0: exactly S_t / B_e."""
    key, sums = private_key(3), {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = privacy.gaussian_privatizer(
        noise_multiplier=1.5, l2_sensitivity=0.5, expected_batch_size=8.0, key=key
    )
    state = tx.init(sums)
    for t in range(3):
        out, state = tx.update(sums, state)
        _, noise_key = jax.random.split(jax.random.fold_in(key, t))
        ref = privacy.noised_average(sums, noise_key, stddev=0.75, expected_batch_size=8.0)
        chex.assert_trees_all_close(out, ref, rtol=0, atol=0)
    assert int(state.count) == 3
    exact = privacy.gaussian_privatizer(
        noise_multiplier=0.0, l2_sensitivity=0.5, expected_batch_size=8.0, key=key
    )
    out, _ = exact.update(sums, exact.init(sums))
    chex.assert_trees_all_close(out, jax.tree_util.tree_map(lambda s: s / 8.0, sums))
    with pytest.raises(ValueError, match="l2_sensitivity"):
        privacy.gaussian_privatizer(
            noise_multiplier=1.0, l2_sensitivity=0.0, expected_batch_size=8.0, key=key
        )
    with pytest.raises(TypeError, match="`key` must be one PRNG key"):
        privacy.gaussian_privatizer(
            noise_multiplier=1.0, l2_sensitivity=1.0, expected_batch_size=8.0, key=3
        )


def test_an_overflowing_noise_scale_names_the_users_arguments():
    """σ and C each finite, σC (or √(Σ_g C_g²)) past float64's range: the error named
    `stddev`, an argument of add_noise no user passed, and per-group clip norms of 1e200
    (Δ₂ = 1.41e200, representable) overflowed in their sum of squares."""
    loss = lambda w, ex: jnp.dot(ex, w)
    big = dict(noise_multiplier=1e200, expected_batch_size=2.0)
    cases = [
        (lambda: privacy.dp_grad(loss, l2_clip=1e200, **big), "l2_clip"),
        (
            lambda: privacy.sampled_dp_grad(
                loss,
                l2_clip=1e200,
                noise_multiplier=1e200,
                sampling_rate=0.5,
                physical_batch_size=2,
            ),
            "l2_clip",
        ),
        (
            lambda: privacy.gaussian_privatizer(l2_sensitivity=1e200, key=None, **big),
            "l2_sensitivity",
        ),
        (
            lambda: privacy.bandmf_privatizer(coefs=[1.0], l2_sensitivity=1e200, key=None, **big),
            "l2_sensitivity",
        ),
        (
            lambda: privacy.quantile_privatizer(
                initial_clip=1e300,
                adaptive_clip=privacy.AdaptiveClip(count_noise_multiplier=1e200),
                **big,
            ),
            "initial_clip",
        ),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=rf"`noise_multiplier` × `{name}`") as info:
            make()
        assert re.search(r"σ=1[.\d]*e\+200", str(info.value)), str(info.value)
        assert "stddev" not in str(info.value)
    # σ_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2) divided by zero once σ⁻² underflowed (σ ≳ 1e154)
    split = privacy.split_noise_multiplier(1e200, count_noise_multiplier=1e200)
    assert math.isclose(split, 2e200 / math.sqrt(3), rel_tol=1e-15)
    # σC = 1e40 is a float64 but past float32's range: the noise of float32 sums was ±inf
    f32 = privacy.dp_grad(loss, l2_clip=1e20, noise_multiplier=1e20, expected_batch_size=2.0)
    with pytest.raises(ValueError, match=r"float32's largest.*got 1e\+40.*`noise_multiplier`"):
        f32(jnp.zeros(2, jnp.float32), jnp.ones((2, 2), jnp.float32), None, private_key(0))
    groups = {"a": 1e200, "b": 1e200}
    assert privacy.ClippedSum(loss, l2_clip=groups).sensitivity == math.hypot(1e200, 1e200)
    with pytest.raises(ValueError, match=r"`l2_clip`'s per-group clip norms.*1\.5e\+308"):
        privacy.ClippedSum(loss, l2_clip={"a": 1.5e308, "b": 1.5e308})


def test_a_seeded_key_warns_at_every_private_entry_point_given_one():
    """Only fit(privacy=...) warned of a key made from a small seed (key data (0, s): its
    draws and noise are public); a privatizer, dp_grad or a Poisson draw given one ran quietly.
    Now each warns once, at the caller's line, before any computation (each call here then
    fails on a bad later argument: nothing is compiled); a key from OS entropy, or a traced
    one (under jit, nothing to inspect), is quiet."""
    import warnings

    from jaxgrad.privacy import adaptive, sampling, sources

    loss = lambda w, ex: jnp.dot(ex, w)
    w, x = jnp.zeros(3), jnp.ones((4, 2))  # w of the wrong size: tracing fails
    kw = dict(noise_multiplier=1.0, expected_batch_size=2.0)
    dp_grad = privacy.dp_grad(loss, l2_clip=1.0, **kw)
    sampled = privacy.sampled_dp_grad(
        loss, l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, physical_batch_size=4
    )
    next_clip = lambda k, clip=1.0: adaptive.next_clip(
        jnp.float32(clip),
        1.0,
        k,
        target_quantile=0.5,
        learning_rate=0.2,
        count_noise_multiplier=1.0,
        expected_batch_size=2.0,
    )
    entries = {  # (call, the error after the key's check)
        "gaussian_privatizer": (
            lambda k: privacy.gaussian_privatizer(l2_sensitivity=1.0, key=k, **kw),
            None,
        ),
        "bandmf_privatizer": (
            lambda k: privacy.bandmf_privatizer(coefs=[1.0], l2_sensitivity=1.0, key=k, **kw),
            None,
        ),
        "dp_grad": (lambda k: dp_grad(w, x, None, k), TypeError),
        "sampled_dp_grad": (lambda k: sampled(w, x, k), TypeError),
        "noised_average": (
            lambda k: privacy.noised_average(w, k, stddev=-1.0, expected_batch_size=2),
            ValueError,
        ),
        "inclusion_mask": (  # poisson_sample's, the sources' (but one)
            lambda k: sampling.inclusion_mask(k, sampling_rate=0.5, num_examples=0),
            ValueError,
        ),
        "WithoutReplacement": (
            lambda k: sources.WithoutReplacement(batch_size=2).sample(
                k, num_examples=0, physical_batch_size=2
            ),
            ValueError,
        ),
    }
    seeded, secret = jax.random.key(3), keys.entropy_key()
    for name, (call, error) in entries.items():
        for key in (seeded, secret):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if error is None:
                    call(key)
                else:
                    with pytest.raises(error):
                        call(key)
            caught = [c for c in caught if c.category is keys.SeededKeyWarning]
            assert len(caught) == (key is seeded), (name, [str(c.message) for c in caught])
            if caught:  # at the caller's line, not jaxgrad's
                assert caught[0].filename == __file__, (name, caught[0].filename)
                assert "`key` of this private run" in str(caught[0].message)
    with pytest.warns(keys.SeededKeyWarning, match=r"`key` of this private run"):
        next_clip(seeded)  # the count's noise (computed: it has no later argument to refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error", keys.SeededKeyWarning)
        jax.jit(next_clip)(seeded)  # traced: no value to inspect, and no error
    # Closed over in the caller's jit, the key is concrete: inspected (its data read eagerly,
    # not staged into the trace: that raised TracerArrayConversionError).
    with pytest.warns(keys.SeededKeyWarning, match=r"`key` of this private run"):
        jax.jit(lambda c: privacy.add_noise(c, seeded, stddev=1.0))(jnp.zeros(2))


def test_quantile_privatizer_refuses_one_key_for_both_noises():
    """noise_key == count_key: the count's noise z was entry 0 of the gradient noise's own
    normals (gaussian.normal of one key), not independent of it. Concrete keys only."""
    tx = privacy.quantile_privatizer(
        noise_multiplier=1.0,
        initial_clip=1.0,
        expected_batch_size=2.0,
        adaptive_clip=privacy.AdaptiveClip(count_noise_multiplier=2.0),
    )
    w = jnp.zeros(2)
    sums, state, key = privacy.QuantileSum(w, jnp.float32(0.0)), tx.init(w), private_key(0)
    with pytest.raises(ValueError, match=r"`count_key` must differ from `noise_key`"):
        tx.update(sums, state, noise_key=key, count_key=key)


def test_gaussian_privatizer_noise_scale():
    """The noise on the average has std σΔ/B_e. n = 200 000 coordinates: the sample variance's
    relative error has sd √(2/n) = 0.32 %; the bound 2.5 % is 7.9 sd (false alarm < 1e-14)."""
    zeros = jnp.zeros(200_000)
    tx = privacy.gaussian_privatizer(
        noise_multiplier=2.0, l2_sensitivity=0.5, expected_batch_size=4.0, key=private_key(9)
    )
    out, _ = tx.update(zeros, tx.init(zeros))
    assert abs(float(jnp.std(out)) / (2.0 * 0.5 / 4.0) - 1) < 0.025
    assert abs(float(jnp.mean(out))) < 8 * (0.25 / math.sqrt(200_000))


def test_key_schedule_is_one_function_of_key_step_row():
    key = jax.random.key(4)
    sample_key, noise_key = keys.dp_keys(key, 7)
    ref_sample, ref_noise = jax.random.split(jax.random.fold_in(key, 7))
    assert (jax.random.key_data(sample_key) == jax.random.key_data(ref_sample)).all()
    assert (jax.random.key_data(noise_key) == jax.random.key_data(ref_noise)).all()
    rows = jnp.array([0, 5, 9])
    got = jax.random.key_data(keys.row_keys(key, 2, rows))
    loss_root = jax.random.fold_in(key, 0x6C6F7373)  # "loss": apart from the DP keys of `key`
    for r, k in zip(rows, got, strict=True):
        ref = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(loss_root, 2), r))
        np.testing.assert_array_equal(k, ref)
    a, b = keys.entropy_key(), keys.entropy_key()
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))


# The one loop: what plain and private training share is tested once, for both.
PRIVATE = PrivacyConfig(l2_clip=0.7, noise_multiplier=1.1, accountant="rdp")


def _fit(loss_fn, params, data, privacy_config, **kw):
    kw = {"epochs": 2, "batch_size": 10, "progress": "none", "key": private_key(5), **kw}
    return jaxgrad.train.fit(
        loss_fn, params, data, optimizer=optax.adam(0.05), privacy=privacy_config, **kw
    )


@pytest.mark.parametrize("private", [False, True], ids=["plain", "private"])
def test_resume_and_chunks_are_the_same_for_plain_and_private(private, tmp_path):
    """Chunks (steps_per_call, checkpoint_every) and a resume from a mid-epoch checkpoint end
    bit for bit where the uninterrupted run does."""
    _, loss_fn, data, params = _problem()
    config = PRIVATE if private else None
    whole = _fit(loss_fn, params, data, config)
    chunked = _fit(loss_fn, params, data, config, steps_per_call=3)
    chex.assert_trees_all_equal(chunked.params, whole.params)
    # stopped at the end of epoch 2, before its last checkpoint (fit evaluates first)
    saved, resumed = interrupt_then_resume(
        functools.partial(_fit, loss_fn, params, data, config, checkpoint_every=3),
        tmp_path,
        at_evaluate=2,
    )
    assert len(saved) == 2  # a mid-epoch one among them
    chex.assert_trees_all_equal(resumed.params, whole.params)
    assert [r["step"] for r in resumed.history] == [4, 8]
    unscanned = _fit(loss_fn, params, data, config, scan=False)
    chex.assert_trees_all_close(unscanned.params, whole.params, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("private", [False, True], ids=["plain", "private"])
def test_a_step_that_makes_the_state_nonfinite_is_never_kept(private):
    """An update that overflows the parameters stops training before that step, with the
    last finite state, for plain and private runs alike (the DP loop had no guard)."""
    _, loss_fn, data, params = _problem()
    with pytest.raises(NonFiniteLossError) as info:
        jaxgrad.train.fit(
            loss_fn,
            params,
            data,
            optimizer=optax.sgd(float("inf")),  # the first update overflows
            epochs=1,
            batch_size=10,
            key=private_key(5),
            progress="none",
            privacy=PRIVATE if private else None,
        )
    assert info.value.step >= 1
    assert bool(jaxgrad.reduce.all_finite(info.value.state))


def test_private_history_releases_only_what_the_guarantee_covers():
    _, loss_fn, data, params = _problem()
    result = _fit(loss_fn, params, data, PRIVATE, evaluate=lambda p: {"test_metric": 1.0})
    for record in result.history:
        assert set(record) == {"epoch", "step", "epsilon", "test_metric"}
    assert result.history[-1]["epsilon"] == pytest.approx(
        privacy.epsilon(
            noise_multiplier=1.1, sampling_rate=10 / 40, steps=8, delta=1e-5, accountant="rdp"
        )
    )


def test_private_fit_without_a_key_draws_one_from_os_entropy_and_resumes_with_it(tmp_path):
    _, loss_fn, data, params = _problem()
    a = _fit(loss_fn, params, data, PRIVATE, key=None, epochs=1)
    b = _fit(loss_fn, params, data, PRIVATE, key=None, epochs=1)
    assert not np.allclose(a.params[0]["w"], b.params[0]["w"])  # two draws, two keys
    # stopped at the end of epoch 2, before its checkpoint: epoch 1's is the only one
    (path,) = run_interrupted(
        functools.partial(_fit, loss_fn, params, data, PRIVATE, key=None), tmp_path, at_evaluate=2
    )
    tree, meta = checkpoint.load(path, {"state": a.state, "key": jax.random.key(0)})
    assert meta["config"]["key"] == "os-entropy"  # the key itself is only in the checkpoint
    resumed = _fit(loss_fn, params, data, PRIVATE, key=None, checkpoint_dir=tmp_path)
    whole = _fit(loss_fn, params, data, PRIVATE, key=tree["key"])
    chex.assert_trees_all_equal(resumed.params, whole.params)
    with pytest.raises(TypeError, match="`key` must be one PRNG key"):
        _fit(loss_fn, params, data, None, key=None)


def test_delta_of_at_least_one_over_n_is_refused_before_training():
    """δ ≥ 1/N certifies nothing (publishing one random example is (0, 1/N)-DP): fit and the
    CLI refuse it, naming the argument, before any data is read or σ calibrated."""
    _, loss_fn, data, params = _problem()  # N = 40
    with pytest.raises(ValueError, match=r"`delta`.*1/N"):
        _fit(loss_fn, params, data, PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, delta=0.025))
    _fit(loss_fn, params, data, PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, delta=0.02))
    from jaxgrad.train.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "line", "--dp", "--noise-multiplier", "1", "--delta", "0.01", "--quiet"])
    assert exit_info.value.code == 2


def test_a_private_run_resumes_only_on_the_same_data_and_optimizer(tmp_path, monkeypatch):
    """Resumed on other data or with other hyperparameters, a private run would replay the
    noise and draws of steps already released on another computation: refused (the data's
    hash is named, never shown)."""
    _, loss_fn, (x, y), params = _problem()
    _fit(loss_fn, params, (x, y), PRIVATE, epochs=1, checkpoint_dir=tmp_path)

    def again(data, lr, epochs=1):
        return jaxgrad.train.fit(
            loss_fn,
            params,
            data,
            optimizer=optax.adam(lr),
            epochs=epochs,
            batch_size=10,
            key=private_key(5),
            progress="none",
            privacy=PRIVATE,
            checkpoint_dir=tmp_path,
        )

    again((x, y), 0.05)  # the same run: resumes (nothing left to do)
    changed = x.copy()
    changed[0, 0] += 5.0
    with pytest.raises(checkpoint.CheckpointError, match=r"data: \(secret\) -> \(secret\)"):
        again((changed, y), 0.05)
    with pytest.raises(checkpoint.CheckpointError, match="hyperparameters differ from the private"):
        again((x, y), 0.3)

    # Memory-mapped data (never read whole) is told apart too, by its shape and rows spread
    # over it (8 of them here): a run on one file does not resume on another of the same shape.
    monkeypatch.setattr(run_config, "HASHED_ROWS", 8)
    mapped = tmp_path / "mapped"
    for name, rows in (("a", x), ("b", x[::-1])):
        np.savez(tmp_path / f"{name}.npz", x=rows, y=y)
    memmap = lambda name: tuple(
        jaxgrad.data.memmap(tmp_path / f"{name}.npz", key=k) for k in ("x", "y")
    )
    resume = dict(epochs=1, checkpoint_dir=mapped)
    _fit(loss_fn, params, memmap("a"), PRIVATE, **resume)
    _fit(loss_fn, params, memmap("a"), PRIVATE, **resume)  # the same file: resumes
    with pytest.raises(checkpoint.CheckpointError, match=r"data: \(secret\) -> \(secret\)"):
        _fit(loss_fn, params, memmap("b"), PRIVATE, **resume)


@pytest.mark.parametrize(("dtype", "n"), [(jnp.bfloat16, 10016), (jnp.float16, 2054)])
def test_parameters_below_float32_are_refused_by_every_clipped_sum(dtype, n):
    """The clipped sum is computed in the parameters' dtype: in bfloat16, 10016 and 10017
    examples of gradient 1 (C = 1) summed to 9984 and 10048, so dp_grad with σ = 4 released
    one or the other in 500 of 500 draws — membership with certainty. Refused by name."""
    spacing = float(jnp.asarray(n + 1.0, dtype)) - float(jnp.asarray(float(n), dtype))
    assert spacing > 1.0  # the rounding alone moves a sum of n examples by more than C = 1
    loss = lambda w, x: jnp.dot(w["a"], x)
    params, x = {"a": jnp.zeros(2, dtype)}, jnp.ones((4, 2), dtype)
    match = rf"`params` leaf \['a'\] has dtype {jnp.dtype(dtype).name}.*expected float32"
    f = privacy.dp_grad(loss, l2_clip=1.0, noise_multiplier=4.0, expected_batch_size=2.0)
    with pytest.raises(TypeError, match=match):
        f(params, x, None, private_key(0))
    with pytest.raises(TypeError, match=match):
        privacy.QuantileClippedSum(loss)(params, x, None, 1.0)
    g = f(jax.tree.map(lambda p: p.astype(jnp.float32), params), x, None, private_key(0))
    assert g["a"].dtype == jnp.float32  # the cast the message asks for trains


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_noise_on_a_sum_below_float32_is_refused_by_every_privatizer(dtype):
    """Noise added to a bfloat16 sum is rounded back to its spacing: at |S| = 3000 that is 16,
    so add_noise(S, σC = 1) returned S itself on every coordinate (and gaussian_privatizer's
    "private" update was the exact clipped sum). Every privatizer adds its noise through
    add_noise, whose check names the argument."""
    total = {"a": jnp.full((4,), 3000.0, dtype)}
    spacing = 2048 * float(jnp.finfo(dtype).eps)  # between 2048 and 4096: 16 or 2
    assert spacing >= 2.0  # noise of std 1 rounds to 0 in at least ~68 % of coordinates
    key = private_key(0)
    match = rf"`total` leaf \['a'\] has dtype {jnp.dtype(dtype).name}.*expected float32"
    kw = dict(noise_multiplier=1.0, l2_sensitivity=1.0, expected_batch_size=1.0, key=key)
    transforms = [privacy.gaussian_privatizer(**kw), privacy.bandmf_privatizer(coefs=[1.0], **kw)]
    with pytest.raises(TypeError, match=match):
        privacy.add_noise(total, key, stddev=1.0)
    with pytest.raises(TypeError, match=match):
        privacy.noised_average(total, key, stddev=1.0, expected_batch_size=2.0)
    for tx in transforms:
        with pytest.raises(TypeError, match=match):
            tx.update(total, tx.init(total))
    # The cast the message asks for gets its noise: N(0, 1) moves each coordinate off 3000.
    wide = jax.tree.map(lambda t: t.astype(jnp.float32), total)
    noisy = privacy.add_noise(wide, key, stddev=1.0)
    assert np.all(np.asarray(noisy["a"]) != np.asarray(wide["a"]))
