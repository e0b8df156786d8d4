"""Text ops on token ids (B,L) within the attention mask: random masking and random deletion."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import TextConfig
from .op import Op, Params, uniform


class Tokens(NamedTuple):
    """``ids`` int64 (B,L) and ``attention_mask`` (B,L) (1/True on real tokens)."""

    ids: torch.Tensor
    attention_mask: torch.Tensor


class _TokenOp(Op):
    def __init__(self, cfg: TextConfig, p: float):
        super().__init__()
        self.p, self.cfg = p, cfg

    def make_params(self, x: Tokens, generator: torch.Generator | None) -> Params:
        """``hit`` (B,L) bool: the ordinary tokens (not padding, cls, sep) this op touches."""
        ids = x.ids
        if not self.training:
            return {"hit": torch.zeros_like(ids, dtype=torch.bool)}
        return {"hit": uniform(generator, tuple(ids.shape), device=ids.device) < self.p}

    def _editable(self, x: Tokens) -> torch.Tensor:
        special = (x.ids == self.cfg.cls_id) | (x.ids == self.cfg.sep_id) | (x.ids == self.cfg.pad_id)
        return x.attention_mask.bool() & ~special


class TokenMask(_TokenOp):
    """Replace each ordinary token by ``mask_id`` with probability ``mask_p``."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, cfg.mask_p)

    def apply(self, x: Tokens, params: Params) -> Tokens:
        hit = params["hit"] & self._editable(x)
        return Tokens(x.ids.masked_fill(hit, self.cfg.mask_id), x.attention_mask)


class TokenDelete(_TokenOp):
    """Delete each ordinary token with probability ``delete_p``; the rest shifts left, padding grows."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, cfg.delete_p)

    def apply(self, x: Tokens, params: Params) -> Tokens:
        keep = x.attention_mask.bool() & ~(params["hit"] & self._editable(x))  # (B,L)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept tokens first, in order
        ids = torch.gather(x.ids, 1, order)
        n = keep.sum(1, keepdim=True)  # (B,1)
        inside = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) < n
        mask = inside.to(x.attention_mask.dtype)
        return Tokens(ids.masked_fill(~inside, self.cfg.pad_id), mask)


class TextAugment(Op):
    """Deletion then masking; identity in eval mode. Params: {"delete": ..., "mask": ...}."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.delete, self.mask = TokenDelete(cfg), TokenMask(cfg)

    def make_params(self, x: Tokens, generator: torch.Generator | None) -> Params:
        if not self.training:
            return {}
        return {"delete": self.delete.make_params(x, generator), "mask": self.mask.make_params(x, generator)}

    def apply(self, x: Tokens, params: Params) -> Tokens:
        if "delete" in params:
            x = self.delete.apply(x, params["delete"])
        if "mask" in params:
            x = self.mask.apply(x, params["mask"])
        return x
