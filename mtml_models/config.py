"""TrainConfig: one tree of frozen dataclasses for `mtml train`, from a YAML file plus `--set` overrides.

    TrainConfig
      data       DataConfig           what to load, and how (batch size, image size, splits, storage,
                                      a mixture's weights)
      model      ModelConfig          encoders (ImageEncoderConfig, ...), fusion (FusionConfig), trunk
      augment    mmdata AugmentConfig the GPU augmentation (image, audio, text, mix)
      optim      OptimConfig          AdamW, schedule, clipping, precision
      weighting  WeightingConfig      how task losses combine
      aux_loss, fused_loss, select, seed

A value two places need is set in one: the augmentation's output size is ``data.image_size``; the
audio encoder's input bins are ``augment.audio``'s (its ``cepstra``, else its ``n_mels``); the image
normalisation follows a pretrained backbone unless ``augment.image.mean``/``std`` are set. Every
unknown key fails before any output is written, naming the key, its file (or ``--set``) and the
nearest valid key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmdata.augment.config import AugmentConfig
from mmdata.errors import ConfigError

from . import schema
from .model import ModelConfig
from .weighting import WeightingConfig

VIT_SIZE = (224, 224)  # torchvision's vit_b_16 takes this size only


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 64
    num_workers: int = 0
    tasks: tuple[str, ...] | None = None  # None: every task in the card
    image_size: tuple[int, int] | int = (32, 32)  # decoded (H, W); also the augmentation's output size
    audio_seconds: float = 1.0
    max_text_tokens: int = 16
    train_split: str = "train"
    val_split: str | None = "val"  # absent from the dataset: a fixed schedule, the last epoch is "best"
    decode_images_on: str = "cpu"  # "device": GPU JPEG decode in the main process
    storage_options: dict[str, Any] | None = None  # fsspec options for an s3://, gs://, ... dataset
    cache_dir: str | None = None  # keep whole remote shards on local disk after their first read
    cache_gb: float = 20.0
    # A mixture (`mtml train --data A --data B`): each source's expected share of a training epoch, by
    # source name (--data-weights fills it); None: in proportion to the sources' train splits.
    weights: dict[str, float] | None = None
    samples_per_epoch: int | None = None  # a mixture's training epoch; None: the sources' summed sizes

    def __post_init__(self) -> None:
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch must be positive or null, got {self.samples_per_epoch}")
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)  # an int: a square
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"data.image_size must be [H, W] or one int, positive, got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.decode_images_on not in ("cpu", "device"):
            raise ConfigError(f"data.decode_images_on must be 'cpu' or 'device', got {self.decode_images_on!r}")


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    compile: bool = False
    backbone_lr_scale: float = 0.1  # pretrained backbones (weights read from files) learn at lr x this

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs must be positive, got {self.epochs}")
        if self.backbone_lr_scale < 0:
            raise ConfigError(f"optim.backbone_lr_scale must be >= 0 (0 leaves the backbones as loaded), got "
                              f"{self.backbone_lr_scale}")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    # Late fusion: each modality's heads also learn alone, with this weight on their masked losses,
    # so the model keeps working when a modality is missing at test time. 0 turns it off.
    aux_loss: float = 0.0
    # Weight of the fused output's loss. 0 (with aux_loss > 0) trains late fusion's branches
    # independently: each is then as good alone as a unimodal model, and the fused logits average them.
    fused_loss: float = 1.0
    select: str = "delta_m"  # "delta_m" or "<task>/<metric>", e.g. "digit/accuracy"
    seed: int = 0

    def __post_init__(self) -> None:
        model, fusion = self.model, self.model.fusion
        if self.aux_loss < 0 or self.fused_loss < 0:
            raise ConfigError(f"aux_loss and fused_loss must be >= 0, got {self.aux_loss} and {self.fused_loss}")
        if self.fused_loss == 0 and self.aux_loss == 0:
            raise ConfigError("fused_loss=0 and aux_loss=0 leave nothing to learn from; set aux_loss: 1 to train "
                              "the late-fusion branches independently")
        if (self.aux_loss or self.fused_loss != 1) and fusion.name != "late":
            raise ConfigError(f"aux_loss={self.aux_loss} / fused_loss={self.fused_loss} need late fusion "
                              "(model.fusion.name: late); set aux_loss: 0 and fused_loss: 1")
        if self.fused_loss == 0 and fusion.late_weights == "learned":
            raise ConfigError("fused_loss=0 leaves late_weights: learned without a gradient; use 'mean' or fixed "
                              "weights such as {audio: 0.5}")
        if "image" in model.modalities and self.augment.image.size != self.data.image_size:
            raise ConfigError(f"augment.image.size {list(self.augment.image.size)} differs from data.image_size "
                              f"{list(self.data.image_size)}; the augmentation's output size is data.image_size")
        if model.image.kind == "torchvision" and model.image.arch == "vit_b_16" and self.data.image_size != VIT_SIZE:
            raise ConfigError(f"model.image.arch vit_b_16 takes {list(VIT_SIZE)} images; set data.image_size: 224, "
                              f"got {list(self.data.image_size)}")
        if "audio" in model.modalities and model.audio.waveform:
            if self.augment.mix.mixing:
                raise ConfigError("mixup/cutmix blend audio features, and an hf audio encoder reads the waveform; "
                                  "set augment.mix.mixup_alpha and cutmix_alpha to 0")
        elif "audio" in model.modalities and model.audio.n_mels != self.augment.audio.feature_bins:
            raise ConfigError(f"model.audio.n_mels {model.audio.n_mels} differs from the augmentation's "
                              f"{self.augment.audio.feature_bins} feature bins; it follows augment.audio "
                              f"(cepstra, else n_mels)")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "the config") -> TrainConfig:
        """Build from nested dicts, deriving what follows from elsewhere; unknown keys raise ConfigError."""
        d = copy.deepcopy(d or {})
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must hold a mapping at the top level, got {d!r}")
        schema.check_keys(cls, d, source)
        _derive(d)
        return schema.fill(cls, d, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-safe) that ``from_dict`` reads back to an equal config."""
        return schema.plain(self)


