"""The two ways to get per-example gradient norms and reweighted gradient sums.

Both return a :class:`Parts`: the per-example loss sums and counts, every example's squared
gradient norm (over all parameters), and ``weighted(c) = Σ_i c_i ∇S_i``.

* :func:`vmap_pass` — the reference: materialise ``∇S_i`` with ``vmap(grad)`` (``B × P``).
* :func:`fast_pass` — one forward and one backward pass of the batched loss, with zero
  perturbations on the outputs of the parameter's dense/conv/gather uses (see
  :mod:`jaxgrad.fast.trace`), whose gradients are the per-example output cotangents ``G``;
  norms and reweighted sums come from ``G`` and the kept operands ``A`` (see
  :mod:`jaxgrad.fast.rules`). Parameters with other uses get a per-example zero copy whose
  gradient is their exact per-example gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.fast import rules, trace
from jaxgrad.grads import _per_example

METHODS = ("auto", "vmap")


class Parts(NamedTuple):
    sums: jax.Array  # (B,) per-example loss sums S_i (0 where padded)
    counts: jax.Array  # (B,) item counts n_i (0 where padded)
    norm_sq: jax.Array  # (B,) ‖∇S_i‖² over all parameters (0 where padded)
    weighted: Callable[[jax.Array], Any]  # c -> Σ_i c_i ∇S_i, a params-shaped pytree


def check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}; got {method!r}")
    return method


def _expand(mask, x):
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def _where_rows(mask, x):
    return jnp.where(_expand(mask, x), x, jnp.zeros((), x.dtype))


def vmap_pass(loss_fn, params, batch, mask) -> Parts:
    """Materialised per-example gradients, ``vmap(value_and_grad(S_i))``: the reference."""

    sums, counts, grads = _per_example(loss_fn, params, batch, mask, None)  # rows masked
    norm_sq = reduce.row_sq_norms(grads)

    def weighted(c):
        return jax.tree_util.tree_map(lambda g: jnp.tensordot(c.astype(g.dtype), g, 1), grads)

    return Parts(sums, counts, norm_sq, weighted)


def _struct(x):
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def analyse(loss_fn, params, batch) -> trace.Analysis:
    """The jaxpr analysis of ``loss_fn`` on one example of ``batch``."""
    example = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)), batch
    )
    fn = lambda p, ex: reduce.as_sum_count(loss_fn(p, ex))
    return trace.analyse(fn, jax.tree_util.tree_map(_struct, params), example)


def _chain_transpose(program, chain, leaf, x):
    """Maps a gradient with respect to an aliased operand back to the leaf's layout."""
    if not chain:
        return x.astype(jnp.result_type(leaf))
    zero = jnp.zeros(np.shape(leaf), jnp.result_type(leaf))
    _, vjp = jax.vjp(lambda p: trace.apply_chain(program, chain, p), zero)
    return vjp(x)[0]


@jax.custom_vjp
def tap(y, d):
    """``y``, with ``d``'s gradient set to ``y``'s cotangent: a zero perturbation for free.

    ``y + d`` with ``d = 0`` would give the same gradients but make XLA add a zero buffer the
    size of ``y``; here ``d`` is never read, so its zeros are never materialised.
    """
    del d
    return y


tap.defvjp(lambda y, d: (y, None), lambda _, ct: (ct, ct))


def _chain_perm(program, chain, ndim):
    """The axis permutation an alias chain of transposes applies, or None for other ops."""
    perm = tuple(range(ndim))
    for k in chain:
        e = program.eqns[k]
        if e.primitive.name == "transpose":
            perm = tuple(perm[p] for p in e.params["permutation"])
        elif e.primitive.name not in ("convert_element_type", "copy", "copy_p"):
            return None
    return perm


