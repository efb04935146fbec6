"""Subprocess side of tests/test_sharding.py: runs on emulated CPU devices, prints JSON.

``strategies``: every strategy on meshes of 1, 2, 4 and 8 devices against the unsharded
float64 result (and a Python loop over examples), with uneven data; output shardings; the
compiled HLO's all-gathers; bad inputs. ``private``: DP-SGD ``fit`` on meshes of 1, 2 and 4
devices against the one-device run, the noise of a zero-gradient loss, memory-mapped data and
the CLI's ``--dp --devices``. ``train``: one process of a multi-process training run
(``--process-id``, ``--num-processes``, ``--coordinator``), plain and DP-SGD, on data that
counts the rows each process reads. ``cli``: one process of the CLI over 2 processes on a
memory-mapped .npz. ``user_meshes``: every entry point on ``jax.make_mesh`` meshes (Explicit
and Auto axes), data-only and 4 x 2 data x model with sharded parameters, against one device;
HLO all-gathers, DP noise, fit's sharded state. ``train`` also runs fit with parameters
sharded over a 2 x 2 mesh spanning both processes, resumed from orbax checkpoints (each
process writing its pieces), and a corrupt newest one.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import sys
import tempfile
import time

from _xla_flags import FAST_COMPILE


def _setup(devices: int, *, cache: bool = True):
    # XLA's CPU backend at LLVM -O0: what these workers test is decided before code
    # generation (jaxgrad's programs, the SPMD partitioning, the all-gathers in the optimised
    # HLO, which keys draw the noise), and the results are the same up to float64 round-off
    # (measured, user_meshes: every one-device error still ~1e-16, every bitwise and
    # sharding check unchanged), while compiling the many small programs took a third less
    # CPU (user_meshes: 99 s -> 63 s, loaded machine).
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    # JAX's compilation cache, as tests/conftest.py sets it for the test processes: `private`
    # fits the same program several times (the uninterrupted run, the interrupted one, the
    # resumed one, on memory-mapped data), and jit's own cache is per function object, so
    # each fit compiled afresh (measured: its CPU 54 s -> 39 s, loaded machine). A hit runs
    # the executable XLA compiled for the identical program, options and flags: no result
    # changes. A fresh folder per process (removed at exit). Not in the two-process modes:
    # there only process 0 writes to it (JAX's rule), so it gained nothing, and with it the
    # processes compile on different schedules; a CI run with it hung in the two-process
    # setup (600 s timeout, 2026-12-06), a cause suspected, not proven.
    if not cache:
        return
    folder = tempfile.mkdtemp(prefix="jaxgrad-worker-xla-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


def _rel(a, b) -> float:
    import jax
    import numpy as np

    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(float(np.max(np.abs(y))), 1e-300)
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    return worst


def strategies() -> dict:
    _setup(8)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    import jaxgrad
    from jaxgrad import sharding

    rng = np.random.default_rng(0)
    mlp = jaxgrad.models.mlp([5, 8, 3], dtype=jnp.float64)
    mlp_loss = jaxgrad.losses.supervised(
        mlp.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )

    # A small token model (embedding, tanh, per-token dense): cheap to compile, and its loss
    # is a (sum of real-token losses, real-token count) pair like the transformer's.
    def token_init(key):
        k1, k2 = jax.random.split(key)
        embed = jax.random.normal(k1, (11, 6), jnp.float64)
        return {"embed": embed, "out": jax.random.normal(k2, (6, 11), jnp.float64) / 3}

    def token_loss(p, ex):
        tokens, targets = ex
        logits = jnp.tanh(p["embed"][tokens]) @ p["out"]
        return jaxgrad.losses.token_cross_entropy(logits, targets)

    # Uneven cases. 16 examples, the last 4 masked out and holding garbage (NaN inputs, an
    # ignore label): with 4 devices the last one holds only padding, with 8 the last two do.
    # 13 token sequences (13 does not divide by 2, 4 or 8: shard_batch pads them) whose
    # real lengths go from 8 down to 1, in order, so devices hold very different numbers of
    # real tokens.
    x16, y16 = rng.normal(size=(16, 5)), rng.integers(0, 3, 16)
    m16 = np.arange(16) < 12
    x16[12:] = np.nan  # padding garbage must not leak
    y16[12:] = -100
    lengths = np.sort(rng.integers(1, 9, 13))[::-1].copy()
    lengths[-4:] = 1
    tok = rng.integers(1, 11, (13, 8))
    tok[np.arange(8)[None, :] >= lengths[:, None]] = 0
    tgt = np.roll(tok, -1, axis=1)
    tgt[:, -1] = 0
    cases = {
        "mlp_16_masked": (mlp_loss, mlp.init(jax.random.key(1)), (x16, y16), m16),
        "tokens_13": (token_loss, token_init(jax.random.key(2)), (tok, tgt), None),
    }
    factories = {
        "batch_grad": lambda f: jaxgrad.batch_grad(f),
        "mean_of_per_example_grads": lambda f: jaxgrad.mean_of_per_example_grads(f),
        "accumulate_grad": lambda f: jaxgrad.accumulate_grad(f, num_microbatches=2),
        "per_example_norms": lambda f: jaxgrad.per_example_norms(f, chunk_size=8),
        "clipped_grad": lambda f: jaxgrad.clipped_grad(f, l2_clip=0.3, return_norms=True),
        "grad_stats": lambda f: jaxgrad.grad_stats(f),
    }
    out = {"errors": {}, "loop_errors": {}, "sharded_outputs": {}, "gathers": {}, "bad": {}}
    for cname, (loss_fn, params, batch, mask) in cases.items():
        size = len(batch[0])
        real = np.ones(size, bool) if mask is None else mask
        # Independent reference: a Python loop over the real examples, (sum, count) pairs.
        total, count, gsum = 0.0, 0.0, None
        one = jax.jit(jax.grad(jaxgrad.reduce.loss_sum_fn(loss_fn)))
        for i in np.flatnonzero(real):
            ex = tuple(jnp.asarray(a[i]) for a in batch)
            s, c = jaxgrad.reduce.as_sum_count(loss_fn(params, ex))
            g = one(params, ex)
            total, count = total + float(s), count + float(c)
            gsum = g if gsum is None else jax.tree_util.tree_map(jnp.add, gsum, g)
        loop_grad = jax.tree_util.tree_map(lambda v, n=count: v / n, gsum)
        refs = {
            k: make(loss_fn)(params, tuple(map(jnp.asarray, batch)), mask)
            for k, make in factories.items()
        }
        for d in (1, 2, 4, 8):
            mesh = sharding.data_mesh(d)
            sbatch, smask = sharding.shard_batch(batch, mask, mesh=mesh)
            sparams = sharding.replicate(params, mesh=mesh)
            for k, make in factories.items():
                # One compilation: its HLO is inspected and the same executable is run.
                compiled = jax.jit(make(loss_fn)).lower(sparams, sbatch, smask).compile()
                if d > 1 and cname == "mlp_16_masked":
                    # No all-gather bigger than one element per device (the position of the
                    # first real row): the batch is never gathered. 16 rows on up to 8
                    # devices in 2 microbatches or chunks of 8 keep every row in place.
                    hlo = compiled.as_text()
                    shapes = re.findall(r"= \(?([a-z0-9]+\[[0-9,]*\])[^=]*? all-gather\(", hlo)
                    sizes = [
                        int(np.prod([int(v) for v in t[t.index("[") + 1 : -1].split(",") if v]))
                        for t in shapes
                    ]
                    out["gathers"][f"{k}/{d}"] = [max(sizes, default=0), d]
                got = compiled(sparams, sbatch, smask)
                ref = refs[k]
                # Per-example outputs: compare the real rows (shard_batch appended padding).
                if k == "per_example_norms":
                    got = got[:size]
                elif k == "clipped_grad":
                    got, ref = (got[0], got[1][:size]), (ref[0], ref[1])
                elif k == "grad_stats":
                    got = got._replace(norms=got.norms[:size])
                elif isinstance(got, jaxgrad.GradResult):
                    got = got._replace(norms=None if got.norms is None else got.norms[:size])
                out["errors"][f"{cname}/{k}/{d}"] = _rel(got, ref)
                if k == "batch_grad":
                    out["loop_errors"][f"{cname}/{d}"] = _rel(got.grads, loop_grad)
                if k == "per_example_norms":
                    spec = str(compiled(sparams, sbatch, smask).sharding.spec)
                    out["sharded_outputs"][f"{cname}/{d}"] = [spec, d]

    # dp_grad: the noise is drawn once, from the one key, for the replicated result (never
    # once per device), so a sharded batch gives the one-device result. The mlp case's last
    # 4 rows are padding: on 4 devices the last holds only padding, on 8 the last two.
    from helpers import private_key

    from jaxgrad.privacy import dp_grad, gaussian

    loss_fn, params, batch, mask = cases["mlp_16_masked"]
    key = private_key(7)
    hyper = dict(l2_clip=0.3, noise_multiplier=1.3, expected_batch_size=10.0)
    zero_loss = lambda p, ex: 0.0 * loss_fn(p, ex)  # zero gradients: noise only
    dp, dp_zero = dp_grad(loss_fn, **hyper), dp_grad(zero_loss, **hyper)
    jbatch = tuple(map(jnp.asarray, batch))
    ref, ref_zero = dp(params, jbatch, mask, key), dp_zero(params, jbatch, mask, key)
    # Independent reference for the noise alone: N(0, (σC)²) from `key`, flat over the leaves.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    z = np.asarray(gaussian.normal(key, (sum(x.size for x in leaves),), jnp.float64))
    cuts = np.cumsum([x.size for x in leaves])[:-1]
    noise = [
        (1.3 * 0.3 * part / 10.0).reshape(x.shape)
        for part, x in zip(np.split(z, cuts), leaves, strict=True)
    ]
    out["dp"] = {"noise_vs_numpy": _rel(ref_zero, jax.tree_util.tree_unflatten(treedef, noise))}
    for d in (1, 2, 4, 8):
        mesh = sharding.data_mesh(d)
        sbatch, smask = sharding.shard_batch(batch, mask, mesh=mesh)
        sparams = sharding.replicate(params, mesh=mesh)
        out["dp"][f"grad/{d}"] = _rel(dp(sparams, sbatch, smask, key), ref)
        zero = dp_zero(sparams, sbatch, smask, key)
        pairs = zip(
            jax.tree_util.tree_leaves(zero), jax.tree_util.tree_leaves(ref_zero), strict=True
        )
        out["dp"][f"noise_exact/{d}"] = all(np.array_equal(a, b) for a, b in pairs)

    # Bad inputs.
    mesh = sharding.data_mesh(4)

    def error(fn):
        try:
            fn()
        except (ValueError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    wrong_axis = jax.device_put(np.ones((16, 8)), NamedSharding(mesh, P(None, "data")))
    out["bad"]["feature_axis"] = error(lambda: sharding.shard_batch((wrong_axis, y16), mesh=mesh))
    other = Mesh(np.array(jax.devices()[:4]), ("model",))
    out["bad"]["no_axis"] = error(lambda: sharding.shard_batch((x16, y16), mesh=other))
    out["bad"]["too_many_devices"] = error(lambda: sharding.data_mesh(16))
    out["bad"]["process_id"] = error(
        lambda: sharding.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
    )
    out["bad"]["coordinator"] = error(
        lambda: sharding.initialize("localhost", num_processes=2, process_id=0)
    )
    bad_labels = np.array(y16)  # a bad label in a real row, on the second device
    bad_labels[5] = 7
    sb, sm = sharding.shard_batch((x16, bad_labels), m16, mesh=mesh)
    out["bad"]["sharded_label"] = error(
        lambda: jaxgrad.batch_grad(mlp_loss)(
            sharding.replicate(cases["mlp_16_masked"][1], mesh=mesh), sb, sm
        )
    )

    # Per-example PRNG keys (dropout) in a sharded batch, with a loss that validates its batch:
    # the validation reads each device's rows (keys cannot become numpy arrays).
    def keyed_loss(p, example):
        x, y, k = example
        return mlp_loss(p, (x * jax.random.bernoulli(k, 0.75, x.shape), y))

    keyed_loss.validate = lambda batch, mask=None: mlp_loss.validate(batch[:2], mask)
    keys = jax.random.split(jax.random.key(3), 16)
    mlp_params = cases["mlp_16_masked"][1]
    ref = jaxgrad.batch_grad(keyed_loss)(mlp_params, (x16, y16, keys), m16)
    sb, sm = sharding.shard_batch((x16, y16, keys), m16, mesh=mesh)
    got = jaxgrad.batch_grad(keyed_loss)(sharding.replicate(mlp_params, mesh=mesh), sb, sm)
    out["keyed_error"] = _rel(got, ref)

    # fit(loss_key=...): the per-example dropout keys follow the rows, not the devices.
    import optax

    def dropout_loss(p, example, key):
        x, y = example
        return mlp_loss(p, (jnp.where(jax.random.bernoulli(key, 0.7, x.shape), x / 0.7, 0), y))

    def fit_keyed(mesh):
        return jaxgrad.train.fit(
            dropout_loss,
            mlp_params,
            (np.asarray(x16[:12]), np.asarray(y16[:12])),  # the 12 real rows
            optimizer=optax.sgd(0.1),
            epochs=2,
            batch_size=6,
            key=jax.random.key(1),
            loss_key=jax.random.key(2),
            quiet=True,
            mesh=mesh,
            scan=False,
        ).params

    out["loss_key_mesh_error"] = _rel(fit_keyed(sharding.data_mesh(4)), fit_keyed(None))
    sb, sm = sharding.shard_batch((x16, bad_labels, keys), m16, mesh=mesh)
    out["bad"]["sharded_label_keyed"] = error(
        lambda: jaxgrad.batch_grad(keyed_loss)(sharding.replicate(mlp_params, mesh=mesh), sb, sm)
    )
    return out


def _token_problem(vocab=11, width=6, rows=16, real=14, seed=0, dtype="float64"):
    """A (sum, count) token loss on ``rows`` sequences of very different real lengths, the
    last ``rows - real`` masked out (on 8 devices of 2 rows each, the last device holds only
    padding), and its parameters."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxgrad

    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(1, 9, rows))[::-1].copy()
    tok = rng.integers(1, vocab, (rows, 8))
    tok[np.arange(8)[None, :] >= lengths[:, None]] = 0
    tgt = np.roll(tok, -1, axis=1)
    tgt[:, -1] = 0

    def loss(p, ex):
        tokens, targets = ex
        hidden = jnp.tanh(p["embed"][tokens] @ p["w"] + p["b"])
        return jaxgrad.losses.token_cross_entropy(hidden @ p["out"], targets)

    k = jax.random.split(jax.random.key(seed + 1), 3)
    params = {
        "embed": jax.random.normal(k[0], (vocab, width), dtype),
        "w": jax.random.normal(k[1], (width, 8), dtype) / 2,
        "b": jnp.linspace(-0.5, 0.5, 8, dtype=dtype),
        "out": jax.random.normal(k[2], (8, vocab), dtype) / 3,
    }
    return loss, params, (tok, tgt), np.arange(rows) < real