def _derive(d: dict[str, Any]) -> None:
    """Fill, in the raw tree ``d``, the values that follow from others; a given one must agree."""
    data = schema.fill(DataConfig, d.get("data"), "data")
    model = schema.fill(ModelConfig, d.get("model"), "model")
    augment = schema.fill(AugmentConfig, d.get("augment"), "augment")
    aug = d["augment"] = d.get("augment") or {}
    image = aug["image"] = aug.get("image") or {}
    _follow(image, "size", list(data.image_size), "augment.image.size", "data.image_size")
    if model.image.normalization is not None:  # a pretrained backbone's statistics, unless set
        mean, std = model.image.normalization
        image.setdefault("mean", list(mean))
        image.setdefault("std", list(std))
    if not model.audio.waveform:
        m = d["model"] = d.get("model") or {}
        audio = m["audio"] = m.get("audio") or {}
        _follow(audio, "n_mels", augment.audio.feature_bins, "model.audio.n_mels",
                "augment.audio (its cepstra, else its n_mels)")


def _follow(section: dict[str, Any], key: str, value: Any, where: str, source: str) -> None:
    given = section.get(key, value)
    if (list(given) if isinstance(given, (list, tuple)) else given) != value:
        raise ConfigError(f"{where} is {given!r}, but it follows {source}, which gives {value!r}; drop {where}")
    section[key] = value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``d`` with each ``a.b.c=value`` set (value parsed as YAML), each key checked."""
    out = yaml.safe_load(yaml.safe_dump(d)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        schema.check_path(TrainConfig, key, f"--set {item}")
        node, cls = out, TrainConfig
        *parents, leaf = key.split(".")
        for p in parents:
            sub = schema.section(schema.fields(cls)[p]) if cls is not None else None
            if not isinstance(node.get(p), dict):  # absent, null, or a section's shorthand (fusion: late)
                shorthand = getattr(sub, "SHORTHAND", None)
                node[p] = {} if node.get(p) is None else {shorthand: node[p]} if shorthand else {}
            node, cls = node[p], sub
        node[leaf] = yaml.safe_load(raw)
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML TrainConfig, apply overrides, validate; every key is checked before anything is built."""
    d: dict[str, Any] = {}
    source = "--set"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{p} must hold a mapping at the top level")
        schema.check_keys(TrainConfig, d, str(p))
        source = f"{p} with --set"
    return TrainConfig.from_dict(apply_overrides(d, list(overrides)), source=source)
