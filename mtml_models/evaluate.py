"""Evaluation: per-task metrics of a model over a split, pooled and per source of a mixture (`mtml eval`).

A run evaluates on any data that shares a task with its model: tasks the model lacks are not loaded,
tasks the data lacks are reported absent, and a class the data stores in another order is mapped to
the model's. A modality of the model that the data lacks is left out of the batches, as if dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmdata import Mixture
from mmdata.augment import MixConfig, ModalityDropout
from mmdata.batch import MODALITIES, Batch
from mmdata.errors import ConfigError, SchemaError
from mmdata.prefetch import DevicePrefetcher
from mmdata.tasks import Task, TaskList

from . import sources
from .checkpoint import load_checkpoint, read_meta
from .config import TrainConfig
from .metrics import MetricSet
from .session import Session, build_session, eval_loader, pick_device, resolve
from .sources import DataSpec

log = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]  # {task: {metric: value}}


@dataclass
class Evaluation:
    """Metrics over a split: ``tasks`` pooled over every sample; ``sources``, a mixture's, per source.

    A source's metrics cover only the tasks it has (a task it lacks would be NaN: no labelled sample).
    """

    tasks: Metrics
    sources: dict[str, Metrics] = field(default_factory=dict)


def evaluate_loader(session: Session, loader, drop_modality: str | None = None,
                    relabel: dict[str, torch.Tensor] | None = None) -> Evaluation:
    """Per-task metrics of the model over a loader (the whole split in this process), in eval mode.

    ``relabel``: {task: (C_data,) model class of each of the data's classes, -1 for one it lacks}
    (``match_tasks``); such a sample counts as unlabelled for that task.
    """
    model, aug = session.model, session.augment
    model.eval()
    aug.eval()
    meters = MetricSet(session.tasks)
    per_source = _source_meters(session, loader)
    with torch.no_grad():
        for batch in DevicePrefetcher(loader, session.device, transform=aug):  # augmented in float32
            if drop_modality:
                batch = drop(batch, drop_modality)
            if relabel:
                batch = apply_relabel(batch, relabel)
            with session.autocast():  # only the model, as in training
                outputs = model.denormalize(model(batch))
            outputs = {k: v.float() for k, v in outputs.items()}
            meters.update(outputs, batch)
            for i, source_meters in per_source.items():
                source_meters.update(outputs, of_source(batch, i))
    names = loader.sources
    return Evaluation(meters.compute(), {names[i]: m.compute() for i, m in per_source.items()})


def _source_meters(session: Session, loader) -> dict[int, MetricSet]:
    """{source index: meters of the model's tasks that source has}, for each source the loader's split reads."""
    data = loader.dataset
    if not isinstance(data, Mixture):
        return {}
    return {i: MetricSet([t for t in session.tasks if t.name in data.datasets[i].tasks.names])
            for i in data.drawn(loader.split)}


def of_source(batch: Batch, source: int) -> Batch:
    """The batch with every label masked out but those of the samples from ``source``."""
    mine = batch.source == source  # (B,)
    masks = {t: mine if batch.label_mask.get(t) is None else batch.label_mask[t].bool() & mine for t in batch.labels}
    return replace(batch, label_mask=masks)


def drop(batch: Batch, modality: str) -> Batch:
    """The batch with ``modality`` forced absent for every sample (mask False, input cleared)."""
    mask = batch.mask(modality)
    if mask is None:
        return batch
    rows = torch.zeros(len(batch), len(MODALITIES), dtype=torch.bool, device=mask.device)
    rows[:, MODALITIES.index(modality)] = True
    return ModalityDropout(MixConfig()).apply(batch, {"drop": rows})


def match_tasks(model: TaskList, data: TaskList, where: str) -> tuple[list[str], list[str], dict[str, torch.Tensor]]:
    """(tasks both have, model tasks the data lacks, {task: relabel table} where the class lists differ).

    A shared task must have the same type (and dims): SchemaError naming both otherwise. A relabel
    table maps each of the data's classes to the model's index of that class, -1 for one the model
    has never seen (a classification sample of it is left out of that task's metrics, with a
    warning); a multilabel task's table is the (C_data, C_model) 0/1 matrix of the same map.
    """
    shared, absent, relabel = [], [], {}
    for mine in model:
        if mine.name not in data.names:
            absent.append(mine.name)
            continue
        theirs = data[mine.name]
        if (mine.type, mine.dims) != (theirs.type, theirs.dims):
            raise SchemaError(f"task {mine.name!r} is {_kind(mine)} in the model but {_kind(theirs)} in {where}; "
                              "evaluate on data whose task of that name is the same kind")
        shared.append(mine.name)
        if mine.type != "regression" and theirs.classes != mine.classes:
            unseen = [c for c in theirs.classes if c not in mine.classes]
            if unseen:
                log.warning("task %r: classes %s of %s are not among the model's %s; their samples are left out "
                            "of its metrics", mine.name, unseen, where, list(mine.classes))
            table = torch.tensor([mine.classes.index(c) if c in mine.classes else -1 for c in theirs.classes])
            if mine.type == "multilabel":  # (C_data, C_model) 0/1: a multi-hot row times it is the model's row
                table = torch.nn.functional.one_hot(table + 1, len(mine.classes) + 1)[:, 1:].float()
            relabel[mine.name] = table
    return shared, absent, relabel


def _kind(task: Task) -> str:
    return f"regression with {task.dims} dims" if task.type == "regression" else task.type


def apply_relabel(batch: Batch, relabel: dict[str, torch.Tensor]) -> Batch:
    """The batch with ``relabel``'s tasks in the model's class order (see ``match_tasks``)."""
    labels, masks = dict(batch.labels), dict(batch.label_mask)
    for task, table in relabel.items():
        if task not in labels:
            continue
        y = labels[task]
        table = table.to(y.device)
        if table.dim() == 1:  # classification: class indices (B,)
            mapped = table[y.long().clamp(0, len(table) - 1)]  # unlabelled rows hold anything: clamp first
            masks[task] = masks[task].bool() & (mapped >= 0)
            labels[task] = mapped.clamp_min(0)
        else:  # multilabel 0/1 (B, C_data) @ (C_data, C_model); a class the model lacks is dropped
            labels[task] = y.float() @ table
    return replace(batch, labels=labels, label_mask=masks)


def evaluate_run(run: str | Path, data: DataSpec, split: str = "test", *, drop_modality: str | None = None,
                 checkpoint: str = "best", device: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Load ``RUN/<checkpoint>`` and evaluate it on ``split`` of ``data`` (a path, or {source name: path}).

    Returns ``{"tasks": {task: {metric: value}}, "split", "samples", "epoch", "checkpoint", "dropped",
    "absent_tasks", "absent_modalities", "unpredicted_tasks"}`` (tasks no modality left predicts: not
    scored), and ``"sources": {source: {task: {metric: value}}}`` when ``data`` is several datasets.
    """
    run = Path(run)
    meta = read_meta(run / checkpoint)
    cfg = TrainConfig.from_dict(meta["config"], source=f"{run / checkpoint}/meta.json")
    if drop_modality and drop_modality not in cfg.model.modalities:
        raise ConfigError(f"--drop-modality {drop_modality!r}: the model uses {list(cfg.model.modalities)}")
    where = repr(sources.describe(data))
    ds = sources.open_data(data, replace(cfg.data, weights=None, samples_per_epoch=None))
    tasks = TaskList(tuple(Task.from_dict(t) for t in meta["tasks"]))
    shared, absent_tasks, relabel = match_tasks(tasks, ds.tasks, where)
    if not shared:
        raise SchemaError(f"{where} shares no task with the run, which predicts {tasks.names} (it has "
                          f"{ds.tasks.names}); evaluate on data labelled with at least one of them")
    absent_modalities = [m for m in cfg.model.modalities if m not in ds.modalities]
    if len(absent_modalities) == len(cfg.model.modalities):
        raise SchemaError(f"{where} has none of the model's modalities {list(cfg.model.modalities)} (it has "
                          f"{ds.modalities})")
    session = build_session(resolve(cfg, ds), ds, tasks, pick_device(device))
    if meta.get("card_digest") != sources.digest(ds):
        log.warning("%s differs from the data the run was trained on (%s)", where, meta.get("data"))
    load_checkpoint(run / checkpoint, session.model)
    loader = eval_loader(session, split, batch_size)
    ev = evaluate_loader(session, loader, drop_modality=drop_modality, relabel=relabel)
    used = [m for m in cfg.model.modalities if m not in absent_modalities and m != drop_modality]
    unpredicted = [t for t in shared if not predicted(cfg.model.fusion.branch_tasks, used, t)]
    result = {"tasks": {t: ev.tasks[t] for t in shared if t not in unpredicted}, "split": split,
              "samples": sources.every_sample(ds).num_samples(split), "epoch": meta["epoch"],
              "checkpoint": checkpoint, "dropped": drop_modality, "absent_tasks": absent_tasks,
              "absent_modalities": absent_modalities, "unpredicted_tasks": unpredicted}
    if ev.sources:
        result["sources"] = {s: {t: m for t, m in ts.items() if t not in unpredicted} for s, ts in ev.sources.items()}
    return result


def predicted(branch_tasks: dict[str, tuple[str, ...]] | None, modalities: list[str], task: str) -> bool:
    """Whether a modality left predicts ``task`` (with branch tasks a late-fusion branch predicts only its own):
    a task none predicts would be scored on all-zero logits, so it is reported, not scored."""
    return branch_tasks is None or any(task in branch_tasks.get(m, (task,)) for m in modalities)
