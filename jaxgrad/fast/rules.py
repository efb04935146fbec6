"""Per-example gradients of one parameter use from its kept operand ``A`` and cotangent ``G``.

For a use ``s = op(A, W)`` linear in ``W`` (``dot_general``, ``conv_general_dilated``,
embedding ``gather``), example ``i``'s gradient with respect to ``W`` is the transpose of
``op(A_i, ·)`` applied to ``G_i``. Three things are needed from it:

* its squared norm per example, without materialising it where a cheaper identity exists:
  ``‖a_i‖²‖g_i‖²`` for a dense use without a sequence axis, ``⟨A_i A_iᵀ, G_i G_iᵀ⟩`` with one
  (``T`` positions; as ``‖R_A R_Gᵀ‖²`` from QR factors where positions cancel, see
  :func:`outer_norm_sq`;
  chosen when ``T(K + N) ≤ K N`` for a ``K × N`` weight, else the
  ``K × N`` per-example gradient is formed), ``Σ_{t,s} [r_t = r_s] ⟨g_t, g_s⟩`` for an
  embedding lookup of rows ``r_t`` (when ``T² ≤ 8 × rows``), and for a convolution
  ``Σ_o ‖P_{i,o}ᵀ G_i‖²`` over kernel offsets ``o`` (im2col one offset at a time);
* the weighted sum ``Σ_i c_i ∇_W S_i``: the ordinary weight-gradient contraction over the
  batch with ``G`` reweighted, ``Aᵀ diag(c) G`` for a dense layer;
* for a parameter with several uses, the per-example gradient itself (so that the cross terms
  between uses are exact).

Arrays here carry the example axis first: ``A`` is ``(B, *a.shape)``, ``G`` is
``(B, *out.shape)``.

**One table, one decision.** Every kind of fast use is one entry of :data:`KINDS`: the
primitive, when an equation of it is such a use (the walker, :mod:`jaxgrad.fast.trace`,
classifies by it), its *route* — a :class:`Form` saying how its per-example squared norm is
formed (``how``, a key of :data:`NORMS`), what the plan prints (``label``, ``cost``) and
whether the per-example gradient is formed and kept for the weighted sum (``keep``) — and its
pairwise Gram rule. :func:`route` is called once per use by :func:`jaxgrad.fast.plan.routes`;
the :class:`~jaxgrad.fast.plan.Route` carries the result, ``execute.FastParts`` executes it and
``plan`` prints it. The weighted sum, the per-example gradients and the inner products with
a reference are the use's own VJP and forward operation, the same for every kind.

Adding a primitive is one entry here. For example, an elementwise scale ``x * w`` of a
parameter ``w`` shaped like ``x`` (its per-example gradient ``x_i ⊙ g_i``, formed)::

    from jaxgrad.fast import rules

    def scale_accepts(eqn, positions):  # one parameter operand, nothing broadcast
        return len(positions) == 1 and eqn.in_avals[0].shape == eqn.in_avals[1].shape

    def scale_route(eqn, pos):
        size = math.prod(eqn.in_avals[pos].shape)
        return rules.Form("grads", "scale: per-example gradient", size)

    rules.KINDS["scale"] = rules.Kind("mul", scale_accepts, scale_route)

A cheaper norm is a function ``(eqn, pos, A, G) -> (B,)`` in :data:`NORMS` named by the
route's ``how``. (Inside a ``lax.scan`` a use is lifted over the steps,
:func:`jaxgrad.fast.trace.lift_over_steps`, written for ``dense``, ``gather`` and ``conv``,
whose steps become more images of the example, so its route is the top-level one over
``steps ×`` the positions; a kind without a lift falls back there, visibly.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.fast.program import Eqn, is_complex


def _bind(eqn: Eqn, pos: int, w, a):
    args = [a, a]
    args[pos] = w
    out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
    return out


def _operand_zeros(eqn: Eqn, pos: int):
    aval = eqn.in_avals[pos]
    return jnp.zeros(aval.shape, aval.dtype)


def _by_windows(eqn: Eqn, pos: int) -> bool:
    return eqn.primitive.name == "conv_general_dilated" and _conv_windows_ok(eqn, pos)


def per_example_grads(eqn: Eqn, pos: int, a, g):
    """``(B, *W.shape)``: every example's gradient with respect to operand ``pos``."""
    if _by_windows(eqn, pos):
        return conv_per_example_grads(eqn, pos, a, g)

    def one(a_i, g_i):
        _, vjp = jax.vjp(lambda w: _bind(eqn, pos, w, a_i), _operand_zeros(eqn, pos))
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
    rows = _dense_rows(eqn, pos, a, g, axis)
    if rows is not None:
        return _dense_weighted(eqn, pos, *rows)
    _, vjp = jax.vjp(
        lambda w: jax.vmap(lambda a_i: _bind(eqn, pos, w, a_i), in_axes=axis, out_axes=axis)(a),
        _operand_zeros(eqn, pos),
    )
    return vjp(g)[0]


