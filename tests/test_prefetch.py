"""Device-side JPEG decode of packed batch bytes, and the DevicePrefetcher."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmdata.augment import AugmentConfig, Pipeline
from mmdata.batch import Batch
from mmdata.errors import DecodeError
from mmdata.gpudecode import DecodeStats, PackedImages, decode_images
from mmdata.prefetch import DevicePrefetcher

SIZE = (16, 20)


def jpeg(i: int, h: int, w: int) -> bytes:
    """A JPEG whose flat colour encodes its index."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = (20 * i, 255 - 20 * i, 100)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def packed_batch() -> tuple[Batch, PackedImages]:
    """Rows: 0,1 JPEG of two sizes; 2 a CPU-decoded non-JPEG (no bytes); 3 absent; 4 grayscale JPEG."""
    files = [jpeg(0, 32, 40), jpeg(1, 16, 20), None, None, None]
    gray = io.BytesIO()
    Image.fromarray(np.full((8, 10), 77, np.uint8)).save(gray, format="JPEG", quality=95)
    files[4] = gray.getvalue()
    image = torch.zeros(5, 3, *SIZE, dtype=torch.uint8)
    image[2] = 200  # decoded by the worker
    batch = Batch(keys=[f"k{i}" for i in range(5)], image=image,
                  image_mask=torch.tensor([True, True, True, False, True]),
                  labels={"y": torch.arange(5)}, label_mask={"y": torch.ones(5, dtype=torch.bool)})
    return batch, PackedImages.pack(files, SIZE)


def broken_row_1(images: PackedImages) -> PackedImages:
    """``images`` with row 1's JPEG broken after its SOI marker."""
    raw = bytearray(images.data.numpy().tobytes())
    start, end = int(images.offsets[1]), int(images.offsets[2])  # file 1 is row 1's
    raw[start:end] = b"\xff\xd8" + b"\x00" * (end - start - 2)
    return dataclasses.replace(images, data=torch.frombuffer(raw, dtype=torch.uint8))


def check_decoded(out: Batch) -> None:
    img = out.image.cpu().int()
    assert out.image.shape == (5, 3, *SIZE) and out.image.dtype == torch.uint8
    for i in (0, 1):  # flat colours survive decode + resize within JPEG error
        expect = torch.tensor([20 * i, 255 - 20 * i, 100]).view(3, 1, 1)
        assert (img[i] - expect).abs().max() <= 4
    assert (img[2] == 200).all()  # the worker's row kept
    assert (img[3] == 0).all()  # absent stays zeros
    assert (img[4] - 77).abs().max() <= 3 and torch.equal(img[4, 0], img[4, 1])  # gray -> 3 equal channels


def test_decode_on_cpu_matches_pillow_and_keeps_rows():
    check_decoded(decode_images(*packed_batch(), "cpu"))


