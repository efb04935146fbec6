"""Parameters used inside ``lax.scan`` (RNNs, GRU cells, scanned layer stacks, fori_loop).

Float64; norms and clipped sums against ``method="vmap"`` and a Python loop over examples,
1e-10 relative; the plan must show the scan route (or the fallback and why).
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_fast_cases import F64, assert_rel_close, check_against_loop

import jaxgrad
from jaxgrad.fast import plan


def _normal(rng, *shape, scale=0.5):
    return jnp.asarray(scale * rng.normal(size=shape), F64)


def _check(loss, params, batch):
    check_against_loop(loss, params, batch)
    return plan(loss, params, jax.tree_util.tree_map(lambda x: x[0], batch))


def _routes(p):
    return {lp.path: lp.route for lp in p.leaves}


def rnn_loss(p, xs, *, reverse=False, unroll=1, remat=False):
    def step(h, x):
        h = jnp.tanh(h @ p["wh"] + x @ p["wx"] + p["b"])
        return h, h @ p["wo"]

    step = jax.checkpoint(step) if remat else step
    h, ys = jax.lax.scan(
        step, jnp.zeros(p["wh"].shape[0], xs.dtype), xs, reverse=reverse, unroll=unroll
    )
    return jnp.sum(jnp.sin(ys)) + jnp.sum(h**2)


def _rnn_setup(hidden=4):
    rng = np.random.default_rng(30)
    params = {
        "wh": _normal(rng, hidden, hidden),
        "wx": _normal(rng, 3, hidden),
        "b": _normal(rng, hidden),
        "wo": _normal(rng, hidden, 2),
    }
    return params, _normal(rng, 5, 6, 3, scale=1.0)


@pytest.mark.parametrize(
    "options", [{}, {"reverse": True, "unroll": 2, "remat": True}], ids=["plain", "rev-remat"]
)
def test_scan_rnn(options):
    params, batch = _rnn_setup()
    routes = _routes(_check(lambda p, x: rnn_loss(p, x, **options), params, batch))
    for name in ("wh", "wx", "wo"):
        assert routes[f"['{name}']"].startswith("scan, 6 steps, shared: dense")


def test_scan_rnn_gram_route_for_wide_weights():
    params, batch = _rnn_setup(hidden=16)  # 6 steps, 16 x 16: the Gram form is cheaper
    routes = _routes(_check(rnn_loss, params, batch))
    assert "Gram" in routes["['wh']"]


def test_fori_loop_with_static_bounds():
    params, batch = _rnn_setup()

    def loss(p, x):
        body = lambda i, h: jnp.tanh(h @ p["wh"] + x[i] @ p["wx"] + p["b"])
        h = jax.lax.fori_loop(0, x.shape[0], body, jnp.zeros(4, x.dtype))
        return jnp.sum(jnp.sin(h @ p["wo"]))

    assert _routes(_check(loss, params, batch))["['wh']"].startswith("scan")


def _nested_rnn_loss(p, x):
    """An outer scan over a sequence (reversed) whose body runs an inner scan with two carries."""

    def outer(h, xs_row):
        def inner(c, _):
            c1, c2 = c
            c1 = jnp.tanh(p["wh"] @ c1 + xs_row @ p["wx"] + p["b"])
            return (c1, c2 + c1 @ p["wo"]), c1

        (h1, h2), hs = jax.lax.scan(inner, (h, jnp.zeros(2, x.dtype)), None, length=3)
        return h1 + jnp.sum(jnp.cos(h2)), jnp.sum(hs**2)

    h, s = jax.lax.scan(outer, jnp.zeros(4, x.dtype), x, reverse=True)
    return jnp.sum(jnp.sin(h @ p["wo"])) + jnp.sum(s)


def test_weight_shared_by_nested_scans():
    params, batch = _rnn_setup()
    p = _check(_nested_rnn_loss, params, batch)
    routes = _routes(p)
    for name in ("wh", "wx"):
        assert routes[f"['{name}']"].startswith(
            "scan, 6 steps, shared; nested scan, 3 steps, shared: dense"
        )
    assert routes["['wo']"].startswith("tied, 2 uses")  # one use nested, one outside
    assert routes["['b']"] == "exact fallback"


def test_stacked_weight_used_in_an_inner_scan():
    """A layer stack scanned over its (stacked) weights; each layer runs a scan over time."""
    rng = np.random.default_rng(31)
    params = {
        "wh": _normal(rng, 3, 4, 4),
        "wx": _normal(rng, 3, 4),
        "wo": _normal(rng, 4, 2),
        "wt": _normal(rng, 6, 4, 4),  # one slice per inner step, shared by the layers
    }
    batch = _normal(rng, 5, 6, 3, scale=1.0)

    def loss(p, x):
        def layer(h0, wh):
            def step(h, inputs):
                xt, wt = inputs
                h = jnp.tanh(h @ wh.T + xt @ p["wx"] + wt @ h)
                return h, h

            return jax.lax.scan(step, h0, (x, p["wt"]), reverse=True)

        h, hs = jax.lax.scan(layer, jnp.zeros(4, x.dtype), p["wh"])
        return jnp.sum(jnp.sin(hs @ p["wo"])) + jnp.sum(h**2)

    routes = _routes(_check(loss, params, batch))
    assert routes["['wh']"].startswith("scan, 3 steps, one slice per step; nested scan, 6 steps")
    assert routes["['wx']"].startswith("scan, 3 steps, shared; nested scan, 6 steps, shared")
    assert routes["['wt']"].startswith(
        "scan, 3 steps, shared; nested scan, 6 steps, one slice per step"
    )


def test_nested_fori_loop_gram_route_and_lookup():
    """fori_loop in a scan body: a wide weight takes the Gram form; an embedding is a gather;
    a use that is the same for every example still gets per-example cotangents."""
    rng = np.random.default_rng(32)
    hidden = 24
    params = {
        "wh": _normal(rng, hidden, hidden, scale=0.2),
        "emb": _normal(rng, 7, hidden),
        "wc": _normal(rng, 2, hidden),  # its use is the same for every example
    }
    const = jnp.linspace(-1.0, 1.0, 2, dtype=F64)
    tokens = jnp.asarray(rng.integers(0, 7, (5, 3, 2)))

    def loss(p, tok):
        def outer(h, row):
            e = jnp.take(p["emb"], row, axis=0)
            body = lambda i, c: jnp.tanh(p["wh"] @ c + e[i % 2] + const @ p["wc"])
            return jax.lax.fori_loop(0, 3, body, h), None

        return jnp.sum(jnp.sin(jax.lax.scan(outer, jnp.zeros(hidden, F64), tok)[0]))

    routes = _routes(_check(loss, params, tokens))
    assert routes["['wh']"].startswith("scan, 3 steps, shared; nested scan, 3 steps, shared")
    assert "Gram" in routes["['wh']"]
    assert routes["['emb']"].startswith("scan, 3 steps, shared: gather")
    assert routes["['wc']"].startswith("scan, 3 steps, shared; nested scan, 3 steps, shared")


def test_nested_scan_that_cannot_be_lifted_falls_back_exactly_and_says_so():
    """An embedding table scanned over by the outer loop (no stacked lift of a gather)."""
    rng = np.random.default_rng(33)
    params = {"emb": _normal(rng, 2, 7, 4), "w": _normal(rng, 4, 4)}
    tokens = jnp.asarray(rng.integers(0, 7, (5, 3)))

    def loss(p, tok):
        def layer(h, emb):
            step = lambda c, t: (jnp.tanh(c @ p["w"] + emb[t]), None)
            return jax.lax.scan(step, h, tok)[0], None

        return jnp.sum(jnp.sin(jax.lax.scan(layer, jnp.zeros(4, F64), p["emb"])[0]))

    p = _check(loss, params, tokens)
    (emb,) = [lp for lp in p.leaves if lp.path == "['emb']"]
    assert emb.fallback and "nested inside a `lax.scan` body" in emb.reason
    assert _routes(p)["['w']"].startswith("scan, 2 steps, shared; nested scan, 3 steps")


def test_equinox_gru_cell_stepped_by_scan():
    cell = eqx.nn.GRUCell(3, 5, key=jax.random.key(1), dtype=F64)
    params, static = eqx.partition(cell, eqx.is_array)
    rng = np.random.default_rng(31)
    params = jax.tree_util.tree_map(lambda w: _normal(rng, *w.shape), params)
    batch = (_normal(rng, 4, 6, 3, scale=1.0), _normal(rng, 4, 5))

    def loss(p, ex):
        xs, target = ex
        gru = eqx.combine(p, static)
        h = jax.lax.scan(lambda h, x: (gru(x, h), None), jnp.zeros(5, F64), xs)[0]
        return jnp.sum((h - target) ** 2)

    routes = _routes(_check(loss, params, batch))
    assert routes[".weight_hh"].startswith("scan") and routes[".weight_ih"].startswith("scan")


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        y = nn.Dense(h.shape[-1], dtype=F64, param_dtype=F64)(nn.LayerNorm(dtype=F64)(h))
        return h + jnp.tanh(y), None


class _Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, dtype=F64, param_dtype=F64)(x)
        scanned = nn.scan(
            _Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        h, _ = scanned(name="blocks")(h, None)
        return nn.Dense(2, dtype=F64, param_dtype=F64)(h)


def test_flax_nn_scan_layer_stack():
    model = _Stack()
    rng = np.random.default_rng(32)
    xs = _normal(rng, 5, 4, 3, scale=1.0)  # 4 positions per example: a sequence axis too
    params = model.init(jax.random.key(0), xs[0])
    params = jax.tree_util.tree_map(lambda w: _normal(rng, *w.shape), params)

    def loss(p, x):
        return jnp.sum(jnp.sin(model.apply(p, x)))

    routes = _routes(_check(loss, params, xs))
    kernel = [r for path, r in routes.items() if "blocks" in path and "kernel" in path]
    assert kernel and kernel[0].startswith("scan, 3 steps, one slice per step: dense")


def test_scanned_transformer_equals_unrolled_and_is_lifted():
    kwargs = dict(vocab_size=11, max_len=6, d_model=8, num_heads=2, num_layers=2, dtype=F64)
    unrolled = jaxgrad.models.transformer(**kwargs)
    scanned = jaxgrad.models.transformer(**kwargs, scan_layers=True)
    params = unrolled.init(jax.random.key(0))
    stacked = {
        **params,
        "blocks": jax.tree_util.tree_map(lambda *ls: jnp.stack(ls), *params["blocks"]),
    }
    tokens = jnp.asarray(np.random.default_rng(33).integers(1, 11, (3, 6)))
    batch = (tokens, jnp.roll(tokens, -1, axis=1))
    loss_s = jaxgrad.losses.supervised(scanned.apply, jaxgrad.losses.token_cross_entropy)
    # jitted: eagerly each primitive of both models compiles on its own
    both = jax.jit(
        lambda stacked, params, x: (scanned.apply(stacked, x), unrolled.apply(params, x))
    )
    assert_rel_close(*both(stacked, params, tokens[0]))
    routes = _routes(plan(loss_s, stacked, jax.tree_util.tree_map(lambda x: x[0], batch)))
    assert routes["['blocks']['attn']['wq']"].startswith("scan, 2 steps, one slice per step")


def test_rnn_model_matches_reference():
    model = jaxgrad.models.rnn(3, 5, num_classes=2, dtype=F64)
    params = model.init(jax.random.key(1))
    xs = jnp.asarray(np.random.default_rng(34).normal(size=(4, 3)))
    h = np.zeros(5)
    for x in np.asarray(xs):  # h_t = tanh(x_t Wx + h_{t-1} Wh + b), numpy
        h = np.tanh(x @ params["wx"] + h @ params["wh"] + params["b"])
    assert_rel_close(model.apply(params, xs), h @ params["out"]["w"] + params["out"]["b"])


def test_leaves_transposed_before_the_scan():
    rng = np.random.default_rng(35)
    params = {"w": _normal(rng, 4, 4), "layers": _normal(rng, 3, 4, 4)}
    batch = _normal(rng, 5, 4, scale=1.0)

    def loss(p, x):
        wt = p["w"].T  # shared by every step, transposed outside the loop
        stack = jnp.swapaxes(p["layers"], 1, 2)  # scanned over, each slice transposed
        h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w + h @ wt), None), x, stack)[0]
        return jnp.sum(h**2)

    routes = _routes(_check(loss, params, batch))
    assert routes["['w']"].startswith("scan") and routes["['layers']"].startswith("scan")


class _NnxBlock(nnx.Module):
    def __init__(self, d, rngs):
        self.lin = nnx.Linear(d, d, rngs=rngs, dtype=F64, param_dtype=F64)
        self.ln = nnx.LayerNorm(d, rngs=rngs, dtype=F64, param_dtype=F64)

    def __call__(self, x):
        return x + jnp.tanh(self.lin(self.ln(x)))


class _NnxStack(nnx.Module):
    """The Flax NNX "scan over layers" pattern: nnx.vmap-created blocks, nnx.scan over them."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(3, 6, rngs=rngs, dtype=F64, param_dtype=F64)
        make = nnx.vmap(lambda key: _NnxBlock(6, nnx.Rngs(key)), in_axes=0, out_axes=0)
        self.blocks = make(jax.random.split(jax.random.key(0), 3))
        self.out = nnx.Linear(6, 2, rngs=rngs, dtype=F64, param_dtype=F64)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(h, block):
            return block(h)

        return self.out(forward(self.inp(x), self.blocks))


