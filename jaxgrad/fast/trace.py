"""Reading a loss's structure off its jaxpr: which equations consume which parameter, and how.

The per-example loss ``S(params, example)`` is traced to a jaxpr (no batch axis), calls to
``jit``-wrapped functions are inlined, and every use of every parameter leaf is classified:

* **dense** — a ``dot_general`` whose one operand is the parameter (possibly through
  ``reshape``, ``transpose``, ``squeeze``, ``expand_dims``, ``convert_element_type``,
  ``copy``, ``rev`` or ``slice``: each entry of the operand is one entry of the leaf, so
  norms are preserved; a ``split`` is read as one ``slice`` per part, and uses of disjoint
  blocks have no cross terms) and whose other operand is not a parameter; a complex other
  operand of the real parameter is read as two real positions (see :func:`real_form`);
* **conv** — a ``conv_general_dilated`` whose kernel is the parameter;
* **gather** — an embedding-style ``gather`` (whole rows of the parameter picked by integer
  indices; a ``dynamic_slice`` of whole rows, ``W[i]`` with a scalar ``i``, is read as one);
* **other** — anything else: an elementwise op (a bias, a norm scale), a parameter inside an
  opaque call (``custom_jvp``/``custom_vjp``/``scan``...), a parameter used on both sides of a
  product.

A leaf whose uses are all dense/conv/gather is *fast*: its per-example gradient is read off
the use's kept operand ``A`` and its output cotangent ``G``. Any other leaf is *exact*: it gets
a per-example copy (a zero perturbation with the batch axis) and its per-example gradient is
the gradient with respect to that copy, in the same backward pass.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

# Ops that only permute, re-type or select a parameter's entries (``slice``: a block, e.g. one
# of the Q, K, V parts of a fused weight; ``rev``): each entry of the result is one entry of
# the leaf, so a use's per-example gradient norm is that of its gradient with respect to the
# leaf (the transpose only places it, padding with zeros), and the transposes map gradients
# back to the leaf's layout.
ALIAS_PRIMITIVES = frozenset(
    {
        "reshape",
        "transpose",
        "squeeze",
        "expand_dims",
        "convert_element_type",
        "copy",
        "copy_p",
        "slice",
        "rev",
    }
)
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

    def go(jaxpr, consts, in_refs):
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
            if e.primitive.name == "dynamic_slice":
                inner = _dynamic_slice_as_gather(e)
            elif e.primitive.name == "split":
                inner = _split_as_slices(e)
            if isinstance(inner, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                closed = inner if isinstance(inner, jcore.ClosedJaxpr) else None
                body = closed.jaxpr if closed is not None else inner
                out_refs = go(body, closed.consts if closed is not None else [], ins)
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
    as a gather the lookup reads as an embedding use of ``W`` (see :func:`_is_embedding_gather`)
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


def use_block(program: Program, use: Use):
    """The entries of its leaf a use reads: ``(frame, ranges)``, or None for all of them.

    A use whose alias chain starts with a ``slice`` of the leaf reads that block only (one
    ``range`` per axis); its per-example gradient is zero elsewhere. ``frame`` says whose axes
    the ranges index: the leaf's (a slice in the top-level program), or, for a slice taken in
    a scan body, the scan operand's as the body sees it (per step, for a scanned-over leaf):
    blocks are comparable within one frame only.
    """
    if use.pre_chain:
        frame, body, first = "leaf", program, use.pre_chain[0]
    elif use.chain and use.site == "":
        frame, body, first = "leaf", program, use.chain[0]
    elif use.chain and use.site == "scan" and not use.nest:
        frame, body, first = ("scan", use.eqn, use.operand), use.chain_program, use.chain[0]
    else:
        return None
    if body.eqns[first].primitive.name != "slice":
        return None
    p = body.eqns[first].params
    strides = p["strides"] or (1,) * len(p["start_indices"])
    ranges = tuple(
        range(a, b, c)
        for a, b, c in zip(p["start_indices"], p["limit_indices"], strides, strict=True)
    )
    return frame, ranges


def disjoint_groups(program: Program, uses: list) -> list:
    """The uses of one leaf in groups that read disjoint blocks of it (see :func:`use_block`).

    Per-example gradients through uses in different groups have disjoint supports, so no
    cross terms between them: the leaf's squared norm is the sum of the groups' squared norms.
    """
    blocks = [use_block(program, u) for u in uses]

    def overlap(a, b):
        if a is None or b is None or a[0] != b[0]:
            return True
        return all(set(ra).intersection(rb) for ra, rb in zip(a[1], b[1], strict=True))

    groups: list = []  # of lists of use indices
    for i in range(len(uses)):
        joined = [g for g in groups if any(overlap(blocks[i], blocks[k]) for k in g)]
        merged = [i] + [k for g in joined for k in g]
        groups = [g for g in groups if g not in joined] + [sorted(merged)]
    return [[uses[k] for k in g] for g in sorted(groups)]


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


@dataclasses.dataclass
class Use:
    """One fast use of a parameter leaf: equation ``eqn`` reads the leaf at operand ``pos``.

    ``chain`` lists the alias equations (reshape, transpose, ...) from the leaf to the operand.
    """

    kind: str  # "dense" | "conv" | "gather"
    eqn: int
    pos: int
    chain: list
    # Whether the use's output varies with the example as ``vmap`` batches it (see
    # :func:`varying`; else it is the same for every example, e.g. a position-embedding
    # lookup with constant indices or a lookup by a loop counter, and the perturbation must
    # add the batch axis itself for its cotangent to be per example, not the batch's).
    # Inside a scan body: whether it varies at some step.
    batched: bool = True
    # The equation the rules see. For a use inside a ``scan`` body it is the body's equation
    # lifted over the steps (see :func:`lift_over_steps`); else ``program.eqns[eqn]``.
    op: Eqn | None = None
    # For a use inside a ``scan`` body: (scan equation index, body equation index), the body
    # :class:`Program` the chain lives in, whether the leaf is scanned over (``xs``: one slice
    # per step) rather than shared by all steps, the number of steps, and the axis of the
    # lifted output the step axis of the captured cotangent goes to.
    scan: tuple | None = None
    chain_program: Program | None = None
    stacked: bool = False
    steps: int = 1
    step_axis: int = 0
    # "" for a use in the top-level program, "scan" for one lifted over a scan's steps,
    # "cond" for one inside a ``cond``/``switch`` branch (``scan`` is then
    # (cond equation index, branch, body equation index); its cotangent is zero for an
    # example that takes another branch).
    site: str = ""
    # For a use inside a scan or a branch: the alias chain (in the top-level program) from the
    # leaf to the scan's / cond's operand, applied before ``chain``.
    pre_chain: list = dataclasses.field(default_factory=list)
    # For a use inside a scan nested in a scan body (any depth): one :class:`Level` per inner
    # scan, outermost first. ``chain_program``/``chain`` are then the outer body and the alias
    # chain in it to the first inner scan's operand, ``scan`` is (scan equation, body
    # equation of the inner scan, ..., innermost body equation), and ``op`` is lifted over
    # every level's steps (the outer steps first); the captured arrays hold the example axis
    # after the outer steps, ``(steps, B, *inner steps, ...)``.
    nest: list = dataclasses.field(default_factory=list)
    # For a use inside a scan: the scan's operand position the leaf enters through.
    operand: int = -1
    # The equation as the rules see it at one step, before any lift over steps: the
    # program's (or body's) equation, or its real form (see :func:`real_form`).
    base: Eqn | None = None
    # For a real form: the axis of ``base``'s output that holds the real and imaginary
    # parts (the captured cotangent is ``(Re G, −Im G)`` there); -1 for a real use.
    split: int = -1

    @property
    def key(self):
        """Where the use's operand and cotangent are captured."""
        return self.scan if self.scan is not None else (self.eqn,)


