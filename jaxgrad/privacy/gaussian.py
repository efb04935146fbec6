"""DP-SGD's Gaussian noise from 64 random bits per coordinate, with tails that are not cut.

``jax.random.normal`` turns a float32 uniform on a ``2⁻²³`` grid into a normal by ``erf⁻¹``:
its values are bounded, ``|z| ≤ √2 erf⁻¹(1 − 2⁻²⁴) ≈ 5.42``, so a released iterate beyond
that bound (one coordinate moved by more than ``5.42 σC``) can only come from a canary's
gradient — an event of probability 6e-8 per coordinate under the true Gaussian that the
accountant's ``δ`` does not cover. Here every standard normal uses both words of one
Threefry block, ``(y₀, y₁)`` (64 bits):

.. math::

    s = \\lfloor y_0 / 2^{31} \\rfloor, \\quad
    m = (y_0 \\bmod 2^{31}) \\, 2^{32} + y_1 \\in [0, 2^{63}), \\quad
    u = (m + \\tfrac12) \\, 2^{-64} \\in (0, \\tfrac12), \\qquad
    z = (-1)^s \\, \\bar\\Phi^{-1}(u)

— a sign bit and the upper-half quantile ``Φ̄⁻¹(u) = −Φ⁻¹(u)`` of a uniform ``u`` on a grid
of step ``2⁻⁶⁴``. ``u`` is rounded to the working dtype with full *relative* precision down
to its smallest value (``2⁻⁶⁵``: float32 and float64 hold it exactly), and so is the
distance to the centre ``½ − u``, computed from the complemented bits rather than by a
subtraction. ``Φ⁻¹`` is Wichura's algorithm AS 241 (1988), whose tail branches work with
``√(−log u)`` and hold far beyond the ``2⁻⁶⁵`` needed here: PPND7 (about 7 digits) in float32,
PPND16 (about 16 digits) in float64 (``jax_enable_x64`` and float64 parameters). Against
``scipy.special.ndtri`` in float64 over the whole range of ``u`` (both tails, the extreme
bit patterns, the centre) the relative error is below ``1e-6`` in float32 and ``1e-14``
in float64 (``tests/test_privacy_noise.py``).

**Support and residual δ.** The largest value is ``|z| = Φ̄⁻¹(2⁻⁶⁵) ≈ 9.155`` (all 63 bits
0), against 5.42 for ``jax.random.normal`` in float32. The Gaussian mass beyond it is
``P(|Z| > 9.155) = 2 · 2⁻⁶⁵ = 2⁻⁶⁴ ≈ 5.4e-20`` per coordinate and step: coupling the sampler
with an exact Gaussian that agrees with it up to that bound, a run of ``T`` steps on ``d``
coordinates certified ``(ε, δ)`` for the exact Gaussian is ``(ε, δ + (1 + e^ε) T d 2⁻⁶⁴)``-DP
with this noise — e.g. ``+5.4e-9 (1 + e^ε)`` for ``d = 10⁶`` parameters and ``T = 10⁵``
steps, negligible next to ``δ = 10⁻⁵`` (the old bound left 6e-8 *per coordinate and step*).
Inside the support the values are quantiles of grid points rounded to the working dtype:
the usual floating-point caveat of every implementation (Mironov, CCS 2012), not covered
by this bound.

:func:`normal_at` computes the numbers where they are used for a Threefry key (counters
``offset .. offset + n − 1``, :func:`jaxgrad.privacy.threefry.words_at`; no ``N``-vector is
written); :func:`normal` gives the same numbers for counters ``0 .. N − 1``, and for any other
key applies the same map to ``jax.random.bits(key, (2, *shape), uint32)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import keys
from jaxgrad.privacy import threefry

# AS 241 (Wichura 1988, Applied Statistics 37, 477-484): Φ⁻¹ as rationals in
# r = 0.180625 − q² (centre, |q| = |p − ½| ≤ 0.425), r = √(−log p) − 1.6 (r ≤ 5) and
# r = √(−log p) − 5 (beyond). Coefficients lowest order first; denominators start at 1.
_PPND16 = (
    (
        3.3871328727963666080e0,
        1.3314166789178437745e2,
        1.9715909503065514427e3,
        1.3731693765509461125e4,
        4.5921953931549871457e4,
        6.7265770927008700853e4,
        3.3430575583588128105e4,
        2.5090809287301226727e3,
    ),
    (
        1.0,
        4.2313330701600911252e1,
        6.8718700749205790830e2,
        5.3941960214247511077e3,
        2.1213794301586595867e4,
        3.9307895800092710610e4,
        2.8729085735721942674e4,
        5.2264952788528545610e3,
    ),
    (
        1.42343711074968357734e0,
        4.63033784615654529590e0,
        5.76949722146069140550e0,
        3.64784832476320460504e0,
        1.27045825245236838258e0,
        2.41780725177450611770e-1,
        2.27238449892691845833e-2,
        7.74545014278341407640e-4,
    ),
    (
        1.0,
        2.05319162663775882187e0,
        1.67638483018380384940e0,
        6.89767334985100004550e-1,
        1.48103976427480074590e-1,
        1.51986665636164571966e-2,
        5.47593808499534494600e-4,
        1.05075007164441684324e-9,
    ),
    (
        6.65790464350110377720e0,
        5.46378491116411436990e0,
        1.78482653991729133580e0,
        2.96560571828504891230e-1,
        2.65321895265761230930e-2,
        1.24266094738807843860e-3,
        2.71155556874348757815e-5,
        2.01033439929228813265e-7,
    ),
    (
        1.0,
        5.99832206555887937690e-1,
        1.36929880922735805310e-1,
        1.48753612908506148525e-2,
        7.86869131145613259100e-4,
        1.84631831751005468180e-5,
        1.42151175831644588870e-7,
        2.04426310338993978564e-15,
    ),
)
_PPND7 = (
    (3.3871327179e0, 5.0434271938e1, 1.5929113202e2, 5.9109374720e1),
    (1.0, 1.7895169469e1, 7.8757757664e1, 6.7187563600e1),
    (1.4234372777e0, 2.7568153900e0, 1.3067284816e0, 1.7023821103e-1),
    (1.0, 7.3700164250e-1, 1.2021132975e-1),
    (6.6579051150e0, 3.0812263860e0, 4.2868294337e-1, 1.7337203997e-2),
    (1.0, 2.4197894225e-1, 1.2258202635e-2),
)

#: The largest ``|z|`` :func:`normal_from_words` returns: ``Φ̄⁻¹(2⁻⁶⁵)``.
MAX_ABS = 9.1553


def _poly(coeffs, x):
    """``Σ_k c_k x^k`` by Horner's rule, in ``x``'s dtype."""
    acc = jnp.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc * x + np.asarray(c, x.dtype)
    return acc


def _grid_point(high, low, dtype):
    """``(high · 2³² + low + ½) · 2⁻⁶⁴`` for 31-bit ``high``, in ``dtype``, full relative precision.

    float32: each part rounded once (relative error ≤ 2⁻²⁴) and one rounded sum; float64:
    both parts exact, one rounded sum. Never 0: the smallest value is 2⁻⁶⁵.
    """
    two = lambda e: np.asarray(2.0**e, dtype)
    return high.astype(dtype) * two(-32) + (low.astype(dtype) * two(-64) + two(-65))


def normal_from_words(y0, y1, dtype=jnp.float32):
    """Standard normals from two uint32 words each: a sign bit and a tail-accurate quantile.

    .. math::

        z = (-1)^{s} \\, \\bar\\Phi^{-1}\\big((m + \\tfrac12) 2^{-64}\\big), \\qquad
        s = \\text{top bit of } y_0, \\; m = (y_0 \\bmod 2^{31}) \\, 2^{32} + y_1

    (:mod:`jaxgrad.privacy.gaussian`: AS 241 in ``dtype``; ``|z| ≤ 9.155``). Uniform
    independent words give ``z`` whose distribution is ``N(0, 1)`` up to the grid of
    ``2⁶⁴`` quantiles and the rounding of ``dtype``.

    Args:
      y0: uint32 array (its top bit is the sign).
      y1: uint32 array of the same shape.
      dtype: ``float32`` (default) or ``float64`` (needs ``jax_enable_x64``).

    Returns:
      An array of ``y0``'s shape and ``dtype``.

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.privacy.gaussian import normal_from_words
      >>> w = jnp.array([0, 0x7FFFFFFF, 0x80000000], jnp.uint32)
      >>> v = jnp.array([0, 0xFFFFFFFF, 0], jnp.uint32)
      >>> [round(float(z), 3) for z in normal_from_words(w, v)]  # the extremes and the centre
      [9.155, 0.0, -9.155]
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"`dtype` must be float32 or float64; got {dtype}")
    y0, y1 = jnp.asarray(y0), jnp.asarray(y1)
    if y0.dtype != jnp.uint32 or y1.dtype != jnp.uint32 or y0.shape != y1.shape:
        raise TypeError(
            "`y0` and `y1` must be uint32 arrays of one shape; got "
            f"{y0.dtype}{list(y0.shape)} and {y1.dtype}{list(y1.shape)}"
        )
    a, b, c, d, e, f = _PPND7 if dtype == np.float32 else _PPND16
    mask = np.uint32(0x7FFFFFFF)
    high = y0 & mask
    u = _grid_point(high, y1, dtype)  # in (0, ½): the upper tail's probability
    # ½ − u = (2⁶³ − 1 − m + ½) 2⁻⁶⁴: the complemented bits, no cancellation near the centre.
    half_gap = _grid_point(high ^ mask, ~y1, dtype)  # ½ − u
    centre = half_gap <= np.asarray(0.425, dtype)
    r_c = np.asarray(0.180625, dtype) - half_gap * half_gap
    s = jnp.sqrt(-jnp.log(u))
    near = s <= np.asarray(5.0, dtype)
    r_t = s - jnp.where(near, np.asarray(1.6, dtype), np.asarray(5.0, dtype))
    num = jnp.where(centre, half_gap * _poly(a, r_c), jnp.where(near, _poly(c, r_t), _poly(e, r_t)))
    den = jnp.where(centre, _poly(b, r_c), jnp.where(near, _poly(d, r_t), _poly(f, r_t)))
    z = num / den
    return jnp.where(y0 > mask, -z, z)