def test_nnx_scan_layer_stack():
    graphdef, params = nnx.split(_NnxStack(nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(36)
    params = jax.tree_util.tree_map(lambda w: _normal(rng, *w.shape), params)
    xs = _normal(rng, 5, 4, 3, scale=1.0)  # 4 positions per example

    def loss(p, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))

    routes = _routes(_check(loss, params, xs))
    kernel = [r for path, r in routes.items() if "blocks" in path and "kernel" in path]
    assert kernel and kernel[0].startswith("scan, 3 steps, one slice per step: dense")


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.OptimizedLSTMCell])
def test_flax_lstm_cell_stepped_by_nn_scan(cell):
    class Model(nn.Module):
        @nn.compact
        def __call__(self, xs):
            lstm = nn.scan(
                cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=0
            )(5, dtype=F64, param_dtype=F64)
            carry = lstm.initialize_carry(jax.random.key(0), xs[0].shape)
            _, ys = lstm(carry, xs)
            return nn.Dense(2, dtype=F64, param_dtype=F64)(ys[-1])

    model = Model()
    rng = np.random.default_rng(37)
    xs = _normal(rng, 4, 6, 3, scale=1.0)
    params = model.init(jax.random.key(0), xs[0])
    params = jax.tree_util.tree_map(lambda w: _normal(rng, *w.shape), params)

    def loss(p, x):
        return jnp.sum(jnp.sin(model.apply(p, x)))

    p = _check(loss, params, xs)
    kernels = [lp for lp in p.leaves if "Cell" in lp.path and "kernel" in lp.path]
    assert len(kernels) == 8
    for lp in kernels:  # the optimized cell concatenates its kernels at every step: hoisted
        if cell is nn.OptimizedLSTMCell:  # before the loop, each kernel a block of one weight
            assert lp.route.startswith("scan, 6 steps, shared: a block of a concatenate"), lp
        else:
            assert lp.route.startswith("scan, 6 steps, shared: dense")


