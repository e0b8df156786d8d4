"""A session: what a training or evaluation run is made of, built once from (config, data, device).

The device and process group, the data (one dataset, or a Mixture of several) and its tasks, the
model, the augmentation, the loaders, the task weighting and the optimiser with its schedule.
Training (``train.py``) and evaluation (``evaluate.py``) both start here.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from mmdata import Loader, LoaderConfig, Mixture, make_loader
from mmdata.augment import Pipeline
from mmdata.errors import ConfigError
from mmdata.tasks import TaskList

from . import sources
from .augment import ModelAugment
from .config import TrainConfig
from .encoders import hf_tokenizer
from .model import MultiTaskModel
from .sources import Data, DataSpec
from .weighting import Weighting, make_weighting

log = logging.getLogger(__name__)


@dataclass
class Session:
    """The parts of a run. ``cfg`` is resolved against the data (vocabulary size, audio rate, ...).

    ``dataset`` is what the run reads: a Dataset, or a Mixture (its tasks and modalities united).
    ``modalities`` are those of the model the data has: all of them in training; in evaluation a
    modality the data lacks is left out of the batches, i.e. dropped.
    """

    cfg: TrainConfig
    dataset: Data
    tasks: TaskList
    model: MultiTaskModel
    augment: ModelAugment
    device: torch.device
    loader_config: LoaderConfig

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in self.cfg.model.modalities if m in self.dataset.modalities)

    def autocast(self):
        """bf16 autocast on CUDA when ``optim.amp``; a no-op context elsewhere."""
        enabled = self.cfg.optim.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)


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


def join_process_group(dev: torch.device) -> tuple[int, int]:
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


def open_session(cfg: TrainConfig, data: DataSpec, device: torch.device) -> Session:
    """Open the data and build the model and augmentation the config describes, on ``device`` (training)."""
    ds = sources.open_data(data, cfg.data)
    tasks = ds.tasks
    if cfg.data.tasks:
        tasks = TaskList(tuple(tasks[name] for name in cfg.data.tasks))
    missing = [m for m in cfg.model.modalities if m not in ds.modalities]
    if missing:
        raise ConfigError(f"model.modalities asks for {missing}, which the data at {sources.describe(data)!r} does "
                          f"not have (it has {sorted(ds.modalities)})")
    cfg = resolve(cfg, ds)
    if isinstance(ds, Mixture):
        cfg = _resolve_branches(cfg, ds, tasks)
    return build_session(cfg, ds, tasks, device)


def build_session(cfg: TrainConfig, ds: Data, tasks: TaskList, device: torch.device) -> Session:
    """The session of a resolved ``cfg`` whose model predicts ``tasks``, reading ``ds``."""
    model = MultiTaskModel(tasks, cfg.model)  # the first draw from the seeded generator: the initial weights
    pipeline = Pipeline(cfg.augment, sample_rate=sources.sample_rate(ds), tasks=tasks)
    augment = ModelAugment(pipeline, waveform_audio="audio" in cfg.model.modalities and cfg.model.audio.waveform)
    tokenizer = hf_tokenizer(cfg.model.text).file if "text" in cfg.model.modalities and \
        cfg.model.text.kind == "hf" else None
    loader_config = LoaderConfig(image_size=cfg.data.image_size, audio_seconds=cfg.data.audio_seconds,
                                 max_text_tokens=cfg.data.max_text_tokens, decode_images_on=cfg.data.decode_images_on,
                                 tokenizer=tokenizer,
                                 persistent_workers=True)  # no worker start-up per epoch
    return Session(cfg, ds, tasks, model.to(device), augment.to(device), device, loader_config)


def resolve(cfg: TrainConfig, ds: Data) -> TrainConfig:
    """``cfg`` with what the data decides filled in.

    The text vocabulary is the dataset's tokenizer's, unless an hf text encoder brings its own: the
    loader then tokenises with that (``build_session``), and the augmentation's special ids are its.
    An hf audio encoder learns the waveform's rate from the card.
    """
    model, augment = cfg.model, cfg.augment
    if "text" in model.modalities and model.text.kind == "hf":
        tok = hf_tokenizer(model.text)
        if tok.max_length is not None and cfg.data.max_text_tokens > tok.max_length:
            raise ConfigError(f"data.max_text_tokens is {cfg.data.max_text_tokens}, but the tokenizer at "
                              f"model.text.path takes at most {tok.max_length} tokens; lower it")
        augment = replace(augment, text=replace(augment.text, **tok.special_ids))
    elif "text" in model.modalities and model.text.vocab_size is None:
        model = replace(model, text=replace(model.text, vocab_size=sources.vocab_size(ds)))
    rate = sources.sample_rate(ds)
    if "audio" in model.modalities and model.audio.waveform and rate:
        model = replace(model, audio=replace(model.audio, sample_rate=int(rate)))
    return replace(cfg, model=model, augment=augment)


def _resolve_branches(cfg: TrainConfig, ds: Mixture, tasks: TaskList) -> TrainConfig:
    """A mixture's late fusion: each branch predicts only the tasks its modality comes labelled with.

    Also refuses, for any fusion, a modality or task that no source of the train split can teach.
    """
    branches = sources.branch_tasks(ds, cfg.data.train_split, cfg.model.modalities, tasks)
    fusion = cfg.model.fusion
    if fusion.name != "late" or fusion.branch_tasks is not None or branches is None:
        return cfg
    for m, mine in branches.items():
        if len(mine) < len(tasks):
            log.info("late fusion: no source labels %s with %s, so its branch predicts only %s", m,
                     [t for t in tasks.names if t not in mine], list(mine))
    return replace(cfg, model=replace(cfg.model, fusion=replace(fusion, branch_tasks=branches)))


def make_loaders(session: Session, rank: int, world: int) -> tuple[Loader, Loader | None]:
    """This rank's training loader, and the validation loader (the whole split, on every rank) or None.

    A mixture trains on its weighted stream and validates on every source's val split, each sample once.
    """
    cfg, ds = session.cfg, session.dataset
    args = dict(modalities=list(session.modalities), tasks=session.tasks.names, rank=rank, world_size=world,
                num_workers=cfg.data.num_workers, config=session.loader_config)
    train = make_loader(ds, cfg.data.train_split, batch_size=cfg.data.batch_size, shuffle=True, seed=cfg.seed,
                        drop_last=True, **args)
    has_val = bool(cfg.data.val_split) and cfg.data.val_split in ds.splits
    if cfg.data.val_split not in (None, "val") and not has_val:
        raise ConfigError(f"data.val_split {cfg.data.val_split!r} is not in the dataset; it has {ds.splits}")
    # Every rank evaluates the whole val split: identical metrics, and no rank-padding duplicates.
    val = (make_loader(sources.every_sample(ds), cfg.data.val_split, batch_size=cfg.data.batch_size, shuffle=False,
                       **{**args, "rank": 0, "world_size": 1}) if has_val else None)
    if len(train) == 0:
        raise ConfigError(f"split {cfg.data.train_split!r} has fewer samples than one batch per rank "
                          f"(batch_size={cfg.data.batch_size}, world size {world}); lower data.batch_size")
    return train, val


def eval_loader(session: Session, split: str, batch_size: int | None = None) -> Loader:
    """The whole of ``split`` in this process, in order, each sample once; the model's tasks that the data has."""
    ds = sources.every_sample(session.dataset)
    if split not in ds.splits:
        raise ConfigError(f"split {split!r} is not in the dataset; it has {sorted(ds.splits)}")
    return make_loader(ds, split, batch_size=batch_size or session.cfg.data.batch_size, shuffle=False,
                       modalities=list(session.modalities), tasks=[t for t in session.tasks.names if t in ds.tasks.names],
                       num_workers=session.cfg.data.num_workers, config=session.loader_config, rank=0, world_size=1)


