"""Presence masks applied to encoder inputs and outputs, NaN-safe (``torch.where``, never a product)."""

from __future__ import annotations

import torch

PAD_ID = 0  # mmdata.tokenizer.PAD_ID (the loader pads with it); kept literal so this module does not import tokenizers


def rows(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mask (B,) viewed to broadcast over x (B, ...)."""
    return mask.view(-1, *([1] * (x.dim() - 1)))


def zero_absent(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, ...) with the rows of absent samples replaced by zeros."""
    return torch.where(rows(mask, x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def clean_tokens(ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ids of absent rows; every row attends to at least its first token (no all-masked softmax)."""
    attn = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    attn = attn & mask[:, None]  # (B, L)
    ids = torch.where(attn, ids, torch.full_like(ids, PAD_ID))
    attn[:, 0] = True  # an absent or empty row attends to one pad token
    return ids, attn


def masked_mean(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of h (B, T, H) over the True steps of valid (B, T): (B, H); a row with none gives zeros."""
    w = valid.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (torch.where(valid.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device)) * w).sum(1) \
        / w.sum(1).clamp_min(1.0)
