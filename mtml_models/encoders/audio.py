"""Audio encoders and their config: (B, n_mels, frames) features or a (B, T) waveform -> (B, D).

``cnn`` reads the augmentation pipeline's log-mel or MFCC frames; ``hf`` is a pretrained Hugging Face
speech encoder (wav2vec2, HuBERT, the encoder of Whisper) from a local folder, which reads the raw
waveform at its own sampling rate (resampled here, on the batch's device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmdata.errors import ConfigError

from .image import check_freeze
from .masks import masked_mean, zero_absent
from .pretrained import existing, freeze, hf_blocks, hf_model, keep_frozen_in_eval

AUDIO_KINDS = ("cnn", "hf")


@dataclass(frozen=True)
class AudioEncoderConfig:
    kind: str = "cnn"  # one of AUDIO_KINDS
    # cnn: feature bins per frame. In a TrainConfig it follows augment.audio (its cepstra, else its n_mels)
    n_mels: int = 64
    width: int = 64  # cnn
    depth: int = 3  # cnn
    frames: int | None = None  # cnn: resample each clip's valid frames to this many (speaking-rate invariance)
    path: str | None = None  # hf: a local folder with the model and its feature extractor (save_pretrained)
    freeze: bool | int = False  # hf: freeze everything (true), nothing (false), all but the last N blocks
    sample_rate: int | None = None  # hf: the waveform's rate; `mtml train` fills it from the dataset card

    def __post_init__(self) -> None:
        if self.kind not in AUDIO_KINDS:
            raise ConfigError(f"model.audio.kind must be one of {list(AUDIO_KINDS)}, got {self.kind!r}")
        check_freeze(self.freeze, "model.audio.freeze")
        if self.kind == "hf" and not self.path:
            raise ConfigError("model.audio.kind: hf needs model.audio.path, a local folder saved with save_pretrained")
        if self.kind != "hf" and (self.path is not None or self.freeze is not False):
            raise ConfigError(f"model.audio.path and model.audio.freeze apply to kind 'hf', not {self.kind!r}")
        if self.frames is not None and self.frames < 2:
            raise ConfigError(f"model.audio.frames must be at least 2 (or null to keep every frame), got {self.frames}")

    @property
    def pretrained(self) -> bool:
        return self.kind == "hf"

    @property
    def waveform(self) -> bool:
        """Whether the encoder reads the raw waveform (no feature extraction before it)."""
        return self.kind == "hf"


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
        return zero_absent(z, mask), mask

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


class HFAudio(nn.Module):
    """A Hugging Face speech encoder from a local folder, fed the waveform as its feature extractor would.

    wav2vec2 / HuBERT take the waveform itself (zero mean, unit variance per clip when the extractor
    normalises; an attention mask only when the extractor gives one); Whisper takes its log-mel,
    computed here on the device from the extractor's filterbank. Output frames are mean-pooled over
    each clip's valid frames, then projected to D.
    """

    def __init__(self, dim: int, cfg: AudioEncoderConfig):
        super().__init__()
        from transformers import AutoFeatureExtractor

        if not cfg.sample_rate:
            raise ConfigError("model.audio.sample_rate (the waveform's rate) is needed by an hf audio encoder; "
                              "`mtml train` reads it from the dataset card")
        folder = existing(cfg.path, "model.audio.path", "a local folder saved with save_pretrained")
        self.backbone = hf_model(str(folder), "model.audio.path")
        _no_inner_randomness(self.backbone)
        try:
            fe = AutoFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - no preprocessor_config.json
            raise ConfigError(f"model.audio.path: no feature extractor in {str(folder)!r} (save it there with "
                              f"save_pretrained): {str(e).splitlines()[0]}") from None
        self.in_rate, self.rate = int(cfg.sample_rate), int(fe.sampling_rate)
        self.log_mel = "input_features" in fe.model_input_names  # Whisper
        self.normalize = bool(getattr(fe, "do_normalize", False))
        self.pass_mask = bool(getattr(fe, "return_attention_mask", False))
        if self.log_mel:
            self.n_fft, self.hop, self.n_samples = fe.n_fft, fe.hop_length, fe.n_samples
            self.register_buffer("mel_filters", torch.as_tensor(fe.mel_filters, dtype=torch.float32).T.contiguous(),
                                 persistent=False)  # (n_mels, n_fft // 2 + 1)
        self.proj = nn.Linear(self.backbone.config.hidden_size, dim)
        freeze(self.backbone, hf_blocks(self.backbone), cfg.freeze, "model.audio.freeze")

    def train(self, mode: bool = True) -> HFAudio:
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self.backbone)
        return self

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if audio.dim() != 2:
            raise ConfigError(f"an hf audio encoder reads the waveform (B, T), got shape {tuple(audio.shape)}; "
                              f"the augmentation must leave the audio as it is (mtml train does)")
        with torch.autocast(audio.device.type, enabled=False):  # resampling and log-mel in float32, not bf16
            inputs, valid, lengths = self._inputs(audio, lengths, mask)
        if self.log_mel:
            h = self.backbone(input_features=inputs).last_hidden_state  # (B, 1500, H)
            frames = (lengths.clamp(max=self.n_samples) + 2 * self.hop - 1) // (2 * self.hop)  # the encoder halves
        else:
            attn = valid.long() if self.pass_mask else None
            h = self.backbone(input_values=inputs, attention_mask=attn).last_hidden_state  # (B, F, H)
            frames = self.backbone._get_feat_extract_output_lengths(lengths)  # (B,)
        steps = torch.arange(h.shape[1], device=h.device) < frames.clamp(1)[:, None]  # (B, F)
        return zero_absent(self.proj(masked_mean(h, steps)), mask), mask

    def _inputs(self, audio: torch.Tensor, lengths: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the model reads, as its feature extractor would give it, with valid samples (B, T') and lengths (B,)."""
        B, T = audio.shape
        lengths = torch.full((B,), T, device=audio.device) if lengths is None else lengths
        lengths = torch.where(mask, lengths.clamp(1, T), torch.ones_like(lengths))  # absent: 1 sample of zeros
        valid = (torch.arange(T, device=audio.device) < lengths[:, None]) & mask[:, None]  # (B, T)
        wave = torch.where(valid, audio.float(), 0.0)  # padding and absent rows: zeros, whatever they held
        if self.in_rate != self.rate:
            import torchaudio.functional

            wave = torchaudio.functional.resample(wave, self.in_rate, self.rate)  # (B, T')
            lengths = (lengths * self.rate + self.in_rate - 1) // self.in_rate  # ceil
            valid = torch.arange(wave.shape[1], device=wave.device) < lengths[:, None]  # (B, T')
            wave = torch.where(valid, wave, 0.0)  # the filter rings past each clip's end
        if self.log_mel:
            return self._log_mel(wave), valid, lengths
        if self.normalize:
            wave = _unit_variance(wave, valid, lengths)
        return wave, valid, lengths

    def _log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Whisper's input: the log-mel (B, n_mels, 3000) of the waveform padded (or cut) to 30 s."""
        wave = nn.functional.pad(wave, (0, max(0, self.n_samples - wave.shape[1])))[:, :self.n_samples]
        window = torch.hann_window(self.n_fft, device=wave.device)
        spec = torch.stft(wave, self.n_fft, self.hop, window=window, return_complex=True)[..., :-1].abs() ** 2
        mel = (self.mel_filters @ spec).clamp_min(1e-10).log10()  # (B, n_mels, 3000)
        mel = torch.maximum(mel, mel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (mel + 4.0) / 4.0


def _no_inner_randomness(model: nn.Module) -> None:
    """Turn off a speech model's own SpecAugment and LayerDrop.

    Its SpecAugment draws from numpy's global generator (a run would not replay from its seed) and,
    like LayerDrop, leaves parameters without a gradient in some steps, which DDP refuses. The
    augmentation of the run (``augment``) draws from the run's generator instead.
    """
    for name in ("apply_spec_augment",):
        if hasattr(model.config, name):
            setattr(model.config, name, False)
    for name in ("layerdrop", "encoder_layerdrop"):
        if getattr(model.config, name, 0):
            setattr(model.config, name, 0.0)
    embed = getattr(model, "masked_spec_embed", None)
    if isinstance(embed, nn.Parameter):
        embed.requires_grad_(False)  # used only by the SpecAugment turned off above


def _unit_variance(wave: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over each clip's valid samples (Wav2Vec2FeatureExtractor's do_normalize)."""
    n = lengths.to(wave.dtype)[:, None]  # (B, 1)
    mean = wave.sum(1, keepdim=True) / n
    var = torch.where(valid, (wave - mean) ** 2, 0.0).sum(1, keepdim=True) / n
    return torch.where(valid, (wave - mean) / torch.sqrt(var + 1e-7), 0.0)


def build_audio_encoder(cfg: AudioEncoderConfig, dim: int) -> nn.Module:
    """The audio encoder ``cfg`` names, with output width ``dim``."""
    if cfg.kind == "hf":
        return HFAudio(dim, cfg)
    return AudioCNN(dim, n_mels=cfg.n_mels, width=cfg.width, depth=cfg.depth, frames=cfg.frames)
