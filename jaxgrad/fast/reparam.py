"""Reparametrised weights: example-independent transformations ``W_eff = f(θ)`` of parameters.

An equation whose outputs do not depend on the example and that reads a parameter (``W * M``,
``g * V / ‖V‖``, ``W0 + A @ B``, ``concatenate``, a constant scatter ...) is part of an
example-independent *transformation* ``W_eff = f(θ)``. Its results that ordinary equations
read are *effective weights*: followed like leaves (their uses are fast uses), and the per-
example gradient of ``θ`` is ``f``'s VJP applied to the effective weights' per-example
gradients (see :class:`jaxgrad.fast.analysis.Analysis` and ``passes.fast_pass``). The axes an
effective weight is separable along (``J_f`` block diagonal, e.g. per output channel) are read
off the same equations (:func:`separable_axes`) for the plan.

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

**Sums of parts.** Where an effective weight is a sum of parts each linear in one leaf
(:class:`Fold`, :func:`summed_weights`), a part ``θ'`` whose Jacobian is the identity (read
off the equation's JVP, :func:`identity_tangent`: the straight-through estimator
``W + stop_gradient(q(W) - W)``, ``W0`` of ``W0 + A @ B``) gives its leaf the uses as they
are, and a part ``θ' · M`` (LoRA's ``A @ B``) the dense uses with ``M`` folded into ``A``
or ``G``.
"""

from __future__ import annotations

import dataclasses
import string
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
    flat_jaxpr,
    program_aval,
    program_aval_in,
    shaped,
)
from jaxgrad.fast.trace import (
    ALIAS_RULES,
    RULES,
    Use,
    chain_perm,
    classify,
    dead_equations,
    ignore,
    is_alias,
    other,
    rule_of,
    use,
    use_perm,
)


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


def _alias_of_leaf(program: Program, producer: dict, n: int, ref):
    """``(leaf, chain)`` when ``ref`` is a parameter leaf through alias equations only."""
    chain: list = []
    while isinstance(ref, Var):
        if ref in program.invars[:n]:
            return program.invars.index(ref), tuple(reversed(chain))
        k = producer.get(ref)
        if k is None:
            return None
        e = program.eqns[k]
        if RULES.get(e.primitive.name) not in ALIAS_RULES or not is_alias(e):
            return None
        chain.append(k)
        ref = e.ins[0]
    return None


def _scaled_alias(program: Program, producer: dict, deps: dict, n: int, ref):
    """``((leaf, chain), scales)`` when ``ref`` is a parameter leaf through alias equations
    times scalars with no gradient (``alpha / r * A`` as a factor of ``A @ B``: the scalars
    of a bilinear part move to its result), else None."""
    scales: list = []
    while isinstance(ref, Var) and ref in producer:
        e = program.eqns[producer[ref]]
        grads = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and deps.get(r)]
        name = e.primitive.name
        if name == "neg":
            scales.append((Const(-1.0), False))
        elif name in ("mul", "div") and len(grads) == 1 and (name == "mul" or grads == [0]):
            q = grads[0]
            if e.in_avals[1 - q].shape != () or e.in_avals[q].shape != e.out_avals[0].shape:
                break
            scales.append((e.ins[1 - q], name == "div"))
        else:
            break
        ref = e.ins[grads[0] if name != "neg" else 0]
    theta = _alias_of_leaf(program, producer, n, ref)
    return None if theta is None else (theta, tuple(scales))


def _use_axes(eqn: Eqn, pos: int):
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
    where = _use_axes(eqn, u.pos)
    w_to_op = {w: i for i, w in enumerate(perm)}  # operand axis i is W_eff axis perm[i]
    kept = [(i, axes[i]) for i in range(len(axes)) if axes[i] is not None and ref_shape[i] > 1]
    for side, k in (("g", 1), ("a", 0)):
        targets = []
        for _, w in kept:
            kind, ax = where.get(w_to_op[w], ("", None))
            if side not in kind:
                break
            targets.append(ax[k] if kind == "ag" else ax)
        else:
            shape = eqn.out_avals[0].shape if side == "g" else eqn.in_avals[1 - u.pos].shape
            order = tuple(int(i) for i in np.argsort(targets))
            target = [1] * len(shape)
            for i, t in zip(kept, targets, strict=True):
                target[t] = ref_shape[i[0]]
            return Scale(
                ref, inverse, side, tuple(ref_shape[i] for i, _ in kept), order,
                tuple(target), tuple(sorted(targets)), frozenset(leaves), own, offset,
            )  # fmt: skip
    if not leaves and not own and not offset and u.site == "":  # a full constant mask M:
        # M ⊙ the gradient (in a frame: the VJP route)
        return _operand_scale(u, perm, ref, axes, inverse, ref_shape, leaves, "w")
    return None