@dataclasses.dataclass(frozen=True)
class Level:
    """An inner scan of a nested use: its body, the alias chain in it, whether the leaf is
    scanned over by it, its steps, and the axis of its lift's output that holds them."""

    body: Program
    chain: list
    stacked: bool
    steps: int
    step_axis: int


def use_levels(use: Use) -> list:
    """``(stacked, body, chain)`` per scan level of a use inside a scan, outermost first."""
    return [(use.stacked, use.chain_program, use.chain)] + [
        (lv.stacked, lv.body, lv.chain) for lv in use.nest
    ]


@dataclasses.dataclass
class Analysis:
    program: Program
    num_params: int
    fast: dict  # leaf index -> list[Use]
    exact: list  # leaf indices with a per-example copy
    unused: list  # leaf indices nothing reads (zero gradient)
    # leaf index -> why it takes the exact route (one line per distinct reason)
    reasons: dict = dataclasses.field(default_factory=dict)

    @property
    def captured(self) -> dict:
        """Capture key (:attr:`Use.key`) -> (leaf, Use) for every fast use."""
        return {u.key: (j, u) for j, uses in self.fast.items() for u in uses}


def _is_embedding_gather(eqn: Eqn) -> bool:
    """A gather that picks whole rows of the operand: one entry along each row axis (indexed
    by ``start_index_map``), the whole of every other axis."""
    dn = eqn.params["dimension_numbers"]
    shape = eqn.in_avals[0].shape
    sizes = eqn.params["slice_sizes"]
    if dn.operand_batching_dims or dn.start_indices_batching_dims:
        return False
    for d, n in enumerate(shape):
        # Along every axis the slice is either one entry picked by the index (a row axis) or
        # the whole axis; an index into a whole axis can only start it at 0 (it is clamped
        # there, or the lookup is out of bounds), as ``W[i]`` under ``vmap`` (an index of 0
        # for the row's own axis) or ``W[:, j]`` write it.
        if sizes[d] != n and not (d in dn.start_index_map and sizes[d] == 1):
            return False
    mode = eqn.params.get("mode")
    return str(mode).split(".")[-1] in {"CLIP", "PROMISE_IN_BOUNDS", "FILL_OR_DROP", "ONE_HOT"}


