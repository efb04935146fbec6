"""Learning curves as a PNG: every numeric metric of a history per epoch. matplotlib is optional."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

from jaxgrad._optional import pyplot

# A metric's split prefix: ``test_accuracy`` and ``train_accuracy`` share the accuracy panel.
_SPLITS = ("train_", "test_", "val_", "valid_", "validation_", "eval_")
# The record's axes and bookkeeping, not metrics.
_NOT_METRICS = ("epoch", "step", "seconds")
_TITLES = {"accuracy": "accuracy", "r2": "R² (coefficient of determination)", "loss": "loss"}


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _metric(key: str) -> str:
    """The panel a key goes to: its name without a split prefix (``val_loss`` -> ``loss``)."""
    for prefix in _SPLITS:
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix) :]
    return key


def panels(history: Sequence[dict]) -> dict[str, list[str]]:
    """Which keys of ``history`` :func:`plot_history` draws, grouped by panel.

    Every key with a number in some record is drawn, except ``epoch``, ``step`` and
    ``seconds``; keys that differ only by a split prefix (``train_``, ``test_``, ``val_``,
    ...) share a panel, and the running training ``loss`` joins the loss panel. The loss
    panel comes first, then the others in the order the keys first appear.

    Returns:
      ``{panel name: [key, ...]}``, no panel empty.

    Example::

      >>> panels([{"epoch": 1, "loss": 0.9, "val_loss": 1.0, "test_accuracy": 0.7,
      ...          "epsilon": 0.4, "seconds": 2.0}])
      {'loss': ['loss', 'val_loss'], 'accuracy': ['test_accuracy'], 'epsilon': ['epsilon']}
    """
    groups: dict[str, list[str]] = {}
    for record in history:
        for key, value in record.items():
            if key in _NOT_METRICS or not _is_number(value):
                continue
            keys = groups.setdefault(_metric(key), [])
            if key not in keys:
                keys.append(key)
    if "loss" in groups:
        groups = {"loss": groups.pop("loss"), **groups}
    return groups


def plot_history(history: Sequence[dict], path, *, title: str | None = None) -> str:
    """Writes the curves of a :func:`jaxgrad.train.fit` history to ``path`` (PNG).

    One panel per metric (see :func:`panels`): the losses (the running training loss over
    each epoch's batches, dotted, and every evaluated loss at the epoch's end), accuracy or
    R², and every other number the records hold — ``epsilon`` of a private run, a user's
    ``evaluate`` metrics — against the epoch. A metric missing from some epochs leaves a
    gap. No panel is ever empty.

    Args:
      history: the per-epoch records (``FitResult.history``, or the JSON lines of
        ``metrics_path``).
      path: the image file to write.
      title: a title over the panels.

    Returns:
      ``path``.

    Raises:
      ValueError: ``history`` is empty or holds no numeric metric.

    Example::

      >>> import os, tempfile
      >>> from jaxgrad.train.plot import plot_history
      >>> history = [{"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "epsilon": 0.3 * e}
      ...            for e in (1, 2, 3)]
      >>> path = plot_history(history, os.path.join(tempfile.mkdtemp(), "curves.png"))
      >>> open(path, "rb").read(4) == b"\\x89PNG"
      True
    """
    if not history:
        raise ValueError("`history` is empty; nothing to plot")
    groups = panels(history)
    if not groups:
        keys = sorted(set().union(*history))
        raise ValueError(
            f"`history` holds no numeric metric to plot; its records have only {keys} "
            "(epoch, step and seconds are the axes, not metrics)"
        )
    plt = pyplot()
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(groups) :]:
        fig.delaxes(ax)  # the grid's spare cells: no empty panel
    for ax, (name, keys) in zip(flat, groups.items(), strict=False):
        everything = []
        for i, key in enumerate(keys):
            values = [r.get(key) for r in history]
            values = [float(v) if _is_number(v) else float("nan") for v in values]
            everything += [v for v in values if not math.isnan(v)]
            running = key == "loss"
            label = "train (running mean over the epoch's batches)" if running else key
            last = next((v for v in reversed(values) if not math.isnan(v)), None)
            if last is not None and not running:
                label += f" (final {last:.4g})"
            style = ":" if running else "-"
            ax.plot(epochs, values, style, color=f"C{i}", marker=".", label=label)
        ax.set(xlabel="epoch", ylabel=name, title=_TITLES.get(name, name))
        if name == "loss" and everything and all(v > 0 for v in everything):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
    return os.fspath(path)
