"""Collate decoded samples into a Batch: stacked, padded, with a presence mask per modality and label.

JPEGs the workers left undecoded (``DecodeSpec.image_on_device``) are not in the Batch: ``pack_jpegs``
packs them into the ``PackedImages`` that travels beside it to the device decoder.
"""

from __future__ import annotations

import torch

from .batch import Batch
from .decode import DecodeSpec, Sample
from .geometry import batch_image_size
from .gpudecode import PackedImages
from .tasks import Task
from .tokenizer import PAD_ID


def collate(samples: list[Sample], spec: DecodeSpec) -> Batch:
    """Samples -> Batch. An absent modality is zeros with mask False; its shape is the same as when present.

    A sample whose JPEG is left for the device has its image row zeros and its mask True (``pack_jpegs``).
    """
    B = len(samples)
    batch = Batch(keys=[s.key for s in samples])
    if "image" in spec.modalities:
        _images(batch, samples, spec)
    if "audio" in spec.modalities:
        clips = [s.audio for s in samples]
        T = spec.audio_samples or max([len(c) for c in clips if c is not None] + [1])
        audio = torch.zeros(B, T, dtype=torch.float32)  # (B, T)
        lengths = torch.zeros(B, dtype=torch.int64)  # (B,)
        for i, c in enumerate(clips):
            if c is not None:
                n = min(len(c), T)
                audio[i, :n] = torch.from_numpy(c[:n])
                lengths[i] = n
        batch.audio, batch.audio_lengths = audio, lengths
        batch.audio_mask = torch.tensor([c is not None for c in clips], dtype=torch.bool)
    if "text" in spec.modalities:
        L = spec.max_text_tokens
        ids = torch.full((B, L), PAD_ID, dtype=torch.int64)  # (B, L)
        attn = torch.zeros(B, L, dtype=torch.int64)  # (B, L) 1 on real tokens
        for i, s in enumerate(samples):
            if s.text_ids is not None:
                n = min(len(s.text_ids), L)
                ids[i, :n] = torch.tensor(s.text_ids[:n], dtype=torch.int64)
                attn[i, :n] = 1
        batch.text_ids, batch.attention_mask = ids, attn
        batch.text_mask = torch.tensor([s.text_ids is not None for s in samples], dtype=torch.bool)
    for task in spec.tasks:
        batch.labels[task.name], batch.label_mask[task.name] = _labels(task, [s.labels.get(task.name) for s in samples])
    return batch


def _images(batch: Batch, samples: list[Sample], spec: DecodeSpec) -> None:
    """Stack the images at ``batch_image_size``: ``spec.image_size``, else the batch's common size.

    JPEGs left for the device count with the (h, w) of their header, so ``image_size=None`` gives the
    same size (or the same ConfigError) whichever side decodes them.
    """
    B = len(samples)
    shapes = [tuple(s.image.shape[-2:]) if s.image is not None else s.image_jpeg_size for s in samples]
    size = batch_image_size(spec.image_size, [hw for hw in shapes if hw is not None])
    image = torch.zeros(B, 3, *size, dtype=torch.uint8)  # (B, 3, H, W)
    for i, s in enumerate(samples):
        if s.image is not None:
            image[i] = s.image
    batch.image = image
    batch.image_mask = torch.tensor([s.image is not None or s.image_jpeg is not None for s in samples],
                                    dtype=torch.bool)


def pack_jpegs(samples: list[Sample], batch: Batch) -> PackedImages | None:
    """The undecoded JPEGs of ``samples`` (collated into ``batch``), packed for the device; None if none."""
    if batch.image is None:
        return None
    return PackedImages.pack([s.image_jpeg for s in samples], tuple(batch.image.shape[-2:]))


def _labels(task: Task, values: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored labels -> (target, mask (B,) bool). Missing: zeros with mask False."""
    B = len(values)
    mask = torch.tensor([v is not None for v in values], dtype=torch.bool)
    if task.type == "classification":
        target = torch.tensor([v if v is not None else 0 for v in values], dtype=torch.int64)  # (B,)
    elif task.type == "multilabel":
        target = torch.zeros(B, len(task.classes), dtype=torch.float32)  # (B, C) multi-hot
        for i, v in enumerate(values):
            if v:
                target[i, list(v)] = 1.0
    else:
        target = torch.zeros(B, task.dims, dtype=torch.float32)  # (B, D)
        for i, v in enumerate(values):
            if v is not None:
                target[i] = torch.tensor(v if isinstance(v, (list, tuple)) else [v], dtype=torch.float32)
    return target, mask
