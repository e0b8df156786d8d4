"""Splits: from the layout, or group-aware by a column so that no group straddles two splits."""

from __future__ import annotations

import logging
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError
from .config import BuildConfig

log = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "val", "test")


def split_sort_key(name: str) -> tuple[int, str]:
    """train, val, test first, then any other split name alphabetically."""
    return (SPLIT_ORDER.index(name), "") if name in SPLIT_ORDER else (len(SPLIT_ORDER), name)


def assign_splits(names: list[str | None], layout_split: np.ndarray, groups: list[str], group: np.ndarray,
                  source_ids: pa.Array, config: BuildConfig) -> np.ndarray:
    """The split name of each record, as an object array. Deterministic for config.seed; independent of the
    records' input order.

    ``layout_split`` codes into ``names`` (-1: the layout names none); ``group`` codes into ``groups`` (the
    ``split_by`` values; -1: none, a group of its own, named by the record's id).
    """
    n = len(layout_split)
    if not config.split_by and not (config.val or config.test):
        table = np.array([*names, "train"], dtype=object)
        return table[layout_split]  # code -1 is the "train" at the end
    if (layout_split >= 0).any():
        log.info("split_by/val/test assign the splits: the splits the input names are not used")
    if config.split_by and n and (group < 0).all():
        raise ConfigError(f"split_by column {config.split_by!r} is absent from every record; "
                          "name a label or manifest column")
    # a group is a split_by value, or one record without one; named "group:VALUE" / "id:ID" and sorted so
    # that the assignment does not depend on the input order
    sizes = np.bincount(group[group >= 0], minlength=len(groups))
    present = {g for g, size in zip(groups, sizes.tolist()) if size}
    test_named = set(config.test_groups)
    unknown = sorted(test_named - present)
    if unknown:
        raise ConfigError(f"test_groups {unknown} do not occur in column {config.split_by!r}; "
                          f"known groups: {sorted(present)[:20]}")
    loners = np.flatnonzero(group < 0)
    named = sorted((f"group:{g}", i) for i, g in enumerate(groups) if sizes[i])
    # every record of a group goes where its group goes: one slot per group, then one per loner
    slot_names = [name for name, _ in named]
    lone_ids = source_ids.take(pa.array(loners)).to_pylist() if len(loners) else []
    slot_names += [f"id:{sid}" for sid in lone_ids]
    slot_sizes = [int(sizes[i]) for _, i in named] + [1] * len(loners)
    is_test = [name[6:] in test_named and name.startswith("group:") for name in slot_names]
    by_name = sorted(range(len(slot_names)), key=slot_names.__getitem__)
    rest = [s for s in by_name if not is_test[s]]
    rng = np.random.default_rng(config.seed)
    rest = [rest[i] for i in rng.permutation(len(rest))]
    assigned = ["test" if t else "train" for t in is_test]
    total = n
    # fill test (when no groups are named) then val, group by group, never emptying train
    for split, fraction in (("test", 0.0 if test_named else config.test), ("val", config.val)):
        target, taken = fraction * total, 0
        while fraction > 0 and len(rest) > 1 and taken < target:
            g = rest.pop(0)
            # stop before a group that would overshoot by more than it helps
            if taken > 0 and abs(taken + slot_sizes[g] - target) > abs(taken - target):
                rest.insert(0, g)
                break
            assigned[g] = split
            taken += slot_sizes[g]
    out = np.empty(n, dtype=object)
    group_split = np.array(["train"] * len(groups), dtype=object)
    for slot, (_, i) in enumerate(named):
        group_split[i] = assigned[slot]
    has = group >= 0
    out[has] = group_split[group[has]]
    out[loners] = np.array(assigned[len(named):], dtype=object)
    log.info("splits: %s", dict(sorted(Counter(out.tolist()).items(), key=lambda kv: split_sort_key(kv[0]))))
    return out


def shuffled(records: np.ndarray, keys: pa.Array, split: str, seed: int) -> np.ndarray:
    """The records of one split in a deterministic shuffled order (so each shard mixes labels): sorted by
    key, then permuted by (seed, split)."""
    ordered = records[pc.sort_indices(keys.take(pa.array(records))).to_numpy()]
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return ordered[rng.permutation(len(ordered))]
