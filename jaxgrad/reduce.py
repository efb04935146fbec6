"""(sum, count) reductions over a batch, with a padding mask.

A per-example loss returns either a scalar (an item count of 1) or a pair
``(loss_sum, n_items)``, e.g. summed token losses and the number of real tokens.
Every reducer adds sums and counts separately and divides once, by the global count:

.. math::

    L = \\frac{\\sum_i m_i S_i}{\\sum_i m_i n_i}

where ``m_i`` is the padding mask. Padding never changes shapes, so jit never recompiles.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import _loops

PyTree = Any


def as_sum_count(out) -> tuple[jax.Array, jax.Array]:
    """Normalises one example's loss to a ``(sum, count)`` pair of scalars.

    Args:
      out: what ``loss_fn(params, example)`` returned: a scalar, or a pair
        ``(loss_sum, n_items)`` of scalars.

    Returns:
      ``(loss_sum, n_items)``; a scalar loss counts as one item. A pair whose count cannot be
      an item count — negative, NaN or inf, or 0 with a nonzero sum — makes ``loss_sum`` NaN
      (value and gradient), so the batch's loss and gradient are NaN rather than a silent 0.

    Raises:
      TypeError: ``out`` is None, not a scalar or a pair of scalars, or not floating point.
    """
    if out is None:
        raise TypeError(
            "`loss_fn` returned None; expected a scalar loss or a pair (loss_sum, n_items) "
            "for one example (a missing `return`?)"
        )
    pair = isinstance(out, (tuple, list))
    if pair:
        if len(out) != 2:
            raise TypeError(
                "`loss_fn` must return a scalar or a pair (loss_sum, n_items); "
                f"got a {type(out).__name__} of length {len(out)}"
            )
        if any(v is None for v in out):
            raise TypeError(f"`loss_fn` returned a pair holding None; got {out!r}")
        loss_sum, count = (_as_loss_array(v) for v in out)
    else:
        loss_sum = _as_loss_array(out)
        count = jnp.ones((), loss_sum.dtype)
    if loss_sum.shape != () or count.shape != ():
        got = f"shapes {loss_sum.shape} and {count.shape}" if pair else f"shape {loss_sum.shape}"
        hint = ""
        if math.prod(loss_sum.shape) == 1 and count.shape == ():
            hint = " (squeeze a one-element loss to a scalar, e.g. `jnp.squeeze(loss)`)"
        raise TypeError(
            "`loss_fn` must return a scalar or a pair of scalars for ONE example "
            f"(no batch axis); got {got}{hint}"
        )
    if not jnp.issubdtype(loss_sum.dtype, jnp.floating):
        raise TypeError(
            f"`loss_fn` must return a floating-point loss (it is differentiated); got dtype "
            f"{loss_sum.dtype}"
        )
    count = count.astype(count_dtype(loss_sum.dtype))
    if pair:
        # NaN in the gradient too (a multiplier, not ``where``), as for out-of-range labels.
        loss_sum = loss_sum * nan_if_bad_count(count, loss_sum != 0).astype(loss_sum.dtype)
    return loss_sum, count


def count_dtype(dtype) -> jnp.dtype:
    """The dtype item counts (and the divisions by them) are kept in next to values of
    ``dtype``: at least float32. float16 holds no count above 65504 (inf) and bfloat16 rounds
    257 to 256, so a mean gradient divided by such a count would be a silent 0 or off."""
    return jnp.promote_types(dtype, jnp.float32)


def nan_if_bad_count(count, nonzero_sum) -> jax.Array:
    """NaN where ``count`` cannot be the item count behind a sum, else 1: the factor that
    makes such a sum NaN (value and gradient), the rule of docs/non-finite.md.

    A count cannot be an item count when it is negative, NaN or inf, or 0 while the sum it
    counts is nonzero: dividing by it would give a wrong number (or a silent 0), not a mean.

    Args:
      count: the item count, a (possibly traced) floating-point array.
      nonzero_sum: whether the sum behind ``count`` is nonzero (or NaN), a bool array
        broadcastable against ``count``.

    Returns:
      ``count``'s dtype and shape (broadcast with ``nonzero_sum``): NaN where bad, 1 elsewhere.
    """
    bad = ~(count >= 0) | ~jnp.isfinite(count) | ((count == 0) & nonzero_sum)
    return jnp.where(bad, jnp.nan, 1).astype(count.dtype)


def _as_loss_array(value) -> jax.Array:
    """One entry of ``loss_fn``'s output as an array, or a TypeError naming what it was."""
    if not isinstance(value, (jax.Array, np.ndarray, np.generic, int, float, bool, complex)):
        raise TypeError(
            "`loss_fn` must return a scalar or a pair (loss_sum, n_items) of scalars; got a "
            f"{type(value).__name__}: {value!r}"[:400]
        )
    return jnp.asarray(value)


