"""The one policy for the loops jaxgrad writes: microbatches, chunks, physical batches, steps.

XLA:CPU compiles a loop body (``lax.scan``, ``lax.while_loop``, ``lax.map``) or a branch
(``lax.cond``) as a computation of its own, and two things follow:

* **convolutions**: XLA:CPU runs a convolution with its library kernels (Eigen, YNNPACK)
  only in the layout NHWC input, HWIO kernel, NHWC output, and its pass that transposes
  other convolutions into that layout (``ConvCanonicalization``) visits the entry
  computation only. In a body the backward convolutions of a gradient stay in their raw
  dimension order and run as XLA's naive loop nest: the benchmark's CNN ran
  ``accumulate_grad`` over 4 microbatches 10-50x slower under ``lax.scan`` than unrolled.
  :func:`canonical_convolutions` makes that rewrite itself, in every body at any depth, and
  every jit jaxgrad writes around a loop applies it (the strategies, the DP steps, ``fit``'s
  loops over steps, its metrics): the scanned CNN then runs at 0.95-0.99x its unrolled form
  (docs/benchmarks.md, "Loops on the CPU");
* **dense bodies with little arithmetic per number they hand on** (the carry they change plus
  their outputs: a gradient sum, per-example rows) — the MLP's microbatches, about 40-300
  flops per number — ran 1.1-2.9x slower scanned: the body's work is many small,
  memory-bound passes, which in straight-line code XLA fuses across steps (the 4
  microbatches' weight gradients summed in one pass; the HLO shows it, the rest of the gap
  was not profiled). Bodies with much arithmetic per number handed on — the transformer's
  and the CNNs' microbatches, 2,300-24,000 flops per number — ran as fast or faster scanned
  (the transformer 1.3-3x, the weight-standardised CNN at B = 256 1.4x): unrolled, XLA plans
  every step's activations at once (2.5-4x the temporary memory of the scan).

So the policy, in one place (:func:`form` says which form a loop gets, and why):

* a loop with a trip count known when tracing (:func:`scan`: microbatches of
  :func:`jaxgrad.accumulate_grad`, chunks of ``chunk_size``) runs **unrolled** on a single CPU
  device when it has at most :data:`MAX_UNROLL` steps and its step (:func:`describe`, read off
  its jaxpr) does fewer than :data:`SCAN_INTENSITY` flops per number it hands on; otherwise,
  and for longer loops, loops on several devices (unrolled slices of a batch sharded over a
  mesh would be gathered: the scan keeps every row on its device) and every loop on other
  backends, ``lax.scan``. The rule reads only the program's structure and sizes, so it is
  the same on every run;
* a loop with a data-dependent trip count (:func:`peeled_sum`: the physical batches of a DP
  step) runs its first step outside a ``lax.while_loop``; the default physical batch holds
  the whole draw on almost every step;
* the training loop over steps (:func:`scan_steps`) scans.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

#: The most steps a loop with a static trip count is unrolled for on a CPU ("auto").
MAX_UNROLL = 16

#: Flops per number handed on (changed carry + outputs) from which a step is scanned ("auto",
#: CPU). Measured between the MLP's microbatches (<= 300, faster unrolled) and the CNNs' and
#: the transformer's (>= 2,300, as fast or faster scanned): bench/results/loops-2026-12-06.txt,
#: bench/results/loops-canonical-2026-12-07-loaded.txt.
SCAN_INTENSITY = 1024


def check_unroll(unroll) -> str | int | bool:
    """``"auto"``, True, False or an integer >= 0 (Python or NumPy), as ``unroll`` is given."""
    if isinstance(unroll, str) and unroll == "auto":
        return unroll
    if isinstance(unroll, (bool, np.bool_)):
        return bool(unroll)
    if isinstance(unroll, (int, np.integer)) and unroll >= 0:
        return int(unroll)
    raise ValueError(f"`unroll` must be 'auto', True, False or an integer >= 0; got {unroll!r}")


@dataclasses.dataclass(frozen=True)
class Form:
    """The form a loop runs in: fully ``unrolled`` (straight-line code) or ``lax.scan`` with
    ``scan_unroll``, and the ``reason`` (the policy's rule that chose it)."""

    unrolled: bool
    scan_unroll: int | bool
    reason: str


def form(num_steps: int, unroll="auto", step: Body | None = None) -> Form:
    """The form of a loop of ``num_steps`` under ``unroll`` (see the module's docstring).

    ``"auto"`` unrolls on a CPU backend with one device when ``num_steps <= MAX_UNROLL`` and
    the ``step`` (:func:`describe`) does fewer than :data:`SCAN_INTENSITY` flops per number
    it hands on; else ``lax.scan``. ``step=None``
    (not described) counts as a small dense step. ``True``: always unrolled; ``False`` or an
    integer: ``lax.scan`` with that ``unroll`` (for an integer ``>= num_steps``, JAX's own
    unrolling).
    """
    unroll = check_unroll(unroll)
    if unroll != "auto":
        return Form(unroll is True, 1 if unroll is True else unroll, f"unroll={unroll!r}")
    if not (jax.default_backend() == "cpu" and jax.device_count() == 1):
        return Form(False, 1, "not a single CPU device: lax.scan keeps rows on their devices")
    if num_steps > MAX_UNROLL:
        return Form(False, 1, f"{num_steps} steps > MAX_UNROLL = {MAX_UNROLL}")
    if step is not None and step.intensity >= SCAN_INTENSITY:
        return Form(False, 1, f"a step of {step.intensity:.0f} flops per number handed on")
    what = "an undescribed step" if step is None else f"{step.intensity:.0f} flops per number"
    return Form(True, 1, f"a step of {what}: small passes, fused across steps unrolled")


def scan(body, carry, xs, *, unroll="auto"):
    """``lax.scan(body, carry, xs)`` under the loop policy (see the module's docstring).

    Under ``"auto"`` the step is traced once more, abstractly (:func:`describe`), for
    :func:`form` to read. Unrolled, the steps are plain straight-line code, one after the
    other, their outputs stacked as ``lax.scan`` stacks them; nothing orders them beyond
    their data, so XLA may fuse across steps (the MLP's 4 microbatch weight gradients summed
    in one pass, the group-norm statistics of 4 microbatches in one op): the compiled program
    is that of JAX's own ``unroll=K`` less the copies of the input slices it adds (the
    weight-standardised CNN's microbatches at B = 32: 4901 against 4909 instructions, the same
    memory; ``bench/results/loops-paired-2026-12-06.txt``). No
    ``lax.optimization_barrier`` fences the steps: on XLA:CPU a fence between steps changed
    neither the planned memory (the same temporary bytes as unfenced in all 21 loops
    measured: ``accumulate_grad(4)`` and ``per_example_grads(chunk_size=32)`` on the
    benchmark's five models, B = 32 / 256, and the fast path's chunked norms and clipped
    sums) nor, measurably, the time (fenced ÷ unfenced throughput, medians of paired rounds
    under load, 0.89-1.12, no row's side of 1 reproduced on a rerun); it only kept XLA from
    batching the 4 microbatches' small normalisation ops of the weight-standardised CNN into
    one (``bench/results/loops-fences-2026-12-06.txt``). The numbers are the same in every
    form: the same ops on the same slices, added in the same order (``tests/test_loops.py``,
    float64).

    Args:
      body: ``body(carry, x) -> (carry, y)``.
      carry: the initial carry.
      xs: a pytree whose leaves share a leading axis of ``K`` steps.
      unroll: ``"auto"`` (default: the policy), ``True`` (unroll), ``False`` or an
        integer (``lax.scan``'s own ``unroll``).

    Returns:
      ``(carry, ys)``, ``ys`` stacked along a leading axis of ``K``.
    """
    unroll = check_unroll(unroll)
    num_steps = jax.tree_util.tree_leaves(xs)[0].shape[0]
    step = None
    if unroll == "auto" and num_steps <= MAX_UNROLL:
        step = describe(body, carry, jax.tree_util.tree_map(lambda a: a[0], xs))
    chosen = form(num_steps, unroll, step)
    if not chosen.unrolled:
        return jax.lax.scan(body, carry, xs, unroll=chosen.scan_unroll)
    ys = []
    for k in range(num_steps):
        carry, y = body(carry, jax.tree_util.tree_map(lambda a, k=k: a[k], xs))
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


def _flops(jaxpr, trips=1) -> float:
    """``2 ×`` the multiply-adds of the dots and convolutions of a jaxpr, inner loops times
    their trip counts (a ``while``'s unknown count as 1)."""
    total = 0.0
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name == "dot_general":
            (contract, _), _ = e.params["dimension_numbers"]
            lhs = e.invars[0].aval.shape
            total += 2.0 * np.prod(e.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        elif name == "conv_general_dilated":
            rhs = e.invars[1].aval.shape  # O, I / groups and the window, in any order
            out_axis = e.params["dimension_numbers"].rhs_spec[0]
            per_out = np.prod([s for d, s in enumerate(rhs) if d != out_axis])  # (O may be 0)
            total += 2.0 * np.prod(e.outvars[0].aval.shape) * per_out
        inner = e.params.get("length", 1) if name == "scan" else 1
        for sub in jcore.jaxprs_in_params(e.params):
            total += _flops(sub, inner)
    return trips * total


@dataclasses.dataclass(frozen=True)
class Body:
    """What the loop policy reads off one step of a loop (its jaxpr, at every depth)."""

    flops: float  # 2 x the multiply-adds of its dots and convolutions (see _flops)
    handed_on: int  # numbers it hands on: the carry it changes, and its outputs

    @property
    def intensity(self) -> float:
        """Flops per number handed on (infinite for a step that hands nothing on)."""
        return self.flops / self.handed_on if self.handed_on else float("inf")


def describe_jaxpr(closed, num_carry: int, num_consts: int = 0) -> Body:
    """:class:`Body` of a step's closed jaxpr: inputs ``num_consts`` constants, then
    ``num_carry`` carried values, then the step's slice; outputs the carry, then its rows
    (the layout of ``lax.scan``'s ``jaxpr``)."""
    jaxpr = closed.jaxpr
    changed = [
        o
        for o, i in zip(
            jaxpr.outvars[:num_carry],
            jaxpr.invars[num_consts : num_consts + num_carry],
            strict=True,
        )
        if o is not i
    ]
    handed_on = changed + list(jaxpr.outvars[num_carry:])
    return Body(
        flops=float(_flops(jaxpr)),
        handed_on=sum(int(np.prod(v.aval.shape)) for v in handed_on),
    )


def describe(body, carry, x) -> Body:
    """:class:`Body` of ``body(carry, x)`` (abstract values suffice)."""
    struct = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    carry, x = jax.tree_util.tree_map(struct, (carry, x))
    closed = jax.make_jaxpr(body)(carry, x)
    return describe_jaxpr(closed, len(jax.tree_util.tree_leaves(carry)))


def scan_steps(scan) -> bool:
    """``fit``'s ``scan`` resolved: ``"auto"`` scans the steps on every backend (on a CPU the
    step's convolutions are canonical, :func:`canonical_convolutions`); True/False as given."""
    if isinstance(scan, str) and scan == "auto":
        return True
    if not isinstance(scan, (bool, np.bool_)):
        raise ValueError(f"`scan` must be True, False or 'auto'; got {scan!r}")
    return bool(scan)


#: Primitives whose bodies XLA compiles as computations of their own (a while body, a
#: conditional's branches), where XLA:CPU's convolution canonicalisation does not reach.
BODY_PRIMITIVES = frozenset({"scan", "while", "cond"})

#: Primitives whose *open* jaxpr params are rewritten too (``jax.checkpoint``'s: plain code).
#: Other open jaxprs are re-bound as they are: shard_map's and pmap's bodies trace only under
#: their mesh axes, pallas_call's and run_state's take references.
OPEN_BODY_PRIMITIVES = frozenset({"remat2"})


def canonical_convolutions(fn):
    """``fn`` with every convolution inside a loop body or a branch in the canonical layout.

    XLA:CPU hands a convolution to its library kernels (Eigen, YNNPACK) only in the layout
    ``NHWC`` input, ``HWIO`` kernel, ``NHWC`` output, and its pass that transposes other
    convolutions into that layout (``ConvCanonicalization``) visits the entry computation
    only: in a ``lax.scan``, ``lax.while_loop`` or ``lax.cond`` body the backward
    convolutions of a gradient (``b01f_01oi->b01f``, ``f01b_i01o->01bf``) stay as they are
    and become XLA's naive loop nest, 5-10x slower. This makes the same rewrite at the
    jaxpr level, in every body at any depth: the same convolution (window, groups,
    precision) on operands transposed to ``NHWC`` / ``HWIO``, its ``NHWC`` result transposed
    back, so the values are the convolution's own. Top-level convolutions (XLA's pass takes
    them) and every other equation are re-bound unchanged, with their source lines. On other
    backends ``fn`` runs as it is. Every jit jaxgrad writes around a loop applies it; wrap
    your own function before ``jax.jit`` for the same on a ``jax.grad`` you write yourself.
    Wrap the gradient, not the function you differentiate: ``jax.grad`` of the wrapper gives
    the same numbers, but its backward convolutions are JAX's transposes again, in the raw
    layout. Bodies of ``shard_map`` and ``pmap`` are left as they are.

    Args:
      fn: a function of positional pytrees of arrays (no keyword arguments), returning a
        pytree of arrays; it is traced once (abstractly) per call of the wrapper, inside
        your ``jax.jit``.

    Returns:
      A function with ``fn``'s signature and values.

    Example::

      >>> import jax, jax.numpy as jnp, jaxgrad
      >>> def total(k, xs):  # a convolution in a scan body, NCHW / OIHW
      ...     conv = lambda x: jax.lax.conv(x, k, (1, 1), "SAME")
      ...     return jax.lax.scan(lambda c, x: (c + jnp.sum(conv(x) ** 2), None), 0.0, xs)[0]
      >>> k, xs = jnp.ones((4, 2, 3, 3)), jnp.ones((3, 8, 2, 5, 5))
      >>> g = jax.jit(jax.grad(total))(k, xs)
      >>> g_fast = jax.jit(jaxgrad.canonical_convolutions(jax.grad(total)))(k, xs)
      >>> bool(jnp.allclose(g, g_fast, rtol=1e-5))
      True
    """

    @functools.wraps(fn)
    def wrapped(*args):
        if jax.default_backend() != "cpu":
            return fn(*args)
        jitted = jax.jit(fn)
        if not _needs_rewrite(jitted.trace(*args).jaxpr.jaxpr, inside=False):
            return jitted(*args)  # (its trace cached: one call, no equation re-bound)
        # (traced again: jit's jaxpr takes values fn closes over as arguments of its own)
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _evaluate(closed, jax.tree_util.tree_leaves(args), inside=False)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)

    return wrapped


def jit(fn):
    """``jax.jit(canonical_convolutions(fn))``: the jit jaxgrad writes around a loop of its own
    (a decorator too); see :func:`canonical_convolutions`."""
    return jax.jit(canonical_convolutions(fn))


def _canonical(spec: tuple) -> tuple:
    """An input's or output's dimension order ``(batch, feature, *spatial)`` as the
    permutation to the canonical one: batch, spatial..., feature (``NHWC``)."""
    return (spec[0], *spec[2:], spec[1])


def _canonical_kernel(spec: tuple) -> tuple:
    """A kernel's dimension order ``(O, I, *spatial)`` as the permutation to ``HWIO``."""
    return (*spec[2:], spec[1], spec[0])


def _is_canonical(dn) -> bool:
    io = tuple(range(len(dn.lhs_spec)))
    return (
        _canonical(dn.lhs_spec) == io
        and _canonical(dn.out_spec) == io
        and _canonical_kernel(dn.rhs_spec) == io
    )


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
    """The convolution ``conv_general_dilated_p`` binds, on operands transposed to ``NHWC``
    / ``HWIO`` and its ``NHWC`` result transposed back."""
    dn = dimension_numbers
    nd = len(dn.lhs_spec)
    spatial = tuple(range(1, nd - 1))
    canonical = jax.lax.ConvDimensionNumbers(
        (0, nd - 1, *spatial), (nd - 1, nd - 2, *range(nd - 2)), (0, nd - 1, *spatial)
    )
    lhs = jnp.transpose(lhs, _canonical(dn.lhs_spec))
    rhs = jnp.transpose(rhs, _canonical_kernel(dn.rhs_spec))
    out = jax.lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=canonical, **params)
    return jnp.transpose(out, np.argsort(_canonical(dn.out_spec)))


