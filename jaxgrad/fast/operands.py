"""A use's captured ``A`` and ``G`` as its route reads them, and the algebra of scaled weights.

:class:`Operands` holds one pass's captured arrays (:class:`jaxgrad.fast.capture.Captured`)
and reads them for the rules: examples first, each scan's steps where the use's lift put
them (:func:`jaxgrad.fast.trace.lift_over_steps`), the slice a concatenated block meets.

A *scaled* effective weight ``W_eff = (θ' - m) ⊙ Π_k F_k`` (:class:`jaxgrad.fast.scaled.Scale`)
keeps θ on its uses' own routes: each factor ``F_k`` sits on one side of the use and is
folded in where it meets the use's arrays — side ``"a"`` into ``A``, ``"g"`` into ``G``,
``"w"`` a full mask ``M`` on the operand (``M ⊙ J_i``), ``"i"`` the rows a lookup reads
(gathered at its indices). A factor made of leaves gets its own per-example gradient from
``A``, ``G`` and ``θ'`` (:meth:`Operands.factor_grad`), one product per use and no
``B × |W|`` array; a factor made of θ itself (a normaliser, ``Scale.own``) adds the exact
per-channel correction of :class:`Normaliser`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.fast import analysis, linear, scaled, summed, trace
from jaxgrad.fast.capture import Captured
from jaxgrad.fast.program import Const, Var, eval_known


def row_dots(grads, v):
    """``(B,)``: ``⟨J_i, v⟩`` for per-example gradients ``J`` ``(B, *v.shape)``."""
    dtype = jnp.promote_types(jnp.result_type(grads, v), jnp.float32)
    flat = grads.reshape(grads.shape[0], math.prod(grads.shape[1:])).astype(dtype)
    hi = jax.lax.Precision.HIGHEST
    return jnp.matmul(flat, jnp.reshape(v, (-1,)).astype(dtype), precision=hi)


def _full(sc, x, shape):
    """A factor against the parameter operand (sides ``"i"`` and ``"w"``)."""
    return jnp.broadcast_to(sc.broadcast(x), shape)


def factored(u: trace.Use) -> bool:
    """A scaled use whose weighted sum and dots take the factors on ``θ'``."""
    return bool(u.scale) and not u.select and not u.scans


def transformed(u: trace.Use) -> bool:
    """Whether a use's ``A`` or ``G`` are read through its factors, blocks or fold
    (:meth:`Operands.a_of`, :meth:`Operands.g_of`), never as captured: no route reads its
    step-major arrays step by step."""
    return bool(u.scale or u.select or summed.refolded(u))


def selected(x, u: trace.Use, side: str):
    """The slice of ``A`` or ``G`` (``side``) a concatenated block meets."""
    if not u.select or u.select[0] != side:
        return x
    _, ax, lo, hi = u.select
    return jax.lax.slice_in_dim(x, lo, hi, axis=1 + ax)


def _scale_refs(an: analysis.Analysis) -> list:
    """The values the scaled uses' factors and ``θ'`` terms are read from, once each."""
    return list(
        dict.fromkeys(
            r for us in an.fast.values() for u in us if u.scale
            for r in [u.theta_term, *(sc.ref for sc in u.scale)] if isinstance(r, Var)
        )
    )  # fmt: skip


