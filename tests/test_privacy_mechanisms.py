"""The DP mechanisms as parts: the Accountant, batch sources with their events, the budget stop."""

import dataclasses
import functools
import json
import math
import warnings

import chex
import dp_accounting as dpa
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import interrupt_then_resume, private_key

import jaxgrad
from jaxgrad import keys, privacy
from jaxgrad.privacy import Accountant, AccountingFallbackWarning, accounting, noisy, sources
from jaxgrad.train import PrivacyConfig, private

REL = dpa.NeighboringRelation


def _direct(events, accountant, delta, relation=REL.ADD_OR_REMOVE_ONE, vdi=1e-3):
    """ε of ``[(event, count), ...]`` by dp-accounting, called directly on one composed event."""
    if accountant == "rdp":
        acc = dpa.rdp.RdpAccountant(neighboring_relation=relation)
    else:
        acc = dpa.pld.PLDAccountant(
            neighboring_relation=relation, value_discretization_interval=vdi
        )
    acc.compose(dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(e, c) for e, c in events]))
    return acc.get_epsilon(delta)


POISSON_A = dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1))
POISSON_B = dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(2.0))
GAUSS = dpa.GaussianDpEvent(8.0)


# --- the Accountant --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_accountant_composes_different_events_as_dp_accounting_does(kind):
    acc = Accountant(accountant=kind, delta=1e-5, pld_discretization=1e-3)
    acc.record(noise_multiplier=1.1, sampling_rate=0.01, steps=300)
    acc.record(POISSON_A, steps=200)  # the same event: held once, count 500
    acc.record(GAUSS)
    acc.record(POISSON_B, steps=40)
    assert acc.steps == 541 and len(acc.events) == 3
    expected = _direct([(POISSON_A, 500), (GAUSS, 1), (POISSON_B, 40)], kind, 1e-5)
    assert acc.epsilon() == pytest.approx(expected, rel=1e-12)
    assert acc.epsilon(1e-6) == pytest.approx(
        _direct([(POISSON_A, 500), (GAUSS, 1), (POISSON_B, 40)], kind, 1e-6), rel=1e-12
    )
    # One Poisson event alone is jaxgrad.privacy.epsilon.
    one = Accountant(accountant=kind, delta=1e-5, pld_discretization=1e-3)
    one.record(noise_multiplier=1.1, sampling_rate=0.01, steps=500)
    assert one.epsilon() == privacy.epsilon(
        noise_multiplier=1.1,
        sampling_rate=0.01,
        steps=500,
        delta=1e-5,
        accountant=kind,
        pld_discretization=1e-3,
    )


def test_accountant_state_is_plain_data_and_resumes_exactly():
    acc = Accountant(accountant="pld", delta=1e-5, pld_discretization=1e-3)
    acc.record(POISSON_A, steps=100)
    acc.record(dpa.TruncatedSubsampledGaussianDpEvent(1000, 0.01, 15, 1.0), steps=50)
    state = json.loads(json.dumps(acc.state_dict()))  # survives a JSON checkpoint
    resumed = Accountant.from_state(state)
    assert resumed.state_dict() == acc.state_dict() and resumed.events == acc.events
    resumed.record(POISSON_A, steps=10)
    acc.record(POISSON_A, steps=10)
    assert resumed.epsilon() == acc.epsilon()
    with pytest.raises(ValueError, match="state_dict"):
        Accountant.from_state({"events": []})
    with pytest.raises(ValueError, match="'type' is one of"):
        accounting.event_from_data({"type": "os.system"})


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_steps_within_is_the_last_step_inside_the_budget(kind):
    acc = Accountant(accountant=kind, delta=1e-5, pld_discretization=1e-3)
    acc.record(GAUSS)  # something spent before
    k = acc.steps_within(1.5, noise_multiplier=1.1, sampling_rate=0.01)
    inside = _direct([(GAUSS, 1), (POISSON_A, k)], kind, 1e-5)
    outside = _direct([(GAUSS, 1), (POISSON_A, k + 1)], kind, 1e-5)
    assert k > 10 and inside <= 1.5 < outside
    assert acc.steps_within(1.5, POISSON_A, max_steps=5) == 5
    assert acc.steps_within(1e-6, POISSON_A) == 0  # the Gaussian alone spends more