def _is_complex(aval) -> bool:
    return jax.numpy.issubdtype(aval.dtype, jax.numpy.complexfloating)


def _classify(eqn: Eqn, param_pos: list) -> str | None:
    name = eqn.primitive.name
    if any(_is_complex(a) for a in (*eqn.in_avals, *eqn.out_avals)):
        # Complex values around a real parameter (the fast functions take real parameters
        # only, so a complex parameter operand is the real leaf cast): a ``dot_general`` has
        # a real form the rules are written for (see :func:`real_form`), nothing else does.
        return "dense" if name == "dot_general" and len(param_pos) == 1 else None
    if name == "dot_general" and len(param_pos) == 1:
        return "dense"
    if name == "conv_general_dilated" and param_pos == [1]:
        return "conv"
    if name == "gather" and param_pos == [0] and _is_embedding_gather(eqn):
        return "gather"
    return None


# Primitives whose body is opaque to the use classification (a loop, a branch, a custom
# derivative): a parameter read inside them takes the exact route.
_OPAQUE = {
    "scan": "inside a `lax.scan` body (a loop)",
    "while": "inside a `while_loop` (a loop with a dynamic trip count)",
    "cond": "inside a `cond`/`switch` branch",
    "custom_jvp_call": "inside a `custom_jvp` function",
    "custom_vjp_call": "inside a `custom_vjp` function",
    "custom_vjp_call_jaxpr": "inside a `custom_vjp` function",
}


def _reason(eqn: Eqn, param_pos: list) -> str:
    """Why a use of a parameter by ``eqn`` is not a dense/conv/gather use."""
    name = eqn.primitive.name
    if name in _OPAQUE:
        return _OPAQUE[name]
    if any(_is_complex(a) for a in (*eqn.in_avals, *eqn.out_avals)):
        return (
            f"a complex-valued `{name}` of a real parameter (only a `dot_general` with a "
            "complex operand is read as two real positions)"
        )
    if name == "dot_general":
        return "both operands of a `dot_general` are parameters"
    if name == "conv_general_dilated":
        return "a parameter is the input of a convolution, or both operands are parameters"
    if name == "gather":
        return "a `gather` that is not a whole-row lookup"
    return f"used by `{name}` (not a dense/conv/gather use)"