def _operand_scale(u: Use, perm, ref, axes, inverse, ref_shape, leaves, side) -> Scale:
    """A :class:`Scale` broadcast against the use's parameter operand (``θ'``'s layout there):
    side ``"i"`` for a lookup (``(θ' ⊙ F)[r] = θ'[r] ⊙ F[r]``: ``G`` scaled by ``F`` gathered
    at the rows looked up), side ``"w"`` for a full constant mask of a dense or convolution
    use (``∇_θ' = M ⊙ ∇_{W_eff}``, see :func:`jaxgrad.fast.rules.masked_route`)."""
    w_to_op = {w: i for i, w in enumerate(perm)}
    kept = [(i, axes[i]) for i in range(len(axes)) if axes[i] is not None and ref_shape[i] > 1]
    targets = [w_to_op[w] for _, w in kept]
    target = [1] * len(u.op.in_avals[u.pos].shape)
    for (i, _), t in zip(kept, targets, strict=True):
        target[t] = ref_shape[i]
    order = tuple(int(i) for i in np.argsort(targets))
    return Scale(
        ref, inverse, side, tuple(ref_shape[i] for i, _ in kept), order, tuple(target),
        tuple(sorted(targets)), frozenset(leaves),
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
    per channel along the axes it spans (:func:`alignments`), ``θ`` reaches no other
    effective weight and has no use of its own, and the normalisers of a use sit on one side
    along the same axes. A leaf takes the scaled route only if every effective weight it
    reaches does (else its gradient needs the whole ``J_fᵀ``: the materialised route).
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
        terms = _product(program, producer, top, out, shape)
        for t, (ref, axes, inverse) in enumerate(terms):
            theta, centre = _alias_of_leaf(program, producer, n, ref), None
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
            lifted = chain_perm(program, chain, len(shape))  # θ' axis w is θ axis lifted[w]
            others = [x for q, x in enumerate(terms) if q != t]
            offsets = [False] * len(others)
            if centre is not None:
                others, offsets = [*others, centre], [*offsets, True]
            if _offset_with_factor_grads(others, deps):
                continue
            own = [isinstance(r, Var) and j in deps.get(r, ()) for r, _, _ in others]
            if any(own) and (lifted is None or uses.get(j)):
                continue
            if not all(
                _separable_along(info.get(r), j, ax, lifted, program_aval_in(program, r).shape)
                for (r, ax, _), o in zip(others, own, strict=True)
                if o
            ):
                continue
            per_use = {}
            for u, perm in zip(us, perms, strict=True):
                scales = []
                for (r, ax, inv), o, off in zip(others, own, offsets, strict=True):
                    rs = (
                        np.shape(r.value)
                        if isinstance(r, Const)
                        else program_aval_in(program, r).shape
                    )
                    lv = deps.get(r, frozenset()) if isinstance(r, Var) else frozenset()
                    sc = _scale_for(u, perm, r, ax, inv, rs, lv, o, off)
                    if sc is None:
                        break
                    scales.append(sc)
                else:
                    if len({(sc.side, sc.dims) for sc in scales if sc.own}) <= 1:
                        per_use[u.key] = tuple(scales)
                        continue
                break
            if len(per_use) == len(us):
                if all(rules.scaled_pays(u.op, u.pos, _products(per_use[u.key])) for u in us):
                    found[v] = (j, chain, per_use, ref)
                else:
                    declined[v] = (
                        "scaled form declined: its extra products over "
                        f"{max(rules.use_positions(u.op, u.pos) for u in us)} positions cost "
                        "more than the per-example gradient"
                    )
                break
    # A leaf reaching an effective weight that is not scaled, or read by another's factor,
    # is not; nor one with a normaliser that reaches two effective weights.
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
            return found, declined
        found = {v: x for v, x in found.items() if v not in drop}


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
            theta = _alias_of_leaf(program, producer, n, r)
            if theta is None and isinstance(r, Var) and deps.get(r):
                ok = False  # a part made of parameters otherwise: not a selection
            if theta is not None:
                sel = {}
                for u, perm in zip(us, perms, strict=True):
                    axis = perm.index(d)  # the operand's axis that holds the blocks
                    side, ax = _use_axes(u.op, u.pos).get(axis, ("", None))
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
    found = _closed(found, deps, outputs, uses, n)
    out: dict = {}
    for v, parts in found.items():
        for j, chain, sel in parts:
            out.setdefault(j, []).extend(
                dataclasses.replace(lead_chain(u, chain), op=sel[u.key][0], select=sel[u.key][1])
                for u in uses[n + v]
            )
    return out, tuple(found)


# --- Summed weights: ``W_eff = Σ_p T_p``, each part linear in one leaf ---------------------


@dataclasses.dataclass(frozen=True)
class Fold:
    """How a use of a *summed* effective weight ``W_eff = Σ_p T_p`` (every part linear in
    one leaf, the rest of ``W_eff`` carrying no gradient to it) is a fast use of that leaf θ.

    * ``T = θ'`` (an alias of θ): the Jacobian of ``W_eff`` with respect to θ' is the
      identity, so ``∇_θ' S_i = ∇_{W_eff} S_i``: the use as it is, with another forward
      value. Fake quantisation's straight-through estimator
      ``W + stop_gradient(q(W) - W)``, a ``custom_jvp`` whose tangent map is the identity,
      and ``W0`` of a merged LoRA ``W0 + A B`` are of this form (no ``a``, ``g``).
    * ``T = θ' · M`` (a ``dot_general`` with an example-independent ``M``: another leaf,
      a constant, a value with no gradient): for a dense use ``op(X, W_eff)``,
      ``op(X, θ' · M)`` is bilinear in ``(X, θ')`` once ``M`` is contracted with ``X``
      (``A' = X · M``, einsum ``a``) or with the output (``G' = G · Mᵀ``, einsum ``g``, the
      transpose of the map from the smaller output ``Z = op'(X, θ')`` to the use's): the
      leaf's use is ``op'`` on ``(A', θ')`` with cotangent ``G'``, every rule of a dense use
      applies, and no ``B × |W_eff|`` array is formed. Merged LoRA: ``∇_A S_i =
      X_iᵀ (G_i Bᵀ)`` (``B`` folded into ``G``), ``∇_B S_i = (X_i A)ᵀ G_i`` (``A`` into ``A``).

    ``what`` says which (for the plan); ``ref`` is ``M``; ``a`` and ``g`` are ``jnp.einsum``
    specs on one example's ``A`` (with ``M``) and ``G`` (with ``M``, or a transpose alone),
    ``""`` for none, the example axes as ``...``.
    """

    what: str
    ref: Any = None  # Var | Const
    a: str = ""
    g: str = ""
    # Scalars with no gradient the part is multiplied by, ``(ref, inverse)``: on ``G``.
    scales: tuple = ()

    @property
    def active(self) -> bool:
        """Whether ``A`` or ``G`` is changed (``op`` is not the use's own equation)."""
        return bool(self.a or self.g or self.scales)

    def apply(self, side: str, x, m):
        """``A`` (``side="a"``) or ``G`` (``"g"``), examples first, with ``M = m`` folded."""
        spec = self.a if side == "a" else self.g
        if not spec:
            return x
        ops = (x, m) if "," in spec else (x,)
        return jax.numpy.einsum(spec, *ops, precision=jax.lax.Precision.HIGHEST)


def refolded(u: Use) -> bool:
    """Whether a use's ``A`` or ``G`` is folded with a matrix (:class:`Fold`): its ``op`` is
    then not the captured equation's, and ``A``, ``G`` must be read through :func:`folded`."""
    return u.fold is not None and u.fold.active


def fold_refs(uses: dict) -> list:
    """The values the folded uses among ``uses`` (leaf -> [Use]) read their matrices ``M``
    and scalars from, once each (evaluated with the scaled uses' factors)."""
    refs = [r for us in uses.values() for u in us if refolded(u)
            for r in (u.fold.ref, *(ref for ref, _ in u.fold.scales))]  # fmt: skip
    return list(dict.fromkeys(r for r in refs if isinstance(r, Var)))


def folded(u: Use, side: str, x, values: dict):
    """``A`` (``side="a"``) or ``G`` (``"g"``) of use ``u``, examples first, with its fold's
    ``M`` applied (unchanged for a use that is not folded); ``values`` holds the
    :func:`fold_refs`' values."""
    if not refolded(u):
        return x
    value = lambda r: r.value if isinstance(r, Const) else values[r]
    x = u.fold.apply(side, x, None if u.fold.ref is None else value(u.fold.ref))
    for ref, inverse in u.fold.scales if side == "g" else ():
        c = value(ref)
        x = x * (1 / c if inverse else c)
    return x


def identity_tangent(e: Eqn, q: int) -> bool:
    """Whether equation ``e``'s linear part with respect to operand ``q`` (the others held,
    no gradient reaching them) is the identity map: its JVP, traced with the other operands'
    tangents zero, returns the input tangent itself (through same-dtype copies only).

    Decided from the linearisation, not the primitive's name: ``θ + c`` and ``θ - c`` for
    a ``c`` with no gradient, a ``custom_jvp`` rule ``(q(θ), t)`` (a straight-through
    rounding), ``jnp.round(θ)``'s own JVP (zero) is not.
    """
    if len(e.outs) != 1 or tuple(e.in_avals[q].shape) != tuple(e.out_avals[0].shape):
        return False
    if e.in_avals[q].dtype != e.out_avals[0].dtype:
        return False
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in e.in_avals]

    def tangent(*args):
        ops, t = list(args[:-1]), args[-1]

        def f(x):
            ins = [*ops[:q], x, *ops[q + 1 :]]
            y = e.primitive.bind(*ins, **e.primitive.get_bind_params(e.params))
            return y[0] if e.primitive.multiple_results else y

        return jax.jvp(f, (ops[q],), (t,))[1]

    try:
        lin = flat_jaxpr(jax.make_jaxpr(tangent)(*structs, structs[q]))
    except Exception:  # (a primitive that cannot be re-bound abstractly: not known)
        return False
    producer = {o: k for k, x in enumerate(lin.eqns) for o in x.outs}
    r = lin.outs[0]
    while isinstance(r, Var) and r in producer:
        x = lin.eqns[producer[r]]
        same = x.in_avals[0].dtype == x.out_avals[0].dtype
        if x.primitive.name not in ("copy", "copy_p", "convert_element_type") or not same:
            return False
        r = x.ins[0]
    return r == lin.invars[-1]


