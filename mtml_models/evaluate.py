"""`mtml eval`: per-task metrics of a trained run on a split, optionally with a modality removed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mmdata.errors import ConfigError, SchemaError

from .checkpoint import load_checkpoint, read_meta
from .config import TrainConfig
from .train import card_digest, evaluate_loader, make_session, pick_device

log = logging.getLogger(__name__)


def evaluate_run(run: str | Path, data: str, split: str = "test", *, drop_modality: str | None = None,
                 checkpoint: str = "best", device: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Load ``RUN/<checkpoint>`` and return ``{"tasks": {task: {metric: value}}, "split", "samples", ...}``."""
    from mmdata import make_loader

    run = Path(run)
    meta = read_meta(run / checkpoint)
    cfg = TrainConfig.from_dict(meta["config"])
    session = make_session(cfg, data, pick_device(device))
    if split not in session.dataset.splits:
        raise ConfigError(f"split {split!r} is not in {data!r}; it has {sorted(session.dataset.splits)}")
    if drop_modality and drop_modality not in session.modalities:
        raise ConfigError(f"--drop-modality {drop_modality!r}: the model uses {list(session.modalities)}")
    trained = meta.get("tasks", [])
    now = [t.to_dict() for t in session.tasks]
    if trained != now:
        raise SchemaError(f"the run was trained on tasks {trained} but {data!r} has {now}; evaluate on the "
                          f"dataset the run was trained on (or one built with the same task config)")
    if meta.get("card_digest") != card_digest(session.dataset):
        log.warning("%s differs from the dataset the run was trained on (%s)", data, meta.get("data"))
    load_checkpoint(run / checkpoint, session.model)
    loader = make_loader(session.dataset, split, batch_size=batch_size or cfg.data.batch_size, shuffle=False,
                         modalities=list(session.modalities), tasks=session.tasks.names,
                         num_workers=cfg.data.num_workers, config=session.loader_config, rank=0, world_size=1)
    metrics = evaluate_loader(session, loader, drop_modality=drop_modality)
    return {"tasks": metrics, "split": split, "samples": session.dataset.num_samples(split),
            "epoch": meta["epoch"], "checkpoint": checkpoint, "dropped": drop_modality}


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run folder written by `mtml train --out`")
    p.add_argument("--data", help="dataset folder or URL (default: the one the run trained on)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--drop-modality", choices=["image", "audio", "text"],
                   help="force this modality absent in every sample")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default best)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    data = args.data or read_meta(Path(args.run) / args.checkpoint)["data"]
    result = evaluate_run(args.run, data, args.split, drop_modality=args.drop_modality,
                          checkpoint=args.checkpoint, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    dropped = f", {args.drop_modality} dropped" if args.drop_modality else ""
    print(f"{args.run} on {result['split']} ({result['samples']} samples, epoch {result['epoch']}{dropped})")
    for task, ms in result["tasks"].items():
        print(f"  {task:12s} " + "  ".join(f"{k} {v:.4f}" for k, v in ms.items()))
    return 0

