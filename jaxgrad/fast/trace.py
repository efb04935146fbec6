"""Reading a loss's structure off its jaxpr: one walker over frames, one table of rules.

The per-example loss ``S(params, example)`` is traced to a jaxpr (no batch axis), calls to
``jit``/``closed_call``/``checkpoint`` bodies are inlined (:func:`flatten`), and one recursive
walker (:func:`walk`) follows every parameter leaf through the program's *frames*: the top
level, a ``lax.scan`` body (its uses lifted over the steps), a ``cond``/``switch`` branch, a
``custom_jvp`` call's rule, nested in any order and to any depth (a scan in a branch in a
scan: each use records its frames, :attr:`Use.levels`). At each equation that reads a
followed value it calls the equation's rule from :data:`RULES`, the one table of what every
primitive means to the fast path:

* ``alias`` — the result is the leaf's entries re-laid (``reshape``, ``transpose``, ``slice``,
  a cast, a ``broadcast_in_dim`` adding unit axes, ...): followed further, the equation added
  to the use's alias chain (norms are preserved; the transposes map gradients back);
* ``use`` — a *fast use*, one of the kinds in :data:`jaxgrad.fast.rules.KINDS`:
  ``dot_general`` (**dense**, a complex other operand read as two real positions, see
  :func:`real_form`), ``conv_general_dilated`` (**conv**), an embedding ``gather``
  (**gather**); per-example gradients come from its kept operand ``A`` and its output
  cotangent ``G``, by the route its kind's entry decides (:mod:`jaxgrad.fast.rules`);
* ``frame`` — ``scan``/``cond``/``custom_jvp_call``: the walker recurses into the
  body/branches/rule;
* ``ignore`` — no gradient reaches the leaf through it (``stop_gradient``, ``debug_print``);
* anything else — a reason: the leaf takes the *exact fallback* (a per-example copy).

**Custom derivatives.** A ``custom_jvp`` call is read through the user's rule, never its
body: the frame is the rule *linearised* (:func:`linearised`: ``jax.jvp`` of the call,
``(primals, tangents) -> (outputs, output tangents)``), with the leaf entering as its
operand's tangent. The gradient ``jax.grad`` takes through the call is the transpose of that
tangent map, so a parameter used densely in it (``x @ dW`` for a rule of ``x @ W``, whatever
its scale) is a fast use, exact for any rule; one the map uses otherwise falls back, the
reason naming the function. A ``custom_vjp`` call is *not* a frame: its gradient is the
user's ``bwd`` applied to the output cotangent during the backward pass, a Python function
that need not be linear (a gradient clip) and has no forward map whose uses could be
factored, so a parameter read inside one takes the exact route, its reason naming the
function and the rule (the exact route runs the rule as ``jax.grad`` does).

**Reparametrised weights.** An equation whose outputs do not depend on the example and that
reads a parameter (``W * M``, ``g * V / ‖V‖``, ``W0 + A @ B``, ``concatenate``, a constant
scatter ...) is part of an example-independent *transformation* ``W_eff = f(θ)``. Its results
that ordinary equations read are *effective weights*: followed like leaves (their uses are
fast uses), and the per-example gradient of ``θ`` is ``f``'s VJP applied to the effective
weights' per-example gradients (see :class:`Analysis` and ``passes.fast_pass``). The axes
an effective weight is separable along (``J_f`` block diagonal, e.g. per output channel) are
read off the same equations (:func:`separable_axes`) for the plan.

**Scaled weights.** Where an effective weight is ``(θ' - m) ⊙ Π_k F_k`` (``θ'`` an alias of
one leaf; each factor broadcast along axes of one side of every dense/conv use; see
:class:`Scale` and :func:`_scalings`), the leaf θ is a fast leaf whose uses are the effective
weight's with the factors folded into ``A`` or ``G``: no per-example ``∇_{W_eff}`` is formed.
Factors made of other leaves (``g``) keep the VJP route on their (small) per-example
gradients; factors and offsets made of θ itself, per channel (weight normalisation, weight
standardisation), add exact per-channel corrections (``passes._Normaliser``).

**Example-dependence** is one dataflow rule (:func:`varying_outs`) that matches what ``vmap``
batches: an output of a loop, branch or custom call that the example does not reach is
unbatched even when an example-dependent value enters the equation.

Adding a primitive is one entry in one table. A primitive whose result holds its
operand's entries, re-laid (its VJP only places them back, so norms are preserved), is an
alias; one through which no gradient flows is ignored::

    RULES["my_relayout"] = alias
    RULES["my_log_hook"] = ignore

and a new kind of fast use is one entry in :data:`jaxgrad.fast.rules.KINDS` (the module
docstring there shows one): the walker gives its primitive the ``use`` rule
(:func:`rule_of`), the fast pass captures it wherever it sits (``passes._capture``, one
handler per frame primitive) and its route decides how its norms are formed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

from jaxgrad.fast import rules

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
                    e.source_info,
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


@dataclasses.dataclass(frozen=True)
class Use:
    """One fast use of a parameter leaf: equation ``eqn`` reads the leaf at operand ``pos``.

    ``chain`` lists the alias equations (reshape, transpose, ...) from the leaf to the operand.
    """

    kind: str  # "dense" | "conv" | "gather"
    eqn: int
    pos: int
    chain: tuple
    # Whether the use's output varies with the example as ``vmap`` batches it (see
    # :func:`varying`; else it is the same for every example, e.g. a position-embedding
    # lookup with constant indices or a lookup by a loop counter, and the perturbation must
    # add the batch axis itself for its cotangent to be per example, not the batch's).
    # Inside a scan body: whether it varies at some step.
    batched: bool = True
    # The equation the rules see. For a use inside a ``scan`` body it is the body's equation
    # lifted over the steps (see :func:`lift_over_steps`); else ``program.eqns[eqn]``.
    op: Eqn | None = None
    # For a use inside a frame: the path of equation indices from the top level to it (an
    # equation index per frame, and after a ``cond``'s the branch index).
    scan: tuple | None = None
    # The outermost frame the use sits in (see :attr:`levels`, which reads these fields as
    # its first :class:`Level`): the frame's body :class:`Program` the chain lives in (the
    # top-level program for a use at the top level), and for a scan whether the leaf is
    # scanned over (``xs``: one slice per step) rather than shared by all steps, the number
    # of steps, and the axis of the lifted output the step axis of the cotangent goes to.
    chain_program: Program | None = None
    stacked: bool = False
    steps: int = 1
    step_axis: int = 0
    # Its kind: "" at the top level, else a :attr:`Level.frame` ("scan", "cond",
    # "custom_jvp").
    site: str = ""
    # For a use inside a frame: the alias chain (in the top-level program) from the leaf to
    # the frame's operand, applied before ``chain``.
    pre_chain: tuple = ()
    # The deeper frames, one :class:`Level` each, outermost first (any nesting of scans,
    # branches and custom-derivative rules); ``op`` is lifted over every scan's steps (the
    # outer first); the captured arrays hold the example axis after the outermost scan's
    # steps, ``(steps, B, *inner steps, ...)`` (see :attr:`scans`).
    nest: tuple = ()
    # For a use inside a frame: the outermost frame's operand position the leaf enters by.
    operand: int = -1
    # The equation at one step, before any lift over steps (or its real form).
    base: Eqn | None = None
    # For a real form: the axis of ``base``'s output that holds the real and imaginary
    # parts (the captured cotangent is ``(Re G, −Im G)`` there); -1 for a real use.
    split: int = -1
    # Where the user wrote it: "file.py:123 (fn)".
    source: str = ""
    # For the use of a *scaled* leaf θ through an effective weight ``W_eff = θ' ⊙ Π_k F_k``
    # (see :class:`Scale`): the factors, each pushed into the kept operand ``A`` or the
    # cotangent ``G``; ``chain`` then runs from the leaf through ``θ'`` to the operand. And the
    # transformation's primitives (for the plan).
    scale: tuple = ()
    via: tuple = ()
    # For a scaled use: the value ``θ'`` (or the centred ``θ' - m``, see ``Scale.offset``)
    # and how many equations of ``chain`` lead from the leaf to it.
    theta_term: Any = None
    theta_chain: int = 0
    # For the use of a leaf concatenated into an effective weight (see :func:`_selections`):
    # ``(side, axis, start, stop)``, the slice of ``A`` (side "a") or ``G`` ("g") per example
    # along ``axis`` that meets the leaf's block; ``op`` is then the use on that block alone.
    select: tuple = ()

    @property
    def key(self):
        """Where the use's operand and cotangent are captured."""
        return self.scan if self.scan is not None else (self.eqn,)

    @property
    def levels(self) -> tuple:
        """Every frame the use sits in, one :class:`Level` each, outermost first (none at
        the top level)."""
        if self.site == "":
            return ()
        branch = self.scan[1] if self.site == "cond" else -1
        first = Level(
            self.chain_program, self.chain, self.stacked, self.steps, self.step_axis, branch,
            self.site,
        )  # fmt: skip
        return (first, *self.nest)

    @property
    def scans(self) -> tuple:
        """The scans among :attr:`levels`, outermost first: the step axes of the captured
        arrays (branches and custom rules add none)."""
        return tuple(lv for lv in self.levels if lv.is_scan)


