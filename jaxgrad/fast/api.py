"""Per-example norms, clipped gradients and gradient statistics without the ``B × P`` array.

Example ``i``'s gradient is ``g_i = ∇S_i``, the gradient of its loss *sum* (for a scalar loss,
of the loss itself); ``n_i`` is its item count and ``m_i`` the padding mask. Every function
takes ``method=``:

* ``"auto"`` (default) — the fast path: one forward and one backward pass of the batched loss,
  with the per-example quantities read off the traced computation (see
  :mod:`jaxgrad.fast.trace`); exact, at about the cost of one ordinary gradient;
* ``"vmap"`` — the reference: materialise every ``g_i`` with ``vmap(grad)``.

:func:`per_example_dots` needs no backward pass: its ``"auto"`` is forward mode where the loss
allows it (``"factored"`` forces the fast pass).

``chunk_size`` processes that many examples at a time under ``lax.scan`` (the batch need not
divide evenly), bounding peak memory on either path.
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.fast import passes
from jaxgrad.fast import plan as plan_lib
from jaxgrad.grads import _per_example, _strategy, _validator, check_loss_fn

PyTree = Any


def _wrap(core, loss_fn, *, name: str, doc: str | None, keywords: tuple = ()):
    """The strategies' own wrapper: input checks, padding filled, ``jax.jit``."""
    check_loss_fn(loss_fn)
    return _strategy(
        core,
        validate=_validator(loss_fn),
        name=name,
        doc=doc,
        loss_fn=loss_fn,
        real_params=True,  # the norms here are of real gradients (x², not |x|²)
        keywords=keywords,
    )


def check_units(units, size: int, *, name: str = "units") -> jax.Array:
    """``units`` checked: integer ids of shape ``(B,)`` in ``[0, B)`` (range checked when concrete).

    Under the caller's own ``jax.jit`` the values cannot be checked; they are then only
    compared with each other (rows with equal ids form a unit), so any ids are well defined.
    """
    dtype = getattr(units, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must be an integer array of unit ids, shape ({size},); got "
            f"{type(units).__name__} of dtype {dtype}"
        )
    if np.shape(units) != (size,):
        raise ValueError(
            f"`{name}` must have shape (B,) = ({size},), one unit id per row of the batch; "
            f"got shape {np.shape(units)}"
        )
    if not isinstance(units, jax.core.Tracer) and size:
        ids = np.asarray(units)
        below, above = int(np.sum(ids < 0)), int(np.sum(ids >= size))
        if below or above:  # counts only: unit ids are the users' own (private) identifiers
            raise ValueError(
                f"`{name}` must hold unit ids in [0, B) = [0, {size}); got {below + above} "
                f"outside it ({below} below 0, {above} at or above {size})"
            )
    return units


def check_reference(reference, params, *, name: str = "reference") -> list:
    """The leaves of ``reference``, checked to be shaped like ``params``'s (same tree)."""
    if reference is None:
        raise TypeError(f"`{name}` is required: a pytree shaped like `params`")
    leaves, treedef = jax.tree_util.tree_flatten(reference)
    p_leaves, p_treedef = jax.tree_util.tree_flatten(params)
    if treedef != p_treedef:
        raise ValueError(
            f"`{name}` must have the structure of `params`; got {treedef}, expected {p_treedef}"
        )
    for path, v, p in zip(plan_lib.leaf_paths(params), leaves, p_leaves, strict=True):
        if np.shape(v) != np.shape(p):
            raise ValueError(
                f"`{name}` leaf {name}{path} must have the shape of params{path}, "
                f"{np.shape(p)}; got {np.shape(v)}"
            )
        dtype = jnp.result_type(v)
        # A parameter that is not floating point is refused by the strategy's own check
        # of `params`, which says why; the reference's dtype is then beside the point.
        if jnp.issubdtype(jnp.result_type(p), jnp.floating) and not jnp.issubdtype(
            dtype, jnp.floating
        ):
            raise TypeError(
                f"`{name}` leaf {name}{path} must be real floating point, like params{path}; "
                f"got {dtype}"
            )
    return reference


