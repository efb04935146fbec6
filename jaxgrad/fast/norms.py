"""Per-example squared norms and Gram matrix entries of the gradient through one use, or
through tied uses, without forming it where a cheaper identity exists.

* One use's squared norm (one rule per :attr:`jaxgrad.fast.rules.Form.how`, the table
  :data:`jaxgrad.fast.rules.NORMS`): ``‖a_i‖²‖g_i‖²`` for a dense use without a sequence
  axis, ``⟨A_i A_iᵀ, G_i G_iᵀ⟩`` with one (``T`` positions; as ``‖R_A R_Gᵀ‖²`` from QR
  factors where positions cancel, see :func:`outer_norm_sq`), ``Σ_r ‖Σ_{t: r_t = r} g_t‖²``
  for an embedding lookup of rows ``r_t`` (each row's sum formed), ``Σ_o ‖P_{i,o}ᵀ G_i‖²``
  over a convolution's kernel offsets ``o`` (im2col one offset at a time), the masked form of
  a dense use whose weight is ``θ' ⊙ M`` (:func:`masked_norm_sq`), else the per-example
  gradient, formed and squared.
* Tied uses of a 2-D leaf in outer form ``Σ_u Σ_t x^u_t ⊗ y^u_t`` (:func:`outer_factors`):
  the squared norm with every cross term between the uses (:func:`cross_norm_sq`).
* The Gram matrix ``⟨∇_i, ∇_j⟩`` between two sets of examples, whose diagonal the norms are:
  each kind's pairwise form from the same factors (:func:`dense_gram_pairs`,
  :func:`gather_gram_pairs`, :func:`cross_gram`), judged per pair of examples as the diagonal
  is judged per example, else the inner products of formed gradients (:func:`grads_gram`).

Which of them a use takes is its route (:func:`jaxgrad.fast.rules.route`); the layouts of
``A`` and ``G`` they read and the formed per-example gradients are
:mod:`jaxgrad.fast.linear`'s. Arrays carry the example axis first.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.fast.linear import (
    acc_dtype,
    conv_windows,
    dense_layout,
    g_restore,
    gather_num_rows,
    gather_row_axes,
    gather_rows,
    idx_restore,
    offset_grad,
    per_example_grads,
    prod,
)
from jaxgrad.fast.program import Eqn


def _to_blocks(x, perm, shape):
    b = x.shape[0]
    x = jnp.transpose(x, (0, *(d + 1 for d in perm)))
    return x.reshape((b, *shape))


def _rest(ndim, keep):
    keep = set(keep)
    return tuple(d for d in range(1, ndim) if d not in keep)


# The Gram form is trusted while ``(Σ_t ‖x_t‖‖y_t‖)² ≤ GRAM_CANCELLATION · ⟨XXᵀ, YYᵀ⟩``.
GRAM_CANCELLATION = 1024.0


def outer_norm_sq(x, y):
    """``‖Σ_t x_t y_tᵀ‖² = ‖XᵀY‖²`` over the last two axes of ``X (…, T, K)``, ``Y (…, T, N)``.

    The Gram form ``⟨XXᵀ, YYᵀ⟩ = Σ_{t,s} ⟨x_t, x_s⟩⟨y_t, y_s⟩`` (``O(T²(K + N))`` work,
    ``T²`` entries) sums products that may cancel (positions whose contributions sum to almost
    nothing): its relative error is ``≈ ε s² / ‖XᵀY‖²`` with ``s = Σ_t ‖x_t‖‖y_t‖``, the
    square of the conditioning. It is returned when ``s² ≤ GRAM_CANCELLATION · ‖XᵀY‖²`` for
    every leading index (relative error ``≲ 10³ ε``; ``s²/‖XᵀY‖² ≈ T`` for unrelated
    positions). Otherwise (decided at run time, for the whole batch) the norm is recomputed
    as ``‖R_X R_Yᵀ‖²`` from the triangular factors of ``Xᵀ = Q_X R_X`` and ``Yᵀ = Q_Y R_Y``
    (``Q`` has orthonormal columns, so it drops out of the norm; same order of work, slower
    in practice). Householder QR is backward stable, so that form's relative error is
    ``≈ ε s / ‖XᵀY‖``, as small as that of forming ``XᵀY`` itself.

    Example:
        >>> x, y = jnp.ones((3, 4)), jnp.array([[1.0, 2.0], [-1.0, -2.0], [0.5, 0.0]])
        >>> round(float(outer_norm_sq(x, y)), 6)  # XᵀY = 1 ⊗ (0.5, 0): 4 × 0.25
        1.0
    """
    hi = jax.lax.Precision.HIGHEST
    lead = x.shape[:-2]  # one 3-D array each, read by the Gram form and (if taken) by QR
    # Explicit sizes, never -1: an axis may be empty (a zero-width layer).
    x = x.reshape(math.prod(lead), *x.shape[-2:])
    y = y.reshape(math.prod(lead), *y.shape[-2:])
    xx = jnp.einsum("...tk,...sk->...ts", x, x, precision=hi)
    yy = jnp.einsum("...tn,...sn->...ts", y, y, precision=hi)
    gram = jnp.sum(xx * yy, axis=(-2, -1))
    # ‖x_t‖² from the rows, not the Gram's diagonal: a reduction XLA fuses with the read of X,
    # where taking the diagonal costs another pass over both T × T Grams.
    sq = lambda m: jnp.sum(m * m, axis=-1)
    s = jnp.sum(jnp.sqrt(sq(x) * sq(y)), axis=-1)
    cancels = jnp.any(s * s > GRAM_CANCELLATION * gram)

    def triangular():
        r_x = jnp.linalg.qr(jnp.swapaxes(x, -1, -2), mode="r")
        r_y = jnp.linalg.qr(jnp.swapaxes(y, -1, -2), mode="r")
        m = jnp.einsum("...pt,...qt->...pq", r_x, r_y, precision=hi)
        return jnp.sum(m * m, axis=(-2, -1))

    return jax.lax.cond(cancels, triangular, lambda: gram).reshape(lead)


def dense_rank1_norm_sq(eqn: Eqn, pos: int, a, g):
    """``‖a_i‖² ‖g_i‖²`` per dot batch index (no sequence axis): reductions only, no copies."""
    a_perm, _, _ = dense_layout(eqn, pos)
    dtype = acc_dtype(eqn)
    num_b = len(eqn.params["dimension_numbers"][1][0])
    a_b = [d + 1 for d in a_perm[:num_b]]
    a_sq = jnp.sum(jnp.square(a.astype(dtype)), axis=_rest(a.ndim, a_b))
    g_sq = jnp.sum(jnp.square(g.astype(dtype)), axis=_rest(g.ndim, range(1, num_b + 1)))
    a_sq = jnp.transpose(a_sq, (0, *(1 + np.argsort(np.argsort(a_b))))) if num_b > 1 else a_sq
    return jnp.sum((a_sq * g_sq).reshape(a_sq.shape[0], -1), axis=1)


def dense_gram_norm_sq(eqn: Eqn, pos: int, a, g):
    """``Σ_b ⟨A_{ib} A_{ib}ᵀ, G_{ib} G_{ib}ᵀ⟩`` over the dot batch indices (see
    :func:`outer_norm_sq`, which falls back to QR factors where positions cancel)."""
    a_perm, g_perm, (nb, t, k, n) = dense_layout(eqn, pos)
    dtype = acc_dtype(eqn)
    a = _to_blocks(a, a_perm, (nb, t, k)).astype(dtype)
    g = _to_blocks(g, g_perm, (nb, t, n)).astype(dtype)
    return jnp.sum(outer_norm_sq(a, g), axis=1)


def masked_norm_sq(eqn: Eqn, pos: int, a, g, m):
    """``Σ_b Σ_{t,s} (a_{bt} ⊙ a_{bs})ᵀ M_b² (g_{bt} ⊙ g_{bs})`` per example: the squared norm
    of ``M ⊙ ∇_W S_i`` for a dense use (``m``: the mask in the parameter operand's layout,
    broadcastable to it), over its dot batch indices ``b`` (see
    :func:`jaxgrad.fast.rules.masked_pays`)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    pc, pb = (lc, rc)[pos], (lb, rb)[pos]
    p_shape = eqn.in_avals[pos].shape
    pfree = [d for d in range(len(p_shape)) if d not in pc and d not in pb]
    a_perm, g_perm, (nb, t, k, n) = dense_layout(eqn, pos)
    dtype = acc_dtype(eqn)
    x = _to_blocks(a, a_perm, (nb, t, k)).astype(dtype)
    y = _to_blocks(g, g_perm, (nb, t, n)).astype(dtype)
    m = jnp.transpose(jnp.broadcast_to(m, p_shape), (*pb, *pc, *pfree)).reshape(nb, k, n)
    xx = x[:, :, :, None, :] * x[:, :, None, :, :]  # (B, nb, T, T, K)
    yy = y[:, :, :, None, :] * y[:, :, None, :, :]
    hi = jax.lax.Precision.HIGHEST
    xm = jnp.einsum("bjtsk,jkn->bjtsn", xx, jnp.square(m.astype(dtype)), precision=hi)
    return jnp.sum((xm * yy).reshape(xm.shape[0], -1), axis=1)