def _entry_points(loss, reference):
    """Every public entry point that takes ``(params, batch, mask)``, as ``f(p, b, m)``."""
    import jax
    from helpers import private_key

    import jaxgrad
    from jaxgrad.privacy import dp_grad, sampled_dp_grad

    dp = dp_grad(loss, l2_clip=0.3, noise_multiplier=1.3, expected_batch_size=10.0)
    sampled = sampled_dp_grad(
        loss, l2_clip=0.3, noise_multiplier=1.3, sampling_rate=0.5, physical_batch_size=8
    )
    dots = jaxgrad.per_example_dots(loss)
    return {
        "batch_grad": jaxgrad.batch_grad(loss),
        "mean_of_per_example_grads": jaxgrad.mean_of_per_example_grads(loss),
        "per_example_grads": jaxgrad.per_example_grads(loss),
        "accumulate_grad": jaxgrad.accumulate_grad(loss, num_microbatches=2),
        "per_example_norms": jaxgrad.per_example_norms(loss),
        "clipped_grad": jaxgrad.clipped_grad(loss, l2_clip=0.3, return_norms=True),
        "grad_stats": jaxgrad.grad_stats(loss),
        "per_example_dots": lambda p, b, m: dots(p, b, m, reference=reference),
        "gradient_gram": jaxgrad.gradient_gram(loss),
        "dp_grad": lambda p, b, m: dp(p, b, m, private_key(7)),
        # The data set is the batch's real rows... and its padding: sampled_dp_grad takes no
        # mask, so it samples all 16 rows (the padded ones are ordinary rows here).
        "sampled_dp_grad": lambda p, b, m: sampled(p, b, private_key(8)),
        # The caller's own jit around a strategy, on the same inputs.
        "jit(batch_grad)": jax.jit(jaxgrad.batch_grad(loss)),
    }


