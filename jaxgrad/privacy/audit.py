"""Auditing a DP training run in one run (Steinke, Nasr and Jagielski, NeurIPS 2023).

A user's DP-SGD pipeline claims ``(ε, δ)``. The audit inserts ``m`` *canaries* into the
training data, each independently with probability ½, trains **once**, and then guesses from
the trained parameters which canaries were in. If the run really is ``(ε, δ)``-DP, the number
``v`` of correct guesses among ``r`` is stochastically dominated by a ``Bin(r, e^ε/(1+e^ε))``
(up to a ``δ`` term), so many correct guesses *reject* ``(ε, δ)``-DP: the audit returns the
largest ``ε`` it rejects at the given confidence, a *lower bound* on the run's true ``ε``
(:func:`one_run_epsilon`). A correct run's lower bound stays below its claim; a broken one
(too little noise, no clipping, noise scaled to the mean, a public key) exceeds it.

The canaries here are *Dirac* canaries, which make the audit independent of the model: canary
``k`` is an example whose gradient is exactly ``C e_{j_k}`` (``C`` the clipping norm, ``j_k`` a
coordinate of the flattened parameters, one per canary), so it moves only its own coordinate
and is not clipped; the score of canary ``k`` is how far its coordinate moved against that
gradient, ``θ⁰_{j_k} − θ^T_{j_k}``.

The pieces (:func:`dirac_canaries`, :func:`with_canaries`, :func:`insert`, :func:`score`,
:func:`guess`, :func:`one_run_epsilon`) work with any training function; :func:`audit`
strings them together around one call ``train(loss_fn, params, data) -> params``.
See ``docs/privacy-audit.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import keys, reduce, sharding
from jaxgrad.privacy import sampling

PyTree = Any

#: The bisection stops once the bracket ``[lo, hi]`` around the sup is this narrow; ``lo`` is
#: returned (rejected at the confidence level), so the result is low by less than this.
EPSILON_TOL = 1e-6


# --------------------------------------------------------------------------------------------
# The bound
# --------------------------------------------------------------------------------------------


def _check_int(value, *, name: str, low: int, high: int | None = None, high_name: str = "") -> int:
    number = reduce.as_number(value, name=name, integer=True)
    if number < low or (high is not None and number > high):
        expected = f"an integer ≥ {low}" + (f" and ≤ {high_name} ({high})" if high_name else "")
        raise ValueError(f"`{name}` must be {expected}; got {value!r}")
    return number


def _check_confidence(confidence) -> float:
    c = reduce.as_number(confidence, name="confidence")
    if not 0 < c < 1:
        raise ValueError(f"`confidence` must be a number in (0, 1), e.g. 0.95; got {confidence!r}")
    return c


def _check_delta(delta) -> float:
    d = reduce.as_number(delta, name="delta")
    if not 0 <= d < 1:
        raise ValueError(f"`delta` must be a number in [0, 1); got {delta!r}")
    return d


class _PValue:
    """``log p-value(ε)`` for fixed ``(m, r, v, δ)``, in log space (no overflow or underflow).

    .. math::

        \\text{p-value}(\\varepsilon) = P[\\mathrm{Bin}(r, p) \\ge v]
          + 2 m \\delta \\max_{1 \\le i \\le v} \\frac{P[v > \\mathrm{Bin}(r, p) \\ge v - i]}{i},
        \\qquad p = \\frac{e^\\varepsilon}{1 + e^\\varepsilon}
    """

    def __init__(self, m: int, r: int, v: int, delta: float):
        self.m, self.r, self.v, self.delta = m, r, v, delta
        k = np.arange(r + 1)
        lgamma = np.vectorize(math.lgamma, otypes=[float])
        self.k = k
        self.log_choose = lgamma(r + 1.0) - lgamma(k + 1.0) - lgamma(r - k + 1.0)
        self.log_i = np.log(np.arange(1, v + 1, dtype=float))

    def __call__(self, eps: float) -> float:
        r, v = self.r, self.v
        # log p = -log(1 + e^-ε), log(1 - p) = -ε - log(1 + e^-ε): exact for large ε too.
        log_p = -math.log1p(math.exp(-eps))
        log_q = -eps + log_p
        log_pmf = self.log_choose + self.k * log_p + (r - self.k) * log_q
        log_beta = np.logaddexp.reduce(log_pmf[v:])  # P[Bin >= v]
        if self.delta == 0 or v == 0:
            return float(log_beta)
        # log P[v > Bin >= v - i] for i = 1..v: cumulative sums of pmf(v-1), pmf(v-2), ...
        log_window = np.logaddexp.accumulate(log_pmf[v - 1 :: -1])
        log_alpha = np.max(log_window - self.log_i)
        return float(np.logaddexp(log_beta, math.log(2 * self.m * self.delta) + log_alpha))


def one_run_p_value(
    *, num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """The p-value of ``v`` correct guesses out of ``r`` if the run were ``(ε, δ)``-DP.

    Steinke, Nasr and Jagielski (2023), the (ε, δ) case of their main theorem, as their
    algorithm computes it (the function ``p_value_DP_audit`` of the paper):

    .. math::

        \\text{p-value}(\\varepsilon) = P[\\mathrm{Bin}(r, p) \\ge v]
          + 2 m \\delta \\max_{1 \\le i \\le v} \\frac{P[v > \\mathrm{Bin}(r, p) \\ge v - i]}{i},
        \\qquad p = \\frac{e^\\varepsilon}{1 + e^\\varepsilon}

    computed in log space from the binomial's log-pmf (no SciPy), capped at 1.

    Args:
      num_canaries: ``m``, canaries each included independently with probability ½.
      num_guesses: ``r ≤ m``, the guesses made (abstentions excluded).
      num_correct: ``v ≤ r``, the correct ones.
      epsilon: ``ε ≥ 0`` of the null hypothesis.
      delta: ``δ`` in [0, 1) of the null hypothesis.

    Returns:
      The p-value, a float in [0, 1].

    Example::

      >>> from jaxgrad.privacy.audit import one_run_p_value
      >>> round(one_run_p_value(num_canaries=10, num_guesses=10, num_correct=10,
      ...                       epsilon=0.0, delta=0.0), 6)  # 2^-10: ten fair coin flips
      0.000977
    """
    m, r, v, delta = _check_counts(num_canaries, num_guesses, num_correct, delta)
    eps = reduce.as_number(epsilon, name="epsilon")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"`epsilon` must be a finite number ≥ 0; got {epsilon!r}")
    return min(1.0, math.exp(_PValue(m, r, v, delta)(eps)))


def _check_counts(num_canaries, num_guesses, num_correct, delta):
    m = _check_int(num_canaries, name="num_canaries", low=1)
    r = _check_int(num_guesses, name="num_guesses", low=0, high=m, high_name="num_canaries")
    v = _check_int(num_correct, name="num_correct", low=0, high=r, high_name="num_guesses")
    return m, r, v, _check_delta(delta)


def one_run_epsilon(
    *,
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The one-run lower bound on ε: the largest ε that ``v`` correct guesses of ``r`` reject.

    .. math::

        \\varepsilon_{\\text{lower}} = \\sup \\{ \\varepsilon \\ge 0 :
            \\text{p-value}(\\varepsilon) < 1 - \\text{confidence} \\}
            \\quad (0 \\text{ if there is none})

    with the p-value of :func:`one_run_p_value`. If the run is ``(ε, δ)``-DP, the probability
    (over the canaries' coin flips and the run's randomness) that this exceeds ``ε`` is at most
    ``1 − confidence``. The sup is found by bisection on ``[0, hi]`` (``hi`` doubled until
    rejected no more) down to a bracket of width ``EPSILON_TOL = 1e-6``; the returned value is
    the bracket's lower end, at which the p-value was checked to be below ``1 − confidence`` —
    so it is never above the sup, and below it by less than ``1e-6`` (the p-value increases
    with ε). Rejecting ``(ε̂, δ)``-DP rejects every smaller ε too, so the result is a valid
    lower bound however the bisection ends.

    The largest value ``r`` guesses can give, all correct and with ``δ = 0``, is
    ``log(p / (1 − p))`` with ``p = (1 − confidence)^{1/r}``: about 3.5 for ``r = 100`` and
    5.8 for ``r = 1000`` at 95% (so auditing a claim of ε needs ``r`` large enough that this
    exceeds it); ``δ > 0`` lowers it, more so for larger ``m δ``.

    Args:
      num_canaries: ``m ≥ 1``, canaries each included independently with probability ½.
      num_guesses: ``r``, ``0 ≤ r ≤ m``, the guesses made (abstentions excluded).
      num_correct: ``v``, ``0 ≤ v ≤ r``, the correct ones.
      delta: the ``δ`` of the claim, in [0, 1).
      confidence: in (0, 1), e.g. 0.95.

    Returns:
      ``ε_lower ≥ 0``, a float.

    Raises:
      ValueError: an argument of the wrong kind or out of range, naming it.

    Example::

      >>> from jaxgrad.privacy.audit import one_run_epsilon
      >>> round(one_run_epsilon(num_canaries=1000, num_guesses=100, num_correct=100,
      ...                       delta=0.0), 2)  # log(p / (1 - p)), p = 0.05 ** (1 / 100)
      3.49
      >>> one_run_epsilon(num_canaries=1000, num_guesses=100, num_correct=50, delta=1e-5)
      0.0
    """
    m, r, v, delta = _check_counts(num_canaries, num_guesses, num_correct, delta)
    log_alpha = math.log1p(-_check_confidence(confidence))
    log_p_value = _PValue(m, r, v, delta)
    if not log_p_value(0.0) < log_alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while log_p_value(hi) < log_alpha:  # terminates: p-value → 1 as ε → ∞ (p → 1)
        lo, hi = hi, 2 * hi
    while hi - lo > EPSILON_TOL:
        mid = 0.5 * (lo + hi)
        if log_p_value(mid) < log_alpha:
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------------------------
# Dirac canaries
# --------------------------------------------------------------------------------------------


