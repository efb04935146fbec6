"""The two ways to get per-example gradient norms and reweighted gradient sums.

Both return a :class:`Parts`: the per-example loss sums and counts, every example's squared
gradient norm (over all parameters, and per parameter leaf), ``weighted(c) = Σ_i c_i ∇S_i``
(``c`` one weight per example, or one per example and leaf), ``dots(v) = ⟨∇S_i, v⟩``
and the factors :func:`gram` reads the Gram matrix ``⟨∇S_i, ∇S_j⟩`` from.

* :func:`vmap_pass` — the reference: materialise ``∇S_i`` with ``vmap(grad)`` (``B × P``).
* :func:`fast_pass` — one forward and one backward pass of the batched loss, with zero
  perturbations on the outputs of the parameter's dense/conv/gather uses (see
  :mod:`jaxgrad.fast.trace`), whose gradients are the per-example output cotangents ``G``
  (:mod:`jaxgrad.fast.capture`);
  norms and reweighted sums come from ``G`` and the kept operands ``A`` (see
  :mod:`jaxgrad.fast.rules`). Parameters with other uses get a per-example zero copy whose
  gradient is their exact per-example gradient. Reparametrised parameters (an
  example-independent transformation ``W_eff = f(θ)`` before ordinary uses) get ``f``'s VJP
  of the effective weight's per-example gradient; a *scaled* weight ``(θ' - m) ⊙ Π F_k``
  keeps θ on its uses' own routes with the factors folded into ``A`` or ``G``
  (:class:`jaxgrad.fast.reparam.Scale`, :class:`_Normaliser`). Each leaf takes the
  :class:`jaxgrad.fast.plan.Route` computed once by :func:`jaxgrad.fast.plan.routes`, the
  one ``plan`` prints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.fast import analysis, capture, rules, trace
from jaxgrad.fast import plan as plan_lib
from jaxgrad.fast.operands import Normaliser, Operands, factored, row_dots
from jaxgrad.fast.program import Var, shape_struct
from jaxgrad.grads import _per_example

METHODS = ("auto", "vmap")


class Parts(NamedTuple):
    sums: jax.Array  # (B,) per-example loss sums S_i (0 where padded)
    counts: jax.Array  # (B,) item counts n_i (0 where padded)
    norm_sq: jax.Array  # (B,) ‖∇S_i‖² over all parameters (0 where padded)
    # c (B,) -> Σ_i c_i ∇S_i, a params-shaped pytree; c (B, L) weighs leaf j by column j
    weighted: Callable[[jax.Array], Any]
    dots: Callable[[list], jax.Array]  # leaves of v -> (B,) ⟨∇S_i, v⟩ (0 where padded)
    # () -> one block per group of parameter uses with no cross terms between groups:
    # ("grads", J (B, ...)) a materialised per-example gradient, ("use", kind, eqn, pos, A, G)
    # one use, or ("outer", factors) tied uses in outer form (see :func:`gram`)
    blocks: Callable[[], list]
    # (B, L) ‖∇_{leaf j} S_i‖² for the L leaves of params in tree order (a tied leaf's includes
    # the cross terms between its uses); its rows add up to norm_sq (0 where padded)
    leaf_sq: jax.Array


def _leaf_weights(c, j):
    """Leaf ``j``'s column of the weights: ``c`` itself when it is one weight per example."""
    return c if c.ndim == 1 else c[:, j]


def check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}; got {method!r}")
    return method


def _expand(mask, x):
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def _where_rows(mask, x):
    return jnp.where(_expand(mask, x), x, jnp.zeros((), x.dtype))


