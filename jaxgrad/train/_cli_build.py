"""What ``python -m jaxgrad.train`` trains, built from its arguments: the device mesh, the
data, the hyperparameters, the model and its loss, the gradient strategy and the optimizer."""

from __future__ import annotations

import functools
import re
import warnings

from jaxgrad import reduce, strategies
from jaxgrad.train import arguments
from jaxgrad.train._cli_args import (
    CLIP,
    DEFAULT_MODEL,
    DEFAULTS,
    FALLBACK,
    MODELS,
    STRATEGY_FLAGS,
    UNSET_DEFAULTS,
)
from jaxgrad.train._cli_checks import flag_error, library_check


def data_mesh(args, parser):
    """The data mesh the run trains on (None: one device), ``jax.distributed`` started first."""
    import jax

    from jaxgrad import sharding

    distributed = any(
        v is not None for v in (args.coordinator, args.num_processes, args.process_id)
    )
    if args.devices is not None:  # before the CPU devices are emulated, below
        library_check(parser, reduce.check_positive_int, args.devices, name="num_devices")
    if distributed:
        if args.num_processes is None or args.process_id is None or args.coordinator is None:
            parser.error("--coordinator, --num-processes and --process-id go together")
        try:
            sharding.initialize(
                args.coordinator, num_processes=args.num_processes, process_id=args.process_id
            )
        except ValueError as e:
            flag_error(parser, e)
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
        flag_error(parser, e)


def make_strategy(args, parser, loss_fn):
    """The gradient strategy of --strategy and its flags, built once on ``loss_fn`` to check
    its hyperparameters (--microbatches, --chunk-size, --clip)."""
    strategy = _strategy(args, parser)
    try:
        strategy(loss_fn)
    except (ValueError, TypeError) as e:
        flag_error(parser, str(e).replace("`l2_clip`", "--clip"))
    return strategy


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


def load_data(args, parser, *, dtype, mesh, say):
    """The data set of --data, as ``(ds, rows)``: ``rows`` is True where its training inputs
    stay on disk, memory-mapped (files on a mesh), so they are never read whole."""
    import numpy as np

    from jaxgrad.data import arrays as data_arrays

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
    with warnings.catch_warnings():
        if args.dp:  # --task auto goes by y's dtype; whether its values are whole is private
            warnings.filterwarnings("ignore", message=re.escape(data_arrays.WHOLE_NUMBERS))
        # Sparse labels (a million classes inferred from three labels) are an error before
        # the model is built; under --dp --num-classes is required (check_num_classes) and
        # nothing is said from the private labels.
        sparse = "ignore" if args.dp else "error"
        warnings.filterwarnings(sparse, category=data_arrays.SparseLabelsWarning)
        return _loaded(args, parser, kwargs, rows=rows, say=say)


def _loaded(args, parser, kwargs, *, rows, say):
    """``load_data``'s ``(ds, rows)``, loaded with the loader's ``kwargs``."""
    import jax

    import jaxgrad.data
    from jaxgrad.data import arrays as data_arrays

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
    except (ValueError, TypeError, FileNotFoundError, data_arrays.SparseLabelsWarning) as e:
        flag_error(parser, e, names=("num_classes",))
    return ds, rows


def hyperparameters(args, parser, num_examples):
    """``(optimizer name, learning rate, epochs, batch size)``: the flags given, else the
    defaults suited to --data; checked against the ``num_examples`` training examples."""
    opt_name, lr, epochs, batch_size = DEFAULTS.get(args.data, FALLBACK)
    opt_name, lr = args.optimizer or opt_name, args.lr if args.lr is not None else lr
    epochs = args.epochs if args.epochs is not None else epochs
    batch_size = args.batch_size if args.batch_size is not None else batch_size
    flags = ("epochs", "batch_size")
    epochs = library_check(parser, reduce.check_positive_int, epochs, name="epochs", names=flags)
    batch_size = library_check(
        parser, reduce.check_positive_int, batch_size, name="batch_size", names=flags
    )
    library_check(parser, arguments.check_batch_size, batch_size, num_examples, names=flags)
    return opt_name, lr, epochs, batch_size


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


def make_model(args, ds, dtype, parser):
    """``(name, model, loss_fn)``: the model of --model (or suited to --data) and its
    per-example supervised loss."""
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
    chosen = f"--model {name}" + ("" if args.model else f" (--data {args.data}'s default)")
    for flag, value, takers in (
        ("--hidden", args.hidden, ("mlp",)),
        ("--activation", args.activation, ("mlp", "cnn")),
    ):
        if value is not None and name not in takers:
            parser.error(f"{flag} is for --model {' or '.join(takers)}; got {chosen}")
    hidden = args.hidden or UNSET_DEFAULTS["hidden"]
    activation = args.activation or UNSET_DEFAULTS["activation"]
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
        model = models.mlp([features, *hidden, out], activation=activation, dtype=dtype)
        loss = losses.softmax_cross_entropy if classify else losses.squared_error
    else:
        shape = ds.feature_shape if len(ds.feature_shape) >= 2 else _square(features, parser)
        model = models.cnn(image_shape=shape, num_classes=k, dtype=dtype, activation=activation)
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


def make_optimizer(name, lr):
    """The optax optimizer of --optimizer with learning rate ``lr``."""
    import optax

    return {"sgd": optax.sgd, "momentum": lambda r: optax.sgd(r, momentum=0.9), "adam": optax.adam}[
        name
    ](lr)
