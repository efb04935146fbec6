"""Which values of a program depend on the example: one dataflow rule, the way ``vmap`` batches.

Dependence on the example, the way ``vmap`` batches: an output is example-dependent iff
``vmap`` gives it a batch axis. For most primitives that is "some input is", but a loop,
a branch or a custom call may return outputs that the example never reaches although it
enters the equation (a loop counter, a carry iterated on constants): ``vmap`` leaves those
unbatched, and their cotangent is then the whole batch's. Calling them example-dependent
would hand every example the batch's cotangent, so this is the one rule the analysis uses
(for every frame: the top level, a scan body, a branch, a custom call's body). The converse
error only costs memory: a use thought the same for every example gets the batch axis
added to its output (see ``Use.batched``), which is exact either way. So an unknown
primitive counts as "some input is"; the loops, branches and calls that can return
unbatched outputs from batched inputs are read through their bodies.

:func:`varying_outs` is the rule for one equation; :func:`varying` applies it to a program.
"""

from __future__ import annotations

from jax.extend import core as jcore

from jaxgrad.fast.program import Eqn, Program, Var, flat_jaxpr


def varying(program: Program, inputs: set) -> set:
    """The values of ``program`` that depend on the example, given the ``inputs`` that do."""
    out = set(inputs)
    for e in program.eqns:
        flags = [isinstance(r, Var) and r in out for r in e.ins]
        outs = varying_outs(e.primitive.name, e.params, flags, len(e.outs))
        out.update(v for v, f in zip(e.outs, outs, strict=True) if f)
    return out


def jaxpr_varying(jaxpr, flags: list) -> list:
    """Which outputs of a (closed or open) jaxpr depend on the example, given its inputs'."""
    body = flat_jaxpr(jaxpr)
    inside = varying(body, {v for v, f in zip(body.invars, flags, strict=True) if f})
    return [isinstance(r, Var) and r in inside for r in body.outs]


def scan_body_varying(eqn: Eqn, body: Program, outer: set) -> set:
    """The values of a scan body (flattened: ``body``) that differ between examples at some
    step, given the values ``outer`` of the enclosing program that do."""
    p = eqn.params
    flags = [isinstance(r, Var) and r in outer for r in eqn.ins]
    found: dict = {}

    def step(fl):
        found["inner"] = varying(body, {v for v, f in zip(body.invars, fl, strict=True) if f})
        return [isinstance(r, Var) and r in found["inner"] for r in body.outs]

    _carry_fixpoint(flags, p["num_consts"], p["num_consts"] + p["num_carry"], step)
    return found["inner"]


def _carry_fixpoint(flags: list, lo: int, hi: int, body) -> list:
    """Loop inputs ``flags`` with the carries ``flags[lo:hi]`` grown to a fixed point.

    ``body(flags)`` gives the flags of the body's outputs, the new carries first: a carry
    depends on the example if its initial value does or if some iteration makes it (``vmap``
    batches it then, from the start). Returns ``body``'s outputs at the fixed point.
    """
    while True:
        outs = body(flags)
        carry = [a or b for a, b in zip(flags[lo:hi], outs[: hi - lo], strict=True)]
        if carry == flags[lo:hi]:
            return outs
        flags[lo:hi] = carry


def varying_outs(name: str, params: dict, flags: list, n_out: int) -> list:
    """Which outputs of one equation depend on the example, given which inputs do, as
    ``vmap`` batches them (see above)."""
    if name == "scan":
        nc, ncar = params["num_consts"], params["num_carry"]
        flags = list(flags)
        outs = _carry_fixpoint(flags, nc, nc + ncar, lambda f: jaxpr_varying(params["jaxpr"], f))
        return flags[nc : nc + ncar] + outs[ncar:]
    if name == "while":
        cn, bn = params["cond_nconsts"], params["body_nconsts"]
        cconsts, rest = list(flags[:cn]), list(flags[cn:])
        _carry_fixpoint(rest, bn, len(rest), lambda f: jaxpr_varying(params["body_jaxpr"], f))
        carry = rest[bn:]
        (pred,) = jaxpr_varying(params["cond_jaxpr"], cconsts + carry)
        # A predicate that differs between examples runs every example for the longest trip
        # count, selecting per example: every carry is batched then.
        return [True] * len(carry) if pred else carry
    if name == "cond":
        branches = params["branches"]
        if flags[0]:  # a per-example index: every output is a per-example select
            return [True] * len(branches[0].out_avals)
        per_branch = [jaxpr_varying(b, flags[1:]) for b in branches]
        return [any(fs) for fs in zip(*per_branch, strict=True)]
    for key in ("call_jaxpr", "fun_jaxpr", "jaxpr"):  # custom_jvp/vjp calls, jit, remat, ...
        inner = params.get(key)
        if isinstance(inner, (jcore.ClosedJaxpr, jcore.Jaxpr)) and len(
            (inner.jaxpr if isinstance(inner, jcore.ClosedJaxpr) else inner).invars
        ) == len(flags):
            return jaxpr_varying(inner, flags)
    return [any(flags)] * n_out