def gather_norm_sq(eqn: Eqn, pos: int, idx, g):
    """``‖Σ_t e_{r_t} g_tᵀ‖² = Σ_r ‖Σ_{t: r_t = r} g_t‖²`` for an embedding lookup.

    Each lookup's row sum ``h_t = Σ_s [r_s = r_t] g_s`` is formed (``T² R`` work, as the
    pairwise form ``Σ_{t,s} [r_t = r_s] ⟨g_t, g_s⟩``), squared and divided by the number
    ``c_t`` of lookups of its row, which counts every row once. Squaring the formed sums
    keeps a row whose lookups' cotangents nearly cancel accurate (relative error ``≈ ε``
    where the pairwise form's is ``≈ ε (Σ_t ‖g_t‖)² / ‖∇‖²``).
    """
    del pos
    idx, _, g = gather_rows(eqn, idx, g.astype(acc_dtype(eqn)))
    same = jnp.all(idx[:, :, None, :] == idx[:, None, :, :], axis=-1)
    hi = jax.lax.Precision.HIGHEST
    h = jnp.einsum("bts,bsr->btr", same.astype(g.dtype), g, precision=hi)
    lookups = jnp.sum(same, axis=2).astype(g.dtype)  # c_t >= 1: t reads its own row
    return jnp.sum(jnp.sum(h * h, axis=2) / lookups, axis=1)


