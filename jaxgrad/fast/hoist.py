"""Example-independent transformations of parameters, hoisted out of ``lax.scan`` bodies.

A step function often transforms a parameter it closes over at every step: weight
normalisation ``g · V / ‖V‖`` or weight standardisation inside a Flax or Equinox cell, a mask
``W * M``, Flax's ``OptimizedLSTMCell`` concatenating its kernels. The result is the same at
every step and for every example: an example-independent transformation ``W_eff = f(θ)``
written inside the loop. Moved before the loop (its values become new consts of the scan),
it is an ordinary top-level transformation, read by :mod:`jaxgrad.fast.reparam` (scaled or
selected, :mod:`jaxgrad.fast.scaled`, or through ``f``'s VJP) with its uses in the loop's
body; left in the body, the parameter would be "used by `mul`" there and take the exact
fallback.

:func:`hoist_invariants` moves, from every scan body (at the top level or in another scan's
body, at any depth, the inner loops first), the equations that

* read only the scan's consts (or values hoisted with them), constants and literals,
* do not depend on the example (:mod:`jaxgrad.fast.dependence`, as ``vmap`` batches), and
* are a *transformation* of a parameter — an equation reading a value made of parameter
  leaves that is not an alias, ignored, a fast use or a frame (see :mod:`jaxgrad.fast.trace`)
  — or an input of one (an iota, a constant mask built in the body).

The same holds for a scan *over* stacked parameters (a layer stack run by ``lax.scan``, as
``flax.linen.scan`` runs one): what the body makes of the slices ``W_l`` it is scanned over
(and of its consts) alone — a merged LoRA ``W0_l + A_l B_l``, a standardised kernel — is a
function of the step, the same for every example. Those equations (the rule above with the
example-independent slices counted as known) are moved before the loop
as one ``jax.vmap`` over the stacked axis, and the loop reads their stacked results as more
``xs`` (a reverse scan reads step ``t`` of the same stacks): the stacked
effective weight is then an ordinary top-level transformation too. Only where the stacks are
no larger than the parameter slices they read plus, for a group that reads such slices,
:data:`SHARED_COPIES` copies of the shared parameters they read (those the loop closes over;
:func:`_worth_stacking`): a shared ``S`` gated per layer, ``g_l S``, or a shared base plus
per-layer LoRA, ``S + A_l B``, is ``L`` copies of ``S`` for an ``L``-layer stack, cheaper
than the ``B`` per-example copies its exact fallback makes, but a shared weight transformed
by a constant schedule in a sampler's or solver's loop stays in the loop.

Then the program is re-traced (each equation re-bound with its source line, so the plan still
names the user's lines). A program with nothing to hoist is returned as it is. The values
and gradients are unchanged: the equations are pure and each computes the same value before
the loop as at every step (a scan with no steps is left alone). Nothing leaves a ``cond``
branch, nor a loop inside one: the branch may not run, and what it guards may not be
defined where it does not (a transformation there takes the exact fallback).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math

import jax
from jax._src import source_info_util

from jaxgrad.fast.dependence import scan_body_varying, varying
from jaxgrad.fast.program import (
    Eqn,
    Program,
    Var,
    evaluate,
    flat_jaxpr,
    flatten,
    primitives,
    shaped,
)
from jaxgrad.fast.trace import ALIAS_RULES, classify, ignore, is_alias, rule_of, use

# Fresh numbers for the values this module makes (the re-trace numbers them again).
_fresh = itertools.count(1 << 62)

# How many copies of the shared parameters (those a loop closes over) a scan's per-step
# transformations may stack before the loop. Left in the loop, ``g_l · S`` or ``S + A_l B``
# sends ``S`` (and ``g``, ``A``, ``B``) to the exact fallback: ``B`` per-example copies of ``S``
# and ``B × L`` per-step products. Stacked, it is ``L`` copies of ``S`` made once: fewer
# operations, less memory whenever ``L ≤ B``. The batch is not known when the program is
# planned; 64 copies admit a layer stack (rarely deeper, its batches rarely smaller). Only a
# group that reads the layers' own parameter slices (``g_l``, ``A_l``) gets them: a sampler's
# or solver's loop over a shared weight and a constant schedule (``W · c_t``, ``W0 + t W1``)
# stays in the loop, where stacking measured several times slower than the fallback.
SHARED_COPIES = 64

# Frames: read by the walker through their bodies, never a transformation of their own.
_FRAMES = ("scan", "cond", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def hoist_invariants(program: Program, n: int, in_avals: list) -> Program:
    """``program`` (taking ``n`` parameter leaves, then the example's) with the example-
    independent transformations of its scan bodies moved before their loops (see the module
    docstring).

    Args:
      program: the flattened per-example loss (:func:`jaxgrad.fast.program.trace_program`).
      n: its number of parameter leaves (its first ``n`` inputs).
      in_avals: the abstract values of its inputs.

    Returns:
      The same program, or an equivalent one re-traced and flattened.
    """
    made = set(program.invars[:n])
    moved = _hoist(program, set(program.invars[n:]), made)
    if moved is None:
        return program
    return flatten(_retrace(moved, in_avals))


def _hoist(program: Program, example: set, made: set) -> Program | None:
    """``program`` with its scans' invariants hoisted (None if nothing moved), given its
    example-dependent inputs ``example`` and those made of parameters, ``made``."""
    dep = varying(program, example)
    made = _made_of(program, made)
    eqns, changed = [], False
    for e in program.eqns:
        new = (
            _hoist_scan(e, dep, made)
            if e.primitive.name == "scan" and e.params["length"] > 0
            else None
        )
        changed |= new is not None
        eqns.extend(new if new is not None else [e])
    return dataclasses.replace(program, eqns=eqns) if changed else None


def _made_of(program: Program, made: set) -> set:
    """The values of ``program`` made of parameter leaves, given its inputs that are."""
    out = set(made)
    for e in program.eqns:
        if any(isinstance(r, Var) and r in out for r in e.ins):
            out.update(e.outs)
    return out


def _hoist_scan(e: Eqn, dep: set, made: set) -> list | None:
    """A scan's invariant equations (hoisted from its body, after the body's own scans'), its
    per-step transformations of the slices it is scanned over (computed for every step
    before the loop), then the scan reading their results as more consts and more ``xs``;
    None if nothing moves."""
    p = e.params
    nc, first_x = p["num_consts"], p["num_consts"] + p["num_carry"]
    body = flat_jaxpr(p["jaxpr"])
    inside = scan_body_varying(e, body, dep)
    from_params = {body.invars[q] for q, r in enumerate(e.ins) if isinstance(r, Var) and r in made}
    rewritten = _hoist(body, {v for v in body.invars if v in inside}, from_params)
    body = rewritten if rewritten is not None else body
    in_avals = list(p["jaxpr"].in_avals)
    inside = varying(body, {v for v in body.invars if v in inside})
    made_here = _made_of(body, from_params)
    consts = set(body.invars[:nc])
    moved = _invariant(body, consts, inside, made_here)
    # The slices the loop is scanned over that are the same for every example (a layer
    # stack's W_l, a layer index): what the body makes of them and its consts alone is a
    # function of the step, computed for all the steps at once.
    sliced = {v for v in body.invars[first_x:] if v not in inside}
    stepped = _invariant(body, consts | sliced, inside, made_here, per_step=True) - moved
    avals = dict(zip(body.invars, in_avals, strict=True))
    avals.update(
        (o, a)
        for k in (*moved, *stepped)
        for o, a in zip(body.eqns[k].outs, body.eqns[k].out_avals, strict=True)
    )
    # The values made of parameters that are the same at every step: the consts the loop
    # closes over and what is hoisted of them (a shared weight, its normalised form).
    shared = {v for v in consts if v in from_params}
    shared |= {o for k in moved for o in body.eqns[k].outs if o in made_here}
    stepped = _worth_stacking(
        body, moved, stepped, sliced & from_params, shared, avals, p["length"]
    )
    if not moved and not stepped:
        if rewritten is None:
            return None
        return [dataclasses.replace(e, params={**p, "jaxpr": _retrace(body, in_avals)})]
    # The moved equations, renamed into the enclosing frame: a const of the scan is its
    # operand there, every value made here a fresh one.
    rename = {body.invars[q]: e.ins[q] for q in range(nc)}
    hoisted = []
    for k in sorted(moved):  # (in program order: a set of ints need not iterate sorted)
        b = body.eqns[k]
        outs = [Var(next(_fresh)) for _ in b.outs]
        rename.update(zip(b.outs, outs, strict=True))
        ins = [rename.get(r, r) if isinstance(r, Var) else r for r in b.ins]
        hoisted.append(dataclasses.replace(b, ins=ins, outs=outs))
    kept = [b for k, b in enumerate(body.eqns) if k not in moved and k not in stepped]
    read = _read_by(kept, body.outs)
    new_consts = [o for k in sorted(moved) for o in body.eqns[k].outs if o in read]
    new_xs = [o for k in sorted(stepped) for o in body.eqns[k].outs if o in read]
    stacked = []
    if new_xs:
        outer = {v: (rename[v], avals[v]) for v in rename}  # (consts, hoisted values)
        outer.update(
            (body.invars[q], (e.ins[q], e.in_avals[q])) for q in range(first_x, len(e.ins))
        )
        steps, stacked = _over_steps(body, sorted(stepped), new_xs, sliced, outer, avals)
        hoisted.extend(steps)
    inner = Program([*body.invars[:nc], *new_consts, *body.invars[nc:], *new_xs], body.outs, kept)
    inner_avals = [*in_avals[:nc], *(avals[v] for v in new_consts), *in_avals[nc:]]
    inner_avals += [avals[v] for v in new_xs]
    scan = dataclasses.replace(
        e,
        params={**p, "jaxpr": _retrace(inner, inner_avals), "num_consts": nc + len(new_consts)},
        ins=[*e.ins[:nc], *(rename[v] for v in new_consts), *e.ins[nc:], *stacked],
        in_avals=[
            *e.in_avals[:nc],
            *(avals[v] for v in new_consts),
            *e.in_avals[nc:],
            *(shaped((p["length"], *avals[v].shape), avals[v].dtype) for v in new_xs),
        ],
    )
    return [*hoisted, scan]


def _worth_stacking(
    body: Program, moved: set, ks: set, params: set, shared: set, avals: dict, length: int
) -> set:
    """The equations ``ks`` of a scan body (to be computed for every step) in the groups,
    connected by the values they pass each other, whose stacks (the values the loop goes on
    to read, ``length`` steps of them) are no larger than the slices of parameter stacks
    (``params``) they read, plus, where they read such slices, :data:`SHARED_COPIES` copies
    of the values made of parameters the same at every step (``shared``: the weights the
    loop closes over) they read. A layer stack's ``W0_l + A_l B_l`` (as large as ``W0``'s
    slices), a shared ``S`` gated per layer, ``g_l S``, or ``S + A_l B`` (``L`` copies of
    ``S``) are hoisted; a shared ``W`` scaled by each step's ``c_t`` of a constant schedule
    stays in the loop. ``avals``: the abstract values of the body's values."""
    size = lambda a: math.prod(a.shape)
    producer = {o: k for k in ks for o in body.eqns[k].outs}
    group = {k: k for k in ks}  # union-find over the values passed within ks

    def root(k):  # (iterative, the path compressed: a power iteration is a long chain)
        path = []
        while group[k] != k:
            path.append(k)
            k = group[k]
        group.update(dict.fromkeys(path, k))
        return k

    for k in ks:
        for r in body.eqns[k].ins:
            if isinstance(r, Var) and r in producer:
                group[root(producer[r])] = root(k)
    read = _read_by(
        [b for k, b in enumerate(body.eqns) if k not in moved and k not in ks], body.outs
    )
    made = collections.Counter()
    sliced, whole = collections.defaultdict(set), collections.defaultdict(set)
    for k in ks:
        b = body.eqns[k]
        made[root(k)] += sum(size(a) for o, a in zip(b.outs, b.out_avals, strict=True) if o in read)
        ins = [r for r in b.ins if isinstance(r, Var)]
        sliced[root(k)].update(r for r in ins if r in params)
        whole[root(k)].update(r for r in ins if r in shared)
    # The shared copies only for a layer stack's groups (reading its per-layer slices): a
    # solver's or sampler's ``W0 + t W1`` over a constant schedule, stacked, takes its
    # effective weight's per-example VJP, B × T × |W|, worse than the fallback's B × |W|
    # (measured: 690-1025 ms against 96-165 ms at B = 8, T = 64, D = 256).
    small = {
        g
        for g in made | sliced | whole
        if length * made[g]
        <= length * sum(size(avals[v]) for v in sliced[g])
        + (SHARED_COPIES * sum(size(avals[v]) for v in whole[g]) if sliced[g] else 0)
    }
    return {k for k in ks if root(k) in small}


