"""Decode a batch's packed JPEG bytes on the device (nvJPEG on CUDA) and resize them there.

Workers that pass JPEGs undecoded fill ``Batch.image_bytes`` (one uint8 buffer, the batch's files
concatenated) and ``Batch.image_offsets`` (B+1,); a row with no bytes was either absent or not a JPEG
and already decoded into ``Batch.image`` by the worker on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from .batch import Batch
from .errors import ConfigError, DecodeError, SchemaError

log = logging.getLogger(__name__)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N,3,h,w) -> uint8 (N,3,H,W), bilinear with antialiasing."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    out = F.interpolate(img.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _decode(datas: list[torch.Tensor], keys: list[str], device: torch.device,
            on_error: str) -> list[torch.Tensor | None]:
    """Decode JPEGs to RGB uint8 (3,h,w) on ``device``. A bad file raises DecodeError naming its key,
    or with ``on_error="skip"`` comes back as None (the caller marks that image absent)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for data, key in zip(datas, keys):  # one at a time, to find the culprits
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as err:
            if on_error == "raise":
                raise DecodeError(f"sample {key!r}: its image bytes are not a decodable JPEG ({err}); rebuild "
                                  "the dataset, turn GPU decode off for it, or pass on_error='skip'") from None
            log.warning("sample %r: image bytes are not a decodable JPEG (%s); its image is marked absent", key, err)
            out.append(None)
    return out


def decode_images(batch: Batch, device: torch.device | str, on_error: str = "raise") -> Batch:
    """Return a copy of ``batch`` whose ``image`` is uint8 (B,3,H,W) on ``device``, decoded from its bytes.

    Rows whose ``image_mask`` is False stay zeros; rows with empty bytes keep the worker's CPU-decoded
    ``image`` row. Images are resized to ``batch.image_size`` (else the size of ``batch.image``, else the
    common size of the decoded images). A batch without bytes is returned unchanged. A JPEG that does
    not decode raises DecodeError naming the sample, or with ``on_error="skip"`` (the loader's setting)
    becomes an absent image: zeros, ``image_mask`` False, and a warning with its key. (A worker that
    decodes on the CPU drops such a sample; here the batch is already formed, so the sample stays
    with its other modalities, as a sample whose image is missing does.)
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

    size = batch.image_size or (tuple(batch.image.shape[-2:]) if batch.image is not None else None)
    if size is None:
        shapes = {tuple(d.shape[-2:]) for d in decoded}
        if len(shapes) > 1:
            raise SchemaError(f"decoded images have sizes {sorted(shapes)} and the batch has no image_size; "
                              "set image_size in the loader so they can be resized to one size")
        size = shapes.pop() if shapes else (1, 1)
    size = (int(size[0]), int(size[1]))

    if batch.image is not None and tuple(batch.image.shape[-2:]) == size:
        image = batch.image.to(device, non_blocking=True).clone()  # keeps CPU-decoded non-JPEG rows
    else:
        image = torch.zeros(B, 3, *size, dtype=torch.uint8, device=device)
    if rows:
        # resize images of one source size together: one kernel per distinct size, not per image
        groups: dict[tuple[int, int], list[int]] = {}
        for j, d in enumerate(decoded):
            groups.setdefault(tuple(d.shape[-2:]), []).append(j)
        for members in groups.values():
            stacked = torch.stack([decoded[j] for j in members])  # (n,3,h,w)
            index = torch.tensor([rows[j] for j in members]).to(device, non_blocking=True)
            image.index_copy_(0, index, _resize(stacked, size))
    if image_mask is not None:
        image = image * image_mask.to(device, non_blocking=True).bool().view(-1, 1, 1, 1)
    log.debug("decoded %d of %d images on %s", len(rows), B, device)
    return replace(batch, image=image, image_mask=image_mask, image_bytes=None, image_offsets=None)
