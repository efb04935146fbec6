"""What makes a :func:`jaxgrad.train.fit` run the same run: the config every checkpoint
records, which a resumed run must match (:func:`jaxgrad.train.resume.restore`)."""

from __future__ import annotations

import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad import keys
from jaxgrad.train.arguments import in_memory
from jaxgrad.train.step import Engine


def run_config(
    engine: Engine,
    *,
    num_examples: int,
    batch_size: int,
    scan: bool,
    key_fingerprint: str,
    loss_key,
    mesh,
    private: bool,
    example_loss,
    examples,
    train_data,
    optimizer,
    params,
    checkpoint_dir,
) -> dict:
    """The run's config, as its checkpoints record it.

    Args:
      engine: the run's :class:`~jaxgrad.train.step.Engine` (its chunk and its own config).
      num_examples, batch_size: the training set's size and ``fit``'s batch size.
      scan: whether the chunks run under ``lax.scan``.
      key_fingerprint: the key's, from :func:`jaxgrad.train.arguments.run_key`.
      loss_key, mesh: ``fit``'s (``loss_key`` checked).
      private: whether the run is private.
      example_loss, examples: the per-example loss and the training set as the user's loss
        takes them (``example_loss(params, example)``, with ``loss_key`` and a key).
      train_data: the rows the steps take.
      optimizer, params: ``fit``'s optimizer (not the privatizer the steps run) and
        initial parameters.
      checkpoint_dir: ``fit``'s; without it neither the optimizer probe, the loss's
        fingerprint nor (for a plain run) the data's hash is made (only checkpoints read them).

    Returns:
      A JSON-able dict.
    """
    config = {
        "num_examples": num_examples,
        "batch_size": batch_size,
        "chunk": engine.chunk,
        "scan": bool(scan),
        # A resumed run must be the same run: same key and the same gradient (or privacy).
        "key": key_fingerprint,
        **(
            {"loss_key": keys.fingerprint(loss_key), "loss_keys": keys.LOSS_KEY_SCHEDULE}
            if loss_key is not None
            else {}
        ),
        **({"devices": int(mesh.devices.size)} if mesh is not None else {}),
        # A private run resumed on other data would reuse its noise and draws: the data's hash
        # must match. Kept secret. (A plain run records it for its checkpoints, below.)
        **({"data": _data_hash(train_data)} if private else {}),
        **engine.config,
        "optimizer": _optimizer_structure(jax.eval_shape(optimizer.init, params)),
    }
    if checkpoint_dir is not None:  # only checkpoints read them: no trace otherwise
        config["optimizer_probe"] = _optimizer_probe(optimizer, params)
        extra = () if loss_key is None else (jax.eval_shape(lambda: loss_key),)  # the step's
        config["loss"] = loss_fingerprint(example_loss, params, examples, *extra)
        if not private:  # a plain run resumed on other data is warned (a private one refused)
            config["data"] = _data_hash(train_data)
    return config


def loss_fingerprint(loss_fn, params, train_data, *args) -> str:
    """``"<jax version>:<hash>"``: a SHA-256 of the loss's program on one example — its
    jaxpr, printed without source lines or object addresses, and the bytes of the arrays it
    closes over (of one spread over several processes, its dtype and shape) — or
    ``"unknown"`` where it cannot be traced on abstract values.

    A resumed private run replays the draws and noise of the steps it re-takes: with another
    loss or model (another computation, other closed-over weights) the noise would be reused on
    another gradient. The jaxpr's printed form may change with JAX's version, so fingerprints
    are compared only between runs on the same version. ``args``: the loss's further
    arguments after the example (abstract values), such as a step's loss key.
    """
    abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    example = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), train_data
    )
    try:
        closed = jax.make_jaxpr(loss_fn)(jax.tree_util.tree_map(abstract, params), example, *args)
    except Exception:  # a loss that cannot be traced on abstract values: no fingerprint
        return "unknown"
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed.jaxpr))  # a callback's address
    digest = hashlib.sha256(text.encode())
    for const in closed.consts:
        if jax.dtypes.issubdtype(const.dtype, jax.dtypes.prng_key):
            const = jax.random.key_data(const)
        if isinstance(const, jax.Array) and not const.is_fully_addressable:
            # Spread over processes, none can read it whole: its dtype and shape, the same in
            # every process (its values are then not compared).
            digest.update(f"{np.dtype(const.dtype).str}{tuple(const.shape)}".encode())
            continue
        value = np.asarray(const)
        digest.update(f"{value.dtype.str}{value.shape}".encode() + value.tobytes())
    return f"{jax.__version__}:{digest.hexdigest()[:16]}"


