"""Gradient strategies that are exact: every one equals the gradient of the global mean loss.

Differentiation is linear, so for per-example losses ``l_i`` with item counts ``n_i``

.. math::

    \\nabla \\frac{\\sum_i S_i(\\theta)}{\\sum_i n_i}
    = \\frac{\\sum_i \\nabla S_i(\\theta)}{\\sum_i n_i}

whatever order the sums are taken in: one batch, per example, or microbatch by microbatch.
Each factory takes ``loss_fn(params, example) -> scalar | (loss_sum, n_items)`` and returns a
jit-compiled ``f(params, batch, mask=None) -> GradResult`` (the gradient, the loss, the item
count and, where formed, per-example norms); ``batch`` is the example pytree with a leading
axis and ``mask`` a boolean vector over that axis (False = padding).

Extra loss arguments: ``f(params, batch, mask, *args)`` calls ``loss_fn(params, example, *args)``
for every example, with the same ``args`` (a step number, a base PRNG key from which each example
draws its own by ``jax.random.fold_in`` of an id kept in the batch).

Non-finite values and non-trainable leaves: every leaf of ``params`` is differentiated, so all
must be floating point — an integer counter, PRNG key or empty ``params`` is an error naming the
leaf (split the model first: ``eqx.partition``, ``nnx.split``). A NaN or inf loss of a real
example makes the result NaN, never a silent number; so does a ``(loss_sum, n_items)`` pair whose
count is negative, NaN or inf, or 0 with a nonzero sum. A batch with no real item gives 0.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import _loops, keys, reduce, sharding

PyTree = Any


class GradResult(NamedTuple):
    """What every gradient strategy returns: the gradient and the numbers it came with.

    Each strategy reduces a batch of per-example losses ``(S_i, n_i)`` under a padding mask
    ``m_i``; the fields say what it reduced to. Being a NamedTuple it is a pytree: it passes
    through ``jax.jit`` and unpacks as ``grads, loss, count, norms = f(params, batch)``.

    Attributes:
      grads: the gradient, a pytree shaped like ``params``
        (:func:`per_example_grads`: every leaf with a leading batch axis ``B``).
      loss: the loss whose gradient ``grads`` is, as the strategy defines it: for the exact
        strategies the global mean loss ``Σ_i m_i S_i / Σ_i m_i n_i``; for
        :mod:`jaxgrad.naive` the loss it differentiates (at the mean input, or the mean of
        the microbatch means); for :func:`per_example_grads` every example's loss sum
        ``m_i S_i``, shape ``(B,)``.
      count: the number of real items the mean weights: ``Σ_i m_i n_i`` (examples, or tokens
        for a ``(loss_sum, n_items)`` loss); :func:`per_example_grads`: ``m_i n_i`` per
        example, shape ``(B,)``; :func:`jaxgrad.naive.grad_at_mean_input`: the number of real
        examples averaged, ``Σ_i m_i``.
      norms: every example's gradient L2 norm ``‖∇S_i‖``, shape ``(B,)`` (0 for padding), from
        the strategies that materialise per-example gradients (:func:`per_example_grads`,
        :func:`mean_of_per_example_grads`); ``None`` for the others, which never form them.

    Example::

      >>> import jax.numpy as jnp, jaxgrad
      >>> loss = lambda p, ex: (p * ex[0] - ex[1]) ** 2
      >>> out = jaxgrad.mean_of_per_example_grads(loss)(2.0, (jnp.array([1.0, 2.0]), jnp.ones(2)))
      >>> float(out.grads), float(out.loss), float(out.count), out.norms.tolist()
      (7.0, 5.0, 2.0, [2.0, 12.0])
    """

    grads: PyTree
    loss: jax.Array
    count: jax.Array
    norms: jax.Array | None = None


def _row_norms(grads) -> jax.Array:
    """``‖g_i‖₂`` for every row ``i`` of a pytree of per-example gradients (complex: modulus)."""
    real = jax.tree_util.tree_map(lambda g: jnp.abs(g) if jnp.iscomplexobj(g) else g, grads)
    return jnp.sqrt(reduce.row_sq_norms(real))


def _values_are_concrete(tree) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def validate_concrete(validate, batch, mask=None) -> None:
    """``validate(batch, mask)`` (a loss's own check, :func:`jaxgrad.losses.supervised`: labels
    in range; None: nothing), on concrete batches only, piece by piece for a sharded one
    (never gathered). Under a caller's ``jax.jit`` the values are traced: nothing is checked."""
    if validate is not None and _values_are_concrete(batch):
        for piece, piece_mask, rows in _local_pieces(batch, mask):
            with reduce.batch_rows(rows):  # an error names the row in `batch`, not in the piece
                validate(piece, piece_mask)


