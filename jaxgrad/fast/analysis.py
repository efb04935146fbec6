"""The analysis of a per-example loss: every parameter leaf's route, decided once.

:func:`analyse` traces the loss (:mod:`jaxgrad.fast.program`), moves loop-invariant
transformations of parameters out of scan bodies (:mod:`jaxgrad.fast.hoist`), finds which
values depend on the example (:mod:`jaxgrad.fast.dependence`), the reparametrisation and its
effective weights (:mod:`jaxgrad.fast.reparam`), walks every frame for fast uses
(:mod:`jaxgrad.fast.trace`), and returns an :class:`Analysis` that the fast pass executes and
the plan prints.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from jaxgrad.fast.dependence import scan_body_varying, varying
from jaxgrad.fast.hoist import hoist_invariants
from jaxgrad.fast.program import (
    Program,
    closure_error,
    is_complex,
    program_aval,
    shape_struct,
    trace_program,
)
from jaxgrad.fast.reparam import Transform, find_region, lead_chain, separable_axes
from jaxgrad.fast.scaled import scaled_weights, selected_weights
from jaxgrad.fast.summed import summed_weights
from jaxgrad.fast.trace import Found, Frame, Track, Use, walk


@dataclasses.dataclass
class Analysis:
    program: Program
    num_params: int
    fast: dict  # leaf index -> list[Use], the leaves on a fast route
    exact: list  # leaf indices with a per-example copy
    unused: list  # leaf indices nothing reads (zero gradient)
    # leaf index -> why it takes the exact route (one line per distinct reason)
    reasons: dict = dataclasses.field(default_factory=dict)
    transform: Transform | None = None  # reparametrised leaves, if any
    # Why the program cannot be differentiated again (program.closure_error): then every
    # leaf's per-example gradient is materialised by vmap(grad); "" otherwise.
    materialise: str = ""

    @property
    def uses(self) -> dict:
        """Every captured use by leaf: the fast leaves', the reparametrised leaves' direct
        uses and the effective weights' (index ``num_params + v``)."""
        return {**self.fast, **(self.transform.uses if self.transform is not None else {})}

    @property
    def captured(self) -> dict:
        """Capture key (:attr:`Use.key`) -> (leaf, Use) for every captured use."""
        return {u.key: (j, u) for j, uses in self.uses.items() for u in uses}

    @property
    def reparam(self) -> tuple:
        """The leaves whose gradient goes through :attr:`transform`."""
        return self.transform.leaves if self.transform is not None else ()


def _as_use(f: Found, program: Program) -> Use:
    """A top-level :class:`Found` as a :class:`Use`."""
    common = dict(op=f.op, base=f.base, split=f.split, source=f.source)
    if not f.levels:
        return Use(f.kind, f.path[0], f.pos, f.chain, chain_program=program, **common)
    first, *rest = f.levels  # the outermost frame's fields (see :attr:`Use.levels`)
    return Use(
        f.kind, f.path[0], f.pos, first.chain, scan=f.path, chain_program=first.body,
        stacked=first.stacked, steps=first.steps, step_axis=first.step_axis, site=first.frame,
        pre_chain=f.chain, nest=tuple(rest), operand=f.root.operand, **common,
    )  # fmt: skip


def analyse(fn, params, example) -> Analysis:
    """Traces ``fn(params, example)`` (per example) and classifies every parameter's uses.

    The exact leaves (per-example copies) make more values example-dependent, which can
    take equations out of the reparametrisation: the walk is repeated until the set of exact
    leaves is stable (it only grows; one walk for most programs, two with a bias).

    Args:
      fn: ``fn(params, example) -> outputs`` for ONE example.
      params, example: arrays or ``jax.ShapeDtypeStruct`` of one example.

    Returns:
      An :class:`Analysis`; ``program`` takes ``(*param_leaves, *example_leaves)``.
    """
    program, n = trace_program(fn, params, example)
    avals = [shape_struct(x) for x in jax.tree_util.tree_leaves((params, example))]
    if why := closure_error(program):  # every leaf materialised (vmap_pass)
        reasons = dict.fromkeys(range(n), why)
        return Analysis(program, n, {}, list(range(n)), [], reasons, materialise=why)
    # Transformations of parameters repeated at every step of a scan: moved before the loop.
    program = hoist_invariants(program, n, avals)
    exact: set = set()
    while True:
        an, more = _analyse_once(program, n, exact)
        if not more:
            return an
        exact |= more


