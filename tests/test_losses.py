"""Losses against numpy formulas written out by hand, and supervised's label validation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad
from jaxgrad import losses, models, reduce

F64 = jnp.float64


def log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def test_squared_and_linear_error():
    p, t = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5])
    np.testing.assert_allclose(losses.squared_error(p, t), 1.0 + 9.0, rtol=1e-15)
    np.testing.assert_allclose(losses.squared_error(2.0, 0.5), 2.25, rtol=1e-15)
    np.testing.assert_allclose(losses.linear_error(p, t), (t - p).sum(), rtol=1e-15)
    # The linear error is linear in the prediction: its gradient is the constant −1.
    np.testing.assert_array_equal(jax.grad(losses.linear_error)(jnp.asarray(p), t), -np.ones(3))


def test_softmax_cross_entropy_against_numpy():
    logits = np.random.default_rng(0).normal(size=(5,)) * 3
    for label in range(5):
        np.testing.assert_allclose(
            losses.softmax_cross_entropy(jnp.asarray(logits), label),
            -log_softmax(logits)[label],
            rtol=1e-13,
        )
    g = jax.grad(losses.softmax_cross_entropy)(jnp.asarray(logits), 2)
    expected = np.exp(log_softmax(logits)) - np.eye(5)[2]
    np.testing.assert_allclose(g, expected, atol=1e-14)


@pytest.mark.parametrize("label", [-1, 5, 100])
def test_softmax_cross_entropy_out_of_range_is_nan_in_value_and_gradient(label):
    logits = jnp.arange(5.0)
    assert np.isnan(losses.softmax_cross_entropy(logits, label))
    # The gradient must be NaN too: a zero gradient would silently drop the example.
    assert np.isnan(jax.grad(losses.softmax_cross_entropy)(logits, label)).all()


def test_binary_cross_entropy_against_numpy():
    for z in (-30.0, -2.0, 0.0, 0.7, 40.0):
        for y in (0.0, 1.0, 0.3):
            expected = np.logaddexp(0, z) - y * z  # −y log σ(z) − (1−y) log(1−σ(z)), stable
            np.testing.assert_allclose(
                losses.binary_cross_entropy(jnp.float64(z), y), expected, rtol=1e-12, atol=1e-15
            )
    np.testing.assert_allclose(
        jax.grad(losses.binary_cross_entropy)(jnp.float64(0.7), 1.0), 1 / (1 + np.exp(-0.7)) - 1
    )
    assert losses.binary_cross_entropy(jnp.float64(1.0), 1).shape == ()


def test_token_cross_entropy_against_numpy_loop():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4))
    targets = np.array([1, 3, 0, 2, 0, 0])
    loss_sum, count = losses.token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    lsm = log_softmax(logits)
    expected = sum(-lsm[t, targets[t]] for t in range(6) if targets[t] != 0)
    np.testing.assert_allclose(loss_sum, expected, rtol=1e-13)
    assert float(count) == 3.0 and count.dtype == logits.dtype
    # Padding positions get no gradient.
    g = jax.grad(lambda z: losses.token_cross_entropy(z, jnp.asarray(targets))[0])(logits)
    np.testing.assert_array_equal(np.asarray(g)[targets == 0], 0)


def test_token_cross_entropy_pad_id_outside_classes():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)))
    targets = jnp.array([0, 2, -1, -1])
    loss_sum, count = losses.token_cross_entropy(logits, targets, pad_id=-1)
    lsm = log_softmax(logits)
    np.testing.assert_allclose(loss_sum, -lsm[0, 0] - lsm[1, 2], rtol=1e-13)
    assert float(count) == 2.0
    g = jax.grad(lambda z: losses.token_cross_entropy(z, targets, pad_id=-1)[0])(logits)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(np.asarray(g)[2:], 0)
    # A real target out of range is NaN, in the value and the gradient.
    bad = jnp.array([0, 7, -1, -1])
    assert np.isnan(losses.token_cross_entropy(logits, bad, pad_id=-1)[0])
    g = jax.grad(lambda z: losses.token_cross_entropy(z, bad, pad_id=-1)[0])(logits)
    assert np.isnan(g).any()


def test_all_padding_sequence_counts_zero():
    loss_sum, count = losses.token_cross_entropy(jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32))
    assert float(loss_sum) == 0.0 and float(count) == 0.0


def test_supervised_binds_model_and_loss():
    model = models.linear_regression(2, dtype=F64)
    params = {"w": jnp.array([1.0, -1.0]), "b": jnp.float64(0.5)}
    fn = losses.supervised(model.apply, losses.squared_error)
    np.testing.assert_allclose(fn(params, (jnp.array([2.0, 1.0]), 3.0)), (1.5 - 3.0) ** 2)
    assert "squared_error" in repr(fn)


def test_supervised_validate():
    fn = losses.supervised(lambda p, x: x, losses.softmax_cross_entropy, num_classes=3)
    fn.validate((np.ones((2, 3)), np.array([0, 2])))  # fine
    with pytest.raises(TypeError, match=r"`batch` must be a pair \(inputs, targets\); got dict"):
        fn.validate({"x": 1})
    with pytest.raises(TypeError, match=r"`batch` must be a pair"):
        fn.validate((1, 2, 3))
    with pytest.raises(
        TypeError, match=r"labels \(`batch\[1\]`\) must be integers .* got dtype float"
    ):
        fn.validate((np.ones((2, 3)), np.array([0.0, 2.0])))
    # Counts and a row, never a label's value (labels are private; messages reach logs).
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\); got 2 outside it") as e:
        fn.validate((np.ones((3, 3)), np.array([1, 7321, 9876])))
    assert "(0 below, 2 above or NaN; the first in row 1)" in str(e.value)
    assert "7321" not in str(e.value) and "9876" not in str(e.value)
    with pytest.raises(ValueError, match=r"1 below, 0 above or NaN; the first in row 1") as e:
        fn.validate((np.ones((2, 3)), np.array([0, -2])))
    assert "-2" not in str(e.value)
    # Token targets (B, T) are checked elementwise.
    with pytest.raises(ValueError, match=r"got 1 outside it .*the first in row 1"):
        fn.validate((np.ones((2, 3)), np.array([[0, 1], [9, 2]])))
    # Padded rows are not checked: they may carry an ignore label.
    fn.validate((np.ones((2, 3)), np.array([1, -100])), np.array([True, False]))
    with pytest.raises(ValueError, match=r"1 below"):
        fn.validate((np.ones((2, 3)), np.array([1, -100])), np.array([True, True]))
    # The row is the batch's, not the row among the unmasked ones (it said row 1 here), nor,
    # for a piece of a batch checked on its own (a device's rows), the row within the piece.
    padded = (np.ones((4, 3)), np.array([-100, 1, -100, 5]))
    with pytest.raises(ValueError, match=r"the first in row 3\)"):
        fn.validate(padded, np.array([False, True, False, True]))
    with pytest.raises(ValueError, match=r"the first in row 7\)"), reduce.batch_rows(range(4, 8)):
        fn.validate(padded, np.array([False, True, False, True]))
    # Binary labels may be floats in [0, 1]; a 2 is refused.
    binary = losses.supervised(lambda p, x: x, losses.binary_cross_entropy, num_classes=2)
    binary.validate((np.ones(2), np.array([0.0, 1.0])))
    with pytest.raises(ValueError, match=r"must lie in \[0\.0, 1\.0\]; got 1 outside it \(0 bel"):
        binary.validate((np.ones(2), np.array([0.0, 2.0])))
    # Without num_classes nothing about labels is checked.
    losses.supervised(lambda p, x: x, losses.squared_error).validate((np.ones(2), np.ones(2)))


def test_binary_cross_entropy_out_of_range_label_is_nan_not_a_number():
    logit = jnp.float64(0.3)
    assert np.isfinite(losses.binary_cross_entropy(logit, 1))
    for bad in (2, -1, 1.5):
        assert np.isnan(losses.binary_cross_entropy(logit, bad))
        assert np.isnan(jax.grad(losses.binary_cross_entropy)(logit, bad))


def test_labels_of_shape_b_by_1_are_named():
    model = jaxgrad.models.mlp([4, 8, 3])
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    batch = (jnp.ones((5, 4)), (jnp.arange(5) % 3)[:, None])
    with pytest.raises(
        ValueError, match=r"label must have shape \(\) .*got a label of shape \(1,\)"
    ):
        jaxgrad.batch_grad(loss_fn)(model.init(jax.random.key(0)), batch)
    # the flat labels work, and equal a hand-written cross-entropy (reference)
    params = model.init(jax.random.key(0))
    y = jnp.arange(5) % 3
    got = jaxgrad.batch_grad(loss_fn)(params, (batch[0], y)).loss
    logits = jax.vmap(model.apply, (None, 0))(params, batch[0])
    want = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(5), y])
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


@pytest.mark.parametrize(
    "loss", [losses.squared_error, losses.linear_error, losses.binary_cross_entropy]
)
def test_elementwise_losses_refuse_shapes_that_would_broadcast(loss):
    """(3,) against (3, 1) would broadcast to a 3x3 comparison: a silent wrong number."""
    for pred, target in [((3,), (3, 1)), ((3,), ()), ((2, 2), (4,))]:
        with pytest.raises(ValueError, match=rf"prediction \({pred[0]},.*and target"):
            loss(jnp.zeros(pred), jnp.zeros(target))
    # One number each, whatever the shape: (1,) against () is the same pair.
    for pred, target in [((1,), ()), ((), (1,)), ((1, 1), (1,))]:
        got = loss(jnp.full(pred, 0.25, F64), jnp.full(target, 1.0, F64))
        want = loss(jnp.asarray(0.25, F64), jnp.asarray(1.0, F64))
        np.testing.assert_allclose(got, want, rtol=1e-15)
    # Same shapes: the entrywise pairing, against numpy.
    p, t = np.linspace(-1, 1, 6).reshape(2, 3), np.linspace(0, 1, 6).reshape(2, 3)
    ref = {
        losses.squared_error: np.sum((p - t) ** 2),
        losses.linear_error: np.sum(t - p),
        losses.binary_cross_entropy: np.sum(np.logaddexp(0, p) - t * p),
    }[loss]
    np.testing.assert_allclose(loss(jnp.asarray(p), jnp.asarray(t)), ref, rtol=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_supervised_num_classes_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="`num_classes` must be a positive integer"):
        losses.supervised(lambda p, x: x, losses.softmax_cross_entropy, num_classes=bad)
    assert (
        losses.supervised(lambda p, x: x, losses.squared_error, num_classes=None).num_classes
        is None
    )
    assert (
        losses.supervised(
            lambda p, x: x, losses.softmax_cross_entropy, num_classes=np.int64(3)
        ).num_classes
        == 3
    )


@pytest.mark.parametrize(
    "num_classes, outputs, ok",
    [(3, (3,), True), (5, (3,), False), (1, (3,), False), (2, (), True), (2, (1,), True)],
)
def test_supervised_num_classes_must_match_the_models_outputs(num_classes, outputs, ok):
    """Labels are checked against num_classes: a model with fewer class scores would be
    indexed past its logits (a NaN loss, or examples silently dropped under privacy)."""
    apply = lambda p, x: jnp.zeros(outputs) + p * jnp.sum(x)
    binary = outputs in ((), (1,))
    loss = losses.binary_cross_entropy if binary else losses.softmax_cross_entropy
    loss_fn = losses.supervised(apply, loss, num_classes=num_classes)
    example = (jnp.ones(2), jnp.zeros(outputs) if binary else jnp.zeros((), jnp.int32))
    if ok:
        assert jnp.isfinite(loss_fn(1.0, example))
    else:
        match = rf"num_classes={num_classes}\).*shape {re.escape(str(outputs))}"
        with pytest.raises(ValueError, match=match):
            loss_fn(1.0, example)
