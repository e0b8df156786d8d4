"""Samples/s of mmdata's loader vs the plain webdataset pipeline on the same shards, same decode work.

  ours       mmdata.make_loader: plan, index seeks, decode, padding + masks, rank-equal batches,
             resumable state; batches made in --workers DataLoader workers
  webdataset wds.WebDataset(urls).decode(...).to_tuple(...).batched(B) in a DataLoader with the same
             workers, decoding with the same functions (image decode + resize, audio decode + crop/pad)
  ours-s3    ours on the same shards uploaded to a loopback S3 server (moto on 127.0.0.1, read through
             s3fs with ranged GETs; see tools/bench_s3.py for the shard-cache row); --no-s3 skips it
  ours-mix   with --mixture: ours on a Mixture of the dataset with itself, weights 1:1 and as many
             samples per epoch as the dataset: each source subsampled by half, a source index per row

Datasets: ``--source RAW`` builds a copy of a raw folder (e.g. ../shared/data/avmnist-dev) with
``mmdata.build.build_dataset``; without it the script makes a synthetic set (256x256 JPEG + 1 s 16 kHz
FLAC + a text + a label) and builds it. Each figure is the median of --runs full epochs (worker start-up
included, runs alternated); the ratio is from the same process.

    python tools/bench_loader.py                                   # synthetic, ~1 min on 2 cores
    python tools/bench_loader.py --source ../shared/data/avmnist-dev --workers 2
    python tools/bench_loader.py --samples 4096 --workers 16 --batch-size 64     # the GPU machine
    python tools/bench_loader.py --mixture --no-s3                 # mixture vs single-dataset loader
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_synthetic(raw: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` raw samples: 256x256 JPEG, 1 s 16 kHz FLAC, a text and a digit label, plus a manifest."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    lines = ["id,image,audio,text,digit"]
    for i in range(n):
        d = raw / f"s{i:05d}"
        d.mkdir(exist_ok=True)
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # upscaled noise: JPEG of a realistic size
        Image.fromarray(small).resize((256, 256), Image.BILINEAR).save(d / "image.jpg", quality=90)
        t = np.arange(16000) / 16000
        sf.write(d / "audio.flac", (0.3 * np.sin(2 * np.pi * (200 + i % 500) * t)).astype(np.float32), 16000)
        (d / "text.txt").write_text(f"sample number {i} says digit {i % 10}")
        lines.append(f"s{i:05d},s{i:05d}/image.jpg,s{i:05d}/audio.flac,s{i:05d}/text.txt,{i % 10}")
    (raw / "manifest.csv").write_text("\n".join(lines) + "\n")


def build(source: Path, out: Path, shard_samples: int) -> None:
    from mmdata.build import BuildConfig, build_dataset

    if (out / "dataset.json").exists():
        return
    build_dataset(source, out, BuildConfig(max_samples=shard_samples), overwrite=True, progress=True)


def ours(root, split: str, batch: int, workers: int, size: int, seconds: float) -> int:
    """Samples of one epoch of make_loader over ``root``: a path, a URL's Dataset or a Mixture."""
    from mmdata import LoaderConfig, make_loader

    cfg = LoaderConfig(image_size=size, audio_seconds=seconds, pin_memory=False)
    loader = make_loader(root, split, batch_size=batch, num_workers=workers, modalities=["image", "audio"],
                         config=cfg)
    return sum(len(b) for b in loader)


def _wds_decoder(size: int, samples: int):
    from mmdata.decode import decode_audio, decode_image

    def handler(key, data):
        ext = key.rsplit(".", 1)[-1]
        if ext in ("jpg", "png", "webp"):
            return decode_image(data, (size, size))
        if ext in ("flac", "wav"):
            wav = decode_audio(data, None, samples)  # (T,) cropped; padded below like ours
            out = torch.zeros(samples, dtype=torch.float32)
            out[: len(wav)] = torch.from_numpy(wav)
            return out
        if ext == "json":
            return json.loads(data)
        return None

    return handler