def _shaped(shape, dtype):
    return jax.core.ShapedArray(tuple(shape), dtype)


def lift_over_steps(eqn: Eqn, pos: int, steps: int, stacked: bool):
    """The equation of all ``steps`` of a scan at once, or None where no lift is written.

    A use ``s_t = op(a_t, W)`` repeated over the steps of a scan is the single use
    ``S = op(A, W)`` with the step axis a new leading free axis of the kept operand ``A``
    (so example i's gradient is ``Σ_t op_Wᵀ(a_{i,t}, g_{i,t})``: a sequence axis). When the
    leaf is scanned over (``W_t``, one slice per step) the step axis is a new leading *batch*
    axis of both operands instead (a separate gradient per step).

    Returns:
      ``(lifted_eqn, step_axis)``: ``step_axis`` is the axis of the lifted output that holds
      the steps.
    """
    name = eqn.primitive.name
    other = 1 - pos
    if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        contract, batch = [list(lc), list(rc)], [list(lb), list(rb)]
        shift = lambda ds: [d + 1 for d in ds]
        shapes = [list(a.shape) for a in eqn.in_avals]
        lfree = len(shapes[0]) - len(lc) - len(lb)
        if stacked:
            contract = [shift(contract[0]), shift(contract[1])]
            batch = [[0, *shift(batch[0])], [0, *shift(batch[1])]]
            shapes = [[steps, *shapes[0]], [steps, *shapes[1]]]
            out = [steps, *eqn.out_avals[0].shape]
            step_axis = 0
        else:
            contract[other], batch[other] = shift(contract[other]), shift(batch[other])
            shapes[other] = [steps, *shapes[other]]
            step_axis = len(lb) + (0 if other == 0 else lfree)
            out = list(eqn.out_avals[0].shape)
            out.insert(step_axis, steps)
        params = dict(eqn.params)
        params["dimension_numbers"] = (
            (tuple(contract[0]), tuple(contract[1])),
            (tuple(batch[0]), tuple(batch[1])),
        )
        in_avals = [_shaped(sh, a.dtype) for sh, a in zip(shapes, eqn.in_avals, strict=True)]
        out_avals = [_shaped(out, eqn.out_avals[0].dtype)]
        return Eqn(eqn.primitive, params, eqn.ins, eqn.outs, in_avals, out_avals), step_axis
    if name == "gather" and not stacked:
        dn = eqn.params["dimension_numbers"]
        params = dict(eqn.params)
        params["dimension_numbers"] = dn._replace(offset_dims=tuple(d + 1 for d in dn.offset_dims))
        # Each step's lookups may be unique and sorted (one row, ``W[i]``), the steps' together
        # are not (a token seen twice): the transpose, a scatter-add, must not be told so.
        params["unique_indices"] = params["indices_are_sorted"] = False
        idx = eqn.in_avals[1]
        in_avals = [eqn.in_avals[0], _shaped((steps, *idx.shape), idx.dtype)]
        out = eqn.out_avals[0]
        out_avals = [_shaped((steps, *out.shape), out.dtype)]
        return Eqn(eqn.primitive, params, eqn.ins, eqn.outs, in_avals, out_avals), 0
    return None


