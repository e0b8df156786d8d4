"""Align: check each RawRecord's ids, paths and labels; return a Record or a Reject with a reason code."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..format import HASHED_KEY, make_key
from ..tasks import BadLabel, Task, infer_task
from .config import BuildConfig
from .discover import MediaRef, RawRecord, modality_of_ext, read_file

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


def align(raws: list[RawRecord], root: Path, tasks: tuple[Task, ...], config: BuildConfig,
          map_fn: Callable = map) -> tuple[list[Record], list[Reject]]:
    """Check every raw record; return accepted records (with unique keys) and rejects, in input order.

    ``map_fn`` is an order-keeping map (a process pool's imap) that runs the per-record checks.
    """
    real_root = Path(os.path.realpath(root))
    _realdir.cache_clear()  # links may have changed since the last build in this process
    seen: set[str] = set()
    unique: list[RawRecord] = []
    rejects: list[Reject] = []
    for raw in raws:
        if raw.source_id in seen:
            rejects.append(Reject(raw.source_id, tuple(raw.paths), "duplicate_id",
                                  f"id {raw.source_id!r} appears more than once; the first one is kept"))
            continue
        seen.add(raw.source_id)
        unique.append(raw)
    records: list[Record] = []
    for out in map_fn(functools.partial(check_record, real_root=real_root, tasks=tasks, config=config), unique):
        (rejects if isinstance(out, Reject) else records).append(out)
    assign_keys(records)
    return records, rejects


def check_record(raw: RawRecord, *, real_root: Path, tasks: tuple[Task, ...], config: BuildConfig) -> Record | Reject:
    """Check one record's modalities, paths, sizes and labels (no decoding beyond the audio header)."""
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
        else:
            where, size, problem = _locate(ref.path or "", real_root)
            if problem:
                return reject(*problem)
            media[modality] = MediaRef(ref.ext, path=where, size=size)
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


def _locate(rel: str, real_root: Path) -> tuple[str, int, tuple[str, str] | None]:
    """Resolve ``rel`` under the root to (real path, size); refuse absolute paths, ``..`` and links out."""
    root_s = str(real_root)
    if not rel:
        return root_s, 0, ("unreadable", "empty path")
    if os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        return root_s, 0, ("outside_root", f"{rel!r} is an absolute path; give paths relative to the source root")
    # realpath of the folder (cached: a sample's files share it), then of the file only if it is a link
    parent, _, name = f"{root_s}/{rel}".rpartition("/")
    if name in ("", ".", ".."):  # "a/..", "a/.": let normpath find the last real name
        parent, name = os.path.split(os.path.normpath(os.path.join(root_s, rel)))
    target = os.path.join(_realdir(parent), name)
    try:
        st = os.lstat(target)  # one call: is it a link, and if not, its type and size
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(target)
        try:
            st = os.stat(target)
        except OSError:
            st = None
    if not (target.startswith(root_s + os.sep) or target == root_s):
        return root_s, 0, ("outside_root", f"{rel!r} resolves to {target!r}, outside the source root "
                           f"{root_s!r}; copy the file inside the root")
    if st is None or not stat.S_ISREG(st.st_mode):
        return target, 0, ("unreadable", f"{rel!r} does not exist or is not a file")
    return target, st.st_size, None


@functools.lru_cache(maxsize=4096)
def _realdir(path: str) -> str:
    """``os.path.realpath`` of a folder from its parent's (cached) and one lstat of its own name.

    realpath walks every component with an lstat each; a build's folders share their parents, so only
    the last name needs looking at. A link, or anything odd, goes to realpath.
    """
    head, _, tail = path.rpartition("/")
    if head and tail not in ("", ".", ".."):
        try:
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                return f"{_realdir(head)}/{tail}"
        except OSError:
            pass
    return os.path.realpath(path)


def _probe_rate(ref: MediaRef) -> int | None:
    """Native sample rate from the audio header, or None when soundfile cannot read it."""
    import soundfile as sf

    if ref.ext in ("wav", "flac"):  # the rate sits in the first bytes: no need for libsndfile
        head = ref.data[:64] if ref.data is not None else _head(ref.path)
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE" and head[12:16] == b"fmt ":
            return int.from_bytes(head[24:28], "little")
        if head[:4] == b"fLaC" and head[4] & 0x7F == 0 and len(head) >= 21:  # STREAMINFO first, 20-bit rate
            rate = (head[18] << 12) | (head[19] << 4) | (head[20] >> 4)
            if rate:
                return rate
    try:
        return int(sf.info(io.BytesIO(ref.data) if ref.data is not None else ref.path).samplerate)
    except Exception:  # noqa: BLE001 - any failure is the encoder's to report as a reject
        return None


def _head(path: str | None) -> bytes:
    try:
        return read_file(path or "", limit=64)
    except OSError:
        return b""  # the encoder reports the file as unreadable


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
