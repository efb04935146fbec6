"""Constant scatters, scaled lookup tables and full constant masks on the scaled route.

``E.at[rows].set(c)`` is ``E ⊙ M + C`` (a row mask), ``E * s[:, None]`` a row scale, a
lookup ``(E ⊙ F)[r]`` is ``E[r] ⊙ F[r]`` (the factor gathered at the rows read, folded into
``G``), and ``W * M`` with a full mask ``M`` has the per-example gradient ``M ⊙ ∇_{W_eff}``.
Every case in float64 against ``vmap(grad)`` (norms, per-leaf norms, weighted sums, dots,
the Gram matrix, with a padded row), and the plan must name the transformation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import F64, assert_rel_close
from test_fast_reparam import B, _check, _conv, _normal, _shapes_in

import jaxgrad
from jaxgrad.fast import passes, plan

jax.config.update("jax_enable_x64", True)

VOCAB, D, T = 7, 3, 4


def _table_params(rng):
    return {
        "E": _normal(rng, VOCAB, D),
        "W": _normal(rng, D, D),
        "s": 1 + _normal(rng, VOCAB, scale=0.3),
        "c": 1 + _normal(rng, D, scale=0.3),
    }


def _padded_lm(p, toks):
    """A tied language model: the padding row zeroed, rows 1 and 3 set to a constant, row 2
    scaled (constant indices); a (sum, count) loss."""
    table = p["E"].at[0].set(0.0).at[jnp.array([1, 3])].set(0.5).at[2].multiply(3.0)
    h = jnp.tanh(table[toks] @ p["W"])
    logp = jax.nn.log_softmax(h @ table.T)
    return -jnp.sum(logp[jnp.arange(toks.shape[0]), toks]), jnp.asarray(toks.shape[0], F64)


def test_constant_scatters_into_a_tied_table():
    """per_example_norms, clipped_grad, per_example_dots and gradient_gram with a mask and
    a (sum, count) loss, against ``method="vmap"``; the plan names the scatters."""
    rng = np.random.default_rng(21)
    params = _table_params(rng)
    del params["s"], params["c"]
    toks = jnp.asarray(rng.integers(0, VOCAB, size=(B, T)))
    route = {lp.path: lp.route for lp in plan(_padded_lm, params, toks[0]).leaves}["['E']"]
    assert route.startswith("tied, 2 uses: scaled (scatter, scatter-mul): "), route
    assert "a lookup's G (times the factor at the rows it reads)" in route, route
    mask = jnp.array([True, False, True, True])
    v = jax.tree_util.tree_map(lambda x: jnp.sin(1 + x), params)
    got = {}
    for method in ("auto", "vmap"):
        got[method] = (
            jaxgrad.per_example_norms(_padded_lm, method=method)(params, toks, mask),
            jaxgrad.clipped_grad(_padded_lm, l2_clip=0.5, method=method)(params, toks, mask),
            jaxgrad.per_example_dots(_padded_lm, method=method)(params, toks, mask, reference=v),
            jaxgrad.gradient_gram(_padded_lm, method=method)(params, toks, mask),
        )
    want = got["vmap"]
    assert float(jnp.min(want[0][mask])) > 0.5  # (so that the rows are clipped)
    for x, y in zip(*map(jax.tree_util.tree_leaves, (got["auto"], want)), strict=True):
        assert_rel_close(x, y, rtol=1e-9)


def test_scaled_tables_looked_up_and_tied():
    """``W = E.T * s`` read as a lookup table (``W.T[toks]``) and as the output projection,
    and ``(E * c)[toks]`` (a per-column scale): the leaves ``s`` and ``c`` get their
    per-example gradients from the lookups' ``G`` and the rows of ``E`` they read."""
    rng = np.random.default_rng(22)
    params = _table_params(rng)
    toks = jnp.asarray(rng.integers(0, VOCAB, size=(B, T)))

    def loss(p, toks):
        w = p["E"].T * p["s"]  # (D, VOCAB), one scale per row of E
        h = jnp.tanh(w.T[toks]) @ p["W"]
        rows = (p["E"] * p["s"][:, None])[toks] + (p["E"] * p["c"])[toks[::-1]]
        return jnp.sum(jnp.tanh(h @ w) ** 2) + jnp.sum(jnp.tanh(rows) ** 3)

    routes = _check(loss, params, toks, reparam=("['s']", "['c']"), fast=("['E']",))
    assert routes["['E']"].route.startswith("tied, 4 uses: scaled (mul"), routes["['E']"]
    assert "per-example gradient of the scale of a scaled weight" in routes["['s']"].route


