"""The two ways to get per-example gradient norms and reweighted gradient sums.

Both return a :class:`Parts`: the per-example loss sums and counts, every example's squared
gradient norm (over all parameters, and per parameter leaf), ``weighted(c) = Σ_i c_i ∇S_i``
(``c`` one weight per example, or one per example and leaf), ``dots(v) = ⟨∇S_i, v⟩``
and the factors :func:`gram` reads the Gram matrix ``⟨∇S_i, ∇S_j⟩`` from.

* :func:`vmap_pass` — the reference: materialise ``∇S_i`` with ``vmap(grad)`` (``B × P``).
* :func:`fast_pass` — one forward and one backward pass of the batched loss, with zero
  perturbations on the outputs of the parameter's dense/conv/gather uses (see
  :mod:`jaxgrad.fast.trace`), whose gradients are the per-example output cotangents ``G``;
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

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.fast import analysis, reparam, rules, trace
from jaxgrad.fast import plan as plan_lib
from jaxgrad.fast.program import Const, Eqn, Program, Var, eval_known, evaluate, shape_struct
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
        return sum(_row_dots(g, x) for g, x in zip(leaves, v, strict=True))

    leaf_sq = _stack_leaves([reduce.row_sq_norms(g) for g in leaves], norm_sq)
    blocks = lambda: [("grads", g) for g in leaves]
    return Parts(sums, counts, norm_sq, weighted, dots, blocks, leaf_sq)


def _stack_leaves(columns, norm_sq):
    """``(B, L)`` from ``L`` columns ``(B,)`` (``(B, 0)`` for a tree with no leaves)."""
    if not columns:
        return jnp.zeros((*norm_sq.shape, 0), norm_sq.dtype)
    return jnp.stack([jnp.asarray(x, norm_sq.dtype) for x in columns], axis=1)


def _row_dots(grads, v):
    """``(B,)``: ``⟨J_i, v⟩`` for per-example gradients ``J`` ``(B, *v.shape)``."""
    dtype = jnp.promote_types(jnp.result_type(grads, v), jnp.float32)
    flat = grads.reshape(grads.shape[0], math.prod(grads.shape[1:])).astype(dtype)
    hi = jax.lax.Precision.HIGHEST
    return jnp.matmul(flat, jnp.reshape(v, (-1,)).astype(dtype), precision=hi)


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
            block = _Normaliser.gram(bp[1], bq[1])
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


@jax.custom_vjp
def tap(y, d):
    """``y``, with ``d``'s gradient set to ``y``'s cotangent: a zero perturbation for free.

    ``y + d`` with ``d = 0`` would give the same gradients but make XLA add a zero buffer the
    size of ``y``; here ``d`` is never read, so its zeros are never materialised.
    """
    del d
    return y


tap.defvjp(lambda y, d: (y, None), lambda _, ct: (ct, ct))


def _perturb(use: trace.Use, y, d, *, tapped: bool = True):
    """A use's output ``y`` with its perturbation ``d``, whose gradient is then ``G``.

    A use whose output ``vmap`` leaves unbatched (the same for every example) gets ``d``
    added, so that its cotangent is every example's own rather than the batch's. A use in
    real form (a complex output, see :func:`jaxgrad.fast.trace.real_form`) gets the real
    ``d``'s two parts as one complex number: their gradients are ``(Re G, −Im G)``.
    """
    if use.split >= 0:
        parts = [jnp.take(d, i, axis=use.split) for i in (0, 1)]
        return y + jax.lax.complex(*parts).astype(y.dtype)
    return tap(y, d) if tapped and use.batched else y + d


def _operand(use: trace.Use, a):
    """A use's kept operand as the rules see it: ``(Re A, Im A)`` for a real form."""
    if use.split < 0:
        return a
    return jnp.stack([jnp.real(a), jnp.imag(a)]).astype(use.base.in_avals[1 - use.pos].dtype)


