"""The augmentation the model's encoders need: mmdata's Pipeline, keeping the waveform for a waveform encoder.

The Pipeline turns audio into log-mel or MFCC frames; a pretrained speech encoder (``model.audio.kind:
hf``) reads the waveform instead. For it the waveform goes around the Pipeline: no audio parameters
are drawn or applied, and modality dropout still clears the audio's presence mask.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from mmdata.augment import Pipeline
from mmdata.batch import Batch


class ModelAugment(nn.Module):
    """``Pipeline`` over a Batch, around which a waveform encoder's audio goes.

    With ``waveform_audio`` the waveform ``audio`` (B, T) comes out as it went in, and no ``audio_features``.
    """

    def __init__(self, pipeline: Pipeline, waveform_audio: bool = False):
        super().__init__()
        self.pipeline = pipeline
        self.waveform_audio = waveform_audio

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        if not self.waveform_audio or batch.audio is None:
            return self.pipeline(batch, generator=generator)
        wave, lengths = batch.audio, batch.audio_lengths  # (B, T), (B,) in samples
        out = self.pipeline(replace(batch, audio=None, audio_lengths=None), generator=generator)
        return replace(out, audio=wave, audio_lengths=lengths)
