"""DP-SGD's random bits: ``jax.random``'s own Threefry streams, computed where they are used.

:func:`words_at` gives the raw 64 bits of Threefry block ``j``, computed where they are
used: the DP noise (:mod:`jaxgrad.privacy.gaussian`, one normal from both words of a block)
and the Poisson sampler (:func:`jaxgrad.privacy.poisson_sample`, an integer comparison) are
built on it. :func:`normal_at` is ``jax.random.normal``'s own stream, fused the same way —
the draw DP-SGD used before :mod:`jaxgrad.privacy.gaussian`, kept as the benchmark's
baseline: its float32 values stop at ``|z| ≤ 5.42`` (tails cut), so it is **not** DP noise.

``jax.random.normal(key, (N,))`` derives its normals from the Threefry-2x32 block cipher
(20 rounds) applied to the counters ``0 .. N − 1`` (JAX's default,
``jax_threefry_partitionable``):

.. math::

    b_j = y_0 \\oplus y_1, \\quad (y_0, y_1) = \\mathrm{Threefry}_{k}(\\lfloor j / 2^{32} \\rfloor,
        j \\bmod 2^{32}), \\qquad
    u_j = \\max(u_{\\min}, 2 f(b_j) - 1), \\qquad z_j = \\sqrt 2 \\, \\mathrm{erf}^{-1}(u_j)

with ``f(b)`` the float in ``[0, 1)`` whose mantissa is ``b``'s top bits and
``u_min = nextafter(−1, 0)``. On a CPU, XLA runs JAX's Threefry as a rolled loop of five
whole-array passes; :func:`threefry2x32` has the 20 rounds written out, so XLA fuses cipher,
conversion and whatever consumes the numbers (the addition to the clipped sum, the division,
the optimizer update) into one pass over the parameters, and no ``N``-vector is ever
written. Same cipher, same counters, same key: the same cryptographic soundness as
``jax.random``, just not materialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgrad import keys

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x, r: int):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k0, k1, x0, x1):
    """The Threefry-2x32 block cipher (20 rounds; Salmon et al., 2011), unrolled.

    The same function as JAX's ``threefry2x32`` primitive (which a CPU runs as a rolled
    loop): ``k0, k1`` the key words, ``x0, x1`` the counter words (uint32 arrays of one
    shape). Returns the two output words.
    """
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def is_threefry(key) -> bool:
    """Whether ``key`` is a Threefry-2x32 key (typed, or raw ``uint32[2]`` of the default impl)."""
    if keys.is_typed_key(key):
        return str(jax.random.key_impl(key)) == "threefry2x32" and key.shape == ()
    return key.shape == (2,) and key.dtype == jnp.uint32 and _default_is_threefry()


def _default_is_threefry() -> bool:
    return str(jax.random.key_impl(jax.random.wrap_key_data(np.zeros(2, np.uint32)))) == (
        "threefry2x32"
    )


def _key_words(key):
    data = keys.key_data(key)
    return data[0], data[1]


def words_at(key, offset: int, shape):
    """The two output words of Threefry block ``j`` for counters ``j = offset .. offset + n − 1``.

    ``(y0, y1) = Threefry_key(⌊j / 2³²⌋, j mod 2³²)``, each a uint32 array of ``shape``
    (``n = prod(shape)``): 64 uniformly random bits per counter, computed where they are used.

    Args:
      key: a Threefry-2x32 key (:func:`is_threefry`).
      offset: the first counter (a Python int, ``0 ≤ offset``, ``offset + n ≤ 2⁶⁴``).
      shape: the shape of each word array (fewer than ``2³²`` entries).

    Returns:
      ``(y0, y1)``, two uint32 arrays of ``shape``.
    """
    size = int(np.prod(shape, dtype=np.int64))
    if offset < 0 or offset + size > 2**64 or size >= 2**32:
        raise ValueError(
            f"`offset` + size must lie in [0, 2**64) and one call draw < 2**32 values; got "
            f"offset {offset} and shape {tuple(shape)}"
        )
    k0, k1 = _key_words(key)
    lo0, hi0 = np.uint32(offset & 0xFFFFFFFF), np.uint32(offset >> 32)
    lo = lax.iota(jnp.uint32, size) + lo0  # wraps modulo 2**32 ...
    hi = jnp.full((size,), hi0, jnp.uint32) + (lo < lo0).astype(jnp.uint32)  # ... and carries
    y0, y1 = threefry2x32(k0, k1, hi, lo)
    return y0.reshape(shape), y1.reshape(shape)


def _unit_floats(key, offset: int, shape, dtype):
    """The ``[0, 1)`` floats under ``jax.random.uniform(key, (N,), dtype)[offset:]``, fused."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"`dtype` must be float32 or float64; got {dtype}")
    y0, y1 = words_at(key, offset, shape)
    one = np.array(1.0, dtype)
    if dtype == np.float32:
        bits, nmant, ubits = y0 ^ y1, 23, np.uint32
    else:
        bits = (y0.astype(jnp.uint64) << np.uint64(32)) | y1.astype(jnp.uint64)
        nmant, ubits = 52, np.uint64
    mantissa = (bits >> ubits(8 * dtype.itemsize - nmant)) | one.view(ubits)
    return lax.bitcast_convert_type(mantissa, dtype) - one


def normal_at(key, offset: int, shape, dtype):
    """``jax.random.normal(key, (N,), dtype)[offset : offset + n].reshape(shape)``, fused.

    Tails cut at ``|z| ≤ 5.42`` in float32: the benchmark's baseline, not DP noise (use
    :func:`jaxgrad.privacy.gaussian.normal_at`).

    Entries ``offset .. offset + n − 1`` (``n = prod(shape)``) of the standard normal vector
    that ``jax.random.normal`` draws from a Threefry ``key`` (any ``N ≥ offset + n``: entry
    ``j`` depends on ``key`` and ``j`` only), computed without the rest of the vector.

    Args:
      key: a Threefry-2x32 key (:func:`is_threefry`).
      offset: the first counter (a Python int, ``0 ≤ offset``, ``offset + n ≤ 2⁶⁴``).
      shape: the output's shape (fewer than ``2³²`` entries).
      dtype: ``float32`` or ``float64``.

    Returns:
      An array of ``shape`` and ``dtype``, i.i.d. ``N(0, 1)`` over all counters.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy.threefry import normal_at
      >>> key = jax.random.key(0)
      >>> bool(jnp.all(normal_at(key, 3, (2, 2), jnp.float32)
      ...               == jax.random.normal(key, (7,), jnp.float32)[3:].reshape(2, 2)))
      True
    """
    floats = _unit_floats(key, offset, shape, dtype)
    dtype = floats.dtype
    one = np.array(1.0, dtype)
    lowest = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
    u = lax.max(lowest, floats * (one - lowest) + lowest)
    return np.array(np.sqrt(2), dtype) * lax.erf_inv(u)
