"""Training samples/s of a reference fusion model, fed three ways, in one run.

  synthetic  the model on one augmented batch already on the device: the ceiling
  fed        mmdata: make_loader (workers read and decode; JPEGs decoded on the GPU with
             decode_images_on="device") -> DevicePrefetcher (side-stream copy) -> GPU augmentation
  plain      webdataset + per-sample torchvision v2 / torchaudio augmentation in the workers,
             the batch copied to the device after collation

Model: ResNet-18 (random init) on the images + the audio CNN on log-mel, concat fusion, one
classification head, AdamW, bf16 autocast on CUDA. Goals (issue 6, GPU machine, 16 workers):
fed / synthetic >= 0.9 and fed >= 1.7x plain.

    python tools/bench_train_feed.py --device cuda --workers 16 --batch 256 --samples 8192   # GPU machine
    python tools/bench_train_feed.py                                                      # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import build, make_synthetic  # noqa: E402


def make_model(device: torch.device, n_mels: int):
    from mmdata.tasks import Task, TaskList
    from mtml_models.model import ModelConfig, MultiTaskModel

    tasks = TaskList((Task("digit", "classification", tuple(str(i) for i in range(10))),))
    cfg = ModelConfig.from_dict({"modalities": ["image", "audio"], "image": {"kind": "resnet18"},
                                 "audio": {"n_mels": n_mels}, "fusion": "concat"})
    return tasks, MultiTaskModel(tasks, cfg).to(device)


class Trainer:
    """One optimisation step on an augmented batch; counts samples."""

    def __init__(self, device: torch.device, n_mels: int):
        from mtml_models.losses import task_losses

        self.device, self.task_losses = device, task_losses
        self.tasks, self.model = make_model(device, n_mels)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def step(self, batch) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(batch)
        loss = sum(self.task_losses({k: v.float() for k, v in out.items()}, batch, self.tasks).values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer: Trainer, batches, steps: int, warmup: int) -> float:
    """Samples/s over ``steps`` steps after ``warmup`` steps, batches pulled from the iterator."""
    it = iter(batches)
    for _ in range(warmup):
        trainer.step(next(it))
    sync(trainer.device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        b = next(it)
        trainer.step(b)
        n += len(b)
    sync(trainer.device)
    return n / (time.perf_counter() - t0)


def forever(make_iterable):
    epoch = 0
    while True:
        yield from make_iterable(epoch)
        epoch += 1


def main() -> None:
    from mmdata import LoaderConfig, make_loader, open_dataset
    from mmdata.augment import AugmentConfig, Pipeline
    from mmdata.prefetch import DevicePrefetcher

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    p.add_argument("--samples", type=int, default=None, help="synthetic set size (default 8192 CUDA, 256 CPU)")
    p.add_argument("--size", type=int, default=None, help="crop size (default 224 CUDA, 64 CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 40 CUDA, 4 CPU)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", help="data folder (default: a temporary one)")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 16)
    samples = args.samples or (8192 if cuda else 256)
    size = args.size or (224 if cuda else 64)
    steps = args.steps or (40 if cuda else 4)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_feed_"))
    if not (work / "ds" / "dataset.json").exists():
        make_synthetic(work / "raw", samples)
        build(work / "raw" / "manifest.csv", work / "ds", 256)
    ds = open_dataset(work / "ds")
    n_mels = 64
    aug_cfg = AugmentConfig.from_dict({"image": {"size": [size, size]}, "audio": {"n_mels": n_mels}})
    aug = Pipeline(aug_cfg, sample_rate=16000).to(device)
    gen = torch.Generator(device).manual_seed(0)
    trainer = Trainer(device, n_mels)
    loader_cfg = LoaderConfig(image_size=256, audio_seconds=1.0, pin_memory=cuda,
                              decode_images_on="device" if cuda else "cpu")

    def fed_batches(epoch):
        loader = make_loader(ds, "train", batch_size=batch, num_workers=args.workers, seed=0, drop_last=True,
                             modalities=["image", "audio"], tasks=["digit"], config=loader_cfg)
        loader.set_epoch(epoch)
        for b in DevicePrefetcher(loader, device):
            yield aug(b, generator=gen)

    first = next(fed_batches(0))
    synthetic = [first] * (steps + 2)

    def plain_batches(epoch):
        yield from (b.to(device, non_blocking=True) for b in plain_loader(ds, batch, args.workers, size, epoch))

    rows: dict[str, list[float]] = {"synthetic": [], "fed": [], "plain": []}
    for _ in range(args.runs):
        rows["synthetic"].append(timed_steps(trainer, synthetic, steps, 2))
        rows["fed"].append(timed_steps(trainer, forever(fed_batches), steps, 2))
        rows["plain"].append(timed_steps(trainer, forever(plain_batches), steps, 2))
    med = {k: statistics.median(v) for k, v in rows.items()}
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device {name}, batch {batch}, {size}px crops + 1 s 16 kHz audio, {args.workers} workers, "
          f"median of {args.runs} x {steps} steps")
    for k, v in med.items():
        print(f"  {k:10s} {v:9.1f} samples/s")
    print(f"  fed / synthetic = {med['fed'] / med['synthetic']:.2f}   (goal >= 0.9)")
    print(f"  fed / plain     = {med['fed'] / med['plain']:.2f}   (goal >= 1.7)")



def plain_loader(ds, batch: int, workers: int, size: int, epoch: int):
    """webdataset + per-sample CPU augmentation in the workers, collated into a Batch."""
    import webdataset as wds
    from bench_augment import plain_transforms

    from mmdata.batch import Batch
    from mmdata.decode import decode_audio, decode_image

    aug = plain_transforms()

    def one(sample):
        img = decode_image(sample["jpg"], (256, 256))
        wav = torch.zeros(16000)
        w = torch.from_numpy(decode_audio(sample["flac"], None, 16000))
        wav[: len(w)] = w
        x, f = aug(img, wav)
        return x, f, int(__import__("json").loads(sample["json"])["labels"]["digit"])

    urls = [ds.url(s.file) for s in ds.card.splits["train"].shards]
    pipe = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(one).batched(batch, partial=False)
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())
    for x, f, y in loader:
        B = x.shape[0]
        ones = torch.ones(B, dtype=torch.bool)
        yield Batch(keys=[""] * B, image=x, image_mask=ones, audio_features=f, audio_mask=ones,
                    audio_feature_lengths=torch.full((B,), f.shape[-1]),
                    labels={"digit": y}, label_mask={"digit": ones})


if __name__ == "__main__":
    main()