def gather_grads_norm_sq(eqn: Eqn, pos: int, idx, g):
    """An embedding lookup's ``rows × R`` per-example gradient, formed (invalid lookups
    dropped, see :func:`jaxgrad.fast.linear.gather_rows`), squared and summed."""
    del pos
    idx, _, g = gather_rows(eqn, idx, g.astype(acc_dtype(eqn)))
    grads = per_example_grads(eqn, 0, idx_restore(eqn, idx), g_restore(eqn, g))
    return jnp.sum(grads.reshape(grads.shape[0], -1).astype(g.dtype) ** 2, axis=1)


def conv_norm_sq(eqn: Eqn, pos: int, a, g):
    """``‖∇_W S_i‖²`` for a convolution, one kernel offset at a time (see
    :func:`jaxgrad.fast.linear.conv_windows`).

    For kernel offset ``o`` the per-example gradient slice is ``dW_i[o] = P_{i,o}ᵀ G_i`` with
    ``P_{i,o}`` the input window shifted by ``o`` (a strided slice of the padded input): a
    batched ``(C_in × T)·(T × C_out)`` matmul. A ``fori_loop`` over the offsets keeps one window
    live at a time. Grouped, batch-grouped and input-dilated convolutions take the generic
    route (the per-example gradient, formed; see :func:`jaxgrad.fast.rules.route`).
    """
    window, g, kernel = conv_windows(eqn, a, g)

    def body(k, total):
        w = offset_grad(window(k), g)
        return total + jnp.sum(w * w, axis=(1, 2))

    return jax.lax.fori_loop(0, math.prod(kernel), body, jnp.zeros((g.shape[0],), g.dtype))


def materialised_norm_sq(eqn: Eqn, pos: int, a, g):
    grads = per_example_grads(eqn, pos, a, g)
    return jnp.sum(grads.reshape(grads.shape[0], -1).astype(acc_dtype(eqn)) ** 2, axis=1)


def has_outer_form(eqn: Eqn, pos: int, chain_perms, leaf_ndim: int) -> bool:
    """Whether :func:`outer_factors` can write this use of a 2-D leaf as ``Σ_t x_t ⊗ y_t``."""
    if leaf_ndim != 2 or chain_perms is None:
        return False
    if eqn.primitive.name == "gather":
        return pos == 0 and gather_row_axes(eqn) == (0,) and chain_perms == (0, 1)
    if eqn.primitive.name != "dot_general":
        return False
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    # the leaf must have one contracted and one free axis (else the caller materialises)
    return not lb and not rb and len(eqn.in_avals[pos].shape) == 2 and len((lc, rc)[pos]) == 1