def test_full_masks_dense_and_conv():
    """MADE ``W * M`` (M a full mask, not a row and a column factor) with a learned column
    gain, used twice (tied) and once alone: ``(a²)ᵀ M² (g²)`` without a sequence axis (no
    ``B × |W|`` array), the formed gradient times ``M`` with one; a PixelCNN-style masked
    kernel on the formed route."""
    rng = np.random.default_rng(23)
    d = 4
    made = jnp.asarray(np.tril(np.ones((d, d)), -1) + np.eye(d)[::-1], F64)
    pixel = jnp.ones((3, 3, 2, 2), F64).at[1, 2:].set(0).at[2:].set(0)
    params = {
        "W": _normal(rng, d, d),
        "V": _normal(rng, d, d),
        "g": 1 + _normal(rng, d, scale=0.3),
        "k": _normal(rng, 3, 3, 2, 2),
    }
    x = _normal(rng, B, d)

    def loss(p, x):
        w = p["W"] * made * p["g"]
        h = jnp.tanh(jnp.tanh(x @ w) @ w)  # tied
        return jnp.sum(jnp.tanh(h @ (p["V"] * made)) ** 2)

    routes = _check(loss, params, x, reparam=("['g']",), fast=("['W']", "['V']"))
    assert "dense, full mask M: (a²)ᵀM²(g²)" in routes["['V']"].route, routes["['V']"]
    assert routes["['W']"].route.startswith("tied, 2 uses: scaled (mul)"), routes["['W']"]
    assert "per-example gradient" in routes["['W']"].route

    # The masked form's program holds no (B, d, d) value.
    masked_v = lambda p, x: jnp.sum(jnp.tanh(x @ (p["V"] * made)) ** 2)
    shapes = _shapes_in(
        jax.make_jaxpr(lambda p: passes.fast_pass(masked_v, p, x, jnp.ones(B, bool)).norm_sq)(
            {"V": params["V"]}
        ).jaxpr
    )
    assert (B, d, d) not in {tuple(s for s in shape if s != 1) for shape in shapes}

    def seq_and_conv(p, ex):  # and a weight-normalised masked layer (IAF's)
        seq, img = ex
        u = p["U"] * made
        u = p["g"] * u / jnp.sqrt(jnp.sum(u * u, axis=0, keepdims=True))
        h = jnp.tanh(seq @ (p["V"] * made)) @ u
        return jnp.sum(jnp.tanh(h) ** 2) + jnp.sum(jnp.tanh(_conv(img, p["k"] * pixel)) ** 2)

    batch = (_normal(rng, B, 3, d), _normal(rng, B, 5, 5, 2))
    small = {"V": params["V"], "k": params["k"], "U": params["W"], "g": params["g"]}
    routes = _check(seq_and_conv, small, batch, fast=("['V']", "['k']", "['U']"))
    assert "3 positions, full mask M: per-example gradient, times M" in routes["['V']"].route
    assert "normaliser made of the leaf" in routes["['U']"].route, routes["['U']"]
    assert "conv, full mask M: per-example gradient, times M" in routes["['k']"].route


@pytest.mark.parametrize(
    "scatter",
    [
        lambda e: e.at[1].set(0.5),  # (M = 0 on row 1)
        lambda e: e.at[1].add(0.5),  # (M = 1 everywhere: only C)
        lambda e: e.at[:, :].add(0.5),
    ],
    ids=["set", "add-a-row", "add-all"],
)
def test_additive_scatter_with_a_learned_scale_keeps_the_vjp_route(scatter):
    """``E.at[1].set(0.5) * s[:, None]`` (or ``.add``): the constant ``C`` meets a factor made
    of a parameter, whose gradient needs ``C`` too: the VJP route, visibly, and exact. (An
    ``.add``'s mask is all ones: dropping its term as a no-op lost ``C``, and ``s``'s
    gradient with it.)"""
    rng = np.random.default_rng(24)
    params = _table_params(rng)
    del params["c"]
    toks = jnp.asarray(rng.integers(0, VOCAB, size=(B, T)))

    def loss(p, toks):
        table = scatter(p["E"]) * p["s"][:, None]
        return jnp.sum(jnp.tanh(table[toks] @ p["W"]) ** 2)

    routes = _check(loss, params, toks, reparam=("['E']", "['s']"), fast=("['W']",))
    assert "scatter" in routes["['E']"].route


@pytest.mark.parametrize(
    "table",
    [
        lambda p: jnp.concatenate([p["E"], 2 * p["E"]]),  # (blocks of rows)
        lambda p: jnp.concatenate([p["E"], p["E"][::-1]], axis=1),  # (blocks of columns)
    ],
    ids=["rows", "columns"],
)
def test_concatenated_table_looked_up(table):
    """A table concatenated from parameter blocks and looked up: a lookup reads rows across
    the blocks, so it is not a block use (that raised a ``ValueError`` reading the lookup as
    a dense use); the VJP route, exact."""
    rng = np.random.default_rng(25)
    params = {"E": _normal(rng, VOCAB, D), "W": _normal(rng, 2 * D, D)}
    toks = jnp.asarray(rng.integers(0, VOCAB, size=(B, T)))

    def loss(p, toks):
        rows = table(p)[toks]
        return jnp.sum(jnp.tanh(rows @ p["W"][: rows.shape[-1]]) ** 2)

    _check(loss, params, toks, reparam=("['E']",), fast=("['W']",))


@pytest.mark.parametrize(
    "table",
    [
        lambda p: p["E"] * p["s"][:, None],  # a learned factor of A
        lambda p: p["E"] / jnp.linalg.norm(p["E"], axis=1, keepdims=True),  # a normaliser
    ],
    ids=["row-scale", "row-norm"],
)
def test_float32_rows_of_a_float64_scaled_table(table):
    """One-hot float32 rows times a float64 scaled table (``dot_general`` of mixed dtypes,
    float64 result): the factors' gradients are in float64 (A's cotangent was rounded to
    float32, and A ⊙ F was cast to float32: ~1e-8 relative, silently)."""
    rng = np.random.default_rng(26)
    params = _table_params(rng)
    del params["c"]
    toks = jnp.asarray(rng.integers(0, VOCAB, size=(B, T)))

    def loss(p, toks):
        rows = jax.nn.one_hot(toks, VOCAB, dtype=jnp.float32) @ table(p)
        return jnp.sum(jnp.tanh(rows @ p["W"]) ** 2)

    _check(loss, params, toks, fast=("['E']", "['W']"))
