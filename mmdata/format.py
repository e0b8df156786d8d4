"""The on-disk sample format (version 1): keys, member names and byte-identical tar shards."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

FORMAT_VERSION = 1
CARD_NAME = "dataset.json"
INDEX_NAME = "index.parquet"
REJECTS_NAME = "rejects.jsonl"
TOKENIZER_DIR = "tokenizer"
README_NAME = "README.md"  # the Hugging Face dataset card
PARTIAL_SUFFIX = ".partial"  # a file being written (then renamed) or downloaded: never read as a dataset file

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


# ---- reading: the one parser of our tar shards (the loader's reader, `verify` and `show` use it) ----------

ZERO_BLOCK = bytes(BLOCK)
READ_CHUNK = 1 << 20  # bytes read (and hashed) at a time from a file


class TarError(ValueError):
    """A structural error at byte ``pos`` of a shard; ``final``: nothing after it can be read (the data ends).

    ``str(e)`` says what and where ("corrupt tar header at byte 1024"); ``reason`` adds why, when known.
    """

    def __init__(self, pos: int, what: str, reason: str = "", final: bool = False):
        super().__init__(what)
        self.pos, self.what, self.reason, self.final = pos, what, reason, final

    @property
    def detail(self) -> str:
        """What, where and why: ``corrupt tar header at byte 1024: checksum mismatch``."""
        return f"{self.what}: {self.reason}" if self.reason else self.what


class TarStream:
    """The bytes of a tar read front to back from a buffer or a binary file, optionally hashed.

    Positions are bytes of the shard: a buffer holding the shard's bytes from ``base`` on counts from
    there. Nothing at or past ``limit`` is read (default: the buffer's end; required for a file), so a
    file far longer than its card costs no more than the card's size.
    """

    def __init__(self, source: bytes | memoryview | BinaryIO, limit: int | None = None, base: int = 0,
                 sha256: bool = False):
        self._view = memoryview(source) if isinstance(source, (bytes, bytearray, memoryview)) else None
        self._f = None if self._view is not None else source
        if self._view is not None:
            end = base + len(self._view)
            limit = end if limit is None else min(limit, end)
        elif limit is None:
            raise ValueError("a TarStream over a file needs a limit (the shard's size in its card)")
        self.base, self.pos, self.limit = base, base, limit
        self._sha = hashlib.sha256() if sha256 else None

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes, fewer where the data or the limit ends."""
        pos = self.pos
        if pos + n > self.limit:
            n = self.limit - pos
        if n <= 0:
            return b""
        if self._view is not None:  # the loader's hot path: one slice
            data = self._view[pos - self.base:pos - self.base + n].tobytes()
        else:
            parts = []
            while n > 0:
                b = self._f.read(min(n, READ_CHUNK))
                if not b:
                    break
                parts.append(b)
                n -= len(b)
            data = b"".join(parts)
        if self._sha is not None:
            self._sha.update(data)
        self.pos = pos + len(data)
        return data

    def skip_to(self, target: int) -> None:
        """Move on to byte ``target`` (never back, never past the limit); skipped bytes are hashed too."""
        if target > self.limit:
            target = self.limit
        if self._view is not None and self._sha is None:
            if target > self.pos:
                self.pos = target
            return
        while self.pos < target:
            if not self.read(min(target - self.pos, READ_CHUNK)):
                return

    def digest(self) -> str:
        """The sha256 of every byte up to the limit (or the data's end); reads what is left."""
        if self._sha is None:
            raise ValueError("this TarStream was made without sha256=True")
        self.skip_to(self.limit)
        return self._sha.hexdigest()


def parse_header(header: bytes, pos: int) -> tuple[str, int, bytes]:
    """(name, data size, type flag) of the ustar header at byte ``pos``; TarError when it is corrupt."""
    reason = "checksum mismatch"
    try:
        stored = header[148:156].rstrip(b"\0 ").strip()
        if not stored or int(stored, 8) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise ValueError(reason)
        reason = "the member name is not UTF-8"
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8") if header[345] else ""
        field = header[124:136].rstrip(b"\0 ").strip()
        reason = f"size field {field!r} is not a size"
        size = int(field, 8)
        if size < 0:
            raise ValueError(reason)
    except ValueError:  # a UnicodeDecodeError too
        raise TarError(pos, f"corrupt tar header at byte {pos}", reason) from None
    return (f"{prefix}/{name}" if prefix else name), size, header[156:157]


def tar_members(stream: TarStream, archive: bool = True,
                on_error: Callable[[TarError], int | None] | None = None) -> Iterator[tuple[int, str, int]]:
    """(header offset, name, size) of each regular member from the stream's position on.

    The member's data comes next in ``stream``: the caller may read it; what it leaves is skipped.
    ``archive``: the data is a whole shard, which ends with zero blocks (TarError when it ends without);
    else a run of samples cut from one, which may end after any member. A structural problem raises
    TarError, or with ``on_error`` is reported to it: it returns the byte to read on from (None: stop).
    """
    while True:
        pos = stream.pos
        try:
            header = stream.read(BLOCK)
            if not header and not archive:
                return
            if len(header) < BLOCK:
                raise TarError(pos, f"truncated: ends at byte {stream.pos} inside or before a tar header (no "
                                    "end-of-archive blocks)", final=True)
            if header == ZERO_BLOCK:
                return
            name, size, typeflag = parse_header(header, pos)
            start = pos + BLOCK
            if start + size > stream.limit:
                raise TarError(pos, f"truncated: member {name!r} at byte {pos} needs {size} bytes, "
                                    f"{stream.limit - start} remain")
        except TarError as e:
            if on_error is None:
                raise
            resume = on_error(e)
            if resume is None:
                return
            stream.skip_to(resume)
            continue
        if typeflag in (b"0", b"\0"):
            yield pos, name, size
        stream.skip_to(start + (size + BLOCK - 1) // BLOCK * BLOCK)


def parse_members(buf: bytes | memoryview, base: int = 0) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) of the regular members in a run of samples: shard bytes from byte ``base`` on.

    TarError (a ValueError) names the absolute byte offset of what is wrong.
    """
    stream = TarStream(buf, base=base)
    for _, name, size in tar_members(stream, archive=False):
        yield name, stream.read(size)


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
