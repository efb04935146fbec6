"""Clip units: a user's rows (user-level DP) and an example's augmentations, float64, exact.

The references are Python loops over units: each unit's gradient (the sum over its rows, or
the mean over an example's augmented copies) formed with ``jax.grad`` and clipped alone;
the accounting is checked against :func:`jaxgrad.privacy.epsilon` at ``q = batch / U``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import private_key

from jaxgrad import losses, models
from jaxgrad import privacy as dp
from jaxgrad.privacy import group_units, unit_loss
from jaxgrad.train import PrivacyConfig, fit

jax.config.update("jax_enable_x64", True)
F64 = jnp.float64
UNITS = np.array([3, 3, 0, 7, 7, 7, 0, 5, 9, 9])  # 5 users of 1 to 3 rows, ids not 0..U-1


@functools.cache
def _setup():
    """The units tests' problem: a 3-4-2 MLP's loss, its parameters and 10 rows."""
    model = models.mlp([3, 4, 2], dtype=F64)
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(10, 3)), rng.integers(0, 2, 10))
    loss = lambda p, ex: losses.softmax_cross_entropy(model.apply(p, ex[0]), ex[1])
    return loss, model.init(jax.random.key(0)), data


def _fit(privacy, *, optimizer=None, batch_size=2, **kw):
    """``fit`` on :func:`_setup`'s problem for one epoch, quietly (SGD at rate 1 unless
    ``optimizer`` is given)."""
    loss, params, data = _setup()
    kw = {"epochs": 1, "key": private_key(1), "quiet": True, **kw}
    return fit(
        loss,
        params,
        data,
        optimizer=optax.sgd(1.0) if optimizer is None else optimizer,
        batch_size=batch_size,
        privacy=privacy,
        **kw,
    )


def _clip(g, c):
    norm = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(g)))
    return jax.tree.map(lambda x: np.asarray(x) * min(1.0, c / norm), g)


def _add(a, b):
    return jax.tree.map(lambda x, y: x + y, a, b)


@functools.cache
def _grad(loss):
    """``jax.grad`` of one row's loss, compiled once (eager, the reference loops took longer
    than the fits they check)."""
    return jax.jit(jax.grad(loss))


def _unit_grads(loss, params, data, units):
    """Σ_{r∈u} ∇S_r for each unit u (in the order of its id), one row at a time."""
    for u in np.unique(units):
        g = jax.tree.map(np.zeros_like, params)
        for r in np.flatnonzero(units == u):
            g = _add(g, _grad(loss)(params, jax.tree.map(lambda a, r=r: a[r], data)))
        yield g


def _unit_reference(loss, params, data, units, clip):
    """Σ_u clip_C(Σ_{r∈u} ∇S_r), one unit at a time."""
    total = jax.tree.map(np.zeros_like, params)
    for g in _unit_grads(loss, params, data, units):
        total = _add(total, _clip(g, clip))
    return total


def _assert_close(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_group_units_against_a_loop():
    data = (np.arange(10.0), np.arange(10) * 10)
    (rows, real), ids = group_units(data, UNITS)
    assert ids.tolist() == [0, 3, 5, 7, 9]
    for u, uid in enumerate(ids):
        members = np.flatnonzero(UNITS == uid)
        assert real[u].sum() == len(members)
        assert rows[0][u][real[u]].tolist() == data[0][members].tolist()
        assert (rows[1][u][~real[u]] == data[1][members[0]]).all()  # padding: the first row


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_unit_clipped_sum_matches_a_loop(method):
    loss, params, data = _setup()
    grouped, _ = group_units(data, UNITS)
    clipped = dp.ClippedSum(unit_loss(loss), l2_clip=0.3, method=method)
    total, kept, bad = clipped(params, grouped, jnp.ones(5, bool))
    _assert_close(total, _unit_reference(loss, params, data, UNITS, 0.3))
    assert int(kept) == 5 and int(bad) == 0


def test_dp_grad_units_match_a_loop():
    loss, params, data = _setup()
    f = dp.dp_grad(loss, l2_clip=0.3, noise_multiplier=0.0, expected_batch_size=2.5)
    ids = jnp.asarray(np.unique(UNITS, return_inverse=True)[1])  # ids in [0, B)
    got = f(params, data, None, private_key(0), units=ids)
    want = jax.tree.map(lambda x: x / 2.5, _unit_reference(loss, params, data, UNITS, 0.3))
    _assert_close(got, want)
    with pytest.raises(ValueError, match="units"):
        f(params, data, None, private_key(0), units=jnp.arange(3))


def _group_clip(g, clips):
    """clip_{C_g} of each layer's part of one gradient (params: a list of layers)."""
    return [_clip(layer, c) for layer, c in zip(g, clips, strict=True)]