class Operands:
    """One pass's captured ``A`` and ``G`` of every use, read as the rules take them.

    The factors of scaled effective weights ``W_eff = θ' ⊙ Π F_k`` (see ``scaled.Scale``)
    are evaluated once: each scales ``A`` or ``G`` of the uses of ``W_eff``, which are then
    the uses of the leaf θ.

    Args:
      an: the analysis of the loss.
      leaves: the parameter leaves.
      cap: the captured arrays.
    """

    def __init__(self, an: analysis.Analysis, leaves: list, cap: Captured):
        self.program = an.program
        self.kept, self.g_use, self.axis = cap.kept, cap.g_use, cap.axis
        refs = _scale_refs(an)
        n = an.num_params
        # The leaves every factor and θ' term is made of (the exact leaves are per example).
        self.known = {self.program.invars[j]: leaves[j] for j in range(n) if j not in an.exact}
        # Folded uses of summed weights (summed.Fold) read M from the same one evaluation.
        refs = list(dict.fromkeys([*refs, *summed.fold_refs(an.fast)]))
        self.values = dict(zip(refs, eval_known(self.program, self.known, refs), strict=True))
        self.products: dict = {}  # use -> op(A', θ'), shared by every factor of G of the use

    # --- A and G, examples first --------------------------------------------------------------

    def a_of(self, u):
        """``A`` examples first, with the use's factors of ``A``."""
        a = trace.fold_steps(u, jnp.moveaxis(self.kept[u.key], self.axis[u.key], 0), "a")
        a = selected(self.scaled(a, u, "a"), u, "a")
        return summed.folded(u, "a", a, self.values)

    def g_plain(self, u):
        """The cotangent in the lifted equation's layout, examples first."""
        g = jnp.moveaxis(self.g_use[u.key], self.axis[u.key], 0)
        if trace.folds_steps(u):  # (a convolution: the steps folded into its batch axis)
            return trace.fold_steps(u, g, "g")
        # (B, steps, *inner steps, *out): each scan's steps go where its lift put them,
        # innermost first (a scan's lift inserts its axis into the output of the next).
        step_axes = [lv.step_axis for lv in u.scans]
        for d in reversed(range(len(step_axes))):
            g = jnp.moveaxis(g, 1 + d, 1 + d + step_axes[d])
        return g

    def g_of(self, u):
        """... with a scaled use's factors of ``G`` (at every step: lifted layout)."""
        g, f = self.g_plain(u), self.indexed(u)  # (a lookup's factors, gathered at its rows)
        g = self.scaled(g, u, "g") if f is None else g * f.astype(g.dtype)
        return summed.folded(u, "g", selected(g, u, "g"), self.values)

    # --- the factors of a scaled use ----------------------------------------------------------

    def factor_value(self, sc):
        return sc.ref.value if isinstance(sc.ref, Const) else self.values[sc.ref]

    def scaled(self, x, u, side, skip=None):
        """``x`` ``(B, ...)`` times the use's factors on one side (but factor ``skip``)."""
        for q, sc in enumerate(u.scale):
            if sc.side == side and q != skip and not sc.offset:
                # (Promoted, not cast to x's dtype: a float32 A of a float64 weight, one-hot
                # rows of a float64 table, must not round a float64 factor to float32.)
                x = x * sc.broadcast(self.factor_value(sc))[None]
        return x

    def mask_of(self, u):
        """A use's full masks (side ``"w"``) in its operand's layout, or None."""
        ms = [_full(sc, self.factor_value(sc), u.op.in_avals[u.pos].shape) for sc in u.scale
              if sc.side == "w"]  # fmt: skip
        return functools.reduce(jnp.multiply, ms) if ms else None

    def masked(self, u, x, *, examples=True):
        """A gradient in the operand's layout, times ``M``."""
        m = self.mask_of(u)
        if m is None:
            return x
        return x * (m[None] if examples else m).astype(x.dtype)

    def on_operand(self, u, sc):
        """A factor broadcastable against the use's parameter operand."""
        x = sc.broadcast(self.factor_value(sc))
        if sc.side in ("i", "w"):
            return x
        k = 0 if sc.side == "a" else 1  # operand axis -> the A (or G) axis it meets
        to_op = {
            (ax[k] if kind == "ag" else ax): d
            for d, (kind, ax) in scaled.use_axes(u.op, u.pos).items()
            if sc.side in kind
        }
        ops = [to_op[t] for t in sc.dims]
        x = jnp.transpose(jnp.reshape(x, [sc.target[t] for t in sc.dims]), np.argsort(ops))
        shape = u.op.in_avals[u.pos].shape
        out = [shape[d] if d in ops else 1 for d in range(len(shape))]
        return jax.lax.broadcast_in_dim(x, out, tuple(sorted(ops)))

    def factors_on_operand(self, u):
        """``Π F_k`` on θ': ``∇_θ' S_i = (Π F_k) ⊙ ∇_{W_eff} S_i``."""
        fs = [self.on_operand(u, sc) for sc in u.scale if not sc.offset]
        return functools.reduce(jnp.multiply, fs, jnp.ones((), u.op.in_avals[u.pos].dtype))

    def theta_operand(self, u):
        """θ' (or θ' - m) as the use's operand: the chain after θ'."""
        if not u.levels:
            chain = u.chain[u.theta_chain :]
            return trace.apply_chain(self.program, chain, self.values[u.theta_term])
        after = dataclasses.replace(u, pre_chain=u.pre_chain[u.theta_chain :])
        return trace.apply_use_chain(self.program, after, self.values[u.theta_term])

    # --- a lookup's factors (side "i"), at its rows -------------------------------------------

    def lookups(self, u):
        """A lookup's indices and cotangents, out-of-bounds lookups' zeroed."""
        a = jnp.moveaxis(self.kept[u.key], self.axis[u.key], 0)
        g = jnp.moveaxis(self.g_use[u.key], self.axis[u.key], 0)
        idx, _, y = linear.gather_rows(u.op, a, g)
        return linear.idx_restore(u.op, idx), linear.g_restore(u.op, y)

    def indexed(self, u, skip=None):
        """``(B, *out)``: a lookup's factors (side ``"i"``) at its rows, or None."""
        shape, out = u.op.in_avals[0].shape, None
        for q, sc in enumerate(u.scale):
            if sc.side == "i" and q != skip:
                f = _full(sc, self.factor_value(sc), shape).astype(u.op.in_avals[0].dtype)
                x = jax.vmap(lambda a_i, f=f: linear.bind_use(u.op, 0, f, a_i))(self.lookups(u)[0])
                out = x if out is None else out * x
        return out

    def indexed_grad(self, u, q, w):
        """Per example ``∇F_q`` of ``(w ⊙ Π_k F_k)[rows]`` (side ``"i"``)."""
        sc, shape = u.scale[q], u.op.in_avals[0].shape
        rest = w
        for k, other_sc in enumerate(u.scale):
            if other_sc.side == "i" and k != q:
                rest = rest * _full(other_sc, self.factor_value(other_sc), shape).astype(w.dtype)
        x = self.factor_value(sc)

        def one(a_i, g_i):
            f = lambda x: linear.bind_use(
                u.op, 0, (rest * _full(sc, x, shape)).astype(w.dtype), a_i
            )
            _, vjp = jax.vjp(f, x)
            return vjp(g_i.astype(w.dtype))[0]

        return jax.vmap(one)(*self.lookups(u))

    # --- the per-example gradients of the factors ---------------------------------------------

    def side_sum(self, u, q, w, *, skip=None, plain=False):
        """Per example, the share of ⟨∇_{W_eff} S_i, W'⟩ along factor q's entries (its ref's
        layout), for W' = w ⊙ (the use's factors but the skipped one): the gradient of factor
        q with w = θ' and skip = q; with ``plain`` the factor's own inverse is not applied."""
        sc = u.scale[q]
        if sc.side == "i":
            return self.indexed_grad(u, q, w)
        w = self.masked(u, w, examples=False)  # (θ' ⊙ M: the masked weight's share)
        # (In w's precision: a float32 A of a float64 weight would round A's cotangent.)
        kept = self.kept[u.key]
        a = trace.fold_steps(u, jnp.moveaxis(kept, self.axis[u.key], 0), "a")
        a = a.astype(jnp.result_type(kept, w))
        g = self.g_plain(u)
        if sc.side == "g":  # G ⊙ op(A', w); op(A', θ') is shared by the factors of G
            shared = skip is not None and not plain  # (w is θ' exactly then)
            product = self._product(u, w, a, shared)
            cot = self.scaled(g, u, "g", skip) * product
        else:  # A ⊙ op_Aᵀ(G', w)
            _, vjp_a = jax.vjp(lambda x: _op(u, w, x), a)
            cot = self.scaled(a, u, "a", skip) * vjp_a(self.scaled(g, u, "g", skip))[0]
        # The broadcast's transpose is a sum over the axes it does not span.
        ones = [1 + d for d, t in enumerate(sc.target) if t == 1 and cot.shape[1 + d] != 1]
        cot = jnp.sum(cot, axis=tuple(ones), keepdims=True)
        x = self.factor_value(sc)
        spread = dataclasses.replace(sc, inverse=False).broadcast if plain else sc.broadcast
        _, vjp_b = jax.vjp(spread, x)
        return jax.vmap(lambda ct: vjp_b(ct.astype(x.dtype))[0])(cot)

    def _product(self, u, w, a, shared):
        """``op(A', w)`` per example; with ``shared`` (``w`` is θ') computed once per use."""
        if not shared:
            return _op(u, w, self.scaled(a, u, "a"))
        if u.key not in self.products:
            self.products[u.key] = _op(u, w, self.scaled(a, u, "a"))
        return self.products[u.key]

    def factor_grad(self, u, q):
        """One use's per-example gradient of its factor ``q``."""
        if u.scale[q].offset:  # W_eff = (θ' - m) ⊙ Π F: -Σ (Π F) ⊙ ∇W along m's entries
            ones = jnp.ones(u.op.in_avals[u.pos].shape, u.op.in_avals[u.pos].dtype)
            return -self.side_sum(u, q, ones, plain=True)
        return self.side_sum(u, q, self.theta_operand(u), skip=q)