def _needs_rewrite(jaxpr, inside: bool) -> bool:
    """Whether a convolution not in the canonical layout sits in a body at any depth."""
    for e in jaxpr.eqns:
        if e.primitive.name == "conv_general_dilated":
            if inside and not _is_canonical(e.params["dimension_numbers"]):
                return True
        inner = inside or e.primitive.name in BODY_PRIMITIVES
        if any(_needs_rewrite(sub, inner) for sub in jcore.jaxprs_in_params(e.params)):
            return True
    return False


def _rewritten(value, inside: bool, open_body: bool = False):
    """A closed jaxpr param (or a tuple of them: branches, ``custom_linear_solve``'s named
    tuple; with ``open_body``, an open jaxpr too) with its bodies rewritten."""
    if isinstance(value, tuple) and any(isinstance(v, jcore.ClosedJaxpr) for v in value):
        items = [_rewritten(v, inside) for v in value]
        # (a named tuple stays one: custom_linear_solve's rules read jaxprs.solve)
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if open_body and isinstance(value, jcore.Jaxpr) and not value.constvars:
        closed = _rewritten(jcore.ClosedJaxpr(value, ()), inside)
        # (re-traced, it closes over no arrays: its literals are scalars)
        return value if closed.consts else closed.jaxpr
    if not isinstance(value, jcore.ClosedJaxpr) or not _needs_rewrite(value.jaxpr, inside):
        return value
    # (the whole type: on an Explicit mesh or in a shard_map a carry's includes its sharding
    # or the mesh axes it varies over)
    structs = [
        jax.ShapeDtypeStruct(
            a.shape,
            a.dtype,
            weak_type=a.weak_type,
            sharding=a.sharding,
            manual_axis_type=a.manual_axis_type,
        )
        for a in value.in_avals
    ]
    return jax.make_jaxpr(lambda *a: _evaluate(value, a, inside=inside))(*structs)


