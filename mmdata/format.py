"""The on-disk sample format (version 1): keys, member names and byte-identical tar shards."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

FORMAT_VERSION = 1
CARD_NAME = "dataset.json"
INDEX_NAME = "index.parquet"
REJECTS_NAME = "rejects.jsonl"
TOKENIZER_DIR = "tokenizer"

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
IMAGE_EXTS = ("jpg", "png", "webp")
AUDIO_EXTS = ("flac", "wav")
TEXT_EXT = "txt"
META_EXT = "json"
MEMBER_ORDER = ("jpg", "png", "webp", "flac", "wav", "txt", "json")
BLOCK = 512


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
    """Derive a tar key from a source id: invalid characters become '_', plus a hash when anything changed."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", source_id)[:96]
    if key != source_id or not key:
        key = f"{key}_{hashlib.sha1(source_id.encode()).hexdigest()[:8]}"
    return key


def split_member_name(name: str) -> tuple[str, str]:
    """Split ``KEY.ext`` at the first dot (as WebDataset readers do)."""
    key, _, ext = name.partition(".")
    return key, ext


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos


class ShardWriter:
    """Write samples as adjacent tar members with fixed metadata; track offsets, size and sha256."""

    def __init__(self, f: BinaryIO):
        self._out = _HashingWriter(f)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> tuple[int, int]:
        """Append one sample; return (byte offset, byte size) of its members in the shard."""
        if not KEY_RE.match(key):
            raise ValueError(f"key must match {KEY_RE.pattern}, got {key!r}")
        start = self._out.tell()
        for ext in sorted(members, key=lambda e: (MEMBER_ORDER.index(e) if e in MEMBER_ORDER else 99, e)):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        return start, self._out.tell() - start

    def close(self) -> tuple[int, str]:
        """Finish the archive; return (total bytes, sha256 hex)."""
        self._tar.close()
        return self._out.tell(), self._out.sha.hexdigest()


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
