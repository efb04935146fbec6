"""PNG of a peer comparison: throughput and memory against batch size (and width), log scales.

Only rows that ran and agreed with the reference are drawn: a fast wrong answer is not a
result. Memory is the working memory (peak RSS above the process's baseline after imports),
because the frameworks' import footprints differ and would hide the scaling.
"""

from __future__ import annotations

from collections import defaultdict

STYLE = {
    "jaxgrad:batch_grad": ("tab:blue", "-", "o"),
    "jaxgrad:per_example_grads": ("tab:blue", ":", "s"),
    "jaxgrad:per_example_norms": ("tab:cyan", "-", "^"),
    "jaxgrad:clipped_grad": ("tab:green", "-", "D"),
    "pytorch:backward": ("tab:red", "-", "o"),
    "torch.func:vmap_grad": ("tab:red", ":", "s"),
    "opacus:hooks_clip": ("tab:purple", ":", "v"),
    "opacus:ghost_clip": ("tab:purple", "-", "D"),
    "backpack:BatchGrad": ("tab:orange", ":", "s"),
    "backpack:BatchL2Grad": ("tab:orange", "-", "^"),
    "jaxgrad:clipped_grad_per_layer": ("tab:green", "--", "D"),
    "opacus:per_layer_clip": ("tab:purple", "--", "v"),
    "jaxgrad:per_example_dots": ("tab:olive", "-", "P"),
    "torch.func:vmap_dots": ("tab:red", "-.", "P"),
    "jaxgrad:gradient_gram": ("tab:brown", "-", "X"),
    "torch.func:vmap_gram": ("tab:red", "--", "X"),
}


def _panels(records: list[dict], *, sweep: bool):
    """``[(title, x_key, x_label, records)]``: one panel pair per model (or sweep axis)."""
    good = [r for r in records if r.get("examples_per_s") and r.get("agrees_with_reference")]
    if sweep:
        by_batch = [r for r in good if r.get("sweep_axis") == "batch"]
        by_width = [r for r in good if r.get("sweep_axis") == "width"]
        out = []
        if by_batch:
            out.append(
                (f"{by_batch[0]['model']}: batch sweep", "batch_size", "batch size", by_batch)
            )
        if by_width:
            b = by_width[0]["batch_size"]
            out.append((f"MLP 784-w-w/2-10, B={b}: width sweep", "width", "width w", by_width))
        return out
    groups = defaultdict(list)
    for r in good:
        groups[r["model"]].append(r)
    return [(model, "batch_size", "batch size", rows) for model, rows in groups.items()]


def plot(records: list[dict], path: str, *, sweep: bool = False) -> None:
    """Writes the PNG to ``path`` (needs matplotlib: ``pip install "jaxgrad[cli]"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    panels = _panels(records, sweep=sweep)
    if not panels:
        raise ValueError("nothing to plot: no row ran and agreed with the reference")
    fig, axes = plt.subplots(
        len(panels), 2, figsize=(13, 4.2 * len(panels)), squeeze=False, constrained_layout=True
    )
    for (title, x_key, x_label, rows), (ax_speed, ax_mem) in zip(panels, axes, strict=True):
        lines = defaultdict(list)
        for r in rows:
            lines[f"{r['framework']}:{r['method']}"].append(r)
        for key, pts in lines.items():
            pts.sort(key=lambda r: r[x_key])
            color, style, marker = STYLE.get(key, ("gray", "--", "x"))
            xs = [r[x_key] for r in pts]
            kw = dict(color=color, linestyle=style, marker=marker, label=key, markersize=4)
            ax_speed.plot(xs, [r["examples_per_s"] for r in pts], **kw)
            # Clamped at 1 MB so rows that needed no extra memory stay on the log axis.
            ax_mem.plot(xs, [max(r["working_mem_mb"] or 0, 1.0) for r in pts], **kw)
        ticks = sorted({r[x_key] for r in rows})
        for ax, ylabel in (
            (ax_speed, "examples / s"),
            (ax_mem, "working memory (MB, peak RSS − baseline)"),
        ):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel(x_label)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_speed.set_title(f"{title}: throughput (higher is better)")
        ax_mem.set_title(f"{title}: memory (lower is better)")
        ax_speed.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
