"""The one exception tree of mmdata: each error also inherits the matching builtin."""

from __future__ import annotations


class MmdataError(Exception):
    """Base class of every error mmdata raises on purpose."""


class ConfigError(MmdataError, ValueError):
    """A configuration value is invalid; the message names it and the fix."""


class SchemaError(MmdataError, ValueError):
    """Input data does not match the expected layout or schema."""


class DatasetNotFoundError(MmdataError, FileNotFoundError):
    """A dataset, shard or input path does not exist."""


class CorruptShardError(MmdataError, OSError):
    """A shard is missing, truncated or does not match its card."""


class DecodeError(MmdataError, ValueError):
    """A stored member cannot be decoded."""


class RejectThresholdError(MmdataError, RuntimeError):
    """A build rejected more records than max_reject_fraction allows."""