@dataclasses.dataclass(frozen=True)
class Level:
    """One frame a use sits in (see :attr:`Use.levels`): its body, the alias chain in it, and

    * ``frame="scan"``: whether the leaf is scanned over by it, its steps, and the axis of its
      lift's output that holds them;
    * ``frame="cond"``, branch ``branch``: no steps, nothing lifted, and the use's cotangent
      is zero for an example, or a step, that takes another branch;
    * ``frame="custom_jvp"``: the call's rule, linearised (see :func:`linearised`): no steps,
      nothing lifted; the leaf enters as the tangent of its operand.
    """

    body: Program
    chain: tuple
    stacked: bool
    steps: int
    step_axis: int
    branch: int = -1
    frame: str = "scan"

    @property
    def is_scan(self) -> bool:
        return self.frame == "scan"


def use_levels(use: Use) -> list:
    """``(stacked, body, chain)`` per frame of a use, outermost first (for a use at the top
    level: its chain in the top-level program)."""
    if not use.levels:
        return [(False, use.chain_program, use.chain)]
    return [(lv.stacked, lv.body, lv.chain) for lv in use.levels]


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
    gradient goes to them, see ``passes``).
    """

    ref: Any  # Var | Const
    inverse: bool
    side: str  # "a" | "g"
    shape: tuple
    perm: tuple
    target: tuple
    dims: tuple
    leaves: frozenset = frozenset()
    # A *normaliser*: the factor is made of ``θ`` itself, one output channel (or row) of it
    # per entry (``‖V_o‖`` of weight normalisation): its share of ``θ``'s gradient,
    # ``J_Fᵀ ∇_F``, is a per-channel correction (see ``passes``).
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
        if RULES.get(e.primitive.name) not in ALIAS_RULES or not _is_alias(e):
            return None
        chain.append(k)
        ref = e.ins[0]
    return None


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
    return None


def _scalings(program: Program, n: int, top: set, region, outputs, deps, uses) -> dict:
    """The effective weights whose leaf takes the *scaled* route: ``v -> (leaf, chain,
    {use eqn: scales})`` for ``W_eff = θ' ⊙ Π_k F_k`` with ``θ'`` an alias of one leaf ``θ``,
    every use of ``W_eff`` a top-level real ``dot_general`` or convolution reached by
    transposes only, and every factor spanning one side of each (see :class:`Scale`).

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
        if not us or any(
            u.kind not in ("dense", "conv") or u.site != "" or u.split >= 0 or u.pre_chain
            for u in us
        ):
            continue
        perms = [chain_perm(program, u.chain, len(shape)) for u in us]
        if any(p is None for p in perms):
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
                        per_use[u.eqn] = tuple(scales)
                        continue
                break
            if len(per_use) == len(us):
                if all(rules.scaled_pays(u.op, u.pos, _products(per_use[u.eqn])) for u in us):
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


