"""The capture of every parameter use's kept operand ``A`` and output cotangent ``G``.

:func:`capture` evaluates the program once per example (under ``vmap`` and ``vjp``), adding
each captured use's perturbation to its output and keeping its other operand: one forward and
one backward pass of the batched loss give every use's ``A_i`` and ``G_i`` (the gradient of
its zero perturbation, :func:`tap`) and every exact leaf's per-example gradient (through a
per-example zero copy). :mod:`jaxgrad.fast.operands` reads the arrays as the rules take them.

Uses sit in frames (the top level, a scan body, a cond branch, a custom_jvp rule, nested in
any order): :func:`_capture` evaluates one frame, perturbs and keeps the uses that sit
directly in it, and hands an equation with uses inside it to the handler :data:`FRAMES`
registers for its primitive, which binds it with :func:`_capture` on its bodies. Adding a
frame kind (the walker's :func:`jaxgrad.fast.trace.bodies` gives its bodies) is one handler
here.

Paths (:attr:`jaxgrad.fast.trace.Use.key`) address a use from the top level: an equation
index per frame, and a branch index after a cond's. A handler sees the paths relative to its
equation, and returns the kept operands by the same relative paths.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.fast import analysis, trace
from jaxgrad.fast.program import Eqn, Program, Var, evaluate


class Captured(NamedTuple):
    """What :func:`capture` returns: every array as captured, not yet masked.

    A use inside a scan (in whatever frames) is captured step-major,
    ``(steps, B, *inner steps, *out)``: the layout a scan stacks its outputs in, so neither
    the perturbation, nor the kept operand, nor the cotangent is transposed to put the
    examples first (the weighted sum contracts steps and examples together and reads them as
    they are). Branches and custom rules add no axis.
    """

    sums: jax.Array  # (B,) per-example loss sums S_i
    counts: jax.Array  # (B,) item counts n_i
    kept: dict  # capture path -> the use's kept operand A (shared ones filled in)
    g_use: dict  # capture path -> the cotangent G of the use's output (shared ones too)
    g_exact: dict  # exact leaf index -> its per-example gradients (B, *leaf)
    axis: dict  # capture path -> the example axis of its A and G (1 in a scan, else 0)


def capture(an: analysis.Analysis, leaves: list, batch, mask) -> Captured:
    """One batched forward and backward pass, capturing ``A`` and ``G`` of every use.

    Args:
      an: the analysis of the loss (its program and captured uses).
      leaves: the parameter leaves.
      batch: the batch (leaves with a leading example axis).
      mask: ``(B,)`` bool; the cotangent of ``S_i`` is ``m_i``.

    Returns:
      A :class:`Captured`.
    """
    program, size = an.program, mask.shape[0]
    tree = {key: u for key, (_, u) in an.captured.items()}  # capture path -> Use
    axis = {key: 1 if u.scans else 0 for key, u in tree.items()}
    # Uses whose outputs are summed have one cotangent, perturbed and captured once.
    shared = shared_cotangents(program, tree)
    d_use = {key: _zero_perturbation(u, size) for key, u in tree.items() if key not in shared}
    d_exact = {
        j: jnp.zeros((size, *np.shape(leaves[j])), jnp.result_type(leaves[j])) for j in an.exact
    }
    ex_leaves = jax.tree_util.tree_leaves(batch)

    def one(ex, du, dx):
        args = [leaves[j] + dx[j] if j in dx else leaves[j] for j in range(an.num_params)]
        (s, count), kept, same = _capture(program, tree, du, [*args, *ex])
        return s, (count, _share(kept, same))

    def batched(du, dx):
        in_axes = (0, {key: axis[key] for key in du}, 0)
        return jax.vmap(one, in_axes=in_axes, out_axes=(0, (0, axis)))(ex_leaves, du, dx)

    try:
        sums, vjp, (counts, kept) = jax.vjp(batched, d_use, d_exact, has_aux=True)
    except NotImplementedError as e:  # a primitive JAX cannot batch: say what was batched
        raise NotImplementedError(_unbatchable(e)) from e
    # The cotangent of S_i is m_i, so a padded row's cotangents G_i and exact gradients are
    # zeros (as in batch_grad, padded rows must be finite: 0 · NaN is NaN). Not masking A and
    # G again saves a copy of every activation.
    g_use, g_exact = vjp(mask.astype(sums.dtype))
    g_use = {**g_use, **{key: g_use[first] for key, first in shared.items()}}
    return Captured(sums, counts, kept, g_use, g_exact, axis)


def _unbatchable(error) -> str:
    return (
        "the fast path evaluates `loss_fn` under `jax.vmap` over the examples with the "
        "parameters' uses (and a copy of each leaf on the exact fallback) batched too, since "
        "their per-example gradients differ; `vmap(grad)` keeps the parameters unbatched. "
        f"JAX cannot batch part of this program: {error} A `jax.pure_callback` batches with "
        "`vmap_method='sequential'` (once per example), or 'expand_dims' / 'broadcast_all' "
        "if the callback takes a leading batch axis; or pass `method='vmap'`."
    )


def _zero_perturbation(u: trace.Use, size: int):
    """A use's perturbation: zeros ``(*steps, B, *inner steps, *out)`` of one step's output
    (the steps of every scan the use sits in, outermost first; see :class:`Captured`)."""
    steps = tuple(lv.steps for lv in u.scans)
    out = u.base.out_avals[0]
    return jnp.zeros((*steps[:1], size, *steps[1:], *out.shape), out.dtype)


@jax.custom_vjp
def tap(y, d):
    """``y``, with ``d``'s gradient set to ``y``'s cotangent: a zero perturbation for free.

    ``y + d`` with ``d = 0`` would give the same gradients but make XLA add a zero buffer the
    size of ``y``; here ``d`` is never read, so its zeros are never materialised.
    """
    del d
    return y


tap.defvjp(lambda y, d: (y, None), lambda _, ct: (ct, ct))


def _perturb(use: trace.Use, y, d, *, tapped: bool = True):
    """A use's output ``y`` with its perturbation ``d``, whose gradient is then ``G``.

    A use whose output ``vmap`` leaves unbatched (the same for every example) gets ``d``
    added, so that its cotangent is every example's own rather than the batch's. A use in
    real form (a complex output, see :func:`jaxgrad.fast.trace.real_form`) gets the real
    ``d``'s two parts as one complex number: their gradients are ``(Re G, −Im G)``.
    """
    if use.split >= 0:
        parts = [jnp.take(d, i, axis=use.split) for i in (0, 1)]
        return y + jax.lax.complex(*parts).astype(y.dtype)
    return tap(y, d) if tapped and use.batched else y + d


def _operand(use: trace.Use, a):
    """A use's kept operand as the rules see it: ``(Re A, Im A)`` for a real form."""
    if use.split < 0:
        return a
    return jnp.stack([jnp.real(a), jnp.imag(a)]).astype(use.base.in_avals[1 - use.pos].dtype)