class Canaries(NamedTuple):
    """The audit's canaries: which coordinate each one moves and whether it was included.

    The include bits are the audit's secret: the training run must not see them (only the rows
    :func:`insert` appends).

    Attributes:
      coordinates: ``(m,)`` int64, canary ``k``'s coordinate ``j_k`` in the flattened
        parameters (the leaves in ``jax.tree_util.tree_leaves`` order, each ravelled in C
        order, as ``jax.flatten_util.ravel_pytree``); all distinct.
      included: ``(m,)`` bool, whether canary ``k`` is in the training data (each
        independently with probability ½).
      l2_clip: ``C``, the norm of every canary's gradient.
    """

    coordinates: np.ndarray
    included: np.ndarray
    l2_clip: float

    @property
    def num_canaries(self) -> int:
        """``m``."""
        return int(self.coordinates.shape[0])


def dirac_canaries(
    params: PyTree, *, num_canaries: int, l2_clip: float, key, leaves: PyTree | None = None
) -> Canaries:
    """Draws ``m`` Dirac canaries for ``params``: distinct coordinates, include bits with rate ½.

    Canary ``k``'s gradient will be exactly ``C e_{j_k}`` (:func:`with_canaries`): norm ``C``,
    so clipping at ``C`` leaves it whole, and it moves coordinate ``j_k`` only. The
    coordinates are a uniformly random ``m``-subset of the eligible coordinates (all of them,
    or those of the leaves ``leaves`` selects); the include bits are independent fair coins
    (:func:`jaxgrad.privacy.inclusion_mask` at rate ½).

    A leaf that holds canary coordinates is used twice in the canary loss (by the model and by
    the canaries), so jaxgrad's fast clipped sum forms its per-example gradients (batch × leaf
    size); ``leaves`` can keep the canaries in small leaves (biases, a layer of modest size)
    to spare a large model that memory. The audit covers the whole step either way: clipping
    and noise act on the whole gradient.

    Args:
      params: the model's initial parameters (any pytree of real floating-point arrays).
      num_canaries: ``m ≥ 1``, at most the number of eligible coordinates.
      l2_clip: ``C > 0``, the run's clipping norm (the sensitivity its ε is claimed for).
      key: the PRNG key of the draw (keep it from the training run: it decides the bits).
      leaves: optional, a pytree of booleans with ``params``' structure: which leaves may
        hold canary coordinates (default: all).

    Returns:
      A :class:`Canaries`.

    Raises:
      ValueError: ``m`` above the eligible coordinates, or a bad argument, naming it.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy.audit import dirac_canaries
      >>> c = dirac_canaries({"w": jnp.zeros((10, 10))}, num_canaries=40, l2_clip=1.0,
      ...                    key=jax.random.key(0))
      >>> c.num_canaries, len(set(c.coordinates.tolist())), c.included.dtype
      (40, 40, dtype('bool'))
      >>> c = dirac_canaries({"b": jnp.zeros(5), "w": jnp.zeros((10, 10))}, num_canaries=5,
      ...                    l2_clip=1.0, key=jax.random.key(0), leaves={"b": True, "w": False})
      >>> sorted(c.coordinates.tolist())  # b's coordinates come first (tree_leaves order)
      [0, 1, 2, 3, 4]
    """
    reduce.check_params(params, real=True)
    m = reduce.check_positive_int(num_canaries, name="num_canaries")
    clip = reduce.check_positive_float(l2_clip, name="l2_clip")
    key = keys.check_key(key)
    sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(params)]
    if leaves is None:
        eligible = [True] * len(sizes)
    else:
        treedef = jax.tree_util.tree_structure(params)
        chosen = jax.tree_util.tree_leaves(leaves)
        if jax.tree_util.tree_structure(leaves) != treedef or not all(
            isinstance(b, (bool, np.bool_)) for b in chosen
        ):
            raise ValueError(
                f"`leaves` must be a pytree of True/False with the structure of `params` "
                f"({treedef}); got {leaves!r}"[:600]
            )
        eligible = [bool(b) for b in chosen]
    starts = np.cumsum([0, *sizes[:-1]])
    ranges = [(int(a), n) for a, n, ok in zip(starts, sizes, eligible, strict=True) if ok and n]
    p = sum(n for _, n in ranges)
    if m > p:
        where = "the parameters'" if leaves is None else "the chosen `leaves`'"
        raise ValueError(
            f"`num_canaries` ({m}) is more than {where} {p} coordinates; every Dirac "
            f"canary needs its own coordinate, so expected at most {p}"
        )
    coord_key, bit_key = jax.random.split(key)
    picks = np.asarray(jax.random.choice(coord_key, p, (m,), replace=False), np.int64)
    # Eligible coordinate number -> flat coordinate: the eligible leaves laid end to end.
    ends = np.cumsum([n for _, n in ranges])
    which = np.searchsorted(ends, picks, side="right")
    offsets = np.array([a for a, _ in ranges], np.int64) - (ends - [n for _, n in ranges])
    coordinates = picks + offsets[which]
    included = np.asarray(sampling.inclusion_mask(bit_key, sampling_rate=0.5, num_examples=m))
    return Canaries(coordinates, included, clip)