def _selections(program: Program, n: int, outputs, deps: dict, uses: dict, skip) -> dict:
    """Effective weights that concatenate parameter blocks: ``leaf -> [Use]`` for the leaves
    whose every use goes through them.

    ``W_eff = concatenate([θ_1, θ_2, ...])`` (each part an alias of a leaf, or a constant)
    with every use a top-level real dense/conv use reached by transposes, the concatenated
    axis one of the use's sides (a contracted axis or input channels: the block meets a slice
    of ``A``; a free axis or output channels: a slice of ``G``): block ``p``'s per-example
    gradient is the use's on the slices, ``op_Wᵀ(A_i[p], G_i)`` or ``op_Wᵀ(A_i, G_i[p])``, so
    each leaf is a fast leaf whose use is the block's own (a smaller ``op``), with its route.
    """
    producer = {o: k for k, e in enumerate(program.eqns) for o in e.outs}
    found: dict = {}  # v -> [(leaf, chain, {use eqn: (op, select)})]
    for v, out in enumerate(outputs):
        k = producer.get(out)
        us = uses.get(n + v, [])
        if v in skip or k is None or program.eqns[k].primitive.name != "concatenate" or not us:
            continue
        e = program.eqns[k]
        shape, d = tuple(e.out_avals[0].shape), e.params["dimension"]
        if any(u.kind not in ("dense", "conv") or u.site or u.split >= 0 for u in us):
            continue
        perms = [chain_perm(program, u.chain, len(shape)) for u in us]
        if any(p is None for p in perms):
            continue
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
                    sel[u.eqn] = (
                        _block_op(u.op, u.pos, axis, side, ax, size),
                        (side, ax, start, start + size),
                    )
                parts.append((*theta, sel))
            start += size
        if ok and parts:
            found[v] = parts
    # A leaf is selected if every used effective weight it reaches is one of these.
    while True:
        drop = {
            v for v, parts in found.items() for j, _, _ in parts
            if any(w not in found and j in deps.get(o, ()) and uses.get(n + w)
                   for w, o in enumerate(outputs))
        }  # fmt: skip
        if not drop:
            break
        found = {v: x for v, x in found.items() if v not in drop}
    out: dict = {}
    for v, parts in found.items():
        for j, chain, sel in parts:
            out.setdefault(j, []).extend(
                dataclasses.replace(
                    u, op=sel[u.eqn][0], chain=(*chain, *u.chain), select=sel[u.eqn][1]
                )
                for u in uses[n + v]
            )
    return out, tuple(found)


def _block_op(eqn: Eqn, pos: int, axis: int, side: str, ax: int, size: int) -> Eqn:
    """``eqn`` on one block of its parameter operand (``size`` entries along ``axis``): the
    matching slice of ``A`` (side "a", axis ``ax`` of ``A``) or of the output (side "g")."""
    in_avals = list(eqn.in_avals)
    w = in_avals[pos]
    in_avals[pos] = _shaped(tuple(size if i == axis else s for i, s in enumerate(w.shape)), w.dtype)
    out_avals = list(eqn.out_avals)
    if side == "a":
        a = in_avals[1 - pos]
        in_avals[1 - pos] = _shaped(
            tuple(size if i == ax else s for i, s in enumerate(a.shape)), a.dtype
        )
    else:
        o = out_avals[0]
        out_avals[0] = _shaped(
            tuple(size if i == ax else s for i, s in enumerate(o.shape)), o.dtype
        )
    return dataclasses.replace(eqn, in_avals=in_avals, out_avals=out_avals)


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


def program_aval_in(program: Program, v):
    """The abstract value of a program input or of a value some equation makes."""
    for e in program.eqns:
        for r, a in zip(e.ins, e.in_avals, strict=True):
            if r == v:
                return a
    return program_aval(program, v)