def _unless_too_deep(read, empty, transformed):
    """``read()``, a form of effective weight (scaled, selected, summed) read recursively
    through the equations, for the ``transformed`` leaves; ``empty`` where there are none, or
    where the chain is deeper than Python's recursion limit (hundreds of chained scalings,
    a Newton-Schulz iteration unrolled 300 times): those weights keep the VJP route, exact."""
    if not transformed:
        return empty
    try:
        return read()
    except RecursionError:
        return empty


def _analyse_once(program: Program, n: int, exact: set) -> tuple:
    """One walk with the leaves ``exact`` given per-example copies: the analysis, and the
    leaves that must be added to ``exact`` (none when it is final)."""
    inputs = set(program.invars[n:]) | {program.invars[j] for j in exact}
    top = varying(program, inputs)
    region, outputs, deps, held = find_region(program, n, exact, top)
    tracked = {v: Track(j) for j, v in enumerate(program.invars[:n])}
    tracked.update({v: Track(n + i) for i, v in enumerate(outputs)})
    frame = walk(Frame(program, tracked, "top", region=frozenset(region)))
    other = {j: list(ws) for j, ws in frame.reasons.items()}
    avals = [program_aval(program, v) for v in outputs]
    for i, a in enumerate(avals):  # the rules' real forms assume a real parameter operand
        if is_complex(a):
            other.setdefault(n + i, []).append("a complex-valued effective weight")
    # An effective weight with an ordinary use that is not fast: the leaves it is made of
    # take the exact route (then the transformation is example-dependent and the walk redone).
    more = {j for i, v in enumerate(outputs) if n + i in other for j in deps[v]} - exact
    more |= {j for j in other if j < n} - exact
    if more:
        return None, more
    uses: dict = {}
    cache: dict = {}  # scan path -> the body's example-dependent values
    for f in frame.found:
        u = _as_use(f, program)
        u = dataclasses.replace(u, batched=_batched(program, u, top, cache))
        uses.setdefault(f.leaf, []).append(u)
    reads = {j: tuple(i for i, v in enumerate(outputs) if j in deps[v]) for j in range(n)}
    transformed = sorted(j for j in frame.transformed if j < n and reads[j])
    names = _transformation_names(program, region, deps, transformed)
    forms = _unless_too_deep(
        lambda: _reparametrised_forms(program, n, top, region, outputs, deps, uses, names),
        _NO_FORMS,
        transformed,
    )
    fast, exact_l, unused = {}, sorted(exact), []
    for j in range(n):
        if j in exact or (j in transformed and j not in forms.uses):
            continue
        if uses.get(j) or forms.uses.get(j):
            fast[j] = uses.get(j, []) + forms.uses.get(j, [])
        else:
            unused.append(j)
    transform = None
    if transformed:
        transform = _transform(program, n, region, outputs, uses, reads, names, forms, held)
    reasons = {j: "; ".join(dict.fromkeys(other.get(j, ["(a per-example copy)"]))) for j in exact_l}
    return Analysis(program, n, fast, exact_l, unused, reasons, transform), set()


def _transformation_names(program: Program, region, deps, transformed) -> dict:
    """Leaf -> the primitives of the transformation region that read it (for the plan)."""
    return {
        j: tuple(
            dict.fromkeys(
                program.eqns[k].primitive.name
                for k in sorted(region)
                if any(j in deps.get(o, ()) for o in program.eqns[k].outs)
            )
        )
        for j in transformed
    }


class _Forms(NamedTuple):
    """The effective weights read in a factored form (scaled, selected, summed)."""

    uses: dict  # leaf -> its uses through those forms
    scalings: dict  # effective weight -> (leaf, chain, per-use scales, term)
    selections: tuple  # effective weights read as selections
    sums: tuple  # effective weights read as sums
    declined: dict  # why a scaling was not taken


_NO_FORMS = _Forms({}, {}, (), (), {})


