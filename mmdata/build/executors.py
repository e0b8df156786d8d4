"""Executors: where a build's two passes run. One interface, two engines, byte-identical datasets.

``pack(jobs, ctx)`` runs ``pack.pack_record`` over (record, key) jobs and yields, in order, a ``Packed``
or a ``Reject`` per job. ``write(shards, ...)`` writes the planned shards and yields their
``ShardInfo`` in plan order.

``LocalExecutor``: packing runs in this process, timed window by window, until the jobs are worth
shipping to a fork pool (decoding, re-encoding); each worker appends to its own spill file and sends
back only where its bytes lie. Shards are written by threads that copy spans of the spill files
inside the kernel.

``RayExecutor``: packing runs as Ray tasks over chunks of records that keep the packed bytes in Ray's
object store and return only the facts; each shard is then one Ray task that gathers its samples'
bytes and writes the shard to the destination (local folder or fsspec URL). Sample bytes never pass
through the driver, which holds the compact catalogue and the object references of the chunks.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..card import ShardInfo
from ..errors import ConfigError
from .assemble import ShardFile, Span
from .pack import PackContext, Packed, close_spills, encode_record, pack_record, spill_for

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
RAY_CHUNK = 64  # records per Ray pack task
PROBE_WINDOW = 64  # jobs timed in the main process before deciding where the next ones run
SHIP_ABOVE = 50e-6  # seconds a job must take to be worth shipping to a worker process (about 10 us of pickling)
SHIP_WINDOW = 4096  # jobs shipped ahead of the results taken
CHUNK_SECONDS = 0.02  # work per message to a worker: a message costs the pool's threads about a millisecond
MAX_CHUNK = 512
TEXTS_KEPT = 256 << 20  # bytes of train texts a Ray driver keeps for the tokenizer (its sample is smaller)
RAY_PREFIX = "ray:"  # a Packed.spill that names a Ray chunk; its offset is the record's place in the chunk


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: each sample's packed members (spill, offset, size) and its ``KEY.json`` member.

    ``texts``: for a shard whose texts the tokenizer may read, each sample's text as (start in its packed
    members, bytes), start -1 for none; an executor whose packed bytes are not local hands them back.
    """

    name: str
    members: list[tuple[str, int, int]]
    json: list[bytes]
    texts: list[tuple[int, int]] | None = None