def eval_known(program: Program, values: dict, wanted) -> list:
    """The values ``wanted`` (Vars or Consts) computed from ``values`` (top-level Var ->
    value): every equation whose inputs are known, in order, until they are."""
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
        env.update(zip(e.outs, outs, strict=True))
    return [read(r) for r in wanted]


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
    the scaled route (a fast leaf, its uses carrying their :class:`Scale` s), as ``v -> leaf``;
    their per-example gradients are never formed. ``factors``: the values ``F_k`` of those
    weights that parameter leaves make (a scale ``s``, weight norm's ``g``): their per-example
    gradients come from ``A``, ``G`` and ``θ'`` (see ``passes``), then go through the VJP.
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


def source_line(eqn: Eqn) -> str:
    """Where the user wrote an equation: ``"file.py:123 (fn)"`` (its innermost user frame)."""
    if eqn.source is None:
        return ""
    frame = source_info_util.user_frame(eqn.source.traceback)
    if frame is None:
        return ""
    name = frame.function_name.rsplit(".", 1)[-1]  # "step", not "loss.<locals>.step"
    return f"{os.path.basename(frame.file_name)}:{frame.start_line} ({name})"


def _is_complex(aval) -> bool:
    return jax.numpy.issubdtype(aval.dtype, jax.numpy.complexfloating)


def _classify(eqn: Eqn, param_pos: list) -> str | None:
    """The kind of fast use ``eqn`` is (its entry in :data:`jaxgrad.fast.rules.KINDS`), or None.

    (Complex values around a real parameter, the real leaf cast: only a ``dot_general`` has
    a real form the rules are written for, see :func:`real_form`; the table says so.)
    """
    for kind, entry in rules.KINDS.items():
        if entry.primitive == eqn.primitive.name and entry.accepts(eqn, param_pos):
            return kind
    return None


# Primitives whose body is opaque to the use classification: a parameter read inside them
# takes the exact route. (Scans, branches and ``custom_jvp`` calls are frames, see
# :data:`RULES`.) A ``custom_vjp``'s gradient is the user's ``bwd`` applied to the output
# cotangent in the backward pass: a Python function of it that need not be linear (a
# gradient clip), with no forward map whose uses could be factored into ``A`` and ``G``.
_OPAQUE = {
    "while": "inside a `while_loop` (a loop with a dynamic trip count)",
    "custom_vjp_call": (
        "inside the `custom_vjp` function `{name}`: its gradient is the user's bwd rule "
        "applied to the output cotangent (possibly nonlinear, e.g. a clip), which cannot be "
        "factored into kept operands and cotangents; the exact route keeps the rule"
    ),
}
_OPAQUE["custom_vjp_call_jaxpr"] = _OPAQUE["custom_vjp_call"]


def custom_name(eqn: Eqn) -> str:
    """The user's name of a custom-derivative call's function (``""`` if JAX kept none)."""
    call = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
    info = getattr(getattr(call, "jaxpr", call), "debug_info", None)
    src = getattr(info, "func_src_info", None) or ""
    return src.split(" at ")[0]


def _reason(eqn: Eqn, param_pos: list) -> str:
    """Why a use of a parameter by ``eqn`` is not a dense/conv/gather use."""
    name = eqn.primitive.name
    if name in _OPAQUE:
        return _OPAQUE[name].format(name=custom_name(eqn))
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


# --- The walker and its rule table ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Track:
    """A followed value in a frame: leaf ``leaf`` through the alias equations ``chain`` of
    this frame; in a scan body, whether the leaf is scanned over and the scan's operand
    position it entered through."""

    leaf: int
    chain: tuple = ()
    stacked: bool = False
    operand: int = -1


@dataclasses.dataclass(frozen=True)
class Found:
    """A fast use found in a frame, relative to it (see :func:`walk`)."""

    leaf: int
    kind: str
    path: tuple  # equation indices from this frame down
    pos: int
    chain: tuple  # alias chain in this frame
    op: Eqn  # lifted over the steps of every deeper scan level
    base: Eqn
    split: int
    levels: tuple  # Level per deeper frame, outermost first
    root: Track  # how the leaf entered this frame
    source: str


@dataclasses.dataclass
class Frame:
    """One body the walker reads: the program, its followed values, where it sits ("top",
    "scan", "cond"), the suffix its reasons carry, and what it found."""

    body: Program
    tracked: dict  # Var -> Track
    where: str
    suffix: str = ""
    region: frozenset = frozenset()  # top level: equations of the reparametrisation
    found: list = dataclasses.field(default_factory=list)
    reasons: dict = dataclasses.field(default_factory=dict)
    transformed: set = dataclasses.field(default_factory=set)  # leaves read by the region

    def reason(self, leaf: int, why: str) -> None:
        self.reasons.setdefault(leaf, []).append(why + self.suffix)

    def merge(self, inner: Frame) -> None:
        """Takes the reasons of a frame nested in this one, saying where this one sits."""
        suffix = ", nested inside a `lax.scan` body" if self.where == "scan" else self.suffix
        for j, ws in inner.reasons.items():
            self.reasons.setdefault(j, []).extend(w + suffix for w in ws)


# A rule: ``rule(frame, k, eqn, positions)`` for equation ``k`` of ``frame.body`` reading
# followed values at operand ``positions``.
Rule = Callable[[Frame, int, Eqn, list], None]


def alias(frame: Frame, k: int, e: Eqn, positions: list) -> None:
    """Each entry of the result is one entry of the operand: follow it, chain extended."""
    if len(e.ins) != 1 or len(e.outs) != 1:
        return other(frame, k, e, positions)
    t = frame.tracked[e.ins[0]]
    frame.tracked[e.outs[0]] = dataclasses.replace(t, chain=(*t.chain, k))


def ignore(frame: Frame, k: int, e: Eqn, positions: list) -> None:
    """No gradient reaches the operand through this equation (its result is not followed)."""


def broadcast(frame: Frame, k: int, e: Eqn, positions: list) -> None:
    """``W[None, None]``: a ``broadcast_in_dim`` that only adds unit axes is an alias."""
    return (alias if _is_alias(e) else other)(frame, k, e, positions)


def use(frame: Frame, k: int, e: Eqn, positions: list) -> None:
    """A fast use (dense/conv/gather, see :func:`_classify`), or a reason."""
    kind = _classify(e, positions)
    for i in positions:
        t = frame.tracked[e.ins[i]]
        if kind is None:
            frame.reason(t.leaf, _reason(e, positions))
            continue
        base, split = real_form(e, i)
        frame.found.append(
            Found(t.leaf, kind, (k,), i, t.chain, base, base, split, (), t, source_line(e))
        )


def bodies(e: Eqn) -> list:
    """The bodies of a frame equation, flattened (the same :class:`Program` every time): a
    scan's body, a cond's branches, a ``custom_jvp`` call's linearised rule
    (:func:`linearised`). The walker reads them and ``passes`` captures in them."""
    if e.primitive.name == "scan":
        return [_flat(e.params["jaxpr"])]
    if e.primitive.name == "custom_jvp_call":
        return [linearised(e)]
    return [_flat(b) for b in e.params["branches"]]


def tangent_operands(e: Eqn) -> list:
    """The operands of a ``custom_jvp`` call that have a tangent (the inexact ones), in the
    order :func:`linearised` takes their tangents."""
    return [i for i, a in enumerate(e.in_avals) if jax.numpy.issubdtype(a.dtype, jax.numpy.inexact)]


def linearised(e: Eqn) -> Program:
    """A ``custom_jvp`` call as the user's rule sees it: ``(*primals, *tangents) ->
    (*primal outputs, *tangents of the inexact outputs)``, the rule traced by ``jax.jvp`` of
    the call (so it is exactly the map ``jax.grad`` transposes), flattened.

    The fast pass evaluates it with the primals stopped and the tangents ``x − sg(x)`` (zero,
    with the identity as derivative): the call's value is the primal output, and its
    gradient with respect to every operand is the transpose of the rule's tangent map, the
    user's rule. A parameter's uses in the tangent map (``x @ dW`` for a rule of ``x @ W``)
    are then fast uses like any other; walking the call's *body* would be wrong whenever the
    rule is not the body's derivative.
    """
    return _linearised(e.primitive, tuple(e.params.items()), tuple(e.in_avals))


@functools.lru_cache(maxsize=256)
def _linearised(primitive, params: tuple, in_avals: tuple) -> Program:
    params = dict(params)
    diff = [i for i, a in enumerate(in_avals) if jax.numpy.issubdtype(a.dtype, jax.numpy.inexact)]
    n = len(in_avals)

    def lin(*args):
        primals, tangents = list(args[:n]), list(args[:n])
        for i, a in enumerate(in_avals):  # integer operands: no tangent (float0 zeros)
            tangents[i] = np.zeros(a.shape, jax.dtypes.float0)
        for i, t in zip(diff, args[n:], strict=True):
            tangents[i] = t

        def call(*ops):
            out = primitive.bind(*ops, **primitive.get_bind_params(params))
            return list(out) if primitive.multiple_results else [out]

        outs, touts = jax.jvp(call, primals, tangents)
        inexact = lambda x: jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)
        return [*outs, *(t for o, t in zip(outs, touts, strict=True) if inexact(o))]

    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals]
    return flatten(jax.make_jaxpr(lin)(*structs, *(structs[i] for i in diff)))


