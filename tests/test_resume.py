"""Exact resumption: after k batches, a fresh loader with the saved state yields batches k+1.. of the
uninterrupted run, key by key and value by value, with 0, 1 and 3 workers and across an epoch boundary.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_loader import write_dataset

from mmdata import ConfigError, make_loader, open_dataset
from mmdata.reader import ShardReader

KW = dict(batch_size=3, seed=11, modalities=["image", "text"], tasks=["digit"])


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return open_dataset(write_dataset(tmp_path_factory.mktemp("resume")))


def run(loader, epochs=2) -> list[tuple[list[str], torch.Tensor]]:
    out = []
    for _ in range(epochs):
        out += [(list(b.keys), b.image.sum(dim=(1, 2, 3))) for b in loader]
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(ta, tb) for (ka, ta), (kb, tb) in zip(a, b))


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on 2 cores, on purpose
@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_resume_mid_epoch_and_across_the_boundary(ds, num_workers):
    full = run(make_loader(ds, "train", num_workers=num_workers, **KW))
    n = len(full) // 2  # batches per epoch
    assert n == 8 and len({tuple(k) for k, _ in full[:n]}) == n
    assert [k for k, _ in full[:n]] != [k for k, _ in full[n:]]  # the second epoch has another order
    for k in (4, n, n + 2) if num_workers != 1 else (5, n + 1):
        first = make_loader(ds, "train", num_workers=num_workers, **KW)
        head = list(itertools.islice(((list(b.keys), b.image.sum(dim=(1, 2, 3))) for b in first), k)) if k <= n \
            else run(first, 1) + list(itertools.islice(((list(b.keys), b.image.sum(dim=(1, 2, 3))) for b in first),
                                                        k - n))
        state = first.state_dict()
        assert same(head, full[:k])
        fresh = make_loader(ds, "train", num_workers=num_workers, **KW)
        fresh.load_state_dict(state)
        fresh.set_epoch(state["epoch"])  # what a training loop does at the top of an epoch: keeps the position
        rest = run(fresh, 1) + (run(fresh, 1) if k < n else [])
        assert same(rest, full[k:]), f"resumed at batch {k}"


def test_resume_reads_only_what_is_left(ds, monkeypatch):
    reads = []
    orig = ShardReader.read_range

    def spy(self, shard, start, length):
        reads.append(length)
        return orig(self, shard, start, length)

    monkeypatch.setattr(ShardReader, "read_range", spy)
    first = make_loader(ds, "train", **KW)
    keys = [list(b.keys) for b in itertools.islice(iter(first), 5)]
    fresh = make_loader(ds, "train", **KW)
    fresh.load_state_dict(first.state_dict())
    reads.clear()
    left = {k for b in fresh for k in b.keys}
    assert not left & {k for b in keys for k in b}
    idx = ds.split_index("train")
    sizes = {str(k): int(s) for k, s in zip(idx.keys, idx.size)}
    assert sum(reads) == sum(sizes[k] for k in left)  # no byte of a consumed sample is read again


def test_state_from_other_arguments_is_refused(ds):
    state = make_loader(ds, "train", **KW).state_dict()
    other = make_loader(ds, "train", **{**KW, "batch_size": 4})
    with pytest.raises(ConfigError, match="batch_size"):
        other.load_state_dict(state)


def test_breaking_out_and_iterating_again_restarts_the_epoch(ds):
    """As with a DataLoader: a new iter() starts the epoch again; only a loaded state continues mid-epoch."""
    loader = make_loader(ds, "train", **KW)
    whole = [list(b.keys) for b in make_loader(ds, "train", **KW)]
    head = [list(b.keys) for b in itertools.islice(iter(loader), 3)]
    assert head == whole[:3]
    assert [list(b.keys) for b in loader] == whole
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches"] == 0
