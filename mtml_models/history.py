"""A run's history: one row per epoch (metrics.csv, curves.png), the Δm baseline and the best epoch.

Epochs count from 1 here, as in every file and message a user reads.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from .curves import draw_curves
from .metrics import selection_score

log = logging.getLogger(__name__)


class History:
    """Rows of finished epochs; ``best`` by the selection score, Δm against ``baseline``."""

    def __init__(self, select: str, rows: list[dict[str, Any]] | None = None, best: dict[str, Any] | None = None,
                 baseline: dict[str, dict[str, float]] | None = None):
        self.select, self.rows, self.best, self.baseline = select, list(rows or []), best, baseline

    @classmethod
    def from_meta(cls, select: str, meta: dict[str, Any]) -> History:
        """The history a checkpoint's meta holds (see ``state``)."""
        return cls(select, meta["history"], meta["best"], meta["baseline"])

    def state(self) -> dict[str, Any]:
        """What a checkpoint's meta keeps of the history (JSON)."""
        return {"history": self.rows, "best": self.best, "baseline": self.baseline}

    @property
    def epochs(self) -> int:
        """Epochs finished."""
        return len(self.rows)

    def add(self, row: dict[str, Any], metrics: dict[str, dict[str, float]],
            by_source: dict[str, dict[str, dict[str, float]]] | None = None) -> bool:
        """Append an epoch's ``row`` (it holds ``epoch``), scored from its validation ``metrics``; True if best.

        Without metrics the score is the epoch itself: a fixed schedule, whose best is the last epoch.
        ``by_source``: a mixture's validation metrics per source, kept as ``SOURCE/val_TASK_METRIC``
        columns after the pooled ``val_TASK_METRIC`` ones; the score reads the pooled metrics only.
        """
        if not self.baseline and _comparable(metrics):
            self.baseline = metrics  # Δm is measured against the first evaluation that has a usable metric
        epoch = row["epoch"]
        score = selection_score(metrics, self.select, self.baseline) if metrics and self.baseline else float(epoch)
        self.rows.append({**row, **{f"val_{t}_{m}": v for t, ms in metrics.items() for m, v in ms.items()},
                          **{f"{s}/val_{t}_{m}": v for s, tasks in (by_source or {}).items()
                             for t, ms in tasks.items() for m, v in ms.items()},
                          "score": score})
        improved = self.best is None or score >= self.best["score"]
        if improved:
            self.best = {"epoch": epoch, "score": score, "metrics": metrics}
        return improved

    def write(self, out: Path) -> None:
        """Rewrite ``out/metrics.csv`` (atomically) and redraw ``out/curves.png``."""
        names = list(dict.fromkeys(k for row in self.rows for k in row))
        path = out / "metrics.csv"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(path)
        try:
            draw_curves(self.rows, out / "curves.png")
        except Exception as e:  # noqa: BLE001 - a plot must never stop training
            log.warning("could not draw curves.png: %s", e)


def headline(metrics: dict[str, dict[str, float]]) -> str:
    """', digit accuracy 0.950, parity accuracy 0.990': each task's first metric, for the log."""
    return "".join(f", {task} {next(iter(ms))} {ms[next(iter(ms))]:.3f}" for task, ms in metrics.items())


def _comparable(metrics: dict[str, dict[str, float]]) -> bool:
    return any(math.isfinite(v) and v != 0 for ms in metrics.values() for v in ms.values())
