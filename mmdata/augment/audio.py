"""Audio ops: waveform gain/shift/noise on (B,T) + lengths, log-mel features, SpecAugment, normalisation."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torchaudio

from .config import AudioConfig
from .op import Op, Params, bernoulli, normal, sometimes_uniform, uniform


class Audio(NamedTuple):
    """Padded audio: ``values`` (B,T) waveform or (B,n_mels,F) features; ``lengths`` (B,) valid samples/frames."""

    values: torch.Tensor
    lengths: torch.Tensor


def valid_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) lengths -> (B,size) bool, True inside each sample's valid part."""
    return torch.arange(size, device=lengths.device) < lengths.unsqueeze(1)


class Gain(Op):
    """Multiply a sample's waveform by a random gain in dB. Params: ``gain_db`` (B,), 0 when not applied."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.p, self.range = cfg.gain_p, cfg.gain_db

    def make_params(self, x: Audio, generator: torch.Generator | None) -> Params:
        return {"gain_db": sometimes_uniform(self, generator, x.values.shape[0], self.p, *self.range, x.values.device)}

    def apply(self, x: Audio, params: Params) -> Audio:
        gain = torch.pow(10.0, params["gain_db"].to(x.values.dtype) / 20).unsqueeze(1)  # (B,1)
        return Audio(x.values * gain, x.lengths)


class TimeShift(Op):
    """Roll each waveform circularly within its own valid length (padding stays zero).

    Params: ``shift`` (B,) as a fraction of the sample's length in [-shift_max, shift_max], 0 when not applied.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.p, self.max = cfg.shift_p, cfg.shift_max

    def make_params(self, x: Audio, generator: torch.Generator | None) -> Params:
        return {"shift": sometimes_uniform(self, generator, x.values.shape[0], self.p, -self.max, self.max,
                                           x.values.device)}

    def apply(self, x: Audio, params: Params) -> Audio:
        B, T = x.values.shape
        length = x.lengths.clamp(min=1).unsqueeze(1)  # (B,1)
        shift = torch.floor(params["shift"].unsqueeze(1) * length).long()  # (B,1) samples
        idx = torch.remainder(torch.arange(T, device=x.values.device) - shift, length)  # (B,T)
        out = torch.gather(x.values, 1, idx) * valid_mask(x.lengths, T)
        return Audio(out, x.lengths)