def _dense_rows(eqn: Eqn, pos: int, a, g, axis: int):
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


def _prod(shape, dims):
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
    sizes = (_prod(o_shape, ob), _prod(o_shape, ofree), _prod(o_shape, oc), _prod(p_shape, pfree))
    return a_perm, g_perm, sizes


def _to_blocks(x, perm, shape):
    b = x.shape[0]
    x = jnp.transpose(x, (0, *(d + 1 for d in perm)))
    return x.reshape((b, *shape))


def _rest(ndim, keep):
    keep = set(keep)
    return tuple(d for d in range(1, ndim) if d not in keep)


def dense_gram(t: int, k: int, n: int) -> bool:
    """Whether the Gram form (``2 T²`` per example) beats forming the ``K × N`` gradient."""
    return t * (k + n) <= k * n


def gather_gram(t: int, num_rows: int) -> bool:
    """Whether the ``T × T`` same-row form beats forming the ``rows × R`` gradient."""
    return t * t <= 8 * num_rows


@dataclasses.dataclass(frozen=True)
class Form:
    """How one use's per-example squared norm is formed: decided once, by its kind's route
    (:func:`route`), printed by the plan and executed by :func:`norm_sq` and the pass.

    ``how`` names the norm rule (a key of :data:`NORMS`), ``label`` and ``cost`` (entries
    formed per example) are what the plan prints; ``keep``: where the pass computes a
    weighted sum, the per-example gradient is formed, its squared norm read off it and it
    is kept for the weighted sum (``Σ_i c_i J_i``, no second contraction of ``A`` and
    ``G``) — set by :func:`route` for every route whose norm forms it anyway
    (``how == "grads"``, any kind), and by a kind's route where forming it pays for a
    weighted sum only (a small convolution kernel);
    ``per_step``: a leaf scanned over (one slice per step)
    whose steps' squared norms are taken one step at a time and added, on the step-major
    arrays as captured (no transpose).
    """

    how: str
    label: str
    cost: int
    keep: bool = False
    per_step: bool = False


def _dense_route(eqn: Eqn, pos: int) -> Form:
    _, _, (nb, t, k, n) = dense_layout(eqn, pos)
    if t == 1:
        return Form("dense_rank1", "dense: |a|²|g|²", nb)
    if dense_gram(t, k, n):  # (QR is picked at run time where positions cancel)
        label = f"dense, {t} positions: Gram <AAᵀ,GGᵀ>"
        # A weighted sum contracts the T K N products again, which forming the gradient
        # does once: formed and kept when it is at most twice the A_i and G_i held (on a
        # CPU, T = 32: faster at K N = 1.6 T (K + N), slower from 2.7 on, where writing and
        # reading the B K N entries costs more than the Gram).
        if k * n <= 2 * t * (k + n):
            label += "; weighted sum: per-example gradient formed and kept"
            return Form("dense_gram", label, 2 * nb * t * t, keep=True)
        return Form("dense_gram", label, 2 * nb * t * t)
    return Form("grads", f"dense, {t} positions: per-example gradient", nb * k * n)


def _gather_route(eqn: Eqn, pos: int) -> Form:
    dn = eqn.params["dimension_numbers"]
    out_shape = eqn.out_avals[0].shape
    t = _prod(out_shape, [d for d in range(len(out_shape)) if d not in dn.offset_dims])
    rows = gather_num_rows(eqn)
    if gather_gram(t, rows):
        return Form("gather_same_row", f"gather, {t} lookups: same-row Gram", t * t)
    size = math.prod(eqn.in_avals[0].shape)
    # The weighted sum scatters T rows of G per example: the formed rows × R gradient is
    # kept for it only when the table has no more rows than that.
    label = f"gather, {t} lookups: per-example gradient"
    return Form("gather_grads", label, size, keep=rows <= t)