def scan(frame: Frame, k: int, e: Eqn, positions: list) -> None:
    """A ``lax.scan`` (in any frame): its body is a frame; the uses found there (at any depth)
    are lifted over the steps."""
    p = e.params
    nc, ncar, steps = p["num_consts"], p["num_carry"], p["length"]
    (body,) = bodies(e)
    tracked = {}
    for q in positions:
        t = frame.tracked[e.ins[q]]
        if nc <= q < nc + ncar:
            frame.reason(t.leaf, "carried through a `lax.scan` (a loop state)")
        else:
            tracked[body.invars[q]] = Track(t.leaf, (), q >= nc + ncar, q)
    inner = walk(Frame(body, tracked, "scan", ", inside a `lax.scan` body"))
    frame.merge(inner)
    for f in inner.found:
        lifted = lift_over_steps(f.op, f.pos, steps, f.root.stacked)
        if lifted is None:
            # (no lift of the use over the steps is written: a conv, or a lookup in a table
            # the loop is scanned over)
            why = f"a {f.kind} use" + (
                " of a leaf scanned over by the loop" if f.root.stacked else ""
            )
            frame.reason(
                f.leaf, why + (", nested" if f.levels else ",") + " inside a `lax.scan` body"
            )
            continue
        op, step_axis = lifted
        outer = frame.tracked[e.ins[f.root.operand]]
        level = Level(body, f.chain, f.root.stacked, steps, step_axis)
        frame.found.append(
            Found(
                f.leaf, f.kind, (k, *f.path), f.pos, outer.chain, op, f.base, f.split,
                (level, *f.levels), outer, f.source,
            )
        )  # fmt: skip


