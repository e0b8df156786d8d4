"""Ops across a Batch: mixup / cutmix with soft labels, and modality dropout on the presence masks."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..batch import MODALITIES, Batch
from ..errors import ConfigError
from ..tasks import TaskList
from .config import MixConfig
from .op import Op, Params, bernoulli, uniform

# Audio as a (values, lengths) pair of Batch fields: the loader's waveform, or the Pipeline's features
AUDIO_FIELDS = (("audio", "audio_lengths"), ("audio_features", "audio_feature_lengths"))


def sample_beta(generator: torch.Generator, n: int, alpha: float, device: torch.device, tries: int = 32):
    """(n,) draws of Beta(alpha, alpha) from ``generator`` (Johnk's method, vectorised over ``tries``).

    torch's Beta takes no generator, hence this. A row with no accepted try (rare for alpha <= 2) gets 0.5.
    """
    u = uniform(generator, (n, tries, 2), device=device).clamp(min=1e-12)
    log_x, log_y = u[..., 0].log() / alpha, u[..., 1].log() / alpha
    ok = torch.logaddexp(log_x, log_y) <= 0  # X + Y <= 1
    lam = torch.sigmoid(log_x - log_y)  # X / (X + Y)
    first = ok.to(torch.int8).argmax(1, keepdim=True)  # first accepted try
    return torch.where(ok.any(1), lam.gather(1, first).squeeze(1), 0.5)


class Mix(Op):
    """Mixup or cutmix of each sample with a partner from the same batch (a random permutation).

    Params: ``perm`` (B,) partner index; ``lam`` (B,) weight of the sample itself (1: not mixed), for cutmix
    the kept area; ``box`` (B,4) cutmix box y0, y1, x0, x1 in output pixels (empty for mixup). Images are
    pasted (cutmix) or blended; audio (features, or a waveform) is blended with ``lam``; text is the sample's own. A
    modality is mixed only where both samples have it. Labels of every task become float and are blended
    (classification: one-hot -> soft (B,C) targets summing to 1); a mixed pair's label mask is True only
    where both samples have the label.
    """

    def __init__(self, cfg: MixConfig, tasks: TaskList | None = None):
        super().__init__()
        self.cfg = cfg
        self.classes = {t.name: len(t.classes) for t in (tasks or ()) if t.type == "classification"}

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> Params:
        B, dev = len(batch), _device(batch)
        cfg = self.cfg
        if not self.training or not cfg.mixing:
            return {"perm": torch.arange(B, device=dev), "lam": torch.ones(B, device=dev),
                    "box": torch.zeros(B, 4, dtype=torch.long, device=dev)}
        perm = uniform(generator, (B,), device=dev).argsort()  # a random permutation, sync-free on CUDA
        mixed = bernoulli(generator, (B,), cfg.p, device=dev)
        has_image = batch.image is not None and batch.image.dim() == 4
        cut_p = (cfg.cutmix_p if cfg.mixup_alpha > 0 else 1.0) if cfg.cutmix_alpha > 0 and has_image else 0.0
        cut = bernoulli(generator, (B,), cut_p, device=dev)
        lam_mix = sample_beta(generator, B, cfg.mixup_alpha or 1.0, dev)
        lam_cut = sample_beta(generator, B, cfg.cutmix_alpha or 1.0, dev)
        centre = uniform(generator, (B, 2), device=dev)  # (cy, cx) as fractions of the image
        box = torch.zeros(B, 4, dtype=torch.long, device=dev)
        lam = torch.where(mixed, lam_mix, 1.0)
        if has_image:
            H, W = batch.image.shape[-2:]
            both = _mask(batch, "image").to(dev)
            cut = cut & mixed & both & both[perm]
            side = torch.sqrt(1 - lam_cut)
            y0 = ((centre[:, 0] - side / 2) * H).clamp(0, H).long()
            y1 = ((centre[:, 0] + side / 2) * H).clamp(0, H).long()
            x0 = ((centre[:, 1] - side / 2) * W).clamp(0, W).long()
            x1 = ((centre[:, 1] + side / 2) * W).clamp(0, W).long()
            box = torch.stack([y0, y1, x0, x1], 1) * cut.unsqueeze(1)
            area = ((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])).float() / (H * W)
            lam = torch.where(cut, 1 - area, lam)
        return {"perm": perm, "lam": lam, "box": box}

    def apply(self, batch: Batch, params: Params) -> Batch:
        perm, lam, box = params["perm"], params["lam"], params["box"]
        changes: dict = {}
        if batch.image is not None:
            img = batch.image.float()
            both = _mask(batch, "image") & _mask(batch, "image")[perm]
            H, W = img.shape[-2:]
            ys = torch.arange(H, device=img.device).view(1, H, 1)
            xs = torch.arange(W, device=img.device).view(1, 1, W)
            inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None])
                      & (xs >= box[:, 2, None, None]) & (xs < box[:, 3, None, None])).unsqueeze(1)  # (B,1,H,W)
            cut = (box[:, 1] > box[:, 0]) & (box[:, 3] > box[:, 2])
            w = torch.where(both & ~cut, lam, 1.0).view(-1, 1, 1, 1)
            blend = w * img + (1 - w) * img[perm]
            changes["image"] = torch.where(inside, img[perm], blend)
        for values, lengths in AUDIO_FIELDS:
            if getattr(batch, values) is None:
                continue
            both = _mask(batch, "audio") & _mask(batch, "audio")[perm]
            w = torch.where(both, lam, 1.0)
            a = getattr(batch, values).float()
            changes[values] = w.view(-1, *[1] * (a.dim() - 1)) * a + (1 - w.view(-1, *[1] * (a.dim() - 1))) * a[perm]
            n = getattr(batch, lengths)
            if n is not None:
                changes[lengths] = torch.where(w < 1, torch.maximum(n, n[perm]), n)
        if self.cfg.mixing:  # labels become float targets whenever mixing is configured, mixed or not
            labels, masks = {}, {}
            for task, y in batch.labels.items():
                m = batch.label_mask.get(task, torch.ones(len(batch), dtype=torch.bool, device=y.device)).bool()
                y = self._target(task, y, m)  # (B,C) float, zero where the label is missing
                alone = lam >= 1
                lv = lam.view(-1, *[1] * (y.dim() - 1))
                labels[task] = torch.where(alone.view_as(lv), y, lv * y + (1 - lv) * y[perm])
                masks[task] = m & (m[perm] | alone)
            changes["labels"], changes["label_mask"] = labels, masks
        return replace(batch, **changes)

    def _target(self, task: str, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) and y.dim() == 1:
            if task not in self.classes:
                raise ConfigError(f"mixup of task {task!r} needs its number of classes; "
                                  "build the Pipeline with tasks=card.tasks")
            y = _one_hot(y.long().clamp(0, self.classes[task] - 1), self.classes[task]).float()
        y = y.float()
        keep = mask.view(-1, *[1] * (y.dim() - 1))
        return torch.where(keep, y.nan_to_num(0.0), 0.0)


class ModalityDropout(Op):
    """Drop whole modalities of a sample: its presence mask goes False and its input becomes zeros.

    Params: ``drop`` (B,3) bool over (image, audio, text). A sample never loses its last present modality:
    when every present one is drawn, a random one of them is kept. A dropped text becomes ``pad_id`` with
    an all-zero attention mask; dropped audio gets length 0.
    """

    def __init__(self, cfg: MixConfig, pad_id: int = 0):
        super().__init__()
        self.p = tuple(cfg.dropout(m) for m in MODALITIES)
        self.pad_id = pad_id

    def make_params(self, batch: Batch, generator: torch.Generator | None) -> Params:
        B, dev = len(batch), _device(batch)
        if not self.training or max(self.p) == 0:
            return {"drop": torch.zeros(B, len(MODALITIES), dtype=torch.bool, device=dev)}
        present = torch.stack([_mask(batch, m).to(dev) if batch.mask(m) is not None
                               else torch.zeros(B, dtype=torch.bool, device=dev) for m in MODALITIES], 1)
        u = uniform(generator, (B, len(MODALITIES)), device=dev)
        drop = torch.stack([u[:, i] < p for i, p in enumerate(self.p)], 1) & present  # (B,3)
        score = torch.where(present, uniform(generator, (B, len(MODALITIES)), device=dev), -1.0)
        rescue = _one_hot(score.argmax(1), len(MODALITIES))  # a random present modality
        lost_all = present.any(1) & ~(present & ~drop).any(1)
        return {"drop": drop & ~(rescue & lost_all.unsqueeze(1))}

    def apply(self, batch: Batch, params: Params) -> Batch:
        drop = params["drop"]
        changes: dict = {}
        for i, m in enumerate(MODALITIES):
            mask = batch.mask(m)
            if mask is None:
                continue
            d = drop[:, i]
            changes[f"{m}_mask"] = mask.bool() & ~d
            if m == "image" and batch.image is not None:
                changes["image"] = batch.image * ~d.view(-1, 1, 1, 1)
            elif m == "audio":
                for values, lengths in AUDIO_FIELDS:
                    a, n = getattr(batch, values), getattr(batch, lengths)
                    if a is not None:
                        changes[values] = a * ~d.view(-1, *[1] * (a.dim() - 1))
                        if n is not None:
                            changes[lengths] = n * ~d
            elif m == "text" and batch.text_ids is not None:
                changes["text_ids"] = batch.text_ids.masked_fill(d.unsqueeze(1), self.pad_id)
                if batch.attention_mask is not None:
                    changes["attention_mask"] = batch.attention_mask * ~d.unsqueeze(1)
        return replace(batch, **changes)


def _one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) -> (B,n) bool; unlike F.one_hot, never reads the values back to the host to check them."""
    return index.unsqueeze(1) == torch.arange(n, device=index.device)


def _mask(batch: Batch, modality: str) -> torch.Tensor:
    """Presence mask (B,) bool; all True when the batch has the tensor but no mask."""
    m = batch.mask(modality)
    if m is None:
        audio = batch.audio if batch.audio is not None else batch.audio_features
        ref = {"image": batch.image, "audio": audio, "text": batch.text_ids}[modality]
        device = ref.device if ref is not None else _device(batch)
        return torch.full((len(batch),), ref is not None, dtype=torch.bool, device=device)
    return m.bool()


def _device(batch: Batch) -> torch.device:
    for t in (batch.image, batch.audio, batch.audio_features, batch.text_ids, batch.image_mask, batch.audio_mask,
              batch.text_mask, *batch.labels.values()):
        if t is not None:
            return t.device
    return torch.device("cpu")
