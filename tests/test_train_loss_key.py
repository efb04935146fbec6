"""fit(loss_key=...): one key per example and step inside the loss (dropout), against a loop."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import private_key

import jaxgrad
from jaxgrad.privacy import sampling, threefry
from jaxgrad.train import CheckpointError, PrivacyConfig, example_keys, fit

N, LR = 10, 0.1
# The documented schedule (jaxgrad.keys, docs/privacy.md): row i's loss key at step t is
# fold_in(fold_in(fold_in(loss_key, LOSS), t), i), written out here with jax.random.
LOSS = 0x6C6F7373  # "loss"


def _loss_step_key(loss_key, t):
    return jax.random.fold_in(jax.random.fold_in(loss_key, LOSS), t)


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compile, not one per cipher op
def _words(key, offset, n):
    """Threefry blocks offset .. offset + n - 1 of ``key``, ``(n, 2)`` uint32: for offset 0
    the key data of fold_in(key, j), and the words the Gaussian noise of ``key`` reads."""
    return jnp.stack(threefry.words_at(key, offset, (n,)), 1)


def _as_set(data):
    """Rows of ``(n, 2)`` uint32 key data as one uint64 each, to intersect."""
    return np.ascontiguousarray(np.asarray(data, np.uint32)).view(np.uint64).ravel()


def _problem():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 3)), rng.integers(0, 2, N)
    mlp = jaxgrad.models.mlp([3, 5, 2], dtype=jnp.float64)
    base = jaxgrad.losses.supervised(mlp.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=2)

    def loss(params, example, key):  # inverted dropout on the inputs
        xi, yi = example
        keep = jax.random.bernoulli(key, 0.6, xi.shape)
        return base(params, (jnp.where(keep, xi / 0.6, 0.0), yi))

    loss.validate = base.validate
    return loss, mlp.init(jax.random.key(0)), (x, y)


def _reference(loss, params, data, *, loss_key, key, epochs, batch_size):
    """SGD by hand: each real example's own gradient with key fold_in(fold_in(fold_in(K, LOSS),
    t), row)."""
    x, y = data
    grad_one = jax.jit(jax.grad(loss))  # one compile for every example, not op by op
    t = 0
    for epoch in range(epochs):
        idx, mask = jaxgrad.data.epoch_indices(key, epoch, N, batch_size)
        for rows, real in zip(np.asarray(idx), np.asarray(mask), strict=True):
            rows = rows[real]
            step_key = _loss_step_key(loss_key, t)
            grads = [
                grad_one(params, (x[i], y[i]), jax.random.fold_in(step_key, int(i))) for i in rows
            ]
            count = len(rows)
            mean = jax.tree_util.tree_map(lambda *g, k=count: sum(g) / k, *grads)
            params = jax.tree_util.tree_map(lambda p, g: p - LR * g, params, mean)
            t += 1
    return params


def _fit(loss, params, data, **kw):
    kw = {
        "epochs": 2,
        "batch_size": 4,
        "key": jax.random.key(1),
        "loss_key": jax.random.key(5),
        "quiet": True,
        **kw,
    }
    return fit(loss, params, data, optimizer=optax.sgd(LR), **kw)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("batch_size", [4, N])  # 4: a partial last batch, padded and masked
def test_each_example_gets_its_own_key_per_step(scan, batch_size):
    loss, params, data = _problem()
    got = _fit(loss, params, data, batch_size=batch_size, scan=scan)
    jaxgrad.check.assert_equivalent(got.params, _sgd_reference(batch_size))


@functools.cache
def _sgd_reference(batch_size):
    """``_reference`` of ``_fit``'s run: once per batch size, shared by scan and loop."""
    loss, params, data = _problem()
    return _reference(
        loss,
        params,
        data,
        loss_key=jax.random.key(5),
        key=jax.random.key(1),
        epochs=2,
        batch_size=batch_size,
    )


def test_every_strategy_and_a_mesh_see_the_same_keys():
    loss, params, data = _problem()
    ref = _fit(loss, params, data).params
    for strategy in (
        functools.partial(jaxgrad.mean_of_per_example_grads, chunk_size=3),
        functools.partial(jaxgrad.clipped_grad, l2_clip=1e6),  # the fast path, never clipping
        functools.partial(jaxgrad.accumulate_grad, num_microbatches=2),
    ):
        jaxgrad.check.assert_equivalent(_fit(loss, params, data, strategy=strategy).params, ref)
    mesh = jaxgrad.sharding.data_mesh()
    jaxgrad.check.assert_equivalent(_fit(loss, params, data, mesh=mesh).params, ref)