# Equations through which an operand's cotangent is the output's: a sum (and the minuend).
_SAME_COTANGENT = {"add": (0, 1), "add_any": (0, 1), "sub": (0,)}


def cotangent_sites(body: Program, direct: dict) -> dict:
    """Uses of one frame whose output cotangents ``G`` are one array: use equation -> the
    equation whose output carries it (its *site*).

    ``x_t W_x + h_{t-1} W_h + b``: each use's output is read only by a sum (of operands
    of its own shape, no broadcast), so its cotangent is the sum's. Following each use's
    output through such sums to the first value read otherwise, uses that reach the same
    value have the same ``G``: they get one perturbation there, so the backward pass writes
    one cotangent (one stack over the steps in a scan), not one per use. Only uses whose
    output ``vmap`` batches (so is the sum: the tap applies) and that are not in real form
    are shared; a use alone at its site keeps its own perturbation.

    Args:
      body: the frame's program.
      direct: equation index -> :class:`~jaxgrad.fast.trace.Use` of the uses in it.

    Returns:
      equation index -> site equation index, for the uses that share a site only.
    """
    readers: dict = {}  # Var -> [(equation, operand)]
    for k, e in enumerate(body.eqns):
        for q, r in enumerate(e.ins):
            if isinstance(r, Var):
                readers.setdefault(r, []).append((k, q))
    returned = {r for r in body.outs if isinstance(r, Var)}

    def site(k):
        v = body.eqns[k].outs[0]
        while v not in returned and len(readers.get(v, ())) == 1:
            j, q = readers[v][0]
            e = body.eqns[j]
            same = (e.in_avals[q].shape, e.in_avals[q].dtype) == (
                e.out_avals[0].shape, e.out_avals[0].dtype,
            )  # fmt: skip
            if q not in _SAME_COTANGENT.get(e.primitive.name, ()) or not same:
                break
            k, v = j, e.outs[0]
        return k

    found = {k: site(k) for k, u in direct.items() if u.batched and u.split < 0}
    count: dict = {}
    for s in found.values():
        count[s] = count.get(s, 0) + 1
    return {k: s for k, s in found.items() if count[s] > 1}


