"""Each leaf's :class:`~jaxgrad.fast.plan.Route` executed on the captured ``A`` and ``G``.

:class:`FastParts` gives what :class:`jaxgrad.fast.passes.Parts` holds, from one pass's
:class:`~jaxgrad.fast.operands.Operands`: every example's squared gradient norm (in total
and per leaf), the weighted sum ``Σ_i c_i ∇S_i``, the dots ``⟨∇S_i, v⟩`` and the blocks
:func:`jaxgrad.fast.passes.gram` reads. A fast leaf's uses come in groups (see
:class:`jaxgrad.fast.plan.Group`) with no cross terms between groups; each group is read by
its route's rule (:mod:`jaxgrad.fast.rules`; the arithmetic in :mod:`jaxgrad.fast.norms` and
:mod:`jaxgrad.fast.linear`). A scaled leaf adds its normalisers' correction
(:class:`~jaxgrad.fast.operands.Normaliser`), a reparametrised leaf the transformation's VJP
(:class:`Reparametrised`), an exact leaf its materialised per-example gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.fast import analysis, linear, norms, rules, trace
from jaxgrad.fast import plan as plan_lib
from jaxgrad.fast.capture import Captured
from jaxgrad.fast.operands import Normaliser, Operands, factored, row_dots, transformed
from jaxgrad.fast.program import Var, shape_struct


def leaf_weights(c, j):
    """Leaf ``j``'s column of the weights: ``c`` itself when it is one weight per example."""
    return c if c.ndim == 1 else c[:, j]


def _row_sq(g, dtype):
    """``(B,)``: the squared norm of every row of ``g``."""
    return jnp.sum(jnp.square(g.reshape(g.shape[0], -1).astype(dtype)), axis=1)


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


def _weigh(c, grads, ex):
    """``Σ_i c_i J_i`` over the example axis ``ex`` of formed gradients."""
    if ex == 1:  # (steps, B, ...): no transpose
        w = c.astype(grads.dtype).reshape((1, -1) + (1,) * (grads.ndim - 2))
        return jnp.sum(grads * w, axis=1)
    return jnp.tensordot(c.astype(grads.dtype), grads, 1)


