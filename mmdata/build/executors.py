"""Executors: where a build's per-record work runs; a fork pool here, or Ray tasks on a cluster.

Both follow one deterministic plan, so they write byte-identical datasets:

- each split's records are encoded in the split's shuffled order;
- shards are cut greedily by ``max_samples`` / ``max_bytes`` exactly as ``shards.SplitWriter`` cuts them.

``LocalExecutor`` streams encoded samples through the main process, which appends them to the shard
being written (the runner's loop, resumable shard by shard). ``RayExecutor`` runs two kinds of task:
encode tasks (one per chunk of records) return each sample's size to the driver and keep the sample
bytes in Ray's object store; the driver cuts the shards from those sizes alone (``ShardCutter``), and
one write task per shard gathers its samples and writes the shard to the destination (local folder or
fsspec URL). Sample bytes never pass through the driver; the driver only plans and writes the card.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..card import ShardInfo
from ..errors import ConfigError
from ..format import archive_bytes, shard_name
from .align import Reject
from .media import Encoded, encode_and_pack
from .shards import ShardDone, index_row

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
RAY_CHUNK = 32  # records per Ray encode task
PROBE_WINDOW = 64  # jobs timed in the main process before deciding where the next ones run
SHIP_ABOVE = 300e-6  # seconds a job must take to be worth shipping to a worker process


class LocalExecutor:
    """An order-keeping map, in this process or over a fork process pool.

    Sending a record to a worker and its tar bytes back costs about as much as packing a file that is
    kept as it is, and a forked pool makes every later write of this process copy a shared page
    (0.05 s on a pack-only build of 2,500 records). So the pool is forked only when the runner
    expects decoding work (``start``, before any other thread exists), and even then jobs run here,
    timed, window by window, until a window averages more than ``SHIP_ABOVE`` seconds a job.
    Results and their order are the same either way.
    """

    name = "local"
    writes_shards = False  # the runner's loop writes them as samples arrive

    def __init__(self, workers: int, jobs: int, clock: Callable[[], float] = time.perf_counter):
        self.workers = workers if jobs > 32 else 1
        self.pool = None
        self.shipping = False
        self.clock = clock  # times the probe window (tests pass a fake one)

    def start(self, decoding: bool) -> None:
        """Fork the pool if the jobs will decode or re-encode media and there are workers to share them."""
        if decoding and self.workers > 1 and self.pool is None:
            self.pool = multiprocessing.get_context("fork").Pool(self.workers)

    def map(self, fn: Callable, jobs: Iterable) -> Iterator:
        if self.pool is None:
            return map(fn, jobs)
        return self._map_adaptive(fn, iter(jobs))

    def _map_adaptive(self, fn: Callable, jobs: Iterator) -> Iterator:
        while not self.shipping:
            window = list(itertools.islice(jobs, PROBE_WINDOW))
            if not window:
                return
            spent = 0.0
            for job in window:
                t0 = self.clock()
                result = fn(job)
                spent += self.clock() - t0  # the job only, not the consumer's time between yields
                yield result
            if spent / len(window) > SHIP_ABOVE:
                log.debug("%.1f ms a job: encoding the rest in %d processes", 1e3 * spent / len(window),
                          self.workers)
                self.shipping = True
        yield from self.pool.imap(fn, jobs, chunksize=64)

    def check_map(self, fn: Callable, jobs: Iterable) -> Iterator:
        """The record checks (a stat and a header each) run here: cheaper than shipping records to workers."""
        return map(fn, jobs)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class RayExecutor:
    """Ray tasks: order-keeping chunked map, and a split written as one task per shard.

    Connects to ``address`` (``"auto"``, ``"ray://host:10001"``, ...) or starts a local Ray; a Ray
    session that was already initialised is used as it is and left running.
    """

    name = "ray"
    writes_shards = True

    def __init__(self, address: str | None = None, num_cpus: int | None = None, chunk: int = RAY_CHUNK):
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'mmdata[ray]'") from None
        self.ray = ray
        self.chunk = chunk
        self._owned = not ray.is_initialized()
        if self._owned:
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                kw["num_cpus"] = num_cpus
            ray.init(address=address, **kw)
        self._encode = ray.remote(num_returns=2)(_encode_chunk)
        self._write = ray.remote(_write_shard)
        self._map = ray.remote(_map_chunk)

    def map(self, fn: Callable, jobs: Iterable) -> Iterator:
        jobs = list(jobs)
        refs = [self._map.remote(fn, jobs[i:i + self.chunk]) for i in range(0, len(jobs), self.chunk)]
        for ref in refs:
            yield from self.ray.get(ref)

    def check_map(self, fn: Callable, jobs: Iterable) -> Iterator:
        return self.map(fn, jobs)  # a cluster's input can be millions of records: check them in parallel

    def start(self, decoding: bool) -> None:
        """Nothing to start: Ray's workers are there already."""

    def write_split(self, split: str, jobs: list[tuple], max_samples: int, max_bytes: int,
                    storage) -> tuple[list[ShardDone], list[Reject]]:
        """Encode ``jobs`` (record, settings) and write the split's shards to ``storage``; return them and rejects.

        Encode tasks run a window ahead of the cut; a chunk's sample bytes are dropped from the object
        store once the shards that need them are written, so it holds about a window, not the split.
        """
        ray = self.ray
        chunks = [jobs[i:i + self.chunk] for i in range(0, len(jobs), self.chunk)]
        window = max(4, 2 * int(ray.cluster_resources().get("CPU", 2)))
        inflight: deque = deque()  # (chunk number, sizes ref, blocks ref), in chunk order
        blocks: dict[int, Any] = {}  # chunk -> blocks ref, while a shard still to be written needs it
        cutter, writes, rejects, submitted = ShardCutter(max_samples, max_bytes), [], [], 0

        def write(picks: list[tuple[int, int]]) -> None:
            needed = sorted({c for c, _ in picks})
            writes.append(self._write.remote(storage, split, len(writes), picks, needed, *[blocks[c] for c in needed]))

        while submitted < len(chunks) or inflight:
            while submitted < len(chunks) and len(inflight) < window:
                inflight.append((submitted, *self._encode.remote(chunks[submitted])))
                submitted += 1
            c, sizes, blocks[c] = inflight.popleft()
            for i, size in enumerate(ray.get(sizes)):  # per record: its block size or its Reject
                if isinstance(size, Reject):
                    rejects.append(size)
                    continue
                closed = cutter.add((c, i), size)
                if closed:
                    write(closed)
                    for old in [k for k in blocks if k < c]:  # the open shard starts in chunk c
                        del blocks[old]
        last = cutter.close()
        if last:
            write(last)
        return list(ray.get(writes)), rejects

    def close(self) -> None:
        if self._owned:
            self.ray.shutdown()