def _gram(get, loss_fn, params, batch, mask, chunk_size):
    """``(B, B)`` Gram matrix ``⟨∇S_i, ∇S_j⟩``, ``(B,)`` loss sums and ``(B,)`` the pairwise
    forms' own diagonal (the Gram's is the guarded norms, :func:`_with_norms`), chunk by chunk.

    With ``chunk_size = c`` the batch is cut into ``K = ⌈B / c⌉`` contiguous chunks (the last
    padded with masked rows) and block ``(p, q)`` is read off the passes of chunks ``p`` and
    ``q``: ``K + K²`` passes of ``c`` examples, two chunks' activations live at a time.
    """
    size = mask.shape[0]
    if chunk_size is None or chunk_size >= size:
        parts = get(loss_fn, params, batch, mask)
        gram, pairwise = _with_norms(passes.gram(parts, parts), parts.norm_sq)
        return gram, parts.sums, pairwise
    k = -(-size // chunk_size)
    pad = k * chunk_size - size

    def blocked(x):  # padded with copies of row 0 (finite: the batch's padding is filled)
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
        return x.reshape(k, chunk_size, *x.shape[1:])

    chunks = jax.tree_util.tree_map(blocked, batch)
    masks = blocked(mask).at[-1, chunk_size - pad :].set(False) if pad else blocked(mask)

    def row(pm):
        parts_p = get(loss_fn, params, *pm)
        cols = jax.lax.map(
            lambda qm: passes.gram(parts_p, get(loss_fn, params, *qm)), (chunks, masks)
        )
        return cols, parts_p.sums, parts_p.norm_sq

    blocks, sums, norm_sq = jax.lax.map(row, (chunks, masks))  # (K, K, c, c), (K, c) twice
    full = jnp.transpose(blocks, (0, 2, 1, 3)).reshape(k * chunk_size, k * chunk_size)
    gram, pairwise = _with_norms(full[:size, :size], norm_sq.reshape(-1)[:size])
    return gram, sums.reshape(-1)[:size], pairwise


def _with_norms(gram, norm_sq):
    """``(gram, pairwise)``: the Gram matrix with its diagonal the per-example squared norms of
    the same pass, and the diagonal it had. Where an example's positions (or tied uses)
    nearly cancel, the pairwise forms lose the digits the norms keep
    (:func:`jaxgrad.fast.norms.outer_norm_sq` switches to QR factors there)."""
    pairwise = jnp.diagonal(gram)
    return gram.at[jnp.diag_indices(gram.shape[0])].set(norm_sq.astype(gram.dtype)), pairwise


def _unit_norms(get, loss_fn, params, batch, mask, units, chunk_size):
    """``(norms, sums)``: every row's unit norm ``‖Σ_{j∈u(i)} ∇S_j‖`` (0 where padded) and
    the loss sums, from the Gram matrix (:func:`_unit_norm_sq`)."""
    gram, sums, pairwise = _gram(get, loss_fn, params, batch, mask, chunk_size)

    def formed():  # each row's unit gradient formed by a weighted pass: B passes
        return _formed_unit_norm_sq(get, loss_fn, params, batch, mask, units, chunk_size)

    return jnp.sqrt(_unit_norm_sq(gram, units, mask, pairwise=pairwise, formed=formed)), sums


# A unit's Gram sum is trusted while its rows' gradients do not cancel by more than this in
# its squared norm, ``(Σ_{j∈u} ‖∇S_j‖)² ≤ UNIT_CANCELLATION · ‖Σ_{j∈u} ∇S_j‖²`` (rounding
# ≲ 10³ ε relative), and each row's pairwise diagonal agrees with its guarded norm to √ε
# relative (its positions do not cancel more: its entries off the diagonal round as it does).
UNIT_CANCELLATION = 1024.0


def _unit_norm_sq(gram, units, mask, *, pairwise, formed):
    """``‖Σ_{j∈u(i)} ∇S_j‖² = Σ_{j,k∈u(i)} ⟨∇S_j, ∇S_k⟩`` for every row ``i`` (0 where padded).

    A unit is a sequence of rows: its gradient ``Σ_{j∈u} A_jᵀ G_j = A_uᵀ G_u`` has the squared
    norm ``⟨A_u A_uᵀ, G_u G_uᵀ⟩``, the sum of the Gram matrix over the unit's pairs of rows.
    That sum cancels where the unit's rows' gradients (or one row's positions: its
    ``pairwise`` diagonal then disagrees with its guarded norm, the Gram's diagonal) nearly
    cancel, and keeps only rounding there: then (decided at run time, for the whole batch)
    ``formed()`` gives every unit's gradient formed and squared instead.
    """
    same = (units[:, None] == units[None, :]) & mask[:, None] & mask[None, :]
    # Selected with where, never multiplied by 0/1: a non-finite row (NaN activations) must
    # spoil its own unit only, and 0 × NaN is NaN.
    row_sums = jnp.sum(jnp.where(same, gram, 0), axis=1)  # Σ_{k∈u(j)} ⟨∇S_j, ∇S_k⟩
    sq = jnp.where(mask, jnp.maximum(jnp.sum(jnp.where(same, row_sums[None, :], 0), axis=1), 0), 0)
    diag = jnp.diagonal(gram)
    norms = jnp.sqrt(jnp.maximum(diag, 0))
    spread = jnp.sum(jnp.where(same, norms[None, :], 0), axis=1) ** 2  # (Σ_{j∈u(i)} ‖∇S_j‖)²
    drift = jnp.abs(pairwise - diag) > math.sqrt(jnp.finfo(diag.dtype).eps) * diag
    shared = jnp.sum(same, axis=1) > 1  # a unit of several rows (one row's norm is its own)
    drifts = jnp.any(same & (shared & drift)[None, :], axis=1)
    untrusted = jnp.any(mask & ((spread > UNIT_CANCELLATION * sq) | drifts))
    return jax.lax.cond(untrusted, formed, lambda: sq)


def _formed_unit_norm_sq(get, loss_fn, params, batch, mask, units, chunk_size):
    """``‖Σ_{j∈u(i)} ∇S_j‖²`` for every row ``i``, the unit's gradient formed by a weighted
    pass (``Σ_j c_j ∇S_j`` with ``c`` the unit's rows) and squared: exact where the Gram
    sum is not, one pass per row (the fallback of :func:`_unit_norm_sq`)."""

    def one(i):
        weights = (mask & (units == units[i])).astype(jnp.float32)

        def body(rows, m):
            b, c = rows
            parts = get(loss_fn, params, b, m)
            return (), jax.tree_util.tree_leaves(parts.weighted(c.astype(parts.norm_sq.dtype)))

        _, leaves = passes.run_chunked(body, (batch, weights), mask, chunk_size)
        dtype = jnp.result_type(jnp.float32, *leaves)
        return sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves)

    return jnp.where(mask, jax.lax.map(one, jnp.arange(mask.shape[0])), 0)


def _check_chunk(chunk_size):
    if chunk_size is not None:
        chunk_size = reduce.check_positive_int(chunk_size, name="chunk_size")
    return chunk_size


def per_example_norms(
    loss_fn, *, method: str = "auto", chunk_size: int | None = None, strict: bool = False
):
    """The L2 norm of every example's gradient over all parameters, ``‖∇S_i‖``.

    On the fast path a dense use ``s = a W`` contributes ``‖a_i‖² ‖g_i‖²`` (``g_i`` the
    cotangent of ``s``), or ``⟨A_i A_iᵀ, G_i G_iᵀ⟩`` with a sequence axis; an embedding lookup
    ``Σ_{t,s} [r_t = r_s] ⟨g_t, g_s⟩``; other parameters (biases, norm scales) their exact
    per-example gradients. No ``B × P`` array is built.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      method: ``"auto"`` (fast, exact) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.
      strict: if True, raise when a parameter leaf that is neither a vector nor small takes
        the exact fallback (a per-example copy); :func:`jaxgrad.fast.plan` shows the routes.

    Units: with ``units=`` (an int array ``(B,)`` given at call time, ids in ``[0, B)``) rows
    with the same id form a unit (a user's rows, an example's augmentations) and every row gets
    its unit's norm ``‖Σ_{j∈u(i)} ∇S_j‖`` (per row, so the shape stays ``(B,)`` and no number
    of units needs to be static; padded rows belong to no unit and get 0). A unit is a
    sequence of rows — ``Σ_{j∈u} A_jᵀ G_j = A_uᵀ G_u`` — so its squared norm is
    ``⟨A_u A_uᵀ, G_u G_uᵀ⟩ = Σ_{j,k∈u} ⟨∇S_j, ∇S_k⟩``: the sum of :func:`gradient_gram` over the
    unit's pairs, computed from the same factors (no ``B × P`` array). With ``chunk_size``
    the Gram matrix is built block by block (see :func:`gradient_gram`). A one-row unit's
    norm is the example's; where a unit's rows' gradients (or one row's positions) nearly
    cancel, the Gram sum keeps only rounding, and every unit's gradient is formed by a
    weighted pass instead, one per row (docs/fast-path.md, "Inner products, Gram matrices
    and unit norms").

    Returns:
      ``f(params, batch, mask=None, *args, units=None) -> norms`` of shape ``(B,)``; padded
      rows are 0.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import per_example_norms
      >>> loss = lambda w, ex: jnp.dot(ex, w)  # gradient of example i is x_i
      >>> x = jnp.array([[3.0, 4.0], [0.0, 1.0]])
      >>> per_example_norms(loss)(jnp.ones(2), x).tolist()
      [5.0, 1.0]
      >>> per_example_norms(loss)(jnp.ones(2), x, units=jnp.array([0, 0])).tolist()  # ‖(3, 5)‖²=34
      [5.830951894845301, 5.830951894845301]
    """
    get = passes.get_pass(method, strict)
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn, units=None):
        if units is not None:
            return _unit_norms(get, loss_fn, params, batch, mask, units, chunk_size)[0]

        def body(b, m):
            parts = get(loss_fn, params, b, m)
            return jnp.sqrt(jnp.maximum(parts.norm_sq, 0)), ()

        return passes.run_chunked(body, batch, mask, chunk_size)[0]

    strategy = _wrap(
        core, loss_fn, name="per_example_norms", doc=per_example_norms.__doc__, keywords=("units",)
    )
    return _with_checked(strategy, "units", _units_given)