def _read_by(eqns: list, outs: list) -> set:
    """The values equations ``eqns`` and a body's outputs ``outs`` read: what the loop goes
    on to read of the values hoisted from it."""
    return {r for r in (*(r for b in eqns for r in b.ins), *outs) if isinstance(r, Var)}


def _over_steps(body: Program, ks: list, wanted: list, sliced: set, outer: dict, avals: dict):
    """Equations ``ks`` of a scan body, which read its consts and its slices ``sliced`` of
    stacked parameters, as equations of the enclosing frame computing ``wanted`` for every
    step at once (``jax.vmap`` over the stacked axis; a reverse scan reads step ``t`` of the
    same stacks). Returns the equations and the stacked values of ``wanted``, in order.

    ``outer`` maps the body's inputs (and the values hoisted before the loop) to the
    enclosing frame's values, ``(value, abstract value)``; ``avals``: the body's."""
    eqns = [body.eqns[k] for k in ks]
    made = {o for b in eqns for o in b.outs}
    reads = [r for b in eqns for r in b.ins if isinstance(r, Var) and r not in made]
    reads = list(dict.fromkeys(reads))
    one_step = _retrace(Program(reads, wanted, eqns), [avals[v] for v in reads])
    axes = [0 if v in sliced else None for v in reads]
    run = lambda *a: jax.core.eval_jaxpr(one_step.jaxpr, one_step.consts, *a)
    structs = [jax.ShapeDtypeStruct(outer[v][1].shape, outer[v][1].dtype) for v in reads]
    closed = jax.make_jaxpr(jax.vmap(run, in_axes=axes))(*structs)
    flat = flatten(closed)
    fresh = {v: outer[r][0] for v, r in zip(flat.invars, reads, strict=True)}
    steps = []
    for b in flat.eqns:
        outs = [Var(next(_fresh)) for _ in b.outs]
        fresh.update(zip(b.outs, outs, strict=True))
        ins = [fresh.get(r, r) if isinstance(r, Var) else r for r in b.ins]
        steps.append(dataclasses.replace(b, ins=ins, outs=outs))
    return steps, [fresh[r] if isinstance(r, Var) else r for r in flat.outs]


