"""Shards: cut an ordered stream of encoded samples into tars by max_samples/max_bytes, renamed when complete."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..card import ShardInfo
from ..format import archive_bytes, modality_of, shard_name
from .media import Encoded

TMP_SUFFIX = ".partial"  # a shard being written: never a name that ends in .tar


def index_row(enc: Encoded, split: str, shard: str, offset: int, size: int) -> dict[str, Any]:
    """One index.parquet row (labels under their task names; the runner prefixes them)."""
    modalities = sorted({m for m in (modality_of(e) for e in enc.exts) if m})
    return {
        "key": enc.key, "split": split, "shard": shard, "offset": offset, "size": size,
        "modalities": modalities, "image_width": enc.image_width, "image_height": enc.image_height,
        "audio_seconds": enc.audio_seconds, "text_chars": enc.text_chars, "source_id": enc.source_id,
        "labels": enc.labels, "exts": sorted(enc.exts),
    }


@dataclass
class ShardDone:
    """A shard that was closed and given its final name."""

    info: ShardInfo
    rows: list[dict[str, Any]]
    texts: list[str] = field(default_factory=list)


class SplitWriter:
    """Write one split's sample blocks to ``{split}-NNNNNN.tar``, cutting by samples and bytes.

    The bytes equal what mmdata.format.ShardWriter writes (tested); the tar headers are made in the
    workers (sample_block) so that the main process only appends and hashes.
    """

    def __init__(self, out: Path, split: str, max_samples: int, max_bytes: int, first_index: int = 0):
        self.out, self.split = out, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.index = first_index
        self._file = None
        self._sha = hashlib.sha256()
        self._pos = 0
        self._rows: list[dict[str, Any]] = []
        self._texts: list[str] = []

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def add(self, enc: Encoded) -> ShardDone | None:
        """Append a sample; return the shard this closed first, when the sample did not fit in it."""
        done = None
        size = len(enc.block)
        if self._file is not None and (
            len(self._rows) >= self.max_samples or archive_bytes(self._pos + size) > self.max_bytes
        ):
            done = self.close()
        if self._file is None:
            self._file = open(self.out / (self.name + TMP_SUFFIX), "wb")
        self._file.write(enc.block)
        self._sha.update(enc.block)
        self._rows.append(index_row(enc, self.split, self.name, self._pos, size))
        self._pos += size
        if enc.text is not None:
            self._texts.append(enc.text)
        return done

    def close(self) -> ShardDone | None:
        """Finish the open shard (if any): end blocks, fsync, rename from its temporary name."""
        if self._file is None:
            return None
        tail = b"\0" * (archive_bytes(self._pos) - self._pos)  # two zero blocks, padded to a record
        self._file.write(tail)
        self._sha.update(tail)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.out / (self.name + TMP_SUFFIX), self.out / self.name)
        info = ShardInfo(self.name, len(self._rows), self._pos + len(tail), self._sha.hexdigest())
        done = ShardDone(info, self._rows, self._texts)
        self._file, self._sha, self._pos, self._rows, self._texts = None, hashlib.sha256(), 0, [], []
        self.index += 1
        return done


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
