"""Every gradient strategy, and ``fit``, on the model shapes users bring from Flax and Equinox.

Each model is tiny and float64; every result is compared with a Python loop of ``jax.grad`` over
single examples (the independent reference). The NNX models are used as the README says:
``nnx.split`` into ``(graphdef, Params, rest)`` and ``nnx.merge`` inside the loss — the pattern
that once failed with "Cannot extract graph node from different trace level" for models with
``nnx.RNN`` or an ``nnx.scan`` stack, because a strategy closed over ``params`` inside ``vmap``.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxgrad
from jaxgrad import losses
from jaxgrad.train import fit

jax.config.update("jax_enable_x64", True)

F64 = {"param_dtype": jnp.float64, "dtype": jnp.float64}
TOL = {"rtol": 1e-9, "atol": 1e-10}
N, D, C = 4, 3, 2  # examples, features, classes
tm = jax.tree_util.tree_map


class Case:
    """A model as a user writes it: ``loss(params, example, *args)``, its data and args.

    ``fit_loss`` is the loss ``fit`` trains: ``fit_loss(params, (x, y)[, key])``; ``fit_args``
    says whether it takes a per-example key (``loss_key``).
    """

    def __init__(self, params, loss, batch, args=(), fit_loss=None, keyed=False):
        self.params, self.loss, self.batch, self.args = params, loss, batch, args
        self.fit_loss = loss if fit_loss is None else fit_loss
        self.keyed = keyed


def _data(key, shape=(D,)):
    x = jax.random.normal(jax.random.key(key), (N, *shape), jnp.float64)
    return x, jnp.array([0, 1, 1, 0])


def _nnx_case(module, x_shape=(D,)):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, example):
        x, y = example
        return losses.softmax_cross_entropy(nnx.merge(graphdef, params, rest)(x), y)

    return Case(params, loss, _data(1, x_shape))


class RNNNet(nnx.Module):
    """Token classification with ``nnx.RNN``: a (sum, count) loss over each sequence's length."""

    def __init__(self, rngs, initial_carry=True):
        self.rnn = nnx.RNN(nnx.SimpleCell(D, 4, rngs=rngs, **F64))
        self.out = nnx.Linear(4, C, rngs=rngs, **F64)
        self.initial_carry = initial_carry

    def __call__(self, x):  # x: (T, D) -> (T, C)
        carry = jnp.zeros((1, 4)) if self.initial_carry else None
        return self.out(self.rnn(x[None], initial_carry=carry)[0])


def _rnn_loss(graphdef, params, rest, example):
    x, y, length = example
    logits = nnx.merge(graphdef, params, rest)(x)
    real = jnp.arange(x.shape[0]) < length
    token = jax.vmap(losses.softmax_cross_entropy)(logits, y)
    return jnp.sum(jnp.where(real, token, 0.0)), jnp.sum(real)


def _rnn_batch():
    x = jax.random.normal(jax.random.key(2), (N, 5, D), jnp.float64)
    y = jax.random.randint(jax.random.key(3), (N, 5), 0, C)
    return x, y, jnp.array([5, 1, 3, 2])  # uneven token counts


def _rnn_case(graphdef, params, rest):
    loss = lambda p, ex: _rnn_loss(graphdef, p, rest, ex)
    return Case(params, loss, _rnn_batch())


def nnx_rnn():
    return _rnn_case(*nnx.split(RNNNet(nnx.Rngs(0)), nnx.Param, ...))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(D, D, rngs=rngs, **F64)

    def __call__(self, x):
        return jnp.tanh(self.linear(x))


class ScanStack(nnx.Module):
    """Three blocks with stacked parameters, run by ``nnx.scan`` (the layer-stack idiom)."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return Block(rngs)

        self.blocks = blocks(rngs)
        self.out = nnx.Linear(D, C, rngs=rngs, **F64)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return self.out(body(x, self.blocks))


class Ensemble(nnx.Module):
    """Three linear members made and applied by ``nnx.vmap``; the logits are their mean."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def members(rngs):
            return nnx.Linear(D, C, rngs=rngs, **F64)

        self.members = members(rngs)

    def __call__(self, x):
        @nnx.vmap(in_axes=(0, None), out_axes=0)
        def forward(member, x):
            return jnp.tanh(member(x))

        return jnp.mean(forward(self.members, x), axis=0)


