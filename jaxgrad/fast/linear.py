"""One use as a linear map of its parameter: the per-example gradients, the weighted sum, the
inner products with a reference, and the layouts of ``A`` and ``G`` every rule reads.

For a use ``s = op(A, W)`` linear in ``W`` (``dot_general``, ``conv_general_dilated``,
embedding ``gather``), example ``i``'s gradient with respect to ``W`` is the transpose of
``op(A_i, ·)`` applied to ``G_i``. What is computed from that transpose and from ``op`` itself
is the same for every kind of use, and is here:

* the per-example gradients (:func:`per_example_grads`: ``vmap`` of the use's VJP, or for a
  convolution one kernel offset at a time), for a parameter with several uses (so that the
  cross terms between uses are exact) or where a route forms them;
* the weighted sum ``Σ_i c_i ∇_W S_i`` (:func:`weighted_grad`): the ordinary weight-gradient
  contraction over the batch with ``G`` reweighted, ``Aᵀ diag(c) G`` for a dense layer;
* the inner products ``⟨∇_W S_i, V⟩ = ⟨G_i, op(A_i, V)⟩`` with a reference (:func:`dot`).

So are the arrangements of ``A`` and ``G`` that the squared norms (:mod:`jaxgrad.fast.norms`)
and the routes (:mod:`jaxgrad.fast.rules`) read too: a dense use's ``(NB, T, K)`` and
``(NB, T, N)`` blocks (:func:`dense_layout`), a lookup's rows and cotangents
(:func:`gather_rows`), a convolution's input window per kernel offset (:func:`conv_windows`).

Arrays here carry the example axis first: ``A`` is ``(B, *a.shape)``, ``G`` is
``(B, *out.shape)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.fast.program import Eqn


def bind_use(eqn: Eqn, pos: int, w, a):
    """The use's own operation on one example: ``op(a, w)`` with ``w`` for the parameter
    operand ``pos`` and ``a`` for the other (its VJP in ``w`` is the per-example gradient)."""
    args = [a, a]
    args[pos] = w
    out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
    return out


def _operand_zeros(eqn: Eqn, pos: int):
    aval = eqn.in_avals[pos]
    return jnp.zeros(aval.shape, aval.dtype)


def _by_windows(eqn: Eqn, pos: int) -> bool:
    return eqn.primitive.name == "conv_general_dilated" and conv_windows_ok(eqn, pos)


def per_example_grads(eqn: Eqn, pos: int, a, g):
    """``(B, *W.shape)``: every example's gradient with respect to operand ``pos``."""
    if _by_windows(eqn, pos):
        return conv_per_example_grads(eqn, pos, a, g)

    def one(a_i, g_i):
        _, vjp = jax.vjp(lambda w: bind_use(eqn, pos, w, a_i), _operand_zeros(eqn, pos))
        return vjp(g_i.astype(eqn.out_avals[0].dtype))[0]

    return jax.vmap(one)(a, g)


def per_example_grads_route(kind: str, eqn: Eqn, pos: int) -> str:
    """How :func:`per_example_grads` forms one use's per-example gradients (for the plan)."""
    if _by_windows(eqn, pos):
        return f"{kind}: one kernel offset at a time"
    return f"{kind}: vmap of its VJP"


def weighted_grad(eqn: Eqn, pos: int, a, g, c, *, axis: int = 0):
    """``Σ_i c_i ∇_W S_i``: one batched weight-gradient contraction with ``G`` reweighted.

    ``axis`` is the example axis of ``a`` and ``g`` (1 for uses captured step-major in a
    scan: the contraction over steps and examples then reads them in place). A dense use
    without dot batch dims is one 2-D matmul (:func:`_dense_weighted`); other kinds take the
    VJP of the use, batched over the examples.
    """

    def scale(x):
        shape = [1] * x.ndim
        shape[axis] = c.shape[0]
        return x * c.reshape(shape).astype(x.dtype)

    if jnp.issubdtype(a.dtype, jnp.inexact) and a.size < g.size:
        a = scale(a)  # the op is linear in each operand: reweight the smaller one
    else:
        g = scale(g)
    rows = dense_rows(eqn, pos, a, g, axis)
    if rows is not None:
        return _dense_weighted(eqn, pos, *rows)
    _, vjp = jax.vjp(
        lambda w: jax.vmap(lambda a_i: bind_use(eqn, pos, w, a_i), in_axes=axis, out_axes=axis)(a),
        _operand_zeros(eqn, pos),
    )
    return vjp(g)[0]