def _evaluate(closed, args, *, inside: bool) -> list:
    """Re-binds ``closed``'s equations, its bodies' convolutions rewritten (see
    :func:`canonical_convolutions`); ``inside``: ``closed`` is itself a body."""
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    env.update(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(closed.jaxpr.invars, args, strict=True))
    for e in closed.jaxpr.eqns:
        ins = [read(v) for v in e.invars]
        # (as jax.core.eval_jaxpr: the user's source lines and the equation's context kept)
        stack = source_info_util.current_name_stack() + e.source_info.name_stack
        with source_info_util.user_context(e.source_info.traceback, name_stack=stack):
            with e.ctx.manager:
                outs = _bind(e, ins, inside)
        env.update(zip(e.outvars, outs, strict=True))
    return [read(v) for v in closed.jaxpr.outvars]


def _bind(e, ins: list, inside: bool) -> list:
    """One equation of :func:`_evaluate`: a convolution in a body rewritten, any other
    equation re-bound with its bodies rewritten."""
    name = e.primitive.name
    if inside and name == "conv_general_dilated":
        if not _is_canonical(e.params["dimension_numbers"]):
            return [_canonical_conv(*ins, **e.params)]
    inner = inside or name in BODY_PRIMITIVES
    open_body = name in OPEN_BODY_PRIMITIVES
    params = {k: _rewritten(v, inner, open_body) for k, v in e.params.items()}
    outs = e.primitive.bind(*ins, **e.primitive.get_bind_params(params))
    return outs if e.primitive.multiple_results else [outs]