def _check_canaries(canaries) -> Canaries:
    if not isinstance(canaries, Canaries):
        raise TypeError(
            f"`canaries` must be a Canaries record from dirac_canaries; got "
            f"{type(canaries).__name__}"
        )
    return canaries


def with_canaries(loss_fn: Callable, canaries: Canaries) -> Callable:
    """The loss over augmented examples ``(example, canary_id)``: the user's, or a Dirac canary.

    .. math::

        \\ell((x, k); \\theta) = \\begin{cases} \\ell_{\\text{user}}(x; \\theta) & k = -1 \\\\
            C \\, (\\theta_{j_k} - \\operatorname{sg}(\\theta_{j_k})) & k \\ge 0 \\end{cases}

    (``sg`` = stop gradient), so a canary row's loss is 0 and its gradient exactly
    ``C e_{j_k}`` — under ``jax.grad``, ``vmap(grad)`` and the fast clipped sum alike — and a
    real row's is the user's. A canary row's ``example`` is ignored (its gradient is
    multiplied by 0), but it is still evaluated: :func:`insert` fills it with a copy of a
    real row, so that it is a valid input. A pair loss ``(loss_sum, n_items)`` gives
    ``(0, 0)`` for a canary row (canaries add no items to the loss).

    Args:
      loss_fn: ``loss_fn(params, example, *args) -> scalar | (loss_sum, n_items)``.
      canaries: from :func:`dirac_canaries` for these parameters.

    Returns:
      ``loss(params, (example, canary_id), *args)``; it has the user's ``validate`` too (run
      on the ``example`` part), if ``loss_fn`` has one.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy.audit import Canaries, with_canaries
      >>> c = Canaries(coordinates=jnp.array([2]), included=jnp.array([True]), l2_clip=3.0)
      >>> loss = with_canaries(lambda w, x: jnp.dot(w, x), c)
      >>> jax.grad(loss)(jnp.ones(4), (jnp.ones(4), 0)).tolist()   # the canary: 3 e_2
      [0.0, 0.0, 3.0, 0.0]
      >>> jax.grad(loss)(jnp.ones(4), (jnp.ones(4), -1)).tolist()  # a real row: x
      [1.0, 1.0, 1.0, 1.0]
    """
    canaries = _check_canaries(canaries)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be a function loss_fn(params, example); got {loss_fn!r}")
    m = canaries.num_canaries
    clip = canaries.l2_clip
    coordinates = np.asarray(canaries.coordinates)
    index_dtype = np.int32 if coordinates.max(initial=0) < 2**31 - 1 else np.int64
    # (int64 indices need jax_enable_x64; they arise only past 2^31 coordinates)

    def loss(params, example, *args):
        leaves = jax.tree_util.tree_leaves(params)
        num_coordinates = sum(int(np.size(leaf)) for leaf in leaves)
        if coordinates.max(initial=-1) >= num_coordinates:  # else a silently zero gradient
            raise ValueError(
                f"`canaries` were drawn for at least {int(coordinates.max()) + 1} coordinates "
                f"but `params` has {num_coordinates}; draw them with dirac_canaries(params, ...)"
            )
        if not (isinstance(example, (tuple, list)) and len(example) == 2):
            raise TypeError(
                "the canary loss takes augmented examples `(example, canary_id)` (see "
                f"jaxgrad.privacy.audit.insert); got a {type(example).__name__}"
            )
        x, canary_id = example
        out = loss_fn(params, x, *args)
        pair = isinstance(out, (tuple, list))
        real_sum, real_count = reduce.as_sum_count(out)
        canary_id = jnp.asarray(canary_id)
        # The coordinate is a per-example scalar index into each leaf (an embedding-style
        # lookup), so the clipped sum stays on the fast path: no B x P one-hot is built.
        j = jnp.asarray(coordinates, index_dtype)[jnp.clip(canary_id, 0, m - 1)]
        dirac = jnp.zeros((), real_sum.dtype)
        start = 0
        for leaf in leaves:
            size = int(np.size(leaf))
            theta = jnp.reshape(leaf, (-1,))[jnp.clip(j - start, 0, size - 1)]
            theta = theta.astype(real_sum.dtype)
            inside = (j >= start) & (j < start + size)
            dirac = dirac + jnp.where(inside, theta - jax.lax.stop_gradient(theta), 0)
            start += size
        is_canary = canary_id >= 0
        total = jnp.where(is_canary, clip * dirac, real_sum)
        if pair:
            return total, jnp.where(is_canary, 0, real_count)
        return total

    validate = getattr(loss_fn, "validate", None)
    if validate is not None:
        loss.validate = lambda batch: validate(batch[0])
    loss.__name__ = loss.__qualname__ = f"with_canaries({getattr(loss_fn, '__name__', 'loss')})"
    return loss