def _first_at_site(sites: dict) -> dict:
    """Site equation -> the first use reaching it (the one perturbed there), for the
    ``sites`` of :func:`cotangent_sites`."""
    first: dict = {}
    for k in sorted(sites):
        first.setdefault(sites[k], k)
    return first


def shared_cotangents(program: Program, uses: dict) -> dict:
    """Capture path -> the path of the use whose cotangent it shares (see
    :func:`cotangent_sites`; the first use of the site's, which alone is perturbed)."""
    frames: dict = {}  # the frame's path -> {equation index: Use}
    for p, u in uses.items():
        frames.setdefault(p[:-1], {})[p[-1]] = u
    out = {}
    for at, direct in frames.items():
        u = next(iter(direct.values()))
        body = u.levels[-1].body if u.levels else program
        sites = cotangent_sites(body, direct)
        first = _first_at_site(sites)
        for k, s in sites.items():
            if first[s] != k:
                out[(*at, k)] = (*at, first[s])
    return out


def _capture(body: Program, uses: dict, du: dict, args, *, tapped: bool = True):
    """Evaluates a frame ``body`` on ``args`` with the uses at paths ``uses`` captured.

    Args:
      body: the frame's program.
      uses: path relative to this frame -> :class:`~jaxgrad.fast.trace.Use`.
      du: path -> the use's perturbation (one frame's worth: a scan's handler slices off
        the steps).
      args: the frame's inputs.
      tapped: whether a perturbation may be the tap (see :func:`_perturb`).

    Returns:
      ``(outs, kept, same)``: the frame's outputs, the kept operands by path, and for a use
      that reads the same operand as an earlier one (``x W_q``, ``x W_k``, ``x W_v``) its
      path -> the earlier's, whose kept operand it shares (not kept twice: in a scan every
      kept operand is a stacked output written at every step).
    """
    direct = {p[0]: u for p, u in uses.items() if len(p) == 1}
    # Uses whose outputs are summed share one perturbation, placed on the sum (see
    # :func:`cotangent_sites`): site equation -> the first of them, whose ``du`` it takes.
    sites = cotangent_sites(body, direct)
    at_site = _first_at_site(sites)
    inner: dict = {}  # equation of a frame -> {path in it: Use}
    for p, u in uses.items():
        if len(p) > 1:
            inner.setdefault(p[0], {})[p[1:]] = u
    first: dict = {}
    same: dict = {}
    for k, u in direct.items():
        ref = body.eqns[k].ins[1 - u.pos]
        if isinstance(ref, Var):  # a real form keeps its own (re, im) stack
            k0 = first.setdefault((ref, u.split >= 0), k)
            if k0 != k:
                same[(k,)] = (k0,)
    kept: dict = {}

    def hook(k, invals, outvals):
        u = direct.get(k)
        if u is not None:
            if (k,) not in same:
                kept[(k,)] = _operand(u, invals[1 - u.pos])
            if k not in sites:
                outvals = [_perturb(u, outvals[0], du[(k,)], tapped=tapped)]
        if k in at_site:
            first = at_site[k]
            outvals = [_perturb(direct[first], outvals[0], du[(first,)], tapped=tapped)]
        return outvals

    def override(k, invals):
        sub = inner.get(k)
        if sub is None:
            return None
        e = body.eqns[k]
        handler = FRAMES[e.primitive.name]
        du_k = {p: du[(k, *p)] for p in sub if (k, *p) in du}  # (shared: not every use has one)
        outs, kept_k, same_k = handler(e, sub, du_k, invals, tapped)
        kept.update(((k, *p), a) for p, a in kept_k.items())
        same.update(((k, *p), (k, *q)) for p, q in same_k.items())
        return outs

    outs = evaluate(body, args, hook=hook, override=override)
    return outs, kept, same


