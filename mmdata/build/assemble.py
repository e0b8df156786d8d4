"""Assemble: cut a split's packed samples into shards and write each tar from its pieces.

The one shard writer of the project: the local executor, the Ray executor and the tests all write
shards with ``ShardFile``. A piece is a span of a spill file (copied by the kernel with
``os.copy_file_range``, falling back to ``os.sendfile``, then to a read and a write) or bytes.
Shards are cut greedily: a shard closes before the sample that would make it hold more than
``max_samples`` samples or, with the end blocks, more than ``max_bytes`` bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..card import ShardInfo
from ..format import PARTIAL_SUFFIX, archive_bytes, sample_block

HASH_STEP = 8 << 20  # bytes of a written shard hashed at a time


def cut(sizes: np.ndarray, max_samples: int, max_bytes: int) -> list[int]:
    """Start positions of the shards over samples of ``sizes`` bytes, in order (the first is 0)."""
    starts: list[int] = []
    count = pos = 0
    for i, size in enumerate(sizes.tolist()):
        if count and (count >= max_samples or archive_bytes(pos + size) > max_bytes):
            count = pos = 0
        if count == 0:
            starts.append(i)
        count += 1
        pos += size
    return starts


@dataclass(frozen=True)
class Span:
    """``size`` bytes at ``offset`` of the file open as ``fd``."""

    fd: int
    offset: int
    size: int


class ShardFile:
    """One shard written from pieces: into ``path`` under a staging name, or into memory (``path=None``).

    ``finish`` adds the end blocks and, for a file, fsyncs it, gives it its final name and hashes it (a
    read of what the page cache holds); in memory, ``data`` is the whole shard. ``offsets`` are where
    each sample starts.
    """

    def __init__(self, name: str, path: Path | None = None):
        self.name = name
        self.path = path
        self.pos = 0
        self.samples = 0
        self.offsets: list[int] = []
        self._parts: list[bytes] = []
        self._fd = None if path is None else os.open(self._staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.data = b""

    @property
    def _staging(self) -> str:
        return str(self.path) + PARTIAL_SUFFIX

    def start_sample(self) -> None:
        self.offsets.append(self.pos)
        self.samples += 1

    def write_sample(self, key: str, members: dict[str, bytes]) -> tuple[int, int]:
        """Add one sample from its members; return its (offset, size) in the shard."""
        self.start_sample()
        block = sample_block(key, members)
        self.add(block)
        return self.offsets[-1], len(block)

    def add(self, piece: bytes | Span) -> None:
        if isinstance(piece, Span):
            if self._fd is None:
                piece = os.pread(piece.fd, piece.size, piece.offset)
            else:
                _copy(piece, self._fd)
                self.pos += piece.size
                return
        if self._fd is None:
            self._parts.append(piece)
        else:
            _write_all(self._fd, piece)
        self.pos += len(piece)

    def finish(self) -> ShardInfo:
        self.add(b"\0" * (archive_bytes(self.pos) - self.pos))
        if self._fd is None:
            self.data = b"".join(self._parts)
            self._parts = []
            return ShardInfo(self.name, self.samples, len(self.data), hashlib.sha256(self.data).hexdigest())
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
            sha = _sha256(fd, self.pos)
        finally:
            os.close(fd)
        os.replace(self._staging, self.path)
        return ShardInfo(self.name, self.samples, self.pos, sha)

    def abandon(self) -> None:
        """Close a shard that will not be finished (its staging file stays, as after a kill)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _copy(span: Span, out: int) -> None:
    """Append ``span`` to ``out`` inside the kernel where it can."""
    offset, left = span.offset, span.size
    while left:
        try:
            n = os.copy_file_range(span.fd, out, left, offset)
        except (AttributeError, OSError):  # not Linux, or a filesystem pair without it
            n = _sendfile(span.fd, out, offset, left)
        if n <= 0:
            raise OSError(f"spill file ended {left} bytes early at offset {offset}")
        offset += n
        left -= n


def _sendfile(src: int, out: int, offset: int, count: int) -> int:
    try:
        return os.sendfile(out, src, offset, count)
    except (AttributeError, OSError):
        data = os.pread(src, min(count, 1 << 20), offset)
        _write_all(out, data)
        return len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sha256(fd: int, size: int) -> str:
    """sha256 of a file's first ``size`` bytes, read a step at a time into one buffer (an mmap would count the
    whole shard in the process's resident memory)."""
    h = hashlib.sha256()
    buf = bytearray(min(HASH_STEP, size))
    view = memoryview(buf)
    pos = 0
    while pos < size:
        n = os.preadv(fd, [view[:min(HASH_STEP, size - pos)]], pos)
        if n <= 0:
            raise OSError(f"shard ended at byte {pos} of {size} while hashed")
        h.update(view[:n])
        pos += n
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _sha256(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
