"""Loop-invariant transformations of parameters, hoisted out of ``lax.scan`` bodies.

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
  — or an input of one (an iota, a constant mask built in the body),

and re-traces the program (each equation re-bound with its source line, so the plan still
names the user's lines). A program with nothing to hoist is returned as it is. The values
and gradients are unchanged: the equations are pure and each computes the same value before
the loop as at every step (a scan with no steps is left alone). Nothing leaves a ``cond``
branch, nor a loop inside one: the branch may not run, and what it guards may not be
defined where it does not (a transformation there takes the exact fallback).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
from jax._src import source_info_util

from jaxgrad.fast.dependence import scan_body_varying, varying
from jaxgrad.fast.program import Eqn, Program, Var, evaluate, flat_jaxpr, flatten
from jaxgrad.fast.trace import ALIAS_RULES, classify, ignore, is_alias, rule_of, use

# Fresh numbers for the values this module makes (the re-trace numbers them again).
_fresh = itertools.count(1 << 62)

# Frames: read by the walker through their bodies, never a transformation of their own.
_FRAMES = ("scan", "cond", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def hoist_invariants(program: Program, n: int, in_avals: list) -> Program:
    """``program`` (taking ``n`` parameter leaves, then the example's) with the loop-invariant
    transformations of its scan bodies moved before their loops (see the module docstring).

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
    """A scan's invariant equations (hoisted from its body, after the body's own scans'),
    then the scan reading their results as more consts; None if nothing moves."""
    p = e.params
    nc = p["num_consts"]
    body = flat_jaxpr(p["jaxpr"])
    inside = scan_body_varying(e, body, dep)
    from_params = {body.invars[q] for q, r in enumerate(e.ins) if isinstance(r, Var) and r in made}
    rewritten = _hoist(body, {v for v in body.invars if v in inside}, from_params)
    body = rewritten if rewritten is not None else body
    in_avals = list(p["jaxpr"].in_avals)
    inside = varying(body, {v for v in body.invars if v in inside})
    moved = _invariant(body, set(body.invars[:nc]), inside, _made_of(body, from_params))
    if not moved:
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
    kept = [b for k, b in enumerate(body.eqns) if k not in moved]
    read = {r for r in (*(r for b in kept for r in b.ins), *body.outs) if isinstance(r, Var)}
    new_consts = [o for k in sorted(moved) for o in body.eqns[k].outs if o in read]
    avals = {
        o: a for k in moved for o, a in zip(body.eqns[k].outs, body.eqns[k].out_avals, strict=True)
    }
    inner = Program([*body.invars[:nc], *new_consts, *body.invars[nc:]], body.outs, kept)
    inner_avals = [*in_avals[:nc], *(avals[v] for v in new_consts), *in_avals[nc:]]
    scan = dataclasses.replace(
        e,
        params={**p, "jaxpr": _retrace(inner, inner_avals), "num_consts": nc + len(new_consts)},
        ins=[*e.ins[:nc], *(rename[v] for v in new_consts), *e.ins[nc:]],
        in_avals=[*e.in_avals[:nc], *(avals[v] for v in new_consts), *e.in_avals[nc:]],
    )
    return [*hoisted, scan]


def _invariant(body: Program, consts: set, inside: set, made: set) -> set:
    """The equations of a scan body to hoist: loop-invariant (read only consts and values
    made by such equations), the same for every example, and a transformation of a
    parameter or an input of one (see the module docstring)."""
    inv: list = []
    known = set(consts)
    for k, b in enumerate(body.eqns):
        if (
            all(not isinstance(r, Var) or r in known for r in b.ins)
            and not any(o in inside for o in b.outs)
            and b.outs
            and not _effectful(b)
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


def _effectful(e: Eqn) -> bool:
    name = e.primitive.name
    return "callback" in name or "print" in name


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
