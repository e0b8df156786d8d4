"""Benchmark `mmdata build` against `tar -cf` of the same raw folder: samples/s, MB/s and the ratio.

    python tools/bench_build.py --runs 3       # --source defaults to ../shared/data/avmnist-dev beside the repo

Five timings, each the median of --runs runs after one warm-up (page cache warm for all):
  tar        `tar -cf OUT.tar -C SOURCE .`
  pack-only  mmdata build keeping image and WAV bytes (audio_format=wav at the native rate), no tokenizer
  flac-16k   mmdata build re-encoding audio to FLAC resampled to 16 kHz (plus the tokenizer)
  1-proc floor  the least a build must do per sample, in one fused loop in this process: list the
             folder, read its files, parse labels.json, check the PNG and WAV, NFC the text, make the
             tar members (no label checks, splits, shuffle, writing, hashing or index). What any
             one-process design pays before the rest of its work.
  ShardWriter loop  a plain loop over the folders writing webdataset.ShardWriter shards: what a user
             writes instead of a build tool (it checks nothing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmdata.build import BuildConfig, build_dataset  # noqa: E402
from mmdata.build.catalog import SAMPLE_JSON  # noqa: E402
from mmdata.build.discover import modality_of_ext  # noqa: E402
from mmdata.build.guard import read_file  # noqa: E402
from mmdata.build.media import plain_png_size, wav_format  # noqa: E402
from mmdata.format import sample_block  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "avmnist-dev"


def time_runs(fn, runs: int) -> list[float]:
    fn()  # warm-up: page cache, imports, pool start
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def floor_pass(source: Path) -> int:
    """The per-sample minimum of a build over a folders layout, in one loop; returns the samples packed."""
    with os.scandir(source) as it:
        folders = sorted((e for e in it if e.is_dir()), key=lambda e: e.name)
    packed = 0
    for d in folders:
        with os.scandir(d.path) as it:
            names = sorted(e.name for e in it)
        members, labels = {}, None
        for name in names:
            data = read_file(f"{d.path}/{name}")
            if name == "labels.json":
                labels = json.loads(data)
                continue
            ext = name.rpartition(".")[2].lower()
            modality = modality_of_ext(ext)
            if modality == "image":
                plain_png_size(data, 64_000_000)
            elif modality == "audio":
                wav_format(data)
            elif modality == "text":
                data = unicodedata.normalize("NFC", data.decode("utf-8")).encode("utf-8")
            members[ext] = data
        members["json"] = SAMPLE_JSON.encode({"id": d.name, "labels": labels}).encode("utf-8")
        packed += bool(sample_block(d.name, members))
    return packed


def shardwriter_loop(source: Path, out: Path) -> int:
    """What a user writes instead of a build tool: a loop over the folders into webdataset.ShardWriter
    shards of 1,000 samples (no checks, no splits, no shuffle, no index); returns the samples written."""
    import webdataset as wds

    out.mkdir(exist_ok=True)
    written = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for d in sorted(p for p in source.iterdir() if p.is_dir()):
            sample = {"__key__": d.name}
            for f in d.iterdir():
                sample["json" if f.name == "labels.json" else f.suffix[1:].lower()] = f.read_bytes()
            sink.write(sample)
            written += 1
    return written


def folder_bytes(source: Path) -> int:
    return sum(p.stat().st_size for p in source.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=DEFAULT_SOURCE, help="raw folder (folders layout) to build")
    p.add_argument("--runs", type=int, default=3, help="timed runs per method (median reported)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="build worker processes")
    args = p.parse_args(argv)
    source = Path(args.source)
    if not source.is_dir():
        print(f"bench_build: source {source} is not a folder; pass --source", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        def tar():
            subprocess.run(["tar", "-cf", str(tmp / "raw.tar"), "-C", str(source), "."], check=True)

        def build(config: BuildConfig, name: str):
            def run():
                return build_dataset(source, tmp / name, config, overwrite=True, progress=False)
            return run

        pack = BuildConfig(audio_format="wav", tokenizer_vocab=0, workers=args.workers)
        flac = BuildConfig(audio_format="flac", sample_rate=16000, workers=args.workers)
        card = build(pack, "pack")()
        samples, in_mb = card.counts["written"], folder_bytes(source) / 1e6
        results = {"tar -cf": time_runs(tar, args.runs),
                   "pack-only": time_runs(build(pack, "pack"), args.runs),
                   "flac-16k": time_runs(build(flac, "flac"), args.runs),
                   "1-proc floor": time_runs(lambda: floor_pass(source), args.runs),
                   "ShardWriter loop": time_runs(lambda: shardwriter_loop(source, tmp / "wds"), args.runs)}
        base = statistics.median(results["tar -cf"])
        print(f"source {source}: {samples} samples, {in_mb:.1f} MB, {args.workers} workers, "
              f"median of {args.runs} runs")
        floor, loop = statistics.median(results["1-proc floor"]), statistics.median(results["ShardWriter loop"])
        print(f"{'method':<16} {'seconds':>8} {'samples/s':>10} {'MB/s':>8} {'x tar':>6} {'x floor':>8} {'x loop':>7}")
        for name, times in results.items():
            t = statistics.median(times)
            print(f"{name:<16} {t:8.3f} {samples / t:10.0f} {in_mb / t:8.1f} {t / base:6.2f} {t / floor:8.2f} "
                  f"{t / loop:7.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