def fast_pass(loss_fn, params, batch, mask) -> Parts:
    """Per-example norms and reweighted sums from one batched forward/backward pass."""
    an = analyse(loss_fn, params, batch)
    program = an.program
    leaves, treedef = jax.tree_util.tree_flatten(params)
    ex_leaves = jax.tree_util.tree_leaves(batch)
    size = mask.shape[0]
    captured = an.captured
    d_use = {
        k: jnp.zeros(
            (size, *program.eqns[k].out_avals[0].shape), program.eqns[k].out_avals[0].dtype
        )
        for k in captured
    }
    d_exact = {
        j: jnp.zeros((size, *np.shape(leaves[j])), jnp.result_type(leaves[j])) for j in an.exact
    }

    def one(ex, du, dx):
        kept = {}

        def hook(k, invals, outvals):
            if k not in captured:
                return outvals
            _, use = captured[k]
            kept[k] = invals[1 - use.pos]
            return [tap(outvals[0], du[k]) if use.batched else outvals[0] + du[k]]

        args = [leaves[j] + dx[j] if j in dx else leaves[j] for j in range(an.num_params)]
        s, n = trace.evaluate(program, [*args, *ex], hook=hook)
        return s, (n, kept)

    def batched(du, dx):
        return jax.vmap(one)(ex_leaves, du, dx)

    sums, vjp, (counts, kept) = jax.vjp(batched, d_use, d_exact, has_aux=True)
    # The cotangent of S_i is m_i, so a padded row's cotangents G_i and exact gradients are
    # zeros (as in batch_grad, padded rows must be finite: 0 · NaN is NaN). Not masking A and
    # G again saves a copy of every activation.
    g_use, g_exact = vjp(mask.astype(sums.dtype))

    def leaf_grads(j, use):  # (B, *leaf.shape) through one use
        e = program.eqns[use.eqn]
        g = rules.per_example_grads(e, use.pos, kept[use.eqn], g_use[use.eqn])
        return jax.vmap(lambda x: _chain_transpose(program, use.chain, leaves[j], x))(g)

    norm_sq = jnp.zeros((size,), sums.dtype)
    for j, uses in an.fast.items():
        if len(uses) == 1:
            (u,) = uses
            e = program.eqns[u.eqn]
            part = rules.norm_sq(u.kind, e, u.pos, kept[u.eqn], g_use[u.eqn])
        else:  # several uses (tied weights): the cross terms between them are needed
            factors = [
                rules.outer_factors(
                    program.eqns[u.eqn],
                    u.pos,
                    _chain_perm(program, u.chain, np.ndim(leaves[j])),
                    np.ndim(leaves[j]),
                    kept[u.eqn],
                    g_use[u.eqn],
                )
                for u in uses
            ]
            if all(f is not None for f in factors):
                part = rules.cross_norm_sq(factors)
            else:  # the per-example gradient itself
                g = sum(leaf_grads(j, u) for u in uses)
                part = jnp.sum(g.reshape(size, -1) ** 2, axis=1)
        norm_sq = norm_sq + part.astype(norm_sq.dtype)
    for g in g_exact.values():
        norm_sq = norm_sq + jnp.sum(g.reshape(size, -1) ** 2, axis=1).astype(norm_sq.dtype)

    def weighted(c):
        out = []
        for j, leaf in enumerate(leaves):
            if j in an.fast:
                total = 0
                for u in an.fast[j]:
                    e = program.eqns[u.eqn]
                    w = rules.weighted_grad(e, u.pos, kept[u.eqn], g_use[u.eqn], c)
                    total = total + _chain_transpose(program, u.chain, leaf, w)
                out.append(total)
            elif j in g_exact:
                g = g_exact[j]
                out.append(jnp.tensordot(c.astype(g.dtype), g, 1))
            else:
                out.append(jnp.zeros(np.shape(leaf), jnp.result_type(leaf)))
        return jax.tree_util.tree_unflatten(treedef, out)

    norm_sq = jnp.where(mask, norm_sq, 0)
    return Parts(_where_rows(mask, sums), _where_rows(mask, counts), norm_sq, weighted)


def get_pass(method: str):
    return {"auto": fast_pass, "vmap": vmap_pass}[check_method(method)]


def run_chunked(body, batch, mask, chunk_size):
    """``body(batch, mask) -> (per_example, totals)`` over chunks, totals added, rows stacked.

    ``chunk_size`` examples at a time under ``lax.scan``; a remainder that does not fill a
    chunk is processed last on its own, so no example is padded or dropped. Chunk ``k`` of
    ``K`` holds rows ``k, k + K, …`` (interleaved, and the rows put back in order after), so
    on a batch sharded over devices every chunk is spread over them and no row moves.
    """
    size = mask.shape[0]
    if chunk_size is None or chunk_size >= size:
        return body(batch, mask)
    num_full, rem = divmod(size, chunk_size)
    cut = num_full * chunk_size

    def interleave(x):
        return jnp.swapaxes(x.reshape((chunk_size, num_full, *x.shape[1:])), 0, 1)

    head = jax.tree_util.tree_map(lambda x: interleave(x[:cut]), (batch, mask))
    first = jax.tree_util.tree_map(lambda x: x[0], head)
    _, totals_shape = jax.eval_shape(lambda bm: body(*bm), first)
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), totals_shape)

    def step(acc, bm):
        rows, totals = body(*bm)
        return jax.tree_util.tree_map(jnp.add, acc, totals), rows

    totals, rows = jax.lax.scan(step, init, head)
    rows = jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x, 0, 1).reshape((cut, *x.shape[2:])), rows
    )
    if rem:
        tail = jax.tree_util.tree_map(lambda x: x[cut:], (batch, mask))
        rows_t, totals_t = body(*tail)
        totals = jax.tree_util.tree_map(jnp.add, totals, totals_t)
        rows = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), rows, rows_t)
    return rows, totals
