"""The dataset card (dataset.json) and the index schema: what a reader trusts about a dataset."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import __version__
from .errors import ConfigError, SchemaError
from .format import FORMAT_VERSION
from .tasks import Task, TaskList

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
    tool_version: str = __version__  # of the mmdata that wrote the card
    fingerprint: str = ""  # hash of the resolved config and every record's facts: what this build was made from

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
        if self.fingerprint:
            d["fingerprint"] = self.fingerprint
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Card:
        """Parse and check a card: every field of the right type, every shard a plain file name.

        A card is read from a folder that may not be ours, so nothing in it is trusted: a SchemaError
        names the first field that is missing or mistyped.
        """
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # also a number past int's digit limit, nesting too deep
            raise SchemaError(f"dataset.json is not valid JSON: {type(e).__name__}: {e}") from None
        if not isinstance(d, dict):
            raise SchemaError(f"dataset.json must hold a JSON object, got {_kind(d)}; rebuild the dataset")
        version = d.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise SchemaError(f"dataset.json has format_version {version!r}; this mmdata reads {FORMAT_VERSION}")
        modalities = _field(d, "modalities", dict)
        for name, spec in modalities.items():
            _check(spec, dict, f"modalities.{name}")
        rate = modalities.get("audio", {}).get("sample_rate")
        if rate is not None and (type(rate) is not int or rate < 1):
            raise SchemaError(f"dataset.json field 'modalities.audio.sample_rate' must be a positive integer, "
                              f"got {rate!r}; rebuild the dataset")
        tasks = TaskList(tuple(_task(t, f"tasks[{i}]") for i, t in enumerate(_field(d, "tasks", list))))
        if len(set(tasks.names)) != len(tasks):
            raise SchemaError(f"dataset.json field 'tasks' names a task twice: {tasks.names}; rebuild the dataset")
        splits, seen = {}, set()
        for name, info in _field(d, "splits", dict).items():
            where = f"splits.{name}"
            _check(info, dict, where)
            shards = []
            for i, s in enumerate(_field(info, "shards", list, where)):
                shard = _shard(s, f"{where}.shards[{i}]")
                if shard.file in seen:
                    raise SchemaError(f"dataset.json lists shard {shard.file!r} twice; rebuild the dataset")
                seen.add(shard.file)
                shards.append(shard)
            label_counts = _field(info, "label_counts", dict, where, {})  # absent: readers count the index
            for task, counts in label_counts.items():
                _check(counts, dict, f"{where}.label_counts.{task}")
                for label, n in counts.items():
                    _count(n, f"{where}.label_counts.{task}.{label}")
            splits[name] = SplitInfo(tuple(shards), label_counts)
        counts = _field(d, "counts", dict, default={})
        for key in ("input", "written"):
            if key in counts:
                _count(counts[key], f"counts.{key}")
        for reason, n in _field(counts, "rejected", dict, "counts", {}).items():
            _count(n, f"counts.rejected.{reason}")
        return cls(
            modalities=modalities, tasks=tasks, splits=splits,
            build_config=_field(d, "build_config", dict, default={}), counts=counts, format_version=version,
            tool_version=_field(d, "tool_version", str, default="?"),
            fingerprint=_field(d, "fingerprint", str, default=""),
        )


def count_labels(task: Task, values: Iterable[Any]) -> dict[str, int]:
    """A split's label counts of ``task`` as the card holds them, over its stored labels ``values``.

    {class: samples with it, ..., "missing": n}; for regression {"present": n, "missing": n}. SchemaError
    for a value that is not a stored label of the task (a class index out of range, a string).
    """
    counts = empty_label_counts(task)
    for v in values:
        add_label(counts, task, v)
    return counts


def empty_label_counts(task: Task) -> dict[str, int]:
    """Zero counts of ``task``, keys in the card's order: its classes (or "present"), then "missing"."""
    return dict.fromkeys(("present", "missing") if task.type == "regression" else (*task.classes, "missing"), 0)


def add_label(counts: dict[str, int], task: Task, value: Any) -> None:
    """Count one sample's stored label ``value`` of ``task`` into ``counts`` (from ``empty_label_counts``)."""
    if value is None:
        counts["missing"] += 1
    elif task.type == "regression":
        counts["present"] += 1
    else:
        indices = [value] if task.type == "classification" else value
        if not isinstance(indices, list) or not all(type(i) is int and 0 <= i < len(task.classes) for i in indices):
            raise SchemaError(f"label {value!r} is not a stored {task.type} label of task {task.name!r} (class "
                              f"indices below {len(task.classes)}); rebuild the dataset")
        for i in indices:
            counts[task.classes[i]] += 1


_REQUIRED = object()
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _kind(value: Any) -> str:
    """What a JSON value is, as a message says it: 'a list', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def _check(value: Any, kind: type, where: str) -> Any:
    if type(value) is not kind:  # not isinstance: a bool is not an int here
        raise SchemaError(f"dataset.json field {where!r} must be {_TYPE_NAMES[kind]}, got {_kind(value)}; "
                          "rebuild the dataset")
    return value


def _field(d: dict, name: str, kind: type, parent: str = "", default: Any = _REQUIRED) -> Any:
    """``d[name]`` checked to be of ``kind``; ``default`` when absent (a SchemaError when required)."""
    where = f"{parent}.{name}" if parent else name
    if name not in d:
        if default is _REQUIRED:
            raise SchemaError(f"dataset.json lacks field {where!r}; rebuild the dataset")
        return default
    return _check(d[name], kind, where)


def _count(value: Any, where: str) -> int:
    if type(value) is not int or value < 0:
        raise SchemaError(f"dataset.json field {where!r} must be a count (an integer of 0 or more), got "
                          f"{value!r}; rebuild the dataset")
    return value


SHARD_FIELDS = ("file", "samples", "bytes", "sha256")


def _shard(s: Any, where: str) -> ShardInfo:
    _check(s, dict, where)
    unknown = sorted(set(s) - set(SHARD_FIELDS))
    if unknown:
        raise SchemaError(f"dataset.json field {where!r} has unknown keys {unknown}; a shard has "
                          f"{list(SHARD_FIELDS)}")
    file = _field(s, "file", str, where)
    if not plain_name(file):
        raise SchemaError(f"dataset.json field {where + '.file'!r} is {file!r}, not a plain file name in the "
                          "dataset folder (no '/', '\\', '..', leading '.' or control characters); rebuild the dataset")
    return ShardInfo(file, _count(_field(s, "samples", int, where), f"{where}.samples"),
                     _count(_field(s, "bytes", int, where), f"{where}.bytes"), _field(s, "sha256", str, where))


def plain_name(name: str) -> bool:
    """True for a file name that can only mean a file directly in the dataset folder."""
    return (bool(name) and name.isprintable() and not name.startswith(".") and ".." not in name
            and "/" not in name and "\\" not in name)


def _task(t: Any, where: str) -> Task:
    _check(t, dict, where)
    _field(t, "name", str, where)
    _field(t, "type", str, where, None)
    for c in _field(t, "classes", list, where, []):
        _check(c, str, f"{where}.classes[]")
    if "dims" in t:
        _check(t["dims"], int, f"{where}.dims")
    if t.get("column") is not None:
        _check(t["column"], str, f"{where}.column")
    try:
        return Task.from_dict(t)
    except ConfigError as e:  # the card, not the user's config, is wrong
        raise SchemaError(f"dataset.json field {where!r}: {e}; rebuild the dataset") from None
