"""Banded matrix-factorisation noise (BandMF): correlated Gaussian noise across DP-SGD steps.

DP-SGD releases the noisy gradients ``x_t + w_t``; what training uses is (a linear function
of) their prefix sums ``A(X + W)``, ``A`` the lower-triangular all-ones ``n × n`` matrix. The
matrix mechanism (Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization",
https://arxiv.org/abs/2306.08153) factors ``A = B C`` and releases ``B (C X + Z)`` with
``Z ~ N(0, σ²Δ² I)``; equivalently, step ``t`` adds the noise ``w = C⁻¹ z``:

.. math::

    A (X + C^{-1} Z) = A X + B Z, \\qquad
    \\operatorname{Cov}(w) = \\sigma^2 \\Delta^2 \\, C^{-1} C^{-\\top}

Here ``C`` is lower-triangular, Toeplitz and *banded*: ``C_{t,s} = c_{t-s}`` for
``0 ≤ t − s < b`` and 0 elsewhere, with ``c_0 > 0`` and ``‖c‖₂ = 1`` (every column of ``C``
has norm at most 1: the sensitivity of ``C X`` to one participation is ``Δ``). Because ``C``
is banded, ``w = C⁻¹ z`` is computed in a stream, carrying the last ``b − 1`` noise vectors
(:func:`correlated_noise`):

.. math::

    w_t = \\frac{1}{c_0} \\Big( z_t - \\sum_{j=1}^{b-1} c_j \\, w_{t-j} \\Big)

With ``b = 1`` (``c = [1]``) this is ``w_t = z_t``: independent Gaussian noise, DP-SGD.

**Accounting (amplified BandMF).** The examples are split into ``b`` groups (row ``i`` in
group ``i mod b``); step ``t`` Poisson-samples, with rate ``q``, only group ``t mod b``
(:class:`jaxgrad.privacy.sources.CyclicPoisson`). An example then takes part only in steps
``b`` apart, which touch disjoint rows of the banded ``C``: the columns of ``C`` it moves
never overlap, and the mechanism is (Choquette-Choo et al. 2023, Theorem 4) as private as
DP-SGD with rate ``q`` and noise multiplier ``σ`` run for ``⌈n / b⌉`` steps —
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), ⌈n / b⌉)``
(:func:`dp_event`), the event jax_privacy's ``DpsgdTrainingAccountant`` composes for
``cycle_length = b``. Neighbouring data sets differ in one example's row (zero-out: its
clipped gradient replaced by 0, or added or removed at a fixed row), every other example
keeping its group; removing a row from the middle of the data set would move the others'
groups and is not covered.

**The strategy.** :func:`sqrt_coefs` is the closed form: the coefficients of
``(1 − x)^{-1/2}`` (``C = A^{1/2}``, the optimal Toeplitz factorisation of Fichtenberger,
Henzinger and Upadhyay 2023) cut to ``b`` bands and normalised to ``‖c‖ = 1``.
:func:`optimized_coefs` minimises the prefix sums' mean squared error (:func:`loss`) over
``c`` with L-BFGS, starting from it (jax_privacy's ``optimize_banded_toeplitz``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import reduce
from jaxgrad.privacy._accounting.events import poisson_event
from jaxgrad.privacy._accounting.library import dpa

STRATEGIES = ("sqrt", "optimized")


def check_bands(bands, *, steps: int | None = None) -> int:
    """``b`` as an int in ``[1, steps]``, or an error naming ``bands``."""
    b = reduce.check_positive_int(bands, name="bands")
    if steps is not None and b > steps:
        raise ValueError(
            f"`bands` ({b}) is larger than the number of steps ({steps}); expected at most "
            f"{steps} (a band past the last step would never be used)"
        )
    return b


def check_coefs(coefs) -> np.ndarray:
    """The strategy ``c`` as a float64 vector with ``c_0 > 0`` and ``‖c‖₂ = 1`` (1e-6)."""
    c = np.asarray(coefs, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.all(np.isfinite(c)):
        raise ValueError(
            f"`coefs` must be a non-empty 1-D vector of finite numbers; got {np.asarray(coefs)!r}"
        )
    if c[0] <= 0:
        raise ValueError(f"`coefs[0]` must be > 0 (C must be invertible); got {c[0]!r}")
    norm = float(np.linalg.norm(c))
    if abs(norm - 1.0) > 1e-6:
        raise ValueError(
            f"`coefs` must have L2 norm 1 (the largest column norm of C, the sensitivity "
            f"factor the noise multiplier is calibrated for); got norm {norm:.6g}: divide by it"
        )
    return c


def sqrt_coefs(bands: int) -> np.ndarray:
    """The closed-form strategy: ``(1 − x)^{-1/2}`` cut to ``b`` bands, normalised.

    .. math::

        \\tilde c_j = \\binom{2j}{j} 4^{-j} = \\prod_{k=1}^{j} \\frac{2k - 1}{2k},
        \\qquad c = \\tilde c_{0..b-1} / \\lVert \\tilde c_{0..b-1} \\rVert_2

    Args:
      bands: ``b ≥ 1``.

    Returns:
      A float64 vector of ``b`` coefficients with ``‖c‖ = 1`` (``[1.]`` for ``b = 1``).

    Example::

      >>> from jaxgrad.privacy.bandmf import sqrt_coefs
      >>> [round(float(v), 4) for v in sqrt_coefs(2)]  # [1, 1/2] / |[1, 1/2]|
      [0.8944, 0.4472]
    """
    b = check_bands(bands)
    k = np.arange(1, b)
    c = np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])
    return c / np.linalg.norm(c)


def inverse_coefs(coefs, steps: int):
    """The first ``n`` Toeplitz coefficients ``r`` of ``C⁻¹`` (``C⁻¹_{t,s} = r_{t-s}``).

    ``r_0 = 1/c_0``, ``r_k = −(Σ_{j=1}^{min(k, b−1)} c_j r_{k−j}) / c_0``: the streaming
    recursion of :func:`correlated_noise` applied to ``z = e_0`` (differentiable; a
    ``lax.scan`` over the ``n`` steps).
    """
    c = jnp.asarray(coefs)
    b = c.shape[0]

    def step(history, z):  # history: the last b−1 outputs, newest first
        r = (z - jnp.dot(c[1:], history)) / c[0]
        return jnp.concatenate([r[None], history[:-1]]) if b > 1 else history, r

    z = jnp.zeros((steps,), c.dtype).at[0].set(1)
    _, r = jax.lax.scan(step, jnp.zeros((b - 1,), c.dtype), z)
    return r


def loss(coefs, steps: int):
    """The prefix sums' mean squared error per unit of noise, times the sensitivity².

    .. math::

        L(c) = \\lVert c \\rVert^2 \\; \\frac{1}{n} \\lVert A C^{-1} \\rVert_F^2
             = \\lVert c \\rVert^2 \\; \\frac{1}{n} \\sum_{k=0}^{n-1} \\sum_{j \\le k} s_j^2,
        \\qquad s = \\mathrm{cumsum}(r)

    (``A C⁻¹`` is Toeplitz with coefficients ``s``; its row ``k`` has squared norm
    ``Σ_{j≤k} s_j²``.) Scale-invariant in ``c``; independent noise (``b = 1``) gives
    ``(n + 1) / 2``. jax_privacy's ``toeplitz.loss`` with ``reduction_fn=jnp.mean``.
    """
    c = jnp.asarray(coefs)
    s = jnp.cumsum(inverse_coefs(c, steps))
    return jnp.mean(jnp.cumsum(s**2)) * jnp.sum(c**2)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _lbfgs(init, steps, iterations):
    import optax

    f = functools.partial(loss, steps=steps)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)

    def body(_, carry):
        c, state = carry
        value, grad = value_and_grad(c, state=state)
        updates, state = opt.update(grad, state, c, value=value, grad=grad, value_fn=f)
        return c + updates, state

    c, _ = jax.lax.fori_loop(0, iterations, body, (init, opt.init(init)))
    return c


def optimized_coefs(bands: int, *, steps: int, iterations: int = 50) -> np.ndarray:
    """The banded Toeplitz strategy minimising :func:`loss` for ``n`` steps (L-BFGS).

    .. math::

        c^\\star = \\operatorname*{arg\\,min}_{c \\in \\mathbb R^b} \\; \\lVert c \\rVert^2
            \\frac{1}{n} \\lVert A C(c)^{-1} \\rVert_F^2, \\qquad
        \\text{returned: } c^\\star / \\lVert c^\\star \\rVert

    ``iterations`` steps of ``optax.lbfgs`` (with its zoom line search) from
    :func:`sqrt_coefs`, in the default float precision; the answer is kept only if it is
    finite, has ``c_0 > 0`` and a loss no larger than the start's (otherwise the start is
    returned). A stationary point, not certified globally optimal.

    Args:
      bands: ``b ≥ 1`` (``b = 1`` returns ``[1.]``).
      steps: ``n ≥ b``, the number of steps the strategy is for.
      iterations: L-BFGS iterations.

    Returns:
      A float64 vector of ``b`` coefficients with ``‖c‖ = 1``.

    Example::

      >>> from jaxgrad.privacy.bandmf import loss, optimized_coefs, sqrt_coefs
      >>> c = optimized_coefs(4, steps=64)
      >>> bool(loss(c, 64) <= loss(sqrt_coefs(4), 64) * (1 + 1e-6))
      True
    """
    n = reduce.check_positive_int(steps, name="steps")
    b = check_bands(bands, steps=n)
    iterations = reduce.check_positive_int(iterations, name="iterations")
    start = sqrt_coefs(b)
    if b == 1:
        return start
    dtype = jnp.result_type(float)
    c = np.asarray(_lbfgs(jnp.asarray(start, dtype), n, iterations), np.float64)
    if not (np.all(np.isfinite(c)) and c[0] > 0):
        return start
    c = c / np.linalg.norm(c)
    return c if float(loss(c, n)) <= float(loss(start, n)) else start


def strategy_coefs(bands: int, *, steps: int, strategy: str = "sqrt") -> np.ndarray:
    """``b`` strategy coefficients by name: ``"sqrt"`` (:func:`sqrt_coefs`) or
    ``"optimized"`` (:func:`optimized_coefs` for ``steps``)."""
    n = reduce.check_positive_int(steps, name="steps")
    b = check_bands(bands, steps=n)
    reduce.check_choice(strategy, STRATEGIES, name="strategy")
    return sqrt_coefs(b) if strategy == "sqrt" else optimized_coefs(b, steps=n)


def strategy_matrix(coefs, steps: int) -> np.ndarray:
    """The dense ``n × n`` banded lower-triangular Toeplitz ``C`` (for checks and plots).

    Example::

      >>> from jaxgrad.privacy.bandmf import strategy_matrix
      >>> strategy_matrix([0.6, 0.8], 3).tolist()
      [[0.6, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.8, 0.6]]
    """
    c = check_coefs(coefs)
    n = reduce.check_positive_int(steps, name="steps")
    m = np.zeros((n, n))
    for j, v in enumerate(c[:n]):
        m += v * np.eye(n, k=-j)
    return m


def init_history(like, bands: int):
    """Zeros for the last ``b − 1`` noise vectors: each leaf of ``like`` with a leading
    axis of ``b − 1`` (newest first)."""
    b = check_bands(bands)
    return jax.tree_util.tree_map(lambda x: jnp.zeros((b - 1, *jnp.shape(x)), x.dtype), like)


def correlated_noise(z, history, coefs):
    """One step of ``w = C⁻¹ z`` in a stream: ``(w_t, new history)``.

    .. math::

        w_t = \\frac{1}{c_0} \\Big( z_t - \\sum_{j=1}^{b-1} c_j \\, w_{t-j} \\Big)

    Args:
      z: this step's independent noise ``z_t``, a pytree of float arrays.
      history: ``w_{t-1}, …, w_{t-b+1}`` stacked along a leading axis (newest first), a pytree
        like ``z`` (:func:`init_history`: zeros, as before the first step).
      coefs: the strategy ``c`` (``b`` numbers, :func:`check_coefs`).

    Returns:
      ``(w, history)``: the noise to add, and the history with ``w`` first and the oldest
      dropped. With ``b = 1``: ``(z, history)`` (``z / 1``: the same bits).

    Example::

      >>> import jax.numpy as jnp
      >>> from jaxgrad.privacy.bandmf import correlated_noise, init_history
      >>> c = [0.6, 0.8]
      >>> h = init_history(jnp.zeros(1), 2)
      >>> w0, h = correlated_noise(jnp.array([0.6]), h, c)  # C⁻¹ e_0 = [1, -4/3, ...]
      >>> w1, h = correlated_noise(jnp.array([0.0]), h, c)
      >>> [round(float(w0[0]), 4), round(float(w1[0]), 4)]
      [1.0, -1.3333]
    """
    c = check_coefs(coefs)

    def one(z_leaf, h):
        tail = jnp.tensordot(jnp.asarray(c[1:], z_leaf.dtype), h, axes=1) if c.size > 1 else 0
        w = (z_leaf - tail) / jnp.asarray(c[0], z_leaf.dtype)
        return w, (jnp.concatenate([w[None], h[:-1]]) if c.size > 1 else h)

    pairs = jax.tree_util.tree_map(one, z, history)  # z's structure, (w, h) at each leaf
    w = jax.tree_util.tree_map(lambda _, p: p[0], z, pairs)
    return w, jax.tree_util.tree_map(lambda _, p: p[1], z, pairs)


def participations(steps: int, bands: int) -> int:
    """``⌈n / b⌉``: the most steps any one example can take part in."""
    return -(-int(steps) // check_bands(bands))


def dp_event(*, noise_multiplier: float, sampling_rate: float, steps: int, bands: int):
    """Amplified BandMF's event for ``n`` steps with ``b`` bands (and ``b`` groups).

    .. math::

        \\mathrm{SelfComposed}\\big(\\mathrm{PoissonSampled}(q,\\,
            \\mathrm{Gaussian}(\\sigma)),\\ \\lceil n / b \\rceil\\big)

    for a strategy with ``‖c‖ = 1`` (sensitivity ``Δ`` per participation), ``q`` the
    within-group rate of :class:`jaxgrad.privacy.sources.CyclicPoisson`.

    Example::

      >>> from jaxgrad.privacy.bandmf import dp_event
      >>> dp_event(noise_multiplier=1.0, sampling_rate=0.1, steps=10, bands=4).count
      3
    """
    b = check_bands(bands)
    n = reduce.check_positive_int(steps, name="steps")
    one = poisson_event(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate)
    return dpa().SelfComposedDpEvent(one, participations(n, b))


__all__ = [
    "STRATEGIES",
    "check_bands",
    "check_coefs",
    "correlated_noise",
    "dp_event",
    "init_history",
    "inverse_coefs",
    "loss",
    "optimized_coefs",
    "participations",
    "sqrt_coefs",
    "strategy_coefs",
    "strategy_matrix",
]
