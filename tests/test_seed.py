"""`python -m jaxgrad.seed` reproduces the seed's numbers, checked against numpy closed forms."""

import math

import jax
import jax.numpy as jnp
import pytest

import jaxgrad
from jaxgrad import seed


def _sigmoid_prime(x):
    s = 1 / (1 + math.exp(-x))
    return s * (1 - s)


@pytest.fixture(scope="module")
def results(seed_results):
    # `seed.main(["--json", path])`'s numbers, read back (tests/conftest.py).
    return seed_results


def test_json_has_every_key(results):
    expected = {
        "sigmoid.mean_of_grads",
        "sigmoid.grad_at_mean",
        "line_fit.max_abs_diff",
        "linear_loss.grad",
        "linear_loss.grad_varies_with_theta",
        "mlp.backprop_mean_error_rel_err",
        "dense.cross_covariance_max_abs_diff",
        "accumulation.mean_of_means_rel_err",
        "accumulation.exact_max_abs_diff",
    }
    assert expected <= set(results)


def test_sigmoid_numbers_match_the_closed_form(results):
    assert results["sigmoid.mean_of_grads"] == pytest.approx(
        (_sigmoid_prime(0) + _sigmoid_prime(1)) / 2, abs=1e-15
    )
    assert results["sigmoid.grad_at_mean"] == pytest.approx(_sigmoid_prime(0.5), abs=1e-15)
    assert round(results["sigmoid.mean_of_grads"], 4) == 0.2233
    assert round(results["sigmoid.grad_at_mean"], 4) == 0.2350


def test_exact_orders_agree_and_naive_orders_do_not(results):
    assert results["line_fit.max_abs_diff"] < 1e-12
    assert results["linear_loss.grad"] == pytest.approx(results["linear_loss.minus_mean_x"])
    assert results["linear_loss.grad_varies_with_theta"] is False
    assert results["dense.cross_covariance_max_abs_diff"] < 1e-12
    assert results["accumulation.exact_max_abs_diff"] < 1e-12
    assert results["mlp.backprop_mean_error_rel_err"] > 1e-3
    assert results["accumulation.mean_of_means_rel_err"] > 1e-2


def test_printed_table_names_every_number(capsys, results):
    print(seed.format_results(results))
    out = capsys.readouterr().out
    assert all(name in out for name in results)


def test_relative_errors_are_relative_to_the_exact_gradient():
    # ‖approx − exact‖ / ‖exact‖: twice the truth is 100 % off (a symmetric / max(‖a‖, ‖b‖)
    # would say 50 %), zero is 100 % off, and every leaf counts.
    exact = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}
    twice = jax.tree_util.tree_map(lambda x: 2 * x, exact)
    assert jaxgrad.check.relative_error(twice, exact) == pytest.approx(1.0, abs=1e-15)
    assert jaxgrad.check.relative_error(jax.tree_util.tree_map(jnp.zeros_like, exact), exact) == 1.0
    off = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(1.0)}
    assert jaxgrad.check.relative_error(off, exact) == pytest.approx(3 / 5, abs=1e-15)
    with pytest.raises(ValueError, match="`exact` is all zeros"):
        jaxgrad.check.relative_error(exact, jax.tree_util.tree_map(jnp.zeros_like, exact))
    with pytest.raises(AssertionError, match="`approx`"):
        jaxgrad.check.relative_error({"w": exact["w"]}, exact)
