"""``jaxgrad.fast.plan`` and ``strict=``: the routes it reports are the ones taken."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fast_cases import F64, assert_rel_close, case, materialised

from jaxgrad.fast import clipped_grad, grad_stats, per_example_norms, plan


def _example(batch):
    return jax.tree_util.tree_map(lambda x: x[0], batch)


def test_plan_lists_every_leaf_with_route():
    loss, params, batch = case("tied")
    p = plan(loss, params, _example(batch))
    by_path = {lp.path: lp for lp in p.leaves}
    assert set(by_path) == {"['b']", "['embed']", "['mix']"}
    # every leaf's route, and each use named by the user's source line (test_fast_cases.py)
    assert by_path["['embed']"].route.startswith("tied, 2 uses")
    gather, head = by_path["['embed']"].uses
    assert gather.startswith("gather @ test_fast_cases.py:81 (tied_loss)"), gather
    assert head.startswith("dense @ test_fast_cases.py:82 (tied_loss)"), head
    assert by_path["['mix']"].route == "dense, 4 positions: per-example gradient"
    assert by_path["['mix']"].uses == ("dense @ test_fast_cases.py:81 (tied_loss)",)
    assert by_path["['b']"].fallback and "used by `add`" in by_path["['b']"].reason
    assert by_path["['b']"].per_example == 4
    text = str(p)
    assert text.splitlines()[0].split()[:4] == ["leaf", "shape", "uses", "route"]
    assert all(path in text for path in by_path)
    assert "test_fast_cases.py:81 (tied_loss)" in text


def test_plan_names_frames_and_transformations():
    """A use in a scan body names its line and frame; a reparametrised leaf names the
    transformation and the uses of the effective weight it makes (what ``fast_pass`` runs)."""

    def loss(p, x):
        def step(h, _):
            return jnp.tanh(h @ p["u"]), None

        h, _ = jax.lax.scan(step, x @ p["w"], None, length=3)
        return jnp.sum(h @ jnp.sin(p["m"]).T) + jnp.sum(h @ (p["k"] * 2.0).T)

    params = {"w": jnp.ones((3, 2)), "u": jnp.ones((2, 2)), "m": jnp.ones((4, 2))}
    params["k"] = jnp.ones((4, 2))
    by_path = {lp.path: lp for lp in plan(loss, params, jnp.ones(3)).leaves}
    assert by_path["['u']"].uses == ("dense @ test_fast_plan.py:42 (step) in scan",)
    assert by_path["['u']"].route.startswith("scan, 3 steps, shared: dense")
    assert by_path["['w']"].route == "dense: |a|²|g|²"
    m = by_path["['m']"]
    assert m.route.startswith("reparametrised (sin): ") and not m.fallback
    assert m.uses == ("dense @ test_fast_plan.py:45 (loss) via sin",)
    assert m.per_example == 8 + 8  # the effective weight's gradient, then the leaf's
    k = by_path["['k']"]  # a scale on one side of the use: the use's own rule, scaled
    assert k.uses == ("dense @ test_fast_plan.py:45 (loss) via mul",)
    assert k.route == (
        "scaled (mul): the scale folded into its output cotangent G, no B × |W| array; "
        "dense: |a|²|g|²"
    )
    assert k.per_example == 1


@jax.custom_vjp
def _matmul(h, w):
    return h @ w


# the rule is the ordinary one, but a custom rule must be kept: the leaf falls back
_matmul.defvjp(lambda h, w: (h @ w, (h, w)), lambda r, g: (r[1] @ g, jnp.outer(r[0], g)))


def _branch_loss(p, x):
    return jnp.sum(jnp.tanh(_matmul(x * p["s"], p["wh"])) ** 2)


def test_custom_vjp_falls_back_visibly_and_strict_raises():
    rng = np.random.default_rng(0)
    params = {"wh": jnp.asarray(rng.normal(size=(80, 80)) / 9, F64), "s": jnp.ones((80,), F64)}
    batch = jnp.asarray(rng.normal(size=(3, 80)), F64)
    p = plan(_branch_loss, params, batch[0])
    (wh,) = [lp for lp in p.leaves if lp.path == "['wh']"]
    assert wh.fallback and "custom_vjp" in wh.reason and wh.per_example == 6400
    # the fallback is exact (against vmap), and strict=True names the leaf and the reason
    assert_rel_close(
        per_example_norms(_branch_loss)(params, batch),
        per_example_norms(_branch_loss, method="vmap")(params, batch),
    )
    for make in (
        lambda: per_example_norms(_branch_loss, strict=True),
        lambda: clipped_grad(_branch_loss, l2_clip=1.0, strict=True),
        lambda: grad_stats(_branch_loss, strict=True),
    ):
        with pytest.raises(ValueError, match=r"strict=True: parameter leaf \['wh'\].*custom_vjp"):
            make()(params, batch)


def test_strict_accepts_small_fallbacks():
    loss, params, batch = case("tied")  # a bias: a vector, allowed to fall back
    got = per_example_norms(loss, strict=True)(params, batch)
    assert_rel_close(got, np.linalg.norm(materialised("tied"), axis=1))


def test_strict_must_be_bool():
    with pytest.raises(ValueError, match=r"`strict` must be True or False; got 'yes'"):
        per_example_norms(lambda p, x: p * x, strict="yes")


def _scale_kind():
    """The module docstring's example of :data:`jaxgrad.fast.rules.KINDS`: ``x * w``."""
    from jaxgrad.fast import rules

    def accepts(eqn, positions):  # one parameter operand, nothing broadcast
        return len(positions) == 1 and eqn.in_avals[0].shape == eqn.in_avals[1].shape

    def route(eqn, pos):
        return rules.Form(
            "grads", "scale: per-example gradient", int(np.prod(eqn.in_avals[pos].shape))
        )

    return rules.Kind("mul", accepts, route)


