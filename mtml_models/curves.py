"""A PNG of the learning curves: training losses and validation metrics per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw_curves(history: list[dict[str, Any]], path: str | Path) -> int:
    """Draw loss and metric panels from ``metrics.csv`` rows; return the number of panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]  # counted from 1, as in metrics.csv and the log
    losses = sorted({k for row in history for k in row if k.startswith("train_")})
    metrics = sorted({k for row in history for k in row if k.startswith("val_")})
    panels = [("training loss", losses)] + ([("validation", metrics)] if metrics else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            ax.plot(epochs, [row.get(name, float("nan")) for row in history], marker="o", ms=3,
                    label=name.split("_", 1)[1])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(panels)
