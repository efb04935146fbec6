"""Per-leaf gradient norms of the fast pass, and per-layer (group-wise) clipping: float64, exact.

The references are ``vmap(grad)`` per leaf and a Python loop over single examples that clips
every group of every example separately.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import private_key

from jaxgrad import losses, models
from jaxgrad.fast import clipped_grad, passes
from jaxgrad.fast.api import clip_sensitivity
from jaxgrad.privacy import dp_grad

jax.config.update("jax_enable_x64", True)
F64 = jnp.float64


def _normal(rng, *shape):
    return jnp.asarray(rng.normal(size=shape), F64)


def _mlp():
    model = models.mlp([5, 4, 3], dtype=F64)
    rng = np.random.default_rng(0)
    batch = (_normal(rng, 6, 5), jnp.asarray(rng.integers(0, 3, 6)))
    loss = lambda p, ex: losses.softmax_cross_entropy(model.apply(p, ex[0]), ex[1])
    return loss, model.init(jax.random.key(0)), batch


def _tied():
    rng = np.random.default_rng(1)
    params = {"emb": _normal(rng, 7, 4), "w": _normal(rng, 4, 4) / 2}

    def loss(p, toks):  # the embedding is read by a gather and by the output matmul
        h = jnp.tanh(p["emb"][toks[:-1]] @ p["w"])
        return losses.softmax_cross_entropy(h @ p["emb"].T, toks[1:]).sum()

    return loss, params, jnp.asarray(rng.integers(0, 7, (5, 4)))


def _cnn():
    model = models.cnn(image_shape=(6, 6), channels=(3,), num_classes=3, dtype=F64)
    rng = np.random.default_rng(2)
    batch = (_normal(rng, 4, 6, 6), jnp.asarray(rng.integers(0, 3, 4)))
    loss = lambda p, ex: losses.softmax_cross_entropy(model.apply(p, ex[0]), ex[1])
    return loss, model.init(jax.random.key(2)), batch


def _rnn():
    model = models.rnn(3, 4, num_classes=3, dtype=F64)
    rng = np.random.default_rng(3)
    batch = (_normal(rng, 5, 6, 3), jnp.asarray(rng.integers(0, 3, 5)))
    loss = lambda p, ex: losses.softmax_cross_entropy(model.apply(p, ex[0]), ex[1])
    return loss, model.init(jax.random.key(3)), batch


MODELS = {"mlp": _mlp, "tied": _tied, "cnn": _cnn, "rnn": _rnn}


def _vmap_leaf_sq(loss, params, batch, mask):
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)
    cols = [jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads)]
    return jnp.where(mask[:, None], jnp.stack(cols, axis=1), 0)


@pytest.mark.parametrize(("name", "method"), [(m, "auto") for m in MODELS] + [("tied", "vmap")])
def test_per_leaf_norms_match_vmap_grad(name, method):
    loss, params, batch = MODELS[name]()
    size = jax.tree.leaves(batch)[0].shape[0]
    mask = jnp.arange(size) != 1  # a padded row reads 0
    get = passes.get_pass(method)

    @jax.jit
    def norms(params, batch, mask):
        parts = get(loss, params, batch, mask)
        return parts.leaf_sq, parts.norm_sq

    leaf_sq, norm_sq = norms(params, batch, mask)
    want = jax.jit(_vmap_leaf_sq, static_argnums=0)(loss, params, batch, mask)
    assert leaf_sq.shape == (size, len(jax.tree.leaves(params)))
    np.testing.assert_allclose(leaf_sq, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(leaf_sq.sum(axis=1), norm_sq, rtol=1e-10, atol=1e-12)
    if name == "tied" and method == "auto":  # the tied leaf is on the fast route, two uses
        assert len(passes.analyse(loss, params, batch).fast[0]) == 2


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_weighted_takes_one_weight_per_example_and_leaf(method):
    loss, params, batch = _mlp()
    mask = jnp.ones(6, bool)
    get = passes.get_pass(method)
    c = jnp.asarray(np.random.default_rng(4).uniform(size=(6, 4)), F64)
    got = jax.jit(lambda p, b, m, c: get(loss, p, b, m).weighted(c))(params, batch, mask, c)
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, batch)
    leaves, treedef = jax.tree.flatten(grads)
    want = treedef.unflatten([jnp.tensordot(c[:, j], g, 1) for j, g in enumerate(leaves)])
    _assert_trees_close(got, want)


def _loop_group_clipped_sum(loss, params, batch, mask, clip_of_leaf):
    """Σ_i Σ_g clip_{C_g}(g_{i,g}): one example and one group at a time (the reference)."""
    leaves, treedef = jax.tree.flatten(params)
    total = [np.zeros(np.shape(x)) for x in leaves]
    size = jax.tree.leaves(batch)[0].shape[0]
    grad_one = jax.jit(jax.grad(loss))  # one compile for every example, not op by op
    for i in range(size):
        if not mask[i]:
            continue
        ex = jax.tree.map(lambda a, i=i: a[i], batch)
        g = [np.asarray(x) for x in jax.tree.leaves(grad_one(params, ex))]
        for c in set(clip_of_leaf):
            members = [j for j, cj in enumerate(clip_of_leaf) if cj == c]
            norm = np.sqrt(sum(np.sum(g[j] ** 2) for j in members))
            for j in members:
                total[j] += g[j] * min(1.0, c / norm)
    return treedef.unflatten(total)


def _assert_trees_close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "method"), [("mlp", "auto"), ("tied", "auto"), ("rnn", "auto"), ("mlp", "vmap")]
)
def test_per_layer_clipped_sum_matches_a_loop(name, method):
    loss, params, batch = MODELS[name]()
    size = jax.tree.leaves(batch)[0].shape[0]
    mask = jnp.arange(size) != 2
    leaves = jax.tree.leaves(params)
    # one small clip per leaf (distinct: each leaf its own group), so most groups are clipped
    clips = jax.tree.unflatten(
        jax.tree.structure(params), [0.05 * (j + 1) for j in range(len(leaves))]
    )
    f = jax.jit(clipped_grad(loss, l2_clip=clips, reduction="sum", method=method))
    got = f(params, batch, mask)
    want = _loop_group_clipped_sum(loss, params, batch, mask, jax.tree.leaves(clips))
    _assert_trees_close(got, want)


def test_prefix_groups_clip_each_layer_by_its_own_norm():
    loss, params, batch = _mlp()  # params: [layer0 {"b", "w"}, layer1 {"b", "w"}]
    mask = jnp.ones(6, bool)
    f = clipped_grad(loss, l2_clip=[0.1, 0.3], reduction="mean")
    want = _loop_group_clipped_sum(loss, params, batch, mask, [0.1, 0.1, 0.3, 0.3])
    _assert_trees_close(f(params, batch, mask), jax.tree.map(lambda x: x / 6, want))
    # jit, and the per-group sum is not the flat clip at √(0.1² + 0.3²)
    flat = clipped_grad(loss, l2_clip=float(np.sqrt(0.1)), reduction="mean")(params, batch, mask)
    assert not np.allclose(flat[0]["w"], f(params, batch, mask)[0]["w"])
    _assert_trees_close(jax.jit(f)(params, batch, mask), f(params, batch, mask))


def test_scalar_l2_clip_unchanged_and_one_leaf_tree_is_a_group():
    loss, params, batch = _mlp()
    mask = jnp.ones(6, bool)
    flat = clipped_grad(loss, l2_clip=0.2, reduction="sum")(params, batch, mask)
    want = _loop_group_clipped_sum(loss, params, batch, mask, [0.2] * 4)
    _assert_trees_close(flat, want)
    # a one-group tree over the whole params is flat clipping
    tree = {"all": 0.2}
    one = clipped_grad(lambda p, ex: loss(p["all"], ex), l2_clip=tree, reduction="sum")
    _assert_trees_close(one({"all": params}, batch, mask), {"all": want})


def test_sensitivity_is_root_sum_of_squares():
    assert clip_sensitivity(2.0) == 2.0
    assert clip_sensitivity({"a": 3.0, "b": [4.0, 12.0]}) == pytest.approx(13.0, rel=1e-15)


@pytest.mark.parametrize(
    ("clip", "match"),
    [
        ({"a": 1.0, "c": 1.0}, "prefix of the params"),
        ({"a": -1.0, "b": 1.0}, "l2_clip leaf 0"),
        ({}, "empty pytree"),
    ],
)
def test_bad_l2_clip_trees_are_refused(clip, match):
    loss = lambda p, ex: jnp.dot(ex, p["a"]) + jnp.dot(ex, p["b"])
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=match):
        clipped_grad(loss, l2_clip=clip)(params, jnp.ones((3, 2)))


def test_non_finite_policy_covers_per_layer_clipping():
    loss = lambda p, ex: jnp.dot(ex, p["a"]) + jnp.sum(jnp.sqrt(ex) * p["b"])  # sqrt(-1) NaN
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    x = jnp.array([[3.0, 4.0], [-1.0, 1.0], [0.0, 0.5]])
    clips = {"a": 1.0, "b": 10.0}
    with pytest.raises(FloatingPointError, match=r"rows \[1\]"):
        clipped_grad(loss, l2_clip=clips, reduction="sum")(params, x)
    got = clipped_grad(loss, l2_clip=clips, reduction="sum", nonfinite="drop")(params, x)
    keep = jnp.array([True, False, True])
    want = _loop_group_clipped_sum(loss, params, x, keep, [1.0, 10.0])
    _assert_trees_close(got, want)
    nan = clipped_grad(loss, l2_clip=clips, reduction="sum", nonfinite="propagate")(params, x)
    assert np.isnan(nan["a"]).all() and np.isnan(nan["b"]).all()


def _two_layer():
    loss = lambda p, ex: jnp.dot(ex, p["a"]) + 0.5 * jnp.dot(ex, p["b"]) ** 2
    params = {"a": jnp.ones(400, F64), "b": jnp.full(400, 0.01, F64)}
    batch = jnp.asarray(np.random.default_rng(5).normal(size=(3, 400)), F64)
    return loss, params, batch


def test_dp_grad_per_layer_is_exact_and_its_noise_uses_the_root_sum_of_squares():
    loss, params, batch = _two_layer()
    clips = {"a": 3.0, "b": 4.0}
    want = _loop_group_clipped_sum(loss, params, batch, np.ones(3, bool), [3.0, 4.0])
    exact = dp_grad(loss, l2_clip=clips, noise_multiplier=0.0, expected_batch_size=2.0)
    _assert_trees_close(
        exact(params, batch, None, private_key(0)), jax.tree.map(lambda x: x / 2, want)
    )
    noisy = dp_grad(loss, l2_clip=clips, noise_multiplier=0.5, expected_batch_size=2.0)
    g = noisy(params, batch, None, private_key(1))
    z = np.concatenate([(2 * g[k] - want[k]) / (0.5 * 5.0) for k in ("a", "b")])  # Δ₂ = 5
    # 800 standard normals if the std is σ·√(3² + 4²): their variance is within ±25% with
    # probability about 1 − 1e-6 (chi-square, 800 degrees of freedom); σ·max C_g = σ·4 gives
    # variance 25/16, σ·(3 + 4) gives 0.51.
    assert 0.75 < np.mean(z**2) < 1.25


def test_cli_per_layer_clip_splits_c_over_the_layers(capsys):
    from jaxgrad.train import __main__ as cli
    from jaxgrad.train._cli_privacy import privacy_plan
    from jaxgrad.train.private import per_layer_clip

    parser = cli.build_parser()
    args = parser.parse_args(
        ["--dp", "--noise-multiplier", "1", "--l2-clip", "2", "--per-layer-clip"]
    )
    model = models.mlp([4, 5, 6, 3])  # three dense layers: C / √3 each
    plan = privacy_plan(args, parser, 100, 10, 1, model)
    assert plan.config.l2_clip == pytest.approx([2 / np.sqrt(3)] * 3, rel=1e-15)
    record = plan.summary(0)
    assert record["l2_sensitivity"] == pytest.approx(2.0, rel=1e-12)  # the flat clip's noise
    assert record["l2_clip"] == pytest.approx(
        {"[0]": 2 / 3**0.5, "[1]": 2 / 3**0.5, "[2]": 2 / 3**0.5}
    )
    cnn = jax.eval_shape(models.cnn(channels=(2, 3)).init, jax.random.key(0))
    assert per_layer_clip(cnn, l2_clip=3.0) == {"conv": [3 / 3**0.5] * 2, "dense": 3 / 3**0.5}
    with pytest.raises(SystemExit) as e:  # a DP flag without --dp
        cli.main(["--per-layer-clip", "--quiet"])
    assert e.value.code == 2 and "--per-layer-clip needs --dp" in capsys.readouterr().err


# --- the one-run audit (tests/test_privacy_audit.py's problem: m = 1000, r = 200, ε = 2) ------


def test_per_layer_dp_grad_audit_stays_below_claim_and_a_broken_copy_exceeds_it():
    """Per-layer clips {w: C, b: C/10}: Δ₂ = √1.01 C, noise σΔ₂. A correct run stays below its
    claim; noise for one group's clip (σ C_b, 10x too little) is caught. The false-alarm
    analysis is test_privacy_audit's (its canaries have norm C ≤ Δ₂ here: less signal)."""
    from test_privacy_audit import (
        CLIP,
        FULL_STEPS,
        claimed,
        full_batch,
        hand_loop,
        reduce_rows,
        run_audit,
        secret_key,
        sigma_for,
    )

    sigma = sigma_for(1.0, FULL_STEPS)
    claim = claimed(sigma, 1.0, FULL_STEPS)
    clips = {"b": CLIP / 10, "w": CLIP}
    delta2 = clip_sensitivity(clips)

    def dp(noise):
        return full_batch(
            lambda loss_fn, d: dp_grad(
                loss_fn, l2_clip=clips, noise_multiplier=noise, expected_batch_size=reduce_rows(d)
            )
        )

    correct = run_audit(hand_loop(dp(sigma), FULL_STEPS, key_fn=secret_key))
    assert correct.epsilon_lower < claim, correct
    # the noise of the smallest group's clip: std σ C/10 instead of σ Δ₂
    broken = run_audit(hand_loop(dp(sigma * (CLIP / 10) / delta2), FULL_STEPS, key_fn=secret_key))
    assert broken.epsilon_lower > claim, broken