def test_decode_without_bytes_is_a_no_op_and_bad_bytes_name_the_sample():
    b = Batch(keys=["a"], image=torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    assert decode_images(b, None, "cpu") is b
    assert PackedImages.pack([None, b""], (2, 2)) is None  # no JPEG in the batch: nothing travels
    bad, images = packed_batch()
    with pytest.raises(DecodeError, match="k1"):
        decode_images(bad, broken_row_1(images), "cpu")


def test_undecodable_jpeg_under_skip_becomes_an_absent_image(caplog):
    """on_error="skip" (the loader's) marks a bad JPEG's image absent instead of failing the batch."""
    bad, images = packed_batch()

    class SkippingLoader(list):
        on_error = "skip"

        def iter_packed(self):
            return iter(self)

    with caplog.at_level("WARNING"):
        (out,) = list(DevicePrefetcher(SkippingLoader([(bad, broken_row_1(images))]), "cpu"))
    assert "k1" in caplog.text
    assert out.image_mask.tolist() == [True, False, True, False, True]
    assert (out.image[1] == 0).all()
    good = decode_images(*packed_batch(), "cpu")
    for i in (0, 2, 4):  # the other rows decode as they would in a clean batch
        assert torch.equal(out.image[i], good.image[i])


def png_of(jpeg_bytes: bytes) -> bytes:
    """The same picture as a PNG: no JPEG decoder reads it, the host decoder does."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_counts_host_fallbacks_and_skipped_images():
    """An image the device refuses but the CPU reads is a host fallback; bytes no decoder reads are a skip."""
    batch, images = packed_batch()
    files = [f.numpy().tobytes() for f in images.files()]  # rows 0, 1, 4
    files[0], files[1] = png_of(files[0]), b"\xff\xd8" + b"\x00" * 40
    tampered = dataclasses.replace(PackedImages.pack(files, SIZE), rows=images.rows)
    stats = DecodeStats()
    out = decode_images(batch, tampered, "cpu", "skip", stats)
    assert stats.host_fallbacks == 1 and [k for k, _ in stats.skipped] == ["k1"]
    assert "cpu" in stats.skipped[0][1]  # the reason says where decoding was tried
    assert out.image_mask.tolist() == [True, False, True, False, True]
    assert torch.equal(out.image[0], decode_images(*packed_batch(), "cpu").image[0])  # the PNG: same picture
    clean = DecodeStats()
    decode_images(*packed_batch(), "cpu", "skip", clean)
    assert clean == DecodeStats()  # nothing refused, nothing skipped
    with pytest.raises(DecodeError, match="k1"):  # "raise" counts nothing as skipped: it stops
        decode_images(batch, tampered, "cpu", "raise", DecodeStats())


def device_loader(root: str):
    """mmdata's loader leaving JPEGs to the device, whose packed JPEGs are tampered with on the way: in
    each batch the first JPEG is broken after its SOI marker, the second replaced by a PNG. Returns the
    loader and the (broken, png) keys tampered with so far."""
    from mmdata import LoaderConfig, make_loader

    loader = make_loader(root, "train", batch_size=8, shuffle=False, modalities=["image"], on_error="skip",
                         config=LoaderConfig(decode_images_on="device", image_size=8))
    real = loader.iter_packed
    tampered: tuple[list[str], list[str]] = ([], [])

    def iter_packed():
        for batch, images in real():
            files: list[bytes | None] = [None] * len(batch)
            rows = images.rows.tolist()
            for r, f in zip(rows, images.files()):
                files[r] = f.numpy().tobytes()
            files[rows[0]] = b"\xff\xd8" + b"\x00" * 40
            files[rows[1]] = png_of(files[rows[1]])
            tampered[0].append(batch.keys[rows[0]])
            tampered[1].append(batch.keys[rows[1]])
            yield batch, PackedImages.pack(files, images.size)

    loader.iter_packed = iter_packed
    return loader, tampered


@pytest.mark.timeout(120)
def test_device_skips_and_host_fallbacks_count_in_the_loader_and_resume(tmp_path):
    """Images dropped on the device add to the same ``skipped`` as the samples the workers drop, host
    fallbacks to ``host_fallbacks``; both are in the state, resume exactly, and an older state loads."""
    from test_loader import _corrupt_member, write_dataset

    root = write_dataset(tmp_path / "d")
    _corrupt_member(root, "s0007")  # a sample the worker skips
    loader, (broken, pngs) = device_loader(root)
    out = [b for b in DevicePrefetcher(loader, "cpu")]
    assert len(out) == len(loader) and len(broken) == len(pngs) == len(loader)
    assert loader.skipped == 1 + len(broken) and loader.host_fallbacks == len(pngs)
    assert {s[1] for s in loader.skipped_samples if s[0] == ""} == set(broken)
    assert [s[:2] for s in loader.skipped_samples if s[0]] == [("train-000001.tar", "s0007")]
    for b in out:  # a broken image is absent, its sample kept; the PNG decoded
        masks = dict(zip(b.keys, b.image_mask.tolist()))
        assert not any(masks[k] for k in broken if k in masks) and all(masks[k] for k in pngs if k in masks)
    full = loader.state_dict()

    first, _ = device_loader(root)
    pre = DevicePrefetcher(first, "cpu")
    next(iter(pre))
    state = pre.state_dict()  # after one batch: s0007, a broken JPEG and a PNG
    assert (state["batches"], state["skipped"], state["host_fallbacks"]) == (1, 2, 1)
    resumed, _ = device_loader(root)
    resumed.load_state_dict(state)
    rest = list(DevicePrefetcher(resumed, "cpu"))
    assert [b.keys for b in rest] == [b.keys for b in out[1:]]
    assert resumed.state_dict() == full  # the same counts as the uninterrupted pass

    old = {k: v for k, v in state.items() if k != "host_fallbacks"}  # saved before fallbacks were counted
    older, _ = device_loader(root)
    older.load_state_dict(old)
    assert older.host_fallbacks == 0 and older.skipped == 2


def test_a_batch_holds_no_transport_and_the_pipeline_does_not_decode():
    """The packed JPEGs are no part of a Batch; the Pipeline augments the rows it is given (the JPEG rows,
    still zeros before the prefetcher decodes them, stay a constant), and never reads JPEG bytes."""
    batch, images = packed_batch()
    assert {f.name for f in dataclasses.fields(Batch)}.isdisjoint(
        {"image_bytes", "image_offsets", "image_size", "audio_is_features"})
    moved = batch.to("cpu")
    assert all(not isinstance(getattr(moved, f.name), PackedImages) for f in dataclasses.fields(Batch))
    aug = Pipeline(AugmentConfig.from_dict({"image": {"size": [8, 8]}})).eval()
    out = aug(batch)
    assert out.image.shape == (5, 3, 8, 8) and out.image.dtype == torch.float32
    assert torch.equal(out.image[0], out.image[3])  # undecoded row 0 is the zeros of absent row 3
    decoded = aug(decode_images(batch, images, "cpu"))
    assert not torch.equal(decoded.image[0], decoded.image[3])


class Loader:
    """Batches with their packed JPEGs, a length and a resumable state, like mmdata's loader."""

    def __init__(self, n: int):
        self.batches = [packed_batch() for _ in range(n)]
        for i, (b, _) in enumerate(self.batches):
            b.labels = {"y": b.labels["y"] + 10 * i}
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.batches)

    def iter_packed(self):
        start = self.consumed
        for pair in self.batches[start:]:
            self.consumed += 1
            yield pair
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
    check_decoded(decode_images(*packed_batch(), "cuda"))
    run_prefetcher("cuda")


