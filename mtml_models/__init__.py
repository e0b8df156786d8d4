"""mtml_models: reference multi-task fusion models for mmdata datasets.

Encoders per modality -> a mask-aware fusion -> a shared trunk -> one head per task, masked
per-task losses, task-loss weighting kept apart from the model, and streaming per-task metrics.
Names are imported lazily, so ``import mtml_models`` (and the ``mtml`` CLI's help) stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "load_config": "config",
    "ModelConfig": "model",
    "MultiTaskModel": "model",
    "FusionConfig": "fusion",
    "FUSIONS": "fusion",
    "task_losses": "losses",
    "Weighting": "weighting",
    "WEIGHTINGS": "weighting",
    "make_weighting": "weighting",
    "MetricSet": "metrics",
    "delta_m": "metrics",
    "selection_score": "metrics",
    "HIGHER_IS_BETTER": "metrics",
    "train": "train",
    "evaluate_run": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
