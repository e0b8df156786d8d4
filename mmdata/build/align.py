"""Align: check each RawRecord's id, paths and labels as it comes; rejects carry a reason code."""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..format import HASHED_KEY, make_key
from ..tasks import Task, ValueStats, natural_key
from .config import BuildConfig
from .guard import locate
from .records import Found, MediaRef, RawRecord, modality_of_ext

log = logging.getLogger(__name__)

# reason codes written to rejects.jsonl
REASONS = ("missing_modality", "unreadable", "empty_file", "unsupported_format", "bad_label", "duplicate_id",
           "bad_id", "outside_root", "too_large", "bad_text_encoding", "corrupt_shard")


@dataclass(frozen=True)
class Reject:
    """An input record that is not in the dataset, and why."""

    source_id: str
    paths: tuple[str, ...]
    reason: str  # one of REASONS
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"source_id": self.source_id, "paths": list(self.paths), "reason": self.reason,
                "message": self.message}


class RejectLog:
    """A build's rejects, written to ``path`` as they come (in input order), with the count per reason and a
    few of each reason's smallest source ids (for the dataset card): memory does not grow with the rejects."""

    KEPT_IDS = 8  # source ids kept per reason

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - a log open for the whole build
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}  # reason -> its smallest source ids, sorted

    def add(self, reject: Reject) -> None:
        self._f.write(json.dumps(reject.to_dict(), ensure_ascii=False) + "\n")
        self.reasons[reject.reason] += 1
        ids = self.examples.setdefault(reject.reason, [])
        if reject.source_id not in ids and (len(ids) < self.KEPT_IDS or reject.source_id < ids[-1]):
            bisect.insort(ids, reject.source_id)
            del ids[self.KEPT_IDS:]

    def __len__(self) -> int:
        return sum(self.reasons.values())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RejectLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LabelStats:
    """The values seen per label column (and per declared task's column), one record at a time.

    Only records that passed every other check are added, so a rejected record never adds a class.
    ``tasks()`` then gives the declared tasks (classes inferred where a task gives none) or one task per
    label column.
    """

    def __init__(self, config: BuildConfig):
        self.config = config
        self.columns: dict[str, ValueStats] = {}
        self.declared = {t.name: ValueStats() for t in config.tasks}
        self.seen: set[str] = set()  # label and field names, for the error about a missing column
        self.records = 0

    def add(self, labels: dict[str, Any], fields: dict[str, Any]) -> None:
        self.records += 1
        if self.config.tasks:
            self.seen.update(labels, fields)
            for t in self.config.tasks:
                self.declared[t.name].add(lookup(labels, fields, t.source_column))
            return
        for k, v in labels.items():
            stats = self.columns.get(k)
            if stats is None:
                stats = self.columns[k] = ValueStats()
            stats.add(v)

    def tasks(self) -> tuple[Task, ...]:
        if self.config.tasks:
            return tuple(self._declared(t) for t in self.config.tasks)
        tasks = []
        for name, stats in self.columns.items():
            if not stats.present:
                log.warning("label column %r has no values; it is not a task", name)
            elif stats.objects:
                log.warning("label column %r holds objects; declare it in the build config to use it", name)
            elif stats.too_many and not stats.regression:
                log.warning("label column %r has more than %d distinct values: kept as meta, not a task; declare "
                            "it in the build config to use it as one", name, len(stats.scalar_classes))
            else:
                tasks.append(stats.task(name))
        return tuple(tasks)

    def _declared(self, task: Task) -> Task:
        stats = self.declared[task.name]
        if self.records and not stats.present:
            raise ConfigError(f"task {task.name!r} reads column {task.source_column!r}, which no record has; the "
                              f"label fields seen are {sorted(self.seen)[:30]}: set the task's column to one of them")
        if task.classes or task.type == "regression" or not stats.present:
            return task
        if stats.regression:  # a type without a class list and fractional values: the values as names
            return dataclasses.replace(task, classes=tuple(sorted(stats.scalar_classes, key=natural_key)))
        return dataclasses.replace(task, classes=stats.task(task.name).classes)


def lookup(labels: dict[str, Any], fields: dict[str, Any], column: str) -> Any:
    """A record's value for ``column``: its labels first, then its other fields (dotted: nested)."""
    v = label_value(labels, column)
    return label_value(fields, column) if v is None else v


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool)) and not (isinstance(v, float) and math.isnan(v))