def _with_checked(strategy, keyword: str, check):
    """``strategy`` with its call-time keyword ``keyword=`` checked first (against the
    call's ``params`` and ``batch``, before the strategy's own checks and its trace).

    Args:
      strategy: a strategy from :func:`_wrap` that takes ``keyword``.
      keyword: the keyword's name.
      check: ``check(value, params, batch) -> value`` (``value`` None where it is not
        given), raising an error that names the argument.

    Returns:
      ``f(params, batch, mask=None, *args, keyword=None)``, named and documented as
      ``strategy``.
    """

    def f(params, batch, mask=None, *args, **kw):
        kw[keyword] = check(kw.get(keyword), params, batch)
        return strategy(params, batch, mask, *args, **kw)

    f.__name__ = f.__qualname__ = strategy.__name__
    f.__doc__ = strategy.__doc__
    plain = inspect.signature(lambda params, batch, mask=None, *args: None).parameters
    named = inspect.Parameter(keyword, inspect.Parameter.KEYWORD_ONLY, default=None)
    f.__signature__ = inspect.Signature([*plain.values(), named])
    return f


def _units_given(units, params, batch):
    """``units=`` checked against the batch (:func:`check_units`), where given."""
    return None if units is None else check_units(units, reduce.batch_size(batch))


def per_example_dots(loss_fn, *, method: str = "auto", chunk_size: int | None = None):
    """Every example's gradient dotted with a reference gradient, ``⟨∇S_i, v⟩``.

    ``v`` is any pytree shaped like ``params`` (a validation-set gradient, an update
    direction). The inner product is a directional derivative,

    .. math::

        \\langle \\nabla S_i(\\theta), v \\rangle
            = \\frac{d}{d\\varepsilon} S_i(\\theta + \\varepsilon v) \\Big|_{\\varepsilon = 0},

    so by default it is computed in **forward mode**: ``jax.jvp`` of the per-example loss sums
    along ``v``, one batched forward pass carrying a tangent — no backward pass, no kept
    activations, no per-example gradient — exact for every loss forward mode can
    differentiate, whatever route the fast path would give its parameters (the exact
    fallback's leaves, weights a scan iterates over, a ``while_loop``, which reverse mode
    cannot take at all). It costs about what one gradient does: the tangent of ``x W`` is
    ``dx W + x dW``, two products per use where the backward pass has ``dx`` and ``dW``.

    A ``custom_vjp`` function has no forward-mode rule: a loss that calls one (at any depth)
    takes the **factored** route, the fast pass; so does a loss with a convolution of an
    input with fewer than :data:`jaxgrad.fast.linear.DOT_OFFSET_CHANNELS` channels (a grey or
    RGB image), where forward mode would run XLA:CPU's slow few-channel convolution a second
    time for its tangent ``conv(x, V)`` (see :func:`jaxgrad.fast.plan.dots_route`). On the
    factored route a use ``s = op(A, W)`` linear in ``W``
    contributes ``⟨∇_W S_i, V⟩ = ⟨G_i, op(A_i, V)⟩`` — the use's forward operation once more
    with ``V`` for ``W``; for a dense use with kept operands ``A_i`` (``T × d``) and
    cotangents ``G_i`` (``T × p``) that is ``Σ_t a_{i,t}ᵀ V g_{i,t}``, one more matmul and no
    ``B × P`` array (:func:`jaxgrad.fast.linear.dot`; a few-channel convolution by kernel
    offsets); parameters on the exact fallback dot
    their per-example gradients with ``v``. Since the result is linear in each ``∇S_i``, tied
    uses need no cross terms: their dots add. :func:`jaxgrad.fast.plan` says which route a
    loss takes (:attr:`jaxgrad.fast.Plan.dots`).

    Each leaf of ``v`` is cast to its parameter's dtype (the dtype of ``∇S_i``). Padded rows
    are 0, even where their loss is not finite.

    Args:
      loss_fn: ``loss_fn(params, example, *args) -> scalar | (loss_sum, n_items)``.
      method: ``"auto"`` (forward mode, or the factored route where forward mode cannot
        differentiate the loss or would be slower; exact either way), ``"factored"`` (the
        factored route
        always, to compare the two) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.

    Returns:
      ``f(params, batch, mask=None, *args, reference=v) -> dots`` of shape ``(B,)``; padded
      rows are 0.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import per_example_dots
      >>> loss = lambda w, ex: jnp.dot(ex, w)  # gradient of example i is x_i
      >>> f = per_example_dots(loss)
      >>> v = jnp.array([1.0, -1.0])
      >>> f(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 1.0]]), reference=v).tolist()
      [-1.0, -1.0]
    """
    dots = passes.get_dots(method)
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn, reference=None):
        v = jax.tree_util.tree_leaves(reference)

        def body(b, m):
            return dots(loss_fn, params, b, m, v), ()

        return passes.run_chunked(body, batch, mask, chunk_size)[0]

    strategy = _wrap(
        core,
        loss_fn,
        name="per_example_dots",
        doc=per_example_dots.__doc__,
        keywords=("reference",),
    )
    return _with_checked(strategy, "reference", lambda v, params, _: check_reference(v, params))


