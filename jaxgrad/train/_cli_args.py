"""The options of ``python -m jaxgrad.train``: their names, choices and defaults, and the
parser that reads them (its ``--help`` text)."""

from __future__ import annotations

import argparse

from jaxgrad import strategies

MODELS = ("line", "linear", "logistic", "mlp", "cnn")
DATA = ("digits", "breast_cancer", "diabetes", "line", "mnist1d", "mnist5k", "npz", "idx")
# The registry's exact strategies that give a step's gradient (jaxgrad.strategies), by their
# short names and their own, and the fast path's clipped mean.
TRAINABLE = [strategies.get(n) for n in strategies.names(exact=True, per_example=False)]
STRATEGIES = (
    *(a for s in TRAINABLE for a in s.aliases),
    "clipped",
    *(s.name for s in TRAINABLE),
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
# Flags whose parser default is None, so that one given where it would be ignored is refused
# (_cli_checks.check_combinations, _cli_build.make_model), and their values when not given.
UNSET_DEFAULTS = {"hidden": [256], "activation": "relu", "keep": 3, "progress": "auto"}
# The flags of adaptive clipping that mean something only with --adaptive-clip-quantile.
ADAPTIVE_ONLY = ("adaptive_clip_lr", "count_noise_multiplier")
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
    "num_devices": "--devices",
    "coordinator": "--coordinator",
    "seed": "--seed",
    "standardize": "--input-stats",
    "target_quantile": "--adaptive-clip-quantile",
    "learning_rate": "--adaptive-clip-lr",
}
# Seeds seed numpy's generator (non-negative) and jax.random.key, which without x64 keeps only
# the low 32 bits (--seed 4294967296 would give --seed 0's initialisation and shuffle).
MAX_SEED = 2**32 - 1


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
    """The parser of ``python -m jaxgrad.train``'s options.

    Returns:
      An ``argparse.ArgumentParser``; its ``--help`` groups the options: data and model,
      optimisation, differential privacy, checkpoints and output, devices and hosts.
    """
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
        "label + 1, refused when over 1000 and fewer than half of them occur; required with "
        "--dp, where reading it off the labels would read private rows)",
    )
    g.add_argument("--model", choices=MODELS, help="model (default: suited to --data)")
    g.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        help=f"hidden sizes of --model mlp (default: {UNSET_DEFAULTS['hidden'][0]})",
    )
    g.add_argument(
        "--activation",
        choices=("relu", "tanh", "sigmoid", "gelu"),
        help="hidden-layer nonlinearity of --model mlp and cnn "
        f"(default: {UNSET_DEFAULTS['activation']})",
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
        + "; ".join(f"{'/'.join((*s.aliases, s.name))}: {s.summary}" for s in TRAINABLE)
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
    g.add_argument(
        "--keep",
        type=int,
        help=f"checkpoints to keep in --checkpoint-dir (default: {UNSET_DEFAULTS['keep']})",
    )
    g.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh, ignoring the checkpoints in --checkpoint-dir",
    )
    g.add_argument("--json", help="write the summary (final metrics, history) here")
    g.add_argument("--metrics-jsonl", help="append one JSON line per epoch here")
    g.add_argument("--plot", help="write loss and accuracy curves here (PNG; needs matplotlib)")
    g.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "none"),
        help="progress display; auto: a bar on a terminal, plain lines otherwise "
        f"(default: {UNSET_DEFAULTS['progress']})",
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