def test_accountant_falls_back_to_rdp_and_refuses_what_it_cannot_account():
    tiny = dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(0.01))
    acc = Accountant(accountant="pld", delta=1e-5)
    acc.record(tiny, steps=1000)
    with pytest.warns(AccountingFallbackWarning, match="RDP accountant instead"):
        eps = acc.epsilon()
    assert acc.effective_accountant() == "rdp"
    assert eps == _direct([(tiny, 1000)], "rdp", 1e-5)
    wor = dpa.SampledWithoutReplacementDpEvent(1000, 10, dpa.GaussianDpEvent(1.0))
    with pytest.raises(ValueError, match="accountant='rdp' can"):
        Accountant(accountant="pld", neighboring_relation="replace_one").record(wor)
    with pytest.raises(ValueError, match="'replace_one'"):
        Accountant(accountant="rdp").record(wor)
    trunc = dpa.TruncatedSubsampledGaussianDpEvent(1000, 0.01, 15, 1.0)
    with pytest.raises(ValueError, match="accountant='pld' can"):
        Accountant(accountant="rdp").record(trunc)
    with pytest.raises(ValueError, match="PLD of the recorded events is too large"):
        big = Accountant(accountant="pld", delta=1e-5)
        big.record(dpa.TruncatedSubsampledGaussianDpEvent(1000, 0.01, 15, 0.01), steps=1000)
        big.epsilon()
    with pytest.raises(ValueError, match="give `delta`"):
        Accountant().epsilon()
    with pytest.raises(ValueError, match="not both"):
        Accountant().record(POISSON_A, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="`event` must be one of"):
        Accountant().record(dpa.LaplaceDpEvent(1.0))
    with pytest.raises(ValueError, match="`neighboring_relation` must be one of"):
        Accountant(neighboring_relation="replace_special")
    with pytest.raises(ValueError, match="`steps` must be a non-negative"):
        Accountant().record(POISSON_A, steps=-1)


# --- batch sources ---------------------------------------------------------------------


def test_source_events_are_dp_accountings_with_the_relation_stated():
    n, sigma = 1000, 1.3
    p = sources.Poisson(sampling_rate=0.02)
    t = sources.TruncatedPoisson(sampling_rate=0.02, max_batch_size=25)
    w = sources.WithoutReplacement(batch_size=20)
    assert p.dp_event(noise_multiplier=sigma, num_examples=n) == dpa.PoissonSampledDpEvent(
        0.02, dpa.GaussianDpEvent(sigma)
    )
    assert t.dp_event(
        noise_multiplier=sigma, num_examples=n
    ) == dpa.TruncatedSubsampledGaussianDpEvent(n, 0.02, 25, sigma)
    # Replace-one moves the clipped sum by up to 2C: σC of noise is σ/2 per unit of it.
    assert w.dp_event(noise_multiplier=sigma, num_examples=n) == (
        dpa.SampledWithoutReplacementDpEvent(n, 20, dpa.GaussianDpEvent(sigma / 2))
    )
    assert (p.neighboring_relation, t.neighboring_relation, w.neighboring_relation) == (
        "add_or_remove_one",
        "add_or_remove_one",
        "replace_one",
    )
    acc = Accountant(accountant="rdp", delta=1e-5, neighboring_relation="replace_one")
    acc.record(w.dp_event(noise_multiplier=sigma, num_examples=n), steps=30)
    expected = _direct(
        [(dpa.SampledWithoutReplacementDpEvent(n, 20, dpa.GaussianDpEvent(sigma / 2)), 30)],
        "rdp",
        1e-5,
        relation=REL.REPLACE_ONE,
    )
    assert acc.epsilon() == expected
    # A truncation that never happens (cap = N) is Poisson sampling's ε exactly.
    never = sources.TruncatedPoisson(sampling_rate=0.02, max_batch_size=n)
    acc = Accountant(accountant="pld", delta=1e-5, pld_discretization=1e-3)
    acc.record(never.dp_event(noise_multiplier=sigma, num_examples=n), steps=50)
    assert acc.epsilon() == _direct(
        [(p.dp_event(noise_multiplier=sigma, num_examples=n), 50)], "pld", 1e-5
    )