class FakeStream:
    """A stream that logs the calls DevicePrefetcher makes on it."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(("wait", self.name, other.name))

    def synchronize(self) -> None:
        self.log.append(("sync", self.name))


class RecordingStreams:
    """StreamOps on the CPU: a side and a consumer stream, the active one, and what was recorded where."""

    def __init__(self):
        self.log: list = []
        self.side = FakeStream("side", self.log)
        self.consumer = FakeStream("consumer", self.log)
        self.active = self.consumer
        self.recorded: list[tuple[torch.Tensor, str]] = []

    def current(self) -> FakeStream:
        return self.active

    @contextlib.contextmanager
    def use(self, stream: FakeStream):
        before, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = before

    def record(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.recorded.append((tensor, stream.name))
        self.log.append(("record", stream.name))


def test_prefetcher_decodes_on_its_side_stream_and_records_on_the_consumer_stream(monkeypatch):
    """Decoded tensors are made with the side stream current, after it synchronised (nvJPEG's private
    stream waits on nothing); the consumer waits on the side stream and records every tensor handed out;
    the transform runs on the consumer stream, after the wait, and the loader is never read ahead."""
    import mmdata.prefetch as prefetch

    streams = RecordingStreams()
    decoded: list[torch.Tensor] = []

    def spy_decode(batch, images, device, on_error, stats=None):  # the real decode, noting its stream
        out = decode_images(batch, images, device, on_error, stats)
        streams.log.append(("decode", streams.active.name))
        decoded.append(out.image)
        return out

    monkeypatch.setattr(prefetch, "decode_images", spy_decode)
    loader = Loader(3)
    seen: list[int] = []

    def transform(batch: Batch) -> Batch:
        streams.log.append(("transform", streams.active.name))
        seen.append(loader.state_dict()["consumed"])  # the loader as the transform sees it
        return batch

    pre = DevicePrefetcher(loader, "cpu", transform=transform, streams=streams)
    out = []
    for b in pre:
        out.append(b)
        check_decoded(b)
    assert len(out) == 3 and seen == [1, 2, 3]  # one batch read per batch handed out
    assert [d is b.image for d, b in zip(decoded, out)] == [True] * 3
    for b in out:  # every tensor handed out, the decoded image included, recorded on the consumer stream
        for t in prefetch._tensors(b):
            assert any(r is t and name == "consumer" for r, name in streams.recorded), t.shape
    assert {name for _, name in streams.recorded} == {"consumer"}
    per_batch = [e for e in streams.log if e[0] != "record"]
    assert per_batch == [("sync", "side"), ("decode", "side"), ("wait", "consumer", "side"),
                         ("transform", "consumer")] * 3
    for i in range(3):  # records come after the wait and before the transform of the same batch
        wait = [k for k, e in enumerate(streams.log) if e[0] == "wait"][i]
        tr = [k for k, e in enumerate(streams.log) if e[0] == "transform"][i]
        assert {e[0] for e in streams.log[wait + 1:tr]} == {"record"}
    assert streams.active is streams.consumer  # the side stream is current only while staging


def test_stage_without_packed_images_does_not_wait_on_the_side_stream():
    """A batch without packed JPEGs, or from a plain iterable of Batches, is only copied: no host wait."""
    from mmdata.prefetch import stage

    streams = RecordingStreams()
    plain = Batch(keys=["a"], image=torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    assert stage(plain, None, torch.device("cpu"), streams).keys == ["a"]
    batch, _ = packed_batch()
    out = stage(batch, None, torch.device("cpu"), streams)
    assert torch.equal(out.image, batch.image) and streams.log == []
    (b,) = list(DevicePrefetcher([batch], "cpu", streams=streams))
    assert torch.equal(b.image, batch.image) and ("sync", "side") not in streams.log
