"""jaxgrad._loops: the one loop policy gives the numbers of a Python loop, in every form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrad import _loops, models, reduce

jax.config.update("jax_enable_x64", True)


def _primitives(f, *args):
    def walk(jaxpr):
        for e in jaxpr.eqns:
            yield e.primitive.name
            for v in e.params.values():
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)

    return list(walk(jax.make_jaxpr(f)(*args).jaxpr))


@pytest.mark.parametrize("unroll", ["auto", True, False, 2, 5])
def test_chunked_every_form_equals_a_python_loop(unroll):
    # 5 chunks of 3 rows + a remainder of 2: a tanh "layer" per row, its sum as the total.
    x = jax.random.normal(jax.random.key(0), (17, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    mask = jnp.arange(17) % 4 != 1

    def body(ops, b, m):
        rows = jnp.tanh(b @ ops)
        return rows, jnp.sum(jnp.where(m[:, None], rows, 0))

    f = jax.jit(lambda w, x, m: reduce.chunked(body, x, m, chunk_size=3, operands=w, unroll=unroll))
    rows, total = f(w, x, mask)
    ref_rows = np.tanh(np.asarray(x) @ np.asarray(w))
    np.testing.assert_allclose(rows, ref_rows, rtol=1e-13)
    np.testing.assert_allclose(total, ref_rows[np.asarray(mask)].sum(), rtol=1e-13)
    # The form: fenced straight-line code (4 fences between 5 chunks) or one lax.scan.
    prims = _primitives(f, w, x, mask)
    one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    fenced = unroll is True or (unroll == "auto" and one_cpu)
    assert prims.count("optimization_barrier") == (4 if fenced else 0)
    assert prims.count("scan") == (0 if fenced else 1)


def test_auto_keeps_a_long_loop_a_loop():
    n = _loops.MAX_UNROLL + 1
    assert _loops.unrolled(n) is False and _loops.unrolled(n, True) is True
    assert _loops.unrolled(2, False) is False and _loops.unrolled(2, 2) is False
    carry, ys = jax.jit(lambda xs: _loops.scan(lambda c, x: (c + x, 2 * x), 0.0, xs))(
        jnp.arange(float(n))
    )
    assert float(carry) == n * (n - 1) / 2 and ys.tolist() == [2.0 * i for i in range(n)]


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_peeled_sum_is_the_sum_of_the_steps(steps):
    # Step k contributes (k + 1)^2 while k < steps; step 0 of an empty loop contributes 0
    # (the caller masks it), as a fully masked physical batch does.
    def one(k):
        return jnp.where(k < steps_arr, (k + 1.0) ** 2, 0.0), jnp.ones(2) * k

    steps_arr = jnp.int32(steps)
    total, vec = jax.jit(lambda s: _loops.peeled_sum(one, s))(steps_arr)
    assert float(total) == sum((k + 1.0) ** 2 for k in range(steps))
    assert vec.tolist() == [float(sum(range(max(steps, 1))))] * 2


def test_scan_steps_policy_and_errors():
    cnn, mlp = models.cnn(image_shape=(4, 4), channels=(2,)), models.mlp([3, 2])
    img, vec = jax.ShapeDtypeStruct((4, 4), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32)
    conv_loss = lambda p, x: jnp.sum(cnn.apply(p, x))
    dense_loss = lambda p, x: jnp.sum(mlp.apply(p, x))
    cpu = jax.default_backend() == "cpu"
    assert _loops.scan_steps("auto", conv_loss, cnn.init(jax.random.key(0)), img) is not cpu
    assert _loops.scan_steps("auto", dense_loss, mlp.init(jax.random.key(0)), vec) is True
    assert _loops.scan_steps(False, dense_loss, None, None) is False
    with pytest.raises(ValueError, match="`scan` must be True, False or 'auto'; got 'yes'"):
        _loops.scan_steps("yes", dense_loss, None, None)
    with pytest.raises(ValueError, match="`unroll` must be 'auto', True, False or an integer"):
        _loops.check_unroll(-1)