def check_params(params, *, name: str = "params", real: bool = False) -> None:
    """Checks ``params`` has array leaves, all floating point (they are differentiated).

    Integer leaves (step counters), booleans and PRNG keys have no gradient (JAX would give
    ``float0``); keep them out of the differentiated tree: close over them in ``loss_fn``, or
    split the model first (``eqx.partition(model, eqx.is_inexact_array)``,
    ``nnx.split(model, nnx.Param, ...)``) and pass only the trainable part as ``params``.

    With ``real=True`` complex leaves are errors too: per-example gradient norms, clipping and
    gradient statistics are defined here for real parameters only (split a complex leaf into
    its real and imaginary parts to use them).

    Raises:
      ValueError: no leaves (``None``, ``{}``). TypeError: a non-floating leaf, named by path.
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError(
            f"`{name}` has no array leaves (got {params!r}); expected a pytree of floating-point "
            "arrays to differentiate"
        )
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            if isinstance(leaf, float):
                continue
            dtype = np.result_type(leaf) if isinstance(leaf, (int, bool, complex)) else None
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            what = f"dtype {dtype}" if dtype is not None else f"a {type(leaf).__name__}"
            raise TypeError(
                f"`{name}` leaf {name}{jax.tree_util.keystr(path)} is {what}; every leaf of "
                f"`{name}` is differentiated, so it must be floating point. Keep integer "
                "counters, PRNG keys and other state out of it: close over them in `loss_fn`, or "
                "split the model (eqx.partition(model, eqx.is_inexact_array); nnx.split(model, "
                "nnx.Param, ...)) and pass only the trainable part (see docs/models.md)"
            )
        if real and jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"`{name}` leaf {name}{jax.tree_util.keystr(path)} is dtype {dtype}; per-example "
                "gradient norms, clipping and gradient statistics need real floating-point "
                "parameters. Store a complex parameter as its real and imaginary parts (two real "
                "leaves) and build it inside `loss_fn` with jax.lax.complex"
            )


def loss_sum_fn(loss_fn):
    """``loss_fn`` reduced to its summed part: what per-example gradients differentiate."""

    def summed(params, example, *args):
        return as_sum_count(loss_fn(params, example, *args))[0]

    return summed


@jax.tree_util.register_pytree_node_class
class BoundLoss:
    """``loss_fn(params, example, *args)`` with ``args`` bound: a pytree whose leaves are ``args``.

    Why a pytree and not a closure: a function transformed inside another (``vmap`` or
    ``lax.scan`` inside ``grad`` inside ``jit``) that *closes over* a traced value sees it at the
    outer trace level. Flax NNX checks trace levels: a model merged from such values
    (``nnx.merge(graphdef, params, rest)`` in the loss) and run through its own transforms
    (``nnx.RNN``, ``nnx.scan``, ``nnx.vmap``) fails with "Cannot extract graph node from different
    trace level". Every reducer here passes the bound loss and ``params`` to ``vmap`` / ``scan``
    as explicit unbatched operands (see :func:`as_operand`), so they are re-created at the
    inner level, where the model is built.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> f = BoundLoss(lambda p, ex, scale: scale * p * ex, (jnp.float32(2),))
      >>> float(jax.vmap(lambda f, x: f(3.0, x), in_axes=(None, 0))(f, jnp.ones(2))[0])
      6.0
    """

    def __init__(self, fn, args=()):
        self.fn, self.args = fn, tuple(args)

    def __call__(self, params, example):
        return self.fn(params, example, *self.args)

    def tree_flatten(self):
        return self.args, self.fn

    @classmethod
    def tree_unflatten(cls, fn, args):
        return cls(fn, args)


def as_operand(loss_fn) -> BoundLoss:
    """``loss_fn`` as a :class:`BoundLoss` (no extra arguments if it is a plain function)."""
    return loss_fn if isinstance(loss_fn, BoundLoss) else BoundLoss(loss_fn)


def example_losses(loss_fn, params, batch):
    """``(S_i, n_i)`` for every example: ``vmap`` with the loss and ``params`` explicit operands."""

    def one(fn, p, example):
        return as_sum_count(fn(p, example))

    return jax.vmap(one, in_axes=(None, None, 0))(as_operand(loss_fn), params, batch)


def batch_size(batch: PyTree, *, name: str = "batch") -> int:
    """The shared leading-axis size of ``batch``'s leaves, checked at trace time.

    Raises:
      ValueError: if the leaves have no leading axis, disagree on it, or it is 0.
      TypeError: a leaf that is not numeric (strings, objects), named by path.
    """
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves; expected a pytree of arrays")
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        dtype = getattr(leaf, "dtype", None)
        kind = getattr(dtype, "kind", None)
        # Kind "V" is a NumPy structured dtype, but also ml_dtypes' bfloat16, float8, int4
        # (numbers to JAX).
        if (
            kind in ("U", "S", "O")
            or (kind == "V" and not jnp.issubdtype(dtype, jnp.number))
            or isinstance(leaf, (str, bytes))
        ):
            what = f"dtype {leaf.dtype}" if kind else f"a {type(leaf).__name__}"
            raise TypeError(
                f"`{name}` leaf {name}{jax.tree_util.keystr(path)} is {what}; every leaf of "
                f"`{name}` must be a numeric (or boolean, or PRNG key) array with a leading "
                "batch axis (encode strings as integer ids before batching)"
            )
    shapes = [np.shape(leaf) for leaf in leaves]
    if any(len(s) == 0 for s in shapes):
        raise ValueError(
            f"`{name}` leaves must share a leading batch axis; got a scalar leaf among shapes "
            f"{', '.join(map(str, shapes[:8]))}{', ...' if len(shapes) > 8 else ''}"
            + (
                " (a value shared by every example is an extra loss argument, "
                "f(params, batch, mask, *args), not a batch leaf)"
                if name == "batch"
                else ""
            )
        )
    sizes = {s[0] for s in shapes}
    if len(sizes) != 1:
        raise ValueError(
            f"`{name}` leaves must share a leading axis; got shapes {', '.join(map(str, shapes))}"
        )
    (size,) = sizes
    if size == 0:
        raise ValueError(f"`{name}` is empty (leading axis 0); expected at least one example")
    return size


def check_mask(mask, size: int, *, name: str = "mask") -> jax.Array:
    """Returns ``mask`` as a boolean vector of length ``size`` (all True when None).

    Raises:
      ValueError: wrong shape. TypeError: not boolean.
    """
    if mask is None:
        return jnp.ones((size,), bool)
    mask = jnp.asarray(mask)
    shape, dtype = mask.shape, mask.dtype
    if shape != (size,):
        raise ValueError(f"`{name}` must have shape ({size},) to match the batch; got {shape}")
    if dtype != jnp.bool_:
        hint = (
            f"; a 0/1 {name} is {name}.astype(bool) (a weight other than 0 or 1 is not padding)"
            if jnp.issubdtype(dtype, jnp.number)
            else ""
        )
        raise TypeError(f"`{name}` must be boolean (True = real example); got dtype {dtype}{hint}")
    return jnp.asarray(mask)


def masked_totals(sums: jax.Array, counts: jax.Array, mask: jax.Array):
    """``(Σ_i m_i S_i, Σ_i m_i n_i)`` over the batch axis; padded rows count for nothing."""
    return (
        jnp.sum(jnp.where(mask, sums, 0)),
        jnp.sum(jnp.where(mask, counts, 0)),
    )


def fill_padding(batch: PyTree, mask: jax.Array) -> PyTree:
    """Replaces the padded rows of ``batch`` (``mask`` False) by its first real row.

    Padded rows are masked out of every sum, but a NaN or inf in their forward pass would
    still turn the backward pass into NaN (``0 × inf``); a copy of a real row cannot.
    """
    # With several devices the first real row is picked by a masked sum over the batch axis,
    # not by indexing ``x[argmax(mask)]``: on a batch sharded over devices that is one
    # all-reduce of a row, where the dynamic index would gather the whole batch onto every
    # device. On one device the index reads one row, where the masked sum costs two more
    # passes over the batch (a select, and a sum XLA:CPU broadcasts to the batch's shape
    # before the last select): ~1 % of the MLP's DP step on P rows, within the noise on
    # the sampled step (bench/results/draw-cost-2026-12-06-loaded.txt).
    first_row = jnp.argmax(mask)
    is_first = jnp.arange(mask.shape[0]) == first_row
    one_device = jax.device_count() == 1

    def fill(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):  # typed PRNG keys: their bits
            bits = fill(jax.random.key_data(x))
            return jax.random.wrap_key_data(bits, impl=jax.random.key_impl(x))
        shape = mask.shape + (1,) * (x.ndim - 1)
        if one_device:
            first = jax.lax.dynamic_index_in_dim(x, first_row, axis=0, keepdims=False)
        else:
            first = jnp.sum(jnp.where(is_first.reshape(shape), x, jnp.zeros_like(x)), axis=0)
        return jnp.where(mask.reshape(shape), x, first.astype(x.dtype))

    return jax.tree_util.tree_map(fill, batch)


def batch_totals(loss_fn, params, batch, mask):
    """``(Σ_i m_i S_i, Σ_i m_i n_i)``: ``loss_fn`` on every example of ``batch``, reduced."""
    return masked_totals(*example_losses(loss_fn, params, batch), mask)


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every inexact leaf of ``tree`` is finite: one scalar bool (True for no leaf)."""
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def safe_divide(total, count):
    """``total / count``, and 0 (not NaN) where the count is 0: an all-padding batch is a no-op.

    A count of 0 with a nonzero (or NaN) total is NaN, never a silent 0: a count of 0 can only
    come from padding or from examples whose sums are 0 too (:func:`as_sum_count` makes a
    loss with count 0 and a nonzero sum NaN).
    """
    nonzero = count > 0

    def divide(t):  # in count_dtype: a float16 sum over 65504 items is still a finite mean
        wide = count_dtype(jnp.result_type(t, count))
        zero_count = jnp.where(t == 0, 0, jnp.nan).astype(t.dtype)  # a NaN sum stays NaN
        mean = t.astype(wide) / jnp.where(nonzero, count, 1).astype(wide)
        return jnp.where(nonzero, mean.astype(t.dtype), zero_count)

    return jax.tree_util.tree_map(divide, total)


