"""The shared trunk (an MLP over fused features) and one output head per task."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mmdata.errors import ConfigError
from mmdata.tasks import Task


class Trunk(nn.Module):
    """``depth`` blocks of Linear -> LayerNorm -> GELU -> Dropout; depth 0 is the identity."""

    def __init__(self, in_dim: int, width: int, depth: int, dropout: float = 0.0):
        super().__init__()
        if depth < 0 or width < 1:
            raise ConfigError(f"model.trunk_depth must be >= 0 and model.trunk_width >= 1, "
                              f"got {depth} and {width}")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout)]
            d = width
        self.body = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, in_dim) -> (B, out_dim)

    def last_layer(self) -> nn.Module | None:
        """The last Linear of the trunk (GradNorm's shared layer), or None for an identity trunk."""
        linears = [m for m in self.body if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None


class TaskHead(nn.Module):
    """A linear head with ``task.num_outputs`` outputs (logits, or standardised regression values)."""

    def __init__(self, task: Task, in_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, task.num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # (B, C)


class TaskHeads(nn.ModuleDict):
    """One TaskHead per task, keyed by task name: (B, in_dim) -> {task: (B, C)}."""

    def __init__(self, tasks: Iterable[Task], in_dim: int):
        super().__init__({_key(t.name): TaskHead(t, in_dim) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(x) for name, head in self.items()}


class _Stats(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dims))
        self.register_buffer("std", torch.ones(dims))


class TargetScaler(nn.Module):
    """Mean and std of each regression task's targets, as buffers (saved with the model's state).

    Regression heads predict (y - mean) / std; ``denormalize`` maps predictions back to original units.
    """

    def __init__(self, tasks: Iterable[Task]):
        super().__init__()
        self.stats = nn.ModuleDict({_key(t.name): _Stats(t.dims) for t in tasks if t.type == "regression"})

    def set(self, task: str, mean, std) -> None:
        """Set a regression task's target mean and std (scalars or (D,), original units; std > 0)."""
        if task not in self.stats:
            raise ConfigError(f"task {task!r} is not a regression task of this model; "
                              f"regression tasks are {list(self.stats.keys())}")
        s = self.stats[task]
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).expand_as(s.mean)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1).expand_as(s.std)
        if not torch.isfinite(mean_t).all() or not (torch.isfinite(std_t) & (std_t > 0)).all():
            raise ConfigError(f"task {task!r}: target mean must be finite and std positive, "
                              f"got mean={mean_t.tolist()} std={std_t.tolist()}")
        s.mean.copy_(mean_t)
        s.std.copy_(std_t)

    def as_dict(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{task: (mean (D,), std (D,))} for every regression task."""
        return {name: (s.mean, s.std) for name, s in self.stats.items()}

    def denormalize(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map regression outputs to original units (float32); other tasks pass through."""
        out = dict(outputs)
        for name, s in self.stats.items():
            if name in out:
                out[name] = out[name].float() * s.std + s.mean
        return out


def _key(name: str) -> str:
    if not name or "." in name:
        raise ConfigError(f"task name {name!r} cannot name a model head; use a name without dots")
    return name
