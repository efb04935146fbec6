"""Models: shapes, dtypes, parameter layouts, padding invariance and bad hyperparameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad
from jaxgrad import models

F64 = jnp.float64


def _jit_apply(model):
    """The same model with a jit-compiled ``apply`` (eager transformers are slow to test)."""
    return models.Model(jax.jit(model.init), jax.jit(model.apply))


def _shapes(tree):
    return jax.tree_util.tree_map(jnp.shape, tree)


def _batched(model, params, x):
    return jax.jit(jax.vmap(model.apply, in_axes=(None, 0)))(params, x)


def test_line_fit():
    model = models.line_fit(dtype=F64)
    params = model.init(jax.random.key(0))
    assert _shapes(params) == {"m": (), "b": ()}
    params = {"m": jnp.float64(2.0), "b": jnp.float64(-1.0)}
    np.testing.assert_array_equal(_batched(model, params, jnp.arange(3.0)), [-1.0, 1.0, 3.0])


def test_linear_regression():
    model = models.linear_regression(3, dtype=F64)
    params = model.init(jax.random.key(0))
    assert _shapes(params) == {"w": (3,), "b": ()}
    params = {"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.float64(0.5)}
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(_batched(model, params, x), x @ [1.0, 2.0, 3.0] + 0.5)


@pytest.mark.parametrize("num_classes, w_shape", [(2, (4,)), (5, (4, 5))])
def test_logistic_regression_shapes(num_classes, w_shape):
    model = models.logistic_regression(4, num_classes=num_classes, dtype=F64)
    params = model.init(jax.random.key(0))
    assert _shapes(params) == {"w": w_shape, "b": w_shape[1:]}
    out = _batched(model, params, jnp.ones((3, 4), F64))
    assert out.shape == (3, *w_shape[1:]) and out.dtype == F64


def test_mlp_layout_and_forward():
    model = models.mlp([4, 5, 3], activation="tanh", dtype=F64)
    params = model.init(jax.random.key(0))
    assert _shapes(params) == [{"w": (4, 5), "b": (5,)}, {"w": (5, 3), "b": (3,)}]
    assert all(leaf.dtype == F64 for leaf in jax.tree_util.tree_leaves(params))
    x = np.random.default_rng(0).normal(size=4)
    p = jax.tree_util.tree_map(np.asarray, params)
    expected = np.tanh(x @ p[0]["w"] + p[0]["b"]) @ p[1]["w"] + p[1]["b"]
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-12)
    # The input is flattened: a (2, 2) "image" works with sizes[0] == 4.
    np.testing.assert_allclose(model.apply(params, x.reshape(2, 2)), expected, rtol=1e-12)
    # init is deterministic in the key and differs between keys.
    same = model.init(jax.random.key(0))
    other = model.init(jax.random.key(1))
    assert np.array_equal(same[0]["w"], params[0]["w"])
    assert not np.array_equal(other[0]["w"], params[0]["w"])


@pytest.mark.parametrize("activation", sorted(models.ACTIVATIONS))
def test_mlp_activations(activation):
    model = models.mlp([3, 4, 2], activation=activation, dtype=F64)
    out = _batched(model, model.init(jax.random.key(0)), jnp.ones((5, 3), F64))
    assert out.shape == (5, 2) and np.isfinite(out).all()


def test_cnn_shapes_grey_and_colour():
    grey = _jit_apply(models.cnn(image_shape=(8, 8), channels=(2, 3), num_classes=4, dtype=F64))
    params = grey.init(jax.random.key(0))
    assert _shapes(params) == {
        "conv": [{"w": (3, 3, 1, 2), "b": (2,)}, {"w": (3, 3, 2, 3), "b": (3,)}],
        "dense": {"w": (2 * 2 * 3, 4), "b": (4,)},
    }
    x = jax.random.normal(jax.random.key(1), (5, 8, 8), F64)
    out = _batched(grey, params, x)
    assert out.shape == (5, 4) and out.dtype == F64
    # (H, W) is read as (H, W, 1).
    np.testing.assert_allclose(_batched(grey, params, x[..., None]), out, rtol=1e-12)
    colour = _jit_apply(models.cnn(image_shape=(7, 9, 3), channels=(2,), num_classes=3, dtype=F64))
    cp = colour.init(jax.random.key(0))
    assert cp["dense"]["w"].shape == (3 * 4 * 2, 3)  # odd sizes are floored by the pooling
    assert _batched(colour, cp, jnp.ones((2, 7, 9, 3), F64)).shape == (2, 3)


def test_cnn_matches_a_numpy_convolution():
    model = models.cnn(
        image_shape=(4, 4), channels=(1,), num_classes=1, activation="relu", dtype=F64
    )
    params = model.init(jax.random.key(2))
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 4), F64))
    w, b = np.asarray(params["conv"][0]["w"])[:, :, 0, 0], float(params["conv"][0]["b"][0])
    padded = np.pad(x, 1)  # SAME padding for a 3x3 kernel, stride 1, cross-correlation
    conv = np.array(
        [[np.sum(padded[i : i + 3, j : j + 3] * w) + b for j in range(4)] for i in range(4)]
    )
    pooled = np.maximum(conv, 0).reshape(2, 2, 2, 2).mean(axis=(1, 3))
    dense = jax.tree_util.tree_map(np.asarray, params["dense"])
    expected = pooled.reshape(-1) @ dense["w"] + dense["b"]
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-12)


def _transformer(causal, **kw):
    model = _jit_apply(
        models.transformer(
            vocab_size=11,
            max_len=8,
            d_model=8,
            num_heads=2,
            num_layers=2,
            causal=causal,
            dtype=F64,
            **kw,
        )
    )
    return model, model.init(jax.random.key(0))


def test_transformer_shapes():
    model, params = _transformer(True)
    assert params["embed"].shape == (11, 8) and params["pos"].shape == (8, 8)
    assert len(params["blocks"]) == 2
    assert _shapes(params["blocks"][0]["attn"]) == {k: (8, 8) for k in ("wq", "wk", "wv", "wo")}
    out = _batched(model, params, jnp.ones((3, 5), jnp.int32))
    assert out.shape == (3, 5, 11) and out.dtype == F64
    classifier = _jit_apply(
        models.transformer(vocab_size=11, max_len=8, num_outputs=3, d_ff=7, dtype=F64)
    )
    cp = classifier.init(jax.random.key(0))
    assert cp["blocks"][0]["mlp"]["w1"].shape == (32, 7)
    assert classifier.apply(cp, jnp.array([1, 2, 3])).shape == (3, 3)


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_padding_does_not_affect_real_positions(causal):
    model, params = _transformer(causal)
    tokens = jnp.array([3, 4, 5, 6, 0, 0, 0])
    padded = model.apply(params, tokens)
    # Same as the unpadded sequence at the real positions.
    np.testing.assert_allclose(padded[:4], model.apply(params, tokens[:4]), atol=1e-12)
    # Changing what a padding token looks like (its embedding) changes nothing real, even
    # with padding in the middle of the sequence.
    tokens = jnp.array([3, 0, 5, 6, 0, 2, 0])
    real = np.asarray(tokens) != 0
    # (A random change: a constant shift would be removed by the layer norms anyway.)
    shift = jax.random.normal(jax.random.key(9), (8,), F64)
    moved = dict(params, embed=params["embed"].at[0].add(shift))
    a, b = model.apply(params, tokens), model.apply(moved, tokens)
    np.testing.assert_allclose(a[real], b[real], atol=1e-12)
    assert np.abs(np.asarray(a[~real] - b[~real])).max() > 1e-3  # the pads themselves do move
    # ... whereas changing a real token does change the other real positions.
    other = model.apply(params, tokens.at[5].set(9))
    changed = np.abs(np.asarray(other - a)).max(-1)
    if causal:
        np.testing.assert_allclose(changed[:5], 0, atol=1e-12)  # the past does not see it
    else:
        assert changed[0] > 1e-6 and changed[3] > 1e-6


def test_transformer_all_padding_is_finite():
    model, params = _transformer(True)
    assert np.isfinite(model.apply(params, jnp.zeros(5, jnp.int32))).all()


def test_transformer_gradients_ignore_padding_positions():
    model, params = _transformer(False)
    tokens = jnp.array([3, 4, 0, 0])

    def real_sum(p):
        return jnp.sum(model.apply(p, tokens)[:2])

    g = jax.grad(real_sum)(params)
    np.testing.assert_array_equal(g["embed"][0], 0)  # the pad embedding is never read
    np.testing.assert_array_equal(g["pos"][2:], 0)


def test_model_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`activation` must be one of .*'relu'.*got 'swish'"):
        models.mlp([2, 3], activation="swish")
    with pytest.raises(ValueError, match=r"`sizes` must be at least 2"):
        models.mlp([2])
    with pytest.raises(ValueError, match=r"`sizes`"):
        models.mlp([2, 0, 1])
    with pytest.raises(ValueError, match=r"`in_features`"):
        models.linear_regression(0)
    with pytest.raises(ValueError, match=r"num_classes"):
        models.logistic_regression(3, num_classes=1)
    with pytest.raises(ValueError, match=r"`image_shape`.*too small"):
        models.cnn(image_shape=(3, 3), channels=(2, 2))
    with pytest.raises(ValueError, match=r"`channels`"):
        models.cnn(channels=())
    with pytest.raises(
        ValueError, match=r"`d_model` \(10\) must be divisible by `num_heads` \(3\)"
    ):
        models.transformer(vocab_size=5, max_len=4, d_model=10, num_heads=3)
    model = models.transformer(vocab_size=5, max_len=4, d_model=8)
    with pytest.raises(ValueError, match=r"`tokens` has length 5; the model's `max_len` is 4"):
        model.apply(model.init(jax.random.key(0)), jnp.ones(5, jnp.int32))


def test_transformer_out_of_vocabulary_token_gives_nan_not_a_clamped_lookup():
    # One compiled apply for both sequences (same shape).
    model = _jit_apply(models.transformer(vocab_size=8, max_len=4, dtype=jnp.float64))
    params = model.init(jax.random.key(0))
    assert np.isfinite(model.apply(params, jnp.array([1, 2, 7, 0]))).all()
    assert np.isnan(model.apply(params, jnp.array([1, 2, 99, 0]))).any()


def test_feature_size_mismatch_names_the_model_and_shapes():
    for model, x in (
        (jaxgrad.models.mlp([4, 8, 3]), jnp.ones((5, 6))),
        (jaxgrad.models.linear_regression(4), jnp.ones((5, 3))),
        (jaxgrad.models.logistic_regression(4, num_classes=3), jnp.ones((5, 2))),
    ):
        params = model.init(jax.random.key(0))
        loss = lambda p, ex, model=model: jnp.sum(model.apply(p, ex))
        with pytest.raises(
            ValueError, match=r"must have 4 input features.*got an example of shape"
        ):
            jaxgrad.batch_grad(loss)(params, x)
    # A batch passed as one example: the message shows the shape received, not the flattening.
    mlp = jaxgrad.models.mlp([4, 8, 3])
    with pytest.raises(ValueError, match=r"shape \(2, 4\) \(8 features flattened\)"):
        mlp.apply(mlp.init(jax.random.key(0)), jnp.ones((2, 4)))


def test_ws_groupnorm_cnn_matches_numpy():
    # De et al. (2022): weight-standardised convolutions, then GroupNorm per example.
    model = models.cnn(image_shape=(4, 4), channels=(4,), num_classes=2, groups=2, dtype=F64)
    params = model.init(jax.random.key(2))
    params["conv"][0]["scale"] = params["conv"][0]["scale"] * 1.5  # not the identity
    params["conv"][0]["bias"] = params["conv"][0]["bias"] + 0.25
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 4), F64))
    layer = jax.tree_util.tree_map(np.asarray, params["conv"][0])
    w = layer["w"][:, :, 0, :]  # (3, 3, 4)
    w = (w - w.mean(axis=(0, 1))) / np.sqrt(w.var(axis=(0, 1)) + 1e-5)
    padded = np.pad(x, 1)
    conv = (
        np.stack(
            [[padded[i : i + 3, j : j + 3, None] * w for j in range(4)] for i in range(4)]
        ).sum(axis=(2, 3))
        + layer["b"]
    )  # (4, 4, 4)
    g = conv.reshape(4, 4, 2, 2)
    g = (g - g.mean(axis=(0, 1, 3), keepdims=True)) / np.sqrt(
        g.var(axis=(0, 1, 3), keepdims=True) + 1e-5
    )
    normed = g.reshape(4, 4, 4) * layer["scale"] + layer["bias"]
    pooled = np.maximum(normed, 0).reshape(2, 2, 2, 2, 4).mean(axis=(1, 3))
    dense = jax.tree_util.tree_map(np.asarray, params["dense"])
    expected = pooled.reshape(-1) @ dense["w"] + dense["b"]
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-10)
    with pytest.raises(ValueError, match=r"`groups` \(3\) must divide every channel count"):
        models.cnn(channels=(4,), groups=3)
    with pytest.raises(ValueError, match="`groups` must be a positive integer or None; got 0"):
        models.cnn(channels=(4,), groups=0)


def test_weight_normalised_cnn_is_the_plain_cnn_with_rescaled_kernels():
    # Salimans & Kingma (2016): W_o = g_o V_o / ‖V_o‖ per output channel; W = V at init.
    kw = dict(image_shape=(4, 4), channels=(2, 3), num_classes=2, dtype=F64)
    wn, plain = models.cnn(weight_norm=True, **kw), models.cnn(**kw)
    params = wn.init(jax.random.key(4))
    x = jax.random.normal(jax.random.key(5), (4, 4), F64)
    same = {**params, "conv": [{"w": c["w"], "b": c["b"]} for c in params["conv"]]}
    np.testing.assert_allclose(wn.apply(params, x), plain.apply(same, x), rtol=1e-12)
    for i, c in enumerate(params["conv"]):
        c["g"] = c["g"] * jnp.arange(2.0, 2.0 + c["g"].shape[0]) + i
    v = [np.asarray(c["w"]) for c in params["conv"]]
    scaled = [
        vi * np.asarray(c["g"]) / np.sqrt((vi**2).sum(axis=(0, 1, 2)))
        for vi, c in zip(v, params["conv"], strict=True)
    ]
    rescaled = {
        **params,
        "conv": [{"w": w, "b": c["b"]} for w, c in zip(scaled, params["conv"], strict=True)],
    }
    np.testing.assert_allclose(wn.apply(params, x), plain.apply(rescaled, x), rtol=1e-12)
    assert not np.allclose(wn.apply(params, x), plain.apply(same, x))
    with pytest.raises(ValueError, match="`weight_norm` must be True or False; got 'yes'"):
        models.cnn(weight_norm="yes")


@pytest.mark.parametrize("key", [0, "seed", jax.random.split(jax.random.key(0), 2)])
def test_init_checks_its_key(key):
    with pytest.raises((TypeError, ValueError), match="`key` must be one PRNG key"):
        models.mlp([4, 3]).init(key)
    # a batch of keys is vmapped over, as the error says
    stacked = jax.vmap(models.mlp([4, 3]).init)(jax.random.split(jax.random.key(0), 2))
    assert stacked[0]["w"].shape == (2, 4, 3)
