"""Device-side JPEG decode of packed batch bytes, and the DevicePrefetcher."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmdata.augment import AugmentConfig, Pipeline
from mmdata.batch import Batch
from mmdata.errors import DecodeError
from mmdata.gpudecode import decode_images
from mmdata.prefetch import DevicePrefetcher

SIZE = (16, 20)


def jpeg(i: int, h: int, w: int) -> bytes:
    """A JPEG whose flat colour encodes its index."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = (20 * i, 255 - 20 * i, 100)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def packed_batch() -> Batch:
    """Rows: 0,1 JPEG of two sizes; 2 a CPU-decoded non-JPEG (no bytes); 3 absent; 4 grayscale JPEG."""
    files = [jpeg(0, 32, 40), jpeg(1, 16, 20), b"", b"", b""]
    gray = io.BytesIO()
    Image.fromarray(np.full((8, 10), 77, np.uint8)).save(gray, format="JPEG", quality=95)
    files[4] = gray.getvalue()
    offsets = np.cumsum([0] + [len(f) for f in files])
    image = torch.zeros(5, 3, *SIZE, dtype=torch.uint8)
    image[2] = 200  # decoded by the worker
    return Batch(keys=[f"k{i}" for i in range(5)], image=image,
                 image_mask=torch.tensor([True, True, True, False, True]),
                 image_bytes=torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8),
                 image_offsets=torch.from_numpy(offsets), image_size=SIZE,
                 labels={"y": torch.arange(5)}, label_mask={"y": torch.ones(5, dtype=torch.bool)})


def check_decoded(out: Batch) -> None:
    img = out.image.cpu().int()
    assert out.image.shape == (5, 3, *SIZE) and out.image.dtype == torch.uint8 and out.image_bytes is None
    for i in (0, 1):  # flat colours survive decode + resize within JPEG error
        expect = torch.tensor([20 * i, 255 - 20 * i, 100]).view(3, 1, 1)
        assert (img[i] - expect).abs().max() <= 4
    assert (img[2] == 200).all()  # the worker's row kept
    assert (img[3] == 0).all()  # absent stays zeros
    assert (img[4] - 77).abs().max() <= 3 and torch.equal(img[4, 0], img[4, 1])  # gray -> 3 equal channels


def test_decode_on_cpu_matches_pillow_and_keeps_rows():
    check_decoded(decode_images(packed_batch(), "cpu"))


def test_decode_without_bytes_is_a_no_op_and_bad_bytes_name_the_sample():
    b = Batch(keys=["a"], image=torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    assert decode_images(b, "cpu") is b
    bad = packed_batch()
    raw = bytearray(bad.image_bytes.numpy().tobytes())
    start, end = int(bad.image_offsets[1]), int(bad.image_offsets[2])
    raw[start:end] = b"\xff\xd8" + b"\x00" * (end - start - 2)  # row 1 broken after the SOI marker
    bad.image_bytes = torch.frombuffer(raw, dtype=torch.uint8)
    with pytest.raises(DecodeError, match="k1"):
        decode_images(bad, "cpu")


def test_undecodable_jpeg_under_skip_becomes_an_absent_image(caplog):
    """on_error="skip" (the loader's) marks a bad JPEG's image absent instead of failing the batch."""
    bad = packed_batch()
    raw = bytearray(bad.image_bytes.numpy().tobytes())
    start, end = int(bad.image_offsets[1]), int(bad.image_offsets[2])
    raw[start:end] = b"\xff\xd8" + b"\x00" * (end - start - 2)
    bad.image_bytes = torch.frombuffer(raw, dtype=torch.uint8)

    class SkippingLoader(list):
        on_error = "skip"

    with caplog.at_level("WARNING"):
        (out,) = list(DevicePrefetcher(SkippingLoader([bad]), "cpu"))
    assert "k1" in caplog.text
    assert out.image_mask.tolist() == [True, False, True, False, True]
    assert (out.image[1] == 0).all() and out.image_bytes is None
    good = decode_images(packed_batch(), "cpu")
    for i in (0, 2, 4):  # the other rows decode as they would in a clean batch
        assert torch.equal(out.image[i], good.image[i])


def test_pipeline_decodes_packed_bytes_itself():
    aug = Pipeline(AugmentConfig.from_dict({"image": {"size": [8, 8]}})).eval()
    out = aug(packed_batch())
    assert out.image.shape == (5, 3, 8, 8) and out.image.dtype == torch.float32


class Loader:
    """A list of batches with a length and a resumable state, like mmdata's loader."""

    def __init__(self, n: int):
        self.batches = [packed_batch() for _ in range(n)]
        for i, b in enumerate(self.batches):
            b.labels = {"y": b.labels["y"] + 10 * i}
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start = self.consumed
        for b in self.batches[start:]:
            self.consumed += 1
            yield b
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


def run_prefetcher(device: str) -> None:
    aug = Pipeline(AugmentConfig.from_dict({"image": {"size": [8, 8]}})).to(device)
    g = torch.Generator().manual_seed(0)
    loader = Loader(3)
    pre = DevicePrefetcher(loader, device, transform=functools.partial(aug, generator=g))
    assert len(pre) == 3
    got = []
    for i, b in enumerate(pre):
        got.append(b)
        assert pre.state_dict() == {"consumed": i + 1}  # not one ahead, although the next batch is read
        if i == 0:
            state = pre.state_dict()
    assert len(got) == 3
    pre.load_state_dict(state)  # resume after the first batch: the other two, in order
    assert [b.labels["y"][0].item() for b in pre] == [10, 20]
    for i, b in enumerate(got):
        assert b.image.device.type == torch.device(device).type and b.image.dtype == torch.float32
        assert b.labels["y"].tolist() == [10 * i + j for j in range(5)]  # order kept
    raw = list(DevicePrefetcher(loader, device))
    for b in raw:
        check_decoded(b)


def test_prefetcher_on_cpu_decodes_transforms_and_keeps_order():
    run_prefetcher("cpu")


@pytest.mark.gpu
def test_prefetcher_and_decode_on_cuda():
    check_decoded(decode_images(packed_batch(), "cuda"))
    run_prefetcher("cuda")
