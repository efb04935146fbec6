"""Reparametrised weights: example-independent transformations ``W_eff = f(θ)`` of parameters.

An equation whose outputs do not depend on the example and that reads a parameter (``W * M``,
``g * V / ‖V‖``, ``W0 + A @ B``, ``concatenate``, a constant scatter ...) is part of an
example-independent *transformation* ``W_eff = f(θ)``. Its results that ordinary equations
read are *effective weights*: followed like leaves (their uses are fast uses), and the per-
example gradient of ``θ`` is ``f``'s VJP applied to the effective weights' per-example
gradients (see :class:`jaxgrad.fast.analysis.Analysis` and ``passes.fast_pass``). The axes an
effective weight is separable along (``J_f`` block diagonal, e.g. per output channel) are read
off the same equations (:func:`separable_axes`) for the plan.

This module finds the transformation (:func:`find_region`) and describes it
(:class:`Transform`, :func:`separable_axes`), and holds what the forms of effective weight
whose leaves need no per-example ``∇_{W_eff}`` share: a leaf read through alias equations
(:func:`alias_of_leaf`), a use of an effective weight as a use of its leaf
(:func:`lead_chain`), and the fixpoint that takes a leaf only if every used effective weight
it reaches is taken (:func:`closed`). Those forms are scaled and selected weights
(``θ' ⊙ Π_k F_k``, concatenated blocks: :mod:`jaxgrad.fast.scaled`) and summed weights
(``Σ_p T_p``, each part linear in one leaf: :mod:`jaxgrad.fast.summed`).
"""

from __future__ import annotations

import dataclasses

import jax

from jaxgrad.fast.program import Eqn, Program, Var, eval_known, program_aval
from jaxgrad.fast.trace import (
    ALIAS_RULES,
    RULES,
    Use,
    classify,
    dead_equations,
    ignore,
    is_alias,
    other,
    rule_of,
    use,
)


def alias_of_leaf(program: Program, producer: dict, n: int, ref):
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


def lead_chain(u: Use, chain: tuple) -> Use:
    """The use ``u`` of an effective weight as a use of the leaf it is an alias of through
    ``chain`` (top-level alias equations): ``chain`` put before the use's own (its chain at
    the top level; inside frames, its chain to the outermost frame's operand)."""
    if u.site == "":
        return dataclasses.replace(u, chain=(*chain, *u.chain))
    return dataclasses.replace(u, pre_chain=(*chain, *u.pre_chain))


def closed(found: dict, deps: dict, outputs, uses: dict, n: int) -> dict:
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
    the scaled route (a fast leaf, its uses carrying their
    :class:`~jaxgrad.fast.scaled.Scale` s), as ``v -> leaf``, and ``v -> -1`` for
    concatenations and sums (:func:`jaxgrad.fast.scaled.selected_weights`,
    :func:`jaxgrad.fast.summed.summed_weights`: their leaves fast); their per-example
    gradients are never formed. ``factors``: the values ``F_k`` of those weights that
    parameter leaves make (a scale ``s``, weight norm's ``g``): their per-example gradients
    come from ``A``, ``G`` and ``θ'`` (see ``operands``), then go through the VJP.
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
    # Results of direct fast uses that ``f`` reads (``σ = u W v`` of ``W / σ``): their
    # gradients are those uses' own, so ``f`` reads them as constants (else counted twice).
    held: frozenset = frozenset()

    def apply(self, program: Program, values: dict):
        """The formed effective weights, then the factors, from ``values`` (top-level input
        Var -> value), the :attr:`held` values constants."""
        wanted = [self.outputs[v] for v in self.formed] + list(self.factors)
        return eval_known(program, values, wanted, self.held)


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

    Returns ``(region equation indices, outputs, deps, held)``: ``held``, the results of the
    fast uses left out of the region (each a direct use of its leaf, whose gradient is its
    own: ``f`` reads them as constants, see :attr:`Transform.held`).
    """
    deps: dict = {v: frozenset({j}) for j, v in enumerate(program.invars[:n]) if j not in exact}
    region: list = []
    held: set = set()
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
            held.update(e.outs)  # a fast use whose output is the same for every example
            continue
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
    return region, outputs, deps, frozenset(held)
