"""The epoch plan as a pure function: built with World objects directly, no processes.

A rank's batch sequence is simulated as the DataLoader makes it: a round robin over its workers.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from mmdata.errors import ConfigError
from mmdata.order import PlanConfig, World, batches_per_rank, emission_order, plan, worker_generator

SHARDS = {1: [23], 3: [9, 2, 12], 8: [3, 1, 5, 2, 4, 3, 1, 4]}  # uneven; 23 samples each


def rank_batches(sizes, epoch, rank, world_size, num_workers, cfg) -> list[list[int]]:
    """The rank's batches in yield order: the round robin over its workers' plans."""
    W = max(1, num_workers)
    per_worker = [plan(sizes, epoch, World(rank, world_size, w, num_workers), cfg) for w in range(W)]
    out = []
    for i in range(max(len(p) for p in per_worker)):
        out.extend(p[i].tolist() for p in per_worker if i < len(p))
    return out


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("num_workers", [0, 1, 3])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shards", sorted(SHARDS))
def test_cover_equal_batches_and_padding(shards, world_size, num_workers, drop_last):
    sizes, B = SHARDS[shards], 4
    cfg = PlanConfig(batch_size=B, seed=7, drop_last=drop_last, shuffle_buffer=5)
    ranks = [rank_batches(sizes, 2, r, world_size, num_workers, cfg) for r in range(world_size)]
    expected = batches_per_rank(23, world_size, cfg)
    assert [len(r) for r in ranks] == [expected] * world_size
    for batches in ranks:  # full batches, the rank's last one alone may be short
        assert all(len(b) == B for b in batches[:-1]) and (not batches or 0 < len(batches[-1]) <= B)
    seen = Counter(s for r in ranks for b in r for s in b)
    if drop_last:
        assert max(seen.values()) == 1 and sum(seen.values()) == world_size * (23 // world_size // B * B)
    else:
        assert set(seen) == set(range(23))
        assert sum(seen.values()) - 23 == -(-23 // world_size) * world_size - 23 < world_size  # only padding


@pytest.mark.parametrize("num_workers", [0, 3])
def test_same_seed_and_epoch_same_order_else_another(num_workers):
    sizes = SHARDS[8]

    def order(epoch, seed=0):
        cfg = PlanConfig(batch_size=4, seed=seed)
        return [rank_batches(sizes, epoch, r, 2, num_workers, cfg) for r in range(2)]

    assert order(3) == order(3)
    assert order(3) != order(4) and order(3, seed=1) != order(3)
    flat = [s for r in order(3) for b in r for s in b]
    assert flat != sorted(flat)


def test_fewer_shards_than_slots_split_a_shard_by_samples():
    cfg = PlanConfig(batch_size=2, shuffle=False)
    slots = [plan([10], 0, World(r, 2, w, 2), cfg) for r, w in itertools.product(range(2), range(2))]
    got = [np.concatenate(p).tolist() for p in slots]
    assert got == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]  # rank r: batches j -> worker j % 2


def test_unshuffled_single_worker_reads_in_file_order():
    cfg = PlanConfig(batch_size=3, shuffle=False)
    assert [b.tolist() for b in plan([4, 3], 9, World(), cfg)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_buffer_shuffle_is_a_permutation_with_distinct_slot_generators():
    cfg = PlanConfig(batch_size=1, shuffle_buffer=8)
    orders = [emission_order(50, 0, World(r, 2, w, 2), cfg) for r in range(2) for w in range(2)]
    assert all(sorted(o.tolist()) == list(range(50)) for o in orders)
    assert len({tuple(o.tolist()) for o in orders}) == 4
    draws = {worker_generator(0, e, World(r, 2, w, 2)).integers(1 << 62) for e in (0, 1) for r in (0, 1)
             for w in (0, 1)}
    assert len(draws) == 8


def test_buffer_bounds_how_far_a_sample_moves_ahead():
    cfg = PlanConfig(batch_size=1, shuffle_buffer=4)
    order = emission_order(100, 0, World(), cfg)
    # a position can only be emitted once it entered the buffer: it is read at most 4 places ahead
    assert all(pos <= i + 4 for i, pos in enumerate(order.tolist()))


def test_bad_world_is_refused_with_the_value():
    with pytest.raises(ConfigError, match="rank must be in"):
        World(rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size must be positive, got 0"):
        PlanConfig(batch_size=0)


def test_tiny_split_pads_every_rank():
    cfg = PlanConfig(batch_size=4)
    ranks = [rank_batches([2], 0, r, 3, 0, cfg) for r in range(3)]
    assert [len(r) for r in ranks] == [1, 1, 1]
    assert sorted(s for r in ranks for b in r for s in b) == [0, 0, 1]


@pytest.mark.parametrize("weights", [(1, 1), (1, 2, 0, 7), (3, 1000, 5)])
def test_mixture_counts_sum_to_the_epoch_and_track_the_weights_exactly(weights):
    from fractions import Fraction

    from mmdata.order import Blend, blend_counts, blend_taken

    total = sum(weights)
    shares = tuple(Fraction(w, total) for w in weights)
    blend = Blend(tuple((5,) if w else () for w in weights), shares, 337)
    for epoch in range(60):
        counts = blend_counts(blend, epoch)
        assert counts.sum() == 337 and counts.min() >= 0 and all(c == 0 for c, w in zip(counts, weights) if not w)
        taken = blend_taken(blend, epoch)  # long run: within one sample of epoch * K * share, in exact rationals
        assert all(abs(t - epoch * 337 * s) < 1 for t, s in zip(taken.tolist(), shares))
    with pytest.raises(ConfigError, match="less than one sample"):
        Blend(((5,), (5,)), (Fraction(1, 1000), Fraction(999, 1000)), 337)