def gradient_gram(loss_fn, *, method: str = "auto", chunk_size: int | None = None):
    """The Gram matrix of the per-example gradients, ``K_{ij} = ⟨∇S_i, ∇S_j⟩``.

    Its diagonal is :func:`per_example_norms` squared. On the fast path every use adds its
    pairwise block, read off the same factors and by the same route as its norm
    (:func:`jaxgrad.fast.rules.gram`): ``Σ_{t,s} ⟨a_{i,t}, a_{j,s}⟩⟨g_{i,t}, g_{j,s}⟩ =
    ⟨A_i A_jᵀ, G_i G_jᵀ⟩`` for a dense use (``(a_i·a_j)(g_i·g_j)`` without a sequence axis),
    or the inner products of the formed ``K × N`` per-example gradients where that is cheaper
    by shape; ``Σ_{t,s} [r_{i,t} = r_{j,s}] ⟨g_{i,t}, g_{j,s}⟩`` for an embedding lookup; the
    cross terms between tied uses (:func:`jaxgrad.fast.norms.cross_gram`); the per-example
    gradients of convolutions and of the exact fallback's leaves. The pairwise forms hold
    ``B² T²`` entries a batch of rows at a time, never a ``B × P`` array.

    With ``chunk_size = c`` the ``K = ⌈B / c⌉`` chunks' blocks are computed pairwise, which
    runs ``K + K²`` passes of ``c`` examples (two chunks' activations live at a time).

    Args:
      loss_fn: ``loss_fn(params, example, *args) -> scalar | (loss_sum, n_items)``.
      method: ``"auto"`` (fast, exact) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.

    Returns:
      ``f(params, batch, mask=None, *args) -> K`` of shape ``(B, B)``, symmetric; padded rows
      and columns are 0.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import gradient_gram
      >>> loss = lambda w, ex: jnp.dot(ex, w)
      >>> gradient_gram(loss)(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 1.0]])).tolist()
      [[25.0, 4.0], [4.0, 1.0]]
    """
    get = passes.get_pass(method)
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn):
        gram = _gram(get, loss_fn, params, batch, mask, chunk_size)[0]
        return jnp.where(mask[:, None] & mask[None, :], gram, 0)

    return _wrap(core, loss_fn, name="gradient_gram", doc=gradient_gram.__doc__)


class GradientDiversity(NamedTuple):
    """How much the per-example gradients of a batch agree (see :func:`gradient_diversity`).

    Attributes:
      diversity: ``Δ = Σ_i m_i ‖g_i‖² / ‖Σ_i m_i g_i‖²`` (Yin et al. 2018).
      mean_cosine: the mean of ``cos(g_i, g_j)`` over the ordered pairs ``i ≠ j`` of real
        examples with nonzero gradients.
      cosine: ``(B, B)`` cosine similarities ``⟨g_i, g_j⟩ / (‖g_i‖ ‖g_j‖)``; 0 where padded or
        where a gradient is zero.
      num_examples: ``b = Σ_i m_i``.
    """

    diversity: jax.Array
    mean_cosine: jax.Array
    cosine: jax.Array
    num_examples: jax.Array


def gradient_diversity(loss_fn, *, method: str = "auto", chunk_size: int | None = None):
    """Gradient diversity and pairwise cosine similarity of a batch, from :func:`gradient_gram`.

    With ``b`` real examples, per-example gradients ``g_i = ∇S_i`` and their Gram matrix
    ``K_{ij} = ⟨g_i, g_j⟩`` (padded rows left out),

    .. math::

        \\Delta = \\frac{\\sum_i \\lVert g_i \\rVert^2}{\\lVert \\sum_i g_i \\rVert^2}
            = \\frac{\\operatorname{tr} K}{\\mathbf 1^\\top K \\mathbf 1},
        \\qquad
        \\overline{\\cos} = \\frac{1}{|P|} \\sum_{(i, j) \\in P}
            \\frac{K_{ij}}{\\sqrt{K_{ii} K_{jj}}},

    where ``P`` is the set of ordered pairs ``i ≠ j`` of real examples whose gradients are
    nonzero. ``Δ`` is the gradient diversity of Yin et al. (2018), "Gradient Diversity: a Key
    Ingredient for Scalable Distributed Learning": always ``Δ ≥ 1/b`` (Cauchy–Schwarz), with
    ``Δ = 1/b`` when the gradients are equal, ``Δ = 1`` when they are orthogonal, and ``Δ``
    large when they cancel. Yin et al. show that minibatch SGD with batches of up to about
    ``n Δ`` (``Δ`` of all ``n`` training examples) needs no more passes over the data than
    batch size 1. The two are tied: ``1/Δ = 1 + Σ_{i≠j} K_{ij} / Σ_i K_{ii}``. ``Δ`` is
    ``inf`` when the gradients sum to zero, NaN with no real example (or all gradients 0);
    ``mean_cosine`` is NaN with no pair. No ``B × P`` array is formed on the fast path (see
    :func:`gradient_gram`).

    Args:
      loss_fn: ``loss_fn(params, example, *args) -> scalar | (loss_sum, n_items)``.
      method: ``"auto"`` (fast, exact) or ``"vmap"`` (materialised reference).
      chunk_size: if set, the Gram matrix is built that many examples at a time (see
        :func:`gradient_gram`).

    Returns:
      ``f(params, batch, mask=None, *args) -> GradientDiversity``.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import gradient_diversity
      >>> loss = lambda w, ex: jnp.dot(ex, w)  # gradient of example i is x_i
      >>> d = gradient_diversity(loss)(jnp.ones(2), jnp.array([[1.0, 0.0], [0.0, 2.0]]))
      >>> float(d.diversity), float(d.mean_cosine)  # orthogonal: (1 + 4) / ‖(1, 2)‖² = 1
      (1.0, 0.0)
    """
    get = passes.get_pass(method)
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn):
        gram = _gram(get, loss_fn, params, batch, mask, chunk_size)[0]
        pair = mask[:, None] & mask[None, :]
        gram = jnp.where(pair, gram, 0)  # selected, not multiplied: padding never leaks
        sq = jnp.maximum(jnp.diagonal(gram), 0)
        nonzero = sq > 0
        scale = jnp.where(nonzero, jax.lax.rsqrt(jnp.where(nonzero, sq, 1)), 0)
        cosine = gram * scale[:, None] * scale[None, :]
        pairs = pair & nonzero[:, None] & nonzero[None, :] & ~jnp.eye(mask.shape[0], dtype=bool)
        count = jnp.sum(pairs)
        mean_cosine = jnp.where(
            count > 0, jnp.sum(jnp.where(pairs, cosine, 0)) / jnp.maximum(count, 1), jnp.nan
        )
        return GradientDiversity(
            diversity=jnp.sum(sq) / jnp.sum(gram),
            mean_cosine=mean_cosine,
            cosine=cosine,
            num_examples=jnp.sum(mask).astype(gram.dtype),
        )

    return _wrap(core, loss_fn, name="gradient_diversity", doc=gradient_diversity.__doc__)