def real_form(eqn: Eqn, pos: int) -> tuple:
    """A use and the axis of its output holding real and imaginary parts (-1 for none).

    A real parameter ``W`` in a ``dot_general`` with a complex operand ``A`` (a Fourier
    layer: ``W`` on the modes of ``rfft(x)``) has the real gradient ``Re(Aᵀ G)`` for the
    output cotangent ``G`` (JAX transposes without conjugating, then keeps the real part).
    That is ``Re(A)ᵀ Re(G) − Im(A)ᵀ Im(G)``: a real use with two positions, the operand
    ``(Re A, Im A)`` stacked on a new free axis and the cotangent ``(Re G, −Im G)`` on the
    matching output axis — the lift of :func:`lift_over_steps` over 2 "steps", real-valued.
    Squaring complex entries, or a rank-1 identity for one complex position, would be
    wrong: the real part of a complex rank-1 matrix has rank 2.
    """
    if not any(_is_complex(a) for a in (*eqn.in_avals, *eqn.out_avals)):
        return eqn, -1
    lifted, axis = lift_over_steps(eqn, pos, 2, False)
    real = lambda d: (
        jax.numpy.finfo(d).dtype if jax.numpy.issubdtype(d, jax.numpy.complexfloating) else d
    )
    params = dict(lifted.params)
    if params.get("preferred_element_type") is not None:
        params["preferred_element_type"] = real(params["preferred_element_type"])
    in_avals = [_shaped(a.shape, real(a.dtype)) for a in lifted.in_avals]
    out_avals = [_shaped(a.shape, real(a.dtype)) for a in lifted.out_avals]
    return Eqn(eqn.primitive, params, eqn.ins, eqn.outs, in_avals, out_avals), axis


def _scan_uses(eqn: Eqn, k: int, leaf_pos: dict):
    """Uses of parameters inside a ``scan`` body, lifted over the steps.

    ``leaf_pos`` maps the scan's operand positions that hold (aliases of) parameter leaves
    to ``(leaf, chain)``: a leaf (or a cast, transpose, reshape of it) passed as a constant or
    as a scanned-over input is read; one carried as loop state is not. A scan in the body is
    read the same way, recursively, and its uses lifted over this scan's steps too (see
    :func:`_nested_scan_uses`). Returns ``(uses, reasons)``: ``uses`` leaf -> [Use] and
    ``reasons`` leaf -> [str] for leaves with a use that is not lifted.
    """
    p = eqn.params
    num_consts, num_carry, steps = p["num_consts"], p["num_carry"], p["length"]
    body = flatten(p["jaxpr"])
    uses: dict = {}
    reasons: dict = {}
    inner_alias: dict = {}
    pre: dict = {}
    src: dict = {}
    for q, (j, chain) in leaf_pos.items():
        if num_consts <= q < num_consts + num_carry:
            reasons.setdefault(j, []).append("carried through a `lax.scan` (a loop state)")
        else:
            inner_alias[body.invars[q]] = (j, [], q >= num_consts + num_carry)
            pre[body.invars[q]] = chain
            src[body.invars[q]] = q
    if not inner_alias:
        return uses, reasons
    for ik, e in enumerate(body.eqns):
        param_pos = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and r in inner_alias]
        if not param_pos:
            continue
        if e.primitive.name in ALIAS_PRIMITIVES and len(e.ins) == 1 and len(e.outs) == 1:
            j, chain, stacked = inner_alias[e.ins[0]]
            inner_alias[e.outs[0]] = (j, [*chain, ik], stacked)
            pre[e.outs[0]] = pre[e.ins[0]]
            src[e.outs[0]] = src[e.ins[0]]
            continue
        if e.primitive.name == "scan":
            _nested_scan_uses(e, ik, k, body, steps, (inner_alias, pre, src), uses, reasons)
            continue
        kind = _classify(e, param_pos)
        for i in param_pos:
            j, chain, stacked = inner_alias[e.ins[i]]
            base, split = real_form(e, i) if kind is not None else (e, -1)
            lifted = None if kind is None else lift_over_steps(base, i, steps, stacked)
            if lifted is None:
                why = _reason(e, param_pos) if kind is None else f"a {kind} use"
                reasons.setdefault(j, []).append(f"{why}, inside a `lax.scan` body")
                continue
            op, step_axis = lifted
            use = Use(kind, k, i, chain, True, op, (k, ik), body, stacked, steps, step_axis)
            use.site, use.pre_chain = "scan", pre[e.ins[i]]
            use.operand = src[e.ins[i]]
            use.base, use.split = base, split
            uses.setdefault(j, []).append(use)
    for r in body.outs:
        if isinstance(r, Var) and r in inner_alias:
            j = inner_alias[r][0]
            reasons.setdefault(j, []).append("returned from a `lax.scan` body")
    return uses, reasons


