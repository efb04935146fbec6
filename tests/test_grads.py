"""The exact strategies against an independent reference: a Python loop over single examples.

The reference calls ``jax.grad`` on ONE example at a time and sums in numpy, dividing once by
the total number of real items; it shares no code with :mod:`jaxgrad.grads` or
:mod:`jaxgrad.reduce`.
"""

import dataclasses
import functools

import chex
import equinox as eqx
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgrad
from jaxgrad import losses, models, strategies

F64 = jnp.float64
RTOL, ATOL = 1e-10, 1e-12


# ----------------------------------------------------------------- reference


def _split(out):
    """A loss output as (sum, count) floats, written independently of jaxgrad.reduce."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, 1.0


@functools.cache
def _single_example_fns(loss_fn):
    """``jax.grad`` and the loss on ONE example (jitted once per loss, for speed only)."""
    one_grad = jax.jit(jax.grad(lambda p, ex: _split(loss_fn(p, ex))[0]))
    one_loss = jax.jit(lambda p, ex: _split(loss_fn(p, ex)))
    return one_grad, one_loss


def reference(loss_fn, params, batch, mask=None):
    """(mean loss, mean gradient, per-example grads): a loop over single examples."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    mask = np.ones(n, bool) if mask is None else np.asarray(mask)
    one_grad, one_loss = _single_example_fns(loss_fn)
    total_grad = jax.tree_util.tree_map(lambda p: np.zeros(np.shape(p)), params)
    total_loss, total_count, per_example = 0.0, 0.0, []
    for i in range(n):
        example = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
        g = jax.tree_util.tree_map(np.asarray, one_grad(params, example))
        s, c = (float(v) for v in one_loss(params, example))
        if mask[i]:
            total_grad = jax.tree_util.tree_map(np.add, total_grad, g)
            total_loss += s
            total_count += c
            per_example.append(g)
        else:
            per_example.append(jax.tree_util.tree_map(np.zeros_like, g))
    stacked = jax.tree_util.tree_map(lambda *gs: np.stack(gs), *per_example)
    mean = jax.tree_util.tree_map(lambda g: g / total_count, total_grad)
    return total_loss / total_count, mean, stacked


def assert_close(a, b, rtol=RTOL, atol=ATOL):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------- cases


def _normal(key, shape):
    return jax.random.normal(key, shape, F64)


def _case_line(key):
    model = models.line_fit(dtype=F64)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"m": _normal(k1, ()), "b": _normal(k2, ())}
    x = _normal(k3, (7,))
    return losses.supervised(model.apply, losses.squared_error), params, (x, 3.0 * x - 1.0 + x**2)


def _case_linreg(loss):
    def make(key):
        model = models.linear_regression(3, dtype=F64)
        k1, k2, k3 = jax.random.split(key, 3)
        params = {"w": _normal(k1, (3,)), "b": _normal(k2, ())}
        x = _normal(k3, (7, 3))
        return losses.supervised(model.apply, loss), params, (x, jnp.sin(x.sum(1)))

    return make


def _case_logistic_binary(key):
    model = models.logistic_regression(3, dtype=F64)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w": _normal(k1, (3,)), "b": _normal(k2, ())}
    y = jax.random.bernoulli(k3, 0.5, (7,)).astype(F64)
    return (
        losses.supervised(model.apply, losses.binary_cross_entropy),
        params,
        (
            _normal(k3, (7, 3)),
            y,
        ),
    )


def _case_logistic_multi(key):
    model = models.logistic_regression(3, num_classes=4, dtype=F64)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w": _normal(k1, (3, 4)), "b": _normal(k2, (4,))}
    y = jax.random.randint(k3, (7,), 0, 4)
    loss = losses.supervised(model.apply, losses.softmax_cross_entropy, num_classes=4)
    return loss, params, (_normal(k3, (7, 3)), y)


def _case_mlp(loss, out):
    def make(key):
        model = models.mlp([4, 5, out], activation="tanh", dtype=F64)
        k1, k2, k3 = jax.random.split(key, 3)
        x = _normal(k2, (7, 4))
        if loss is losses.softmax_cross_entropy:
            y = jax.random.randint(k3, (7,), 0, out)
            fn = losses.supervised(model.apply, loss, num_classes=out)
        else:
            y = _normal(k3, (7, out))
            fn = losses.supervised(model.apply, loss)
        return fn, model.init(k1), (x, y)

    return make