def _local_pieces(batch, mask):
    """``(batch, mask, rows)`` as host pieces to validate, without gathering a sharded batch
    (``rows``: the piece's rows in ``batch``; None for the whole batch).

    A batch whose leaves sit on one device (or are numpy) is one piece. A batch spread over
    devices (``jax.Array`` s sharded along the leading axis) gives one piece per distinct
    block of rows held by this process's devices, read from those devices only, so a
    multi-process batch is checked by every process on its own rows.
    """
    leaves = jax.tree_util.tree_leaves(batch)
    sharded = [x for x in leaves if isinstance(x, jax.Array) and not x.is_fully_replicated]
    if not sharded:
        size = reduce.batch_size(batch)
        return [(batch, np.ones((size,), bool) if mask is None else mask, None)]
    size = leaves[0].shape[0]
    blocks = {}
    for shard in sharded[0].addressable_shards:
        rows = range(size)[shard.index[0] if shard.index else slice(None)]
        blocks.setdefault((rows.start, rows.stop), shard.device)

    def host(x):  # typed PRNG keys (per-example dropout keys) have no numpy form: kept as is
        return x if keys.is_typed_key(x) else np.asarray(x)

    def rows_of(x, device, start, stop):
        if not isinstance(x, jax.Array) or (x.is_fully_addressable and x.is_fully_replicated):
            return host(x)[start:stop]
        for shard in x.addressable_shards:
            if shard.device == device:
                here = range(x.shape[0])[shard.index[0] if shard.index else slice(None)]
                if here.start <= start and stop <= here.stop:
                    return host(shard.data)[start - here.start : stop - here.start]
        if x.is_fully_addressable:
            return host(x)[start:stop]
        raise ValueError(
            "`batch` and `mask` leaves must be sharded alike along the batch axis; got "
            f"{sharded[0].sharding} and {x.sharding}"
        )

    return [
        (
            jax.tree_util.tree_map(lambda x, d=d, a=a, b=b: rows_of(x, d, a, b), batch),
            np.ones((b - a,), bool) if mask is None else rows_of(mask, d, a, b),
            range(a, b),
        )
        for (a, b), d in blocks.items()
    ]


def _validator(loss_fn):
    """The loss's own ``validate(batch, mask)`` check, if it has one."""
    return getattr(loss_fn, "validate", None)


def _bind(loss_fn, args):
    """``loss_fn`` with the extra arguments ``*args`` bound: ``loss_fn(params, example, *args)``.

    A :class:`jaxgrad.reduce.BoundLoss` (a pytree of ``args``), not a closure: the strategies
    pass it into ``vmap`` and ``scan`` as an operand, so no traced value is closed over.
    """
    return reduce.BoundLoss(loss_fn, args)


def check_loss_fn(
    fn,
    *,
    name: str = "loss_fn",
    expected: str = "loss_fn(params, example) -> scalar | (loss_sum, n_items)",
):
    """Raises a TypeError naming the argument ``name`` unless ``fn`` is callable."""
    if not callable(fn):
        raise TypeError(
            f"`{name}` must be a function {expected}; got a {type(fn).__name__}: {fn!r}"[:300]
        )
    return fn