class BatchNormNet(nnx.Module):
    """BatchNorm in eval mode (running averages, non-trivial ones), between two layers."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(D, 4, rngs=rngs, **F64)
        self.norm = nnx.BatchNorm(4, use_running_average=True, rngs=rngs, **F64)
        self.norm.mean[...] = jnp.asarray([0.1, -0.2, 0.3, 0.0], self.norm.mean.dtype)
        self.norm.var[...] = jnp.asarray([0.5, 2.0, 1.0, 3.0], self.norm.var.dtype)
        self.out = nnx.Linear(4, C, rngs=rngs, **F64)

    def __call__(self, x):
        return self.out(jnp.tanh(self.norm(self.hidden(x))))


class DropoutNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(D, 8, rngs=rngs, **F64)
        self.drop = nnx.Dropout(0.5)
        self.out = nnx.Linear(8, C, rngs=rngs, **F64)

    def __call__(self, x, key):
        return self.out(self.drop(jnp.tanh(self.hidden(x)), deterministic=False, rngs=key))


def nnx_dropout():
    """Dropout with a key per example: a base key argument, folded with the example's id."""
    graphdef, params, rest = nnx.split(DropoutNet(nnx.Rngs(0)), nnx.Param, ...)

    def keyed(params, x, y, key):
        return losses.softmax_cross_entropy(nnx.merge(graphdef, params, rest)(x, key), y)

    def loss(params, example, base_key):
        x, y, example_id = example
        return keyed(params, x, y, jax.random.fold_in(base_key, example_id))

    x, y = _data(4)
    fit_loss = lambda params, example, key: keyed(params, *example, key)
    return Case(
        params, loss, (x, y, jnp.arange(N)), (jax.random.key(7),), fit_loss=fit_loss, keyed=True
    )


class LinenScan(nn.Module):
    """A linen RNN: ``nn.scan`` over time of a Dense cell, parameters broadcast."""

    @nn.compact
    def __call__(self, x):  # (T, D)
        class Cell(nn.Module):
            @nn.compact
            def __call__(self, h, x_t):
                h = jnp.tanh(nn.Dense(4, **F64)(jnp.concatenate([h, x_t])))
                return h, h

        scan = nn.scan(
            Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=0, out_axes=0
        )
        h, _ = scan()(jnp.zeros(4), x)
        return nn.Dense(C, **F64)(h)


class LinenRemat(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.remat(nn.Dense)
        return dense(C, **F64)(jnp.tanh(dense(5, **F64)(x)))


def _linen_case(module, x_shape=(D,)):
    x, y = _data(5, x_shape)
    variables = module.init(jax.random.key(6), x[0])

    def loss(params, example):
        logits = module.apply({**variables, "params": params}, example[0])
        return losses.softmax_cross_entropy(logits, example[1])

    return Case(variables["params"], loss, (x, y))


class EqxNet(eqx.Module):
    """An Equinox model with non-trainable leaves (an int counter, a function), split by
    ``eqx.filter``."""

    layers: list
    calls: jax.Array
    activation: callable = eqx.field(static=True)

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.layers = [
            eqx.nn.Linear(D, 5, key=k1, dtype=jnp.float64),
            eqx.nn.Linear(5, C, key=k2, dtype=jnp.float64),
        ]
        self.calls = jnp.zeros((), jnp.int32)
        self.activation = jnp.tanh

    def __call__(self, x):
        return self.layers[1](self.activation(self.layers[0](x)))


def _eqx_case(model):
    params = eqx.filter(model, eqx.is_inexact_array)
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)

    def loss(params, example):
        return losses.softmax_cross_entropy(eqx.combine(params, static)(example[0]), example[1])

    return Case(params, loss, _data(8))


def _sequential():
    k1, k2 = jax.random.split(jax.random.key(9))
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(D, 5, key=k1, dtype=jnp.float64),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(5, C, key=k2, dtype=jnp.float64),
        ]
    )


CASES = {
    "nnx_rnn": nnx_rnn,
    "nnx_scan_stack": lambda: _nnx_case(ScanStack(nnx.Rngs(0))),
    "nnx_vmap_ensemble": lambda: _nnx_case(Ensemble(nnx.Rngs(0))),
    "nnx_batchnorm_eval": lambda: _nnx_case(BatchNormNet(nnx.Rngs(0))),
    "nnx_dropout": nnx_dropout,
    "linen_scan": lambda: _linen_case(LinenScan(), (5, D)),
    "linen_remat": lambda: _linen_case(LinenRemat()),
    "eqx_filter": lambda: _eqx_case(EqxNet(jax.random.key(8))),
    "eqx_sequential": lambda: _eqx_case(_sequential()),
}


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def _reference(case, params, batch, args):
    """Per-example (sum, count) and gradients of the sums, by a loop of ``jax.grad``."""

    def summed(p, example, args):
        loss_sum, count = jaxgrad.reduce.as_sum_count(case.loss(p, example, *args))
        return loss_sum, count

    grad_one = jax.jit(jax.value_and_grad(summed, has_aux=True))
    rows = [grad_one(params, tm(lambda x, i=i: x[i], batch), args) for i in range(N)]
    sums = np.array([float(r[0][0]) for r in rows])
    counts = np.array([float(r[0][1]) for r in rows])
    grads = [r[1] for r in rows]
    return sums, counts, grads


def _masked_mean(grads, real, count):
    """``Σ_i m_i g_i / count`` over a list of per-example gradient pytrees."""
    kept = [g for g, r in zip(grads, real, strict=True) if r]
    return tm(lambda *g: sum(g) / count, *kept)


