"""Data parallelism on JAX's own SPMD engine: a data mesh, sharded batches, several hosts.

Every jaxgrad strategy is a ``jax.jit``-compiled function of ``(params, batch, mask)``, so it
runs data-parallel as it is when ``batch`` and ``mask`` are ``jax.Array`` s sharded along
their leading axis, ``NamedSharding(mesh, P("data"))``, and ``params`` are replicated: XLA's
SPMD partitioner gives each device its rows, and the reductions stay ``(sum, count)`` pairs

.. math::

    \\bar g = \\frac{\\sum_d \\sum_{i \\in d} m_i \\nabla S_i}{\\sum_d \\sum_{i \\in d} m_i n_i}

summed over devices (one all-reduce of the gradient and of the count) and divided once —
never a mean of per-device means, which is wrong as soon as devices hold different numbers
of real examples or tokens. Per-example outputs (``per_example_norms``) stay sharded; no
device ever holds the whole batch.

This module only builds the inputs: :func:`data_mesh` (a 1-D mesh over the devices of every
process), :func:`shard_batch` (pads a batch to a multiple of the device count, masked out,
and places it), :func:`replicate` (parameters on every device), :func:`check_batch` (the
batch is sharded along its leading axis only), :func:`take_rows` (a batch gathered from a data
set by index, each process reading only the rows its own devices hold, e.g. from a
memory-mapped file) and :func:`initialize` (``jax.distributed`` with its arguments checked).
Several hosts are several processes over one global mesh.

Example::

  >>> import jax, jax.numpy as jnp, jaxgrad
  >>> mesh = jaxgrad.sharding.data_mesh()
  >>> loss = lambda w, ex: (jnp.dot(ex[0], w) - ex[1]) ** 2
  >>> batch, mask = jaxgrad.sharding.shard_batch((jnp.ones((5, 2)), jnp.zeros(5)), mesh=mesh)
  >>> w = jaxgrad.sharding.replicate(jnp.ones(2), mesh=mesh)
  >>> jaxgrad.batch_grad(loss)(w, batch, mask).grads.tolist()  # 2 (w·x − y) x = 4 x
  [4.0, 4.0]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgrad import keys, reduce

PyTree = Any

__all__ = [
    "check_batch",
    "data_mesh",
    "initialize",
    "local_replica",
    "replicate",
    "shard_batch",
    "take_rows",
]


def initialize(
    coordinator: str | None = None,
    *,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts ``jax.distributed`` for one process of a multi-host run, arguments checked.

    Call it first, before anything touches a device. With no arguments JAX reads its own
    environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) or a
    cluster manager (SLURM, Open MPI, ...). On the CPU the collectives go over gloo.

    Args:
      coordinator: ``"HOST:PORT"`` of process 0.
      num_processes: how many processes take part.
      process_id: this process's number, in ``[0, num_processes)``.

    Raises:
      ValueError: a malformed coordinator, a process id out of range, or a run where JAX
        reports a different number of processes than ``num_processes``.
      TypeError: a coordinator that is not a string (e.g. a bare port number).
      RuntimeError: a second call in the same process.
    """
    if coordinator is not None and not isinstance(coordinator, str):
        hint = f" (e.g. 'localhost:{coordinator}')" if isinstance(coordinator, int) else ""
        raise TypeError(
            f"`coordinator` must be a string 'HOST:PORT' of process 0{hint}; got "
            f"{type(coordinator).__name__} {coordinator!r}"
        )
    if jax.distributed.is_initialized():
        raise RuntimeError(
            "`initialize` was already called in this process (jax.distributed is running: "
            f"process {jax.process_index()} of {jax.process_count()}); call it once, at the "
            "start, before anything touches a device"
        )
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"`coordinator` must be 'HOST:PORT'; got {coordinator!r}")
    if num_processes is not None:
        num_processes = reduce.check_positive_int(num_processes, name="num_processes")
    if process_id is not None:
        bad = isinstance(process_id, bool) or not isinstance(process_id, (int, np.integer))
        if bad or process_id < 0 or (num_processes is not None and process_id >= num_processes):
            raise ValueError(
                f"`process_id` must be an integer in [0, {num_processes}) (`num_processes`); "
                f"got {process_id!r}"
            )
    # On the CPU the collectives between processes run over gloo (JAX's default here);
    # set explicitly so an environment that changed the default still gets working ones.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    if num_processes is not None and jax.process_count() != num_processes:
        raise ValueError(
            f"`num_processes` is {num_processes} but JAX reports {jax.process_count()} "
            "processes; start exactly that many, each with its own `process_id`"
        )