def _reparametrised_forms(program, n, top, region, outputs, deps, uses, names) -> _Forms:
    """Effective weights a leaf reaches through a structured transformation, whose uses stay
    factored: ``θ' ⊙ Π F_k`` (scaled, see :class:`jaxgrad.fast.scaled.Scale`), selections
    and concatenations, sums of parts linear in one leaf (see ``Fold``). A leaf read in two
    of these forms takes the VJP route."""
    scalings, declined = scaled_weights(program, n, top, region, outputs, deps, uses)
    selected, selections = selected_weights(program, n, outputs, deps, uses, scalings)
    factor_leaves = {
        j for x in scalings.values() for ss in x[2].values() for sc in ss for j in sc.leaves
    }
    if set(selected) & ({x[0] for x in scalings.values()} | factor_leaves):
        selected, selections = {}, ()  # (a leaf both scaled and selected: the VJP route)
    summed, sums = summed_weights(program, n, outputs, deps, uses, {*scalings, *selections})
    if set(summed) & ({x[0] for x in scalings.values()} | factor_leaves | set(selected)):
        summed, sums = {}, ()  # (a leaf also scaled or selected: the VJP route)
    forms: dict = {}
    for j, us in [*selected.items(), *summed.items()]:
        forms.setdefault(j, []).extend(dataclasses.replace(u, via=names[j]) for u in us)
    for v, (j, chain, per_use, term) in scalings.items():
        forms.setdefault(j, []).extend(
            _through_theta(u, chain, per_use[u.key], names[j], term) for u in uses[n + v]
        )
    return _Forms(forms, scalings, selections, sums, declined)


def _transform(program, n, region, outputs, uses, reads, names, forms: _Forms, held):
    """The :class:`Transform` of the leaves read transformed: those not in a factored form
    go through the transformation's VJP."""
    transformed = sorted(names)
    through = {j: uses.get(j, []) for j in transformed if j not in forms.uses}
    through.update({n + i: uses.get(n + i, []) for i in range(len(outputs))})
    through_leaves = tuple(j for j in transformed if j not in forms.uses)
    factors = tuple(
        dict.fromkeys(
            sc.ref
            for us in forms.uses.values()
            for u in us
            for sc in u.scale
            if sc.leaves & set(through_leaves)
        )
    )
    structured = {*forms.scalings, *forms.selections, *forms.sums}
    return Transform(
        through_leaves,
        tuple(outputs),
        tuple(program_aval(program, v) for v in outputs),
        names,
        {j: reads[j] for j in transformed},
        through,
        tuple(separable_axes(program, region, n, v) for v in outputs),
        {
            **{v: x[0] for v, x in forms.scalings.items()},
            **dict.fromkeys(forms.selections, -1),
            **dict.fromkeys(forms.sums, -1),
        },
        factors,
        tuple(v for v in range(len(outputs)) if v not in structured and uses.get(n + v)),
        forms.declined,
        held,
    )


def _through_theta(u: Use, chain: tuple, scale: tuple, via: tuple, term) -> Use:
    """The use ``u`` of a scaled effective weight as a use of its leaf θ (``θ'`` its alias
    through ``chain``, see :func:`jaxgrad.fast.reparam.lead_chain`), with the factors
    ``scale`` (see :class:`jaxgrad.fast.scaled.Scale`)."""
    return dataclasses.replace(
        lead_chain(u, chain), scale=scale, via=via, theta_term=term, theta_chain=len(chain)
    )


def _batched(program: Program, u: Use, top: set, cache: dict) -> bool:
    """Whether a use's output differs between examples, as ``vmap`` batches it (at some
    step, for a use in a scan: read level by level, outermost first). A use in a branch or a
    custom rule, at any depth, is taken as batched (its perturbation is added, never the tap,
    see ``capture._capture``: exact either way, see ``Use.batched``)."""
    if u.site == "":
        return program.eqns[u.eqn].outs[0] in top
    if not all(lv.is_scan for lv in u.levels):
        return True
    path, eqn, outer = u.scan[:1], program.eqns[u.scan[0]], top
    for body in [u.chain_program, *(lv.body for lv in u.nest)]:
        if path not in cache:
            cache[path] = scan_body_varying(eqn, body, outer)
        outer = cache[path]
        eqn = body.eqns[u.scan[len(path)]]
        path = u.scan[: len(path) + 1]
    return eqn.outs[0] in outer
