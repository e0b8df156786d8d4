"""Pack: the build's one pass over each record, as it is found: check it, read and encode its media, and
append its tar members (all but ``KEY.json``, which needs every record's labels) to a spill file.

A process appends to its own spill file and hands back only a ``Packed``: where the bytes lie and the
facts the index keeps. Sample bytes never travel between processes; the shards are cut out of the
spill files afterwards (``assemble``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..format import BLOCK, sample_block
from .align import Reject, check_record
from .config import BuildConfig
from .media import MediaReject, MediaSettings, encode_media
from .records import Found


class Packed(NamedTuple):  # a tuple: one per record crosses from a worker, cheap to pickle
    """A packed record: its members' bytes at ``offset`` of spill file ``spill``, and its facts."""

    spill: str
    offset: int
    size: int
    exts: tuple[str, ...]
    image_width: int
    image_height: int
    audio_seconds: float
    audio_rate: int
    text_chars: int
    text_at: int  # where the text's bytes start in the block (-1: no text)
    text_bytes: int
    input_bytes: int  # the media's size as found (for the build's fingerprint)
    labels: dict  # the record's raw label values, other fields and meta, as discovery found them
    fields: dict
    meta: dict


@dataclass(frozen=True)
class PackContext:
    """What packing a record needs besides the record: shipped once to each worker."""

    real_root: Path
    config: BuildConfig
    settings: MediaSettings
    folder: str  # where spill files go


class Spill:
    """An append-only file of packed records, one per process (``spill-PID.bin``)."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, f"spill-{os.getpid()}.bin")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.pid = os.getpid()
        self.pos = 0

    def append(self, data: bytes) -> int:
        offset, view = self.pos, memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.pos += len(data)
        return offset

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_spills: dict[str, Spill] = {}  # folder -> this process's spill there


def spill_for(folder: str) -> Spill:
    spill = _spills.get(folder)
    if spill is None or spill.pid != os.getpid():  # a forked worker: its own file, not its parent's
        spill = _spills[folder] = Spill(folder)
    return spill


def close_spills() -> None:
    for spill in _spills.values():
        if spill.pid == os.getpid():
            spill.close()
    _spills.clear()


def pack_record(job: tuple[Found, str | Reject], ctx: PackContext) -> Packed | Reject:
    """Check, encode and spill one record under its key; any problem is a Reject, never an exception."""
    done = encode_record(job, ctx)
    if isinstance(done, Reject):
        return done
    block, packed = done
    spill = spill_for(ctx.folder)
    return packed._replace(spill=spill.path, offset=spill.append(block))


def encode_record(job: tuple[Found, str | Reject], ctx: PackContext) -> tuple[bytes, Packed] | Reject:
    """One record's tar members under ``key`` and its facts (not yet placed: ``spill`` empty), or a Reject
    (``key`` is one when the record's id was refused)."""
    found, key = job
    if isinstance(key, Reject):
        return key
    raw = found.load()
    raw.source_id = found.source_id  # as the id check made it (NFC)
    media = check_record(raw, real_root=ctx.real_root, config=ctx.config)
    if isinstance(media, Reject):
        return media
    try:
        enc = encode_media(media, ctx.settings)
    except MediaReject as e:
        paths = tuple(raw.paths)
        where = paths[0] if len(paths) == 1 else raw.source_id
        return Reject(raw.source_id, paths, e.reason, f"{where}: {e}")
    block = sample_block(key, enc.members)
    text = enc.members.get("txt")
    text_at = -1 if text is None else len(block) - len(text) - (-len(text) % BLOCK)  # the text is the last member
    return block, Packed("", 0, len(block), tuple(sorted(enc.members)), _int(enc.image_width),
                         _int(enc.image_height), -1.0 if enc.audio_seconds is None else enc.audio_seconds,
                         _int(enc.audio_rate), _int(enc.text_chars), text_at, 0 if text is None else len(text),
                         sum(m.size or 0 for m in media.values()), raw.labels, raw.fields, raw.meta)


def _int(v: int | None) -> int:
    return -1 if v is None else v
