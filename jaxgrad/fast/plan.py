"""The fast path's plan for a loss: for every parameter leaf, its uses, its route, its cost.

:func:`routes` computes every leaf's :class:`Route` once from the walker's analysis
(:mod:`jaxgrad.fast.trace`); ``execute.FastParts`` executes those routes and :func:`plan`
prints them, so the plan cannot disagree with what runs. Per leaf (by pytree path):

* its uses — the equations that read it (``dense``, ``conv``, ``gather``), each named by the
  line of the user's source that wrote it (``"dense @ model.py:12 (apply)"``) and its frame
  (``in scan``, ``in cond branch 1``);
* its route — how its per-example squared norm is obtained: the use's rule (``|a|²|g|²``, the
  Gram form ``⟨AAᵀ, GGᵀ⟩``, a per-example gradient of one use, ...), the cross terms of tied
  uses, ``reparametrised (...)`` naming the example-independent transformation it goes
  through (the effective weight's per-example gradient and how its uses form it, then the
  transformation's VJP per example for the norms, once on the weighted sum for the clipped
  sum), or
  the **exact fallback** (a per-example copy of the leaf, ``B × |leaf|``) and why;
* the per-example memory that route forms, in entries of the leaf's dtype. A route that forms
  the per-example gradient (``per-example gradient``) keeps it until the clip factors are
  known: the clipped sum is then ``Σ_i c_i J_i``, with no second contraction of ``A`` and ``G``.
  A route that says ``weighted sum: per-example gradient formed and kept`` does so only where
  a weighted sum is taken (clipping, statistics; its norm alone is cheaper its own way).

The plan's last line, :class:`DotsRoute`, is the route of ``per_example_dots``: forward mode
(``jax.jvp`` along ``v``, no use of the routes above) unless the loss calls a ``custom_vjp``
function or convolves an input of few channels, then the factored fast pass
(:func:`dots_route`, which the function itself calls).

``strict=True`` on the fast functions turns a fallback of a leaf larger than
:data:`STRICT_MAX_SIZE` entries (and not a vector) into an error naming the leaf and reason.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.fast import analysis, linear, norms, operands, rules, trace
from jaxgrad.fast.program import Program, Var, program_aval_in, source_line
from jaxgrad.grads import check_loss_args, check_loss_fn

# A leaf may fall back under ``strict=True`` when it is a vector (a bias, a norm scale: its
# per-example copy costs about one activation) or has at most this many entries.
STRICT_MAX_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One parameter leaf's route (see :func:`plan`)."""

    path: str
    shape: tuple
    uses: tuple  # of str, one per use: "dense @ model.py:12 (apply)", ...
    route: str  # "dense: ...", "tied: ...", "exact fallback", "unused"
    reason: str  # why it falls back ("" when it does not)
    per_example: int  # entries formed per example by the route

    @property
    def fallback(self) -> bool:
        return self.route == "exact fallback"


@dataclasses.dataclass(frozen=True)
class DotsRoute:
    """How :func:`jaxgrad.fast.per_example_dots` computes ``⟨∇S_i, v⟩`` for a loss
    (decided by :func:`dots_route`).

    ``way`` is ``"forward"`` (``jax.jvp`` of the per-example losses along ``v``: one forward
    pass, no backward pass, exact whatever the parameters' routes) or ``"factored"`` (the fast
    pass: ``⟨G_i, op(A_i, V)⟩`` per use, the leaves' routes as above); ``reason`` says why
    not forward (``""`` when forward).
    """

    way: str
    reason: str = ""

    def __str__(self) -> str:
        if self.way == "forward":
            return "forward mode: jax.jvp of the per-example losses along v, no backward pass"
        return f"factored: ⟨G_i, op(A_i, V)⟩ per use, by the routes above ({self.reason})"


