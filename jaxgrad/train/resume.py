"""The checkpoints of a :func:`jaxgrad.train.fit` run: the directory, the restore of this
run's newest good checkpoint (refusing another run's) and the save between chunks."""

from __future__ import annotations

import os
import warnings

import jax

from jaxgrad import sharding as sharding_lib
from jaxgrad.train import checkpoint as ckpt


def prepare(checkpoint_dir, *, resume: bool) -> None:
    """Makes ``checkpoint_dir``; refuses one that holds checkpoints when ``resume`` is False.

    Raises:
      CheckpointError: ``resume=False`` on a directory with checkpoints (a later resume could
        pick up the wrong run).
    """
    ckpt.prepare_directory(checkpoint_dir)
    if not resume and ckpt.list_checkpoints(checkpoint_dir):
        raise ckpt.CheckpointError(
            f"`checkpoint_dir` {os.fspath(checkpoint_dir)!r} already holds checkpoints of another "
            "run; with resume=False use an empty directory, so a later resume cannot pick up "
            "the wrong run"
        )


def restore(checkpoint_dir, template, config, *, mesh, epochs):
    """The newest good checkpoint's ``(tree, meta, path)`` if it belongs to this run, or None.

    Called by the loop that :func:`jaxgrad.train.fit` calls: its warning names fit's caller.

    Args:
      checkpoint_dir: the directory.
      template: ``{"state": state, "key": key}`` as this run starts.
      config: this run's config (:func:`jaxgrad.train.run_config.run_config`).
      mesh: ``fit``'s.
      epochs: ``fit``'s epochs.

    Returns:
      ``(tree, meta, path)``, or None where there is no good checkpoint.

    Raises:
      CheckpointError: a checkpoint written by another run (another device count, other
        privacy settings, data, batch size, key, ...), or past this run's ``epochs``.
    """
    candidates = ckpt.list_checkpoints(checkpoint_dir)
    if candidates:
        # Before the arrays are read: another optimizer's state would not fit the template.
        try:
            newest = (ckpt.read_metadata(candidates[-1]).get("config") or {}).get("optimizer")
        except ckpt.CheckpointError:
            newest = None  # a corrupt newest file: restore_latest names it and falls back
        if newest is not None and newest != config["optimizer"]:
            raise ckpt.CheckpointError(
                f"checkpoint {candidates[-1]} was written by a run with another `optimizer`: "
                f"its optimizer state is {newest}; this run's optimizer makes "
                f"{config['optimizer']}. Resume with the same optimizer, or use another "
                "checkpoint_dir (or resume=False)"
            )
    restored = ckpt.restore_latest(checkpoint_dir, template)
    if restored is None:
        return None
    tree, meta, path = restored
    old = dict(meta.get("config") or {})
    config = dict(config)
    for name in ("optimizer", "optimizer_probe", "loss"):  # not recorded by older checkpoints
        if name not in old:
            config.pop(name, None)
    private = "privacy" in config
    _check_loss(old.pop("loss", None), config.pop("loss", None), path, private=private)
    _check_probe(
        old.pop("optimizer_probe", None), config.pop("optimizer_probe", None), path, private=private
    )
    if not private and "privacy" not in old:
        # A private run's data hash stays in the config: another hash is refused below with
        # the rest of the config, the hash itself secret.
        _check_data(old.pop("data", None), config.pop("data", None), path)
    if mesh is not None and old.get("devices") != config["devices"]:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written by a run on {old.get('devices', 1)} device(s); this "
            f"run has `mesh` with {config['devices']} device(s). Resume on the same device count "
            "(the batches and the order of the sums depend on it), or use another checkpoint_dir"
        )
    if old != config:
        if old.get("privacy") != config.get("privacy"):
            changed = (
                _config_changes(old["privacy"], config["privacy"])
                if old.get("privacy") and config.get("privacy")
                else "one run is private and the other is not"
            )
            why = (
                f"the privacy settings changed ({changed}); the accounting of the steps already "
                "taken would be wrong. Resume with the same privacy settings"
            )
        else:
            # A private run's key is secret: even a hash of it is not printed.
            secret = ("key", "data") if "privacy" in config else ()
            why = (
                f"the run changed ({_config_changes(old, config, secret=secret)}). Resume with "
                "the same data, batch_size, key, checkpoint_every/steps_per_call and scan"
            )
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written by another run: {why}, or use another "
            "checkpoint_dir (or resume=False)"
        )
    ckpt.check_resume_epoch(meta["epoch"], epochs, path)
    return tree, meta, path


# ``stacklevel`` of a warning issued by restore itself that names fit's caller: restore, the
# loop, fit, fit's caller.
_CALLER_FROM_RESTORE = 4


def _differs(path, *, private: bool, warning: str, refusal: str = "") -> None:
    """Refuses a private run resumed with a changed part (``refusal``: the steps to come would
    replay the draws and noise of steps released, on another computation); warns for a plain
    one (``warning``, a CheckpointWarning naming fit's caller). Called by a ``_check_*``."""
    if private:
        raise ckpt.CheckpointError(f"checkpoint {path}: {refusal}")
    warnings.warn(
        f"checkpoint {path}: {warning}",
        ckpt.CheckpointWarning,
        stacklevel=_CALLER_FROM_RESTORE + 2,  # this and the _check_* that restore called
    )


