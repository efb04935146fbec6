"""The checks of ``python -m jaxgrad.train``'s arguments before any work (ranges, flags that
go together, writable outputs, the loaded targets), and the library's errors written with the
flags the user typed."""

from __future__ import annotations

import re

from jaxgrad import reduce, strategies
from jaxgrad._cli import check_writable
from jaxgrad._optional import require
from jaxgrad.train import arguments, checkpoint
from jaxgrad.train._cli_args import (
    DP_ONLY,
    FLAG_NAMES,
    MAX_SEED,
    STRATEGY_FLAGS,
    TRAINABLE,
    UNSET_DEFAULTS,
)


def flag_error(parser, error, names=()):
    """``parser.error`` with the library's `argument` names written as the flags the user typed
    (the library's "`name` (3)" as the command line's "--flag 3").

    Args:
      parser: the ``argparse.ArgumentParser`` whose ``error`` reports it.
      error: the library's error (or its message), its arguments named in backquotes.
      names: argument names that are flags of the same name (beyond ``FLAG_NAMES``).
    """
    message = str(error)
    for name in (*names, *FLAG_NAMES):
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        message = re.sub(rf"`{name}` \((-?[\d.]+)\)", rf"{flag} \1", message)
        message = message.replace(f"`{name}`", flag)
    parser.error(message)


def library_check(parser, check, *args, names=(), **kwargs):
    """``check(*args, **kwargs)``, the library's own check of an argument, its error reported
    by :func:`flag_error`; returns what ``check`` returns."""
    try:
        return check(*args, **kwargs)
    except (ValueError, TypeError, checkpoint.CheckpointError) as e:
        flag_error(parser, e, names)


def check_combinations(args, parser):
    """Values out of every range and flags that would be silently ignored, before any work."""
    if not args.dp:
        for name, why in DP_ONLY.items():
            if getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} needs --dp ({why})")
    for flag, seed in (("--seed", args.seed), ("--insecure-dp-seed", args.insecure_dp_seed)):
        if seed is not None and not 0 <= seed <= MAX_SEED:
            parser.error(f"{flag} must be an integer in [0, {MAX_SEED}]; got {seed}")
    library_check(
        parser,
        arguments.checkpoint_options,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        keep=None,  # (--keep and --no-resume: below, as the flags they are)
        resume=None,
        names=("checkpoint_every", "checkpoint_dir"),
    )
    if args.checkpoint_dir is None:
        for flag, given in (("--keep", args.keep is not None), ("--no-resume", args.no_resume)):
            if given:
                parser.error(f"{flag} is for --checkpoint-dir; got no --checkpoint-dir")
    if args.quiet and args.progress not in (None, "none"):
        parser.error(
            f"--progress is for a run that prints; got --progress {args.progress} with --quiet"
        )
    for name in ("keep", "progress"):  # (--hidden, --activation: make_model, by the model)
        if getattr(args, name) is None:
            setattr(args, name, UNSET_DEFAULTS[name])
    if args.clip is not None and args.strategy != "clipped":
        parser.error(f"--clip is for --strategy clipped; got --strategy {args.strategy}")
    chosen = () if args.strategy == "clipped" else strategies.get(args.strategy).options
    for option, flag in STRATEGY_FLAGS.items():
        if getattr(args, flag[2:].replace("-", "_")) is not None and option not in chosen:
            takers = [(*s.aliases, s.name)[0] for s in TRAINABLE if option in s.options]
            parser.error(
                f"{flag} is for --strategy {' or '.join(takers)}; got --strategy {args.strategy}"
            )


def check_targets(ds, args, parser) -> None:
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


def check_num_classes(ds, args, parser) -> None:
    """A --dp run on --data npz classification needs --num-classes: read off the labels, the
    model's output width would be a function of the private rows."""
    if args.dp and args.data == "npz" and ds.task == "classification" and not args.num_classes:
        parser.error(
            "--dp on --data npz needs --num-classes: the number of classes sets the model's "
            "output width, and reading it off the labels would release a function of the "
            "private rows (one row with a new largest label changes it)"
        )


def check_args(args, parser):
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
    if args.keep is not None:  # (--checkpoint-every: check_combinations)
        library_check(parser, reduce.check_positive_int, args.keep, name="keep", names=("keep",))
    if any(h < 1 for h in args.hidden or ()):
        parser.error(f"--hidden sizes must be positive integers; got {args.hidden}")
    for flag, path in (
        ("--json", args.json),
        ("--plot", args.plot),
        ("--metrics-jsonl", args.metrics_jsonl),
    ):
        check_writable(flag, path, parser)
    if args.checkpoint_dir is not None:  # fit's own check, made here before any work
        library_check(
            parser, checkpoint.check_directory, args.checkpoint_dir, names=("checkpoint_dir",)
        )
    if args.plot:
        try:
            require("matplotlib", package="matplotlib", extra="cli", needed_for="--plot")
        except ImportError as e:
            parser.error(str(e))
