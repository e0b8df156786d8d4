"""Read samples' bytes from shards by their index offsets: pread of local files (or cached copies), ranged
reads of remote ones, all through the dataset's ``Storage``."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from .dataset import Dataset, SplitIndex
from .errors import CorruptShardError, MmdataError
from .format import TarError, group_samples, parse_members

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # one read covers adjacent samples up to this many bytes
MAX_OPEN = 64  # shard descriptors kept open per reader; the least recently used is closed past this


class ShardReader:
    """Byte ranges of one split's shards. Opens files lazily (in the worker), keeps at most ``MAX_OPEN``
    open (a split of 100,000 shards must not exhaust descriptors), and closes them on ``close``."""

    def __init__(self, dataset: Dataset, split: str):
        self.dataset = dataset
        self.split = split
        self.index: SplitIndex = dataset.split_index(split)
        self.storage = dataset.storage
        self._ranged = self.storage.ranged  # remote without a cache: byte-range reads, no descriptors
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recent first
        self._sizes: dict[int, int] = {}  # shard -> bytes of the file opened for it

    def read_range(self, shard: int, start: int, length: int) -> bytes:
        """At most ``length`` bytes of shard ``shard`` from ``start``: fewer where the file ends sooner.

        Never reads past the shard's size in dataset.json. CorruptShardError when the shard is missing,
        unreadable, or (locally) not a regular file inside the dataset folder.
        """
        file = self.index.files[shard]
        limit = self.index.shard_bytes[shard] if self.index.shard_bytes else None
        if start < 0 or length < 0 or (limit is not None and start + length > limit):
            raise CorruptShardError(f"shard {file!r}: bytes {start}..{start + length} are outside the shard's "
                                    f"{limit} bytes in dataset.json; rebuild the dataset")
        try:
            if self._ranged:
                return self.storage.read(file, start, start + length)
            fd = self._fd(shard)
            # pread allocates ``length`` first: never more than the file holds, whatever the card says
            return os.pread(fd, max(0, min(length, self._sizes[shard] - start)), start)
        except FileNotFoundError:
            raise CorruptShardError(f"shard {file!r} is missing from {self.dataset.root!r}; restore it or "
                                    "rebuild the dataset with `mmdata build`") from None
        except OSError as e:
            if isinstance(e, CorruptShardError):
                raise
            raise CorruptShardError(f"shard {file!r} cannot be read: {e}") from None

    def _fd(self, shard: int) -> int:
        """A descriptor of the shard (local) or of its cached copy (remote); at most ``MAX_OPEN`` kept open."""
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if len(self._fds) >= MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        size = self.index.shard_bytes[shard] if self.index.shard_bytes else None
        fd = self._fds[shard] = self.storage.descriptor(self.index.files[shard], size)
        self._sizes[shard] = os.fstat(fd).st_size
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()  # file descriptors never cross a process boundary
        state["_sizes"] = {}
        return state


def sample_error(cls: type[MmdataError], file: str, key: str, offset: int, what: str) -> MmdataError:
    """The one form of a sample's error: the shard, the key and the absolute byte offset, then what."""
    return cls(f"shard {file!r}, sample {key!r} at byte {offset}: {what}")


def parse_sample(data: bytes | memoryview, file: str, key: str, offset: int = 0) -> dict[str, bytes]:
    """Members {ext: bytes} of one sample's byte range, read from byte ``offset`` of shard ``file``.

    CorruptShardError naming shard, key and the absolute byte offset of what is wrong.
    """
    try:
        groups = list(group_samples(parse_members(data, base=offset)))
    except TarError as e:  # its byte offsets are the shard's: parse_members counts from ``offset``
        raise sample_error(CorruptShardError, file, key, offset, f"{e}; rebuild the dataset") from None
    if len(groups) != 1 or groups[0][0] != key:
        found = [g[0] for g in groups]
        raise sample_error(CorruptShardError, file, key, offset, f"the bytes there hold samples {found}, not "
                           f"{key!r}; the index and shard disagree, rebuild the dataset")
    return groups[0][1]


def read_stream(reader: ShardReader, samples: np.ndarray) -> Iterator[tuple[int, dict[str, bytes] | Exception]]:
    """Yield (position, members or the error) for sample numbers ``samples`` (n,), reading adjacent ones at once.

    A failure is yielded, not raised, so the caller decides between raising and skipping. A row whose
    byte range the index gets wrong (``SplitIndex.problems``) fails alone and is never read; only rows
    that are back to back in one shard share a read, so rows that overlap never do, and a read that the
    file's end cuts short fails only the samples past that end.
    """
    idx = reader.index
    n = len(samples)
    i = 0
    while i < n:
        first = int(samples[i])
        if first in idx.problems:
            yield i, idx.row_error(first)
            i += 1
            continue
        # grow a run of good samples that are back to back in one shard
        shard, start = int(idx.shard[first]), int(idx.offset[first])
        end = start + int(idx.size[first])
        j = i + 1
        while j < n and end - start < CHUNK_BYTES:
            s = int(samples[j])
            if s in idx.problems or int(idx.shard[s]) != shard or int(idx.offset[s]) != end:
                break
            end += int(idx.size[s])
            j += 1
        try:
            data = reader.read_range(shard, start, end - start)
        except CorruptShardError as e:
            for p in range(i, j):
                yield p, e
            i = j
            continue
        chunk, file = memoryview(data), idx.files[shard]
        for p in range(i, j):
            s = int(samples[p])
            off, size, key = int(idx.offset[s]), int(idx.size[s]), str(idx.keys[s])
            if off + size > start + len(data):
                yield p, sample_error(CorruptShardError, file, key, off, f"the file ends at byte "
                                      f"{start + len(data)}, before the sample's end at byte {off + size}: the "
                                      "shard is truncated, rebuild the dataset")
                continue
            try:
                yield p, parse_sample(chunk[off - start:off - start + size], file, key, off)
            except CorruptShardError as e:
                yield p, e
        i = j
