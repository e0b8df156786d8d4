"""Samples/s of make_loader on local files vs the same dataset on a loopback S3 server (moto), with and without cache.

  local     the dataset in a local folder (pread at index offsets)
  s3        the same bytes under s3://bench/ds on a moto server on 127.0.0.1 (ranged GETs through s3fs)
  s3+cache  the same, with open_dataset(cache_dir=...): the first run downloads whole shards, later
            runs read the local copies (the figure is the median over runs, so mostly the warm cache)

The dataset is built once from ``--source`` (default: the repo's sample_data, 200 records) and uploaded
card-last with mmdata.storage.publish. Each figure is the median of --runs full epochs (runs alternated,
one warm-up epoch each first); the ratio is against local. moto is a Python server in this process's
threads, so the S3 rows measure the request path (HTTP, s3fs, retries), not a real network.

    python tools/bench_s3.py                       # ~1 min on 2 cores
    python tools/bench_s3.py --workers 2 --runs 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server():
    """A moto S3 server on 127.0.0.1 with bucket ``bench``; returns (server, fsspec storage options)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client_kwargs = {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}
    boto3.client("s3", aws_access_key_id="bench", aws_secret_access_key="bench",
                 **client_kwargs).create_bucket(Bucket="bench")
    return server, {"key": "bench", "secret": "bench", "client_kwargs": client_kwargs}


def epoch(ds, split: str, batch: int, workers: int) -> int:
    from mmdata import LoaderConfig, make_loader

    cfg = LoaderConfig(audio_seconds=0.5, pin_memory=False)
    loader = make_loader(ds, split, batch_size=batch, num_workers=workers, modalities=["image", "audio"],
                         config=cfg)
    return sum(len(b) for b in loader)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(ROOT / "sample_data"), help="raw folder or manifest to build")
    p.add_argument("--shard-samples", type=int, default=25, help="samples per shard (default 25)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    from mmdata import open_dataset
    from mmdata.build import BuildConfig, build_dataset
    from mmdata.storage import Storage, publish

    server, opts = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ds"
            build_dataset(args.source, out, BuildConfig(max_samples=args.shard_samples), progress=False)
            publish(out, Storage("s3://bench/ds", opts))
            rows = {
                "local": open_dataset(out),
                "s3": open_dataset("s3://bench/ds", storage_options=opts),
                "s3+cache": open_dataset("s3://bench/ds", storage_options=opts, cache_dir=Path(tmp) / "cache",
                                         cache_bytes=1 << 30),
            }
            split = "train" if "train" in rows["local"].splits else rows["local"].splits[0]
            times: dict[str, list[float]] = {k: [] for k in rows}
            counts = {}
            for r in range(args.runs + 1):  # run 0 warms imports, page cache and the shard cache
                for name, ds in rows.items():
                    t0 = time.perf_counter()
                    counts[name] = epoch(ds, split, args.batch_size, args.workers)
                    if r:
                        times[name].append(time.perf_counter() - t0)
    finally:
        server.stop()
    base = counts["local"] / statistics.median(times["local"])
    print(f"split {split!r}: {counts['local']} samples, batch {args.batch_size}, {args.workers} workers, "
          f"median of {args.runs} epochs")
    print(f"{'source':10s} {'samples/s':>10s} {'vs local':>9s}")
    for name in rows:
        rate = counts[name] / statistics.median(times[name])
        print(f"{name:10s} {rate:10.0f} {rate / base:8.2f}x")


if __name__ == "__main__":
    main()
