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


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source.

    Read on first use of ``mmdata.__version__``: importlib.metadata costs more than the rest of ``import mmdata``.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmdata")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


_LAZY = {
    "open_dataset": "dataset",
    "Dataset": "dataset",
    "make_loader": "loader",
    "Loader": "loader",
    "LoaderConfig": "loader",
    "Mixture": "mixture",
    "Batch": "batch",
    "build_dataset": "build",
}

__all__ = [
    "open_dataset", "Dataset", "make_loader", "Loader", "LoaderConfig", "Mixture", "Batch", "build_dataset",
    "MmdataError", "ConfigError", "SchemaError", "DatasetNotFoundError", "CorruptShardError", "DecodeError",
    "RejectThresholdError",
]


def __getattr__(name: str):
    if name == "__version__":
        globals()[name] = _version()
        return globals()[name]
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmdata' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
