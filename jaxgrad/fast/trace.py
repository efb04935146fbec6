"""Reading a loss's structure off its jaxpr: one walker over frames, one table of rules.

The per-example loss ``S(params, example)`` is traced to a jaxpr (no batch axis), calls to
``jit``/``closed_call``/``checkpoint`` bodies are inlined (:mod:`jaxgrad.fast.program`), and
one recursive walker (:func:`walk`) follows every parameter leaf through the program's
*frames*: the top level, a ``lax.scan`` body (its uses lifted over the steps), a
``cond``/``switch`` branch, a ``custom_jvp`` call's rule, nested in any order and to any depth
(a scan in a branch in a scan: each use records its frames, :attr:`Use.levels`). At each
equation that reads a followed value it calls the equation's rule from :data:`RULES`, the one
table of what every primitive means to the fast path:

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

**Reparametrised weights** (an example-independent transformation ``W_eff = f(θ)`` followed
by ordinary uses) are found by :mod:`jaxgrad.fast.reparam`; **example-dependence** is the one
dataflow rule of :mod:`jaxgrad.fast.dependence`; :mod:`jaxgrad.fast.analysis` puts the walk
and both together (:func:`jaxgrad.fast.analysis.analyse`) over the flattened program of
:mod:`jaxgrad.fast.program`.

Adding a primitive is one entry in one table. A primitive whose result holds its
operand's entries, re-laid (its VJP only places them back, so norms are preserved), is an
alias; one through which no gradient flows is ignored::

    RULES["my_relayout"] = alias
    RULES["my_log_hook"] = ignore

and a new kind of fast use is one entry in :data:`jaxgrad.fast.rules.KINDS` (the module
docstring there shows one): the walker gives its primitive the ``use`` rule
(:func:`rule_of`), the fast pass captures it wherever it sits (``capture._capture``, one
handler per frame primitive) and its route decides how its norms are formed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxgrad.fast import rules
from jaxgrad.fast.program import (
    Eqn,
    Program,
    Var,
    flat_jaxpr,
    flatten,
    is_complex,
    primitives,
    shaped,
    source_line,
)


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
    # lifted over the steps (see :func:`lift_over_steps`); else ``program.eqns[eqn]``. A
    # convolution of a leaf its scan is scanned over has no equation of every step: ``op`` is
    # the step's, taken one step at a time (see :func:`stepwise`).
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
    # and how many equations of ``chain`` (of ``pre_chain`` for a use inside frames) lead
    # from the leaf to it.
    theta_term: Any = None
    theta_chain: int = 0
    # For the use of a leaf concatenated into an effective weight (see :func:`selected_weights`):
    # ``(side, axis, start, stop)``, the slice of ``A`` (side "a") or ``G`` ("g") per example
    # along ``axis`` that meets the leaf's block; ``op`` is then the use on that block alone.
    select: tuple = ()
    # For the use of a leaf through a *summed* effective weight (``W_eff = θ' + ...`` or
    # ``θ' @ M + ...``, see :class:`jaxgrad.fast.summed.Fold`): the part it sits in, and
    # for ``θ' @ M`` how ``M`` is folded into ``A`` or ``G`` (``op`` is then the use of θ').
    fold: Any = None

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


def classify(eqn: Eqn, param_pos: list) -> str | None:
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

# The primitives forward mode cannot differentiate through: ``jax.jvp`` raises on a
# ``custom_vjp`` call whose operands carry a tangent (the function has a reverse rule only).
# Any of them in a loss, at any depth, rules out ``per_example_dots``' forward route (see
# :func:`jaxgrad.fast.plan.dots_route`). ``custom_jvp`` calls are not among them: ``jax.jvp``
# applies the user's rule, the very map ``jax.grad`` transposes.
NO_FORWARD = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})


# Primitives whose derivative JAX rounds to a narrower format, tangent and cotangent alike:
# the backward pass is then not linear in the cotangent (rounding a sum is not the sum of
# the rounded terms), and forward mode differs from reverse mode by the rounding.
ROUNDING = frozenset({"reduce_precision"})


def linear_backward(program: Program) -> bool:
    """Whether ``program``'s VJP is linear in the cotangent and the transpose of its JVP, as
    JAX's own VJPs are: not where a ``custom_vjp`` rule (:data:`NO_FORWARD`) or a rounding
    (:data:`ROUNDING`) sits, at any depth."""
    return not ((NO_FORWARD | ROUNDING) & primitives(program))


def forward_differentiable(program: Program) -> bool:
    """Whether ``jax.jvp`` can push a direction through ``program``: none of
    :data:`NO_FORWARD` at any depth (even one no parameter reaches, which ``jax.jvp`` would
    accept: the test stays one set lookup, and the reverse-mode routes are exact too)."""
    return not (NO_FORWARD & primitives(program))


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
    if any(is_complex(a) for a in (*eqn.in_avals, *eqn.out_avals)):
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
    return (alias if is_alias(e) else other)(frame, k, e, positions)


def use(frame: Frame, k: int, e: Eqn, positions: list) -> None:
    """A fast use (dense/conv/gather, see :func:`classify`), or a reason."""
    kind = classify(e, positions)
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
    (:func:`linearised`). The walker reads them and ``capture`` captures in them."""
    if e.primitive.name == "scan":
        return [flat_jaxpr(e.params["jaxpr"])]
    if e.primitive.name == "custom_jvp_call":
        return [linearised(e)]
    return [flat_jaxpr(b) for b in e.params["branches"]]


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
        if _steps_between(f, f.root.stacked):
            frame.reason(
                f.leaf,
                f"a {f.kind} use of a leaf scanned over by a loop, with another loop nested "
                "between them (a kernel scanned over is read one step at a time, in a scan "
                "with no other inside or around it)",
            )
            continue
        lifted = lift_over_steps(f.op, f.pos, steps, f.root.stacked)
        if lifted is None:
            # (no lift of the use over the steps is written: a lookup of a leaf the loop is
            # scanned over, a batch-grouped conv)
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


