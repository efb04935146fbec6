"""Equivalence assertions (on ``chex``) and difference tables between gradient strategies."""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import keys, reduce
from jaxgrad.grads import GradResult

PyTree = Any


def _gradient(out):
    """A strategy's :class:`jaxgrad.GradResult` compared by its ``grads``; anything else as is."""
    return out.grads if isinstance(out, GradResult) else out


def _default_tolerances(tree) -> tuple[float, float]:
    # float64 equivalences hold to ~1e-12; float32 ones to a few ulps of the largest entry.
    # Integer and boolean leaves are exact, so only the inexact leaves set the precision.
    inexact = [
        jnp.result_type(x)
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    wide = bool(inexact) and all(jnp.finfo(d).bits >= 64 for d in inexact)
    return (1e-10, 1e-12) if wide else (1e-5, 1e-6)


def _is_exact(x) -> bool:
    dtype = jnp.result_type(x)
    return not jnp.issubdtype(dtype, jnp.inexact) and not keys.is_typed_key(x)


def _assert_exact_leaves_equal(a, b) -> None:
    """Integer and boolean leaves (counts, labels, masks) must agree exactly: a tolerance
    relative to their size would let 1000000 pass for 1000001."""
    leaves_b = jax.tree_util.tree_leaves(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), leaves_b, strict=True):
        if _is_exact(x) and _is_exact(y) and not np.array_equal(np.asarray(x), np.asarray(y)):
            where = np.flatnonzero(np.ravel(np.asarray(x) != np.asarray(y)))
            raise AssertionError(
                f"integer leaf {jax.tree_util.keystr(path) or 'root'} differs (integers are "
                f"compared exactly) at {where.size} of {np.size(x)} entries, e.g. flat index "
                f"{int(where[0])}: {np.ravel(np.asarray(x))[where[0]]} vs "
                f"{np.ravel(np.asarray(y))[where[0]]}"
            )


def _tolerance(value, *, name: str) -> float:
    """A tolerance: a non-negative finite number (a NaN or negative one would fail every
    comparison, an infinite one pass every one)."""
    number = reduce.as_number(value, name=name)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"`{name}` must be a non-negative finite number; got {value!r}")
    return number


def assert_equivalent(f, g, *args, rtol: float | None = None, atol: float | None = None):
    """Asserts ``f(*args)`` and ``g(*args)`` are the same pytree to within tolerance.

    Args:
      f, g: functions of ``*args`` returning pytrees (e.g. two gradient strategies), or two
        results (arrays or pytrees) to compare directly, with no ``args``. A
        :class:`jaxgrad.GradResult` is compared by its ``grads`` (its loss, count and norms
        are each strategy's own; compare them explicitly where they should agree).
      *args: their common arguments, e.g. ``params, batch``.
      rtol, atol: tolerances for ``chex.assert_trees_all_close`` (non-negative, finite); by
        default ``1e-10, 1e-12`` when every floating-point output leaf is 64-bit (float64,
        complex128; integer and boolean leaves are compared exactly and do not count), else
        ``1e-5, 1e-6``. NaN
        equals NaN in the same position and an infinity the same infinity; anything else
        non-finite differs.

    Returns:
      ``(f(*args), g(*args))`` (the gradients of ``GradResult`` s), for further checks.

    Raises:
      AssertionError: naming the first differing leaf, or both structures when the two
      results differ in structure or shapes.

    Example::

      >>> import jax.numpy as jnp, jaxgrad
      >>> loss = lambda p, ex: (p * ex[0] - ex[1]) ** 2
      >>> batch = (jnp.arange(4.0), jnp.ones(4))
      >>> _ = jaxgrad.check.assert_equivalent(
      ...     jaxgrad.batch_grad(loss), jaxgrad.mean_of_per_example_grads(loss), 2.0, batch)
    """
    rtol = None if rtol is None else _tolerance(rtol, name="rtol")
    atol = None if atol is None else _tolerance(atol, name="atol")
    if callable(f) != callable(g):
        raise TypeError(
            "`f` and `g` must both be functions (called on `*args`) or both be results; got "
            f"a {type(f).__name__} and a {type(g).__name__}"
        )
    if callable(f):
        a, b = _gradient(f(*args)), _gradient(g(*args))
    elif args:
        raise TypeError(
            f"`f` and `g` are results, not functions, so there is nothing to call on the "
            f"{len(args)} extra argument(s); pass either two functions and their arguments or "
            "two results"
        )
    else:
        a, b = _gradient(f), _gradient(g)
    _check_same_structure(a, b, "`f`'s result", "`g`'s result", AssertionError)
    _assert_exact_leaves_equal(a, b)
    default_rtol, default_atol = _default_tolerances((a, b))
    chex.assert_trees_all_close(
        a,
        b,
        rtol=default_rtol if rtol is None else rtol,
        atol=default_atol if atol is None else atol,
    )
    return a, b