def _case_cnn(key):
    model = models.cnn(image_shape=(6, 6), channels=(2,), num_classes=3, dtype=F64)
    k1, k2, k3 = jax.random.split(key, 3)
    fn = losses.supervised(model.apply, losses.softmax_cross_entropy, num_classes=3)
    return fn, model.init(k1), (_normal(k2, (7, 6, 6)), jax.random.randint(k3, (7,), 0, 3))


def _case_transformer(key):
    return transformer_case(key, causal=True)


def transformer_case(key, *, causal=True, lengths=(6, 1, 3, 5, 2, 6, 4)):
    """Language model on variable-length sequences, padded with 0."""
    model = models.transformer(
        vocab_size=7, max_len=6, d_model=8, num_heads=2, causal=causal, dtype=F64
    )
    k1, k2 = jax.random.split(key)
    tokens = np.array(jax.random.randint(k2, (len(lengths), 7), 1, 7))
    for i, n in enumerate(lengths):
        tokens[i, n + 1 :] = 0
    tokens = jnp.asarray(tokens)

    def loss_fn(params, seq):
        return losses.token_cross_entropy(model.apply(params, seq[:-1]), seq[1:])

    return loss_fn, model.init(k1), tokens


CASES = {
    "line_fit-squared": _case_line,
    "linreg-squared": _case_linreg(losses.squared_error),
    "linreg-linear": _case_linreg(losses.linear_error),
    "logistic-bce": _case_logistic_binary,
    "logistic-softmax": _case_logistic_multi,
    "mlp-softmax": _case_mlp(losses.softmax_cross_entropy, 3),
    "mlp-squared": _case_mlp(losses.squared_error, 2),
    "cnn-softmax": _case_cnn,
    "transformer-tokens": _case_transformer,
}


@functools.cache
def case(name):
    loss_fn, params, batch = CASES[name](jax.random.key(sum(map(ord, name))))
    mask = jnp.array([True, False, True, True, True, False, True])
    return loss_fn, params, batch, mask, reference(loss_fn, params, batch, mask)


# Every exact strategy of the registry that gives the mean gradient, with its registered
# options and, where it takes them, small ones (7 rows: chunks 3 + 3 + 1, 3 microbatches).
SMALL = {"chunk_size": 3, "num_microbatches": 3}
MEAN_STRATEGIES = {}
for _record in map(strategies.get, strategies.names(exact=True, per_example=False)):
    MEAN_STRATEGIES[_record.name] = _record.factory()
    _small = {k: v for k, v in SMALL.items() if k in _record.options}
    if _small:
        MEAN_STRATEGIES[f"{_record.name}(small)"] = _record.factory(**_small)


@functools.cache
def _reference_count(name):
    """The real items of ``case(name)``'s unmasked rows: a loop calling the loss on each row.

    Once per case (the loss runs eagerly, op by op: seconds for the transformer), shared by
    every strategy's test.
    """
    loss_fn, params, batch, mask, _ = case(name)
    return sum(
        _split(loss_fn(params, jax.tree_util.tree_map(lambda x, i=i: x[i], batch)))[1]
        for i in np.flatnonzero(np.asarray(mask))
    )


# ----------------------------------------------------------------- equivalence


