"""Splits: from the layout, or group-aware by a column so that no group straddles two splits."""

from __future__ import annotations

import logging
import zlib
from collections import Counter

import numpy as np

from ..errors import ConfigError
from .align import Record
from .config import BuildConfig

log = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "val", "test")


def split_sort_key(name: str) -> tuple[int, str]:
    """train, val, test first, then any other split name alphabetically."""
    return (SPLIT_ORDER.index(name), "") if name in SPLIT_ORDER else (len(SPLIT_ORDER), name)


def assign_splits(records: list[Record], config: BuildConfig) -> dict[str, str]:
    """Return {key: split}. Deterministic for config.seed; independent of the records' input order."""
    if not config.split_by and not (config.val or config.test):
        return {r.key: r.split or "train" for r in records}
    if any(r.split for r in records):
        log.info("split_by/val/test assign the splits: the splits the input names are not used")
    # a record without a group value is a group of its own
    groups = {r.key: (f"group:{r.group}" if r.group is not None else f"id:{r.source_id}") for r in records}
    if config.split_by and all(r.group is None for r in records) and records:
        raise ConfigError(f"split_by column {config.split_by!r} is absent from every record; "
                          "name a label or manifest column")
    sizes = Counter(groups.values())
    test_named = {f"group:{g}" for g in config.test_groups}
    unknown = sorted(g[6:] for g in test_named - set(sizes))
    if unknown:
        raise ConfigError(f"test_groups {unknown} do not occur in column {config.split_by!r}; "
                          f"known groups: {sorted(g[6:] for g in sizes if g.startswith('group:'))[:20]}")
    total = sum(sizes.values())
    rng = np.random.default_rng(config.seed)
    rest = sorted(g for g in sizes if g not in test_named)
    rest = [rest[i] for i in rng.permutation(len(rest))]
    assigned = dict.fromkeys(test_named, "test")
    # fill test (when no groups are named) then val, group by group, never emptying train
    for split, fraction in (("test", 0.0 if test_named else config.test), ("val", config.val)):
        target, taken = fraction * total, 0
        while fraction > 0 and len(rest) > 1 and taken < target:
            g = rest.pop(0)
            # stop before a group that would overshoot by more than it helps
            if taken > 0 and abs(taken + sizes[g] - target) > abs(taken - target):
                rest.insert(0, g)
                break
            assigned[g] = split
            taken += sizes[g]
    for g in rest:
        assigned[g] = "train"
    out = {key: assigned[g] for key, g in groups.items()}
    log.info("splits: %s", dict(sorted(Counter(out.values()).items(), key=lambda kv: split_sort_key(kv[0]))))
    return out


def shuffled(keys: list[str], split: str, seed: int) -> list[str]:
    """The keys of one split in a deterministic shuffled order (so each shard mixes labels)."""
    ordered = sorted(keys)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return [ordered[i] for i in rng.permutation(len(ordered))]
