"""`mmdata stats`: one figure of label distributions per task and split, and media size histograms.

Drawn from dataset.json (label counts) and index.parquet (regression labels, media sizes); no shard is read,
so it is cheap on any dataset size.
"""

from __future__ import annotations

import logging

import numpy as np

from .card import LABEL_PREFIX
from .cli import add_storage_options

log = logging.getLogger(__name__)

SPLIT_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
MAX_CLASSES_SHOWN = 40  # a task with more classes shows its most frequent ones
TOP_IMAGE_SIZES = 12


def stats_figure(dataset, columns: int = 3):
    """Plot the dataset's statistics; return the matplotlib Figure (one axes per panel).

    Panels: one per task (the card's label counts by class, bars grouped by split; a histogram for regression),
    then audio seconds, image sizes (width x height, most common first) and text characters, each
    only when the dataset has that modality.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .dataset import as_dataset

    ds = as_dataset(dataset)
    splits = ds.splits
    data = {s: ds.index(s).to_pydict() for s in splits}
    panels = [("task", t) for t in ds.tasks]
    present = {m for s in splits for ms in data[s]["modalities"] for m in (ms or ())}
    panels += [(m, None) for m in ("audio", "image", "text") if m in present]
    cols = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    color = {s: SPLIT_COLORS[i % len(SPLIT_COLORS)] for i, s in enumerate(splits)}
    for ax, (kind, task) in zip(axes.flat, panels):
        if kind == "task" and task.type == "regression":
            first = {s: [v[0] for v in data[s].get(LABEL_PREFIX + task.name, []) if v is not None] for s in splits}
            _hist(ax, first, color, f"{task.name} (regression, first dim)", "value")
        elif kind == "task":
            _task_panel(ax, task, {s: ds.label_counts(s, task.name) for s in splits},
                        {s: len(data[s]["key"]) for s in splits}, color)
        elif kind == "audio":
            _hist(ax, {s: data[s]["audio_seconds"] for s in splits}, color, "audio seconds", "seconds")
        elif kind == "text":
            _hist(ax, {s: data[s]["text_chars"] for s in splits}, color, "text length", "characters")
        else:
            _sizes_panel(ax, {s: list(zip(data[s]["image_width"], data[s]["image_height"])) for s in splits}, color)
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)
    total = sum(len(data[s]["key"]) for s in splits)
    name = ds.root.rstrip("/").rsplit("/", 1)[-1]
    fig.suptitle(f"{name}: {total} samples in " + ", ".join(f"{s} {len(data[s]['key'])}" for s in splits),
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def _task_panel(ax, task, label_counts: dict[str, dict[str, int]], samples: dict[str, int],
                color: dict[str, str]) -> None:
    """Bars of each class's share of each split's ``samples``, from the card's ``label_counts`` per split."""
    names = [*task.classes, "missing"]
    counts = {s: np.array([c[k] for k in names], dtype=np.int64) for s, c in label_counts.items()}  # (C+1,)
    keep = np.arange(len(names))
    if not any(c[-1] for c in counts.values()):
        keep = keep[:-1]  # no missing labels anywhere: no empty bar
    if len(keep) > MAX_CLASSES_SHOWN:
        total = sum(counts.values())
        keep = np.sort(np.argsort(-total[keep], kind="stable")[:MAX_CLASSES_SHOWN])
    # percent of each split's samples, so small val/test splits compare with train at a glance
    width = 0.8 / max(1, len(counts))
    x = np.arange(len(keep))
    for j, (s, c) in enumerate(counts.items()):
        n = max(1, samples[s])
        ax.bar(x + (j - (len(counts) - 1) / 2) * width, 100.0 * c[keep] / n, width, label=f"{s} (n={n})",
               color=color[s])
    _xticks(ax, x, [names[i] for i in keep])
    ax.margins(y=0.25)  # headroom for the legend
    shown = "" if len(keep) >= len(names) - 1 else f", top {len(keep)} of {len(task.classes)}"
    ax.set_title(f"{task.name} ({task.type}{shown})", fontsize=10)
    ax.set_ylabel("% of split")
    ax.legend(fontsize=7, frameon=False)


def _xticks(ax, x, labels: list[str]) -> None:
    """Category labels, slanted only when they would overlap."""
    slant = sum(len(t) + 2 for t in labels) > 60
    ax.set_xticks(x, labels, rotation=40 if slant else 0, ha="right" if slant else "center", fontsize=8)


def _hist(ax, values: dict[str, list], color: dict[str, str], title: str, xlabel: str) -> None:
    vals = {s: np.asarray([v for v in vs if v is not None], dtype=np.float64) for s, vs in values.items()}
    every = np.concatenate([v for v in vals.values()] or [np.zeros(0)])
    if every.size == 0:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="0.5")
    else:
        lo, hi = float(every.min()), float(every.max())
        if np.all(every == np.round(every)) and hi - lo <= 60:  # small integers: one bin per value
            bins = np.arange(lo - 0.5, hi + 1.5)
            ax.set_xticks(np.arange(lo, hi + 1, max(1, int(np.ceil((hi - lo + 1) / 10)))))
        else:
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        for s, v in vals.items():
            if v.size:
                ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.45, color=color[s],
                        label=f"{s} (median {np.median(v):.3g})", edgecolor=color[s])
        ax.margins(y=0.2)
        ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")


def _sizes_panel(ax, sizes: dict[str, list], color: dict[str, str]) -> None:
    from collections import Counter

    per_split = {s: Counter(f"{w}x{h}" for w, h in v if w is not None and h is not None) for s, v in sizes.items()}
    total = sum(per_split.values(), Counter())
    names = [k for k, _ in total.most_common(TOP_IMAGE_SIZES)]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(per_split))
    for j, (s, c) in enumerate(per_split.items()):
        ax.bar(x + (j - (len(per_split) - 1) / 2) * width, [c[k] for k in names], width, color=color[s],
               label=f"{s} ({sum(c.values())})")
    _xticks(ax, x, names)
    ax.margins(y=0.25)
    rest = len(total) - len(names)
    ax.set_title("image sizes (W x H)" + (f", {len(names)} most common of {len(total)}" if rest else ""),
                 fontsize=10)
    ax.set_ylabel("samples")
    ax.legend(fontsize=7, frameon=False)


# ---- CLI ---------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")
    p.add_argument("-o", "--output", default="stats.png", help="PNG to write (default stats.png)")
    p.add_argument("--columns", type=int, default=3, help="panels per row (default 3)")
    p.add_argument("--dpi", type=int, default=110)
    add_storage_options(p)


def run(args) -> int:
    from .dataset import open_dataset

    fig = stats_figure(open_dataset(args.dataset, storage_options=args.storage_options), columns=args.columns)
    fig.savefig(args.output, dpi=args.dpi)
    if not args.quiet:
        print(f"wrote {args.output}: {len(fig.axes)} panels")
    return 0
