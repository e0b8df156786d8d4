"""Peak memory of `mmdata build` as the input grows: webdataset shards of 30 MB vs 300 MB, one 20 MB text.

Each build runs in its own process and reports its peak resident set (VmHWM); the figure that counts is
the difference between the small and the large input, measured in the same run.

    python tools/bench_build_memory.py   # 30 MB vs 300 MB of shards, a 22 MB text, a .tgz with a 1 GiB member
    python tools/bench_build_memory.py --small 10 --large 100 --runs 3
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

PEAK = """
import sys
from mmdata.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    print(next(line.split()[1] for line in f if line.startswith("VmHWM:")), file=sys.stderr)
sys.exit(code)
"""


def make_shards(folder: Path, megabytes: int, shard_mb: int = 50) -> int:
    """PNG noise images (~200 kB each) with a .cls and an img2dataset-style .json, in tars of ``shard_mb``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    n = megabytes * 2**20 // len(png)
    tar, written, index = None, 0, 0
    for i in range(n):
        if tar is None or written > shard_mb * 2**20:
            if tar is not None:
                tar.close()
            tar, written, index = tarfile.open(folder / f"{index:05d}.tar", "w"), 0, index + 1
        meta = json.dumps({"url": f"https://example.com/{i}.png", "label": i % 10}).encode()
        for ext, data in (("png", png), ("cls", str(i % 10).encode()), ("json", meta)):
            info = tarfile.TarInfo(f"{i:08d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            written += len(data) + 512
    tar.close()
    return n


def peak_kib(args: list[str]) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"build failed: {done.stderr[-2000:]}")
    return int(done.stderr.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=30, help="MB of shards of the small input (default 30)")
    p.add_argument("--large", type=int, default=300, help="MB of shards of the large input (default 300)")
    p.add_argument("--runs", type=int, default=3, help="builds of each input; the median counts (default 3)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        work = Path(tmp)
        peaks = {}
        for name, mb in (("small", args.small), ("large", args.large)):
            n = make_shards(work / name, mb)
            runs = [peak_kib(["build", str(work / name), str(work / f"out-{name}"), "--overwrite", "-q",
                              "--workers", "2", "--set", "tokenizer_vocab=0"]) for _ in range(args.runs)]
            peaks[name] = statistics.median(runs) / 1024
            print(f"webdataset layout, {mb} MB of shards ({n} samples): peak RSS {peaks[name]:.0f} MB "
                  f"(runs: {', '.join(f'{r / 1024:.0f}' for r in runs)})")
        print(f"growth from {args.small} MB to {args.large} MB of input: {peaks['large'] - peaks['small']:+.0f} MB")
        raw = work / "text" / "s0"
        raw.mkdir(parents=True)
        (raw / "text.txt").write_text(" ".join(f"w{i % 5000}x" for i in range(4_000_000)))  # 22 MB
        (raw / "labels.json").write_text('{"digit": 1}')
        kib = peak_kib(["build", str(work / "text"), str(work / "out-text"), "-q", "--workers", "1"])
        print(f"one 22 MB text (tokenizer on the default 50 MB sample): peak RSS {kib / 1024:.0f} MB")
        (work / "tgz").mkdir()
        with tarfile.open(work / "tgz" / "huge.tgz", "w:gz", compresslevel=1) as tar:
            for name, size in (("big.png", 2**30), ("small.png", 0)):
                info = tarfile.TarInfo(name)
                info.size = size
                tar.addfile(info, _Zeros(size) if size else None)
            info = tarfile.TarInfo("ok.png")
            info.size = len(buf_png := _png())
            tar.addfile(info, io.BytesIO(buf_png))
        kib = peak_kib(["build", str(work / "tgz"), str(work / "out-tgz"), "-q", "--workers", "1",
                        "--set", "max_reject_fraction=1"])
        rejects = (work / "out-tgz" / "rejects.jsonl").read_text().splitlines()
        print(f".tgz of {(work / 'tgz' / 'huge.tgz').stat().st_size / 2**20:.1f} MB holding a 1 GiB member: peak RSS "
              f"{kib / 1024:.0f} MB; rejects: {[json.loads(r)['reason'] for r in rejects]}")


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, read in pieces: a 1 GiB member without 1 GiB in memory."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
