"""DevicePrefetcher: copy and decode the next batch on a side stream while the current step runs.

It is the one reader of the JPEGs a loader leaves undecoded (``LoaderConfig(decode_images_on="device")``):
it takes each Batch with its ``PackedImages`` from ``Loader.iter_packed`` and decodes them into the batch
on its device; a Batch handed out holds decoded images only.

Which stream does what (CUDA):

  side stream     the host-to-device copy of batch i+1, then its JPEG decode (nvJPEG) and resize: every
                  tensor of batch i+1 that exists before it is handed out is allocated here
  current stream  the caller's step i, then, once it waits on the side stream, the ``transform`` of batch
                  i+1 and the caller's step i+1

Why the decode is on the side stream: torchvision's ``decode_jpeg(..., device="cuda")`` allocates its
outputs on the caller's current stream but writes them from a private stream that waits on nothing. Run
on the current stream right after step i was queued, the caching allocator may hand it a block that
step i still reads (freed by the caller, not yet done on the GPU): silent corruption. On the side stream,
whose blocks are only reused once every stream they were recorded on is done, and after the host has
waited for the side stream's own queue, nothing still in flight can alias the decoder's outputs.

Why the transform is on the current stream, at hand-out: it draws from the caller's generator and reads
the caller's modes (``train()``/``eval()``). Run a batch ahead on the side stream, it would draw batch
i+1's randomness before the caller has saved its generator state for step i, and a resume from that
checkpoint would not replay the same augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import fields
from typing import Any, Protocol

import torch

from .batch import Batch
from .gpudecode import DecodeStats, PackedImages, decode_images

Transform = Callable[[Batch], Batch]


class StreamOps(Protocol):
    """The stream operations DevicePrefetcher uses; ``CudaStreams`` on a GPU, a recording fake in tests."""

    side: Any  # the prefetcher's stream: has wait_stream() and synchronize(), as torch.cuda.Stream

    def current(self) -> Any:
        """The caller's current stream."""

    def use(self, stream: Any) -> AbstractContextManager:
        """A context in which ``stream`` is the current stream (new tensors are allocated on it)."""

    def record(self, tensor: torch.Tensor, stream: Any) -> None:
        """Mark ``tensor`` as used on ``stream``, so its memory is not reused before ``stream`` is done."""


class CudaStreams:
    """StreamOps on one CUDA device, with a new side stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device=device)

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def use(self, stream: torch.cuda.Stream) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def record(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)


def _tensors(batch: Batch) -> Iterator[torch.Tensor]:
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            yield from (t for t in v.values() if isinstance(t, torch.Tensor))


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """Copy every tensor of ``batch`` (the packed JPEGs are not in it: decode_jpeg reads them from the host)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()  # a non_blocking copy is only asynchronous from page-locked memory
        return t.to(device, non_blocking=True)

    return batch._map(move)


def stage(batch: Batch, images: PackedImages | None, device: torch.device, streams: StreamOps,
          on_error: str = "raise", stats: DecodeStats | None = None) -> Batch:
    """Copy ``batch`` to ``device``, then decode ``images`` into it (adding to ``stats``), all with
    ``streams.side`` current."""
    with streams.use(streams.side):
        batch = _to_device(batch, device)
        if images is not None:
            # nvJPEG writes from a private stream that waits on nothing: a block freed on the side stream
            # whose last reader (the copy above, the last batch's resize) is still queued there could be
            # handed to it. The host waits for the side stream's queue first (decode_jpeg blocks anyway).
            streams.side.synchronize()
            batch = decode_images(batch, images, device, on_error, stats)
    return batch


def hand_over(batch: Batch, device: torch.device, streams: StreamOps) -> Batch:
    """Make the caller's current stream wait for ``streams.side`` and mark every tensor of ``batch`` on
    ``device`` (the decoded ones included) as used by it."""
    current = streams.current()
    current.wait_stream(streams.side)  # the copy and decode of ``batch`` are done before the step uses it
    for t in _tensors(batch):
        if t.device.type == device.type:
            streams.record(t, current)  # allocated on the side stream, used on ``current``
    return batch


class DevicePrefetcher:
    """Iterate ``loader`` yielding batches on ``device``, decoded (packed JPEGs) and transformed.

    A loader with ``iter_packed`` (``mmdata.Loader``) is read through it, and its packed JPEGs are
    decoded here; any other iterable of Batches (a list, in tests) is only copied and transformed.

    On CUDA, when the caller asks for batch i+1 (having queued step i), it is copied and decoded on a
    side stream, so that work overlaps step i on the GPU; the caller's stream then waits for it and every
    tensor is marked as used there (``record_stream``). ``transform`` (e.g.
    ``functools.partial(pipeline, generator=g)``) runs on the caller's current stream as each batch is
    handed out (the module docstring says why). On the CPU it is a plain iterator doing the same steps.
    ``len()`` is the loader's. ``streams`` replaces the CUDA stream operations (tests pass fakes).

    Nothing is read from the loader before the caller asks for it, so ``state_dict()`` is the loader's
    state as of the last batch handed out: a resume from it neither skips nor repeats a batch. What each
    decode met (images decoded on the CPU instead, images marked absent under "skip") goes to the
    loader's ``count_device_decode`` when it has one (``Loader.host_fallbacks`` and ``Loader.skipped``),
    before the batch is handed out, so the state holds the counts up to that batch.
    """

    def __init__(self, loader: Iterable[Batch], device: torch.device | str, transform: Transform | None = None,
                 on_error: str | None = None, streams: StreamOps | None = None):
        self.loader = loader
        # an undecodable JPEG: raise, or mark the image absent ("skip"); by default as the loader does
        self.on_error = on_error or getattr(loader, "on_error", "raise")
        self.device = torch.device(device)
        self.transform = transform
        self.streams = streams

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Forward to the loader, when it has ``set_epoch``."""
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def state_dict(self) -> dict:
        """The loader's state as of the last batch this iterator handed out."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self) -> Iterator[Batch]:
        streams = self.streams
        if streams is None and self.device.type == "cuda":
            streams = CudaStreams(self.device)
        packed = getattr(self.loader, "iter_packed", None)
        pairs = packed() if packed is not None else ((b, None) for b in self.loader)
        count = getattr(self.loader, "count_device_decode", None)
        for batch, images in pairs:  # the caller has queued its last step: this copy and decode overlap it
            stats = DecodeStats()
            if streams is None:
                batch = decode_images(_to_device(batch, self.device), images, self.device, self.on_error, stats)
            else:
                batch = stage(batch, images, self.device, streams, self.on_error, stats)
                batch = hand_over(batch, self.device, streams)
            if count is not None:
                count(stats)
            yield self.transform(batch) if self.transform is not None else batch