def _check_loss(old, new, path, *, private: bool) -> None:
    """Refuses a private run resumed with another loss (its fingerprint,
    :func:`jaxgrad.train.run_config.loss_fingerprint`); warns for a plain one. Fingerprints
    made on other JAX versions, or not made, are not compared."""
    if old is None or new is None or "unknown" in (old, new) or old == new:
        return
    (old_version, _), (new_version, _) = old.split(":", 1), new.split(":", 1)
    if old_version != new_version:
        warnings.warn(
            f"checkpoint {path} was written with JAX {old_version}, this run has {new_version}: "
            "the loss's program could not be compared with the one that wrote it; resuming "
            "on the assumption that the loss and model are the same",
            ckpt.CheckpointWarning,
            stacklevel=_CALLER_FROM_RESTORE + 1,  # this, restore called
        )
        return
    _differs(
        path,
        private=private,
        refusal="`loss_fn` differs from the private run that wrote it (its program on one "
        "example, or the arrays it closes over, changed: another loss, model or constant). A "
        "private run resumed with another loss would replay the same noise and draws on "
        "another computation, which the accounting counts once: resume with the same loss_fn, "
        "or start a new run in another checkpoint_dir",
        warning="`loss_fn` seems to differ from the run that wrote it (its program on one "
        "example, or the arrays it closes over, changed). Resuming with the new one",
    )


def _check_probe(old, new, path, *, private: bool) -> None:
    """Refuses a private run resumed with other optimizer hyperparameters (its updates on a
    fixed probe, :func:`jaxgrad.train.run_config._optimizer_probe`); warns for a plain one.
    Probes not made (or not recorded by older checkpoints) are not compared."""
    if old is None or new is None or "unknown" in (old, new) or old == new:
        return
    _differs(
        path,
        private=private,
        refusal="the optimizer's hyperparameters differ from the private run that wrote it "
        "(its updates on a fixed probe gradient changed). A private run resumed with other "
        "hyperparameters would replay the same noise and draws on another computation, which "
        "the accounting counts once: resume with the same optimizer, or start a new run in "
        "another checkpoint_dir",
        warning="the optimizer's hyperparameters seem to differ from the run that wrote it (the "
        "same optimizer type, but its updates on a fixed probe gradient changed: the learning "
        "rate, a beta, the weight decay or a schedule?). Resuming with the new ones; to "
        "continue the old run exactly, pass the same optimizer",
    )


def _check_data(old, new, path) -> None:
    """Warns that a plain run resumes on other data than the run that wrote the checkpoint
    (the data's hash, :func:`jaxgrad.train.run_config._data_hash`, changed). A private run's
    data is refused with the rest of its config instead (its hash is secret); checkpoints
    that did not record the hash (older ones) are not compared."""
    if old is None or new is None or old == new:
        return
    _differs(
        path,
        private=False,
        warning="the training data differs from the run that wrote it (the values, shapes or "
        "dtypes of its arrays changed, the number of rows did not). Resuming on the new data; "
        "to continue the old run exactly, pass the same data",
    )


def save(checkpoint_dir, state, key, meta: dict, *, keep: int, mesh) -> str:
    """Writes a checkpoint of ``state`` and ``key`` with ``meta``; returns its path.

    Args:
      checkpoint_dir: the directory.
      state: the :class:`~jaxgrad.train.TrainState`.
      key: the run's key.
      meta: the loop's position, history and the run's config.
      keep: how many checkpoints to keep.
      mesh: ``fit``'s; on a mesh process 0 writes and the others wait for its file.

    Returns:
      The checkpoint's path.
    """
    leaves = jax.tree_util.tree_leaves(state)
    if any(isinstance(x, jax.Array) and not x.is_fully_replicated for x in leaves):
        # Sharded state (parameters over a model axis, FSDP): no process holds it whole,
        # so every process writes its pieces, with orbax.
        tree = {"state": state, "key": key}
        return ckpt.save_sharded(
            checkpoint_dir, tree, step=int(state.step), metadata=meta, keep=keep
        )
    if mesh is not None and jax.process_index() != 0:
        path = ckpt.path_for(checkpoint_dir, int(state.step))  # process 0 writes
    else:
        path = ckpt.save(
            checkpoint_dir,
            {"state": sharding_lib.local_replica(state), "key": key},
            step=int(state.step),
            metadata=meta,
            keep=keep,
        )
    if mesh is not None:
        # The others wait for process 0's file: one that went on could list the directory
        # (a resumed fit) before it is there, train from another step and issue other
        # collectives than process 0 (gloo's "collective mismatch" abort).
        sharding_lib.sync_processes(f"checkpoint {int(state.step)}")
    return path


def _config_changes(old: dict, new: dict, *, secret=()) -> str:
    """``"name: old -> new"`` for every key whose value differs between two config dicts (the
    values of ``secret`` keys named, not shown)."""
    changed = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    show = lambda k, v: "(secret)" if k in secret else repr(v)
    return ", ".join(f"{k}: {show(k, old.get(k))} -> {show(k, new.get(k))}" for k in changed)