def outer_positions(eqn: Eqn, pos: int) -> int:
    """``T`` of a use in outer form: the number of terms ``x_t ⊗ y_t``."""
    if eqn.primitive.name == "gather":
        dn = eqn.params["dimension_numbers"]
        out_shape = eqn.out_avals[0].shape
        return prod(out_shape, [d for d in range(len(out_shape)) if d not in dn.offset_dims])
    return dense_layout(eqn, pos)[2][1]


def outer_factors(eqn: Eqn, pos: int, chain_perms, leaf_ndim: int, a, g):
    """A use's per-example gradient of a 2-D leaf as ``Σ_t x_t ⊗ y_t`` (rows ⊗ columns).

    Returns ``("dense", X, Y)`` with ``X`` ``(B, T, rows)`` and ``Y`` ``(B, T, cols)``, or
    ``("gather", keys, Y)`` with ``x_t`` the one-hot row ``keys[:, t]``; ``None`` when the use
    is not of this simple form (the caller then materialises the per-example gradient).
    ``chain_perms`` is the composition of transposes from the leaf to the operand, or None.
    """
    if not has_outer_form(eqn, pos, chain_perms, leaf_ndim):
        return None
    if eqn.primitive.name == "gather":
        idx, _, y = gather_rows(eqn, a, g.astype(acc_dtype(eqn)))
        row = list(eqn.params["dimension_numbers"].start_index_map).index(0)
        return ("gather", idx[..., row], y)
    (lc, rc), _ = eqn.params["dimension_numbers"]
    a_perm, g_perm, (_, t, k, n) = dense_layout(eqn, pos)
    x = _to_blocks(a, a_perm, (t, k)).astype(acc_dtype(eqn))  # along the contracted axis
    y = _to_blocks(g, g_perm, (t, n)).astype(x.dtype)  # along the operand's free axis
    contract_axis = (lc, rc)[pos][0]
    # Operand axis 0 is leaf axis chain_perms[0]; the contracted operand axis holds x.
    x_leaf_axis = chain_perms[contract_axis]
    return ("dense", x, y) if x_leaf_axis == 0 else ("dense", y, x)


def cross_norm_sq(factors):
    """``‖Σ_u Σ_t x^u_t ⊗ y^u_t‖²`` per example from every use's factors: exact cross terms."""
    if all(kind == "dense" for kind, _, _ in factors):  # one outer form over every use
        x = jnp.concatenate([x for _, x, _ in factors], axis=1)
        y = jnp.concatenate([y for _, _, y in factors], axis=1)
        return outer_norm_sq(x, y)
    return _cross_terms(factors, factors, paired=True)


def _cross_terms(left, right, *, paired: bool):
    """``Σ_{u,v} Σ_{t,s} ⟨x^u_t, x^v_s⟩ ⟨y^u_t, y^v_s⟩`` between the uses' factors ``(kind, X,
    Y)`` of :func:`outer_factors`: ``(B,)``, example ``b`` of ``left`` against example ``b`` of
    ``right`` (``paired``: both ``(B, T, ·)``), else ``(D,)``, one example of ``left``
    (``(T, ·)``) against every example of ``right`` (``(D, S, ·)``)."""
    hi = jax.lax.Precision.HIGHEST
    total = 0
    for ku, xu, yu in left:
        for kv, xv, yv in right:
            yy = jnp.einsum("btc,bsc->bts" if paired else "tc,bsc->bts", yu, yv, precision=hi)
            xx = _row_products(ku, xu, kv, xv, yy.dtype, paired=paired)
            total = total + jnp.sum(xx * yy, axis=(1, 2))
    return total