def normal_at(key, offset: int, shape, dtype=jnp.float32):
    """Entries ``offset .. offset + n − 1`` of :func:`normal`'s stream, fused, for a Threefry key.

    Entry ``j`` is :func:`normal_from_words` of Threefry block ``j``'s two words
    (:func:`jaxgrad.privacy.threefry.words_at`): it depends on ``key`` and ``j`` only, so
    XLA fuses the cipher, the quantile and whatever consumes the normals, and no
    ``N``-vector is written.

    Args:
      key: a Threefry-2x32 key (:func:`jaxgrad.privacy.threefry.is_threefry`).
      offset: the first counter (a Python int, ``0 ≤ offset``, ``offset + n ≤ 2⁶⁴``).
      shape: the output's shape (fewer than ``2³²`` entries).
      dtype: ``float32`` or ``float64``.

    Returns:
      An array of ``shape`` and ``dtype``, i.i.d. standard normal over all counters.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy.gaussian import normal, normal_at
      >>> key = jax.random.key(0)
      >>> bool(jnp.all(normal_at(key, 3, (2, 2)) == normal(key, (7,))[3:].reshape(2, 2)))
      True
    """
    y0, y1 = threefry.words_at(key, offset, shape)
    return normal_from_words(y0, y1, dtype)


def normal(key, shape, dtype=jnp.float32):
    """Standard normals with uncut tails (``|z|`` up to 9.155): :mod:`jaxgrad.privacy.gaussian`.

    For a Threefry key, entry ``j`` (row-major) is :func:`normal_at`'s counter ``j``; for
    any other key (``rbg``, ``unsafe_rbg``) the map :func:`normal_from_words` is applied to
    ``jax.random.bits(key, (2, *shape), uint32)``. The noise :func:`jaxgrad.privacy.add_noise`
    adds to a tree of ``N`` coordinates is ``normal(key, (N,), dtype)`` cut into the leaves.

    Args:
      key: a PRNG key.
      shape: the output's shape.
      dtype: ``float32`` (default) or ``float64``.

    Returns:
      An array of ``shape`` and ``dtype``.

    Example::

      >>> import jax
      >>> from jaxgrad.privacy.gaussian import normal
      >>> z = normal(jax.random.key(0), (100_000,))
      >>> abs(float(z.mean())) < 0.02, abs(float(z.std()) - 1) < 0.02
      (True, True)
    """
    key = keys.check_key(key)
    shape = tuple(shape)
    if threefry.is_threefry(key):
        return normal_at(key, 0, shape, dtype)
    y0, y1 = jax.random.bits(key, (2, *shape), jnp.uint32)
    return normal_from_words(y0, y1, dtype)


__all__ = ["MAX_ABS", "normal", "normal_at", "normal_from_words"]