def _summands(program: Program, producer: dict, deps: dict, n: int, ref):
    """``ref`` as a sum of parts each linear in one leaf: ``(parts, straight)`` with parts
    ``("id", (leaf, chain), scales)`` (``θ'``) or ``("dot", k, scales)`` (equation ``k``, a
    ``dot_general`` of aliases of leaves, each times scalars with no gradient, and values
    with no gradient), each times the
    scalars ``scales`` (``(ref, inverse)``: ``alpha / r * (A @ B)``, ``W0 - A @ B``) that
    carry no gradient; ``straight`` when a part carries a value with no gradient (a
    straight-through estimator); None if not of that form."""
    if not isinstance(ref, Var) or not deps.get(ref):
        return [], False  # no gradient reaches a leaf through it
    theta = _alias_of_leaf(program, producer, n, ref)
    if theta is not None:
        return [("id", theta, ())], False
    k = producer.get(ref)
    if k is None:
        return None
    e = program.eqns[k]
    grads = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and deps.get(r)]
    if e.primitive.name == "dot_general":
        (_, (lb, _)) = e.params["dimension_numbers"]
        leaves = [_scaled_alias(program, producer, deps, n, e.ins[i]) for i in grads]
        return ([("dot", k, ())], False) if not lb and None not in leaves else None
    shape = tuple(e.out_avals[0].shape)
    name = e.primitive.name
    scaled = lambda got, sc: None if got is None else (
        [(kind, x, (*fs, sc)) for kind, x, fs in got[0]], got[1]
    )  # fmt: skip
    if name in ("add", "sub") and grads:
        if any(tuple(e.in_avals[i].shape) != shape for i in grads):
            return None  # (a gradient broadcast to the sum)
        parts, straight = [], False
        for i in grads:
            got = _summands(program, producer, deps, n, e.ins[i])
            if name == "sub" and i == 1:
                got = scaled(got, (Const(-1.0), False))
            if got is None:
                return None
            parts, straight = parts + got[0], straight or got[1]
        # Straight-through: the value changed by one of the part's own leaves, with no
        # gradient (θ + stop_gradient(q(θ) - θ)); else θ' + c.
        rest = [r for i, r in enumerate(e.ins) if i not in grads]
        own = {x[0] for kind, x, _ in parts if kind == "id"}
        return parts, straight or bool(own & _read_leaves(program, producer, n, rest))
    if name == "neg":
        return scaled(_summands(program, producer, deps, n, e.ins[0]), (Const(-1.0), False))
    if name in ("mul", "div") and len(grads) == 1 and (name == "mul" or grads == [0]):
        q = grads[0]
        if tuple(e.in_avals[1 - q].shape) == () and tuple(e.in_avals[q].shape) == shape:
            inner = _summands(program, producer, deps, n, e.ins[q])
            return scaled(inner, (e.ins[1 - q], name == "div"))  # (a scalar, no gradient)
    if len(grads) == 1 and identity_tangent(e, grads[0]):
        inner = _summands(program, producer, deps, n, e.ins[grads[0]])
        if inner is None:
            return None
        # (as for a sum: a custom_jvp of θ alone, a straight-through rounding)
        own = {x[0] for kind, x, _ in inner[0] if kind == "id"}
        rest = [r for i, r in enumerate(e.ins) if i != grads[0]]
        straight = not rest or bool(own & _read_leaves(program, producer, n, rest))
        return inner[0], inner[1] or straight
    return None


