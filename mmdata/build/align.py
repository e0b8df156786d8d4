"""Align: check each RawRecord's ids, paths and labels; return a Record or a Reject with a reason code."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..format import HASHED_KEY, make_key
from ..tasks import BadLabel, Task, infer_task
from .config import BuildConfig
from .guard import Refused, locate, read_file, read_member, realdir
from .records import MediaRef, RawRecord, modality_of_ext

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


@dataclass
class Record:
    """A checked record: media located inside the root, labels in their stored form."""

    source_id: str
    media: dict[str, MediaRef]  # modality -> ref whose path (if any) is absolute and inside the root
    labels: dict[str, Any]  # task -> stored value or None (set once the tasks are known)
    split: str | None = None  # from the layout
    group: str | None = None  # value of the split_by column
    paths: tuple[str, ...] = ()  # as given, for rejects
    audio_rate: int | None = None  # native rate probed from the header
    key: str = field(default="")
    raw_labels: dict[str, Any] = field(default_factory=dict, repr=False)  # column -> value, as discovered
    raw_fields: dict[str, Any] = field(default_factory=dict, repr=False)  # more values a task may name
    meta: dict[str, Any] = field(default_factory=dict)  # scalar facts kept with the sample, not labels


def resolve_tasks(label_rows: list[dict[str, Any]], config: BuildConfig,
                  field_rows: list[dict[str, Any]] | None = None) -> tuple[Task, ...]:
    """The declared tasks (classes inferred where a task gives none), or one task per label column.

    ``label_rows`` are the raw labels of the records that passed every other check, so a rejected
    record never adds a class; ``field_rows`` their other fields, which only a declared task reads. A
    declared task whose column no record has is an error.
    """
    values: dict[str, list[Any]] = {}
    for labels in label_rows:
        for k, v in labels.items():
            values.setdefault(k, []).append(v)
    if config.tasks:
        rows = list(zip(label_rows, field_rows or [{}] * len(label_rows)))
        seen = sorted(set(values) | {k for _, f in rows for k in f})
        return tuple(_declared(t, rows, seen) for t in config.tasks)
    tasks = []
    for name, vals in values.items():
        present = [v for v in vals if _present(v)]
        if not present:
            log.warning("label column %r has no values; it is not a task", name)
            continue
        if any(isinstance(v, dict) for v in present):
            log.warning("label column %r holds objects; declare it in the build config to use it", name)
            continue
        tasks.append(infer_task(name, present))
    return tuple(tasks)


def _declared(task: Task, rows: list[tuple[dict[str, Any], dict[str, Any]]], seen: list[str]) -> Task:
    column = task.source_column
    found = [v for v in (lookup(labels, fields, column) for labels, fields in rows) if _present(v)]
    if rows and not found:
        raise ConfigError(f"task {task.name!r} reads column {column!r}, which no record has; the label "
                          f"fields seen are {seen[:30]}: set the task's column to one of them")
    if task.classes or task.type == "regression" or not found:
        return task
    inferred = infer_task(task.name, found)  # a type without a class list: the sorted values seen
    if inferred.type == "regression":
        inferred = infer_task(task.name, [str(v) for v in found])
    return dataclasses.replace(task, classes=inferred.classes)


def lookup(labels: dict[str, Any], fields: dict[str, Any], column: str) -> Any:
    """A record's value for ``column``: its labels first, then its other fields (dotted: nested)."""
    v = label_value(labels, column)
    return label_value(fields, column) if v is None else v


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool)) and not (isinstance(v, float) and math.isnan(v))


def _present(v: Any) -> bool:
    return v is not None and v != "" and not (isinstance(v, float) and math.isnan(v))


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


