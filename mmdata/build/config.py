"""BuildConfig: every choice a build makes, frozen, filled from YAML, CLI flags and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..tasks import Task

IMAGE_FORMATS = ("keep", "png", "jpg", "webp")
AUDIO_FORMATS = ("flac", "wav")
MODALITIES = ("image", "audio", "text")
# fields that change how fast a build runs, never what it writes: kept out of the card
RUNTIME_FIELDS = ("workers",)


@dataclass(frozen=True)
class BuildConfig:
    """How raw records become a dataset; the resolved form (minus workers) goes into the card."""

    tasks: tuple[Task, ...] = ()  # empty: inferred from the label values
    required: tuple[str, ...] = ()  # modalities a record must have; a record with none at all is always a reject
    # manifest / label-table columns
    id_column: str = "id"
    split_column: str = "split"
    image_column: str = "image"
    audio_column: str = "audio"
    text_column: str = "text"
    ignore_columns: tuple[str, ...] = ()  # columns that are neither media nor labels
    labels_file: str | None = None  # stems layout: label table, relative to the source root
    # splits
    split_by: str | None = None
    val: float = 0.0
    test: float = 0.0
    test_groups: tuple[str, ...] = ()
    seed: int = 0
    # shards
    max_samples: int = 1000
    max_bytes: int = 256 * 2**20
    # image
    image_format: str = "keep"  # keep jpg/png/webp bytes; re-encode anything else to png
    image_quality: int = 90
    max_side: int | None = None
    max_pixels: int = 64_000_000
    # audio
    sample_rate: int | None = None  # None: the native rate when all inputs agree, else 16000
    channels: int = 1
    audio_format: str = "flac"
    max_audio_seconds: float = 600.0
    # text and files
    max_file_bytes: int = 256 * 2**20
    tokenizer_vocab: int = 2000  # 0: no tokenizer
    max_reject_fraction: float = 0.01
    workers: int | None = None  # None: CPU count

    def __post_init__(self) -> None:
        for name in ("max_samples", "max_bytes", "max_pixels", "max_file_bytes", "channels"):
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
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"build config {str(path)!r} does not exist; give an existing YAML file") from None
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


def replace(config: BuildConfig, **changes: Any) -> BuildConfig:
    """dataclasses.replace, re-running validation."""
    return dataclasses.replace(config, **changes)


__all__ = ["BuildConfig", "replace"]
