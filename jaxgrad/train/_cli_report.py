"""What ``python -m jaxgrad.train`` reports: the lines it prints, the summary that --json
writes (for a --dp run only what the run releases), the --metrics-jsonl records of a --dp run
and the --plot curves."""

from __future__ import annotations

import json
import math
import sys

from jaxgrad.train.progress import strict_json
from jaxgrad.train.writers import JsonlWriter

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


def released_metrics(evaluate, plan, *, path, start_epoch, steps_per_epoch):
    """``evaluate`` that also appends each epoch's released record to ``path``.

    --metrics-jsonl of a --dp run: ``fit``'s own per-epoch records also hold what the JSON
    does not release (counts on the private rows, wall-clock times), so they are not written;
    this writes the epoch, its step, the ε spent and the test metrics instead.
    """
    writer = JsonlWriter(path)
    epoch = start_epoch

    def released(params):
        nonlocal epoch
        metrics = {} if evaluate is None else evaluate(params)  # None: no --public-test
        epoch += 1
        step = epoch * steps_per_epoch
        record = {"epoch": epoch, "step": step, "epsilon": plan.epsilon(step), **metrics}
        # Closed after each record (reopened to append the next): fit has no end hook for it.
        writer.write(record)
        writer.close()
        return metrics

    return released


def say_dp_key(args, key_source, private_run, say) -> None:
    """Where a --dp run's noise and sampling key came from; a run that is not private says so
    loudly, on stdout and (so that --quiet does not hide it) on stderr."""
    if not private_run:
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


def summary(
    args,
    result,
    ds,
    *,
    model_name,
    opt_name,
    lr,
    epochs,
    batch_size,
    dtype,
    mesh,
    seconds,
    test_only,
    dp=None,
) -> dict:
    """The summary of a finished run, as --json writes it.

    Args:
      args: the parsed arguments.
      result: ``fit``'s :class:`~jaxgrad.train.FitResult`.
      ds: the data set trained on.
      model_name, opt_name, lr, epochs, batch_size, dtype, mesh: what the run trained.
      seconds: the wall-clock time of ``fit``.
      test_only: whether the training rows were left unread after training (memory-mapped,
        or the private rows of a --dp run).
      dp: a --dp run's ``(plan, key_source, private_run)``, or None.

    Returns:
      A dict; for a --dp run only what the run releases.
    """
    import jax
    import numpy as np

    from jaxgrad import sharding

    skip = ("epoch", "step", "seconds", "loss", "epsilon", "nonfinite")
    final = {k: v for k, v in result.history[-1].items() if k not in skip}
    out = {
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
    if dp is not None:
        out = _dp_summary(out, args, *dp)
    if model_name == "line":
        params = sharding.local_replica(result.params)
        out["params"] = {k: float(v) for k, v in params.items()}
    # scikit-learn's reference fit reads the training rows: not memory-mapped ones, and not
    # the private rows of a --dp run (its R² would be released without noise).
    if model_name == "linear" and ds.task == "regression" and not test_only:
        reference = _sklearn_r2(ds)
        if reference is not None:
            out["reference"] = {"sklearn_linear_regression_test_r2": reference}
    return out


def report(summary, args, parser, say) -> None:
    """Prints the run's final lines and writes --json and --plot.

    Args:
      summary: the run's :func:`summary`.
      args: the parsed arguments.
      parser: the parser whose ``error`` reports a missing plotting library.
      say: prints a line (does nothing under --quiet).
    """
    dp_run = "privacy" in summary
    shown = "  ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    took = "" if dp_run else f", {summary['seconds']:.1f} s"
    say(f"final after {summary['epochs']} epochs ({summary['steps']} steps{took}): {shown}")
    if dp_run:
        pv = summary["privacy"]
        # The JSON's verdict, not the accountant's ε alone: an ε computed for a key that is
        # public (or for no noise) certifies nothing.
        claim = (
            f"({pv['epsilon']:.4g}, {pv['delta']:g})-DP ({pv['accountant']}),"
            if summary["private"]
            else f"NOT PRIVATE: {summary['not_private_reason']};"
        )
        say(
            f"privacy: {claim} "
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

        title = f"{summary['model']} on {args.data}, strategy {args.strategy}"
        try:
            plot_history(summary["history"], args.plot, title=title)  # --dp: released only
        except ImportError as e:
            parser.error(str(e))
        say(f"curves written to {args.plot}")


def _sklearn_r2(ds):
    """The test R² of scikit-learn's LinearRegression on the same split (None without it)."""
    try:
        from sklearn.linear_model import LinearRegression
    except ImportError:
        return None
    flat = lambda x: x.reshape(len(x), -1)
    fitted = LinearRegression().fit(flat(ds.x_train), ds.y_train)
    return float(fitted.score(flat(ds.x_test), ds.y_test))


def _not_private_reason(key_source, secret_key, privacy):
    """Why a --dp run certifies no finite ε (None if it does): its noise and sampling key is
    public (``secret_key`` false), or its accounted ε is ``inf`` (no noise)."""
    if not secret_key:
        whose = (
            "was derived from --insecure-dp-seed (a public number) by the run that wrote the "
            "checkpoint"
            if key_source == "checkpoint"
            else "was derived from --insecure-dp-seed (a public number)"
        )
        return f"the DP noise and sampling key {whose}, so the run has no finite epsilon"
    if not math.isfinite(privacy["epsilon"]):
        sigma = privacy["noise_multiplier"]
        if sigma == 0:
            return "no noise is added (noise_multiplier 0), so the run has no finite epsilon"
        return f"the accountant's epsilon is inf at noise_multiplier {sigma:g}"
    return None


def _dp_summary(summary, args, plan, key_source, private_run):
    """The --dp run's JSON: what the run releases, and nothing computed on the training rows
    without noise (docs/privacy.md, "What a --dp run releases", lists every key)."""
    history = [
        {k: v for k, v in r.items() if k in DP_HISTORY_KEYS or k.startswith("test_")}
        for r in summary["history"]
    ]
    released = {k: v for k, v in summary.items() if k not in ("seconds", "final", "history")}
    privacy = {
        **plan.summary(summary["steps"]),
        "planned_steps": plan.steps,
        "nonfinite": plan.config.nonfinite,
    }
    reason = _not_private_reason(key_source, private_run, privacy)
    out = {
        "private": reason is None,
        **({} if reason is None else {"not_private_reason": reason}),
        "privacy_note": PRIVACY_NOTE,
        "dp_key": key_source,
        **released,
        "final": {k: v for k, v in history[-1].items() if k.startswith("test_")},
        "history": history,
        "privacy": privacy,
    }
    if args.insecure_dp_seed is not None:
        out["insecure_dp_seed"] = args.insecure_dp_seed
    return out