def check_loss_args(loss_fn, args, *, name: str, call: str) -> None:
    """Refuses extra loss arguments that ``loss_fn(params, example, *args)`` cannot take.

    Read off the signature before any tracing, so a missing or surplus argument is named
    here rather than as a ``TypeError`` from deep inside ``vmap``. A loss whose signature
    cannot be read (some builtins, C extensions) is not checked.

    Args:
      loss_fn: the user's loss.
      args: the extra arguments the caller passed.
      name: the function the user called, e.g. ``"dp_grad"``.
      call: how it is called, e.g. ``"f(params, batch, mask, key, *args)"``.

    Raises:
      TypeError: naming ``loss_fn``, how many extra arguments it takes and how many it got.
    """
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None, *args)
        return
    except TypeError:
        pass
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    required = sum(p.default is p.empty for p in positional)
    if len(positional) < 2 and not any(
        p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()
    ):
        expected = "it must take (params, example)"
    else:
        low, high = max(required - 2, 0), max(len(positional) - 2, 0)
        takes = f"{low}" if low == high else f"{low} to {high}"
        expected = f"it takes {takes} extra argument(s) after (params, example)"
    raise TypeError(
        f"`loss_fn{signature}` is called as loss_fn(params, example, *args) with the extra "
        f"arguments of `{name}`'s {call}; got {len(args)} extra argument(s), but {expected}. "
        "Pass exactly the arguments the loss takes after (params, example), in order"
    )


def _is_trace_level_error(error: BaseException) -> bool:
    """Whether ``error`` is Flax NNX's refusal to use state from another trace level."""
    return type(error).__name__ == "TraceContextError" or "different trace level" in str(error)


_TRACE_LEVEL_HINT = (
    "`{name}`: `loss_fn` changed or extracted Flax NNX state that it closes over from outside "
    "the traced function ({error}). The strategies pass `params` and the extra arguments into "
    "every transform explicitly, but a module merged from state the loss *closes over* (e.g. "
    "`rest` in `nnx.merge(graphdef, params, rest)`) cannot be updated under jax transforms. "
    "The usual cause: `nnx.RNN` called without `initial_carry=` draws its initial carry from "
    "its own RNG stream (an RngCount it must increment). Either pass `initial_carry=` (e.g. "
    "`jnp.zeros((1, hidden_size))` for a batch of one), or pass "
    "the non-Param state as an extra argument, `f(params, batch, mask, rest)` with "
    "`loss_fn(params, example, rest)` doing `nnx.merge(graphdef, params, rest)` (its updates "
    "are then discarded; jaxgrad.train.fit passes no such argument: there, pass initial_carry=)"
)


def _finite_rules(out, mask):
    """The module docstring's rules on a batch's :class:`GradResult` (a scalar loss): a NaN or
    inf loss makes the gradient NaN — JAX's derivative can stay finite where the loss is not
    (``log`` of a negative number: NaN, its derivative ``1/x`` finite) — and a batch with no
    real row gives a zero gradient (with no real row to copy, padding stays as given, and
    may be NaN through the backward pass)."""
    if not isinstance(out, GradResult) or jnp.shape(out.loss) != ():
        return out
    bad, real = ~jnp.isfinite(out.loss), jnp.any(mask)

    def rule(g):
        return jnp.where(real, jnp.where(bad, jnp.nan, g), 0).astype(g.dtype)

    return out._replace(grads=jax.tree_util.tree_map(rule, out.grads))


