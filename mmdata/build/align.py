"""Align: check each RawRecord's ids, paths and labels; return a Record or a Reject with a reason code."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..format import make_key
from ..tasks import BadLabel, Task, infer_task
from .config import BuildConfig
from .discover import MediaRef, RawRecord, modality_of_ext

log = logging.getLogger(__name__)

# reason codes written to rejects.jsonl
REASONS = ("missing_modality", "unreadable", "empty_file", "unsupported_format", "bad_label", "duplicate_id",
           "outside_root", "too_large", "bad_text_encoding")


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
    labels: dict[str, Any]  # task -> stored value or None
    split: str | None = None  # from the layout
    group: str | None = None  # value of the split_by column
    paths: tuple[str, ...] = ()  # as given, for rejects
    audio_rate: int | None = None  # native rate probed from the header
    key: str = field(default="")


def resolve_tasks(raws: list[RawRecord], config: BuildConfig) -> tuple[Task, ...]:
    """The declared tasks, or one inferred task per label column (in order of first appearance)."""
    if config.tasks:
        return config.tasks
    values: dict[str, list[Any]] = {}
    for r in raws:
        for k, v in r.labels.items():
            values.setdefault(k, []).append(v)
    tasks = []
    for name, vals in values.items():
        present = [v for v in vals if v is not None and v != "" and not (isinstance(v, float) and math.isnan(v))]
        if not present:
            log.warning("label column %r has no values; it is not a task", name)
            continue
        if any(isinstance(v, dict) for v in present):
            log.warning("label column %r holds objects; declare it in the build config to use it", name)
            continue
        tasks.append(infer_task(name, present))
    return tuple(tasks)


def align(raws: list[RawRecord], root: Path, tasks: tuple[Task, ...],
          config: BuildConfig) -> tuple[list[Record], list[Reject]]:
    """Check every raw record; return accepted records (with unique keys) and rejects, in input order."""
    real_root = Path(os.path.realpath(root))
    seen: set[str] = set()
    records: list[Record] = []
    rejects: list[Reject] = []
    for raw in raws:
        paths = tuple(raw.paths)
        if raw.source_id in seen:
            rejects.append(Reject(raw.source_id, paths, "duplicate_id",
                                  f"id {raw.source_id!r} appears more than once; the first one is kept"))
            continue
        seen.add(raw.source_id)
        out = check_record(raw, real_root, tasks, config)
        (rejects if isinstance(out, Reject) else records).append(out)
    assign_keys(records)
    return records, rejects


def check_record(raw: RawRecord, real_root: Path, tasks: tuple[Task, ...], config: BuildConfig) -> Record | Reject:
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
            media[modality] = ref
        else:
            where, problem = _locate(ref.path or "", real_root)
            if problem:
                return reject(*problem)
            size = where.stat().st_size
            media[modality] = MediaRef(ref.ext, path=str(where))
        if size == 0:
            return reject("empty_file", f"{modality} {ref.path!r} is empty (0 bytes)")
        if size > config.max_file_bytes:
            return reject("too_large", f"{modality} {ref.path!r} has {size} bytes > max_file_bytes "
                          f"{config.max_file_bytes}; raise max_file_bytes to keep it")
    labels: dict[str, Any] = {}
    for task in tasks:
        try:
            labels[task.name] = task.encode(raw.labels.get(task.source_column))
        except BadLabel as e:
            return reject("bad_label", str(e))
    group = None
    if config.split_by:
        g = raw.labels.get(config.split_by)
        group = None if g is None or g == "" else str(g)
    rate = _probe_rate(media["audio"]) if "audio" in media else None
    return Record(raw.source_id, media, labels, raw.split, group, paths, rate)


def _locate(rel: str, real_root: Path) -> tuple[Path, tuple[str, str] | None]:
    """Resolve ``rel`` under the root; refuse absolute paths, ``..`` and symlinks that lead out."""
    if not rel:
        return real_root, ("unreadable", "empty path")
    if os.path.isabs(rel) or Path(rel).drive:
        return real_root, ("outside_root", f"{rel!r} is an absolute path; give paths relative to the source root")
    target = Path(os.path.realpath(real_root / rel))
    if target != real_root and real_root not in target.parents:
        return real_root, ("outside_root", f"{rel!r} resolves to {str(target)!r}, outside the source root "
                           f"{str(real_root)!r}; copy the file inside the root")
    if not target.is_file():
        return target, ("unreadable", f"{rel!r} does not exist or is not a file")
    return target, None


def _probe_rate(ref: MediaRef) -> int | None:
    """Native sample rate from the audio header, or None when soundfile cannot read it."""
    import soundfile as sf

    try:
        return int(sf.info(io.BytesIO(ref.data) if ref.data is not None else ref.path).samplerate)
    except Exception:  # noqa: BLE001 - any failure is the encoder's to report as a reject
        return None


def assign_keys(records: list[Record]) -> None:
    """Give each record a unique key derived from its id; a collision gets the id's hash appended."""
    used: set[str] = set()
    for rec in sorted(records, key=lambda r: r.source_id):
        key = make_key(rec.source_id)
        if key in used:
            key = f"{key}_{hashlib.sha1(rec.source_id.encode()).hexdigest()[:8]}"
        n = 1
        base = key
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        rec.key = key
