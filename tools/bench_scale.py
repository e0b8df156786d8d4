"""How a build and the loader grow with the number of records: seconds and peak memory per size.

    python tools/bench_scale.py                          # text-only and media, 10k / 100k / 1M records
    python tools/bench_scale.py --sizes 10000 100000 --kinds text

For each kind and size it writes synthetic records (``text``: a JSONL manifest, one short text and two
labels per record; ``media``: a JSONL manifest of tiny 8x8 PNGs and 0.1 s WAVs, one file of each per
record, plus the two labels), builds them in a fresh process (``mmdata build``; the tokenizer on), and
reads the peak resident memory of that process from the kernel (``ru_maxrss`` of the child). Then, in
another fresh process, it opens the dataset with ``make_loader`` and draws the first batch. Printed per
size: build seconds and peak RSS, the marginal bytes per record between consecutive sizes, open+plan
and first-batch seconds and that process's RSS beyond its imports.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("zero one two three four five six seven eight nine ten eleven twelve red green blue small large "
         "quick slow bright dark").split()

OPEN = """
import resource, sys, time
t0 = time.perf_counter()
from mmdata import make_loader, open_dataset
import torch  # noqa: F401
try:
    import pandas  # noqa: F401  pyarrow imports it on its first array from Python objects: an import, not work
except ImportError:
    pass
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
loader = make_loader(open_dataset(sys.argv[1]), "train", batch_size=64, num_workers=0, seed=0)
t2 = time.perf_counter()
batch = next(iter(loader))
t3 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{t2 - t1:.3f} {t3 - t2:.3f} {(peak - base) * 1024} {t1 - t0:.3f} {len(batch)}")
"""


def write_text_records(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = " ".join(WORDS[(i * k + k) % len(WORDS)] for k in range(1, 7))
            f.write(json.dumps({"id": f"r{i:07d}", "text": text, "digit": i % 10, "colour": WORDS[13 + i % 3]}))
            f.write("\n")
    return path


def write_media_records(folder: Path, n: int) -> Path:
    import numpy as np
    import soundfile as sf
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    png, wav = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(png, format="PNG")
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    (folder / "media").mkdir(exist_ok=True)
    path = folder / "manifest.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            sub = folder / "media" / f"{i // 1000:04d}"
            if i % 1000 == 0:
                sub.mkdir(exist_ok=True)
            (sub / f"{i}.png").write_bytes(png.getvalue())
            (sub / f"{i}.wav").write_bytes(wav.getvalue())
            rel = f"media/{i // 1000:04d}/{i}"
            f.write(json.dumps({"id": f"r{i:07d}", "image": rel + ".png", "audio": rel + ".wav", "digit": i % 10,
                                "colour": WORDS[13 + i % 3]}) + "\n")
    return path


BUILD = """
import resource, sys
from mmdata.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
sys.exit(code)
"""


def run(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd``; return its seconds and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--kinds", nargs="+", default=["text", "media"], choices=["text", "media"])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--keep", help="keep the generated data and datasets in this folder")
    args = p.parse_args(argv)
    sizes = sorted(args.sizes)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_scale_"))
    print(f"machine: {os.cpu_count()} CPUs; workers {args.workers}; sizes {sizes}")
    print(f"{'kind':<6} {'records':>9} {'build s':>8} {'build RSS MB':>13} {'B/record':>9} {'open+plan s':>12} "
          f"{'1st batch s':>12} {'loader RSS MB':>14}")
    try:
        for kind in args.kinds:
            last: tuple[int, int] | None = None
            for n in sizes:
                src = (write_text_records if kind == "text" else write_media_records)(tmp / f"{kind}-{n}", n)
                out = tmp / f"{kind}-{n}-ds"
                # a fresh interpreter per build, so its peak is its own (ru_maxrss of children only rises:
                # sizes run from small to large)
                secs, said = run([sys.executable, "-c", BUILD, "build", str(src), str(out), "--overwrite",
                                  "--no-progress", "-q", "--workers", str(args.workers)])
                peak = int(said.split()[-1])
                marginal = "" if last is None else f"{(peak - last[1]) / (n - last[0]):.0f}"
                last = (n, peak)
                _, opened = run([sys.executable, "-c", OPEN, str(out)])
                plan, first, loader_rss, _, _ = opened.split()
                print(f"{kind:<6} {n:>9,} {secs:8.1f} {peak / 1e6:13.0f} {marginal:>9} {float(plan):12.3f} "
                      f"{float(first):12.3f} {int(loader_rss) / 1e6:14.0f}", flush=True)
                if not args.keep:
                    shutil.rmtree(tmp / f"{kind}-{n}", ignore_errors=True)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