def _strategy(
    core,
    *,
    validate=None,
    name: str,
    doc=None,
    loss_fn=None,
    real_params: bool = False,
    keywords: tuple = (),
):
    """Wraps ``core(params, batch, mask) -> GradResult`` with input checks and ``jax.jit``.

    The core's output is returned as it is (the fast path's cores return other results).

    Shape checks run at trace time, so they also guard a caller's own ``jax.jit``. A loss
    with a ``validate(batch, mask)`` method (see :func:`jaxgrad.losses.supervised`) has it called
    on concrete batches, so out-of-range labels fail loudly rather than give a wrong number.

    With ``loss_fn`` given, ``core`` takes it as a keyword, and the returned
    ``f(params, batch, mask=None, *args)`` passes extra positional arguments to every call
    ``loss_fn(params, example, *args)`` (the same for every example: a step number, a base
    PRNG key to ``fold_in`` an example id from the batch, ...). They are traced, not static.

    ``real_params=True`` rejects complex parameter leaves (see :func:`jaxgrad.reduce.check_params`).
    ``keywords`` names call-time keyword arrays ``f`` accepts and passes (traced) to ``core``.
    """

    if loss_fn is not None:
        check_loss_fn(loss_fn)

    def run(params, batch, mask, args, kw):
        # A missing mask is made inside the jit, so it takes the batch's sharding (a batch
        # spread over devices or processes never meets a mask that lives on one device).
        if mask is None:
            mask = jnp.ones((reduce.batch_size(batch),), bool)
        # Padded rows become copies of a real row, so garbage (even NaN) in them cannot leak
        # into the gradient through the backward pass.
        batch = reduce.fill_padding(batch, mask)
        if loss_fn is None:
            return _finite_rules(core(params, batch, mask), mask)
        return _finite_rules(core(params, batch, mask, loss_fn=_bind(loss_fn, args), **kw), mask)

    jitted = jax.jit(sharding.auto_axes(_loops.canonical_convolutions(run)))
    arities_checked = set()

    def f(params, batch, mask=None, *args, **kw):
        unknown = sorted(set(kw) - set(keywords))
        if unknown:
            raise TypeError(
                f"`{name}` got unexpected keyword(s) {unknown}; allowed: {list(keywords)}"
            )
        kw = {k: v for k, v in kw.items() if v is not None}
        if args and loss_fn is None:
            raise TypeError(f"`{name}` takes no extra loss arguments; got {len(args)}")
        if loss_fn is not None and len(args) not in arities_checked:  # once per arity
            check_loss_args(loss_fn, args, name=name, call="f(params, batch, mask, *args)")
            arities_checked.add(len(args))
        reduce.check_params(params, real=real_params)
        size = reduce.batch_size(batch)
        if mask is not None:
            mask = reduce.check_mask(mask, size)
        validate_concrete(validate, batch, mask)
        try:
            return jitted(params, batch, mask, args, kw)
        except Exception as e:
            if not _is_trace_level_error(e):
                raise
            message = _TRACE_LEVEL_HINT.format(name=name, error=str(e).splitlines()[0])
            raise ValueError(message) from e

    f.__name__ = f.__qualname__ = name
    f.__doc__ = doc
    return f


def batch_grad(loss_fn):
    """Gradient of the global mean loss: ``grad`` of ``Σ_i m_i S_i / Σ_i m_i n_i``.

    The reference every other strategy is measured against: one forward and one backward
    pass over the whole batch.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.

    Returns:
      ``f(params, batch, mask=None) -> GradResult``: ``grads`` shaped like ``params``, the
      mean ``loss`` and the real item ``count`` (``norms`` is None), like
      ``jax.value_and_grad`` of the mean loss.

    Example::

      >>> import jax.numpy as jnp, jaxgrad
      >>> loss = lambda p, ex: (p * ex[0] - ex[1]) ** 2
      >>> out = jaxgrad.batch_grad(loss)(2.0, (jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0])))
      >>> float(out.grads)  # d/dp mean((p x - y)^2) = mean(2 x (p x - y)) = (2 + 12) / 2
      7.0
      >>> float(out.loss), float(out.count)  # mean((p x - y)^2) over 2 examples
      (5.0, 2.0)
    """

    def core(params, batch, mask, loss_fn=loss_fn):
        def mean_loss(p):
            total, count = reduce.batch_totals(loss_fn, p, batch, mask)
            count = jax.lax.stop_gradient(count)
            return reduce.safe_divide(total, count), count

        (loss, count), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        return GradResult(grads, loss, count)

    return _strategy(
        core,
        loss_fn=loss_fn,
        validate=_validator(loss_fn),
        name="batch_grad",
        doc=batch_grad.__doc__,
    )