class LocalExecutor:
    """A fork pool used only for work that pays for it, and threads that write shards."""

    name = "local"

    def __init__(self, workers: int, clock: Callable[[], float] = time.perf_counter):
        self.workers = max(1, workers)
        self.pool = None
        self.shipping = False
        self.clock = clock  # times the probe window (tests pass a fake one)
        self._readers: dict[str, int] = {}  # spill file -> descriptor, for reads after packing
        self._stop = threading.Event()  # tells the pool's feeding thread to give up (close, an error)

    def pack(self, jobs: Iterable, ctx: PackContext) -> Iterator[Any]:
        return self.map(functools.partial(pack_record, ctx=ctx), jobs)

    def map(self, fn: Callable, jobs: Iterable) -> Iterator:
        """An order-keeping map: here, window by window, until a window averages over ``SHIP_ABOVE`` a job."""
        jobs = iter(jobs)
        per_job = 0.0
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
            per_job = spent / len(window)
            if self.workers > 1 and per_job > SHIP_ABOVE:
                log.debug("%.1f ms a job: the rest in %d processes", 1e3 * per_job, self.workers)
                self.shipping = True
        chunk = max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / max(per_job, 1e-9))))
        if self.pool is None:
            self.pool = multiprocessing.get_context("fork").Pool(self.workers)
        # The pool's feeding thread would read every job ahead (a whole manifest's records in memory):
        # it may run at most SHIP_WINDOW jobs ahead of the results taken.
        ahead = threading.BoundedSemaphore(max(SHIP_WINDOW, 2 * self.workers * chunk))
        stop = self._stop = threading.Event()

        def fed():
            for job in jobs:
                while not ahead.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                yield job

        try:
            for result in self.pool.imap(fn, fed(), chunksize=chunk):
                ahead.release()
                yield result
        finally:
            stop.set()

    def write(self, shards: Iterable[ShardPlan], out: str, spills: list[str], storage=None,
              hook: Callable[[ShardFile], None] | None = None) -> Iterator[ShardInfo]:
        """Write ``shards`` into the local folder ``out``, as many at a time as there are workers."""
        self._end_pool()
        close_spills()
        fds = {path: os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in spills}
        try:
            write = functools.partial(_write_local, out=out, fds=fds, hook=hook)
            if self.workers == 1:
                yield from map(write, shards)
                return
            with ThreadPoolExecutor(self.workers, thread_name_prefix="mmdata-shard") as threads:
                yield from in_order(lambda plan: threads.submit(write, plan).result, shards, 2 * self.workers)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _end_pool(self) -> None:
        """Let the workers finish and exit: the spill files are complete once the workers are gone."""
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def texts(self, shard: str, where: list[tuple[str, int, int, int]]) -> Iterator[bytes]:
        """The texts of one train shard's records (``where``: spill, offset, start, size each, in order)."""
        for spill, offset, start, size in where:
            yield self.read(spill, offset, start, size)

    def read(self, spill: str, offset: int, start: int, size: int) -> bytes:
        """``size`` bytes from ``start`` of the record packed at ``offset`` of ``spill``."""
        fd = self._readers.get(spill)
        if fd is None:
            fd = self._readers[spill] = os.open(spill, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, size, offset + start)

    def store(self, block: bytes, folder: str) -> tuple[str, int]:
        """Append a re-packed record to this process's spill file; return where it lies."""
        spill = spill_for(folder)
        return spill.path, spill.append(block)

    def close(self) -> None:
        self._stop.set()  # before terminate, which waits for the feeding thread
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        close_spills()
        for fd in self._readers.values():
            os.close(fd)
        self._readers = {}


def _write_local(plan: ShardPlan, out: str, fds: dict[str, int], hook) -> ShardInfo:
    shard = ShardFile(plan.name, os.path.join(out, plan.name))
    try:
        for (path, offset, size), js in zip(plan.members, plan.json):
            shard.start_sample()
            shard.add(Span(fds[path], offset, size))
            shard.add(js)
            if hook is not None:
                hook(shard)
        return shard.finish()
    finally:
        shard.abandon()


class RayExecutor:
    """Ray tasks: chunks of records packed into the object store, then one task per shard.

    Connects to ``address`` (``"auto"``, ``"ray://host:10001"``, ...) or starts a local Ray; a Ray
    session that was already initialised is used as it is and left running.
    """

    name = "ray"

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
        self._pack = ray.remote(num_returns=2)(_pack_chunk)
        self._write = ray.remote(_write_remote)
        self.blocks: list[Any] = []  # chunk -> object reference of its packed blocks
        self._texts: dict[str, tuple[bytes, list[int]]] = {}  # train shard -> its texts joined, their sizes
        self._texts_kept = 0

    def pack(self, jobs: Iterable, ctx: PackContext) -> Iterator[Any]:
        window = max(4, 2 * int(self.ray.cluster_resources().get("CPU", 2)))
        inflight: deque = deque()
        jobs = iter(jobs)
        while True:
            while len(inflight) < window and (chunk := list(itertools.islice(jobs, self.chunk))):
                facts, blocks = self._pack.remote(chunk, ctx, len(self.blocks))
                self.blocks.append(blocks)
                inflight.append(facts)
            if not inflight:
                return
            yield from self.ray.get(inflight.popleft())

    def write(self, shards: Iterable[ShardPlan], out: str, spills: list[str], storage=None,
              hook=None) -> Iterator[ShardInfo]:
        def submit(plan: ShardPlan) -> Callable[[], ShardInfo]:
            chunks = sorted({int(path[len(RAY_PREFIX):]) for path, _, _ in plan.members})
            ref = self._write.remote(storage, plan, chunks, *[self.blocks[c] for c in chunks])
            return lambda: self._keep_texts(plan.name, *self.ray.get(ref))

        window = max(4, 2 * int(self.ray.cluster_resources().get("CPU", 2)))
        yield from in_order(submit, shards, window)

    def _keep_texts(self, name: str, info: ShardInfo, joined: bytes, sizes: list[int]) -> ShardInfo:
        """Keep the texts a train shard's write task handed back, one bytes object a shard, up to
        ``TEXTS_KEPT`` bytes in all: what the tokenizer reads then costs no object-store fetch."""
        if joined and self._texts_kept < TEXTS_KEPT:
            self._texts[name] = (joined, sizes)
            self._texts_kept += len(joined)
        return info

    def texts(self, shard: str, where: list[tuple[str, int, int, int]]) -> Iterator[bytes]:
        """The texts of one train shard's records (``where``: spill, offset, start, size each, in order)."""
        kept = self._texts.pop(shard, None)
        if kept is not None:
            joined, sizes = kept
            self._texts_kept -= len(joined)
            ends = itertools.accumulate(sizes)
            yield from (joined[end - n:end] for n, end in zip(sizes, ends))
            return
        for spill, offset, start, size in where:
            yield self.read(spill, offset, start, size)

    def read(self, spill: str, offset: int, start: int, size: int) -> bytes:
        """``size`` bytes from ``start`` of a packed record (``offset``: its place in its chunk), fetched from
        the object store."""
        return self._fetch(spill, offset)[start:start + size]

    def _fetch(self, spill: str, offset: int) -> bytes:
        return self.ray.get(self.blocks[int(spill[len(RAY_PREFIX):])])[offset]

    def store(self, block: bytes, folder: str) -> tuple[str, int]:
        """Put a re-packed record in the object store as a chunk of its own."""
        self.blocks.append(self.ray.put([block]))
        return f"{RAY_PREFIX}{len(self.blocks) - 1}", 0

    def close(self) -> None:
        self.blocks = []
        if self._owned:
            self.ray.shutdown()