def _conv_route(eqn: Eqn, pos: int) -> Form:
    if not _conv_windows_ok(eqn, pos):
        return _grads_route("conv", eqn, pos)
    rhs_spec = eqn.params["dimension_numbers"][1]
    shape = eqn.in_avals[1].shape
    cost = shape[rhs_spec[0]] * shape[rhs_spec[1]]
    label = "conv: one kernel offset at a time"
    size = math.prod(shape)
    kept = math.prod(eqn.in_avals[0].shape) + math.prod(eqn.out_avals[0].shape)
    if size > kept:
        return Form("conv_windows", label, cost)
    # No larger than the A_i and G_i the pass holds: for a weighted sum the per-example
    # gradient is formed by offsets and kept (a squared norm alone is cheaper one offset
    # at a time, never stacked).
    label += "; weighted sum: per-example gradient formed and kept"
    return Form("conv_windows", label, cost, keep=True)


def _grads_route(kind: str, eqn: Eqn, pos: int) -> Form:
    """The generic route: the per-example gradient, materialised by the use's VJP."""
    return Form("grads", f"{kind}: per-example gradient", math.prod(eqn.in_avals[pos].shape))


def route(kind: str, eqn: Eqn, pos: int, *, stacked: bool = False) -> Form:
    """How :func:`norm_sq` handles one use (its kind's entry in :data:`KINDS` decides).

    ``stacked``: the use is a scan's step equation lifted over the steps of a leaf scanned
    over; unless the route is the Gram form (whose run-time QR choice is one for the whole
    batch), the steps' norms are then taken one step at a time (``per_step``).
    """
    entry = KINDS.get(kind)
    form = entry.route(eqn, pos) if entry is not None else _grads_route(kind, eqn, pos)
    # A route that forms the per-example gradient keeps it for the weighted sum: for a use
    # linear in W, Σ_i c_i J_i reads |W| entries per example, never more than contracting
    # A_i and G_i again does (a lookup's scatter may read less: its route says).
    keep = form.keep or form.how == "grads"
    return dataclasses.replace(form, keep=keep, per_step=stacked and form.how != "dense_gram")


# A scaled weight (``W_eff = θ' ⊙ Π F``, :class:`jaxgrad.fast.reparam.Scale`) whose factors
# need gradients pays one more product of the use per factor side or normaliser: about
# ``T |W|`` multiply-adds per example for ``T`` positions (a dense use's sequence, a
# convolution's output pixels). It replaces writing the ``|W|`` per-example gradient, so it is
# taken while ``products × T ≤ SCALED_WORK``. (B = 256, a loaded 2-core CPU,
# bench/results/reparam-scaled-2026-12-06-loaded.txt: a weight-normed dense stack, T = 16,
# 2 products, norms 2.9x -> 1.5x the time of batch_grad; the weight-normed CNN, T = 784,
# 1.06x -> 1.66x, so that one keeps the per-example kernel gradient.)
SCALED_WORK = 64


def use_positions(eqn: Eqn, pos: int) -> int:
    """``T`` of a use: the positions each entry of the parameter meets per example (a dense
    use's free positions of its other operand, a convolution's output pixels of every image
    of the example: a scan's steps are more images, see
    :func:`jaxgrad.fast.trace.lift_over_steps`)."""
    if eqn.primitive.name == "conv_general_dilated":
        out = eqn.out_avals[0].shape
        spec = eqn.params["dimension_numbers"][2]
        return math.prod(out[d] for d in (spec[0], *spec[2:]))
    return dense_layout(eqn, pos)[2][1]


def scaled_pays(eqn: Eqn, pos: int, products: int) -> bool:
    """Whether ``products`` more products of this use cost less than the per-example
    gradient they replace (see :data:`SCALED_WORK`). A lookup's are gathers of the ``T``
    rows it reads (``T R`` entries, the size of its ``G``), never more than the ``rows × R``
    gradient they replace (``T`` rows at most): they always pay."""
    if eqn.primitive.name == "gather":
        return True
    return products * use_positions(eqn, pos) <= SCALED_WORK