def insert(data: PyTree, canaries: Canaries) -> tuple[PyTree, np.ndarray]:
    """The training data with the included canaries appended: ``(rows, canary_id)``.

    The real rows keep their order and get ``canary_id = −1``; then one row per included
    canary ``k`` (in increasing ``k``), whose ``example`` part is a copy of the first real row
    (ignored by :func:`with_canaries`, but a valid input to the user's loss) and whose
    ``canary_id`` is ``k``. Excluded canaries are not in the data at all.

    Args:
      data: the training set, a pytree with a leading example axis (NumPy or JAX arrays).
      canaries: from :func:`dirac_canaries`.

    Returns:
      ``(rows, canary_id)``: ``rows`` like ``data`` with ``N + Σ_k included_k`` rows, and an
      ``int32`` array of the ids (same type of array as ``data``'s first leaf).

    Example::

      >>> import numpy as np
      >>> from jaxgrad.privacy.audit import Canaries, insert
      >>> c = Canaries(np.array([5, 7, 9]), np.array([True, False, True]), 1.0)
      >>> rows, ids = insert(np.arange(6.0).reshape(3, 2), c)
      >>> rows.tolist(), ids.tolist()
      ([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [0.0, 1.0], [0.0, 1.0]], [-1, -1, -1, 0, 2])
    """
    canaries = _check_canaries(canaries)
    n = reduce.batch_size(data, name="data")
    if n == 0:
        raise ValueError("`data` has no rows; the canary rows copy a real row, expected ≥ 1")
    ids = np.flatnonzero(np.asarray(canaries.included)).astype(np.int32)

    def append(a):
        xp = np if isinstance(a, np.ndarray) else jnp
        return xp.concatenate([a, xp.repeat(a[:1], ids.size, axis=0)], axis=0)

    leaves = jax.tree_util.tree_leaves(data)
    xp = np if isinstance(leaves[0], np.ndarray) else jnp
    canary_id = xp.concatenate([xp.full((n,), -1, np.int32), xp.asarray(ids)])
    return jax.tree_util.tree_map(append, data), canary_id