def make_executor(name: str, *, workers: int, jobs: int, ray_address: str | None = None):
    """The executor called ``name`` ("local" or "ray")."""
    if name == "local":
        if ray_address:
            raise ConfigError(f"--ray-address {ray_address!r} needs --executor ray")
        return LocalExecutor(workers, jobs)
    if name == "ray":
        return RayExecutor(ray_address, num_cpus=workers)
    raise ConfigError(f"executor must be one of {EXECUTORS}, got {name!r}")


class ShardCutter:
    """Cut a stream of sample sizes into shards exactly as SplitWriter.add does, without the bytes."""

    def __init__(self, max_samples: int, max_bytes: int):
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.picks: list = []
        self.pos = 0

    def add(self, item, size: int) -> list | None:
        """Add a sample of ``size`` block bytes; return the shard (its items) it closed first, if any."""
        done = None
        if self.picks and (len(self.picks) >= self.max_samples or archive_bytes(self.pos + size) > self.max_bytes):
            done = self.close()
        self.picks.append(item)
        self.pos += size
        return done

    def close(self) -> list | None:
        done, self.picks, self.pos = self.picks or None, [], 0
        return done


def pack_shard(split: str, index: int, samples: list[Encoded]) -> tuple[bytes, ShardDone]:
    """A whole shard's bytes and its ShardDone; the same bytes as SplitWriter writes for these samples."""
    name = shard_name(split, index)
    rows, texts, pos = [], [], 0
    for enc in samples:
        rows.append(index_row(enc, split, name, pos, len(enc.block)))
        pos += len(enc.block)
        if enc.text is not None:
            texts.append(enc.text)
    data = b"".join([*(e.block for e in samples), b"\0" * (archive_bytes(pos) - pos)])
    return data, ShardDone(ShardInfo(name, len(samples), len(data), hashlib.sha256(data).hexdigest()), rows, texts)


# ---- Ray task bodies (plain functions: Ray ships them by reference to the mmdata module) ---------------------


def _map_chunk(fn: Callable, jobs: list) -> list:
    return [fn(job) for job in jobs]


def _encode_chunk(jobs: list[tuple]) -> tuple[list[int | Reject], list[Encoded | None]]:

    results = [encode_and_pack(job) for job in jobs]
    sizes = [r if isinstance(r, Reject) else len(r.block) for r in results]
    return sizes, [None if isinstance(r, Reject) else r for r in results]


def _write_shard(storage, split: str, index: int, picks: list[tuple[int, int]], chunks: list[int],
                 *blocks: list[Encoded | None]) -> ShardDone:
    by_chunk = dict(zip(chunks, blocks))
    samples = [by_chunk[c][i] for c, i in picks]
    data, done = pack_shard(split, index, samples)
    storage.write(done.info.file, data)
    return done


__all__ = ["EXECUTORS", "LocalExecutor", "RayExecutor", "ShardCutter", "make_executor", "pack_shard"]
