"""The steps of plain (not private) :func:`jaxgrad.train.fit`, as an
:class:`~jaxgrad.train.step.Engine`: shuffled epochs and a gradient strategy.

Each epoch's order is ``permutation(fold_in(key, epoch))`` (a pure function of the key and
the epoch), cut into batches of ``batch_size``; the last partial batch is padded and masked,
so no example is dropped and nothing recompiles. The epoch's batches are cut into chunks of
fixed length (the last padded with inactive steps), run under ``lax.scan`` or, with
``scan=False``, a Python loop over the jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import data as data_lib
from jaxgrad import keys, reduce
from jaxgrad import sharding as sharding_lib
from jaxgrad.train.step import Engine, guarded, loop_chunk, scan_chunk, step_fn, strategy_name

# Module level, so its compilation is shared by every fit with the same data and batch sizes.
_epoch_indices = jax.jit(data_lib.epoch_indices, static_argnums=(2, 3))


def engine(
    *,
    loss_fn,
    train_data,
    optimizer,
    strategy,
    batch_size,
    chunk,
    scan,
    mesh,
    check,
    loss_key,
    valuation=None,
    scores=None,
) -> Engine:
    """Shuffled epochs and a gradient strategy: the steps of plain :func:`jaxgrad.train.fit`.

    Args:
      loss_fn, train_data, loss_key: the example loss and rows as the steps take them
        (:func:`jaxgrad.train.arguments.prepared_data`).
      optimizer, strategy, batch_size, scan, mesh: ``fit``'s (``scan`` after the loop policy).
      chunk: the steps of one chunk.
      check: the per-batch row check, or None.
      valuation: a :class:`jaxgrad.train.Valuation`, or None.
      scores: with ``valuation``, the ``(N,)`` host array each chunk's valuation terms are
        added to, by row.

    Returns:
      The :class:`~jaxgrad.train.step.Engine`.
    """
    n = reduce.batch_size(train_data, name="train_data")
    steps_per_epoch = data_lib.num_batches(n, batch_size)
    chunks_per_epoch = data_lib.num_batches(steps_per_epoch, chunk)
    padded_steps = chunks_per_epoch * chunk

    run = _chunk_runner(
        _body(loss_fn, optimizer, strategy, mesh=mesh, loss_key=loss_key, valuation=valuation),
        train_data,
        scan=scan,
        mesh=mesh,
        check=check,
        valued=valuation is not None,
    )
    epoch_batches = {}  # epoch -> (steps, batch_size) rows, to name a bad batch's rows

    def epoch_chunks(key, epoch):
        idx, mask = _epoch_indices(key, epoch, n, batch_size)
        epoch_batches.clear()
        epoch_batches[epoch] = (idx, mask)
        if mesh is not None:  # each batch padded to a multiple of the device count
            idx, mask = sharding_lib.pad_indices(idx, mask, mesh.shape["data"])
        pad = padded_steps - steps_per_epoch
        active = np.arange(padded_steps) < steps_per_epoch
        bw = idx.shape[1]
        idx = np.concatenate([np.asarray(idx), np.zeros((pad, bw), np.asarray(idx).dtype)])
        mask = np.concatenate([np.asarray(mask), np.zeros((pad, bw), bool)])
        shape = (chunks_per_epoch, chunk)
        idx, mask = idx.reshape(*shape, bw), mask.reshape(*shape, bw)
        return list(zip(idx, mask, active.reshape(shape), strict=True))

    def run_chunk(state, key, inputs):
        del key  # the batches are the chunk's inputs
        idx, mask, active = inputs
        before = int(state.step)
        new, bad, loss_sum, values = run(state, idx, mask, active)
        if values is not None:  # padding rows and steps not taken hold 0
            np.add.at(scores, np.asarray(idx).ravel(), np.asarray(values, np.float64).ravel())
        done = int(new.step) - before
        return new, bad, float(loss_sum), int(np.sum(mask[:done]))

    def record(steps, loss_sum, count):
        del steps
        return {"loss": loss_sum / max(count, 1)}

    def failure(bad, epoch):
        batch_no = bad - epoch * steps_per_epoch + 1
        rows = _non_finite_rows(train_data, mesh, *epoch_batches[epoch], batch_no - 1)
        hint = (
            f"The batch holds non-finite data in rows {rows} of `train_data`: drop or impute them."
            if rows
            else "Lower the learning rate or check the data."
        )
        return (
            "the training loss (or the updated parameters or optimizer state) became non-finite "
            f"(NaN or inf) at step {bad + 1} (epoch {epoch + 1}, batch {batch_no} of "
            f"{steps_per_epoch}); training stopped with the parameters from before that step. "
            + hint
        )

    config = {"strategy": strategy_name(strategy)}
    return Engine(config, steps_per_epoch, chunk, epoch_chunks, run_chunk, record, failure)


def _body(loss_fn, optimizer, strategy, *, mesh, loss_key, valuation):
    """One guarded step, ``body(carry, batch, mask, active) -> (carry, out)``: the batch's
    rows turned into their loss keys, constrained to the mesh, and with ``valuation`` the
    out ``(loss_sum, terms)``."""
    step = step_fn(loss_fn, optimizer, strategy=strategy)

    def weighted(state, batch, mask):  # the guard's (state, loss, weight)
        new, loss = step(state, batch, mask)
        return new, loss, jnp.sum(mask).astype(loss.dtype)

    body = guarded(weighted)
    if loss_key is not None:
        keyed = body

        def body(carry, batch, mask, active):
            data, rows = batch
            row_keys = keys.row_keys(loss_key, carry[0].step, rows)
            return keyed(carry, (data, row_keys), mask, active=active)

    if mesh is not None:
        inner = body
        batch_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

        def body(carry, batch, mask, active):
            batch, mask = sharding_lib.constrain((batch, mask), batch_spec)
            return inner(carry, batch, mask, active=active)

    if valuation is not None:
        body = _valued(body, loss_fn, valuation)
    return body


def _valued(body, loss_fn, valuation):
    """``body`` whose per-step output also carries the batch rows' valuation terms (zero
    for a step not taken: inactive, or not finite), computed at the parameters the step saw."""
    values = valuation.step_values(loss_fn)

    def valued(carry, batch, mask, active):
        v = values(carry[0].params, carry[0].step, batch, mask)
        new, w = body(carry, batch, mask, active=active)
        taken = new[0].step != carry[0].step
        return new, (w, jnp.where(taken, v, 0))

    return valued


def _chunk_runner(body, train_data, *, scan, mesh, check, valued):
    """``run(state, idx, mask, active) -> (state, bad, loss_sum, values)``: a chunk's steps
    (``values`` the valuation terms, by step and batch row, or None without ``valued``).

    With ``scan`` one jitted ``lax.scan`` over the chunk; otherwise a Python loop over the
    jitted step, which runs the active steps only. On one device the batches are taken from
    the whole data set (on the device for the scan); on a mesh the data never goes to the
    devices whole: every chunk's batches are gathered on the host, each process reading
    only its own devices' rows.
    """
    if scan:
        # One device scans over row numbers into the data set; a mesh over gathered batches.
        take = data_lib.take if mesh is None else (lambda _, batch: batch)

        def step(carry, xs, data):
            b, m, a = xs
            return body(carry, take(data, b), m, active=a)

        def totals(outs):  # the loss sum, and the valuation terms
            return (jnp.sum(outs[0]), outs[1]) if valued else (jnp.sum(outs), None)

        scanned = scan_chunk(step, totals)
        if mesh is None:
            device_data = jax.tree_util.tree_map(jnp.asarray, train_data)

            def run(state, idx, mask, active):
                return scanned(state, (idx, mask, active), device_data)

        else:

            def run(state, idx, mask, active):
                batches, mask = sharding_lib.take_rows(
                    train_data, idx, mask, mesh=mesh, check=check
                )
                active = sharding_lib.replicate(active, mesh=mesh)
                return scanned(state, (batches, mask, active), None)

        return run

    host_data = None if mesh is not None else jax.tree_util.tree_map(np.asarray, train_data)
    looped = loop_chunk(body, None if mesh is None else sharding_lib.serialize_across_processes)

    def batches(idx, mask):  # each step's batch, gathered on the host as the step comes
        for i, m in zip(idx, mask, strict=True):
            if mesh is None:
                yield data_lib.take(host_data, i), m
            else:
                yield sharding_lib.take_rows(train_data, i, m, mesh=mesh, check=check)

    def run(state, idx, mask, active):
        state, bad, outs = looped(state, batches(idx[active], mask[active]))
        if not valued:
            return state, bad, sum(outs), None
        values = np.zeros((len(idx), *np.shape(mask)[1:]))  # inactive steps: 0
        if outs:
            values[np.asarray(active)] = np.stack([np.asarray(v) for _, v in outs])
        return state, bad, sum(w for w, _ in outs), values

    return run


def _non_finite_rows(data, mesh, idx, mask, batch: int) -> str:
    """The rows of batch ``batch`` whose floating-point data are NaN or inf, as text ("" for
    none, or for data on a mesh, which is not read whole here)."""
    if mesh is not None:
        return ""
    rows = np.asarray(idx)[batch][np.asarray(mask)[batch]]
    bad = np.zeros(len(rows), bool)
    for leaf in jax.tree_util.tree_leaves(data):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            values = np.asarray(leaf[rows]).reshape(len(rows), -1)
            bad |= ~np.isfinite(values).all(axis=1)
    found = sorted(int(r) for r in rows[bad])
    return ", ".join(map(str, found[:5])) + (", ..." if len(found) > 5 else "")
