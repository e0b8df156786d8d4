"""Pipeline: the whole augmentation of a Batch, on whatever device the batch is on."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..batch import Batch
from ..errors import ConfigError
from ..tasks import TaskList
from .audio import Audio, AudioAugment
from .config import AugmentConfig
from .image import ImageAugment
from .mix import Mix, ModalityDropout, _device
from .op import Op, Params
from .text import TextAugment, Tokens


class Pipeline(Op):
    """Augment a loader Batch: images -> float normalised (B,3,H',W'), waveform -> features (B,n_mels,F).

    The waveform ``audio`` (B,T) is replaced by ``audio_features`` (log-mel or MFCC) with
    ``audio_feature_lengths`` in frames; ``audio`` and ``audio_lengths`` come out None.

    Train mode draws every per-sample parameter from the ``generator`` passed in, in a fixed order
    (image, audio, text, mix, dropout), so a seed replays exactly; ``return_params=True`` returns them
    and ``params=`` replays them. ``eval()`` gives the deterministic transform: centre crop/resize,
    features, normalisation, no text edits, no mixing, no dropout. Modalities that are None stay None.

        aug = Pipeline(AugmentConfig.from_dict(cfg["augment"]), sample_rate=card_rate, tasks=card.tasks)
        aug.to(device)
        out = aug(batch.to(device), generator=g)
    """

    def __init__(self, cfg: AugmentConfig | None = None, sample_rate: int | None = None,
                 tasks: TaskList | None = None):
        super().__init__()
        cfg = cfg or AugmentConfig()
        rate = cfg.audio.sample_rate
        if sample_rate is not None and rate is not None and int(sample_rate) != int(rate):
            raise ConfigError(f"augment.audio.sample_rate={rate} disagrees with the dataset's rate {sample_rate}; "
                              "drop it from the config (the card's rate is used)")
        rate = sample_rate if sample_rate is not None else rate
        self.cfg = cfg
        self.sample_rate = None if rate is None else int(rate)
        self.image = ImageAugment(cfg.image)
        self.audio = None if rate is None else AudioAugment(cfg.audio, int(rate))
        self.text = TextAugment(cfg.text)
        self.mix = Mix(cfg.mix, tasks)
        self.dropout = ModalityDropout(cfg.mix, cfg.text.pad_id)

    def forward(self, batch: Batch, generator: torch.Generator | None = None, params: Params | None = None,
                return_params: bool = False):
        """Return the augmented Batch (and its params with ``return_params``).

        Runs with autocast off for the batch's device, so a caller's autocast region (validation under
        bf16) leaves the output float32 and equal to the one outside it: affine_grid's matmul, the mel
        filterbank and the DCT would otherwise run in bf16.
        """
        dev = _device(batch)
        with torch.autocast(dev.type, enabled=False):
            return super().forward(batch, generator=generator, params=params, return_params=return_params)

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> Params:
        params: Params = {}
        B, dev = len(batch), _device(batch)
        if batch.image is not None:
            params["image"] = self.image.make_params(batch.image, generator)
        audio = self._audio_in(batch)
        if audio is not None:
            params["audio"] = self._audio_op().make_params(audio, generator)
        tokens = self._tokens_in(batch)
        if tokens is not None:
            params["text"] = self.text.make_params(tokens, generator)
        if self.training and self.cfg.mix.mixing:
            like = batch
            if batch.image is not None:  # the mix sees the output image size; a stride-0 stand-in, no data
                like = replace(batch, image=torch.zeros((), device=dev).expand(B, 3, *self.cfg.image.size))
            params["mix"] = self.mix.make_params(like, generator)
        if self.training and max(self.dropout.p) > 0:
            params["dropout"] = self.dropout.make_params(batch, generator)
        return params

    def apply(self, batch: Batch, params: Params) -> Batch:
        changes: dict = {}
        if batch.image is not None:
            changes["image"] = self.image.apply(batch.image, params["image"])
        audio = self._audio_in(batch)
        if audio is not None:
            out = self._audio_op().apply(audio, params["audio"])
            changes.update(audio=None, audio_lengths=None, audio_features=out.values,
                           audio_feature_lengths=out.lengths)
        tokens = self._tokens_in(batch)
        if tokens is not None:
            out = self.text.apply(tokens, params["text"])
            changes.update(text_ids=out.ids, attention_mask=out.attention_mask)
        out = replace(batch, **changes)
        if "mix" in params:
            out = self.mix.apply(out, params["mix"])
        if "dropout" in params:
            out = self.dropout.apply(out, params["dropout"])
        return out

    def _audio_in(self, batch: Batch) -> Audio | None:
        """The waveform to featurise, or None (no waveform: no audio, or features already)."""
        if batch.audio is None:
            return None
        lengths = batch.audio_lengths
        if lengths is None:
            lengths = torch.full((len(batch),), batch.audio.shape[1], dtype=torch.long, device=batch.audio.device)
        return Audio(batch.audio, lengths)

    def _audio_op(self) -> AudioAugment:
        if self.audio is None:
            raise ConfigError("the batch has audio but the Pipeline has no sample rate; "
                              "build it with Pipeline(cfg, sample_rate=card's audio sample_rate)")
        return self.audio

    def _tokens_in(self, batch: Batch) -> Tokens | None:
        if batch.text_ids is None:
            return None
        mask = batch.attention_mask
        if mask is None:
            mask = (batch.text_ids != self.cfg.text.pad_id).long()
        return Tokens(batch.text_ids, mask)
