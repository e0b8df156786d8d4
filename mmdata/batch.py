"""Batch: what the loader yields and the augmentation pipeline transforms."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

MODALITIES = ("image", "audio", "text")


@dataclass
class Batch:
    """A collated batch. An absent modality is zeros with its mask False, never an exception.

    From the loader: ``image`` uint8 (B,3,H,W); ``audio`` float32 (B,T) waveform with ``audio_lengths``
    (B,) in samples; ``text_ids`` int64 (B,L) with ``attention_mask`` (B,L).
    After ``mmdata.augment.Pipeline``: ``image`` float32 normalised (B,3,H,W); ``audio_features`` float32
    log-mel or MFCC (B,n_mels,F) with ``audio_feature_lengths`` (B,) in frames, and ``audio`` and
    ``audio_lengths`` None: the pipeline replaces the waveform by its features, so mixup and modality
    dropout change the one audio tensor the model reads. ``audio_mask`` is the presence of either.
    Modalities not asked for are None. ``labels[task]``: LongTensor (B,) for classification,
    FloatTensor (B,C) multilabel (or soft (B,C) classification targets after mixup), FloatTensor (B,D)
    regression; ``label_mask[task]`` (B,) bool.

    No transport fields: JPEGs left undecoded for the device travel beside a Batch, as a
    ``mmdata.gpudecode.PackedImages`` that only ``mmdata.prefetch.DevicePrefetcher`` sees and decodes.
    """

    keys: list[str]
    image: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    audio_lengths: torch.Tensor | None = None
    audio_features: torch.Tensor | None = None
    audio_feature_lengths: torch.Tensor | None = None
    audio_mask: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    label_mask: dict[str, torch.Tensor] = field(default_factory=dict)
    source: torch.Tensor | None = None  # (B,) int64 index into the loader's ``sources`` (a Mixture's); else None

    def __len__(self) -> int:
        return len(self.keys)

    def _map(self, fn) -> Batch:
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                changes[f.name] = fn(v)
            elif isinstance(v, dict):
                changes[f.name] = {k: fn(t) for k, t in v.items()}
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Return a copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Return a copy with every tensor in page-locked memory (DataLoader calls this)."""
        return self._map(lambda t: t.pin_memory())

    def mask(self, modality: str) -> torch.Tensor | None:
        """Presence mask (B,) of a modality, or None when it was not loaded."""
        return getattr(self, f"{modality}_mask")

    @property
    def modalities(self) -> list[str]:
        """Modalities loaded in this batch (present in at least the mask)."""
        return [m for m in MODALITIES if getattr(self, f"{m}_mask") is not None]
