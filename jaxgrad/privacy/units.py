"""Privacy units larger than one row: a user's rows (user-level DP), an example's augmentations.

A *unit* is what DP-SGD samples, clips once and counts: with one unit per user, adding or
removing a user changes the noisy sum by at most the clip norm, so the guarantee is per user.
Both kinds are turned into ordinary examples, so the one DP step (Poisson sampling, the
clipped sum, the noise, the accounting) runs unchanged on them:

* :func:`group_units`: the rows of the training set grouped by unit id into ``(U, K, ...)``
  arrays with a row mask (``K`` the largest unit; smaller units padded with masked copies of
  their first row), one example per unit; :func:`unit_loss` is the unit's loss, the *sum* of
  its rows' loss sums, whose gradient ``Σ_{r∈u} ∇S_r`` is what is clipped (as
  :func:`jaxgrad.fast.clipped_grad`'s ``units=``). Sampling and accounting then count units
  (``N = U``).
* :func:`augmented_loss`: an example's loss as the *mean* over ``K`` augmented copies drawn
  from the example's key (augmentation multiplicity, De et al. 2022): the mean gradient is
  clipped once, so the unit stays the example and the accounting is unchanged.

On the fast path a unit is a sequence of rows: ``Σ_{r∈u} A_rᵀ G_r = A_uᵀ G_u``, so its
norm and clipped sum reuse the sequence-axis rules and no ``B × P`` array is formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import keys, reduce


def group_units(data, units):
    """Groups the rows of ``data`` by unit: ``((rows, real), ids)``, one example per unit.

    .. math::

        \\text{rows}[u, k] = \\text{data}[r_{u,k}], \\qquad \\text{real}[u, k] = [k < n_u]

    where ``r_{u,0} < r_{u,1} < …`` are the rows of the ``u``-th smallest id and ``n_u`` their
    number; ``k ≥ n_u`` repeats the unit's first row, masked out. The grouped arrays hold
    ``U · max_u n_u`` rows: with very unequal units, cap their size first.

    Args:
      data: a pytree of arrays with a leading row axis ``N`` (NumPy or concrete JAX arrays).
      units: an integer array ``(N,)``: the unit (e.g. user) id of every row; any integers.

    Returns:
      ``((rows, real), ids)``: ``rows`` the pytree of ``data`` with leading axes ``(U, K)``,
      ``real`` the ``(U, K)`` bool mask of real rows, ``ids`` the ``(U,)`` sorted unit ids.

    Raises:
      TypeError: ``units`` not an integer array (or traced).
      ValueError: ``units`` not of shape ``(N,)``.

    Example::

      >>> import numpy as np
      >>> from jaxgrad.privacy import group_units
      >>> (rows, real), ids = group_units(np.arange(5.0), np.array([7, 3, 7, 3, 7]))
      >>> rows.tolist(), real.tolist(), ids.tolist()
      ([[1.0, 3.0, 1.0], [0.0, 2.0, 4.0]], [[True, True, False], [True, True, True]], [3, 7])
    """
    n = reduce.batch_size(data, name="train_data")
    if isinstance(units, jax.core.Tracer):
        raise TypeError("`units` must be concrete (a NumPy array of unit ids), not traced")
    dtype = getattr(units, "dtype", None)
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer):
        raise TypeError(
            f"`units` must be an integer array of unit ids, one per row, shape ({n},); got "
            f"{type(units).__name__} of dtype {dtype}"
        )
    units = np.asarray(units)
    if units.shape != (n,):
        raise ValueError(
            f"`units` must have shape ({n},), one unit id per row of the training set; got "
            f"shape {units.shape}"
        )
    ids, inverse, sizes = np.unique(units, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # rows unit by unit, in row order within each
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    width = int(sizes.max())
    k = np.arange(width)
    real = k[None, :] < sizes[:, None]
    index = order[starts[:, None] + np.where(real, k[None, :], 0)]  # padding: the first row
    rows = jax.tree_util.tree_map(lambda a: np.asarray(a)[index], data)
    return (rows, real), ids


def unit_loss(loss_fn, *, keyed: bool = False):
    """The loss of a unit of :func:`group_units`: the sum of its real rows' loss sums.

    .. math::

        \\ell_u(\\theta) = \\sum_k \\text{real}_{u,k} \\, S(\\theta; \\text{rows}_{u,k}),
        \\qquad \\nabla \\ell_u = \\sum_{r \\in u} \\nabla S_r

    (``S`` the row loss, or its sum for a ``(loss_sum, n_items)`` loss). Clipping ``∇ℓ_u``
    clips the unit's summed gradient once. With ``keyed`` the unit's key ``k_u`` reaches row
    ``k`` as ``fold_in(k_u, k)`` (:func:`jaxgrad.keys.row_key`).

    Args:
      loss_fn: ``loss_fn(params, row) -> scalar | (loss_sum, n_items)`` (or ``(params, row,
        key)`` with ``keyed``).
      keyed: whether the loss takes a key.

    Returns:
      ``loss(params, (rows, real)) -> scalar`` (or ``loss(params, (rows, real), key)``).

    Example::

      >>> import numpy as np, jax.numpy as jnp
      >>> from jaxgrad.privacy import group_units, unit_loss
      >>> (rows, real), _ = group_units(np.arange(3.0), np.array([0, 1, 0]))
      >>> loss = unit_loss(lambda w, x: w * x)
      >>> float(loss(2.0, (rows[0], real[0])))  # 2·0 + 2·2
      4.0
    """
    keyed = reduce.check_flag(keyed, name="keyed")

    def loss(params, unit, *key):
        rows, real = unit
        width = real.shape[0]

        def one(row, r):
            k = (keys.row_key(key[0], r),) if keyed else ()
            return reduce.as_sum_count(loss_fn(params, row, *k))[0]

        sums = jax.vmap(one)(rows, jnp.arange(width))
        # selected, not multiplied: a padded row (a copy of a real one) adds exactly 0
        return jnp.sum(jnp.where(real, sums, jnp.zeros((), sums.dtype)))

    return loss


def augmented_loss(loss_fn, augment, *, copies: int, keyed: bool = False):
    """An example's loss as the mean over ``K`` augmented copies (augmentation multiplicity).

    .. math::

        \\ell(\\theta; x, k) = \\frac{1}{K} \\sum_{c=1}^{K} S(\\theta; \\mathrm{aug}(a_c, x)),
        \\qquad (a_1..a_K, l_1..l_K) = \\mathrm{augmentation\\_keys}(k, K)

    With it as the loss, DP-SGD clips the *mean* of the copies' gradients once per example
    (De et al. 2022, "Unlocking High-Accuracy Differentially Private Image Classification
    through Scale"), so the privacy unit and the accounting stay the example's. The copies'
    keys come from the example's key ``k`` (:func:`jaxgrad.keys.augmentation_keys`); with
    ``keyed`` copy ``c``'s loss gets its own key ``l_c`` too (dropout).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)`` (or ``(params,
        example, key)`` with ``keyed``).
      augment: ``augment(key, example) -> example``, the same structure and shapes, pure.
      copies: ``K ≥ 1``.
      keyed: whether ``loss_fn`` takes a key.

    Returns:
      ``loss(params, example, key) -> scalar``.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy import augmented_loss
      >>> flip = lambda k, x: jnp.where(jax.random.bernoulli(k), -x, x)
      >>> loss = augmented_loss(lambda w, x: w * x, flip, copies=4)
      >>> abs(float(loss(1.0, 2.0, jax.random.key(0)))) <= 2.0
      True
    """
    copies = reduce.check_positive_int(copies, name="copies")
    keyed = reduce.check_flag(keyed, name="keyed")
    if not callable(augment):
        raise TypeError(f"`augment` must be a function augment(key, example); got {augment!r}")

    def loss(params, example, key):
        aug_keys, loss_keys = keys.augmentation_keys(key, copies)
        xs = jax.vmap(lambda k: augment(k, example))(aug_keys)

        def one(x, k):
            return reduce.as_sum_count(loss_fn(params, x, *((k,) if keyed else ())))[0]

        return jnp.mean(jax.vmap(one)(xs, loss_keys))

    validate = getattr(loss_fn, "validate", None)
    if validate is not None:  # the un-augmented rows are what fit validates
        loss.validate = validate
    return loss


__all__ = ["augmented_loss", "group_units", "unit_loss"]