def cond(frame: Frame, k: int, e: Eqn, positions: list) -> None:
    """A ``cond``/``switch`` (in any frame): each branch is a frame, its uses (at any depth)
    its own (an enclosing scan's rule then lifts them over its steps)."""
    tracked_in = {}
    for q in positions:
        t = frame.tracked[e.ins[q]]
        if q == 0:
            frame.reason(t.leaf, "used as the index of a `cond`/`switch`")
        else:
            tracked_in[q - 1] = t
    for b, body in enumerate(bodies(e) if tracked_in else ()):
        tracked = {body.invars[q]: Track(t.leaf, (), False, q + 1) for q, t in tracked_in.items()}
        inner = walk(Frame(body, tracked, "cond", ", inside a `cond` branch"))
        frame.merge(inner)
        for f in inner.found:
            level = Level(body, f.chain, False, 1, -1, branch=b, frame="cond")
            frame.found.append(_enclosed(frame, e, f, (k, b), level))


def custom_jvp(frame: Frame, k: int, e: Eqn, positions: list) -> None:
    """A ``custom_jvp`` call (in any frame): the user's rule, linearised (:func:`linearised`),
    is a frame whose tangent inputs carry the leaf; its uses are those of the tangent map."""
    (body,) = bodies(e)
    slots = {q: len(e.ins) + s for s, q in enumerate(tangent_operands(e))}
    tracked = {}
    for q in positions:
        if q in slots:  # (an integer operand has no tangent: no gradient reaches it)
            tracked[body.invars[slots[q]]] = Track(frame.tracked[e.ins[q]].leaf, (), False, q)
    where = f", in the tangent map of the `custom_jvp` rule of `{custom_name(e)}`"
    inner = walk(Frame(body, tracked, "custom_jvp", where))
    frame.merge(inner)
    for f in inner.found:
        level = Level(body, f.chain, False, 1, -1, frame="custom_jvp")
        frame.found.append(_enclosed(frame, e, f, (k,), level))


def _enclosed(frame: Frame, e: Eqn, f: Found, at: tuple, level: Level) -> Found:
    """A use found in a frame of equation ``e`` (a branch, a custom rule: no steps, nothing
    lifted), as seen from the enclosing ``frame``: its path from ``at``, ``level`` added
    outermost, and the leaf's track where it entered ``e``."""
    outer = frame.tracked[e.ins[f.root.operand]]
    path = (*at, *f.path)
    return dataclasses.replace(
        f, path=path, chain=outer.chain, root=outer, levels=(level, *f.levels)
    )


def other(frame: Frame, k: int, e: Eqn, positions: list) -> None:
    """Any other reader of a parameter: the leaf takes the exact fallback, and why."""
    for i in positions:
        frame.reason(frame.tracked[e.ins[i]].leaf, _reason(e, positions))


# The rule of every primitive the fast path reads; any other primitive is ``other``.
RULES: dict[str, Rule] = {
    **dict.fromkeys(
        # Only permute, re-type or select a parameter's entries (``slice``: a block, e.g. one
        # of the Q, K, V parts of a fused weight): each entry of the result is one entry of
        # the leaf, so a use's per-example gradient norm is that of its gradient with respect
        # to the leaf (the transpose only places it, padding with zeros).
        (
            "reshape",
            "transpose",
            "squeeze",
            "expand_dims",
            "convert_element_type",
            "copy",
            "copy_p",
            "slice",
            "rev",
        ),
        alias,
    ),
    "broadcast_in_dim": broadcast,
    "stop_gradient": ignore,
    "debug_print": ignore,
    "debug_callback": ignore,
    "scan": scan,
    "cond": cond,
    "custom_jvp_call": custom_jvp,
}

# The rules that put the result in the use's alias chain (``apply_chain`` re-binds them).
ALIAS_RULES = (alias, broadcast)


def rule_of(name: str) -> Rule:
    """The rule of a primitive: its :data:`RULES` entry, :func:`use` for the primitive of a
    kind of fast use (:data:`jaxgrad.fast.rules.KINDS`), else :func:`other`."""
    if name in RULES:
        return RULES[name]
    return use if any(k.primitive == name for k in rules.KINDS.values()) else other


def walk(frame: Frame) -> Frame:
    """Reads ``frame.body``: calls the rule of every equation that reads a followed value.

    At the top level, equations of the reparametrisation (``frame.region``) only record the
    leaves they read: their results that ordinary equations read are followed as effective
    weights (seeded by :func:`analyse`).
    """
    for k, e in enumerate(frame.body.eqns):
        positions = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and r in frame.tracked]
        if not positions:
            continue
        if k in frame.region:
            frame.transformed.update(frame.tracked[e.ins[i]].leaf for i in positions)
            continue
        rule_of(e.primitive.name)(frame, k, e, positions)
    returned = {
        "top": "returned as (part of) the loss",
        "scan": "returned from a `lax.scan` body",
        "cond": "returned from a `cond` branch",
        "custom_jvp": "returned as a tangent by a `custom_jvp` rule",
    }[frame.where]
    for r in frame.body.outs:
        if isinstance(r, Var) and r in frame.tracked:
            frame.reasons.setdefault(frame.tracked[r].leaf, []).append(returned)
    return frame


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