def test_the_keys_change_the_result():
    # The masks matter: another loss_key gives another trajectory.
    loss, params, data = _problem()
    a = _fit(loss, params, data).params
    b = _fit(loss, params, data, loss_key=jax.random.key(6)).params
    assert jaxgrad.check.tree_diff(a, b)[0] > 1e-3


def test_resume_continues_with_the_same_keys_and_refuses_another(tmp_path, monkeypatch):
    loss, params, data = _problem()
    full = _fit(loss, params, data, epochs=3).params
    _fit(loss, params, data, epochs=2, checkpoint_dir=tmp_path / "a")
    resumed = _fit(loss, params, data, epochs=3, checkpoint_dir=tmp_path / "a").params
    jaxgrad.check.assert_equivalent(resumed, full, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="loss_key"):
        _fit(
            loss, params, data, epochs=3, loss_key=jax.random.key(6), checkpoint_dir=tmp_path / "a"
        )
    # A checkpoint of the former schedule, fold_in(fold_in(loss_key, t), row), whose config
    # has no "loss_keys": refused, not continued with other keys than its first steps had.
    loop = importlib.import_module("jaxgrad.train.loop")
    current = loop.run_config
    former = lambda *a, **kw: {k: v for k, v in current(*a, **kw).items() if k != "loss_keys"}
    monkeypatch.setattr(loop, "run_config", former)
    _fit(loss, params, data, epochs=2, checkpoint_dir=tmp_path / "b")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"loss_keys: None -> 'fold_in\(fold_in\(fold_in"):
        _fit(loss, params, data, epochs=3, checkpoint_dir=tmp_path / "b")


def test_bad_loss_key_combinations_are_named():
    loss, params, data = _problem()
    two_args = lambda p, ex: loss(p, ex, jax.random.key(0))
    kw = {"optimizer": optax.sgd(LR), "epochs": 1, "batch_size": 4, "key": jax.random.key(1)}
    with pytest.raises(TypeError, match=r"`loss_key` is given.*takes no key"):
        fit(two_args, params, data, loss_key=jax.random.key(5), **kw)
    with pytest.raises(TypeError, match=r"`loss_fn` takes a third argument.*pass `loss_key`"):
        fit(loss, params, data, **kw)
    with pytest.raises(TypeError, match="`loss_key`"):
        fit(loss, params, data, loss_key=5, **kw)


