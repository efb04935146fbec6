"""(sum, count) reductions, masks and microbatch splitting, against numpy."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgrad
from jaxgrad import reduce


def test_as_sum_count():
    s, c = reduce.as_sum_count(jnp.float64(2.5))
    assert float(s) == 2.5 and float(c) == 1.0 and c.dtype == jnp.float64
    s, c = reduce.as_sum_count((jnp.float64(6.0), jnp.int32(3)))
    assert float(s) == 6.0 and float(c) == 3.0 and c.dtype == jnp.float64
    s, c = reduce.as_sum_count([1.0, 2.0])
    assert float(c) == 2.0
    with pytest.raises(TypeError, match=r"`loss_fn` must return a scalar or a pair.*length 3"):
        reduce.as_sum_count((1.0, 2.0, 3.0))
    with pytest.raises(TypeError, match=r"ONE example.*got shape \(4,\)"):
        reduce.as_sum_count(jnp.ones(4))
    with pytest.raises(TypeError, match=r"got shapes \(\) and \(2,\)"):
        reduce.as_sum_count((1.0, jnp.ones(2)))


def test_loss_sum_fn():
    f = reduce.loss_sum_fn(lambda p, ex: (p * ex, 4.0))
    assert float(f(2.0, 3.0)) == 6.0


def test_batch_size_checks():
    assert reduce.batch_size({"x": np.ones((5, 2)), "y": [np.ones(5)]}) == 5
    with pytest.raises(ValueError, match=r"`batch` leaves must share a leading axis; got shapes"):
        reduce.batch_size((np.ones((32, 3)), np.ones(31)))
    with pytest.raises(ValueError, match=r"`batch` is empty"):
        reduce.batch_size(np.ones((0, 3)))
    with pytest.raises(ValueError, match=r"`batch`.*scalar leaf"):
        reduce.batch_size((np.ones(3), 1.0))
    with pytest.raises(ValueError, match=r"`data` has no array leaves"):
        reduce.batch_size({}, name="data")


def test_check_mask():
    np.testing.assert_array_equal(reduce.check_mask(None, 3), [True] * 3)
    np.testing.assert_array_equal(reduce.check_mask([True, False], 2), [True, False])
    with pytest.raises(ValueError, match=r"`mask` must have shape \(3,\).*got \(2,\)"):
        reduce.check_mask(np.ones(2, bool), 3)
    with pytest.raises(TypeError, match=r"`mask` must be boolean.*float"):
        reduce.check_mask(np.ones(3), 3)
    with pytest.raises(TypeError, match=r"`weights` must be boolean"):
        reduce.check_mask([0, 1, 1], 3, name="weights")
    # Works on tracers (under a caller's jit).
    out = jax.jit(lambda m: reduce.check_mask(m, 2))(jnp.array([True, False]))
    np.testing.assert_array_equal(out, [True, False])


def test_masked_totals_and_safe_divide():
    sums, counts = jnp.array([1.0, jnp.nan, 3.0]), jnp.array([2.0, 5.0, 1.0])
    total, count = reduce.masked_totals(sums, counts, jnp.array([True, False, True]))
    assert float(total) == 4.0 and float(count) == 3.0  # the NaN row is masked out
    np.testing.assert_allclose(reduce.safe_divide({"a": jnp.array([3.0, 6.0])}, 3.0)["a"], [1, 2])
    assert float(reduce.safe_divide(jnp.float64(0.0), jnp.float64(0.0))) == 0.0  # all padding
    # issue 11: a nonzero sum over no items is meaningless: NaN, not a silent 0
    assert np.isnan(float(reduce.safe_divide(jnp.float64(5.0), jnp.float64(0.0))))
    # The gradient through an empty count is 0, not NaN.
    g = jax.grad(lambda t: reduce.safe_divide(t, jnp.float64(0.0)))(1.0)
    assert float(g) == 0.0


def test_fill_padding_replaces_padded_rows_with_a_real_row():
    x = jnp.array([[jnp.nan, 0.0], [1.0, 2.0], [jnp.inf, 3.0]])
    out = reduce.fill_padding({"x": x, "y": jnp.array([7, 8, 9])}, jnp.array([False, True, False]))
    np.testing.assert_array_equal(out["x"], [[1.0, 2.0]] * 3)
    np.testing.assert_array_equal(out["y"], [8, 8, 8])
    none = reduce.fill_padding(x, jnp.zeros(3, bool))  # no real row: unchanged shape
    assert none.shape == (3, 2)


def test_pad_batch():
    batch = {"x": jnp.arange(6.0).reshape(3, 2)}
    padded, mask = reduce.pad_batch(batch, jnp.array([True, False, True]), 5)
    np.testing.assert_array_equal(padded["x"][3:], [[0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_array_equal(mask, [True, False, True, False, False])
    same, _ = reduce.pad_batch(batch, jnp.ones(3, bool), 3)
    assert same is batch


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_split_microbatches_preserves_rows_in_order(data):
    n = data.draw(st.integers(1, 12))
    k = data.draw(st.integers(1, 13))
    mask = data.draw(hnp.arrays(bool, (n,)))
    x = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    micro, micro_mask = reduce.split_microbatches({"x": jnp.asarray(x)}, jnp.asarray(mask), k)
    per = -(-n // k)
    assert micro["x"].shape == (k, per, 2) and micro_mask.shape == (k, per)
    flat, flat_mask = np.asarray(micro["x"]).reshape(-1, 2), np.asarray(micro_mask).reshape(-1)
    np.testing.assert_array_equal(flat[:n], x)
    np.testing.assert_array_equal(flat_mask[:n], mask)
    assert not flat_mask[n:].any()
    assert np.isfinite(flat).all()


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize(
    "n, how",
    [
        (10, {"chunk_size": 3}),
        (9, {"chunk_size": 3}),
        (10, {"num_chunks": 4}),
        (5, {"num_chunks": 7}),
        (4, {"chunk_size": 9}),
        (6, {"num_chunks": 1}),
    ],
)
def test_chunked_rows_in_order_totals_once(n, how, interleave):
    # Each row's value, the first row of its chunk, and totals (masked sum, real rows seen):
    # against numpy, and a closed form for which rows share a chunk.
    x = np.arange(1.0, n + 1)
    mask = np.arange(n) % 3 != 1

    def body(xs, m):
        rows = (2 * xs, jnp.broadcast_to(xs[0], xs.shape))
        return rows, (jnp.sum(jnp.where(m, xs, 0)), jnp.sum(m.astype(jnp.int32)))

    (doubled, first), (total, seen) = reduce.chunked(
        body, jnp.asarray(x), jnp.asarray(mask), interleave=interleave, **how
    )
    np.testing.assert_array_equal(doubled, 2 * x)
    assert float(total) == x[mask].sum() and int(seen) == mask.sum()
    size = how.get("chunk_size")
    if size is not None and size >= n:
        np.testing.assert_array_equal(first, np.full(n, 1.0))  # one call on the whole batch
        return
    k = n // size if size else how["num_chunks"]
    per = size or -(-n // k)
    cut = k * per if size else n
    i = np.arange(cut)
    expected = (i % k if interleave else (i // per) * per) + 1.0
    np.testing.assert_array_equal(first[:cut], expected)
    if cut < n:  # the remainder, on its own after the scan
        np.testing.assert_array_equal(first[cut:], np.full(n - cut, cut + 1.0))


def test_chunked_rejects_both_or_neither():
    body = lambda xs, m: (xs, ())
    for how in ({}, {"chunk_size": 2, "num_chunks": 2}):
        with pytest.raises(ValueError, match="exactly one of `chunk_size` and `num_chunks`"):
            reduce.chunked(body, jnp.ones(4), jnp.ones(4, bool), **how)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer; got 0"):
        reduce.chunked(body, jnp.ones(4), jnp.ones(4, bool), chunk_size=0)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, None, "2"])
def test_check_positive_int_rejects(bad):
    with pytest.raises(ValueError, match=r"`num_microbatches` must be a positive integer"):
        reduce.check_positive_int(bad, name="num_microbatches")


def test_check_positive_int_accepts_numpy_ints():
    assert reduce.check_positive_int(np.int64(4), name="k") == 4


@pytest.mark.parametrize("bad", [-1e-300, float("inf"), float("nan"), True, None, "1", [1.0]])
def test_check_nonnegative_float_rejects(bad):
    with pytest.raises(ValueError, match=r"`stddev` must be a non-negative finite number"):
        reduce.check_nonnegative_float(bad, name="stddev")


@pytest.mark.parametrize("good", [0, 0.0, 2, np.float32(0.5), np.array(3.0), jnp.array(1.5)])
def test_check_nonnegative_float_accepts_numbers(good):
    assert reduce.check_nonnegative_float(good, name="stddev") == float(good)


# --- issue 11: no silent numbers from (sum, count) pairs, loss None, params ------------------


@pytest.mark.parametrize("count", [0.0, -1.0, float("nan"), float("inf")])
def test_meaningless_count_gives_nan_not_zero(count):
    # A count of 0 with a positive sum (or a negative/NaN/inf count) is no item count.
    loss = lambda p, ex: (p * ex, jnp.asarray(count, ex.dtype))
    batch = jnp.array([1.0, 2.0])
    grads, value, *_ = jaxgrad.batch_grad(loss)(2.0, batch)
    assert np.isnan(float(value)) and np.isnan(float(grads))
    assert np.isnan(float(jaxgrad.mean_of_per_example_grads(loss)(2.0, batch).grads))


def test_zero_count_with_zero_sum_is_a_valid_empty_example():
    # An example with no real tokens: sum 0, count 0, contributes nothing; the other counts.
    loss = lambda p, ex: (p * ex[0] * ex[1], ex[1])
    batch = (jnp.array([3.0, 5.0]), jnp.array([0.0, 1.0]))
    out = jaxgrad.batch_grad(loss)(2.0, batch)
    assert float(out.grads) == 5.0 and float(out.count) == 1.0  # reference: 5 / 1


@pytest.mark.parametrize("out", [None, (None, 1.0)])
def test_loss_returning_none_is_named(out):
    with pytest.raises(TypeError, match="`loss_fn` returned"):
        jaxgrad.batch_grad(lambda p, ex: out)(1.0, jnp.ones(2))


@pytest.mark.parametrize("params", [None, {}, []])
def test_empty_params_are_an_error(params):
    with pytest.raises(ValueError, match="`params` has no array leaves"):
        jaxgrad.batch_grad(lambda p, ex: ex)(params, jnp.ones(2))


@pytest.mark.parametrize(
    "leaf", [jnp.array(3), jnp.array([True]), jax.random.key(0), jax.random.PRNGKey(0)]
)
def test_non_float_leaf_is_named_by_path(leaf):
    params = {"w": jnp.ones(2), "state": {"step": leaf}}
    loss = lambda p, ex: jnp.dot(p["w"], ex)
    with pytest.raises(TypeError, match=r"params\['state'\]\['step'\].*eqx.partition"):
        jaxgrad.batch_grad(loss)(params, jnp.ones((3, 2)))


def test_switches_must_be_true_or_false():
    """A truthy string would switch an option on silently; NumPy bools are bools."""
    from jaxgrad import privacy

    loss = lambda w, ex: jnp.dot(ex, w)
    builders = {
        "return_loss": lambda v: jaxgrad.clipped_grad(loss, l2_clip=1.0, return_loss=v),
        "return_norms": lambda v: jaxgrad.clipped_grad(loss, l2_clip=1.0, return_norms=v),
        "strict": lambda v: jaxgrad.per_example_norms(loss, strict=v),
        "return_info": lambda v: privacy.dp_grad(
            loss, l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=2, return_info=v
        ),
    }
    w, batch = jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 0.5]])
    for name, build in builders.items():
        for bad in ("no", 1, 0.0, np.array([True])):
            with pytest.raises(ValueError, match=rf"`{name}` must be True or False; got"):
                build(bad)
    # np.bool_ is accepted and means what it says.
    loss_value, g = jaxgrad.clipped_grad(loss, l2_clip=1e6, return_loss=np.bool_(True))(w, batch)
    np.testing.assert_allclose(g, batch.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(loss_value, np.mean(batch @ np.ones(2)), rtol=1e-12)