def _close(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    np.testing.assert_allclose(_flat(actual), _flat(expected), **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_every_strategy_matches_a_grad_loop(name):
    case = CASES[name]()
    params, batch, args = case.params, case.batch, case.args
    mask = jnp.array([True, True, False, True])  # one padded row
    sums, counts, grads = _reference(case, params, batch, args)
    real = np.asarray(mask)
    count = counts[real].sum()
    assert count > 0
    mean = _masked_mean(grads, real, count)
    loss = sums[real].sum() / count

    got, got_loss, got_count, _ = jax.jit(jaxgrad.batch_grad(case.loss))(params, batch, mask, *args)
    _close(got, mean)
    np.testing.assert_allclose(float(got_loss), loss, **TOL)
    np.testing.assert_allclose(float(got_count), count, **TOL)
    f = jax.jit(jaxgrad.mean_of_per_example_grads(case.loss))
    _close(f(params, batch, mask, *args).grads, mean)
    accumulated = jax.jit(jaxgrad.accumulate_grad(case.loss, num_microbatches=3))
    _close(accumulated(params, batch, mask, *args).grads, mean)
    per = jax.jit(jaxgrad.per_example_grads(case.loss))(params, batch, mask, *args).grads
    zero = tm(jnp.zeros_like, grads[0])
    _close(
        per,
        tm(lambda *g: jnp.stack(g), *[g if r else zero for g, r in zip(grads, real, strict=True)]),
    )

    # Clipping at the median norm, so some examples are clipped and some are not.
    norms = np.array([np.linalg.norm(_flat(g)) for g in grads])
    clip = float(np.median(norms[real]))
    clipped = [
        tm(lambda x, n=n: x * min(1.0, clip / n), g) for g, n in zip(grads, norms, strict=True)
    ]
    clipped_mean = _masked_mean(clipped, real, count)
    got_clipped = jax.jit(jaxgrad.clipped_grad(case.loss, l2_clip=clip))(params, batch, mask, *args)
    _close(got_clipped, clipped_mean)


@pytest.mark.parametrize("name", ["nnx_rnn", "nnx_dropout"])
def test_fit_two_steps_matches_a_grad_loop(name):
    """``fit`` with one batch per epoch takes the step a ``jax.grad`` loop says it should."""
    case = CASES[name]()
    data = case.batch if name != "nnx_dropout" else case.batch[:2]
    loss_key = jax.random.key(11) if case.keyed else None
    lr = 0.3
    result = fit(
        case.fit_loss,
        case.params,
        data,
        optimizer=optax.sgd(lr),
        epochs=2,
        batch_size=N,
        key=jax.random.key(0),
        loss_key=loss_key,
        quiet=True,
    )
    params = case.params
    # the documented schedule (docs/models.md): fold_in(fold_in(fold_in(K, "loss"), step), row)
    loss_root = jax.random.fold_in(loss_key, 0x6C6F7373) if case.keyed else None
    for step in range(2):  # one batch of all N rows per epoch: a step is the mean over them
        rows = []
        for i in range(N):
            example = tm(lambda x, i=i: x[i], data)
            extra = (
                (jax.random.fold_in(jax.random.fold_in(loss_root, step), i),) if case.keyed else ()
            )
            loss_sum = lambda p, ex=example, extra=extra: case.fit_loss(p, ex, *extra)
            sum_count = lambda p, f=loss_sum: jaxgrad.reduce.as_sum_count(f(p))
            grad = jax.grad(lambda p, f=sum_count: f(p)[0])(params)
            rows.append((grad, float(sum_count(params)[1])))
        step_grad = _masked_mean([g for g, _ in rows], [True] * N, sum(c for _, c in rows))
        params = tm(lambda p, g: p - lr * g, params, step_grad)
    _close(result.params, params)


def test_nnx_rnn_without_initial_carry():
    """``nnx.RNN`` without ``initial_carry`` draws one from its own RNG stream, which mutates
    state the loss closes over: a clear error saying what to pass; passing the rest of the
    state as an extra argument works and gives the reference gradient."""
    graphdef, params, rest = nnx.split(RNNNet(nnx.Rngs(0), initial_carry=False), nnx.Param, ...)
    closed = _rnn_case(graphdef, params, rest)
    with pytest.raises(ValueError, match=r"initial_carry=.*f\(params, batch, mask, rest\)"):
        jaxgrad.batch_grad(closed.loss)(params, closed.batch)

    loss = lambda p, example, rest: _rnn_loss(graphdef, p, rest, example)
    case = Case(params, loss, _rnn_batch(), (rest,))
    # The reference: the same weights with the zero carry passed explicitly (SimpleCell's
    # default carry is zeros), by a loop of jax.grad.
    explicit = nnx_rnn()
    jax.tree_util.tree_map(np.testing.assert_array_equal, explicit.params, params)
    _, counts, grads = _reference(explicit, params, explicit.batch, ())
    mean = tm(lambda *g: sum(g) / counts.sum(), *grads)
    _close(jaxgrad.batch_grad(case.loss)(params, case.batch, None, rest).grads, mean)
    accumulated = jaxgrad.accumulate_grad(case.loss, num_microbatches=2)
    _close(accumulated(params, case.batch, None, rest).grads, mean)