def data_mesh(num_devices: int | None = None, *, axis: str = "data") -> Mesh:
    """A 1-D mesh named ``axis`` over the devices of every process.

    Args:
      num_devices: how many devices (default: all of them, ``jax.device_count()``). With
        several processes it must be a multiple of the process count, and each process
        contributes its first ``num_devices / process_count`` local devices.
      axis: the mesh axis name the batch is sharded over.

    Returns:
      A :class:`jax.sharding.Mesh` of shape ``{axis: num_devices}``.

    Raises:
      ValueError: more devices than there are, or a count the processes cannot share evenly.
    """
    total, procs = jax.device_count(), jax.process_count()
    if num_devices is None:
        num_devices = total
    num_devices = reduce.check_positive_int(num_devices, name="num_devices")
    if num_devices > total:
        raise ValueError(
            f"`num_devices` is {num_devices} but only {total} devices are visible "
            f"({procs} process(es), {jax.local_device_count()} local device(s) here); "
            "on the CPU emulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N"
        )
    if num_devices % procs:
        raise ValueError(
            f"`num_devices` ({num_devices}) must be a multiple of the process count ({procs}), "
            "so every process holds the same number of devices"
        )
    per = num_devices // procs
    devices = [d for p in range(procs) for d in _process_devices(p)[:per]]
    if len(devices) != num_devices:
        raise ValueError(
            f"`num_devices` ({num_devices}) needs {per} devices in every process; some "
            "process has fewer"
        )
    return Mesh(np.array(devices), (axis,))


def _process_devices(process: int) -> list:
    return sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)


def _check_mesh(mesh) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            "`mesh` must be a jax.sharding.Mesh (e.g. jaxgrad.sharding.data_mesh(), or "
            f"jax.make_mesh((n,), ('data',))); got {type(mesh).__name__} {mesh!r}"[:300]
        )
    return mesh


def _check_axis(mesh, axis: str) -> int:
    _check_mesh(mesh)
    if axis not in mesh.shape:
        raise ValueError(
            f"`mesh` has no axis named {axis!r} (`axis`); its axes are {tuple(mesh.axis_names)}"
        )
    return mesh.shape[axis]


def replicate(tree: PyTree, *, mesh: Mesh) -> PyTree:
    """``tree`` (parameters, optimizer state) with every leaf replicated on all of ``mesh``.

    Works with several processes: each process passes the same values. Leaves already
    placed on ``mesh`` (replicated) are returned as they are.
    """
    return _place(tree, NamedSharding(_check_mesh(mesh), P()))


