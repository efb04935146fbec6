"""The flattened program the fast path reads: a jaxpr with every inlinable call inlined.

:func:`trace_program` traces a per-example loss to a jaxpr (no batch axis) and
:func:`flatten` inlines ``jit``/``closed_call``/``checkpoint`` bodies over numbered values
(:class:`Var`, :class:`Const`, :class:`Eqn`, :class:`Program`), rewriting a scalar
``dynamic_slice`` row lookup as a ``gather`` and a ``split`` as slices, so that every parameter
use is one equation of one program. :func:`evaluate` re-binds it under any transformation.
Nothing here knows about parameters or routes: the walker (:mod:`jaxgrad.fast.trace`) and
the analysis (:mod:`jaxgrad.fast.analysis`) read it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

# Call primitives whose body is inlined (they carry a jaxpr and no custom derivative rule;
# inlining ``checkpoint`` drops the rematerialisation, not the maths).
INLINE_PRIMITIVES = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Var:
    """A value in the flattened program, by number."""

    id: int


@dataclasses.dataclass(frozen=True)
class Const:
    """A literal or a captured constant."""

    value: Any


@dataclasses.dataclass
class Eqn:
    """One primitive application in the flattened (inlined) program."""

    primitive: Any
    params: dict
    ins: list  # of Var | Const
    outs: list  # of Var
    in_avals: list
    out_avals: list
    source: Any = None  # the equation's source_info (see :func:`source_line`)


@dataclasses.dataclass
class Program:
    """A jaxpr with every inlinable call inlined, over numbered values."""

    invars: list  # Var per flat input
    outs: list  # Var | Const per flat output
    eqns: list  # of Eqn


def flatten(closed: jcore.ClosedJaxpr) -> Program:
    """Inlines ``jit``/``closed_call`` bodies so parameter uses inside them are visible."""
    counter = iter(range(1 << 62))
    eqns: list[Eqn] = []

    def go(jaxpr, consts, in_refs, source=None):  # source: of the equation a rewrite replaces
        env: dict = {}
        read = lambda a: Const(a.val) if isinstance(a, jcore.Literal) else env[a]
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = Const(c)
        for v, r in zip(jaxpr.invars, in_refs, strict=True):
            env[v] = r
        for e in jaxpr.eqns:
            ins = [read(a) for a in e.invars]
            key = INLINE_PRIMITIVES.get(e.primitive.name)
            inner = e.params.get(key) if key else None
            rewrite = {"dynamic_slice": _dynamic_slice_as_gather, "split": _split_as_slices}
            if e.primitive.name in rewrite:  # (its equations name the user's line, not ours)
                inner = rewrite[e.primitive.name](e)
            if isinstance(inner, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                closed = inner if isinstance(inner, jcore.ClosedJaxpr) else None
                body = closed.jaxpr if closed is not None else inner
                where = (source or e.source_info) if e.primitive.name in rewrite else source
                out_refs = go(body, closed.consts if closed is not None else [], ins, where)
                for v, r in zip(e.outvars, out_refs, strict=True):
                    env[v] = r
                continue
            outs = [Var(next(counter)) for _ in e.outvars]
            for v, r in zip(e.outvars, outs, strict=True):
                env[v] = r
            eqns.append(
                Eqn(
                    e.primitive,
                    dict(e.params),
                    ins,
                    outs,
                    [a.aval for a in e.invars],
                    [v.aval for v in e.outvars],
                    source or e.source_info,
                )
            )
        return [read(a) for a in jaxpr.outvars]

    invars = [Var(next(counter)) for _ in closed.jaxpr.invars]
    outs = go(closed.jaxpr, closed.consts, invars)
    return Program(invars, outs, eqns)


def _dynamic_slice_as_gather(e):
    """A row lookup ``W[i]`` by a scalar index (a ``dynamic_slice`` whose every slice size is
    1 or the whole axis) as the equivalent ``gather``, or None for any other slice.

    Both clamp the start so that the slice fits, so the values and gradients are the same;
    as a gather the lookup reads as an embedding use of ``W`` (see
    :func:`jaxgrad.fast.rules.is_embedding_gather`)
    rather than taking the exact fallback.
    """
    op, *starts = (a.aval for a in e.invars)
    sizes = tuple(e.params["slice_sizes"])
    if (
        not starts
        or len(starts) != len(op.shape)
        or not jax.numpy.issubdtype(op.dtype, jax.numpy.inexact)
        or any(s not in (1, n) for s, n in zip(sizes, op.shape, strict=True))
    ):
        return None
    dims = tuple(range(len(op.shape)))
    dnums = jax.lax.GatherDimensionNumbers(
        offset_dims=dims, collapsed_slice_dims=(), start_index_map=dims
    )

    # One start index: unique (and sorted) as it stands, as JAX marks ``dynamic_slice``'s own
    # batched gather. Where more lookups are put together the flag is dropped: by ``vmap``
    # over examples (JAX's gather batching rule) and by :func:`lift_over_steps` over steps.
    def lookup(x, *index):
        idx = jax.numpy.stack([jax.numpy.asarray(i, starts[0].dtype) for i in index])
        return jax.lax.gather(
            x, idx, dnums, sizes, mode=jax.lax.GatherScatterMode.CLIP, unique_indices=True
        )

    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (op, *starts)]
    return jax.make_jaxpr(lookup)(*avals)


def _split_as_slices(e):
    """``split`` (``jnp.split``, one equation with several outputs) as one ``slice`` per part,
    so each part of a split parameter (e.g. a fused QKV weight) is an alias of it."""
    (op,) = (a.aval for a in e.invars)
    axis, bounds = e.params["axis"], np.cumsum([0, *e.params["sizes"]]).tolist()

    def parts(x):
        return [jax.lax.slice_in_dim(x, a, b, axis=axis) for a, b in itertools.pairwise(bounds)]

    return jax.make_jaxpr(parts)(jax.ShapeDtypeStruct(op.shape, op.dtype))


def evaluate(program: Program, args, *, hook=None, override=None):
    """Evaluates ``program`` on ``args``; ``hook(k, invals, outvals) -> outvals`` per equation.

    ``override(k, invals)`` may return an equation's outputs in place of binding it (None to
    bind it as usual).

    Works under any transformation (``vmap``, ``vjp``, ``jit``): each equation is re-bound.
    """
    env: dict = {}
    read = lambda r: r.value if isinstance(r, Const) else env[r]
    for v, x in zip(program.invars, args, strict=True):
        env[v] = x
    for k, e in enumerate(program.eqns):
        invals = [read(r) for r in e.ins]
        outvals = override(k, invals) if override is not None else None
        if outvals is None:
            outvals = e.primitive.bind(*invals, **e.primitive.get_bind_params(e.params))
            if not e.primitive.multiple_results:
                outvals = [outvals]
        if hook is not None:
            outvals = hook(k, invals, outvals)
        for v, x in zip(e.outs, outvals, strict=True):
            env[v] = x
    return [read(r) for r in program.outs]


def program_aval_in(program: Program, v):
    """The abstract value of a program input or of a value some equation makes."""
    for e in program.eqns:
        for r, a in zip(e.ins, e.in_avals, strict=True):
            if r == v:
                return a
    return program_aval(program, v)


def eval_known(program: Program, values: dict, wanted, held=frozenset()) -> list:
    """The values ``wanted`` (Vars or Consts) computed from ``values`` (top-level Var ->
    value): every equation whose inputs are known, in order, until they are. The values
    ``held`` are computed too but carry no gradient (``stop_gradient``)."""
    env = dict(values)
    known = lambda r: isinstance(r, Const) or r in env
    read = lambda r: r.value if isinstance(r, Const) else env[r]
    need = {r for r in wanted if isinstance(r, Var)}
    for e in program.eqns:
        if need <= env.keys():
            break
        if not e.outs or not all(known(r) for r in e.ins):
            continue  # example-dependent, or only an effect (a print)
        outs = e.primitive.bind(*map(read, e.ins), **e.primitive.get_bind_params(e.params))
        outs = outs if e.primitive.multiple_results else [outs]
        outs = [
            jax.lax.stop_gradient(x) if o in held else x for o, x in zip(e.outs, outs, strict=True)
        ]
        env.update(zip(e.outs, outs, strict=True))
    return [read(r) for r in wanted]


def source_line(eqn: Eqn) -> str:
    """Where the user wrote an equation: ``"file.py:123 (fn)"`` (its innermost user frame)."""
    if eqn.source is None:
        return ""
    frame = source_info_util.user_frame(eqn.source.traceback)
    if frame is None:
        return ""
    name = frame.function_name.rsplit(".", 1)[-1]  # "step", not "loss.<locals>.step"
    return f"{os.path.basename(frame.file_name)}:{frame.start_line} ({name})"


def is_complex(aval) -> bool:
    return jax.numpy.issubdtype(aval.dtype, jax.numpy.complexfloating)


def shape_struct(x):
    return jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x))


def trace_program(fn, params, example) -> tuple:
    """``(program, num_params)``: ``fn(params, example)`` traced per example and flattened;
    the program takes ``(*param_leaves, *example_leaves)``."""
    param_leaves, param_def = jax.tree_util.tree_flatten(params)
    ex_leaves, ex_def = jax.tree_util.tree_flatten(example)
    n = len(param_leaves)

    def flat_fn(*leaves):
        p = jax.tree_util.tree_unflatten(param_def, leaves[:n])
        e = jax.tree_util.tree_unflatten(ex_def, leaves[n:])
        return jax.tree_util.tree_leaves(fn(p, e))

    structs = [shape_struct(x) for x in (*param_leaves, *ex_leaves)]
    return flatten(jax.make_jaxpr(flat_fn)(*structs)), n


def closure_error(program: Program) -> str:
    """Why ``program`` cannot be differentiated again once traced ("" where it can).

    A ``custom_vjp``/``custom_jvp``/``custom_gradient`` rule that closes over a value traced
    with the loss (the example, or anything computed from the parameters) keeps that trace's
    tracers: binding the rule again under ``vjp``, as the fast path does, reaches a dead
    tracer (``jax.vmap(jax.grad(loss))`` traces the loss afresh each time, so it works).
    Each custom call (in any frame) is tried alone: its gradient traced, no compilation.
    """
    tried: set = set()
    for e in _custom_calls(program.eqns):
        rule = (e.primitive.name, *(id(v) for v in e.params.values() if callable(v)))
        if rule in tried:
            continue
        tried.add(rule)
        if _rebinds_a_dead_tracer(e):
            return (
                "the loss has a custom_vjp, custom_jvp or custom_gradient rule that closes "
                "over a value traced with it, which cannot be differentiated again from the "
                "traced program: every leaf's per-example gradient is materialised, as "
                "method='vmap' does; pass such values to the custom function as arguments "
                "(nondiff_argnums, jax.closure_convert) to keep the fast path"
            )
    return ""


def _custom_calls(eqns):
    """The ``custom_vjp_call``/``custom_jvp_call`` equations among ``eqns`` and inside them
    (loops, branches, calls), as ``(primitive, params, in_avals)``."""
    for e in eqns:
        if e.primitive.name in ("custom_vjp_call", "custom_jvp_call"):
            avals = e.in_avals if isinstance(e, Eqn) else [v.aval for v in e.invars]
            yield _Call(e.primitive, e.params, avals)
        for sub in jcore.jaxprs_in_params(e.params):
            yield from _custom_calls(sub.eqns)


class _Call(NamedTuple):
    primitive: Any
    params: dict
    in_avals: list


def _rebinds_a_dead_tracer(call: _Call) -> bool:
    """Whether the gradient of one custom call, bound again, reaches a tracer of a trace
    that has ended (``jit`` refuses it; ``make_jaxpr`` keeps it as a constant)."""
    consts = call.params.get("num_consts", 0)  # (closed-over values: not differentiated)
    inexact = [
        i
        for i, a in enumerate(call.in_avals)
        if i >= consts and jnp.issubdtype(a.dtype, jnp.inexact)
    ]
    if not inexact:
        return False

    def total(*args):
        outs = call.primitive.bind(*args, **call.primitive.get_bind_params(call.params))
        outs = outs if call.primitive.multiple_results else [outs]
        return sum(jnp.sum(o) for o in outs if jnp.issubdtype(o.dtype, jnp.inexact))

    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in call.in_avals]
    try:
        closed = jax.make_jaxpr(jax.grad(total, argnums=tuple(inexact)))(*structs)
    except jax.errors.UnexpectedTracerError:
        return True
    return _holds_tracer(closed)


def _holds_tracer(closed) -> bool:
    """Whether a closed jaxpr, or one inside it, holds a tracer among its constants."""
    if any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        return True
    return any(
        isinstance(v, jcore.ClosedJaxpr) and _holds_tracer(v)
        for e in closed.jaxpr.eqns
        for v in e.params.values()
    )


def primitives(program: Program) -> set:
    """The names of every primitive a program binds, in every sub-jaxpr (loops, branches,
    custom-derivative calls) too."""
    names: set = set()

    def visit(jaxpr):  # a Program or a jaxpr: equations with a primitive and params each
        for e in jaxpr.eqns:
            names.add(e.primitive.name)
            for sub in jcore.jaxprs_in_params(e.params):
                visit(sub)

    visit(program)
    return names


def program_aval(program: Program, v: Var):
    """The abstract value of a value some equation of ``program`` makes."""
    for e in program.eqns:
        for o, a in zip(e.outs, e.out_avals, strict=True):
            if o == v:
                return a
    raise KeyError(v)


@functools.lru_cache(maxsize=512)
def flat_jaxpr(jaxpr) -> Program:
    closed = jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(jaxpr, ())
    return flatten(closed)


def shaped(shape, dtype):
    return jax.core.ShapedArray(tuple(shape), dtype)