def dots_route(program: Program) -> DotsRoute:
    """``per_example_dots``' route for a loss traced per example: forward mode, unless

    * the program binds a primitive ``jax.jvp`` cannot differentiate, a ``custom_vjp`` call
      (:func:`jaxgrad.fast.trace.forward_differentiable`), or one whose derivative JAX
      rounds (:func:`jaxgrad.fast.trace.linear_backward`); or
    * a convolution (at the top level) whose kernel carries a tangent reads an input with
      fewer than :data:`jaxgrad.fast.linear.DOT_OFFSET_CHANNELS` channels (a grey or RGB
      image; :func:`jaxgrad.fast.linear.conv_dot_offsets`). Forward mode's work is the
      factored route's ``op(A_i, V)`` for every use, less the backward pass, except there:
      its tangent ``conv(x, V)`` is a second run of a convolution XLA:CPU is slow at, which
      the factored route replaces by products per kernel offset (measured in
      docs/benchmarks.md, "Inner products and the Gram matrix"). A model whose backward pass
      costs more than that convolution (the weight-standardised CNN, through its
      GroupNorms) would have been faster forward.
    """
    if not trace.forward_differentiable(program):
        return DotsRoute(
            "factored",
            "the loss calls a `custom_vjp` function, which has a reverse-mode rule only: "
            "jax.jvp cannot differentiate through it",
        )
    if not trace.linear_backward(program):
        return DotsRoute(
            "factored",
            "the loss rounds a value in place (`reduce_precision`), whose tangent JAX rounds "
            "as it rounds the cotangent: forward mode would differ from the gradient by that "
            "rounding",
        )
    for e in program.eqns:
        if (
            e.primitive.name == "conv_general_dilated"
            and isinstance(e.ins[1], Var)
            and linear.conv_dot_offsets(e, 1)
        ):
            return DotsRoute(
                "factored",
                f"a convolution of an input with fewer than {linear.DOT_OFFSET_CHANNELS} "
                f"channels at {source_line(e) or 'the top level'}: its tangent conv(x, V) "
                "would be slow, its factored dot goes by kernel offsets",
            )
    return DotsRoute("forward")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every leaf's :class:`LeafPlan`; ``print(plan)`` shows them as a table, then the
    :class:`DotsRoute` :func:`jaxgrad.fast.per_example_dots` takes (``dots``)."""

    leaves: tuple
    dots: DotsRoute | None = None

    @property
    def fallbacks(self) -> tuple:
        """The leaves on the exact fallback route."""
        return tuple(leaf for leaf in self.leaves if leaf.fallback)

    def __str__(self) -> str:
        head = ("leaf", "shape", "uses", "route", "per-example entries")
        rows = [head]
        for lp in self.leaves:
            route = lp.route + (f" ({lp.reason})" if lp.reason else "")
            uses = ", ".join(lp.uses) or "-"
            rows.append((lp.path, str(lp.shape), uses, route, f"{lp.per_example:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(head) - 1)]
        lines = []
        for i, r in enumerate(rows):
            cells = [r[c].ljust(widths[c]) for c in range(len(widths))]
            lines.append("  ".join([*cells, r[-1]]))
            if i == 0:
                lines.append("  ".join("-" * w for w in [*widths, len(head[-1])]))
        if self.dots is not None:
            lines.append(f"per_example_dots: {self.dots}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Group:
    """Uses of one leaf that may overlap (see :func:`jaxgrad.fast.trace.disjoint_groups`) and
    how their per-example squared norm is formed: ``"use"`` — one use, by its rule;
    ``"outer"`` — tied uses as ``Σ_t x_t ⊗ y_t`` with every cross term (``perms``: each use's
    transposes from the leaf); ``"grads"`` — tied uses' per-example gradients, summed.
    ``rule``: for one use, its route (:func:`jaxgrad.fast.rules.route`), which the pass
    executes."""

    uses: tuple
    form: str
    perms: tuple
    label: str
    cost: int
    rule: rules.Form | None = None


@dataclasses.dataclass(frozen=True)
class Route:
    """How one leaf's per-example gradient is obtained, computed once (:func:`routes`):
    ``fast_pass`` executes it and :func:`plan` prints it.

    ``way`` is ``"fast"`` (its groups of uses), ``"reparam"`` (through an example-independent
    transformation: its direct uses' per-example gradients plus the transformation's VJP of
    the effective weights'), ``"exact"`` (a per-example copy) or ``"unused"``.
    """

    leaf: int
    way: str
    groups: tuple
    label: str
    reason: str
    per_example: int


def _use_name(u: trace.Use) -> str:
    where = f" @ {u.source}" if u.source else ""
    if u.scale or u.select or u.fold is not None:
        where += f" via {', '.join(u.via)}"
    frames = [_level_name(lv) for lv in reversed(u.levels)]  # innermost first
    return f"{u.kind}{where}" + "".join(f" in {f}" for f in frames)


def _level_name(lv: trace.Level) -> str:
    return {"scan": "scan", "cond": f"cond branch {lv.branch}", "custom_jvp": "custom_jvp rule"}[
        lv.frame
    ]


def _scale_prefix(uses) -> str:
    """For the uses of a scaled leaf (``W_eff = θ' ⊙ Π F_k``, see
    :class:`jaxgrad.fast.scaled.Scale`): where the factors went."""
    sides = {sc.side for u in uses for sc in u.scale}
    if not any(u.scale for u in uses):
        return ""
    where = " and ".join(
        {
            "a": "its kept operand A",
            "g": "its output cotangent G",
            "i": "a lookup's G (times the factor at the rows it reads)",
            "w": "its gradient (a full mask M: M ⊙ ∇)",
        }[x]
        for x in sorted(sides)
    )
    what = ", ".join(dict.fromkeys(v for u in uses for v in u.via))
    own = ""
    if any(sc.own for u in uses for sc in u.scale):
        owns = [sc for u in uses for sc in u.scale if sc.own]
        kinds = [k for k, off in (("centring", True), ("normaliser", False))
                 if any(sc.offset == off for sc in owns)]  # fmt: skip
        own = (
            f", plus a per-channel {' and '.join(kinds)} made of the leaf: exact correction "
            "from per-channel sums (∇F, J_F P, J_F J_Fᵀ)"
        )
    array = "" if "w" in sides else ", no B × |W| array"
    return f"scaled ({what}): the scale folded into {where or 'nothing'}{own}{array}; "


def _select_prefix(uses) -> str:
    """For the uses of a leaf concatenated into an effective weight: the slice it meets."""
    sides = {u.select[0] for u in uses if u.select}
    if not sides:
        return ""
    where = " and ".join({"a": "A", "g": "G"}[x] for x in sorted(sides))
    what = ", ".join(dict.fromkeys(v for u in uses for v in u.via))
    return f"a block of a {what}: its slice of {where}, no B × |W| array; "


def _fold_prefix(uses) -> str:
    """For the uses of a leaf through a summed effective weight (see
    :class:`jaxgrad.fast.summed.Fold`): which part it is and where its matrix went."""
    whats = list(dict.fromkeys(u.fold.what for u in uses if u.fold is not None))
    if not whats:
        return ""
    via = ", ".join(dict.fromkeys(v for u in uses for v in u.via))
    return f"{' and '.join(whats)} of a summed weight ({via}), no B × |W| array; "


def _complex_prefix(uses) -> str:
    if any(u.split >= 0 for u in uses):
        return "complex operand as 2 real positions (real, imaginary part): "
    return ""


def _scan_prefix(u: trace.Use) -> str:
    """The frames a use sits in, outermost first (a scan inside another is "nested")."""
    steps = lambda lv: f"{lv.steps} steps, {'one slice per step' if lv.stacked else 'shared'}"
    words, scans = [], 0
    for lv in u.levels:
        if lv.is_scan:
            words.append(f"{'nested scan' if scans else 'scan'}, {steps(lv)}")
            scans += 1
        else:
            words.append(_level_name(lv))
    return "; ".join(words) + ": " if words else ""


def _group(an: analysis.Analysis, uses: list, shape: tuple) -> Group:
    """The route of one group of uses that may overlap."""
    if len(uses) == 1:
        (u,) = uses
        # (one slice of the leaf per step of the only scan: the route may take it step by
        # step, on the arrays as captured, unless they are read transformed, on its lift)
        stacked = len(u.scans) == 1 and u.scans[0].stacked and not operands.transformed(u)
        if masked(u):
            rule = rules.masked_route(u.kind, u.op, u.pos)
        else:
            steps = u.scans[0].steps if trace.stepwise(u) else 0  # (a kernel scanned over)
            rule = rules.route(u.kind, u.op, u.pos, stacked=stacked, steps=steps)
        label = _scan_prefix(u) + _scale_prefix(uses) + _select_prefix(uses)
        label += _fold_prefix(uses) + _complex_prefix(uses) + rule.label
        return Group(tuple(uses), "use", (), label, rule.cost, rule)
    perms = tuple(trace.use_perm(an.program, u, len(shape)) for u in uses)
    cplx = _scale_prefix(uses) + _select_prefix(uses) + _fold_prefix(uses) + _complex_prefix(uses)
    if not any(map(masked, uses)) and all(
        norms.has_outer_form(u.op, u.pos, p, len(shape)) for u, p in zip(uses, perms, strict=True)
    ):
        ts = [norms.outer_positions(u.op, u.pos) for u in uses]
        label = f"tied, {len(ts)} uses: {cplx}cross terms of Σ_t x_t⊗y_t"
        return Group(tuple(uses), "outer", perms, label, sum(ts) ** 2)
    label = f"tied, {len(uses)} uses: {cplx}per-example gradient"
    return Group(tuple(uses), "grads", perms, label, 2 * math.prod(shape))


def masked(u: trace.Use) -> bool:
    """Whether a use's parameter operand carries a full mask (``θ' ⊙ M``, a ``Scale`` on
    side ``"w"``): its gradient is ``M ⊙`` the use's (see :func:`rules.masked_route`)."""
    return any(sc.side == "w" for sc in u.scale)


