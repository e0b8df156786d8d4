"""Batched augmentation with per-sample randomness, on any device: ``Pipeline`` and its config."""

from .audio import Audio, AudioAugment, FreqWarp, Gain, LogMel, Noise, SpecAugment, TimeShift
from .config import AudioConfig, AugmentConfig, ImageConfig, MixConfig, TextConfig
from .image import ColorJitter, GaussianBlur, ImageAugment, Normalize, RandomGrayscale, ResizedCropFlip
from .mix import Mix, ModalityDropout
from .op import Op, params_to
from .pipeline import Pipeline
from .text import TextAugment, TokenDelete, TokenMask, Tokens

__all__ = [
    "Audio", "AudioAugment", "AudioConfig", "AugmentConfig", "ColorJitter", "FreqWarp", "Gain", "GaussianBlur",
    "ImageAugment", "ImageConfig", "LogMel", "Mix", "MixConfig", "ModalityDropout", "Noise", "Normalize",
    "Op", "Pipeline", "RandomGrayscale", "ResizedCropFlip", "SpecAugment", "TextAugment", "TextConfig",
    "TimeShift", "TokenDelete", "TokenMask", "Tokens", "params_to",
]
