"""The jit-compiled train step: compiles once per shape; equivalent strategies give the same
SGD trajectory as an independent Python-loop reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgrad
from jaxgrad import strategies
from jaxgrad.train import init_state, train_step

# Every exact strategy of the registry that gives a step's gradient, with its registered
# options and, where it takes them, small ones (chunks of 3, 3 microbatches: uneven splits).
SMALL = {"chunk_size": 3, "num_microbatches": 3}
STRATEGIES = {}
for _record in map(strategies.get, strategies.names(exact=True, per_example=False)):
    STRATEGIES[_record.name] = _record.factory()
    _small = {k: v for k, v in SMALL.items() if k in _record.options}
    if _small:
        STRATEGIES[f"{_record.name}(small)"] = _record.factory(**_small)


def _problem(n=23, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.integers(0, classes, n)
    model = jaxgrad.models.mlp([d, 7, classes], activation="tanh", dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=classes
    )
    return model, loss_fn, x, y


def _batches(x, y, batch_size, steps, seed=1):
    """Shuffled batches with the last one partial (padded and masked)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        order = rng.permutation(len(x))
        real = batch_size if s % 3 else batch_size - 3  # every third batch is partial
        idx = np.concatenate([order[:real], np.full(batch_size - real, order[0])])
        mask = np.arange(batch_size) < real
        out.append(((x[idx], y[idx]), mask))
    return out


def _reference_sgd(loss_fn, params, batches, lr):
    """Independent reference: a Python loop over single examples, averaged by hand."""
    grad_one = jax.jit(jax.grad(loss_fn))
    for (bx, by), mask in batches:
        real = [i for i in range(len(mask)) if mask[i]]
        grads = [grad_one(params, (bx[i], by[i])) for i in real]
        mean = jax.tree_util.tree_map(lambda *g: np.mean(np.stack(g), axis=0), *grads)
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, mean)
    return params


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_sgd_trajectory_matches_reference(name):
    model, loss_fn, x, y = _problem()
    params0 = model.init(jax.random.key(0))
    batches = _batches(x, y, batch_size=8, steps=5)
    opt = optax.sgd(0.3)
    step = train_step(loss_fn, opt, strategy=STRATEGIES[name])
    state = init_state(params0, opt)
    for batch, mask in batches:
        state, _ = step(state, batch, mask)
    expected = _reference_sgd(loss_fn, params0, batches, 0.3)
    assert int(state.step) == len(batches)
    chex.assert_trees_all_close(state.params, expected, rtol=1e-11, atol=1e-12)
    # And it moved: a test that can only pass is no test.
    assert (
        max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(
                jax.tree_util.tree_leaves(state.params),
                jax.tree_util.tree_leaves(params0),
                strict=True,
            )
        )
        > 1e-2
    )


def test_strategies_agree_under_adam():
    model, loss_fn, x, y = _problem(seed=4)
    params0 = model.init(jax.random.key(1))
    batches = _batches(x, y, batch_size=6, steps=6)
    finals = {}
    for name, strategy in STRATEGIES.items():
        opt = optax.adam(0.05)
        step = train_step(loss_fn, opt, strategy=strategy)
        state = init_state(params0, opt)
        for batch, mask in batches:
            state, _ = step(state, batch, mask)
        finals[name] = state.params
    for name in STRATEGIES:
        chex.assert_trees_all_close(finals[name], finals["batch_grad"], rtol=1e-10, atol=1e-12)


def test_step_compiles_once_per_shape():
    model, loss_fn, x, y = _problem()
    traces = []

    def counted(params, example):
        traces.append(1)
        return loss_fn(params, example)

    opt = optax.adam(0.01)
    step = train_step(counted, opt, strategy=STRATEGIES["accumulate_grad(small)"])
    state = init_state(model.init(jax.random.key(0)), opt)
    batches = _batches(x, y, batch_size=8, steps=6)
    state, _ = step(state, *batches[0])
    after_first = len(traces)
    assert after_first > 0
    for batch, mask in batches[1:]:  # full and partial (masked) batches, new values
        state, _ = step(state, batch, mask)
    assert len(traces) == after_first
    assert step._cache_size() == 1
    # A new batch shape is a new compilation, as expected.
    step(state, (x[:5], y[:5]), np.ones(5, bool))
    assert step._cache_size() == 2


def test_loss_reported_with_and_without_a_grad_result():
    model, loss_fn, x, y = _problem()
    params = model.init(jax.random.key(0))
    mask = np.arange(10) < 7
    batch = (x[:10], y[:10])
    expected = np.mean([float(loss_fn(params, (x[i], y[i]))) for i in range(7)])
    opt = optax.sgd(0.1)
    # A strategy returning the gradient alone (like a user's own): the loss comes from a
    # forward pass.
    plain = lambda f: lambda p, b, m=None: jaxgrad.batch_grad(f)(p, b, m).grads
    for strategy in (jaxgrad.batch_grad, plain):
        state, loss = train_step(loss_fn, opt, strategy=strategy)(
            init_state(params, opt), batch, mask
        )
        np.testing.assert_allclose(float(loss), expected, rtol=1e-12)
    ref_state, _ = train_step(loss_fn, opt)(init_state(params, opt), batch, mask)
    chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-12)


def test_bad_arguments():
    _, loss_fn, _, _ = _problem()
    with pytest.raises(TypeError, match=r"`optimizer` must be an optax.GradientTransformation"):
        train_step(loss_fn, "adam")
    with pytest.raises(TypeError, match="`strategy` must be a gradient-strategy factory"):
        train_step(loss_fn, optax.sgd(0.1), strategy="batch")
