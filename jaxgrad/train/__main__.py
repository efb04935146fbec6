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

from jaxgrad import strategies
from jaxgrad._cli import check_writable
from jaxgrad._optional import require

MODELS = ("line", "linear", "logistic", "mlp", "cnn")
DATA = ("digits", "breast_cancer", "diabetes", "line", "mnist1d", "mnist5k", "npz", "idx")
# The registry's exact strategies that give a step's gradient (jaxgrad.strategies), by their
# short names and their own, and the fast path's clipped mean.
_TRAINABLE = [strategies.get(n) for n in strategies.names(exact=True, per_example=False)]
STRATEGIES = (
    *(a for s in _TRAINABLE for a in s.aliases),
    "clipped",
    *(s.name for s in _TRAINABLE),
)
# The registry options the CLI sets, and their flags (the others keep their registered value).
STRATEGY_FLAGS = {"chunk_size": "--chunk-size", "num_microbatches": "--microbatches"}
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
MICROBATCHES = strategies.get("accumulate_grad").options["num_microbatches"]  # --microbatches
CLIP = 1.0  # --clip, when --strategy clipped is chosen
# The DP flags' values when --dp is set and they are not given. Their parser defaults are None,
# so that a DP flag given without --dp is an error rather than silently ignored.
DP_DEFAULTS = {"delta": 1e-5, "l2_clip": 1.0, "accountant": "pld", "nonfinite": "drop"}
# Every flag that means something only with --dp, and what to use instead without it.
DP_ONLY = {
    "target_epsilon": "it is the epsilon a --dp run spends",
    "noise_multiplier": "it is the sigma of a --dp run",
    "physical_batch_size": "it sizes the physical batches of --dp's Poisson draws",
    "delta": "it is the delta of a --dp run's guarantee",
    "l2_clip": "it is the DP clip norm; for --strategy clipped use --clip",
    "accountant": "it accounts a --dp run's privacy loss",
    "nonfinite": "it is --dp's policy for non-finite gradients; without --dp a non-finite loss "
    "stops training with exit code 1",
    "insecure_dp_seed": "it seeds the noise and sampling of --dp; --seed seeds the split, the "
    "initialisation and the shuffle",
    "public_test": "without --dp the test split is always evaluated",
    "bands": "it is the number of bands of --dp's BandMF (correlated) noise",
    "bandmf_strategy": "it picks the strategy of --dp --bands's correlated noise",
    "adaptive_clip_quantile": "it is the target quantile of --dp's adaptive clipping",
    "adaptive_clip_lr": "it is the learning rate of --dp's adaptive clipping",
    "count_noise_multiplier": "it is the count noise of --dp's adaptive clipping",
    "per_layer_clip": "it splits --dp's clip norm over the layers",
}
# The flags of adaptive clipping that mean something only with --adaptive-clip-quantile.
ADAPTIVE_ONLY = ("adaptive_clip_lr", "count_noise_multiplier")
# The first 32-bit word of a DP key derived from --insecure-dp-seed. OS-entropy keys never
# start with it (drawn again if they do), so a key restored from a checkpoint tells whether
# the run that wrote it was private, whatever the flags of the resuming command.
INSECURE_KEY_MARK = 0x1A5EC0DE
# What a --dp run's JSON releases per epoch: the history's other keys (the training loss,
# non-finite counts, wall-clock seconds) are computed on the private training rows without
# noise, or depend on the realised (private) batch sizes.
# (l2_clip: adaptive clipping's clip norm, computed from the noisy counts alone.)
DP_HISTORY_KEYS = ("epoch", "step", "epsilon", "l2_clip")
PRIVACY_NOTE = (
    "epsilon and delta bound what the released values (the noisy parameters and everything "
    "computed from them alone) reveal about any one training example. test_* metrics appear "
    "only with --public-test: they are computed on the held-out test split, which the user "
    "declared public, and the guarantee does not cover it. Nothing computed on the training "
    "rows without noise is released (no training loss or accuracy, no counts of non-finite "
    "gradients, no wall-clock times). The "
    "checkpoints under --checkpoint-dir hold the secret noise and sampling key: keep them "
    "secret."
)
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
    "bands",
    "bandmf_strategy",
    "count_noise_multiplier",
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
    "standardize": "--input-stats",
    "target_quantile": "--adaptive-clip-quantile",
    "learning_rate": "--adaptive-clip-lr",
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not "(default: None)" (an option whose default
    depends on others, the DP flags' with --dp say, states it in its own help), not for an
    on/off flag (its help says what it switches), and not where the help states it."""

    def _get_help_string(self, action):
        if (
            action.default is None
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            or "default" in (action.help or "")
        ):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgrad.train",
        description="Train a model with a jit-compiled SGD loop on data that ships offline.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="digits", choices=DATA, help="data set")
    g.add_argument("--data-path", help="the .npz file (--data npz) or IDX directory (--data idx)")
    g.add_argument(
        "--task",
        choices=("auto", "classification", "regression"),
        default="auto",
        help="for --data npz: what y is. auto: integer labels are classes, floats regression "
        "targets (floats that are all whole numbers warn)",
    )
    g.add_argument(
        "--num-classes",
        type=int,
        help="for --data npz/idx classification: the number of classes (default: the largest "
        "label + 1; required with --dp, where reading it off the labels would read private rows)",
    )
    g.add_argument("--model", choices=MODELS, help="model (default: suited to --data)")
    g.add_argument("--hidden", type=int, nargs="+", default=[256], help="MLP hidden sizes")
    g.add_argument(
        "--activation",
        default="relu",
        choices=("relu", "tanh", "sigmoid", "gelu"),
        help="hidden-layer nonlinearity of the MLP and CNN",
    )
    g.add_argument("--test-fraction", type=float, default=0.2, help="held-out share, in (0, 1)")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the split, the initialisation and the shuffle (public; never the DP noise "
        "or sampling)",
    )
    g.add_argument(
        "--input-stats",
        metavar="PATH",
        help="standardise inputs with given statistics: an .npz with mean and std "
        "(broadcastable to one input; std > 0) and, for regression, optionally y_mean and "
        "y_std for the targets. Without it: the training split's own statistics, but under "
        "--dp none (inputs as they are; the bundled sets have public ranges)",
    )
    g.add_argument("--x64", action="store_true", help="train in float64")
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--strategy",
        default="batch",
        choices=STRATEGIES,
        help="how the gradient is computed, an exact strategy of the registry "
        "(jaxgrad.strategies; short or full name): "
        + "; ".join(f"{'/'.join((*s.aliases, s.name))}: {s.summary}" for s in _TRAINABLE)
        + "; or clipped: the mean of per-example gradients clipped to --clip",
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
        help="a Python loop over the jitted step instead of lax.scan",
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
    g.add_argument(
        "--delta", type=float, help=f"delta (with --dp, default: {DP_DEFAULTS['delta']:g})"
    )
    g.add_argument(
        "--l2-clip",
        type=float,
        help=f"per-example clip norm C of DP-SGD (with --dp, default: {DP_DEFAULTS['l2_clip']:g})",
    )
    g.add_argument(
        "--per-layer-clip",
        action="store_true",
        default=None,
        help="clip each layer (a weight with its bias) of every example to C / sqrt(L) for the "
        "model's L layers, instead of the whole gradient to C: the same sensitivity C, so the "
        "same noise and epsilon",
    )
    g.add_argument(
        "--accountant",
        choices=("pld", "rdp"),
        help=f"privacy accountant (with --dp, default: {DP_DEFAULTS['accountant']})",
    )
    g.add_argument(
        "--physical-batch-size", type=int, help="default: --batch-size + 2 std of the draw"
    )
    g.add_argument(
        "--adaptive-clip-quantile",
        type=float,
        metavar="GAMMA",
        help="adaptive clipping (Andrew et al. 2021): the clip norm starts at --l2-clip and "
        "follows this quantile of the per-example norms, in (0, 1), through a noisy count "
        "accounted within the same sigma (e.g. 0.5)",
    )
    g.add_argument(
        "--adaptive-clip-lr",
        type=float,
        help="learning rate of the clip norm's geometric update (default: 0.2)",
    )
    g.add_argument(
        "--count-noise-multiplier",
        type=float,
        help="std of adaptive clipping's count noise (default: expected batch size / 20; "
        "must exceed sigma / 2)",
    )
    g.add_argument(
        "--nonfinite",
        choices=("drop", "raise"),
        help="examples with a non-finite gradient: left out, or stop "
        f"(with --dp, default: {DP_DEFAULTS['nonfinite']})",
    )
    g.add_argument(
        "--bands",
        type=int,
        metavar="B",
        help="BandMF noise: correlated across B steps (banded matrix factorisation), rows split "
        "into B groups sampled in turn (rate B * batch-size / N), accounted as ceil(steps / B) "
        "Poisson steps; B = 1 is plain DP-SGD (default: independent noise)",
    )
    g.add_argument(
        "--bandmf-strategy",
        choices=("optimized", "sqrt"),
        help="the banded strategy of --bands: optimized for the run's steps (L-BFGS, default) "
        "or the closed form (1 - x)^(-1/2) cut to B bands",
    )
    g.add_argument(
        "--public-test",
        action="store_true",
        default=None,
        help="release test-split metrics of a --dp run: you declare the held-out split public "
        "(the guarantee does not cover it); without it a --dp run evaluates nothing",
    )
    g.add_argument(
        "--insecure-dp-seed",
        type=int,
        metavar="N",
        help="NOT PRIVATE, for tests: derive the DP noise and sampling key from N instead of "
        "OS entropy (the JSON then says private: false). Without it the key comes from OS "
        "entropy and is written only to the checkpoints, which are therefore secret",
    )
    g.add_argument("--num-examples", type=int, help="examples to generate for --data mnist1d")
    g = p.add_argument_group("checkpoints and output")
    g.add_argument(
        "--checkpoint-dir",
        help="write checkpoints here and resume from them (a --dp run's checkpoints hold its "
        "secret noise and sampling key: keep them secret)",
    )
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

    if args.strategy != "clipped":
        record = strategies.get(args.strategy)
        given = {o: getattr(args, f[2:].replace("-", "_")) for o, f in STRATEGY_FLAGS.items()}
        return record.factory(**{o: v for o, v in given.items() if v is not None})
    clipped = getattr(jaxgrad, "clipped_grad", None)
    if clipped is None:
        parser.error("--strategy clipped needs jaxgrad.clipped_grad, which this install lacks")
    return functools.partial(clipped, l2_clip=CLIP if args.clip is None else args.clip)


def _privacy(args, parser, num_examples, batch_size, epochs, model=None):
    """The resolved DP-SGD plan (σ calibrated), or None without --dp; with --per-layer-clip,
    ``C / √L`` for each of the model's ``L`` layers
    (:func:`jaxgrad.train.private.per_layer_clip`)."""
    if not args.dp:
        return None
    if args.strategy == "clipped" or strategies.get(args.strategy).name != "batch_grad":
        parser.error("--dp takes its own noisy clipped gradient; leave --strategy at batch")
    if args.checkpoint_every is not None:
        parser.error("--dp checkpoints every epoch; --checkpoint-every does not apply")
    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        parser.error("--dp needs exactly one of --target-epsilon and --noise-multiplier")
    import jax

    from jaxgrad.train import PrivacyConfig, private

    given = {k: getattr(args, k) for k in DP_DEFAULTS}
    given = {k: DP_DEFAULTS[k] if v is None else v for k, v in given.items()}
    if args.per_layer_clip:
        try:
            shapes = jax.eval_shape(model.init, jax.random.key(0))
            given["l2_clip"] = private.per_layer_clip(shapes, l2_clip=given["l2_clip"])
        except (ValueError, TypeError) as e:
            _flag_error(parser, str(e), DP_FLAGS)
    config = PrivacyConfig(
        **given,
        target_epsilon=args.target_epsilon,
        noise_multiplier=args.noise_multiplier,
        physical_batch_size=args.physical_batch_size,
        **_bandmf(args, parser),
        adaptive_clip=_adaptive_clip(args, parser),
    )
    try:
        return private.plan(config, num_examples=num_examples, batch_size=batch_size, epochs=epochs)
    except (ValueError, TypeError) as e:
        message = str(e)
        _flag_error(parser, message, DP_FLAGS)  # the library names arguments; the user typed flags


def _bandmf(args, parser) -> dict:
    """The PrivacyConfig fields of --bands and --bandmf-strategy."""
    if args.bands is None:
        if args.bandmf_strategy is not None:
            parser.error("--bandmf-strategy needs --bands (the number of bands of BandMF noise)")
        return {}
    fields = {"noise": "bandmf", "bands": args.bands}
    if args.bandmf_strategy is not None:
        fields["bandmf_strategy"] = args.bandmf_strategy
    return fields


def _adaptive_clip(args, parser):
    """``--adaptive-clip-*``'s :class:`jaxgrad.privacy.AdaptiveClip`, or None."""
    if args.adaptive_clip_quantile is None:
        for name in ADAPTIVE_ONLY:
            if getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                parser.error(f"{flag} needs --adaptive-clip-quantile (adaptive clipping)")
        return None
    from jaxgrad.privacy import AdaptiveClip

    return AdaptiveClip(
        target_quantile=args.adaptive_clip_quantile,
        learning_rate=0.2 if args.adaptive_clip_lr is None else args.adaptive_clip_lr,
        count_noise_multiplier=args.count_noise_multiplier,
    )


def _standardize(args, parser):
    """The loaders' ``standardize``: --input-stats's statistics, ``False`` under --dp (the
    training split's own statistics would make every row depend on every other one, outside
    the accounting), or None for the loader's default (the training split's statistics)."""
    import numpy as np

    if args.input_stats is None:
        return False if args.dp else None
    if args.data == "line":
        parser.error("--input-stats: --data line is synthetic and never standardised")
    try:
        with np.load(args.input_stats, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        parser.error(f"--input-stats {args.input_stats!r}: no such file")
    except Exception as e:  # a directory, a corrupt or pickled file: the user's input
        parser.error(
            f"--input-stats {args.input_stats!r}: not a readable .npz file of arrays mean and "
            f"std ({type(e).__name__}: {e})"
        )


def _restore_point(args, params, optimizer):
    """``(key_data, epoch)`` of the DP checkpoint this run resumes from, else ``(None, 0)``.

    A resumed --dp run must go on with the key it started with (the one in the checkpoint),
    not with this invocation's fresh one, which ``fit`` would refuse as another run's.
    Anything unreadable or not from a DP run is left to ``fit``, which names the problem.
    """
    import warnings

    import jax
    import numpy as np

    from jaxgrad.train import checkpoint as ckpt
    from jaxgrad.train.step import init_state

    if args.checkpoint_dir is None or args.no_resume:
        return None, 0
    template = {"state": init_state(params, optimizer), "key": jax.random.key(0)}
    try:
        with warnings.catch_warnings():  # fit warns about skipped files itself
            warnings.simplefilter("ignore", ckpt.CheckpointWarning)
            restored = ckpt.restore_latest(args.checkpoint_dir, template)
    except (ckpt.CheckpointError, OSError, ValueError):
        return None, 0
    if restored is None or "privacy" not in (restored[1].get("config") or {}):
        return None, 0
    tree, meta, _ = restored
    return np.asarray(jax.random.key_data(tree["key"])), int(meta.get("epoch", 0))


def _dp_key(args, restored_key):
    """The key of a --dp run's Poisson draws and noise: ``(key, source, private)``.

    From OS entropy (64 bits or more, all of the key's data: ``jax.random.key(seed)`` would
    keep 32 bits of a seed without x64), from the checkpoint being resumed, or, not private,
    from --insecure-dp-seed. Every process of a multi-process run uses process 0's key: the
    Poisson draw must be the same in all of them.
    """
    import jax
    import numpy as np

    from jaxgrad import keys

    if args.insecure_dp_seed is not None:
        data = np.zeros(jax.random.key_data(jax.random.key(0)).shape, np.uint32)
        data.flat[0], data.flat[-1] = INSECURE_KEY_MARK, args.insecure_dp_seed
        key, source = jax.random.wrap_key_data(data), "insecure-dp-seed"
    elif restored_key is not None:
        key, source = jax.random.wrap_key_data(np.asarray(restored_key, np.uint32)), "checkpoint"
    else:
        key = keys.entropy_key()
        while int(np.asarray(keys.key_data(key)).flat[0]) == INSECURE_KEY_MARK:
            key = keys.entropy_key()  # (probability 2**-32) never read as an insecure key
        source = "os-entropy"
    key = keys.same_in_every_process(key)
    private = int(np.asarray(keys.key_data(key)).flat[0]) != INSECURE_KEY_MARK
    return key, source, private


def _released_metrics(evaluate, plan, *, path, start_epoch, steps_per_epoch):
    """``evaluate`` that also appends each epoch's released record to ``path``.

    --metrics-jsonl of a --dp run: ``fit``'s own per-epoch records also hold what the JSON
    does not release (counts on the private rows, wall-clock times), so they are not written;
    this writes the epoch, its step, the ε spent and the test metrics instead.
    """
    from jaxgrad.train.progress import strict_json

    epoch = start_epoch

    def released(params):
        nonlocal epoch
        metrics = {} if evaluate is None else evaluate(params)  # None: no --public-test
        epoch += 1
        step = epoch * steps_per_epoch
        record = {"epoch": epoch, "step": step, "epsilon": plan.epsilon(step), **metrics}
        with open(path, "a") as f:  # the evaluator's metrics are Python floats
            f.write(json.dumps(strict_json(record)) + "\n")
        return metrics

    return released


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


_check_writable = check_writable  # one check for every CLI (jaxgrad._cli)


def _check_combinations(args, parser):
    """Values out of every range and flags that would be silently ignored, before any work."""
    if not args.dp:
        for name, why in DP_ONLY.items():
            if getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} needs --dp ({why})")
    for flag, seed in (("--seed", args.seed), ("--insecure-dp-seed", args.insecure_dp_seed)):
        if seed is not None and not 0 <= seed <= MAX_SEED:
            parser.error(f"{flag} must be an integer in [0, {MAX_SEED}]; got {seed}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be a positive integer; got {args.checkpoint_every}")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        parser.error("--checkpoint-every needs --checkpoint-dir (no checkpoint is written without)")
    if args.clip is not None and args.strategy != "clipped":
        parser.error(f"--clip is for --strategy clipped; got --strategy {args.strategy}")
    chosen = () if args.strategy == "clipped" else strategies.get(args.strategy).options
    for option, flag in STRATEGY_FLAGS.items():
        if getattr(args, flag[2:].replace("-", "_")) is not None and option not in chosen:
            takers = [(*s.aliases, s.name)[0] for s in _TRAINABLE if option in s.options]
            parser.error(
                f"{flag} is for --strategy {' or '.join(takers)}; got --strategy {args.strategy}"
            )


def _check_targets(ds, args, parser) -> None:
    """The CLI's models predict one class or one number per example: ``y`` of shape (N,).

    One-hot labels and ``(N, 1)`` columns are refused before training, saying what to store.
    """
    import numpy as np

    shape = tuple(ds.y_train.shape)
    if len(shape) == 1:
        return
    where = f"--data {args.data}" + (f" {args.data_path!r}" if args.data_path else "")
    y = np.asarray(ds.y_train)
    if shape[1:] == (1,):
        fix = "store y[:, 0] (or y.reshape(-1))"
    elif (
        len(shape) == 2
        and ds.task == "classification"
        and np.isin(y, (0, 1)).all()
        and (y.sum(axis=1) == 1).all()
    ):
        fix = "they look one-hot: store the class indices, y.argmax(axis=1), as integers"
    else:
        fix = (
            "the CLI's models predict one class or one number per example (for several "
            "outputs, train with jaxgrad.train.fit and your own model)"
        )
    parser.error(
        f"{where}: y must have one label or target per example, shape (N,); got shape "
        f"{(len(ds.y_train) + len(ds.y_test), *shape[1:])}: {fix}"
    )


def _check_args(args, parser):
    """Nonsense hyperparameters and unwritable outputs are argument errors, before any work.

    (The strategy's own hyperparameters, --clip, --microbatches, --chunk-size, are checked by
    building the strategy.)
    """
    import math

    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive finite number; got {args.lr}")
    if args.lr is not None and not args.x64:
        import numpy as np

        # The optimizer's arithmetic runs in float32: an lr past its range is inf there, and
        # the run would fail only at its first update.
        with np.errstate(over="ignore"):
            lr32 = np.float32(args.lr)
        if not (np.isfinite(lr32) and lr32 > 0):
            tiny, huge = np.finfo(np.float32).tiny, np.finfo(np.float32).max
            parser.error(
                f"--lr {args.lr} is outside float32's range ({tiny:.3g} to {huge:.3g}), the "
                "dtype the run trains in; choose a learning rate in it (or add --x64)"
            )
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
    if args.task != "auto":
        if args.data != "npz":
            parser.error(f"--task is for --data npz (its y); --data {args.data} knows its task")
        kwargs["task"] = args.task
    if args.num_classes is not None:
        if args.data not in ("npz", "idx"):
            parser.error(f"--num-classes is for --data npz or idx; --data {args.data} knows it")
        kwargs["num_classes"] = args.num_classes
    if args.data != "line":
        kwargs["test_fraction"] = args.test_fraction
    if args.num_examples is not None:
        if args.data != "mnist1d":
            parser.error("--num-examples is only for --data mnist1d")
        kwargs["num_examples"] = args.num_examples
    standardize = _standardize(args, parser)
    if standardize is not None and args.data != "line":  # the line is never standardised
        kwargs["standardize"] = standardize
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
    _check_targets(ds, args, parser)
    if args.dp and args.data == "npz" and ds.task == "classification" and not args.num_classes:
        parser.error(
            "--dp on --data npz needs --num-classes: the number of classes sets the model's "
            "output width, and reading it off the labels would release a function of the "
            "private rows (one row with a new largest label changes it)"
        )
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
    privacy_plan = _privacy(args, parser, len(ds.x_train), batch_size, epochs, model)
    strategy = _strategy(args, parser)
    try:  # building the strategy checks its hyperparameters (--microbatches, --clip, ...)
        strategy(loss_fn)
    except (ValueError, TypeError) as e:
        _flag_error(parser, str(e).replace("`l2_clip`", "--clip"))
    # The public seed's key: the initialisation and, without --dp, the shuffle; a --dp run's
    # sampling and noise take a secret key instead (_dp_key).
    init_key, key = jax.random.split(jax.random.key(args.seed))
    params, optimizer = jax.jit(model.init)(init_key), _optimizer(opt_name, lr)
    # Memory-mapped training inputs are never read whole, so not evaluated after each epoch
    # (the history's "loss" is the epoch's mean training loss); the test split is. Nor are
    # the training rows of a --dp run: their metrics would be released without noise.
    test_only = rows or privacy_plan is not None
    splits = {"test": ds.test} if test_only else {"train": ds.train, "test": ds.test}
    evaluate = evaluator(model.apply, loss_fn, splits, task=ds.task)
    if privacy_plan is not None and not args.public_test:
        evaluate = None  # the test split is the user's data too: released only if declared public
    metrics_path = args.metrics_jsonl
    if privacy_plan:
        restored_key, start_epoch = _restore_point(args, params, optimizer)
        key, key_source, private_run = _dp_key(args, restored_key)
        if metrics_path is not None:
            evaluate = _released_metrics(
                evaluate,
                privacy_plan,
                path=metrics_path,
                start_epoch=start_epoch,
                steps_per_epoch=privacy_plan.steps // epochs,
            )
            metrics_path = None
        if not private_run:
            # Loud, on stdout and (so that --quiet does not hide it) on stderr.
            banner = (
                "WARNING: NOT PRIVATE. The DP noise and sampling key was derived from "
                "--insecure-dp-seed, so the noise is a function of a public number and the run "
                'has no finite epsilon. For tests only; the JSON says "private": false.'
            )
            say(banner)
            print(banner, file=sys.stderr, flush=True)
        else:
            where = (
                f"the checkpoints in {args.checkpoint_dir} hold it: keep them secret"
                if args.checkpoint_dir
                else "written nowhere"
            )
            got = "restored from the checkpoint" if key_source == "checkpoint" else "OS entropy"
            say(f"DP noise and sampling key: {got}; {where}")
    say(
        f"{ds!r}; model {model_name}, strategy {args.strategy}, {opt_name}(lr={lr}), "
        f"{epochs} epochs of batch {batch_size}"
    )
    start = time.perf_counter()
    result = fit(
        loss_fn,
        params,
        ds.train,
        optimizer=optimizer,
        epochs=epochs,
        batch_size=batch_size,
        key=key,
        strategy=strategy,
        evaluate=evaluate,
        scan=False if args.no_scan else "auto",
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        resume=not args.no_resume,
        metrics_path=metrics_path,
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
        "input_stats": args.input_stats,
        "devices": 1 if mesh is None else int(mesh.devices.size),
        "processes": jax.process_count(),
        "seconds": seconds,
        "final": final,
        "history": result.history,
    }
    if privacy_plan:
        summary = _dp_summary(summary, args, privacy_plan, key_source, private_run)
    if model_name == "line":
        params = jaxgrad.sharding.local_replica(result.params)
        summary["params"] = {k: float(v) for k, v in params.items()}
    # scikit-learn's reference fit reads the training rows: not memory-mapped ones, and not
    # the private rows of a --dp run (its R² would be released without noise).
    if model_name == "linear" and ds.task == "regression" and not test_only:
        reference = _sklearn_r2(ds)
        if reference is not None:
            summary["reference"] = {"sklearn_linear_regression_test_r2": reference}
    shown = "  ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    took = "" if privacy_plan else f", {seconds:.1f} s"
    say(f"final after {epochs} epochs ({summary['steps']} steps{took}): {shown}")
    if "privacy" in summary:
        pv = summary["privacy"]
        say(
            f"privacy: ({pv['epsilon']:.4g}, {pv['delta']:g})-DP ({pv['accountant']}), "
            f"sigma {pv['noise_multiplier']:.4g}, q {pv['sampling_rate']:.4g}, "
            f"{pv['steps']} steps, clip "
            + (
                f"{pv['l2_clip']:g}"
                if "l2_sensitivity" not in pv
                else f"per layer (sensitivity {pv['l2_sensitivity']:g})"
            )
            + (f", BandMF noise, {pv['bands']} bands" if pv.get("noise") == "bandmf" else "")
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
            plot_history(summary["history"], args.plot, title=title)  # --dp: released only
        except ImportError as e:
            parser.error(str(e))
        say(f"curves written to {args.plot}")
    return summary


def _dp_summary(summary, args, plan, key_source, private_run):
    """The --dp run's JSON: what the run releases, and nothing computed on the training rows
    without noise (docs/privacy.md, "What a --dp run releases", lists every key)."""
    history = [
        {k: v for k, v in r.items() if k in DP_HISTORY_KEYS or k.startswith("test_")}
        for r in summary["history"]
    ]
    released = {k: v for k, v in summary.items() if k not in ("seconds", "final", "history")}
    out = {
        "private": private_run,
        **(
            {}
            if private_run
            else {
                "not_private_reason": "the DP noise and sampling key was derived from "
                "--insecure-dp-seed (a public number), so the run has no finite epsilon"
            }
        ),
        "privacy_note": PRIVACY_NOTE,
        "dp_key": key_source,
        **released,
        "final": {k: v for k, v in history[-1].items() if k.startswith("test_")},
        "history": history,
        "privacy": {
            **plan.summary(summary["steps"]),
            "planned_steps": plan.steps,
            "nonfinite": plan.config.nonfinite,
        },
    }
    if args.insecure_dp_seed is not None:
        out["insecure_dp_seed"] = args.insecure_dp_seed
    return out


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