# Primitives whose one result is their operand's value, entry for entry (a cast, a copy, a
# placement or sharding annotation, a scheduling barrier): aliases that keep every axis.
IDENTITIES = (
    "convert_element_type",
    "copy",
    "copy_p",
    "sharding_constraint",
    "device_put",
    "optimization_barrier",
)

# The rule of every primitive the fast path reads; any other primitive is ``other``.
RULES: dict[str, Rule] = {
    **dict.fromkeys(
        # Only permute, re-type or select a parameter's entries (``slice``: a block, e.g. one
        # of the Q, K, V parts of a fused weight): each entry of the result is one entry of
        # the leaf, so a use's per-example gradient norm is that of its gradient with respect
        # to the leaf (the transpose only places it, padding with zeros). (A ``device_put`` or
        # ``optimization_barrier`` of several values is no alias: :func:`is_alias`.)
        ("reshape", "transpose", "squeeze", "expand_dims", *IDENTITIES, "slice", "rev"),
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
    weights (seeded by :func:`analyse`). Equations no gradient leaves (:func:`dead_equations`:
    a power iteration whose results are stopped) are skipped: their reads are not uses.
    """
    dead = dead_equations(frame.body)
    for k, e in enumerate(frame.body.eqns):
        positions = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and r in frame.tracked]
        if not positions or k in dead:
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


def dead_equations(program: Program) -> set:
    """The equations of ``program`` through which no gradient reaches its outputs: every
    result is read only by ``stop_gradient`` (or other dead equations), or is an integer.

    Flax's ``SpectralNorm`` runs its power iteration on the weight and stops ``u`` and ``v``
    after it: those reads of the weight get a zero cotangent and are no uses of it (nor part
    of a reparametrisation). Frames (a scan with a live result) count as reading all their
    operands: conservative, a use that is kept costs work but is exact.
    """
    inexact = lambda a: jax.numpy.issubdtype(a.dtype, jax.numpy.inexact)
    live = {r for r in program.outs if isinstance(r, Var)}
    dead = set()
    for k in reversed(range(len(program.eqns))):
        e = program.eqns[k]
        if RULES.get(e.primitive.name) is ignore or not any(
            o in live and inexact(a) for o, a in zip(e.outs, e.out_avals, strict=True)
        ):
            dead.add(k)
            continue
        live.update(r for r in e.ins if isinstance(r, Var))
    return dead


def is_alias(e: Eqn) -> bool:
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


def lift_over_steps(eqn: Eqn, pos: int, steps: int, stacked: bool):
    """The equation of all ``steps`` of a scan at once, or None where no lift is written.

    A use ``s_t = op(a_t, W)`` repeated over the steps of a scan is the single use
    ``S = op(A, W)`` with the step axis a new leading free axis of the kept operand ``A``
    (so example i's gradient is ``Σ_t op_Wᵀ(a_{i,t}, g_{i,t})``: a sequence axis). When the
    leaf is scanned over (``W_t``, one slice per step) the step axis is a new leading *batch*
    axis of both operands instead (a separate gradient per step). A convolution's steps are
    folded into its batch axis instead (:func:`folds_steps`): more positions of the kernel;
    a convolution of a kernel scanned over is the step equation, unlifted (:func:`stepwise`).

    Returns:
      ``(lifted_eqn, step_axis)``: ``step_axis`` is the axis of the lifted output that holds
      the steps (for a convolution, its batch axis they are folded into).
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
        in_avals = [shaped(sh, a.dtype) for sh, a in zip(shapes, eqn.in_avals, strict=True)]
        out_avals = [shaped(out, eqn.out_avals[0].dtype)]
        return dataclasses.replace(
            eqn, params=params, in_avals=in_avals, out_avals=out_avals
        ), step_axis
    if name == "conv_general_dilated" and stacked:
        # A kernel per step: no one convolution of every step's slice (the step axis would be
        # a batch axis of both operands, which a convolution has not). The step equation
        # itself, taken one step at a time on the step-major arrays as captured
        # (:func:`stepwise`); the output's step axis is then the captured one, 0.
        return eqn, 0
    if name == "conv_general_dilated" and eqn.params["batch_group_count"] == 1:
        # The steps are more images of the example: folded into the convolution's batch
        # axis (outer steps major, see :func:`fold_steps`), whose entries are positions the
        # kernel's gradient sums over, as the spatial ones are. (``batch_group_count``
        # splits that axis into groups: not folded.)
        lhs_spec, _, out_spec = eqn.params["dimension_numbers"]
        grow = lambda aval, d: shaped(
            [n * steps if i == d else n for i, n in enumerate(aval.shape)], aval.dtype
        )
        in_avals = [grow(eqn.in_avals[0], lhs_spec[0]), eqn.in_avals[1]]
        out_avals = [grow(eqn.out_avals[0], out_spec[0])]
        return dataclasses.replace(eqn, in_avals=in_avals, out_avals=out_avals), out_spec[0]
    if name == "gather" and not stacked:
        dn = eqn.params["dimension_numbers"]
        params = dict(eqn.params)
        params["dimension_numbers"] = dn._replace(offset_dims=tuple(d + 1 for d in dn.offset_dims))
        # Each step's lookups may be unique and sorted (one row, ``W[i]``), the steps' together
        # are not (a token seen twice): the transpose, a scatter-add, must not be told so.
        params["unique_indices"] = params["indices_are_sorted"] = False
        idx = eqn.in_avals[1]
        in_avals = [eqn.in_avals[0], shaped((steps, *idx.shape), idx.dtype)]
        out = eqn.out_avals[0]
        out_avals = [shaped((steps, *out.shape), out.dtype)]
        return dataclasses.replace(eqn, params=params, in_avals=in_avals, out_avals=out_avals), 0
    return None


def _steps_between(f: Found, stacked: bool) -> bool:
    """Whether a convolution found in a scan body (``stacked``: of a leaf this scan is
    scanned over) has a scan over its kernel and another scan inside or around it: the
    kernel scanned over is read one step at a time (:func:`stepwise`), on the step
    equation, and no other loop's steps can be folded into it or lifted around it."""
    if f.kind != "conv":
        return False
    scans = [lv for lv in f.levels if lv.is_scan]
    return bool(scans) and (stacked or any(lv.stacked for lv in scans))


def stepwise(use: Use) -> bool:
    """Whether a use is read one step at a time on its step equation (``op`` is ``base``): a
    convolution of a leaf its one scan is scanned over (one kernel per step, see
    :func:`lift_over_steps`). Its captured ``A`` and ``G`` are step-major,
    ``(steps, B, ...)``; its per-example gradient is each step's, stacked over the steps
    like the leaf's slices, and its squared norm the steps' squared norms added."""
    return (
        len(use.scans) == 1
        and use.scans[0].stacked
        and use.op.primitive.name == "conv_general_dilated"
    )


def folds_steps(use: Use) -> bool:
    """Whether the lifts of a use fold the steps into an axis of its operands (a convolution's
    batch axis, see :func:`lift_over_steps`) rather than add one."""
    return bool(use.scans) and use.op.primitive.name == "conv_general_dilated" and not stepwise(use)


def fold_steps(use: Use, x, side: str):
    """A use's captured ``A`` (``side`` "a") or ``G`` ("g"), examples first,
    ``(B, *steps, *one step's shape)``, as its lifted equation takes it.

    For a convolution (:func:`folds_steps`) the steps of every scan, outermost major, are
    folded into the batch axis of the step's input or output; other uses are returned as
    they are.
    """
    if not folds_steps(use):
        return x
    lhs_spec, _, out_spec = use.op.params["dimension_numbers"]
    axis, k = (lhs_spec if side == "a" else out_spec)[0], len(use.scans)
    x = jax.numpy.moveaxis(x, tuple(range(1, 1 + k)), tuple(range(1 + axis, 1 + axis + k)))
    shape = x.shape
    folded = int(np.prod(shape[1 + axis : 2 + axis + k]))
    return x.reshape((*shape[: 1 + axis], folded, *shape[2 + axis + k :]))


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
    if not any(is_complex(a) for a in (*eqn.in_avals, *eqn.out_avals)):
        return eqn, -1
    lifted, axis = lift_over_steps(eqn, pos, 2, False)
    real = lambda d: (
        jax.numpy.finfo(d).dtype if jax.numpy.issubdtype(d, jax.numpy.complexfloating) else d
    )
    params = dict(lifted.params)
    if params.get("preferred_element_type") is not None:
        params["preferred_element_type"] = real(params["preferred_element_type"])
    in_avals = [shaped(a.shape, real(a.dtype)) for a in lifted.in_avals]
    out_avals = [shaped(a.shape, real(a.dtype)) for a in lifted.out_avals]
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


def use_perm(program: Program, use: Use, ndim: int, *, lifted: bool = False):
    """The permutation from a leaf to a use's operand (None if not only transposes).

    ``lifted``: to the operand of the use's lifted equation (:attr:`Use.op`), where a leaf
    scanned over by the outermost scan (one slice per step) keeps the scanned axis first and
    the frames' chains permute the slice's axes; else (or where the use has no lifted
    equation, :func:`stepwise`) None for a leaf scanned over.
    """
    levels = use_levels(use)
    stacked = [s for s, _, _ in levels]
    if any(stacked[1:]) or (stacked[0] and (not lifted or stepwise(use))):
        return None
    perm = chain_perm(program, use.pre_chain, ndim)
    head, perm = (perm[:1], perm[1:]) if stacked[0] and perm is not None else ((), perm)
    for _, body, chain in levels:
        perm = None if perm is None else chain_perm(body, chain, len(perm), perm)
    return None if perm is None else (*head, *perm)


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
        if e.primitive.name == "convert_element_type" and is_complex(e.out_avals[0]):
            continue
        x = e.primitive.bind(x, **e.primitive.get_bind_params(e.params))
        x = x[0] if e.primitive.multiple_results else x  # (a one-value barrier, device_put)
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
        elif e.primitive.name not in IDENTITIES:
            return None
    return perm
