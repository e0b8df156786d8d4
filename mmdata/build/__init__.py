"""Build side: turn raw folders, manifests or tar shards into a checked, sharded dataset."""

from .config import BuildConfig
from .runner import build_dataset

__all__ = ["BuildConfig", "build_dataset"]