def in_order(submit: Callable[[Any], Callable[[], Any]], items: Iterable, window: int) -> Iterator:
    """Submit ``items`` at most ``window`` ahead of the results, which come back in the items' order."""
    pending: deque = deque()
    for item in items:
        pending.append(submit(item))
        if len(pending) >= window:
            yield pending.popleft()()
    while pending:
        yield pending.popleft()()


def make_executor(name: str, *, workers: int, ray_address: str | None = None):
    """The executor called ``name`` ("local" or "ray")."""
    if name == "local":
        if ray_address:
            raise ConfigError(f"--ray-address {ray_address!r} needs --executor ray")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(ray_address, num_cpus=workers)
    raise ConfigError(f"executor must be one of {EXECUTORS}, got {name!r}")


# ---- Ray task bodies (plain functions: Ray ships them by reference to the mmdata module) ---------------------


def _pack_chunk(jobs: list, ctx: PackContext, chunk: int) -> tuple[list, list[bytes | None]]:
    facts, blocks = [], []
    for i, job in enumerate(jobs):
        done = encode_record(job, ctx)
        if isinstance(done, tuple):
            block, packed = done
            done = packed._replace(spill=f"{RAY_PREFIX}{chunk}", offset=i)
        else:
            block = None
        facts.append(done)
        blocks.append(block)
    return facts, blocks


def _write_remote(storage, plan: ShardPlan, chunks: list[int],
                  *blocks: list[bytes | None]) -> tuple[ShardInfo, bytes, list[int]]:
    """Write one shard; hand back its info and, for a train shard, its texts joined and their sizes."""
    by_chunk = dict(zip(chunks, blocks))
    shard = ShardFile(plan.name)
    texts = []
    for n, ((path, i, _), js) in enumerate(zip(plan.members, plan.json)):
        block = by_chunk[int(path[len(RAY_PREFIX):])][i]
        shard.start_sample()
        shard.add(block)
        shard.add(js)
        if plan.texts is not None and plan.texts[n][0] >= 0:
            start, size = plan.texts[n]
            texts.append(block[start:start + size])
    info = shard.finish()
    storage.write(plan.name, shard.data)
    return info, b"".join(texts), [len(t) for t in texts]


__all__ = ["EXECUTORS", "LocalExecutor", "Packed", "RayExecutor", "ShardPlan", "make_executor"]
