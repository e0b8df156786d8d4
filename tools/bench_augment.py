"""Samples/s of mmdata's batched per-sample augmentation vs the plain per-sample CPU way.

One synthetic batch (256 px RGB images, 1 s of 16 kHz audio) goes through:
  ours       mmdata.augment.Pipeline (crop+flip, jitter, grayscale, normalise; gain, shift, noise,
             log-mel, SpecAugment, normalisation), batched, on --device
  baseline   a per-sample loop of torchvision v2 + torchaudio doing the same ops, on one CPU core,
             and with --workers N in N processes
  kornia     (--kornia, if installed) kornia.augmentation's crop+flip+jitter+grayscale+normalise
             on --device, against our image ops alone
  decode     (--decode) torchvision.io.decode_jpeg on one CPU core vs a batched decode on --device
Figures are medians over --runs timed runs after a warm-up; ratios are from the same run.

    python tools/bench_augment.py                      # CPU, ~15 s on 2 cores
    python tools/bench_augment.py --device cuda --batch 256 --workers 16 --kornia --decode
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdata.augment import AugmentConfig, Pipeline  # noqa: E402
from mmdata.batch import Batch  # noqa: E402

SR, SIZE, OUT = 16000, 256, 224
CFG = {"image": {"size": [OUT, OUT], "scale": [0.08, 1.0], "jitter_p": 0.8, "grayscale_p": 0.1},
       "audio": {"n_mels": 64, "gain_p": 0.5, "shift_p": 0.5, "noise_p": 0.5}}


def synthetic(batch: int, seed: int = 0) -> Batch:
    """Smooth random images (B,3,256,256) uint8 and 1 s noisy tones (B,16000)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 8, 8, generator=g)
    img = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    t = torch.arange(SR) / SR
    freq = 200 + 800 * torch.rand(batch, 1, generator=g)
    audio = torch.sin(2 * torch.pi * freq * t) * 0.5 + 0.05 * torch.randn(batch, SR, generator=g)
    ones = torch.ones(batch, dtype=torch.bool)
    return Batch(keys=[str(i) for i in range(batch)], image=(img * 255).to(torch.uint8), image_mask=ones,
                 audio=audio, audio_lengths=torch.full((batch,), SR), audio_mask=ones)


def timed(fn, runs: int, sync) -> float:
    """Median seconds of ``fn()`` over ``runs`` after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_transforms():
    """Per-sample torchvision v2 + torchaudio: the way most training scripts augment in workers."""
    import torchaudio
    from torchvision.transforms import v2

    image = v2.Compose([v2.RandomResizedCrop(OUT, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                        v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.8), v2.RandomGrayscale(0.1),
                        v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=512, win_length=400, hop_length=160, n_mels=64)
    masks = torch.nn.Sequential(torchaudio.transforms.FrequencyMasking(8), torchaudio.transforms.FrequencyMasking(8),
                                torchaudio.transforms.TimeMasking(10), torchaudio.transforms.TimeMasking(10))

    def one(img: torch.Tensor, wav: torch.Tensor):
        x = image(img)
        if torch.rand(()) < 0.5:
            wav = wav * 10 ** (torch.empty(()).uniform_(-6, 6) / 20)
        if torch.rand(()) < 0.5:
            wav = torch.roll(wav, int(torch.randint(-1600, 1600, ())))
        if torch.rand(()) < 0.5:
            snr = torch.empty(()).uniform_(10, 40)
            wav = wav + torch.randn_like(wav) * wav.pow(2).mean().div(10 ** (snr / 10)).sqrt()
        f = masks(torch.log(mel(wav) + 1e-6))
        return x, (f - f.mean()) / (f.std() + 1e-5)

    return one


def _plain_worker(args) -> int:
    images, audio = args
    torch.set_num_threads(1)
    one = plain_transforms()
    for img, wav in zip(images, audio):
        one(img, wav)
    return len(images)


def bench_plain(b: Batch, runs: int, workers: int) -> float:
    """Samples/s of the per-sample loop on one core (workers=0) or split over worker processes."""
    if workers <= 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        one = plain_transforms()
        sec = timed(lambda: [one(i, w) for i, w in zip(b.image, b.audio)], runs, lambda: None)
        torch.set_num_threads(threads)
        return len(b) / sec
    chunks = [(b.image[i::workers], b.audio[i::workers]) for i in range(workers)]
    with mp.get_context("fork").Pool(workers) as pool:
        sec = timed(lambda: pool.map(_plain_worker, chunks), runs, lambda: None)
    return len(b) / sec


def bench_kornia(b: Batch, runs: int, device: torch.device, sync) -> tuple[float, float] | None:
    """(ours image-only, kornia) samples/s, or None without kornia."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    aug = K.AugmentationSequential(
        K.RandomResizedCrop((OUT, OUT), scale=(0.08, 1.0)), K.RandomHorizontalFlip(),
        K.ColorJitter(0.2, 0.2, 0.2, 0.02, p=0.8), K.RandomGrayscale(p=0.1),
        K.Normalize(torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))).to(device)
    x = b.image.to(device)
    k = timed(lambda: aug(x.float() / 255), runs, sync)
    ours = Pipeline(AugmentConfig.from_dict(CFG)).image.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    o = timed(lambda: ours(x, generator=g), runs, sync)
    return len(b) / o, len(b) / k


