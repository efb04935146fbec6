"""The one training loop of :func:`jaxgrad.train.fit`: epochs of chunks of an
:class:`~jaxgrad.train.step.Engine`'s steps, with what every run shares around them.

The loop owns the state, resume from the newest good checkpoint, checkpoints, progress,
evaluation, the metrics file and the stop at the first non-finite step
(:func:`jaxgrad.train.step.guarded`); the engine owns the batches and the gradient. Between
chunks the loop checks for a non-finite step, reports progress and writes checkpoints.
Chunks are aligned to the epoch's start, so a run resumed from any checkpoint replays
exactly the same computation and ends bit for bit where the uninterrupted run would.
"""

from __future__ import annotations

import math
import time

from jaxgrad import sharding as sharding_lib
from jaxgrad.train import resume as resume_lib
from jaxgrad.train import writers as writers_lib
from jaxgrad.train.progress import Progress, end_epoch
from jaxgrad.train.result import FitResult, NonFiniteLossError
from jaxgrad.train.step import Engine, init_state


def drive(
    engine: Engine,
    config: dict,
    *,
    params,
    optimizer,
    key,
    epochs,
    evaluate,
    checkpoint_dir,
    checkpoint_every,
    keep,
    resume,
    metrics_path,
    metric_writers,
    progress,
    quiet,
    mesh,
) -> FitResult:
    """Runs ``engine``'s steps for ``epochs`` epochs, from the newest good checkpoint.

    Args:
      engine: the steps (:func:`jaxgrad.train.plain.engine`,
        :func:`jaxgrad.train.private.engine`).
      config: the run's config (:func:`jaxgrad.train.run_config.run_config`).
      optimizer: the optimizer the steps run.
      params, key, epochs, evaluate, checkpoint_dir, checkpoint_every, keep, resume,
        metrics_path, metric_writers, progress, quiet, mesh: ``fit``'s, checked.

    Returns:
      The :class:`~jaxgrad.train.FitResult` of the state the steps end in (no privacy or
      valuation yet).

    Raises:
      NonFiniteLossError: a step was not finite; its state is the one before that step.
    """
    steps_per_epoch, chunk = engine.steps_per_epoch, engine.chunk
    every = checkpoint_every or steps_per_epoch
    chunks_per_epoch = math.ceil(steps_per_epoch / chunk)
    state = init_state(params, optimizer)
    # The state's sharding on the mesh: parameters the caller sharded (over a model axis,
    # FSDP-style) keep it, and so does their optimizer state; the rest is replicated.
    state_layout = None if mesh is None else sharding_lib.layout(state, mesh=mesh)
    start_epoch, start_chunk, history = 0, 0, []
    epoch_loss, epoch_count = 0.0, 0
    last_checkpoint = None
    if checkpoint_dir is not None:
        resume_lib.prepare(checkpoint_dir, resume=resume)
    if checkpoint_dir is not None and resume:
        restored = resume_lib.restore(
            checkpoint_dir, {"state": state, "key": key}, config, mesh=mesh, epochs=epochs
        )
        if restored is not None:
            tree, meta, last_checkpoint = restored
            state, key = tree["state"], tree["key"]
            start_epoch, start_chunk, history = meta["epoch"], meta["chunk"], meta["history"]
            epoch_loss, epoch_count = meta["epoch_loss"], meta["epoch_count"]
    if mesh is not None:
        state = sharding_lib.place(state, state_layout)

    def save(epoch_next, chunk_next):
        meta = {
            "epoch": epoch_next,
            "chunk": chunk_next,
            "step": int(state.step),
            "history": history,
            "epoch_loss": epoch_loss,
            "epoch_count": epoch_count,
            "config": config,
        }
        return resume_lib.save(checkpoint_dir, state, key, meta, keep=keep, mesh=mesh)

    def spent():  # the engine's budget (a DP run's stop_at_epsilon) is spent
        return engine.last_step is not None and int(state.step) >= engine.last_step

    own = [writers_lib.JsonlWriter(metrics_path)] if metrics_path is not None else []
    writers = own + list(metric_writers)
    # A private run's wall-clock times follow its realised (private) batch sizes: not
    # released, neither in the records nor by the progress bar.
    timed = "privacy" not in config
    bar = Progress(
        epochs * steps_per_epoch,
        mode=progress,
        quiet=quiet,
        initial=int(state.step),
        timed=timed,
    )
    start = time.perf_counter()
    try:
        for epoch in range(start_epoch, epochs):
            if spent():
                break  # a resumed run stops here too
            chunks = engine.epoch_chunks(key, epoch)
            first = start_chunk if epoch == start_epoch else 0
            if first == 0:
                epoch_loss, epoch_count = 0.0, 0
            for c in range(first, chunks_per_epoch):
                before = int(state.step)
                new_state, bad, loss_sum, count = engine.run_chunk(state, key, chunks[c])
                bad = int(bad)
                if bad >= 0:
                    where = (
                        f" (the last good checkpoint is {last_checkpoint})"
                        if last_checkpoint
                        else ""
                    )
                    raise NonFiniteLossError(
                        engine.failure(bad, epoch) + where,
                        step=bad + 1,
                        state=new_state,
                        checkpoint=last_checkpoint,
                    )
                state = new_state
                epoch_loss, epoch_count = epoch_loss + loss_sum, epoch_count + count
                bar.update(int(state.step) - before)
                last_chunk = c == chunks_per_epoch - 1
                if last_chunk:
                    steps = int(state.step)
                    record = {
                        "epoch": epoch + 1,
                        "step": steps,
                        **engine.record(steps, epoch_loss, epoch_count),
                    }
                    end_epoch(
                        record,
                        params=sharding_lib.local_replica(state.params),
                        evaluate=evaluate,
                        start=start if timed else None,
                        history=history,
                        bar=bar,
                        writers=writers,
                    )
                if checkpoint_dir is not None:
                    final = last_chunk and (epoch == epochs - 1 or spent())
                    if final or int(state.step) // every > before // every:
                        nxt = (epoch + 1, 0) if last_chunk else (epoch, c + 1)
                        last_checkpoint = save(*nxt)
    finally:
        bar.close()
        for writer in own:
            writer.close()
    return FitResult(state.params, state, history)
