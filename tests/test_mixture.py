"""Mixture: two tiny datasets with different tasks and modalities read as one stream.

``images`` (key ``iNNNN``): an 8x8 PNG of grey level i, ``digit`` (classes 0-4, missing when i % 7 == 3)
and ``parity``. ``speech`` (key ``sNNNN``): a 400-sample WAV of constant (i + 1) / 1000 at 8 kHz,
``digit`` with classes ("4", "3", "5", "6") and ``speaker`` (missing when i % 5 == 2). United, ``digit``
has classes 0-6 and speech's class c is stored as index c of its own list.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdata import ConfigError, CorruptShardError, LoaderConfig, Mixture, make_loader, open_dataset
from mmdata.build.assemble import ShardFile
from mmdata.card import LABEL_PREFIX, Card, SplitInfo
from mmdata.format import CARD_NAME, INDEX_NAME, shard_name
from mmdata.order import (
    Blend,
    PlanConfig,
    World,
    batches_per_rank,
    blend_counts,
    blend_plan,
    blend_stream,
)
from mmdata.tasks import Task, TaskList

SPEECH_DIGITS = ("4", "3", "5", "6")
DIGIT = Task("digit", "classification", tuple("01234"))
PARITY = Task("parity", "classification", ("even", "odd"))
SPEAKER = Task("speaker", "classification", ("ann", "bob"))


def image_labels(i):
    return {"digit": None if i % 7 == 3 else i % 5, "parity": i % 2}


def speech_labels(i):
    return {"digit": i % 4, "speaker": None if i % 5 == 2 else i % 2}


def write_source(root, prefix: str, splits: dict[str, int], tasks: tuple[Task, ...], labels, *, shard: int = 7,
                 image: int | None = None, rate: int | None = None, text: str | None = None) -> str:
    """A dataset of ``splits`` {split: samples}, written directly: shards, card and index (no build step)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rows, infos, i = [], {}, 0
    for split, n in splits.items():
        infos[split] = []
        for s, start in enumerate(range(0, n, shard)):
            name = shard_name(split, s)
            w = ShardFile(name, Path(root) / name)
            for _ in range(start, min(n, start + shard)):
                m = {"json": json.dumps({"id": f"{prefix}{i}", "labels": labels(i)}).encode()}
                if image:
                    buf = io.BytesIO()
                    Image.new("RGB", (image, image), (i % 256,) * 3).save(buf, format="PNG")
                    m["png"] = buf.getvalue()
                if rate:
                    buf = io.BytesIO()
                    sf.write(buf, np.full(400, (i + 1) / 1000, dtype=np.float32), rate, format="WAV",
                             subtype="FLOAT")
                    m["wav"] = buf.getvalue()
                if text:
                    m["txt"] = f"{text} {i}".encode()
                key = f"{prefix}{i:04d}"
                off, size = w.write_sample(key, m)
                rows.append({"key": key, "split": split, "shard": name, "offset": off, "size": size,
                             "image_width": image, "image_height": image,
                             "audio_seconds": 400 / rate if rate else None, "source_id": f"{prefix}{i}",
                             **{LABEL_PREFIX + t: v for t, v in labels(i).items()}})
                i += 1
            infos[split].append(w.finish())
    modalities = {}
    if image:
        modalities["image"] = {"formats": ["png"]}
    if rate:
        modalities["audio"] = {"sample_rate": rate, "channels": 1, "format": "wav"}
    if text:
        from mmdata.format import TOKENIZER_DIR
        from mmdata.tokenizer import save_tokenizer, train_tokenizer

        modalities["text"] = {}
        save_tokenizer(train_tokenizer([f"{text} {k}" for k in range(i)], vocab_size=50),
                       os.path.join(root, TOKENIZER_DIR))
    card = Card(modalities=modalities, tasks=TaskList(tasks),
                splits={s: SplitInfo(tuple(v)) for s, v in infos.items()})
    with open(os.path.join(root, CARD_NAME), "w") as f:
        f.write(card.to_json())
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, INDEX_NAME))
    return str(root)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    images = write_source(tmp / "images", "i", {"train": 30, "val": 6}, (DIGIT, PARITY), image_labels, image=8)
    speech = write_source(tmp / "speech", "s", {"train": 20}, (Task("digit", "classification", SPEECH_DIGITS),
                                                                 SPEAKER), speech_labels, shard=6, rate=8000)
    return {"images": open_dataset(images), "speech": open_dataset(speech)}


def rows_of(loader) -> list[tuple[str, str]]:
    """(source, key) of every row of one pass."""
    return [(loader.sources[int(s)], k) for b in loader for s, k in zip(b.source, b.keys)]


