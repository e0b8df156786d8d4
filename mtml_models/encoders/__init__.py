"""Per-modality encoders: tensors of one modality -> (B, D) features and the presence mask (B,).

Every encoder first replaces the rows of absent samples (and padded audio frames) by zeros, with
``torch.where`` so that NaN or garbage there cannot leak into the batch (BatchNorm statistics,
attention values); its output rows for absent samples are zeros too. Each modality's module holds
its encoders and their config; pretrained backbones load from local files only (``pretrained``).
"""

from __future__ import annotations

import torch
from torch import nn

from mmdata.batch import Batch
from mmdata.errors import ConfigError

from .audio import AudioCNN, AudioEncoderConfig, HFAudio, build_audio_encoder
from .image import ImageCNN, ImageEncoderConfig, ImageResNet18, TorchvisionImage, build_image_encoder
from .text import HFText, TextBag, TextBert, TextEncoderConfig, build_text_encoder, hf_tokenizer

EncoderConfig = ImageEncoderConfig | AudioEncoderConfig | TextEncoderConfig

__all__ = [
    "AudioCNN", "AudioEncoderConfig", "HFAudio", "HFText", "ImageCNN", "ImageEncoderConfig", "ImageResNet18",
    "TextBag", "TextBert", "TextEncoderConfig", "TorchvisionImage", "build_encoder", "encoder_inputs",
    "hf_tokenizer",
]


def build_encoder(modality: str, cfg: EncoderConfig, dim: int, dropout: float = 0.0) -> nn.Module:
    """Build the encoder that ``cfg`` names for ``modality``, with output width ``dim``."""
    if modality == "image":
        return build_image_encoder(cfg, dim)
    if modality == "audio":
        return build_audio_encoder(cfg, dim)
    if modality == "text":
        return build_text_encoder(cfg, dim, dropout=dropout)
    raise ConfigError(f"unknown modality {modality!r}; expected image, audio or text")


def encoder_inputs(batch: Batch, modality: str) -> tuple[torch.Tensor, ...] | None:
    """Positional inputs of ``modality``'s encoder from ``batch`` (tensors..., mask), or None if not loaded."""
    if modality == "image":
        x, extra = batch.image, ()
    elif modality == "audio" and batch.audio_features is not None:  # the Pipeline's (B, n_mels, F), frames
        x, extra = batch.audio_features, (batch.audio_feature_lengths,)
    elif modality == "audio":  # the waveform (B, T), samples: what a waveform encoder keeps past the Pipeline
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