def clip_factors(norms, l2_clip):
    """``min(1, C / ‖g_i‖)``, and 1 for a zero gradient (``l2_clip`` broadcasts with ``norms``)."""
    big = norms > l2_clip
    return jnp.where(big, l2_clip / jnp.where(big, norms, 1), 1).astype(norms.dtype)


def check_l2_clip(l2_clip, *, name: str = "l2_clip"):
    """``l2_clip`` checked: a positive number (flat clipping), or a pytree of them (per group).

    A pytree (a dict, list, tuple, ...; even with one leaf) is a *prefix* of the params: each
    of its leaves ``C_g`` is the clip norm of the group of parameter leaves below it (see
    :func:`clip_groups`). Returns a float, or the pytree with its leaves as floats.
    """
    leaves, treedef = jax.tree_util.tree_flatten(l2_clip)
    if l2_clip is None or (treedef.num_nodes == 1 and treedef.num_leaves == 1):  # a number
        return reduce.check_positive_float(l2_clip, name=name)
    if not leaves:
        raise ValueError(
            f"`{name}` must be a positive finite number, or a pytree of them (a prefix of the "
            f"params, one clip norm per group); got an empty pytree {l2_clip!r}"
        )
    checked = [
        reduce.check_positive_float(c, name=f"{name} leaf {i}") for i, c in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, checked)


def clip_sensitivity(l2_clip, *, name: str = "l2_clip") -> float:
    """The L2 sensitivity of a clipped sum: ``C``, or ``√(Σ_g C_g²)`` for per-group clip norms.

    Each example's gradient restricted to group ``g`` is clipped to ``C_g``, so the whole
    clipped gradient has norm at most ``√(Σ_g C_g²)`` (groups are disjoint sets of leaves).

    Raises:
      ValueError: ``√(Σ_g C_g²)`` above the largest float64, naming ``name`` (a sum of
        squares would overflow from ``C_g ≈ 1.3e154``: ``math.hypot`` does not).
    """
    clip = check_l2_clip(l2_clip, name=name)
    if isinstance(clip, float):
        return clip
    leaves = jax.tree_util.tree_leaves(clip)
    sensitivity = math.hypot(*leaves)
    if not math.isfinite(sensitivity):
        raise ValueError(
            f"`{name}`'s per-group clip norms must have a finite L2 norm √(Σ_g C_g²) (the "
            f"clipped sum's sensitivity); got {len(leaves)} clip norms up to {max(leaves):g}, "
            f"whose norm overflows float64; expected a norm below {sys.float_info.max:g}"
        )
    return sensitivity


def clip_groups(l2_clip, params) -> tuple[list, np.ndarray]:
    """Per-group clipping of ``params``: the group of every leaf, and the clip norms ``C_g``.

    ``l2_clip`` (checked by :func:`check_l2_clip`, not a number) must be a pytree prefix of
    ``params``: its leaf ``g`` covers the parameter leaves of the subtree at the same place.

    Returns:
      ``(group, clips)``: ``group[j]`` the group of parameter leaf ``j`` (tree order), and
      ``clips`` the ``(G,)`` clip norms in ``l2_clip``'s leaf order.
    """
    clips = jax.tree_util.tree_leaves(l2_clip)
    try:
        counts = jax.tree_util.tree_leaves(
            jax.tree_util.tree_map(
                lambda _, sub: len(jax.tree_util.tree_leaves(sub)), l2_clip, params
            )
        )
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            "`l2_clip` must be a number or a pytree prefix of the params (e.g. "
            "{'layer1': 1.0, 'layer2': 0.5} for params {'layer1': ..., 'layer2': ...}); got "
            f"{jax.tree_util.tree_structure(l2_clip)} for params "
            f"{jax.tree_util.tree_structure(params)} ({e})"
        ) from None
    group = [g for g, n in enumerate(counts) for _ in range(n)]
    return group, np.asarray(clips)


def _group_factors(leaf_sq, group, clips):
    """``(B, L)`` weights: every leaf takes its group's ``min(1, C_g / ‖g_{i,g}‖)``.

    ``‖g_{i,g}‖² = Σ_{j∈g} ‖∇_j S_i‖²``, from the per-leaf squared norms of the pass.
    """
    cols = [[j for j, h in enumerate(group) if h == g] for g in range(len(clips))]
    zero = jnp.zeros(leaf_sq.shape[:1], leaf_sq.dtype)
    norms = jnp.sqrt(jnp.stack([sum((leaf_sq[:, j] for j in c), zero) for c in cols], axis=1))
    factors = clip_factors(norms, jnp.asarray(clips, norms.dtype))  # (B, G)
    return factors[:, np.asarray(group, int)]


NONFINITE = ("raise", "drop", "propagate")


def check_nonfinite(nonfinite):
    """The non-finite policy, checked: ``"raise"``, ``"drop"`` or ``"propagate"``."""
    return reduce.check_choice(nonfinite, NONFINITE, name="nonfinite")


def raise_nonfinite(bad, *, name: str, private: bool = False) -> None:
    """``nonfinite="raise"``'s host side: a ``FloatingPointError`` if any example was bad.

    ``bad`` is the per-example bool mask (rows are named) or, for a private step, a count (the
    rows of a private batch are never named). Under the caller's ``jax.jit`` ``bad`` is traced:
    nothing can be raised there, and the policy's result is NaN (see :func:`clipped_grad`).
    """
    if isinstance(bad, jax.core.Tracer):
        return
    if private:
        if int(bad):  # how many is private: not said
            raise FloatingPointError(
                f"{name}: an example of this batch has a non-finite (NaN or inf) loss or "
                "gradient, which no clipping can bound; check the data and the parameters, or "
                "pass nonfinite='drop' to leave such examples out"
            )
        return
    rows = np.flatnonzero(np.asarray(bad))
    if rows.size:
        raise FloatingPointError(
            f"{name}: {rows.size} of {bad.shape[0]} examples have a non-finite "
            f"loss or gradient norm (rows {rows[:5].tolist()}"
            f"{', ...' if rows.size > 5 else ''}), which no clipping can bound; check "
            "the inputs and parameters, or pass nonfinite='drop' to leave such examples "
            "out (or 'propagate' for a NaN result)"
        )


