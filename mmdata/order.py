"""The epoch plan: which samples each (rank, worker) slot reads, in which order, as a pure function.

The plan is a function of (shard sizes, seed, epoch, world size, number of workers, batch size,
drop_last, shuffle) and nothing else: no time, no pid, no global RNG. Steps:

1. Shard order: shuffled per epoch with a generator seeded by (seed, epoch), or kept as listed.
2. The stream: the shards' samples in that order (each shard's samples in file order, so reads are
   sequential). ``drop_last=False`` pads the stream by wrapping around to its start, as
   DistributedSampler does, until every rank gets ``ceil(N / world_size)`` samples; ``drop_last=True``
   cuts the tail so that every rank gets ``floor(N / world_size / B) * B`` samples.
3. A rank's batches ``j = 0 .. nb-1`` belong to worker ``j % W``, so worker ``w`` owns
   ``len(range(w, nb, W))`` batches (all full but the rank's last one). The stream is cut into
   consecutive segments, one per slot, in (rank, worker) order: a slot may start in the middle of a
   shard, which is how fewer shards than slots still gives every slot its share.
4. Inside a slot, a buffer shuffle (as webdataset's ``shuffle(n)``) seeded by
   (seed, epoch, rank, worker) reorders the segment; it is computed on positions, so no byte is read.

Because batch ``j`` of a rank comes from worker ``j % W``, a round robin over the workers (what
``torch.utils.data.DataLoader`` does for an IterableDataset) yields the rank's batches in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class World:
    """Who reads: this process's rank among ``world_size`` and its DataLoader worker among ``num_workers``.

    ``num_workers=0`` (loading in the main process) counts as one worker, number 0.
    """

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be 0 or more, got {self.num_workers}")
        if not 0 <= self.worker < self.workers_per_rank:
            raise ConfigError(f"worker must be in [0, {self.workers_per_rank}), got {self.worker}")

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers_per_rank

    @property
    def slot(self) -> int:
        """Index of this (rank, worker) among all slots, rank-major."""
        return self.rank * self.workers_per_rank + self.worker


@dataclass(frozen=True)
class PlanConfig:
    """What the order depends on besides the world: the batching and the seed."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    shuffle_buffer: int = 512

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"shuffle_buffer must be positive, got {self.shuffle_buffer}")


def samples_per_rank(num_samples: int, world_size: int, cfg: PlanConfig) -> int:
    """Samples every rank reads per epoch (padding included)."""
    if cfg.drop_last:
        return num_samples // world_size // cfg.batch_size * cfg.batch_size
    return -(-num_samples // world_size)


def batches_per_rank(num_samples: int, world_size: int, cfg: PlanConfig) -> int:
    """Batches every rank yields per epoch: the same on all ranks."""
    return -(-samples_per_rank(num_samples, world_size, cfg) // cfg.batch_size)


def worker_batches(world: World, num_samples: int, cfg: PlanConfig) -> list[int]:
    """Sizes of the batches this slot's worker yields, in order: the rank's batches j with j % W == worker."""
    n = samples_per_rank(num_samples, world.world_size, cfg)
    nb = -(-n // cfg.batch_size)
    W = world.workers_per_rank
    return [min(cfg.batch_size, n - j * cfg.batch_size) for j in range(world.worker, nb, W)]


def shard_order(num_shards: int, epoch: int, cfg: PlanConfig) -> np.ndarray:
    """Shard indices in the order this epoch reads them: (num_shards,) int64."""
    if not cfg.shuffle:
        return np.arange(num_shards, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, epoch])))
    return rng.permutation(num_shards).astype(np.int64)


def slot_samples(shard_sizes: list[int] | np.ndarray, epoch: int, world: World, cfg: PlanConfig) -> np.ndarray:
    """Sample numbers (positions in the split, shard by shard in file order) this slot reads, in stream order.

    Returns (n,) int64; the buffer shuffle is not applied yet (see ``emission_order``).
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order = shard_order(len(sizes), epoch, cfg)
    # Slot counts: identical on every rank; inside a rank, worker w holds batches j = w, w+W, ...
    counts = []
    for rank in range(world.world_size):
        for w in range(world.workers_per_rank):
            counts.append(sum(worker_batches(World(rank, world.world_size, w, world.num_workers), total, cfg)))
    begin = sum(counts[: world.slot])
    end = begin + counts[world.slot]
    # Map stream positions [begin, end) to sample numbers; positions past the total wrap (padding).
    stream_starts = np.concatenate([[0], np.cumsum(sizes[order])])  # (S+1,) stream offset of each shard
    pos = np.arange(begin, end, dtype=np.int64) % total
    shard_at = np.searchsorted(stream_starts, pos, side="right") - 1  # index into ``order``
    return starts[order[shard_at]] + (pos - stream_starts[shard_at])


def emission_order(n: int, epoch: int, world: World, cfg: PlanConfig) -> np.ndarray:
    """Order in which a slot emits its ``n`` stream positions: (n,) int64, a permutation of range(n).

    A buffer shuffle: fill a buffer of ``shuffle_buffer`` positions, then emit a random one and put
    the next position in its place; at the end emit the rest shuffled. Seeded by
    (seed, epoch, rank, worker), so every slot draws a different sequence.
    """
    if not cfg.shuffle or n == 0:
        return np.arange(n, dtype=np.int64)
    rng = worker_generator(cfg.seed, epoch, world)
    size = min(cfg.shuffle_buffer, n)
    buf = list(range(size))
    picks = rng.integers(0, size, n - size) if n > size else ()
    out = []
    for i, j in zip(range(size, n), picks):
        out.append(buf[j])
        buf[j] = i
    out.extend(int(k) for k in rng.permutation(np.asarray(buf, dtype=np.int64)))
    return np.asarray(out, dtype=np.int64)


def worker_generator(seed: int, epoch: int, world: World) -> np.random.Generator:
    """The generator of one (seed, epoch, rank, worker): distinct for every slot and epoch."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, world.rank, world.worker])))


def slot_plan(shard_sizes: list[int] | np.ndarray, epoch: int, world: World,
              cfg: PlanConfig) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """This slot's epoch as the loader reads it: (stream, emit, sizes).

    ``stream`` (n,) sample numbers in read order; ``emit`` (n,) positions into ``stream`` in yield
    order; ``sizes`` the batch sizes that cut ``emit`` into this worker's batches.
    """
    stream = slot_samples(shard_sizes, epoch, world, cfg)
    return stream, emission_order(len(stream), epoch, world, cfg), worker_batches(world, int(np.sum(shard_sizes)), cfg)


def plan(shard_sizes: list[int] | np.ndarray, epoch: int, world: World, cfg: PlanConfig) -> list[np.ndarray]:
    """This slot's batches for the epoch: a list of (b,) int64 arrays of sample numbers, in yield order."""
    stream, emit, sizes = slot_plan(shard_sizes, epoch, world, cfg)
    emitted = stream[emit]
    bounds = np.cumsum([0, *sizes])
    return [emitted[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