# --------------------------------------------------------------------------------------------
# Scores, guesses, and the whole audit
# --------------------------------------------------------------------------------------------


def score(reference: PyTree, params: PyTree, canaries: Canaries) -> np.ndarray:
    """Each canary's score: how far its coordinate moved against its gradient ``C e_j``.

    .. math::

        s_k = \\theta^{\\text{ref}}_{j_k} - \\theta_{j_k}

    With ``reference`` the initial parameters, an included canary pushes ``s_k`` up (a
    descent step on its loss ``C θ_{j_k}`` lowers ``θ_{j_k}``) and an excluded one leaves only
    the noise and the real data's pull. ``reference`` may instead be a run the adversary can
    reproduce without the canaries (e.g. with a leaked key), which cancels everything else.

    Args:
      reference: parameters to measure from (usually the initial ones).
      params: the trained parameters, the same tree structure and shapes (replicated
        arrays of a multi-process run are read from this process's copy).
      canaries: from :func:`dirac_canaries`.

    Returns:
      A float64 array of shape ``(m,)``.

    Example::

      >>> import numpy as np
      >>> from jaxgrad.privacy.audit import Canaries, score
      >>> c = Canaries(np.array([0, 3]), np.array([True, False]), 1.0)
      >>> score(np.zeros(4), np.array([-0.5, 0.0, 0.0, 0.25]), c).tolist()
      [0.5, -0.25]
    """
    canaries = _check_canaries(canaries)
    # A run over several processes returns arrays no process holds whole; replicated
    # parameters are whole in every local copy.
    ref_leaves, ref_tree = jax.tree_util.tree_flatten(sharding.local_replica(reference))
    leaves, tree = jax.tree_util.tree_flatten(sharding.local_replica(params))
    shapes = [np.shape(x) for x in leaves]
    if ref_tree != tree or [np.shape(x) for x in ref_leaves] != shapes:
        raise ValueError(
            "`reference` and `params` must have the same tree structure and shapes; got "
            f"{ref_tree} with shapes {[np.shape(x) for x in ref_leaves]} and {tree} with "
            f"shapes {shapes}"
        )
    coords = np.asarray(canaries.coordinates)
    p = sum(int(np.prod(s)) for s in shapes)
    if coords.size and coords.max() >= p:
        raise ValueError(
            f"`canaries` were drawn for more coordinates ({coords.max() + 1} at least) than "
            f"`params` has ({p}); draw them with dirac_canaries(params, ...)"
        )
    out = np.empty(coords.shape, np.float64)
    start = 0
    for ref, x in zip(ref_leaves, leaves, strict=True):
        size = int(np.size(x))
        inside = (coords >= start) & (coords < start + size)
        local = coords[inside] - start
        out[inside] = (
            np.ravel(np.asarray(ref, np.float64))[local]
            - np.ravel(np.asarray(x, np.float64))[local]
        )
        start += size
    return out