def label_value(labels: dict[str, Any], column: str) -> Any:
    """The value of ``column`` in a record's raw labels; a dotted name reaches into nested objects."""
    if column in labels:
        return labels[column]
    node: Any = labels
    for part in column.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class Ids:
    """Checks each record's id as it is found and gives it a key: NFC ids, no empty or repeated one.

    Keys are given first come, first served (input order is deterministic): an id that is a valid key
    is its own key; a key taken already gets the id's hash appended. Memory: the ids and keys seen.
    """

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.changed: set[str] = set()  # keys that are not their record's id

    def check(self, raw: Found) -> Reject | str:
        """The record's key, or why it is rejected (``raw.source_id`` is normalised to NFC)."""
        raw.source_id = sid = unicodedata.normalize("NFC", raw.source_id)
        if not sid.strip():
            return Reject(sid, tuple(raw.paths), "bad_id", "the record's id is empty; give every record an id "
                          "(file stem, folder name or id column)")
        if sid in self.ids:
            return Reject(sid, tuple(raw.paths), "duplicate_id", f"id {sid!r} appears more than once; the first "
                          "one is kept")
        self.ids.add(sid)
        key = make_key(sid)
        if key == sid and key not in self.changed:
            return key  # the common case: an id that is a valid key is its own key (ids are unique)
        # taken: an id kept as its key (ids holds those; an id that is not a valid key can equal no key) or a
        # changed key
        if key != sid and key in self.ids or key in self.changed:  # cut so that the suffixes below still fit
            key = base = f"{key[:HASHED_KEY]}_{hashlib.sha1(sid.encode()).hexdigest()[:8]}"
            n = 1
            while key in self.ids or key in self.changed:
                key, n = f"{base}_{n}", n + 1
        self.changed.add(key)
        return key


def encode_labels(tasks: tuple[Task, ...], labels: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """A record's stored labels per task; raises BadLabel."""
    return {t.name: t.encode(lookup(labels, fields, t.source_column)) for t in tasks}


def sample_meta(labels: dict[str, Any], meta: dict[str, Any], used: set[str]) -> dict[str, Any]:
    """What is no task stays with the sample as meta: others' json fields, a manifest's extra columns."""
    return {**{k: v for k, v in labels.items() if k not in used and _scalar(v)}, **meta}


def check_record(raw: RawRecord, *, real_root: Path, config: BuildConfig) -> dict[str, MediaRef] | Reject:
    """Check one record's modalities, paths and sizes (nothing read); return its located media."""
    paths = tuple(raw.paths)

    def reject(reason: str, message: str) -> Reject:
        return Reject(raw.source_id, paths, reason, message)

    if raw.problems:
        return reject(*raw.problems[0])
    if not raw.media:
        return reject("missing_modality", f"{raw.source_id!r} has no image, audio or text file")
    missing = [m for m in config.required if m not in raw.media]
    if missing:
        return reject("missing_modality", f"{raw.source_id!r} lacks required modality {missing}; "
                      "add the file or drop it from `required`")
    media: dict[str, MediaRef] = {}
    for modality, ref in sorted(raw.media.items()):
        if modality_of_ext(ref.ext) != modality:
            return reject("unsupported_format", f"{modality} {ref.path!r}: {ref.ext!r} is not a {modality} format")
        if ref.data is not None:
            size = len(ref.data)
            media[modality] = MediaRef(ref.ext, path=ref.path, data=ref.data, size=size)
        elif ref.container is not None:  # a member of a shard or the spool: its size declared there
            size = ref.size or 0
            media[modality] = ref
        elif ref.real is not None:  # checked by discovery
            size = ref.size or 0
            media[modality] = ref
        else:
            where, size, problem = locate(ref.path or "", real_root)
            if problem:
                return reject(*problem)
            media[modality] = MediaRef(ref.ext, path=where, size=size)
        if size == 0:
            return reject("empty_file", f"{modality} {ref.path!r} is empty (0 bytes)")
        if size > config.max_file_bytes:
            return reject("too_large", f"{modality} {ref.path!r} has {size} bytes > max_file_bytes "
                          f"{config.max_file_bytes}; raise max_file_bytes to keep it")
    return media


def group_of(labels: dict[str, Any], fields: dict[str, Any], config: BuildConfig) -> str | None:
    """A record's value of the ``split_by`` column, as a string (None when absent)."""
    if not config.split_by:
        return None
    g = lookup(labels, fields, config.split_by)
    return None if g is None or g == "" else str(g)