class _Normaliser:
    """The share of a scaled leaf's gradient through its normalisers (``Scale.own``, see
    :mod:`jaxgrad.fast.reparam`).

    ``W_eff = θ' ⊙ S ⊙ Π_x F(x)`` with ``x = h(θ)`` per channel (``1/‖V_o‖`` of weight
    normalisation): ``∇_θ S_i = P_i + Σ_x J_xᵀ r_{x,i}``, where ``P_i`` is the gradient
    through the scaled uses (their rules) and ``r_{x,i} = ∇_x S_i`` (from ``A``, ``G`` and
    ``θ'``, per channel). ``x_c`` depends on channel ``c`` of ``θ`` only, so with
    ``U_x = J_xᵀ 1`` (one VJP) the channel-``c`` row of ``J_x`` is ``U_x`` on channel ``c``:
    ``d_{x,i} = J_x P_i`` is the per-channel sum of ``U_x ⊙ S ⊙ ∇_{W_eff} S_i`` (one more
    product per use, the scaled ``A``, ``G`` and ``U_x``), and ``M_{xy} = J_x J_yᵀ`` is
    diagonal per channel, ``J_x U_y`` (one JVP). Then

        ‖∇_θ S_i‖² = ‖P_i‖² + 2 Σ_x ⟨r_{x,i}, d_{x,i}⟩ + Σ_{x,y} Σ_c r_{x,i,c} M_{xy,c} r_{y,i,c},

    ``Σ_i c_i ∇_θ S_i = Σ_i c_i P_i + J_xᵀ Σ_i c_i r_{x,i}`` (one VJP) and
    ``⟨∇_θ S_i, v⟩ = ⟨P_i, v⟩ + ⟨r_{x,i}, J_x v⟩`` (one JVP): no ``B × |θ|`` array. This
    method returns only the terms after ``‖P_i‖²`` (the rules give that one).
    """

    def __init__(self, program, known, j, theta, own, factor_grad, side_sum):
        self.refs = list(own)
        leaf = program.invars[j]
        self.x_of = lambda t: eval_known(program, {**known, leaf: t}, self.refs)
        self.theta = theta
        xs, self.vjp = jax.vjp(self.x_of, theta)
        # r_x, (B, *x) per normaliser, from every use it scales.
        self.r = [sum(factor_grad(u, q) for u, q in own[x]) for x in self.refs]
        ones = lambda k: [
            jnp.ones_like(x) if i == k else jnp.zeros_like(x) for i, x in enumerate(xs)
        ]
        us = [self.vjp(ones(k))[0] for k in range(len(xs))]  # U_x = J_xᵀ 1, θ's layout
        self.d = [
            sum(
                side_sum(u, q, trace.apply_use_chain(program, u, us[k]), plain=True)
                for u, q in own[x]
            )
            for k, x in enumerate(self.refs)
        ]
        # channel layouts: the layout of the first use's factor, the same for every x there
        self.canon = [own[x][0][0].scale[own[x][0][1]] for x in self.refs]
        jvs = [jax.jvp(self.x_of, (theta,), (u,))[1] for u in us]  # J_x U_y, per y
        self.m = [[self._canon(k, jv[k][None])[0] for jv in jvs] for k in range(len(xs))]

    def _canon(self, k, r):  # (B, *x) -> (B, *channel), in the use's side order
        sc = self.canon[k]
        r = jnp.reshape(r, (r.shape[0], *sc.shape))
        return jnp.transpose(r, (0, *(1 + p for p in sc.perm)))

    def factors(self):
        rows = lambda k, z: self._canon(k, z).reshape(z.shape[0], -1)
        r = [rows(k, x) for k, x in enumerate(self.r)]
        d = [rows(k, x) for k, x in enumerate(self.d)]
        m = [[x.reshape(-1) for x in row] for row in self.m]
        return r, d, m

    def norm_sq(self):
        r, d, m = self.factors()
        total = sum(2 * jnp.sum(rx * dx, axis=1) for rx, dx in zip(r, d, strict=True))
        for k, rx in enumerate(r):
            for q, ry in enumerate(r):
                total = total + jnp.sum(rx * m[k][q] * ry, axis=1)
        return total

    @staticmethod
    def gram(f1, f2):
        (r1, d1, m), (r2, d2, _) = f1, f2
        hi = jax.lax.Precision.HIGHEST
        total = 0
        for k in range(len(r1)):
            total = total + jnp.matmul(r1[k], d2[k].T, precision=hi)
            total = total + jnp.matmul(d1[k], r2[k].T, precision=hi)
            for q in range(len(r1)):
                total = total + jnp.matmul(r1[k] * m[k][q], r2[q].T, precision=hi)
        return total

    def weighted(self, c):
        cts = [jnp.tensordot(c.astype(r.dtype), r, 1) for r in self.r]
        return self.vjp(cts)[0]

    def dots(self, v):
        jv = jax.jvp(self.x_of, (self.theta,), (v,))[1]
        return sum(_row_dots(r, x) for r, x in zip(self.r, jv, strict=True))