def _per_example(loss_fn, params, batch, mask, chunk_size):
    """``(m_i S_i, m_i n_i, m_i ∇S_i)`` for every example: ``vmap(grad)``, or chunked.

    The mask multiplies the scalar loss *before* differentiation, so padded rows come out
    as zeros with no extra pass over the ``B × P`` result (padded rows hold copies of a
    real row, see :func:`jaxgrad.reduce.fill_padding`, so ``0 × loss`` is never ``0 × inf``).
    """

    def one(fn, p, example, real):
        def summed(p):
            loss_sum, count = reduce.as_sum_count(fn(p, example))
            weight = real.astype(loss_sum.dtype)
            return loss_sum * weight, count * weight

        (loss_sum, count), grads = jax.value_and_grad(summed, has_aux=True)(p)
        return loss_sum, count, grads

    # The loss and the parameters enter every vmap as operands, never closed over (see
    # :class:`jaxgrad.reduce.BoundLoss`: Flax NNX models need it).
    operands = (reduce.as_operand(loss_fn), params)
    # A chunk as large as the batch is the unchunked computation, sliced: a lone vmap over
    # the whole batch made XLA:CPU write the MLP's B × P outer products transposed, copy
    # them and compute them again for the norms (3.5x the time at B = chunk_size = 32).
    # Inside the loop each chunk stays one vmap: the stacking concatenation writes its rows
    # in place, where slices within chunks cost a copy of B × P (412 MB at B = 256).
    if chunk_size is None or chunk_size >= mask.shape[0]:
        return _sliced_vmap(one, operands, (batch, mask))
    # Contiguous chunks, as ``lax.map(batch_size=)``: the stacked rows reshape back for free,
    # where interleaved chunks would cost one more copy of the B × P result.
    rows, _ = reduce.chunked(
        lambda ops, b, m: (jax.vmap(one, in_axes=(None, None, 0, 0))(*ops, b, m), ()),
        batch,
        mask,
        chunk_size=chunk_size,
        interleave=False,
        operands=operands,
    )
    return rows