def _specs(tree) -> list:
    import jax

    return [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(tree)]


def _auto_only(entries):
    names = ("per_example_grads", "per_example_dots", "gradient_gram", "sampled_dp_grad")
    return [(k, entries[k]) for k in (*names, "jit(batch_grad)")]


def user_meshes() -> dict:
    """Meshes a JAX user makes (``jax.make_mesh``, Explicit axes by default, and Auto), the
    batch placed with ``NamedSharding(mesh, P("data"))``: every entry point and ``fit``
    against one device in float64."""
    _setup(8)
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)

    out = {"errors": {}, "specs": {}, "fit": {}}
    # One problem for the data-only meshes and the ("data", "model") mesh (the table's 128
    # rows shard over 4 devices; 1848 parameters for the noise's spread), so the one-device
    # results are computed, and their programs compiled, once for both (201 -> 178
    # compilations; CPU 128 -> 114 s, both versions run side by side on a loaded machine).
    problem = _token_problem(vocab=128)
    loss, params, batch, mask = problem
    reference = jax.tree_util.tree_map(lambda x: x * 0.5 + 0.1, params)
    entries = _entry_points(loss, reference)
    refs = {k: f(params, batch, mask) for k, f in entries.items()}
    meshes = {
        "explicit": jax.make_mesh((8,), ("data",)),
        "auto": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)),
    }
    out["default_axis_types"] = str(meshes["explicit"].axis_types)
    for mname, mesh in meshes.items():
        rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        sbatch, smask = jax.device_put(batch, rows), jax.device_put(mask, rows)
        sparams = jax.device_put(params, rep)
        # On Auto axes, the entry points tests/test_sharding.py does not already run there.
        for k, f in entries.items() if mname == "explicit" else _auto_only(entries):
            got = f(sparams, sbatch, smask)
            out["errors"][f"{mname}/{k}"] = _rel(got, refs[k])
            if k in ("batch_grad", "per_example_norms", "per_example_grads"):
                out["specs"][f"{mname}/{k}"] = _specs(got)

    out["model_axis"] = _model_axis(problem, reference, refs)
    out["placements"] = _placements(meshes["explicit"])
    return out