def _fast_route(an: analysis.Analysis, j: int, shape: tuple) -> Route:
    groups = tuple(_group(an, g, shape) for g in trace.disjoint_groups(an.program, an.uses[j]))
    label = "; ".join(g.label for g in groups)
    if len(groups) > 1:
        label = f"{len(groups)} disjoint blocks: {label}"
    return Route(j, "fast", groups, label, "", sum(g.cost for g in groups))


def _structure(an: analysis.Analysis, j: int) -> str:
    """What the plan says of the transformation's structure for leaf ``j``: the axes of
    each used effective weight it is separable along (see
    :func:`jaxgrad.fast.reparam.separable_axes`)."""
    tf, n = an.transform, an.num_params
    parts = []
    for v in tf.reads[j]:
        if not an.uses[n + v]:
            continue  # (a value the transformation reads again, no use of its own)
        shape = tuple(tf.avals[v].shape)
        axes = tf.blocks[v]
        if axes:
            which = ("axis " if len(axes) == 1 else "axes ") + ", ".join(map(str, axes))
            parts.append(f"separable, one block per index of {which} of the {shape} weight")
        else:
            parts.append(f"not separable along any axis of the {shape} weight")
    return "; ".join(parts) + "; " if parts else ""


def _factors_of(an: analysis.Analysis, j: int) -> list:
    """The factors of scaled weights (``Transform.factors``) that leaf ``j`` makes."""
    found = {sc.ref for us in an.fast.values() for u in us for sc in u.scale if j in sc.leaves}
    return [r for r in an.transform.factors if r in found]


