"""mmdata: aligned multimodal datasets as sharded WebDataset tars, streamed into PyTorch.

Imports are lazy so ``import mmdata`` stays light (no torch until a loader or batch is touched).
"""

from __future__ import annotations

import importlib

from .errors import (
    ConfigError,
    CorruptShardError,
    DatasetNotFoundError,
    DecodeError,
    MmdataError,
    RejectThresholdError,
    SchemaError,
)

__version__ = "0.1.0"

_LAZY = {
    "open_dataset": "dataset",
    "Dataset": "dataset",
    "make_loader": "loader",
    "Loader": "loader",
    "LoaderConfig": "loader",
    "Batch": "batch",
    "build_dataset": "build",
}

__all__ = [
    "open_dataset", "Dataset", "make_loader", "Loader", "LoaderConfig", "Batch", "build_dataset",
    "MmdataError", "ConfigError", "SchemaError", "DatasetNotFoundError", "CorruptShardError", "DecodeError",
    "RejectThresholdError",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmdata' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
