"""Mask-aware fusion of per-modality features {modality: (B, D)} with presence masks {modality: (B,)}.

Every fusion first zeroes the features of absent samples with ``torch.where`` (NaN-safe), so what an
absent modality's row holds never reaches the output, and a sample with no modality present still
gives a finite output. Feature fusions map to (B, out_dim); ``LateFusion`` combines per-modality
task outputs instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmdata.errors import ConfigError

FUSIONS = ("concat", "late", "attention", "gated", "tensor", "transformer")


@dataclass(frozen=True)
class FusionConfig:
    SHORTHAND: ClassVar[str] = "name"  # `fusion: late` in a config means {name: late}

    name: str = "concat"  # one of FUSIONS
    rank: int = 4  # tensor: rank of the factors
    out_dim: int | None = None  # tensor: output width (default embed_dim)
    heads: int = 4  # transformer
    layers: int = 1  # transformer
    late_weights: str | dict[str, float] = "mean"  # late: "mean", "learned", or fixed {modality: weight}
    # late: the tasks each modality's branch predicts, {modality: [task, ...]}; a modality not named
    # predicts every task. A branch learns a task only from samples that have both, so training on a
    # mixture fills this in from the data (images labelled with parity, speech without: the audio branch
    # has no parity head and the image branch alone decides parity). null: every branch, every task.
    branch_tasks: dict[str, tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        if self.name not in FUSIONS:
            raise ConfigError(f"model.fusion.name must be one of {list(FUSIONS)}, got {self.name!r}")
        if self.branch_tasks is not None:
            if self.name != "late":
                raise ConfigError(f"model.fusion.branch_tasks needs late fusion (each modality's own heads), "
                                  f"got model.fusion.name {self.name!r}; set it to null")
            bad = {m: v for m, v in self.branch_tasks.items() if isinstance(v, str) or not isinstance(v, (list, tuple))
                   or not v or not all(isinstance(t, str) for t in v)}
            if bad:
                raise ConfigError(f"model.fusion.branch_tasks gives each modality a non-empty list of task names, "
                                  f"got {bad}")
            object.__setattr__(self, "branch_tasks", {m: tuple(v) for m, v in self.branch_tasks.items()})


def _stack(feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
           modalities: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, M, D) with absent rows zeroed, and the presence mask (B, M)."""
    mask = torch.stack([masks[m].bool() for m in modalities], dim=1)  # (B, M)
    z = torch.stack([feats[m] for m in modalities], dim=1)  # (B, M, D)
    return torch.where(mask[..., None], z, torch.zeros((), dtype=z.dtype, device=z.device)), mask


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of scores over ``dim`` among True entries of mask; all-False slices give zeros, not NaN."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask.to(scores.dtype)


