"""`mtml train`: train a multi-task fusion model end to end on a dataset's stream.

One process, or DDP under ``torchrun`` (ranks come from the process group). Each epoch: train with
GPU augmentation, evaluate on the validation split, append a row to ``metrics.csv``, save ``last/``
(model + optimizer, resumable) and ``best/`` (by validation Δm or a named metric), redraw
``curves.png``. Without a validation split the run follows a fixed schedule and ``best`` is the last
epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmdata.errors import ConfigError

from .checkpoint import load_checkpoint, read_meta, save_checkpoint
from .config import TrainConfig, load_config

log = logging.getLogger(__name__)


@dataclass
class Session:
    """What a training or evaluation run is made of, built once from (config, dataset, device)."""

    cfg: TrainConfig
    dataset: Any
    tasks: Any
    model: torch.nn.Module
    augment: Any
    device: torch.device
    modalities: tuple[str, ...]
    loader_config: Any


def pick_device(requested: str | None = None) -> torch.device:
    """``requested``, else this process's CUDA device (LOCAL_RANK under torchrun), else CPU."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:  # one GPU per torchrun rank
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def make_session(cfg: TrainConfig, data: str, device: torch.device) -> Session:
    """Open the dataset and build the model and augmentation the config describes."""
    from mmdata import LoaderConfig, open_dataset
    from mmdata.augment import AugmentConfig, Pipeline
    from mmdata.tasks import TaskList

    from .model import ModelConfig, MultiTaskModel

    ds = open_dataset(data, storage_options=cfg.data.storage_options, cache_dir=cfg.data.cache_dir,
                      cache_bytes=int(cfg.data.cache_gb * 2**30))
    tasks = ds.tasks
    if cfg.data.tasks:
        tasks = TaskList(tuple(tasks[name] for name in cfg.data.tasks))
    model_dict = dict(cfg.model)
    modalities = tuple(model_dict.get("modalities") or ModelConfig().modalities)
    missing = [m for m in modalities if m not in ds.card.modalities]
    if missing:
        raise ConfigError(f"model.modalities asks for {missing}, which the dataset at {data!r} does not have "
                          f"(it has {sorted(ds.card.modalities)})")
    if "text" in modalities:
        text = dict(model_dict.get("text") or {})
        text.setdefault("vocab_size", ds.tokenizer().get_vocab_size())
        model_dict["text"] = text
    model = MultiTaskModel(tasks, ModelConfig.from_dict(model_dict))
    sample_rate = ds.card.modalities.get("audio", {}).get("sample_rate")
    augment = Pipeline(AugmentConfig.from_dict(cfg.augment), sample_rate=sample_rate, tasks=tasks)
    loader_config = LoaderConfig(image_size=tuple(cfg.data.image_size), audio_seconds=cfg.data.audio_seconds,
                                 max_text_tokens=cfg.data.max_text_tokens,
                                 decode_images_on=cfg.data.decode_images_on,
                                 persistent_workers=True)  # no worker start-up per epoch
    return Session(cfg, ds, tasks, model.to(device), augment.to(device), device, modalities, loader_config)


def card_digest(ds) -> str:
    return hashlib.sha256(ds.card.to_json().encode()).hexdigest()[:16]


def set_target_stats(session: Session) -> None:
    """Standardise regression targets with the train split's mean and std (from the index)."""
    for task in session.tasks:
        if task.type != "regression":
            continue
        values = [v for v in session.dataset.label_values(session.cfg.data.train_split, task.name) if v is not None]
        if values:
            t = torch.tensor(values, dtype=torch.float32)  # (N, D)
            std = t.std(0, correction=0).clamp_min(1e-6)  # one labelled value: std 0, not NaN
            session.model.set_target_stats(task.name, t.mean(0), std)


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to zero, as a multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _distributed(dev: torch.device) -> tuple[int, int]:
    """(rank, world size), joining the process group torchrun describes in the environment."""
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # first: NCCL binds its communicator to the current device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_loader(session: Session, loader, drop_modality: str | None = None) -> dict[str, dict[str, float]]:
    """Per-task metrics of the model over a loader (the whole split in this process), in eval mode."""
    from mmdata.prefetch import DevicePrefetcher

    from .metrics import MetricSet

    model, aug = session.model, session.augment
    model.eval()
    aug.eval()
    meters = MetricSet(session.tasks)
    with torch.no_grad():
        for batch in DevicePrefetcher(loader, session.device, transform=aug):  # augmented in float32
            if drop_modality:
                batch = drop(batch, drop_modality)
            with _autocast(session):  # only the model, as in training
                outputs = model.denormalize(model(batch))
            meters.update({k: v.float() for k, v in outputs.items()}, batch)
    return meters.compute()