def _nested_scan_uses(e, ik, k, body, steps, alias, uses, reasons):
    """Uses inside a scan ``e`` (body equation ``ik``) of the body of scan ``k``, lifted over
    both scans' steps: example i's gradient is ``Σ_{s,t} op_Wᵀ(a_{i,s,t}, g_{i,s,t})`` for a
    leaf shared by both loops, one gradient per outer step for a leaf the outer scan is
    scanned over (and likewise, recursively, for deeper nesting)."""
    inner_alias, pre, src = alias
    leaf_pos, outer_stacked = {}, {}
    for q, r in enumerate(e.ins):
        if isinstance(r, Var) and r in inner_alias:
            j, chain, stacked = inner_alias[r]
            leaf_pos[q] = (j, chain)
            outer_stacked[q] = (stacked, pre[r])
    found, why = _scan_uses(e, ik, leaf_pos)
    for j, ws in why.items():
        reasons.setdefault(j, []).extend(f"{w}, nested inside a `lax.scan` body" for w in ws)
    for j, inner_uses in found.items():
        for iu in inner_uses:
            stacked, pre_chain = outer_stacked[iu.operand]
            lifted = lift_over_steps(iu.op, iu.pos, steps, stacked)
            if lifted is None:
                reasons.setdefault(j, []).append(
                    f"a {iu.kind} use of a leaf scanned over by the outer loop, nested inside "
                    "a `lax.scan` body"
                )
                continue
            op, step_axis = lifted
            level = Level(iu.chain_program, iu.chain, iu.stacked, iu.steps, iu.step_axis)
            use = Use(iu.kind, k, iu.pos, iu.pre_chain, True, op, (k, *iu.scan), body)
            use.stacked, use.steps, use.step_axis = stacked, steps, step_axis
            use.site, use.pre_chain, use.nest = "scan", pre_chain, [level, *iu.nest]
            use.operand = src[e.ins[iu.operand]]
            use.base, use.split = iu.base, iu.split
            uses.setdefault(j, []).append(use)


def _cond_uses(eqn: Eqn, k: int, leaf_pos: dict):
    """Uses of parameters inside the branches of a ``cond``/``switch``, per branch.

    Example i's gradient through a branch it does not take is zero (under ``vmap`` every
    branch runs and the output is selected, so that branch's cotangent is zero), so each
    branch's uses are uses of their own, captured where they are. Same return value as
    :func:`_scan_uses`.
    """
    uses: dict = {}
    reasons: dict = {}
    leaf_in = {}
    for q, (j, chain) in leaf_pos.items():
        if q == 0:
            reasons.setdefault(j, []).append("used as the index of a `cond`/`switch`")
        else:
            leaf_in[q - 1] = (j, chain)
    if not leaf_in:
        return uses, reasons
    for bi, branch in enumerate(eqn.params["branches"]):
        body = flatten(branch)
        inner_alias = {body.invars[q]: (j, []) for q, (j, _) in leaf_in.items()}
        pre = {body.invars[q]: chain for q, (_, chain) in leaf_in.items()}
        for ik, e in enumerate(body.eqns):
            param_pos = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and r in inner_alias]
            if not param_pos:
                continue
            if e.primitive.name in ALIAS_PRIMITIVES and len(e.ins) == 1 and len(e.outs) == 1:
                j, chain = inner_alias[e.ins[0]]
                inner_alias[e.outs[0]] = (j, [*chain, ik])
                pre[e.outs[0]] = pre[e.ins[0]]
                continue
            kind = _classify(e, param_pos)
            for i in param_pos:
                j, chain = inner_alias[e.ins[i]]
                if kind is None:
                    why = _reason(e, param_pos)
                    reasons.setdefault(j, []).append(f"{why}, inside a `cond` branch")
                    continue
                key = (k, bi, ik)
                base, split = real_form(e, i)
                use = Use(kind, k, i, chain, True, base, key, body, site="cond")
                use.pre_chain, use.base, use.split = pre[e.ins[i]], base, split
                uses.setdefault(j, []).append(use)
        for r in body.outs:
            if isinstance(r, Var) and r in inner_alias:
                reasons.setdefault(inner_alias[r][0], []).append("returned from a `cond` branch")
    return uses, reasons


