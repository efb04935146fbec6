"""``python -m jaxgrad.bench.valuation``: do the lowest data values find flipped labels?

Digits (scikit-learn's bundled 8x8 images) with a fraction of the training labels flipped to
another class (seeded), a small MLP trained by :func:`jaxgrad.train.fit` with
``valuation=Valuation(val, learning_rate=...)`` (first-order In-Run Data Shapley / TracIn,
:mod:`jaxgrad.train.valuation`), the validation set a held-out part of the test split. It
reports the ROC AUC of "the lower the score, the likelier the label was flipped" and, for
comparison, of "the higher the final training loss, the likelier" (the usual baseline), and
writes a plot (histograms of the scores of clean and flipped rows, and both ROC curves).

Example::

  python -m jaxgrad.bench.valuation --json bench/results/valuation.json \\
      --plot bench/results/valuation.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxgrad
from jaxgrad._cli import check_writable
from jaxgrad.train import Valuation, fit


def roc_auc(scores, positive) -> float:
    """The area under the ROC curve of ``scores`` for the ``positive`` rows: the probability
    that a random positive row scores above a random negative one (ties count 1/2), computed
    from ranks (Mann–Whitney U).

    Example::

      >>> roc_auc(np.array([0.9, 0.1, 0.8, 0.3]), np.array([True, False, False, True]))
      0.75
    """
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"`positive` needs both classes; got {n_pos} positive, {n_neg} negative")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2
    ranks[order] = np.repeat(average, counts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def flip_labels(y, *, fraction: float, num_classes: int, seed: int):
    """``y`` with ``round(fraction · N)`` labels, chosen at random, changed to another class
    (uniform over the other ``num_classes − 1``); returns ``(y_noisy, flipped_mask)``."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y).copy()
    flipped = np.zeros(len(y), bool)
    flipped[rng.choice(len(y), round(fraction * len(y)), replace=False)] = True
    y[flipped] = (y[flipped] + rng.integers(1, num_classes, flipped.sum())) % num_classes
    return y, flipped


def run(
    *,
    flip_fraction: float = 0.1,
    epochs: int = 20,
    batch_size: int = 32,
    learning_rate: float = 0.1,
    hidden: int = 64,
    val_size: int = 200,
    train_size: int | None = None,
    seed: int = 0,
) -> dict:
    """Trains with valuation on and returns the AUCs, the scores and the run's settings."""
    ds = jaxgrad.data.load_digits()
    x, y = ds.x_train, ds.y_train
    if train_size is not None:
        x, y = x[:train_size], y[:train_size]
    y_noisy, flipped = flip_labels(y, fraction=flip_fraction, num_classes=10, seed=seed)
    val = (ds.x_test[:val_size], ds.y_test[:val_size])
    test = (ds.x_test[val_size:], ds.y_test[val_size:])
    model = jaxgrad.models.mlp([64, hidden, 10], activation="tanh")
    loss_fn = jaxgrad.losses.supervised(
        model.apply, jaxgrad.losses.softmax_cross_entropy, num_classes=10
    )
    params = model.init(jax.random.key(seed))
    result = fit(
        loss_fn,
        params,
        (x, y_noisy),
        optimizer=optax.sgd(learning_rate),
        epochs=epochs,
        batch_size=batch_size,
        key=jax.random.key(seed + 1),
        progress="none",
        valuation=Valuation(val, learning_rate=learning_rate),
    )
    scores = result.valuation
    final_loss = np.asarray(jax.vmap(loss_fn, in_axes=(None, 0))(result.params, (x, y_noisy)))
    accuracy = None  # on the test rows not used for validation, if any
    if len(test[1]):
        logits = jax.vmap(model.apply, in_axes=(None, 0))(result.params, jnp.asarray(test[0]))
        accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == test[1]))
    return {
        "auc_lowest_value": roc_auc(-scores, flipped),
        "auc_highest_final_loss": roc_auc(final_loss, flipped),
        "precision_at_flipped": float(np.mean(flipped[np.argsort(scores)[: flipped.sum()]])),
        "test_accuracy": accuracy,
        "num_train": len(y),
        "num_flipped": int(flipped.sum()),
        "settings": {
            "flip_fraction": flip_fraction,
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "hidden": hidden,
            "val_size": val_size,
            "seed": seed,
            "optimizer": "sgd",
        },
        "scores": scores,
        "final_loss": final_loss,
        "flipped": flipped,
    }


