"""AugmentConfig: a frozen tree (image / audio / text / mix) filled from a YAML section."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID

NORMALIZE_MODES = ("utterance", "bin", "none")


def _range(name: str, value: Any, low: float | None = None, high: float | None = None) -> tuple[float, float]:
    """Check a (min, max) pair; return it as a tuple of floats."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair [min, max], got {value!r}") from None
    if a > b:
        raise ConfigError(f"{name} must be [min, max] with min <= max, got {value!r}")
    if (low is not None and a < low) or (high is not None and b > high):
        raise ConfigError(f"{name} must lie within [{low}, {high}], got {value!r}")
    return a, b


def _prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} is a probability and must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class ImageConfig:
    """Image ops on uint8 (B,3,H,W): crop+flip, colour jitter, grayscale, blur, normalise."""

    size: tuple[int, int] = (32, 32)  # output (H, W)
    scale: tuple[float, float] = (0.6, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02  # in turns of the colour wheel, at most 0.5
    grayscale_p: float = 0.1
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # in output pixels
    blur_kernel: int = 5
    eval_crop: float = 1.0  # eval: centre crop covering this fraction of the largest centred box
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ConfigError(f"image.size must be [H, W] with positive ints, got {self.size!r}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "scale", _range("image.scale", self.scale, 1e-4, 1.0))
        object.__setattr__(self, "ratio", _range("image.ratio", self.ratio, 1e-3))
        object.__setattr__(self, "blur_sigma", _range("image.blur_sigma", self.blur_sigma, 1e-3))
        for p in ("hflip_p", "jitter_p", "grayscale_p", "blur_p"):
            _prob(f"image.{p}", getattr(self, p))
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"image.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"image.hue must be in [0, 0.5], got {self.hue!r}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ConfigError(f"image.blur_kernel must be a positive odd int, got {self.blur_kernel!r}")
        if not 0.0 < self.eval_crop <= 1.0:
            raise ConfigError(f"image.eval_crop must be in (0, 1], got {self.eval_crop!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"image.mean/std must be 3 values each, std positive; got {self.mean!r}, {self.std!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


@dataclass(frozen=True)
class AudioConfig:
    """Waveform ops on (B,T) + lengths, then log-mel features, SpecAugment and normalisation."""

    sample_rate: int | None = None  # the dataset's rate; Pipeline(sample_rate=...) fills it from the card
    n_mels: int = 64
    win_ms: float = 25.0
    hop_ms: float = 10.0
    f_min: float = 0.0
    f_max: float | None = None
    gain_p: float = 0.5
    gain_db: tuple[float, float] = (-6.0, 6.0)
    shift_p: float = 0.5
    shift_max: float = 0.1  # largest circular shift within the valid length, as a fraction of it
    noise_p: float = 0.3
    snr_db: tuple[float, float] = (10.0, 40.0)
    warp_p: float = 0.0  # stretch the mel axis of a sample (vocal tract length perturbation)
    warp: float = 0.1  # largest stretch: a factor in [1 / (1 + warp), 1 + warp]
    time_masks: int = 2
    time_mask_frames: int = 10  # widest time mask, in frames (never past the valid length)
    freq_masks: int = 2
    freq_mask_bins: int = 8
    normalize: str = "utterance"  # utterance | bin | none, over valid frames only
    log_eps: float = 1e-6
    cepstra: int = 0  # > 0: keep that many DCT coefficients of the log-mel (MFCCs), which drop pitch detail

    @property
    def feature_bins(self) -> int:
        """Height of the features: cepstral coefficients, or mel bands."""
        return self.cepstra or self.n_mels

    def __post_init__(self) -> None:
        if self.sample_rate is not None and int(self.sample_rate) <= 0:
            raise ConfigError(f"audio.sample_rate must be positive, got {self.sample_rate!r}")
        if self.n_mels < 1:
            raise ConfigError(f"audio.n_mels must be positive, got {self.n_mels!r}")
        if self.hop_ms <= 0 or self.win_ms < self.hop_ms:
            raise ConfigError(f"audio.win_ms must be >= hop_ms > 0, got win_ms={self.win_ms}, hop_ms={self.hop_ms}")
        for p in ("gain_p", "shift_p", "noise_p", "warp_p"):
            _prob(f"audio.{p}", getattr(self, p))
        if not 0.0 <= self.warp < 1.0:
            raise ConfigError(f"audio.warp is a relative stretch in [0, 1), got {self.warp!r}")
        if not 0.0 <= self.shift_max <= 1.0:
            raise ConfigError(f"audio.shift_max is a fraction of the length, in [0, 1]; got {self.shift_max!r}")
        object.__setattr__(self, "gain_db", _range("audio.gain_db", self.gain_db))
        object.__setattr__(self, "snr_db", _range("audio.snr_db", self.snr_db))
        for n in ("time_masks", "time_mask_frames", "freq_masks", "freq_mask_bins"):
            if getattr(self, n) < 0:
                raise ConfigError(f"audio.{n} must be >= 0, got {getattr(self, n)!r}")
        if not 0 <= self.cepstra <= self.n_mels:
            raise ConfigError(f"audio.cepstra must be in [0, n_mels={self.n_mels}] (0: log-mel features), "
                              f"got {self.cepstra!r}")
        if self.cepstra and self.warp_p > 0:
            raise ConfigError("audio.warp_p stretches mel bands, and audio.cepstra replaces them; set one of "
                              "them to 0")
        if self.freq_mask_bins > self.feature_bins:
            raise ConfigError(f"audio.freq_mask_bins must be <= the {self.feature_bins} feature bins, got "
                              f"{self.freq_mask_bins}")
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"audio.normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")


@dataclass(frozen=True)
class TextConfig:
    """Token ops within the attention mask; special ids match mmdata.tokenizer."""

    mask_p: float = 0.1  # replace a token by mask_id
    delete_p: float = 0.0  # delete a token (the rest shifts left, padding grows)
    pad_id: int = PAD_ID
    unk_id: int = UNK_ID
    cls_id: int = CLS_ID
    sep_id: int = SEP_ID
    mask_id: int = MASK_ID

    def __post_init__(self) -> None:
        _prob("text.mask_p", self.mask_p)
        _prob("text.delete_p", self.delete_p)


@dataclass(frozen=True)
class MixConfig:
    """Mixup / cutmix across the batch (classification soft labels) and modality dropout."""

    mixup_alpha: float = 0.0  # Beta(alpha, alpha); 0 turns mixup off
    cutmix_alpha: float = 0.0  # 0 turns cutmix off
    p: float = 1.0  # per-sample probability to mix when mixup or cutmix is on
    cutmix_p: float = 0.5  # when both are on, per-sample probability of cutmix over mixup
    modality_dropout: float = 0.0  # per sample and modality; never drops a sample's last modality
    image_dropout: float | None = None  # per-modality overrides of modality_dropout
    audio_dropout: float | None = None
    text_dropout: float | None = None

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError(f"mix.mixup_alpha/cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        for p in ("p", "cutmix_p", "modality_dropout", "image_dropout", "audio_dropout", "text_dropout"):
            if getattr(self, p) is not None:
                _prob(f"mix.{p}", getattr(self, p))

    @property
    def mixing(self) -> bool:
        return self.p > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def dropout(self, modality: str) -> float:
        """Dropout probability of one modality."""
        own = getattr(self, f"{modality}_dropout")
        return self.modality_dropout if own is None else own


_SECTIONS = {"image": ImageConfig, "audio": AudioConfig, "text": TextConfig, "mix": MixConfig}


def _section(cls, name: str, d: dict[str, Any] | None):
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise ConfigError(f"augment.{name} must be a mapping, got {type(d).__name__}")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(f"augment.{name}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class AugmentConfig:
    """The whole augmentation config; ``from_dict`` reads a YAML ``augment:`` section."""

    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mix: MixConfig = field(default_factory=MixConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AugmentConfig:
        d = d or {}
        if not isinstance(d, dict):
            raise ConfigError(f"augment config must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"augment: unknown section(s) {unknown}; allowed: {', '.join(_SECTIONS)}")
        return cls(**{name: _section(c, name, d.get(name)) for name, c in _SECTIONS.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) that ``from_dict`` reads back and YAML/JSON can hold."""

        def plain(v):
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain(asdict(self))
