"""TrainConfig: everything `mtml train` needs, from a YAML file plus `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmdata.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 64
    num_workers: int = 0
    tasks: tuple[str, ...] | None = None  # None: every task in the card
    image_size: tuple[int, int] = (32, 32)
    audio_seconds: float = 1.0
    max_text_tokens: int = 16
    train_split: str = "train"
    val_split: str | None = "val"  # absent from the dataset: a fixed schedule, the last epoch is "best"
    decode_images_on: str = "cpu"  # "device": GPU JPEG decode in the main process
    storage_options: dict[str, Any] | None = None  # fsspec options for an s3://, gs://, ... dataset
    cache_dir: str | None = None  # keep whole remote shards on local disk after their first read
    cache_gb: float = 20.0


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    compile: bool = False


@dataclass(frozen=True)
class TrainConfig:
    model: dict[str, Any] = field(default_factory=dict)  # mtml_models.model.ModelConfig.from_dict
    augment: dict[str, Any] = field(default_factory=dict)  # mmdata.augment.AugmentConfig.from_dict
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    weighting: dict[str, Any] = field(default_factory=lambda: {"name": "equal"})
    # Late fusion: each modality's heads also learn alone, with this weight on their masked losses,
    # so the model keeps working when a modality is missing at test time. 0 turns it off.
    aux_loss: float = 0.0
    # Weight of the fused output's loss. 0 (with aux_loss > 0) trains late fusion's branches
    # independently: each is then as good alone as a unimodal model, and the fused logits average them.
    fused_loss: float = 1.0
    select: str = "delta_m"  # "delta_m" or "<task>/<metric>", e.g. "digit/accuracy"
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d or {})
        _check_keys("config", d, cls)
        kwargs: dict[str, Any] = {}
        for name, sub in (("data", DataConfig), ("optim", OptimConfig)):
            section = dict(d.pop(name, None) or {})
            _check_keys(name, section, sub)
            for f in dataclasses.fields(sub):
                if f.name in section and isinstance(section[f.name], list):
                    section[f.name] = tuple(section[f.name])
            if isinstance(section.get("image_size"), int):  # a square, as LoaderConfig takes it
                section["image_size"] = (section["image_size"],) * 2
            if isinstance(section.get("tasks"), str):
                section["tasks"] = (section["tasks"],)
            kwargs[name] = sub(**section)
        kwargs.update(d)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.data.batch_size < 1:
            raise ConfigError(f"data.batch_size must be positive, got {self.data.batch_size}")
        if self.optim.epochs < 1:
            raise ConfigError(f"optim.epochs must be positive, got {self.optim.epochs}")
        if self.aux_loss < 0 or self.fused_loss < 0:
            raise ConfigError(f"aux_loss and fused_loss must be >= 0, got {self.aux_loss} and {self.fused_loss}")
        if self.fused_loss == 0 and self.aux_loss == 0:
            raise ConfigError("fused_loss=0 and aux_loss=0 leave nothing to learn from; set aux_loss: 1 to train "
                              "the late-fusion branches independently")
        if self.data.decode_images_on not in ("cpu", "device"):
            raise ConfigError(f"data.decode_images_on must be 'cpu' or 'device', got {self.data.decode_images_on!r}")
        fusion = self.model.get("fusion") or {}
        fusion = {"name": fusion} if isinstance(fusion, str) else fusion
        if (self.aux_loss or self.fused_loss != 1) and fusion.get("name", "concat") != "late":
            raise ConfigError(f"aux_loss={self.aux_loss} / fused_loss={self.fused_loss} need late fusion "
                              "(model.fusion.name: late); set aux_loss: 0 and fused_loss: 1")
        if self.fused_loss == 0 and fusion.get("late_weights") == "learned":
            raise ConfigError("fused_loss=0 leaves late_weights: learned without a gradient; use 'mean' or fixed "
                              "weights such as {audio: 0.5}")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _check_keys(section: str, d: dict[str, Any], cls) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {section}; allowed: {sorted(allowed)}")


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``d`` with each ``a.b.c=value`` set (value parsed as YAML)."""
    out = yaml.safe_load(yaml.safe_dump(d)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML TrainConfig, apply overrides, validate."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{p} must hold a mapping at the top level")
    return TrainConfig.from_dict(apply_overrides(d, list(overrides)))