@pytest.mark.parametrize("strategy", sorted(MEAN_STRATEGIES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_mean_strategies_match_loop_reference_under_jit(name, strategy):
    loss_fn, params, batch, mask, (ref_loss, ref_grad, _) = case(name)
    f = jax.jit(MEAN_STRATEGIES[strategy](loss_fn))
    out = f(params, batch, mask)
    assert isinstance(out, jaxgrad.GradResult)
    loss, grads = out.loss, out.grads
    assert_close(grads, ref_grad)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    # The count is the real items: examples, or tokens (reference: a loop over the rows).
    np.testing.assert_allclose(out.count, _reference_count(name), rtol=RTOL)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    # The reference is not trivially zero: a test that can only pass is a defect.
    assert max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(ref_grad)) > 1e-3


@pytest.mark.parametrize(
    "name, chunk_size",
    [
        ("mlp-softmax", None),
        ("mlp-softmax", 1),
        ("mlp-softmax", 3),  # 7 = 3 + 3 + 1: a remainder
        ("mlp-softmax", 7),
        ("mlp-softmax", 100),
        ("cnn-softmax", 2),
        ("transformer-tokens", None),
        ("transformer-tokens", 3),
    ],
)
def test_per_example_grads_match_single_example_grads(name, chunk_size):
    loss_fn, params, batch, mask, (_, _, ref_rows) = case(name)
    f = jax.jit(jaxgrad.per_example_grads(loss_fn, chunk_size=chunk_size))
    out = f(params, batch, mask)
    sums, rows = out.loss, out.grads
    assert_close(rows, ref_rows)
    # norms: ‖g_i‖ of the reference's rows, computed in numpy
    flat = np.concatenate(
        [np.reshape(r, (7, -1)) for r in jax.tree_util.tree_leaves(ref_rows)], axis=1
    )
    np.testing.assert_allclose(out.norms, np.linalg.norm(flat, axis=1), rtol=RTOL, atol=ATOL)
    assert out.count.shape == (7,) and np.all(np.asarray(out.count)[~np.asarray(mask)] == 0)
    for leaf, p in zip(
        jax.tree_util.tree_leaves(rows), jax.tree_util.tree_leaves(params), strict=True
    ):
        assert leaf.shape == (7, *p.shape)
    assert np.all(np.asarray(sums)[~np.asarray(mask)] == 0)


def test_per_example_loss_sums_match_reference():
    loss_fn, params, batch, _, _ = case("transformer-tokens")
    out = jaxgrad.per_example_grads(loss_fn)(params, batch)
    for i in range(batch.shape[0]):
        np.testing.assert_allclose(out.loss[i], loss_fn(params, batch[i])[0], rtol=RTOL)
        np.testing.assert_allclose(out.count[i], loss_fn(params, batch[i])[1], rtol=RTOL)


def test_strategies_work_without_jit_and_without_mask():
    loss_fn, params, batch, _, _ = case("mlp-softmax")
    _, ref, _ = _unmasked_reference("mlp-softmax")
    for make in MEAN_STRATEGIES.values():
        assert_close(make(loss_fn)(params, batch).grads, ref)


def test_mean_of_per_example_grads_gives_the_norms_it_forms():
    loss_fn, params, batch, mask, (_, _, ref_rows) = case("mlp-softmax")
    flat = np.concatenate([np.reshape(r, (7, -1)) for r in jax.tree_util.tree_leaves(ref_rows)], 1)
    want = np.linalg.norm(flat, axis=1)  # 0 on the padded rows: the reference zeroes them
    for chunk_size in (None, 3):
        out = jaxgrad.mean_of_per_example_grads(loss_fn, chunk_size=chunk_size)(params, batch, mask)
        np.testing.assert_allclose(out.norms, want, rtol=RTOL, atol=ATOL)
    # The strategies that never form per-example gradients say so with None.
    assert jaxgrad.batch_grad(loss_fn)(params, batch, mask).norms is None
    assert jaxgrad.accumulate_grad(loss_fn, num_microbatches=2)(params, batch, mask).norms is None


# ----------------------------------------------------------------- accumulation


@functools.cache
def _unmasked_reference(name):
    loss_fn, params, batch, _, _ = case(name)
    return reference(loss_fn, params, batch)


@pytest.mark.parametrize("k", [2, 9])  # 9 > 7 rows: empty microbatches
def test_accumulate_grad_unequal_token_counts_equals_batch_grad(k):
    # Sequences of lengths 6, 1, 3, ... give microbatches very different token counts.
    loss_fn, params, tokens, _, _ = case("transformer-tokens")
    _, ref, _ = _unmasked_reference("transformer-tokens")
    acc = jaxgrad.accumulate_grad(loss_fn, num_microbatches=k)(params, tokens)
    assert_close(acc.grads, ref)
    assert_close(acc, jaxgrad.batch_grad(loss_fn)(params, tokens))  # loss and count too


@pytest.mark.parametrize("unroll", [True, 2, False, "auto"])
def test_accumulate_grad_unrolled_equals_loop(unroll):
    # 7 rows in 3 microbatches (one padded row); unroll=2 leaves a partly unrolled loop.
    loss_fn, params, batch, mask, (ref_loss, ref, _) = case("mlp-softmax")
    f = jaxgrad.accumulate_grad(loss_fn, num_microbatches=3, unroll=unroll)
    loss, grads = jax.jit(f)(params, batch, mask)[1::-1]
    assert_close(grads, ref)
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)

    # ... and `unroll` picks the form: lax.scan with its unroll, or (True; "auto" on a CPU,
    # 3 <= 16 microbatches) no loop: the 3 microbatches as straight-line code, unfenced.
    def eqns_in(jaxpr):
        for e in jaxpr.eqns:
            yield e
            for v in e.params.values():
                inner = getattr(v, "jaxpr", v)  # ClosedJaxpr or Jaxpr (e.g. inside a pjit)
                if hasattr(inner, "eqns"):
                    yield from eqns_in(inner)

    eqns = list(eqns_in(jax.make_jaxpr(f)(params, batch, mask).jaxpr))
    scans = [(e.params["length"], e.params["unroll"]) for e in eqns if e.primitive.name == "scan"]
    barriers = [e for e in eqns if e.primitive.name == "optimization_barrier"]
    unrolled = unroll is True or (unroll == "auto" and jax.default_backend() == "cpu")
    assert scans == ([] if unrolled else [(3, 1 if unroll in (False, "auto") else unroll)])
    assert not barriers


