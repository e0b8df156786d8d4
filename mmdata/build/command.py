"""Build a sharded multimodal dataset from raw folders, stems + a label table, a manifest or tar shards."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..cli import add_storage_options
from ..errors import RejectThresholdError
from .config import BuildConfig, config_keys_help
from .discover import LAYOUTS

# CLI flag -> config key; a flag overrides --config and --set only when given
FLAG_KEYS = {"split_by": "split_by", "val": "val", "test": "test", "seed": "seed", "max_samples": "max_samples",
             "max_bytes": "max_bytes", "workers": "workers"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the config key list's layout
    p.epilog = config_keys_help()
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
    p.add_argument("--json", action="store_true", help="print the summary as JSON (written, rejected by reason, "
                   "shards, bytes, seconds, splits, tasks with their missing labels) on stdout")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="run the encoding in a local process pool (default) or as Ray tasks, one per shard")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join, e.g. auto or ray://head:10001 "
                   "(default: start a local Ray)")
    add_storage_options(p, "URL source and out")


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
    status, error = 0, None
    try:
        card = build_dataset(args.source, args.out, config, layout=args.layout, overwrite=args.overwrite,
                             progress=not (args.no_progress or args.quiet), resume=args.resume,
                             executor=args.executor, ray_address=args.ray_address,
                             storage_options=args.storage_options)
    except RejectThresholdError as e:  # the dataset is written: report it, then fail
        card, status, error = e.card, e.exit_code, e
    summary = build_summary(card, args.out, time.perf_counter() - t0)
    if args.json:
        print(json.dumps({**summary, "ok": error is None, "error": str(error) if error else None}, indent=2))
    elif not args.quiet:
        print(format_summary(summary))
    if error is not None:
        print(f"mmdata build: error: {error}", file=sys.stderr)
    return status


def build_summary(card, out: str, seconds: float) -> dict:
    """What a build wrote, as plain JSON values."""
    counts = card.counts
    return {
        "out": str(out), "input": counts["input"], "written": counts["written"],
        "rejected": {"total": sum(counts["rejected"].values()), "by_reason": dict(counts["rejected"])},
        "shards": sum(len(s.shards) for s in card.splits.values()),
        "bytes": sum(s.num_bytes for s in card.splits.values()), "seconds": round(seconds, 3),
        "splits": {name: {"samples": s.num_samples, "shards": len(s.shards)} for name, s in card.splits.items()},
        "tasks": {t.name: {"type": t.type, "classes": len(t.classes),
                           "missing": sum(s.label_counts.get(t.name, {}).get("missing", 0)
                                          for s in card.splits.values())} for t in card.tasks},
    }


def format_summary(s: dict) -> str:
    lines = [f"built {s['out']}: {s['written']} written, {s['rejected']['total']} rejected of {s['input']} "
             f"records; {s['shards']} shards, {s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s"]
    lines += [f"  {name}: {v['samples']} samples in {v['shards']} shards" for name, v in s["splits"].items()]
    lines += [f"  task {name} ({t['type']}" + (f", {t['classes']} classes" if t["classes"] else "") + ")"
              + (f": label missing in {t['missing']} of {s['written']} samples" if t["missing"] else "")
              for name, t in s["tasks"].items()]
    lines += [f"  rejected {reason}: {n}" for reason, n in s["rejected"]["by_reason"].items()]
    return "\n".join(lines)