def drop(batch, modality: str):
    """The batch with ``modality`` forced absent for every sample (mask False, input cleared)."""
    from mmdata.augment import MixConfig, ModalityDropout
    from mmdata.batch import MODALITIES

    mask = batch.mask(modality)
    if mask is None:
        return batch
    rows = torch.zeros(len(batch), len(MODALITIES), dtype=torch.bool, device=mask.device)
    rows[:, MODALITIES.index(modality)] = True
    return ModalityDropout(MixConfig()).apply(batch, {"drop": rows})


def _autocast(session: Session):
    enabled = session.cfg.optim.amp and session.device.type == "cuda"
    return torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=enabled)


def train(cfg: TrainConfig, data: str, out: str | Path, *, resume: bool = False,
          device: str | None = None, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train and return the best epoch's record (epoch, validation metrics).

    ``stop_after`` ends this invocation after that many epochs (a time-boxed or preemptible job);
    ``resume=True`` later continues the same schedule from ``out/last``.
    """
    from tqdm import tqdm

    from mmdata import make_loader
    from mmdata.prefetch import DevicePrefetcher

    from .metrics import selection_score
    from .weighting import make_weighting

    cfg.validate()  # a config built in code gets the same checks as one read from YAML, before any output
    dev = pick_device(device)
    rank, world = _distributed(dev)
    out = Path(out)
    torch.manual_seed(cfg.seed)  # model initialisation is the same on every rank
    session = make_session(cfg, data, dev)
    set_target_stats(session)
    model, aug, ds = session.model, session.augment, session.dataset
    weighting_opts = dict(cfg.weighting)
    weighting_name = weighting_opts.pop("name", "equal")
    weighting = make_weighting(weighting_name, session.tasks, **weighting_opts).to(dev)
    # GradNorm balances gradients at the last shared layer; PCGrad projects over every shared weight.
    shared = list(model.shared_parameters() if weighting_name == "pcgrad" else model.last_shared_parameters())
    loader_args = dict(modalities=list(session.modalities), tasks=session.tasks.names, rank=rank,
                       world_size=world, num_workers=cfg.data.num_workers, config=session.loader_config)
    train_loader = make_loader(ds, cfg.data.train_split, batch_size=cfg.data.batch_size, shuffle=True,
                               seed=cfg.seed, drop_last=True, **loader_args)
    has_val = bool(cfg.data.val_split) and cfg.data.val_split in ds.splits
    if cfg.data.val_split not in (None, "val") and not has_val:
        raise ConfigError(f"data.val_split {cfg.data.val_split!r} is not in the dataset; it has {ds.splits}")
    _check_select(cfg.select, session.tasks)
    # Every rank evaluates the whole val split: identical metrics, and no rank-padding duplicates.
    val_loader = (make_loader(ds, cfg.data.val_split, batch_size=cfg.data.batch_size, shuffle=False,
                              **{**loader_args, "rank": 0, "world_size": 1}) if has_val else None)
    if len(train_loader) == 0:
        raise ConfigError(f"split {cfg.data.train_split!r} has fewer samples than one batch per rank "
                          f"(batch_size={cfg.data.batch_size}, world size {world}); lower data.batch_size")
    opt = torch.optim.AdamW([*model.parameters(), *weighting.parameters()], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    total = cfg.optim.epochs * len(train_loader)
    warmup = max(1, int(cfg.optim.warmup_epochs * len(train_loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, warmup, total))
    start, history, best, baseline = 0, [], None, None
    if resume:
        meta, extra = load_checkpoint(out / "last", model, opt)
        weighting.load_state_dict({k[len("weighting."):]: v for k, v in extra.items()
                                   if k.startswith("weighting.")})
        sched.last_epoch = meta["step"]  # the lr itself came back with the optimizer's param groups
        start, history, best, baseline = meta["epoch"], meta["history"], meta["best"], meta["baseline"]
        if meta["card_digest"] != card_digest(ds):
            log.warning("resuming on a dataset whose card differs from the one the run started on")
        log.info("resuming %s after epoch %d", out, meta["epoch"])  # epochs count from 1 wherever shown
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    train_model = model
    if cfg.optim.compile:
        train_model = torch.compile(model)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dev.index] if dev.type == "cuda" else None)
    meta_base = {"config": cfg.to_dict(), "card_digest": card_digest(ds), "data": str(data),
                 "tasks": [t.to_dict() for t in session.tasks]}
    aux = cfg.aux_loss
    end = cfg.optim.epochs if stop_after is None else min(cfg.optim.epochs, start + stop_after)
    # Branches that learn apart (fused_loss 0) are clipped apart, as each would be if trained alone.
    clip_groups = [] if cfg.optim.grad_clip <= 0 else (
        model.branch_parameters() if cfg.fused_loss == 0 else [list(model.parameters())])
    for epoch in range(start, end):  # 0-based here (loader, seeds); every record and message says epoch + 1
        train_loader.set_epoch(epoch)
        dropout_seed, augment_seed = _seeds(cfg.seed, epoch, rank)
        torch.manual_seed(dropout_seed)  # dropout: reproducible on resume
        gen = torch.Generator(dev).manual_seed(augment_seed)
        model.train()
        aug.train()
        sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step
        seen, t0 = 0, time.perf_counter()
        bar = tqdm(DevicePrefetcher(train_loader, dev), total=len(train_loader), disable=not progress or rank > 0,
                   desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", leave=False)
        for step, batch in enumerate(bar):
            batch = aug(batch, generator=gen)
            with _autocast(session):
                outputs = train_model(batch, parts=True) if aux else train_model(batch)
            losses = step_losses(outputs, batch, session.tasks, model.target_stats, fused=cfg.fused_loss, aux=aux)
            opt.zero_grad(set_to_none=True)
            loss = weighting.backward(losses, shared)
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, cfg.optim.grad_clip)
            opt.step()
            sched.step()
            seen += len(batch)
            for name, value in [*losses.items(), ("loss", loss)]:
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            if not bar.disable and step % 20 == 0:  # a host sync, so not every step
                bar.set_postfix(loss=f"{float(loss):.3f}",
                                samples_s=f"{seen * world / (time.perf_counter() - t0):.0f}")
        elapsed = time.perf_counter() - t0
        names = sorted(sums)
        mean = torch.stack([sums[k] for k in names]) / len(train_loader)  # (K,)
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        train_losses = dict(zip(names, mean.tolist()))
        weighting.end_epoch({k: v for k, v in train_losses.items() if k != "loss"})
        metrics = evaluate_loader(session, val_loader) if val_loader is not None else {}
        if not baseline and _comparable(metrics):
            baseline = metrics  # Δm is measured against the first evaluation that has a usable metric
        score = selection_score(metrics, cfg.select, baseline) if metrics and baseline else float(epoch + 1)
        row = {"epoch": epoch + 1, "samples_per_s": seen * world / elapsed, "lr": sched.get_last_lr()[0],
               **{f"train_{k}": v for k, v in train_losses.items()},
               **{f"val_{t}_{m}": v for t, ms in metrics.items() for m, v in ms.items()}, "score": score}
        history.append(row)
        improved = best is None or score >= best["score"]
        if improved:
            best = {"epoch": epoch + 1, "score": score, "metrics": metrics}
        if rank == 0:
            _write_metrics(out / "metrics.csv", history)
            meta = {**meta_base, "epoch": epoch + 1, "step": (epoch + 1) * len(train_loader), "history": history,
                    "best": best, "baseline": baseline, "metrics": metrics}
            extra = {f"weighting.{k}": v for k, v in weighting.state_dict().items()}
            if improved:
                save_checkpoint(out / "best", model, meta)
            save_checkpoint(out / "last", model, meta, opt, extra_tensors=extra)
            _draw_curves(out, history)
            log.info("epoch %d: loss %.4f, %.0f samples/s%s", epoch + 1, train_losses.get("loss", float("nan")),
                     row["samples_per_s"], "".join(f", {t} {_headline(ms)}" for t, ms in metrics.items()))
        if world > 1:
            dist.barrier()
    for loader in (train_loader, val_loader):
        if loader is not None:
            loader.close()
    return best or read_meta(out / "last")["best"]


def _seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """Independent (dropout, augmentation) seeds for one (seed, epoch, rank)."""
    import numpy as np

    a, b = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1


def _check_select(select: str, tasks) -> None:
    """Fail before training, not after the first epoch, when ``select`` names no metric."""
    from .metrics import HIGHER_IS_BETTER

    if select == "delta_m":
        return
    task, _, metric = select.partition("/")
    if task not in tasks.names or metric not in HIGHER_IS_BETTER:
        raise ConfigError(f"select={select!r} names no metric; use 'delta_m' or '<task>/<metric>' with a task in "
                          f"{tasks.names} and a metric in {sorted(HIGHER_IS_BETTER)}")


def _comparable(metrics: dict[str, dict[str, float]]) -> bool:
    return any(math.isfinite(v) and v != 0 for ms in metrics.values() for v in ms.values())


def step_losses(outputs, batch, tasks, target_stats, *, fused: float = 1.0, aux: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-task training losses: ``fused`` x the model output's + ``aux`` x each modality's own.

    ``outputs`` is what the model returned: ``{task: output}``, or with ``aux`` the pair
    (outputs, parts) of ``model(batch, parts=True)``. ``fused=0`` trains late fusion's branches
    independently: each modality learns only from its own loss, an ensemble in one model.
    """
    from .losses import task_losses

    parts = None
    if aux:
        outputs, parts = outputs
    if fused == 0:  # not even computed: nothing from the fused output reaches a gradient
        zero = next(iter(outputs.values())).new_zeros((), dtype=torch.float32)
        losses = {task: zero for task in tasks.names}
    else:
        losses = task_losses({k: v.float() for k, v in outputs.items()}, batch, tasks, target_stats=target_stats)
        if fused != 1.0:
            losses = {task: fused * value for task, value in losses.items()}
    if parts is not None:
        _add_aux_losses(losses, parts, batch, tasks, target_stats, aux)
    return losses


def _add_aux_losses(losses: dict[str, torch.Tensor], parts: dict[str, dict[str, torch.Tensor]], batch,
                    tasks, target_stats, weight: float) -> None:
    """Add each modality's own masked task losses, counted only on samples where it is present."""
    from dataclasses import replace

    from .losses import task_losses

    for modality, outputs in parts.items():
        present = batch.mask(modality)
        if present is None:
            continue
        alone = replace(batch, label_mask={t: m & present for t, m in batch.label_mask.items()})
        for task, value in task_losses({k: v.float() for k, v in outputs.items()}, alone, tasks,
                                       target_stats=target_stats).items():
            losses[task] = losses[task] + weight * value


def _headline(ms: dict[str, float]) -> str:
    name = next(iter(ms))
    return f"{name} {ms[name]:.3f}"


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    names = list(dict.fromkeys(k for row in history for k in row))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerows(history)
    tmp.replace(path)


def _draw_curves(out: Path, history: list[dict[str, Any]]) -> None:
    from .curves import draw_curves

    try:
        draw_curves(history, out / "curves.png")
    except Exception as e:  # a plot must never stop training
        log.warning("could not draw curves.png: %s", e)


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="dataset folder or URL (the output of `mmdata build`)")
    p.add_argument("--config", help="train YAML (model, augment, data, optim, weighting, select, seed); "
                   "with --resume, defaults to RUN/config.json")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, curves.png")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.epochs=5 --set model.fusion.name=late")
    p.add_argument("--resume", action="store_true", help="continue from RUN/last after the last finished epoch")
    p.add_argument("--device", help="torch device (default: this rank's CUDA device, else cpu)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N epochs of this invocation; continue later with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    config = args.config
    if args.resume and not config:
        # the config of the last checkpoint: it holds the overrides of earlier resumed invocations too
        cfg = TrainConfig.from_dict(read_meta(Path(args.out) / "last")["config"])
        if args.set:
            from .config import apply_overrides
            cfg = TrainConfig.from_dict(apply_overrides(cfg.to_dict(), args.set))
    else:
        cfg = load_config(config, args.set)
    best = train(cfg, args.data, args.out, resume=args.resume, device=args.device,
                 progress=not (args.no_progress or args.quiet), stop_after=args.stop_after)
    if not args.quiet and (not dist.is_initialized() or dist.get_rank() == 0):
        print(json.dumps({"best_epoch": best["epoch"], "metrics": best["metrics"]}, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
