"""Per-example gradient inner products, the gradient Gram matrix and unit norms, on every fast
route (dense, sequence Gram form, conv, lookup, scan bodies, branches, tied weights, the exact
fallback), exact against ``jax.vmap(jax.grad(...))`` and numpy in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import F64, assert_rel_close, case
from test_fast_scan import _nested_rnn_loss, _rnn_setup, rnn_loss

import jaxgrad
from jaxgrad import reduce
from jaxgrad.fast import linear, norms


def _vmap_grads(loss, params, batch, args=()):
    """``(B, P)`` per-example gradients of the loss sums by ``jax.vmap(jax.grad(...))``."""
    summed = lambda p, ex: reduce.as_sum_count(loss(p, ex, *args))[0]
    # jitted: one XLA program, where eager vmap(grad) compiles every primitive on its own
    # (a transformer's reference took 12 s of compilation eagerly, 4 s as one program)
    g = jax.jit(jax.vmap(jax.grad(summed), in_axes=(None, 0)))(params, batch)
    leaves = jax.tree_util.tree_leaves(g)
    return np.concatenate([np.reshape(x, (x.shape[0], -1)) for x in leaves], axis=1)


def _reference_tree(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=np.shape(x)), F64), params)


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _unit_sums(j, units, mask):
    """``(B, P)``: row i holds its unit's summed gradient ``Σ_{k∈u(i)} J_k`` (0 where padded)."""
    same = (units[:, None] == units[None, :]) & mask[:, None] & mask[None, :]
    return same.astype(float) @ j