class FastParts:
    """The routes of every leaf, executed on one pass's captured arrays.

    Args:
      an: the analysis of the loss.
      route: the routes of :func:`jaxgrad.fast.plan.routes`, one per leaf.
      leaves: the parameter leaves.
      cap: the captured arrays (:func:`jaxgrad.fast.capture.capture`).
      weighted: the caller computes a weighted sum, so a route that keeps per-example
        gradients (:attr:`jaxgrad.fast.rules.Form.keep`) forms them for the norms as well.
    """

    def __init__(self, an: analysis.Analysis, route, leaves, cap: Captured, *, weighted: bool):
        self.an, self.route, self.leaves, self.cap = an, route, leaves, cap
        self.program, self.tf, self.wants_weighted = an.program, an.transform, weighted
        self.size = cap.sums.shape[0]
        # Leaves and effective weights (``n + v``) as (shape, dtype) structs.
        self.like = [shape_struct(x) for x in leaves]
        self.like += [
            jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (self.tf.avals if self.tf else ())
        ]
        self.ops = Operands(an, leaves, cap)
        # At least float32, and as precise as the loss and every parameter (float64
        # parameters of a float32 loss have float64 gradients, as on the vmap path).
        self.norm_dtype = jnp.result_type(
            cap.sums.dtype, jnp.float32, *(jnp.result_type(x) for x in leaves)
        )
        # Per-example gradients formed for the norms and kept, one entry per group of uses
        # (see plan.Group): the weighted sum then reads them (Σ_i c_i J_i, B × |leaf| work)
        # instead of contracting A and G again. A one-use group's where its route forms them
        # anyway (``rule.keep``), in its use's operand layout; a route taken step by step
        # (``rule.per_step``) reads the step-major arrays as captured, ``(steps, B, ...)``,
        # on the step equation (no transpose to put examples first), so they keep that
        # example axis. Tied uses' (form "grads") are summed over the group, in the leaf's
        # layout. id(group) -> (gradients, their example axis, use of their layout | None).
        self.formed: dict = {}

    @functools.cached_property
    def reparam(self) -> Reparametrised | None:
        """The reparametrised leaves' transformation, if there are any."""
        return Reparametrised(self) if self.tf is not None and self.tf.leaves else None

    @functools.cached_property
    def normalisers(self) -> dict:
        """Scaled leaf θ with normalisers -> its :class:`Normaliser`."""
        out = {}
        for j, us in self.an.fast.items():
            own: dict = {}  # ref -> [(use, factor index)]
            for u in us:
                for q, sc in enumerate(u.scale):
                    if sc.own:
                        own.setdefault(sc.ref, []).append((u, q))
            if own:
                out[j] = Normaliser(self.ops, j, self.leaves[j], own)
        return out

    def fast_groups(self):
        """(leaf, group) of every fast leaf, in order."""
        n = self.an.num_params
        return [(r.leaf, g) for r in self.route[:n] if r.way == "fast" for g in r.groups]

    # --- norms ------------------------------------------------------------------------------

    def norms(self):
        """``(B,)`` ``‖∇S_i‖²`` and its ``(B,)`` share per leaf, not yet masked or clamped."""
        norm_sq = jnp.zeros((self.size,), self.norm_dtype)
        leaf_cols = [jnp.zeros((self.size,), self.norm_dtype) for _ in self.leaves]
        for j, sq in self._norm_terms():
            norm_sq, leaf_cols[j] = norm_sq + sq, leaf_cols[j] + sq
        return norm_sq, leaf_cols

    def _norm_terms(self):
        """(leaf, ``(B,)`` squared norm) of every block, in the order :meth:`blocks` lists
        them. Uses reading disjoint blocks of a leaf (Q, K, V parts of one weight) have no
        cross terms: their squared norms add."""
        reparam = self.reparam  # (its transformation's VJP is traced before the norms)
        for j, group in self.fast_groups():
            yield j, self.group_norm(j, group).astype(self.norm_dtype)
        for j, nz in self.normalisers.items():
            yield j, nz.norm_sq().astype(self.norm_dtype)
        for j, g in (reparam.grads if reparam is not None else {}).items():
            yield j, _row_sq(g, self.norm_dtype)
        for j, g in self.cap.g_exact.items():
            yield j, _row_sq(g, self.norm_dtype)

    def group_norm(self, j, group):
        """``‖Σ_u ∇S_i through u‖²``: the diagonal of the group's block."""
        if group.form == "use":
            return self.norm_use(group)
        block = self.group_block(j, group)
        if block[0] == "outer":
            return norms.cross_norm_sq(block[1])
        return _row_sq(block[1], self.norm_dtype)

    def norm_use(self, group):
        """``‖∇S_i‖²`` through a group's one use, by its route."""
        ops, (u,), rule = self.ops, group.uses, group.rule
        if rule.how == "dense_masked":
            return norms.masked_norm_sq(u.op, u.pos, ops.a_of(u), ops.g_of(u), ops.mask_of(u))
        if rule.keep and (self.wants_weighted or rule.how == "grads"):
            fn = lambda op, a, g: ops.masked(u, linear.per_example_grads(op, u.pos, a, g))
            if rule.per_step:  # one slice of the leaf per step: (steps, B, *slice)
                self.formed[id(group)] = (self.per_step(fn, u), 1, u)
            else:
                self.formed[id(group)] = (fn(u.op, ops.a_of(u), ops.g_of(u)), 0, u)
            grads, ex, _ = self.formed[id(group)]
            sq = jnp.square(grads.astype(linear.acc_dtype(u.op)))
            return jnp.sum(sq, axis=tuple(d for d in range(sq.ndim) if d != ex))
        if rule.per_step:  # one slice of the leaf per step: the steps' squared norms add
            fn = lambda op, a, g: rules.norm_sq(rule, op, u.pos, a, g)
            return jnp.sum(self.per_step(fn, u), axis=0)
        return rules.norm_sq(rule, u.op, u.pos, ops.a_of(u), ops.g_of(u))

    def per_step(self, fn, u):
        """``fn(step equation, A, G)`` at every step, stacked: ``(steps, B, ...)``."""
        return jax.vmap(lambda a, g: fn(u.base, a, g))(self.cap.kept[u.key], self.cap.g_use[u.key])

    def use_grads(self, u):
        """``(B, *operand)``: the per-example gradients through one use, in its operand's
        layout (for a kernel scanned over, :func:`jaxgrad.fast.trace.stepwise`, each step's,
        stacked like the slices: ``(B, steps, *slice)``)."""
        ops = self.ops
        if trace.stepwise(u):
            fn = lambda op, a, g: linear.per_example_grads(op, u.pos, a, g)
            return jnp.moveaxis(self.per_step(fn, u), 0, 1)
        return ops.masked(u, linear.per_example_grads(u.op, u.pos, ops.a_of(u), ops.g_of(u)))

    def leaf_grads(self, j, use):
        """``(B, *leaf.shape)`` through one use."""
        g = self.use_grads(use)
        return jax.vmap(lambda x: _chain_transpose(self.program, use, self.like[j], x))(g)

    # --- Gram blocks ------------------------------------------------------------------------

    def group_block(self, j, group):
        """How a group of uses that may overlap is read (see ``Parts.blocks``)."""
        ops = self.ops
        if group.form == "use":
            u = group.uses[0]
            # M ⊙ J_i, or a kernel scanned over (no equation of every step): the formed
            # gradients' inner products (a convolution's own pairwise rule forms them too)
            if plan_lib.masked(u) or trace.stepwise(u):
                return ("grads", self.use_grads(u))
            return ("use", u.kind, u.op, u.pos, ops.a_of(u), ops.g_of(u))
        ndim = len(self.like[j].shape)  # tied uses: the cross terms between them are needed
        if group.form == "outer":
            return (
                "outer",
                [
                    norms.outer_factors(u.op, u.pos, perm, ndim, ops.a_of(u), ops.g_of(u))
                    for u, perm in zip(group.uses, group.perms, strict=True)
                ],
            )
        return ("grads", self.group_grads(j, group))

    def group_grads(self, j, group):
        """Tied uses' per-example gradient ``(B, *leaf)``, formed once."""
        if id(group) not in self.formed:
            self.formed[id(group)] = (sum(self.leaf_grads(j, u) for u in group.uses), 0, None)
        return self.formed[id(group)][0]

    def blocks(self):
        """The groups :meth:`norms` adds, in the same order, for ``gram``."""
        out = [self.group_block(j, group) for j, group in self.fast_groups()]
        out += [("normaliser", nz.factors()) for nz in self.normalisers.values()]
        if self.reparam is not None:
            out += [("grads", g) for g in self.reparam.grads.values()]
        return out + [("grads", g) for g in self.cap.g_exact.values()]

    # --- the weighted sum -------------------------------------------------------------------

    def weighted(self, c) -> list:
        """The leaves of ``Σ_i c_i ∇S_i`` (``c`` ``(B,)``, or ``(B, L)`` a column per leaf)."""
        an, out = self.an, []
        through = self.reparam.weighted(c) if self.reparam is not None else None
        for j, leaf in enumerate(self.leaves):
            if j in an.fast or j in an.reparam:
                total = self.weighted_leaf(j, leaf_weights(c, j))
                if j in an.reparam:
                    total = total + through[j].astype(total.dtype)
                if j in self.normalisers:
                    total = total + self.normalisers[j].weighted(leaf_weights(c, j))
                out.append(total)
            elif j in self.cap.g_exact:
                g = self.cap.g_exact[j]
                out.append(jnp.tensordot(leaf_weights(c, j).astype(g.dtype), g, 1))
            else:
                out.append(jnp.zeros(np.shape(leaf), jnp.result_type(leaf)))
        return out

    def weighted_leaf(self, j, c):
        """``Σ_i c_i ∇S_i`` through leaf ``j``'s own uses (``c``: ``(B,)``)."""
        like = self.like[j]
        total = jnp.zeros(like.shape, like.dtype)
        for group in self.route[j].groups:  # (the groups partition the leaf's uses)
            if id(group) in self.formed:  # formed for the norms: read, not contracted again
                grads, ex, u = self.formed[id(group)]
                w = _weigh(c, grads, ex)
                w = (
                    w.astype(total.dtype)
                    if u is None
                    else _chain_transpose(self.program, u, like, w)
                )
                total = total + w
                continue
            for u in group.uses:
                total = total + _chain_transpose(self.program, u, like, self.weighted_use(u, c))
        return total

    def weighted_use(self, u, c):
        """``Σ_i c_i ∇S_i`` through one use, on the arrays as captured."""
        ops, kept, g_use, axis = self.ops, self.cap.kept, self.cap.g_use, self.cap.axis
        if factored(u):  # Σ_i c_i op_Wᵀ(A_i, G_i), then the factors once: no scaled A or G
            raw = linear.weighted_grad(u.op, u.pos, kept[u.key], g_use[u.key], c, axis=axis[u.key])
            return raw * ops.factors_on_operand(u).astype(raw.dtype)
        if len(u.scans) > 1 or transformed(u):
            grad = linear.weighted_grad(u.op, u.pos, ops.a_of(u), ops.g_of(u), c)
            return ops.masked(u, grad, examples=False)
        if trace.stepwise(u):  # a kernel per step: each step's weighted sum, (steps, *slice)
            return self.per_step(lambda op, a, g: linear.weighted_grad(op, u.pos, a, g, c), u)
        if trace.folds_steps(u):  # the step's convolution over (steps × B) images, c per step
            flat = lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
            steps = kept[u.key].shape[0]
            w = jnp.tile(c, steps)
            return linear.weighted_grad(u.base, u.pos, flat(kept[u.key]), flat(g_use[u.key]), w)
        g = g_use[u.key]
        if u.scans and u.scans[0].step_axis:
            g = jnp.moveaxis(g, 0, 1 + u.scans[0].step_axis)  # (B at axis 0 after the move)
            return linear.weighted_grad(u.op, u.pos, jnp.moveaxis(kept[u.key], 1, 0), g, c)
        return linear.weighted_grad(u.op, u.pos, kept[u.key], g, c, axis=axis[u.key])

    # --- the dots ---------------------------------------------------------------------------

    def dots(self, v):
        """``(B,)`` ``⟨∇S_i, v⟩`` = Σ_uses ``⟨G_i, op(A_i, chain(v))⟩`` + the other leaves'
        terms, for the leaves ``v`` of a params-shaped pytree; not yet masked."""
        total = jnp.zeros((self.size,), self.norm_dtype)
        v = list(v) + [None] * len(self.tf.outputs if self.tf is not None else ())
        if self.reparam is not None:  # the formed weights' and factors' direction: J_f v
            total = self.reparam.dots(v, total)
        for j, uses in self.an.uses.items():
            if v[j] is None:
                continue  # (a scaled weight: its uses are its leaf's)
            vj = jnp.asarray(v[j], self.like[j].dtype)
            zero = jnp.zeros_like(vj)
            for u in uses:
                total = total + self.dot_use(u, zero, vj)
        for j, nz in self.normalisers.items():
            total = total + nz.dots(jnp.asarray(v[j], self.like[j].dtype)).astype(self.norm_dtype)
        for j, g in self.cap.g_exact.items():
            total = total + row_dots(g, v[j]).astype(self.norm_dtype)
        return total

    def dot_use(self, u, zero, vj):
        """``(B,)`` ``⟨∇S_i through one use, v_j⟩`` (``vj`` in the leaf's layout)."""
        ops, kept, g_use = self.ops, self.cap.kept, self.cap.g_use
        # The alias chain is linear: its jvp at 0 is the chain applied to v, the transpose of
        # what maps a use's gradient back to the leaf.
        chain = lambda p: trace.apply_use_chain(self.program, u, p)
        v_op = jax.jvp(chain, (zero,), (vj,))[1]
        if factored(u):  # ⟨(Π F) ⊙ ∇_{W_eff} S_i, v⟩ = ⟨∇_{W_eff} S_i, (Π F) ⊙ v⟩
            v_op = v_op * ops.factors_on_operand(u).astype(v_op.dtype)
            return linear.dot(u.kind, u.op, u.pos, kept[u.key], g_use[u.key], v_op)
        if len(u.scans) != 1 or u.split >= 0 or transformed(u):
            return linear.dot(u.kind, u.op, u.pos, ops.a_of(u), ops.g_of(u), v_op)
        # In one scan: Σ_t ⟨G_{t,i}, op(A_{t,i}, v_t)⟩ per step on the step equation, on the
        # step-major arrays as captured (no transpose to put the examples first).
        v_axis = 0 if u.scans[0].stacked else None  # a leaf scanned over: its slice per step
        per = jax.vmap(
            lambda a, g, w: linear.dot(u.kind, u.base, u.pos, a, g, w), in_axes=(0, 0, v_axis)
        )(kept[u.key], g_use[u.key], v_op)
        return jnp.sum(per, axis=0)


