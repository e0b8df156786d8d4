"""Image encoders and their config: uint8-normalised images (B, 3, H, W) -> (B, D) features.

``cnn`` is a small CNN for small images; ``resnet18`` a torchvision ResNet-18 from random init;
``torchvision`` one of TORCHVISION_ARCHS, with its weights read from a local state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmdata.errors import ConfigError

from .masks import zero_absent
from .pretrained import freeze, keep_frozen_in_eval, load_fitting, read_state_dict

IMAGE_KINDS = ("cnn", "resnet18", "torchvision")
# arch -> (the classifier attribute the encoder replaces, feature width, the blocks ``freeze: N`` counts)
TORCHVISION_ARCHS = {
    "resnet18": ("fc", 512, ("layer1", "layer2", "layer3", "layer4")),
    "resnet50": ("fc", 2048, ("layer1", "layer2", "layer3", "layer4")),
    "efficientnet_b0": ("classifier", 1280, tuple(f"features.{i}" for i in range(9))),
    "vit_b_16": ("heads", 768, tuple(f"encoder.layers.encoder_layer_{i}" for i in range(12))),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what every TORCHVISION_ARCHS weight saw


@dataclass(frozen=True)
class ImageEncoderConfig:
    kind: str = "cnn"  # one of IMAGE_KINDS
    width: int = 32  # cnn: channels of the first block, doubled per block
    depth: int = 3  # cnn: conv blocks, each halving the image size
    norm: str = "group"  # cnn, resnet18: "group" (per sample) or "batch"
    arch: str = "resnet18"  # torchvision: one of TORCHVISION_ARCHS
    weights: str | None = None  # torchvision: a .safetensors or .pth state dict; None: random init
    freeze: bool | int = False  # torchvision: freeze everything (true), nothing (false), all but the last N blocks

    def __post_init__(self) -> None:
        if self.kind not in IMAGE_KINDS:
            raise ConfigError(f"model.image.kind must be one of {list(IMAGE_KINDS)}, got {self.kind!r}")
        if self.norm not in ("group", "batch"):
            raise ConfigError(f"model.image.norm must be 'group' or 'batch', got {self.norm!r}")
        if self.kind == "torchvision" and self.arch not in TORCHVISION_ARCHS:
            raise ConfigError(f"model.image.arch must be one of {list(TORCHVISION_ARCHS)}, got {self.arch!r}")
        check_freeze(self.freeze, "model.image.freeze")
        if self.kind != "torchvision" and (self.weights is not None or self.freeze is not False):
            raise ConfigError(f"model.image.weights and model.image.freeze apply to kind 'torchvision', not "
                              f"{self.kind!r}; set model.image.kind: torchvision with an arch")

    @property
    def pretrained(self) -> bool:
        """Whether the encoder starts from weights read from a file."""
        return self.kind == "torchvision" and self.weights is not None

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) the backbone's weights were trained with, or None when it has no such weights."""
        return (IMAGENET_MEAN, IMAGENET_STD) if self.kind == "torchvision" else None


def check_freeze(value: bool | int, key: str) -> None:
    if not isinstance(value, bool) and (not isinstance(value, int) or value < 0):
        raise ConfigError(f"{key} must be true, false or a number of last blocks to train (>= 0), got {value!r}")


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ConfigError(f"model.image.norm must be 'group' or 'batch', got {kind!r}")


class ImageCNN(nn.Module):
    """A small CNN for small images (28-64 px): ``depth`` conv blocks, each halving the size."""

    def __init__(self, dim: int, width: int = 32, depth: int = 3, norm: str = "group"):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm2d(norm, c_out), nn.GELU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _norm2d(norm, c_out), nn.GELU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, dim)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = zero_absent(image, mask)  # (B, 3, H, W)
        x = self.body(x).mean(dim=(2, 3))  # (B, C)
        return zero_absent(self.proj(x), mask), mask  # (B, D), (B,)


class ImageResNet18(nn.Module):
    """torchvision ResNet-18 from random init (no weights downloaded), for larger images."""

    def __init__(self, dim: int, norm: str = "batch"):
        super().__init__()
        from torchvision.models import resnet18

        norm_layer = None if norm == "batch" else (lambda c: _norm2d(norm, c))
        self.net = resnet18(weights=None, num_classes=dim, norm_layer=norm_layer)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = zero_absent(image, mask)  # (B, 3, H, W)
        return zero_absent(self.net(x), mask), mask  # (B, D), (B,)


class TorchvisionImage(nn.Module):
    """A torchvision backbone without its classifier, weights from a local file, then a projection to D.

    ``backbone`` holds the pretrained part (a lower learning rate, freezing); ``proj`` is new. Wholly
    frozen parts stay in eval mode while training, so their BatchNorm statistics do not drift.
    """

    def __init__(self, dim: int, cfg: ImageEncoderConfig):
        super().__init__()
        import torchvision.models

        head, width, blocks = TORCHVISION_ARCHS[cfg.arch]
        net = getattr(torchvision.models, cfg.arch)(weights=None)  # the architecture only: nothing downloaded
        if cfg.weights is not None:
            state = read_state_dict(cfg.weights, "model.image.weights")
            load_fitting(net, state, "model.image.weights", cfg.weights, skip=(f"{head}.",))
        setattr(net, head, nn.Identity())
        self.backbone = net
        self.proj = nn.Linear(width, dim)
        freeze(net, [net.get_submodule(b) for b in blocks], cfg.freeze, "model.image.freeze")

    def train(self, mode: bool = True) -> TorchvisionImage:
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self.backbone)
        return self

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = zero_absent(image, mask)  # (B, 3, H, W)
        return zero_absent(self.proj(self.backbone(x)), mask), mask  # (B, width) -> (B, D)


def build_image_encoder(cfg: ImageEncoderConfig, dim: int) -> nn.Module:
    """The image encoder ``cfg`` names, with output width ``dim``."""
    if cfg.kind == "cnn":
        return ImageCNN(dim, width=cfg.width, depth=cfg.depth, norm=cfg.norm)
    if cfg.kind == "resnet18":
        return ImageResNet18(dim, norm=cfg.norm)
    return TorchvisionImage(dim, cfg)