def _read_leaves(program: Program, producer: dict, n: int, refs) -> set:
    """The parameter leaves the values ``refs`` are computed from (gradient or not)."""
    out, seen, todo = set(), set(), [r for r in refs if isinstance(r, Var)]
    while todo:
        r = todo.pop()
        if r in seen:
            continue
        seen.add(r)
        if r in program.invars[:n]:
            out.add(program.invars.index(r))
        elif r in producer:
            todo.extend(x for x in program.eqns[producer[r]].ins if isinstance(x, Var))
    return out


def _folded_use(program: Program, u: Use, e: Eqn, p: int, chain: tuple, what: str, scales):
    """Use ``u`` of ``W_eff = ... + θ' · M + ...`` (``e`` the ``dot_general`` making the part,
    ``θ' = e.ins[p]`` the alias of a leaf through ``chain``) as a use of that leaf: ``op`` on
    ``θ'`` with ``M`` folded into ``A`` or ``G`` (see :class:`Fold`), or None where no fold is
    written (a use that is not dense, batch axes, a chain that is not transposes only)."""
    if u.kind != "dense" or u.split >= 0 or u.select or any(lv.stacked for lv in u.levels):
        return None
    ndim = len(e.out_avals[0].shape)
    perm = use_perm(program, u, ndim)  # use operand axis i is W_eff axis perm[i]
    (lc, rc), (lb, rb) = u.op.params["dimension_numbers"]
    (ec0, ec1), (eb0, eb1) = e.params["dimension_numbers"]
    if perm is None or lb or rb or eb0 or eb1:
        return None
    names = iter(string.ascii_letters)
    pu, ou = u.pos, 1 - u.pos
    lab = [[None] * len(a.shape) for a in u.op.in_avals]
    for d0, d1 in zip(lc, rc, strict=True):
        lab[0][d0] = lab[1][d1] = next(names)
    lab = [[x or next(names) for x in side] for side in lab]
    y = [x for q in (0, 1) for d, x in enumerate(lab[q]) if d not in (lc, rc)[q]]
    x_lab, w_lab = lab[ou], lab[pu]
    eff = [None] * ndim
    for i, w in enumerate(perm):
        eff[w] = w_lab[i]
    rl = [[None] * len(a.shape) for a in e.in_avals]
    for d0, d1 in zip(ec0, ec1, strict=True):
        rl[0][d0] = rl[1][d1] = next(names)
    free = [[d for d in range(len(rl[q])) if d not in (ec0, ec1)[q]] for q in (0, 1)]
    for label, (side, d) in zip(eff, [(q, d) for q in (0, 1) for d in free[q]], strict=True):
        rl[side][d] = label
    t_lab, m_lab = rl[p], rl[1 - p]
    m_free = [m_lab[d] for d in free[1 - p]]
    sizes = {}
    for labels, a in [*zip(lab, u.op.in_avals, strict=True), *zip(rl, e.in_avals, strict=True)]:
        sizes.update(zip(labels, a.shape, strict=True))
    j = "".join
    if m_free and all(x in x_lab for x in m_free):  # M meets X: folded into A
        kept = [x for x in x_lab if x not in m_lab] + [x for x in m_lab if x not in x_lab]
        a_spec = f"...{j(x_lab)},{j(m_lab)}->...{j(kept)}"
        side = "A"
    elif all(x in y and x not in x_lab for x in m_free):  # M meets the output: into G
        kept, a_spec, side = x_lab, "", "G"
    else:
        return None
    ops = [None, None]
    ops[ou], ops[pu] = kept, t_lab
    shared = [x for x in ops[0] if x in ops[1]]
    dn = (
        (tuple(ops[0].index(x) for x in shared), tuple(ops[1].index(x) for x in shared)),
        ((), ()),
    )
    z = [x for q in (0, 1) for x in ops[q] if x not in shared]
    if side == "G":
        g_spec = f"...{j(y)},{j(m_lab)}->...{j(z)}"
        if not set(z) <= set(y) | set(m_lab):
            return None
    else:
        g_spec = "" if z == y else f"...{j(y)}->...{j(z)}"
        if sorted(z) != sorted(y):
            return None
    avals = [
        shaped(tuple(sizes[x] for x in o), a.dtype) for o, a in zip(ops, u.op.in_avals, strict=True)
    ]
    out = [shaped(tuple(sizes[x] for x in z), u.op.out_avals[0].dtype)]
    params = {**u.op.params, "dimension_numbers": dn}
    op = dataclasses.replace(u.op, params=params, in_avals=avals, out_avals=out)
    fold = Fold(f"{what} (folded into {side})", e.ins[1 - p], a_spec, g_spec, scales)
    if u.site == "":
        return dataclasses.replace(u, op=op, chain=chain, fold=fold)
    nest = tuple(dataclasses.replace(lv, chain=()) for lv in u.nest)
    return dataclasses.replace(u, op=op, chain=(), pre_chain=chain, nest=nest, fold=fold)