def _shape_of(an: analysis.Analysis, ref) -> tuple:
    return tuple(program_aval_in(an.program, ref).shape)


def routes(an: analysis.Analysis, shapes: list) -> tuple:
    """Every leaf's :class:`Route` (``shapes``: the leaves'), then the effective weights'
    (leaf ``num_params + v``) when the analysis found a reparametrisation."""
    tf = an.transform
    eff_shapes = [tuple(a.shape) for a in tf.avals] if tf is not None else []
    # A custom_vjp's bwd, a rounding's, need not be linear (Reparametrised.linear): then the
    # clipped sum weighs the per-example VJPs instead of taking one VJP of the weighted sum.
    once = tf is not None and trace.linear_backward(an.program)
    out = []
    for j, shape in enumerate([*shapes, *eff_shapes]):
        size = math.prod(shape)
        if j in an.exact:
            out.append(Route(j, "exact", (), "exact fallback", an.reasons[j], size))
        elif j in an.reparam:
            direct = _fast_route(an, j, shape) if an.uses[j] else None
            formed = [v for v in tf.reads[j] if v not in tf.scaled]
            sizes = sum(math.prod(eff_shapes[v]) for v in formed)
            forms = ", ".join(
                dict.fromkeys(
                    linear.per_example_grads_route(u.kind, u.op, u.pos)
                    for v in formed
                    for u in an.uses[an.num_params + v]
                )
            )
            what = []
            if formed:
                why = "; ".join(dict.fromkeys(tf.declined[v] for v in formed if v in tf.declined))
                why = f" ({why})" if why else ""
                what.append(f"per-example gradient of the effective weight ({forms}){why}")
            factors = _factors_of(an, j)
            if factors:
                sizes += sum(math.prod(_shape_of(an, r)) for r in factors)
                what.append(
                    "per-example gradient of the scale of a scaled weight (from A, G and the "
                    "scaled leaf, one product per use; no B × |W| array)"
                )
            label = (
                f"reparametrised ({', '.join(tf.names[j])}): {_structure(an, j)}"
                f"{' and '.join(what)}, the transformation's VJP per example; clipped "
                + ("sum: one VJP of its weighted sum" if once else "sum: those, weighted")
            )
            if direct is not None:
                label += f"; plus direct uses: {direct.label}"
            groups = direct.groups if direct is not None else ()
            out.append(Route(j, "reparam", groups, label, "", sizes + size))
        elif an.fast.get(j):
            out.append(_fast_route(an, j, shape))
        else:
            out.append(Route(j, "unused", (), "unused", "", 0))
    return tuple(out)