def test_a_shuffled_epoch_is_never_accounted_as_poisson():
    for name in ("shuffle", "shuffled", "epoch"):
        with pytest.raises(ValueError, match="not Poisson sampling"):
            sources.batch_source(name, num_examples=100, batch_size=10)
        with pytest.raises(ValueError, match="not Poisson sampling"):
            private.plan(
                PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, sampling=name),
                num_examples=100,
                batch_size=10,
                epochs=1,
            )
    with pytest.raises(ValueError, match="`sampling` must be one of"):
        sources.batch_source("stratified", num_examples=100, batch_size=10)
    with pytest.raises(ValueError, match="needs `max_batch_size`"):
        sources.batch_source("truncated_poisson", num_examples=100, batch_size=10)
    with pytest.raises(ValueError, match="applies only to sampling='truncated_poisson'"):
        sources.batch_source("poisson", num_examples=100, batch_size=10, max_batch_size=20)
    with pytest.raises(ValueError, match=r"`max_batch_size` \(200\) is larger"):
        sources.batch_source(
            "truncated_poisson", num_examples=100, batch_size=10, max_batch_size=200
        )


def _bound(count, trials, prob, z=5.6):
    """|count − trials·p| ≤ z·sd: two-sided false alarm 2.1e-8 per check at z = 5.6 (normal
    approximation), so ≤ 1e-6 over the ≤ 40 checks of a test."""
    return abs(count - trials * prob) <= z * math.sqrt(trials * prob * (1 - prob))


def test_truncated_poisson_keeps_a_uniform_subset_of_the_draw():
    n, q, cap, trials = 20, 0.5, 3, 2000
    src = sources.TruncatedPoisson(sampling_rate=q, max_batch_size=cap)
    keys_ = jax.random.split(jax.random.key(11), trials)
    draw = jax.jit(jax.vmap(lambda k: src.sample(k, num_examples=n, physical_batch_size=2)))
    # A cap below qN = 10 is what this test needs (most draws cut); it is told, once.
    with pytest.warns(UserWarning, match=r"`max_batch_size` \(3\) is below .* qN = 10: .* 0.30"):
        s = draw(keys_)
    full = jax.vmap(lambda k: privacy.inclusion_mask(k, sampling_rate=q, num_examples=n))(keys_)
    b = np.asarray(full.sum(1))
    assert np.array_equal(np.asarray(s.count), np.minimum(b, cap))
    assert not np.any(np.asarray(s.mask) & ~np.asarray(full))  # kept ⊆ drawn
    idx, count, mask = np.asarray(s.indices), np.asarray(s.count), np.asarray(s.mask)
    for i in range(trials):  # the indices are the kept examples, increasing, then filler
        assert list(idx[i, : count[i]]) == list(np.flatnonzero(mask[i]))
    # Every example is kept with the same probability E[min(b, B)] / N (by symmetry), not
    # by its index (keeping the first B drawn would keep example 0 with probability q).
    from scipy import stats

    sizes = np.arange(n + 1)
    keep = float(np.sum(np.minimum(sizes, cap) * stats.binom.pmf(sizes, n, q))) / n
    counts = np.asarray(s.mask).sum(0)
    assert all(_bound(c, trials, keep) for c in counts), (counts, keep * trials)
    # A draw that fits is the Poisson draw itself.
    small = sources.TruncatedPoisson(sampling_rate=0.1, max_batch_size=n)
    with warnings.catch_warnings():  # a cap at or above qN says nothing
        warnings.simplefilter("error")
        a = small.sample(private_key(3), num_examples=n, physical_batch_size=4)
    p = privacy.poisson_sample(
        private_key(3), num_examples=n, sampling_rate=0.1, physical_batch_size=4
    )
    assert np.array_equal(a.mask, p.mask) and int(a.count) == int(p.count)


def test_without_replacement_draws_b_distinct_uniform_examples():
    n, b, trials = 20, 5, 2000
    src = sources.WithoutReplacement(batch_size=b)
    keys_ = jax.random.split(jax.random.key(12), trials)
    s = jax.jit(jax.vmap(lambda k: src.sample(k, num_examples=n, physical_batch_size=3)))(keys_)
    assert np.all(np.asarray(s.count) == b) and np.all(np.asarray(s.mask).sum(1) == b)
    idx = np.asarray(s.indices)[:, :b]
    assert all(len(set(r)) == b for r in idx)
    assert idx.shape[1] <= s.indices.shape[1] and s.indices.shape[1] == 6  # ⌈5/3⌉·3
    counts = np.asarray(s.mask).sum(0)
    assert all(_bound(c, trials, b / n) for c in counts), counts