class ClippedParts(NamedTuple):
    """Everything one clipped reduction computes (see :func:`clipped_parts`).

    Attributes:
      loss: the unclipped loss, reduced as the gradient is.
      total: the clipped sum (``"sum"``) or mean (``"mean"``) of the kept examples.
      norms: ``(B,)`` unclipped per-example gradient norms (non-finite ones stay so).
      dropped: ``(B,)`` bool, real examples whose loss or gradient norm is not finite.
      num_kept: the number of real examples in ``total``.
    """

    loss: jax.Array
    total: PyTree
    norms: jax.Array
    dropped: jax.Array
    num_kept: jax.Array


def clipped_parts(
    loss_fn,
    *,
    l2_clip: float,
    reduction: str = "mean",
    nonfinite: str = "raise",
    method: str = "auto",
    chunk_size: int | None = None,
    strict: bool = False,
):
    """``f(params, batch, mask=None, *args) -> ClippedParts``: the one clipped reduction.

    What :func:`clipped_grad` and the DP-SGD step (:mod:`jaxgrad.privacy`) both run; the
    non-finite policy and its rules are :func:`clipped_grad`'s. Nothing is raised here
    (``"raise"`` gives the result of ``"propagate"``; the caller raises on ``dropped``).
    ``l2_clip`` is a number or a pytree prefix of the params (per-group clipping, see
    :func:`clipped_grad`); the policy is the same, on the whole gradient's norm.
    """
    l2_clip = check_l2_clip(l2_clip)
    grouped = not isinstance(l2_clip, float)
    reduce.check_choice(reduction, ("mean", "sum"), name="reduction")
    nonfinite = check_nonfinite(nonfinite)
    get = passes.get_pass(method, strict, weighted=True)
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn, units=None):
        given = None
        groups = clip_groups(l2_clip, params) if grouped else None
        if grouped and units is not None:
            raise ValueError(
                "per-group clipping (`l2_clip` a pytree) with `units=` is not supported: a "
                "unit's per-group norms are not computed; give a number `l2_clip` with units"
            )
        if units is not None:
            # Each row is clipped by its unit's norm: Σ_u c_u Σ_{i∈u} g_i = Σ_i c_{u(i)} g_i.
            # A unit is kept or dropped whole (a row with a non-finite loss spoils its unit).
            norms, sums = _unit_norms(get, loss_fn, params, batch, mask, units, chunk_size)
            bad = mask & ~(jnp.isfinite(norms) & jnp.isfinite(sums))
            same = (units[:, None] == units[None, :]) & mask[None, :]
            given = (norms, mask & jnp.any(same & bad[None, :], axis=1))

        def one(b, m, given=None):
            parts = get(loss_fn, params, b, m)
            if given is None:
                norms, spoilt = jnp.sqrt(parts.norm_sq), jnp.zeros_like(m)
            else:
                norms, spoilt = given
            ok = m & jnp.isfinite(norms) & jnp.isfinite(parts.sums) & ~spoilt
            # A real example whose gradient cannot be clipped (non-finite norm) weighs NaN, so
            # every leaf of the sum is NaN: a NaN norm would otherwise read as "not above the
            # clip" (factor 1) and add the finite leaves of that gradient unclipped, and an inf
            # one would weigh 0. (A finite gradient of a non-finite loss clips as usual.)
            finite = jnp.isfinite(norms)
            if groups is None:
                factors, col = clip_factors(norms, l2_clip), lambda x: x
            else:  # (B, L): each leaf weighs its group's own factor; a row's flag, every leaf's
                factors, col = _group_factors(parts.leaf_sq, *groups), lambda x: x[:, None]
            c = jnp.where(col(m), jnp.where(col(finite), factors, jnp.nan), 0)
            # (A spoilt row's gradient may be finite: it weighs NaN with its unit.)
            c = jnp.where(col(m & spoilt), jnp.nan, c)
            totals = (parts.weighted(c), jnp.sum(parts.counts), jnp.sum(parts.sums))
            return (norms, m & ~ok), totals

        def body(b, m, given=None):
            rows, totals = one(b, m, given)
            if nonfinite != "drop":
                return rows, (*totals, jnp.sum(m))
            ok = m & ~rows[1]

            def again():  # the kept rows only; dropped ones become copies of a kept row
                _, kept = one(reduce.fill_padding(b, ok), ok, given)
                return jax.tree_util.tree_map(lambda t: jnp.where(jnp.any(ok), t, 0), kept)

            totals = jax.lax.cond(jnp.any(rows[1]), again, lambda: totals)
            return rows, (*totals, jnp.sum(ok))

        if given is None:
            run = passes.run_chunked(body, batch, mask, chunk_size)
        else:  # the unit norms ride along with the rows they belong to
            run = passes.run_chunked(
                lambda bg, m: body(bg[0], m, bg[1]), (batch, given), mask, chunk_size
            )
        (norms, bad), (total, count, loss, kept) = run
        if reduction == "mean":
            total, loss = reduce.safe_divide((total, loss), count)
        # The all-dropped rule: the kept examples are reduced as any examples are, so an empty
        # sum is 0 and an empty mean is NaN (a mean of nothing), never a silent 0. Parameters
        # that are not finite make every example bad: the result is NaN whatever the policy
        # (they are public, so saying so reveals nothing about the examples).
        # (With no row kept at all the result is set, not computed: a filler row copied into
        # an all-padding batch may be NaN, and 0 × NaN would leak it.)
        none = kept == 0
        nan = (none & jnp.any(mask) & (reduction == "mean")) | ~reduce.all_finite(params)
        total, loss = jax.tree_util.tree_map(
            lambda t: jnp.where(nan, jnp.nan, jnp.where(none, 0, t)).astype(t.dtype), (total, loss)
        )
        return ClippedParts(loss, total, norms, bad, kept.astype(jnp.int32))

    strategy = _wrap(
        core, loss_fn, name="clipped_grad", doc=clipped_parts.__doc__, keywords=("units",)
    )
    return _with_checked(strategy, "units", _units_given)