def _struct(x):
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

    structs = [_struct(x) for x in (*param_leaves, *ex_leaves)]
    return flatten(jax.make_jaxpr(flat_fn)(*structs)), n


def primitives(program: Program) -> set:
    """The names of every primitive a program binds, in every sub-jaxpr (loops, branches,
    custom-derivative calls) too."""
    names: set = set()

    def visit(jaxpr):
        for e in jaxpr.eqns:
            names.add(e.primitive.name)
            for sub in jcore.jaxprs_in_params(e.params):
                visit(sub)

    for e in program.eqns:
        names.add(e.primitive.name)
        for sub in jcore.jaxprs_in_params(e.params):
            visit(sub)
    return names


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
    exact: set = set()
    while True:
        an, more = _analyse_once(program, n, exact)
        if not more:
            return an
        exact |= more


def _analyse_once(program: Program, n: int, exact: set) -> tuple:
    """One walk with the leaves ``exact`` given per-example copies: the analysis, and the
    leaves that must be added to ``exact`` (none when it is final)."""
    inputs = set(program.invars[n:]) | {program.invars[j] for j in exact}
    top = varying(program, inputs)
    region, outputs, deps = _region(program, n, exact, top)
    tracked = {v: Track(j) for j, v in enumerate(program.invars[:n])}
    tracked.update({v: Track(n + i) for i, v in enumerate(outputs)})
    frame = walk(Frame(program, tracked, "top", region=frozenset(region)))
    other = {j: list(ws) for j, ws in frame.reasons.items()}
    avals = [program_aval(program, v) for v in outputs]
    for i, a in enumerate(avals):  # the rules' real forms assume a real parameter operand
        if _is_complex(a):
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
    names = {
        j: tuple(
            dict.fromkeys(
                program.eqns[k].primitive.name
                for k in sorted(region)
                if any(j in deps.get(o, ()) for o in program.eqns[k].outs)
            )
        )
        for j in transformed
    }
    # Effective weights θ' ⊙ Π F_k: their leaf θ is a fast leaf, its uses scaled (see Scale).
    scalings, declined = (
        _scalings(program, n, top, region, outputs, deps, uses) if transformed else ({}, {})
    )
    scaled_uses: dict = {}
    selected, selections = (
        _selections(program, n, outputs, deps, uses, scalings) if transformed else ({}, ())
    )
    factor_leaves = {
        j for x in scalings.values() for ss in x[2].values() for sc in ss for j in sc.leaves
    }
    if set(selected) & ({x[0] for x in scalings.values()} | factor_leaves):
        selected, selections = {}, ()  # (a leaf both scaled and selected: the VJP route)
    for j, us in selected.items():
        scaled_uses[j] = [dataclasses.replace(u, via=names[j]) for u in us]
    for v, (j, chain, per_use, term) in scalings.items():
        scaled_uses.setdefault(j, []).extend(
            dataclasses.replace(
                u, chain=(*chain, *u.chain), scale=per_use[u.eqn], via=names[j],
                theta_term=term, theta_chain=len(chain),
            )
            for u in uses[n + v]
        )  # fmt: skip
    fast, exact_l, unused = {}, sorted(exact), []
    for j in range(n):
        if j in exact or (j in transformed and j not in scaled_uses):
            continue
        if uses.get(j) or scaled_uses.get(j):
            fast[j] = uses.get(j, []) + scaled_uses.get(j, [])
        else:
            unused.append(j)
    transform = None
    if transformed:
        through = {j: uses.get(j, []) for j in transformed if j not in scaled_uses}
        through.update({n + i: uses.get(n + i, []) for i in range(len(outputs))})
        through_leaves = tuple(j for j in transformed if j not in scaled_uses)
        factors = tuple(
            dict.fromkeys(
                sc.ref
                for us in scaled_uses.values()
                for u in us
                for sc in u.scale
                if sc.leaves & set(through_leaves)
            )
        )
        transform = Transform(
            through_leaves,
            tuple(outputs),
            tuple(program_aval(program, v) for v in outputs),
            names,
            {j: reads[j] for j in transformed},
            through,
            tuple(separable_axes(program, region, n, v) for v in outputs),
            {**{v: x[0] for v, x in scalings.items()}, **dict.fromkeys(selections, -1)},
            factors,
            tuple(
                v
                for v in range(len(outputs))
                if v not in scalings and v not in selections and uses.get(n + v)
            ),
            declined,
        )
    reasons = {j: "; ".join(dict.fromkeys(other.get(j, ["(a per-example copy)"]))) for j in exact_l}
    return Analysis(program, n, fast, exact_l, unused, reasons, transform), set()


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
            RULES.get(e.primitive.name, other) in ALIAS_RULES and _is_alias(e)
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


def program_aval(program: Program, v: Var):
    """The abstract value of a value some equation of ``program`` makes."""
    for e in program.eqns:
        for o, a in zip(e.outs, e.out_avals, strict=True):
            if o == v:
                return a
    raise KeyError(v)


