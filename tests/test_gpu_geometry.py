"""The device-decode path gives the CPU path's images: routing by content, host fallback, one geometry.

``decode_images(batch, images, "cpu")`` runs the device path's code with torchvision's CPU decoder, so every
test here compares the two paths on this machine; the ``cuda`` cases run them where a GPU is present.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmdata import geometry
from mmdata.collate import collate, pack_jpegs
from mmdata.decode import Decoder, DecodeSpec, decode_rgb, device_jpeg_size, jpeg_frame
from mmdata.errors import ConfigError, DecodeError
from mmdata.geometry import MAX_RESIZE_FACTOR, resize_crop
from mmdata.gpudecode import PackedImages, decode_images

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pattern(h: int, w: int) -> np.ndarray:
    """uint8 (h,w,3): red rises left to right, green top to bottom, blue in coarse checks."""
    y, x = np.mgrid[0:h, 0:w]
    blue = ((y * 4 // h + x * 4 // w) % 2) * 200 + 20
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), blue], -1).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    im = Image.fromarray(arr)
    if mode is not None:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def bands(h: int, w: int, axis: int) -> np.ndarray:
    """Three flat bands along ``axis`` (1: left/middle/right, 0: top/middle/bottom): red, green, blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    n = arr.shape[axis]
    for c in range(3):
        sl = [slice(None), slice(None), c]
        sl[axis] = slice(c * n // 3, (c + 1) * n // 3)
        arr[tuple(sl)] = 255
    return arr


CASES = {  # name -> (ext the member is stored under, bytes)
    "square": ("jpg", lambda: encode(pattern(48, 48))),
    "tall": ("jpg", lambda: encode(pattern(90, 30))),
    "wide": ("jpg", lambda: encode(pattern(30, 90))),
    "grayscale": ("jpg", lambda: encode(pattern(40, 60)[..., 0])),
    "cmyk": ("jpg", lambda: encode(pattern(40, 60), mode="CMYK")),
    "progressive": ("jpg", lambda: encode(pattern(40, 60), progressive=True)),
    "png_named_jpg": ("jpg", lambda: encode(pattern(40, 60), "PNG")),
    "webp_named_jpg": ("jpg", lambda: encode(pattern(40, 60), "WEBP", lossless=True)),
    "jpeg_named_png": ("png", lambda: encode(pattern(40, 60))),
    "3000px": ("jpg", lambda: encode(pattern(2000, 3000))),
}


def spec(size: tuple[int, int] | None, on_device: bool) -> DecodeSpec:
    return DecodeSpec(modalities=("image",), tasks=(), image_size=size, audio_samples=None, sample_rate=None,
                      max_text_tokens=8, image_on_device=on_device)


def cpu_path(members: list[dict[str, bytes]], size: tuple[int, int] | None) -> torch.Tensor:
    """The workers decode and resize (PIL / libjpeg on the CPU), collate stacks: uint8 (B,3,H,W)."""
    sp = spec(size, on_device=False)
    dec = Decoder(sp, None)
    return collate([dec(f"k{i}", m) for i, m in enumerate(members)], sp).image


def device_path(members: list[dict[str, bytes]], size: tuple[int, int] | None, device: str) -> torch.Tensor:
    """The workers route JPEGs undecoded, ``decode_images`` decodes and resizes on ``device``."""
    sp = spec(size, on_device=True)
    dec = Decoder(sp, None)
    samples = [dec(f"k{i}", m) for i, m in enumerate(members)]
    batch = collate(samples, sp)
    out = decode_images(batch, pack_jpegs(samples, batch), device)
    assert out.image.device.type == device
    return out.image.cpu()


def assert_same(got: torch.Tensor, want: torch.Tensor, device: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == torch.uint8
    if device == "cpu":  # the same decoder and the same resize ops: bit for bit
        assert torch.equal(got, want)
    else:  # nvJPEG's IDCT and CUDA's float sums differ from the host's by a few levels
        diff = (got.int() - want.int()).abs()
        assert diff.float().mean() < 1.5 and diff.max() <= 12


def test_worker_routes_by_content_not_by_name():
    dec = Decoder(spec((16, 16), on_device=True), None)
    to_device = {name: dec(name, {ext: make()}).image_jpeg is not None for name, (ext, make) in CASES.items()}
    assert to_device == {"square": True, "tall": True, "wide": True, "grayscale": True, "cmyk": False,
                         "progressive": True, "png_named_jpg": False, "webp_named_jpg": False,
                         "jpeg_named_png": True, "3000px": True}
    s = dec("k", {"jpg": CASES["3000px"][1]()})
    assert s.image is None and s.image_jpeg_size == (2000, 3000)


def test_jpeg_header_reader():
    exif = Image.Exif()
    exif[0x010E] = "x" * 300  # a long APP1 segment before the frame header
    data = encode(pattern(37, 53), exif=exif.tobytes())
    assert jpeg_frame(data) == (0xC0, 8, 37, 53, 3)
    assert jpeg_frame(encode(pattern(37, 53), mode="CMYK"))[-1] == 4
    assert jpeg_frame(encode(pattern(37, 53), progressive=True))[0] == 0xC2
    sof = data.index(b"\xff\xc0")
    for bad in (data[:sof + 6], b"\xff\xd8\xff\xd9", encode(pattern(8, 8), "PNG"), b""):
        assert device_jpeg_size(bad) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_device_path_gives_the_cpu_path_geometry(name, device):
    ext, make = CASES[name]
    members = [{ext: make()}, {"jpg": encode(pattern(30, 50))}]  # each case beside a plain JPEG
    for size in [(32, 32), (24, 40), (28, 20)]:
        want = cpu_path(members, size)
        assert want.shape == (2, 3, *size)
        assert_same(device_path(members, size, device), want, device)


@pytest.mark.parametrize("device", DEVICES)
def test_aspect_is_kept_and_the_centre_cropped(device):
    """A wide image's middle band fills a square target, on both paths; a stretch would show all three."""
    size = (30, 30)
    for arr in (bands(60, 180, axis=1), bands(180, 60, axis=0)):
        members = [{"jpg": encode(arr)}]
        for img in (cpu_path(members, size)[0], device_path(members, size, device)[0]):
            centre = img.float().mean(dim=(1, 2))  # (3,) mean colour
            assert centre[1] > 240 and centre[0] < 15 and centre[2] < 15  # green only: the middle band


def test_a_large_downscale_pools_first_and_keeps_the_filter_factor_small(monkeypatch):
    seen = []
    interpolate = F.interpolate

    def spy(x, size, **kw):
        seen.append((tuple(x.shape[-2:]), tuple(size)))
        return interpolate(x, size=size, **kw)

    monkeypatch.setattr(geometry.F, "interpolate", spy)
    img = torch.from_numpy(pattern(3000, 3000)).permute(2, 0, 1)[None]  # (1,3,3000,3000)
    out = resize_crop(img, (32, 32))
    ((src, dst),) = seen
    assert all(s / d <= MAX_RESIZE_FACTOR for s, d in zip(src, dst))
    monkeypatch.undo()
    direct = F.interpolate(img.float(), size=(32, 32), mode="bilinear", antialias=True).round().clamp(0, 255)
    assert (out.float() - direct).abs().mean() < 1.0  # area pooling then the filter: the same picture


def test_small_downscales_are_one_antialiased_resize():
    img = torch.from_numpy(pattern(60, 90)).permute(2, 0, 1)  # (3,60,90), factor 3 to (20,30)
    direct = F.interpolate(img[None].float(), size=(20, 30), mode="bilinear", antialias=True)
    assert torch.equal(resize_crop(img, (20, 30)), direct[0].round().clamp(0, 255).to(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_device_decode_falls_back_to_the_host_per_image(device, caplog):
    """Bytes the device decoder rejects (packed by hand, bypassing the worker's routing) decode on the host."""
    from mmdata.batch import Batch

    files = [encode(pattern(40, 60)), encode(pattern(40, 60), "PNG"), encode(pattern(40, 60), mode="CMYK"),
             encode(pattern(40, 60), "WEBP", lossless=True)]
    batch = Batch(keys=[f"k{i}" for i in range(4)], image=torch.zeros(4, 3, 20, 24, dtype=torch.uint8),
                  image_mask=torch.ones(4, dtype=torch.bool))
    with caplog.at_level("INFO", logger="mmdata.gpudecode"):
        out = decode_images(batch, PackedImages.pack(files, (20, 24)), device)
    assert "k1" in caplog.text and "k3" in caplog.text  # neither PNG nor WebP is a JPEG to any device decoder
    want = torch.stack([resize_crop(decode_rgb(f), (20, 24)) for f in files])
    assert_same(out.image.cpu(), want, device)
    assert out.image_mask.tolist() == [True] * 4


def test_bytes_no_decoder_reads_still_fail_or_skip():
    from mmdata.batch import Batch

    files = [encode(pattern(8, 8)), b"\xff\xd8\xff" + b"\x00" * 40]
    batch = Batch(keys=["good", "bad"], image=torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                  image_mask=torch.ones(2, dtype=torch.bool))
    images = PackedImages.pack(files, (8, 8))
    with pytest.raises(DecodeError, match="bad"):
        decode_images(batch, images, "cpu")
    out = decode_images(batch, images, "cpu", on_error="skip")
    assert out.image_mask.tolist() == [True, False] and (out.image[1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_image_size_none_is_the_common_size_on_both_paths(device):
    """image_size=None stacks at the images' common size (not 1x1), and both paths agree."""
    members = [{"jpg": encode(pattern(20, 30))}, {"jpg": encode(pattern(20, 30), mode="CMYK")},
               {"png": encode(pattern(20, 30), "PNG")}, {}, {"jpg": encode(pattern(20, 30)[..., 1])}]
    want = cpu_path(members, None)
    assert want.shape == (5, 3, 20, 30) and (want[3] == 0).all()
    assert_same(device_path(members, None, device), want, device)
    jpegs_only = [{"jpg": encode(pattern(20, 30))}, {"jpg": encode(pattern(20, 30))}]
    assert_same(device_path(jpegs_only, None, device), cpu_path(jpegs_only, None), device)


@pytest.mark.parametrize("on_device", [False, True])
def test_image_size_none_with_sizes_that_differ_says_to_set_it(on_device):
    members = [{"jpg": encode(pattern(20, 30))}, {"jpg": encode(pattern(30, 20))}]
    sp = spec(None, on_device)
    dec = Decoder(sp, None)
    with pytest.raises(ConfigError, match=r"image_size.*\(20, 30\)|\(20, 30\).*image_size"):
        collate([dec(f"k{i}", m) for i, m in enumerate(members)], sp)


@pytest.mark.gpu
def test_cuda_resizes_a_3000px_photo_to_28_and_32_as_the_cpu_does():
    img = torch.from_numpy(pattern(3000, 2250)).permute(2, 0, 1)[None]
    for size in [(28, 28), (32, 32), (32, 24)]:
        want = resize_crop(img, size)
        assert_same(resize_crop(img.cuda(), size).cpu(), want, "cuda")