def clipped_grad(
    loss_fn,
    *,
    l2_clip: float,
    reduction: str = "mean",
    return_norms: bool = False,
    return_loss: bool = False,
    nonfinite: str = "raise",
    method: str = "auto",
    chunk_size: int | None = None,
    strict: bool = False,
):
    """The sum or mean of per-example gradients, each clipped to L2 norm ``l2_clip`` (DP-SGD).

    .. math::

        \\bar g = \\frac{1}{\\sum_i m_i n_i} \\sum_i m_i \\, g_i \\min(1, C / \\lVert g_i \\rVert)

    ``reduction="mean"`` divides by the number of real *items* ``Σ_i m_i n_i`` (examples for a
    scalar loss, real tokens for a ``(sum, count)`` token loss), so that with a large clip it
    equals :func:`jaxgrad.batch_grad`; ``"sum"`` returns the clipped sum (DP-SGD implementations
    that divide by the expected batch size add their noise to this and divide themselves).
    The norms are those of the gradient of each example's loss *sum*.

    On the fast path the clipped sum of a dense use is ``Aᵀ diag(c) G`` — the weight-gradient
    matmul of an ordinary backward pass, reweighted — so no per-example gradient is formed.

    Non-finite examples: clipping bounds each example's influence, but an example whose loss
    or gradient norm is NaN or inf cannot be scaled to norm ``C`` (``0 × inf`` is NaN), so it
    would make the whole result NaN. ``nonfinite`` says what happens instead:

    * ``"raise"`` (default): a ``FloatingPointError`` naming the examples, when ``f`` is called
      eagerly; under the caller's own ``jax.jit`` nothing can be raised and the result is NaN,
      as with ``"propagate"``;
    * ``"drop"``: such examples are treated as padding — left out of the sum and of the item
      count — and the rest is exact; their norms (``return_norms=True``) stay non-finite, so
      ``jnp.sum(~jnp.isfinite(norms))`` counts them. If every real example is dropped, the
      kept examples are reduced as any are: an empty mean is NaN (never a silent 0) and an
      empty sum is 0. (Costs a second pass, only when something was dropped.)
    * ``"propagate"``: the result is NaN.

    Units: with ``units=`` (an int array ``(B,)`` at call time, ids in ``[0, B)``; see
    :func:`per_example_norms`) each unit's *summed* gradient is clipped once, as user-level
    DP and augmentation multiplicity need: ``Σ_u min(1, C/‖Σ_{i∈u} g_i‖) Σ_{i∈u} g_i``, which is
    the reweighted sum ``Σ_i c_{u(i)} g_i`` (one weight per row, the same backward pass). The
    norms returned are the units' (per row). A unit is kept or dropped whole: under
    ``"drop"``, a row with a non-finite loss or unit norm drops every row of its unit.

    Per-group (per-layer) clipping: ``l2_clip`` may be a pytree *prefix* of the params, e.g.
    ``{"layer1": 1.0, "layer2": 0.5}`` (or one number per leaf, a tree like the params'). Each
    group ``g`` (the parameter leaves under one of its leaves) is clipped to its own ``C_g`` by
    its own norm, read off the pass's per-leaf squared norms (tied uses' cross terms included):

    .. math::

        \\sum_i m_i \\, g_{i,g} \\min(1, C_g / \\lVert g_{i,g} \\rVert) \\quad \\text{for every
        group } g, \\qquad \\Delta_2 = \\sqrt{\\textstyle\\sum_g C_g^2}

    The non-finite policy is the same, on the whole gradient's norm (a non-finite group makes
    the row non-finite); ``return_norms`` gives the whole gradient's norms. Not with ``units=``.

    The same policy, with the same rules, serves the DP-SGD step (:mod:`jaxgrad.privacy`).
    Parameters that are not finite make the result NaN under every policy: every example's
    gradient is then meaningless, and a sum of nothing would read as a real (zero) gradient.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      l2_clip: the clipping norm ``C > 0``, or a pytree prefix of the params of clip norms
        ``C_g > 0`` (per-group clipping, see above).
      reduction: ``"mean"`` or ``"sum"``.
      return_norms: if True, the unclipped per-example norms are returned last.
      return_loss: if True, the (unclipped) loss is returned first, reduced as the gradient
        is: ``Σ_i m_i S_i / Σ_i m_i n_i`` for ``"mean"``, ``Σ_i m_i S_i`` for ``"sum"``.
      nonfinite: ``"raise"``, ``"drop"`` or ``"propagate"`` (see above).
      method: ``"auto"`` (fast, exact) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.
      strict: if True, raise when a parameter leaf that is neither a vector nor small takes
        the exact fallback (a per-example copy); :func:`jaxgrad.fast.plan` shows the routes.

    Returns:
      ``f(params, batch, mask=None, *args, units=None) -> grads``; ``(loss, grads)`` with
      ``return_loss``, ``(grads, norms)`` with ``return_norms``, ``(loss, grads, norms)`` with
      both.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import clipped_grad
      >>> loss = lambda w, ex: jnp.dot(ex, w)
      >>> f = clipped_grad(loss, l2_clip=1.0, reduction="sum")
      >>> g = f(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 0.5]]))  # [0.6, 0.8] + [0, 0.5]
      >>> [round(float(v), 6) for v in g]
      [0.6, 1.3]
      >>> two = lambda p, ex: jnp.dot(ex, p["a"]) + jnp.dot(ex, p["b"])  # per-layer: C_a, C_b
      >>> f = clipped_grad(two, l2_clip={"a": 1.0, "b": 2.0}, reduction="sum")
      >>> g = f({"a": jnp.ones(2), "b": jnp.ones(2)}, jnp.array([[3.0, 4.0]]))
      >>> [round(float(v), 6) for v in g["a"]], [round(float(v), 6) for v in g["b"]]
      ([0.6, 0.8], [1.2, 1.6])
    """
    parts = clipped_parts(
        loss_fn,
        l2_clip=l2_clip,
        reduction=reduction,
        nonfinite=nonfinite,
        method=method,
        chunk_size=chunk_size,
        strict=strict,
    )
    return_norms = reduce.check_flag(return_norms, name="return_norms")
    return_loss = reduce.check_flag(return_loss, name="return_loss")

    def f(params, batch, mask=None, *args, units=None):
        loss, grads, norms, bad, _ = parts(params, batch, mask, *args, units=units)
        if nonfinite == "raise":
            raise_nonfinite(bad, name="clipped_grad")
        out = (grads,)
        if return_loss:
            out = (loss, *out)
        if return_norms:
            out = (*out, norms)
        return out[0] if len(out) == 1 else out

    f.__name__ = f.__qualname__ = "clipped_grad"
    f.__doc__ = clipped_grad.__doc__
    return f


class GradStats(NamedTuple):
    """Statistics of the per-example gradients ``g_i = ∇S_i`` of one batch (see :func:`grad_stats`).

    Attributes:
      mean: ``Σ_i m_i g_i / Σ_i m_i n_i``, the gradient of the mean loss (= ``batch_grad``).
      loss: the mean loss ``Σ_i m_i S_i / Σ_i m_i n_i``.
      norms: ``(B,)`` per-example gradient norms ``‖g_i‖`` (0 where padded).
      num_examples: ``b = Σ_i m_i``, the number of real examples.
      trace_cov: ``tr Σ``, the unbiased trace of the per-example gradient covariance.
      grad_sq_norm: ``|G|²``, the unbiased estimate of the squared norm of the true gradient.
      noise_scale: ``B_simple = tr Σ / |G|²`` (McCandlish et al., 2018).
      snr: ``|G|² / (tr Σ / b) = b / B_simple``, signal over the variance of the batch mean.
    """

    mean: PyTree
    loss: jax.Array
    norms: jax.Array
    num_examples: jax.Array
    trace_cov: jax.Array
    grad_sq_norm: jax.Array
    noise_scale: jax.Array
    snr: jax.Array


