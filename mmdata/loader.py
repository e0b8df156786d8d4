"""make_loader: stream a split into Batches, deterministically, rank-equal and exactly resumable.

Batches are made inside the DataLoader workers (an IterableDataset yielding whole Batches, read with
``DataLoader(batch_size=None)``). Batch ``j`` of a rank comes from worker ``j % W`` (see
``mmdata.order``), and the DataLoader's round robin over workers gives them back in order, so the
sequence is a pure function of (seed, epoch, world size, number of workers).

Iteration is a torch DataLoader's: each ``iter()`` reads an epoch from its first batch, except the first
one after ``load_state_dict``, which continues from the loaded position; a pass that yields every batch
moves on to the next epoch, and ``set_epoch`` picks one.

A ``Mixture`` is read by the same stream: one ShardReader and decoder per source, the plan of
(source, sample) pairs from ``order.blend_slot_plan``, and ``Batch.source`` saying where each row came from.

Resumption: the state is (epoch, batches yielded). A fresh loader skips those batches without reading
them: each worker computes its plan on sample numbers, drops the batches already yielded and reads
only the byte ranges the rest need (the index gives offsets). Worker ``i`` then plays the part of
worker ``(i + k) % W`` so that the round robin starts with the owner of batch ``k``.

``on_error="skip"``: a sample that cannot be read or decoded is logged (once per shard and worker),
counted in ``Loader.skipped`` and left out of its batch; the batch is still yielded, smaller (even
empty). Every rank therefore still yields ``len(loader)`` batches and DDP never waits on a missing one.
On the device path (``DevicePrefetcher``) an undecodable JPEG's image is marked absent and counted in the
same ``skipped``; one the device refuses but the CPU reads counts in ``host_fallbacks``; both resume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batch import MODALITIES, Batch
from .collate import collate, pack_jpegs
from .dataset import Dataset
from .decode import Decoder, DecodeSpec, Sample
from .errors import ConfigError, MmdataError, SchemaError
from .gpudecode import DecodeStats, PackedImages
from .mixture import Mixture
from .order import Blend, PlanConfig, World, batches_per_rank, blend_slot_plan, slot_plan
from .reader import ShardReader, read_stream, sample_error
from .tasks import TaskList

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class LoaderConfig:
    """Decode and transport options of the loader.

    ``image_size``: (H, W) or an int for square; None keeps the split's common image size.
    ``audio_seconds``: clip length (cropped from the start, zero-padded); None uses the split's longest.
    ``tokenizer``: a tokenizer.json path; None uses the dataset's ``tokenizer/``.
    ``audio_crop``: how clips longer than ``audio_seconds`` are cut; by default a random window in
    training (``shuffle=True``; a pure function of seed, epoch and key, so resumption is exact) and the
    centre in evaluation.
    ``decode_images_on="device"``: workers pass JPEGs undecoded, packed beside each Batch, for
    ``mmdata.prefetch.DevicePrefetcher`` to decode on its device (the loader is then read through it);
    other formats are still decoded on the workers.
    """

    image_size: int | tuple[int, int] | None = None
    audio_seconds: float | None = None
    max_text_tokens: int = 64
    shuffle_buffer: int = 512
    pin_memory: bool = True
    prefetch_factor: int = 2
    decode_images_on: str = "cpu"
    tokenizer: str | None = None
    persistent_workers: bool = False  # keep DataLoader workers alive across epochs (num_workers > 0)
    audio_crop: str | None = None  # "random" | "center" | "start"; None: random when shuffling, else center

    def __post_init__(self) -> None:
        if self.audio_crop not in (None, "random", "center", "start"):
            raise ConfigError(f"audio_crop must be 'random', 'center', 'start' or None, got {self.audio_crop!r}")
        if self.decode_images_on not in ("cpu", "device"):
            raise ConfigError(f"decode_images_on must be 'cpu' or 'device', got {self.decode_images_on!r}")
        if self.audio_seconds is not None and self.audio_seconds <= 0:
            raise ConfigError(f"audio_seconds must be positive or None, got {self.audio_seconds}")
        if self.max_text_tokens < 2:
            raise ConfigError(f"max_text_tokens must be at least 2 ([CLS] and [SEP]), got {self.max_text_tokens}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"prefetch_factor must be positive, got {self.prefetch_factor}")
        size = self.image_size
        if size is not None and (min((size, size) if isinstance(size, int) else tuple(size)) < 1):
            raise ConfigError(f"image_size must be positive, got {size}")


@dataclass(frozen=True)
class Feed:
    """What a loader reads and how: each source's dataset and decoder, the united spec, a mixture's plan.

    A single dataset is one source without ``blend``: its plan is ``order.slot_plan`` and its batches
    carry no ``source``. A Mixture's sources are all listed (``names``); those its split draws (``drawn``)
    have a positive share in ``blend``.
    """

    datasets: tuple[Dataset, ...]
    decoders: tuple[Callable[..., Sample], ...]  # Decoder, or a Mixture's SourceDecoder
    spec: DecodeSpec  # united: what collate makes of every source's samples
    blend: Blend | None = None
    names: tuple[str, ...] = ()

    @property
    def drawn(self) -> list[int]:
        return [0] if self.blend is None else [i for i, w in enumerate(self.blend.weights) if w]


class BatchStream(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch, from batch ``start`` on; picklable, split across DataLoader workers."""

    def __init__(self, feed: Feed, split: str, cfg: PlanConfig, rank: int, world_size: int, num_workers: int,
                 epoch: int, start: int, on_error: str, position: torch.Tensor | None = None):
        self.feed, self.split, self.cfg = feed, split, cfg
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.start, self.on_error = epoch, start, on_error
        self.position = position  # shared (epoch, start) that persistent workers read at each epoch

    def __iter__(self) -> Iterator[tuple[Batch, PackedImages | None, list[tuple[str, str, str]]]]:
        if self.position is not None:  # a persistent worker: the main process has moved the position
            self.epoch, self.start = (int(v) for v in self.position.tolist())
        info = torch.utils.data.get_worker_info()
        W = max(1, self.num_workers)
        worker = ((info.id if info else 0) + self.start) % W
        world = World(self.rank, self.world_size, worker, self.num_workers)
        drawn = self.feed.drawn
        readers = [ShardReader(d, self.split) if i in drawn else None for i, d in enumerate(self.feed.datasets)]
        try:
            yield from self._batches(world, readers)
        finally:
            for reader in readers:
                if reader is not None:
                    reader.close()

    def _slot_plan(self, world: World, readers: list[ShardReader | None]):
        """(source, stream, emit, sizes) of this slot, as ``order.plan`` / ``order.blend_plan`` yield them."""
        if self.feed.blend is None:
            stream, emit, sizes = slot_plan(readers[0].index.shard_sizes, self.epoch, world, self.cfg)
            return np.zeros(len(stream), dtype=np.int64), stream, emit, sizes
        return blend_slot_plan(self.feed.blend, self.epoch, world, self.cfg)

    def _batches(self, world: World, readers: list[ShardReader | None]):
        feed, cfg = self.feed, self.cfg
        src, stream, emit, sizes = self._slot_plan(world, readers)
        W = world.workers_per_rank
        done = max(0, -(-(self.start - world.worker) // W))  # this worker's batches already yielded
        emit = emit[sum(sizes[:done]):]
        need = np.sort(emit)  # positions still needed, in read order: consumed ones are never read
        reads = {}  # source -> (stream position, members or error), each source's reads in its files' order
        for s in np.unique(src[need]).tolist():
            mine = need[src[need] == s]
            reads[s] = _at(mine, read_stream(readers[s], stream[mine]))
        cache: dict[int, Any] = {}
        logged: set[str] = set()
        a = 0
        for size in sizes[done:]:
            samples, origin, skipped = [], [], []
            for pos in emit[a:a + size].tolist():
                s = int(src[pos])
                while pos not in cache:
                    p, got = next(reads[s])
                    cache[p] = got
                got = cache.pop(pos)
                n, idx = int(stream[pos]), readers[s].index
                file, key = idx.files[idx.shard[n]], str(idx.keys[n])
                if not isinstance(got, Exception):
                    try:
                        samples.append(feed.decoders[s](key, got, salt=f"{cfg.seed}:{self.epoch}"))
                        origin.append(s)
                        continue
                    except MmdataError as e:
                        got = _in_sample(e, file, key, int(idx.offset[n]))
                if feed.names:  # a mixture: say which source, shard names repeat across datasets
                    file, got = f"{feed.names[s]}/{file}", type(got)(f"source {feed.names[s]!r}: {got}")
                if self.on_error == "raise":
                    raise got  # the reader's errors already name shard, key and byte offset
                skipped.append((file, key, str(got)))
                if file not in logged:
                    logged.add(file)
                    log.warning("skipping unreadable samples of shard %r (first: %r: %s)", file, key, got)
            a += size
            batch = collate(samples, feed.spec)
            if feed.blend is not None:
                batch.source = torch.tensor(origin, dtype=torch.int64)  # (B,)
            yield batch, pack_jpegs(samples, batch), skipped


def _unpacked(pairs: Iterator[tuple[Batch, PackedImages | None]]) -> Iterator[Batch]:
    """The batches of ``iter_packed`` alone; closing this closes ``pairs`` (which stops the workers)."""
    with closing(pairs):
        for batch, _ in pairs:
            yield batch


def _at(positions: np.ndarray, reads: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """``read_stream``'s results keyed by stream position instead of by place in ``positions``."""
    for p, got in reads:
        yield int(positions[p]), got


def _in_sample(e: MmdataError, file: str, key: str, offset: int) -> MmdataError:
    """A decoder's error said in the reader's form: shard, key and byte offset once, then what failed."""
    what = str(e)
    for prefix in (f"sample {key!r}: ", f"sample {key!r} "):  # the decoder names the key; say it once
        what = what.removeprefix(prefix)
    return sample_error(type(e), file, key, offset, what)


class Loader:
    """One rank's batches, used as a torch DataLoader is: ``len()`` batches per epoch, the same on every rank.

    Each ``iter()`` is a whole epoch from its first batch, except the first one after ``load_state_dict``,
    which continues from the loaded position. A pass that yields every batch moves on to the next epoch,
    so ``for epoch in ...: for batch in loader`` walks epochs 0, 1, ...; ``set_epoch(e)`` (what
    DistributedSampler users call each epoch) starts epoch ``e`` instead, and keeps a position just
    loaded for ``e``. ``dataset`` is what was given: a Dataset or a Mixture.
    """

    def __init__(self, feed: Feed, dataset: Dataset | Mixture, split: str, cfg: PlanConfig, rank: int,
                 world_size: int, num_workers: int, on_error: str, config: LoaderConfig):
        self.feed, self.dataset, self.split, self.plan_config = feed, dataset, split, cfg
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.on_error, self.config = on_error, config
        self.epoch, self.batches = 0, 0  # position: batches yielded in ``epoch``
        self._resume = False  # load_state_dict set the position: the next iter() continues from it
        self.skipped = 0  # samples skipped under on_error="skip", over the loader's life
        self.skipped_samples: list[tuple[str, str, str]] = []  # (shard, key, reason), the last 1000
        self.host_fallbacks = 0  # images the device refused, decoded on the CPU instead (DevicePrefetcher)
        self._len = batches_per_rank(dataset.num_samples(split), world_size, cfg)
        self._persistent = config.persistent_workers and num_workers > 0
        # Persistent workers keep their copy of the stream across epochs; they read where to start
        # from this shared-memory (epoch, batch) pair, set before each pass.
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_() if self._persistent else None
        self._dataloader: torch.utils.data.DataLoader | None = None

    def __len__(self) -> int:
        return self._len

    @property
    def batch_size(self) -> int:
        return self.plan_config.batch_size

    @property
    def tasks(self) -> TaskList:
        """The tasks batches carry labels for: a Mixture's united ones (its class order)."""
        return TaskList(self.feed.spec.tasks)

    @property
    def sources(self) -> tuple[str, ...]:
        """A Mixture's source names, which ``Batch.source`` indexes; () for a single dataset."""
        return self.feed.names

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at the next ``iter()``; a position just loaded for ``epoch`` is kept (resume)."""
        if epoch < 0:
            raise ConfigError(f"epoch must be non-negative, got {epoch}")
        if not (self._resume and epoch == self.epoch):
            self.epoch, self.batches, self._resume = epoch, 0, False

    def _normalise(self) -> None:
        if self._len and self.batches >= self._len:
            self.epoch, self.batches = self.epoch + 1, 0

    def stream(self) -> BatchStream:
        """The IterableDataset the next ``iter()`` reads (each DataLoader worker gets a copy of it)."""
        self._normalise()
        return BatchStream(self.feed, self.split, self.plan_config, self.rank, self.world_size, self.num_workers,
                           self.epoch, self.batches if self._resume else 0, self.on_error, self._position)

    def _make_dataloader(self, stream: BatchStream, pin: bool) -> torch.utils.data.DataLoader:
        _preload(self.feed.spec.modalities)
        return torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, pin_memory=pin,
            prefetch_factor=self.config.prefetch_factor, persistent_workers=self._persistent,
            generator=torch.Generator().manual_seed(self.plan_config.seed),  # keeps the global RNG untouched
        )

    def __iter__(self) -> Iterator[Batch]:
        if self.config.decode_images_on == "device":
            raise ConfigError("LoaderConfig(decode_images_on='device') leaves JPEGs undecoded beside each batch: "
                              "iterate mmdata.prefetch.DevicePrefetcher(loader, device), which decodes them, or "
                              "set decode_images_on='cpu'")
        return _unpacked(self.iter_packed())

    def iter_packed(self) -> Iterator[tuple[Batch, PackedImages | None]]:
        """Iterate as ``iter()`` does, each Batch with the JPEGs left undecoded for the device beside it.

        What ``mmdata.prefetch.DevicePrefetcher`` reads; the PackedImages is None unless
        ``decode_images_on="device"``, and the Batch's rows for its JPEGs are zeros until it is decoded.
        """
        stream = self.stream()  # the position is taken now, as a DataLoader takes its sampler's order
        self.batches, self._resume = stream.start, False
        return self._pass(stream)

    def _pass(self, stream: BatchStream) -> Iterator[tuple[Batch, PackedImages | None]]:
        pin = self.config.pin_memory and torch.cuda.is_available()
        if self.num_workers == 0:
            it = iter(stream)
        elif self._persistent:
            self._position.copy_(torch.tensor([stream.epoch, stream.start]))
            if self._dataloader is None:
                self._dataloader = self._make_dataloader(stream, pin)
            it = iter(self._dataloader)
        else:
            it = iter(self._make_dataloader(stream, pin))
        try:
            for batch, images, skipped in it:
                self._count_skipped(skipped)
                if pin and self.num_workers == 0:
                    batch = batch.pin_memory()
                self.batches += 1
                yield batch, images
        finally:
            # Stop the workers now, also on an error or a break: a traceback keeps the DataLoader
            # iterator alive, and its workers would otherwise linger until garbage collection.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None and not self._persistent:
                shutdown()
        self._normalise()

    def _count_skipped(self, skipped: list[tuple[str, str, str]]) -> None:
        self.skipped, self.skipped_samples = self.skipped + len(skipped), (self.skipped_samples + skipped)[-1000:]

    def count_device_decode(self, stats: DecodeStats) -> None:
        """Add a batch's device-decode counts (``DevicePrefetcher`` calls it): absent images as skipped
        samples (shard "": the device does not know it), images decoded on the CPU as ``host_fallbacks``."""
        self.host_fallbacks += stats.host_fallbacks
        self._count_skipped([("", key, reason) for key, reason in stats.skipped])

    def close(self) -> None:
        """Stop persistent workers now (they otherwise live until the loader is garbage collected)."""
        if self._dataloader is not None:
            shutdown = getattr(self._dataloader._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._dataloader = None

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from (batches yielded in ``epoch``), plus what it is only valid for."""
        self._normalise()
        return {"epoch": self.epoch, "batches": self.batches, "skipped": self.skipped,
                "host_fallbacks": self.host_fallbacks, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` continue exactly after the last batch yielded when ``state`` was taken."""
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ConfigError(f"loader state was saved with other arguments {diff} (saved, now); resume with "
                              "the same split, seed, batch size, world size and workers, or start afresh")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.skipped = int(state.get("skipped", 0))
        self.host_fallbacks = int(state.get("host_fallbacks", 0))  # absent from states saved before it was counted
        self._resume = True

    def _fingerprint(self) -> dict[str, Any]:
        c = self.plan_config
        mixture = {"sources": self.dataset.fingerprint(self.split)} if self.feed.blend is not None else {}
        return {"split": self.split, "num_samples": self.dataset.num_samples(self.split), "seed": c.seed,
                "batch_size": c.batch_size, "shuffle": c.shuffle, "drop_last": c.drop_last,
                "shuffle_buffer": c.shuffle_buffer, "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.num_workers, **mixture}


def make_loader(dataset: Dataset | Mixture | str, split: str, *, batch_size: int, num_workers: int = 0,
                shuffle: bool = True, seed: int = 0, drop_last: bool = False, rank: int | None = None,
                world_size: int | None = None, modalities: list[str] | None = None, tasks: list[str] | None = None,
                on_error: str = "raise", config: LoaderConfig = LoaderConfig()) -> Loader:
    """Make this rank's loader of ``split``; rank and world size from arguments or torch.distributed.

    ``dataset``: an open Dataset, its path or URL, or a ``Mixture`` (``modalities`` and ``tasks`` then
    name the united ones).
    """
    if isinstance(dataset, str) or hasattr(dataset, "__fspath__"):
        from .dataset import open_dataset

        dataset = open_dataset(dataset)
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be 0 or more, got {num_workers}")
    rank, world_size = _world(rank, world_size)
    World(rank, world_size, 0, num_workers)  # validates
    cfg = PlanConfig(batch_size, seed, shuffle, drop_last, config.shuffle_buffer)
    spec = _spec(dataset, split, modalities, tasks, config, shuffle)
    tok = None
    if "text" in spec.modalities:
        tok = _tokenizer_bytes(config.tokenizer) if config.tokenizer else dataset.tokenizer_json
    if isinstance(dataset, Mixture):
        feed = Feed(dataset.datasets, dataset.decoders(spec, tok), spec, dataset.blend(split), dataset.names)
    else:
        feed = Feed((dataset,), (Decoder(spec, tok),), spec)
    for i in feed.drawn:
        _check_index(feed.datasets[i], split, on_error)
    loader = Loader(feed, dataset, split, cfg, rank, world_size, num_workers, on_error, config)
    if len(loader) == 0:
        log.warning("split %r gives 0 batches per rank (%d samples, world size %d, batch size %d, drop_last %s)",
                    split, dataset.num_samples(split), world_size, batch_size, drop_last)
    return loader


def _check_index(dataset: Dataset, split: str, on_error: str) -> None:
    """Refuse, before any read, an index whose byte ranges cannot be right; with "skip" say what is skipped.

    Overlapping rows are not refused under "skip": which of two is wrong shows only when each is read
    alone and parsed, so the reader fails that one and keeps the other.
    """
    idx = dataset.split_index(split)
    if on_error == "raise":
        if idx.problems:
            e = idx.row_error(min(idx.problems))
            more = f" ({len(idx.problems) - 1} more such rows)" if len(idx.problems) > 1 else ""
            raise SchemaError(f"{e}{more}, or pass on_error='skip' to leave such samples out")
        overlaps = idx.overlaps()
        if overlaps:
            raise SchemaError(f"{idx.overlap_error(*overlaps[0])}, or pass on_error='skip' to leave out the "
                              "samples that do not read back")
    elif idx.problems:
        log.warning("on_error='skip': %d sample(s) of split %r will be skipped for their index rows",
                    len(idx.problems), split)


def _tokenizer_bytes(path: str) -> bytes:
    """Bytes of a tokenizer.json given as the file or its folder."""
    import os

    from .errors import DatasetNotFoundError
    from .tokenizer import TOKENIZER_FILE

    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    try:
        with open(file, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"LoaderConfig.tokenizer {path!r} has no tokenizer.json; give the file or "
                                   "its folder") from None


def _preload(modalities: tuple[str, ...]) -> None:
    """Import the decoders once here, so forked workers inherit them instead of importing each epoch."""
    if "image" in modalities:
        import torchvision.io  # noqa: F401
        import torchvision.transforms.v2.functional  # noqa: F401
    if "audio" in modalities:
        import soundfile  # noqa: F401


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ConfigError(f"give both rank and world_size or neither, got rank={rank}, world_size={world_size}")
    if rank is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _spec(dataset: Dataset | Mixture, split: str, modalities, tasks, config: LoaderConfig,
          shuffle: bool) -> DecodeSpec:
    """What to decode, united over a Mixture's sources; ConfigError naming what was asked and what exists."""
    dataset.num_samples(split)  # SchemaError naming the splits when unknown
    have = dataset.modalities
    mods = tuple(have if modalities is None else modalities)
    bad = [m for m in mods if m not in MODALITIES or m not in have]
    if bad:
        raise ConfigError(f"modalities {bad} are not in the dataset; it has {have}")
    names = dataset.tasks.names if tasks is None else list(tasks)
    unknown = [t for t in names if t not in dataset.tasks.names]
    if unknown:
        raise ConfigError(f"tasks {unknown} are not in the dataset; it has {dataset.tasks.names}")
    size = config.image_size
    if isinstance(size, int):
        size = (size, size)
    elif size is not None:
        size = (int(size[0]), int(size[1]))
    elif "image" in mods:
        size = dataset.common_image_size(split)
        if size is None:
            raise ConfigError(f"images of split {split!r} differ in size; set LoaderConfig(image_size=...) "
                              "so they can be resized to one")
    sr = dataset.sample_rate if isinstance(dataset, Mixture) else \
        dataset.card.modalities.get("audio", {}).get("sample_rate")
    samples = None
    if "audio" in mods and sr:
        seconds = config.audio_seconds or dataset.max_audio_seconds(split)
        samples = max(1, math.ceil(round(seconds * sr, 6)))
    return DecodeSpec(modalities=mods, tasks=tuple(dataset.tasks[t] for t in names), image_size=size,
                      audio_samples=samples, sample_rate=sr, max_text_tokens=config.max_text_tokens,
                      image_on_device=config.decode_images_on == "device",
                      audio_crop=config.audio_crop or ("random" if shuffle else "center"))