def check(loss, params, batch, *, mask=None, args=(), units=None, chunk_size=None, rows=False):
    """dots, Gram, unit norms and the unit-clipped sum against vmap(grad) and numpy; with
    ``rows`` also the clipped sum of every row on its own (no units), at the rows' median."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    m = np.ones(size, bool) if mask is None else np.asarray(mask)
    j = _vmap_grads(loss, params, batch, args) * m[:, None]
    assert np.sum(np.linalg.norm(j, axis=1) > 0) >= 2  # a test that can only pass is a defect
    units = np.arange(size)[::-1] // 2 if units is None else np.asarray(units)
    ref = _reference_tree(params)
    kw = {"chunk_size": chunk_size}
    unit_grads = _unit_sums(j, units, m)
    unit_norms = np.linalg.norm(unit_grads, axis=1)
    real = unit_norms[m]
    clip = float(np.median(real[real > 0]))
    row_norms = np.linalg.norm(j, axis=1)
    row_clip = float(np.median(row_norms[m]))

    # The five results of one jitted function: XLA compiles one program, not five (the
    # strategies' own jits are inlined; the passes they share are traced once per use but
    # compiled together: 20 s of compilation became 8 s for the transformer). Their eager
    # input checks have tests of their own (test_bad_units_and_references_are_named, ...).
    def results(params, batch, mask, args, units):
        clipped = jaxgrad.clipped_grad(loss, l2_clip=clip, reduction="sum", return_norms=True, **kw)
        by_row = jaxgrad.clipped_grad(
            loss, l2_clip=row_clip, reduction="sum", return_norms=True, **kw
        )
        extra = {"rows": by_row(params, batch, mask, *args)} if rows else {}
        return {
            **extra,
            # factored: this file checks the fast routes' dots (rules' ⟨G_i, op(A_i, V)⟩);
            # "auto"'s forward mode has its own tests (test_dots_forward.py)
            "dots": jaxgrad.per_example_dots(loss, method="factored", **kw)(
                params, batch, mask, *args, reference=ref
            ),
            "gram": jaxgrad.gradient_gram(loss, **kw)(params, batch, mask, *args),
            "norms": jaxgrad.per_example_norms(loss, **kw)(params, batch, mask, *args),
            "unit_norms": jaxgrad.per_example_norms(loss, **kw)(
                params, batch, mask, *args, units=units
            ),
            "clipped": clipped(params, batch, mask, *args, units=units),
        }

    got = jax.jit(results)(params, batch, mask, args, jnp.asarray(units))
    assert_rel_close(got["dots"], j @ _flat(ref))
    assert_rel_close(got["gram"], j @ j.T)
    assert_rel_close(np.diag(got["gram"]), np.asarray(got["norms"]) ** 2)
    assert_rel_close(got["unit_norms"], unit_norms)

    # Each unit's sum clipped once: Σ_u min(1, C/‖U_u‖) U_u, a unit of k rows counted k times
    # in unit_grads (once per member row), hence the division by its size.
    sizes = np.maximum(np.sum((units[:, None] == units[None, :]) & m[None, :], axis=1), 1)
    factors = np.where(unit_norms > clip, clip / np.maximum(unit_norms, 1e-300), 1.0) * m
    expected = (factors / sizes) @ unit_grads
    total, clipped_norms = got["clipped"]
    assert_rel_close(_flat(total), expected)
    assert_rel_close(clipped_norms, unit_norms)
    if rows:  # every row clipped on its own: Σ_i min(1, C/‖J_i‖) J_i
        total, got_norms = got["rows"]
        assert_rel_close(got_norms, row_norms)
        factors = np.minimum(1.0, row_clip / np.maximum(row_norms, 1e-300))
        assert_rel_close(_flat(total), factors @ j)


MODELS = ["mlp", "cnn", "transformer", "tied", "plain"]  # dense, conv, Gram/lookup, tied, einsum


@pytest.mark.parametrize("name", MODELS)
def test_zoo_models_with_a_mask(name):
    loss, params, batch = case(name)
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    mask = jnp.arange(size) != 1
    check(loss, params, batch, mask=mask)


def test_rnn_in_a_scan_with_extra_argument_and_chunks():
    params, batch = _rnn_setup()
    loss = lambda p, x, scale: rnn_loss(p, x * scale)
    mask = jnp.array([1, 1, 0, 1, 1], bool)
    check(loss, params, batch, mask=mask, args=(jnp.asarray(0.7, F64),), chunk_size=2)


def test_sequence_gram_form_pairwise_a_batch_of_rows_at_a_time(monkeypatch):
    # hidden 96 over 6 steps: wh's Gram takes the pairwise form ⟨A_i A_jᵀ, G_i G_jᵀ⟩
    # (T²(K + N) ≤ K N), computed a few rows at a time (a small entry budget forces lax.map
    # batches); wx (3 × 96) takes the formed per-example gradients
    params, batch = _rnn_setup(hidden=96)
    assert norms.dense_pair_gram(6, 96, 96) and not norms.dense_pair_gram(6, 3, 96)
    plan = jaxgrad.fast.plan(rnn_loss, params, batch[0])
    assert "Gram" in {lp.path: lp.route for lp in plan.leaves}["['wh']"]
    monkeypatch.setattr(norms, "PAIR_ENTRIES", 100)
    check(rnn_loss, params, batch, units=np.array([0, 3, 3, 3, 1]))


def test_nested_scans_tied_use_and_fallback_leaf():
    params, batch = _rnn_setup()
    routes = {
        lp.path: lp.route for lp in jaxgrad.fast.plan(_nested_rnn_loss, params, batch[0]).leaves
    }
    assert routes["['wo']"].startswith("tied") and routes["['b']"] == "exact fallback"
    check(_nested_rnn_loss, params, batch)


def test_branches_sum_count_loss_and_chunks():
    rng = np.random.default_rng(50)
    params = {"w": jnp.asarray(rng.normal(size=(4, 4)), F64), "s": jnp.asarray(rng.normal(size=4))}
    batch = jnp.asarray(rng.normal(size=(7, 4)), F64)

    def loss(p, x):  # a switch on the example, W on either side; a (sum, count) pair
        branches = [lambda x: jnp.tanh(x @ p["w"]), lambda x: jnp.sin(p["w"] @ x) * p["s"]]
        h = jax.lax.switch(jnp.argmax(x) % 2, branches, x)
        return jnp.sum(h**2) + jnp.sum(jnp.tanh(x @ p["w"])), 1.0 + (x[0] > 0)

    mask = jnp.array([1, 1, 1, 0, 1, 1, 1], bool)
    check(loss, params, batch, mask=mask, units=np.array([0, 0, 6, 6, 2, 2, 2]), chunk_size=3)


def test_every_row_its_own_unit_is_the_per_example_result():
    loss, params, batch = case("cnn")
    size = batch[0].shape[0]
    mask = jnp.arange(size) != 2
    own = jnp.arange(size)
    norms = jaxgrad.per_example_norms(loss)(params, batch, mask)
    f = jaxgrad.clipped_grad(loss, l2_clip=float(np.median(norms)), return_norms=True)

    # the three by-unit and plain results as one program: one compilation, not three
    def results(params, batch, mask, own):
        by_units = jaxgrad.per_example_norms(loss)(params, batch, mask, units=own)
        return by_units, f(params, batch, mask, units=own), f(params, batch, mask)

    by_units, (by_unit, unit_norms), (plain, _) = jax.jit(results)(params, batch, mask, own)
    assert_rel_close(by_units, norms)
    assert_rel_close(_flat(by_unit), _flat(plain))
    assert_rel_close(unit_norms, norms)


def test_unit_with_a_nonfinite_row_is_dropped_whole():
    loss, params, batch = case("mlp")
    x = batch[0].at[3, 0].set(jnp.nan)
    units = jnp.array([0, 0, 1, 1, 2, 2, 2])
    f = jaxgrad.clipped_grad(loss, l2_clip=0.3, reduction="sum", nonfinite="drop")
    keep = jnp.array([1, 1, 0, 0, 1, 1, 1], bool)  # rows 2 and 3 share row 3's unit
    # both in one program: one compilation, not two
    both = jax.jit(lambda x, keep: (f(params, (x, batch[1]), None, units=units),
                                    f(params, batch, keep, units=units)))  # fmt: skip
    got, expected = both(x, keep)
    assert_rel_close(_flat(got), _flat(expected))
    with pytest.raises(FloatingPointError, match="rows \\[2, 3\\]"):
        jaxgrad.clipped_grad(loss, l2_clip=0.3)(params, (x, batch[1]), None, units=units)


def test_bad_units_and_references_are_named():
    loss, params, batch = case("mlp")
    size = batch[0].shape[0]
    norms = jaxgrad.per_example_norms(loss)
    with pytest.raises(TypeError, match="`units` must be an integer array"):
        norms(params, batch, units=jnp.zeros(size))
    with pytest.raises(ValueError, match=r"`units` must have shape \(B,\) = \(7,\)"):
        norms(params, batch, units=jnp.zeros((size, 1), int))
    with pytest.raises(ValueError, match=r"in \[0, B\) = \[0, 7\); got 1 outside it \(1 bel"):
        norms(params, batch, units=jnp.arange(size) - 1)
    # Counts, never the ids themselves (a user's id is the user's own data).
    with pytest.raises(ValueError, match=r"got 2 outside it \(0 below 0, 2 at or above 7\)") as e:
        units = jnp.arange(size).at[3].set(90210).at[5].set(7)
        jaxgrad.clipped_grad(loss, l2_clip=1.0)(params, batch, units=units)
    assert "90210" not in str(e.value)
    dots = jaxgrad.per_example_dots(loss)
    with pytest.raises(TypeError, match="`reference` is required"):
        dots(params, batch)
    with pytest.raises(ValueError, match="`reference` must have the structure of `params`"):
        dots(params, batch, reference=jax.tree_util.tree_leaves(params))
    bad = jax.tree_util.tree_map(lambda x: jnp.zeros((*np.shape(x), 1)), params)
    with pytest.raises(
        ValueError, match=r"`reference` leaf reference\[.+\] must have the shape of params\["
    ):
        dots(params, batch, reference=bad)
    ints = jax.tree_util.tree_map(lambda x: jnp.zeros(np.shape(x), jnp.int32), params)
    with pytest.raises(
        TypeError, match=r"leaf reference\[.+\] must be real floating point, like params\["
    ):
        dots(params, batch, reference=ints)
    with pytest.raises(TypeError, match="unexpected keyword"):
        jaxgrad.gradient_gram(loss)(params, batch, units=jnp.arange(size))


def test_complex_operands_cast_and_a_layer_stack_scanned_over_its_weights():
    # real weights read in real form (a complex operand, a cast to complex; W also tied to a
    # real use) and a stack of layers scanned over its stacked weights (one slice per step)
    rng = np.random.default_rng(11)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / 2, F64)
    params = {"W": normal(5, 8), "C": normal(8, 8), "ws": normal(3, 5, 5)}
    batch = jnp.asarray(rng.normal(size=(6, 8)), F64)

    def loss(p, x):
        y = jnp.abs(p["W"] @ jnp.fft.fft(x)) ** 2 + jnp.tanh(p["W"] @ x)
        z = p["C"].T.astype(jnp.complex128) @ jnp.fft.ifft(x)
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(w @ h), None), jnp.sin(y), p["ws"])
        return jnp.sum(h**2) + jnp.sum(jnp.real(z * jnp.conj(z[::-1])))

    routes = {lp.path: lp.route for lp in jaxgrad.fast.plan(loss, params, batch[0]).leaves}
    assert "complex" in routes["['W']"] and "2 real positions" in routes["['C']"]
    assert routes["['ws']"].startswith("scan, 3 steps, one slice per step")
    check(loss, params, batch, mask=jnp.arange(6) != 4)


@pytest.mark.parametrize("channels", [0, 100])  # every conv dotted by op(A, V) / by offsets
def test_conv_dots_both_routes_strides_dilation_padding_layouts(monkeypatch, channels):
    # linear.dot takes a convolution with few input channels one kernel offset at a time and
    # the others by the forward convolution op(A, V): both exact, on strided, dilated,
    # asymmetrically padded convolutions in NHWC and NCHW layouts; and their Gram matrix
    monkeypatch.setattr(linear, "DOT_OFFSET_CHANNELS", channels)
    rng = np.random.default_rng(7)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / 3, F64)
    params = {"a": normal(3, 2, 2, 5), "b": normal(4, 5, 2, 3), "c": normal(2, 2, 4, 3)}
    batch = normal(4, 9, 8, 2)
    conv = jax.lax.conv_general_dilated

    def loss(p, x):
        h = conv(x[None], p["a"], (2, 1), [(1, 0), (2, 1)], rhs_dilation=(1, 2),
                 dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        h = jnp.transpose(jnp.tanh(h), (0, 3, 1, 2))
        h = conv(h, p["b"], (1, 2), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = conv(jnp.transpose(jnp.sin(h), (0, 2, 3, 1)), p["c"], (1, 1), "SAME",
                 dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
        return jnp.sum(h**2)

    mask = jnp.array([1, 0, 1, 1], bool)
    j = _vmap_grads(loss, params, batch) * np.asarray(mask)[:, None]
    ref = _reference_tree(params)
    dots = jaxgrad.per_example_dots(loss)(params, batch, mask, reference=ref)
    assert_rel_close(dots, j @ _flat(ref))
    if channels:  # the Gram matrix, the per-example gradients formed one offset at a time
        assert_rel_close(jaxgrad.gradient_gram(loss)(params, batch, mask), j @ j.T)


def test_convolutions_in_scans_nested_tied_grouped_and_in_a_branch():
    # A convolution inside a scan is one convolution over (steps × images) of the example
    # (the steps folded into its batch axis): the kernel's per-example gradient sums over
    # them. Here: a kernel used in a scan body, in a nested scan and outside the loop (tied:
    # cross terms exact); a grouped, strided, dilated, asymmetrically padded NCHW conv in a
    # `cond` branch taken per example and step (no windows: the VJP route); and a kernel
    # larger than the A_i and G_i held (no gradient kept: the weighted sum contracts A and G
    # over steps and examples). Fast, and exact on every output.
    rng = np.random.default_rng(11)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / 2, F64)
    params = {"k": normal(3, 3, 3, 3), "g": normal(6, 1, 2, 2), "big": normal(3, 3, 6, 6)}
    batch = normal(5, 3, 4, 4, 3)  # (B, steps, H, W, C)
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1))
    nhwc = ("NHWC", "HWIO", "NHWC")

    def loss(p, x):
        def grouped(z):  # OIHW, 3 -> 6 channels in 3 groups
            y = conv(jnp.transpose(z, (0, 3, 1, 2)), p["g"], window_strides=(1, 2),
                     padding=[(1, 0), (0, 1)], rhs_dilation=(1, 2), feature_group_count=3,
                     dimension_numbers=("NCHW", "OIHW", "NCHW"))  # fmt: skip
            return jnp.mean(jnp.sin(y))

        def step(h, xt):
            z = jnp.tanh(conv(xt[None], p["k"], padding="SAME", dimension_numbers=nhwc))
            u = jax.lax.cond(jnp.sum(xt) > 0, grouped, jnp.mean, z)

            def inner(c, row):  # nested: two rows of the step's image
                y = conv(row[None] * c, p["k"], padding="SAME", dimension_numbers=nhwc)
                return c + jnp.mean(jnp.tanh(y)), None

            c, _ = jax.lax.scan(inner, 1.0, z[0, :2, None])
            b = conv(jnp.tile(z[:, :2, :2, :2], (1, 1, 1, 3)), p["big"], padding="SAME",
                     dimension_numbers=nhwc)  # fmt: skip
            return h + c * u + jnp.sum(b**2), None

        h, _ = jax.lax.scan(step, 0.0, x)
        out = conv(x[:1], p["k"], window_strides=(2, 2), padding="VALID", dimension_numbers=nhwc)
        return h**2 + jnp.sum(jnp.sin(out))

    plan = jaxgrad.fast.plan(loss, params, batch[0])
    assert not plan.fallbacks, plan
    routes = {lp.path: lp.route for lp in plan.leaves}
    assert routes["['g']"] == (
        "scan, 3 steps, shared; cond branch 1: conv: per-example gradient"
    ), routes
    assert routes["['k']"].startswith("tied, 3 uses")
    assert routes["['big']"] == "scan, 3 steps, shared: conv: one kernel offset at a time"
    mask = jnp.array([1, 1, 0, 1, 1], bool)
    # the clipped sum of every row on its own too, in the same program (one compilation)
    check(loss, params, batch, mask=mask, units=np.array([0, 0, 1, 2, 2]), rows=True)


def test_convolution_kernels_a_scan_is_scanned_over():
    # Stacks of kernels a scan is scanned over (one kernel per step, as `nn.scan` over conv
    # blocks writes it): the slices are disjoint, so each step's kernel gradient is taken on
    # the top-level conv route, one step at a time (norms added over the steps, the clipped
    # sum's leaf the stack of the steps' weighted sums). In one body (one program to
    # compile): 3x3 kernels in a residual tanh block on NHWC images (ks), beside a kernel
    # shared by every step; a strided, asymmetrically padded, dilated conv whose kernel is
    # larger than its A_i and G_i (kd: no gradient kept, the weighted sum contracts A and G
    # step by step); a feature-grouped one read twice at a step (kf: tied, the per-example
    # gradient). A (sum, count) loss, a mask, units.
    rng = np.random.default_rng(13)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / 2, F64)
    params = {
        "ks": normal(3, 3, 3, 2, 2),
        "shared": normal(3, 3, 2, 2),
        "kd": normal(3, 3, 3, 2, 8),
        "kf": normal(3, 3, 3, 1, 4),  # 2 -> 4 channels in 2 groups
    }
    batch = normal(5, 4, 4, 2)
    conv = functools.partial(
        jax.lax.conv_general_dilated, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

    def loss(p, x):
        def block(h, k):
            h = h + jnp.tanh(conv(h, k["ks"], (1, 1), "SAME"))  # residual
            s = jnp.tanh(conv(h, p["shared"], (1, 1), "SAME"))
            d = conv(h, k["kd"], (2, 1), [(1, 0), (2, 1)], rhs_dilation=(1, 2))
            grouped = lambda z: conv(z, k["kf"], (1, 1), "SAME", feature_group_count=2)
            f = grouped(jnp.sin(grouped(h)[..., 1:3]))
            return h + s + jnp.sin(jnp.sum(jnp.tanh(d) ** 2)) + jnp.tanh(f[..., :2]), None

        h, _ = jax.lax.scan(block, x[None], {name: p[name] for name in ("ks", "kd", "kf")})
        return jnp.sum(jnp.sin(h)), 1.0 + (x[0, 0, 0] > 0)

    plan = jaxgrad.fast.plan(loss, params, batch[0])
    assert not plan.fallbacks, plan
    routes = {lp.path: lp.route for lp in plan.leaves}
    stepwise = "scan, 3 steps, one slice per step: each step's conv: one kernel offset at a time"
    assert routes["['ks']"] == stepwise + "; weighted sum: per-example gradient formed and kept"
    assert routes["['kd']"] == stepwise, routes
    assert routes["['kf']"].startswith("tied, 2 uses"), routes
    assert routes["['shared']"].startswith("scan, 3 steps, shared: conv"), routes
    mask = jnp.array([1, 1, 0, 1, 1], bool)
    check(loss, params, batch, mask=mask, units=np.array([0, 0, 1, 2, 2]))


def test_convolutions_in_scans_that_keep_the_fallback_say_why():
    # A batch-grouped convolution shared by the steps has no lift over them, and a kernel
    # scanned over by a loop with another loop inside it is read step by step in no loop:
    # exact fallback, and the plan says so.
    rng = np.random.default_rng(12)
    params = {"ks": jnp.asarray(rng.normal(size=(2, 3, 3, 2, 2))), "kb": jnp.ones((1, 1, 2, 2))}
    nhwc = ("NHWC", "HWIO", "NHWC")

    def loss(p, x):
        def step(h, k):
            conv = functools.partial(jax.lax.conv_general_dilated, dimension_numbers=nhwc)
            z = jax.lax.fori_loop(0, 2, lambda i, z: conv(z, k, (1, 1), "SAME"), x[None])
            y = conv(jnp.concatenate([z, z]), p["kb"], (1, 1), "SAME", batch_group_count=2)
            return h + jnp.sum(jnp.tanh(y)), None

        return jax.lax.scan(step, 0.0, p["ks"])[0]

    plan = jaxgrad.fast.plan(loss, params, jnp.ones((4, 4, 2)))
    reasons = {lp.path: lp.reason for lp in plan.leaves}
    assert "conv use of a leaf scanned over by a loop, with another loop" in reasons["['ks']"]
    assert "conv use, inside a `lax.scan` body" in reasons["['kb']"]
