"""The one resize-and-crop rule for images, shared by the CPU workers and the device decode.

Both paths call ``resize_crop`` (on one image or a stack) and ``batch_image_size`` (the (H, W) a batch's
images are stacked at), so an image comes out with the same geometry whichever side decoded it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .errors import ConfigError

# The largest downscale factor left to the antialiased resize. Past about 94, CUDA's antialiased
# interpolate needs more shared memory than a block has (pytorch/vision#7671); larger factors are first
# shrunk by an integer area pooling, so the filter never sees more than this.
MAX_RESIZE_FACTOR = 8


def cover_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """(nh, nw): ``(h, w)`` scaled, aspect kept, to the smallest size that covers ``size`` (H, W)."""
    H, W = size
    scale = max(H / h, W / w)
    return max(H, round(h * scale)), max(W, round(w * scale))


def _area_shrink(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """float (N,C,h,w) -> (N,C,h//kh,w//kw): average integer blocks, so at most MAX_RESIZE_FACTOR is left.

    Rows and columns that do not fill a block are trimmed evenly from both sides (fewer than ``k`` source
    pixels, under 1/(2 * MAX_RESIZE_FACTOR) of an output pixel), so the image's centre stays put.
    """
    h, w = x.shape[-2:]
    kh = max(1, math.ceil(h / nh / MAX_RESIZE_FACTOR))
    kw = max(1, math.ceil(w / nw / MAX_RESIZE_FACTOR))
    if kh == kw == 1:
        return x
    th, tw = (h % kh) // 2, (w % kw) // 2
    x = x[..., th:th + h - h % kh, tw:tw + w - w % kw]
    return F.avg_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw))


def resize_crop(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N,C,h,w) or (C,h,w) -> uint8 (..., H, W): scale (aspect kept) to cover ``size``, crop the centre.

    Downscaling is bilinear with antialiasing, after an integer area pooling when the factor is above
    MAX_RESIZE_FACTOR. The maths runs in float32 on ``img``'s device with the same ops on every device,
    so the CPU and CUDA give the same result within rounding.
    """
    if img.dim() == 3:
        return resize_crop(img[None], size)[0]
    H, W = int(size[0]), int(size[1])
    h, w = img.shape[-2:]
    if (h, w) == (H, W):
        return img.contiguous()
    nh, nw = cover_size(h, w, (H, W))
    x = _area_shrink(img.float(), nh, nw)  # (N,C,h',w')
    if tuple(x.shape[-2:]) != (nh, nw):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - H) // 2, (nw - W) // 2
    x = x[..., top:top + H, left:left + W]
    return x.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def batch_image_size(size: tuple[int, int] | None, shapes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) a batch's images are stacked at: ``size`` when set (``LoaderConfig.image_size``).

    With ``size`` None it is the common (H, W) of the batch's images (``shapes``, their decoded sizes);
    images of different sizes raise ConfigError telling to set ``image_size``. A batch with no image at
    all is (1, 1) zeros with its mask False (the loader always resolves a size, so it never sees this).
    """
    if size is not None:
        return int(size[0]), int(size[1])
    found = {(int(h), int(w)) for h, w in shapes}
    if len(found) > 1:
        raise ConfigError(f"images of sizes {sorted(found)} cannot be stacked; set LoaderConfig(image_size=...) "
                          "so they are resized (aspect kept, centre crop) to one size")
    return found.pop() if found else (1, 1)