def vmap_pass(loss_fn, params, batch, mask) -> Parts:
    """Materialised per-example gradients, ``vmap(value_and_grad(S_i))``: the reference."""

    sums, counts, grads = _per_example(loss_fn, params, batch, mask, None)  # rows masked
    norm_sq = reduce.row_sq_norms(grads)

    leaves, treedef = jax.tree_util.tree_flatten(grads)

    def weighted(c):
        out = [
            jnp.tensordot(_leaf_weights(c, j).astype(g.dtype), g, 1) for j, g in enumerate(leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, out)

    def dots(v):
        return sum(row_dots(g, x) for g, x in zip(leaves, v, strict=True))

    leaf_sq = _stack_leaves([reduce.row_sq_norms(g) for g in leaves], norm_sq)
    blocks = lambda: [("grads", g) for g in leaves]
    return Parts(sums, counts, norm_sq, weighted, dots, blocks, leaf_sq)


def _stack_leaves(columns, norm_sq):
    """``(B, L)`` from ``L`` columns ``(B,)`` (``(B, 0)`` for a tree with no leaves)."""
    if not columns:
        return jnp.zeros((*norm_sq.shape, 0), norm_sq.dtype)
    return jnp.stack([jnp.asarray(x, norm_sq.dtype) for x in columns], axis=1)


def gram(p: Parts, q: Parts) -> jax.Array:
    """``(B1, B2)``: ``⟨∇S_i, ∇S_j⟩`` between the examples of two passes (or one, twice).

    The parameters' groups of uses add (uses reading disjoint blocks have no cross terms);
    each group's block is the rule's pairwise form: :func:`jaxgrad.fast.rules.gram` for one
    use, :func:`jaxgrad.fast.rules.cross_gram` for tied uses in outer form, the inner
    products of per-example gradients otherwise. Padded rows and columns are 0.
    """
    left = p.blocks()
    right = left if q is p else q.blocks()
    total = 0
    for bp, bq in zip(left, right, strict=True):
        if bp[0] == "grads":
            block = rules.grads_gram(bp[1], bq[1])
        elif bp[0] == "use":
            block = rules.gram(*bp[1:], *bq[4:])
        elif bp[0] == "normaliser":
            block = Normaliser.gram(bp[1], bq[1])
        else:
            block = rules.cross_gram(bp[1], bq[1])
        total = total + block
    # (A padded row's cotangents G_i and exact gradients are zeros: its row and column are 0.)
    return jnp.asarray(total, jnp.result_type(p.norm_sq))


def _row_sq(g, dtype):
    """``(B,)``: the squared norm of every row of ``g``."""
    return jnp.sum(jnp.square(g.reshape(g.shape[0], -1).astype(dtype)), axis=1)


def analyse(loss_fn, params, batch) -> analysis.Analysis:
    """The jaxpr analysis of ``loss_fn`` on one example of ``batch``."""
    example = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)), batch
    )
    fn = lambda p, ex: reduce.as_sum_count(loss_fn(p, ex))
    return analysis.analyse(fn, jax.tree_util.tree_map(shape_struct, params), example)


def _chain_transpose(program, use: trace.Use, leaf, x):
    """Maps a gradient with respect to a use's (aliased) operand back to the leaf's layout.

    For a leaf scanned over by a ``lax.scan`` the operand is the stack of its per-step slices
    (the chain applies to every slice).
    """
    if not use.chain and not use.pre_chain and not any(lv.chain for lv in use.nest):
        return x.astype(leaf.dtype)
    zero = jnp.zeros(leaf.shape, leaf.dtype)
    _, vjp = jax.vjp(lambda p: trace.apply_use_chain(program, use, p), zero)
    return vjp(x)[0]