def dense_rows(eqn: Eqn, pos: int, a, g, axis: int):
    """``A`` as ``(R, K)`` and ``G`` as ``(R, N)`` for a dense use without dot batch dims, the
    ``R`` rows being the examples and every free axis of the other operand (positions,
    steps) in ``A``'s own order; ``None`` for other uses (or dtypes the matmul does not take).

    The rows keep the order they have in ``A`` (for a use captured step-major,
    ``(steps, B, ...)``, the leading axes as they are), so in the common layouts neither
    reshape moves data.
    """
    if eqn.primitive.name != "dot_general":
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or a.dtype != g.dtype or not jnp.issubdtype(a.dtype, jnp.floating):
        return None
    other = 1 - pos
    o_shape, p_shape = eqn.in_avals[other].shape, eqn.in_avals[pos].shape
    oc, pc = (lc, rc)[other], (lc, rc)[pos]
    ofree = [d for d in range(len(o_shape)) if d not in oc]
    pfree = [d for d in range(len(p_shape)) if d not in pc]
    lead = 0 if other == 0 else len(pfree)  # where the other operand's free axes sit in out
    out_pfree = [len(ofree) + i for i in range(len(pfree))] if other == 0 else list(range(lead))
    full = lambda d: d + (d >= axis)  # an axis of one example -> the batched array's
    out_shape = eqn.out_avals[0].shape
    size = a.shape[axis]  # the examples
    batched = lambda shape: (*shape[:axis], size, *shape[axis:])
    if a.shape != batched(o_shape) or g.shape != batched(out_shape):
        return None
    # Row axes in A's order, each with its partner in G: the examples, then free axis i.
    labels = sorted([(axis, None)] + [(full(d), i) for i, d in enumerate(ofree)])
    a_perm = [d for d, _ in labels] + [full(d) for d in oc]
    g_perm = [axis if i is None else full(lead + i) for _, i in labels]
    g_perm += [full(d) for d in out_pfree]
    rows = size * math.prod(o_shape[d] for d in ofree)
    k = math.prod(o_shape[d] for d in oc)
    x = jnp.transpose(a, a_perm).reshape(rows, k)
    y = jnp.transpose(g, g_perm).reshape(rows, math.prod(out_shape[d] for d in out_pfree))
    return x, y


def _dense_weighted(eqn: Eqn, pos: int, x, y):
    """``XᵀY`` (contracted over the rows) in the layout of operand ``pos``: on a CPU a 2-D
    matmul that reads both operands as they are, where the VJP's dot with the examples and
    positions as two contracted axes made XLA transpose the larger operand first."""
    (lc, rc), _ = eqn.params["dimension_numbers"]
    pc = (lc, rc)[pos]
    p_aval = eqn.in_avals[pos]
    pfree = [d for d in range(len(p_aval.shape)) if d not in pc]
    w = jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())), precision=eqn.params["precision"])
    w = w.reshape([p_aval.shape[d] for d in (*pc, *pfree)])
    return jnp.transpose(w, np.argsort([*pc, *pfree])).astype(p_aval.dtype)


def acc_dtype(eqn: Eqn):
    """The dtype norms are accumulated in: the use's output dtype, at least float32."""
    return jnp.promote_types(eqn.out_avals[0].dtype, jnp.float32)


def prod(shape, dims):
    return math.prod(shape[d] for d in dims)


def dense_layout(eqn: Eqn, pos: int):
    """Permutations that bring ``A`` to ``(NB, T, K)`` and ``G`` to ``(NB, T, N)``.

    ``NB`` gathers the ``dot_general`` batch dims, ``T`` the other operand's free dims (a
    sequence axis; 1 for a plain dense layer), ``K`` the contracted dims and ``N`` the
    parameter's free dims.
    """
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
    other = 1 - pos
    o_shape = eqn.in_avals[other].shape
    p_shape = eqn.in_avals[pos].shape
    oc, ob = contract[other], batch[other]
    pc, pb = contract[pos], batch[pos]
    ofree = [d for d in range(len(o_shape)) if d not in oc and d not in ob]
    pfree = [d for d in range(len(p_shape)) if d not in pc and d not in pb]
    nb = len(ob)
    if other == 0:
        out_ofree = list(range(nb, nb + len(ofree)))
        out_pfree = list(range(nb + len(ofree), nb + len(ofree) + len(pfree)))
    else:
        out_pfree = list(range(nb, nb + len(pfree)))
        out_ofree = list(range(nb + len(pfree), nb + len(pfree) + len(ofree)))
    a_perm = [*ob, *ofree, *oc]
    g_perm = [*range(nb), *out_ofree, *out_pfree]
    sizes = (prod(o_shape, ob), prod(o_shape, ofree), prod(o_shape, oc), prod(p_shape, pfree))
    return a_perm, g_perm, sizes


