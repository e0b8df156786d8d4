"""Decode a batch's packed JPEG bytes on the device (nvJPEG on CUDA) and resize them there.

With ``LoaderConfig(decode_images_on="device")`` the workers leave JPEGs undecoded: they travel as a
``PackedImages`` beside their Batch (``Loader.iter_packed``), never inside it, and
``mmdata.prefetch.DevicePrefetcher`` hands them to ``decode_images``, the one place they are decoded.
The Batch's rows for them are zeros until then; its other rows are absent, or were decoded by the worker
on the CPU (not a JPEG by its magic bytes, or a CMYK one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from .batch import Batch
from .decode import decode_rgb
from .errors import ConfigError, DecodeError, SchemaError
from .geometry import resize_crop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedImages:
    """The undecoded JPEGs of a batch's ``rows``: one uint8 buffer and the offsets of each file in it.

    ``data`` uint8 (N,) on the host (the decoder reads host memory); ``offsets`` int64 (n+1,), file j is
    ``data[offsets[j]:offsets[j+1]]``; ``rows`` int64 (n,), the batch row of each file; ``size`` the (H, W)
    the decoded images are resized to (the Batch's image size). Not a tensor container: a DataLoader
    neither pins nor moves it.
    """

    data: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor
    size: tuple[int, int]

    @classmethod
    def pack(cls, files: list[bytes | None], size: tuple[int, int]) -> PackedImages | None:
        """Pack the JPEGs of a batch (``files[i]``: row i's bytes, None for no JPEG); None when there are none."""
        rows = [i for i, f in enumerate(files) if f]
        if not rows:
            return None
        lengths = torch.tensor([0] + [len(files[i]) for i in rows], dtype=torch.int64)
        data = torch.frombuffer(bytearray(b"".join(files[i] for i in rows)), dtype=torch.uint8)
        return cls(data, lengths.cumsum(0), torch.tensor(rows, dtype=torch.int64), (int(size[0]), int(size[1])))

    def files(self) -> list[torch.Tensor]:
        """Each JPEG as a uint8 view of ``data``, in the order of ``rows``."""
        ends = self.offsets.tolist()
        return [self.data[ends[j]:ends[j + 1]] for j in range(len(ends) - 1)]


@dataclass
class DecodeStats:
    """What ``decode_images`` met besides images the device decoded: the counts a loader adds to its own.

    ``host_fallbacks``: images the device refused, decoded on the CPU and copied over. ``skipped``:
    (key, reason) of each image no decoder reads, marked absent under ``on_error="skip"``.
    """

    host_fallbacks: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _decode(datas: list[torch.Tensor], keys: list[str], device: torch.device,
            on_error: str, stats: DecodeStats) -> list[torch.Tensor | None]:
    """Decode images to RGB uint8 (3,h,w) on ``device``: all at once, else one by one.

    An image the device decoder rejects (a CMYK or non-JPEG file that reached it) is decoded on the
    host as the workers do and copied over. Only bytes no decoder reads raise DecodeError naming the
    key, or with ``on_error="skip"`` come back as None (the caller marks that image absent). Both are
    counted in ``stats``.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for data, key in zip(datas, keys):  # one at a time, to find the culprits
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            out.append(_decode_on_host(data, key, device, on_error, err, stats))
    return out


def _decode_on_host(data: torch.Tensor, key: str, device: torch.device, on_error: str,
                    err: Exception, stats: DecodeStats) -> torch.Tensor | None:
    """uint8 (3,h,w) on ``device`` decoded by the workers' host decoder, or None under "skip"."""
    try:
        img = decode_rgb(data.numpy().tobytes())
    except Exception as host_err:  # PIL and torchvision raise many types: each means the same bad file
        if on_error == "raise":
            raise DecodeError(f"sample {key!r}: its image bytes decode neither on {device} ({err}) nor on the "
                              f"CPU ({type(host_err).__name__}: {host_err}); rebuild the dataset, or pass "
                              "on_error='skip' to mark such images absent") from None
        log.warning("sample %r: image bytes cannot be decoded (%s); its image is marked absent", key, host_err)
        stats.skipped.append((key, f"image decodes neither on {device} ({err}) nor on the CPU "
                                   f"({type(host_err).__name__}: {host_err}); its image is marked absent"))
        return None
    log.info("sample %r: %s could not decode its image (%s); decoded on the CPU instead", key, device, err)
    stats.host_fallbacks += 1
    return img.to(device, non_blocking=True)


def decode_images(batch: Batch, images: PackedImages | None, device: torch.device | str,
                  on_error: str = "raise", stats: DecodeStats | None = None) -> Batch:
    """Return a copy of ``batch`` whose ``image`` is uint8 (B,3,H,W) on ``device``, with ``images`` decoded in.

    Each JPEG is decoded on ``device`` and resized by ``mmdata.geometry.resize_crop`` (aspect kept, centre
    crop: the workers' rule) to ``images.size`` into its row; the other rows keep the batch's (the worker's
    CPU-decoded images, or zeros when absent). ``images`` None returns ``batch`` itself. An image the
    device cannot decode (CMYK, a PNG or WebP in JPEG's place) is decoded on the CPU as the workers do.
    Bytes that no decoder reads raise DecodeError naming the sample, or with ``on_error="skip"`` (the
    loader's setting) become an absent image: zeros, ``image_mask`` False, and a warning with its key. (A
    worker that decodes on the CPU drops such a sample; here the batch is already formed, so the sample
    stays with its other modalities, as a sample whose image is missing does.) ``stats``, when given, is
    added to: the images decoded on the CPU after the device refused them, and those marked absent.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if images is None:
        return batch
    device = torch.device(device)
    B = len(batch)
    rows = images.rows.tolist()  # host ints: PackedImages stays on the host
    if len(images.offsets) != len(rows) + 1 or any(not 0 <= r < B for r in rows):
        raise SchemaError(f"PackedImages must have offsets (n+1,) and rows (n,) within the batch of {B}; got "
                          f"{len(images.offsets)} offsets and rows {rows}")
    decoded = _decode(images.files(), [batch.keys[i] for i in rows], device, on_error,
                      stats if stats is not None else DecodeStats())
    image_mask = batch.image_mask
    if any(d is None for d in decoded):
        failed = [rows[j] for j, d in enumerate(decoded) if d is None]
        image_mask = (image_mask.clone() if image_mask is not None
                      else torch.ones(B, dtype=torch.bool, device=device))
        image_mask[failed] = False
        rows, decoded = [r for r, d in zip(rows, decoded) if d is not None], [d for d in decoded if d is not None]

    size = images.size
    if batch.image is None:
        image = torch.zeros(B, 3, *size, dtype=torch.uint8, device=device)
    else:  # keeps the worker's CPU-decoded rows, resized by the same rule if a hand-made batch needs it
        image = resize_crop(batch.image.to(device, non_blocking=True), size).clone()
    if rows:
        # resize images of one source size together: one kernel per distinct size, not per image
        groups: dict[tuple[int, int], list[int]] = {}
        for j, d in enumerate(decoded):
            groups.setdefault(tuple(d.shape[-2:]), []).append(j)
        for members in groups.values():
            stacked = torch.stack([decoded[j] for j in members])  # (n,3,h,w)
            index = torch.tensor([rows[j] for j in members]).to(device, non_blocking=True)
            image.index_copy_(0, index, resize_crop(stacked, size))
    if image_mask is not None:
        image = image * image_mask.to(device, non_blocking=True).bool().view(-1, 1, 1, 1)
    log.debug("decoded %d of %d images on %s", len(rows), B, device)
    return replace(batch, image=image, image_mask=image_mask)