def _placements(mesh) -> dict:
    """Inputs placed as users place them on an Explicit ("data",) mesh: a numpy first leaf,
    an array the loss closes over, training data placed by rows, a mask on one device, and
    ``shard_batch`` on a 2-D mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxgrad
    from jaxgrad import sharding

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(16, 5)), rng.normal(size=(16, 4))
    params = {"w": jnp.asarray(rng.normal(size=(5, 4)))}
    loss = lambda p, ex: jnp.sum((jnp.tanh(ex[0] @ p["w"]) - ex[1]) ** 2)
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sparams, smask = jax.device_put(params, rep), jax.device_put(np.ones(16, bool), rows)
    out = {}
    norms = jaxgrad.per_example_norms(loss)(sparams, (x, jax.device_put(y, rows)), smask)
    out["numpy_first_leaf"] = str(norms.sharding.spec)

    frozen = jax.device_put(np.eye(4), rep)
    closing = lambda p, ex: loss(p, ex) + jnp.sum(jnp.tanh(ex[0] @ p["w"]) @ frozen)
    out["closure"], out["mask_on_one_device"] = "no error", "no error"
    try:
        jaxgrad.batch_grad(closing)(sparams, jax.device_put((x, y), rows))
    except ValueError as e:
        out["closure"] = str(e)
    try:
        jaxgrad.per_example_norms(loss)(
            sparams, (x, y), jax.device_put(np.ones(16, bool), jax.devices()[3])
        )
    except ValueError as e:
        out["mask_on_one_device"] = str(e)

    fit = dict(optimizer=optax.sgd(0.1), key=jax.random.key(5), epochs=1, batch_size=8)
    ref = jaxgrad.train.fit(loss, params, (x, y), progress="none", **fit).params
    placed = jax.device_put((x, y), rows)
    out["fit_placed_data"] = {
        str(m is not None): _rel(jaxgrad.train.fit(loss, params, placed, mesh=m, **fit).params, ref)
        for m in (mesh, None)
    }
    grid = jax.make_mesh((4, 2), ("data", "model"))
    b, m = sharding.shard_batch((x[:14],), np.ones(14, bool), mesh=grid)
    out["shard_batch_2d"] = [list(b[0].shape), str(b[0].sharding.spec), int(np.sum(m))]
    return out


# Parameters over a 4 x 2 ("data", "model") mesh: tensor-parallel weights over "model", the
# embedding table FSDP-style over "data" along its large (vocabulary) dimension.
MODEL_SPECS = {
    "embed": ("data", None),
    "w": (None, "model"),
    "b": ("model",),
    "out": ("model", None),
}


MODEL_AUTO = ("batch_grad", "per_example_norms", "clipped_grad", "dp_grad")


def _gathers(compiled) -> list:
    """The result shapes of the compiled program's all-gathers."""
    hlo = compiled.as_text()
    shapes = re.findall(r"= \(?[a-z0-9]+\[([0-9,]*)\][^=]*? all-gather\(", hlo)
    return [[int(v) for v in t.split(",") if v] for t in shapes]


