"""Every registered strategy (jaxgrad.strategies) against a Python loop of ``jax.grad``, float64.

Exact strategies equal the loop; the approximate ones (jaxgrad.naive) equal it where the
maths says (identical examples: the mean example, the mean error and every microbatch mean are
that example's) and differ where they average before a nonlinearity or over unequal counts.
The reference shares no code with jaxgrad.grads or jaxgrad.reduce.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad
from jaxgrad import losses, models, strategies

jax.config.update("jax_enable_x64", True)

TOL = dict(rtol=1e-10, atol=1e-12)
MASK = np.array([True, True, False, True, True, True])  # microbatches of 2: 2, 1, 2 real rows
VARIANTS = [
    (s.name, label, options)
    for s in strategies.all_strategies().values()
    for label, options in s.variants.items()
]


@functools.cache
def _case(identical: bool):
    model = models.mlp([3, 5, 2], activation="tanh", dtype=jnp.float64)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (6, 2), jnp.float64) + x[:, :2] ** 2
    if identical:
        x, y = jnp.tile(x[:1], (6, 1)), jnp.tile(y[:1], (6, 1))
    loss_fn = losses.supervised(model.apply, losses.squared_error)
    return loss_fn, params, (x, y), _loop(loss_fn, params, (x, y), MASK)


def _loop(loss_fn, params, batch, mask):
    """(mean loss, count, mean grads, per-example rows, loss sums): one example at a time."""
    one = jax.jit(jax.value_and_grad(loss_fn))
    rows, sums = [], []
    for i in range(len(mask)):
        value, g = one(params, jax.tree_util.tree_map(lambda a, i=i: a[i], batch))
        keep = float(mask[i])
        rows.append(jax.tree_util.tree_map(lambda v, k=keep: np.asarray(v) * k, g))
        sums.append(float(value) * keep)
    count = float(mask.sum())
    stacked = jax.tree_util.tree_map(lambda *r: np.stack(r), *rows)
    mean = jax.tree_util.tree_map(lambda r: r.sum(0) / count, stacked)
    return sum(sums) / count, count, mean, stacked, np.array(sums)


def _flat_rows(stacked):
    return np.concatenate([np.reshape(r, (len(MASK), -1)) for r in jax.tree.leaves(stacked)], 1)


def _max_diff(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(x - y))) for x, y in pairs)


@pytest.mark.parametrize(("name", "label", "options"), VARIANTS, ids=[v[1] for v in VARIANTS])
def test_every_registered_strategy_against_a_grad_loop(name, label, options):
    record = strategies.get(name)
    results = {}
    for identical in (False, True):
        loss_fn, params, batch, ref = _case(identical)
        out = jax.jit(record.build(loss_fn, **options))(params, batch, jnp.asarray(MASK))
        assert isinstance(out, jaxgrad.GradResult), label
        results[identical] = out, ref
    (out, (loss, count, mean, rows, sums)), (same, same_ref) = results[False], results[True]
    if record.per_example:
        np.testing.assert_allclose(_flat_rows(out.grads), _flat_rows(rows), **TOL)
        np.testing.assert_allclose(out.loss, sums, **TOL)
        np.testing.assert_allclose(out.count, MASK.astype(float), **TOL)
    elif record.exact:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), out.grads, mean)
        np.testing.assert_allclose(out.loss, loss, **TOL)
        np.testing.assert_allclose(out.count, count, **TOL)
    else:
        # Averaging before the tanh (or over microbatches of 2, 1 and 2 real rows) moves it...
        assert _max_diff(out.grads, mean) > 1e-4, label
        # ... and identical examples make every average the example itself.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), same.grads, same_ref[2])
        np.testing.assert_allclose(out.count, count, **TOL)  # 5 real examples, one item each
    if out.norms is not None:
        want = np.linalg.norm(_flat_rows(rows), axis=1)  # 0 for the padded row
        np.testing.assert_allclose(out.norms, want, **TOL)
    else:
        assert not record.per_example  # a per-example strategy always has its norms


def test_the_registry_lists_every_strategy_once_with_what_it_is():
    records = strategies.all_strategies()
    assert list(records) == strategies.names()
    assert strategies.names(exact=True) == [
        "batch_grad",
        "per_example_grads",
        "mean_of_per_example_grads",
        "accumulate_grad",
    ]
    assert strategies.names(per_example=True) == ["per_example_grads"]
    # Every public factory of jaxgrad.naive is registered (a new one cannot be forgotten).
    naive_factories = {
        n
        for n, f in vars(jaxgrad.naive).items()
        if callable(f) and getattr(f, "__module__", "") == "jaxgrad.naive" and n[0] != "_"
    }
    assert naive_factories == set(strategies.names(exact=False))
    for record in records.values():
        assert record.variants and record.summary
        for options in record.variants.values():
            assert set(options) <= set(record.options), record.name


def test_lookups_and_options_are_checked_by_name():
    assert strategies.get("accumulate") is strategies.get("accumulate_grad")
    with pytest.raises(KeyError, match=r"no gradient strategy named 'magic'; registered: batch"):
        strategies.get("magic")
    with pytest.raises(TypeError, match=r"`batch_grad` takes the options none; got \['chunk_size'"):
        strategies.get("batch_grad").build(lambda p, ex: p * ex, chunk_size=2)
    with pytest.raises(ValueError, match=r"`num_microbatches` must be a positive integer"):
        strategies.get("accumulate_grad").build(lambda p, ex: p * ex, num_microbatches=0)
    with pytest.raises(TypeError, match=r"`backprop_mean_error` needs .*losses.supervised"):
        strategies.get("backprop_mean_error").build(lambda p, ex: p * ex)
    with pytest.raises(ValueError, match=r"\['batch', 'batch_grad'\] are already registered"):
        strategies.register(strategies.get("batch_grad"))
