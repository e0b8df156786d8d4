"""Read samples' bytes from shards by their index offsets: pread locally, ranged reads through fsspec."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from .dataset import Dataset, SplitIndex, _local, is_url
from .errors import CorruptShardError
from .format import group_samples, parse_members

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
        self._fds: OrderedDict[int, int] = OrderedDict()  # shard -> descriptor, least recent first
        self._remote = is_url(dataset.root)
        self._fs = None

    def read_range(self, shard: int, start: int, length: int) -> bytes:
        """``length`` bytes of shard ``shard`` from ``start``; CorruptShardError when missing or short."""
        file = self.index.files[shard]
        path = self.dataset.url(file)
        try:
            if self._remote and self.dataset.cache is None:
                data = self._fs_cat(path, start, start + length)
            else:
                data = os.pread(self._fd(shard, path), length, start)
        except FileNotFoundError:
            raise CorruptShardError(f"shard {file!r} is missing from {self.dataset.root!r}; restore it or "
                                    "rebuild the dataset with `mmdata build`") from None
        except OSError as e:
            if isinstance(e, CorruptShardError):
                raise
            raise CorruptShardError(f"shard {file!r} cannot be read: {e}") from None
        if len(data) < length:
            raise CorruptShardError(f"shard {file!r} is truncated: the index expects bytes {start}..{start + length}"
                                    f" but the file ends at {start + len(data)}; rebuild the dataset")
        return data

    def _fd(self, shard: int, path: str) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if len(self._fds) >= MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[shard] = self._open(shard, path)
        return fd

    def _open(self, shard: int, path: str) -> int:
        """A descriptor of a local shard, or of the cached local copy of a remote one."""
        if not self._remote:
            return os.open(_local(path), os.O_RDONLY)
        from .cache import ShardCache
        from .storage import with_retries

        fs, p = self._url_to_fs(path)
        size = self.dataset.card.splits[self.split].shards[shard].bytes
        return ShardCache(*self.dataset.cache).open(
            path, lambda tmp: with_retries(lambda: fs.get_file(p, tmp), f"downloading {path}"), size)

    def _fs_cat(self, path: str, start: int, end: int) -> bytes:
        from .storage import with_retries

        fs, p = self._url_to_fs(path)
        return with_retries(lambda: fs.cat_file(p, start=start, end=end), f"reading {path}")

    def _url_to_fs(self, path: str):
        from .storage import url_to_fs

        if self._fs is None:  # one filesystem per reader (per worker), with the dataset's options
            self._fs = url_to_fs(self.dataset.root, self.dataset.storage_options)[0]
        return self._fs, self._fs._strip_protocol(path)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()  # file descriptors never cross a process boundary
        state["_fs"] = None
        return state


def parse_sample(data: bytes | memoryview, file: str, key: str) -> dict[str, bytes]:
    """Members {ext: bytes} of one sample's byte range; CorruptShardError naming shard and key."""
    try:
        groups = list(group_samples(parse_members(data)))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptShardError(f"shard {file!r}, sample {key!r}: {e}; rebuild the dataset") from None
    if len(groups) != 1 or groups[0][0] != key:
        found = [g[0] for g in groups]
        raise CorruptShardError(f"shard {file!r}: the index puts sample {key!r} at this offset but the bytes "
                                f"hold {found}; the index and shard disagree, rebuild the dataset")
    return groups[0][1]


def read_stream(reader: ShardReader, samples: np.ndarray) -> Iterator[tuple[int, dict[str, bytes] | Exception]]:
    """Yield (position, members or the error) for sample numbers ``samples`` (n,), reading adjacent ones at once.

    A failure is yielded, not raised, so the caller decides between raising and skipping; a range
    that cannot be read fails each of its samples.
    """
    idx = reader.index
    n = len(samples)
    i = 0
    while i < n:
        # grow a run of samples that are back to back in one shard
        first = int(samples[i])
        shard, start = int(idx.shard[first]), int(idx.offset[first])
        end = start + int(idx.size[first])
        j = i + 1
        while j < n and end - start < CHUNK_BYTES:
            s = int(samples[j])
            if int(idx.shard[s]) != shard or int(idx.offset[s]) != end:
                break
            end += int(idx.size[s])
            j += 1
        try:
            chunk = memoryview(reader.read_range(shard, start, end - start))
        except CorruptShardError as e:
            for p in range(i, j):
                yield p, e
            i = j
            continue
        for p in range(i, j):
            s = int(samples[p])
            a = int(idx.offset[s]) - start
            try:
                yield p, parse_sample(chunk[a:a + int(idx.size[s])], idx.files[shard], str(idx.keys[s]))
            except CorruptShardError as e:
                yield p, e
        i = j