def _model_axis(problem, reference, refs) -> dict:
    """The ``problem`` (``_token_problem``'s) on a 4 x 2 ("data", "model") mesh against its
    one-device results ``refs`` (of ``_entry_points(loss, reference)``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from helpers import private_key
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxgrad
    from jaxgrad.privacy import dp_grad, gaussian
    from jaxgrad.train import PrivacyConfig

    out = {"errors": {}, "specs": {}, "gathers": {}, "fit": {}, "noise": {}}
    loss, params, batch, mask = problem
    out["param_shapes"] = {k: list(v.shape) for k, v in params.items()}
    # Zero gradients: dp_grad is the noise alone, σC z / B_e, z ~ N(0, I) over all leaves.
    sigma, clip, b_e = 1.3, 0.3, 10.0
    noise = dp_grad(
        lambda p, ex: 0.0 * loss(p, ex)[0],
        l2_clip=clip,
        noise_multiplier=sigma,
        expected_batch_size=b_e,
    )
    key = private_key(11)
    noise_ref = noise(params, batch, mask, key)
    # Independent reference for the noise: one flat N(0, 1) vector from `key`, cut into leaves.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    z = np.asarray(gaussian.normal(key, (sum(x.size for x in leaves),), jnp.float64))
    cuts = np.cumsum([x.size for x in leaves])[:-1]
    numpy_noise = [
        (sigma * clip * part / b_e).reshape(x.shape)
        for part, x in zip(np.split(z, cuts), leaves, strict=True)
    ]
    out["noise"]["one_device_vs_numpy"] = _rel(noise_ref, treedef.unflatten(numpy_noise))
    data, fit_refs = tuple(np.asarray(a) for a in batch), {}
    for mname, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
        mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)

        def put(tree, mesh=mesh):
            return {
                k: jax.device_put(v, NamedSharding(mesh, P(*MODEL_SPECS[k])))
                for k, v in tree.items()
            }

        rows = NamedSharding(mesh, P("data"))
        sparams, sbatch, smask = (
            put(params),
            jax.device_put(batch, rows),
            jax.device_put(mask, rows),
        )
        sentries = _entry_points(loss, put(reference))
        if mname == "auto":  # (the rest as on the Explicit mesh, at less compilation)
            sentries = {k: sentries[k] for k in MODEL_AUTO}
        for k, f in sentries.items():
            got = f(sparams, sbatch, smask)
            out["errors"][f"{mname}/{k}"] = _rel(got, refs[k])
            if k in ("clipped_grad", "dp_grad", "batch_grad"):
                grads = got[0] if k == "clipped_grad" else got.grads if k == "batch_grad" else got
                out["specs"][f"{mname}/{k}"] = {n: str(v.sharding.spec) for n, v in grads.items()}
            if k in MODEL_AUTO and (mname == "explicit" or k == "clipped_grad"):
                compiled = jax.jit(f).lower(sparams, sbatch, smask).compile()
                out["gathers"][f"{mname}/{k}"] = _gathers(compiled)
        got = noise(sparams, sbatch, smask, key)
        flat = np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(got)])
        out["noise"][mname] = {
            "exact": all(
                np.array_equal(a, b)
                for a, b in zip(
                    jax.tree_util.tree_leaves(got),
                    jax.tree_util.tree_leaves(noise_ref),
                    strict=True,
                )
            ),
            "std_ratio": float(np.std(flat) / (sigma * clip / b_e)),
            "size": int(flat.size),
        }
        # fit with the sharded parameters: the same run as on one device; the parameters
        # and the optimizer state keep their sharding.
        dp = PrivacyConfig(
            l2_clip=0.5, noise_multiplier=1.1, physical_batch_size=5, accountant="rdp"
        )
        for name, privacy in (("plain", None), ("private", dp)):
            if mname == "auto" and privacy is None:
                continue
            kw = dict(optimizer=optax.adam(0.05), key=private_key(5), epochs=1, batch_size=8)
            kw |= dict(privacy=privacy, progress="none")
            if name not in fit_refs:
                fit_refs[name] = jaxgrad.train.fit(loss, params, data, **kw)
            ref = fit_refs[name]
            # One process's orbax checkpoint of the sharded state (the plain run's): a run
            # resumed from it has nothing left to do and returns it, restored and placed.
            saved = tempfile.mkdtemp() if name == "plain" else None
            got = jaxgrad.train.fit(loss, sparams, data, mesh=mesh, checkpoint_dir=saved, **kw)
            state_specs = [
                [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(t)]
                for t in (got.state.params, got.state.opt_state[0].mu, got.state.opt_state[0].nu)
            ]
            out["fit"][f"{mname}/{name}"] = {
                "error": _rel(got.params, ref.params),
                "specs": state_specs,
                "want": [str(P(*MODEL_SPECS[k])) for k in sorted(MODEL_SPECS)],
            }
            if saved is not None:
                back = jaxgrad.train.fit(loss, sparams, data, mesh=mesh, checkpoint_dir=saved, **kw)
                leaves = jax.tree_util.tree_leaves
                out["fit"][f"{mname}/{name}"]["restored"] = {
                    "files": sorted(os.listdir(saved)),
                    "bitwise": all(
                        np.array_equal(a, b) and a.sharding == b.sharding
                        for a, b in zip(leaves(back.state), leaves(got.state), strict=True)
                    ),
                }
    return out


class RowCounter:
    """An array-like over ``base`` that records every row index read and refuses to be
    converted whole (``np.asarray`` of it raises): what a process of a data-parallel run
    touches of a data set it must not load whole."""

    def __init__(self, base):
        self.base, self.reads = base, []
        self.shape, self.dtype, self.ndim = base.shape, base.dtype, base.ndim

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        import numpy as np

        index = np.asarray(index)
        assert np.issubdtype(index.dtype, np.integer), index
        self.reads.extend(int(i) for i in index.ravel())
        return self.base[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole data set was materialised")


def private_problem(n=50):
    """A float64 MLP on ``n`` examples: expected batch 12, physical batches of 5 (5 does not
    divide by 2 or 4 devices: they are padded, and a device may hold only padding)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from helpers import private_key

    import jaxgrad
    from jaxgrad.train import PrivacyConfig

    model = jaxgrad.models.mlp([6, 8, 3], dtype=jnp.float64)
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=3
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6))
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    config = PrivacyConfig(
        l2_clip=0.7, noise_multiplier=1.2, physical_batch_size=5, accountant="rdp"
    )
    kw = dict(
        optimizer=optax.adam(0.05),
        key=private_key(5),
        privacy=config,
        epochs=2,
        batch_size=12,
        progress="none",
    )
    return loss_fn, model.init(jax.random.key(1)), (x, y), kw