def _row_products(ku, xu, kv, xv, dtype, *, paired: bool):
    """``⟨x^u_t, x^v_s⟩`` ``(B, T, S)`` of two uses' row factors (see :func:`_cross_terms` for
    ``paired``): dense rows, or a lookup's one-hot rows ``e_r`` given as their row ``r``."""
    if ku == "dense" and kv == "dense":
        hi = jax.lax.Precision.HIGHEST
        return jnp.einsum("btr,bsr->bts" if paired else "tr,bsr->bts", xu, xv, precision=hi)
    if ku == "gather" and kv == "gather":  # ⟨e_{r_t}, e_{r_s}⟩ = [r_t = r_s]
        rows = xu[:, :, None] if paired else xu[None, :, None]
        return (rows == xv[:, None, :]).astype(dtype)
    if ku == "gather":  # ⟨e_{r_t}, x_s⟩ = x_s[r_t]
        if paired:
            return jnp.take_along_axis(xv, xu[:, None, :], axis=2).transpose(0, 2, 1)
        return jnp.transpose(jnp.take(xv, xu, axis=2), (0, 2, 1))
    if paired:  # ⟨x_t, e_{r_s}⟩ = x_t[r_s]
        return jnp.take_along_axis(xu, xv[:, None, :], axis=2)
    return jnp.transpose(xu[:, xv], (1, 0, 2))


# --- Pairs of examples and a reference: the Gram matrix and inner products --------------------
#
# Norms are the diagonal of the Gram matrix ``⟨∇_i, ∇_j⟩``; the functions below compute its
# entries from the same factors as :func:`jaxgrad.fast.rules.norm_sq`: ``⟨A_i A_jᵀ, G_i G_jᵀ⟩``
# (for a plain dense layer, ``T = 1``, ``(a_i·a_j)(g_i·g_j)``), the same-row form for a lookup,
# or the inner products of the formed per-example gradients where that is cheaper by shape —
# judged per pair of examples, as the diagonal is judged per example (a convolution's
# ``B × |kernel|`` gradients are formed).

# Entries of one left-rows batch of a pairwise form held at once (bounds ``B² T²`` memory).
PAIR_ENTRIES = 1 << 24


