"""`mtml train`'s loop: train a multi-task fusion model end to end on a dataset's stream, or a mixture's.

One process, or DDP under ``torchrun`` (ranks come from the process group). Each epoch: train with
GPU augmentation, evaluate on the validation split (a mixture's: pooled, and per source), append a
row to ``metrics.csv``, save ``last/``
(model + optimizer, resumable) and ``best/`` (by validation Δm or a named metric), redraw
``curves.png``. Without a validation split the run follows a fixed schedule and ``best`` is the last
epoch. Everything a run is made of comes from ``session.py``; this file is the loop.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mmdata.prefetch import DevicePrefetcher

from . import sources
from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .config import TrainConfig
from .evaluate import Evaluation, evaluate_loader
from .history import History, headline
from .losses import step_losses
from .metrics import check_select
from .session import (
    Session,
    join_process_group,
    make_loaders,
    make_optimizer,
    make_task_weighting,
    open_session,
    pick_device,
    set_target_stats,
)
from .sources import DataSpec
from .weighting import Weighting

log = logging.getLogger(__name__)


@dataclass
class Optimisation:
    """What one training step uses besides the batch."""

    model: torch.nn.Module  # the model as stepped: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    weighting: Weighting
    shared: list[torch.nn.Parameter]  # what GradNorm / PCGrad read
    clip_groups: list[list[torch.nn.Parameter]]  # each clipped to optim.grad_clip on its own


def train(cfg: TrainConfig, data: DataSpec, out: str | Path, *, resume: bool = False,
          device: str | None = None, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train and return the best epoch's record (epoch, validation metrics).

    ``data``: a dataset's path or URL, or {source name: path} for a mixture (``cfg.data.weights``).

    ``stop_after`` ends this invocation after that many epochs (a time-boxed or preemptible job);
    ``resume=True`` later continues the same schedule from ``out/last``.
    """
    dev = pick_device(device)
    rank, world = join_process_group(dev)
    out = Path(out)
    torch.manual_seed(cfg.seed)  # model initialisation is the same on every rank
    session = open_session(cfg, data, dev)
    cfg, model = session.cfg, session.model  # the config resolved against the dataset, as saved
    set_target_stats(session)
    train_loader, val_loader = make_loaders(session, rank, world)
    check_select(cfg.select, session.tasks)
    weighting, shared = make_task_weighting(session)
    optimizer, scheduler = make_optimizer(session, weighting, len(train_loader))

    start, history = 0, History(cfg.select)
    if resume:
        start, history = _resume(out, session, optimizer, scheduler, weighting)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    stepped = torch.compile(model) if cfg.optim.compile else model
    if world > 1:
        stepped = torch.nn.parallel.DistributedDataParallel(
            stepped, device_ids=[dev.index] if dev.type == "cuda" else None)
    # Branches that learn apart (fused_loss 0) are clipped apart, as each would be if trained alone.
    clip_groups = [] if cfg.optim.grad_clip <= 0 else (
        model.branch_parameters() if cfg.fused_loss == 0 else [list(model.parameters())])
    opt = Optimisation(stepped, optimizer, scheduler, weighting, shared, clip_groups)
    meta_base = {"config": cfg.to_dict(), "card_digest": sources.digest(session.dataset),
                 "data": data if isinstance(data, dict) else str(data),
                 "tasks": [t.to_dict() for t in session.tasks]}

    end = cfg.optim.epochs if stop_after is None else min(cfg.optim.epochs, start + stop_after)
    for epoch in range(start, end):  # 0-based here (loader, seeds); every record and message says epoch + 1
        train_loader.set_epoch(epoch)
        losses, samples_per_s = train_epoch(session, opt, train_loader, epoch, rank, world, progress)
        weighting.end_epoch({k: v for k, v in losses.items() if k != "loss"})
        ev = evaluate_loader(session, val_loader) if val_loader is not None else Evaluation({})
        metrics = ev.tasks
        row = {"epoch": epoch + 1, "samples_per_s": samples_per_s, "lr": scheduler.get_last_lr()[0],
               **{f"train_{k}": v for k, v in losses.items()}}
        improved = history.add(row, metrics, by_source=ev.sources)
        if rank == 0:
            history.write(out)
            meta = {**meta_base, "epoch": epoch + 1, "step": (epoch + 1) * len(train_loader), **history.state(),
                    "metrics": metrics}
            if improved:
                save_checkpoint(out / "best", model, meta)
            save_checkpoint(out / "last", model, meta, optimizer,
                            extra_tensors={f"weighting.{k}": v for k, v in weighting.state_dict().items()})
            log.info("epoch %d: loss %.4f, %.0f samples/s%s", epoch + 1, losses.get("loss", float("nan")),
                     samples_per_s, headline(metrics))
        if world > 1:
            dist.barrier()

    for loader in (train_loader, val_loader):
        if loader is not None:
            loader.close()
    return history.best or read_meta(out / "last")["best"]