def private(directory: str) -> dict:
    _setup(8)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    jax.config.update("jax_enable_x64", True)
    from helpers import private_key

    import jaxgrad
    from jaxgrad import sharding
    from jaxgrad.privacy import gaussian
    from jaxgrad.train import PrivacyConfig

    out = {"errors": {}, "epsilons": {}, "steps": {}}
    loss_fn, params, data, kw = private_problem()
    ref = jaxgrad.train.fit(loss_fn, params, data, **kw)
    out["epsilons"]["ref"] = [r["epsilon"] for r in ref.history]
    out["steps"]["ref"] = int(ref.state.step)
    results = {}
    for d in (1, 2, 4):
        got = jaxgrad.train.fit(loss_fn, params, data, mesh=sharding.data_mesh(d), **kw)
        results[d] = got
        out["errors"][str(d)] = _rel(got.params, ref.params)
        out["epsilons"][str(d)] = [r["epsilon"] for r in got.history]
        out["steps"][str(d)] = int(got.state.step)

    # Interrupted after epoch 1's checkpoint on 2 devices, then resumed: bit for bit.
    calls = []

    def interrupt(params):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {}

    ckpt_dir = os.path.join(directory, "ckpt")
    try:
        jaxgrad.train.fit(
            loss_fn,
            params,
            data,
            mesh=sharding.data_mesh(2),
            checkpoint_dir=ckpt_dir,
            evaluate=interrupt,
            **kw,
        )
    except KeyboardInterrupt:
        pass
    out["checkpoints_before_resume"] = len(jaxgrad.train.checkpoint.list_checkpoints(ckpt_dir))
    resumed = jaxgrad.train.fit(
        loss_fn, params, data, mesh=sharding.data_mesh(2), checkpoint_dir=ckpt_dir, **kw
    )
    same = zip(
        jax.tree_util.tree_leaves(resumed.params),
        jax.tree_util.tree_leaves(results[2].params),
        strict=True,
    )
    out["resume_bitwise"] = all(np.array_equal(a, b) for a, b in same)
    out["resume_epsilons"] = [r["epsilon"] for r in resumed.history]
    try:
        jaxgrad.train.fit(
            loss_fn, params, data, mesh=sharding.data_mesh(4), checkpoint_dir=ckpt_dir, **kw
        )
        out["resume_other_devices"] = None
    except ValueError as e:
        out["resume_other_devices"] = str(e)

    # Memory-mapped data (an uncompressed .npz): the same run, bit for bit, read row by row.
    path = os.path.join(directory, "data.npz")
    np.savez(path, x=data[0], y=data[1])
    mapped = (jaxgrad.data.memmap(path, key="x"), jaxgrad.data.memmap(path, key="y"))
    got = jaxgrad.train.fit(loss_fn, params, mapped, mesh=sharding.data_mesh(2), **kw)
    leaves = jax.tree_util.tree_leaves
    same = zip(leaves(got.params), leaves(results[2].params), strict=True)
    out["memmap_private_equal"] = all(np.array_equal(a, b) for a, b in same)

    # The noise alone: a loss with zero gradients, one step of SGD with learning rate 1, so
    # the parameters move by exactly -N(0, (σC)²) / (qN), drawn once from the step's noise key.
    size, sigma, clip, n = 2000, 1.3, 0.7, 40
    zero_loss = lambda p, ex: 0.0 * jnp.sum(p["w"]) * ex[0][0]
    zero_params = {"w": jnp.zeros(size, jnp.float64)}
    zero_kw = dict(
        optimizer=optax.sgd(1.0),
        key=private_key(9),
        epochs=1,
        batch_size=n,  # q = 1: one step, every example drawn, in 2 physical batches of 30
        progress="none",
        privacy=PrivacyConfig(
            l2_clip=clip, noise_multiplier=sigma, physical_batch_size=30, accountant="rdp"
        ),
    )
    # Independent reference: the step's noise key, one flat N(0, 1) vector, scaled.
    _, noise_key = jax.random.split(jax.random.fold_in(private_key(9), 0))
    z = np.asarray(gaussian.normal(noise_key, (size,), jnp.float64))
    expected = -sigma * clip * z / (1.0 * n)
    out["noise"] = {}
    for d in (4,):  # (the 1e-12 equality above also fails with noise drawn per device)
        mesh = None if d is None else sharding.data_mesh(d)
        got = jaxgrad.train.fit(zero_loss, zero_params, (np.ones((n, 1)),), mesh=mesh, **zero_kw)
        w = np.asarray(got.params["w"])
        out["noise"][str(d)] = {
            "error": float(np.max(np.abs(w - expected)) / np.max(np.abs(expected))),
            "std_ratio": float(np.std(w) / (sigma * clip / n)),
        }

    # The CLI: --dp --devices 2 against --dp on one device (float64), on the line fit, whose
    # summary holds its two parameters; the same DP key for both (--dp's default is a fresh
    # one from OS entropy).
    from jaxgrad.train.__main__ import main

    cli = {}
    for devices in ((), ("--devices", "2")):
        path = os.path.join(directory, f"cli{len(devices)}.json")
        args = ["--data", "line", "--dp", "--noise-multiplier", "1.0", "--accountant", "rdp"]
        args += ["--public-test"]
        args += ["--x64", "--epochs", "2", "--batch-size", "40", "--physical-batch-size", "15"]
        args += ["--insecure-dp-seed", "0"]
        assert main([*args, *devices, "--json", path, "--quiet"]) == 0
        with open(path) as f:
            cli[len(devices)] = json.load(f)
    out["cli"] = {k: [cli[0][k], cli[2][k]] for k in ("devices", "params", "privacy", "final")}
    return out


