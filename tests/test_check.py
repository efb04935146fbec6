"""assert_equivalent, tree_diff and compare, against numbers worked out by hand in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad
from jaxgrad import check, naive


def _sigmoid_pair():
    loss = lambda theta, x: jax.nn.sigmoid(theta + x)
    return jaxgrad.batch_grad(loss), naive.grad_at_mean_input(loss), jnp.array([0.0, 1.0])


def test_assert_equivalent_passes_on_equal_strategies_and_returns_outputs():
    loss = lambda p, ex: (p * ex[0] - ex[1]) ** 2
    batch = (jnp.arange(4.0), jnp.ones(4))
    a, b = check.assert_equivalent(
        jaxgrad.batch_grad(loss), jaxgrad.mean_of_per_example_grads(loss), 2.0, batch
    )
    np.testing.assert_allclose(a, np.mean(2 * np.arange(4.0) * (2 * np.arange(4.0) - 1)))
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_assert_equivalent_raises_on_a_real_difference():
    exact, at_mean, xs = _sigmoid_pair()
    with pytest.raises(AssertionError):
        check.assert_equivalent(exact, at_mean, 0.0, xs)


def test_assert_equivalent_float64_default_is_tight_float32_loose():
    x = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    tiny = jax.tree_util.tree_map(lambda v: v * (1 + 1e-8), x)
    with pytest.raises(AssertionError):  # 1e-8 relative is a real difference in float64
        check.assert_equivalent(lambda: x, lambda: tiny)
    check.assert_equivalent(lambda: x, lambda: tiny, rtol=1e-7)  # explicit tolerance wins
    x32 = jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), x)
    near32 = jax.tree_util.tree_map(lambda v: v * (1 + 1e-6), x32)
    check.assert_equivalent(lambda: x32, lambda: near32)
    far32 = jax.tree_util.tree_map(lambda v: v * (1 + 1e-3), x32)
    with pytest.raises(AssertionError):
        check.assert_equivalent(lambda: x32, lambda: far32)


def test_assert_equivalent_structure_mismatch_raises():
    with pytest.raises(AssertionError):
        check.assert_equivalent(lambda: {"a": jnp.ones(2)}, lambda: {"b": jnp.ones(2)})
    with pytest.raises(AssertionError):
        check.assert_equivalent(lambda: jnp.ones(2), lambda: jnp.ones(3))


def test_tree_diff_against_numpy_by_hand():
    a = {"w": np.array([[1.0, -2.0], [0.5, 4.0]]), "b": np.array([3.0])}
    b = {"w": np.array([[1.5, -2.0], [0.5, 1.0]]), "b": np.array([-1.0])}
    max_abs, max_rel, rel_l2 = check.tree_diff(a, b)
    # leaves are flattened in key order: b then w
    x = np.array([3.0, 1.0, -2.0, 0.5, 4.0])
    y = np.array([-1.0, 1.5, -2.0, 0.5, 1.0])
    assert max_abs == pytest.approx(4.0)  # |3 − (−1)|
    assert max_rel == pytest.approx(4.0 / 4.0)  # over the largest magnitude, 4
    expected_l2 = np.sqrt(4.0**2 + 0.5**2 + 3.0**2) / max(np.linalg.norm(x), np.linalg.norm(y))
    assert rel_l2 == pytest.approx(expected_l2, rel=1e-14)


def test_tree_diff_zeros_and_identical():
    z = {"a": np.zeros(3)}
    assert check.tree_diff(z, z) == (0.0, 0.0, 0.0)
    a = [np.array([1.0, 2.0])]
    assert check.tree_diff(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(AssertionError):
        check.tree_diff({"a": np.zeros(3)}, {"a": np.zeros(4)})


def test_compare_rows_and_numbers():
    exact, at_mean, xs = _sigmoid_pair()
    zero = lambda theta, x: jnp.zeros_like(theta)
    table = check.compare({"exact": exact, "at mean": at_mean, "zero": zero}, 0.0, xs)
    assert [(r.a, r.b) for r in table.rows] == [
        ("exact", "at mean"),
        ("exact", "zero"),
        ("at mean", "zero"),
    ]
    sig = lambda v: 1 / (1 + np.exp(-v))
    ds = lambda v: sig(v) * (1 - sig(v))
    e, m = (ds(0.0) + ds(1.0)) / 2, ds(0.5)
    first = table.rows[0]
    assert first.max_abs_diff == pytest.approx(abs(e - m), rel=1e-12)
    assert first.max_rel_diff == pytest.approx(abs(e - m) / max(e, m), rel=1e-12)
    assert first.rel_l2_diff == pytest.approx(abs(e - m) / max(e, m), rel=1e-12)
    assert table.rows[1].max_abs_diff == pytest.approx(e, rel=1e-12)
    assert table.rows[1].max_rel_diff == pytest.approx(1.0)
    np.testing.assert_allclose(table.outputs["at mean"], m, rtol=1e-12)
    md = str(table)
    assert md.splitlines()[0].startswith("| a | b |") and "| exact | at mean |" in md
    assert len(md.splitlines()) == 2 + 3
    records = table.to_records()
    assert records[0]["a"] == "exact" and records[0]["max_abs_diff"] == first.max_abs_diff


def test_compare_docstring_example():
    loss = lambda theta, x: jax.nn.sigmoid(theta * x)
    table = check.compare(
        {"exact": jaxgrad.batch_grad(loss), "at mean input": naive.grad_at_mean_input(loss)},
        1.0,
        jnp.array([0.0, 1.0]),
    )
    assert round(table.rows[0].max_abs_diff, 4) == 0.0192  # (σ'(1)/2 vs σ'(0.5)/2)


@pytest.mark.parametrize("fns", [{}, {"one": lambda: 0}, [lambda: 0, lambda: 1]])
def test_compare_needs_two_named_functions(fns):
    with pytest.raises(ValueError, match=r"`fns` must be a dict of at least two"):
        check.compare(fns)


# --- issue 11: results as well as functions; clear messages for mismatched trees -------------


def test_assert_equivalent_accepts_results():
    a, b = jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0 + 1e-13])
    out = check.assert_equivalent(a, b)
    assert out[0] is a and out[1] is b
    with pytest.raises(AssertionError):
        check.assert_equivalent(a, jnp.array([1.0, 2.1]))
    with pytest.raises(TypeError, match=r"both be functions .* or both be results"):
        check.assert_equivalent(lambda: a, b)
    with pytest.raises(TypeError, match="nothing to call"):
        check.assert_equivalent(a, b, 1.0)
    with pytest.raises(AssertionError, match=r"same tree structure.*\(2,\).*\(3,\)"):
        check.assert_equivalent(a, jnp.ones(3))


def test_compare_of_differently_shaped_outputs_names_both():
    fns = {"whole": lambda x: {"w": x}, "half": lambda x: {"w": x[:1]}}
    with pytest.raises(ValueError, match=r"`fns\['whole'\]`'s output and `fns\['half'\]`'s"):
        check.compare(fns, jnp.ones(2))
    with pytest.raises(TypeError, match=r"`fns\['b'\]` must be a function"):
        check.compare({"a": lambda x: x, "b": jnp.ones(2)}, jnp.ones(2))


def test_grad_results_are_compared_by_their_gradients():
    """batch_grad has no norms and mean_of_per_example_grads has them: their GradResults
    differ in structure, but the check compares the gradients (worked out by hand)."""
    loss = lambda p, ex: (p * ex[0] - ex[1]) ** 2
    batch = (jnp.arange(4.0), jnp.ones(4))
    exact = jaxgrad.batch_grad(loss)(2.0, batch)
    mean = jaxgrad.mean_of_per_example_grads(loss)(2.0, batch)
    a, b = check.assert_equivalent(exact, mean)
    assert a is exact.grads and b is mean.grads
    want = np.mean(2 * np.arange(4.0) * (2 * np.arange(4.0) - 1))  # 2 x (p x - y)
    table = check.compare(
        {"exact": jaxgrad.batch_grad(loss), "halved": lambda p, b: exact._replace(grads=want / 2)},
        2.0,
        batch,
    )
    np.testing.assert_allclose(table.outputs["exact"], want)
    np.testing.assert_allclose(table.rows[0].max_abs_diff, want / 2)
