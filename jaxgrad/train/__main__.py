"""``python -m jaxgrad.train``: train a bundled model on data that ships offline.

Example::

  python -m jaxgrad.train --model mlp --data digits --epochs 30 --strategy per-example \\
      --json out.json --plot curves.png
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

from jaxgrad._optional import require

MODELS = ("line", "linear", "logistic", "mlp", "cnn")
DATA = ("digits", "breast_cancer", "diabetes", "line", "mnist1d", "npz", "idx")
STRATEGIES = ("batch", "per-example", "accumulate", "clipped")
OPTIMIZERS = ("sgd", "momentum", "adam")
DEFAULT_MODEL = {
    "mnist1d": "mlp",
    "digits": "mlp",
    "breast_cancer": "logistic",
    "diabetes": "linear",
    "line": "line",
}
# (optimizer, learning rate, epochs, batch size) that reach the documented results.
DEFAULTS = {
    "digits": ("adam", 1e-3, 30, 32),
    "breast_cancer": ("adam", 1e-2, 30, 32),
    "diabetes": ("adam", 1e-2, 100, 32),
    "line": ("sgd", 0.1, 50, 32),
}
FALLBACK = ("adam", 1e-3, 10, 64)
MICROBATCHES, CLIP = 4, 1.0  # --microbatches and --clip when their strategy is chosen
# PrivacyConfig fields and plan() arguments that are command-line flags of the same name.
DP_FLAGS = (
    "l2_clip",
    "target_epsilon",
    "noise_multiplier",
    "delta",
    "accountant",
    "physical_batch_size",
    "nonfinite",
    "batch_size",
    "epochs",
)
# The library's argument names that are command-line flags of another name.
FLAG_NAMES = {
    "test_fraction": "--test-fraction",
    "num_examples": "--num-examples",
    "num_microbatches": "--microbatches",
    "chunk_size": "--chunk-size",
    "l2_clip": "--l2-clip",
    "process_id": "--process-id",
    "num_processes": "--num-processes",
    "coordinator": "--coordinator",
    "seed": "--seed",
}
# Seeds seed numpy's generator (non-negative) and jax.random.key, which without x64 keeps only
# the low 32 bits (--seed 4294967296 would give --seed 0's initialisation and shuffle).
MAX_SEED = 2**32 - 1


def _flag_error(parser, error, names=()):
    """``parser.error`` with the library's `argument` names written as the flags the user typed."""
    message = str(error)
    for name in (*names, *FLAG_NAMES):
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        message = message.replace(f"`{name}`", flag)
    parser.error(message)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgrad.train",
        description="Train a model with a jit-compiled SGD loop on data that ships offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="digits", choices=DATA, help="data set")
    g.add_argument("--data-path", help="the .npz file (--data npz) or IDX directory (--data idx)")
    g.add_argument("--model", choices=MODELS, help="model (default: suited to --data)")
    g.add_argument("--hidden", type=int, nargs="+", default=[256], help="MLP hidden sizes")
    g.add_argument(
        "--activation",
        default="relu",
        choices=("relu", "tanh", "sigmoid", "gelu"),
        help="hidden-layer nonlinearity of the MLP and CNN",
    )
    g.add_argument("--test-fraction", type=float, default=0.2, help="held-out share, in (0, 1)")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, init and shuffle")
    g.add_argument("--x64", action="store_true", help="train in float64")
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--strategy",
        default="batch",
        choices=STRATEGIES,
        help="how the gradient is computed: batch_grad, mean of per-example gradients, "
        "accumulated microbatches, or clipped per-example gradients",
    )
    g.add_argument(
        "--microbatches", type=int, help=f"for --strategy accumulate (default: {MICROBATCHES})"
    )
    g.add_argument("--chunk-size", type=int, help="for --strategy per-example")
    g.add_argument("--clip", type=float, help=f"l2 clip for --strategy clipped (default: {CLIP})")
    g.add_argument(
        "--optimizer", choices=OPTIMIZERS, help="optax optimizer (default: suited to --data)"
    )
    g.add_argument("--lr", type=float, help="learning rate, > 0 (default: suited to --data)")
    g.add_argument("--epochs", type=int, help="passes over the data (default: suited to --data)")
    g.add_argument("--batch-size", type=int, help="examples per step (default: suited to --data)")
    g.add_argument(
        "--no-scan",
        action="store_true",
        help="a Python loop instead of lax.scan (default: scan, but not convolutions on a CPU)",
    )
    g = p.add_argument_group("differential privacy (DP-SGD)")
    g.add_argument(
        "--dp",
        action="store_true",
        help="train with DP-SGD: Poisson sampling (rate batch-size / N), per-example clipping, "
        "Gaussian noise; sigma calibrated to --target-epsilon",
    )
    g.add_argument("--target-epsilon", type=float, help="epsilon to spend over the run")
    g.add_argument("--noise-multiplier", type=float, help="sigma (instead of --target-epsilon)")
    g.add_argument("--delta", type=float, default=1e-5, help="delta (default: 1e-5)")
    g.add_argument("--l2-clip", type=float, default=1.0, help="per-example clip norm C")
    g.add_argument("--accountant", default="pld", choices=("pld", "rdp"))
    g.add_argument(
        "--physical-batch-size", type=int, help="default: --batch-size + 2 std of the draw"
    )
    g.add_argument("--nonfinite", default="drop", choices=("drop", "raise"))
    g.add_argument("--num-examples", type=int, help="examples to generate for --data mnist1d")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--checkpoint-dir", help="write checkpoints here and resume from them")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    g.add_argument("--json", help="write the summary (final metrics, history) here")
    g.add_argument("--metrics-jsonl", help="append one JSON line per epoch here")
    g.add_argument("--plot", help="write loss and accuracy curves here (PNG; needs matplotlib)")
    g.add_argument(
        "--progress",
        default="auto",
        choices=("auto", "bar", "plain", "none"),
        help="progress display; auto: a bar on a terminal, plain lines otherwise",
    )
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    g = p.add_argument_group("devices and hosts (data parallel)")
    g.add_argument(
        "--devices",
        type=int,
        help="train data-parallel on this many devices in all (on a CPU, emulated ones)",
    )
    g.add_argument("--coordinator", help="HOST:PORT of process 0 of a multi-process run")
    g.add_argument("--num-processes", type=int, help="processes (hosts) in the run")
    g.add_argument("--process-id", type=int, help="this process's number, from 0")
    return p