# Rows of a memory-mapped leaf the data's hash reads in a one-process run: such data is not
# read whole, so its hash covers its shape and these rows, spread evenly over it. In a run of
# several processes each reads only its own rows, and its hash covers the shape alone.
HASHED_ROWS = 1024


def _data_hash(data) -> str:
    """A SHA-256 of every leaf's dtype, shape and bytes (to tell a resumed run's data apart).

    Of a leaf not in memory (memory-mapped, lazy): its dtype and shape, and in a one-process
    run the bytes of :data:`HASHED_ROWS` rows spread evenly over it, the first and last
    included (other data of the same shape is told apart, a change of a few rows between
    those may not be). The same in every process.
    """
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(data):
        digest.update(f"{np.dtype(leaf.dtype).str}{tuple(leaf.shape)}".encode())
        if in_memory(leaf):
            digest.update(np.ascontiguousarray(leaf).tobytes())
        elif jax.process_count() == 1 and len(leaf):
            rows = np.unique(np.linspace(0, len(leaf) - 1, HASHED_ROWS).round().astype(np.int64))
            digest.update(np.ascontiguousarray(leaf[rows]).tobytes())
    return digest.hexdigest()[:16]


def _optimizer_structure(opt_state) -> str:
    """The optimizer's state, named by its parts: ``"ScaleByAdamState, EmptyState (5 arrays)"``.

    Recorded in every checkpoint, so a run resumed with another optimizer is told so, not
    that the checkpoint "holds 15 arrays; the template has 6 leaves".
    """
    names = []

    def visit(x):
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            names.append(type(x).__name__)
        if isinstance(x, (tuple, list)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)

    visit(opt_state)
    leaves = len(jax.tree_util.tree_leaves(opt_state))
    return f"{', '.join(names) or type(opt_state).__name__} ({leaves} arrays)"


def _optimizer_probe(optimizer, params) -> str:
    """A fingerprint of the optimizer's hyperparameters: its first two updates on a fixed
    probe (parameters and gradients made from the parameters' shapes, not their values),
    rounded to 4 significant digits and hashed.

    optax keeps hyperparameters in closures, out of reach; what they do is not. A changed
    learning rate, beta, weight decay or schedule changes these updates; rounding keeps
    the same optimizer's fingerprint stable across devices (a rare round-off across a digit
    only gives a spurious warning, never a refusal).
    """

    def pattern(x, a, b):
        i = jnp.arange(np.prod(x.shape, dtype=int)).reshape(x.shape)
        return ((i % a) - b + 0.5).astype(x.dtype) * 0.3

    def run(p):
        p = jax.tree_util.tree_map(lambda x: pattern(x, 7, 3), p)
        g = jax.tree_util.tree_map(lambda x: pattern(x, 5, 2), p)
        state = optimizer.init(p)
        u1, state = optimizer.update(g, state, p)
        u2, _ = optimizer.update(jax.tree_util.tree_map(lambda x: -0.7 * x, g), state, p)
        return u1, u2

    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    try:
        updates = jax.jit(run)(zeros)
    except Exception:  # an optimizer that needs extra update arguments: no fingerprint
        return "unknown"
    values = [np.asarray(x, np.float64).ravel()[:256] for x in jax.tree_util.tree_leaves(updates)]
    digits = np.concatenate(values) if values else np.zeros(0)
    rounded = ",".join(f"{v:.4g}" for v in digits)
    return hashlib.sha256(rounded.encode()).hexdigest()[:16]
