"""The table of fast-use kinds and the route each use takes: how its per-example squared norm
is formed, what that costs, and whether its per-example gradient is formed and kept.

For a use ``s = op(A, W)`` linear in ``W`` (``dot_general``, ``conv_general_dilated``,
embedding ``gather``), example ``i``'s gradient with respect to ``W`` is the transpose of
``op(A_i, ·)`` applied to ``G_i``. Three things are needed from it:

* its squared norm per example, without materialising it where a cheaper identity exists
  (:mod:`jaxgrad.fast.norms`): ``‖a_i‖²‖g_i‖²`` for a dense use without a sequence axis,
  ``⟨A_i A_iᵀ, G_i G_iᵀ⟩`` with one (``T`` positions; chosen when ``T(K + N) ≤ K N`` for a
  ``K × N`` weight, :func:`dense_gram`, else the ``K × N`` per-example gradient is formed),
  ``Σ_{t,s} [r_t = r_s] ⟨g_t, g_s⟩`` for an embedding lookup of rows ``r_t`` (when
  ``T² ≤ 8 × rows``, :func:`gather_gram`), and for a convolution ``Σ_o ‖P_{i,o}ᵀ G_i‖²``
  over kernel offsets ``o`` (im2col one offset at a time);
* the weighted sum ``Σ_i c_i ∇_W S_i`` (:func:`jaxgrad.fast.linear.weighted_grad`);
* for a parameter with several uses, the per-example gradient itself (so that the cross terms
  between uses are exact, :func:`jaxgrad.fast.linear.per_example_grads`).

This module holds the choices among those forms, the arithmetic being
:mod:`jaxgrad.fast.norms`' and :mod:`jaxgrad.fast.linear`'s: the table of kinds, each kind's
route, the table of norm rules, and the cost comparisons the routes rest on (also those
the reparametrised uses take: :func:`scaled_pays`, :func:`masked_pays`).

**One table, one decision.** Every kind of fast use is one entry of :data:`KINDS`: the
primitive, when an equation of it is such a use (the walker, :mod:`jaxgrad.fast.trace`,
classifies by it), its *route* — a :class:`Form` saying how its per-example squared norm is
formed (``how``, a key of :data:`NORMS`), what the plan prints (``label``, ``cost``) and
whether the per-example gradient is formed and kept for the weighted sum (``keep``) — and its
pairwise Gram rule. :func:`route` is called once per use by :func:`jaxgrad.fast.plan.routes`;
the :class:`~jaxgrad.fast.plan.Route` carries the result, ``execute.FastParts`` executes it and
``plan`` prints it. The weighted sum, the per-example gradients and the inner products with
a reference are the use's own VJP and forward operation, the same for every kind
(:mod:`jaxgrad.fast.linear`).

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
``steps ×`` the positions, or, for a kernel scanned over, the top-level route at each step
(:func:`jaxgrad.fast.trace.stepwise`); a kind without a lift falls back there, visibly.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from jaxgrad.fast.linear import conv_windows_ok, dense_layout, gather_num_rows, prod
from jaxgrad.fast.norms import (
    conv_norm_sq,
    dense_gram_norm_sq,
    dense_gram_pairs,
    dense_rank1_norm_sq,
    formed_gram_pairs,
    gather_grads_norm_sq,
    gather_gram_pairs,
    gather_norm_sq,
    materialised_norm_sq,
)
from jaxgrad.fast.program import Eqn, is_complex


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
    t = prod(out_shape, [d for d in range(len(out_shape)) if d not in dn.offset_dims])
    rows = gather_num_rows(eqn)
    if gather_gram(t, rows):
        return Form("gather_same_row", f"gather, {t} lookups: same-row Gram", t * t)
    size = math.prod(eqn.in_avals[0].shape)
    # The weighted sum scatters T rows of G per example: the formed rows × R gradient is
    # kept for it only when the table has no more rows than that.
    label = f"gather, {t} lookups: per-example gradient"
    return Form("gather_grads", label, size, keep=rows <= t)


def _conv_route(eqn: Eqn, pos: int) -> Form:
    if not conv_windows_ok(eqn, pos):
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


def route(kind: str, eqn: Eqn, pos: int, *, stacked: bool = False, steps: int = 0) -> Form:
    """How :func:`norm_sq` handles one use (its kind's entry in :data:`KINDS` decides).

    ``stacked``: the use is a scan's step equation lifted over the steps of a leaf scanned
    over; unless the route is the Gram form (whose run-time QR choice is one for the whole
    batch), the steps' norms are then taken one step at a time (``per_step``).
    ``steps``: for a use with no equation of every step (a convolution of a kernel scanned
    over, :func:`jaxgrad.fast.trace.stepwise`), ``eqn`` is the step's and its top-level
    route is taken at each of ``steps`` steps (``per_step``; the cost counts them).
    """
    entry = KINDS.get(kind)
    form = entry.route(eqn, pos) if entry is not None else _grads_route(kind, eqn, pos)
    # A route that forms the per-example gradient keeps it for the weighted sum: for a use
    # linear in W, Σ_i c_i J_i reads |W| entries per example, never more than contracting
    # A_i and G_i again does (a lookup's scatter may read less: its route says).
    keep = form.keep or form.how == "grads"
    if steps:
        label = f"each step's {form.label}"
        return dataclasses.replace(
            form, label=label, cost=steps * form.cost, keep=keep, per_step=True
        )
    return dataclasses.replace(form, keep=keep, per_step=stacked and form.how != "dense_gram")


# A scaled weight (``W_eff = θ' ⊙ Π F``, :class:`jaxgrad.fast.scaled.Scale`) whose factors
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
    :class:`jaxgrad.fast.scaled.Scale`, side ``"w"``).

    The weighted sum is ``M ⊙ Σ_i c_i ∇_{W_eff} S_i`` (the use's own contraction, then the
    mask) and an inner product ``⟨∇_{W_eff} S_i, M ⊙ V⟩``, always; the norm is
    :func:`jaxgrad.fast.norms.masked_norm_sq` where :func:`masked_pays`, else the per-example
    gradient, formed, masked and kept (its Gram blocks are those of the formed gradients).
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
    "grads": materialised_norm_sq,
}


def gram(kind: str, eqn: Eqn, pos: int, a1, g1, a2, g2):
    """``(B1, B2)`` inner products of the gradients through one use, ``⟨∇_W S_i, ∇_W S_j⟩``.

    ``(a1, g1)`` and ``(a2, g2)`` are two sets of examples (the same set for a batch's Gram
    matrix, two chunks of it for one block); the diagonal of ``gram(a, g, a, g)`` is
    :func:`norm_sq`. The kind's pairwise rule (:attr:`Kind.pairs`), else the inner products
    of the formed per-example gradients.
    """
    entry = KINDS.get(kind)
    return (entry.pairs if entry is not None else formed_gram_pairs)(eqn, pos, a1, g1, a2, g2)


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
