"""ModelConfig and MultiTaskModel: encoders -> mask-aware fusion -> shared trunk -> one head per task."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmdata.batch import MODALITIES, Batch
from mmdata.errors import ConfigError
from mmdata.tasks import Task, TaskList

from . import schema
from .encoders import AudioEncoderConfig, ImageEncoderConfig, TextEncoderConfig, build_encoder, encoder_inputs
from .fusion import FusionConfig, LateFusion, build_fusion
from .heads import TargetScaler, TaskHeads, Trunk


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes a MultiTaskModel; ``from_dict`` fills it from a YAML/JSON section."""

    modalities: tuple[str, ...] = ("image", "audio")
    embed_dim: int = 128
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    trunk_depth: int = 1
    trunk_width: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        mods = (self.modalities,) if isinstance(self.modalities, str) else tuple(self.modalities)
        object.__setattr__(self, "modalities", mods)
        if not mods or len(set(mods)) != len(mods) or not set(mods) <= set(MODALITIES):
            raise ConfigError(f"model.modalities must be a non-empty list of distinct names from "
                              f"{list(MODALITIES)}, got {list(mods)}")
        if self.embed_dim < 1:
            raise ConfigError(f"model.embed_dim must be positive, got {self.embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "the model config") -> ModelConfig:
        """Build from nested dicts; ``fusion`` may be just its name. Unknown keys raise ConfigError."""
        schema.check_keys(cls, d or {}, source, "")
        return schema.fill(cls, d, "model")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-safe) that ``from_dict`` reads back to an equal config."""
        return schema.plain(self)


class MultiTaskModel(nn.Module):
    """Encoders -> fusion -> shared trunk -> heads; ``forward(batch) -> {task: (B, C)}``.

    Outputs are logits for classification and multilabel tasks and standardised values for
    regression (see ``set_target_stats`` and ``denormalize``). A modality the batch did not load
    (tensor None) counts as absent for every sample; with ``fusion.name == "late"`` each modality has
    its own trunk and heads, and the task outputs are combined over the present modalities.
    """

    def __init__(self, tasks: TaskList | Iterable[Task], cfg: ModelConfig | None = None):
        super().__init__()
        self.tasks = tasks if isinstance(tasks, TaskList) else TaskList(tuple(tasks))
        if not len(self.tasks):
            raise ConfigError("a MultiTaskModel needs at least one task; the dataset card lists none")
        self.cfg = cfg = cfg or ModelConfig()
        D = cfg.embed_dim
        self.encoders = nn.ModuleDict({
            m: build_encoder(m, getattr(cfg, m), D, dropout=cfg.dropout) for m in cfg.modalities})
        self.late = cfg.fusion.name == "late"
        if self.late:
            self.trunks = nn.ModuleDict({
                m: Trunk(D, cfg.trunk_width, cfg.trunk_depth, cfg.dropout) for m in cfg.modalities})
            # a branch has heads only for the tasks it predicts (fusion.branch_tasks; default every task)
            branch = cfg.fusion.branch_tasks or {}
            self.heads = nn.ModuleDict({
                m: TaskHeads([t for t in self.tasks if t.name in branch.get(m, self.tasks.names)],
                             self.trunks[m].out_dim) for m in cfg.modalities})
            self.fusion = LateFusion(cfg.modalities, self.tasks.names, weights=cfg.fusion.late_weights,
                                     branch_tasks=cfg.fusion.branch_tasks)
        else:
            self.fusion = build_fusion(cfg.fusion, cfg.modalities, D, dropout=cfg.dropout)
            self.fusion_dropout = nn.Dropout(cfg.dropout)
            self.trunk = Trunk(self.fusion.out_dim, cfg.trunk_width, cfg.trunk_depth, cfg.dropout)
            self.heads = TaskHeads(self.tasks, self.trunk.out_dim)
        self.target_scaler = TargetScaler(self.tasks)

    def encode(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-modality features {m: (B, D)} and presence masks {m: (B,)}; unloaded ones are zeros/False."""
        feats, masks = {}, {}
        for m, encoder in self.encoders.items():
            inputs = encoder_inputs(batch, m)
            if inputs is not None:
                feats[m], masks[m] = encoder(*inputs)
        if not feats:
            raise ConfigError(f"the batch holds none of the model's modalities {list(self.cfg.modalities)}; "
                              f"load at least one of them")
        ref = next(iter(feats.values()))
        for m in self.encoders:
            if m not in feats:
                feats[m] = torch.zeros_like(ref)
                masks[m] = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
        return feats, masks

    def forward(self, batch: Batch, parts: bool = False):
        """{task: output}; with ``parts=True`` (late fusion only) also {modality: {task: output}}."""
        feats, masks = self.encode(batch)
        if self.late:
            per_modality = {m: self.heads[m](self.trunks[m](feats[m])) for m in self.cfg.modalities}
            fused = self.fusion(per_modality, masks)
            return (fused, per_modality) if parts else fused
        if parts:
            raise ConfigError("per-modality outputs exist only with late fusion (model.fusion.name: late)")
        fused = self.fusion_dropout(self.fusion(feats, masks))  # (B, F)
        return self.heads(self.trunk(fused))

    def set_target_stats(self, task: str, mean, std) -> None:
        """Set a regression task's target mean and std in original units (from the train split)."""
        self.target_scaler.set(task, mean, std)

    @property
    def target_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{regression task: (mean (D,), std (D,))}, as ``losses.task_losses`` takes them."""
        return self.target_scaler.as_dict()

    def denormalize(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Regression outputs in original units (what metrics take); other tasks unchanged."""
        return self.target_scaler.denormalize(outputs)

    def _task_specific(self) -> set[int]:
        modules = [self.heads] + ([self.fusion] if self.late else [])
        return {id(p) for mod in modules for p in mod.parameters()}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss reaches: encoders, fusion and trunk (not the heads)."""
        specific = self._task_specific()
        return (p for p in self.parameters() if id(p) not in specific)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the last shared layer (GradNorm's W): the trunk's last Linear, else all shared."""
        trunks = list(self.trunks.values()) if self.late else [self.trunk]
        layers = [t.last_layer() for t in trunks]
        if any(layer is None for layer in layers):
            return list(self.shared_parameters())
        return [p for layer in layers for p in layer.parameters()]

    def branch_parameters(self) -> list[list[nn.Parameter]]:
        """Late fusion: each modality's encoder, trunk and heads, then whatever is left (the fusion's
        weights); otherwise one group of every parameter. Independent branches are clipped apart."""
        if not self.late:
            return [list(self.parameters())]
        groups = [[*self.encoders[m].parameters(), *self.trunks[m].parameters(), *self.heads[m].parameters()]
                  for m in self.cfg.modalities]
        seen = {id(p) for g in groups for p in g}
        rest = [p for p in self.parameters() if id(p) not in seen]
        return groups + ([rest] if rest else [])

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoders' pretrained backbones (``optim.backbone_lr_scale`` lowers their rate)."""
        return [p for m in self.cfg.modalities if getattr(self.cfg, m).pretrained
                for p in self.encoders[m].backbone.parameters()]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters of ``task``'s head(s)."""
        heads = list(self.heads.values()) if self.late else [self.heads]
        return [p for h in heads if task in h for p in h[task].parameters()]