def _invariant(body: Program, consts: set, inside: set, made: set, *, per_step=False) -> set:
    """The equations of a scan body to hoist: loop-invariant (read only consts and values
    made by such equations), the same for every example, and a transformation of a
    parameter or an input of one (see the module docstring); ``per_step``: to be computed
    for every step under ``jax.vmap`` (see :func:`_may_move`)."""
    inv: list = []
    known = set(consts)
    for k, b in enumerate(body.eqns):
        if (
            all(not isinstance(r, Var) or r in known for r in b.ins)
            and not any(o in inside for o in b.outs)
            and b.outs
            and _may_move(b, per_step=per_step)
        ):
            inv.append(k)
            known.update(b.outs)
    producer = {o: k for k in inv for o in body.eqns[k].outs}
    todo = [k for k in inv if _transforms(body.eqns[k], made)]
    moved: set = set()
    while todo:  # the transformations and every invariant equation they read
        k = todo.pop()
        if k in moved:
            continue
        moved.add(k)
        todo.extend(producer[r] for r in body.eqns[k].ins if isinstance(r, Var) and r in producer)
    return moved


def _transforms(e: Eqn, made: set) -> bool:
    """Whether ``e`` transforms a value made of parameters (the walker's rule for it would
    send the parameter to the exact fallback, or it is an example-independent product of
    two parameters)."""
    positions = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and r in made]
    if not positions or e.primitive.name in _FRAMES or e.primitive.name == "while":
        return False
    rule = rule_of(e.primitive.name)
    if rule is ignore or (rule in ALIAS_RULES and is_alias(e)):
        return False
    return not (rule is use and classify(e, positions) is not None)