def leaf_plans(an: analysis.Analysis, leaves, paths) -> tuple:
    """A :class:`LeafPlan` per leaf from its :class:`Route` (what ``fast_pass`` runs)."""
    shapes = [tuple(np.shape(leaf)) for leaf in leaves]
    out = []
    for r, shape, path in zip(routes(an, shapes), shapes, paths, strict=False):
        uses = tuple(_use_name(u) for g in r.groups for u in g.uses)
        if r.way == "reparam":  # and the uses of the effective weights it makes
            via = [v for v in an.transform.reads[r.leaf] if v not in an.transform.scaled]
            uses += tuple(
                f"scale of {_use_name(u)}"
                for us in an.fast.values()
                for u in us
                if any(r.leaf in sc.leaves for sc in u.scale)
            )
            uses += tuple(
                f"{_use_name(u)} via {', '.join(an.transform.names[r.leaf])}"
                for v in via
                for u in an.uses[an.num_params + v]
            )
        out.append(LeafPlan(path, shape, uses, r.label, r.reason, r.per_example))
    return tuple(out)


def leaf_paths(params) -> list:
    """``jax.tree_util.keystr`` of every leaf, in flattening order."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def check_strict(an: analysis.Analysis, params) -> None:
    """Raises if a leaf that is not small (see :data:`STRICT_MAX_SIZE`) takes the fallback."""
    leaves = jax.tree_util.tree_leaves(params)
    for lp in leaf_plans(an, leaves, leaf_paths(params)):
        if lp.fallback and len(lp.shape) > 1 and lp.per_example > STRICT_MAX_SIZE:
            raise ValueError(
                f"strict=True: parameter leaf {lp.path} (shape {lp.shape}) takes the exact "
                f"fallback, a per-example copy of {lp.per_example:,} entries, because it is "
                f"{lp.reason}. Pass strict=False to accept it, or see jaxgrad.fast.plan."
            )


def plan(loss_fn, params, example, *args) -> Plan:
    """How the fast path computes each parameter leaf's per-example gradient norm.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``, as for
        :func:`jaxgrad.fast.per_example_norms`.
      params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
      example: ONE example (no batch axis), arrays or ``jax.ShapeDtypeStruct``.
      *args: extra loss arguments, ``loss_fn(params, example, *args)``, as the fast
        functions pass them (``f(params, batch, mask, *args)``).

    Returns:
      A :class:`Plan`; ``print(plan)`` gives a table of leaf, shape, uses, route (with the
      reason for any exact fallback) and the entries the route forms per example, then the
      route of :func:`jaxgrad.fast.per_example_dots` (:attr:`Plan.dots`: forward mode
      unless the loss calls a ``custom_vjp`` function or convolves an input of few
      channels, see :func:`dots_route`).

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import plan
      >>> loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) * p["s"])
      >>> p = plan(loss, {"w": jnp.ones((3, 2)), "s": jnp.ones(2)}, jnp.ones(3))
      >>> [(lp.path, lp.route) for lp in p.leaves]
      [("['s']", 'exact fallback'), ("['w']", 'dense: |a|²|g|²')]
      >>> p.dots.way
      'forward'
    """
    check_loss_fn(loss_fn)
    check_loss_args(loss_fn, args, name="plan", call="plan(loss_fn, params, example, *args)")
    reduce.check_params(params, real=True)  # the strategies' own checks, named the same
    struct = lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
    fn = lambda p, ex: reduce.as_sum_count(loss_fn(p, ex, *args))
    params_s = jax.tree_util.tree_map(struct, params)
    an = analysis.analyse(fn, params_s, jax.tree_util.tree_map(struct, example))
    leaves = jax.tree_util.tree_leaves(params_s)
    return Plan(leaf_plans(an, leaves, leaf_paths(params)), dots_route(an.program))