def _private_reference(loss, params, data, *, clip, key, loss_key, batch_size):
    """One epoch of DP-SGD with σ = 0 by hand: the public sampler's draw, clip in numpy."""
    x, y = data
    grad_one = jax.jit(jax.grad(loss))  # one compile for every example, not op by op
    q = batch_size / N
    for t in range(-(-N // batch_size)):
        sample_key, _ = jax.random.split(jax.random.fold_in(key, t))
        s = jaxgrad.privacy.poisson_sample(
            sample_key, num_examples=N, sampling_rate=q, physical_batch_size=N
        )
        total = jax.tree_util.tree_map(jnp.zeros_like, params)
        for i in np.asarray(s.indices)[: int(s.count)]:
            k = jax.random.fold_in(_loss_step_key(loss_key, t), int(i))
            g = grad_one(params, (x[i], y[i]), k)
            norm = np.sqrt(sum(float(np.sum(np.square(v))) for v in jax.tree_util.tree_leaves(g)))
            factor = min(1.0, clip / norm)
            total = jax.tree_util.tree_map(lambda a, b, c=factor: a + c * b, total, g)
        params = jax.tree_util.tree_map(lambda p, g: p - LR * g / (q * N), params, total)
    return params


@pytest.mark.parametrize("mesh", [False, True])
def test_private_fit_gives_each_sampled_example_its_key(mesh):
    loss, params, data = _problem()
    config = PrivacyConfig(l2_clip=0.3, noise_multiplier=0.0, delta=1e-5)
    mesh = jaxgrad.sharding.data_mesh() if mesh else None
    kw = dict(epochs=1, batch_size=5, privacy=config, mesh=mesh, key=private_key(1))
    got = _fit(loss, params, data, **kw)
    jaxgrad.check.assert_equivalent(got.params, _private_want())


@functools.cache
def _private_want():
    """``_private_reference`` of the private run above: once, shared with and without a mesh."""
    loss, params, data = _problem()
    return _private_reference(
        loss,
        params,
        data,
        clip=0.3,
        key=private_key(1),
        loss_key=jax.random.key(5),
        batch_size=5,
    )


def test_a_private_run_refuses_its_own_key_as_the_loss_key():
    """With K as both keys the loss's keys and the DP's share one root, LOSS apart: row i's key
    at step 1 is noise word i of step LOSS (fold_in is Threefry block (0, d), split takes
    blocks 0 and 1), a step no run reaches, yet one key's bits for both: refused."""
    key = private_key(1)
    _, noise_key = jaxgrad.keys.dp_keys(key, LOSS)
    rows = jax.random.key_data(jaxgrad.keys.row_keys(key, 1, np.arange(2)))
    np.testing.assert_array_equal(rows, _words(noise_key, 0, 2))  # why it is refused
    loss, params, data = _problem()
    config = PrivacyConfig(l2_clip=0.3, noise_multiplier=1.0, delta=1e-5)
    for loss_key in (key, jax.random.key_data(key)):  # typed or raw, the same key data
        with pytest.raises(ValueError, match=r"`loss_key` must differ from the private run's"):
            _fit(loss, params, data, privacy=config, key=key, loss_key=loss_key)


@pytest.mark.parametrize("derive", ["fold_in", "split"])
def test_a_loss_key_derived_from_the_key_never_meets_the_dp_keys(derive):
    """loss_key = fold_in(K, 1) or split(K)[0] passes check_distinct (not K), and under the
    old schedule fold_in(fold_in(L, t), i) row i's key at step 1 was noise word i of step 1
    (or of step 0): the dropout a function of the noise. Under LOSS, the keys the loss gets at
    steps 0..2 — by the plain step (keys.row_keys) and the private one (its step key through
    row_keyed_loss) — and the first words they draw share no data with those steps' sample,
    noise, clip-count and truncation keys, the noise's first words or the Poisson draw's."""
    key = private_key(3)
    loss_key = jax.random.fold_in(key, 1) if derive == "fold_in" else jax.random.split(key)[0]
    steps, rows, words = range(3), np.arange(64), 1024
    dp = []
    for t in steps:
        sample_key, noise_key = jaxgrad.keys.dp_keys(key, t)
        count_key = jaxgrad.keys.clip_count_key(key, t)
        draws = (sampling.TRUNCATION_BLOCK, sampling.WITHOUT_REPLACEMENT_BLOCK)
        named = (sample_key, noise_key, count_key)
        named += tuple(sampling.draw_key(sample_key, block) for block in draws)
        dp += [jax.random.key_data(k)[None] for k in named]
        dp += [_words(noise_key, 0, words), _words(count_key, 0, 16)]
        dp.append(_words(sample_key, sampling.INCLUSION_OFFSET, len(rows)))
    dp = _as_set(np.concatenate(dp))

    plain, private = [], []  # the keys the loss is given
    private_loss = example_keys.row_keyed_loss(lambda params, example, k: private.append(k))
    for t in steps:
        plain.append(jax.random.key_data(jaxgrad.keys.row_keys(loss_key, t, rows)))
        for r in rows:
            private_loss(None, (None, r), jaxgrad.keys.loss_step_key(loss_key, t))
    plain = np.concatenate(plain)
    private = np.stack([jax.random.key_data(k) for k in private])
    np.testing.assert_array_equal(private, plain)  # one schedule for both paths
    # ... and their first draws (a dropout mask reads these)
    draws = jax.vmap(lambda d: _words(jax.random.wrap_key_data(d), 0, 4))(plain)
    assert plain.shape == (len(steps) * len(rows), 2) and draws.shape == (len(plain), 4, 2)
    shared = np.intersect1d(_as_set(np.concatenate([plain, draws.reshape(-1, 2)])), dp)
    assert shared.size == 0, f"{shared.size} loss keys or their draws are DP keys or words"

    # The old schedule, written out, did collide: what the check above would have caught.
    old = [jax.random.fold_in(jax.random.fold_in(loss_key, t), int(r)) for t in steps for r in rows]
    assert np.intersect1d(_as_set(np.stack([jax.random.key_data(k) for k in old])), dp).size