def _mesh(args, parser):
    """The data mesh the run trains on (None: one device), ``jax.distributed`` started first."""
    import jax

    from jaxgrad import sharding

    distributed = any(
        v is not None for v in (args.coordinator, args.num_processes, args.process_id)
    )
    if args.devices is not None and args.devices < 1:
        parser.error(f"--devices must be a positive integer; got {args.devices}")
    if distributed:
        if args.num_processes is None or args.process_id is None or args.coordinator is None:
            parser.error("--coordinator, --num-processes and --process-id go together")
        try:
            sharding.initialize(
                args.coordinator, num_processes=args.num_processes, process_id=args.process_id
            )
        except ValueError as e:
            _flag_error(parser, e)
    if args.devices is None and not distributed:
        return None
    if args.devices is not None:
        # On the CPU, emulate the devices this process needs; no effect on GPUs and TPUs,
        # and too late (left as it is) if the backend has already started.
        per_process = -(-args.devices // (args.num_processes or 1))
        try:
            jax.config.update("jax_num_cpu_devices", per_process)
        except RuntimeError:
            pass
    try:
        return sharding.data_mesh(args.devices)
    except ValueError as e:
        parser.error(str(e).replace("`num_devices`", "--devices"))


def _strategy(args, parser):
    import jaxgrad

    if args.strategy == "batch":
        return jaxgrad.batch_grad
    if args.strategy == "per-example":
        return functools.partial(jaxgrad.mean_of_per_example_grads, chunk_size=args.chunk_size)
    if args.strategy == "accumulate":
        microbatches = MICROBATCHES if args.microbatches is None else args.microbatches
        return functools.partial(jaxgrad.accumulate_grad, num_microbatches=microbatches)
    clipped = getattr(jaxgrad, "clipped_grad", None)
    if clipped is None:
        parser.error("--strategy clipped needs jaxgrad.clipped_grad, which this install lacks")
    return functools.partial(clipped, l2_clip=CLIP if args.clip is None else args.clip)


def _privacy(args, parser, num_examples, batch_size, epochs):
    """The resolved DP-SGD plan (σ calibrated), or None without --dp."""
    dp_flags = ("target_epsilon", "noise_multiplier", "physical_batch_size")
    if not args.dp:
        given = [f"--{f.replace('_', '-')}" for f in dp_flags if getattr(args, f) is not None]
        if given:
            parser.error(f"{', '.join(given)} need(s) --dp")
        return None
    if args.strategy != "batch":
        parser.error("--dp takes its own noisy clipped gradient; leave --strategy at batch")
    if args.checkpoint_every is not None:
        parser.error("--dp checkpoints every epoch; --checkpoint-every does not apply")
    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        parser.error("--dp needs exactly one of --target-epsilon and --noise-multiplier")
    from jaxgrad.train import PrivacyConfig, private

    config = PrivacyConfig(
        l2_clip=args.l2_clip,
        target_epsilon=args.target_epsilon,
        noise_multiplier=args.noise_multiplier,
        delta=args.delta,
        accountant=args.accountant,
        physical_batch_size=args.physical_batch_size,
        nonfinite=args.nonfinite,
    )
    try:
        return private.plan(config, num_examples=num_examples, batch_size=batch_size, epochs=epochs)
    except (ValueError, TypeError) as e:
        message = str(e)
        _flag_error(parser, message, DP_FLAGS)  # the library names arguments; the user typed flags


def _model(args, ds, dtype, parser):
    """The model, its per-example loss and ``num_classes`` for label checks."""
    import numpy as np

    from jaxgrad import losses, models

    name = (
        args.model
        or DEFAULT_MODEL.get(args.data)
        or ("mlp" if ds.task == "classification" else "linear")
    )
    features = int(np.prod(ds.feature_shape))
    classify = ds.task == "classification"
    regression_only, classification_only = ("line", "linear"), ("logistic", "cnn")
    if classify and name in regression_only:
        parser.error(
            f"--model {name} is a regression model; --data {args.data} has class labels "
            f"(use one of {', '.join(m for m in MODELS if m not in regression_only)})"
        )
    if not classify and name in classification_only:
        parser.error(
            f"--model {name} is a classifier; --data {args.data} has real targets "
            f"(use one of {', '.join(m for m in MODELS if m not in classification_only)})"
        )
    if name == "line" and ds.feature_shape != ():
        parser.error(
            f"--model line takes one scalar input; --data {args.data} has input shape "
            f"{ds.feature_shape} (use --model linear)"
        )
    k = ds.num_classes
    if name == "line":
        model, loss = models.line_fit(dtype=dtype), losses.squared_error
    elif name == "linear":
        model, loss = models.linear_regression(features, dtype=dtype), losses.squared_error
    elif name == "logistic":
        model = models.logistic_regression(features, num_classes=k, dtype=dtype)
        loss = losses.binary_cross_entropy if k == 2 else losses.softmax_cross_entropy
    elif name == "mlp":
        out = k if classify else 1
        model = models.mlp([features, *args.hidden, out], activation=args.activation, dtype=dtype)
        loss = losses.softmax_cross_entropy if classify else losses.squared_error
    else:
        shape = ds.feature_shape if len(ds.feature_shape) >= 2 else _square(features, parser)
        model = models.cnn(
            image_shape=shape, num_classes=k, dtype=dtype, activation=args.activation
        )
        loss = losses.softmax_cross_entropy
    apply = model.apply
    if name in ("linear", "logistic"):
        flat = model.apply
        apply = lambda params, x: flat(params, x.reshape(-1))
        model = model._replace(apply=apply)
    return name, model, losses.supervised(apply, loss, num_classes=k if classify else None)


def _square(features, parser):
    side = round(features**0.5)
    if side * side != features:
        parser.error(f"--model cnn needs image inputs; got {features} flat features")
    return (side, side)


def _optimizer(name, lr):
    import optax

    return {"sgd": optax.sgd, "momentum": lambda r: optax.sgd(r, momentum=0.9), "adam": optax.adam}[
        name
    ](lr)


def _sklearn_r2(ds):
    try:
        from sklearn.linear_model import LinearRegression
    except ImportError:
        return None
    flat = lambda x: x.reshape(len(x), -1)
    fitted = LinearRegression().fit(flat(ds.x_train), ds.y_train)
    return float(fitted.score(flat(ds.x_test), ds.y_test))


def _check_writable(flag, path, parser, *, directory=False):
    """Fails before training when ``path`` (a file, or a directory) cannot be written."""
    import os

    if path is None:
        return
    if directory:
        if os.path.exists(path) and not os.path.isdir(path):
            parser.error(f"{flag} {path!r} is a file; expected a directory (or a new path)")
        probe = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        while not os.path.exists(probe):  # the nearest existing ancestor is where it is made
            probe = os.path.dirname(probe)
    else:
        if os.path.isdir(path):
            parser.error(f"{flag} {path!r} is a directory; expected a file name")
        probe = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(probe):
            parser.error(
                f"{flag} {path!r}: the directory {probe!r} does not exist; create it first"
            )
        if os.path.exists(path) and not os.access(path, os.W_OK):
            parser.error(f"{flag} {path!r} exists and is not writable")
    if not os.access(probe, os.W_OK | os.X_OK):
        parser.error(f"{flag} {path!r}: the directory {probe!r} is not writable")


def _check_combinations(args, parser):
    """Values out of every range and flags that would be silently ignored, before any work."""
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be an integer in [0, {MAX_SEED}]; got {args.seed}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be a positive integer; got {args.checkpoint_every}")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        parser.error("--checkpoint-every needs --checkpoint-dir (no checkpoint is written without)")
    for flag, value, strategy in (
        ("--chunk-size", args.chunk_size, "per-example"),
        ("--microbatches", args.microbatches, "accumulate"),
        ("--clip", args.clip, "clipped"),
    ):
        if value is not None and args.strategy != strategy:
            parser.error(f"{flag} is for --strategy {strategy}; got --strategy {args.strategy}")


def _check_args(args, parser):
    """Nonsense hyperparameters and unwritable outputs are argument errors, before any work.

    (The strategy's own hyperparameters, --clip, --microbatches, --chunk-size, are checked by
    building the strategy.)
    """
    import math

    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive finite number; got {args.lr}")
    for flag, value in (
        ("--keep", args.keep),
        ("--checkpoint-every", args.checkpoint_every),
    ):
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive integer; got {value}")
    if any(h < 1 for h in args.hidden):
        parser.error(f"--hidden sizes must be positive integers; got {args.hidden}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        _check_writable(flag, path, parser)
    _check_writable("--metrics-jsonl", args.metrics_jsonl, parser)
    _check_writable("--checkpoint-dir", args.checkpoint_dir, parser, directory=True)
    if args.plot:
        try:
            require("matplotlib", package="matplotlib", extra="cli", needed_for="--plot")
        except ImportError as e:
            parser.error(str(e))


def run(args, parser=None) -> dict:
    """Trains as ``args`` say and returns the summary written by ``--json``."""
    parser = parser or build_parser()
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    import jaxgrad.data
    from jaxgrad.train import evaluator, fit
    from jaxgrad.train.progress import strict_json

    _check_combinations(args, parser)
    mesh = _mesh(args, parser)
    lead = jax.process_index() == 0  # with several processes only process 0 reports
    if not lead:
        args.quiet, args.json, args.plot, args.metrics_jsonl = True, None, None, None
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    dtype = jnp.float64 if args.x64 else jnp.float32
    if args.data in ("npz", "idx") and not args.data_path:
        parser.error(f"--data {args.data} needs --data-path")
    if args.data not in ("npz", "idx") and args.data_path:
        parser.error(f"--data {args.data} is bundled; --data-path is only for npz and idx")
    kwargs = {"seed": args.seed, "dtype": np.dtype(dtype)}
    if args.data != "line":
        kwargs["test_fraction"] = args.test_fraction
    if args.num_examples is not None:
        if args.data != "mnist1d":
            parser.error("--num-examples is only for --data mnist1d")
        kwargs["num_examples"] = args.num_examples
    # On a mesh, files stay on disk: the training inputs are memory-mapped and standardised
    # as each process reads its own rows (statistics combined over the processes).
    rows = mesh is not None and args.data in ("npz", "idx")
    try:
        if rows:
            try:
                ds = jaxgrad.data.load_rows(args.data, args.data_path, **kwargs)
            except jaxgrad.data.NotMappableError as e:
                if jax.process_count() > 1:
                    parser.error(
                        f"{e}. With several processes each one reads only its own rows of the "
                        "training inputs, which must be stored uncompressed (np.savez, not "
                        "savez_compressed; gunzip IDX files)"
                    )
                say(f"note: {e}; one process, so it is loaded whole")
                rows = False
        if not rows:
            ds = jaxgrad.data.load(args.data, path=args.data_path, **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as e:
        _flag_error(parser, e)
    _check_args(args, parser)
    opt_name, lr, epochs, batch_size = DEFAULTS.get(args.data, FALLBACK)
    opt_name, lr = args.optimizer or opt_name, args.lr if args.lr is not None else lr
    epochs = args.epochs if args.epochs is not None else epochs
    batch_size = args.batch_size if args.batch_size is not None else batch_size
    for flag, value in (("--epochs", epochs), ("--batch-size", batch_size)):
        if value < 1:
            parser.error(f"{flag} must be a positive integer; got {value}")
    if batch_size > len(ds.x_train):
        parser.error(
            f"--batch-size {batch_size} is larger than the training set "
            f"({len(ds.x_train)} examples of {args.data}); expected at most "
            f"{len(ds.x_train)}"
        )
    model_name, model, loss_fn = _model(args, ds, dtype, parser)
    privacy_plan = _privacy(args, parser, len(ds.x_train), batch_size, epochs)
    strategy = _strategy(args, parser)
    try:  # building the strategy checks its hyperparameters (--microbatches, --clip, ...)
        strategy(loss_fn)
    except (ValueError, TypeError) as e:
        _flag_error(parser, str(e).replace("`l2_clip`", "--clip"))
    init_key, shuffle_key = jax.random.split(jax.random.key(args.seed))
    # Memory-mapped training inputs are never read whole, so not evaluated after each epoch
    # (the history's "loss" is the epoch's mean training loss); the test split is.
    splits = {"test": ds.test} if rows else {"train": ds.train, "test": ds.test}
    evaluate = evaluator(model.apply, loss_fn, splits, task=ds.task)
    say(
        f"{ds!r}; model {model_name}, strategy {args.strategy}, {opt_name}(lr={lr}), "
        f"{epochs} epochs of batch {batch_size}"
    )
    start = time.perf_counter()
    result = fit(
        loss_fn,
        jax.jit(model.init)(init_key),
        ds.train,
        optimizer=_optimizer(opt_name, lr),
        epochs=epochs,
        batch_size=batch_size,
        key=shuffle_key,
        strategy=strategy,
        evaluate=evaluate,
        scan=False if args.no_scan else "auto",
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        resume=not args.no_resume,
        metrics_path=args.metrics_jsonl,
        progress=args.progress,
        quiet=args.quiet,
        **({"privacy": privacy_plan.config} if privacy_plan else {}),
        mesh=mesh,
    )
    seconds = time.perf_counter() - start
    skip = ("epoch", "step", "seconds", "loss", "epsilon", "nonfinite")
    final = {k: v for k, v in result.history[-1].items() if k not in skip}
    summary = {
        "data": args.data,
        "model": model_name,
        "strategy": args.strategy,
        "optimizer": opt_name,
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": int(result.state.step),
        "seed": args.seed,
        "scan": False if args.no_scan else "auto",
        "dtype": np.dtype(dtype).name,
        "devices": 1 if mesh is None else int(mesh.devices.size),
        "processes": jax.process_count(),
        "seconds": seconds,
        "final": final,
        "history": result.history,
    }
    if privacy_plan:
        summary["privacy"] = privacy_plan.summary(int(result.state.step))
    if model_name == "line":
        params = jaxgrad.sharding.local_replica(result.params)
        summary["params"] = {k: float(v) for k, v in params.items()}
    if model_name == "linear" and ds.task == "regression" and not rows:
        reference = _sklearn_r2(ds)
        if reference is not None:
            summary["reference"] = {"sklearn_linear_regression_test_r2": reference}
    shown = "  ".join(f"{k} {v:.4f}" for k, v in final.items())
    say(f"final after {epochs} epochs ({summary['steps']} steps, {seconds:.1f} s): {shown}")
    if "privacy" in summary:
        pv = summary["privacy"]
        say(
            f"privacy: ({pv['epsilon']:.4g}, {pv['delta']:g})-DP ({pv['accountant']}), "
            f"sigma {pv['noise_multiplier']:.4g}, q {pv['sampling_rate']:.4g}, "
            f"{pv['steps']} steps, clip {pv['l2_clip']:g}"
        )
    if "params" in summary:
        say("fitted line: " + "  ".join(f"{k} = {v:.6f}" for k, v in summary["params"].items()))
    if "reference" in summary:
        say(
            f"scikit-learn LinearRegression on the same split: test_r2 "
            f"{summary['reference']['sklearn_linear_regression_test_r2']:.4f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(strict_json(summary), f, indent=1, allow_nan=False)
    if args.plot:
        from jaxgrad.train.plot import plot_history

        title = f"{model_name} on {args.data}, strategy {args.strategy}"
        try:
            plot_history(result.history, args.plot, title=title)
        except ImportError as e:
            parser.error(str(e))
        say(f"curves written to {args.plot}")
    return summary


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from jaxgrad.train import CheckpointError, NonFiniteLossError

    try:
        run(args, parser)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:  # a user's directory or files: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = (
            f" resume with the same command ({args.checkpoint_dir})" if args.checkpoint_dir else ""
        )
        print(f"interrupted.{where}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