def gather_rows(eqn: Eqn, idx, g):
    """Row keys ``(B, T, k)``, validity ``(B, T)`` and cotangents ``(B, T, R)`` of a gather.

    A lookup's gradient goes where the gather's transpose (a scatter-add in the same mode)
    puts it: to the clamped row in ``CLIP`` mode, and nowhere for an out-of-bounds row in
    every other mode (``FILL_OR_DROP`` drops it; ``PROMISE_IN_BOUNDS``, the mode of
    ``x[idx]``, clamps the lookup but its scatter discards the update, so ``jax.grad`` is 0
    there too), so such lookups are invalid: their cotangents are zeroed.
    """
    dn = eqn.params["dimension_numbers"]
    shape = eqn.in_avals[0].shape
    out_ndim = len(eqn.out_avals[0].shape)
    offset = tuple(dn.offset_dims)
    rows = [d for d in range(out_ndim) if d not in offset]
    b = g.shape[0]
    t = prod(eqn.out_avals[0].shape, rows)
    g = jnp.transpose(g, (0, *(d + 1 for d in rows), *(d + 1 for d in offset)))
    g = g.reshape(b, t, math.prod(g.shape[1 + len(rows) :]))
    idx = idx.reshape(b, t, idx.shape[-1])
    sizes = eqn.params["slice_sizes"]
    # The last valid start, capped (as the gather's own clamp caps it) at the index dtype's
    # largest value: an int8 index into a table of 300 rows cannot reach past row 127.
    upper = [shape[d] - sizes[d] for d in dn.start_index_map]
    upper = jnp.array(np.minimum(upper, np.iinfo(idx.dtype).max), idx.dtype)
    valid = jnp.ones((b, t), bool)
    if not str(eqn.params.get("mode")).endswith("CLIP"):
        valid = jnp.all((idx >= 0) & (idx <= upper), axis=-1)
    idx = jnp.clip(idx, 0, upper)
    return idx, valid, jnp.where(valid[..., None], g, 0)


def gather_num_rows(eqn: Eqn) -> int:
    """The number of distinct rows an embedding gather can pick (valid start positions)."""
    dn = eqn.params["dimension_numbers"]
    shape, sizes = eqn.in_avals[0].shape, eqn.params["slice_sizes"]
    return math.prod(shape[d] - sizes[d] + 1 for d in dn.start_index_map)


def gather_row_axes(eqn: Eqn) -> tuple:
    """The positions in the index vector of a gather's row axes (those it picks one entry of)."""
    dn = eqn.params["dimension_numbers"]
    shape, sizes = eqn.in_avals[0].shape, eqn.params["slice_sizes"]
    return tuple(d for d in dn.start_index_map if sizes[d] != shape[d])


def idx_restore(eqn: Eqn, idx):
    """Inverse of :func:`gather_rows`' reshape for indices (already clamped)."""
    shape = eqn.in_avals[1].shape
    return idx.reshape((idx.shape[0], *shape))


def g_restore(eqn: Eqn, g):
    """Inverse of :func:`gather_rows`' permutation for cotangents."""
    dn = eqn.params["dimension_numbers"]
    out_shape = eqn.out_avals[0].shape
    offset = tuple(dn.offset_dims)
    rows = [d for d in range(len(out_shape)) if d not in offset]
    perm = [*rows, *offset]
    g = g.reshape((g.shape[0], *(out_shape[d] for d in perm)))
    inverse = [perm.index(d) + 1 for d in range(len(out_shape))]
    return jnp.transpose(g, (0, *inverse))


def conv_windows_ok(eqn: Eqn, pos: int) -> bool:
    p = eqn.params
    return (
        pos == 1
        and p["feature_group_count"] == 1
        and p["batch_group_count"] == 1
        and all(d == 1 for d in (p["lhs_dilation"] or ()))
    )