def test_scan_use_that_is_the_same_for_every_example():
    params, batch = _rnn_setup()
    params = {**params, "wp": _normal(np.random.default_rng(38), 2, 4)}
    positions = jnp.asarray(np.eye(6, 2), F64)  # scanned over, the same for every example

    def loss(p, x):  # `pos @ wp` does not depend on the example: its perturbation is added
        def step(h, inputs):
            x_t, pos = inputs
            return jnp.tanh(h @ p["wh"] + x_t @ p["wx"] + pos @ p["wp"]), None

        h = jax.lax.scan(step, jnp.zeros(4, x.dtype), (x, positions))[0]
        return jnp.sum(jnp.sin(h @ p["wo"]))

    routes = _routes(_check(loss, params, batch))
    assert routes["['wp']"].startswith("scan") and routes["['wh']"].startswith("scan")


def test_layer_stack_uses_sharing_an_operand_and_a_weight_on_the_left():
    """Stacked weights reading one operand (kept once), Gram and materialised routes side by
    side, and a shared weight on the left of its product (its steps are not the leading axis
    of the captured cotangent)."""
    rng = np.random.default_rng(41)
    layers, seq, width = 3, 3, 8
    params = {
        "wq": _normal(rng, layers, width, width),
        "wk": _normal(rng, layers, width, width),
        "wv": _normal(rng, layers, width, 2),
        "wu": _normal(rng, layers, 2, width),
        "m": _normal(rng, seq, seq),
    }
    batch = _normal(rng, 4, seq, width, scale=1.0)

    def loss(p, x):
        def layer(h, w):
            wq, wk, wv, wu = w
            q, k, v = h @ wq, h @ wk, h @ wv
            return jnp.tanh(p["m"] @ h + jnp.sin(q) * jnp.cos(k) + v @ wu), None

        h = jax.lax.scan(layer, x, (p["wq"], p["wk"], p["wv"], p["wu"]))[0]
        return jnp.sum(jnp.sin(h))

    routes = _routes(_check(loss, params, batch))
    assert routes["['wq']"].startswith("scan, 3 steps, one slice per step: dense")
    assert "Gram" in routes["['wq']"] and "per-example gradient" in routes["['wv']"]
    assert routes["['m']"].startswith("scan, 3 steps, shared: dense")