def train(process_id: int, num_processes: int, coordinator: str, directory: str) -> dict:
    _setup(2, cache=False)
    from jaxgrad import sharding

    sharding.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    import jax
    import numpy as np

    import jaxgrad

    out = {"process_count": jax.process_count(), "devices": jax.device_count()}
    try:
        sharding.data_mesh(3)
    except ValueError as e:
        out["odd_mesh"] = str(e)
    mesh = sharding.data_mesh()
    loss_fn, params, data, kw = training_problem()
    ckpt_full, ckpt_cut = (os.path.join(directory, n) for n in ("full", "cut"))
    # The data set as this process may touch it: row by row, never whole.
    counted = tuple(RowCounter(a) for a in data)
    full = jaxgrad.train.fit(loss_fn, params, counted, mesh=mesh, checkpoint_dir=ckpt_full, **kw)
    out["reads"] = [sorted(c.reads) for c in counted]
    # Interrupted after one epoch, then resumed: must end bit for bit where `full` does.
    # Process 0 writes the checkpoint slowly (a loaded disk): a process that did not wait for
    # it would list the directory first, train from step 0 and meet process 0's other
    # collectives (gloo's "collective mismatch" abort; docs/devices.md).
    save = jaxgrad.train.checkpoint.save

    def slow_save(*args, **kwargs):
        time.sleep(3)
        return save(*args, **kwargs)

    jaxgrad.train.checkpoint.save = slow_save
    try:
        jaxgrad.train.fit(
            loss_fn, params, data, mesh=mesh, checkpoint_dir=ckpt_cut, **kw | {"epochs": 1}
        )
    finally:
        jaxgrad.train.checkpoint.save = save
    resumed = jaxgrad.train.fit(loss_fn, params, data, mesh=mesh, checkpoint_dir=ckpt_cut, **kw)
    local = jaxgrad.sharding.local_replica
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(local(full.params))]
    again = [np.asarray(x) for x in jax.tree_util.tree_leaves(local(resumed.params))]
    out["resume_bitwise"] = all(np.array_equal(a, b) for a, b in zip(leaves, again, strict=True))
    out["loss"] = full.history[-1]["loss"]
    if process_id == 0:
        np.savez(os.path.join(directory, "params.npz"), *leaves)

    # DP-SGD over both processes: one Poisson draw per step for all of them.
    dp_loss, dp_params, dp_data, dp_kw = private_training_problem()
    counted = tuple(RowCounter(a) for a in dp_data)
    dp = jaxgrad.train.fit(dp_loss, dp_params, counted, mesh=mesh, **dp_kw)
    out["dp_reads"] = [sorted(c.reads) for c in counted]
    out["dp_epsilon"] = [r["epsilon"] for r in dp.history]
    if process_id == 0:
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(local(dp.params))]
        np.savez(os.path.join(directory, "dp_params.npz"), *leaves)
    out["sharded"] = sharded_checkpoints(process_id, directory)
    # A loss closing over an array spread over both processes: no process can read it whole,
    # so the resume fingerprint hashes its dtype and shape, the same in each.
    spread = jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
        np.full(2, float(process_id)),
    )
    from jaxgrad.train import run_config

    out["spread_fingerprint"] = run_config.loss_fingerprint(
        lambda p, ex: loss_fn(p, ex) + spread.sum(), params, data
    )
    return out