def analyse(fn, params, example) -> Analysis:
    """Traces ``fn(params, example)`` (per example) and classifies every parameter's uses.

    Args:
      fn: ``fn(params, example) -> outputs`` for ONE example.
      params, example: arrays or ``jax.ShapeDtypeStruct`` of one example.

    Returns:
      An :class:`Analysis`; ``program`` takes ``(*param_leaves, *example_leaves)``.
    """
    param_leaves, param_def = jax.tree_util.tree_flatten(params)
    ex_leaves, ex_def = jax.tree_util.tree_flatten(example)
    n = len(param_leaves)

    def flat_fn(*leaves):
        p = jax.tree_util.tree_unflatten(param_def, leaves[:n])
        e = jax.tree_util.tree_unflatten(ex_def, leaves[n:])
        return jax.tree_util.tree_leaves(fn(p, e))

    structs = [jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in param_leaves]
    structs += [jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in ex_leaves]
    program = flatten(jax.make_jaxpr(flat_fn)(*structs))

    alias: dict = {v: (j, []) for j, v in enumerate(program.invars[:n])}
    uses: dict = {j: [] for j in range(n)}
    other: dict = {}  # leaf -> reasons
    for k, e in enumerate(program.eqns):
        param_pos = [p for p, r in enumerate(e.ins) if isinstance(r, Var) and r in alias]
        if not param_pos:
            continue
        if e.primitive.name in ALIAS_PRIMITIVES and len(e.ins) == 1 and len(e.outs) == 1:
            j, chain = alias[e.ins[0]]
            alias[e.outs[0]] = (j, [*chain, k])
            continue
        if e.primitive.name in ("scan", "cond"):
            nested = _scan_uses if e.primitive.name == "scan" else _cond_uses
            found, why = nested(e, k, {p: alias[e.ins[p]] for p in param_pos})
            for j, js in found.items():
                uses[j].extend(js)
            for j, ws in why.items():
                other.setdefault(j, []).extend(ws)
            continue
        kind = _classify(e, param_pos)
        for p in param_pos:
            j, chain = alias[e.ins[p]]
            if kind is None:
                other.setdefault(j, []).append(_reason(e, param_pos))
            else:
                base, split = real_form(e, p)
                use = Use(kind, k, p, chain, op=base, chain_program=program)
                use.base, use.split = base, split
                uses[j].append(use)
    for r in program.outs:  # a parameter returned as (part of) the loss
        if isinstance(r, Var) and r in alias:
            other.setdefault(alias[r][0], []).append("returned as (part of) the loss")

    fast, exact, unused = {}, [], []
    for j in range(n):
        if j in other:
            exact.append(j)
        elif uses[j]:
            fast[j] = uses[j]
        else:
            unused.append(j)

    # Values that differ between examples, as ``vmap`` batches them (see :func:`varying`):
    # those the example or an exact parameter (which gets a per-example copy) reaches.
    inputs = set(program.invars[n:]) | {program.invars[j] for j in exact}
    top = varying(program, inputs)
    body_varying: dict = {}
    for j_uses in fast.values():
        for u in j_uses:
            if u.scan is None:
                u.batched = program.eqns[u.eqn].outs[0] in top
            elif u.site == "scan":  # level by level, outermost first, for a nested use
                path, eqn, outer = u.scan[:1], program.eqns[u.scan[0]], top
                for body in [u.chain_program, *(lv.body for lv in u.nest)]:
                    if path not in body_varying:
                        body_varying[path] = _scan_body_varying(eqn, body, outer)
                    outer = body_varying[path]
                    eqn = body.eqns[u.scan[len(path)]]
                    path = u.scan[: len(path) + 1]
                u.batched = eqn.outs[0] in outer
    reasons = {j: "; ".join(dict.fromkeys(other[j])) for j in exact}
    return Analysis(program, n, fast, exact, unused, reasons)


