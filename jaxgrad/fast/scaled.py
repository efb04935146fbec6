"""Scaled and selected weights: effective weights whose leaf is a fast leaf, its uses being the
effective weight's with example-independent factors folded into ``A`` or ``G``, or with
slices of ``A`` or ``G``.

**Scaled weights.** Where an effective weight is ``(θ' - m) ⊙ Π_k F_k`` (``θ'`` an alias of
one leaf; each factor broadcast along axes of one side of every dense/conv use; see
:class:`Scale` and :func:`scaled_weights`), the leaf θ is a fast leaf whose uses are the effective
weight's with the factors folded into ``A`` or ``G``: no per-example ``∇_{W_eff}`` is formed.
The uses may sit at the top level or in frames that share the weight (scan bodies, where
the factors scale the lifted ``A`` or ``G`` at every step; branches; custom rules; nested,
see :func:`_scalable`); the same holds for concatenated blocks (:func:`selected_weights`).
Factors made of other leaves (``g``) keep the VJP route on their (small) per-example
gradients; factors and offsets made of θ itself, per channel (weight normalisation, weight
standardisation), add exact per-channel corrections (``operands.Normaliser``).

**Lookups, constant scatters, full masks.** For a lookup any factor folds into ``G``,
gathered at the rows read (``(θ' ⊙ F)[r] = θ'[r] ⊙ F[r]``, side ``"i"``); a constant
scatter ``θ'.at[rows].set(c)`` is ``θ' ⊙ M + C`` (:class:`ScatterMask`, one more factor);
a full constant mask of a dense or convolution weight (neither side's alone) multiplies
the use's gradient (side ``"w"``, :func:`jaxgrad.fast.rules.masked_route`).

**Selected weights.** Where an effective weight concatenates parameter blocks
(:func:`selected_weights`), each block's leaf is a fast leaf whose use is the block's own: the
use's operation on the matching slice of ``A`` or ``G``.

The transformation these are read from, and what they share with summed weights
(:mod:`jaxgrad.fast.summed`), are :mod:`jaxgrad.fast.reparam`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxgrad.fast import rules
from jaxgrad.fast.program import (
    Const,
    Eqn,
    Program,
    Var,
    eval_known,
    program_aval,
    program_aval_in,
    shaped,
)
from jaxgrad.fast.reparam import alias_of_leaf, alignments, closed, lead_chain
from jaxgrad.fast.trace import Use, chain_perm, use_perm


@dataclasses.dataclass(frozen=True)
class Scale:
    """One example-independent factor ``F`` of an effective weight ``W_eff = θ' ⊙ Π_k F_k``
    (``θ'`` an alias of one leaf ``θ``), pushed into one side of a ``dot_general`` use.

    ``F`` is the value ``ref`` (or ``1 / ref``), broadcast along the axes of ``W_eff`` it spans.
    Where those are contracted (or batch) axes of the use, ``F`` scales the kept operand
    ``A`` along the matching axes (``side == "a"``); where they are free (or batch) axes of the
    parameter operand, it scales the output and so its cotangent ``G`` (``side == "g"``).
    Since the use is bilinear, ``op(A, W_eff) = op(A ⊙ F_A, θ') ⊙ F_G``: the gradient with
    respect to ``θ'`` is the use's own gradient ``op_Wᵀ(A ⊙ F_A, G ⊙ F_G)``, every route of the
    use (``|a|²|g|²``, the Gram form, ...) applies to the scaled ``A`` and ``G``, and no
    ``B × |W_eff|`` array is formed.

    ``shape`` is ``ref``'s shape with the axes it does not span dropped, ``perm`` orders them
    as the side's axes, which ``dims`` of the side's per-example shape ``target`` (1 on every
    other axis) they go to; ``leaves`` are the parameter leaves ``ref`` is made of (its
    gradient goes to them, see ``operands``).
    """

    ref: Any  # Var | Const
    inverse: bool
    side: str  # "a" | "g"; "i" (a lookup's, gathered), "w" (a full mask), see _operand_scale
    shape: tuple
    perm: tuple
    target: tuple
    dims: tuple
    leaves: frozenset = frozenset()
    # A *normaliser*: the factor is made of ``θ`` itself, one output channel (or row) of it
    # per entry (``‖V_o‖`` of weight normalisation): its share of ``θ``'s gradient,
    # ``J_Fᵀ ∇_F``, is a per-channel correction (see ``operands``).
    own: bool = False
    # An *offset* (``W_eff = (θ' - m) ⊙ Π_k F_k``, the mean of weight standardisation): not a
    # factor of ``A`` or ``G``; ``m`` gets the gradient ``-Σ_c (Π_k F_k) ⊙ ∇_{W_eff}`` per entry.
    offset: bool = False

    def broadcast(self, x):
        """The factor's value ``x`` (of ``ref``) as an array broadcastable against one
        example's ``A`` (or ``G``)."""
        x = 1 / x if self.inverse else x
        x = jax.numpy.transpose(jax.numpy.reshape(x, self.shape), self.perm)
        return jax.lax.broadcast_in_dim(x, self.target, self.dims)


def _product(program: Program, producer: dict, varying_: set, ref, shape: tuple) -> list:
    """``ref`` (of shape ``shape``) as a product of terms ``(value, axes, inverse)``: ``value``
    broadcast so that its axis ``i`` runs along axis ``axes[i]`` of ``ref`` (None: a unit axis
    broadcast), inverted when ``inverse``. Read through the reparametrisation's ``mul``,
    ``div``, ``neg`` and ``broadcast_in_dim`` (of parameters or constants, the same for every
    example: not in ``varying_``); any other value is one term spanning it all."""
    whole = [(ref, tuple(range(len(shape))), False)]
    k = producer.get(ref) if isinstance(ref, Var) else None
    if k is None or ref in varying_:
        return whole
    e = program.eqns[k]
    name = e.primitive.name

    def part(r, a):  # an operand: of the result's shape, or of size 1 along broadcast axes
        if tuple(a.shape) == ():
            return [(r, (), False)]
        same_rank = len(a.shape) == len(shape)
        if same_rank and all(x in (1, y) for x, y in zip(a.shape, shape, strict=True)):
            return _product(program, producer, varying_, r, tuple(a.shape))
        return None

    if name in ("mul", "div") and len(e.ins) == 2:
        terms = [part(r, a) for r, a in zip(e.ins, e.in_avals, strict=True)]
        if any(t is None for t in terms):
            return whole
        if name == "div":
            terms[1] = [(r, axes, not inv) for r, axes, inv in terms[1]]
        return terms[0] + terms[1]
    if name == "neg":
        return [*_product(program, producer, varying_, e.ins[0], shape), (Const(-1.0), (), False)]
    if name in _SCATTERS:  # θ'.at[rows].set(c) = θ' ⊙ M + C, M and C the same for every example
        mask = _scatter_mask(program, varying_, e)
        if mask is None:
            return whole
        inner = _product(program, producer, varying_, e.ins[0], shape)
        if mask.all_ones and not mask.additive:
            return inner  # (the scatter changes nothing a gradient sees)
        # (An additive C stays a term, even with M = 1: a factor made of parameters multiplies
        # θ' ⊙ M + C, so its gradient needs C, see _offset_with_factor_grads.)
        return [*inner, (mask, tuple(range(len(shape))), False)]
    if name == "broadcast_in_dim" and not e.params.get("sharding"):
        (a,) = e.in_avals
        dims = e.params["broadcast_dimensions"]
        axes = tuple(d if a.shape[i] == shape[d] else None for i, d in enumerate(dims))
        return [(e.ins[0], axes, False)]
    return whole


def use_axes(eqn: Eqn, pos: int):
    """Per parameter-operand axis of a use: ``("a", axis of A)`` for an axis a factor along
    it can scale ``A`` by (a contracted axis of a ``dot_general``, a convolution's input
    channels), ``("g", output axis)`` for one it can scale the output by (a free axis, the
    output channels), ``("ag", (A axis, output axis))`` for a dot batch axis; none for a
    kernel's spatial axes."""
    if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs, out = eqn.params["dimension_numbers"]
        where = {rhs[0]: ("g", out[1])}
        if eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1:
            where[rhs[1]] = ("a", lhs[1])
        return where
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
    other = 1 - pos
    ndim = [len(a.shape) for a in eqn.in_avals]
    free = [
        [d for d in range(ndim[i]) if d not in contract[i] and d not in batch[i]] for i in (0, 1)
    ]
    nb = len(batch[0])
    # The output: batch axes, then the lhs's free axes, then the rhs's.
    out_free = nb if pos == 0 else nb + len(free[0])
    where = {}
    for i, d in enumerate(contract[pos]):
        where[d] = ("a", contract[other][i])
    for i, d in enumerate(batch[pos]):
        where[d] = ("ag", (batch[other][i], i))
    for i, d in enumerate(free[pos]):
        where[d] = ("g", out_free + i)
    return where


def _scale_for(u: Use, perm, ref, axes, inverse, ref_shape, leaves, own, offset=False):
    """The :class:`Scale` of one term on the side of use ``u`` it spans, or None."""
    if u.kind == "gather":  # any factor of a lookup's table, gathered at the rows it reads
        if own or offset:
            return None
        return _operand_scale(u, perm, ref, axes, inverse, ref_shape, leaves, "i")
    eqn = u.op
    where, spanned = use_axes(eqn, u.pos), _spanned(perm, axes, ref_shape)
    for side in ("g", "a"):
        targets = _side_targets(where, spanned, side)
        if targets is not None:
            shape = eqn.out_avals[0].shape if side == "g" else eqn.in_avals[1 - u.pos].shape
            term = (ref, inverse, ref_shape, leaves)
            return _placed(term, side, spanned, targets, len(shape), own, offset)
    if not leaves and not own and not offset and u.site == "":  # a full constant mask M:
        # M ⊙ the gradient (in a frame: the VJP route)
        return _operand_scale(u, perm, ref, axes, inverse, ref_shape, leaves, "w")
    return None


def _operand_scale(u: Use, perm, ref, axes, inverse, ref_shape, leaves, side) -> Scale:
    """A :class:`Scale` broadcast against the use's parameter operand (``θ'``'s layout there):
    side ``"i"`` for a lookup (``(θ' ⊙ F)[r] = θ'[r] ⊙ F[r]``: ``G`` scaled by ``F`` gathered
    at the rows looked up), side ``"w"`` for a full constant mask of a dense or convolution
    use (``∇_θ' = M ⊙ ∇_{W_eff}``, see :func:`jaxgrad.fast.rules.masked_route`)."""
    spanned = _spanned(perm, axes, ref_shape)
    targets = [d for _, d in spanned]
    ndim = len(u.op.in_avals[u.pos].shape)
    return _placed((ref, inverse, ref_shape, leaves), side, spanned, targets, ndim)


def _spanned(perm, axes, ref_shape) -> list:
    """``(term axis, operand axis)`` for every axis of ``W_eff`` a term spans with more than
    one entry (``axes``: the term's, see :func:`_product`; ``perm``: operand axis ``i`` is
    ``W_eff`` axis ``perm[i]``)."""
    w_to_op = {w: i for i, w in enumerate(perm)}
    kept = [(i, axes[i]) for i in range(len(axes)) if axes[i] is not None and ref_shape[i] > 1]
    return [(i, w_to_op[w]) for i, w in kept]


def _side_targets(where: dict, spanned: list, side: str):
    """The axes of one side of a use (``"g"``: the output's, ``"a"``: ``A``'s) that the
    spanned operand axes meet there (``where``: :func:`use_axes`), or None unless every
    one of them meets that side."""
    targets = []
    for _, d in spanned:
        kind, ax = where.get(d, ("", None))
        if side not in kind:
            return None
        targets.append(ax[1 if side == "g" else 0] if kind == "ag" else ax)
    return targets


def _placed(term, side: str, spanned, targets, ndim: int, own=False, offset=False) -> Scale:
    """The :class:`Scale` of ``term = (ref, inverse, ref_shape, leaves)`` whose spanned axes
    go to the axes ``targets`` of a per-example shape of ``ndim`` axes (1 on every other)."""
    ref, inverse, ref_shape, leaves = term
    target = [1] * ndim
    for (i, _), t in zip(spanned, targets, strict=True):
        target[t] = ref_shape[i]
    order = tuple(int(i) for i in np.argsort(targets))
    return Scale(
        ref, inverse, side, tuple(ref_shape[i] for i, _ in spanned), order, tuple(target),
        tuple(sorted(targets)), frozenset(leaves), own, offset,
    )  # fmt: skip


_SCATTERS = frozenset({"scatter", "scatter-mul", "scatter-add"})


@dataclasses.dataclass(frozen=True)
class ScatterMask(Const):
    """``M`` of a constant scatter ``θ'.at[rows].set(c)`` (``.multiply(c)``, ``.add(c)``):
    the map is ``θ' ↦ θ' ⊙ M + C`` with ``M = ∂W_eff/∂θ'`` entry by entry (0 on the rows
    set, ``c`` on the rows multiplied), kept only along the axes it varies along (a row
    mask is one factor per row); ``additive``: ``C ≠ 0``."""

    additive: bool = False
    all_ones: bool = False


def _scatter_mask(program: Program, varying_: set, e: Eqn):
    """The :class:`ScatterMask` of a scatter whose indices and updates are constants (computed
    from literals and captured constants only), else None."""
    _, idx, upd = e.ins
    if any(isinstance(r, Var) and r in varying_ for r in (idx, upd)):
        return None
    try:
        with jax.ensure_compile_time_eval():
            idx_v, upd_v = eval_known(program, {}, [idx, upd])
            idx_v, upd_v = np.asarray(idx_v), np.asarray(upd_v)
            shape, dtype = e.in_avals[0].shape, e.in_avals[0].dtype
            bind = lambda t: e.primitive.bind(
                t, idx_v, upd_v, **e.primitive.get_bind_params(e.params)
            )
            zeros, ones = np.zeros(shape, dtype), np.ones(shape, dtype)
            offset, mask = jax.jvp(bind, (zeros,), (ones,))
            mask, offset = np.asarray(mask), np.asarray(offset)
    except (KeyError, TypeError, jax.errors.ConcretizationTypeError):
        return None  # (indices or updates made of parameters or the example)
    for d in range(mask.ndim):  # only the axes it varies along (the others of size 1)
        first = np.take(mask, [0], axis=d)
        if np.all(mask == first):
            mask = first
    return ScatterMask(mask, bool(np.any(offset != 0)), bool(np.all(mask == 1)))


def scaled_weights(program: Program, n: int, top: set, region, outputs, deps, uses) -> dict:
    """The effective weights whose leaf takes the *scaled* route: ``v -> (leaf, chain,
    {use key: scales})`` for ``W_eff = θ' ⊙ Π_k F_k`` with ``θ'`` an alias of one leaf ``θ``,
    every use of ``W_eff`` a real ``dot_general`` or convolution reached by transposes only
    (at the top level or inside frames that share it, see :func:`_scalable`), and every
    factor spanning one side of each (see :class:`Scale`).

    A factor may be made of ``θ`` itself (a *normaliser*, ``1/‖V_o‖``) when it is separable
    per channel along the axes it spans (:func:`jaxgrad.fast.reparam.alignments`), ``θ``
    reaches no other effective weight and has no use of its own, and the normalisers of a use
    sit on one side along the same axes. A leaf takes the scaled route only if every
    effective weight it reaches does (else its gradient needs the whole ``J_fᵀ``: the
    materialised route).
    """
    producer = {o: k for k, e in enumerate(program.eqns) for o in e.outs}
    info = alignments(program, region, n)
    found: dict = {}
    declined = {}  # v -> why a scaled form was not taken (for the plan)
    for v, out in enumerate(outputs):
        shape = tuple(program_aval(program, out).shape)
        us = uses.get(n + v, [])
        perms = _scalable(program, us, len(shape))
        if perms is None:
            continue
        leaf = _leaf_and_factors(program, producer, top, n, info, deps, uses, out, shape)
        if leaf is None:
            continue
        j, chain, ref, factors = leaf
        per_use = _scales_per_use(program, deps, us, perms, factors)
        if per_use is None:
            continue
        if all(rules.scaled_pays(u.op, u.pos, _products(per_use[u.key])) for u in us):
            found[v] = (j, chain, per_use, ref)
        else:
            declined[v] = (
                "scaled form declined: its extra products over "
                f"{max(rules.use_positions(u.op, u.pos) for u in us)} positions cost "
                "more than the per-example gradient"
            )
    return _whole_leaves(found, deps, outputs, uses, n), declined


def _leaf_and_factors(program: Program, producer, top, n: int, info, deps, uses, out, shape):
    """``(leaf, chain, θ', factors)`` for the first term of ``W_eff = out`` (see
    :func:`_product`) that is ``θ'`` (or ``θ' - m``), an alias of a leaf spanning the whole
    weight, whose other terms (and centre ``m``) can be carried as scales of its uses
    (:func:`_factors_carried`); else None. ``factors``: ``(ref, axes, inverse, own,
    offset)`` per other term (``own``: made of the leaf, a normaliser; ``offset``: ``m``)."""
    terms = _product(program, producer, top, out, shape)
    for t, (ref, axes, inverse) in enumerate(terms):
        theta, centre = alias_of_leaf(program, producer, n, ref), None
        if theta is None:
            theta, centre = _centred(program, producer, top, n, ref, shape)
        if (
            theta is None
            or inverse
            or axes != tuple(range(len(shape)))
            or tuple(program_aval_in(program, ref).shape) != shape
        ):
            continue
        j, chain = theta
        others = [x for q, x in enumerate(terms) if q != t]
        offsets = [False] * len(others)
        if centre is not None:
            others, offsets = [*others, centre], [*offsets, True]
        own = [isinstance(r, Var) and j in deps.get(r, ()) for r, _, _ in others]
        if _factors_carried(program, info, deps, uses, j, chain, others, own, shape):
            factors = [(*x, o, off) for x, o, off in zip(others, own, offsets, strict=True)]
            return j, chain, ref, factors
    return None


def _factors_carried(program: Program, info, deps, uses, j: int, chain, others, own, shape):
    """Whether the other terms of ``W_eff = θ' ⊙ Π others`` can be scales of leaf ``j``'s
    uses: no scatter's constant among factors with gradients, and normalisers (``own``)
    only for a leaf with no use of its own, each separable per channel along the axes it
    spans (:func:`_separable_along`)."""
    lifted = chain_perm(program, chain, len(shape))  # θ' axis w is θ axis lifted[w]
    if _offset_with_factor_grads(others, deps):
        return False
    if any(own) and (lifted is None or uses.get(j)):
        return False
    return all(
        _separable_along(info.get(r), j, ax, lifted, program_aval_in(program, r).shape)
        for (r, ax, _), o in zip(others, own, strict=True)
        if o
    )


def _scales_per_use(program: Program, deps, us, perms, factors):
    """``{use key: scales}``, every factor a :class:`Scale` of every use (see
    :func:`_scale_for`) and a use's normalisers on one side along the same axes; None where
    one is not (or where two uses share a key: one equation reading the weight twice)."""
    per_use = {}
    for u, perm in zip(us, perms, strict=True):
        scales = []
        for r, ax, inv, own, offset in factors:
            rs = np.shape(r.value) if isinstance(r, Const) else program_aval_in(program, r).shape
            lv = deps.get(r, frozenset()) if isinstance(r, Var) else frozenset()
            sc = _scale_for(u, perm, r, ax, inv, rs, lv, own, offset)
            if sc is None:
                return None
            scales.append(sc)
        if len({(sc.side, sc.dims) for sc in scales if sc.own}) > 1:
            return None
        per_use[u.key] = tuple(scales)
    return per_use if len(per_use) == len(us) else None


def _whole_leaves(found: dict, deps, outputs, uses, n: int) -> dict:
    """``found`` less the effective weights whose leaf cannot take the scaled route: a leaf
    reaching an effective weight that is not scaled, or read by another's factor, is not;
    nor one with a normaliser that reaches two effective weights (until none is dropped)."""
    while True:
        factor_leaves = {
            j for _, _, per_use, _ in found.values() for ss in per_use.values() for s in ss
            if not s.own for j in s.leaves
        }  # fmt: skip
        reach = {  # (a value the transformation reads again, with no use, has no gradient)
            j: [w for w, o in enumerate(outputs) if j in deps.get(o, ()) and uses.get(n + w)]
            for j in range(n)
        }
        drop = {
            v for v, (j, _, per_use, _) in found.items()
            if j in factor_leaves
            or any(w not in found or found[w][0] != j for w in reach[j])
            or (any(s.own for ss in per_use.values() for s in ss) and len(reach[j]) > 1)
        }  # fmt: skip
        if not drop:
            return found
        found = {v: x for v, x in found.items() if v not in drop}


def _offset_with_factor_grads(terms, deps) -> bool:
    """Whether a scatter's constant ``C`` (``θ' ⊙ M + C``) sits among factors made of
    parameters: their gradients would need ``C`` too, which :class:`Scale` does not carry."""
    additive = any(isinstance(r, ScatterMask) and r.additive for r, _, _ in terms)
    return additive and any(isinstance(r, Var) and deps.get(r) for r, _, _ in terms)


def _products(scales) -> int:
    """The extra products of a use a scaled weight's factors with gradients need: one for
    its factors of ``G`` (they share it), one per factor of ``A``, one per normaliser."""
    grads = [sc for sc in scales if sc.leaves]
    return int(any(sc.side == "g" and not sc.own for sc in grads)) + sum(
        1 for sc in grads if sc.own or sc.side == "a"
    )


def _centred(program: Program, producer: dict, top: set, n: int, ref, shape):
    """``((leaf, chain), (m, axes, False))`` when ``ref = θ' - m`` (``θ'`` an alias of a leaf,
    ``m`` of size 1 along the axes it is broadcast along: a per-channel mean), else
    ``(None, None)``."""
    k = producer.get(ref) if isinstance(ref, Var) else None
    if k is None or ref in top or program.eqns[k].primitive.name != "sub":
        return None, None
    e = program.eqns[k]
    theta = alias_of_leaf(program, producer, n, e.ins[0])
    a = tuple(e.in_avals[1].shape)
    if (
        theta is None
        or tuple(e.in_avals[0].shape) != shape
        or (a and len(a) != len(shape))
        or (a and any(x not in (1, y) for x, y in zip(a, shape, strict=True)))
    ):
        return None, None
    return theta, (e.ins[1], tuple(range(len(a))), False)


def _separable_along(aligned, j: int, axes: tuple, lifted: tuple, shape) -> bool:
    """Whether entry ``c`` of a factor (broadcast along the axes ``axes`` of ``W_eff``)
    depends only on the slice ``c`` of leaf ``j`` along the matching axes (``lifted``: the
    leaf's axis of every axis of ``W_eff``)."""
    if aligned is None:
        return False
    for i, w in enumerate(axes):
        if shape[i] == 1:
            continue  # (a unit axis: the factor is the same along it)
        if w is None or j not in aligned[i] or aligned[i][j] != lifted[w]:
            return False
    return True


def _scalable(program: Program, us: list, ndim: int):
    """The permutations from an effective weight to the operands of its uses ``us``, or None
    unless every use can carry scales: a real dense or convolution use, reached by transposes
    only (or a lookup at the top level), at the top level or in frames (scan bodies,
    branches, custom rules, nested) that all share the weight (no scan over it: one factor
    for every step). In a scan the use is lifted over the steps
    (:func:`jaxgrad.fast.trace.lift_over_steps`): the weight's axes are the step equation's,
    and a factor scales ``A`` or ``G`` at every step."""
    if not us or any(
        (u.kind not in ("dense", "conv") and (u.kind, u.site) != ("gather", ""))
        or u.split >= 0
        or u.select
        for u in us
    ):  # (a lookup's factors are gathered at its rows: at the top level only)
        return None
    perms = [use_perm(program, u, ndim, lifted=True) for u in us]
    return None if any(p is None for p in perms) else perms


# --- Selected weights: ``W_eff = concatenate([θ_1, θ_2, ...])`` ---------------------------


def selected_weights(program: Program, n: int, outputs, deps: dict, uses: dict, skip) -> dict:
    """Effective weights that concatenate parameter blocks: ``leaf -> [Use]`` for the leaves
    whose every use goes through them.

    ``W_eff = concatenate([θ_1, θ_2, ...])`` (each part an alias of a leaf, or a constant)
    with every use a real dense/conv use reached by transposes (at the top level or in frames
    that share it, see :func:`_scalable`; in a scan, at every step), the concatenated
    axis one of the use's sides (a contracted axis or input channels: the block meets a slice
    of ``A``; a free axis or output channels: a slice of ``G``): block ``p``'s per-example
    gradient is the use's on the slices, ``op_Wᵀ(A_i[p], G_i)`` or ``op_Wᵀ(A_i, G_i[p])``, so
    each leaf is a fast leaf whose use is the block's own (a smaller ``op``), with its route.
    """
    producer = {o: k for k, e in enumerate(program.eqns) for o in e.outs}
    found: dict = {}  # v -> [(leaf, chain, {use key: (op, select)})]
    for v, out in enumerate(outputs):
        k = producer.get(out)
        us = uses.get(n + v, [])
        if v in skip or k is None or program.eqns[k].primitive.name != "concatenate" or not us:
            continue
        e = program.eqns[k]
        shape, d = tuple(e.out_avals[0].shape), e.params["dimension"]
        perms = _scalable(program, us, len(shape))
        if perms is None or any(u.kind == "gather" for u in us):
            continue  # (a lookup of the concatenation reads rows across the blocks)
        parts, start, ok = [], 0, True
        for r, a in zip(e.ins, e.in_avals, strict=True):
            size = a.shape[d]
            theta = alias_of_leaf(program, producer, n, r)
            if theta is None and isinstance(r, Var) and deps.get(r):
                ok = False  # a part made of parameters otherwise: not a selection
            if theta is not None:
                sel = {}
                for u, perm in zip(us, perms, strict=True):
                    axis = perm.index(d)  # the operand's axis that holds the blocks
                    side, ax = use_axes(u.op, u.pos).get(axis, ("", None))
                    if side not in ("a", "g"):
                        ok = False
                        break
                    sel[u.key] = (
                        _block_op(u.op, u.pos, axis, side, ax, size),
                        (side, ax, start, start + size),
                    )
                parts.append((*theta, sel))
            start += size
        if ok and parts:
            found[v] = parts
    # A leaf is selected if every used effective weight it reaches is one of these.
    found = closed(found, deps, outputs, uses, n)
    out: dict = {}
    for v, parts in found.items():
        for j, chain, sel in parts:
            out.setdefault(j, []).extend(
                dataclasses.replace(lead_chain(u, chain), op=sel[u.key][0], select=sel[u.key][1])
                for u in uses[n + v]
            )
    return out, tuple(found)


def _block_op(eqn: Eqn, pos: int, axis: int, side: str, ax: int, size: int) -> Eqn:
    """``eqn`` on one block of its parameter operand (``size`` entries along ``axis``): the
    matching slice of ``A`` (side "a", axis ``ax`` of ``A``) or of the output (side "g")."""
    in_avals = list(eqn.in_avals)
    w = in_avals[pos]
    in_avals[pos] = shaped(tuple(size if i == axis else s for i, s in enumerate(w.shape)), w.dtype)
    out_avals = list(eqn.out_avals)
    if side == "a":
        a = in_avals[1 - pos]
        in_avals[1 - pos] = shaped(
            tuple(size if i == ax else s for i, s in enumerate(a.shape)), a.dtype
        )
    else:
        o = out_avals[0]
        out_avals[0] = shaped(tuple(size if i == ax else s for i, s in enumerate(o.shape)), o.dtype)
    return dataclasses.replace(eqn, in_avals=in_avals, out_avals=out_avals)