def pad_batch(batch: PyTree, mask: jax.Array, size: int):
    """Pads ``batch`` along its leading axis to ``size`` by repeating row 0, masked out.

    Repeating a real row (rather than zeros) keeps the padded rows finite for every loss,
    so their masked-out gradients are exact zeros and never NaN.
    """
    n = mask.shape[0]
    if size == n:
        return batch, mask
    extra = size - n
    padded = jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)], axis=0), batch
    )
    return padded, jnp.concatenate([mask, jnp.zeros((extra,), bool)])


def split_microbatches(
    batch: PyTree, mask: jax.Array, num_microbatches: int, *, interleave: bool = False
):
    """Splits ``batch`` and ``mask`` into ``num_microbatches`` equal-shaped pieces.

    Pieces are contiguous by default. With ``interleave=True`` piece ``k`` holds rows
    ``k, k + K, k + 2K, …`` (``K = num_microbatches``): on a batch sharded over ``D`` devices
    along its leading axis (with ``D K`` dividing the batch size) every piece is then spread
    evenly over the devices and no row moves between them.

    A batch that does not divide evenly is padded (masked out) at the end, so some
    microbatch holds fewer real examples; shapes stay static.

    Returns:
      ``(batch, mask)`` with a new leading axis of length ``num_microbatches``.
    """
    n = mask.shape[0]
    per = -(-n // num_microbatches)
    batch, mask = pad_batch(batch, mask, per * num_microbatches)
    if interleave:
        reshape = lambda x: jnp.swapaxes(x.reshape((per, num_microbatches, *x.shape[1:])), 0, 1)
    else:
        reshape = lambda x: x.reshape((num_microbatches, per, *x.shape[1:]))
    return jax.tree_util.tree_map(reshape, batch), reshape(mask)


def chunked(
    body,
    batch: PyTree,
    mask: jax.Array,
    *,
    chunk_size: int | None = None,
    num_chunks: int | None = None,
    interleave: bool = True,
    unroll: str | int | bool = "auto",
    operands=None,
):
    """``body(batch, mask) -> (rows, totals)`` over chunks of the batch: rows stacked, totals added.

    The one chunked reduction behind every chunked strategy: with ``K`` chunks
    ``C_0, …, C_{K-1}`` covering the batch once,

    .. math::

        \\text{totals} = \\sum_k \\text{totals}(C_k), \\qquad
        \\text{rows}_i = \\text{rows}(C_{k(i)})_i \\text{ (back in the batch's order)},

    one chunk after the other (:func:`jaxgrad._loops.scan`, whose :func:`jaxgrad._loops.form`
    unrolls up to 16 chunks on a single CPU device when a chunk does little arithmetic per
    number it hands on, else ``lax.scan``, whose peak activation memory is that
    of one chunk). ``totals`` are sums (e.g. loss sums, counts, gradient sums); dividing by a
    count is left to the caller, once.

    Args:
      body: ``body(batch, mask) -> (rows, totals)`` on a chunk; ``rows`` leaves have the chunk's
        leading axis, ``totals`` leaves any fixed shape. Either may be an empty pytree ``()``.
      batch: pytree with a leading batch axis of size ``B``; ``mask``: shape ``(B,)`` booleans.
      chunk_size: examples per chunk (exclusive with ``num_chunks``). ``B // chunk_size``
        full chunks run in the loop and a remainder that does not fill one runs after it on
        its own, so no example is padded, dropped or counted twice; ``chunk_size >= B`` calls
        ``body`` once on the whole batch.
      num_chunks: how many equal chunks ``K``; a batch that does not divide evenly is padded
        (masked out, see :func:`split_microbatches`), so ``body`` must honour ``mask``.
      interleave: if True, chunk ``k`` holds rows ``k, k + K, k + 2K, …``: on a batch sharded
        over ``D`` devices along its leading axis (with ``D`` dividing the scanned chunks' rows)
        every chunk is spread evenly over the devices and no row moves between them; putting
        ``rows`` back in order then costs one copy of them. If False, chunks are contiguous and
        stacked rows are reshaped back for free.
      unroll: ``"auto"`` (default), True, False or an integer: see
        :func:`jaxgrad._loops.scan`.
      operands: if given, ``body(operands, batch, mask)`` is called, with ``operands`` (e.g.
        the parameters and the loss, see :class:`BoundLoss`) passed through the scan
        explicitly rather than closed over.

    Returns:
      ``(rows, totals)``: rows for the ``B`` examples in the batch's order, totals summed.

    Example::

      >>> import jax.numpy as jnp
      >>> body = lambda x, m: (2 * x, jnp.sum(jnp.where(m, x, 0)))
      >>> rows, total = chunked(body, jnp.arange(5.0), jnp.ones(5, bool), chunk_size=2)
      >>> rows.tolist(), float(total)
      ([0.0, 2.0, 4.0, 6.0, 8.0], 10.0)
    """
    if (chunk_size is None) == (num_chunks is None):
        raise ValueError(
            "pass exactly one of `chunk_size` and `num_chunks`; got "
            f"chunk_size={chunk_size!r}, num_chunks={num_chunks!r}"
        )
    if operands is None:
        call, operands = (lambda _, b, m: body(b, m)), ()
    else:
        call = body
    size = mask.shape[0]
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, name="chunk_size")
        if chunk_size >= size:
            return call(operands, batch, mask)
        num_full = size // chunk_size
        cut = num_full * chunk_size
    else:
        num_full = check_positive_int(num_chunks, name="num_chunks")
        cut = size
    head = jax.tree_util.tree_map(lambda x: x[:cut], (batch, mask)) if cut < size else (batch, mask)
    pieces = split_microbatches(*head, num_full, interleave=interleave)
    first = jax.tree_util.tree_map(lambda x: x[0], pieces)
    _, totals_shape = jax.eval_shape(lambda ops, bm: call(ops, *bm), operands, first)
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), totals_shape)

    # The operands ride in the carry, unchanged, so the body never closes over a traced value.
    def step(carry, bm):
        acc, ops = carry
        rows, totals = call(ops, *bm)
        return (jax.tree_util.tree_map(jnp.add, acc, totals), ops), rows

    (totals, _), rows = _loops.scan(step, (init, operands), pieces, unroll=unroll)

    def unstack(x):  # (K, per, ...) -> (K per, ...) in the batch's order, padding cut off
        if interleave:
            x = jnp.swapaxes(x, 0, 1)
        x = x.reshape((x.shape[0] * x.shape[1], *x.shape[2:]))  # not -1: a leaf may be empty
        return x[:cut] if x.shape[0] > cut else x

    rows = jax.tree_util.tree_map(unstack, rows)
    if cut < size:
        tail = jax.tree_util.tree_map(lambda x: x[cut:], (batch, mask))
        rows_t, totals_t = call(operands, *tail)
        totals = jax.tree_util.tree_map(jnp.add, totals, totals_t)
        rows = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), rows, rows_t)
    return rows, totals