def _op(u: trace.Use, w, a):
    """``op(A_i, w)`` for every example's ``A_i`` (``a``, examples first)."""
    return jax.vmap(lambda a_i: linear.bind_use(u.op, u.pos, w, a_i))(a)


class Normaliser:
    """The share of a scaled leaf's gradient through its normalisers (``Scale.own``, see
    :mod:`jaxgrad.fast.scaled`).

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

    def __init__(self, ops: Operands, j: int, theta, own: dict):
        """Leaf ``j`` (value ``theta``) with normalisers ``own``: ref -> [(use, factor)]."""
        program = ops.program
        self.refs = list(own)
        leaf = program.invars[j]
        self.x_of = lambda t: eval_known(program, {**ops.known, leaf: t}, self.refs)
        self.theta = theta
        xs, self.vjp = jax.vjp(self.x_of, theta)
        # r_x, (B, *x) per normaliser, from every use it scales.
        self.r = [sum(ops.factor_grad(u, q) for u, q in own[x]) for x in self.refs]
        ones = lambda k: [
            jnp.ones_like(x) if i == k else jnp.zeros_like(x) for i, x in enumerate(xs)
        ]
        us = [self.vjp(ones(k))[0] for k in range(len(xs))]  # U_x = J_xᵀ 1, θ's layout
        self.d = [
            sum(
                ops.side_sum(u, q, trace.apply_use_chain(program, u, us[k]), plain=True)
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
        return sum(row_dots(r, x) for r, x in zip(self.r, jv, strict=True))