def layout(tree: PyTree, *, mesh: Mesh) -> PyTree:
    """Each leaf's ``NamedSharding`` on ``mesh``: its own if it is already sharded over a mesh
    of the same devices and axes (a parameter the user sharded over a model axis, FSDP-style
    over the data axis, ...), else replicated."""
    _check_mesh(mesh)

    def one(x):
        s = getattr(x, "sharding", None)
        same = (
            isinstance(s, NamedSharding)
            and s.mesh.axis_names == mesh.axis_names
            and s.mesh.devices.shape == mesh.devices.shape
            and all(
                a.id == b.id for a, b in zip(s.mesh.devices.flat, mesh.devices.flat, strict=True)
            )
        )
        return NamedSharding(mesh, s.spec if same else P())

    return jax.tree_util.tree_map(one, tree)


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree``'s leaves placed as ``shardings`` (a tree of them, e.g. :func:`layout`); leaves
    already placed so are returned as they are. Each process materialises only its pieces."""
    return jax.tree_util.tree_map(lambda x, s: _place(x, s), tree, shardings)


def _on_host(x) -> np.ndarray:
    """``x`` as numpy; a typed PRNG key array as its ``uint32`` key data (trailing key axis)."""
    return np.asarray(keys.key_data(x))


def _like(original, placed):
    """``placed`` (from :func:`_on_host`) turned back into keys where ``original`` was keys."""
    if keys.is_typed_key(original):
        return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(original))
    return placed


def _place(tree, sharding):
    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        return _like(x, _global(_on_host(x), sharding))

    return jax.tree_util.tree_map(put, tree)


def _global(x: np.ndarray, sharding) -> jax.Array:
    # Every process materialises only the pieces its own devices hold.
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def device_multiple(size: int, devices: int) -> int:
    """``size`` rounded up to a multiple of ``devices``: the rows a batch of ``size`` rows is
    padded to (masked out) so that each of ``devices`` devices holds as many."""
    return -(-size // devices) * devices


def pad_indices(indices, mask, devices: int):
    """Row indices and their mask, the last axis padded to :func:`device_multiple` of
    ``devices`` for :func:`take_rows`.

    Args:
      indices: integer array ``(..., W)`` of rows.
      mask: boolean array of its shape (False = padding).
      devices: the device count of the mesh axis the rows are sharded over.

    Returns:
      ``(indices, mask)`` as numpy arrays, the padding masked out; its indices repeat the
      first of their row (a real row of the data, so every read stays in range).
    """
    indices, mask = np.asarray(indices), np.asarray(mask)
    extra = device_multiple(indices.shape[-1], devices) - indices.shape[-1]
    if not extra:
        return indices, mask
    fill = np.repeat(indices[..., :1], extra, axis=-1)
    pad = np.zeros((*mask.shape[:-1], extra), bool)
    return np.concatenate([indices, fill], -1), np.concatenate([mask, pad], -1)


def check_batch(batch: PyTree, mask=None, *, mesh: Mesh, axis: str = "data") -> None:
    """Checks that ``batch`` (and ``mask``) are sharded along their leading axis only.

    Leaves that are not ``jax.Array`` s, or that sit on one device, pass (they are placed by
    :func:`shard_batch`). A leaf sharded over a mesh axis on any other dimension, or over a
    different mesh, is an error: a data-parallel batch splits examples, never features.

    Raises:
      ValueError: naming the leaf, its sharding and what was expected.
    """
    _check_axis(mesh, axis)
    named = {"batch": batch} if mask is None else {"batch": batch, "mask": mask}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(named)[0]:
        if not isinstance(leaf, jax.Array) or len(leaf.sharding.device_set) == 1:
            continue
        name = jax.tree_util.keystr(key_path)
        sharding = leaf.sharding
        if not isinstance(sharding, NamedSharding) or sharding.mesh.devices.shape != (
            mesh.devices.shape
        ):
            if leaf.is_fully_replicated:
                continue
            raise ValueError(
                f"{name} is sharded as {sharding}; expected NamedSharding(mesh, P({axis!r})) "
                f"over `mesh` {dict(mesh.shape)}"
            )
        spec = tuple(sharding.spec)
        for dim, entry in enumerate(spec):
            names = entry if isinstance(entry, tuple) else (entry,)
            if dim > 0 and any(n is not None for n in names):
                raise ValueError(
                    f"{name} (shape {leaf.shape}) is sharded along its axis {dim} "
                    f"(PartitionSpec{spec}); a data-parallel batch must be sharded along its "
                    f"leading (example) axis only, P({axis!r})"
                )


def shard_batch(batch: PyTree, mask=None, *, mesh: Mesh, axis: str = "data"):
    """Pads ``batch`` to a multiple of the device count and shards it along its leading axis.

    Padded rows repeat row 0 and are masked out, so every strategy's answer is unchanged and
    a device may hold only padding. With several processes, ``batch`` is *this process's*
    rows (every process passes the same number) and the result is the global batch, in
    process order.

    Args:
      batch: a pytree of arrays with a leading example axis (numpy or jax).
      mask: a boolean vector over that axis (False = padding); all True when None.
      mesh: the mesh, e.g. :func:`data_mesh`.
      axis: the mesh axis to shard over.

    Returns:
      ``(batch, mask)`` as ``jax.Array`` s with ``NamedSharding(mesh, P(axis))``, their
      leading axis a multiple of ``mesh.shape[axis]``.

    Raises:
      ValueError: a mesh without ``axis``, a batch already sharded along another axis, leaves
        that disagree on the batch size, a mask of the wrong shape.
    """
    devices = _check_axis(mesh, axis)
    check_batch(batch, mask, mesh=mesh, axis=axis)
    size = reduce.batch_size(batch)
    if mask is None:
        mask = np.ones((size,), bool)
    elif np.shape(mask) != (size,):
        raise ValueError(
            f"`mask` must have shape ({size},) to match the batch; got {np.shape(mask)}"
        )
    elif np.result_type(mask) != np.bool_:
        raise TypeError(f"`mask` must be boolean (True = real example); got {np.result_type(mask)}")
    # The positions along `axis` this process's devices hold (on a 2-D mesh, a position
    # spans the devices of the other axes): its rows are padded to a multiple of them.
    along = mesh.axis_names.index(axis)
    local = {
        index[along]
        for index, d in np.ndenumerate(mesh.devices)
        if d.process_index == jax.process_index()
    }
    per_process = max(len(local), 1)
    procs = devices // per_process
    target = device_multiple(size, per_process)
    original = batch
    batch = jax.tree_util.tree_map(_on_host, batch)
    mask = np.asarray(mask)
    if target != size:
        extra = target - size
        batch = jax.tree_util.tree_map(
            lambda x: np.concatenate([x, np.repeat(x[:1], extra, axis=0)]), batch
        )
        mask = np.concatenate([mask, np.zeros((extra,), bool)])
    sharding = NamedSharding(mesh, P(axis))

    def put(x):
        if procs == 1:
            return _global(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x, (target * procs, *x.shape[1:]))

    batch = jax.tree_util.tree_map(lambda o, x: _like(o, put(x)), original, batch)
    return batch, put(mask)


def local_replica(tree: PyTree) -> PyTree:
    """This process's copy of a replicated tree: what a checkpoint or ``evaluate`` gets.

    An array that spans several processes (not fully addressable here) becomes its first
    local shard, which for a replicated array is the whole value; everything else — arrays
    of a one-process run, numpy arrays, Python scalars — is returned as it is.
    """

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x

    return jax.tree_util.tree_map(local, tree)


def sync_processes(name: str) -> None:
    """Waits until every process has reached the call with this ``name``; with one process it
    returns at once.

    Whatever one process does alone (process 0 writes a checkpoint file) must be finished
    before another process may depend on it (a resumed ``fit`` lists the directory): without
    the wait, the two could resume from different steps and issue different collectives.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def serialize_across_processes(tree: PyTree) -> None:
    """Waits for ``tree`` when several processes run, so collectives never overlap.

    On the CPU the collectives between processes run over gloo, which matches them by the
    order in which each process issues them. A belt-and-braces guard: XLA's CPU client
    already launches the programs that hold collectives one at a time, in dispatch order,
    and the "collective mismatch" abort once blamed on overlapping programs was a resume
    race (see :func:`sync_processes`; with this wait removed, 10 stressed 2-process runs
    under heavy load did not abort). With one process it is a no-op.
    """
    if jax.process_count() > 1:
        jax.block_until_ready(tree)