def summed_weights(program: Program, n: int, outputs, deps: dict, uses: dict, skip) -> tuple:
    """Effective weights that are sums of parts each linear in one leaf (see :class:`Fold`):
    ``(leaf -> [Use], the effective weights taken)`` for the leaves whose every used
    effective weight is one of these.

    ``W_eff = θ' + c`` (``c`` with no gradient, any number of identity-Jacobian steps:
    the straight-through estimator), ``W0 + A @ B`` (merged LoRA; ``W0`` as it is, ``A`` and
    ``B`` folded; ``W0 + alpha / r * (A @ B)``, ``W0 - A @ B``: each part times scalars with
    no gradient, folded into ``G``): each part's leaf gets the uses of
    ``W_eff``, as they are (``θ'``, any fast use outside a scanned-over slice; a lookup at
    the top level only) or folded (``θ' · M``, a dense use, see :func:`_folded_use`). A
    leaf in several parts or weights has every one (tied uses).
    """
    producer = {o: k for k, e in enumerate(program.eqns) for o in e.outs}
    found: dict = {}  # v -> [(leaf, [Use])]
    for v, out in enumerate(outputs):
        us = uses.get(n + v, [])
        got = _summands(program, producer, deps, n, out) if us and v not in skip else None
        if not got or not got[0]:
            continue
        parts, straight = got
        per, ok = [], True
        for kind, x, scales in parts:
            times = " times a scalar" if scales else ""
            if kind == "id":
                plain = all(
                    u.split < 0
                    and not any(lv.stacked for lv in u.levels)
                    and (u.kind != "gather" or (u.site == "" and not scales))
                    for u in us
                )
                what = "straight-through" if straight else "a summand"
                fold = Fold(f"{what} (identity Jacobian{times})", scales=scales)
                per.append(
                    (x[0], [dataclasses.replace(lead_chain(u, x[1]), fold=fold) for u in us])
                )
                ok = ok and plain
                continue
            e = program.eqns[x]
            for p in (0, 1):
                got = _scaled_alias(program, producer, deps, n, e.ins[p])
                if got is None:
                    continue
                theta, own = got
                m = e.ins[1 - p]
                is_leaf = _scaled_alias(program, producer, deps, n, m) is not None
                own = (*scales, *own)  # (M's scalars are in its value)
                times = " times a scalar" if own else ""
                what = (
                    f"times {'a parameter' if is_leaf else 'an example-independent'} matrix "
                    f"on the {'right' if p == 0 else 'left'}{times}"
                )
                folded = [_folded_use(program, u, e, p, theta[1], what, own) for u in us]
                ok = ok and None not in folded
                per.append((theta[0], folded))
        if ok:
            found[v] = per
    found = _closed(found, deps, outputs, uses, n)
    out: dict = {}
    for per in found.values():
        for j, us in per:
            out.setdefault(j, []).extend(us)
    return out, tuple(found)