def sharded_checkpoints(process_id: int, directory: str) -> dict:
    """fit on a 2 x 2 ("data", "model") mesh over both processes, the parameters sharded over
    both axes (the FSDP-style embedding table over "data", which spans the processes: neither
    holds it whole), checkpointed with orbax by both processes: interrupted after epoch 1 and
    resumed, against the uninterrupted run; then a corrupt newest checkpoint. float32."""
    import warnings

    import jax
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxgrad
    from jaxgrad import sharding
    from jaxgrad.train import checkpoint as ckpt

    loss, params, batch, _ = _token_problem(vocab=64, width=16, dtype="float32")
    # Process p's two devices are row p: "data" across the processes, "model" within each.
    devices = [d for p in range(2) for d in sharding._process_devices(p)]
    mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "model"), (AxisType.Explicit,) * 2)
    layout = {k: NamedSharding(mesh, P(*MODEL_SPECS[k])) for k in params}
    sparams = sharding.place(params, layout)
    data = tuple(np.asarray(a) for a in batch)
    kw = dict(optimizer=optax.adam(0.05), key=jax.random.key(5), epochs=2, batch_size=8)
    kw |= dict(progress="none", mesh=mesh)
    full = jaxgrad.train.fit(loss, sparams, data, **kw)
    calls = []

    def interrupt(params):
        calls.append(1)
        if len(calls) == 2:  # at the end of epoch 2, after epoch 1's checkpoint
            raise KeyboardInterrupt
        return {}

    cut = os.path.join(directory, "sharded")
    try:
        jaxgrad.train.fit(loss, sparams, data, checkpoint_dir=cut, evaluate=interrupt, **kw)
    except KeyboardInterrupt:
        pass
    out = {"before_resume": [os.path.basename(p) for p in ckpt.list_checkpoints(cut)]}
    resumed = jaxgrad.train.fit(loss, sparams, data, checkpoint_dir=cut, **kw)

    def pieces(tree):  # this process's shards of every leaf
        leaves = jax.tree_util.tree_leaves(tree)
        return [np.asarray(s.data) for x in leaves for s in x.addressable_shards]

    pairs = zip(pieces(resumed.state), pieces(full.state), strict=True)
    out["bitwise"] = all(np.array_equal(a, b) for a, b in pairs)
    out["specs"] = [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(resumed.params)]
    out["whole_here"] = [x.is_fully_addressable for x in jax.tree_util.tree_leaves(full.params)]
    # The whole parameters (an all-gather) for the comparison with one device.
    whole = multihost_utils.process_allgather(full.params, tiled=True)
    if process_id == 0:
        np.savez(os.path.join(directory, "sharded_params.npz"), **whole)
    # A corrupt newest checkpoint (its array chunks deleted, by process 0 while process 1
    # waits): both processes warn, naming it, and restore the older one.
    names = ckpt.list_checkpoints(cut)
    out["after_resume"] = [os.path.basename(p) for p in names]
    out["state_files"] = sorted(os.listdir(os.path.join(names[-1], "state")))
    multihost_utils.sync_global_devices("listed")
    if process_id == 0:
        for root, _, files in os.walk(os.path.join(names[-1], "state")):
            for f in files:
                if os.path.basename(root) == "d":
                    os.remove(os.path.join(root, f))
    multihost_utils.sync_global_devices("corrupted")
    template = {"state": jaxgrad.train.init_state(sparams, kw["optimizer"]), "key": kw["key"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored, meta, path = ckpt.restore_latest(cut, template)
    out["fallback"] = [os.path.basename(path), meta["epoch"], int(restored["state"].step)]
    out["warnings"] = [str(w.message)[:300] for w in caught if "falling back" in str(w.message)]
    return out


def cli(process_id: int, num_processes: int, coordinator: str, directory: str) -> dict:
    """The CLI on an uncompressed .npz over both processes: the training inputs memory-mapped
    (counted: never materialised whole), standardised with statistics combined over them."""
    _setup(2, cache=False)
    from jaxgrad import sharding

    sharding.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    import numpy as np

    import jaxgrad
    from jaxgrad.train.__main__ import main

    out = {}

    path = os.path.join(directory, f"cli_data{process_id}.npz")  # one copy each: no race
    np.savez(path, **cli_problem())
    # Count the rows read through every memory map load_rows opens (jaxgrad.data.rows).
    rows, mapped, memmap = jaxgrad.data.rows, [], jaxgrad.data.memmap
    rows.memmap = lambda *a, **k: mapped.append(RowCounter(memmap(*a, **k))) or mapped[-1]
    try:
        summary_path = os.path.join(directory, "cli2.json")
        assert main([*CLI_ARGS, "--data-path", path, "--devices", "4", "--json", summary_path]) == 0
    finally:
        rows.memmap = memmap
    out["cli_reads"] = [sorted(c.reads) for c in mapped]
    # A compressed .npz cannot be read row by row: a clear error with several processes.
    import contextlib
    import io

    np.savez_compressed(path, **cli_problem())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main([*CLI_ARGS, "--data-path", path, "--devices", "4"])
        except SystemExit as e:
            out["cli_compressed"] = [e.code, err.getvalue()]
    np.savez(path, **cli_problem())
    ds = jaxgrad.data.load_rows("npz", path)
    out["cli_stats"] = [float(ds.x_mean), float(ds.x_scale), ds.y_mean, ds.y_scale]
    return out


CLI_ARGS = ["--data", "npz", "--model", "line", "--optimizer", "sgd", "--lr", "0.1"]
CLI_ARGS += ["--epochs", "2", "--batch-size", "25", "--quiet"]


def cli_problem():
    """A line fit as an .npz with a given split: 150 training and 30 test examples, inputs of
    mean 3 and deviation 2 (so standardising matters)."""
    import numpy as np

    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 2.0, 180)
    y = 1.5 * x - 2.0 + 0.1 * rng.standard_normal(180)
    return {"x_train": x[:150], "y_train": y[:150], "x_test": x[150:], "y_test": y[150:]}


def private_training_problem():
    """:func:`training_problem` with DP-SGD: physical batches of 10 (padded to 12 on 4 devices)."""
    import optax
    from helpers import private_key

    from jaxgrad.train import PrivacyConfig

    loss_fn, params, data, kw = training_problem()
    privacy = PrivacyConfig(l2_clip=1.0, noise_multiplier=1.0, physical_batch_size=10)
    dp = {"privacy": privacy, "optimizer": optax.sgd(0.5), "key": private_key(1)}
    return loss_fn, params, data, kw | dp


def training_problem():
    """Digits MLP in float32, 150 examples, batch 25 (not a multiple of 4 devices)."""
    import jax
    import numpy as np
    import optax

    import jaxgrad

    ds = jaxgrad.data.load("digits", standardize=False)  # (public pixels 0-16: DP below)
    x, y = np.asarray(ds.x_train)[:150] / 16, np.asarray(ds.y_train)[:150]
    model = jaxgrad.models.mlp([64, 16, 10])
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=10
    )
    kw = dict(optimizer=optax.sgd(0.1), epochs=2, batch_size=25, key=jax.random.key(1), quiet=True)
    return loss_fn, model.init(jax.random.key(0)), (x, y), kw


if __name__ == "__main__":
    if sys.argv[1] == "strategies":
        result = strategies()
    elif sys.argv[1] == "user_meshes":
        result = user_meshes()
    elif sys.argv[1] == "private":
        result = private(sys.argv[2])
    else:
        mode, pid, nproc, coord, directory = sys.argv[1:]
        result = {"train": train, "cli": cli}[mode](int(pid), int(nproc), coord, directory)
    print("RESULT " + json.dumps(result))
