"""The one exception tree of mmdata: each error also inherits the matching builtin."""

from __future__ import annotations


class MmdataError(Exception):
    """Base class of every error mmdata raises on purpose."""

    exit_code = 1  # the CLI's exit status: the data (or the system) failed a check


class ConfigError(MmdataError, ValueError):
    """A configuration value is invalid; the message names it and the fix."""

    exit_code = 2  # a usage or config error


class SchemaError(MmdataError, ValueError):
    """Input data does not match the expected layout or schema."""


class DatasetNotFoundError(MmdataError, FileNotFoundError):
    """A dataset, shard or input path does not exist."""

    exit_code = 2  # most often a mistyped path on the command line


class CorruptShardError(MmdataError, OSError):
    """A shard is missing, truncated or does not match its card."""


class DecodeError(MmdataError, ValueError):
    """A stored member cannot be decoded."""


class RejectThresholdError(MmdataError, RuntimeError):
    """A build rejected more records than max_reject_fraction allows; raised after the dataset is written.

    ``card`` is the written dataset's card, so a caller can still report what was built.
    """

    def __init__(self, message: str, card=None):
        super().__init__(message)
        self.card = card


class OutputLockedError(MmdataError, BlockingIOError):
    """Another build is writing the same output folder; the message names it."""