def _process_rows(size: int, *, mesh: Mesh, axis: str = "data") -> slice:
    """The rows ``[start, stop)`` of a ``size``-row batch that this process's devices hold.

    Under ``NamedSharding(mesh, P(axis))`` every device holds ``size / mesh.shape[axis]``
    consecutive rows; the devices of one process hold one contiguous block of them (as in
    :func:`data_mesh`, whose devices are in process order).

    Raises:
      ValueError: ``size`` not a multiple of the axis size, or a mesh whose devices of this
        process do not hold one contiguous block.
    """
    devices = _check_axis(mesh, axis)
    if size % devices:
        raise ValueError(
            f"`size` ({size}) must be a multiple of the {devices} devices of mesh axis {axis!r}"
        )
    spec = NamedSharding(mesh, P(axis))
    slices = sorted(
        {
            (s[0].start or 0, size if s[0].stop is None else s[0].stop)
            for s in spec.addressable_devices_indices_map((size,)).values()
        }
    )
    start, stop = slices[0][0], slices[-1][1]
    if sum(b - a for a, b in slices) != stop - start:
        raise ValueError(
            f"this process's devices hold rows {slices} of `mesh` axis {axis!r}, not one "
            "contiguous block; order the mesh's devices by process (see data_mesh)"
        )
    return slice(start, stop)