def row_sq_norms(tree: PyTree) -> jax.Array:
    """``Σ_leaves ‖x[i]‖²`` for every row ``i`` of a pytree with a leading batch axis.

    Squared and summed in at least float32 (as the fast path does): in float16 an entry of
    256 already squares to inf, and a bfloat16 sum of many squares loses its low digits.
    """

    def sq(x):
        x = jnp.reshape(x, (x.shape[0], -1))
        return jnp.sum(jnp.square(x.astype(jnp.result_type(x.dtype, jnp.float32))), axis=1)

    return sum(sq(x) for x in jax.tree_util.tree_leaves(tree))


# The rows of the user's batch that the batch a check is looking at holds (None: all, in
# order); set by :func:`batch_rows`. A context variable, not an argument: a loss's own
# ``validate(batch, mask)`` (and every wrapper of it) stays as it is.
_BATCH_ROWS: contextvars.ContextVar = contextvars.ContextVar("jaxgrad_batch_rows", default=None)


@contextlib.contextmanager
def batch_rows(rows):
    """Within it, a check's row ``i`` is row ``rows[i]`` of the batch the user passed
    (``rows=None``: row ``i``).

    For a piece of that batch checked on its own: one device's block of a sharded batch
    (``range(start, stop)``), its unmasked rows (``np.flatnonzero(mask)``), the rows a process
    gathered from a data set by index. Nested uses compose: the outer one maps the inner's
    rows in turn. An error names the row with :func:`batch_row`.

    Example::

      >>> import numpy as np
      >>> from jaxgrad.reduce import batch_row, batch_rows
      >>> with batch_rows(range(8, 16)), batch_rows(np.array([1, 3])):
      ...     batch_row(1)  # row 1 of the unmasked rows of the second block of 8
      11
    """
    if rows is None:  # the batch itself: nothing to map
        yield
        return
    rows = np.asarray(rows, np.int64)
    outer = _BATCH_ROWS.get()
    token = _BATCH_ROWS.set(rows if outer is None else outer[rows])
    try:
        yield
    finally:
        _BATCH_ROWS.reset(token)


