"""The on-disk sample format (version 1): keys, member names and byte-identical tar shards."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import BinaryIO

FORMAT_VERSION = 1
CARD_NAME = "dataset.json"
INDEX_NAME = "index.parquet"
REJECTS_NAME = "rejects.jsonl"
TOKENIZER_DIR = "tokenizer"
README_NAME = "README.md"  # the Hugging Face dataset card

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
IMAGE_EXTS = ("jpg", "png", "webp")
AUDIO_EXTS = ("flac", "wav")
TEXT_EXT = "txt"
META_EXT = "json"
MEMBER_ORDER = ("jpg", "png", "webp", "flac", "wav", "txt", "json")
BLOCK = 512
MAX_KEY = 95  # KEY + ".flac" (the longest extension) fills a ustar name's 100 bytes
HASHED_KEY = 71  # characters kept of an id that is cut or changed, before "_" + 8 hex digits


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``: ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def modality_of(ext: str) -> str | None:
    """Modality of a stored member extension, or None for metadata."""
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext == TEXT_EXT:
        return "text"
    return None


def make_key(source_id: str) -> str:
    """Derive a tar key from a source id: a valid id of at most ``MAX_KEY`` characters is kept; otherwise
    invalid characters become '_', the id is cut to ``HASHED_KEY`` characters and its hash appended."""
    if KEY_RE.match(source_id) and len(source_id) <= MAX_KEY:
        return source_id
    key = re.sub(r"[^A-Za-z0-9_-]", "_", source_id)[:HASHED_KEY]
    return f"{key}_{hashlib.sha1(source_id.encode()).hexdigest()[:8]}"


def split_member_name(name: str) -> tuple[str, str]:
    """Split ``KEY.ext`` at the first dot (as WebDataset readers do)."""
    key, _, ext = name.partition(".")
    return key, ext


RECORD = BLOCK * 20  # tarfile pads an archive to a multiple of 20 blocks


def sample_block(key: str, members: dict[str, bytes]) -> bytes:
    """One sample's adjacent tar members with fixed metadata (mtime 0, uid/gid 0, mode 644), as bytes."""
    if not KEY_RE.match(key):
        raise ValueError(f"key must match {KEY_RE.pattern}, got {key!r}")
    parts = []
    for ext in sorted(members, key=lambda e: (MEMBER_ORDER.index(e) if e in MEMBER_ORDER else 99, e)):
        data = members[ext]
        parts += [member_header(f"{key}.{ext}", len(data)), data, b"\0" * (-len(data) % BLOCK)]
    return b"".join(parts)


# A ustar header with our fixed metadata, as tarfile writes it: only the name, size and checksum vary.
_HEAD = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_MID = b"00000000000\0"  # mtime
_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)  # type .. prefix, pad
_CHKSUM_BASE = sum(_HEAD) + sum(_MID) + sum(_TAIL) + 8 * ord(" ")


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file ``name`` of ``size`` bytes (mtime 0, root, 0644)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"member name {name!r} is longer than 100 bytes; keys are at most {MAX_KEY} characters")
    if not 0 <= size < 8**11:
        raise ValueError(f"member {name!r} has {size} bytes; a tar member holds at most 8 GiB")
    size_field = b"%011o\0" % size
    chksum = _CHKSUM_BASE + sum(raw) + sum(size_field)
    return b"".join((raw, b"\0" * (100 - len(raw)), _HEAD, size_field, _MID, b"%06o\0 " % chksum, _TAIL))


def archive_bytes(payload: int) -> int:
    """Size of a tar whose members take ``payload`` bytes (two zero blocks, padded to a record)."""
    return -(-(payload + 2 * BLOCK) // RECORD) * RECORD


class ShardWriter:
    """Write samples as adjacent tar members with fixed metadata; track offsets, size and sha256."""

    def __init__(self, f: BinaryIO):
        self._f, self._sha, self._pos = f, hashlib.sha256(), 0
        self.samples = 0

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def add(self, key: str, members: dict[str, bytes]) -> tuple[int, int]:
        """Append one sample; return (byte offset, byte size) of its members in the shard."""
        start = self._pos
        self._write(sample_block(key, members))
        self.samples += 1
        return start, self._pos - start

    def close(self) -> tuple[int, str]:
        """Finish the archive (end blocks, record padding); return (total bytes, sha256 hex)."""
        self._write(b"\0" * (archive_bytes(self._pos) - self._pos))
        return self._pos, self._sha.hexdigest()


def parse_members(buf: bytes | memoryview) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) of the regular members in a contiguous run of ustar blocks."""
    view = memoryview(buf)
    pos, n = 0, len(view)
    while pos + BLOCK <= n:
        header = bytes(view[pos:pos + BLOCK])
        if header == b"\0" * BLOCK:
            return
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
        if prefix:
            name = f"{prefix}/{name}"
        size_field = header[124:136].rstrip(b"\0 ").strip()
        if not size_field or not _checksum_ok(header):
            raise ValueError(f"corrupt tar header at byte {pos}")
        size = int(size_field, 8)
        typeflag = header[156:157]
        start = pos + BLOCK
        if start + size > n:
            raise ValueError(f"member {name!r} at byte {pos} is truncated")
        if typeflag in (b"0", b"\0"):
            yield name, bytes(view[start:start + size])
        pos = start + (size + BLOCK - 1) // BLOCK * BLOCK


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].rstrip(b"\0 ").strip()
    if not stored:
        return False
    total = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return int(stored, 8) == total


def group_samples(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group adjacent members sharing a key into (key, {ext: data})."""
    key, sample = None, {}
    for name, data in members:
        k, ext = split_member_name(name.rsplit("/", 1)[-1])
        if k != key and sample:
            yield key, sample
            sample = {}
        key = k
        sample[ext] = data
    if sample:
        yield key, sample
