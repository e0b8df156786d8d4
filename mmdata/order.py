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

A mixture (``Blend``) replaces steps 1-2 by a stream of (source, sample) pairs, drawn per epoch (see
``blend_stream``); steps 3-4 cut and reorder it exactly as they do a single dataset's stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

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


def generator(*key: int) -> np.random.Generator:
    """The generator of one key of integers, e.g. (seed, epoch): every draw of the plan comes from one."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def shard_order(num_shards: int, epoch: int, cfg: PlanConfig) -> np.ndarray:
    """Shard indices in the order this epoch reads them: (num_shards,) int64."""
    if not cfg.shuffle:
        return np.arange(num_shards, dtype=np.int64)
    return generator(cfg.seed, epoch).permutation(num_shards).astype(np.int64)


def slot_range(num_samples: int, world: World, cfg: PlanConfig) -> tuple[int, int]:
    """Stream positions [begin, end) this slot reads; positions from ``num_samples`` on wrap (padding).

    Slots take consecutive segments in (rank, worker) order; every rank's segment has the same length,
    and inside a rank worker w holds batches j = w, w+W, ...
    """
    before = sum(sum(worker_batches(World(world.rank, world.world_size, w, world.num_workers), num_samples, cfg))
                 for w in range(world.worker))
    begin = world.rank * samples_per_rank(num_samples, world.world_size, cfg) + before
    return begin, begin + sum(worker_batches(world, num_samples, cfg))


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
    begin, end = slot_range(total, world, cfg)
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
    picks = rng.integers(0, size, n - size) if n > size else np.zeros(0, dtype=np.int64)
    # Without a loop: step t emits what slot picks[t] holds, i.e. the position put there at the slot's
    # previous pick (size + that step), or the slot's first position when it was never picked before.
    order = np.argsort(picks, kind="stable")  # steps grouped by slot, in time order within a slot
    slots = picks[order]
    first = np.ones(len(slots), dtype=bool)
    first[1:] = slots[1:] != slots[:-1]
    before = np.empty(len(slots), dtype=np.int64)
    before[1:] = size + order[:-1]
    out = np.empty(len(slots), dtype=np.int64)
    out[order] = np.where(first, slots, before)
    buf = np.arange(size, dtype=np.int64)  # what each slot holds at the end, emitted shuffled
    last = np.ones(len(slots), dtype=bool)
    last[:-1] = slots[1:] != slots[:-1]
    buf[slots[last]] = size + order[last]
    return np.concatenate([out, rng.permutation(buf)])


def worker_generator(seed: int, epoch: int, world: World) -> np.random.Generator:
    """The generator of one (seed, epoch, rank, worker): distinct for every slot and epoch."""
    return generator(seed, epoch, world.rank, world.worker)


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
    return _cut(stream[emit], sizes)


def _cut(emitted: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """``emitted`` (n, ...) cut into consecutive batches of ``sizes``."""
    bounds = np.cumsum([0, *sizes])
    return [emitted[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# Keys of a mixture's draws: (seed, MIX, what, ...) never meets a single dataset's (seed, epoch[, rank, worker]).
MIX = 0x4D4958
_CYCLE, _READ, _INTERLEAVE = 0, 1, 2


@dataclass(frozen=True)
class Blend:
    """A mixture's sources as the plan sees them: each one's samples per shard and share, and the epoch length.

    ``weights`` are exact shares summing to 1; a source with weight 0 (left out, or without the split)
    has no shards and is never drawn. Every drawn source gets at least one sample's share per epoch.
    """

    shard_sizes: tuple[tuple[int, ...], ...]
    weights: tuple[Fraction, ...]
    samples_per_epoch: int
    names: tuple[str, ...] = ()  # for messages only

    def __post_init__(self) -> None:
        names = self.names or tuple(str(i) for i in range(len(self.weights)))
        assert len(self.shard_sizes) == len(self.weights) == len(names), "one entry per source"
        assert sum(self.weights) == 1 and min(self.weights) >= 0, f"shares must sum to 1, got {self.weights}"
        if self.samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch must be positive, got {self.samples_per_epoch}")
        for name, sizes, w in zip(names, self.shard_sizes, self.weights):
            if w and not sum(sizes):
                raise ConfigError(f"source {name!r} has weight {float(w):.3g} but no samples; give it weight 0")
            if w and w * self.samples_per_epoch < 1:
                raise ConfigError(f"source {name!r} gets a share {float(w):.3g} of {self.samples_per_epoch} samples "
                                  "per epoch, less than one sample; raise its weight or samples_per_epoch")


def blend_taken(blend: Blend, epoch: int) -> np.ndarray:
    """(S,) int64: samples each source gave in the epochs before ``epoch``, i.e. its place in its cycle.

    Differences of floor(epoch * K * (w_0 + ... + w_s)) over s, in exact rationals: every epoch's counts
    sum to K, each source's long-run share is exactly its weight, and no epoch's count is negative
    (that needs each drawn source's K * w_s >= 1, which ``Blend`` checks).
    """
    total, acc, cum = epoch * blend.samples_per_epoch, Fraction(0), [0]
    for w in blend.weights:
        acc += w
        cum.append(math.floor(total * acc))
    return np.diff(np.asarray(cum, dtype=np.int64))


def blend_counts(blend: Blend, epoch: int) -> np.ndarray:
    """(S,) int64 samples each source gives in ``epoch``; they sum to ``samples_per_epoch``."""
    return blend_taken(blend, epoch + 1) - blend_taken(blend, epoch)


def source_stream(shard_sizes: tuple[int, ...], first: int, count: int, epoch: int, source: int,
                  cfg: PlanConfig) -> np.ndarray:
    """Sample numbers that source ``source`` gives in ``epoch``, in read order: (count,) int64.

    The source's samples in one fixed order (a permutation seeded by (seed, source); file order without
    shuffle) are consumed cyclically across epochs; this epoch takes cycle positions [first, first + count).
    A window no longer than the source repeats nothing, and successive windows see every sample. Each
    round of the cycle in the window is put in read order (its shards in an order drawn per (seed, epoch,
    source, round), each shard's samples in file order), so reads go forward through the files.
    """
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    n = int(sizes.sum())
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    cycle = generator(cfg.seed, MIX, _CYCLE, source).permutation(n) if cfg.shuffle else np.arange(n)
    shard_of = np.repeat(np.arange(len(sizes)), sizes)  # (n,) shard of each sample number
    out, start, end = [], first, first + count
    while start < end:
        stop = min(end, (start // n + 1) * n)  # this round ends at the next multiple of n
        chunk = cycle[start % n:(stop - 1) % n + 1]
        shards = (generator(cfg.seed, MIX, _READ, source, epoch, len(out)).permutation(len(sizes)) if cfg.shuffle
                  else np.arange(len(sizes)))
        rank = np.argsort(shards)  # (S,) place of each shard in this round's read order
        out.append(chunk[np.argsort(rank[shard_of[chunk]] * n + chunk)])
        start = stop
    return np.concatenate(out).astype(np.int64)


def blend_stream(blend: Blend, epoch: int, cfg: PlanConfig) -> tuple[np.ndarray, np.ndarray]:
    """The mixture's stream of ``epoch``: (source (K,), sample number (K,)) int64.

    Each source's part (``source_stream``) keeps its read order; the sources are interleaved at random
    per (seed, epoch), or one after another without shuffle.
    """
    taken, counts = blend_taken(blend, epoch), blend_counts(blend, epoch)
    src = np.repeat(np.arange(len(counts), dtype=np.int64), counts)  # (K,)
    if cfg.shuffle:
        src = generator(cfg.seed, MIX, _INTERLEAVE, epoch).permutation(src)
    sample = np.zeros(len(src), dtype=np.int64)
    for s in np.flatnonzero(counts).tolist():
        sample[src == s] = source_stream(blend.shard_sizes[s], int(taken[s]), int(counts[s]), epoch, s, cfg)
    return src, sample


def blend_slot_plan(blend: Blend, epoch: int, world: World,
                    cfg: PlanConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """This slot's epoch of a mixture as the loader reads it: (source, stream, emit, sizes).

    As ``slot_plan``, with ``source`` (n,) the source of each stream entry: the mixture's stream is cut
    into slots and reordered inside a slot by the very rules of a single dataset.
    """
    K = blend.samples_per_epoch
    begin, end = slot_range(K, world, cfg)
    src, sample = blend_stream(blend, epoch, cfg)
    pos = np.arange(begin, end, dtype=np.int64) % K
    return src[pos], sample[pos], emission_order(len(pos), epoch, world, cfg), worker_batches(world, K, cfg)


def blend_plan(blend: Blend, epoch: int, world: World, cfg: PlanConfig) -> list[np.ndarray]:
    """This slot's batches of a mixture: a list of (b, 2) int64 arrays of (source, sample number) rows."""
    src, stream, emit, sizes = blend_slot_plan(blend, epoch, world, cfg)
    return _cut(np.stack([src, stream], axis=1)[emit], sizes)