# One vmap over a whole batch makes XLA:CPU write the B × P result and then copy it into the
# batch-major layout; vmapping slices of a few dozen examples and concatenating avoids the
# copy: 2x the throughput at 57% of the peak memory for the benchmark's MLP at B = 256, and
# within 1.0-1.2x of the time it takes just to write B × P floats at B = 32, 64 and 256
# (`python -m jaxgrad.bench`). Slices are unrolled, not looped: each hands on its rows of
# B × P numbers, a step with few flops per number (the loop policy's unrolled side,
# jaxgrad._loops). The sizes are measured, not derived.
def _slice_size(size: int) -> int:
    return 16 if size <= 64 else max(32, -(-size // 16))


def _sliced_vmap(fn, consts, args):
    """``jax.vmap(fn)(*consts, *args)`` with ``consts`` unbatched, over unrolled slices of the
    batch (at most 16)."""
    size = jax.tree_util.tree_leaves(args)[0].shape[0]
    step = _slice_size(size)
    vmapped = jax.vmap(fn, in_axes=(None,) * len(consts) + (0,) * len(args))
    if size <= step:
        return vmapped(*consts, *args)
    parts = [
        vmapped(*consts, *jax.tree_util.tree_map(lambda x, i=i: x[i : i + step], args))
        for i in range(0, size, step)
    ]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)


def per_example_grads(loss_fn, *, chunk_size: int | None = None):
    """Every example's gradient, stacked along a leading batch axis: ``vmap(grad)``.

    Example ``i``'s gradient is that of its loss sum ``S_i`` (for a scalar loss, of the loss
    itself), so ``Σ_i g_i / Σ_i n_i`` is the gradient of the global mean loss. Padded rows
    (``mask`` False) come back as zeros.

    This materialises a ``B × P`` array. When only norms, clipped sums or statistics are
    needed, :func:`jaxgrad.per_example_norms`, :func:`jaxgrad.clipped_grad` and
    :func:`jaxgrad.grad_stats` give them without it.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      chunk_size: if set, examples are processed ``chunk_size`` at a time, one chunk after
        the other (unrolled or ``lax.scan``: the loop policy of :mod:`jaxgrad._loops`; peak
        activation memory of one chunk); the batch need not divide evenly, and
        ``chunk_size >= B`` is the unchunked computation.

    Returns:
      ``f(params, batch, mask=None) -> GradResult``, every field per example: ``grads`` with
      every leaf of shape ``(B, *param.shape)``, ``loss`` the loss sums ``m_i S_i``,
      ``count`` the item counts ``m_i n_i`` and ``norms`` the gradient norms, each ``(B,)``.
      The norms cost one more read of the ``B × P`` result (up to ~1.2x the time at B = 256
      for the benchmark's MLP); under your own ``jax.jit``, taking only ``.grads``, XLA
      drops them.

    Example::

      >>> import jax.numpy as jnp, jaxgrad
      >>> loss = lambda p, ex: (p * ex[0] - ex[1]) ** 2
      >>> batch = (jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
      >>> out = jaxgrad.per_example_grads(loss)(2.0, batch)
      >>> out.grads.tolist(), out.loss.tolist(), out.norms.tolist()
      ([2.0, 12.0], [1.0, 9.0], [2.0, 12.0])
    """
    if chunk_size is not None:
        chunk_size = reduce.check_positive_int(chunk_size, name="chunk_size")

    def core(params, batch, mask, loss_fn=loss_fn):
        sums, counts, grads = _per_example(loss_fn, params, batch, mask, chunk_size)
        return GradResult(grads, sums, counts, _row_norms(grads))

    return _strategy(
        core,
        loss_fn=loss_fn,
        validate=_validator(loss_fn),
        name="per_example_grads",
        doc=per_example_grads.__doc__,
    )


def mean_of_per_example_grads(loss_fn, *, chunk_size: int | None = None):
    """The mean of the per-example gradients, ``Σ_i m_i ∇S_i / Σ_i m_i n_i``.

    Equal to :func:`batch_grad` (differentiation is linear); computed the long way, by
    materialising every example's gradient first.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      chunk_size: optional chunking of the per-example pass, as in :func:`per_example_grads`.

    Returns:
      ``f(params, batch, mask=None) -> GradResult``: the mean ``grads`` and ``loss`` and the
      ``count`` as :func:`batch_grad` gives them, and every example's gradient ``norms``
      (shape ``(B,)``, 0 for padding), which this strategy has at hand.
    """
    if chunk_size is not None:
        chunk_size = reduce.check_positive_int(chunk_size, name="chunk_size")

    def core(params, batch, mask, loss_fn=loss_fn):
        sums, counts, rows = _per_example(loss_fn, params, batch, mask, chunk_size)
        total, count = reduce.masked_totals(sums, counts, mask)
        grads = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), rows)
        return GradResult(
            reduce.safe_divide(grads, count),
            reduce.safe_divide(total, count),
            count,
            _row_norms(rows),
        )

    return _strategy(
        core,
        loss_fn=loss_fn,
        validate=_validator(loss_fn),
        name="mean_of_per_example_grads",
        doc=mean_of_per_example_grads.__doc__,
    )


