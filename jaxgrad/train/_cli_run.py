"""``python -m jaxgrad.train``'s run: the arguments checked, what they say built, ``fit``
called, and its summary reported."""

from __future__ import annotations

import time

from jaxgrad.train import _cli_build, _cli_checks, _cli_privacy, _cli_report
from jaxgrad.train._cli_args import build_parser


def run(args, parser=None) -> dict:
    """Trains as ``args`` say and returns the summary written by ``--json``.

    Args:
      args: the parsed arguments (:func:`jaxgrad.train._cli_args.build_parser`).
      parser: the parser whose ``error`` reports a bad argument (default: a new one).

    Returns:
      The summary (:func:`jaxgrad.train._cli_report.summary`).
    """
    parser = parser or build_parser()
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import jaxgrad.data

    # Looked up at each run (not imported once), so that a test can stand in for them.
    from jaxgrad.train import evaluator, fit

    _cli_checks.check_combinations(args, parser)
    mesh = _cli_build.data_mesh(args, parser)
    lead = jax.process_index() == 0  # with several processes only process 0 reports
    if not lead:
        args.quiet, args.json, args.plot, args.metrics_jsonl = True, None, None, None
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    dtype = jnp.float64 if args.x64 else jnp.float32
    ds, rows = _cli_build.load_data(args, parser, dtype=dtype, mesh=mesh, say=say)
    _cli_checks.check_targets(ds, args, parser)
    _cli_checks.check_num_classes(ds, args, parser)
    _cli_checks.check_args(args, parser)
    num_train = len(ds.x_train)
    opt_name, lr, epochs, batch_size = _cli_build.hyperparameters(args, parser, num_train)
    model_name, model, loss_fn = _cli_build.make_model(args, ds, dtype, parser)
    privacy_plan = _cli_privacy.privacy_plan(args, parser, num_train, batch_size, epochs, model)
    strategy = _cli_build.make_strategy(args, parser, loss_fn)
    # The public seed's key: the initialisation and, without --dp, the shuffle; a --dp run's
    # sampling and noise take a secret key instead (_cli_privacy.dp_key).
    init_key, key = jax.random.split(jax.random.key(args.seed))
    params = jax.jit(model.init)(init_key)
    optimizer = _cli_build.make_optimizer(opt_name, lr)
    # Memory-mapped training inputs are never read whole, so not evaluated after each epoch
    # (the history's "loss" is the epoch's mean training loss); the test split is. Nor are
    # the training rows of a --dp run: their metrics would be released without noise.
    test_only = rows or privacy_plan is not None
    splits = {"test": ds.test} if test_only else {"train": ds.train, "test": ds.test}
    evaluate = evaluator(model.apply, loss_fn, splits, task=ds.task)
    if privacy_plan is not None and not args.public_test:
        evaluate = None  # the test split is the user's data too: released only if declared public
    metrics_path = args.metrics_jsonl
    dp = None
    if privacy_plan:
        restored_key, start_epoch = _cli_privacy.restore_point(
            args, params, optimizer, privacy_plan
        )
        key, key_source, private_run = _cli_privacy.dp_key(args, restored_key)
        dp = (privacy_plan, key_source, private_run)
        if metrics_path is not None:
            evaluate = _cli_report.released_metrics(
                evaluate,
                privacy_plan,
                path=metrics_path,
                start_epoch=start_epoch,
                steps_per_epoch=jaxgrad.data.num_batches(num_train, batch_size),
            )
            metrics_path = None
        _cli_report.say_dp_key(args, key_source, private_run, say)
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
        # (--checkpoint-every, --keep and --no-resume without --checkpoint-dir are refused)
        **(
            dict(checkpoint_every=args.checkpoint_every, keep=args.keep, resume=not args.no_resume)
            if args.checkpoint_dir
            else {}
        ),
        metrics_path=metrics_path,
        progress=args.progress,
        quiet=args.quiet,
        **({"privacy": privacy_plan.config} if privacy_plan else {}),
        mesh=mesh,
    )
    seconds = time.perf_counter() - start
    summary = _cli_report.summary(
        args,
        result,
        ds,
        model_name=model_name,
        opt_name=opt_name,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        dtype=dtype,
        mesh=mesh,
        seconds=seconds,
        test_only=test_only,
        dp=dp,
    )
    _cli_report.report(summary, args, parser, say)
    return summary