@functools.cache
def _accumulators(k):
    loss_fn, *_ = case("mlp-squared")
    return jax.jit(jaxgrad.accumulate_grad(loss_fn, num_microbatches=k))


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 8), mask=hnp.arrays(bool, (7,)))
def test_accumulate_grad_any_split_and_mask_equals_loop(k, mask):
    loss_fn, params, batch, _, _ = case("mlp-squared")
    _, ref, _ = reference(loss_fn, params, batch, mask) if mask.any() else (None, None, None)
    acc = _accumulators(k)(params, batch, jnp.asarray(mask)).grads
    if mask.any():
        assert_close(acc, ref)
    else:  # An all-padding batch is a no-op, not NaN.
        assert_close(acc, jax.tree_util.tree_map(jnp.zeros_like, params), atol=0)


# ----------------------------------------------------------------- masks


@pytest.mark.parametrize("strategy", sorted(MEAN_STRATEGIES))
def test_masked_rows_contribute_nothing(strategy):
    """The masked gradient equals the gradient of the batch with those rows removed."""
    loss_fn, params, batch, _, _ = case("mlp-softmax")
    mask = np.array([True, False, False, True, True, False, True])
    removed = jax.tree_util.tree_map(lambda x: x[mask], batch)
    f = MEAN_STRATEGIES[strategy](loss_fn)
    masked = f(params, batch, jnp.asarray(mask))
    kept = f(params, removed)
    assert_close(masked[:3], kept[:3])  # grads, loss, count
    if masked.norms is not None:  # the padded rows' norms are 0
        assert_close(masked.norms[mask], kept.norms)
        assert np.all(np.asarray(masked.norms)[~mask] == 0)
    assert_close(masked.grads, reference(loss_fn, params, removed)[1])


@pytest.mark.parametrize("strategy", sorted(MEAN_STRATEGIES))
def test_garbage_in_masked_rows_cannot_leak(strategy):
    # Padded rows full of NaN/inf: their loss is NaN, but masked out it must not poison grads.
    loss_fn, params, batch, _, _ = case("mlp-squared")
    mask = np.array([True, True, False, True, True, False, True])
    x, y = batch
    x = x.at[2].set(jnp.nan).at[5].set(jnp.inf)
    f = MEAN_STRATEGIES[strategy](loss_fn)
    got = f(params, (x, y), jnp.asarray(mask)).grads
    assert_close(got, f(params, jax.tree_util.tree_map(lambda a: a[mask], batch)).grads)
    rows = jaxgrad.per_example_grads(loss_fn)(params, (x, y), jnp.asarray(mask))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(rows))


@settings(max_examples=20, deadline=None)
@given(mask=hnp.arrays(bool, (7,)))
def test_batch_grad_random_masks_match_loop(mask):
    loss_fn, params, batch, _, _ = case("logistic-softmax")
    grads = _jitted_batch_grad(loss_fn)(params, batch, jnp.asarray(mask)).grads
    if not mask.any():
        assert_close(grads, jax.tree_util.tree_map(jnp.zeros_like, params), atol=0)
        return
    assert_close(grads, reference(loss_fn, params, batch, mask)[1])
    assert_close(grads, _jitted_mean_pe(loss_fn)(params, batch, jnp.asarray(mask)).grads)