class Guesses(NamedTuple):
    """The adversary's guesses and how many were right.

    Attributes:
      guesses: ``(m,)`` int8: ``+1`` "included", ``−1`` "excluded", ``0`` abstain.
      num_guesses: ``r``, the number of non-zero guesses.
      num_correct: ``v``, the guesses that match the include bits.
    """

    guesses: np.ndarray
    num_guesses: int
    num_correct: int


def guess(scores, canaries: Canaries, *, num_guesses: int) -> Guesses:
    """Guesses "in" for the ``⌈r/2⌉`` highest scores and "out" for the ``⌊r/2⌋`` lowest.

    The guesses are a function of the scores alone (ties broken by canary index); only the
    count of correct guesses looks at ``canaries.included``.

    Args:
      scores: ``(m,)`` finite scores, e.g. from :func:`score`.
      canaries: the canaries the scores are for.
      num_guesses: ``r``, ``0 ≤ r ≤ m``.

    Returns:
      A :class:`Guesses`.

    Example::

      >>> import numpy as np
      >>> from jaxgrad.privacy.audit import Canaries, guess
      >>> c = Canaries(np.arange(4), np.array([True, False, True, False]), 1.0)
      >>> g = guess(np.array([3.0, -1.0, 0.5, 0.0]), c, num_guesses=2)
      >>> g.guesses.tolist(), g.num_correct
      ([1, -1, 0, 0], 2)
    """
    canaries = _check_canaries(canaries)
    m = canaries.num_canaries
    r = _check_int(num_guesses, name="num_guesses", low=0, high=m, high_name="num_canaries")
    s = np.asarray(scores, np.float64)
    if s.shape != (m,):
        raise ValueError(f"`scores` must have shape ({m},), one per canary; got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(
            f"`scores` must be finite; got {int(np.sum(~np.isfinite(s)))} NaN or inf (did the "
            "training run diverge?)"
        )
    order = np.argsort(s, kind="stable")
    guesses = np.zeros(m, np.int8)
    k_in = (r + 1) // 2
    guesses[order[m - k_in :]] = 1
    guesses[order[: r // 2]] = -1
    truth = np.where(np.asarray(canaries.included, bool), 1, -1)
    correct = int(np.sum(guesses == truth))
    return Guesses(guesses, r, correct)


class AuditResult(NamedTuple):
    """The outcome of :func:`audit`.

    Attributes:
      epsilon_lower: the lower bound on the run's ε (:func:`one_run_epsilon`).
      num_canaries: ``m``.
      num_guesses: ``r``.
      num_correct: ``v``.
      delta: the ``δ`` the bound is at.
      confidence: its confidence level.
      canaries: the :class:`Canaries` (coordinates and the secret include bits).
      scores: the ``(m,)`` scores (:func:`score`).
    """

    epsilon_lower: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    delta: float
    confidence: float
    canaries: Canaries
    scores: np.ndarray


def audit(
    train: Callable,
    params: PyTree,
    data: PyTree,
    loss_fn: Callable,
    *,
    l2_clip: float,
    num_canaries: int,
    num_guesses: int,
    delta: float,
    key,
    confidence: float = 0.95,
    leaves: PyTree | None = None,
) -> AuditResult:
    """Audits one training run: canaries in, train once, guess, bound ε from below.

    1. draws ``m`` Dirac canaries (:func:`dirac_canaries`), each included with probability ½;
    2. calls ``train(with_canaries(loss_fn, canaries), params, insert(data, canaries))`` —
       the user's own DP training, once;
    3. scores each canary by its coordinate's movement (:func:`score` from ``params``),
       guesses "in" for the top ``⌈r/2⌉`` and "out" for the bottom ``⌊r/2⌋`` (:func:`guess`);
    4. returns :func:`one_run_epsilon` of the ``v`` correct guesses.

    If ``train`` is ``(ε, δ)``-DP (with clipping norm ``C = l2_clip``) on the data it is
    given, ``epsilon_lower > ε`` happens with probability at most ``1 − confidence``. The run
    audited is the run on the augmented data (``N`` real rows plus about ``m/2`` canaries),
    so its claim is the ε it reports there (e.g. ``fit``'s ``history[-1]["epsilon"]``, whose
    ``q = batch_size / N_aug``). ``train`` must use ``loss_fn`` and ``data`` as given (any
    batching, sampling, optimizer, devices), and start from ``params``.

    Args:
      train: ``train(loss_fn, params, data) -> trained params``, e.g. a closure over
        ``jaxgrad.train.fit(..., privacy=PrivacyConfig(...))``.
      params: the initial parameters (``P ≥ m`` coordinates).
      data: the real training set, a pytree with a leading example axis.
      loss_fn: ``loss_fn(params, example, *args)``, the user's per-example loss.
      l2_clip: the run's clipping norm ``C``.
      num_canaries: ``m``.
      num_guesses: ``r ≤ m`` (see :func:`one_run_epsilon` for how large to make it).
      delta: the ``δ`` of the claim.
      key: the PRNG key of the canaries (not the run's: the bits must be secret from it).
      confidence: in (0, 1).
      leaves: optional, which parameter leaves may hold canaries (see
        :func:`dirac_canaries`).

    Returns:
      An :class:`AuditResult`.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jaxgrad.privacy import audit
      >>> def train(loss_fn, params, data):  # one step of plain SGD, no clipping, no noise
      ...     return params - jax.grad(lambda p: sum(loss_fn(p, (data[0][i], data[1][i]))
      ...                                            for i in range(len(data[1]))))(params)
      >>> result = audit.audit(train, jnp.zeros(200), jnp.ones((3, 200)),
      ...                      lambda w, x: jnp.dot(w, x) ** 2, l2_clip=1.0,
      ...                      num_canaries=200, num_guesses=50, delta=1e-5,
      ...                      key=jax.random.key(0))
      >>> result.num_correct, round(result.epsilon_lower, 2)  # not private at all
      (50, 2.78)
    """
    if not callable(train):
        raise TypeError(f"`train` must be a function train(loss_fn, params, data); got {train!r}")
    m = reduce.check_positive_int(num_canaries, name="num_canaries")
    r = _check_int(num_guesses, name="num_guesses", low=0, high=m, high_name="num_canaries")
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    canaries = dirac_canaries(params, num_canaries=m, l2_clip=l2_clip, key=key, leaves=leaves)
    trained = train(with_canaries(loss_fn, canaries), params, insert(data, canaries))
    scores = score(params, trained, canaries)
    guesses = guess(scores, canaries, num_guesses=r)
    eps = one_run_epsilon(
        num_canaries=m,
        num_guesses=r,
        num_correct=guesses.num_correct,
        delta=delta,
        confidence=confidence,
    )
    return AuditResult(eps, m, r, guesses.num_correct, delta, confidence, canaries, scores)
