"""``cond``/``switch`` branches and custom derivatives: exact, with the route in the plan.

Float64; norms and clipped sums against ``method="vmap"`` and a Python loop over examples.
"""

import jax
import jax.numpy as jnp
import numpy as np
from test_fast_scan import _check, _normal, _routes

from jaxgrad.fast import per_example_norms


def _setup():
    rng = np.random.default_rng(50)
    return {"w": _normal(rng, 4, 4), "s": _normal(rng, 4)}, _normal(rng, 7, 4, scale=1.0)


def test_switch_with_per_example_index_and_a_use_outside():
    params, batch = _setup()

    def loss(p, x):
        branches = [
            lambda x: jnp.tanh(x @ p["w"]),
            lambda x: jnp.sin(p["w"] @ x) * p["s"],  # W on the other side, and a scale
            lambda x: x,  # W not used at all
        ]
        h = jax.lax.switch(jnp.argmax(x) % 3, branches, x)
        return jnp.sum(h**2) + jnp.sum(jnp.tanh(x @ p["w"]))

    assert len(set(np.asarray(jnp.argmax(batch, axis=1) % 3))) == 3  # every branch taken
    routes = _routes(_check(loss, params, batch))
    assert routes["['w']"].startswith("tied, 3 uses")


def test_cond_with_a_predicate_shared_by_all_examples():
    params, batch = _setup()

    def loss(p, x):  # the predicate reads only params: one branch for the whole batch
        h = jax.lax.cond(p["s"][0] > 0, lambda x: x @ p["w"], lambda x: -(x @ p["w"].T), x)
        return jnp.sum(jnp.tanh(h) ** 2)

    for sign in (1.0, -1.0):
        p = {**params, "s": params["s"].at[0].set(sign)}
        routes = _routes(_check(loss, p, batch))
        assert routes["['w']"].startswith("tied, 2 uses")


def test_custom_vjp_falls_back_visibly_and_keeps_its_rule():
    params, batch = _setup()

    @jax.custom_vjp
    def scaled_matmul(x, w):
        return x @ w

    # the custom rule halves W's gradient: inlining the function body would be wrong
    scaled_matmul.defvjp(
        lambda x, w: (x @ w, (x, w)), lambda r, g: (r[1] @ g, 0.5 * jnp.outer(r[0], g))
    )

    def loss(p, x):
        return jnp.sum(jnp.tanh(scaled_matmul(x, p["w"])) ** 2) + jnp.sum(p["s"] * x)

    p = _check(loss, params, batch)
    (w,) = [lp for lp in p.leaves if lp.path == "['w']"]
    assert w.fallback and "custom_vjp" in w.reason
    assert per_example_norms(loss)(params, batch).shape == (7,)


def test_cond_inside_a_scan_body():
    """A ``cond`` in a scan body, by a per-example predicate (a select under ``vmap``) and by
    the step counter (one branch per step for the whole batch): each branch's uses are
    captured at every step (zero cotangent where another branch ran) and lifted over the
    steps, exact against a loop over examples."""
    rng = np.random.default_rng(51)
    params = {"w": _normal(rng, 4, 4), "v": _normal(rng, 4, 4)}
    batch = _normal(rng, 5, 6, 4, scale=1.0)  # 5 examples of 6 steps

    def loss(p, xs):
        def step(h, ix):
            i, x = ix
            h = jax.lax.cond(
                jnp.sum(x) > 0,
                lambda h: jnp.tanh(h @ p["w"] + x),
                lambda h: jnp.sin(x @ p["v"].T) * h,
                h,
            )
            h = jax.lax.cond(i % 2 == 0, lambda h: h @ p["v"], lambda h: h, h)
            return h, h

        _, ys = jax.lax.scan(step, jnp.ones(4, xs.dtype) / 2, (jnp.arange(6), xs))
        return jnp.sum(jnp.tanh(ys) ** 2)

    p = _check(loss, params, batch)
    (v,) = [lp for lp in p.leaves if lp.path == "['v']"]
    assert not v.fallback and v.route.startswith("tied, 2 uses"), v
    assert any(u.endswith("in cond branch 1 in scan") for u in v.uses), v.uses
    (w,) = [lp for lp in p.leaves if lp.path == "['w']"]
    assert w.route.startswith("scan, 6 steps, shared; cond branch 1: dense"), w