def _closed(found: dict, deps: dict, outputs, uses: dict, n: int) -> dict:
    """``found`` (effective weight -> its parts, each starting with a leaf ``j``) without the
    weights whose leaves reach a used effective weight not taken, until none is left: a leaf
    is taken only if every used effective weight it reaches is."""
    while True:
        drop = {
            v for v, parts in found.items() for part in parts
            if any(w not in found and part[0] in deps.get(o, ()) and uses.get(n + w)
                   for w, o in enumerate(outputs))
        }  # fmt: skip
        if not drop:
            return found
        found = {v: x for v, x in found.items() if v not in drop}


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
    perms = [use_perm(program, u, ndim) for u in us]
    return None if any(p is None for p in perms) else perms


def lead_chain(u: Use, chain: tuple) -> Use:
    """The use ``u`` of an effective weight as a use of the leaf it is an alias of through
    ``chain`` (top-level alias equations): ``chain`` put before the use's own (its chain at
    the top level; inside frames, its chain to the outermost frame's operand)."""
    if u.site == "":
        return dataclasses.replace(u, chain=(*chain, *u.chain))
    return dataclasses.replace(u, pre_chain=(*chain, *u.pre_chain))


def _centred(program: Program, producer: dict, top: set, n: int, ref, shape):
    """``((leaf, chain), (m, axes, False))`` when ``ref = θ' - m`` (``θ'`` an alias of a leaf,
    ``m`` of size 1 along the axes it is broadcast along: a per-channel mean), else
    ``(None, None)``."""
    k = producer.get(ref) if isinstance(ref, Var) else None
    if k is None or ref in top or program.eqns[k].primitive.name != "sub":
        return None, None
    e = program.eqns[k]
    theta = _alias_of_leaf(program, producer, n, e.ins[0])
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


