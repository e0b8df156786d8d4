"""Checkpoints as safetensors + JSON: nothing pickled, written atomically, readable after a crash."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmdata.errors import DatasetNotFoundError, SchemaError

MODEL_FILE, OPTIM_FILE, META_FILE = "model.safetensors", "optimizer.safetensors", "meta.json"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and plain JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *plain["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def save_checkpoint(directory: str | Path, model: torch.nn.Module, meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model weights, optional optimizer state and meta JSON to ``directory`` atomically.

    The new checkpoint is staged next to the target and swapped in; the previous one survives as
    ``<name>.old`` until the swap completes, so a crash at any point leaves a readable checkpoint.
    """
    target = Path(directory)
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / MODEL_FILE))
    meta = dict(meta)
    if optimizer is not None:
        tensors, plain = _optimizer_tensors(optimizer)
        tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra_tensors or {}).items()})
        save_file(tensors, str(tmp / OPTIM_FILE))
        meta["optimizer"] = plain
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)  # make both renames durable before the old copy goes
    shutil.rmtree(old, ignore_errors=True)
    return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def resolve(directory: str | Path) -> Path:
    """The readable checkpoint at ``directory``, falling back to ``<name>.old`` after a crash mid-swap."""
    target = Path(directory)
    for candidate in (target, target.with_name(target.name + ".old")):
        if (candidate / META_FILE).is_file() and (candidate / MODEL_FILE).is_file():
            return candidate
    raise DatasetNotFoundError(f"no checkpoint at {str(target)!r}; train first with `mtml train --out RUN`")


def read_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((resolve(directory) / META_FILE).read_text())


def load_checkpoint(directory: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights (and optimizer state when given) into the objects; return (meta, extra tensors)."""
    path = resolve(directory)
    meta = json.loads((path / META_FILE).read_text())
    missing, unexpected = model.load_state_dict(load_file(str(path / MODEL_FILE)), strict=False)
    if missing or unexpected:
        raise SchemaError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}; was it trained with another config?")
    extra: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        if not (path / OPTIM_FILE).is_file():
            raise DatasetNotFoundError(f"{path} has no optimizer state; it cannot be resumed")
        tensors = load_file(str(path / OPTIM_FILE))
        extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        _load_optimizer(optimizer, {k: v for k, v in tensors.items() if not k.startswith("extra.")},
                        meta["optimizer"])
    return meta, extra
