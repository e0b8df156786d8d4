"""Per-modality encoders: tensors of one modality -> (B, D) features and the presence mask (B,).

Every encoder first replaces the rows of absent samples (and padded audio frames) by zeros, with
``torch.where`` so that NaN or garbage there cannot leak into the batch (BatchNorm statistics,
attention values); its output rows for absent samples are zeros too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mmdata.errors import ConfigError

if TYPE_CHECKING:
    from mmdata.batch import Batch

    from .model import AudioConfig, ImageConfig, TextConfig

PAD_ID = 0  # mmdata.tokenizer.PAD_ID; kept literal so this module does not import tokenizers


def _rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mask (B,) viewed to broadcast over x (B, ...)."""
    return mask.view(-1, *([1] * (x.dim() - 1)))


def _zero_absent(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(_rows(mask, x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ConfigError(f"image.norm must be 'group' or 'batch', got {kind!r}")


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
        x = _zero_absent(image, mask)  # (B, 3, H, W)
        x = self.body(x).mean(dim=(2, 3))  # (B, C)
        return _zero_absent(self.proj(x), mask), mask  # (B, D), (B,)


class ImageResNet18(nn.Module):
    """torchvision ResNet-18 from random init (no weights downloaded), for larger images."""

    def __init__(self, dim: int, norm: str = "batch"):
        super().__init__()
        from torchvision.models import resnet18

        norm_layer = None if norm == "batch" else (lambda c: _norm2d(norm, c))
        self.net = resnet18(weights=None, num_classes=dim, norm_layer=norm_layer)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _zero_absent(image, mask)  # (B, 3, H, W)
        return _zero_absent(self.net(x), mask), mask  # (B, D), (B,)


class _FrameNorm(nn.Module):
    """LayerNorm over channels of each frame of (B, C, T): independent of how much padding follows."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class AudioCNN(nn.Module):
    """A 1-D CNN over log-mel frames (mel bands as channels); pools mean and max over valid frames only.

    A sample's features do not depend on the padding after it: padded frames are zeroed before each
    conv (as the conv's own zero padding would be), norms are per frame, and pooling is masked.
    """

    def __init__(self, dim: int, n_mels: int, width: int = 64, depth: int = 3, frames: int | None = None):
        super().__init__()
        if frames is not None and frames < 2:
            raise ConfigError(f"model.audio.frames must be at least 2 (or null to keep every frame), got {frames}")
        self.n_mels, self.frames = n_mels, frames
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = n_mels
        for i in range(depth):
            c_out = width * 2 ** min(i, 2)
            for stride, c in ((2, c_in), (1, c_out)):  # a downsampling conv, then a plain one
                self.convs.append(nn.Conv1d(c, c_out, 3, stride=stride, padding=1))
                self.norms.append(_FrameNorm(c_out))
            c_in = c_out
        self.act = nn.GELU()
        self.proj = nn.Linear(2 * c_in, dim)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if audio.dim() != 3 or audio.shape[1] != self.n_mels:
            raise ConfigError(
                f"audio encoder expects log-mel features (B, {self.n_mels}, frames), got shape "
                f"{tuple(audio.shape)}; run the augmentation pipeline first or set model.audio.n_mels "
                f"to the pipeline's feature bins (augment.audio.cepstra, or its n_mels when that is 0)")
        B, _, T = audio.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=audio.device)
        # Absent samples get length 1 of zeros, so nothing of theirs is read and no division by 0.
        lengths = torch.where(mask, lengths.clamp(1, T), torch.ones_like(lengths))
        x = audio
        if self.frames is not None:
            x, lengths = _warp_time(x, lengths, self.frames), torch.full_like(lengths, self.frames)
        for conv, norm in zip(self.convs, self.norms):
            x = torch.where(self._valid(x, lengths) & mask[:, None, None], x, 0.0)  # (B, C, T)
            x = self.act(norm(conv(x)))
            if conv.stride[0] == 2:
                lengths = (lengths + 1) // 2  # ceil(T / 2) frames, as the conv computes
        valid = self._valid(x, lengths)  # (B, 1, T')
        mean = torch.where(valid, x, 0.0).sum(-1) / lengths[:, None].to(x.dtype)  # (B, C)
        peak = torch.where(valid, x, torch.finfo(x.dtype).min).amax(-1)  # (B, C)
        z = self.proj(torch.cat([mean, peak], dim=1))  # (B, D)
        return _zero_absent(z, mask), mask

    @staticmethod
    def _valid(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) True on the frames of x (B, C, T) within each sample's length."""
        return (torch.arange(x.shape[-1], device=x.device) < lengths[:, None])[:, None, :]


def _warp_time(x: torch.Tensor, lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """Linearly resample each sample's valid frames of x (B, C, T) to ``frames`` frames: (B, C, frames).

    A slow and a fast utterance of the same word then line up frame by frame, as the fixed-length
    log-mel of the linear baseline does; nothing past a sample's length is read.
    """
    B, C, _ = x.shape
    last = (lengths - 1).clamp_min(0).to(x.dtype)  # (B,)
    pos = torch.linspace(0, 1, frames, device=x.device, dtype=x.dtype)[None] * last[:, None]  # (B, N)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (lengths - 1).clamp_min(0)[:, None])
    w = (pos - lo.to(x.dtype))[:, None, :]  # (B, 1, N)
    take = lambda idx: x.gather(2, idx[:, None, :].expand(B, C, frames))  # noqa: E731
    return take(lo) * (1 - w) + take(hi) * w


class TextBag(nn.Module):
    """Mean of token embeddings over the attention mask, for tiny vocabularies."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, dim)
        self.proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, attn = _clean_tokens(ids, attention_mask, mask)  # (B, L), (B, L)
        w = attn.to(self.embed.weight.dtype).unsqueeze(-1)  # (B, L, 1)
        z = (self.embed(ids) * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D)
        return _zero_absent(self.proj(z), mask), mask


class TextBert(nn.Module):
    """A small BertModel built from a local BertConfig (random init, nothing downloaded); CLS pooled."""

    def __init__(self, dim: int, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 2,
                 max_length: int = 128, dropout: float = 0.1):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.vocab_size = vocab_size
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * hidden,
                            max_position_embeddings=max_length, pad_token_id=PAD_ID,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.max_length = max_length
        self.proj = nn.Linear(hidden, dim)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[1] > self.max_length:
            raise ConfigError(f"text has {ids.shape[1]} tokens but model.text.max_length is "
                              f"{self.max_length}; raise max_length or truncate in the loader")
        ids, attn = _clean_tokens(ids, attention_mask, mask)  # (B, L), (B, L)
        h = self.bert(input_ids=ids, attention_mask=attn.long()).last_hidden_state  # (B, L, H)
        return _zero_absent(self.proj(h[:, 0]), mask), mask  # (B, D)


def _clean_tokens(ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ids of absent rows; every row attends to at least its first token (no all-masked softmax)."""
    attn = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    attn = attn & mask[:, None]  # (B, L)
    ids = torch.where(attn, ids, torch.full_like(ids, PAD_ID))
    attn[:, 0] = True  # an absent or empty row attends to one pad token
    return ids, attn


def build_encoder(modality: str, cfg: ImageConfig | AudioConfig | TextConfig, dim: int,
                  dropout: float = 0.0) -> nn.Module:
    """Build the encoder that ``cfg`` names for ``modality``."""
    if modality == "image":
        if cfg.kind == "cnn":
            return ImageCNN(dim, width=cfg.width, depth=cfg.depth, norm=cfg.norm)
        if cfg.kind == "resnet18":
            return ImageResNet18(dim, norm=cfg.norm)
        raise ConfigError(f"model.image.kind must be 'cnn' or 'resnet18', got {cfg.kind!r}")
    if modality == "audio":
        if cfg.kind == "cnn":
            return AudioCNN(dim, n_mels=cfg.n_mels, width=cfg.width, depth=cfg.depth, frames=cfg.frames)
        raise ConfigError(f"model.audio.kind must be 'cnn', got {cfg.kind!r}")
    if modality == "text":
        if not cfg.vocab_size or cfg.vocab_size < 1:
            raise ConfigError(f"model.text.vocab_size must be set to the tokenizer's vocabulary size, "
                              f"got {cfg.vocab_size!r}")
        if cfg.kind == "bag":
            return TextBag(dim, cfg.vocab_size)
        if cfg.kind == "bert":
            return TextBert(dim, cfg.vocab_size, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                            max_length=cfg.max_length, dropout=dropout)
        raise ConfigError(f"model.text.kind must be 'bag' or 'bert', got {cfg.kind!r}")
    raise ConfigError(f"unknown modality {modality!r}; expected image, audio or text")


def encoder_inputs(batch: Batch, modality: str) -> tuple[torch.Tensor, ...] | None:
    """Positional inputs of ``modality``'s encoder from ``batch`` (tensors..., mask), or None if not loaded."""
    if modality == "image":
        x, extra = batch.image, ()
    elif modality == "audio":
        x, extra = batch.audio, (batch.audio_lengths,)
    elif modality == "text":
        x, extra = batch.text_ids, (batch.attention_mask,)
    else:
        raise ConfigError(f"unknown modality {modality!r}; expected image, audio or text")
    if x is None:
        return None
    mask = batch.mask(modality)
    if mask is None:
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return (x, *extra, mask.bool())