def conv_windows(eqn: Eqn, a, g):
    """A convolution's per-example gradient, one kernel offset at a time (im2col without the
    stack): ``(window, g, kernel)`` with ``window(k)`` the ``(B, T, C_in)`` input window of
    offset ``k`` (a strided slice of the padded input), ``g`` the ``(B, T, C_out)``
    cotangents and ``kernel`` the kernel's spatial shape; ``dW_i[k] = window(k)_iᵀ g_i``."""
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    rhs_shape = eqn.in_avals[1].shape
    dtype = acc_dtype(eqn)
    nsp = len(lhs_spec) - 2
    a = jnp.transpose(a, (0, 1 + lhs_spec[0], *(1 + d for d in lhs_spec[2:]), 1 + lhs_spec[1]))
    g = jnp.transpose(g, (0, 1 + out_spec[0], *(1 + d for d in out_spec[2:]), 1 + out_spec[1]))
    b, out_sp = a.shape[0], g.shape[2:-1]
    pads = [(0, 0, 0)] * 2 + [(lo, hi, 0) for lo, hi in p["padding"]] + [(0, 0, 0)]
    a = jax.lax.pad(a.astype(dtype), jnp.zeros((), dtype), pads)
    g = g.reshape(b, math.prod(g.shape[1:-1]), g.shape[-1]).astype(dtype)  # no -1: may be empty
    strides = tuple(p["window_strides"])
    dil = tuple(p["rhs_dilation"] or (1,) * nsp)
    kernel = tuple(rhs_shape[d] for d in rhs_spec[2:])
    extent = [(n - 1) * s + 1 for n, s in zip(out_sp, strides, strict=True)]

    def window(k):
        offset = jnp.unravel_index(k, kernel)
        starts = [0, 0, *(o * r for o, r in zip(offset, dil, strict=True)), 0]
        win = jax.lax.dynamic_slice(a, starts, [b, a.shape[1], *extent, a.shape[-1]])
        win = win[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
        return win.reshape(b, math.prod(win.shape[1:-1]), win.shape[-1])

    return window, g, kernel


def offset_grad(window, g):
    """``(B, C_in, C_out)``: one kernel offset's slice of every example's gradient."""
    return jnp.einsum("btc,btn->bcn", window, g, precision=jax.lax.Precision.HIGHEST)


# Kernels with at most this many offsets (3 × 3) form their per-example gradients unrolled,
# while their windows together hold at most UNROLL_ENTRIES entries (B × positions × C_in ×
# offsets): every window is then written before the products read it, and past a cache's size
# those writes and reads go to memory, where a loop reads each window while it is still cached.
# (B = 256 on a loaded 2-core CPU, 28 × 28 × 1 and 14 × 14 × 16 inputs, 3 × 3 kernels, 1.8M and
# 7.2M window entries: the loop took 6-12 % less CPU time than the unrolled offsets for the
# whole per_example_norms / clipped_grad program; at B = 32, 0.2M and 0.9M entries, the same.)
UNROLL_OFFSETS = 9
UNROLL_ENTRIES = 1 << 20


def conv_per_example_grads(eqn: Eqn, pos: int, a, g):
    """``(B, *W.shape)``: a convolution's per-example kernel gradients, one offset at a time.

    The same batched ``(C_in × T)·(T × C_out)`` matmul per kernel offset as
    :func:`jaxgrad.fast.norms.conv_norm_sq`, stacked: on a CPU several times faster than
    ``vmap`` of the convolution's VJP (a convolution grouped over the examples). Only for the
    convolutions :func:`jaxgrad.fast.norms.conv_norm_sq` reads by windows.
    """
    window, g, kernel = conv_windows(eqn, a, g)
    # (B, offsets, C_in, C_out) -> (B, *kernel, C_in, C_out) -> the kernel's own layout. A
    # small kernel's offsets over small windows are unrolled (at most UNROLL_OFFSETS windows
    # live at once); otherwise a loop, one window live (see UNROLL_ENTRIES).
    offsets = math.prod(kernel)
    c_in = eqn.in_avals[0].shape[eqn.params["dimension_numbers"][0][1]]
    entries = offsets * g.shape[0] * g.shape[1] * c_in  # every window, (B, T, C_in) each
    if offsets <= UNROLL_OFFSETS and entries <= UNROLL_ENTRIES:
        per = jnp.stack([offset_grad(window(k), g) for k in range(offsets)], axis=1)
    else:
        per = jax.lax.map(lambda k: offset_grad(window(k), g), jnp.arange(offsets))
        per = jnp.moveaxis(per, 0, 1)
    per = per.reshape(g.shape[0], *kernel, *per.shape[2:])
    rhs_spec, nsp = eqn.params["dimension_numbers"][1], len(kernel)
    perm = [0] * (nsp + 3)
    perm[1 + rhs_spec[0]], perm[1 + rhs_spec[1]] = 2 + nsp, 1 + nsp
    for d in range(nsp):
        perm[1 + rhs_spec[2 + d]] = 1 + d
    return jnp.transpose(per, perm).astype(eqn.in_avals[pos].dtype)


# A convolution reading fewer input channels than this (raw grey or RGB images) is dotted one
# kernel offset at a time (:func:`conv_dot_offsets`): XLA's CPU convolutions vectorise over
# the input channels, and for 1-3 of them the forward convolution ``op(A, V)`` took 1.5-2.4x
# the time of the per-offset products; from 4 channels on the convolution was 1.6-4x faster
# (float32, B = 256, 3x3 kernels, 14-32 pixels square, 16-64 output channels).
DOT_OFFSET_CHANNELS = 4


def conv_dot_offsets(eqn: Eqn, pos: int) -> bool:
    """Whether :func:`dot` takes a convolution one kernel offset at a time."""
    if not conv_windows_ok(eqn, pos):
        return False
    lhs_spec = eqn.params["dimension_numbers"][0]
    return eqn.in_avals[0].shape[lhs_spec[1]] < DOT_OFFSET_CHANNELS


def _conv_offsets_dot(eqn: Eqn, a, g, v):
    """``Σ_o ⟨P_{i,o}ᵀ G_i, V_o⟩`` over kernel offsets ``o`` (see :func:`conv_windows`)."""
    window, g, kernel = conv_windows(eqn, a, g)
    count = math.prod(kernel)
    rhs_spec = eqn.params["dimension_numbers"][1]
    v = jnp.transpose(v.astype(g.dtype), (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    v = v.reshape(count, *v.shape[-2:])  # (offsets, C_in, C_out), offsets as unravelled

    def body(k, total):
        return total + jnp.sum(offset_grad(window(k), g) * v[k], axis=(1, 2))

    return jax.lax.fori_loop(0, count, body, jnp.zeros((g.shape[0],), g.dtype))


def dot(kind: str, eqn: Eqn, pos: int, a, g, v):
    """``(B,)`` inner products ``⟨∇_W S_i, V⟩`` with a reference ``V`` shaped like operand ``pos``.

    The use is linear in ``W`` and its per-example gradient is the transpose of
    ``W ↦ op(A_i, W)`` applied to ``G_i``, so ``⟨∇_W S_i, V⟩ = ⟨G_i, op(A_i, V)⟩``: the use's
    own forward operation once more, with ``V`` for ``W`` (for a dense layer
    ``Σ_t a_{i,t}ᵀ V g_{i,t}``), and no per-example gradient. A convolution with fewer than
    :data:`DOT_OFFSET_CHANNELS` input channels is taken one kernel offset ``o`` at a time
    instead, ``Σ_o ⟨P_{i,o}ᵀ G_i, V_o⟩`` (:func:`conv_dot_offsets`; the same sum, faster
    there). A lookup's out-of-bounds indices are clamped and their cotangents zeroed first
    (:func:`gather_rows`), as the gradient drops them.
    """
    if kind == "conv" and conv_dot_offsets(eqn, pos):
        return _conv_offsets_dot(eqn, a, g, v)
    dtype = acc_dtype(eqn)
    if kind == "gather":
        idx, _, y = gather_rows(eqn, a, g.astype(dtype))
        a, g = idx_restore(eqn, idx), g_restore(eqn, y)
    v = v.astype(eqn.in_avals[pos].dtype)
    out = jax.vmap(lambda a_i: bind_use(eqn, pos, v, a_i))(a)
    prod = out.astype(dtype) * g.astype(dtype)
    return jnp.sum(prod.reshape(prod.shape[0], math.prod(prod.shape[1:])), axis=1)