@dataclasses.dataclass(frozen=True)
class Transform:
    """The example-independent transformation ``W_eff = f(θ)`` of reparametrised leaves.

    ``leaves`` are the parameter leaves whose gradient goes through its VJP, ``outputs`` the
    effective weights (values of the top-level program that ordinary equations read; index
    ``num_params + v`` in :attr:`uses`), ``names`` the primitives it applies (for the plan),
    ``reads`` leaf -> the effective weights it reaches, ``uses`` the captured uses of both,
    ``blocks`` per effective weight the axes it is separable along (see
    :func:`separable_axes`).

    ``scaled``: the effective weights ``v`` of the form ``θ' ⊙ Π_k F_k`` whose leaf ``θ`` takes
    the scaled route (a fast leaf, its uses carrying their :class:`Scale` s), as ``v -> leaf``,
    and ``v -> -1`` for concatenations and sums (:func:`selected_weights`,
    :func:`summed_weights`: their leaves fast); their per-example gradients are never
    formed. ``factors``: the values ``F_k`` of those weights that parameter leaves make (a
    scale ``s``, weight norm's ``g``): their per-example gradients come from ``A``, ``G`` and
    ``θ'`` (see ``operands``), then go through the VJP.
    """

    leaves: tuple
    outputs: tuple  # of Var
    avals: tuple
    names: dict  # leaf -> the primitives applied to it
    reads: dict
    # leaf -> its direct fast uses, and effective weight ``num_params + v`` -> its uses
    uses: dict = dataclasses.field(default_factory=dict)
    blocks: tuple = ()  # per effective weight, the axes it is separable along
    scaled: dict = dataclasses.field(default_factory=dict)  # v -> its scaled leaf
    factors: tuple = ()  # of Var: the factors of scaled weights made of leaves
    # The effective weights whose per-example gradients are formed: used, and not scaled.
    formed: tuple = ()
    declined: dict = dataclasses.field(default_factory=dict)  # v -> why not scaled

    def apply(self, program: Program, values: dict):
        """The formed effective weights, then the factors, from ``values`` (top-level input
        Var -> value)."""
        wanted = [self.outputs[v] for v in self.formed] + list(self.factors)
        return eval_known(program, values, wanted)


# Primitives applied entry by entry (operands of one shape, or of size 1 along an axis that
# is broadcast): slice c of the result along an axis reads slice c of every operand.
_ELEMENTWISE = frozenset(
    "add sub mul div neg max min pow integer_pow sqrt rsqrt cbrt exp exp2 log log1p tanh "
    "logistic abs sign square sin cos erf convert_element_type copy copy_p select_n "
    "clamp".split()
)


def separable_axes(program: Program, region, n: int, output: Var) -> tuple:
    """The axes of an effective weight ``W_eff = f(θ)`` along which ``f`` is *separable*:
    slice ``c`` of ``W_eff`` along axis ``d`` depends only on slice ``c`` of every leaf it
    reads, along one axis of that leaf (e.g. the output channels of a weight-standardised or
    weight-normalised kernel: ``W_eff[..., o] = f(θ[..., o], g_o)``), so ``J_f`` is block
    diagonal with one block per index of ``d``.

    Read off the equations conservatively (for the plan). Every value records, per axis and
    per leaf it depends on, the leaf's axis aligned with it, or None (broken):
    entry-by-entry primitives (:data:`_ELEMENTWISE`) keep an alignment their operands agree
    on, an axis broadcast from size 1 breaks it (the slices share those entries); transposes,
    unit-axis reshapes, ``broadcast_in_dim`` and reductions (over other axes) carry it; any
    other primitive, or a leaf's scalar read by every entry, breaks every axis.
    """
    info = alignments(program, region, n)
    if output not in info:
        return ()
    shape = program_aval(program, output).shape
    return tuple(
        d
        for d, axis in enumerate(info[output])
        if shape[d] > 1 and axis and all(a is not None for a in axis.values())
    )


def alignments(program: Program, region, n: int) -> dict:
    """Per value of the transformation, per axis, ``{leaf: the leaf's axis aligned with it}``
    (None: broken), as :func:`separable_axes` reads them."""
    info: dict = {}  # Var -> per axis {leaf: aligned leaf axis | None}
    for e in program.eqns:
        for r, a in zip(e.ins, e.in_avals, strict=True):
            if r in program.invars[:n] and r not in info:
                j = program.invars.index(r)
                info[r] = tuple({j: d} for d in range(len(a.shape)))
    steps = set(region)
    for k, e in enumerate(program.eqns):
        ins = [info.get(r) if isinstance(r, Var) else None for r in e.ins]
        if not any(x is not None for x in ins):
            continue
        if k not in steps and not (
            RULES.get(e.primitive.name, other) in ALIAS_RULES and is_alias(e)
        ):
            continue  # not part of f (``stop_gradient``: no gradient reaches the leaf)
        leaves = {j for x in ins if x is not None for axis in x for j in axis}
        for o, a in zip(e.outs, e.out_avals, strict=True):
            if not jax.numpy.issubdtype(a.dtype, jax.numpy.inexact):
                continue  # integers carry no gradient
            aligned = _aligned(e, ins) if len(e.outs) == 1 else None
            if aligned is None:
                aligned = tuple(dict.fromkeys(leaves) for _ in a.shape)
            info[o] = aligned
    return info