@pytest.mark.parametrize("name", ["truncated_poisson", "without_replacement"])
def test_sampled_clipped_sum_of_a_source_is_exact(name):
    """σ = 0: the clipped sum over the source's draw, in physical batches, equals a Python
    loop over the kept examples' per-example gradients (float64)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((30, 4)), rng.standard_normal(4)
    loss = lambda w, ex: jnp.sum(jnp.tanh(ex * w)) ** 2
    cap = {"max_batch_size": 7} if name == "truncated_poisson" else {}
    src = sources.batch_source(name, num_examples=30, batch_size=6, **cap)
    clipped = noisy.ClippedSum(loss, l2_clip=0.5)
    f = jax.jit(noisy.sampled_clipped_sum(clipped, source=src, physical_batch_size=3))
    key = private_key(4)
    total, count, bad, batches = f(w, x, key)
    sample = src.sample(key, num_examples=30, physical_batch_size=3)
    kept = np.flatnonzero(np.asarray(sample.mask))
    ref, grad = np.zeros(4), jax.jit(jax.grad(loss))
    for i in kept:
        g = np.asarray(grad(w, x[i]))
        ref += g * min(1.0, 0.5 / np.linalg.norm(g))
    chex.assert_trees_all_close(total, ref, atol=1e-12)
    assert int(count) == len(kept) == int(sample.count) and int(bad) == 0
    assert int(batches) == -(-len(kept) // 3)


# --- training: the sources in fit, the budget stop --------------------------------------


def _problem(n=60):
    model = jaxgrad.models.mlp([4, 6, 2], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=2
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 4))
    return loss_fn, model.init(jax.random.key(1)), (x, (x[:, 0] > 0).astype(np.int32))


def _fit(config, epochs=2, **kw):
    loss_fn, params, data = _problem()
    return jaxgrad.train.fit(
        loss_fn,
        params,
        data,
        optimizer=optax.sgd(0.1),
        epochs=epochs,
        batch_size=10,
        key=private_key(5),
        privacy=config,
        progress="none",
        **kw,
    )


def _reference(the_plan, steps):
    """The parts written out step by step (sample, clipped sum, noise once, SGD)."""
    loss_fn, w, data = _problem()
    c = the_plan.config
    clipped = noisy.ClippedSum(loss_fn, l2_clip=c.l2_clip)
    draw = jax.jit(
        noisy.sampled_clipped_sum(
            clipped, source=the_plan.source, physical_batch_size=the_plan.physical_batch_size
        )
    )
    data = jax.tree_util.tree_map(jnp.asarray, data)

    @jax.jit
    def step(w, t):
        sample_key, noise_key = keys.dp_keys(private_key(5), t)
        total, _, _, _ = draw(w, data, sample_key)
        g = privacy.noised_average(
            total,
            noise_key,
            stddev=the_plan.noise_multiplier * c.l2_clip,
            expected_batch_size=the_plan.source.expected_batch_size(60),
        )
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, w, g)

    for t in range(steps):
        w = step(w, t)
    return w


def test_fit_with_truncated_poisson_is_the_documented_loop_and_resumes(tmp_path):
    config = PrivacyConfig(
        l2_clip=0.5,
        noise_multiplier=1.3,
        sampling="truncated_poisson",
        max_batch_size=12,
        physical_batch_size=5,
    )
    # interrupted at the end of epoch 2, before its checkpoint; resumed from epoch 1's
    _, result = interrupt_then_resume(functools.partial(_fit, config), tmp_path, at_evaluate=2)
    the_plan = private.plan(config, num_examples=60, batch_size=10, epochs=2)
    src = the_plan.source
    chex.assert_trees_all_close(result.params, _reference(the_plan, 12), atol=1e-12)
    acc = Accountant(
        accountant=config.accountant,
        delta=1e-5,
        neighboring_relation=src.neighboring_relation,
        pld_discretization=1e-3,
    )
    acc.record(src.dp_event(noise_multiplier=1.3, num_examples=60), steps=12)
    assert result.history[-1]["epsilon"] == acc.epsilon()


def test_fit_stops_after_the_last_step_within_the_budget(tmp_path):
    """Sampling without replacement, σ given, a budget spent in epoch 3 of 4: training stops
    after the last step within it, is the documented loop up to there, and a resumed run
    stops there too."""
    config = PrivacyConfig(
        l2_clip=0.5,
        noise_multiplier=3.0,
        sampling="without_replacement",
        accountant="rdp",
        stop_at_epsilon=4.7,
    )
    the_plan = private.plan(config, num_examples=60, batch_size=10, epochs=4)
    stop = the_plan.stop_step
    event = dpa.SampledWithoutReplacementDpEvent(60, 10, dpa.GaussianDpEvent(1.5))
    direct = lambda t: _direct([(event, t)], "rdp", 1e-5, relation=REL.REPLACE_ONE)
    assert 12 < stop < 18 and direct(stop) <= 4.7 < direct(stop + 1)  # inside epoch 3
    result = _fit(config, epochs=4, checkpoint_dir=tmp_path)
    assert int(result.state.step) == stop and len(result.history) == 3
    assert result.history[-1]["step"] == stop
    assert result.history[-1]["epsilon"] == pytest.approx(direct(stop), rel=1e-12)
    chex.assert_trees_all_close(result.params, _reference(the_plan, stop), atol=1e-12)
    # The same on a (one-device) mesh, whose DP loop draws on the host.
    on_mesh = _fit(config, epochs=4, mesh=jaxgrad.sharding.data_mesh(1))
    assert int(on_mesh.state.step) == stop
    chex.assert_trees_all_close(on_mesh.params, result.params, atol=1e-12)
    again = _fit(config, epochs=4, checkpoint_dir=tmp_path)  # resumed: nothing left to do
    chex.assert_trees_all_equal(again.params, result.params)
    assert again.history == result.history
    with pytest.raises(ValueError, match="not one step fits"):
        private.plan(
            dataclasses.replace(config, stop_at_epsilon=0.01),
            num_examples=60,
            batch_size=10,
            epochs=1,
        )
    with pytest.raises(ValueError, match="`stop_at_epsilon` must be"):
        private.plan(
            dataclasses.replace(config, stop_at_epsilon=-1.0),
            num_examples=60,
            batch_size=10,
            epochs=1,
        )


def test_stop_at_epsilon_counts_poisson_steps_as_dp_accounting_does():
    config = PrivacyConfig(l2_clip=0.5, noise_multiplier=2.0, accountant="rdp", stop_at_epsilon=2.0)
    the_plan = private.plan(config, num_examples=60, batch_size=10, epochs=6)
    direct = lambda t: _direct([(POISSON_STEP, t)], "rdp", 1e-5)
    assert direct(the_plan.stop_step) <= 2.0 < direct(the_plan.stop_step + 1)
    assert the_plan.summary(0)["stop_step"] == the_plan.stop_step < the_plan.steps
    unlimited = private.plan(
        dataclasses.replace(config, stop_at_epsilon=100.0), num_examples=60, batch_size=10, epochs=6
    )
    assert unlimited.stop_step == unlimited.steps == 36


POISSON_STEP = dpa.PoissonSampledDpEvent(10 / 60, dpa.GaussianDpEvent(2.0))


def test_plan_refuses_a_sampling_its_accountant_cannot_account():
    with pytest.raises(ValueError, match="accountant='rdp' can"):
        private.plan(
            PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, sampling="without_replacement"),
            num_examples=100,
            batch_size=10,
            epochs=1,
        )
    with pytest.raises(ValueError, match="accountant='pld' can"):
        private.plan(
            PrivacyConfig(
                l2_clip=1.0,
                noise_multiplier=1.0,
                sampling="truncated_poisson",
                max_batch_size=20,
                accountant="rdp",
            ),
            num_examples=100,
            batch_size=10,
            epochs=1,
        )


def test_calibration_of_a_source_meets_the_target():
    src = sources.WithoutReplacement(batch_size=10)
    make = lambda s: src.dp_event(noise_multiplier=s, num_examples=100)
    sigma = accounting.calibrate_event_noise(
        make,
        target_epsilon=2.0,
        delta=1e-5,
        steps=10,
        accountant="rdp",
        neighboring_relation="replace_one",
        tol=1e-2,
    )
    eps = lambda s: _direct([(make(s), 10)], "rdp", 1e-5, relation=REL.REPLACE_ONE)
    assert eps(sigma) <= 2.0 < eps(sigma - 1e-2)


def test_sampled_dp_grad_takes_a_source():
    """Your own loop: sampled_dp_grad(source=...) is the source's draw, clipped, summed and
    divided by its expected batch size (σ = 0, against a per-example loop)."""
    rng = np.random.default_rng(2)
    x, w = jnp.asarray(rng.standard_normal((30, 3))), rng.standard_normal(3)
    loss = lambda w, ex: jnp.dot(ex, w) ** 2
    src = sources.WithoutReplacement(batch_size=8)
    f = privacy.sampled_dp_grad(
        loss, l2_clip=1.0, noise_multiplier=0.0, physical_batch_size=4, source=src
    )
    key = private_key(7)
    sample_key, _ = keys.split_step_key(key)
    sample = src.sample(sample_key, num_examples=30, physical_batch_size=4)
    ref, grad = np.zeros(3), jax.jit(jax.grad(loss))
    for i in np.flatnonzero(np.asarray(sample.mask)):
        g = np.asarray(grad(w, x[i]))
        ref += g * min(1.0, 1.0 / np.linalg.norm(g))
    chex.assert_trees_all_close(f(w, x, key), ref / 8, atol=1e-12)
    with pytest.raises(ValueError, match="exactly one of `sampling_rate`"):
        privacy.sampled_dp_grad(
            loss,
            l2_clip=1.0,
            noise_multiplier=0.0,
            physical_batch_size=4,
            sampling_rate=0.1,
            source=src,
        )
    make = functools.partial(
        privacy.sampled_dp_grad, loss, l2_clip=1.0, noise_multiplier=0.0, physical_batch_size=4
    )
    with pytest.raises(TypeError, match=r"`source` must be a batch source .* got 'poisson'"):
        make(source="poisson")
    with pytest.raises(ValueError, match="`source` CyclicPoisson draws from step t's group"):
        make(source=sources.CyclicPoisson(sampling_rate=0.5, groups=2))


@pytest.mark.filterwarnings("ignore:`max_batch_size` \\(7\\) is below:UserWarning")
def test_the_draws_keys_are_no_noise_word_of_the_same_key():
    """One key given to a batch source and to the noise must not tie the batch to a noise
    coordinate: the inclusion draw reads Threefry blocks 2**63 + i, the noise of the same key
    blocks 0, 1, ... (fold_in(k, d) is block d, split(k)[b] block b), and the keys that
    choose a truncated draw's rows and a batch without replacement are blocks 2**62 and
    2**62 + 1. (A batch without replacement was permutation(k), whose key split(k)[1] is
    noise word 1: one noisy coordinate of a zero gradient named its few thousand candidate
    batches.)"""
    from jaxgrad.privacy import sampling, threefry

    k = private_key(7)
    hi, lo = threefry.words_at(k, sampling.INCLUSION_OFFSET, (4096,))
    q = 0.3  # the words read are the draw's: its mask is their threshold
    drawn = [(int(a), int(b)) for a, b in zip(np.asarray(hi), np.asarray(lo), strict=True)]
    mask = [(a << 32 | b) < int(q * 2**64) for a, b in drawn]
    got = privacy.inclusion_mask(k, sampling_rate=q, num_examples=4096)
    np.testing.assert_array_equal(got, mask)
    n0, n1 = (np.asarray(w) for w in threefry.words_at(k, 0, (4096,)))
    noise = {(int(a), int(b)) for a, b in zip(n0, n1, strict=True)}
    assert tuple(int(w) for w in jax.random.key_data(jax.random.fold_in(k, 1))) in noise
    assert tuple(int(w) for w in jax.random.key_data(jax.random.split(k)[1])) in noise
    n, b = 50, 7
    for block, source in (
        (sampling.WITHOUT_REPLACEMENT_BLOCK, sources.WithoutReplacement(batch_size=b)),
        (sampling.TRUNCATION_BLOCK, sources.TruncatedPoisson(sampling_rate=0.9, max_batch_size=b)),
    ):
        y0, y1 = threefry.words_at(k, block, (1,))
        words = (int(y0[0]), int(y1[0]))
        assert words not in noise and words not in set(drawn)
        order = np.asarray(
            jax.random.permutation(jax.random.wrap_key_data(np.array(words, np.uint32)), n)
        )
        sample = source.sample(k, num_examples=n, physical_batch_size=b)
        chosen = np.flatnonzero(np.asarray(sample.mask))
        if block == sampling.WITHOUT_REPLACEMENT_BLOCK:  # the first B of that permutation
            np.testing.assert_array_equal(np.sort(order[:b]), chosen)
        else:  # the first B drawn rows in that permutation's order
            included = np.asarray(privacy.inclusion_mask(k, sampling_rate=0.9, num_examples=n))
            assert included.sum() > b  # (truncated: the order decides)
            np.testing.assert_array_equal(np.sort(order[included[order]][:b]), chosen)