def accumulate_grad(loss_fn, *, num_microbatches: int, unroll: str | int | bool = "auto"):
    """Gradient accumulation over microbatches, one after the other, normalised exactly once.

    Each microbatch contributes its gradient *sum* ``Σ_{i∈k} m_i ∇S_i`` and its count
    ``Σ_{i∈k} m_i n_i``; the accumulated sum is divided by the global count at the end, so
    the result equals :func:`batch_grad` even when microbatches hold different numbers of
    real examples or tokens (unlike :func:`jaxgrad.naive.mean_of_microbatch_means`). Under
    ``lax.scan`` the peak activation memory is one microbatch's; unrolled, XLA:CPU plans
    several at once (2.5-4x the scan's temporary memory on the benchmark's models, 4
    microbatches).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      num_microbatches: how many microbatches ``K`` to split the batch into; microbatch ``k``
        holds rows ``k, k + K, …`` (see :func:`jaxgrad.reduce.split_microbatches`), so on a
        batch sharded over ``D`` devices, with ``D K`` dividing its size, no row moves between
        devices. A batch that does not divide evenly is padded (masked out) at the end.
      unroll: ``"auto"`` (default): the loop policy of :mod:`jaxgrad._loops` chooses from
        the microbatch's program, read off its jaxpr: on a single CPU device, at most 16
        microbatches run unrolled when the microbatch does fewer than
        ``_loops.SCAN_INTENSITY`` flops per number it hands on (the gradient sum: the MLP,
        1.1-2.9x faster unrolled); a microbatch with more arithmetic runs under ``lax.scan``
        (the transformer 1.3-3x faster scanned, the CNNs 0.93-1.4x, at a quarter to a half of
        the temporary memory; their convolutions made canonical in the loop body,
        :func:`jaxgrad._loops.canonical_convolutions`), as does every loop elsewhere.
        ``_loops.form`` returns the choice and its reason. ``True`` always unrolls;
        ``False`` or an integer is ``lax.scan``'s own ``unroll`` (see
        :func:`jaxgrad._loops.scan`).

    Returns:
      ``f(params, batch, mask=None) -> GradResult``: ``grads``, ``loss`` and ``count`` as
      :func:`batch_grad` gives them (``norms`` is None).

    Example::

      >>> import jax.numpy as jnp, jaxgrad
      >>> loss = lambda p, ex: (p * ex[0] - ex[1]) ** 2
      >>> batch = (jnp.arange(5.0), jnp.ones(5))
      >>> a = jaxgrad.accumulate_grad(loss, num_microbatches=2)(2.0, batch)
      >>> bool(jnp.allclose(a.grads, jaxgrad.batch_grad(loss)(2.0, batch).grads))
      True
    """
    num_microbatches = reduce.check_positive_int(num_microbatches, name="num_microbatches")
    unroll = _loops.check_unroll(unroll)

    def core(params, batch, mask, loss_fn=loss_fn):
        def microbatch_sums(ops, micro_batch, micro_mask):
            fn, p = ops
            (total, count), grads = jax.value_and_grad(
                lambda p: reduce.batch_totals(fn, p, micro_batch, micro_mask), has_aux=True
            )(p)
            return (), (total, count, grads)

        # The loss and the parameters ride through the loop as operands (not a closure).
        _, (total, count, grads) = reduce.chunked(
            microbatch_sums,
            batch,
            mask,
            num_chunks=num_microbatches,
            unroll=unroll,
            operands=(reduce.as_operand(loss_fn), params),
        )
        return GradResult(reduce.safe_divide(grads, count), reduce.safe_divide(total, count), count)

    return _strategy(
        core,
        loss_fn=loss_fn,
        validate=_validator(loss_fn),
        name="accumulate_grad",
        doc=accumulate_grad.__doc__,
    )