@functools.cache
def _jitted_batch_grad(loss_fn):
    return jax.jit(jaxgrad.batch_grad(loss_fn))


@functools.cache
def _jitted_mean_pe(loss_fn):
    return jax.jit(jaxgrad.mean_of_per_example_grads(loss_fn, chunk_size=2))


def test_all_masked_batch_is_zero_not_nan():
    loss_fn, params, batch, _, _ = case("mlp-softmax")
    mask = jnp.zeros(7, bool)
    for make in MEAN_STRATEGIES.values():
        grads, loss, count, _ = make(loss_fn)(params, batch, mask)
        assert float(loss) == 0.0 and float(count) == 0.0
        for leaf in jax.tree_util.tree_leaves(grads):
            assert np.all(np.asarray(leaf) == 0)


def test_mask_does_not_recompile():
    traces = []

    def loss_fn(p, ex):
        traces.append(1)
        return (p * ex) ** 2

    f = jaxgrad.batch_grad(loss_fn)
    x = jnp.arange(4.0)
    f(1.5, x, jnp.array([True, True, False, False]))
    n = len(traces)
    g = f(1.5, x, jnp.array([False, True, True, True])).grads
    assert len(traces) == n
    np.testing.assert_allclose(g, 2 * 1.5 * (1 + 4 + 9) / 3, rtol=RTOL)


# ----------------------------------------------------------------- any params pytree


class EqxLinear(eqx.Module):
    w: jax.Array
    b: jax.Array

    def __call__(self, x):
        return jnp.tanh(x @ self.w + self.b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Affine:
    scale: jax.Array
    shift: jax.Array


def _flax_case(key):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, param_dtype=F64)(jnp.tanh(nn.Dense(4, param_dtype=F64)(x)))

    net = Net()
    params = net.init(key, jnp.zeros(3, F64))

    def loss_fn(p, ex):
        return losses.squared_error(net.apply(p, ex[0]), ex[1])

    return params, loss_fn


def _eqx_module_case(key):
    k1, k2 = jax.random.split(key)
    params = EqxLinear(_normal(k1, (3, 2)), _normal(k2, (2,)))
    return params, lambda p, ex: jnp.sum((p(ex[0]) - ex[1]) ** 2)


def _eqx_partition_case(key):
    # An Equinox model with non-array fields (activations): the arrays are the params.
    mlp = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=key)
    mlp = jax.tree_util.tree_map(lambda x: x.astype(F64) if eqx.is_array(x) else x, mlp)
    params, static = eqx.partition(mlp, eqx.is_array)
    return params, lambda p, ex: jnp.sum((eqx.combine(p, static)(ex[0]) - ex[1]) ** 2)