def _aligned(e: Eqn, ins: list):
    """:func:`separable_axes`' alignments of one equation's result from its operands', or
    None where every axis is broken."""
    out_shape = tuple(e.out_avals[0].shape)
    name = e.primitive.name

    def widen(x, shape, dims):  # operand axis i -> result axis dims[i]
        leaves = {j for axis in x for j in axis}
        out = [dict.fromkeys(leaves) for _ in out_shape]
        for i, d in enumerate(dims):
            if shape[i] == out_shape[d]:  # (else broadcast from size 1: shared, broken)
                out[d] = dict(x[i])
        return out

    if name in _ELEMENTWISE:
        out = [{} for _ in out_shape]
        for x, a in zip(ins, e.in_avals, strict=True):
            if x is None:
                continue  # a value no leaf reaches: a constant scale or mask
            if len(a.shape) != len(out_shape):
                return None  # a leaf's scalar, read by every entry
            for merged, axis in zip(out, widen(x, a.shape, range(len(out_shape))), strict=True):
                for j, ax in axis.items():
                    merged[j] = ax if merged.get(j, ax) == ax else None
        return tuple(out)
    if len(ins) != 1:
        return None
    x, shape = ins[0], tuple(e.in_avals[0].shape)
    if name == "broadcast_in_dim":
        return tuple(widen(x, shape, e.params["broadcast_dimensions"]))
    if name == "transpose":
        return tuple(x[p] for p in e.params["permutation"])
    if name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod"):
        return tuple(x[d] for d in range(len(shape)) if d not in set(e.params["axes"]))
    if name in ("reshape", "squeeze", "expand_dims") and [s for s in shape if s != 1] == [
        s for s in out_shape if s != 1
    ]:  # only unit axes added or removed: the other axes keep their alignment, in order
        kept = iter([x[d] for d in range(len(shape)) if shape[d] != 1])
        leaves = {j for axis in x for j in axis}
        return tuple(next(kept) if s != 1 else dict.fromkeys(leaves) for s in out_shape)
    return None


def find_region(program: Program, n: int, exact: set, top: set) -> tuple:
    """The reparametrisation: equations that read parameters, do not depend on the example
    and are not rules of their own (aliases, fast uses with an example-independent output,
    ``stop_gradient``); its *outputs*, the results that other equations (or loops, branches)
    read; and for every value the parameter leaves it is made of.

    Returns ``(region equation indices, outputs, deps)``.
    """
    deps: dict = {v: frozenset({j}) for j, v in enumerate(program.invars[:n]) if j not in exact}
    region: list = []
    dead = dead_equations(program)  # (no gradient through them: not part of f)
    for k, e in enumerate(program.eqns):
        if k in dead:
            continue
        d = frozenset().union(*(deps.get(r, frozenset()) for r in e.ins if isinstance(r, Var)))
        # (An example-dependent input with example-independent outputs, a loop reading the
        # example whose outputs do not depend on it, is read by its own rule instead.)
        if not d or any(r in top for r in (*e.outs, *e.ins) if isinstance(r, Var)):
            continue
        rule = rule_of(e.primitive.name)
        if rule is ignore or (rule in ALIAS_RULES and is_alias(e)):
            if rule is not ignore:
                deps[e.outs[0]] = d
            continue
        positions = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and r in deps]
        if rule is use and classify(e, positions) is not None:
            continue  # a fast use whose output is the same for every example (batched=False)
        region.append(k)
        for o, a in zip(e.outs, e.out_avals, strict=True):
            if jax.numpy.issubdtype(a.dtype, jax.numpy.inexact):  # no gradient through ints
                deps[o] = d
    # (Integer results carry no gradient: not followed, their readers are not uses.)
    made = {o for k in region for o in program.eqns[k].outs if o in deps}
    outputs, seen = [], set()
    for k, e in enumerate(program.eqns):
        if k in region:
            continue
        for r in e.ins:
            if isinstance(r, Var) and r in made and r not in seen:
                seen.add(r)
                outputs.append(r)
    for r in program.outs:
        if isinstance(r, Var) and r in made and r not in seen:
            seen.add(r)
            outputs.append(r)
    return region, outputs, deps
