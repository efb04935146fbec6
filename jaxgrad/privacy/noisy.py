"""The noisy DP-SGD gradient, on the fast clipped-sum path, with noise added exactly once.

.. math::

    \\tilde g = \\frac{1}{q N} \\Big( \\sum_i m_i \\, \\mathrm{clip}_C(g_i)
        + \\mathcal N(0, \\sigma^2 C^2 I) \\Big),
    \\qquad \\mathrm{clip}_C(g) = g \\min(1, C / \\lVert g \\rVert)

Adding or removing one example changes the clipped *sum* by at most ``C`` in L2 norm, so the
noise is calibrated to the sum (std ``σC``) and added to the sum; the sum is then divided by
the *expected* batch size ``qN``, a public constant — not by the realised count ``Σ m_i``,
which depends on the data and is private. (Adding ``N(0, σ²C²)`` to the *mean* instead would
be ``qN`` times too little noise.)

The clipped sum is :func:`jaxgrad.clipped_grad` with ``reduction="sum"`` (its fast path: one
forward and one backward pass). Under accumulation over physical batches
(:func:`sampled_dp_grad`) the clipped sums are added first and the noise is drawn once, from
one key, for the whole step; under data parallelism the same holds — the noise is drawn in
the replicated result from one key, never once per device.

Non-finite per-example gradients (``nonfinite=``): a NaN or inf in one example's gradient
would make the whole sum NaN. With ``"drop"`` (the default) such an example is left out
(its contribution is 0, which keeps the sensitivity ``C``) and counted in
:attr:`DPInfo.num_nonfinite`; with ``"raise"`` ``f`` raises ``FloatingPointError`` naming
how many. The count is a diagnostic computed from private data: it is not privatised.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.fast.api import clipped_grad
from jaxgrad.privacy import gaussian, sampling, threefry

PyTree = Any
NONFINITE = ("drop", "raise")


class DPInfo(NamedTuple):
    """What one noisy step saw (not privatised: diagnostics only, never to be released).

    Attributes:
      num_examples: the realised number of examples ``Σ_i m_i`` that contributed.
      num_nonfinite: examples whose gradient was not finite and were left out.
      num_physical_batches: physical batches the draw needed, ``⌈b / P⌉`` (1 for
        :func:`dp_grad`; :func:`sampled_dp_grad` runs the first even for an empty draw).
    """

    num_examples: jax.Array
    num_nonfinite: jax.Array
    num_physical_batches: jax.Array


def _check_nonfinite(nonfinite):
    if nonfinite not in NONFINITE:
        raise ValueError(f"`nonfinite` must be one of {list(NONFINITE)}; got {nonfinite!r}")
    return nonfinite


def _sum_is_finite(tree):
    """Whether every entry of ``tree`` is finite, read off one sum per leaf (no boolean array).

    A NaN or ±inf entry makes its leaf's sum NaN or ±inf; a sum of finite entries that
    overflows reads as not finite too (conservative: it only triggers the exact second pass).
    """
    sums = [
        jnp.sum(x, dtype=jnp.result_type(x, jnp.float32)) for x in jax.tree_util.tree_leaves(tree)
    ]
    return jnp.isfinite(sum(sums)) if sums else jnp.bool_(True)


def clipped_sum_dropping_nonfinite(loss_fn, *, l2_clip, method="auto", chunk_size=None):
    """``f(params, batch, mask) -> (Σ_i m_i clip(g_i), Σ_i m_i, #non-finite)`` over the finite g_i.

    One pass of :func:`jaxgrad.clipped_grad` (``reduction="sum"``); only when some example's
    norm (or the sum) is not finite, a second pass with those examples masked out.
    """
    inner = clipped_grad(
        loss_fn,
        l2_clip=l2_clip,
        reduction="sum",
        return_norms=True,
        nonfinite="propagate",  # dropped here, so that an all-dropped batch sums to 0
        method=method,
        chunk_size=chunk_size,
    )

    def f(params, batch, mask, *args):
        total, norms = inner(params, batch, mask, *args)
        bad = mask & ~jnp.isfinite(norms)
        good = mask & ~bad

        def redo(_):
            again, _ = inner(params, batch, good, *args)
            # With no good example left the filler rows are bad ones: the sum is 0.
            return jax.tree_util.tree_map(lambda t: jnp.where(jnp.any(good), t, 0), again)

        need = jnp.any(bad) | ~_sum_is_finite(total)
        total = jax.lax.cond(need, redo, lambda _: total, None)
        return total, jnp.sum(good, dtype=jnp.int32), jnp.sum(bad, dtype=jnp.int32)

    return f


def add_noise(total: PyTree, key, *, stddev) -> PyTree:
    """``total + N(0, stddev² I)``: one independent normal per coordinate, all from one ``key``.

    The normals are :func:`jaxgrad.privacy.gaussian.normal` ``(key, (N,), dtype)`` (``N`` the
    number of coordinates, ``dtype`` the widest float dtype of the leaves, at least float32)
    cut into the leaves in order: leaf ``ℓ`` takes counters ``o_ℓ .. o_ℓ + n_ℓ − 1``. Their
    tails are not cut: ``|z|`` reaches 9.155 (``jax.random.normal``'s float32 values stop
    at 5.42), and the residual ``δ`` to add is ``(1 + e^ε) T d 2⁻⁶⁴`` for ``T`` steps on ``d``
    coordinates (:mod:`jaxgrad.privacy.gaussian`). With a Threefry key (JAX's default) each
    leaf's share is computed where it is added (:func:`jaxgrad.privacy.gaussian.normal_at`:
    fused with the addition, no ``N``-vector written); any other key draws the vector.

    Args:
      total: a pytree of float arrays (the clipped sum).
      key: the PRNG key; used once, for this whole tree.
      stddev: the noise's standard deviation ``σC ≥ 0`` (a number, or a traced scalar).

    Raises:
      TypeError: a leaf that is not a real floating-point array; ``key`` not one PRNG key.

    Returns:
      A pytree like ``total``.
    """
    key = reduce.check_key(key)
    if not isinstance(stddev, jax.core.Tracer) and not (
        isinstance(stddev, jax.Array) and not stddev.is_fully_addressable
    ):
        stddev = reduce.check_nonnegative_float(
            stddev, name="stddev"
        )  # a traced one is the caller's
    leaves, treedef = jax.tree_util.tree_flatten(total)
    for x in leaves:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(
                "`total` leaves must be real floating-point arrays (the noise would be rounded "
                f"or cast away); got dtype {jnp.result_type(x)}"
            )
    if not leaves or (isinstance(stddev, float) and stddev == 0):
        return total  # σ = 0: nothing to draw
    dtype = jnp.result_type(jnp.float32, *leaves)
    sizes = [x.size for x in leaves]
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    if threefry.is_threefry(key):
        draw = lambda x, start: gaussian.normal_at(key, start, x.shape, dtype)
    else:
        flat = gaussian.normal(key, (sum(sizes),), dtype)
        draw = lambda x, start: flat[start : start + x.size].reshape(x.shape)
    noisy = [
        x + (stddev * draw(x, start)).astype(x.dtype)
        for x, start in zip(leaves, offsets, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def noised_average(total: PyTree, key, *, stddev, expected_batch_size) -> PyTree:
    """``(total + N(0, stddev² I)) / expected_batch_size``: a step's one draw, one division.

    .. math::

        \\tilde g = \\frac{1}{B_e} \\big( S + \\mathcal N(0, \\text{stddev}^2 I) \\big)

    The last stage of every DP-SGD gradient here (:func:`dp_grad`, :func:`sampled_dp_grad`,
    the sharded training step), for a clipped sum ``S`` computed another way (e.g. summed
    over several devices or physical batches): :func:`add_noise`, then the division by the
    public ``B_e = qN`` — never by the realised count, which is private.

    Args:
      total: the clipped sum ``S``, a pytree of float arrays.
      key: the PRNG key of the noise (:func:`add_noise`).
      stddev: ``σC ≥ 0``.
      expected_batch_size: ``B_e = qN > 0`` (a number, or a traced scalar).

    Returns:
      A pytree like ``total``.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy import noised_average
      >>> noised_average(jnp.array([2.0, 4.0]), jax.random.key(0), stddev=0.0,
      ...                expected_batch_size=4).tolist()
      [0.5, 1.0]
    """
    if not isinstance(expected_batch_size, jax.core.Tracer):
        expected_batch_size = reduce.check_positive_float(
            expected_batch_size, name="expected_batch_size"
        )
    noisy = add_noise(total, key, stddev=stddev)
    return jax.tree_util.tree_map(lambda t: t / jnp.asarray(expected_batch_size, t.dtype), noisy)


def _finish(nonfinite, return_info, name):
    """The host side of ``f``: raise on non-finite examples if asked, strip the info."""
    return_info = reduce.check_flag(return_info, name="return_info")

    def finish(grads, info):
        if nonfinite == "raise":
            if isinstance(info.num_nonfinite, jax.core.Tracer):
                raise ValueError(
                    f"{name}(nonfinite='raise') checks its examples on the host, so `f` must be "
                    "called outside jax.jit; under jit use nonfinite='drop' with "
                    "return_info=True and check info.num_nonfinite"
                )
            bad = int(info.num_nonfinite)
            if bad:
                raise FloatingPointError(
                    f"{bad} example(s) of this batch have a non-finite (NaN or inf) gradient; "
                    "check the data, or pass nonfinite='drop' to leave such examples out"
                )
        return (grads, info) if return_info else grads

    return finish


def dp_grad(
    loss_fn,
    *,
    l2_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    nonfinite: str = "drop",
    return_info: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
):
    """The DP-SGD gradient of one Poisson-sampled batch: clip, sum, add noise once, divide.

    .. math::

        \\tilde g = \\frac{1}{B_e} \\Big( \\sum_i m_i \\, g_i \\min(1, C / \\lVert g_i \\rVert)
            + \\mathcal N(0, \\sigma^2 C^2 I) \\Big)

    with ``B_e = qN`` the *expected* batch size (public), not the realised ``Σ m_i``. ``batch``
    and ``mask`` must come from Poisson sampling (:func:`poisson_sample`) for the accounting of
    :func:`jaxgrad.privacy.epsilon` to hold; a draw larger than the physical batch must be
    accumulated, not cut: use :func:`sampled_dp_grad`, which does both. ``g_i`` is the
    gradient of example ``i``'s loss *sum* (for a token loss the unit of privacy is the
    sequence).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      l2_clip: the clipping norm ``C > 0``.
      noise_multiplier: ``σ ≥ 0``; the noise std on the sum is ``σC``.
      expected_batch_size: ``B_e = qN > 0``, the divisor.
      nonfinite: ``"drop"`` (default: leave out examples with a non-finite gradient and count
        them) or ``"raise"`` (``FloatingPointError``; ``f`` must then run outside jit).
      return_info: if True, ``f`` returns ``(grads, DPInfo)``.
      method: ``"auto"`` (fast clipped sum) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.

    Returns:
      ``f(params, batch, mask, key, *args) -> grads`` (or ``(grads, info)``); ``mask=None``
      means all rows are real, ``key`` seeds the noise, and extra arguments are passed to
      every call ``loss_fn(params, example, *args)``, as for :func:`jaxgrad.batch_grad`.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy import dp_grad
      >>> loss = lambda w, ex: jnp.dot(ex, w)  # gradient of example i is x_i
      >>> f = dp_grad(loss, l2_clip=1.0, noise_multiplier=0.0, expected_batch_size=4)
      >>> g = f(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 0.5]]), None, jax.random.key(0))
      >>> [round(float(v), 6) for v in g]  # ([0.6, 0.8] + [0, 0.5]) / 4
      [0.15, 0.325]
    """
    l2_clip = reduce.check_positive_float(l2_clip, name="l2_clip")
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    b_e = reduce.check_positive_float(expected_batch_size, name="expected_batch_size")
    nonfinite = _check_nonfinite(nonfinite)
    clipped = clipped_sum_dropping_nonfinite(
        loss_fn, l2_clip=l2_clip, method=method, chunk_size=chunk_size
    )

    @jax.jit
    def core(params, batch, mask, key, args):
        total, count, bad = clipped(params, batch, mask, *args)
        grads = noised_average(total, key, stddev=sigma * l2_clip, expected_batch_size=b_e)
        return grads, DPInfo(count, bad, jnp.int32(1))

    finish = _finish(nonfinite, return_info, "dp_grad")

    def f(params, batch, mask, key, *args):
        mask = reduce.check_mask(mask, reduce.batch_size(batch))
        return finish(*core(params, batch, mask, reduce.check_key(key), args))

    f.__name__ = f.__qualname__ = "dp_grad"
    f.__doc__ = dp_grad.__doc__
    return f


def sampled_dp_grad(
    loss_fn,
    *,
    l2_clip: float,
    noise_multiplier: float,
    sampling_rate: float,
    physical_batch_size: int,
    nonfinite: str = "drop",
    return_info: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
):
    """One whole DP-SGD step's gradient: Poisson-sample the data set, clip, sum, noise once.

    Draws a Poisson sample of ``data`` with rate ``q`` (:func:`poisson_sample`), runs it in
    ``⌈b / P⌉`` physical batches of size ``P`` (a ``lax.while_loop``: fixed shapes, no
    recompilation, no example dropped however large the draw), adds their clipped sums,
    then adds ``N(0, σ²C² I)`` once and divides once by ``qN``:

    .. math::

        \\tilde g = \\frac{1}{qN} \\Big( \\sum_{k=1}^{\\lceil b/P \\rceil} \\sum_{i \\in k}
            \\mathrm{clip}_C(g_i) + \\mathcal N(0, \\sigma^2 C^2 I) \\Big)

    The whole data set must fit on the device (it is gathered from, row by row).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar | (loss_sum, n_items)``.
      l2_clip: the clipping norm ``C > 0``.
      noise_multiplier: ``σ ≥ 0``.
      sampling_rate: ``q`` in (0, 1]; the expected batch size is ``qN``.
      physical_batch_size: ``P``, examples per physical batch (memory bound, not privacy).
      nonfinite: ``"drop"`` (default) or ``"raise"``, as for :func:`dp_grad`.
      return_info: if True, ``f`` returns ``(grads, DPInfo)``.
      method: ``"auto"`` (fast clipped sum) or ``"vmap"`` (materialised reference).
      chunk_size: if set, examples are processed that many at a time.

    Returns:
      ``f(params, data, key, *args) -> grads`` (or ``(grads, info)``); the sample and the
      noise are pure functions of ``key``; extra arguments reach every call
      ``loss_fn(params, example, *args)``, as for :func:`jaxgrad.batch_grad`.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy import sampled_dp_grad
      >>> loss = lambda w, ex: jnp.dot(ex, w)
      >>> f = sampled_dp_grad(loss, l2_clip=1.0, noise_multiplier=1.0, sampling_rate=0.1,
      ...                     physical_batch_size=8, return_info=True)
      >>> g, info = f(jnp.ones(3), jnp.ones((100, 3)), jax.random.key(0))
      >>> g.shape, int(info.num_physical_batches) == -(-int(info.num_examples) // 8)
      ((3,), True)
    """
    l2_clip = reduce.check_positive_float(l2_clip, name="l2_clip")
    sigma = reduce.check_nonnegative_float(noise_multiplier, name="noise_multiplier")
    q = sampling.check_sampling_rate(sampling_rate)
    p = reduce.check_positive_int(physical_batch_size, name="physical_batch_size")
    nonfinite = _check_nonfinite(nonfinite)
    clipped = clipped_sum_dropping_nonfinite(
        loss_fn, l2_clip=l2_clip, method=method, chunk_size=chunk_size
    )

    @jax.jit
    def core(params, data, key, args):
        n = reduce.batch_size(data, name="data")
        sample_key, noise_key = jax.random.split(key)
        sample = sampling.poisson_sample(
            sample_key, num_examples=n, sampling_rate=q, physical_batch_size=p
        )
        steps = sampling.num_physical_batches(sample.count, p)

        def one(k):
            idx, mask = sampling.physical_batch(sample, k, physical_batch_size=p)
            return clipped(params, jax.tree_util.tree_map(lambda a: a[idx], data), mask, *args)

        def body(carry):
            k, acc = carry
            return k + 1, jax.tree_util.tree_map(jnp.add, acc, one(k))

        # The first physical batch runs outside the loop: it holds the whole draw on almost
        # every step (see default_physical_batch_size), and XLA compiles straight-line code
        # better than a loop body (on a CPU a CNN's pass ran ~3.5x slower inside the loop).
        # A draw of 0 examples runs it fully masked: a sum of 0, as the loop would give.
        _, (total, count, bad) = jax.lax.while_loop(
            lambda c: c[0] < steps, body, (jnp.int32(1), one(jnp.int32(0)))
        )
        grads = noised_average(total, noise_key, stddev=sigma * l2_clip, expected_batch_size=q * n)
        return grads, DPInfo(count, bad, steps)

    finish = _finish(nonfinite, return_info, "sampled_dp_grad")

    def f(params, data, key, *args):
        return finish(*core(params, data, reduce.check_key(key), args))

    f.__name__ = f.__qualname__ = "sampled_dp_grad"
    f.__doc__ = sampled_dp_grad.__doc__
    return f
