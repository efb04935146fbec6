"""jaxgrad._loops: the one loop policy chooses from the program's structure and sizes, and
gives the numbers of a Python loop in every form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrad import _loops, grads, models, reduce

jax.config.update("jax_enable_x64", True)

ONE_CPU = jax.default_backend() == "cpu" and jax.device_count() == 1


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
    # The form: straight-line code (a tanh per chunk: 5, and 1 for the remainder) or one
    # lax.scan (its body's tanh and the remainder's); no fences between steps in either. The
    # step (72 flops for 10 numbers handed on) is a small dense one: "auto" unrolls it.
    prims = _primitives(f, w, x, mask)
    unrolled = unroll is True or (unroll == "auto" and ONE_CPU)
    assert prims.count("scan") == (0 if unrolled else 1)
    assert prims.count("tanh") == (6 if unrolled else 2)
    assert "optimization_barrier" not in prims


def test_describe_counts_flops_and_what_a_step_hands_on():
    # A dot (2·3·5·4 flops), a 3x3 convolution of 2 -> 6 channels on a 4x4 image, SAME
    # (2·(4·4·6)·(3·3·2) flops), an inner scan of 7 steps of a (4,) @ (4, 4) dot (7·2·16).
    w = jnp.ones((4, 5))
    k = jnp.ones((3, 3, 2, 6))

    def body(carry, x):
        total, passed = carry
        y = x @ w
        img = jax.lax.conv_general_dilated(
            jnp.ones((1, 4, 4, 2)), k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        v, _ = jax.lax.scan(lambda c, _: (c @ jnp.eye(4), None), x[0], None, length=7)
        return (total + jnp.sum(y) + jnp.sum(img) + jnp.sum(v), passed), y

    step = _loops.describe(body, (0.0, jnp.ones(9)), jnp.ones((3, 4)))
    assert step.flops == 2 * 3 * 5 * 4 + 2 * (4 * 4 * 6) * (3 * 3 * 2) + 7 * 2 * 4 * 4
    # Handed on: the changed total (1) and the rows y (3 x 5); `passed` goes through unchanged.
    assert step.handed_on == 1 + 15
    assert step.intensity == step.flops / 16


def _step(flops, handed_on):
    return _loops.Body(flops=flops, handed_on=handed_on)


def test_form_reads_structure_and_sizes():
    big = _step(_loops.SCAN_INTENSITY * 100.0, 100)  # exactly at the threshold
    small = _step(_loops.SCAN_INTENSITY * 100.0 - 1, 100)
    heavy = _step(_loops.SCAN_INTENSITY * 1e6, 1)
    if ONE_CPU:
        assert _loops.form(4, "auto", big).unrolled is False
        assert "flops per number" in _loops.form(4, "auto", big).reason
        assert _loops.form(4, "auto", small).unrolled is True
        assert _loops.form(4, "auto", _step(5.0, 0)).unrolled is False  # hands nothing on
        assert _loops.form(4, "auto", None).unrolled is True
    n = _loops.MAX_UNROLL + 1
    assert _loops.form(n, "auto", small).unrolled is False
    assert _loops.form(n, True, big) == _loops.Form(True, 1, "unroll=True")
    assert _loops.form(2, False, heavy) == _loops.Form(False, False, "unroll=False")
    assert _loops.form(2, 2, heavy).scan_unroll == 2 and not _loops.form(2, 2, heavy).unrolled
    with pytest.raises(ValueError, match="`unroll` must be 'auto', True, False or an integer"):
        _loops.check_unroll(-1)


def test_auto_scans_a_long_loop_and_a_heavy_dense_step():
    n = _loops.MAX_UNROLL + 1
    carry, ys = jax.jit(lambda xs: _loops.scan(lambda c, x: (c + x, 2 * x), 0.0, xs))(
        jnp.arange(float(n))
    )
    assert float(carry) == n * (n - 1) / 2 and ys.tolist() == [2.0 * i for i in range(n)]
    # A (16, 32) @ (32, 32) chain of 4 dots per step, handing on one scalar: 2·16·32·32·4
    # flops per number, far above SCAN_INTENSITY -> lax.scan; a step of a few flops per
    # number handed on (a running sum) -> unrolled, on one CPU.
    w = jax.random.normal(jax.random.key(2), (32, 32), jnp.float64) / 6

    def heavy(c, x):
        for _ in range(4):
            x = jnp.tanh(x @ w)
        return c + jnp.sum(x), ()

    xs = jax.random.normal(jax.random.key(3), (3, 16, 32), jnp.float64)
    prims = _primitives(lambda xs: _loops.scan(heavy, 0.0, xs), xs)
    assert prims.count("scan") == 1
    prims = _primitives(lambda xs: _loops.scan(lambda c, x: (c + x, ()), 0.0, xs), xs)
    assert prims.count("scan") == (0 if ONE_CPU else 1)
    total, _ = jax.jit(lambda xs: _loops.scan(heavy, 0.0, xs))(xs)
    ref = 0.0
    for x in np.asarray(xs):
        for _ in range(4):
            x = np.tanh(x @ np.asarray(w))
        ref += x.sum()
    np.testing.assert_allclose(total, ref, rtol=1e-13)


def _case(kind):
    """A float64 CNN (unrolled under "auto") or MLP, 11 examples, example 4 masked out."""
    if kind == "cnn":
        model = models.cnn(image_shape=(6, 6), channels=(2,), num_classes=3, dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(4), (11, 6, 6), jnp.float64)
    else:
        model = models.mlp([5, 7, 3], dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(4), (11, 5), jnp.float64)

    def loss(p, ex):
        return -jax.nn.log_softmax(model.apply(p, ex[0]))[ex[1]]

    params = model.init(jax.random.key(5))
    batch = (x, jnp.arange(11) % 3)
    one = jax.jit(jax.grad(loss))  # the reference: a Python loop over the examples
    per_example = [one(params, (x[i], batch[1][i])) for i in range(11)]
    return loss, params, batch, jnp.arange(11) != 4, per_example


def _close(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-15)


def test_accumulate_grad_every_form_equals_a_python_loop():
    # A convolution in every form (tests/test_grads.py checks an MLP's forms the same way).
    loss, params, batch, mask, per_example = _case("cnn")
    real = [g for g, m in zip(per_example, mask.tolist(), strict=True) if m]
    ref = jax.tree_util.tree_map(lambda *gs: sum(gs) / len(gs), *real)
    for unroll in (True, False, 2):  # unrolled, scanned, partly unrolled: 3 microbatches of 4
        f = grads.accumulate_grad(loss, num_microbatches=3, unroll=unroll)
        _close(jax.jit(f)(params, batch, mask).grads, ref)


@pytest.mark.parametrize("chunk_size", [3, 32])
def test_per_example_grads_chunked_equals_a_python_loop(chunk_size):
    # 3 chunks of 3 and a remainder of 2; chunk_size >= B is the unchunked computation.
    loss, params, batch, _, per_example = _case("dense")
    out = jax.jit(grads.per_example_grads(loss, chunk_size=chunk_size))(params, batch)
    _close(out.grads, jax.tree_util.tree_map(lambda *gs: jnp.stack(gs), *per_example))


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
    assert _loops.scan_steps("auto") is True
    assert _loops.scan_steps(np.bool_(False)) is False
    with pytest.raises(ValueError, match="`scan` must be True, False or 'auto'; got 'yes'"):
        _loops.scan_steps("yes")