def _capture_scan(e: Eqn, uses: dict, du: dict, invals, tapped: bool):
    """A ``lax.scan`` with uses in its body: the body captured at every step.

    The perturbations are scanned over (``(steps, ...)``) and the kept operands are stacked
    outputs, so a use is captured step-major: under the batch's ``vmap`` ``(steps, B, ...)``,
    the layout the scan writes, with no transpose to put the examples first.
    """
    (body,) = trace.bodies(e)
    p = e.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    shared: dict = {}

    def step(carry, x):
        xs_t, du_t = x
        outs, kept_t, same = _capture(body, uses, du_t, [*consts, *carry, *xs_t], tapped=tapped)
        shared.update(same)  # stacked once, shared after the loop
        return outs[:ncar], (outs[ncar:], kept_t)

    carry, (ys, kept) = jax.lax.scan(
        step, list(init), (list(xs), du), length=p["length"], reverse=p["reverse"],
        unroll=p["unroll"],
    )  # fmt: skip
    return [*carry, *ys], _share(kept, shared), {}


def _share(kept: dict, same: dict) -> dict:
    """The kept operands by path, with the shared ones (see :func:`_capture`) filled in."""
    return {**kept, **{p: kept[q] for p, q in same.items()}}


def _capture_cond(e: Eqn, uses: dict, du: dict, invals, tapped: bool):
    """A ``cond``/``switch`` with uses in its branches: the branch taken captured.

    Every branch returns every branch's kept operands (zeros in the others: an example that
    takes another branch has a zero cotangent there). A branch's perturbations are added,
    never the tap: which outputs of a branch ``vmap`` batches is not read here.
    """
    del tapped
    bodies = trace.bodies(e)
    per_branch: dict = {}  # branch -> {path in it: Use}
    for p, u in uses.items():
        per_branch.setdefault(p[0], {})[p[1:]] = u
    shared: dict = {}

    def make(b):
        def branch(ops, du_all):
            sub = per_branch.get(b, {})
            outs, kept_b, same = _capture(
                bodies[b],
                sub,
                {p: du_all[(b, *p)] for p in sub if (b, *p) in du_all},
                ops,
                tapped=False,
            )
            shared.update(((b, *p), (b, *q)) for p, q in same.items())
            return outs, {(b, *p): a for p, a in kept_b.items()}

        return branch

    ops = list(invals[1:])
    shapes = {}
    for b in per_branch:
        shapes.update(jax.eval_shape(make(b), ops, du)[1])

    def full(b):
        def branch(ops, du_all):
            outs, kept_b = make(b)(ops, du_all)
            zeros = {p: jnp.zeros(a.shape, a.dtype) for p, a in shapes.items()}
            return list(outs), {**zeros, **kept_b}

        return branch

    outs, kept = jax.lax.switch(invals[0], [full(b) for b in range(len(bodies))], ops, du)
    return outs, kept, shared


def _capture_custom_jvp(e: Eqn, uses: dict, du: dict, invals, tapped: bool):
    """A ``custom_jvp`` call with uses in its rule's tangent map: the rule, linearised
    (:func:`jaxgrad.fast.trace.linearised`), evaluated on the stopped primals and the tangents
    ``x − sg(x)`` (zero, with the identity as derivative).

    Each output is the rule's primal output, with the tangent's gradient attached
    (:func:`_with_tangent`): the gradient of every operand is the transpose of the user's
    tangent map, as in ``jax.grad``. The uses' perturbations are added, never the tap (which
    tangent ``vmap`` batches is not read).
    """
    del tapped
    (body,) = trace.bodies(e)
    stop = jax.lax.stop_gradient
    tangents = [invals[q] - stop(invals[q]) for q in trace.tangent_operands(e)]
    outs, kept, same = _capture(body, uses, du, [*map(stop, invals), *tangents], tapped=False)
    primal, touts = outs[: len(e.outs)], iter(outs[len(e.outs) :])
    inexact = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    return [_with_tangent(stop(y), next(touts)) if inexact(y) else y for y in primal], kept, same


@jax.custom_vjp
def _with_tangent(y, t):
    """``y``, with ``t``'s gradient set to ``y``'s cotangent.

    A select, not ``y + t``: the value is ``y`` even where the rule's tangent map is not
    finite at a zero tangent (``0 · ∞``), and the result is batched wherever ``t`` is (a
    use's perturbation inside the rule makes it so) although ``y`` may be the same for
    every example: its cotangent is then each example's own, not the batch's.
    """
    return jnp.where(True, y, t)


_with_tangent.defvjp(lambda y, t: (_with_tangent(y, t), None), lambda _, ct: (None, ct))


# The frame primitives the capture evaluator reads into (see :func:`_capture`).
FRAMES = {"scan": _capture_scan, "cond": _capture_cond, "custom_jvp_call": _capture_custom_jvp}
