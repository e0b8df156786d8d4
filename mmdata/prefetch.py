"""DevicePrefetcher: copy the next batch to the GPU on a side stream while the current step runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields, replace

import torch

from .batch import Batch
from .gpudecode import decode_images

Transform = Callable[[Batch], Batch]


def _tensors(batch: Batch) -> Iterator[torch.Tensor]:
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            yield from (t for t in v.values() if isinstance(t, torch.Tensor))


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """Copy every tensor but the packed JPEG bytes (decode_jpeg reads them from host memory)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()  # a non_blocking copy is only asynchronous from page-locked memory
        return t.to(device, non_blocking=True)

    keep = {"image_bytes": batch.image_bytes, "image_offsets": batch.image_offsets}
    bare = replace(batch, image_bytes=None, image_offsets=None)
    return replace(bare._map(move), **keep)


class DevicePrefetcher:
    """Iterate ``loader`` yielding batches on ``device``, decoded (packed JPEGs) and transformed.

    On CUDA, batch i+1 is copied on a side stream while the caller's step i runs on the current stream;
    before batch i+1 is handed out, the current stream waits for the copy and every tensor is marked as
    used by it (``record_stream``), so the caching allocator never reuses its memory too early. Decode and
    ``transform`` (e.g. ``functools.partial(pipeline, generator=g)``) then run on the current stream. On
    the CPU it is a plain iterator doing the same steps. ``len()`` is the loader's.

    Reading one batch ahead would put the loader's ``state_dict()`` one batch past what the caller has
    seen; this class's ``state_dict()`` is the loader's state as of the last batch handed out, so a resume
    from it neither skips nor repeats a batch.
    """

    def __init__(self, loader: Iterable[Batch], device: torch.device | str, transform: Transform | None = None,
                 decode: bool = True, on_error: str | None = None):
        self.loader = loader
        # an undecodable JPEG: raise, or mark the image absent ("skip"); by default as the loader does
        self.on_error = on_error or getattr(loader, "on_error", "raise")
        self.device = torch.device(device)
        self.transform = transform
        self.decode = decode
        self._cuda = self.device.type == "cuda"
        self._state: dict | None = None  # loader state after the last batch handed out (CUDA path)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Forward to the loader, when it has ``set_epoch``."""
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def state_dict(self) -> dict:
        """The loader's state as of the last batch this iterator handed out."""
        return self._state if self._state is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._state = None
        self.loader.load_state_dict(state)

    def _loader_state(self) -> dict | None:
        return self.loader.state_dict() if hasattr(self.loader, "state_dict") else None

    def _finish(self, batch: Batch) -> Batch:
        if self.decode and batch.image_bytes is not None:
            batch = decode_images(batch, self.device, self.on_error)
        return self.transform(batch) if self.transform is not None else batch

    def __iter__(self) -> Iterator[Batch]:
        if not self._cuda:
            for batch in self.loader:
                yield self._finish(_to_device(batch, self.device))
            return
        stream = torch.cuda.Stream(device=self.device)
        it = iter(self.loader)

        def preload() -> tuple[Batch | None, dict | None]:
            """The next batch, copying on ``stream``, and the loader state from before it was read."""
            state = self._loader_state()
            try:
                batch = next(it)
            except StopIteration:
                return None, state
            with torch.cuda.stream(stream):
                return _to_device(batch, self.device), state

        self._state = None
        pending, _ = preload()
        while pending is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)  # the copy of ``pending`` is done before the step uses it
            for t in _tensors(pending):
                if t.device.type == "cuda":
                    t.record_stream(current)  # allocated on ``stream``, used on ``current``
            ready = pending
            pending, self._state = preload()  # next copy overlaps with decode/transform and the step
            yield self._finish(ready)