def _region(program: Program, n: int, exact: set, top: set) -> tuple:
    """The reparametrisation: equations that read parameters, do not depend on the example
    and are not rules of their own (aliases, fast uses with an example-independent output,
    ``stop_gradient``); its *outputs*, the results that other equations (or loops, branches)
    read; and for every value the parameter leaves it is made of.

    Returns ``(region equation indices, outputs, deps)``.
    """
    deps: dict = {v: frozenset({j}) for j, v in enumerate(program.invars[:n]) if j not in exact}
    region: list = []
    for k, e in enumerate(program.eqns):
        d = frozenset().union(*(deps.get(r, frozenset()) for r in e.ins if isinstance(r, Var)))
        # (An example-dependent input with example-independent outputs, a loop reading the
        # example whose outputs do not depend on it, is read by its own rule instead.)
        if not d or any(r in top for r in (*e.outs, *e.ins) if isinstance(r, Var)):
            continue
        rule = rule_of(e.primitive.name)
        if rule is ignore or (rule in ALIAS_RULES and _is_alias(e)):
            if rule is not ignore:
                deps[e.outs[0]] = d
            continue
        positions = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and r in deps]
        if rule is use and _classify(e, positions) is not None:
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


def _is_alias(e: Eqn) -> bool:
    """Whether an equation of an alias rule is one here (``broadcast_in_dim`` may not be)."""
    if len(e.ins) != 1 or len(e.outs) != 1:
        return False
    if e.primitive.name != "broadcast_in_dim":
        return True
    shape, out = e.in_avals[0].shape, e.out_avals[0].shape
    dims = e.params["broadcast_dimensions"]
    added = [d for d in range(len(out)) if d not in dims]
    return all(out[d] == s for d, s in zip(dims, shape, strict=True)) and all(
        out[d] == 1 for d in added
    )


def _batched(program: Program, u: Use, top: set, cache: dict) -> bool:
    """Whether a use's output differs between examples, as ``vmap`` batches it (at some
    step, for a use in a scan: read level by level, outermost first). A use in a branch or a
    custom rule, at any depth, is taken as batched (its perturbation is added, never the tap,
    see ``passes._capture``: exact either way, see ``Use.batched``)."""
    if u.site == "":
        return program.eqns[u.eqn].outs[0] in top
    if not all(lv.is_scan for lv in u.levels):
        return True
    path, eqn, outer = u.scan[:1], program.eqns[u.scan[0]], top
    for body in [u.chain_program, *(lv.body for lv in u.nest)]:
        if path not in cache:
            cache[path] = _scan_body_varying(eqn, body, outer)
        outer = cache[path]
        eqn = body.eqns[u.scan[len(path)]]
        path = u.scan[: len(path) + 1]
    return eqn.outs[0] in outer


# --- Example-dependence: one dataflow rule ------------------------------------------------
#
# Dependence on the example, the way ``vmap`` batches: an output is example-dependent iff
# ``vmap`` gives it a batch axis. For most primitives that is "some input is", but a loop,
# a branch or a custom call may return outputs that the example never reaches although it
# enters the equation (a loop counter, a carry iterated on constants): ``vmap`` leaves those
# unbatched, and their cotangent is then the whole batch's. Calling them example-dependent
# would hand every example the batch's cotangent, so this is the one rule the analysis uses
# (for every frame: the top level, a scan body, a branch, a custom call's body). The converse
# error only costs memory: a use thought the same for every example gets the batch axis
# added to its output (see ``Use.batched``), which is exact either way. So an unknown
# primitive counts as "some input is"; the loops, branches and calls that can return
# unbatched outputs from batched inputs are read through their bodies.


def varying(program: Program, inputs: set) -> set:
    """The values of ``program`` that depend on the example, given the ``inputs`` that do."""
    out = set(inputs)
    for e in program.eqns:
        flags = [isinstance(r, Var) and r in out for r in e.ins]
        outs = varying_outs(e.primitive.name, e.params, flags, len(e.outs))
        out.update(v for v, f in zip(e.outs, outs, strict=True) if f)
    return out


@functools.lru_cache(maxsize=512)
def _flat(jaxpr) -> Program:
    closed = jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(jaxpr, ())
    return flatten(closed)


def jaxpr_varying(jaxpr, flags: list) -> list:
    """Which outputs of a (closed or open) jaxpr depend on the example, given its inputs'."""
    body = _flat(jaxpr)
    inside = varying(body, {v for v, f in zip(body.invars, flags, strict=True) if f})
    return [isinstance(r, Var) and r in inside for r in body.outs]


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
        return dataclasses.replace(
            eqn, params=params, in_avals=in_avals, out_avals=out_avals
        ), step_axis
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
        return dataclasses.replace(eqn, params=params, in_avals=in_avals, out_avals=out_avals), 0
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
    return dataclasses.replace(eqn, params=params, in_avals=in_avals, out_avals=out_avals), axis


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


def use_perm(program: Program, use: Use, ndim: int):
    """The permutation from a leaf to a use's operand (None if not only transposes)."""
    levels = use_levels(use)
    if any(stacked for stacked, _, _ in levels):
        return None
    perm = chain_perm(program, use.pre_chain, ndim)
    for _, body, chain in levels:
        perm = None if perm is None else chain_perm(body, chain, ndim, perm)
    return perm


def apply_use_chain(program: Program, use: Use, x):
    """The leaf value ``x`` as the use's operand sees it (over all steps, when scanned over)."""
    x = apply_chain(program, use.pre_chain, x)
    levels = use_levels(use)

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