def masked_pays(t: int, k: int, n: int) -> bool:
    """Whether the masked norm form beats forming the ``K × N`` per-example gradient of a
    dense use whose weight is ``θ' ⊙ M`` (``M`` a full constant mask, not a product of a row
    and a column factor).

    ``‖M ⊙ Σ_t a_t g_tᵀ‖² = Σ_{t,s} (a_t ⊙ a_s)ᵀ M² (g_t ⊙ g_s)``: ``T² K N`` multiply-adds
    per example, with ``T² (K + N)`` entries held; forming ``M ⊙ Σ_t a_t g_tᵀ`` costs
    ``T K N`` and writes the ``K N`` entries (kept for the weighted sum). So the form pays at
    ``T = 1`` only (a dense layer without a sequence axis: ``(a²)ᵀ M² (g²)``, one matmul, no
    ``B × K × N`` array), which this comparison states for every ``T``.
    """
    return t * t * k * n <= t * k * n + k * n


def masked_route(kind: str, eqn: Eqn, pos: int) -> Form:
    """The route of a use whose parameter operand is ``θ' ⊙ M`` (``M`` a full mask, the same
    for every example: ``∇_θ' S_i = M ⊙ ∇_{W_eff} S_i``, see
    :class:`jaxgrad.fast.reparam.Scale`, side ``"w"``).

    The weighted sum is ``M ⊙ Σ_i c_i ∇_{W_eff} S_i`` (the use's own contraction, then the
    mask) and an inner product ``⟨∇_{W_eff} S_i, M ⊙ V⟩``, always; the norm is
    :func:`masked_norm_sq` where :func:`masked_pays`, else the per-example gradient,
    formed, masked and kept (its Gram blocks are those of the formed gradients).
    """
    size = math.prod(eqn.in_avals[pos].shape)
    if kind == "dense":
        _, _, (nb, t, k, n) = dense_layout(eqn, pos)
        if masked_pays(t, k, n):
            return Form("dense_masked", "dense, full mask M: (a²)ᵀM²(g²)", nb * t * t * (k + n))
        label = (
            f"dense, {t} positions, full mask M: per-example gradient, times M (the masked "
            f"form's T² K N per example costs more than forming it)"
        )
        return Form("grads", label, size, keep=True)
    return Form("grads", f"{kind}, full mask M: per-example gradient, times M", size, keep=True)


def masked_norm_sq(eqn: Eqn, pos: int, a, g, m):
    """``Σ_b Σ_{t,s} (a_{bt} ⊙ a_{bs})ᵀ M_b² (g_{bt} ⊙ g_{bs})`` per example: the squared norm
    of ``M ⊙ ∇_W S_i`` for a dense use (``m``: the mask in the parameter operand's layout,
    broadcastable to it), over its dot batch indices ``b`` (see :func:`masked_pays`)."""
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
    t = _prod(eqn.out_avals[0].shape, rows)
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


def gather_grads_norm_sq(eqn: Eqn, pos: int, idx, g):
    """An embedding lookup's ``rows × R`` per-example gradient, formed (invalid lookups
    dropped, see :func:`gather_rows`), squared and summed."""
    del pos
    idx, _, g = gather_rows(eqn, idx, g.astype(acc_dtype(eqn)))
    grads = per_example_grads(eqn, 0, idx_restore(eqn, idx), g_restore(eqn, g))
    return jnp.sum(grads.reshape(grads.shape[0], -1).astype(g.dtype) ** 2, axis=1)