def _nested_case(key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = ({"a": _normal(k1, (3,)), "b": (_normal(k2, ()),)}, [_normal(k3, (2, 3))])

    def loss_fn(p, ex):
        (d, (c,)), (m,) = (p[0], p[0]["b"]), p[1]
        h = jnp.sin(m @ (ex[0] * d["a"]) + c)
        return jnp.sum((h - ex[1]) ** 2)

    return params, loss_fn


def _dataclass_case(key):
    k1, k2 = jax.random.split(key)
    params = {"affine": Affine(_normal(k1, (3,)), _normal(k2, ()))}

    def loss_fn(p, ex):
        pred = jnp.exp(0.3 * (ex[0] * p["affine"].scale).sum() + p["affine"].shift)
        return jnp.sum((pred - ex[1][0]) ** 2)

    return params, loss_fn


PYTREE_CASES = {
    "flax": _flax_case,
    "equinox_module": _eqx_module_case,
    "equinox_partition": _eqx_partition_case,
    "nested_tuple_dict": _nested_case,
    "registered_dataclass": _dataclass_case,
}


@pytest.mark.parametrize("name", sorted(PYTREE_CASES))
def test_any_params_pytree(name):
    key = jax.random.key(3)
    params, loss_fn = PYTREE_CASES[name](key)
    x = _normal(jax.random.key(4), (5, 3))
    y = _normal(jax.random.key(5), (5, 2))
    mask = jnp.array([True, True, False, True, True])
    _, ref, ref_rows = reference(loss_fn, params, (x, y), mask)
    for make in MEAN_STRATEGIES.values():
        grads = jax.jit(make(loss_fn))(params, (x, y), mask).grads
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
        assert_close(grads, ref)
    rows = jax.jit(jaxgrad.per_example_grads(loss_fn, chunk_size=2))(params, (x, y), mask)
    assert_close(rows.grads, ref_rows)


# ----------------------------------------------------------------- bad input

ALL_FACTORIES = {name: strategies.get(name).factory() for name in strategies.names(exact=True)}


def _simple():
    loss = lambda p, ex: (p * ex[0] - ex[1]) ** 2
    return loss, 2.0, (jnp.arange(4.0), jnp.ones(4))


@pytest.mark.parametrize("factory", sorted(ALL_FACTORIES))
def test_bad_batches_name_the_argument(factory):
    loss, p, _ = _simple()
    f = ALL_FACTORIES[factory](loss)
    with pytest.raises(ValueError, match=r"`batch`.*\(4,\).*\(3,\)"):
        f(p, (jnp.ones(4), jnp.ones(3)))
    with pytest.raises(ValueError, match=r"`batch` is empty"):
        f(p, (jnp.ones(0), jnp.ones(0)))
    with pytest.raises(ValueError, match=r"`batch`.*scalar"):
        f(p, (jnp.ones(()), jnp.ones(4)))
    with pytest.raises(ValueError, match=r"`batch` has no array leaves"):
        f(p, ())
    # Under the caller's own jit too: the checks run at trace time.
    with pytest.raises(ValueError, match=r"`batch`"):
        jax.jit(f)(p, (jnp.ones(4), jnp.ones(3)))


@pytest.mark.parametrize("factory", sorted(ALL_FACTORIES))
def test_bad_masks_name_the_argument(factory):
    loss, p, batch = _simple()
    f = ALL_FACTORIES[factory](loss)
    with pytest.raises(ValueError, match=r"`mask` must have shape \(4,\).*\(3,\)"):
        f(p, batch, jnp.ones(3, bool))
    with pytest.raises(ValueError, match=r"`mask` must have shape \(4,\).*\(4, 1\)"):
        f(p, batch, jnp.ones((4, 1), bool))
    with pytest.raises(TypeError, match=r"`mask` must be boolean.*int"):
        f(p, batch, jnp.ones(4, jnp.int32))
    with pytest.raises(TypeError, match=r"`mask` must be boolean.*float"):
        f(p, batch, np.ones(4))
    with pytest.raises(TypeError, match=r"`mask` must be boolean"):
        f(p, batch, [1, 0, 1, 1])
    # A plain list of bools is a mask.
    np.testing.assert_allclose(
        jnp.sum(jnp.asarray(f(p, batch, [True, False, True, True]).grads)),
        jnp.sum(jnp.asarray(f(p, batch, jnp.array([True, False, True, True])).grads)),
    )


@pytest.mark.parametrize("factory", sorted(ALL_FACTORIES))
def test_labels_out_of_range_are_rejected(factory):
    model = models.mlp([3, 4, 3], dtype=F64)
    loss_fn = losses.supervised(model.apply, losses.softmax_cross_entropy, num_classes=3)
    params = model.init(jax.random.key(0))
    f = ALL_FACTORIES[factory](loss_fn)
    x = jnp.ones((4, 3))
    with pytest.raises(
        ValueError, match=r"labels \(`batch\[1\]`\).*\[0, 3\).*0 below, 1 above.*row 2"
    ):
        f(params, (x, jnp.array([0, 1, 3, 2])))
    with pytest.raises(ValueError, match=r"labels \(`batch\[1\]`\).*1 below, 0 above.*row 1"):
        f(params, (x, jnp.array([0, -1, 2, 2])))
    with pytest.raises(TypeError, match=r"labels \(`batch\[1\]`\) must be integers"):
        f(params, (x, jnp.array([0.0, 1.0, 2.0, 2.0])))


def test_out_of_range_labels_under_jit_give_nan_not_a_number():
    # Under the caller's jit the values are not concrete; the loss then answers NaN, never a
    # silently wrong finite gradient.
    model = models.mlp([3, 4, 3], dtype=F64)
    loss_fn = losses.supervised(model.apply, losses.softmax_cross_entropy, num_classes=3)
    params = model.init(jax.random.key(0))
    grads = jax.jit(jaxgrad.batch_grad(loss_fn))(params, (jnp.ones((2, 3)), jnp.array([0, 5])))
    grads = grads.grads
    assert np.isnan(np.asarray(grads[-1]["b"])).any()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_bad_hyperparameters(bad):
    loss, *_ = _simple()
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive integer"):
        jaxgrad.per_example_grads(loss, chunk_size=bad)
    with pytest.raises(ValueError, match=r"`chunk_size` must be a positive integer"):
        jaxgrad.mean_of_per_example_grads(loss, chunk_size=bad)
    with pytest.raises(ValueError, match=r"`num_microbatches` must be a positive integer"):
        jaxgrad.accumulate_grad(loss, num_microbatches=bad)


def test_hyperparameters_are_keyword_only():
    loss, *_ = _simple()
    with pytest.raises(TypeError):
        jaxgrad.accumulate_grad(loss, 2)
    with pytest.raises(TypeError):
        jaxgrad.per_example_grads(loss, 2)


@pytest.mark.parametrize("factory", sorted(ALL_FACTORIES))
def test_bad_loss_outputs_are_rejected(factory):
    _, p, batch = _simple()
    with pytest.raises(TypeError, match=r"`loss_fn` must return a scalar or a pair.*length 3"):
        ALL_FACTORIES[factory](lambda p, ex: (p, p, p))(p, batch)
    with pytest.raises(TypeError, match=r"`loss_fn` must return.*ONE example.*\(2,\)"):
        ALL_FACTORIES[factory](lambda p, ex: p * jnp.ones(2))(p, batch)


def test_docstring_examples():
    loss, p, _ = _simple()
    g = jaxgrad.batch_grad(loss)(p, (jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0])))
    assert float(g.grads) == 7.0 and float(g.loss) == 5.0 and float(g.count) == 2.0
    rows = jaxgrad.per_example_grads(loss)(p, (jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0])))
    np.testing.assert_allclose(rows.grads, [2.0, 12.0])


