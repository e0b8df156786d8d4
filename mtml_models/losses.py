"""Per-task losses masked by ``label_mask``: a sample without a task's label adds nothing to it.

Each task's loss is the mean over its labelled samples. A batch where no sample has the task's
label gives an exact 0 that is still attached to the graph (so ``backward`` works and the head's
gradient is zero), never NaN. Unlabelled rows may hold anything (-1, NaN): they are replaced before
the loss, with ``torch.where``, so they cannot poison the gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.nn.functional as F

from mmdata.batch import Batch
from mmdata.errors import ConfigError
from mmdata.tasks import Task

REGRESSION_LOSSES = ("mse", "l1")


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per_sample (B,) over mask (B,); 0 attached to the graph when the mask is all False."""
    kept = torch.where(mask, per_sample, torch.zeros((), dtype=per_sample.dtype, device=per_sample.device))
    return kept.sum() / mask.sum().clamp_min(1).to(per_sample.dtype)


def classification_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of logits (B, C) against class indices (B,) or soft targets (B, C), masked."""
    logits = logits.float()
    if target.dim() == 1:
        target = torch.where(mask, target.long(), torch.zeros_like(target, dtype=torch.long))  # (B,)
    else:
        target = torch.where(mask[:, None], target.float(), torch.zeros((), device=target.device))  # (B, C)
    per_sample = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    return _masked_mean(per_sample, mask)


def multilabel_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits (B, C) against 0/1 targets (B, C), mean over classes, masked."""
    target = torch.where(mask[:, None], target.float(), torch.zeros((), device=target.device))
    per_sample = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(1)
    return _masked_mean(per_sample, mask)


def regression_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                    kind: str = "mse") -> torch.Tensor:
    """MSE or L1 between standardised predictions (B, D) and targets (B, D) standardised by mean/std."""
    target = target.float().reshape(pred.shape[0], -1)  # (B, D); a (B,) target is one dimension
    if mean is not None:
        target = (target - mean) / std
    target = torch.where(mask[:, None], target, torch.zeros((), device=target.device))
    err = pred.float() - target
    if kind == "mse":
        per_sample = err.square().mean(1)
    elif kind == "l1":
        per_sample = err.abs().mean(1)
    else:
        raise ConfigError(f"regression loss must be one of {REGRESSION_LOSSES}, got {kind!r}")
    return _masked_mean(per_sample, mask)


def task_losses(outputs: dict[str, torch.Tensor], batch: Batch, tasks: Iterable[Task],
                target_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                regression: str = "mse", label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """{task: scalar loss} for every task that has outputs and labels in the batch.

    ``target_stats`` is ``model.target_stats`` ({regression task: (mean, std)}); without it,
    regression targets are taken as already standardised. A task whose labels the batch lacks is
    left out (a label with no mask counts as present in every sample).
    """
    if regression not in REGRESSION_LOSSES:
        raise ConfigError(f"regression loss must be one of {REGRESSION_LOSSES}, got {regression!r}")
    stats = target_stats or {}
    losses = {}
    for task in tasks:
        name = task.name
        if name not in outputs or name not in batch.labels:
            continue
        out, target = outputs[name], batch.labels[name]
        mask = batch.label_mask.get(name)
        mask = torch.ones(out.shape[0], dtype=torch.bool, device=out.device) if mask is None else mask.bool()
        if task.type == "classification":
            losses[name] = classification_loss(out, target, mask, label_smoothing)
        elif task.type == "multilabel":
            losses[name] = multilabel_loss(out, target, mask)
        else:
            mean, std = stats.get(name, (None, None))
            losses[name] = regression_loss(out, target, mask, mean, std, kind=regression)
    return losses


def step_losses(outputs, batch: Batch, tasks: Iterable[Task], target_stats, *, fused: float = 1.0,
                aux: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-task training losses: ``fused`` x the model output's + ``aux`` x each modality's own.

    ``outputs`` is what the model returned: ``{task: output}``, or with ``aux`` the pair
    (outputs, parts) of ``model(batch, parts=True)``. ``fused=0`` trains late fusion's branches
    independently: each modality learns only from its own loss, an ensemble in one model.
    """
    parts = None
    if aux:
        outputs, parts = outputs
    if fused == 0:  # not even computed: nothing from the fused output reaches a gradient
        zero = next(iter(outputs.values())).new_zeros((), dtype=torch.float32)
        losses = {task.name: zero for task in tasks}
    else:
        losses = task_losses({k: v.float() for k, v in outputs.items()}, batch, tasks, target_stats=target_stats)
        if fused != 1.0:
            losses = {task: fused * value for task, value in losses.items()}
    if parts is not None:
        add_aux_losses(losses, parts, batch, tasks, target_stats, aux)
    return losses


def add_aux_losses(losses: dict[str, torch.Tensor], parts: dict[str, dict[str, torch.Tensor]], batch: Batch,
                   tasks: Iterable[Task], target_stats, weight: float) -> None:
    """Add each modality's own masked task losses, counted only on samples where it is present."""
    for modality, outputs in parts.items():
        present = batch.mask(modality)
        if present is None:
            continue
        alone = replace(batch, label_mask={t: m & present for t, m in batch.label_mask.items()})
        for task, value in task_losses({k: v.float() for k, v in outputs.items()}, alone, tasks,
                                       target_stats=target_stats).items():
            losses[task] = losses[task] + weight * value
