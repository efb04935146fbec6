"""The fast path's plan for a loss: for every parameter leaf, its uses, its route, its cost.

:func:`plan` reads the same jaxpr analysis :func:`jaxgrad.fast.per_example_norms` runs on
(:mod:`jaxgrad.fast.trace`) and reports, per leaf (by pytree path):

* its uses — the equations that read it (``dense``, ``conv``, ``gather``);
* its route — how its per-example squared norm is obtained: the use's rule (``|a|²|g|²``, the
  Gram form ``⟨AAᵀ, GGᵀ⟩``, a per-example gradient of one use, ...), the cross terms of tied
  uses, or the **exact fallback** (a per-example copy of the leaf, ``B × |leaf|``) and why;
* the per-example memory that route forms, in entries of the leaf's dtype. A route that forms
  the per-example gradient (``per-example gradient``) keeps it until the clip factors are
  known: the clipped sum is then ``Σ_i c_i J_i``, with no second contraction of ``A`` and ``G``.

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
from jaxgrad.fast import rules, trace
from jaxgrad.grads import check_loss_args, check_loss_fn

# A leaf may fall back under ``strict=True`` when it is a vector (a bias, a norm scale: its
# per-example copy costs about one activation) or has at most this many entries.
STRICT_MAX_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One parameter leaf's route (see :func:`plan`)."""

    path: str
    shape: tuple
    uses: tuple  # of str, one per use: "dense#12", "gather#3", ...
    route: str  # "dense: ...", "tied: ...", "exact fallback", "unused"
    reason: str  # why it falls back ("" when it does not)
    per_example: int  # entries formed per example by the route

    @property
    def fallback(self) -> bool:
        return self.route == "exact fallback"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every leaf's :class:`LeafPlan`; ``print(plan)`` shows them as a table."""

    leaves: tuple

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
        return "\n".join(lines)


def _use_name(u: trace.Use) -> str:
    if u.site == "cond":
        return f"{u.kind}#{u.scan[2]} in cond#{u.eqn} branch {u.scan[1]}"
    if u.site == "scan":
        inner = "".join(f" in scan#{i}" for i in reversed(u.scan[1:-1]))
        return f"{u.kind}#{u.scan[-1]}{inner} in scan#{u.eqn}"
    return f"{u.kind}#{u.eqn}"


def _complex_prefix(uses) -> str:
    if any(u.split >= 0 for u in uses):
        return "complex operand as 2 real positions (real, imaginary part): "
    return ""


def _scan_prefix(u: trace.Use) -> str:
    if u.site == "cond":
        return f"cond branch {u.scan[1]}: "
    if u.site != "scan":
        return ""
    levels = [(u.steps, u.stacked), *((lv.steps, lv.stacked) for lv in u.nest)]
    words = [f"{n} steps, {'one slice per step' if st else 'shared'}" for n, st in levels]
    return "scan, " + "; nested scan, ".join(words) + ": "


def leaf_plans(an: trace.Analysis, leaves, paths) -> tuple:
    """A :class:`LeafPlan` per leaf from an analysis; the same choices ``fast_pass`` makes."""
    out = []
    for j, (leaf, path) in enumerate(zip(leaves, paths, strict=True)):
        shape, size = tuple(np.shape(leaf)), math.prod(np.shape(leaf))
        uses = tuple(_use_name(u) for u in an.fast.get(j, ()))
        if j in an.exact:
            out.append(LeafPlan(path, shape, uses, "exact fallback", an.reasons[j], size))
        elif j in an.unused:
            out.append(LeafPlan(path, shape, (), "unused", "", 0))
        else:
            groups = trace.disjoint_groups(an.program, an.fast[j])
            routes = [_group_route(an, group, shape) for group in groups]
            label = "; ".join(r for r, _ in routes)
            if len(groups) > 1:
                label = f"{len(groups)} disjoint blocks: {label}"
            out.append(LeafPlan(path, shape, uses, label, "", sum(c for _, c in routes)))
    return tuple(out)


def _group_route(an: trace.Analysis, group: list, shape: tuple) -> tuple:
    """The label and per-example entries of one group of uses (see ``fast_pass``)."""
    if len(group) == 1:
        (u,) = group
        label, cost = rules.route(u.kind, u.op, u.pos)
        return _scan_prefix(u) + _complex_prefix(group) + label, cost
    perms = [trace.use_perm(an.program, u, len(shape)) for u in group]
    if all(
        rules.has_outer_form(u.op, u.pos, p, len(shape)) for u, p in zip(group, perms, strict=True)
    ):
        ts = [rules.outer_positions(u.op, u.pos) for u in group]
        label = f"tied, {len(ts)} uses: {_complex_prefix(group)}cross terms of Σ_t x_t⊗y_t"
        return label, sum(ts) ** 2
    label = f"tied, {len(group)} uses: {_complex_prefix(group)}per-example gradient"
    return label, 2 * math.prod(shape)


def leaf_paths(params) -> list:
    """``jax.tree_util.keystr`` of every leaf, in flattening order."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def check_strict(an: trace.Analysis, params) -> None:
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
      reason for any exact fallback) and the entries the route forms per example.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import plan
      >>> loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) * p["s"])
      >>> p = plan(loss, {"w": jnp.ones((3, 2)), "s": jnp.ones(2)}, jnp.ones(3))
      >>> [(lp.path, lp.route) for lp in p.leaves]
      [("['s']", 'exact fallback'), ("['w']", 'dense: |a|²|g|²')]
    """
    check_loss_fn(loss_fn)
    check_loss_args(loss_fn, args, name="plan", call="plan(loss_fn, params, example, *args)")
    reduce.check_params(params, real=True)  # the strategies' own checks, named the same
    struct = lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
    fn = lambda p, ex: reduce.as_sum_count(loss_fn(p, ex, *args))
    params_s = jax.tree_util.tree_map(struct, params)
    an = trace.analyse(fn, params_s, jax.tree_util.tree_map(struct, example))
    leaves = jax.tree_util.tree_leaves(params_s)
    return Plan(leaf_plans(an, leaves, leaf_paths(params)))