# --- issue 11: loss_fn(params, example, *args) ------------------------------------------------


def _dropout_loss(w, example, key, scale):
    # A per-example dropout mask from a base key and the example's id, and a traced scalar.
    x, y, idx = example
    keep = jax.random.bernoulli(jax.random.fold_in(key, idx), 0.7, x.shape)
    pred = jnp.tanh(jnp.where(keep, x / 0.7, 0.0) @ w)
    return scale * jnp.sum((pred - y) ** 2)


def test_extra_loss_arguments_reach_every_strategy():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3, 2)))
    batch = (
        jnp.asarray(rng.normal(size=(7, 3))),
        jnp.asarray(rng.normal(size=(7, 2))),
        jnp.arange(7),
    )
    key, scale = jax.random.key(9), jnp.float64(0.5)
    # reference: a Python loop over single examples
    per = [
        jax.grad(_dropout_loss)(w, jax.tree_util.tree_map(lambda a, i=i: a[i], batch), key, scale)
        for i in range(7)
    ]
    want = sum(per) / 7
    for f in (
        jaxgrad.batch_grad(_dropout_loss),
        jaxgrad.mean_of_per_example_grads(_dropout_loss),
        jaxgrad.accumulate_grad(_dropout_loss, num_microbatches=3),
        jaxgrad.clipped_grad(_dropout_loss, l2_clip=1e6, method="vmap"),
        jaxgrad.clipped_grad(_dropout_loss, l2_clip=1e6),
    ):
        out = f(w, batch, None, key, scale)
        np.testing.assert_allclose(
            np.asarray(getattr(out, "grads", out)),  # clipped_grad returns the gradient alone
            np.asarray(want),
            rtol=1e-10,
            err_msg=f.__name__,
        )
    pe = jaxgrad.per_example_grads(_dropout_loss)(w, batch, None, key, scale).grads
    np.testing.assert_allclose(np.asarray(pe), np.stack(per), rtol=1e-10)
    # another key gives another dropout pattern, so the argument is really used
    other = jaxgrad.batch_grad(_dropout_loss)(w, batch, None, jax.random.key(10), scale).grads
    assert not np.allclose(np.asarray(other), np.asarray(want))
    with pytest.raises(TypeError, match="takes no extra loss arguments"):
        jaxgrad.naive.backprop_mean_error(lambda p, x: x @ p, jaxgrad.losses.squared_error)(
            w, batch[:2], None, key
        )