def train_epoch(session: Session, opt: Optimisation, loader, epoch: int, rank: int, world: int,
                progress: bool) -> tuple[dict[str, float], float]:
    """One epoch of training: ({loss name: mean over the epoch and ranks}, samples/s over all ranks)."""
    cfg, model, aug, dev = session.cfg, session.model, session.augment, session.device
    dropout_seed, augment_seed = epoch_seeds(cfg.seed, epoch, rank)
    torch.manual_seed(dropout_seed)  # dropout: reproducible on resume
    gen = torch.Generator(dev).manual_seed(augment_seed)
    model.train()
    aug.train()
    sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(DevicePrefetcher(loader, dev), total=len(loader), disable=not progress or rank > 0,
               desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", leave=False)
    for step, batch in enumerate(bar):
        batch = aug(batch, generator=gen)
        with session.autocast():
            outputs = opt.model(batch, parts=True) if cfg.aux_loss else opt.model(batch)
        losses = step_losses(outputs, batch, session.tasks, model.target_stats, fused=cfg.fused_loss,
                             aux=cfg.aux_loss)
        opt.optimizer.zero_grad(set_to_none=True)
        loss = opt.weighting.backward(losses, opt.shared)
        for group in opt.clip_groups:
            torch.nn.utils.clip_grad_norm_(group, cfg.optim.grad_clip)
        opt.optimizer.step()
        opt.scheduler.step()
        seen += len(batch)
        for name, value in [*losses.items(), ("loss", loss)]:
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        if not bar.disable and step % 20 == 0:  # a host sync, so not every step
            bar.set_postfix(loss=f"{float(loss):.3f}", samples_s=f"{seen * world / (time.perf_counter() - t0):.0f}")
    elapsed = time.perf_counter() - t0
    names = sorted(sums)
    mean = torch.stack([sums[k] for k in names]) / len(loader)  # (K,)
    if world > 1:
        dist.all_reduce(mean)
        mean /= world
    return dict(zip(names, mean.tolist())), seen * world / elapsed


def epoch_seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """Independent (dropout, augmentation) seeds for one (seed, epoch, rank)."""
    a, b = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1


def _resume(out: Path, session: Session, optimizer, scheduler, weighting: Weighting) -> tuple[int, History]:
    """Load ``out/last`` into the model, optimizer, schedule and weighting; (epochs done, history)."""
    meta, extra = load_checkpoint(out / "last", session.model, optimizer)
    weighting.load_state_dict({k[len("weighting."):]: v for k, v in extra.items() if k.startswith("weighting.")})
    scheduler.last_epoch = meta["step"]  # the lr itself came back with the optimizer's param groups
    if meta["card_digest"] != sources.digest(session.dataset):
        log.warning("resuming on a dataset whose card differs from the one the run started on")
    log.info("resuming %s after epoch %d", out, meta["epoch"])  # epochs count from 1 wherever shown
    return meta["epoch"], History.from_meta(session.cfg.select, meta)
