"""Text encoders and their config: token ids (B, L) with an attention mask -> (B, D).

``bag`` and ``bert`` start from random weights over the dataset's own tokenizer; ``hf`` is a
pretrained Hugging Face model from a local folder, whose own tokenizer the loader then uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmdata.errors import ConfigError

from .image import check_freeze
from .masks import PAD_ID, clean_tokens, masked_mean, zero_absent
from .pretrained import existing, freeze, hf_blocks, hf_model, keep_frozen_in_eval

TEXT_KINDS = ("bag", "bert", "hf")
SPECIAL_IDS = ("pad_id", "unk_id", "cls_id", "sep_id", "mask_id")  # as mmdata.augment's text config names them


@dataclass(frozen=True)
class TextEncoderConfig:
    kind: str = "bag"  # one of TEXT_KINDS
    vocab_size: int | None = None  # bag, bert: the tokenizer's vocabulary size; `mtml train` reads the dataset's
    hidden: int = 64  # bert
    layers: int = 2  # bert
    heads: int = 2  # bert
    max_length: int = 128  # bert
    path: str | None = None  # hf: a local folder with the model and its tokenizer (save_pretrained)
    freeze: bool | int = False  # hf: freeze everything (true), nothing (false), all but the last N blocks

    def __post_init__(self) -> None:
        if self.kind not in TEXT_KINDS:
            raise ConfigError(f"model.text.kind must be one of {list(TEXT_KINDS)}, got {self.kind!r}")
        check_freeze(self.freeze, "model.text.freeze")
        if self.kind == "hf" and not self.path:
            raise ConfigError("model.text.kind: hf needs model.text.path, a local folder saved with save_pretrained")
        if self.kind != "hf" and (self.path is not None or self.freeze is not False):
            raise ConfigError(f"model.text.path and model.text.freeze apply to kind 'hf', not {self.kind!r}")

    @property
    def pretrained(self) -> bool:
        return self.kind == "hf"


class TextBag(nn.Module):
    """Mean of token embeddings over the attention mask, for tiny vocabularies."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, dim)
        self.proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, attn = clean_tokens(ids, attention_mask, mask)  # (B, L), (B, L)
        w = attn.to(self.embed.weight.dtype).unsqueeze(-1)  # (B, L, 1)
        z = (self.embed(ids) * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D)
        return zero_absent(self.proj(z), mask), mask


class TextBert(nn.Module):
    """A small BertModel built from a local BertConfig (random init, nothing downloaded); CLS pooled."""

    def __init__(self, dim: int, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 2,
                 max_length: int = 128, dropout: float = 0.1):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.vocab_size = vocab_size
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * hidden,
                            max_position_embeddings=max_length, pad_token_id=PAD_ID,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.max_length = max_length
        self.proj = nn.Linear(hidden, dim)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_length(ids, self.max_length, "model.text.max_length")
        ids, attn = clean_tokens(ids, attention_mask, mask)  # (B, L), (B, L)
        h = self.bert(input_ids=ids, attention_mask=attn.long()).last_hidden_state  # (B, L, H)
        return zero_absent(self.proj(h[:, 0]), mask), mask  # (B, D)


class HFText(nn.Module):
    """A Hugging Face text model from a local folder; its token states mean-pooled, then projected to D."""

    def __init__(self, dim: int, cfg: TextEncoderConfig):
        super().__init__()
        self.backbone = hf_model(cfg.path, "model.text.path")
        self.max_length = int(getattr(self.backbone.config, "max_position_embeddings", 0) or 1 << 30)
        self.proj = nn.Linear(self.backbone.config.hidden_size, dim)
        freeze(self.backbone, hf_blocks(self.backbone), cfg.freeze, "model.text.freeze")

    def train(self, mode: bool = True) -> HFText:
        super().train(mode)
        if mode:
            keep_frozen_in_eval(self.backbone)
        return self

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_length(ids, self.max_length, "the model's max_position_embeddings")
        ids, attn = clean_tokens(ids, attention_mask, mask)  # (B, L), (B, L)
        h = self.backbone(input_ids=ids, attention_mask=attn.long()).last_hidden_state  # (B, L, H)
        return zero_absent(self.proj(masked_mean(h, attn)), mask), mask  # (B, D)


def _check_length(ids: torch.Tensor, limit: int, what: str) -> None:
    if ids.shape[1] > limit:
        raise ConfigError(f"text has {ids.shape[1]} tokens but {what} is {limit}; lower data.max_text_tokens "
                          f"(the loader truncates to it) or raise the limit")


@dataclass(frozen=True)
class HFTokenizer:
    """What the loader and the augmentation need of an hf text encoder's tokenizer."""

    file: str  # its tokenizer.json, which the loader tokenises with
    special_ids: dict[str, int]  # SPECIAL_IDS -> id, for mmdata.augment's text config
    max_length: int | None  # the longest input the model takes, when its tokenizer says


def hf_tokenizer(cfg: TextEncoderConfig) -> HFTokenizer:
    """Read the tokenizer of the hf text encoder in ``cfg.path`` (local files only)."""
    from transformers import AutoTokenizer

    folder = existing(cfg.path, "model.text.path", "a local folder saved with save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - no tokenizer files in the folder
        raise ConfigError(f"model.text.path: no tokenizer in {str(folder)!r} (save it there with save_pretrained): "
                          f"{str(e).splitlines()[0]}") from None
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"model.text.path: {str(folder)!r} has no tokenizer.json, which the loader reads; save a "
                          f"fast tokenizer there: AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained()")
    ids = {"pad_id": tok.pad_token_id, "unk_id": tok.unk_token_id, "cls_id": tok.cls_token_id or tok.bos_token_id,
           "sep_id": tok.sep_token_id or tok.eos_token_id, "mask_id": tok.mask_token_id}
    fallback = tok.pad_token_id if tok.pad_token_id is not None else 0
    special = {k: int(fallback if v is None else v) for k, v in ids.items()}
    limit = getattr(tok, "model_max_length", None)
    return HFTokenizer(str(file), special, int(limit) if limit and limit < 1 << 30 else None)


def build_text_encoder(cfg: TextEncoderConfig, dim: int, dropout: float = 0.0) -> nn.Module:
    """The text encoder ``cfg`` names, with output width ``dim``."""
    if cfg.kind == "hf":
        return HFText(dim, cfg)
    if not cfg.vocab_size or cfg.vocab_size < 1:
        raise ConfigError(f"model.text.vocab_size must be set to the tokenizer's vocabulary size, "
                          f"got {cfg.vocab_size!r}")
    if cfg.kind == "bag":
        return TextBag(dim, cfg.vocab_size)
    return TextBert(dim, cfg.vocab_size, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                    max_length=cfg.max_length, dropout=dropout)
