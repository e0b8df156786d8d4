"""Augmentation is immune to the caller's autocast, and never reads a device-to-host copy early."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mmdata.augment import AugmentConfig, Pipeline
from mmdata.augment.op import copy_is_async_safe, normal, to_device, uniform
from mmdata.batch import Batch
from mmdata.tasks import Task, TaskList

SR = 8000
# every op that autocast would lower: affine_grid (crop), the mel filterbank, the DCT (cepstra), blur, warp
CFG = {"image": {"size": [24, 20], "blur_p": 0.5}, "audio": {"n_mels": 32, "warp_p": 0.5},
       "mix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "p": 1.0}}
MFCC = {**CFG, "audio": {"n_mels": 32, "cepstra": 13}}  # warp and cepstra exclude each other
TASKS = TaskList((Task("digit", "classification", tuple("0123456789")),))


def pipeline(cfg: dict) -> Pipeline:
    return Pipeline(AugmentConfig.from_dict(cfg), sample_rate=SR, tasks=TASKS)


def make_batch(B: int = 4, device: str = "cpu") -> Batch:
    """uint8 images and waveforms whose valid length shrinks with the index."""
    g = torch.Generator().manual_seed(123)
    image = torch.randint(0, 256, (B, 3, 40, 48), generator=g, dtype=torch.uint8)
    T = SR // 2
    lengths = torch.tensor([T * (B - i) // B for i in range(B)])
    audio = torch.randn(B, T, generator=g) * (torch.arange(T) < lengths[:, None])
    return Batch(keys=[f"k{i}" for i in range(B)], image=image, image_mask=torch.ones(B, dtype=torch.bool),
                 audio=audio, audio_lengths=lengths, audio_mask=lengths > 0,
                 labels={"digit": torch.arange(B)}, label_mask={"digit": torch.ones(B, dtype=torch.bool)}).to(device)


def _run(aug: Pipeline, batch: Batch, device: str) -> Batch:
    g = torch.Generator(device).manual_seed(7)
    return aug(batch, generator=g) if aug.training else aug(batch)


@pytest.mark.parametrize("cfg", [CFG, MFCC], ids=["mel", "mfcc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pipeline_under_bf16_autocast_equals_float32(training, cfg):
    aug = pipeline(cfg).train(training)
    batch = make_batch()
    plain = _run(aug, batch, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = _run(aug, batch, "cpu")
        assert torch.is_autocast_enabled("cpu")  # the caller's region is restored after the pipeline
    for name in ("image", "audio_features", "audio_feature_lengths"):
        a, b = getattr(plain, name), getattr(cast, name)
        assert b.dtype == a.dtype
        assert torch.equal(a, b), name
    assert cast.image.dtype == cast.audio_features.dtype == torch.float32
    assert torch.equal(cast.labels["digit"], plain.labels["digit"])  # soft labels when mixed


@pytest.mark.parametrize("cfg", [CFG, MFCC], ids=["mel", "mfcc"])
def test_autocast_would_change_the_output_without_the_guard(cfg):
    """The test above checks something: the same ops under bf16 autocast do differ."""
    aug = pipeline(cfg).eval()
    batch = make_batch()
    plain = aug.apply(batch, aug.make_params(batch, None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = aug.apply(batch, aug.make_params(batch, None))  # apply bypasses forward's guard
    assert cast.audio_features.dtype == torch.bfloat16 and not torch.equal(cast.image, plain.image)


# ------------------------------------------------------------- copies between host and device


def test_only_host_to_device_copies_are_asynchronous():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert copy_is_async_safe(cpu, cuda)
    assert not copy_is_async_safe(cuda, cpu)  # the host would read before the copy lands
    assert not copy_is_async_safe(cpu, cpu)
    assert not copy_is_async_safe(cuda, torch.device("cuda", 1))  # stream-ordered anyway


class _RecordTo(TorchFunctionMode):
    """Record (source device, target device, non_blocking) of every ``Tensor.to`` that names a device.

    A meta tensor stands in for a device tensor: its copy is recorded, not run (no GPU needed).
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.device, torch.device, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            t = args[0]
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None))
            if target is not None:
                target = torch.device(target)
                self.calls.append((t.device, target, bool(kwargs.get("non_blocking", False))))
                if t.device.type == "meta":
                    return torch.zeros(t.shape, dtype=t.dtype, device=target)
        return func(*args, **kwargs)


def test_device_to_host_copy_blocks():
    with _RecordTo() as rec:
        to_device(torch.zeros(3, device="meta"), "cpu")
        to_device(torch.zeros(3), torch.device("meta"))
    assert rec.calls == [(torch.device("meta"), torch.device("cpu"), False),
                         (torch.device("cpu"), torch.device("meta"), True)]


def test_draws_and_pipeline_never_copy_to_the_cpu_asynchronously():
    g = torch.Generator().manual_seed(0)
    aug = pipeline(CFG)
    with _RecordTo() as rec:
        u = uniform(g, (5,), device=torch.device("cpu"))
        z = normal(g, (5,), device=torch.device("cpu"))
        aug(make_batch(), generator=g)
    assert u.device.type == z.device.type == "cpu"
    assert rec.calls, "the draws name their target device"
    assert not [c for c in rec.calls if c[1].type == "cpu" and c[2]]


@pytest.mark.gpu
def test_cuda_generator_with_cpu_data_reads_the_landed_copy():
    g = torch.Generator("cuda").manual_seed(3)
    want = torch.rand((1 << 20,), generator=torch.Generator("cuda").manual_seed(3), device="cuda").cpu()
    torch.cuda._sleep(10_000_000)  # keep the stream busy: an early host read would see zeros or garbage
    got = uniform(g, (1 << 20,), device=torch.device("cpu"))
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [CFG, MFCC], ids=["mel", "mfcc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pipeline_under_cuda_bf16_autocast_equals_float32(training, cfg):
    aug = pipeline(cfg).train(training).cuda()
    batch = make_batch(device="cuda")
    plain = _run(aug, batch, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cast = _run(aug, batch, "cuda")
    for name in ("image", "audio"):
        assert getattr(cast, name).dtype == torch.float32
        assert torch.equal(getattr(plain, name), getattr(cast, name)), name
