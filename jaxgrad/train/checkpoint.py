"""Atomic, checksummed checkpoints of any pytree, restored against a template; no pickle.

A checkpoint is one ``.npz`` file (read with ``allow_pickle=False``) holding the pytree's
leaves in ``tree_flatten`` order and a JSON header: each leaf's shape and dtype, the caller's
metadata, and a SHA-256 of all of it. It is written to a temporary file in the same
directory, flushed and ``fsync``-ed, then moved into place with ``os.replace``, so a crash
mid-write never leaves a corrupt latest checkpoint; only the last ``keep`` are kept.

On restore a truncated or corrupt file is reported (a :class:`CheckpointWarning` naming it)
and the previous good one is used.

State sharded over a mesh (parameters over a model axis, FSDP-style) is not held whole by any
one process: :func:`save_sharded` writes it with orbax-checkpoint (``pip install
'jaxgrad[checkpoint]'``) as a directory ``ckpt-STEP.orbax``, every process its own pieces,
committed atomically by orbax (a temporary directory renamed when all pieces are written);
:func:`restore_latest` reads both kinds, newest first, with the same fall-back to the last
good one. orbax's files carry no checksum of their own: a truncated or missing piece is
found, a flipped bit in a stored chunk may not be.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import _optional, keys, sharding
from jaxgrad._paths import write_error

PyTree = Any
FORMAT = "jaxgrad-checkpoint-1"
SHARDED_FORMAT = "jaxgrad-orbax-1"
_NAME = re.compile(r"^ckpt-(\d+)\.(npz|orbax)$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or does not fit the template."""


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint was skipped in favour of an older one."""


def _digest(arrays: list[np.ndarray], header: dict) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def path_for(directory, step: int, *, sharded: bool = False) -> str:
    """The file (``.npz``) or, for sharded state, directory (``.orbax``) name of the
    checkpoint at ``step`` in ``directory``."""
    if sharded:  # orbax wants absolute paths
        return os.path.join(os.path.abspath(os.fspath(directory)), f"ckpt-{int(step):010d}.orbax")
    return os.path.join(os.fspath(directory), f"ckpt-{int(step):010d}.npz")


def list_checkpoints(directory) -> list[str]:
    """The checkpoint files in ``directory``, oldest (lowest step) first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = sorted((int(m[1]), n) for n in os.listdir(directory) if (m := _NAME.match(n)))
    return [os.path.join(directory, n) for _, n in found]