def fast_pass(
    loss_fn, params, batch, mask, *, strict: bool = False, weighted: bool = False
) -> Parts:
    """Per-example norms and reweighted sums from one batched forward/backward pass.

    Every use is captured by one recursive evaluator over the frames it sits in
    (:func:`jaxgrad.fast.capture.capture`, a handler per frame primitive in
    :data:`jaxgrad.fast.capture.FRAMES`). A use inside a
    ``lax.scan`` body is captured at every step (its perturbation is a scanned-over input of
    shape ``(steps, *out)``, its kept operand a stacked output) and the rules see it lifted
    over the steps (:func:`jaxgrad.fast.trace.lift_over_steps`). Frames compose: a use in
    any nesting of scans, ``cond`` branches and ``custom_jvp`` rules is captured at every step
    of every scan around it, ``(steps, B, *inner steps, *out)``, and lifted over every scan's
    steps; in a branch where the branch runs, with zeros where it does not; in a
    ``custom_jvp`` rule's tangent map, whose transpose is the gradient JAX takes.

    With ``strict``, a leaf that is not small and takes the exact fallback raises (see
    :func:`jaxgrad.fast.plan.check_strict`). ``weighted``: the caller computes a weighted
    sum (:attr:`Parts.weighted`; clipping, statistics), so a route that keeps per-example
    gradients (:attr:`jaxgrad.fast.rules.Form.keep`) forms them for the norms as well.
    """
    an = analyse(loss_fn, params, batch)
    if strict:
        plan_lib.check_strict(an, params)
    program = an.program
    leaves, treedef = jax.tree_util.tree_flatten(params)
    n = an.num_params
    # The routes, computed once: what runs here is what ``plan`` prints.
    route = plan_lib.routes(an, [np.shape(x) for x in leaves])
    tf = an.transform
    # Leaves and effective weights (``n + v``) as (shape, dtype) structs.
    like = [shape_struct(x) for x in leaves]
    like += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (tf.avals if tf else ())]
    size = mask.shape[0]
    cap = capture.capture(an, leaves, batch, mask)
    sums, counts, kept, g_use, g_exact, axis = cap
    ops = Operands(an, leaves, cap)

    def weighted_use(u, c):  # Σ_i c_i ∇S_i through one use, on the arrays as captured
        if factored(u):  # Σ_i c_i op_Wᵀ(A_i, G_i), then the factors once: no scaled A or G
            raw = rules.weighted_grad(u.op, u.pos, kept[u.key], g_use[u.key], c, axis=axis[u.key])
            return raw * ops.factors_on_operand(u).astype(raw.dtype)
        if len(u.scans) > 1 or u.scale or u.select:
            return ops.masked(
                u, rules.weighted_grad(u.op, u.pos, ops.a_of(u), ops.g_of(u), c), examples=False
            )
        g = g_use[u.key]
        if u.scans and u.scans[0].step_axis:
            g = jnp.moveaxis(g, 0, 1 + u.scans[0].step_axis)  # (B at axis 0 after the move)
            return rules.weighted_grad(u.op, u.pos, jnp.moveaxis(kept[u.key], 1, 0), g, c)
        return rules.weighted_grad(u.op, u.pos, kept[u.key], g, c, axis=axis[u.key])

    def leaf_grads(j, use):  # (B, *leaf.shape) through one use
        g = ops.masked(use, rules.per_example_grads(use.op, use.pos, ops.a_of(use), ops.g_of(use)))
        return jax.vmap(lambda x: _chain_transpose(program, use, like[j], x))(g)

    # Per-example gradients formed for the norms and kept, one entry per group of uses (see
    # plan.Group): the weighted sum then reads them (Σ_i c_i J_i, B × |leaf| work) instead of
    # contracting A and G again. A one-use group's where its route forms them anyway
    # (``rule.keep``), in its use's operand layout; a route taken step by step
    # (``rule.per_step``) reads the step-major arrays as captured, ``(steps, B, ...)``, on the
    # step equation (no transpose to put examples first), so they keep that example axis.
    # Tied uses' (form "grads") are summed over the group, in the leaf's layout.
    formed: dict = {}  # id(group) -> (gradients, their example axis, use of their layout|None)

    def weigh(c, grads, ex):  # Σ_i c_i J_i over the example axis of formed gradients
        if ex == 1:  # (steps, B, ...): no transpose
            w = c.astype(grads.dtype).reshape((1, -1) + (1,) * (grads.ndim - 2))
            return jnp.sum(grads * w, axis=1)
        return jnp.tensordot(c.astype(grads.dtype), grads, 1)

    def per_step(fn, u):  # fn(step equation, A, G) at every step, stacked: (steps, B, ...)
        return jax.vmap(lambda a, g: fn(u.base, a, g))(kept[u.key], g_use[u.key])

    def norm_use(group):  # ‖∇S_i‖² through a group's one use, by its route
        (u,), rule = group.uses, group.rule
        if rule.how == "dense_masked":
            return rules.masked_norm_sq(u.op, u.pos, ops.a_of(u), ops.g_of(u), ops.mask_of(u))
        if rule.keep and (weighted or rule.how == "grads"):
            fn = lambda op, a, g: ops.masked(u, rules.per_example_grads(op, u.pos, a, g))
            if rule.per_step:  # one slice of the leaf per step: (steps, B, *slice)
                formed[id(group)] = (per_step(fn, u), 1, u)
            else:
                formed[id(group)] = (fn(u.op, ops.a_of(u), ops.g_of(u)), 0, u)
            grads, ex, _ = formed[id(group)]
            sq = jnp.square(grads.astype(rules.acc_dtype(u.op)))
            return jnp.sum(sq, axis=tuple(d for d in range(sq.ndim) if d != ex))
        if rule.per_step:  # one slice of the leaf per step: the steps' squared norms add
            fn = lambda op, a, g: rules.norm_sq(rule, op, u.pos, a, g)
            return jnp.sum(per_step(fn, u), axis=0)
        return rules.norm_sq(rule, u.op, u.pos, ops.a_of(u), ops.g_of(u))

    # At least float32, and as precise as the loss and every parameter (float64 parameters of
    # a float32 loss have float64 gradients, as on the vmap path).
    norm_dtype = jnp.result_type(sums.dtype, jnp.float32, *(jnp.result_type(x) for x in leaves))
    norm_sq = jnp.zeros((size,), norm_dtype)
    leaf_cols = [jnp.zeros((size,), norm_dtype) for _ in leaves]  # per leaf, for leaf_sq

    def group_block(j, group):  # how a group of uses that may overlap is read (see Parts)
        if group.form == "use":
            u = group.uses[0]
            if plan_lib.masked(u):  # M ⊙ J_i: the formed gradients' inner products
                grads = ops.masked(
                    u, rules.per_example_grads(u.op, u.pos, ops.a_of(u), ops.g_of(u))
                )
                return ("grads", grads)
            return ("use", u.kind, u.op, u.pos, ops.a_of(u), ops.g_of(u))
        ndim = len(like[j].shape)  # tied uses: the cross terms between them are needed
        if group.form == "outer":
            return (
                "outer",
                [
                    rules.outer_factors(u.op, u.pos, perm, ndim, ops.a_of(u), ops.g_of(u))
                    for u, perm in zip(group.uses, group.perms, strict=True)
                ],
            )
        return ("grads", group_grads(j, group))

    def group_grads(j, group):  # tied uses' per-example gradient (B, *leaf), formed once
        if id(group) not in formed:
            formed[id(group)] = (sum(leaf_grads(j, u) for u in group.uses), 0, None)
        return formed[id(group)][0]

    def group_norm(j, group):  # ‖Σ_u ∇S_i through u‖²: the diagonal of the group's block
        if group.form == "use":
            return norm_use(group)
        block = group_block(j, group)
        if block[0] == "outer":
            return rules.cross_norm_sq(block[1])
        return _row_sq(block[1], norm_dtype)

    # Reparametrised leaves θ (see :class:`jaxgrad.fast.reparam.Transform`): W_eff = f(θ) is the
    # same for every example, so ∇_θ S_i = J_fᵀ ∇_{W_eff} S_i. Norms (and Gram blocks) apply
    # the VJP to each example's materialised ∇_{W_eff} S_i (B × |W_eff|, no per-example
    # forward pass); the weighted sum and the dots stay factored by linearity:
    # Σ_i c_i J_fᵀ ∇_i = J_fᵀ (Σ_i c_i ∇_i) and ⟨J_fᵀ ∇_i, v⟩ = ⟨∇_i, J_f v⟩. A scaled weight
    # (θ' ⊙ Π F_k) forms no ∇_{W_eff} S_i: θ is a fast leaf, and the factors made of leaves
    # get their per-example gradients from A, G and θ' (``factor_grads``) for the same VJP.
    if tf is not None and tf.leaves:
        fixed = {program.invars[j]: leaves[j] for j in range(n) if j not in an.exact}

        def transform(*theta):
            values = dict(fixed)
            values.update((program.invars[j], t) for j, t in zip(tf.leaves, theta, strict=True))
            return tf.apply(program, values)

        theta0 = [leaves[j] for j in tf.leaves]
        _, f_vjp = jax.vjp(transform, *theta0)
        eff = [n + v for v in tf.formed]

        @functools.cache
        def eff_grads(j):  # (B, *W_eff): every use's per-example gradient, summed
            total = jnp.zeros((size, *like[j].shape), like[j].dtype)
            for u in an.uses[j]:
                total = total + leaf_grads(j, u).astype(like[j].dtype)
            return total

        @functools.cache
        def factor_grads():  # (B, *F) per factor of tf.factors: Σ over the uses it scales
            out = dict.fromkeys(tf.factors, 0)
            for us in an.fast.values():
                for u in us:
                    for q, sc in enumerate(u.scale):
                        if isinstance(sc.ref, Var) and sc.ref in out:
                            out[sc.ref] = out[sc.ref] + ops.factor_grad(u, q)
            return [out[ref] for ref in tf.factors]

        @functools.cache
        def reparam_grads():  # leaf -> (B, *leaf): the VJP per example, plus direct uses
            per = jax.vmap(f_vjp)([eff_grads(j) for j in eff] + factor_grads())
            out = {}
            for j, g in zip(tf.leaves, per, strict=True):
                for u in an.uses[j]:
                    g = g + leaf_grads(j, u).astype(g.dtype)
                out[j] = g
            return out

    @functools.cache
    def normalisers():  # scaled leaf θ with normalisers -> its _Normaliser
        out = {}
        for j, us in an.fast.items():
            own = {}  # ref -> [(use, factor index)]
            for u in us:
                for q, sc in enumerate(u.scale):
                    if sc.own:
                        own.setdefault(sc.ref, []).append((u, q))
            if own:
                out[j] = Normaliser(ops, j, leaves[j], own)
        return out

    def fast_groups():  # (leaf, group) of every fast leaf, in order
        return [(r.leaf, g) for r in route[:n] if r.way == "fast" for g in r.groups]

    for j, group in fast_groups():
        # Uses reading disjoint blocks of the leaf (Q, K, V parts of one weight) have no
        # cross terms: their squared norms add.
        sq = group_norm(j, group).astype(norm_dtype)
        norm_sq, leaf_cols[j] = norm_sq + sq, leaf_cols[j] + sq
    for j, nz in normalisers().items():
        sq = nz.norm_sq().astype(norm_dtype)
        norm_sq, leaf_cols[j] = norm_sq + sq, leaf_cols[j] + sq
    if tf is not None and tf.leaves:
        for j, g in reparam_grads().items():
            sq = _row_sq(g, norm_dtype)
            norm_sq, leaf_cols[j] = norm_sq + sq, leaf_cols[j] + sq
    for j, g in g_exact.items():
        sq = _row_sq(g, norm_dtype)
        norm_sq, leaf_cols[j] = norm_sq + sq, leaf_cols[j] + sq

    def weighted_leaf(j, c):  # Σ_i c_i ∇S_i through leaf j's own uses (c: (B,))
        total = jnp.zeros(like[j].shape, like[j].dtype)
        for group in route[j].groups:  # (the groups partition the leaf's uses)
            if id(group) in formed:  # formed for the norms: read, not contracted again
                grads, ex, u = formed[id(group)]
                w = weigh(c, grads, ex)
                w = w.astype(total.dtype) if u is None else _chain_transpose(program, u, like[j], w)
                total = total + w
                continue
            for u in group.uses:
                total = total + _chain_transpose(program, u, like[j], weighted_use(u, c))
        return total

    def eff_weighted(c):  # Σ_i c_i ∇S_i per formed weight and factor, read off the norms'
        # per-example gradients (formed for them anyway: no second contraction of A and G)
        grads = [eff_grads(j) for j in eff] + factor_grads()
        return [jnp.tensordot(c.astype(g.dtype), g, 1) for g in grads]

    def through_transform(c):  # reparametrised leaf -> Σ_i c_i J_fᵀ ∇_{W_eff} S_i
        # By linearity J_fᵀ is applied once, to the weighted sum, never per example.
        if c.ndim == 1:  # one weight per example: one VJP for every leaf
            return dict(zip(tf.leaves, f_vjp(eff_weighted(c)), strict=True))
        # one weight per example and leaf: a VJP per leaf, with its own column
        return {j: f_vjp(eff_weighted(c[:, j]))[q] for q, j in enumerate(tf.leaves)}

    def weighted(c):
        out = []
        if tf is not None and tf.leaves:
            through = through_transform(c)
        for j, leaf in enumerate(leaves):
            if j in an.fast or j in an.reparam:
                total = weighted_leaf(j, _leaf_weights(c, j))
                if j in an.reparam:
                    total = total + through[j].astype(total.dtype)
                if j in normalisers():
                    total = total + normalisers()[j].weighted(_leaf_weights(c, j))
                out.append(total)
            elif j in g_exact:
                g = g_exact[j]
                out.append(jnp.tensordot(_leaf_weights(c, j).astype(g.dtype), g, 1))
            else:
                out.append(jnp.zeros(np.shape(leaf), jnp.result_type(leaf)))
        return jax.tree_util.tree_unflatten(treedef, out)

    def dot_use(u, v_op):  # (B,) ⟨∇S_i through one use, v_op⟩ (v_op: the use's operand)
        if len(u.scans) != 1 or u.split >= 0 or u.scale or u.select:
            return rules.dot(u.kind, u.op, u.pos, ops.a_of(u), ops.g_of(u), v_op)
        # In one scan: Σ_t ⟨G_{t,i}, op(A_{t,i}, v_t)⟩ per step on the step equation, on the
        # step-major arrays as captured (no transpose to put the examples first).
        v_axis = 0 if u.scans[0].stacked else None  # a leaf scanned over: its slice per step
        per = jax.vmap(
            lambda a, g, w: rules.dot(u.kind, u.base, u.pos, a, g, w), in_axes=(0, 0, v_axis)
        )(kept[u.key], g_use[u.key], v_op)
        return jnp.sum(per, axis=0)

    def dots(v):  # ⟨∇S_i, v⟩ = Σ_uses ⟨G_i, op(A_i, chain(v))⟩ + the exact leaves' rows
        total = jnp.zeros((size,), norm_dtype)
        v = list(v) + [None] * len(tf.outputs if tf is not None else ())
        if tf is not None and tf.leaves:  # the formed weights' and factors' direction: J_f v
            theta_v = [jnp.asarray(v[j], like[j].dtype) for j in tf.leaves]
            dirs = list(jax.jvp(transform, theta0, theta_v)[1])
            for k, d in zip(eff, dirs, strict=False):
                v[k] = d
            for g, d in zip(factor_grads(), dirs[len(eff) :], strict=True):
                total = total + row_dots(g, d).astype(norm_dtype)
        for j, uses in an.uses.items():
            if v[j] is None:
                continue  # (a scaled weight: its uses are its leaf's)
            vj = jnp.asarray(v[j], like[j].dtype)
            zero = jnp.zeros_like(vj)
            for u in uses:
                # The alias chain is linear: its jvp at 0 is the chain applied to v, the
                # transpose of what maps a use's gradient back to the leaf.
                chain = lambda p, u=u: trace.apply_use_chain(program, u, p)
                v_op = jax.jvp(chain, (zero,), (vj,))[1]
                if factored(u):  # ⟨(Π F) ⊙ ∇_{W_eff} S_i, v⟩ = ⟨∇_{W_eff} S_i, (Π F) ⊙ v⟩
                    v_op = v_op * ops.factors_on_operand(u).astype(v_op.dtype)
                    total = total + rules.dot(u.kind, u.op, u.pos, kept[u.key], g_use[u.key], v_op)
                else:
                    total = total + dot_use(u, v_op)
        for j, nz in normalisers().items():
            total = total + nz.dots(jnp.asarray(v[j], like[j].dtype)).astype(norm_dtype)
        for j, g in g_exact.items():
            total = total + row_dots(g, v[j]).astype(norm_dtype)
        return jnp.where(mask, total, 0)

    def blocks():  # the groups norm_sq adds, in the same order, for gram()
        out = [group_block(j, group) for j, group in fast_groups()]
        out += [("normaliser", nz.factors()) for nz in normalisers().values()]
        if tf is not None and tf.leaves:
            out += [("grads", g) for g in reparam_grads().values()]
        return out + [("grads", g) for g in g_exact.values()]

    # Clamped at 0: tied uses that cancel can leave a squared norm a rounding error below 0.
    norm_sq = jnp.where(mask, jnp.maximum(norm_sq, 0), 0)
    leaf_sq = jnp.where(mask[:, None], jnp.maximum(_stack_leaves(leaf_cols, norm_sq), 0), 0)
    sums, counts = _where_rows(mask, sums), _where_rows(mask, counts)
    return Parts(sums, counts, norm_sq, weighted, dots, blocks, leaf_sq)


def get_pass(method: str, strict: bool = False, *, weighted: bool = False):
    """The pass for ``method``; ``strict`` and ``weighted`` (the caller computes a weighted
    sum, see :func:`fast_pass`) apply to the fast path (vmap has no fallback)."""
    strict = reduce.check_flag(strict, name="strict")
    if check_method(method) == "vmap":
        return vmap_pass
    return functools.partial(fast_pass, strict=strict, weighted=weighted)


def run_chunked(body, batch, mask, chunk_size):
    """``body(batch, mask) -> (per_example, totals)`` over chunks, totals added, rows stacked.

    :func:`jaxgrad.reduce.chunked` with ``chunk_size`` examples at a time under ``lax.scan``;
    a remainder that does not fill a chunk is processed last on its own, so no example is
    padded or dropped. Chunk ``k`` of ``K`` holds rows ``k, k + K, …`` (interleaved, and the
    rows put back in order after), so on a batch sharded over devices every chunk is spread
    over them and no row moves. ``chunk_size=None`` calls ``body`` once.
    """
    if chunk_size is None:
        return body(batch, mask)
    return reduce.chunked(body, batch, mask, chunk_size=chunk_size, interleave=True)