def plain_webdataset(urls: list[str], batch: int, workers: int, size: int, samples: int) -> int:
    import webdataset as wds

    pipe = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            .decode(_wds_decoder(size, samples))
            .to_tuple("__key__", "jpg;png;webp", "flac;wav", "json")
            .batched(batch))
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=workers)
    return sum(len(keys) for keys, *_ in loader)


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", help="raw folder or manifest to build (default: a synthetic set)")
    p.add_argument("--work", help="folder for the raw and built data (default: a temporary folder)")
    p.add_argument("--samples", type=int, default=512, help="synthetic samples (default 512)")
    p.add_argument("--shard-samples", type=int, default=64, help="samples per shard (default 64)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224, help="for avmnist pass 28")
    p.add_argument("--audio-seconds", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-s3", action="store_true", help="skip the loopback S3 row (needs moto[server], s3fs)")
    p.add_argument("--mixture", action="store_true", help="add the ours-mix row: a Mixture of the dataset with "
                   "itself, as many samples per epoch")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.source:
            source, name = Path(args.source), Path(args.source).name
        else:
            source, name = work / "raw", f"synthetic-{args.samples}"
            if not (source / "manifest.csv").exists():
                make_synthetic(source, args.samples)
        out = work / f"built-{name}"
        build(source / "manifest.csv" if (source / "manifest.csv").exists() else source, out, args.shard_samples)

        from mmdata import open_dataset

        ds = open_dataset(out)
        split = "train" if "train" in ds.splits else ds.splits[0]
        urls = [str(out / s.file) for s in ds.card.splits[split].shards]
        sr = ds.card.modalities["audio"]["sample_rate"]
        samples = int(round(args.audio_seconds * sr))
        rows = [
            ("ours", ours, (str(out), split, args.batch_size, args.workers, args.image_size, args.audio_seconds)),
            ("webdataset", plain_webdataset, (urls, args.batch_size, args.workers, args.image_size, samples)),
        ]
        if args.mixture:
            from mmdata import Mixture

            mix = Mixture({"a": out, "b": out}, weights={"a": 1, "b": 1}, samples_per_epoch=ds.num_samples(split))
            rows.append(("ours-mix", ours, (mix, split, args.batch_size, args.workers, args.image_size,
                                            args.audio_seconds)))
        server = None
        if not args.no_s3:
            from bench_s3 import start_server  # tools/bench_s3.py, next to this script

            from mmdata.storage import Storage, publish

            server, opts = start_server()
            publish(out, Storage("s3://bench/ds", opts))
            remote = open_dataset("s3://bench/ds", storage_options=opts)
            rows.append(("ours-s3", ours, (remote, split, args.batch_size, args.workers, args.image_size,
                                           args.audio_seconds)))
        runs = {label: [] for label, _, _ in rows}
        counts = {}
        try:
            for r in range(args.runs + 1):  # run 0 warms the page cache and imports
                for label, fn, a in rows:
                    seconds, n = timed(fn, *a)
                    counts[label] = n
                    if r:
                        runs[label].append(n / seconds)
        finally:
            if server is not None:
                server.stop()
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"dataset {name}: split {split!r}, {ds.num_samples(split)} samples in {len(urls)} shards; "
              f"batch {args.batch_size}, workers {args.workers}, image {args.image_size}px, "
              f"audio {args.audio_seconds} s, torch threads {torch.get_num_threads()}")
        print(f"{'pipeline':<12}{'samples/epoch':>14}{f'samples/s (median of {args.runs})':>30}")
        for k in runs:
            print(f"{k:<12}{counts[k]:>14}{med[k]:>30.1f}")
        print(f"ratio ours / webdataset: {med['ours'] / med['webdataset']:.2f}x")
        if "ours-mix" in med:
            print(f"ratio ours-mix / ours (mixture of two sources vs one dataset): {med['ours-mix'] / med['ours']:.2f}x")
        if "ours-s3" in med:
            print(f"ratio ours-s3 / ours (loopback S3 vs local files): {med['ours-s3'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