class ConcatFusion(nn.Module):
    """Concatenate features (absent -> zeros) and the presence indicators: (B, M*D + M)."""

    def __init__(self, modalities: tuple[str, ...], dim: int):
        super().__init__()
        self.modalities = modalities
        self.out_dim = len(modalities) * (dim + 1)

    def forward(self, feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        z, mask = _stack(feats, masks, self.modalities)  # (B, M, D), (B, M)
        return torch.cat([z.flatten(1), mask.to(z.dtype)], dim=1)


class AttentionFusion(nn.Module):
    """Weighted sum of features with softmax weights scored per sample over present modalities: (B, D)."""

    def __init__(self, modalities: tuple[str, ...], dim: int, hidden: int | None = None):
        super().__init__()
        self.modalities = modalities
        self.out_dim = dim
        # No bias on the last layer: one constant added to every modality's score cancels in the softmax,
        # so its gradient is exactly zero; modality_bias shifts modalities apart instead.
        self.score = nn.Sequential(nn.Linear(dim, hidden or dim), nn.Tanh(), nn.Linear(hidden or dim, 1, bias=False))
        self.modality_bias = nn.Parameter(torch.zeros(len(modalities)))

    def forward(self, feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        z, mask = _stack(feats, masks, self.modalities)  # (B, M, D), (B, M)
        scores = self.score(z).squeeze(-1) + self.modality_bias  # (B, M)
        w = masked_softmax(scores, mask, dim=1)  # (B, M)
        return (w.unsqueeze(-1) * z).sum(1)  # (B, D)


class GatedFusion(nn.Module):
    """Gated multimodal unit (Arevalo et al. 2017) for M modalities: per-dimension gates over present ones.

    h_m = tanh(W_m z_m); gates = softmax over present m of (W_g [z_1..z_M, presence]); out = sum_m g_m h_m.
    With two modalities the softmax is the GMU's sigmoid gate z and (1 - z).
    """

    def __init__(self, modalities: tuple[str, ...], dim: int):
        super().__init__()
        self.modalities = modalities
        self.out_dim = dim
        M = len(modalities)
        self.transform = nn.ModuleList(nn.Linear(dim, dim) for _ in modalities)
        self.gate = nn.Linear(M * (dim + 1), M * dim)

    def forward(self, feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        z, mask = _stack(feats, masks, self.modalities)  # (B, M, D), (B, M)
        B, M, D = z.shape
        h = torch.stack([torch.tanh(f(z[:, i])) for i, f in enumerate(self.transform)], dim=1)  # (B, M, D)
        logits = self.gate(torch.cat([z.flatten(1), mask.to(z.dtype)], dim=1)).view(B, M, D)
        g = masked_softmax(logits, mask[..., None].expand(B, M, D), dim=1)  # (B, M, D)
        return (g * h).sum(1)  # (B, D)


class LowRankTensorFusion(nn.Module):
    """Low-rank multimodal fusion (Liu et al. 2018): sum_r w_r prod_m ([z_m, 1] W_m^r) + b: (B, out_dim).

    Every factor is a registered ``nn.Parameter`` (one per modality, in a ParameterList), so all of
    them train. An absent modality's factor term is the multiplicative identity: it contributes nothing.
    """

    def __init__(self, modalities: tuple[str, ...], dim: int, rank: int = 4, out_dim: int | None = None):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"model.fusion.rank must be positive, got {rank}")
        self.modalities = modalities
        self.out_dim = out_dim or dim
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(rank, dim + 1, self.out_dim)) for _ in modalities)
        self.rank_weights = nn.Parameter(torch.empty(1, rank))
        self.bias = nn.Parameter(torch.zeros(self.out_dim))
        for f in self.factors:
            nn.init.xavier_normal_(f)
        nn.init.xavier_normal_(self.rank_weights)

    def forward(self, feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        z, mask = _stack(feats, masks, self.modalities)  # (B, M, D), (B, M)
        ones = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
        fused = None
        for i, factor in enumerate(self.factors):
            zi = torch.cat([z[:, i], ones], dim=1)  # (B, D+1)
            term = torch.einsum("bd,rdo->bro", zi, factor.to(zi.dtype))  # (B, R, O)
            term = torch.where(mask[:, i, None, None], term, torch.ones((), dtype=term.dtype, device=z.device))
            fused = term if fused is None else fused * term
        w = self.rank_weights.to(fused.dtype)  # (1, R)
        return torch.einsum("xr,bro->bo", w, fused) + self.bias.to(fused.dtype)  # (B, O)


class TransformerFusion(nn.Module):
    """Cross-modal transformer: a token per modality plus a CLS token; absent tokens are key-padded."""

    def __init__(self, modalities: tuple[str, ...], dim: int, heads: int = 4, layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.embed_dim ({dim}) must be divisible by model.fusion.heads ({heads})")
        self.modalities = modalities
        self.out_dim = dim
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Parameter(torch.zeros(1, len(modalities), dim))
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.modality_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        z, mask = _stack(feats, masks, self.modalities)  # (B, M, D), (B, M)
        B = z.shape[0]
        tokens = torch.cat([self.cls.expand(B, -1, -1).to(z.dtype), z + self.modality_embed.to(z.dtype)], 1)
        # (B, 1+M): True = ignore as a key; the CLS token is always attended, so no row is all-masked.
        pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=z.device), ~mask], dim=1)
        h = self.encoder(tokens, src_key_padding_mask=pad)  # (B, 1+M, D)
        return self.norm(h[:, 0])  # (B, D)