def test_united_masks_values_and_remapped_classes(sources):
    mix = Mixture(sources, weights={"images": 1, "speech": 2})
    loader = make_loader(mix, "train", batch_size=8, seed=3)
    assert loader.sources == ("images", "speech") and loader.dataset is mix and len(loader) == 7
    assert loader.tasks.names == ["digit", "parity", "speaker"]
    assert loader.tasks["digit"].classes == tuple("0123456")  # images' order, then speech's new classes
    seen = Counter()
    for b in loader:
        assert b.source.dtype == torch.int64 and b.modalities == ["image", "audio"]
        for r, (s, key) in enumerate(zip(b.source.tolist(), b.keys)):
            i, name = int(key[1:]), loader.sources[s]
            seen[name] += 1
            is_image = name == "images"
            assert key[0] == name[0] and bool(b.image_mask[r]) is is_image and bool(b.audio_mask[r]) is not is_image
            want = image_labels(i) if is_image else {**speech_labels(i), "digit": int(SPEECH_DIGITS[i % 4])}
            for task in ("digit", "parity", "speaker"):
                value = want.get(task)
                assert bool(b.label_mask[task][r]) is (value is not None), (key, task)
                assert int(b.labels[task][r]) == (value if value is not None else 0), (key, task)
            if is_image:
                assert torch.all(b.image[r] == i % 256) and int(b.audio_lengths[r]) == 0
            else:
                assert not b.image[r].any() and round(float(b.audio[r, 0]) * 1000) == i + 1
    assert seen == {"images": 16, "speech": 34}  # 50 * 1/3 = 16.7: 16 now, 17 next epoch (33 in two)


def test_without_weights_an_epoch_is_every_sample_once_source_after_source(sources):
    loader = make_loader(Mixture(sources), "train", batch_size=8, shuffle=False, tasks=["digit"])
    assert rows_of(loader) == [("images", f"i{i:04d}") for i in range(30)] + [("speech", f"s{i:04d}")
                                                                               for i in range(20)]
    # a split that one source lacks reads the others; its loader still has every source's tasks
    val = make_loader(Mixture(sources, weights={"images": 1, "speech": 5}), "val", batch_size=4, shuffle=False)
    assert rows_of(val) == [("images", f"i{i:04d}") for i in range(30, 36)]
    assert val.tasks.names == ["digit", "parity", "speaker"]


def test_shares_within_two_percent_repeats_and_coverage():
    """Ten epochs of 1,000: shares as weighted, a small source repeats evenly, a large one is seen whole."""
    blend = Blend(((100,) * 30, (50, 50, 20), (7,)), (Fraction(1, 3), Fraction(2, 3), Fraction(0)), 1000)
    cfg = PlanConfig(batch_size=16, seed=9)
    got, large = Counter(), []
    for epoch in range(10):
        src, sample = blend_stream(blend, epoch, cfg)
        assert len(src) == 1000 and blend_counts(blend, epoch).sum() == 1000
        got.update(src.tolist())
        per = Counter(sample[src == 1].tolist())  # 120 samples for a share of ~667: each 5 or 6 times
        assert set(per) == set(range(120)) and set(per.values()) <= {5, 6}
        mine = sample[src == 0]
        assert len(set(mine.tolist())) == len(mine)  # 3,000 samples for a share of ~333: no repeat
        large.extend(mine.tolist())
    assert abs(got[0] / 10_000 - 1 / 3) < 0.02 and abs(got[1] / 10_000 - 2 / 3) < 0.02 and got[2] == 0
    assert set(large) == set(range(3000))  # 3,333 draws over ten epochs see every sample
    a, b = blend_stream(blend, 3, cfg), blend_stream(blend, 4, cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, blend_stream(blend, 3, cfg)))  # pure in (seed, epoch)
    assert not np.array_equal(a[1], b[1])


def rank_rows(blend, epoch, rank, world_size, num_workers, cfg) -> list[list[tuple[int, int]]]:
    """A rank's batches as the DataLoader yields them: the round robin over its workers' plans."""
    per_worker = [blend_plan(blend, epoch, World(rank, world_size, w, num_workers), cfg)
                  for w in range(max(1, num_workers))]
    out = []
    for i in range(max(len(p) for p in per_worker)):
        out.extend([tuple(r) for r in p[i].tolist()] for p in per_worker if i < len(p))
    return out