def make_task_weighting(session: Session) -> tuple[Weighting, list[torch.nn.Parameter]]:
    """The task weighting on the session's device, and the shared parameters its gradient methods read."""
    w = session.cfg.weighting
    weighting = make_weighting(w.name, session.tasks, **w.options()).to(session.device)
    model = session.model
    # GradNorm balances gradients at the last shared layer; PCGrad projects over every shared weight.
    shared = model.shared_parameters() if w.name == "pcgrad" else model.last_shared_parameters()
    return weighting, [p for p in shared if p.requires_grad]


def make_optimizer(session: Session, weighting: Weighting,
                   steps_per_epoch: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over every trainable parameter (pretrained backbones at ``backbone_lr_scale``), and its schedule."""
    opt_cfg, model = session.cfg.optim, session.model
    params = [p for p in [*model.parameters(), *weighting.parameters()] if p.requires_grad]
    backbone = {id(p) for p in model.pretrained_parameters()}
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in backbone]}]
    if backbone:
        groups.append({"params": [p for p in params if id(p) in backbone], "lr": opt_cfg.lr * opt_cfg.backbone_lr_scale})
    opt = torch.optim.AdamW(groups, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
    total = opt_cfg.epochs * steps_per_epoch
    warmup = max(1, int(opt_cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_schedule(step, warmup, total))
    return opt, sched


def lr_schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to zero, as a multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_target_stats(session: Session) -> None:
    """Standardise regression targets with the train split's mean and std (from the index)."""
    for task in session.tasks:
        if task.type != "regression":
            continue
        values = [v for v in sources.label_values(session.dataset, session.cfg.data.train_split, task.name)
                  if v is not None]
        if values:
            t = torch.tensor(values, dtype=torch.float32)  # (N, D)
            std = t.std(0, correction=0).clamp_min(1e-6)  # one labelled value: std 0, not NaN
            session.model.set_target_stats(task.name, t.mean(0), std)