def _describe(tree) -> str:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    shown = ", ".join(f"{jax.tree_util.keystr(p) or 'root'}: {np.shape(x)}" for p, x in leaves[:6])
    return "{" + shown + (", ..." if len(leaves) > 6 else "") + "}"


def _check_same_structure(a, b, name_a: str, name_b: str, error=ValueError) -> None:
    """``error`` naming both sides when two pytrees differ in structure or leaf shapes."""
    same = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.shape(x) == np.shape(y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )
    if not same:
        raise error(
            f"{name_a} and {name_b} must have the same tree structure and leaf shapes to be "
            f"compared; got {_describe(a)} and {_describe(b)}"
        )


class PairDiff(NamedTuple):
    """How far apart two strategies' outputs are, over all leaves.

    ``max_abs_diff = max |a − b|``; ``max_rel_diff = max |a − b| / max(|a|, |b|)`` (the
    largest difference relative to the largest magnitude, stable where entries are near 0);
    ``rel_l2_diff = ‖a − b‖₂ / max(‖a‖₂, ‖b‖₂)`` over the flattened pytrees.
    """

    a: str
    b: str
    max_abs_diff: float
    max_rel_diff: float
    rel_l2_diff: float


def _flat(tree) -> np.ndarray:
    """Every leaf of ``tree`` raveled into one complex128 (or float64) vector.

    Complex leaves keep their imaginary part (``1j`` and ``0`` differ by 1); PRNG keys are
    compared by their key data.
    """

    def leaf(x):
        x = np.asarray(keys.key_data(x))
        return np.ravel(x.astype(np.complex128 if np.iscomplexobj(x) else np.float64))

    parts = [leaf(x) for x in jax.tree_util.tree_leaves(tree)]
    return np.concatenate(parts) if parts else np.zeros((0,))


def tree_diff(a: PyTree, b: PyTree) -> tuple[float, float, float]:
    """``(max_abs_diff, max_rel_diff, rel_l2_diff)`` between two same-structure pytrees.

    As :func:`assert_equivalent` does, entries that are NaN on both sides, or the same
    infinity on both sides, count as equal and are left out. Any other non-finite entry (NaN
    against a number, ``inf`` against a finite number or ``-inf``) makes all three
    differences NaN or inf: no finite number can describe it. Two trees with no entries
    differ by 0. Complex entries differ by the modulus of their difference.
    """
    _check_same_structure(a, b, "`a`", "`b`", AssertionError)
    x, y = _flat(a), _flat(b)
    with np.errstate(invalid="ignore"):
        same = (x == y) | (np.isnan(x) & np.isnan(y))
    x, y = x[~same | np.isfinite(x)], y[~same | np.isfinite(y)]
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        bad = math.nan if np.any(np.isnan(x) | np.isnan(y)) else math.inf
        return bad, bad, bad
    max_abs = float(np.max(np.abs(x - y), initial=0.0))
    scale = max(float(np.max(np.abs(x), initial=0.0)), float(np.max(np.abs(y), initial=0.0)))
    norm = max(float(np.linalg.norm(x)), float(np.linalg.norm(y)))
    l2 = float(np.linalg.norm(x - y))
    return max_abs, max_abs / scale if scale else 0.0, l2 / norm if norm else 0.0