def test_uses_whose_outputs_are_summed_share_one_cotangent():
    """``x W_x + h W_h`` (and ``h W_a + h W_b`` at the top level): one perturbation on the sum,
    one cotangent captured for both uses; a subtrahend (negated cotangent) and an output read
    twice keep their own. Norms, clipped sums, dots and the Gram stay exact."""
    from jaxgrad.fast import capture, passes

    def loss(p, xs):
        def step(h, x):
            pre = x @ p["wx"] + h @ p["wh"] - x @ p["wu"]
            y = x @ p["wv"]  # read twice: its own cotangent
            return jnp.tanh(pre) + 0.1 * jnp.sin(y * y + y), None

        h = jax.lax.scan(step, jnp.zeros(4, xs.dtype), xs)[0]
        return jnp.sum(jnp.sin(h @ p["wa"] + h @ p["wb"]))

    rng = np.random.default_rng(31)
    keys = ("wx", "wh", "wu", "wv", "wa", "wb")
    shapes = {"wx": (3, 4), "wh": (4, 4), "wu": (3, 4), "wv": (3, 4), "wa": (4, 2), "wb": (4, 2)}
    params = {k: _normal(rng, *shapes[k]) for k in keys}
    batch = _normal(rng, 5, 6, 3, scale=1.0)
    an = passes.analyse(loss, params, batch)
    tree = {key: u for key, (_, u) in an.captured.items()}
    shared = capture.shared_cotangents(an.program, tree)
    leaf = {key: j for key, (j, _) in an.captured.items()}
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    pairs = {frozenset((names[leaf[k]], names[leaf[q]])) for k, q in shared.items()}
    assert pairs == {frozenset(("['wh']", "['wx']")), frozenset(("['wa']", "['wb']"))}
    check_against_loop(loss, params, batch)
    v = jax.tree_util.tree_map(jnp.cos, params)
    dots = lambda **kw: jaxgrad.per_example_dots(loss, **kw)(params, batch, reference=v)
    gram = lambda **kw: jaxgrad.gradient_gram(loss, **kw)(params, batch)
    for fn in (dots, gram):
        assert_rel_close(fn(), fn(method="vmap"))