def test_fit_with_units_and_per_layer_clips_clips_units_and_counts_them():
    loss, params, data = _setup()
    clips = [0.1, 0.3]  # per layer; the unit's summed gradient, each layer clipped alone
    # q = 1 (batch_size = U = 5 units) and σ = 0: one step on every unit, exactly
    cfg = PrivacyConfig(l2_clip=clips, noise_multiplier=0.0)
    result = _fit(cfg, batch_size=5, units=UNITS)
    step = jax.tree.map(np.zeros_like, params)
    for g in _unit_grads(loss, params, data, UNITS):
        step = _add(step, _group_clip(g, clips))
    want = jax.tree.map(lambda p, g: p - g / 5, params, step)
    _assert_close(result.params, want)
    # the units are what is sampled and counted: q = 5 / 5 (not 5 / 10 rows), one step
    assert result.privacy["num_units"] == 5 and result.privacy["privacy_unit"] == "user"
    assert result.privacy["sampling_rate"] == 1.0 and result.privacy["steps"] == 1
    assert result.privacy["l2_sensitivity"] == pytest.approx(np.sqrt(0.1**2 + 0.3**2))
    # (and per-row clipping would have given another step)
    rows = _unit_reference(loss, params, data, np.arange(10), 0.3)
    assert not np.allclose(jax.tree.leaves(rows)[1], jax.tree.leaves(step)[1])


def test_fit_accounts_units():
    cfg = PrivacyConfig(l2_clip=0.3, noise_multiplier=1.5, accountant="rdp")
    result = _fit(cfg, optimizer=optax.sgd(0.1), units=UNITS, scan=False)
    # q = 2 / 5 units and ⌈5 / 2⌉ = 3 steps an epoch; ε from dp-accounting at those
    assert result.privacy["sampling_rate"] == pytest.approx(2 / 5)
    assert result.privacy["steps"] == 3
    want = dp.epsilon(
        noise_multiplier=1.5, sampling_rate=2 / 5, steps=3, delta=1e-5, accountant="rdp"
    )
    assert result.privacy["epsilon"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    ("units", "error", "match"),
    [
        (UNITS.astype(float), TypeError, "integer array"),
        (UNITS[:4], ValueError, r"shape \(10,\)"),
        ([3, 3, 0, 7, 7, 7, 0, 5, 9, 9], TypeError, "integer array"),
    ],
)
def test_bad_units_are_refused(units, error, match):
    cfg = PrivacyConfig(l2_clip=0.3, noise_multiplier=1.0)
    with pytest.raises(error, match=match):
        _fit(cfg, units=units, key=None)