def gather_norm_sq(eqn: Eqn, pos: int, idx, g):
    """``‖Σ_t e_{r_t} g_tᵀ‖² = Σ_{t,s} [r_t = r_s] ⟨g_t, g_s⟩`` for an embedding lookup."""
    del pos
    idx, _, g = gather_rows(eqn, idx, g.astype(acc_dtype(eqn)))
    same = jnp.all(idx[:, :, None, :] == idx[:, None, :, :], axis=-1)
    gg = jnp.einsum("btr,bsr->bts", g, g, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(jnp.where(same, gg, 0), axis=(1, 2))


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


def _conv_windows_ok(eqn: Eqn, pos: int) -> bool:
    p = eqn.params
    return (
        pos == 1
        and p["feature_group_count"] == 1
        and p["batch_group_count"] == 1
        and all(d == 1 for d in (p["lhs_dilation"] or ()))
    )


def _conv_windows(eqn: Eqn, a, g):
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


def _offset_grad(window, g):
    """``(B, C_in, C_out)``: one kernel offset's slice of every example's gradient."""
    return jnp.einsum("btc,btn->bcn", window, g, precision=jax.lax.Precision.HIGHEST)


def conv_norm_sq(eqn: Eqn, pos: int, a, g):
    """``‖∇_W S_i‖²`` for a convolution, one kernel offset at a time (see :func:`_conv_windows`).

    For kernel offset ``o`` the per-example gradient slice is ``dW_i[o] = P_{i,o}ᵀ G_i`` with
    ``P_{i,o}`` the input window shifted by ``o`` (a strided slice of the padded input): a
    batched ``(C_in × T)·(T × C_out)`` matmul. A ``fori_loop`` over the offsets keeps one window
    live at a time. Grouped, batch-grouped and input-dilated convolutions take the generic
    route (the per-example gradient, formed; see :func:`route`).
    """
    window, g, kernel = _conv_windows(eqn, a, g)

    def body(k, total):
        w = _offset_grad(window(k), g)
        return total + jnp.sum(w * w, axis=(1, 2))

    return jax.lax.fori_loop(0, math.prod(kernel), body, jnp.zeros((g.shape[0],), g.dtype))


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
    :func:`conv_norm_sq`, stacked: on a CPU several times faster than ``vmap`` of the
    convolution's VJP (a convolution grouped over the examples). Only for the convolutions
    :func:`conv_norm_sq` reads by windows.
    """
    window, g, kernel = _conv_windows(eqn, a, g)
    # (B, offsets, C_in, C_out) -> (B, *kernel, C_in, C_out) -> the kernel's own layout. A
    # small kernel's offsets over small windows are unrolled (at most UNROLL_OFFSETS windows
    # live at once); otherwise a loop, one window live (see UNROLL_ENTRIES).
    offsets = math.prod(kernel)
    c_in = eqn.in_avals[0].shape[eqn.params["dimension_numbers"][0][1]]
    entries = offsets * g.shape[0] * g.shape[1] * c_in  # every window, (B, T, C_in) each
    if offsets <= UNROLL_OFFSETS and entries <= UNROLL_ENTRIES:
        per = jnp.stack([_offset_grad(window(k), g) for k in range(offsets)], axis=1)
    else:
        per = jax.lax.map(lambda k: _offset_grad(window(k), g), jnp.arange(offsets))
        per = jnp.moveaxis(per, 0, 1)
    per = per.reshape(g.shape[0], *kernel, *per.shape[2:])
    rhs_spec, nsp = eqn.params["dimension_numbers"][1], len(kernel)
    perm = [0] * (nsp + 3)
    perm[1 + rhs_spec[0]], perm[1 + rhs_spec[1]] = 2 + nsp, 1 + nsp
    for d in range(nsp):
        perm[1 + rhs_spec[2 + d]] = 1 + d
    return jnp.transpose(per, perm).astype(eqn.in_avals[pos].dtype)


def _materialised_norm_sq(eqn: Eqn, pos: int, a, g):
    grads = per_example_grads(eqn, pos, a, g)
    return jnp.sum(grads.reshape(grads.shape[0], -1).astype(acc_dtype(eqn)) ** 2, axis=1)


def norm_sq(form: Form, eqn: Eqn, pos: int, a, g):
    """Per-example squared norm ``(B,)`` of the gradient through one use, by its route."""
    return NORMS[form.how](eqn, pos, a, g)


# The norm rules by :attr:`Form.how`: ``rule(eqn, pos, A, G) -> (B,)``.
NORMS = {
    "dense_rank1": dense_rank1_norm_sq,
    "dense_gram": dense_gram_norm_sq,
    "gather_same_row": gather_norm_sq,
    "gather_grads": gather_grads_norm_sq,
    "conv_windows": conv_norm_sq,
    "grads": _materialised_norm_sq,
}


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
        return _prod(out_shape, [d for d in range(len(out_shape)) if d not in dn.offset_dims])
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
    hi = jax.lax.Precision.HIGHEST
    total = 0
    for ku, xu, yu in factors:
        for kv, xv, yv in factors:
            yy = jnp.einsum("btc,bsc->bts", yu, yv, precision=hi)
            if ku == "dense" and kv == "dense":
                xx = jnp.einsum("btr,bsr->bts", xu, xv, precision=hi)
            elif ku == "gather" and kv == "gather":
                xx = (xu[:, :, None] == xv[:, None, :]).astype(yy.dtype)
            elif ku == "gather":  # ⟨e_{r_t}, x_s⟩ = x_s[r_t]
                xx = jnp.take_along_axis(xv, xu[:, None, :], axis=2).transpose(0, 2, 1)
            else:
                xx = jnp.take_along_axis(xu, xv[:, None, :], axis=2)
            total = total + jnp.sum(xx * yy, axis=(1, 2))
    return total


# --- Pairs of examples and a reference: the Gram matrix and inner products --------------------
#
# Norms are the diagonal of the Gram matrix ``⟨∇_i, ∇_j⟩``; the functions below compute its
# entries from the same factors as :func:`norm_sq`: ``⟨A_i A_jᵀ, G_i G_jᵀ⟩`` (for a plain dense
# layer, ``T = 1``, ``(a_i·a_j)(g_i·g_j)``), the same-row form for a lookup, or the inner
# products of the formed per-example gradients where that is cheaper by shape — judged per
# pair of examples, as the diagonal is judged per example (a convolution's ``B × |kernel|``
# gradients are formed).

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
    the ``B`` pairs of each): a factor ``T`` stricter than :func:`dense_gram` on the diagonal.
    """
    return t * t * (k + n) <= k * n


def dense_gram_pairs(eqn: Eqn, pos: int, a1, g1, a2, g2):
    """``⟨∇_W S_i, ∇_W S_j⟩`` for a ``dot_general`` use: ``Σ_b ⟨A_{ib} A_{jb}ᵀ, G_{ib} G_{jb}ᵀ⟩``.

    Over the ``NB`` dot batch indices ``b`` (see :func:`dense_layout`); the pairwise Gram form
    (``T = 1``: ``(a_i·a_j)(g_i·g_j)``) where it is cheaper by shape (:func:`dense_pair_gram`),
    else the inner products of the formed ``K × N`` per-example gradients.
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
    """``Σ_{t,s} [r_{i,t} = r_{j,s}] ⟨g_{i,t}, g_{j,s}⟩`` for an embedding lookup (same rows)."""
    dtype = acc_dtype(eqn)
    r1, _, y1 = gather_rows(eqn, i1, g1.astype(dtype))
    r2, _, y2 = gather_rows(eqn, i2, g2.astype(dtype))
    t = r1.shape[1]
    if t * t > gather_num_rows(eqn):  # per pair: T² same-row tests against a rows × R product
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


def gram(kind: str, eqn: Eqn, pos: int, a1, g1, a2, g2):
    """``(B1, B2)`` inner products of the gradients through one use, ``⟨∇_W S_i, ∇_W S_j⟩``.

    ``(a1, g1)`` and ``(a2, g2)`` are two sets of examples (the same set for a batch's Gram
    matrix, two chunks of it for one block); the diagonal of ``gram(a, g, a, g)`` is
    :func:`norm_sq`. The kind's pairwise rule (:attr:`Kind.pairs`), else the inner products
    of the formed per-example gradients.
    """
    entry = KINDS.get(kind)
    return (entry.pairs if entry is not None else formed_gram_pairs)(eqn, pos, a1, g1, a2, g2)


def formed_gram_pairs(eqn: Eqn, pos: int, a1, g1, a2, g2):
    """``(B1, B2)`` inner products of the per-example gradients, formed."""
    return grads_gram(per_example_grads(eqn, pos, a1, g1), per_example_grads(eqn, pos, a2, g2))


def cross_gram(f1, f2):
    """``(B1, B2)`` Gram matrix of tied uses in outer form (see :func:`outer_factors`).

    ``⟨Σ_u Σ_t x^u_{i,t} ⊗ y^u_{i,t}, Σ_v Σ_s x^v_{j,s} ⊗ y^v_{j,s}⟩ =
    Σ_{u,v} Σ_{t,s} ⟨x^u_{i,t}, x^v_{j,s}⟩ ⟨y^u_{i,t}, y^v_{j,s}⟩``, with ``x`` a one-hot row
    for a lookup: every cross term between the uses, as :func:`cross_norm_sq` on the diagonal.
    """
    hi = jax.lax.Precision.HIGHEST
    per_pair = sum(x.shape[1] for _, x, _ in f1) * sum(x.shape[1] for _, x, _ in f2)

    k1, k2 = [k for k, _, _ in f1], [k for k, _, _ in f2]  # static: not mapped over

    def row(left, right):
        total = 0
        for ku, (xu, yu) in zip(k1, left, strict=True):  # one example of the left: (T, ·)
            for kv, (xv, yv) in zip(k2, right, strict=True):  # every one of the right
                yy = jnp.einsum("tc,dsc->dts", yu, yv, precision=hi)
                if ku == "dense" and kv == "dense":
                    xx = jnp.einsum("tr,dsr->dts", xu, xv, precision=hi)
                elif ku == "gather" and kv == "gather":
                    xx = (xu[None, :, None] == xv[:, None, :]).astype(yy.dtype)
                elif ku == "gather":  # ⟨e_{r_t}, x_s⟩ = x_s[r_t]
                    xx = jnp.transpose(jnp.take(xv, xu, axis=2), (0, 2, 1))
                else:  # ⟨x_t, e_{r_s}⟩ = x_t[r_s]
                    xx = jnp.transpose(xu[:, xv], (1, 0, 2))
                total = total + jnp.sum(xx * yy, axis=(1, 2))
        return total

    arrays = lambda f: [(x, y) for _, x, y in f]
    return _pairs(row, arrays(f1), arrays(f2), per_pair)


# A convolution reading fewer input channels than this (raw grey or RGB images) is dotted one
# kernel offset at a time (:func:`conv_dot_offsets`): XLA's CPU convolutions vectorise over
# the input channels, and for 1-3 of them the forward convolution ``op(A, V)`` took 1.5-2.4x
# the time of the per-offset products; from 4 channels on the convolution was 1.6-4x faster
# (float32, B = 256, 3x3 kernels, 14-32 pixels square, 16-64 output channels).
DOT_OFFSET_CHANNELS = 4


def conv_dot_offsets(eqn: Eqn, pos: int) -> bool:
    """Whether :func:`dot` takes a convolution one kernel offset at a time."""
    if not _conv_windows_ok(eqn, pos):
        return False
    lhs_spec = eqn.params["dimension_numbers"][0]
    return eqn.in_avals[0].shape[lhs_spec[1]] < DOT_OFFSET_CHANNELS


def _conv_offsets_dot(eqn: Eqn, a, g, v):
    """``Σ_o ⟨P_{i,o}ᵀ G_i, V_o⟩`` over kernel offsets ``o`` (see :func:`_conv_windows`)."""
    window, g, kernel = _conv_windows(eqn, a, g)
    count = math.prod(kernel)
    rhs_spec = eqn.params["dimension_numbers"][1]
    v = jnp.transpose(v.astype(g.dtype), (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    v = v.reshape(count, *v.shape[-2:])  # (offsets, C_in, C_out), offsets as unravelled

    def body(k, total):
        return total + jnp.sum(_offset_grad(window(k), g) * v[k], axis=(1, 2))

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
    out = jax.vmap(lambda a_i: _bind(eqn, pos, v, a_i))(a)
    prod = out.astype(dtype) * g.astype(dtype)
    return jnp.sum(prod.reshape(prod.shape[0], math.prod(prod.shape[1:])), axis=1)


# --- The table of use kinds ------------------------------------------------------------------


def _real(eqn: Eqn) -> bool:
    return not any(is_complex(a) for a in (*eqn.in_avals, *eqn.out_avals))


def is_embedding_gather(eqn: Eqn) -> bool:
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


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of fast use: the primitive it is, when an equation of it is one (``accepts``:
    the equation and the operand positions that read a parameter), how its per-example norm
    is formed (``route``, see :class:`Form`) and its pairwise Gram rule (``pairs``)."""

    primitive: str
    accepts: Callable[[Eqn, list], bool]
    route: Callable[[Eqn, int], Form]
    pairs: Callable = formed_gram_pairs


# Every kind of fast use; the walker (:func:`jaxgrad.fast.trace.use`) classifies by it.
# A ``dot_general`` with a complex operand is read in real form (two real positions, see
# :func:`jaxgrad.fast.trace.real_form`); no other kind takes complex values.
KINDS: dict[str, Kind] = {
    "dense": Kind("dot_general", lambda e, ps: len(ps) == 1, _dense_route, dense_gram_pairs),
    "conv": Kind("conv_general_dilated", lambda e, ps: ps == [1] and _real(e), _conv_route),
    "gather": Kind(
        "gather",
        lambda e, ps: ps == [0] and _real(e) and is_embedding_gather(e),
        _gather_route,
        gather_gram_pairs,
    ),
}