def take_rows(data: PyTree, indices, mask=None, *, mesh: Mesh, axis: str = "data", check=None):
    """Rows ``indices`` of every leaf of ``data``, sharded over ``mesh``; each process reads
    only the rows its own devices hold.

    ``indices`` (the same in every process) has shape ``(..., W)`` with ``W`` a multiple of
    ``mesh.shape[axis]``; the result has the leaves' shapes with their leading axis replaced
    by it, sharded along its last index axis (``P(..., axis)``). This process reads
    ``data_leaf[indices[..., rows]]`` for the block ``rows`` its own devices hold, and
    nothing else, so ``data`` may be memory-mapped files (:func:`jaxgrad.data.memmap`) or any
    array-like with ``shape``, ``dtype`` and integer-array indexing: with ``P`` processes each
    reads about ``1 / P`` of every batch, never the whole data set. The batch a step sees does
    not depend on the process count.

    Args:
      data: a pytree of arrays (numpy, memory-mapped, ...) with a leading example axis.
      indices: integer array ``(..., W)``.
      mask: a boolean array of ``indices``'s shape (False = padding); all True when None.
      mesh: the mesh.
      axis: the mesh axis the rows are sharded over.
      check: if given, ``check(rows, row_mask)`` is called on this process's rows (flattened
        to one leading axis) before they are placed, e.g. a loss's label validation; a row
        its error names (:func:`jaxgrad.reduce.batch_row`) is the row of ``data``.

    Returns:
      ``(batch, mask)``: global ``jax.Array`` s.

    Example::

      >>> import numpy as np, jaxgrad
      >>> mesh = jaxgrad.sharding.data_mesh()
      >>> batch, mask = jaxgrad.sharding.take_rows(np.arange(10.0), np.array([7, 2]), mesh=mesh)
      >>> batch.tolist(), mask.tolist()
      ([7.0, 2.0], [True, True])
    """
    indices = np.asarray(indices)
    if indices.ndim == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"`indices` must be an integer array with a row axis; got {indices.dtype} of "
            f"shape {indices.shape}"
        )
    size = reduce.batch_size(data, name="data")
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise ValueError(
            f"`indices` must lie in [0, {size}) (the rows of `data`); got values from "
            f"{indices.min()} to {indices.max()}"
        )
    mask = np.ones(indices.shape, bool) if mask is None else np.asarray(mask)
    if mask.shape != indices.shape:
        raise ValueError(
            f"`mask` must have the shape of `indices` {indices.shape}; got {mask.shape}"
        )
    devices = _check_axis(mesh, axis)
    if indices.shape[-1] % devices:
        raise ValueError(
            f"`indices`'s last axis ({indices.shape[-1]}) must be a multiple of the {devices} "
            f"devices of mesh axis {axis!r}"
        )
    rows = _process_rows(indices.shape[-1], mesh=mesh, axis=axis)
    lead = indices.ndim - 1
    local_idx, local_mask = indices[..., rows], mask[..., rows]
    from jaxgrad.data.files import check_unchanged  # (jaxgrad.data imports no sharding)

    for leaf in jax.tree_util.tree_leaves(data):  # a file rewritten under its map reads zeros
        check_unchanged(leaf)
    local = jax.tree_util.tree_map(lambda a: _native(np.asarray(a[local_idx])), data)
    if check is not None:
        flat = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[lead + 1 :]), local)
        with reduce.batch_rows(local_idx.reshape(-1)):  # an error names the row of `data`
            check(flat, local_mask.reshape(-1))
    sharding = NamedSharding(mesh, P(*([None] * lead), axis))

    def put(x):
        shape = (*indices.shape, *x.shape[lead + 1 :])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree_util.tree_map(put, local), put(local_mask)


