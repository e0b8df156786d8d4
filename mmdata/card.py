"""The dataset card (dataset.json) and the index schema: what a reader trusts about a dataset."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SchemaError
from .format import FORMAT_VERSION
from .tasks import Task, TaskList

TOOL_VERSION = "0.1.0"

# index.parquet: one row per sample. Task columns (one per task, named ``label:<task>``) hold the
# stored label (class index; index list; float list) or null.
INDEX_COLUMNS = (
    "key", "split", "shard", "offset", "size", "modalities",
    "image_width", "image_height", "audio_seconds", "text_chars", "source_id",
)
LABEL_PREFIX = "label:"


@dataclass(frozen=True)
class ShardInfo:
    file: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[ShardInfo, ...]
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> class/"missing" -> n

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass(frozen=True)
class Card:
    """Everything in dataset.json."""

    modalities: dict[str, dict[str, Any]]  # e.g. {"image": {"format": "png"}, "audio": {"sample_rate": 16000, ...}}
    tasks: TaskList
    splits: dict[str, SplitInfo]
    build_config: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)  # {"input": n, "written": n, "rejected": {reason: n}}
    format_version: int = FORMAT_VERSION
    tool_version: str = TOOL_VERSION

    def to_json(self) -> str:
        d = {
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "modalities": self.modalities,
            "tasks": [t.to_dict() for t in self.tasks],
            "splits": {
                name: {"shards": [asdict(s) for s in info.shards], "samples": info.num_samples,
                       "label_counts": info.label_counts}
                for name, info in self.splits.items()
            },
            "build_config": self.build_config,
            "counts": self.counts,
        }
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Card:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"dataset.json is not valid JSON: {e}") from None
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise SchemaError(f"dataset.json has format_version {version!r}; this mmdata reads {FORMAT_VERSION}")
        try:
            splits = {
                name: SplitInfo(tuple(ShardInfo(**s) for s in info["shards"]), info.get("label_counts", {}))
                for name, info in d["splits"].items()
            }
            return cls(
                modalities=d["modalities"],
                tasks=TaskList(tuple(Task.from_dict(t) for t in d["tasks"])),
                splits=splits,
                build_config=d.get("build_config", {}),
                counts=d.get("counts", {}),
                format_version=version,
                tool_version=d.get("tool_version", "?"),
            )
        except (KeyError, TypeError) as e:
            raise SchemaError(f"dataset.json lacks or mistypes a field: {e}") from None