def test_units_and_augment_need_privacy():
    with pytest.raises(ValueError, match="`units` applies to private training"):
        _fit(None, units=UNITS, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`augment` applies to private training"):
        _fit(None, augment=lambda k, x: x, key=jax.random.key(0))
    cfg = PrivacyConfig(l2_clip=0.3, noise_multiplier=1.0, augmentations=2)
    with pytest.raises(ValueError, match=r"`augment`.*is required"):
        _fit(cfg, key=None)
    with pytest.raises(ValueError, match="pass `loss_key`"):
        _fit(cfg, augment=lambda k, x: x, key=None)
    for bad in (0, 1.5, True):  # was "augmentations is 0, so `augment` is required"
        cfg = PrivacyConfig(l2_clip=0.3, noise_multiplier=1.0, augmentations=bad)
        with pytest.raises(ValueError, match=rf"`augmentations` must be a positive .*{bad!r}"):
            _fit(cfg, augment=lambda k, x: x, key=None)


def _jitter(key, ex):
    return ex[0] + 0.3 * jax.random.normal(key, ex[0].shape, F64), ex[1]


def test_fit_with_augmentation_multiplicity_clips_the_mean_of_the_copies():
    loss, params, data = _setup()
    cfg = PrivacyConfig(l2_clip=0.2, noise_multiplier=0.0, augmentations=3)
    loss_key = jax.random.key(7)
    result = _fit(cfg, batch_size=10, augment=_jitter, loss_key=loss_key)
    loss_root = jax.random.fold_in(loss_key, 0x6C6F7373)
    total = jax.tree.map(np.zeros_like, params)
    for i in range(10):  # example i at step 0: its key, its 3 copies, the mean gradient
        ex = jax.tree.map(lambda a, i=i: a[i], data)
        # the documented schedule (docs/privacy.md): copy c of row i at step t draws with
        # split(fold_in(fold_in(fold_in(loss_key, "loss"), t), i), (2, K))[0][c]
        example_key = jax.random.fold_in(jax.random.fold_in(loss_root, 0), i)
        aug_keys = jax.random.split(example_key, (2, 3))[0]
        grads = [_grad(loss)(params, _jitter(k, ex)) for k in aug_keys]
        mean = jax.tree.map(lambda *g: sum(np.asarray(x) for x in g) / 3, *grads)
        total = _add(total, _clip(mean, 0.2))
    _assert_close(result.params, jax.tree.map(lambda p, g: p - g / 10, params, total))
    assert result.privacy["augmentations"] == 3 and "privacy_unit" not in result.privacy


# --- the one-run audit (tests/test_privacy_audit.py's problem: m = 1000, r = 200, ε = 2) ------

COPIES = 10  # rows of each canary user


def _users(data):
    """The audit's rows as users: real rows 3 to a user, each canary a user of 10 copies."""
    rows, cid = data
    canary = np.flatnonzero(np.asarray(cid) >= 0)
    index = np.concatenate([np.flatnonzero(np.asarray(cid) < 0), np.repeat(canary, COPIES)])
    units = np.where(np.asarray(cid)[index] < 0, index // 3, 10**6 + np.asarray(cid)[index])
    return jax.tree.map(lambda a: np.asarray(a)[index], (rows, cid)), units


def test_user_level_audit_stays_below_claim_and_row_level_clipping_exceeds_it():
    """Each canary is a user of 10 rows (each row's gradient C e_j). Clipping the user's sum
    once gives it norm C: a correct run stays below its claim. Clipping rows instead (the
    unit ignored) lets a canary user through with 10 C: caught, like σ/10 in
    test_privacy_audit (whose false-alarm analysis this reuses: the same scores)."""
    from test_privacy_audit import (
        CLIP,
        FULL_STEPS,
        claimed,
        hand_loop,
        run_audit,
        secret_key,
        sigma_for,
    )

    sigma = sigma_for(1.0, FULL_STEPS)
    claim = claimed(sigma, 1.0, FULL_STEPS)

    def per_user(loss_fn, data):  # q = 1 over users: every user every step
        rows, units = _users(data)
        grouped, ids = group_units(rows, units)
        f = dp.dp_grad(
            unit_loss(loss_fn), l2_clip=CLIP, noise_multiplier=sigma, expected_batch_size=len(ids)
        )
        return lambda p, k: f(p, grouped, None, k)

    def per_row(loss_fn, data):  # broken: each row clipped, the users' sums are not
        rows, units = _users(data)
        f = dp.dp_grad(
            loss_fn, l2_clip=CLIP, noise_multiplier=sigma, expected_batch_size=len(np.unique(units))
        )
        return lambda p, k: f(p, rows, None, k)

    correct = run_audit(hand_loop(per_user, FULL_STEPS, key_fn=secret_key))
    assert correct.epsilon_lower < claim, correct
    broken = run_audit(hand_loop(per_row, FULL_STEPS, key_fn=secret_key))
    assert broken.epsilon_lower > claim, broken