def _pairs(row, left, right, per_pair: int):
    """``(B1, B2)``: ``row(left_i, right) -> (B2,)`` for every row ``i`` of ``left``.

    Rows are taken a batch at a time (``lax.map``), so a form with ``per_pair`` entries per
    pair of examples holds at most about :data:`PAIR_ENTRIES` of them.
    """
    b1 = jax.tree_util.tree_leaves(left)[0].shape[0]
    b2 = jax.tree_util.tree_leaves(right)[0].shape[0]
    size = max(1, min(b1, PAIR_ENTRIES // max(1, b2 * per_pair)))
    if size >= b1:
        return jax.vmap(lambda x: row(x, right))(left)
    return jax.lax.map(lambda x: row(x, right), left, batch_size=size)


def grads_gram(j1, j2):
    """``⟨J_i, J_j⟩`` of materialised per-example gradients ``(B1, ...)``, ``(B2, ...)``."""
    j1 = j1.reshape(j1.shape[0], math.prod(j1.shape[1:]))
    j2 = j2.reshape(j2.shape[0], math.prod(j2.shape[1:]))
    dtype = jnp.promote_types(jnp.result_type(j1, j2), jnp.float32)
    return jnp.matmul(j1.astype(dtype), j2.astype(dtype).T, precision=jax.lax.Precision.HIGHEST)


def dense_pair_gram(t: int, k: int, n: int) -> bool:
    """Whether the pairwise Gram form beats the inner products of formed gradients.

    Per pair of examples the form costs ``T² (K + N)`` against ``K N`` for the inner product
    of two formed ``K × N`` gradients (forming them, ``T K N`` per example, is amortised over
    the ``B`` pairs of each): a factor ``T`` stricter than
    :func:`jaxgrad.fast.rules.dense_gram` on the diagonal.
    """
    return t * t * (k + n) <= k * n


def gather_pair_gram(t: int, num_rows: int) -> bool:
    """Whether the pairwise same-row form of a lookup beats the inner products of formed
    gradients.

    Per pair of examples the form costs ``T² R`` (a same-row test and ``⟨g_t, g_s⟩`` for each
    of the ``T²`` pairs of lookups) against ``rows × R`` for the inner product of two formed
    ``rows × R`` gradients: stricter than :func:`jaxgrad.fast.rules.gather_gram` on the
    diagonal by its factor 8.
    """
    return t * t <= num_rows


def dense_gram_pairs(eqn: Eqn, pos: int, a1, g1, a2, g2):
    """``⟨∇_W S_i, ∇_W S_j⟩`` for a ``dot_general`` use: ``Σ_b ⟨A_{ib} A_{jb}ᵀ, G_{ib} G_{jb}ᵀ⟩``.

    Over the ``NB`` dot batch indices ``b`` (see :func:`jaxgrad.fast.linear.dense_layout`); the
    pairwise Gram form (``T = 1``: ``(a_i·a_j)(g_i·g_j)``) where it is cheaper by shape
    (:func:`dense_pair_gram`), else the inner products of the formed ``K × N`` per-example
    gradients.
    """
    a_perm, g_perm, (nb, t, k, n) = dense_layout(eqn, pos)
    dtype = acc_dtype(eqn)
    hi = jax.lax.Precision.HIGHEST

    def blocks(a, g):
        return (
            _to_blocks(a, a_perm, (nb, t, k)).astype(dtype),
            _to_blocks(g, g_perm, (nb, t, n)).astype(dtype),
        )

    (x1, y1), (x2, y2) = blocks(a1, g1), blocks(a2, g2)
    if t == 1 or dense_pair_gram(t, k, n):

        def row(xy, right):  # example i of the left against every example of the right
            (x, y), (xs, ys) = xy, right
            xx = jnp.einsum("jtk,cjsk->cjts", x, xs, precision=hi)
            yy = jnp.einsum("jtn,cjsn->cjts", y, ys, precision=hi)
            return jnp.sum(xx * yy, axis=(1, 2, 3))

        return _pairs(row, (x1, y1), (x2, y2), nb * t * t)
    w1 = jnp.einsum("bjtk,bjtn->bjkn", x1, y1, precision=hi)
    w2 = jnp.einsum("bjtk,bjtn->bjkn", x2, y2, precision=hi)
    return grads_gram(w1, w2)


def gather_gram_pairs(eqn: Eqn, pos: int, i1, g1, i2, g2):
    """``Σ_{t,s} [r_{i,t} = r_{j,s}] ⟨g_{i,t}, g_{j,s}⟩`` for an embedding lookup (same rows),
    where it is cheaper by shape (:func:`gather_pair_gram`), else the inner products of the
    formed ``rows × R`` per-example gradients."""
    dtype = acc_dtype(eqn)
    r1, _, y1 = gather_rows(eqn, i1, g1.astype(dtype))
    r2, _, y2 = gather_rows(eqn, i2, g2.astype(dtype))
    t = r1.shape[1]
    if not gather_pair_gram(t, gather_num_rows(eqn)):
        return grads_gram(
            per_example_grads(eqn, 0, idx_restore(eqn, r1), g_restore(eqn, y1)),
            per_example_grads(eqn, 0, idx_restore(eqn, r2), g_restore(eqn, y2)),
        )

    def row(ry, right):
        (r, y), (rs, ys) = ry, right
        same = jnp.all(r[None, :, None, :] == rs[:, None, :, :], axis=-1)
        yy = jnp.einsum("tr,csr->cts", y, ys, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(jnp.where(same, yy, 0), axis=(1, 2))

    return _pairs(row, (r1, y1), (r2, y2), t * t)


def formed_gram_pairs(eqn: Eqn, pos: int, a1, g1, a2, g2):
    """``(B1, B2)`` inner products of the per-example gradients, formed."""
    return grads_gram(per_example_grads(eqn, pos, a1, g1), per_example_grads(eqn, pos, a2, g2))


def cross_gram(f1, f2):
    """``(B1, B2)`` Gram matrix of tied uses in outer form (see :func:`outer_factors`).

    ``⟨Σ_u Σ_t x^u_{i,t} ⊗ y^u_{i,t}, Σ_v Σ_s x^v_{j,s} ⊗ y^v_{j,s}⟩ =
    Σ_{u,v} Σ_{t,s} ⟨x^u_{i,t}, x^v_{j,s}⟩ ⟨y^u_{i,t}, y^v_{j,s}⟩``, with ``x`` a one-hot row
    for a lookup: every cross term between the uses, as :func:`cross_norm_sq` on the diagonal.
    """
    per_pair = sum(x.shape[1] for _, x, _ in f1) * sum(x.shape[1] for _, x, _ in f2)
    k1, k2 = [k for k, _, _ in f1], [k for k, _, _ in f2]  # static: not mapped over

    def row(left, right):  # one example of the left against every one of the right
        with_kinds = lambda ks, xys: [(k, x, y) for k, (x, y) in zip(ks, xys, strict=True)]
        return _cross_terms(with_kinds(k1, left), with_kinds(k2, right), paired=False)

    arrays = lambda f: [(x, y) for _, x, y in f]
    return _pairs(row, arrays(f1), arrays(f2), per_pair)