def relative_error(approx: PyTree, exact: PyTree) -> float:
    """``‖approx − exact‖ / ‖exact‖``, the L2 norms over all leaves: how wrong ``approx`` is.

    Unlike :func:`tree_diff`'s symmetric ``rel_l2_diff`` (divided by the larger norm, which
    calls an answer twice the truth 50 % off), this is relative to the reference: twice the
    truth is 1.0, and so is zero.

    Args:
      approx: the pytree under test.
      exact: the reference, of the same structure and shapes (a non-zero norm).

    Returns:
      The relative error, a float (NaN where either side has a NaN entry).

    Raises:
      AssertionError: the two differ in structure or shapes.
      ValueError: ``exact`` is all zeros (no relative error is defined).

    Example::

      >>> import jax.numpy as jnp, jaxgrad
      >>> jaxgrad.check.relative_error(jnp.array([6.0, 8.0]), jnp.array([3.0, 4.0]))
      1.0
    """
    _check_same_structure(approx, exact, "`approx`", "`exact`", AssertionError)
    x, y = _flat(approx), _flat(exact)
    norm = float(np.linalg.norm(y))
    if norm == 0.0:
        raise ValueError("`exact` is all zeros: no error relative to it; use tree_diff's max_abs")
    return float(np.linalg.norm(x - y)) / norm


class Comparison(NamedTuple):
    """Every pairwise difference between named strategies; ``str()`` gives a markdown table."""

    rows: list[PairDiff]
    outputs: dict[str, PyTree]

    def to_records(self) -> list[dict]:
        """One plain dict per pair, ready for ``json.dump``."""
        return [row._asdict() for row in self.rows]

    def to_markdown(self) -> str:
        """A markdown table, one row per pair."""
        lines = ["| a | b | max abs diff | max rel diff | rel L2 diff |", "|---|---|---|---|---|"]
        lines += [
            f"| {r.a} | {r.b} | {r.max_abs_diff:.3e} | {r.max_rel_diff:.3e} | {r.rel_l2_diff:.3e} |"
            for r in self.rows
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def compare(fns: dict[str, Any], *args) -> Comparison:
    """Runs every named function on ``*args`` and measures every pair's difference.

    Args:
      fns: ``{name: f}``, e.g. ``{"batch_grad": jaxgrad.batch_grad(loss), "at mean input":
        jaxgrad.naive.grad_at_mean_input(loss)}``; at least two.
      *args: the common arguments, e.g. ``params, batch``.

    Returns:
      A :class:`Comparison`: ``rows`` (one :class:`PairDiff` per pair, in insertion order)
      and each function's ``outputs`` (a :class:`jaxgrad.GradResult`'s ``grads``: the
      gradients are compared, not the losses).

    Example::

      >>> import jax, jax.numpy as jnp, jaxgrad
      >>> loss = lambda theta, x: jax.nn.sigmoid(theta * x)
      >>> table = jaxgrad.check.compare(
      ...     {"exact": jaxgrad.batch_grad(loss),
      ...      "at mean input": jaxgrad.naive.grad_at_mean_input(loss)},
      ...     1.0, jnp.array([0.0, 1.0]))
      >>> round(table.rows[0].max_abs_diff, 4)
      0.0192
    """
    if not isinstance(fns, dict) or len(fns) < 2:
        raise ValueError(
            f"`fns` must be a dict of at least two named functions; got {type(fns).__name__} "
            f"with {len(fns) if hasattr(fns, '__len__') else 'no'} entries"
        )
    for name, f in fns.items():
        if not callable(f):
            raise TypeError(f"`fns[{name!r}]` must be a function of `*args`; got {f!r}")
    outputs = {name: _gradient(f(*args)) for name, f in fns.items()}
    for a, b in itertools.combinations(outputs, 2):
        _check_same_structure(outputs[a], outputs[b], f"`fns[{a!r}]`'s output", f"`fns[{b!r}]`'s")
    rows = [
        PairDiff(a, b, *tree_diff(outputs[a], outputs[b]))
        for a, b in itertools.combinations(outputs, 2)
    ]
    return Comparison(rows, outputs)
