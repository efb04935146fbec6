"""Learning curves as a PNG: loss and accuracy (or R²) per epoch. matplotlib is optional."""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxgrad._optional import pyplot


def plot_history(history: Sequence[dict], path, *, title: str | None = None) -> str:
    """Writes the curves of a :func:`jaxgrad.train.fit` history to ``path`` (PNG).

    The left panel shows the losses (the running training loss over each epoch's batches
    and, where evaluated, the train and test losses at the epoch's end); the right panel
    shows accuracy or R², whichever the history holds.

    Args:
      history: the per-epoch records.
      path: the image file to write.
      title: a title over both panels.

    Returns:
      ``path``.
    """
    if not history:
        raise ValueError("`history` is empty; nothing to plot")
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    keys = set().union(*history)
    score = next((s for s in ("accuracy", "r2") if any(k.endswith("_" + s) for k in keys)), None)
    fig, axes = plt.subplots(1, 2 if score else 1, figsize=(10 if score else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    colors = {"train": "C0", "test": "C1"}
    curves = [("loss", "train (running mean over the epoch's batches)", ":", "C2")]
    curves += [(f"{s}_loss", f"{s} (end of epoch)", "-", colors[s]) for s in ("train", "test")]
    for key, label, style, color in curves:
        if key in keys:
            values = [r.get(key) for r in history]
            ax.plot(epochs, values, style, color=color, marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="mean loss", title="loss")
    if all(r.get(k, 1) > 0 for r in history for k, *_ in curves if k in r):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if score:
        ax = axes[0, 1]
        for split in ("train", "test"):
            key = f"{split}_{score}"
            if key in keys:
                values = [r.get(key) for r in history]
                ax.plot(
                    epochs,
                    values,
                    color=colors[split],
                    marker=".",
                    label=f"{split} (final {values[-1]:.4f})",
                )
        ax.set(
            xlabel="epoch",
            ylabel=score if score == "accuracy" else "R²",
            title="accuracy" if score == "accuracy" else "R² (coefficient of determination)",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
    return os.fspath(path)
