"""Streaming per-task metrics that honour ``label_mask``, and Δm for checkpoint selection.

Classification: accuracy and macro-F1 (over classes seen in targets or predictions, as sklearn's
default). Regression: MAE and RMSE in original units (pass ``model.denormalize(outputs)``).
Multilabel: mAP (sklearn's average precision per class with at least one positive, then the mean).
Accumulators are tensors on the outputs' device (no host sync per batch); ``sync`` sums them over
``torch.distributed`` ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mmdata.batch import Batch
from mmdata.errors import ConfigError
from mmdata.tasks import Task

HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "map": True, "mae": False, "rmse": False}


def metric_direction(name: str) -> int:
    """+1 if a larger value of metric ``name`` is better, -1 if smaller is better."""
    if name not in HIGHER_IS_BETTER:
        raise ConfigError(f"unknown metric {name!r}; known metrics are {sorted(HIGHER_IS_BETTER)}")
    return 1 if HIGHER_IS_BETTER[name] else -1


class ClassificationMeter:
    """Confusion matrix (C, C) [target, prediction] -> accuracy, macro-F1."""

    def __init__(self, num_classes: int):
        self.C = num_classes
        self.confusion: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        if self.confusion is None:
            self.confusion = torch.zeros(self.C * self.C, dtype=torch.long, device=logits.device)
        pred = logits.argmax(-1)  # (B,)
        target = target.argmax(-1) if target.dim() == 2 else target.long()  # soft targets -> argmax
        target = torch.where(mask, target, torch.zeros_like(target)).clamp(0, self.C - 1)
        self.confusion.index_add_(0, target * self.C + pred, mask.long())

    def compute(self) -> dict[str, float]:
        if self.confusion is None or int(self.confusion.sum()) == 0:
            return {"accuracy": math.nan, "macro_f1": math.nan}
        cm = self.confusion.view(self.C, self.C).double().cpu()
        tp = cm.diag()
        support, predicted = cm.sum(1), cm.sum(0)
        seen = (support + predicted) > 0
        f1 = 2 * tp / (support + predicted).clamp_min(1)
        return {"accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(f1[seen].mean())}

    def state(self) -> list[torch.Tensor]:
        return [] if self.confusion is None else [self.confusion]


class RegressionMeter:
    """Sums of |error| and error^2 over labelled (sample, dimension) pairs -> MAE, RMSE."""

    def __init__(self):
        self.sums: torch.Tensor | None = None  # (3,): abs, squared, count

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        pred = pred.double().reshape(pred.shape[0], -1)  # (B, D)
        target = target.double().reshape(pred.shape)
        if self.sums is None:
            self.sums = torch.zeros(3, dtype=torch.float64, device=pred.device)
        keep = mask[:, None].expand_as(pred)
        err = torch.where(keep, pred - target, torch.zeros((), dtype=pred.dtype, device=pred.device))
        self.sums += torch.stack([err.abs().sum(), err.square().sum(), keep.sum().double()])

    def compute(self) -> dict[str, float]:
        if self.sums is None or float(self.sums[2]) == 0:
            return {"mae": math.nan, "rmse": math.nan}
        a, s, n = self.sums.tolist()
        return {"mae": a / n, "rmse": math.sqrt(s / n)}

    def state(self) -> list[torch.Tensor]:
        return [] if self.sums is None else [self.sums]


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Average precision of scores (N,) for 0/1 targets (N,): sum over thresholds of (R_k - R_k-1) P_k."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order].double(), target[order].double()
    n_pos = y.sum()
    if n_pos == 0:
        return math.nan
    tps = torch.cumsum(y, 0)
    last = torch.ones_like(s, dtype=torch.bool)  # last index of each run of tied scores
    last[:-1] = s[1:] != s[:-1]
    tps = tps[last]
    precision = tps / (torch.nonzero(last).squeeze(1) + 1).double()
    recall = tps / n_pos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - prev) * precision).sum())


class MultilabelMeter:
    """Keeps labelled scores and targets -> mAP over classes with at least one positive."""

    def __init__(self):
        self.scores: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        self.scores.append(logits.detach().float()[mask])
        self.targets.append(target.detach().float()[mask])

    def compute(self) -> dict[str, float]:
        if not self.scores:
            return {"map": math.nan}
        scores, targets = torch.cat(self.scores).cpu(), torch.cat(self.targets).cpu()
        aps = [average_precision(scores[:, c], targets[:, c] > 0.5) for c in range(scores.shape[1])]
        aps = [a for a in aps if not math.isnan(a)]
        return {"map": sum(aps) / len(aps) if aps else math.nan}

    def state(self) -> list[torch.Tensor]:
        return []


class MetricSet:
    """One meter per task; ``update(outputs, batch)`` with outputs in original units, ``compute()``."""

    def __init__(self, tasks: Iterable[Task]):
        self.tasks = list(tasks)
        self.reset()

    def reset(self) -> None:
        self.meters = {}
        for t in self.tasks:
            if t.type == "classification":
                self.meters[t.name] = ClassificationMeter(len(t.classes))
            elif t.type == "multilabel":
                self.meters[t.name] = MultilabelMeter()
            else:
                self.meters[t.name] = RegressionMeter()

    @torch.no_grad()
    def update(self, outputs: dict[str, torch.Tensor], batch: Batch) -> None:
        for name, meter in self.meters.items():
            if name not in outputs or name not in batch.labels:
                continue
            out = outputs[name].detach()
            mask = batch.label_mask.get(name)
            mask = torch.ones(out.shape[0], dtype=torch.bool, device=out.device) if mask is None else mask.bool()
            meter.update(out, batch.labels[name].to(out.device), mask.to(out.device))

    def compute(self) -> dict[str, dict[str, float]]:
        """{task: {metric: float}}; NaN where a task had no labelled sample."""
        return {name: meter.compute() for name, meter in self.meters.items()}

    def sync(self, group=None) -> None:
        """Sum the accumulators over the ranks of ``torch.distributed`` (a no-op when not initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for meter in self.meters.values():
            for tensor in meter.state():
                dist.all_reduce(tensor, group=group)
            if isinstance(meter, MultilabelMeter):
                meter.scores = [_gather_rows(torch.cat(meter.scores), group)] if meter.scores else []
                meter.targets = [_gather_rows(torch.cat(meter.targets), group)] if meter.targets else []


def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate (N_r, C) tensors of every rank (N_r may differ)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def flatten(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"task/metric": value}, e.g. for a metrics.csv row."""
    return {f"{task}/{name}": v for task, ms in metrics.items() for name, v in ms.items()}


def delta_m(metrics: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]]) -> float:
    """Δm in percent: mean over tasks of the mean relative gain over ``baseline`` of each metric.

    Sign-aware: a higher accuracy and a lower MAE are both gains. Positive = better. Metrics that are
    NaN on either side, or 0 in the baseline, are skipped; tasks missing from either side too.
    """
    per_task = []
    for task, base in baseline.items():
        rels = []
        for name, b in base.items():
            m = metrics.get(task, {}).get(name)
            if m is None or not (math.isfinite(m) and math.isfinite(b)) or b == 0:
                continue
            rels.append(metric_direction(name) * (m - b) / abs(b))
        if rels:
            per_task.append(sum(rels) / len(rels))
    if not per_task:
        raise ConfigError("Δm has no metric to compare: the run and the baseline share no finite task metric")
    return 100.0 * sum(per_task) / len(per_task)


def selection_score(metrics: dict[str, dict[str, float]], select: str = "delta_m",
                    baseline: dict[str, dict[str, float]] | None = None) -> float:
    """A higher-is-better score for checkpoint selection: Δm against ``baseline``, or "task/metric"."""
    if select == "delta_m":
        if baseline is None:
            raise ConfigError("selecting by delta_m needs baseline metrics (single-task runs or the "
                              "first evaluation); or select a named metric like 'digit/accuracy'")
        return delta_m(metrics, baseline)
    task, _, name = select.partition("/")
    if task not in metrics or name not in metrics[task]:
        raise ConfigError(f"cannot select by {select!r}; available: delta_m, {sorted(flatten(metrics))}")
    return metric_direction(name) * metrics[task][name]


def check_select(select: str, tasks: Iterable[Task]) -> None:
    """Fail before training, not after the first epoch, when ``select`` names no metric of ``tasks``."""
    if select == "delta_m":
        return
    names = [t.name for t in tasks]
    task, _, metric = select.partition("/")
    if task not in names or metric not in HIGHER_IS_BETTER:
        raise ConfigError(f"select={select!r} names no metric; use 'delta_m' or '<task>/<metric>' with a task in "
                          f"{names} and a metric in {sorted(HIGHER_IS_BETTER)}")