_TMP = re.compile(r"^\.ckpt-\d+\.npz\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def check_directory(directory) -> str:
    """Checks that checkpoints can be written to ``directory``, made if missing.

    Args:
      directory: the checkpoint directory.

    Returns:
      ``directory`` as a string.

    Raises:
      CheckpointError: ``directory`` is a file, or cannot be made or written
        (:func:`jaxgrad._paths.write_error`).
    """
    d = os.fspath(directory)
    if os.path.exists(d) and not os.path.isdir(d):
        raise CheckpointError(f"`checkpoint_dir` {d!r} is a file; expected a directory")
    if (why := write_error(d)) is not None:
        raise CheckpointError(f"`checkpoint_dir` {d!r} is not writable: {why}")
    return d


def prepare_directory(directory) -> None:
    """Checks, before any training, that checkpoints can be written to ``directory``
    (:func:`check_directory`) and that its checkpoint entries are files.

    Removes the temporary files (``.ckpt-*.npz.tmp-PID``) that runs killed mid-write left
    behind, but only those of processes that no longer exist.

    Raises:
      CheckpointError: ``directory`` is a file, cannot be made or written, or holds a
        checkpoint entry that is not a regular file.
    """
    d = check_directory(directory)
    for name in os.listdir(d):
        path = os.path.join(d, name)
        if (m := _NAME.match(name)) and m[2] == "npz" and not os.path.isfile(path):
            raise CheckpointError(
                f"checkpoint entry {path} is not a regular file (a directory?); checkpoints "
                "are files, so remove or rename it"
            )
        if (m := _TMP.match(name)) and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            try:
                os.remove(path)
            except OSError:  # pragma: no cover - raced with another cleaner
                pass


def save(directory, tree: PyTree, *, step: int, metadata: dict | None = None, keep: int = 3) -> str:
    """Writes ``tree`` and JSON ``metadata`` atomically as the checkpoint for ``step``.

    Args:
      directory: where checkpoints live (created if missing).
      tree: any pytree of arrays (typed PRNG keys included).
      step: the step number; it names the file, and the newest step is the latest.
      metadata: JSON-serialisable data saved alongside (epoch, history, ...).
      keep: how many checkpoints to keep; older ones are deleted after a successful write.

    Returns:
      The path written.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    leaves = jax.tree_util.tree_leaves(tree)
    arrays, kinds = [], []
    for leaf in leaves:
        if keys.is_typed_key(leaf):
            kinds.append({"key_impl": str(jax.random.key_impl(leaf))})
            leaf = jax.random.key_data(leaf)
        else:
            kinds.append({})
        arrays.append(np.asarray(leaf))
    header = {
        "format": FORMAT,
        "step": int(step),
        "leaves": [
            {"shape": list(a.shape), "dtype": a.dtype.str, **k}
            for a, k in zip(arrays, kinds, strict=True)
        ],
        "metadata": metadata or {},
    }
    header["sha256"] = _digest(arrays, header)
    contents = {f"leaf_{i:05d}": a for i, a in enumerate(arrays)}
    contents["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)

    final = path_for(directory, step)
    tmp = os.path.join(directory, f".{os.path.basename(final)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **contents)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)
    # Prune the oldest others; never the file just written, even if older runs left
    # checkpoints with higher step numbers.
    others = [
        p for p in list_checkpoints(directory) if os.path.abspath(p) != os.path.abspath(final)
    ]
    _prune(others, keep)
    return final


def _prune(others: list[str], keep: int) -> None:
    """Removes the oldest of ``others`` (files or orbax directories), keeping ``keep - 1``."""
    for old in others[: max(len(others) - (keep - 1), 0)] if keep > 0 else []:
        if os.path.isdir(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _orbax():
    return _optional.require(
        "orbax.checkpoint",
        package="orbax-checkpoint",
        extra="checkpoint",
        needed_for="checkpoints of sharded state",
    )


def _key_free(tree: PyTree) -> tuple[list, list]:
    """``tree``'s leaves with typed PRNG keys as their ``uint32`` data, and each leaf's kind."""
    leaves, kinds = [], []
    for leaf in jax.tree_util.tree_leaves(tree):
        if keys.is_typed_key(leaf):
            kinds.append({"key_impl": str(jax.random.key_impl(leaf))})
            leaf = jax.random.key_data(leaf)
        else:
            kinds.append({})
        leaves.append(leaf)
    return leaves, kinds


def save_sharded(
    directory, tree: PyTree, *, step: int, metadata: dict | None = None, keep: int = 3
) -> str:
    """Writes ``tree``, whose arrays may be sharded over several processes, with orbax.

    Every process calls it (each writes the pieces its devices hold); orbax commits the
    directory ``ckpt-STEP.orbax`` atomically once all are written. The JSON ``metadata`` is
    stored with it. Process 0 then deletes all but the newest ``keep`` checkpoints.

    Args:
      directory: where checkpoints live (created if missing).
      tree: any pytree of ``jax.Array`` s (sharded or not; typed PRNG keys included).
      step: the step number; it names the directory.
      metadata: JSON-serialisable data saved alongside.
      keep: how many checkpoints to keep.

    Returns:
      The path written.
    """
    ocp = _orbax()
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    leaves, kinds = _key_free(tree)
    header = {
        "format": SHARDED_FORMAT,
        "step": int(step),
        "leaves": [
            {"shape": list(np.shape(a)), "dtype": np.dtype(a.dtype).str, **k}
            for a, k in zip(leaves, kinds, strict=True)
        ],
        "metadata": metadata or {},
    }
    final = path_for(directory, step, sharded=True)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    leaves = [np.asarray(x) if _host_local(x) else x for x in leaves]
    checkpointer.save(
        final,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(header)
        ),
        force=True,
    )
    if jax.process_index() == 0:
        others = [p for p in list_checkpoints(directory) if os.path.abspath(p) != final]
        _prune(others, keep)
    # Nobody lists the directory (a resumed fit) while process 0 prunes it.
    sharding.sync_processes(f"pruned {final}")
    return final


def _host_local(x) -> bool:
    """Whether ``x`` is one process's own array in a run of several (a PRNG key, a step
    counter not yet placed on the mesh): orbax writes and reads those as numpy arrays, the
    same in every process, not as pieces of a global array."""
    return not isinstance(x, jax.Array) or (jax.process_count() > 1 and x.is_fully_addressable)


def _load_sharded(path: str, template: PyTree) -> tuple[PyTree, dict]:
    """:func:`load` of an orbax checkpoint: each leaf placed as ``template``'s is."""
    ocp = _orbax()
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves, _ = _key_free(template)

    def abstract(x):
        if _host_local(x):  # restored as numpy, then put on this process's default device
            return np.empty(np.shape(x), jnp.result_type(x))
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=x.sharding)

    header = read_metadata(path, full=True)
    if header.get("format") != SHARDED_FORMAT or len(header["leaves"]) != len(leaves):
        raise CheckpointError(
            f"checkpoint {path} has format {header.get('format')!r} with "
            f"{len(header.get('leaves', []))} arrays; expected {SHARDED_FORMAT!r} with "
            f"{len(leaves)} (the template's leaves)"
        )
    for (key_path, _), info, leaf in zip(paths_leaves, header["leaves"], leaves, strict=True):
        if tuple(info["shape"]) != np.shape(leaf) or np.dtype(info["dtype"]) != np.dtype(
            jnp.result_type(leaf)
        ):
            raise CheckpointError(
                f"checkpoint {path}: leaf {jax.tree_util.keystr(key_path)} has shape "
                f"{tuple(info['shape'])} and dtype {np.dtype(info['dtype'])}; the template "
                f"expects {np.shape(leaf)} and {jnp.result_type(leaf)}"
            )
    try:
        restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
            path,
            args=ocp.args.Composite(state=ocp.args.StandardRestore([abstract(x) for x in leaves])),
        )["state"]
    except Exception as e:  # a missing or truncated piece, whatever orbax raises for it
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from None
    out = []
    for (_, leaf), value in zip(paths_leaves, restored, strict=True):
        value = jnp.asarray(value) if isinstance(value, np.ndarray) else value
        if keys.is_typed_key(leaf):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf))
        out.append(value)
    return jax.tree_util.tree_unflatten(treedef, out), header["metadata"]


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def read(path) -> tuple[list[np.ndarray], dict]:
    """The raw leaves and header of one checkpoint file, verified against its checksum.

    Raises:
      CheckpointError: naming the file, if it is missing, truncated or corrupt.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            header = json.loads(bytes(f["header"]).decode())
            count = len(header["leaves"])
            arrays = [f[f"leaf_{i:05d}"] for i in range(count)]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # any failure to read (zipfile raises
        # NotImplementedError, RuntimeError, zlib.error, ... on some bit flips) is a corrupt file
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read "
            f"({type(e).__name__}: {e})"
        ) from None
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {header.get('format')!r}; expected {FORMAT!r}"
        )
    expected = header.pop("sha256", None)
    if _digest(arrays, header) != expected:
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 checksum (corrupt)")
    return arrays, header


def read_metadata(path, *, full: bool = False) -> dict:
    """The metadata of one checkpoint (file or orbax directory), without reading its arrays
    (an ``.npz`` member is read only when asked for); with ``full``, an orbax checkpoint's
    whole header.

    Raises:
      CheckpointError: naming the file, if its header cannot be read.
    """
    path = os.fspath(path)
    if path.endswith(".orbax"):
        try:
            with open(os.path.join(path, "meta", "metadata")) as f:
                header = json.load(f)
            return header if full else header["metadata"]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} has no readable header ({type(e).__name__}: {e})"
            ) from None
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(bytes(f["header"]).decode())["metadata"]
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} has no readable header ({type(e).__name__}: {e})"
        ) from None


def load(path, template: PyTree) -> tuple[PyTree, dict]:
    """Restores the checkpoint at ``path`` into the structure of ``template``.

    Args:
      path: a checkpoint file.
      template: a pytree with the saved tree's structure, shapes and dtypes (e.g. the
        freshly initialised state); its values are not used.

    Returns:
      ``(tree, metadata)``: the restored pytree (bit for bit what was saved) and the metadata.

    Raises:
      CheckpointError: the file is unreadable or corrupt, or does not fit ``template``.
    """
    if os.fspath(path).endswith(".orbax"):
        return _load_sharded(os.fspath(path), template)
    arrays, header = read(path)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    if len(paths_leaves) != len(arrays):
        raise CheckpointError(
            f"checkpoint {path} holds {len(arrays)} arrays; the template has "
            f"{len(paths_leaves)} leaves"
        )
    restored = []
    for (key_path, leaf), array, info in zip(paths_leaves, arrays, header["leaves"], strict=True):
        name = jax.tree_util.keystr(key_path)
        if keys.is_typed_key(leaf):
            if "key_impl" not in info:
                raise CheckpointError(f"checkpoint {path}: leaf {name} is not a PRNG key")
            value = jax.random.wrap_key_data(jnp.asarray(array), impl=jax.random.key_impl(leaf))
        else:
            value = jnp.asarray(array)
        if value.shape != np.shape(leaf) or value.dtype != jnp.result_type(leaf):
            raise CheckpointError(
                f"checkpoint {path}: leaf {name} has shape {value.shape} and dtype "
                f"{value.dtype}; the template expects {np.shape(leaf)} and "
                f"{jnp.result_type(leaf)}"
            )
        restored.append(value)
    return jax.tree_util.tree_unflatten(treedef, restored), header["metadata"]


def restore_latest(directory, template: PyTree):
    """The newest checkpoint in ``directory`` that reads cleanly, restored against ``template``.

    A corrupt or truncated newer file is reported with a :class:`CheckpointWarning` naming
    it, and the next older one is tried.

    Returns:
      ``(tree, metadata, path)``, or ``None`` if ``directory`` holds no checkpoint.

    Raises:
      CheckpointError: if checkpoints exist but none can be read (every file is named).
    """
    candidates = list_checkpoints(directory)
    errors = []
    for path in reversed(candidates):
        try:
            tree, metadata = load(path, template)
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"{e}; falling back to an older checkpoint", CheckpointWarning, 2)
            continue
        return tree, metadata, path
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None


def check_resume_epoch(epoch: int, epochs: int, path) -> None:
    """Raises unless a checkpoint written after ``epoch`` epochs can resume a run of ``epochs``.

    A checkpoint past the requested end would otherwise be returned as the result: more
    training than asked for, without a word.
    """
    if epoch > epochs:
        raise CheckpointError(
            f"checkpoint {path} was written after epoch {epoch}, past this run's `epochs` "
            f"({epochs}); pass epochs >= {epoch} to continue it, or train for fewer epochs "
            "in another checkpoint_dir"
        )
