"""The two ways to get per-example gradient norms and reweighted gradient sums.

Both return a :class:`Parts`: the per-example loss sums and counts, every example's squared
gradient norm (over all parameters, and per parameter leaf), ``weighted(c) = Σ_i c_i ∇S_i``
(``c`` one weight per example, or one per example and leaf), ``dots(v) = ⟨∇S_i, v⟩``
and the factors :func:`gram` reads the Gram matrix ``⟨∇S_i, ∇S_j⟩`` from.

* :func:`vmap_pass` — the reference: materialise ``∇S_i`` with ``vmap(grad)`` (``B × P``).
* :func:`fast_pass` — one forward and one backward pass of the batched loss, with zero
  perturbations on the outputs of the parameter's dense/conv/gather uses (see
  :mod:`jaxgrad.fast.trace`), whose gradients are the per-example output cotangents ``G``
  (:mod:`jaxgrad.fast.capture`); norms and reweighted sums come from ``G`` and the kept
  operands ``A`` (see :mod:`jaxgrad.fast.rules`), each leaf by the
  :class:`jaxgrad.fast.plan.Route` computed once by :func:`jaxgrad.fast.plan.routes`, the one
  ``plan`` prints (:mod:`jaxgrad.fast.execute`). Parameters with other uses get a
  per-example zero copy whose gradient is their exact per-example gradient. Reparametrised
  parameters (an example-independent transformation ``W_eff = f(θ)`` before ordinary uses)
  get ``f``'s VJP of the effective weight's per-example gradient; a *scaled* weight
  ``(θ' - m) ⊙ Π F_k`` keeps θ on its uses' own routes with the factors folded into ``A`` or
  ``G`` (:class:`jaxgrad.fast.scaled.Scale`, :mod:`jaxgrad.fast.operands`).

``per_example_dots`` needs neither where forward mode can differentiate the loss:
:func:`forward_dots` is ``jax.jvp`` of the per-example losses along ``v``, one forward pass
(:func:`get_dots`; the route is :func:`jaxgrad.fast.plan.dots_route`'s).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.fast import analysis, capture, execute, norms, rules
from jaxgrad.fast import plan as plan_lib
from jaxgrad.fast.operands import Normaliser, row_dots
from jaxgrad.fast.program import shape_struct, trace_program
from jaxgrad.grads import _per_example

METHODS = ("auto", "vmap")
# ``per_example_dots`` also takes "factored": the fast pass's dots even where forward mode
# would do (to compare the two routes; see :func:`get_dots`).
DOTS_METHODS = ("auto", "factored", "vmap")


class Parts(NamedTuple):
    sums: jax.Array  # (B,) per-example loss sums S_i (0 where padded)
    counts: jax.Array  # (B,) item counts n_i (0 where padded)
    norm_sq: jax.Array  # (B,) ‖∇S_i‖² over all parameters (0 where padded)
    # c (B,) -> Σ_i c_i ∇S_i, a params-shaped pytree; c (B, L) weighs leaf j by column j
    weighted: Callable[[jax.Array], Any]
    dots: Callable[[list], jax.Array]  # leaves of v -> (B,) ⟨∇S_i, v⟩ (0 where padded)
    # () -> one block per group of parameter uses with no cross terms between groups:
    # ("grads", J (B, ...)) a materialised per-example gradient, ("use", kind, eqn, pos, A, G)
    # one use, or ("outer", factors) tied uses in outer form (see :func:`gram`)
    blocks: Callable[[], list]
    # (B, L) ‖∇_{leaf j} S_i‖² for the L leaves of params in tree order (a tied leaf's includes
    # the cross terms between its uses); its rows add up to norm_sq (0 where padded)
    leaf_sq: jax.Array


def check_method(method) -> str:
    return reduce.check_choice(method, METHODS, name="method")


def _expand(mask, x):
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def _where_rows(mask, x):
    return jnp.where(_expand(mask, x), x, jnp.zeros((), x.dtype))


def vmap_pass(loss_fn, params, batch, mask) -> Parts:
    """Materialised per-example gradients, ``vmap(value_and_grad(S_i))``: the reference."""

    sums, counts, grads = _per_example(loss_fn, params, batch, mask, None)  # rows masked
    norm_sq = reduce.row_sq_norms(grads)

    leaves, treedef = jax.tree_util.tree_flatten(grads)

    def weighted(c):
        out = [
            jnp.tensordot(execute.leaf_weights(c, j).astype(g.dtype), g, 1)
            for j, g in enumerate(leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, out)

    def dots(v):
        return sum(row_dots(g, x) for g, x in zip(leaves, v, strict=True))

    leaf_sq = _stack_leaves([reduce.row_sq_norms(g) for g in leaves], norm_sq)
    blocks = lambda: [("grads", g) for g in leaves]
    return Parts(sums, counts, norm_sq, weighted, dots, blocks, leaf_sq)


def _stack_leaves(columns, norm_sq):
    """``(B, L)`` from ``L`` columns ``(B,)`` (``(B, 0)`` for a tree with no leaves)."""
    if not columns:
        return jnp.zeros((*norm_sq.shape, 0), norm_sq.dtype)
    return jnp.stack([jnp.asarray(x, norm_sq.dtype) for x in columns], axis=1)


def gram(p: Parts, q: Parts) -> jax.Array:
    """``(B1, B2)``: ``⟨∇S_i, ∇S_j⟩`` between the examples of two passes (or one, twice).

    The parameters' groups of uses add (uses reading disjoint blocks have no cross terms);
    each group's block is the rule's pairwise form: :func:`jaxgrad.fast.rules.gram` for one
    use, :func:`jaxgrad.fast.norms.cross_gram` for tied uses in outer form, the inner
    products of per-example gradients otherwise. Padded rows and columns are 0.
    """
    left = p.blocks()
    right = left if q is p else q.blocks()
    total = 0
    for bp, bq in zip(left, right, strict=True):
        if bp[0] == "grads":
            block = norms.grads_gram(bp[1], bq[1])
        elif bp[0] == "use":
            block = rules.gram(*bp[1:], *bq[4:])
        elif bp[0] == "normaliser":
            block = Normaliser.gram(bp[1], bq[1])
        else:
            block = norms.cross_gram(bp[1], bq[1])
        total = total + block
    # (A padded row's cotangents G_i and exact gradients are zeros: its row and column are 0.)
    return jnp.asarray(total, jnp.result_type(p.norm_sq))


def _per_example_structs(loss_fn, params, batch) -> tuple:
    """``(fn, params, example)``: the loss as ``(sum, count)`` and abstract values of the
    parameters and of one example of ``batch``, as the program is traced."""
    example = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)), batch
    )
    fn = lambda p, ex: reduce.as_sum_count(loss_fn(p, ex))
    return fn, jax.tree_util.tree_map(shape_struct, params), example


def analyse(loss_fn, params, batch) -> analysis.Analysis:
    """The jaxpr analysis of ``loss_fn`` on one example of ``batch``."""
    return analysis.analyse(*_per_example_structs(loss_fn, params, batch))


def dots_route(loss_fn, params, batch) -> plan_lib.DotsRoute:
    """The route ``per_example_dots`` takes for ``loss_fn`` on ``batch``'s examples
    (:func:`jaxgrad.fast.plan.dots_route` of the traced program, as ``plan`` prints it)."""
    program, _ = trace_program(*_per_example_structs(loss_fn, params, batch))
    return plan_lib.dots_route(program)


def forward_dots(loss_fn, params, batch, mask, v: list) -> jax.Array:
    """``(B,)`` ``⟨∇S_i, v⟩ = d/dε S_i(θ + εv)`` at ``ε = 0``, by forward mode.

    ``jax.jvp`` of every example's loss sum along ``v``: one batched forward pass carrying a
    tangent, no backward pass and no kept activations, exact for any loss forward mode can
    differentiate (:func:`jaxgrad.fast.plan.dots_route`). Each leaf of ``v`` is cast to its
    parameter's dtype, the tangent space ``jax.jvp`` requires (and the dtype of ``∇S_i``).
    Padded rows are 0, selected after (a padded row's tangent may be NaN).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    cast = [jnp.asarray(x, jnp.result_type(p)) for x, p in zip(v, leaves, strict=True)]
    tangent = jax.tree_util.tree_unflatten(treedef, cast)

    def one(fn, p, t, example):
        summed = lambda q: reduce.as_sum_count(fn(q, example))[0]
        return jax.jvp(summed, (p,), (t,))[1]

    # The loss and the parameters enter the vmap as operands (see reduce.BoundLoss).
    dots = jax.vmap(one, in_axes=(None, None, None, 0))(
        reduce.as_operand(loss_fn), params, tangent, batch
    )
    return jnp.where(mask, dots, 0)


def fast_pass(
    loss_fn, params, batch, mask, *, strict: bool = False, weighted: bool = False
) -> Parts:
    """Per-example norms and reweighted sums from one batched forward/backward pass.

    Every use is captured by one recursive evaluator over the frames it sits in
    (:func:`jaxgrad.fast.capture.capture`, a handler per frame primitive in
    :data:`jaxgrad.fast.capture.FRAMES`). A use inside a ``lax.scan`` body is captured at
    every step (its perturbation is a scanned-over input of shape ``(steps, *out)``, its kept
    operand a stacked output) and the rules see it lifted over the steps
    (:func:`jaxgrad.fast.trace.lift_over_steps`). Frames compose: a use in any nesting of
    scans, ``cond`` branches and ``custom_jvp`` rules is captured at every step of every scan
    around it, ``(steps, B, *inner steps, *out)``, and lifted over every scan's steps; in a
    branch where the branch runs, with zeros where it does not; in a ``custom_jvp`` rule's
    tangent map, whose transpose is the gradient JAX takes. Each leaf's route is then
    executed on the captured arrays (:class:`jaxgrad.fast.execute.FastParts`).

    With ``strict``, a leaf that is not small and takes the exact fallback raises (see
    :func:`jaxgrad.fast.plan.check_strict`). ``weighted``: the caller computes a weighted
    sum (:attr:`Parts.weighted`; clipping, statistics), so a route that keeps per-example
    gradients (:attr:`jaxgrad.fast.rules.Form.keep`) forms them for the norms as well.
    """
    an = analyse(loss_fn, params, batch)
    if strict:
        plan_lib.check_strict(an, params)
    if an.materialise:  # a custom rule that cannot be bound again: the reference, exact
        return vmap_pass(loss_fn, params, batch, mask)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    # The routes, computed once: what runs here is what ``plan`` prints.
    route = plan_lib.routes(an, [np.shape(x) for x in leaves])
    cap = capture.capture(an, leaves, batch, mask)
    fp = execute.FastParts(an, route, leaves, cap, weighted=weighted)
    norm_sq, leaf_cols = fp.norms()
    weighted_sum = lambda c: jax.tree_util.tree_unflatten(treedef, fp.weighted(c))
    dots = lambda v: jnp.where(mask, fp.dots(v), 0)
    # Clamped at 0: tied uses that cancel can leave a squared norm a rounding error below 0.
    norm_sq = jnp.where(mask, jnp.maximum(norm_sq, 0), 0)
    leaf_sq = jnp.where(mask[:, None], jnp.maximum(_stack_leaves(leaf_cols, norm_sq), 0), 0)
    sums, counts = _where_rows(mask, cap.sums), _where_rows(mask, cap.counts)
    return Parts(sums, counts, norm_sq, weighted_sum, dots, fp.blocks, leaf_sq)


def get_pass(method: str, strict: bool = False, *, weighted: bool = False):
    """The pass for ``method``; ``strict`` and ``weighted`` (the caller computes a weighted
    sum, see :func:`fast_pass`) apply to the fast path (vmap has no fallback)."""
    strict = reduce.check_flag(strict, name="strict")
    if check_method(method) == "vmap":
        return vmap_pass
    return functools.partial(fast_pass, strict=strict, weighted=weighted)


def get_dots(method: str):
    """``dots(loss_fn, params, batch, mask, v) -> (B,)`` ``⟨∇S_i, v⟩`` for ``method``:
    ``"auto"`` — :func:`forward_dots` where :func:`dots_route` allows it, else the fast pass's
    factored dots (:attr:`Parts.dots`); ``"factored"`` — the fast pass's always; ``"vmap"`` —
    the materialised reference."""
    method = reduce.check_choice(method, DOTS_METHODS, name="method")

    def dots(loss_fn, params, batch, mask, v):
        if method == "vmap":
            return vmap_pass(loss_fn, params, batch, mask).dots(v)
        if method == "auto" and dots_route(loss_fn, params, batch).way == "forward":
            return forward_dots(loss_fn, params, batch, mask, v)
        return fast_pass(loss_fn, params, batch, mask).dots(v)

    return dots


def run_chunked(body, batch, mask, chunk_size):
    """``body(batch, mask) -> (per_example, totals)`` over chunks, totals added, rows stacked.

    :func:`jaxgrad.reduce.chunked` with ``chunk_size`` examples at a time under ``lax.scan``;
    a remainder that does not fill a chunk is processed last on its own, so no example is
    padded or dropped. Chunk ``k`` of ``K`` holds rows ``k, k + K, …`` (interleaved, and the
    rows put back in order after), so on a batch sharded over devices every chunk is spread
    over them and no row moves. ``chunk_size=None`` calls ``body`` once.
    """
    if chunk_size is None:
        return body(batch, mask)
    return reduce.chunked(body, batch, mask, chunk_size=chunk_size, interleave=True)
