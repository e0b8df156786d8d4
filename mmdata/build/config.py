"""BuildConfig: every choice a build makes, frozen, filled from YAML, CLI flags and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..tasks import Task
from .guard import Refused, read_regular

IMAGE_FORMATS = ("keep", "png", "jpg", "webp")
AUDIO_FORMATS = ("flac", "wav")
MODALITIES = ("image", "audio", "text")
# fields that change how fast a build runs, never what it writes: kept out of the card
RUNTIME_FIELDS = ("workers",)
MAX_CONFIG_BYTES = 2**20


def key(default: Any, doc: str) -> Any:
    """A config field with its one-line documentation (shown by ``mmdata build --help``)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class BuildConfig:
    """How raw records become a dataset; the resolved form (minus workers) goes into the card."""

    tasks: tuple[Task, ...] = key((), "label tasks {name: {type, classes, column, dims}}; empty: one task inferred "
                                     "per label column (strings/ints: classification, floats: regression, lists: "
                                     "multilabel)")
    required: tuple[str, ...] = key((), "modalities every record must have, e.g. [image, audio]; a record with no "
                                        "modality at all is always rejected")
    # manifest / label-table columns
    id_column: str = key("id", "manifest or label-table column holding each record's id")
    split_column: str = key("split", "column naming a record's split (train, val/valid/dev, test)")
    image_column: str = key("image", "manifest column with the image path (relative to the manifest)")
    audio_column: str = key("audio", "manifest column with the audio path")
    text_column: str = key("text", "manifest column with the text: a .txt path or the text itself")
    ignore_columns: tuple[str, ...] = key((), "columns that are neither media nor labels")
    labels_file: str | None = key(None, "stems layout: the label table, relative to the source root "
                                        "(default: labels.csv/.jsonl/.parquet if present)")
    # splits
    split_by: str | None = key(None, "label column whose values never straddle two splits (e.g. speaker)")
    val: float = key(0.0, "fraction of records (whole groups with split_by) for the val split")
    test: float = key(0.0, "fraction of records (whole groups with split_by) for the test split")
    test_groups: tuple[str, ...] = key((), "values of split_by that make up the test split")
    seed: int = key(0, "seed of the split assignment and the shard shuffle")
    # shards
    max_samples: int = key(1000, "samples per shard at most")
    max_bytes: int = key(256 * 2**20, "bytes per shard at most")
    # image
    image_format: str = key("keep", "keep jpg/png/webp bytes as they are (anything else becomes png), or "
                                    "re-encode every image to png, jpg or webp")
    image_quality: int = key(90, "jpg/webp quality when re-encoding")
    max_side: int | None = key(None, "downscale images whose longer side exceeds this (pixels)")
    max_pixels: int = key(64_000_000, "reject images with more pixels than this (too_large)")
    # audio
    sample_rate: int | None = key(None, "stored audio rate in Hz; null: the native rate when all inputs agree, "
                                        "else 16000")
    channels: int = key(1, "stored audio channels (1 mixes down)")
    audio_format: str = key("flac", "stored audio format: flac or wav")
    max_audio_seconds: float = key(600.0, "reject clips longer than this (too_large)")
    # text and files
    max_file_bytes: int = key(256 * 2**20, "reject input files larger than this (too_large)")
    tokenizer_vocab: int = key(2000, "vocabulary of the tokenizer trained on the train split's text; 0: none")
    tokenizer_sample_bytes: int = key(50 * 2**20, "the tokenizer trains on the train split's text up to this "
                                                  "many bytes (in shard order), so its memory stays bounded")
    max_reject_fraction: float = key(0.01, "the build fails (exit 1, dataset still written) when more records "
                                           "than this fraction are rejected")
    # dataset card (README.md)
    license: str | None = key(None, "Hugging Face licence id for the README.md header, e.g. mit or cc-by-4.0")
    pretty_name: str | None = key(None, "the dataset's display name: the README.md title and its header's "
                                        "pretty_name")
    workers: int | None = key(None, "encoding processes; null: the CPU count (not stored in the card)")

    def __post_init__(self) -> None:
        for name in ("max_samples", "max_bytes", "max_pixels", "max_file_bytes", "channels", "tokenizer_sample_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("val", "test", "max_reject_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be a fraction in [0, 1], got {v}")
        if self.val + self.test >= 1.0:
            raise ConfigError(f"val + test must leave some training data, got val={self.val} test={self.test}")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.audio_format not in AUDIO_FORMATS:
            raise ConfigError(f"audio_format must be one of {AUDIO_FORMATS}, got {self.audio_format!r}")
        bad = [m for m in self.required if m not in MODALITIES]
        if bad:
            raise ConfigError(f"required modalities must be among {MODALITIES}, got {bad}")
        if self.sample_rate is not None and self.sample_rate < 1:
            raise ConfigError(f"sample_rate must be positive or null (auto), got {self.sample_rate}")
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError(f"max_side must be positive or null, got {self.max_side}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be positive, got {self.workers}")
        if self.license is not None and (not isinstance(self.license, str) or not self.license
                                         or any(c.isspace() for c in self.license)):
            raise ConfigError(f"license must be a Hugging Face licence id such as mit or cc-by-4.0, got "
                              f"{self.license!r}")
        if self.pretty_name is not None and (not isinstance(self.pretty_name, str) or not self.pretty_name.strip()
                                             or "\n" in self.pretty_name):
            raise ConfigError(f"pretty_name must be a one-line name, got {self.pretty_name!r}")
        if self.test_groups and not self.split_by:
            raise ConfigError("test_groups needs split_by (the column that names the groups), e.g. --split-by speaker")

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON values, without the runtime-only fields."""
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name in RUNTIME_FIELDS:
                continue
            v = getattr(self, f.name)
            if f.name == "tasks":
                v = {t.name: {k: x for k, x in t.to_dict().items() if k != "name"} for t in v}
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildConfig:
        """Build from a YAML/JSON mapping; ``tasks`` is ``{name: {type, classes, column, dims}}``."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown build config keys {unknown}; known keys: {sorted(known)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k == "tasks":
                v = _tasks_from(v)
            elif isinstance(v, list):
                v = tuple(str(x) for x in v)
            kw[k] = v
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"bad build config: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> BuildConfig:
        import yaml

        try:
            data = yaml.safe_load(read_regular(path, MAX_CONFIG_BYTES, "build config").decode("utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"build config {str(path)!r} does not exist; give an existing YAML file") from None
        except Refused as e:
            raise ConfigError(f"{e.message}; give a YAML file") from None
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"build config {str(path)!r} is not UTF-8 YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"build config {str(path)!r} must be a mapping of keys to values")
        return cls.from_dict(data)

    def with_overrides(self, pairs: list[str] | dict[str, Any]) -> BuildConfig:
        """Return a copy with ``key=value`` overrides applied (values parsed as YAML scalars)."""
        import yaml

        if isinstance(pairs, dict):
            items = dict(pairs)
        else:
            items = {}
            for p in pairs:
                key, sep, raw = p.partition("=")
                if not sep or not key:
                    raise ConfigError(f"override must look like key=value, got {p!r}")
                items[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        base = self.to_dict()
        base["workers"] = self.workers
        base.update(items)
        return BuildConfig.from_dict(base)


def _tasks_from(v: Any) -> tuple[Task, ...]:
    if isinstance(v, (list, tuple)) and all(isinstance(t, Task) for t in v):
        return tuple(v)
    if isinstance(v, dict):
        return tuple(Task.from_dict(spec or {}, name=str(name)) for name, spec in v.items())
    if isinstance(v, list):
        return tuple(Task.from_dict(spec) for spec in v)
    raise ConfigError(f"tasks must map task names to {{type, classes, column}}, got {type(v).__name__}")


def config_keys_help() -> str:
    """Every build config key with its default and meaning: the epilog of ``mmdata build --help``."""
    lines = ["build config keys (YAML file given by --config, or --set KEY=VALUE); see docs/build-config.md:"]
    for f in fields(BuildConfig):
        default = f.default
        shown = "{}" if f.name == "tasks" else "[]" if default == () else "null" if default is None else default
        lines.append(f"  {f.name} (default {shown})")
        lines += textwrap.wrap(f.metadata["doc"], 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def replace(config: BuildConfig, **changes: Any) -> BuildConfig:
    """dataclasses.replace, re-running validation."""
    return dataclasses.replace(config, **changes)


__all__ = ["BuildConfig", "config_keys_help", "replace"]
