"""Decode a batch's packed JPEG bytes on the device (nvJPEG on CUDA) and resize them there.

Workers that pass JPEGs undecoded fill ``Batch.image_bytes`` (one uint8 buffer, the batch's files
concatenated) and ``Batch.image_offsets`` (B+1,); a row with no bytes was either absent or decoded
into ``Batch.image`` by the worker on the CPU (not a JPEG by its magic bytes, or a CMYK one).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .batch import Batch
from .decode import decode_rgb
from .errors import ConfigError, DecodeError, SchemaError
from .geometry import batch_image_size, resize_crop

log = logging.getLogger(__name__)


def _decode(datas: list[torch.Tensor], keys: list[str], device: torch.device,
            on_error: str) -> list[torch.Tensor | None]:
    """Decode images to RGB uint8 (3,h,w) on ``device``: all at once, else one by one.

    An image the device decoder rejects (a CMYK or non-JPEG file that reached it) is decoded on the
    host as the workers do and copied over. Only bytes no decoder reads raise DecodeError naming the
    key, or with ``on_error="skip"`` come back as None (the caller marks that image absent).
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
            out.append(_decode_on_host(data, key, device, on_error, err))
    return out


def _decode_on_host(data: torch.Tensor, key: str, device: torch.device, on_error: str,
                    err: Exception) -> torch.Tensor | None:
    """uint8 (3,h,w) on ``device`` decoded by the workers' host decoder, or None under "skip"."""
    try:
        img = decode_rgb(data.numpy().tobytes())
    except Exception as host_err:  # PIL and torchvision raise many types: each means the same bad file
        if on_error == "raise":
            raise DecodeError(f"sample {key!r}: its image bytes decode neither on {device} ({err}) nor on the "
                              f"CPU ({type(host_err).__name__}: {host_err}); rebuild the dataset, or pass "
                              "on_error='skip' to mark such images absent") from None
        log.warning("sample %r: image bytes cannot be decoded (%s); its image is marked absent", key, host_err)
        return None
    log.info("sample %r: %s could not decode its image (%s); decoded on the CPU instead", key, device, err)
    return img.to(device, non_blocking=True)


def decode_images(batch: Batch, device: torch.device | str, on_error: str = "raise") -> Batch:
    """Return a copy of ``batch`` whose ``image`` is uint8 (B,3,H,W) on ``device``, decoded from its bytes.

    Rows whose ``image_mask`` is False stay zeros; rows with empty bytes keep the worker's CPU-decoded
    ``image`` row. Images are resized by ``mmdata.geometry.resize_crop`` (aspect kept, centre crop: the
    workers' rule) to ``batch.image_size``, else the size of ``batch.image``, else the common size of
    the decoded images (ConfigError when they differ). A batch without bytes is returned unchanged.
    An image the device cannot decode (CMYK, a PNG or WebP in JPEG's place) is decoded on the CPU as
    the workers do. Bytes that no decoder reads raise DecodeError naming the sample, or with
    ``on_error="skip"`` (the loader's setting) become an absent image: zeros, ``image_mask`` False, and
    a warning with its key. (A worker that decodes on the CPU drops such a sample; here the batch is
    already formed, so the sample stays with its other modalities, as a sample whose image is missing does.)
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch.image_bytes is None:
        return batch
    if batch.image_offsets is None:
        raise SchemaError("batch.image_bytes is set without batch.image_offsets (B+1,); "
                          "the loader must set both")
    device = torch.device(device)
    B = len(batch)
    offsets = batch.image_offsets.cpu().tolist()  # host ints; on the CPU already when the loader made them
    if len(offsets) != B + 1:
        raise SchemaError(f"batch.image_offsets must have B+1={B + 1} entries, got {len(offsets)}")
    buffer = batch.image_bytes.cpu()  # decode_jpeg reads host memory and writes to ``device``
    rows = [i for i in range(B) if offsets[i + 1] > offsets[i]]  # absent rows have no bytes (and are masked)
    decoded = (_decode([buffer[offsets[i]:offsets[i + 1]] for i in rows], [batch.keys[i] for i in rows], device,
                       on_error) if rows else [])  # a batch of PNGs or without images carries no JPEG bytes
    image_mask = batch.image_mask
    if any(d is None for d in decoded):
        failed = [rows[j] for j, d in enumerate(decoded) if d is None]
        image_mask = (image_mask.clone() if image_mask is not None
                      else torch.ones(B, dtype=torch.bool, device=device))
        image_mask[failed] = False
        rows, decoded = [r for r, d in zip(rows, decoded) if d is not None], [d for d in decoded if d is not None]

    if batch.image_size is not None:  # set by collate: LoaderConfig.image_size, or the batch's common size
        size = batch_image_size(batch.image_size, [])
    elif batch.image is not None:
        size = (int(batch.image.shape[-2]), int(batch.image.shape[-1]))
    else:
        size = batch_image_size(None, [tuple(d.shape[-2:]) for d in decoded])

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
    return replace(batch, image=image, image_mask=image_mask, image_bytes=None, image_offsets=None)
