"""Epoch batching: a shuffle that is a pure function of ``(key, epoch)``, and row gathers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import keys, reduce


def num_batches(num_examples: int, batch_size: int) -> int:
    """``ceil(num_examples / batch_size)``: the last partial batch is kept."""
    num_examples = reduce.check_positive_int(num_examples, name="num_examples")
    batch_size = reduce.check_positive_int(batch_size, name="batch_size")
    return -(-num_examples // batch_size)


def epoch_indices(key: jax.Array, epoch, num_examples: int, batch_size: int):
    """The example indices and padding mask of every batch of one epoch.

    The order is ``permutation(fold_in(key, epoch))``: a pure function of ``key`` and
    ``epoch``, so a run resumed in the middle of an epoch replays the same batches. The
    last batch is padded to ``batch_size`` with a real example (finite for every loss),
    masked out.

    Args:
      key: a PRNG key (typed or raw).
      epoch: the epoch number.
      num_examples: the size of the data set.
      batch_size: examples per batch.

    Returns:
      ``(indices, mask)`` of shape ``(num_batches, batch_size)``, int32 and bool.
    """
    n_batches = num_batches(num_examples, batch_size)
    key = keys.check_key(key)  # an int seed is not a key (it was JAX's "invalid PRNG key data")
    if not isinstance(epoch, jax.core.Tracer):  # fold_in takes a uint32
        e = reduce.as_number(epoch, name="epoch", integer=True)
        if not 0 <= e < 2**32:
            raise ValueError(f"`epoch` must be an integer in [0, 2**32); got {epoch!r}")
    order = jax.random.permutation(keys.epoch_key(key, epoch), num_examples)
    total = n_batches * batch_size
    padded = jnp.concatenate([order, jnp.full((total - num_examples,), order[0])])
    mask = jnp.arange(total) < num_examples
    shape = (n_batches, batch_size)
    return padded.astype(jnp.int32).reshape(shape), mask.reshape(shape)


def take(data: Any, indices):
    """Rows ``indices`` of every leaf of ``data`` (works for numpy and jax arrays).

    Concrete integer ``indices`` are checked against each leaf's rows, so numpy and jax
    arrays behave the same (negative indices count from the end, as in numpy). Traced
    indices (under ``jax.jit``, e.g. ``fit``'s scan) cannot be checked: there JAX's gather
    clamps an out-of-range index to the nearest row, so check them before tracing.

    Args:
      data: a pytree of arrays with a leading example axis.
      indices: an integer array (or anything numpy indexing takes).

    Returns:
      ``data`` with every leaf ``leaf[indices]``.

    Raises:
      IndexError: concrete integer ``indices`` outside ``[-n, n)`` for a leaf of ``n`` rows
        (JAX would clamp them silently).
    """
    if not isinstance(indices, jax.core.Tracer):
        idx = np.asarray(indices)
        if idx.dtype.kind in "iu" and idx.size:
            for n in {np.shape(a)[0] for a in jax.tree_util.tree_leaves(data) if np.ndim(a)}:
                outside = idx[(idx < -n) | (idx >= n)]
                if outside.size:
                    shown = ", ".join(str(int(i)) for i in outside[:5])
                    more = ", ..." if outside.size > 5 else ""
                    raise IndexError(
                        f"`indices` must lie in [{-n}, {n}) for {n} rows; got {outside.size} "
                        f"outside it ({shown}{more})"
                    )
    return jax.tree_util.tree_map(lambda a: a[indices], data)