def _may_move(e: Eqn, *, per_step: bool) -> bool:
    """Whether equation ``e`` may leave the loop body: not if it, or any jaxpr inside it (a
    ``custom_vjp`` rule, a ``jit``), calls back to the host or prints (an effect of every
    step; ``pure_callback`` has no ``vmap`` rule), nor, computed for every step under
    ``jax.vmap`` (``per_step``), if it draws random bits (an ``rbg`` key's batched bits are
    not the bits it draws step by step: the loss would change)."""
    names = primitives(Program([], [], [e]))
    if any("callback" in n or "print" in n for n in names):
        return False
    draws = lambda n: n.startswith(("random_", "rng_")) or n == "threefry2x32"
    return not (per_step and any(map(draws, names)))


def _retrace(program: Program, in_avals) -> jax.extend.core.ClosedJaxpr:
    """``program`` as a closed jaxpr on inputs ``in_avals``: each equation re-bound with its
    source information (so plans still name the user's lines)."""

    def with_source(k, invals):  # the equation bound as usual, under its user's frame
        e = program.eqns[k]
        src = e.source
        with source_info_util.user_context(
            src.traceback if src is not None else None,
            name_stack=source_info_util.current_name_stack()
            + (src.name_stack if src is not None else source_info_util.new_name_stack()),
        ):
            out = e.primitive.bind(*invals, **e.primitive.get_bind_params(e.params))
        return out if e.primitive.multiple_results else [out]

    structs = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
        for a in in_avals
    ]
    return jax.make_jaxpr(lambda *args: evaluate(program, args, override=with_source))(*structs)
