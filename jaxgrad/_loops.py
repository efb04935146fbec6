"""The one policy for the loops jaxgrad writes: microbatches, chunks, physical batches, steps.

XLA:CPU compiles a loop body (``lax.scan``, ``lax.while_loop``, ``lax.map``) worse than the
same code outside one: its convolution passes rewrite the backward convolutions of straight-line
code into the canonical NHWC form that YNNPACK / Eigen run, but leave those of a while body in
their raw dimension order, where XLA emits its own naive loop nest for them (visible in
``jax.jit(f).lower(...).compile().as_text()``: a plain ``convolution`` with
``outer_dimension_partitions`` inside the body, ``__ynn_fusion`` outside). The benchmark's CNN
ran ``accumulate_grad`` over 4 microbatches ~10x slower under ``lax.scan`` than unrolled, and
even the MLP 1.4x slower (docs/benchmarks.md, "Loops"). Partial unrolling (``unroll=k``) does
not help: the body is still a loop body. So the policy, in one place:

* a loop with a trip count known when tracing (:func:`scan`: microbatches of
  :func:`jaxgrad.accumulate_grad`, chunks of ``chunk_size``) runs **unrolled** on a single CPU
  device when it has at most :data:`MAX_UNROLL` steps, each step fenced after the previous
  one's carry by ``lax.optimization_barrier`` so that XLA cannot interleave steps whose carry
  accumulates; longer loops, loops on several devices (unrolled slices of a batch sharded over
  a mesh would be gathered: the scan keeps every row on its device) and every loop on other
  backends stay ``lax.scan``;
* a loop with a data-dependent trip count (:func:`peeled_sum`: the physical batches of a DP
  step) runs its first step outside a ``lax.while_loop``, where it compiles as straight-line
  code; the default physical batch holds the whole draw on almost every step;
* the training loop over steps (:func:`scan_steps`) scans unless the step has a convolution
  and runs on a CPU; then a Python loop over the jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: The most steps a loop with a static trip count is unrolled for on a CPU ("auto").
MAX_UNROLL = 16


def check_unroll(unroll) -> str | int | bool:
    """``"auto"``, True, False or an integer >= 0 (Python or NumPy), as ``unroll`` is given."""
    if isinstance(unroll, str) and unroll == "auto":
        return unroll
    if isinstance(unroll, (bool, np.bool_)):
        return bool(unroll)
    if isinstance(unroll, (int, np.integer)) and unroll >= 0:
        return int(unroll)
    raise ValueError(f"`unroll` must be 'auto', True, False or an integer >= 0; got {unroll!r}")


def unrolled(num_steps: int, unroll="auto") -> bool:
    """Whether a loop of ``num_steps`` runs fully unrolled under ``unroll``.

    ``"auto"``: on a CPU backend with one device when ``num_steps <= MAX_UNROLL`` (on a mesh
    the unrolled slices of a sharded batch would be gathered); ``True``: always; ``False``
    or an integer: never here (``lax.scan`` with that ``unroll``, which for an integer
    ``>= num_steps`` is JAX's own unrolling, without the fences).
    """
    unroll = check_unroll(unroll)
    if unroll == "auto":
        one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
        return one_cpu and num_steps <= MAX_UNROLL
    return unroll is True


def scan(body, carry, xs, *, unroll="auto"):
    """``lax.scan(body, carry, xs)`` under the loop policy (see the module's docstring).

    Unrolled, step ``k``'s input is fenced behind step ``k - 1``'s carry with
    ``lax.optimization_barrier``, so where the carry depends on the step (accumulated sums:
    ``accumulate_grad``, the fast path's chunks) the steps run one after the other and the
    peak memory is that of one step, as under ``lax.scan``. The outputs are not fenced (that
    would materialise each step's rows and copy them again: 2x the peak memory of
    ``per_example_grads(chunk_size=32)`` on the benchmark's MLP); they are stacked as
    ``lax.scan`` stacks them. The numbers are the same either way: the same ops on the same
    slices in the same order.

    Args:
      body: ``body(carry, x) -> (carry, y)``.
      carry: the initial carry.
      xs: a pytree whose leaves share a leading axis of ``K`` steps.
      unroll: ``"auto"`` (default: the policy), ``True`` (unroll, fenced), ``False`` or an
        integer (``lax.scan``'s own ``unroll``).

    Returns:
      ``(carry, ys)``, ``ys`` stacked along a leading axis of ``K``.
    """
    unroll = check_unroll(unroll)
    num_steps = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if not unrolled(num_steps, unroll):
        return jax.lax.scan(body, carry, xs, unroll=1 if unroll == "auto" else unroll)
    ys = []
    for k in range(num_steps):
        x = jax.tree_util.tree_map(lambda a, k=k: a[k], xs)
        if ys:  # step k starts only once step k - 1's carry is out
            carry, x = jax.lax.optimization_barrier((carry, x))
        carry, y = body(carry, x)
        ys.append(y)
    return carry, jax.tree_util.tree_map(_stack, *ys)


def _stack(*parts):
    """``jnp.stack(parts)``, written as a concatenation along the parts' own leading axis
    (then a free reshape): XLA:CPU writes each part straight into the result that way, where
    a stack on a new axis cost one more copy (2x the peak memory of ``per_example_grads``
    with ``chunk_size=32`` on the benchmark's MLP at B = 256: 1048 against 528 MB)."""
    if parts[0].ndim == 0:
        return jnp.stack(parts)
    return jnp.concatenate(parts).reshape(len(parts), *parts[0].shape)


def peeled_sum(one, num_steps, *, first=None):
    """``Σ_{k < K} one(k)`` for a traced trip count ``K >= 1``, leaf by leaf.

    Step 0 runs outside a ``lax.while_loop`` over the rest (see the module's docstring); a
    ``K`` of 0 still runs step 0, which the caller makes a zero (e.g. fully masked).
    ``first()``, if given, is step 0 in place of ``one(0)`` (same structure: e.g. a
    ``lax.switch`` over sizes of the first physical batch).
    """

    def body(carry):
        k, acc = carry
        return k + 1, jax.tree_util.tree_map(jnp.add, acc, one(k))

    _, total = jax.lax.while_loop(
        lambda c: c[0] < num_steps,
        body,
        (jnp.int32(1), one(jnp.int32(0)) if first is None else first()),
    )
    return total


def has_convolution(fn, *args) -> bool:
    """Whether ``fn(*args)`` (abstract values suffice) runs a convolution at any depth (loops,
    branches, custom calls): a query on the fast path's walker (:mod:`jaxgrad.fast.trace`)."""
    from jaxgrad.fast import trace  # the fast path imports the strategies: not at load time

    program, _ = trace.trace_program(fn, *args)
    return "conv_general_dilated" in trace.primitives(program)


def scan_steps(scan, fn, *args) -> bool:
    """``fit``'s ``scan`` resolved: ``"auto"`` scans the steps unless ``fn(*args)`` (the loss
    of one example) has a convolution and the backend is a CPU; True/False as given."""
    if isinstance(scan, str) and scan == "auto":
        return not (jax.default_backend() == "cpu" and has_convolution(fn, *args))
    if not isinstance(scan, (bool, np.bool_)):
        raise ValueError(f"`scan` must be True, False or 'auto'; got {scan!r}")
    return bool(scan)
