"""Shards: cut an ordered stream of encoded samples into tars by max_samples/max_bytes, renamed when complete."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..card import ShardInfo
from ..format import BLOCK, ShardWriter, modality_of, shard_name
from .media import Encoded

RECORD = BLOCK * 20  # tarfile pads an archive to a multiple of 20 blocks
TMP_SUFFIX = ".partial"  # a shard being written: never a name that ends in .tar


def member_bytes(members: dict[str, bytes]) -> int:
    """Bytes a sample takes in a tar: one header block per member plus its data padded to blocks."""
    return sum(BLOCK + -(-len(b) // BLOCK) * BLOCK for b in members.values())


def archive_bytes(payload: int) -> int:
    """Size of a tar whose members take ``payload`` bytes (two zero blocks, padded to a record)."""
    return -(-(payload + 2 * BLOCK) // RECORD) * RECORD


def index_row(enc: Encoded, split: str, shard: str, offset: int, size: int) -> dict[str, Any]:
    """One index.parquet row (labels under their task names; the runner prefixes them)."""
    modalities = sorted({m for m in (modality_of(e) for e in enc.members) if m})
    return {
        "key": enc.key, "split": split, "shard": shard, "offset": offset, "size": size,
        "modalities": modalities, "image_width": enc.image_width, "image_height": enc.image_height,
        "audio_seconds": enc.audio_seconds, "text_chars": enc.text_chars, "source_id": enc.source_id,
        "labels": enc.labels, "exts": sorted(enc.members),
    }


@dataclass
class ShardDone:
    """A shard that was closed and given its final name."""

    info: ShardInfo
    rows: list[dict[str, Any]]
    texts: list[str] = field(default_factory=list)


class SplitWriter:
    """Write one split's samples to ``{split}-NNNNNN.tar``, cutting by samples and bytes."""

    def __init__(self, out: Path, split: str, max_samples: int, max_bytes: int, first_index: int = 0):
        self.out, self.split = out, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.index = first_index
        self._file = None
        self._writer: ShardWriter | None = None
        self._payload = 0
        self._rows: list[dict[str, Any]] = []
        self._texts: list[str] = []

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def add(self, enc: Encoded) -> ShardDone | None:
        """Append a sample; return the shard this closed first, when the sample did not fit in it."""
        done = None
        size = member_bytes(enc.members)
        if self._writer is not None and (
            len(self._rows) >= self.max_samples or archive_bytes(self._payload + size) > self.max_bytes
        ):
            done = self.close()
        if self._writer is None:
            self._open()
        offset, nbytes = self._writer.add(enc.key, enc.members)
        self._payload += size
        self._rows.append(index_row(enc, self.split, self.name, offset, nbytes))
        if enc.text is not None:
            self._texts.append(enc.text)
        return done

    def close(self) -> ShardDone | None:
        """Finish the open shard (if any): flush, fsync, rename from its temporary name."""
        if self._writer is None:
            return None
        nbytes, sha = self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out / self.name
        os.replace(self.out / (self.name + TMP_SUFFIX), final)
        done = ShardDone(ShardInfo(self.name, len(self._rows), nbytes, sha), self._rows, self._texts)
        self._writer, self._file, self._payload, self._rows, self._texts = None, None, 0, [], []
        self.index += 1
        return done

    def _open(self) -> None:
        self._file = open(self.out / (self.name + TMP_SUFFIX), "wb")
        self._writer = ShardWriter(self._file)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