class LateFusion(nn.Module):
    """Combine per-modality task outputs: a weighted mean over the modalities present in each sample.

    ``weights="mean"`` weighs every modality alike; a mapping such as ``{"audio": 0.5}`` fixes a
    modality's weight (unnamed ones weigh 1), for a modality known to generalise worse; ``"learned"``
    keeps one logit per (task, modality), the weights a softmax over the present modalities (with
    ``branch_tasks``, one per (task, modality that predicts it), for tasks two or more predict). Weights
    are renormalised over what is present, so a sample with one modality gets that modality's output
    unchanged; a sample with none gets zeros. With ``branch_tasks`` a task's mean is over the present
    modalities whose branch predicts it (``outputs[m]`` holds only those tasks).
    """

    def __init__(self, modalities: tuple[str, ...], tasks: list[str], weights: str | dict[str, float] = "mean",
                 branch_tasks: dict[str, tuple[str, ...]] | None = None):
        super().__init__()
        self.modalities = modalities
        self.tasks = list(tasks)
        self.voters = branch_voters(modalities, self.tasks, branch_tasks)
        self.logits = None  # (T, M), learned weights without branch_tasks
        self.task_logits = None  # {task: (M_t,)}, learned weights with branch_tasks
        fixed = torch.ones(len(modalities))
        if isinstance(weights, dict):
            unknown = sorted(set(weights) - set(modalities))
            if unknown or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and v > 0 for v in weights.values()):
                raise ConfigError(f"model.fusion.late_weights {weights!r}: give a positive weight per modality of "
                                  f"{list(modalities)}")
            fixed = torch.tensor([float(weights.get(m, 1.0)) for m in modalities])
        elif weights == "learned" and branch_tasks is None:
            self.logits = nn.Parameter(torch.zeros(len(tasks), len(modalities)))
        elif weights == "learned":  # a logit per branch that predicts the task, where two or more do
            counts = [len(modalities) if v is None else len(v) for v in self.voters]
            self.task_logits = nn.ParameterDict({task: nn.Parameter(torch.zeros(n)) for task, n in
                                                zip(self.tasks, counts) if n > 1})
        elif weights != "mean":
            raise ConfigError(f"model.fusion.late_weights must be 'mean', 'learned' or a mapping such as "
                              f"{{audio: 0.5}}, got {weights!r}")
        self.register_buffer("fixed", fixed, persistent=False)  # (M,)

    def forward(self, outputs: dict[str, dict[str, torch.Tensor]],
                masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """outputs[modality][task]: (B, C) -> {task: (B, C)}."""
        everyone = torch.stack([masks[m].bool() for m in self.modalities], dim=1)  # (B, M)
        combined = {}
        for t, task in enumerate(self.tasks):
            voters = self.voters[t]  # None: every modality's branch predicts the task
            mask, fixed = everyone, self.fixed
            logits = None if self.logits is None else self.logits[t]  # (M,)
            if voters is not None:  # only the branches that have the task: (B, M_t), (M_t,)
                mask, fixed = everyone[:, voters], fixed[voters]
            if self.task_logits is not None and task in self.task_logits:  # a lone voter weighs 1: no logit
                logits = self.task_logits[task]
            y = torch.stack([outputs[self.modalities[i]][task] for i in voters or range(len(self.modalities))],
                            dim=1)  # (B, M_t, C)
            y = torch.where(mask[..., None], y, torch.zeros((), dtype=y.dtype, device=y.device))
            if logits is None:
                w = mask.to(y.dtype) * fixed.to(y.dtype)  # (B, M_t)
                w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
            else:
                w = masked_softmax(logits.to(y.dtype).expand_as(mask), mask, dim=1)  # (B, M_t)
            combined[task] = (w.unsqueeze(-1) * y).sum(1)  # (B, C)
        return combined


def branch_voters(modalities: tuple[str, ...], tasks: list[str],
                  branch_tasks: dict[str, tuple[str, ...]] | None) -> list[list[int] | None]:
    """Per task, the indices of the modalities whose branch predicts it; None where every one does."""
    branch_tasks = branch_tasks or {}
    unknown = sorted(set(branch_tasks) - set(modalities))
    strangers = sorted({t for ts in branch_tasks.values() for t in ts} - set(tasks))
    if unknown or strangers:
        raise ConfigError(f"model.fusion.branch_tasks names modalities {unknown} and tasks {strangers} the model "
                          f"lacks; it has modalities {list(modalities)} and tasks {tasks}")
    out: list[list[int] | None] = []
    for task in tasks:
        voters = [i for i, m in enumerate(modalities) if task in branch_tasks.get(m, tasks)]
        if not voters:
            raise ConfigError(f"model.fusion.branch_tasks gives task {task!r} to no modality's branch; "
                              f"add it to one of {list(modalities)}")
        out.append(None if len(voters) == len(modalities) else voters)
    return out


def build_fusion(cfg: FusionConfig, modalities: tuple[str, ...], dim: int, dropout: float = 0.0) -> nn.Module:
    """Build a feature fusion (every name in FUSIONS but 'late', which the model builds per task)."""
    if cfg.name == "concat":
        return ConcatFusion(modalities, dim)
    if cfg.name == "attention":
        return AttentionFusion(modalities, dim)
    if cfg.name == "gated":
        return GatedFusion(modalities, dim)
    if cfg.name == "tensor":
        return LowRankTensorFusion(modalities, dim, rank=cfg.rank, out_dim=cfg.out_dim)
    if cfg.name == "transformer":
        return TransformerFusion(modalities, dim, heads=cfg.heads, layers=cfg.layers, dropout=dropout)
    raise ConfigError(f"model.fusion.name must be one of {FUSIONS}, got {cfg.name!r}")