class Noise(Op):
    """Add white noise at a random signal-to-noise ratio measured over the valid samples.

    Params: ``snr_db`` (B,), ``noise`` (B,T) standard normal, ``on`` (B,) bool.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.p, self.range = cfg.noise_p, cfg.snr_db

    def make_params(self, x: Audio, generator: torch.Generator | None) -> Params:
        B, T = x.values.shape
        dev = x.values.device
        if not self.training:
            return {"snr_db": torch.zeros(B, device=dev), "noise": torch.zeros(B, T, device=dev),
                    "on": torch.zeros(B, dtype=torch.bool, device=dev)}
        return {"on": bernoulli(generator, (B,), self.p, device=dev),
                "snr_db": uniform(generator, (B,), *self.range, device=dev),
                "noise": normal(generator, (B, T), device=dev)}

    def apply(self, x: Audio, params: Params) -> Audio:
        wave = x.values
        valid = valid_mask(x.lengths, wave.shape[1]).to(wave.dtype)  # (B,T)
        power = (wave.square() * valid).sum(1) / x.lengths.clamp(min=1)  # (B,)
        scale = torch.sqrt(power / torch.pow(10.0, params["snr_db"].to(wave.dtype) / 10))
        scale = scale * params["on"].to(wave.dtype)
        return Audio(wave + (scale.unsqueeze(1) * params["noise"].to(wave.dtype)) * valid, x.lengths)


class LogMel(Op):
    """Waveform (B,T) -> log-mel (B,n_mels,F), normalised over valid frames; padded frames are zero.

    With ``cepstra`` > 0, the first ``cepstra`` coefficients of an orthonormal DCT over the mel axis
    (MFCCs, (B,cepstra,F)) replace the bands before normalising: the low coefficients keep the
    spectral envelope (what is said) and drop the harmonics (the speaker's pitch).
    Deterministic (no params). ``lengths`` become frame counts: L // hop + 1 (0 for an empty sample).
    """

    def __init__(self, cfg: AudioConfig, sample_rate: int):
        super().__init__()
        win = max(1, round(sample_rate * cfg.win_ms / 1000))
        self.hop = max(1, round(sample_rate * cfg.hop_ms / 1000))
        n_fft = 1 << (win - 1).bit_length()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win, hop_length=self.hop, f_min=cfg.f_min,
            f_max=cfg.f_max, n_mels=cfg.n_mels, power=2.0, center=True, pad_mode="constant")
        self.eps, self.normalize = cfg.log_eps, cfg.normalize
        dct = torchaudio.functional.create_dct(cfg.cepstra, cfg.n_mels, norm="ortho") if cfg.cepstra else None
        self.register_buffer("dct", None if dct is None else dct.T.contiguous(), persistent=False)  # (C,M)

    def frames(self, lengths: torch.Tensor, total: int) -> torch.Tensor:
        """Valid frames (B,) for lengths in samples, within ``total`` frames."""
        return torch.where(lengths > 0, lengths // self.hop + 1, 0).clamp(max=total)

    def make_params(self, x, generator=None) -> Params:
        return {}

    def apply(self, x: Audio, params: Params) -> Audio:
        if self.mel.spectrogram.window.device != x.values.device:
            self.to(x.values.device)  # follow the batch's device; Python-level check, no sync
        feats = torch.log(self.mel(x.values.float()) + self.eps)  # (B,M,F)
        if self.dct is not None:
            feats = torch.matmul(self.dct, feats)  # (C,M) @ (B,M,F) -> (B,C,F)
        frames = self.frames(x.lengths, feats.shape[-1])
        valid = valid_mask(frames, feats.shape[-1]).unsqueeze(1).to(feats.dtype)  # (B,1,F)
        if self.normalize != "none":
            dims = (1, 2) if self.normalize == "utterance" else (2,)
            count = (valid.sum(dims, keepdim=True) * (feats.shape[1] if self.normalize == "utterance" else 1))
            count = count.clamp(min=1)
            mean = (feats * valid).sum(dims, keepdim=True) / count
            var = ((feats - mean).square() * valid).sum(dims, keepdim=True) / count
            feats = (feats - mean) * torch.rsqrt(var + 1e-5)
        return Audio(feats * valid, frames)


class FreqWarp(Op):
    """Stretch each sample's mel axis by a random factor (vocal tract length perturbation, Jaitly &
    Hinton 2013): bin m takes the value at m / alpha, interpolated, the edge bin past the top.

    Works on features (B,M,F); frames, and so padding, are untouched. Params: ``alpha`` (B,), 1 when
    not applied; alpha > 1 moves energy up the mel axis (a shorter vocal tract), < 1 down.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.p, self.max = cfg.warp_p, cfg.warp

    def make_params(self, x: Audio, generator: torch.Generator | None) -> Params:
        B, dev = x.values.shape[0], x.values.device
        if not self.training or self.p == 0:
            return {"alpha": torch.ones(B, device=dev)}
        on = bernoulli(generator, (B,), self.p, device=dev)
        log_alpha = uniform(generator, (B,), -1.0, 1.0, device=dev) * math.log1p(self.max)
        return {"alpha": torch.where(on, torch.exp(log_alpha), 1.0)}

    def apply(self, x: Audio, params: Params) -> Audio:
        B, M, F = x.values.shape
        if M < 2:
            return x
        alpha = params["alpha"].to(x.values.device, x.values.dtype).view(B, 1)
        src = (torch.arange(M, device=x.values.device, dtype=x.values.dtype).view(1, M) / alpha).clamp(0, M - 1)
        lo = src.floor().long().clamp(max=M - 2)  # (B,M)
        frac = (src - lo.to(src.dtype)).unsqueeze(2)  # (B,M,1)
        gather = lambda idx: x.values.gather(1, idx.unsqueeze(2).expand(B, M, F))  # noqa: E731
        return Audio(gather(lo) * (1 - frac) + gather(lo + 1) * frac, x.lengths)