def fast_pass(
    loss_fn, params, batch, mask, *, strict: bool = False, weighted: bool = False
) -> Parts:
    """Per-example norms and reweighted sums from one batched forward/backward pass.

    Every use is captured by one recursive evaluator over the frames it sits in
    (:func:`_capture`, a handler per frame primitive in :data:`FRAMES`). A use inside a
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
    ex_leaves = jax.tree_util.tree_leaves(batch)
    size = mask.shape[0]
    captured = an.captured
    tree = {key: u for key, (_, u) in captured.items()}  # capture path -> Use

    def out_aval(u):  # of one step's perturbation
        return u.base.out_avals[0]

    def steps(u):  # the steps of every scan the use sits in, outermost first
        return tuple(lv.steps for lv in u.scans)

    # A use inside a scan (in whatever frames) is captured step-major,
    # ``(steps, B, *inner steps, *out)``: the layout a scan stacks its outputs in, so neither
    # the perturbation, nor the kept operand, nor the cotangent is transposed to put the
    # examples first (the weighted sum contracts steps and examples together and reads them
    # as they are). Branches and custom rules add no axis.
    axis = {key: 1 if u.scans else 0 for key, (_, u) in captured.items()}
    # Uses whose outputs are summed have one cotangent, perturbed and captured once.
    shared = shared_cotangents(program, tree)
    d_use = {
        key: jnp.zeros((*steps(u)[:1], size, *steps(u)[1:], *out_aval(u).shape), out_aval(u).dtype)
        for key, (_, u) in captured.items()
        if key not in shared
    }
    d_exact = {
        j: jnp.zeros((size, *np.shape(leaves[j])), jnp.result_type(leaves[j])) for j in an.exact
    }

    def one(ex, du, dx):
        args = [leaves[j] + dx[j] if j in dx else leaves[j] for j in range(an.num_params)]
        (s, count), kept, same = _capture(program, tree, du, [*args, *ex])
        return s, (count, _share(kept, same))

    def batched(du, dx):
        in_axes = (0, {key: axis[key] for key in du}, 0)
        return jax.vmap(one, in_axes=in_axes, out_axes=(0, (0, axis)))(ex_leaves, du, dx)

    sums, vjp, (counts, kept) = jax.vjp(batched, d_use, d_exact, has_aux=True)
    # The cotangent of S_i is m_i, so a padded row's cotangents G_i and exact gradients are
    # zeros (as in batch_grad, padded rows must be finite: 0 · NaN is NaN). Not masking A and
    # G again saves a copy of every activation.
    g_use, g_exact = vjp(mask.astype(sums.dtype))
    g_use = {**g_use, **{key: g_use[first] for key, first in shared.items()}}

    # The factors of scaled effective weights W_eff = θ' ⊙ Π F_k (see ``reparam.Scale``): each
    # scales A or G of the uses of W_eff, which are then the uses of the leaf θ.
    scale_refs = list(
        dict.fromkeys(
            r for us in an.fast.values() for u in us if u.scale
            for r in [u.theta_term, *(sc.ref for sc in u.scale)] if isinstance(r, Var)
        )
    )  # fmt: skip
    known = {program.invars[j]: leaves[j] for j in range(n) if j not in an.exact}
    scale_vals = dict(zip(scale_refs, eval_known(program, known, scale_refs), strict=True))

    def factor_value(sc):
        return sc.ref.value if isinstance(sc.ref, Const) else scale_vals[sc.ref]

    def scaled(x, u, side, skip=None):  # x (B, ...) times the use's factors on one side
        for q, sc in enumerate(u.scale):
            if sc.side == side and q != skip and not sc.offset:
                # (Promoted, not cast to x's dtype: a float32 A of a float64 weight, one-hot
                # rows of a float64 table, must not round a float64 factor to float32.)
                x = x * sc.broadcast(factor_value(sc))[None]
        return x

    def full(sc, x, shape):  # a factor against the parameter operand (sides "i" and "w")
        return jnp.broadcast_to(sc.broadcast(x), shape)

    def mask_of(u):  # a use's full masks (side "w") in its operand's layout, or None
        ms = [full(sc, factor_value(sc), u.op.in_avals[u.pos].shape) for sc in u.scale
              if sc.side == "w"]  # fmt: skip
        return functools.reduce(jnp.multiply, ms) if ms else None

    def masked(u, x, *, examples=True):  # a gradient in the operand's layout, times M
        m = mask_of(u)
        if m is None:
            return x
        return x * (m[None] if examples else m).astype(x.dtype)

    def on_operand(u, sc):  # a factor broadcastable against the use's parameter operand
        x = sc.broadcast(factor_value(sc))
        if sc.side in ("i", "w"):
            return x
        k = 0 if sc.side == "a" else 1  # operand axis -> the A (or G) axis it meets
        to_op = {
            (ax[k] if kind == "ag" else ax): d
            for d, (kind, ax) in reparam._use_axes(u.op, u.pos).items()
            if sc.side in kind
        }
        ops = [to_op[t] for t in sc.dims]
        x = jnp.transpose(jnp.reshape(x, [sc.target[t] for t in sc.dims]), np.argsort(ops))
        shape = u.op.in_avals[u.pos].shape
        out = [shape[d] if d in ops else 1 for d in range(len(shape))]
        return jax.lax.broadcast_in_dim(x, out, tuple(sorted(ops)))

    def factors_on_operand(u):  # Π F_k on θ': ∇_θ' S_i = (Π F_k) ⊙ ∇_{W_eff} S_i
        fs = [on_operand(u, sc) for sc in u.scale if not sc.offset]
        return functools.reduce(jnp.multiply, fs, jnp.ones((), u.op.in_avals[u.pos].dtype))

    def factored(u):  # a scaled use whose weighted sum and dots take the factors on θ'
        return bool(u.scale) and not u.select and not u.scans

    def lookups(u):  # a lookup's indices and cotangents, out-of-bounds lookups' zeroed
        a = jnp.moveaxis(kept[u.key], axis[u.key], 0)
        idx, _, y = rules.gather_rows(u.op, a, jnp.moveaxis(g_use[u.key], axis[u.key], 0))
        return rules.idx_restore(u.op, idx), rules.g_restore(u.op, y)

    def indexed(u, skip=None):  # (B, *out): a lookup's factors (side "i") at its rows
        shape, out = u.op.in_avals[0].shape, None
        for q, sc in enumerate(u.scale):
            if sc.side == "i" and q != skip:
                f = full(sc, factor_value(sc), shape).astype(u.op.in_avals[0].dtype)
                x = jax.vmap(lambda a_i, f=f: rules._bind(u.op, 0, f, a_i))(lookups(u)[0])
                out = x if out is None else out * x
        return out

    def indexed_grad(u, q, w):  # per example ∇F_q of (w ⊙ Π_k F_k)[rows] (side "i")
        sc, shape = u.scale[q], u.op.in_avals[0].shape
        rest = w
        for k, other_sc in enumerate(u.scale):
            if other_sc.side == "i" and k != q:
                rest = rest * full(other_sc, factor_value(other_sc), shape).astype(w.dtype)
        x = factor_value(sc)

        def one(a_i, g_i):
            f = lambda x: rules._bind(u.op, 0, (rest * full(sc, x, shape)).astype(w.dtype), a_i)
            _, vjp = jax.vjp(f, x)
            return vjp(g_i.astype(w.dtype))[0]

        return jax.vmap(one)(*lookups(u))

    products: dict = {}  # use -> op(A', θ'), shared by every factor of G of the use

    def side_sum(u, q, w, *, skip=None, plain=False):
        """Per example, the share of ⟨∇_{W_eff} S_i, W'⟩ along factor q's entries (its ref's
        layout), for W' = w ⊙ (the use's factors but the skipped one): the gradient of factor
        q with w = θ' and skip = q; with ``plain`` the factor's own inverse is not applied."""
        sc = u.scale[q]
        if sc.side == "i":
            return indexed_grad(u, q, w)
        w = masked(u, w, examples=False)  # (θ' ⊙ M: the masked weight's share)
        # (In w's precision: a float32 A of a float64 weight would round A's cotangent.)
        a = jnp.moveaxis(kept[u.key], axis[u.key], 0).astype(jnp.result_type(kept[u.key], w))
        g = g_plain(u)
        op = lambda w, a: jax.vmap(lambda a_i: rules._bind(u.op, u.pos, w, a_i))(a)
        if sc.side == "g":  # G ⊙ op(A', w); op(A', θ') is shared by the factors of G
            shared = skip is not None and not plain  # (w is θ' exactly then)
            if not shared:
                product = op(w, scaled(a, u, "a"))
            elif u.key not in products:
                product = products[u.key] = op(w, scaled(a, u, "a"))
            else:
                product = products[u.key]
            cot = scaled(g, u, "g", skip) * product
        else:  # A ⊙ op_Aᵀ(G', w)
            _, vjp_a = jax.vjp(lambda x: op(w, x), a)
            cot = scaled(a, u, "a", skip) * vjp_a(scaled(g, u, "g", skip))[0]
        # The broadcast's transpose is a sum over the axes it does not span.
        ones = [1 + d for d, t in enumerate(sc.target) if t == 1 and cot.shape[1 + d] != 1]
        cot = jnp.sum(cot, axis=tuple(ones), keepdims=True)
        x = factor_value(sc)
        spread = dataclasses.replace(sc, inverse=False).broadcast if plain else sc.broadcast
        _, vjp_b = jax.vjp(spread, x)
        return jax.vmap(lambda ct: vjp_b(ct.astype(x.dtype))[0])(cot)

    def factor_grad(u, q):  # one use's per-example gradient of its factor q
        if u.scale[q].offset:  # W_eff = (θ' - m) ⊙ Π F: -Σ (Π F) ⊙ ∇W along m's entries
            ones = jnp.ones(u.op.in_avals[u.pos].shape, u.op.in_avals[u.pos].dtype)
            return -side_sum(u, q, ones, plain=True)
        return side_sum(u, q, theta_operand(u), skip=q)

    def theta_operand(u):  # θ' (or θ' - m) as the use's operand: the chain after θ'
        if not u.levels:
            return trace.apply_chain(program, u.chain[u.theta_chain :], scale_vals[u.theta_term])
        after = dataclasses.replace(u, pre_chain=u.pre_chain[u.theta_chain :])
        return trace.apply_use_chain(program, after, scale_vals[u.theta_term])

    def selected(x, u, side):  # the slice of A or G a concatenated block meets
        if not u.select or u.select[0] != side:
            return x
        _, ax, lo, hi = u.select
        return jax.lax.slice_in_dim(x, lo, hi, axis=1 + ax)

    # Folded uses of summed weights (reparam.Fold): M folded into A or G, by a_of and g_of.
    fold_vals = reparam.fold_values(program, known, an.fast)

    def a_of(u):  # examples first
        a = selected(scaled(jnp.moveaxis(kept[u.key], axis[u.key], 0), u, "a"), u, "a")
        return reparam.folded(u, "a", a, fold_vals)

    def g_plain(u):  # the cotangent in the lifted equation's layout, examples first
        g = jnp.moveaxis(g_use[u.key], axis[u.key], 0)
        # (B, steps, *inner steps, *out): each scan's steps go where its lift put them,
        # innermost first (a scan's lift inserts its axis into the output of the next).
        step_axes = [lv.step_axis for lv in u.scans]
        for d in reversed(range(len(step_axes))):
            g = jnp.moveaxis(g, 1 + d, 1 + d + step_axes[d])
        return g

    def g_of(u):  # ... with a scaled use's factors of G (at every step: lifted layout)
        g, f = g_plain(u), indexed(u)  # (a lookup's factors, gathered at its rows)
        g = scaled(g, u, "g") if f is None else g * f.astype(g.dtype)
        return reparam.folded(u, "g", selected(g, u, "g"), fold_vals)

    def weighted_use(u, c):  # Σ_i c_i ∇S_i through one use, on the arrays as captured
        if factored(u):  # Σ_i c_i op_Wᵀ(A_i, G_i), then the factors once: no scaled A or G
            raw = rules.weighted_grad(u.op, u.pos, kept[u.key], g_use[u.key], c, axis=axis[u.key])
            return raw * factors_on_operand(u).astype(raw.dtype)
        if len(u.scans) > 1 or u.scale or u.select or reparam.refolded(u):
            return masked(u, rules.weighted_grad(u.op, u.pos, a_of(u), g_of(u), c), examples=False)
        g = g_use[u.key]
        if u.scans and u.scans[0].step_axis:
            g = jnp.moveaxis(g, 0, 1 + u.scans[0].step_axis)  # (B at axis 0 after the move)
            return rules.weighted_grad(u.op, u.pos, jnp.moveaxis(kept[u.key], 1, 0), g, c)
        return rules.weighted_grad(u.op, u.pos, kept[u.key], g, c, axis=axis[u.key])

    def leaf_grads(j, use):  # (B, *leaf.shape) through one use
        g = masked(use, rules.per_example_grads(use.op, use.pos, a_of(use), g_of(use)))
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
            return rules.masked_norm_sq(u.op, u.pos, a_of(u), g_of(u), mask_of(u))
        if rule.keep and (weighted or rule.how == "grads"):
            fn = lambda op, a, g: masked(u, rules.per_example_grads(op, u.pos, a, g))
            if rule.per_step:  # one slice of the leaf per step: (steps, B, *slice)
                formed[id(group)] = (per_step(fn, u), 1, u)
            else:
                formed[id(group)] = (fn(u.op, a_of(u), g_of(u)), 0, u)
            grads, ex, _ = formed[id(group)]
            sq = jnp.square(grads.astype(rules.acc_dtype(u.op)))
            return jnp.sum(sq, axis=tuple(d for d in range(sq.ndim) if d != ex))
        if rule.per_step:  # one slice of the leaf per step: the steps' squared norms add
            fn = lambda op, a, g: rules.norm_sq(rule, op, u.pos, a, g)
            return jnp.sum(per_step(fn, u), axis=0)
        return rules.norm_sq(rule, u.op, u.pos, a_of(u), g_of(u))

    # At least float32, and as precise as the loss and every parameter (float64 parameters of
    # a float32 loss have float64 gradients, as on the vmap path).
    norm_dtype = jnp.result_type(sums.dtype, jnp.float32, *(jnp.result_type(x) for x in leaves))
    norm_sq = jnp.zeros((size,), norm_dtype)
    leaf_cols = [jnp.zeros((size,), norm_dtype) for _ in leaves]  # per leaf, for leaf_sq

    def group_block(j, group):  # how a group of uses that may overlap is read (see Parts)
        if group.form == "use":
            u = group.uses[0]
            if plan_lib.masked(u):  # M ⊙ J_i: the formed gradients' inner products
                grads = masked(u, rules.per_example_grads(u.op, u.pos, a_of(u), g_of(u)))
                return ("grads", grads)
            return ("use", u.kind, u.op, u.pos, a_of(u), g_of(u))
        ndim = len(like[j].shape)  # tied uses: the cross terms between them are needed
        if group.form == "outer":
            return (
                "outer",
                [
                    rules.outer_factors(u.op, u.pos, perm, ndim, a_of(u), g_of(u))
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
                            out[sc.ref] = out[sc.ref] + factor_grad(u, q)
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
                out[j] = _Normaliser(program, known, j, leaves[j], own, factor_grad, side_sum)
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
        if len(u.scans) != 1 or u.split >= 0 or u.scale or u.select or reparam.refolded(u):
            return rules.dot(u.kind, u.op, u.pos, a_of(u), g_of(u), v_op)
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
                total = total + _row_dots(g, d).astype(norm_dtype)
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
                    v_op = v_op * factors_on_operand(u).astype(v_op.dtype)
                    total = total + rules.dot(u.kind, u.op, u.pos, kept[u.key], g_use[u.key], v_op)
                else:
                    total = total + dot_use(u, v_op)
        for j, nz in normalisers().items():
            total = total + nz.dots(jnp.asarray(v[j], like[j].dtype)).astype(norm_dtype)
        for j, g in g_exact.items():
            total = total + _row_dots(g, v[j]).astype(norm_dtype)
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


# --- Capture: one evaluator over frames -----------------------------------------------------
#
# The fast pass evaluates the program once per example (under ``vmap`` and ``vjp``), adding
# each captured use's perturbation to its output and keeping its other operand. Uses sit in
# frames (the top level, a scan body, a cond branch, a custom_jvp rule, nested in any order):
# :func:`_capture` evaluates
# one frame, perturbs and keeps the uses that sit directly in it, and hands an equation with
# uses inside it to the handler :data:`FRAMES` registers for its primitive, which binds it
# with :func:`_capture` on its bodies. Adding a frame kind (the walker's
# :func:`jaxgrad.fast.trace.bodies` gives its bodies) is one handler here.
#
# Paths (:attr:`jaxgrad.fast.trace.Use.key`) address a use from the top level: an equation
# index per frame, and a branch index after a cond's. A handler sees the paths relative to
# its equation, and returns the kept operands by the same relative paths.


# Equations through which an operand's cotangent is the output's: a sum (and the minuend).
_SAME_COTANGENT = {"add": (0, 1), "add_any": (0, 1), "sub": (0,)}


def cotangent_sites(body: Program, direct: dict) -> dict:
    """Uses of one frame whose output cotangents ``G`` are one array: use equation -> the
    equation whose output carries it (its *site*).

    ``x_t W_x + h_{t-1} W_h + b``: each use's output is read only by a sum (of operands
    of its own shape, no broadcast), so its cotangent is the sum's. Following each use's
    output through such sums to the first value read otherwise, uses that reach the same
    value have the same ``G``: they get one perturbation there, so the backward pass writes
    one cotangent (one stack over the steps in a scan), not one per use. Only uses whose
    output ``vmap`` batches (so is the sum: the tap applies) and that are not in real form
    are shared; a use alone at its site keeps its own perturbation.

    Args:
      body: the frame's program.
      direct: equation index -> :class:`~jaxgrad.fast.trace.Use` of the uses in it.

    Returns:
      equation index -> site equation index, for the uses that share a site only.
    """
    readers: dict = {}  # Var -> [(equation, operand)]
    for k, e in enumerate(body.eqns):
        for q, r in enumerate(e.ins):
            if isinstance(r, Var):
                readers.setdefault(r, []).append((k, q))
    returned = {r for r in body.outs if isinstance(r, Var)}

    def site(k):
        v = body.eqns[k].outs[0]
        while v not in returned and len(readers.get(v, ())) == 1:
            j, q = readers[v][0]
            e = body.eqns[j]
            same = (e.in_avals[q].shape, e.in_avals[q].dtype) == (
                e.out_avals[0].shape, e.out_avals[0].dtype,
            )  # fmt: skip
            if q not in _SAME_COTANGENT.get(e.primitive.name, ()) or not same:
                break
            k, v = j, e.outs[0]
        return k

    found = {k: site(k) for k, u in direct.items() if u.batched and u.split < 0}
    count: dict = {}
    for s in found.values():
        count[s] = count.get(s, 0) + 1
    return {k: s for k, s in found.items() if count[s] > 1}


def _first_at_site(sites: dict) -> dict:
    """Site equation -> the first use reaching it (the one perturbed there), for the
    ``sites`` of :func:`cotangent_sites`."""
    first: dict = {}
    for k in sorted(sites):
        first.setdefault(sites[k], k)
    return first


def shared_cotangents(program: Program, uses: dict) -> dict:
    """Capture path -> the path of the use whose cotangent it shares (see
    :func:`cotangent_sites`; the first use of the site's, which alone is perturbed)."""
    frames: dict = {}  # the frame's path -> {equation index: Use}
    for p, u in uses.items():
        frames.setdefault(p[:-1], {})[p[-1]] = u
    out = {}
    for at, direct in frames.items():
        u = next(iter(direct.values()))
        body = u.levels[-1].body if u.levels else program
        sites = cotangent_sites(body, direct)
        first = _first_at_site(sites)
        for k, s in sites.items():
            if first[s] != k:
                out[(*at, k)] = (*at, first[s])
    return out


def _capture(body: Program, uses: dict, du: dict, args, *, tapped: bool = True):
    """Evaluates a frame ``body`` on ``args`` with the uses at paths ``uses`` captured.

    Args:
      body: the frame's program.
      uses: path relative to this frame -> :class:`~jaxgrad.fast.trace.Use`.
      du: path -> the use's perturbation (one frame's worth: a scan's handler slices off
        the steps).
      args: the frame's inputs.
      tapped: whether a perturbation may be the tap (see :func:`_perturb`).

    Returns:
      ``(outs, kept, same)``: the frame's outputs, the kept operands by path, and for a use
      that reads the same operand as an earlier one (``x W_q``, ``x W_k``, ``x W_v``) its
      path -> the earlier's, whose kept operand it shares (not kept twice: in a scan every
      kept operand is a stacked output written at every step).
    """
    direct = {p[0]: u for p, u in uses.items() if len(p) == 1}
    # Uses whose outputs are summed share one perturbation, placed on the sum (see
    # :func:`cotangent_sites`): site equation -> the first of them, whose ``du`` it takes.
    sites = cotangent_sites(body, direct)
    at_site = _first_at_site(sites)
    inner: dict = {}  # equation of a frame -> {path in it: Use}
    for p, u in uses.items():
        if len(p) > 1:
            inner.setdefault(p[0], {})[p[1:]] = u
    first: dict = {}
    same: dict = {}
    for k, u in direct.items():
        ref = body.eqns[k].ins[1 - u.pos]
        if isinstance(ref, Var):  # a real form keeps its own (re, im) stack
            k0 = first.setdefault((ref, u.split >= 0), k)
            if k0 != k:
                same[(k,)] = (k0,)
    kept: dict = {}

    def hook(k, invals, outvals):
        u = direct.get(k)
        if u is not None:
            if (k,) not in same:
                kept[(k,)] = _operand(u, invals[1 - u.pos])
            if k not in sites:
                outvals = [_perturb(u, outvals[0], du[(k,)], tapped=tapped)]
        if k in at_site:
            first = at_site[k]
            outvals = [_perturb(direct[first], outvals[0], du[(first,)], tapped=tapped)]
        return outvals

    def override(k, invals):
        sub = inner.get(k)
        if sub is None:
            return None
        e = body.eqns[k]
        handler = FRAMES[e.primitive.name]
        du_k = {p: du[(k, *p)] for p in sub if (k, *p) in du}  # (shared: not every use has one)
        outs, kept_k, same_k = handler(e, sub, du_k, invals, tapped)
        kept.update(((k, *p), a) for p, a in kept_k.items())
        same.update(((k, *p), (k, *q)) for p, q in same_k.items())
        return outs

    outs = evaluate(body, args, hook=hook, override=override)
    return outs, kept, same


def _capture_scan(e: Eqn, uses: dict, du: dict, invals, tapped: bool):
    """A ``lax.scan`` with uses in its body: the body captured at every step.

    The perturbations are scanned over (``(steps, ...)``) and the kept operands are stacked
    outputs, so a use is captured step-major: under the batch's ``vmap`` ``(steps, B, ...)``,
    the layout the scan writes, with no transpose to put the examples first.
    """
    (body,) = trace.bodies(e)
    p = e.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    shared: dict = {}

    def step(carry, x):
        xs_t, du_t = x
        outs, kept_t, same = _capture(body, uses, du_t, [*consts, *carry, *xs_t], tapped=tapped)
        shared.update(same)  # stacked once, shared after the loop
        return outs[:ncar], (outs[ncar:], kept_t)

    carry, (ys, kept) = jax.lax.scan(
        step, list(init), (list(xs), du), length=p["length"], reverse=p["reverse"],
        unroll=p["unroll"],
    )  # fmt: skip
    return [*carry, *ys], _share(kept, shared), {}


def _share(kept: dict, same: dict) -> dict:
    """The kept operands by path, with the shared ones (see :func:`_capture`) filled in."""
    return {**kept, **{p: kept[q] for p, q in same.items()}}


def _capture_cond(e: Eqn, uses: dict, du: dict, invals, tapped: bool):
    """A ``cond``/``switch`` with uses in its branches: the branch taken captured.

    Every branch returns every branch's kept operands (zeros in the others: an example that
    takes another branch has a zero cotangent there). A branch's perturbations are added,
    never the tap: which outputs of a branch ``vmap`` batches is not read here.
    """
    del tapped
    bodies = trace.bodies(e)
    per_branch: dict = {}  # branch -> {path in it: Use}
    for p, u in uses.items():
        per_branch.setdefault(p[0], {})[p[1:]] = u
    shared: dict = {}

    def make(b):
        def branch(ops, du_all):
            sub = per_branch.get(b, {})
            outs, kept_b, same = _capture(
                bodies[b],
                sub,
                {p: du_all[(b, *p)] for p in sub if (b, *p) in du_all},
                ops,
                tapped=False,
            )
            shared.update(((b, *p), (b, *q)) for p, q in same.items())
            return outs, {(b, *p): a for p, a in kept_b.items()}

        return branch

    ops = list(invals[1:])
    shapes = {}
    for b in per_branch:
        shapes.update(jax.eval_shape(make(b), ops, du)[1])

    def full(b):
        def branch(ops, du_all):
            outs, kept_b = make(b)(ops, du_all)
            zeros = {p: jnp.zeros(a.shape, a.dtype) for p, a in shapes.items()}
            return list(outs), {**zeros, **kept_b}

        return branch

    outs, kept = jax.lax.switch(invals[0], [full(b) for b in range(len(bodies))], ops, du)
    return outs, kept, shared


def _capture_custom_jvp(e: Eqn, uses: dict, du: dict, invals, tapped: bool):
    """A ``custom_jvp`` call with uses in its rule's tangent map: the rule, linearised
    (:func:`jaxgrad.fast.trace.linearised`), evaluated on the stopped primals and the tangents
    ``x − sg(x)`` (zero, with the identity as derivative).

    Each output is the rule's primal output, with the tangent's gradient attached
    (:func:`_with_tangent`): the gradient of every operand is the transpose of the user's
    tangent map, as in ``jax.grad``. The uses' perturbations are added, never the tap (which
    tangent ``vmap`` batches is not read).
    """
    del tapped
    (body,) = trace.bodies(e)
    stop = jax.lax.stop_gradient
    tangents = [invals[q] - stop(invals[q]) for q in trace.tangent_operands(e)]
    outs, kept, same = _capture(body, uses, du, [*map(stop, invals), *tangents], tapped=False)
    primal, touts = outs[: len(e.outs)], iter(outs[len(e.outs) :])
    inexact = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    return [_with_tangent(stop(y), next(touts)) if inexact(y) else y for y in primal], kept, same


@jax.custom_vjp
def _with_tangent(y, t):
    """``y``, with ``t``'s gradient set to ``y``'s cotangent.

    A select, not ``y + t``: the value is ``y`` even where the rule's tangent map is not
    finite at a zero tangent (``0 · ∞``), and the result is batched wherever ``t`` is (a
    use's perturbation inside the rule makes it so) although ``y`` may be the same for
    every example: its cotangent is then each example's own, not the batch's.
    """
    return jnp.where(True, y, t)


_with_tangent.defvjp(lambda y, t: (_with_tangent(y, t), None), lambda _, ct: (None, ct))


# The frame primitives the capture evaluator reads into (see :func:`_capture`).
FRAMES = {"scan": _capture_scan, "cond": _capture_cond, "custom_jvp_call": _capture_custom_jvp}


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