@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_equal_and_covering_for_worlds_1_to_4_and_workers_0_to_3(drop_last):
    blend = Blend(((5, 9, 2), (4, 4)), (Fraction(2, 5), Fraction(3, 5)), 37)
    cfg = PlanConfig(batch_size=4, seed=2, drop_last=drop_last, shuffle_buffer=6)
    src, sample = blend_stream(blend, 1, cfg)
    stream = Counter(zip(src.tolist(), sample.tolist()))
    for world_size in range(1, 5):
        expected = batches_per_rank(37, world_size, cfg)
        by_workers = []
        for num_workers in range(4):
            ranks = [rank_rows(blend, 1, r, world_size, num_workers, cfg) for r in range(world_size)]
            assert [len(r) for r in ranks] == [expected] * world_size
            rows = Counter(row for r in ranks for batch in r for row in batch)
            if drop_last:
                assert rows <= stream and rows.total() == world_size * (37 // world_size // 4 * 4)
            else:
                assert set(rows) == set(stream) and rows.total() - 37 == -(-37 // world_size) * world_size - 37
            by_workers.append([sorted(row for batch in r for row in batch) for r in ranks])
        assert all(w == by_workers[0] for w in by_workers)  # each rank reads the same samples whatever W


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on 2 cores, on purpose
def test_loader_with_workers_yields_the_plan_on_every_rank(sources):
    mix = Mixture(sources, weights={"images": 2, "speech": 1}, samples_per_epoch=41)
    names = {i: d.split_index("train").keys for i, d in enumerate(mix.datasets)}
    blend, cfg = mix.blend("train"), PlanConfig(batch_size=4, seed=5)
    for num_workers, world_size in ((2, 2), (3, 1)):
        lengths = []
        for rank in range(world_size):
            loader = make_loader(mix, "train", batch_size=4, seed=5, num_workers=num_workers, rank=rank,
                                 world_size=world_size, tasks=["digit"])
            loader.set_epoch(1)
            want = [[(mix.names[s], str(names[s][n])) for s, n in batch]
                    for batch in rank_rows(blend, 1, rank, world_size, num_workers, cfg)]
            got = [[(loader.sources[int(s)], k) for s, k in zip(b.source, b.keys)] for b in loader]
            assert got == want
            lengths.append(len(got))
        assert lengths == [len(loader)] * world_size


def run(loader, epochs: int = 1) -> list[tuple[list[str], list[int], torch.Tensor]]:
    return [(list(b.keys), b.source.tolist(), b.image.sum(dim=(1, 2, 3)))
            for _ in range(epochs) for b in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(a, b))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_at_any_batch(sources, num_workers):
    mix = Mixture(sources, weights={"images": 1, "speech": 1}, samples_per_epoch=30)
    kw = dict(batch_size=4, seed=8, num_workers=num_workers, tasks=["digit"])
    full = run(make_loader(mix, "train", **kw), 2)
    n = len(full) // 2
    assert n == 8 and [k for k, *_ in full[:n]] != [k for k, *_ in full[n:]]
    for k in range(1, n + 1) if num_workers == 0 else (3, n + 2):
        first = make_loader(mix, "train", **kw)
        it = iter(first)
        head = [next(it) for _ in range(min(k, n))]
        if k > n:
            head += list(itertools.islice(iter(first), k - n))
        assert len(head) == k
        fresh = make_loader(Mixture(sources, weights={"images": 1, "speech": 1}, samples_per_epoch=30), "train",
                            **kw)
        fresh.load_state_dict(first.state_dict())
        rest = run(fresh, 1) + (run(fresh, 1) if k < n else [])
        assert same(rest, full[k:]), f"resumed at batch {k}"


def test_state_of_another_mixture_is_refused(sources):
    state = make_loader(Mixture(sources, weights={"images": 1, "speech": 1}), "train", batch_size=4).state_dict()
    other = make_loader(Mixture(sources, weights={"images": 1, "speech": 2}), "train", batch_size=4)
    with pytest.raises(ConfigError, match="sources"):
        other.load_state_dict(state)


def test_peek_then_loop_is_the_whole_epoch_and_set_epoch_restarts(sources):
    mix = Mixture(sources, weights={"images": 1, "speech": 3})
    epochs = [rows_of(ref) for ref in [make_loader(mix, "train", batch_size=6, seed=1, tasks=[])] * 2]
    loader = make_loader(mix, "train", batch_size=6, seed=1, tasks=[])
    b = next(iter(loader))
    assert list(zip([loader.sources[s] for s in b.source.tolist()], b.keys)) == epochs[0][:6]
    assert rows_of(loader) == epochs[0] and rows_of(loader) == epochs[1]
    loader.set_epoch(0)
    assert rows_of(loader) == epochs[0]


def test_type_conflict_names_both_sources(sources, tmp_path):
    other = write_source(tmp_path / "other", "o", {"train": 3}, (Task("digit", "regression"),),
                         lambda i: {"digit": [float(i)]}, image=8)
    with pytest.raises(ConfigError, match=r"task 'digit' is classification in source 'images' .* but regression "
                                          r"in source 'other'"):
        Mixture({**sources, "other": other})


def test_image_size_and_sample_rate_must_agree(sources, tmp_path):
    big = write_source(tmp_path / "big", "b", {"train": 3}, (PARITY,), lambda i: {"parity": i % 2}, image=10)
    mix = Mixture({"images": sources["images"], "big": big})
    with pytest.raises(ConfigError, match="image_size"):
        make_loader(mix, "train", batch_size=4)
    b = next(iter(make_loader(mix, "train", batch_size=40, config=LoaderConfig(image_size=8))))
    assert b.image.shape == (33, 3, 8, 8) and bool(b.image_mask.all())
    fast = write_source(tmp_path / "fast", "f", {"train": 3}, (SPEAKER,), lambda i: {"speaker": 0}, rate=16000)
    with pytest.raises(ConfigError, match=r"'speech' \(8000 Hz\) and 'fast' \(16000 Hz\)"):
        Mixture({"speech": sources["speech"], "fast": fast})


def test_weights_are_checked_and_zero_leaves_a_source_out(sources):
    with pytest.raises(ConfigError, match="did you mean 'speech'"):
        Mixture(sources, weights={"images": 1, "speach": 1})
    with pytest.raises(ConfigError, match=r"lack sources \['speech'\]"):
        Mixture(sources, weights={"images": 1})
    with pytest.raises(ConfigError, match="at least one weight must be positive"):
        Mixture(sources, weights={"images": 0, "speech": 0})
    with pytest.raises(ConfigError, match="finite number >= 0, got -1"):
        Mixture(sources, weights={"images": 1, "speech": -1})
    with pytest.raises(ConfigError, match="less than one sample"):
        make_loader(Mixture(sources, weights={"images": 1000, "speech": 1}), "train", batch_size=4)
    mix = Mixture(sources, weights={"images": 0, "speech": 1}, samples_per_epoch=25)
    loader = make_loader(mix, "train", batch_size=5)
    rows = rows_of(loader)
    assert {s for s, _ in rows} == {"speech"} and len(rows) == 25  # 20 samples, 5 of them twice
    b = next(iter(loader))
    assert b.image.shape == (5, 3, 8, 8) and not b.image_mask.any()  # the shape images have where drawn
    assert loader.tasks.names == ["digit", "parity", "speaker"]
    assert pickle.loads(pickle.dumps(loader.stream())).feed.names == ("images", "speech")


def test_text_sources_share_one_tokenizer(tmp_path):
    from mmdata.tokenizer import encode, load_tokenizer

    parity = lambda i: {"parity": i % 2}  # noqa: E731
    a = write_source(tmp_path / "a", "a", {"train": 4}, (PARITY,), parity, text="apple")
    b = write_source(tmp_path / "b", "b", {"train": 4}, (PARITY,), parity, text="banana")
    c = write_source(tmp_path / "c", "c", {"train": 4}, (PARITY,), parity, image=8)
    mix = Mixture({"a": a, "b": b, "c": c})
    with pytest.raises(ConfigError, match="'a' and 'b' have different tokenizers"):
        make_loader(mix, "train", batch_size=12)
    assert next(iter(make_loader(mix, "train", batch_size=12, modalities=["image"]))).text_ids is None
    tok = os.path.join(a, "tokenizer")
    batch = next(iter(make_loader(mix, "train", batch_size=12, shuffle=False, config=LoaderConfig(tokenizer=tok))))
    assert batch.text_mask.tolist() == [True] * 8 + [False] * 4 and batch.image_mask.tolist() == [False] * 8 + [True] * 4
    ids = encode(load_tokenizer(mix.datasets[0].tokenizer_json), "banana 1", 64)
    assert batch.text_ids[5, :len(ids)].tolist() == ids  # every source's text through the one tokenizer


def _corrupt(root: str, key: str) -> None:
    """Overwrite the tar header of sample ``key`` with garbage."""
    ds = open_dataset(root)
    idx = ds.split_index("train")
    row = list(idx.keys).index(key)
    with open(os.path.join(root, idx.files[idx.shard[row]]), "r+b") as f:
        f.seek(int(idx.offset[row]))
        f.write(b"\x01" * 512)


def test_on_error_names_the_source_and_skip_keeps_the_count(sources, tmp_path):
    import shutil

    root = shutil.copytree(sources["speech"].root, tmp_path / "speech")
    _corrupt(str(root), "s0007")
    mix = Mixture({"images": sources["images"], "speech": root})
    with pytest.raises(CorruptShardError, match=r"source 'speech': shard 'train-000001.tar', sample 's0007'"):
        list(make_loader(mix, "train", batch_size=8))
    loader = make_loader(mix, "train", batch_size=8, on_error="skip")
    rows = rows_of(loader)
    assert len(rows) == 49 and ("speech", "s0007") not in rows and len(list(loader)) == len(loader) == 7
    assert loader.skipped == 2 and loader.skipped_samples[0][:2] == ("speech/train-000001.tar", "s0007")