def align(raws: list[RawRecord], root: Path, config: BuildConfig,
          map_fn: Callable = map) -> tuple[list[Record], list[Reject], tuple[Task, ...]]:
    """Check every raw record; return accepted records (with unique keys), rejects and the tasks.

    ``map_fn`` is an order-keeping map (a process pool's imap) that runs the per-record checks. Ids are
    compared in Unicode NFC, so an id typed on macOS (NFD) and on Linux is one id.
    """
    real_root = Path(os.path.realpath(root))
    realdir.cache_clear()  # links may have changed since the last build in this process
    seen: set[str] = set()
    unique: list[RawRecord] = []
    rejects: list[Reject] = []
    for raw in raws:
        raw.source_id = unicodedata.normalize("NFC", raw.source_id)
        if not raw.source_id.strip():
            rejects.append(Reject(raw.source_id, tuple(raw.paths), "bad_id", "the record's id is empty; give "
                                  "every record an id (file stem, folder name or id column)"))
            continue
        if raw.source_id in seen:
            rejects.append(Reject(raw.source_id, tuple(raw.paths), "duplicate_id",
                                  f"id {raw.source_id!r} appears more than once; the first one is kept"))
            continue
        seen.add(raw.source_id)
        unique.append(raw)
    checked: list[Record] = []
    for out in map_fn(functools.partial(check_record, real_root=real_root, config=config), unique):
        (rejects if isinstance(out, Reject) else checked).append(out)
    tasks = resolve_tasks([r.raw_labels for r in checked], config, [r.raw_fields for r in checked])
    used = {t.source_column for t in tasks} | {config.split_by}
    records = []
    for rec in checked:
        try:
            rec.labels = {t.name: t.encode(lookup(rec.raw_labels, rec.raw_fields, t.source_column)) for t in tasks}
        except BadLabel as e:
            rejects.append(Reject(rec.source_id, rec.paths, "bad_label", str(e)))
            continue
        # what is no task stays with the sample as meta: others' json fields, a manifest's extra columns
        rec.meta = {**{k: v for k, v in rec.raw_labels.items() if k not in used and _scalar(v)}, **rec.meta}
        records.append(rec)
    assign_keys(records)
    return records, rejects, tasks


def check_record(raw: RawRecord, *, real_root: Path, config: BuildConfig) -> Record | Reject:
    """Check one record's modalities, paths and sizes (no decoding beyond the audio header)."""
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
    group = None
    if config.split_by:
        g = lookup(raw.labels, raw.fields, config.split_by)
        group = None if g is None or g == "" else str(g)
    rate = _probe_rate(media["audio"]) if "audio" in media else None
    return Record(raw.source_id, media, {}, raw.split, group, paths, rate, raw_labels=raw.labels,
                  raw_fields=raw.fields, meta=dict(raw.meta))


def _probe_rate(ref: MediaRef) -> int | None:
    """Native sample rate from the audio header, or None when soundfile cannot read it."""
    import soundfile as sf

    if ref.ext in ("wav", "flac"):  # the rate sits in the first bytes: no need for libsndfile
        head = _bytes(ref, 64)
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE" and head[12:16] == b"fmt ":
            return int.from_bytes(head[24:28], "little")
        if head[:4] == b"fLaC" and head[4] & 0x7F == 0 and len(head) >= 21:  # STREAMINFO first, 20-bit rate
            rate = (head[18] << 12) | (head[19] << 4) | (head[20] >> 4)
            if rate:
                return rate
    try:
        return int(sf.info(ref.path if ref.data is None and ref.container is None
                           else io.BytesIO(_bytes(ref))).samplerate)
    except Exception:  # noqa: BLE001 - any failure is the encoder's to report as a reject
        return None


def _bytes(ref: MediaRef, limit: int | None = None) -> bytes:
    """A media file's first ``limit`` bytes (all with None); b"" when unreadable (the encoder says why)."""
    try:
        if ref.data is not None:
            return ref.data[:limit]
        if ref.container is not None:
            return read_member(ref.container, ref.offset or 0, min(ref.size or 0, limit or ref.size or 0))
        return read_file(ref.path or "", limit=limit)
    except (OSError, Refused):
        return b""


def assign_keys(records: list[Record]) -> None:
    """Give each record a unique key derived from its id; a collision gets the id's hash appended."""
    used: set[str] = set()
    for rec in sorted(records, key=lambda r: r.source_id):
        key = make_key(rec.source_id)
        if key in used:  # cut so that the suffixes below still fit MAX_KEY
            key = f"{key[:HASHED_KEY]}_{hashlib.sha1(rec.source_id.encode()).hexdigest()[:8]}"
        n = 1
        base = key
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        rec.key = key