def test_a_new_kind_of_use_is_one_table_entry(monkeypatch):
    """One entry in ``rules.KINDS`` takes a primitive off the exact fallback: the walker,
    the capture and the route follow, exact against ``vmap(grad)``."""
    from jaxgrad.fast import rules

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"]) * p["s"]) ** 2

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), F64), "s": jnp.asarray([0.5, -2.0])}
    batch = jnp.asarray(rng.normal(size=(4, 3)), F64)
    assert {lp.path: lp for lp in plan(loss, params, batch[0]).leaves}["['s']"].fallback
    monkeypatch.setitem(rules.KINDS, "scale", _scale_kind())
    s = {lp.path: lp for lp in plan(loss, params, batch[0]).leaves}["['s']"]
    assert s.route == "scale: per-example gradient" and s.uses[0].startswith("scale @ ")
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, batch)
    flat = np.concatenate([np.reshape(g, (4, -1)) for g in jax.tree_util.tree_leaves(grads)], 1)
    norms = np.linalg.norm(flat, axis=1)
    assert_rel_close(per_example_norms(loss)(params, batch), norms)
    clip = float(np.median(norms))
    got = clipped_grad(loss, l2_clip=clip, reduction="sum")(params, batch)
    expected = np.minimum(1, clip / norms) @ flat
    assert_rel_close(
        np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(got)]), expected
    )


def test_the_route_printed_is_the_route_run(monkeypatch):
    """The norm rules the fast pass calls are the ones the plan's routes name (recorded)."""
    from jaxgrad.fast import passes, rules

    def loss(p, ex):
        toks, x = ex
        h = p["emb"][toks] + x  # (3, 8): a lookup, then a dense use with 3 positions
        h = jnp.tanh(h @ p["wide"])  # 3 (8 + 8) <= 64: the Gram form
        c = jax.lax.conv_general_dilated(h.T[None], p["k"], (1,), "SAME")[0]  # (8, 3)
        return jnp.sum(jnp.tanh(jnp.mean(c, axis=1) @ p["out"]) ** 2)  # no positions

    rng = np.random.default_rng(1)
    shapes = {"emb": (40, 8), "wide": (8, 8), "k": (8, 8, 2), "out": (8, 2)}
    params = {k: jnp.asarray(rng.normal(size=s) / 3, F64) for k, s in shapes.items()}
    batch = (jnp.asarray(rng.integers(0, 40, size=(4, 3))), jnp.asarray(rng.normal(size=(4, 3, 8))))
    an = passes.analyse(loss, params, batch)
    leaves = jax.tree_util.tree_leaves(params)
    planned = {
        g.rule.how for r in passes.plan_lib.routes(an, [x.shape for x in leaves]) for g in r.groups
    }
    assert planned == {"gather_same_row", "dense_gram", "conv_windows", "dense_rank1"}
    ran = []
    for how, fn in list(rules.NORMS.items()):
        monkeypatch.setitem(rules.NORMS, how, lambda *a, how=how, fn=fn: ran.append(how) or fn(*a))
    got = per_example_norms(loss)(params, batch)
    assert set(ran) == planned
    assert_rel_close(got, per_example_norms(loss, method="vmap")(params, batch))