def test_nnx_state_with_non_trainable_leaves_is_named_and_the_split_idiom_works():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs, param_dtype=jnp.float64)
            self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)))
    loss = lambda s, ex: jnp.sum(nnx.merge(graphdef, s).lin(ex) ** 2)
    with pytest.raises(TypeError, match=r"params\['steps'\].*is dtype int32.*nnx.split"):
        jaxgrad.batch_grad(loss)(state, x)
    graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    loss = lambda p, ex: jnp.sum(nnx.merge(graphdef, p, rest).lin(ex) ** 2)
    g = jaxgrad.batch_grad(loss)(params, x).grads
    w, b = params["lin"]["kernel"][...], params["lin"]["bias"][...]
    # closed form: d/dW mean ||x W + b||^2 = 2 X^T (X W + b) / n
    np.testing.assert_allclose(
        np.asarray(g["lin"]["kernel"][...]), np.asarray(2 * x.T @ (x @ w + b) / 5), rtol=1e-10
    )


EXACT = {
    "batch_grad": lambda f: jaxgrad.batch_grad(f),
    "accumulate_grad": lambda f: jaxgrad.accumulate_grad(f, num_microbatches=2),
    "mean_of_per_example_grads": lambda f: jaxgrad.mean_of_per_example_grads(f),
}


@pytest.mark.parametrize("strategy", sorted(EXACT))
def test_a_nan_loss_makes_the_gradient_nan_even_where_its_derivative_is_finite(strategy):
    """log(p x) at x = -3 is NaN while its derivative 1/p is finite: the documented rule is a
    NaN result, never a plausible update from a NaN batch."""
    loss = lambda p, x: jnp.log(p * x)
    out = EXACT[strategy](loss)(jnp.asarray(2.0, F64), jnp.asarray([1.0, -3.0, 2.0, 4.0], F64))
    assert np.isnan(float(out.loss)) and np.isnan(float(out.grads))


@pytest.mark.parametrize("strategy", sorted(EXACT))
def test_a_batch_with_no_real_row_gives_zeros_whatever_its_padding(strategy):
    """x / ‖x‖ on zero padding is NaN, and with no real row there is none to copy over it."""
    loss = lambda p, ex: jnp.sum(((ex[0] / jnp.linalg.norm(ex[0])) @ p - ex[1]) ** 2)
    batch = (jnp.zeros((4, 3), F64), jnp.zeros((4, 2), F64))
    out = EXACT[strategy](loss)(jnp.ones((3, 2), F64), batch, jnp.zeros(4, bool))
    assert float(out.loss) == 0 and float(out.count) == 0
    np.testing.assert_array_equal(out.grads, np.zeros((3, 2)))


@pytest.mark.parametrize("strategy", sorted(EXACT))
@pytest.mark.parametrize("dtype, items", [(jnp.float16, 4100), (jnp.bfloat16, 257)])
def test_counts_are_exact_next_to_low_precision_losses(strategy, dtype, items):
    """16 × 4100 tokens overflow float16 (65504), bfloat16 rounds 257 to 256: the count (and
    the division by it) is kept in float32, so the mean gradient is the float64 loop's up to
    the dtype's own rounding, not 0 or off by the count's rounding."""
    rows = 16 if dtype == jnp.float16 else 1

    def loss(p, x):  # a token loss: (sum over `items` tokens, items)
        return jnp.sum(p * x) * jnp.ones((), p.dtype), jnp.asarray(items)  # an int count

    x = jnp.asarray(np.linspace(-1.0, 1.0, rows) + 0.5, dtype)  # the loss in `dtype` too
    out = EXACT[strategy](loss)(jnp.asarray(1.0, dtype), x)
    want = float(np.sum(np.asarray(x, np.float64))) / (rows * items)
    assert float(out.count) == rows * items
    np.testing.assert_allclose(float(out.grads), want, atol=2e-2 * max(abs(want), 1e-3))