def bench_decode(batch: int, runs: int, device: torch.device, sync) -> tuple[float, float]:
    """(one CPU core, batched on device) JPEG decodes/s of 256 px images."""
    from PIL import Image
    from torchvision.io import decode_jpeg

    imgs = synthetic(batch, seed=1).image.permute(0, 2, 3, 1).numpy()
    datas = []
    for a in imgs:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        datas.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu = timed(lambda: [decode_jpeg(d) for d in datas], runs, lambda: None)
    torch.set_num_threads(threads)
    dev = timed(lambda: decode_jpeg(datas, device=device), runs, sync)
    return batch / cpu, batch / dev


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="also time the per-sample loop in N processes")
    p.add_argument("--kornia", action="store_true", help="also time kornia's image ops (if installed)")
    p.add_argument("--decode", action="store_true", help="also time JPEG decode, CPU core vs device")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch}, {SIZE} px images -> {OUT} px, 1 s audio at {SR} Hz; "
          f"median of {args.runs} runs")

    b = synthetic(args.batch)
    aug = Pipeline(AugmentConfig.from_dict(CFG), sample_rate=SR).to(device)
    on_dev = b.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    ours = args.batch / timed(lambda: aug(on_dev, generator=g), args.runs, sync)
    plain = bench_plain(b, args.runs, 0)
    rows = [("ours, batched per-sample, image+audio", ours, None),
            ("torchvision v2 + torchaudio per sample, 1 CPU core", plain, ours / plain)]
    if args.workers > 0:
        multi = bench_plain(b, args.runs, args.workers)
        rows.append((f"torchvision v2 + torchaudio per sample, {args.workers} processes", multi, ours / multi))
    if args.kornia:
        k = bench_kornia(b, args.runs, device, sync)
        if k is None:
            print("kornia is not installed: skipping its row")
        else:
            rows += [("ours, image ops only", k[0], None), ("kornia, image ops", k[1], k[0] / k[1])]
    for label, rate, ratio in rows:
        tail = f"   ours is {ratio:6.1f}x" if ratio is not None else ""
        print(f"{label:<60} {rate:>10,.0f} samples/s{tail}")
    if args.decode:
        cpu, dev = bench_decode(args.batch, args.runs, device, sync)
        print(f"{'JPEG decode, 1 CPU core':<60} {cpu:>10,.0f} images/s")
        print(f"{'JPEG decode, batched on ' + str(device):<60} {dev:>10,.0f} images/s   {dev / cpu:6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