def plot(out: dict, path: str) -> None:
    """Histograms of the scores of clean and flipped rows, and the two ROC curves."""
    from jaxgrad._optional import pyplot

    plt = pyplot()
    scores, flipped = out["scores"], out["flipped"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(scores.min(), scores.max(), 50)
    a.hist(scores[~flipped], bins=bins, alpha=0.6, label=f"clean ({(~flipped).sum()})")
    a.hist(scores[flipped], bins=bins, alpha=0.6, label=f"flipped ({flipped.sum()})")
    a.set_xlabel("data value (first-order In-Run Data Shapley)")
    a.set_ylabel("training examples")
    a.set_yscale("log")
    a.legend()
    for name, s, key in [
        ("lowest value", -scores, "auc_lowest_value"),
        ("highest final loss", out["final_loss"], "auc_highest_final_loss"),
    ]:
        order = np.argsort(-s, kind="mergesort")
        tpr = np.concatenate([[0], np.cumsum(flipped[order]) / flipped.sum()])
        fpr = np.concatenate([[0], np.cumsum(~flipped[order]) / (~flipped).sum()])
        b.plot(fpr, tpr, label=f"{name} (AUC {out[key]:.3f})")
    b.plot([0, 1], [0, 1], "k:", lw=0.8)
    b.set_xlabel("false positive rate")
    b.set_ylabel("flipped labels found")
    b.legend(loc="lower right")
    settings = out["settings"]
    fig.suptitle(
        f"digits, {100 * settings['flip_fraction']:.0f}% labels flipped, MLP 64-"
        f"{settings['hidden']}-10, {settings['epochs']} epochs of SGD"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jaxgrad.bench.valuation",
        description="Digits with flipped labels: how well the lowest data values "
        "(jaxgrad.train.Valuation) find them (ROC AUC).",
    )
    p.add_argument("--flip-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=0.1)
    p.add_argument("--val-size", type=int, default=200)
    p.add_argument("--train-size", type=int, default=None, help="first rows only (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures (no scores) here")
    p.add_argument("--plot", default=None, help="write the PNG here")
    args = p.parse_args(argv)
    check_writable("--json", args.json, p)
    check_writable("--plot", args.plot, p)
    if not 0 < args.flip_fraction < 1:
        p.error(f"--flip-fraction must be in (0, 1); got {args.flip_fraction}")
    for flag, value in [("--epochs", args.epochs), ("--batch-size", args.batch_size)]:
        if value < 1:
            p.error(f"{flag} must be a positive integer; got {value}")
    if not 1 <= args.val_size <= 359:
        p.error(
            f"--val-size must be in [1, 359] (rows of the digits test split); got {args.val_size}"
        )
    out = run(
        flip_fraction=args.flip_fraction,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        val_size=args.val_size,
        train_size=args.train_size,
        seed=args.seed,
    )
    figures = {k: v for k, v in out.items() if k not in ("scores", "final_loss", "flipped")}
    figures["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    figures["command"] = "python -m jaxgrad.bench.valuation " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    figures["backend"] = jax.default_backend()
    print(
        f"{out['num_flipped']} of {out['num_train']} labels flipped; ROC AUC of lowest value: "
        f"{out['auc_lowest_value']:.3f} (highest final loss: {out['auc_highest_final_loss']:.3f});"
        f" precision of the {out['num_flipped']} lowest: {out['precision_at_flipped']:.3f}"
        + (
            f"; test accuracy {out['test_accuracy']:.3f}"
            if out["test_accuracy"] is not None
            else ""
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    if args.plot:
        plot(out, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