class Reparametrised:
    """Reparametrised leaves θ (see :class:`jaxgrad.fast.reparam.Transform`).

    ``W_eff = f(θ)`` is the same for every example, so ``∇_θ S_i = J_fᵀ ∇_{W_eff} S_i``.
    Norms (and Gram blocks) apply the VJP to each example's materialised ``∇_{W_eff} S_i``
    (``B × |W_eff|``, no per-example forward pass); the weighted sum and the dots stay
    factored by linearity: ``Σ_i c_i J_fᵀ ∇_i = J_fᵀ (Σ_i c_i ∇_i)`` and
    ``⟨J_fᵀ ∇_i, v⟩ = ⟨∇_i, J_f v⟩`` — where the VJP is linear (:attr:`linear`). A scaled
    weight (``θ' ⊙ Π F_k``) forms no ``∇_{W_eff} S_i``: θ is a fast leaf, and the factors
    made of leaves get their per-example gradients from ``A``, ``G`` and ``θ'``
    (:attr:`factor_grads`) for the same VJP.
    """

    def __init__(self, fp: FastParts):
        an, self.fp, self.tf = fp.an, fp, fp.tf
        n, program = an.num_params, an.program
        self.fixed = {program.invars[j]: fp.leaves[j] for j in range(n) if j not in an.exact}
        self.theta0 = [fp.leaves[j] for j in self.tf.leaves]
        _, self.f_vjp = jax.vjp(self.transform, *self.theta0)
        self.eff = [n + v for v in self.tf.formed]
        self._eff_grads: dict = {}

    def transform(self, *theta):
        """``f(θ)``: the formed weights and factors, from the reparametrised leaves."""
        values = dict(self.fixed)
        values.update(
            (self.fp.program.invars[j], t) for j, t in zip(self.tf.leaves, theta, strict=True)
        )
        return self.tf.apply(self.fp.program, values)

    def eff_grads(self, j):
        """``(B, *W_eff)``: every use's per-example gradient, summed (formed once)."""
        if j not in self._eff_grads:
            like = self.fp.like[j]
            total = jnp.zeros((self.fp.size, *like.shape), like.dtype)
            for u in self.fp.an.uses[j]:
                total = total + self.fp.leaf_grads(j, u).astype(like.dtype)
            self._eff_grads[j] = total
        return self._eff_grads[j]

    @functools.cached_property
    def factor_grads(self) -> list:
        """``(B, *F)`` per factor of ``tf.factors``: Σ over the uses it scales."""
        out = dict.fromkeys(self.tf.factors, 0)
        for us in self.fp.an.fast.values():
            for u in us:
                for q, sc in enumerate(u.scale):
                    if isinstance(sc.ref, Var) and sc.ref in out:
                        out[sc.ref] = out[sc.ref] + self.fp.ops.factor_grad(u, q)
        return [out[ref] for ref in self.tf.factors]

    @functools.cached_property
    def through(self) -> list:
        """``(B, *leaf)`` per reparametrised leaf: the VJP per example (no direct uses)."""
        return jax.vmap(self.f_vjp)([self.eff_grads(j) for j in self.eff] + self.factor_grads)

    @functools.cached_property
    def grads(self) -> dict:
        """Leaf -> ``(B, *leaf)``: the VJP per example, plus direct uses."""
        out = {}
        for j, g in zip(self.tf.leaves, self.through, strict=True):
            for u in self.fp.an.uses[j]:
                g = g + self.fp.leaf_grads(j, u).astype(g.dtype)
            out[j] = g
        return out

    def eff_weighted(self, c):
        """``Σ_i c_i ∇S_i`` per formed weight and factor, read off the norms' per-example
        gradients (formed for them anyway: no second contraction of A and G)."""
        grads = [self.eff_grads(j) for j in self.eff] + self.factor_grads
        return [jnp.tensordot(c.astype(g.dtype), g, 1) for g in grads]

    @functools.cached_property
    def linear(self) -> bool:
        """Whether ``f``'s VJP is linear in the cotangent, as JAX's own VJPs are (the
        transpose of the linearisation). A ``custom_vjp`` call's is the user's ``bwd`` rule,
        which need not be (a gradient clip), and a rounding's rounds the cotangent: such a
        program (:func:`jaxgrad.fast.trace.linear_backward`) applies the VJP per example."""
        return trace.linear_backward(self.fp.program)

    def weighted(self, c) -> dict:
        """Reparametrised leaf -> ``Σ_i c_i J_fᵀ ∇_{W_eff} S_i``.

        By linearity ``J_fᵀ`` is applied once, to the weighted sum, never per example; a VJP
        that need not be linear (:attr:`linear`) is applied per example (:attr:`through`, the
        norms' own) and its results weighted.
        """
        if not self.linear:
            return {
                j: jnp.tensordot(leaf_weights(c, j).astype(g.dtype), g, 1)
                for j, g in zip(self.tf.leaves, self.through, strict=True)
            }
        if c.ndim == 1:  # one weight per example: one VJP for every leaf
            return dict(zip(self.tf.leaves, self.f_vjp(self.eff_weighted(c)), strict=True))
        # one weight per example and leaf: a VJP per leaf, with its own column
        return {j: self.f_vjp(self.eff_weighted(c[:, j]))[q] for q, j in enumerate(self.tf.leaves)}

    def dots(self, v: list, total):
        """Sets the formed weights' entries of ``v`` (leaves, then formed weights) to their
        direction ``J_f v``, and adds the factors' dots ``⟨∇_F S_i, J_f v⟩`` to ``total``.

        ``J_f v`` is forward mode: a program with a ``custom_vjp`` call (not :attr:`linear`)
        has the VJP applied per example instead and dotted with ``v``, the formed weights'
        entries of ``v`` left None (their uses are in it)."""
        like = self.fp.like
        if not self.linear:
            for j, g in zip(self.tf.leaves, self.through, strict=True):
                total = total + row_dots(g, v[j]).astype(self.fp.norm_dtype)
            return total
        theta_v = [jnp.asarray(v[j], like[j].dtype) for j in self.tf.leaves]
        dirs = list(jax.jvp(self.transform, self.theta0, theta_v)[1])
        for k, d in zip(self.eff, dirs, strict=False):
            v[k] = d
        for g, d in zip(self.factor_grads, dirs[len(self.eff) :], strict=True):
            total = total + row_dots(g, d).astype(self.fp.norm_dtype)
        return total
