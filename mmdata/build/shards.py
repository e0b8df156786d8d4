"""Shards: cut an ordered stream of encoded samples into tars by max_samples/max_bytes, renamed when complete."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..card import ShardInfo
from ..format import archive_bytes, modality_of, shard_name
from .media import Encoded

TMP_SUFFIX = ".partial"  # a shard being written: never a name that ends in .tar
SINK_BATCH = 4 << 20  # bytes of sample blocks handed to the writing thread at once
SINK_DEPTH = 4  # batches queued for the writing thread before the encoder waits for it


def index_row(enc: Encoded, split: str, shard: str, offset: int, size: int) -> dict[str, Any]:
    """One index.parquet row (labels under their task names; the runner prefixes them)."""
    modalities = sorted(filter(None, map(modality_of, enc.exts)))  # one member per modality
    return {
        "key": enc.key, "split": split, "shard": shard, "offset": offset, "size": size,
        "modalities": modalities, "image_width": enc.image_width, "image_height": enc.image_height,
        "audio_seconds": enc.audio_seconds, "text_chars": enc.text_chars, "source_id": enc.source_id,
        "labels": enc.labels, "exts": sorted(enc.exts), "meta": enc.meta or {},
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
    workers (sample_block) and a thread appends and hashes them (_Sink), so the main process only
    hands blocks over. A shard gets its final name once complete; ``sync()`` waits until every
    shard is also on disk (call it before the card).
    """

    def __init__(self, out: Path, split: str, max_samples: int, max_bytes: int, first_index: int = 0,
                 text_budget: int = 0):
        self.out, self.split = out, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.index = first_index
        self.text_budget = text_budget  # UTF-8 bytes of text kept for the tokenizer, over the whole split
        self._sink: _Sink | None = None
        self._closed: list[_Sink] = []  # renamed, maybe not yet fsynced
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
        if self._sink is not None and (
            len(self._rows) >= self.max_samples or archive_bytes(self._pos + size) > self.max_bytes
        ):
            done = self.close()
        if self._sink is None:
            self._sink = _Sink(self.out / (self.name + TMP_SUFFIX))
        self._sink.put(enc.block)
        self._rows.append(index_row(enc, self.split, self.name, self._pos, size))
        self._pos += size
        if enc.text is not None and self.text_budget > 0:
            text = enc.text.encode("utf-8")[: self.text_budget].decode("utf-8", "ignore")
            self.text_budget -= len(text.encode("utf-8")) or 1
            self._texts.append(text)
        return done

    def close(self) -> ShardDone | None:
        """Finish the open shard (if any): end blocks, then the final name; its fsync follows in the thread."""
        if self._sink is None:
            return None
        tail = b"\0" * (archive_bytes(self._pos) - self._pos)  # two zero blocks, padded to a record
        sha = self._sink.finish(tail)
        os.replace(self.out / (self.name + TMP_SUFFIX), self.out / self.name)
        self._closed.append(self._sink)
        info = ShardInfo(self.name, len(self._rows), self._pos + len(tail), sha)
        done = ShardDone(info, self._rows, self._texts)
        self._sink, self._pos, self._rows, self._texts = None, 0, [], []
        self.index += 1
        return done

    def sync(self) -> None:
        """Wait until every closed shard is fsynced; raise what the writing thread met."""
        while self._closed:
            self._closed.pop().join()

    def abandon(self) -> None:
        """Stop the open shard's thread after an error elsewhere; a resumed build redoes that shard."""
        if self._sink is not None:
            self._sink.abandon()
            self._sink = None


class _Sink:
    """One shard file appended to and hashed by a thread (file writes and sha256 release the GIL).

    ``finish`` returns the hash once the last bytes are written and flushed; the thread then fsyncs
    and closes the file, which ``join`` waits for. An error in the thread is raised in the caller.
    """

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(SINK_DEPTH)
        self._batch: list[bytes] = []
        self._batched = 0
        self._flushed = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"mmdata-write-{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (batch := self._queue.get()) is not None:  # consumed to the end, even after an error
                if self._error is None:
                    try:
                        data = b"".join(batch)
                        self._file.write(data)
                        self._sha.update(data)
                    except BaseException as e:  # noqa: BLE001 - raised in the main thread
                        self._error = e
            if self._error is None:
                self._file.flush()
                self._flushed.set()
                os.fsync(self._file.fileno())
        except BaseException as e:  # noqa: BLE001
            self._error = self._error or e
        finally:
            self._flushed.set()
            try:
                self._file.close()
            except OSError as e:  # the buffer's last bytes after an error: the first error is the one to tell
                self._error = self._error or e

    def put(self, block: bytes) -> None:
        self._batch.append(block)
        self._batched += len(block)
        if self._batched >= SINK_BATCH:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._error is not None:
            self.abandon()
            raise self._error
        self._queue.put(self._batch)
        self._batch, self._batched = [], 0

    def finish(self, tail: bytes) -> str:
        self._batch.append(tail)
        self._hand_over()
        self._queue.put(None)
        self._flushed.wait()
        if self._error is not None:
            self.join()
        return self._sha.hexdigest()

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Stop the thread of a shard that will not be finished (its partial file stays, as after a kill)."""
        self._queue.put(None)
        self._thread.join()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
