"""Build a sharded multimodal dataset from raw folders, stems + a label table, a manifest or tar shards."""

from __future__ import annotations

import argparse
import time

from .config import BuildConfig
from .discover import LAYOUTS

# CLI flag -> config key; a flag overrides --config and --set only when given
FLAG_KEYS = {"split_by": "split_by", "val": "val", "test": "test", "seed": "seed", "max_samples": "max_samples",
             "max_bytes": "max_bytes", "workers": "workers"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="raw folder, manifest file (CSV/JSONL/Parquet), or tar shards (folder/glob/brace)")
    p.add_argument("out", help="output folder or fsspec URL (s3://bucket/ds) for shards, dataset.json, "
                   "index.parquet and rejects.jsonl")
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="input layout (default: detect)")
    p.add_argument("--config", metavar="FILE.yaml", help="build config (tasks, limits, encoding)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set audio_format=wav (repeatable)")
    p.add_argument("--split-by", metavar="COLUMN", help="make splits so that no value of COLUMN straddles two")
    p.add_argument("--val", type=float, help="fraction of samples (whole groups) for val")
    p.add_argument("--test", type=float, help="fraction of samples (whole groups) for test")
    p.add_argument("--test-groups", metavar="A,B", help="groups of --split-by that make up the test split")
    p.add_argument("--seed", type=int, help="seed of the split assignment and shard shuffle (default 0)")
    p.add_argument("--max-samples", type=int, help="samples per shard at most (default 1000)")
    p.add_argument("--max-bytes", type=int, help="bytes per shard at most (default 256 MiB)")
    p.add_argument("--workers", type=int, help="encoding processes (default: CPU count)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build, keeping finished shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="run the encoding in a local process pool (default) or as Ray tasks, one per shard")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join, e.g. auto or ray://head:10001 "
                   "(default: start a local Ray)")
    p.add_argument("--storage-options", metavar="JSON", type=_json_object, default=None,
                   help='fsspec options for URL source/out, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'')


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--storage-options must be a JSON object, got {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--storage-options must be a JSON object, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The build config: --config file, then --set overrides, then explicit flags."""
    config = BuildConfig.from_yaml(args.config) if args.config else BuildConfig()
    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    if args.test_groups:
        overrides["test_groups"] = [g.strip() for g in args.test_groups.split(",") if g.strip()]
    if args.set:
        config = config.with_overrides(args.set)
    return config.with_overrides(overrides) if overrides else config


def run(args: argparse.Namespace) -> int:
    from .runner import build_dataset

    config = config_from_args(args)
    t0 = time.perf_counter()
    card = build_dataset(args.source, args.out, config, layout=args.layout, overwrite=args.overwrite,
                         progress=not args.no_progress, resume=args.resume,
                         executor=args.executor, ray_address=args.ray_address, storage_options=args.storage_options)
    seconds = time.perf_counter() - t0
    counts = card.counts
    rejected = sum(counts["rejected"].values())
    shards = sum(len(s.shards) for s in card.splits.values())
    nbytes = sum(s.num_bytes for s in card.splits.values())
    print(f"built {args.out}: {counts['written']} written, {rejected} rejected of {counts['input']} "
          f"records; {shards} shards, {nbytes / 1e6:.1f} MB in {seconds:.1f} s")
    for name, info in card.splits.items():
        print(f"  {name}: {info.num_samples} samples in {len(info.shards)} shards")
    for reason, n in counts["rejected"].items():
        print(f"  rejected {reason}: {n}")
    if counts["input"] and rejected / counts["input"] > config.max_reject_fraction:
        print(f"mmdata build: {rejected / counts['input']:.1%} of the records were rejected, more than "
              f"max_reject_fraction {config.max_reject_fraction:.1%}; see {args.out.rstrip('/')}/rejects.jsonl")
        return 1
    return 0