def grad_stats(
    loss_fn, *, method: str = "auto", chunk_size: int | None = None, strict: bool = False
):
    """Mean gradient, per-example norms, gradient covariance trace and noise scale in one pass.

    With ``b = Σ_i m_i`` real examples, per-example gradients ``g_i = ∇S_i`` and their mean
    ``ḡ = (1/b) Σ_i m_i g_i``:

    .. math::

        \\operatorname{tr}\\Sigma = \\frac{1}{b-1} \\sum_i m_i \\lVert g_i - \\bar g \\rVert^2
            = \\frac{\\sum_i m_i \\lVert g_i \\rVert^2 - b \\lVert \\bar g \\rVert^2}{b - 1},
        \\qquad
        |G|^2 = \\lVert \\bar g \\rVert^2 - \\frac{\\operatorname{tr}\\Sigma}{b},

    both unbiased (``E‖ḡ‖² = |G|² + tr Σ / b``), and the simple noise scale of McCandlish et
    al. (2018), "An Empirical Model of Large-Batch Training", ``B_simple = tr Σ / |G|²``, and
    ``snr = |G|² / (tr Σ / b) = b / B_simple``. With ``b < 2`` the covariance is undefined and
    the statistics are NaN; ``|G|²`` (so ``B_simple``) may be negative when noise dominates.
    The per-example gradients are those of each example's loss *sum*, so for a token loss the
    statistics are per sequence; ``mean`` is still divided by the item count, as
    :func:`jaxgrad.batch_grad` is. ``tr Σ`` is computed from ``Σ‖g_i‖²`` and ``‖ḡ‖²``: in float32
    it loses precision when the noise is tiny compared with the mean.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      method: ``"auto"`` (fast, exact) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.
      strict: if True, raise when a parameter leaf that is neither a vector nor small takes
        the exact fallback (a per-example copy); :func:`jaxgrad.fast.plan` shows the routes.

    Returns:
      ``f(params, batch, mask=None) -> GradStats``.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import grad_stats
      >>> loss = lambda w, ex: jnp.dot(ex, w)
      >>> s = grad_stats(loss)(jnp.ones(1), jnp.array([[1.0], [3.0]]))
      >>> float(s.trace_cov), float(s.grad_sq_norm)  # var(1, 3) = 2; 2² − 2/2 = 3
      (2.0, 3.0)
    """
    get = passes.get_pass(method, strict, weighted=True)
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn):
        def body(b, m):
            parts = get(loss_fn, params, b, m)
            ones = m.astype(parts.sums.dtype)
            totals = (parts.weighted(ones), jnp.sum(parts.sums), jnp.sum(parts.counts))
            return parts.norm_sq, totals

        norm_sq, (grad_sum, loss_sum, count) = passes.run_chunked(body, batch, mask, chunk_size)
        dtype = norm_sq.dtype
        b = jnp.sum(mask).astype(dtype)
        sum_sq = sum(jnp.sum(g.astype(dtype) ** 2) for g in jax.tree_util.tree_leaves(grad_sum))
        mean_sq = sum_sq / b**2  # ‖ḡ‖²
        trace_cov = (jnp.sum(norm_sq) - b * mean_sq) / (b - 1)
        trace_cov = jnp.where(b > 1, trace_cov, jnp.nan)
        grad_sq_norm = mean_sq - trace_cov / b
        return GradStats(
            mean=reduce.safe_divide(grad_sum, count),
            loss=reduce.safe_divide(loss_sum, count),
            norms=jnp.sqrt(norm_sq),
            num_examples=b,
            trace_cov=trace_cov,
            grad_sq_norm=grad_sq_norm,
            noise_scale=trace_cov / grad_sq_norm,
            snr=grad_sq_norm * b / trace_cov,
        )

    return _wrap(core, loss_fn, name="grad_stats", doc=grad_stats.__doc__)


class GradMoments(NamedTuple):
    """Sums over the real examples of a batch, from materialised per-example gradients.

    Attributes:
      grad_sum: ``Σ_i m_i g_i``.
      grad_sq_sum: ``Σ_i m_i g_i ⊙ g_i`` (elementwise squares; the diagonal second moment).
      norms: ``(B,)`` per-example norms ``‖g_i‖`` (0 where padded).
      loss_sum: ``Σ_i m_i S_i``.
      count: ``Σ_i m_i n_i``.
    """

    grad_sum: PyTree
    grad_sq_sum: PyTree
    norms: jax.Array
    loss_sum: jax.Array
    count: jax.Array


def per_example_moments(loss_fn, *, chunk_size: int | None = None):
    """Sum, elementwise sum of squares and norms of per-example gradients, chunk by chunk.

    The exact ``vmap(grad)`` path, reduced as it goes: with ``chunk_size`` only one chunk's
    per-example gradients (``chunk_size × P``) exist at a time; the batch need not divide
    evenly (the remainder is its own, smaller chunk). The elementwise variance of the
    gradients is ``grad_sq_sum / b − (grad_sum / b)²`` for ``b`` real examples.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      chunk_size: examples per chunk (all at once when None).

    Returns:
      ``f(params, batch, mask=None) -> GradMoments``.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.fast import per_example_moments
      >>> loss = lambda w, ex: jnp.dot(ex, w)
      >>> m = per_example_moments(loss, chunk_size=2)(jnp.ones(1), jnp.arange(5.0)[:, None])
      >>> m.grad_sum.tolist(), m.grad_sq_sum.tolist()  # 0+1+2+3+4, 0+1+4+9+16
      ([10.0], [30.0])
    """
    chunk_size = _check_chunk(chunk_size)

    def core(params, batch, mask, loss_fn=loss_fn):
        def body(b, m):
            sums, counts, grads = _per_example(loss_fn, params, b, m, None)  # rows masked
            norm_sq = reduce.row_sq_norms(grads)
            totals = (
                jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), grads),
                jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), grads),
                jnp.sum(sums),
                jnp.sum(counts),
            )
            return jnp.sqrt(norm_sq), totals

        norms, (g_sum, g_sq, loss_sum, count) = passes.run_chunked(body, batch, mask, chunk_size)
        return GradMoments(g_sum, g_sq, norms, loss_sum, count)

    return _wrap(core, loss_fn, name="per_example_moments", doc=per_example_moments.__doc__)