def _scan_body_varying(eqn: Eqn, body: Program, outer: set) -> set:
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


# Dependence on the example, the way ``vmap`` batches: an output is example-dependent iff
# ``vmap`` gives it a batch axis. For most primitives that is "some input is", but a loop,
# a branch or a custom call may return outputs that the example never reaches although it
# enters the equation (a loop counter, a carry iterated on constants): ``vmap`` leaves those
# unbatched, and their cotangent is then the whole batch's. Calling them example-dependent
# would hand every example the batch's cotangent, so this is the one rule the analysis uses.
# The converse error only costs memory: a use thought the same for every example gets the
# batch axis added to its output (see ``Use.batched``), which is exact either way. So an
# unknown primitive counts as "some input is"; the loops, branches and calls that can return
# unbatched outputs from batched inputs are read through their bodies.


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
    inner = jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr
    env = {v for v, f in zip(inner.invars, flags, strict=True) if f}
    dep = lambda a: not isinstance(a, jcore.Literal) and a in env
    for e in inner.eqns:
        flags = [dep(a) for a in e.invars]
        outs = varying_outs(e.primitive.name, e.params, flags, len(e.outvars))
        env.update(v for v, f in zip(e.outvars, outs, strict=True) if f)
    return [dep(a) for a in inner.outvars]


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


def use_perm(program: Program, use: Use, ndim: int):
    """The permutation from a leaf to a use's operand (None if not only transposes)."""
    levels = use_levels(use) if use.site == "scan" else [(False, use.chain_program, use.chain)]
    if any(stacked for stacked, _, _ in levels):
        return None
    perm = chain_perm(program, use.pre_chain, ndim)
    for _, body, chain in levels:
        perm = None if perm is None else chain_perm(body, chain, ndim, perm)
    return perm


def apply_use_chain(program: Program, use: Use, x):
    """The leaf value ``x`` as the use's operand sees it (over all steps, when scanned over)."""
    x = apply_chain(program, use.pre_chain, x)
    levels = use_levels(use) if use.site == "scan" else [(False, use.chain_program, use.chain)]

    def down(v, d):  # the leaf as level d's body sees it, then its chain there, and deeper
        if d == len(levels):
            return v
        stacked, body, chain = levels[d]
        inner = lambda w: down(apply_chain(body, chain, w), d + 1)
        return jax.vmap(inner)(v) if stacked and (chain or d + 1 < len(levels)) else inner(v)

    return down(x, 0)


def apply_chain(program: Program, chain: list, x):
    """Applies the alias equations ``chain`` (reshape, transpose, ...) to a leaf value ``x``.

    A cast of the (real) leaf to a complex dtype is skipped: only a use in real form (see
    :func:`real_form`) has one, and its rules take the parameter operand real.
    """
    for k in chain:
        e = program.eqns[k]
        if e.primitive.name == "convert_element_type" and _is_complex(e.out_avals[0]):
            continue
        x = e.primitive.bind(x, **e.primitive.get_bind_params(e.params))
    return x


def chain_perm(program: Program, chain: list, ndim: int, start=None):
    """The axis permutation an alias chain of transposes applies, or None for other ops.

    ``start`` is a permutation already applied (by an earlier chain), or None for none.
    """
    perm = tuple(range(ndim)) if start is None else start
    for k in chain:
        e = program.eqns[k]
        if e.primitive.name == "transpose":
            perm = tuple(perm[p] for p in e.params["permutation"])
        elif e.primitive.name not in ("convert_element_type", "copy", "copy_p"):
            return None
    return perm