def batch_row(row: int) -> int:
    """Row ``row`` of the batch being checked, as a row of the user's batch (:func:`batch_rows`)."""
    rows = _BATCH_ROWS.get()
    return int(row if rows is None else rows[row])


def check_flag(value, *, name: str) -> bool:
    """Checks a keyword switch is ``True`` or ``False`` (a NumPy bool too); returns a bool.

    A truthy string such as ``"no"`` would otherwise switch the option on without a word.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False; got {value!r}")
    return bool(value)


def check_choice(value, choices, *, name: str) -> str:
    """Checks a keyword option is one of the strings ``choices``; returns it.

    Compared as a string: ``value in choices`` on an array compares it with each choice
    elementwise, so a 2-element array failed with NumPy's "truth value of an array is
    ambiguous" (naming nothing) and ``np.array(["rdp"])`` passed as if it were ``"rdp"``.
    """
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"`{name}` must be one of {list(choices)}; got {value!r}"[:300])
    return value


def check_positive_float(value, *, name: str) -> float:
    """Checks a keyword hyperparameter is a positive, finite real number; returns it as a float.

    Any number :func:`as_number` accepts (Python numbers, NumPy scalars, concrete 0-d arrays
    such as ``np.float32(1.0)`` or ``jnp.array(1.0)``); booleans, strings and traced values
    are not (a traced value cannot be checked, and these hyperparameters are fixed when ``f``
    is built).
    """
    number = _number_or_nan(value, name=name, integer=False)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"`{name}` must be a positive finite number; got {value!r}")
    return number


def check_nonnegative_float(value, *, name: str) -> float:
    """Checks a keyword hyperparameter is a finite real number ``≥ 0`` (as
    :func:`check_positive_float`, zero allowed: a noise multiplier, a standard deviation)."""
    number = _number_or_nan(value, name=name, integer=False)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"`{name}` must be a non-negative finite number; got {value!r}")
    return number


def check_if_known(check, value, *, name: str):
    """``check(value, name=name)`` for a value known now (a number, a concrete array); a
    traced value (an argument of the caller's ``jax.jit``), or an array spread over other
    processes, is returned unchecked: it has no value to inspect here.

    Example::

      >>> from jaxgrad.reduce import check_if_known, check_positive_float
      >>> check_if_known(check_positive_float, 2, name="l2_clip")
      2.0
    """
    if isinstance(value, jax.core.Tracer) or (
        isinstance(value, jax.Array) and not value.is_fully_addressable
    ):
        return value
    return check(value, name=name)


def check_positive_int(value, *, name: str) -> int:
    """Checks a keyword hyperparameter is a positive integer (Python, NumPy or a 0-d array)."""
    number = _number_or_nan(value, name=name, integer=True)
    if not number >= 1:  # NaN (not an integer) fails too
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
    return int(number)


def _number_or_nan(value, *, name: str, integer: bool):
    """:func:`as_number`, with NaN for a value of the wrong kind (the caller names the range)."""
    try:
        return as_number(value, name=name, integer=integer)
    except ValueError:
        if isinstance(value, jax.core.Tracer):
            raise  # its own message: traced values cannot be checked
        return math.nan


def as_number(value, *, name: str, integer: bool = False) -> float | int:
    """A keyword hyperparameter as a Python ``float`` (``int`` with ``integer``), range unchecked.

    Accepts Python numbers, NumPy scalars (``np.float32(1.0)``, ``np.int64(3)``) and concrete
    0-d arrays (NumPy or JAX); rejects bools, strings, ``None``, arrays with axes and values
    traced under ``jit``/``vmap`` (a hyperparameter shapes the program: it must be known when
    the function is built). With ``integer`` only integer types are accepted.

    Raises:
      ValueError: naming ``name``, what it got and what was expected.
    """
    kind = "an integer" if integer else "a real number"
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"`{name}` must be a concrete number, known when the function is built; got a value "
            "traced under jax.jit/vmap/grad. Pass a Python or NumPy number"
        )
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == ():
        scalar_dtype = value.dtype
    elif isinstance(value, (int, float, np.integer, np.floating)):
        scalar_dtype = np.result_type(value)
    else:
        scalar_dtype = None
    ok = scalar_dtype is not None and not isinstance(value, (bool, np.bool_))
    ok = ok and (
        np.issubdtype(scalar_dtype, np.integer)
        or (not integer and np.issubdtype(scalar_dtype, np.floating))
    )
    if not ok:
        got = (
            f"an array of shape {value.shape} and dtype {value.dtype}"
            if isinstance(value, (np.ndarray, jax.Array)) and value.shape != ()
            else repr(value)
        )
        raise ValueError(f"`{name}` must be {kind} (a scalar); got {got}")
    return int(value) if integer else float(value)