class SpecAugment(Op):
    """Time and frequency masks per sample on features (B,M,F); time masks stay within valid frames.

    Params: ``time_start``/``time_width`` (B,time_masks), ``freq_start``/``freq_width`` (B,freq_masks), longs.
    Masked cells are set to 0 (the mean after normalisation); cells past a sample's length are never touched.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.n_t, self.w_t, self.n_f, self.w_f = cfg.time_masks, cfg.time_mask_frames, cfg.freq_masks, cfg.freq_mask_bins

    @staticmethod
    def _spans(generator, n: int, widest: int, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """n spans per sample of width in [0, widest], inside [0, limit) (B,)."""
        B, dev = limit.shape[0], limit.device
        width = torch.floor(uniform(generator, (B, n), device=dev) * (widest + 1)).long()
        width = torch.minimum(width, limit.unsqueeze(1))
        room = (limit.unsqueeze(1) - width + 1).clamp(min=1)
        start = torch.floor(uniform(generator, (B, n), device=dev) * room).long()
        return start, width

    def make_params(self, x: Audio, generator: torch.Generator | None) -> Params:
        B, M = x.values.shape[0], x.values.shape[1]
        dev = x.values.device
        if not self.training:
            z = torch.zeros(B, 0, dtype=torch.long, device=dev)
            return {"time_start": z, "time_width": z, "freq_start": z, "freq_width": z}
        ts, tw = self._spans(generator, self.n_t, self.w_t, x.lengths)
        fs, fw = self._spans(generator, self.n_f, self.w_f, torch.full((B,), M, device=dev))
        return {"time_start": ts, "time_width": tw, "freq_start": fs, "freq_width": fw}

    @staticmethod
    def _cover(start: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
        """(B,n) spans -> (B,size) bool union."""
        pos = torch.arange(size, device=start.device).view(1, 1, size)
        s = start.unsqueeze(2)
        return ((pos >= s) & (pos < s + width.unsqueeze(2))).any(1)

    def apply(self, x: Audio, params: Params) -> Audio:
        B, M, F = x.values.shape
        t = self._cover(params["time_start"], params["time_width"], F)  # (B,F)
        f = self._cover(params["freq_start"], params["freq_width"], M)  # (B,M)
        inside = valid_mask(x.lengths, F).unsqueeze(1)  # (B,1,F): nothing past a sample's length
        hit = (t.unsqueeze(1) | f.unsqueeze(2)) & inside  # (B,M,F)
        return Audio(x.values.masked_fill(hit, 0.0), x.lengths)


class AudioAugment(Op):
    """The audio chain: waveform (B,T) + lengths in samples -> features (B,n_mels,F) + lengths in frames.

    Train: gain, shift, noise, log-mel, mel-axis warp (when ``warp_p`` > 0), SpecAugment. Eval: log-mel
    only. Params: {op name: params}.
    """

    def __init__(self, cfg: AudioConfig, sample_rate: int):
        super().__init__()
        self.gain, self.shift, self.noise = Gain(cfg), TimeShift(cfg), Noise(cfg)
        self.features = LogMel(cfg, sample_rate)
        self.warp = FreqWarp(cfg)
        self.specaug = SpecAugment(cfg)
        self.n_mels = cfg.feature_bins

    def make_params(self, x: Audio, generator: torch.Generator | None) -> Params:
        if not self.training:
            return {}
        params = {name: getattr(self, name).make_params(x, generator) for name in ("gain", "shift", "noise")}
        B, T = x.values.shape
        total = T // self.features.hop + 1
        like = Audio(x.values.new_empty(B, self.n_mels, 0), self.features.frames(x.lengths, total))  # no data
        if self.warp.p > 0:  # drawn only when on, so configs without it keep their random streams
            params["warp"] = self.warp.make_params(like, generator)
        params["specaug"] = self.specaug.make_params(like, generator)
        return params

    def apply(self, x: Audio, params: Params) -> Audio:
        for name in ("gain", "shift", "noise"):
            if name in params:
                x = getattr(self, name).apply(x, params[name])
        x = self.features.apply(x, {})
        if "warp" in params:
            x = self.warp.apply(x, params["warp"])
        if "specaug" in params:
            x = self.specaug.apply(x, params["specaug"])
        return x