def _native(x: np.ndarray) -> np.ndarray:
    """``x`` in the machine's byte order (IDX files are big-endian; devices are not)."""
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


def constrain(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """``tree`` placed as ``sharding`` inside a ``jit``: a sharding constraint on Auto axes,
    a reshard (the sharding becomes part of the type) on Explicit ones."""
    if sharding.mesh.explicit_axes:
        return jax.sharding.reshard(tree, sharding)
    return jax.lax.with_sharding_constraint(tree, sharding)


def _type_sharding(x):
    """The sharding in ``x``'s type (a ``NamedSharding`` over an abstract mesh), or None."""
    try:
        sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
        return None
    return sharding if isinstance(sharding, NamedSharding) else None


def _explicit_mesh(tree):
    """The (abstract) mesh of the first leaf of ``tree`` whose type names Explicit axes."""
    for x in jax.tree_util.tree_leaves(tree):
        sharding = _type_sharding(x)
        if sharding is not None and sharding.mesh.explicit_axes:
            return sharding.mesh
    return None


def _spec(x) -> tuple:
    """``x``'s type's partition spec, one entry per dimension (None: not sharded)."""
    sharding = _type_sharding(x)
    spec = () if sharding is None else tuple(sharding.spec)
    return (*spec, *(None,) * (np.ndim(x) - len(spec)))


def _axes(entry) -> set:
    """The mesh axes one partition-spec entry names."""
    return set(entry if isinstance(entry, tuple) else () if entry is None else (entry,))


def _out_specs(out, params, batch) -> PyTree:
    """The Explicit-axes sharding of each output leaf of a strategy.

    A subtree of ``out`` with the structure of ``params`` (gradients, clipped sums, noise,
    per-example gradients) is matched to the parameters leaf by leaf: a leaf shaped like
    its parameter keeps that parameter's sharding, one shaped ``(B, *parameter)`` is
    sharded along its rows like the batch and along the rest like the parameter (so a
    per-example bias gradient ``(B, 8)`` is sharded by example even where a weight is
    ``(B, 8)`` too). Other leaves are read off their shape: along the rows if their leading
    axis is the batch's (norms, dots, a Gram matrix, per-example losses), else like the
    parameter of that shape (two parameters of one shape but different shardings:
    replicated, right if not the cheapest), else replicated (losses, counts). Where
    ``params`` is one array, a leaf of its shape is taken for a gradient first.
    """
    by_shape: dict = {}
    for p in jax.tree_util.tree_leaves(params):
        by_shape.setdefault(np.shape(p), set()).add(_spec(p))
    like = {s: next(iter(v)) if len(v) == 1 else (None,) * len(s) for s, v in by_shape.items()}
    leaves = jax.tree_util.tree_leaves(batch)
    size = np.shape(leaves[0])[0] if leaves and np.ndim(leaves[0]) else None
    # The rows are sharded as the first leaf sharded along them says (a numpy leaf, or a
    # replicated one, says nothing about the others).
    row_entries = (_spec(x)[0] for x in leaves if np.ndim(x))
    rows = next((e for e in row_entries if e is not None), None) if size is not None else None

    def by_rows(rest):
        # A mesh axis shards one dimension at most: the rows' axes win (per-example
        # gradients of an FSDP-sharded parameter are sharded by example only).
        return P(rows, *(None if _axes(e) & _axes(rows) else e for e in rest))

    def spec(x, rows_first=True):
        shape = np.shape(x)
        if shape and shape[0] == size and (rows_first or shape not in like):
            return by_rows(like.get(shape[1:], (None,) * (len(shape) - 1)))  # (rest: a param's)
        return P(*like[shape]) if shape in like else P()

    def matched(x, p):  # an output leaf in the place of parameter p
        shape, own = np.shape(x), np.shape(p)
        if shape == own:
            return P(*_spec(p))
        if size is not None and shape == (size, *own):
            return by_rows(_spec(p))
        return spec(x)

    structure = jax.tree_util.tree_structure(params)
    if jax.tree_util.treedef_is_leaf(structure):
        # Every array has one array's structure: a leaf shaped like the parameter is taken
        # for its gradient (where B equals its shape, per-example values are replicated).
        return jax.tree_util.tree_map(lambda x: spec(x, rows_first=False), out)
    like_params = lambda x: jax.tree_util.tree_structure(x) == structure

    def place(x):
        return jax.tree_util.tree_map(matched, x, params) if like_params(x) else spec(x)

    return jax.tree_util.tree_map(place, out, is_leaf=like_params)


def placed_untyped(tree: PyTree) -> PyTree:
    """``tree`` with every array placed on a mesh with Explicit axes moved onto that mesh's
    Auto twin, where it is (the same pieces on the same devices): data a user placed with
    ``NamedSharding(jax.make_mesh(...), P("data"))``, which ``fit`` indexes by rows on the
    host and in its steps (an index into an Explicit-typed array must state its output
    sharding). Other leaves are returned as they are.
    """

    def untyped(x):
        placed = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        if not isinstance(placed, NamedSharding) or not placed.mesh.explicit_axes:
            return x
        mesh = placed.mesh
        auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
        return jax.device_put(x, NamedSharding(auto, placed.spec))

    return jax.tree_util.tree_map(untyped, tree)


_AUTO_HINT = (
    "jaxgrad runs on the Auto twin of the inputs' mesh (its axes are Explicit: "
    "docs/devices.md), and part of `loss_fn` is tied to the Explicit mesh: {error}. An array "
    "`loss_fn` closes over that is placed on that mesh: pass it as an extra loss argument "
    "after the mask, f(params, batch, mask, array) with loss_fn(params, example, array), "
    "which jaxgrad places on the Auto twin too, or close over it unplaced (a numpy array). "
    "Inside `loss_fn`, write "
    "`jax.lax.with_sharding_constraint` for `jax.sharding.reshard`, and give `jax.shard_map` "
    "the mesh `jax.sharding.get_abstract_mesh()`."
)


def auto_axes(fn):
    """``fn(params, batch, *rest)`` run with the Explicit axes of its inputs' mesh as Auto.

    The one place where jaxgrad meets meshes with sharding in types (``jax.make_mesh``
    makes Explicit axes): on such a mesh every ``vmap`` over a sharded axis and every
    gather would have to state its output sharding. Instead the inputs are resharded, at
    no cost (the same devices hold the same pieces), onto the same mesh with every axis
    Auto, where XLA's partitioner places the intermediate values as it does for
    :func:`data_mesh`, and the outputs are resharded back to Explicit types read off
    their shapes: gradients like the parameters, per-example outputs like the batch's
    rows, the rest replicated. Inputs without Explicit axes call ``fn`` unchanged.
    """

    @functools.wraps(fn)  # (jit's errors then name the arguments as `fn` does: `mask`)
    def wrapped(params, batch, *rest):
        mesh = _explicit_mesh((params, batch, rest))
        if mesh is None:
            return fn(params, batch, *rest)
        auto = mesh.update_axis_types({a: jax.sharding.AxisType.Auto for a in mesh.axis_names})
        args = (params, batch, *rest)
        with jax.sharding.use_abstract_mesh(auto):
            # Keep each input's pieces where they are: the type forgets the sharding, the
            # constraint tells the partitioner.
            specs = jax.tree_util.tree_map(lambda x: P(*(None,) * np.ndim(x)), args)
            moved = jax.sharding.reshard(args, specs)
            moved = jax.tree_util.tree_map(
                lambda y, x: jax.lax.with_sharding_constraint(y, NamedSharding(auto, P(*_spec(x)))),
                moved,
                args,
            )
            try:
                out = fn(*moved)
            except (ValueError, TypeError) as e:
                if "Auto" not in str(e):
                    raise
                raise ValueError(_AUTO_HINT.format(error=str(e).splitlines()[0])) from e
        specs = _out_specs(out, params, batch)
        return jax.sharding.reshard(
            out, jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
        )

    return wrapped
