"""The loader as a user drives it: values, masks, cover across ranks and workers, errors, transports.

The fixture writes a tiny dataset directly with the build's ShardFile, a Card and a pyarrow index (no build
step). Sample ``i`` encodes its index everywhere: key ``s0017``, text "sample 17", image pixels = i,
audio constant i/1000, digit label i % 10; some modalities and labels are absent by rule.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdata import (
    ConfigError,
    CorruptShardError,
    DatasetNotFoundError,
    LoaderConfig,
    make_loader,
    open_dataset,
)
from mmdata.build.assemble import ShardFile
from mmdata.card import LABEL_PREFIX, Card, SplitInfo
from mmdata.format import CARD_NAME, INDEX_NAME, TOKENIZER_DIR, shard_name
from mmdata.tasks import Task, TaskList

SR = 16000
TASKS = (Task("digit", "classification", tuple(str(d) for d in range(10))), Task("score", "regression"))


def has_image(i):
    return i % 7 != 3


def has_audio(i):
    return i % 5 != 4


def has_text(i):
    return i % 6 != 5


def has_digit(i):
    return i % 4 != 1


def audio_len(i):
    return 800 if i % 3 == 0 else 1600


def members_of(i: int) -> dict[str, bytes]:
    import soundfile as sf
    from PIL import Image

    m: dict[str, bytes] = {}
    if has_image(i):
        buf = io.BytesIO()
        fmt = "JPEG" if i % 2 == 0 else "PNG"
        Image.new("RGB", (8, 8), (i % 256,) * 3).save(buf, format=fmt, quality=95)
        m["jpg" if fmt == "JPEG" else "png"] = buf.getvalue()
    if has_audio(i):
        buf = io.BytesIO()
        sf.write(buf, np.full(audio_len(i), i / 1000, dtype=np.float32), SR, format="WAV", subtype="FLOAT")
        m["wav"] = buf.getvalue()
    if has_text(i):
        m["txt"] = f"sample {i}".encode()
    labels = {"digit": i % 10 if has_digit(i) else None, "score": [i / 10]}
    m["json"] = json.dumps({"id": f"id{i}", "labels": labels}).encode()
    return m


def write_dataset(root, shard_sizes=(5, 9, 2, 7), split="train") -> str:
    """Write a dataset of sum(shard_sizes) samples in shards of those sizes; return its folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmdata.tokenizer import save_tokenizer, train_tokenizer

    os.makedirs(root, exist_ok=True)
    rows, shards, i = [], [], 0
    for s, n in enumerate(shard_sizes):
        name = shard_name(split, s)
        w = ShardFile(name, Path(root) / name)
        for _ in range(n):
            m = members_of(i)
            off, size = w.write_sample(f"s{i:04d}", m)
            rows.append({"key": f"s{i:04d}", "split": split, "shard": name, "offset": off, "size": size,
                         "modalities": [k for k, e in (("image", has_image(i)), ("audio", has_audio(i)),
                                                       ("text", has_text(i))) if e],
                         "image_width": 8 if has_image(i) else None, "image_height": 8 if has_image(i) else None,
                         "audio_seconds": audio_len(i) / SR if has_audio(i) else None,
                         "text_chars": len(f"sample {i}") if has_text(i) else None, "source_id": f"id{i}",
                         LABEL_PREFIX + "digit": i % 10 if has_digit(i) else None,
                         LABEL_PREFIX + "score": [i / 10]})
            i += 1
        shards.append(w.finish())
    card = Card(modalities={"image": {"formats": ["jpg", "png"]},
                            "audio": {"sample_rate": SR, "channels": 1, "format": "wav"}, "text": {}},
                tasks=TaskList(TASKS), splits={split: SplitInfo(tuple(shards))})
    with open(os.path.join(root, CARD_NAME), "w") as f:
        f.write(card.to_json())
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, INDEX_NAME))
    save_tokenizer(train_tokenizer([f"sample {k}" for k in range(i)], vocab_size=200), os.path.join(root, TOKENIZER_DIR))
    return str(root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tiny"))


def index_of(key: str) -> int:
    return int(key[1:])


def epoch_keys(loader) -> list[list[str]]:
    return [list(b.keys) for b in loader]


def test_every_sample_once_with_its_values_and_masks(tiny):
    ds = open_dataset(tiny)
    assert ds.splits == ["train"] and ds.num_samples("train") == 23
    loader = make_loader(ds, "train", batch_size=4, config=LoaderConfig(audio_seconds=0.1))
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == [f"s{i:04d}" for i in range(23)] and keys != sorted(keys)  # shuffled, each once
    tok = ds.tokenizer()
    for b in batches:
        assert b.image.shape[1:] == (3, 8, 8) and b.audio.shape[1] == 1600 and b.text_ids.dtype == torch.int64
        for r, key in enumerate(b.keys):
            i = index_of(key)
            assert bool(b.image_mask[r]) == has_image(i) and bool(b.audio_mask[r]) == has_audio(i)
            assert bool(b.text_mask[r]) == has_text(i) and bool(b.label_mask["digit"][r]) == has_digit(i)
            if has_image(i):
                assert abs(b.image[r].float().mean().item() - i) < 2  # JPEG rows are near, PNG rows exact
            else:
                assert b.image[r].abs().sum() == 0
            if has_audio(i):
                assert b.audio_lengths[r] == audio_len(i)
                assert torch.allclose(b.audio[r, :audio_len(i)], torch.tensor(i / 1000))
                assert b.audio[r, audio_len(i):].abs().sum() == 0
            else:
                assert b.audio_lengths[r] == 0 and b.audio[r].abs().sum() == 0
            if has_text(i):
                n = int(b.attention_mask[r].sum())
                assert tok.decode(b.text_ids[r, 1:n - 1].tolist()) == f"sample {i}"  # inside [CLS] .. [SEP]
            else:
                assert b.attention_mask[r].sum() == 0
            if has_digit(i):
                assert b.labels["digit"][r] == i % 10
            assert b.labels["score"][r, 0].item() == pytest.approx(i / 10)


def test_only_asked_modalities_are_decoded(tiny, monkeypatch):
    import mmdata.decode as decode

    def boom(*a, **k):
        raise AssertionError("audio was decoded although not asked for")

    monkeypatch.setattr(decode, "decode_audio", boom)
    b = next(iter(make_loader(tiny, "train", batch_size=5, modalities=["image"], tasks=["digit"])))
    assert b.audio is None and b.text_ids is None and b.image.shape == (5, 3, 8, 8)
    assert list(b.labels) == ["digit"]
    with pytest.raises(ConfigError, match="depth"):
        make_loader(tiny, "train", batch_size=5, modalities=["depth"])


def test_all_absent_modality_keeps_its_shape(tmp_path):
    root = write_dataset(tmp_path / "d", shard_sizes=(1, 1), split="train")  # samples 0, 1: no text-less one
    ds = open_dataset(root)
    loader = make_loader(ds, "train", batch_size=1, shuffle=False, modalities=["image", "audio"],
                         config=LoaderConfig(image_size=6, audio_seconds=0.05))
    shapes = {(tuple(b.image.shape), tuple(b.audio.shape)) for b in loader}
    assert shapes == {((1, 3, 6, 6), (1, 800))}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_equal_batches_and_cover(tiny, num_workers, drop_last):
    world = 2
    per_rank = []
    for rank in range(world):
        loader = make_loader(tiny, "train", batch_size=3, num_workers=num_workers, drop_last=drop_last, rank=rank,
                             world_size=world, modalities=["text"], tasks=[], seed=5)
        per_rank.append(epoch_keys(loader))
        assert len(per_rank[-1]) == len(loader)
    assert len(per_rank[0]) == len(per_rank[1])
    keys = [k for r in per_rank for b in r for k in b]
    if drop_last:
        assert len(keys) == len(set(keys)) == 2 * (23 // 2 // 3 * 3)
    else:
        assert set(keys) == {f"s{i:04d}" for i in range(23)} and len(keys) == 24  # one duplicate pads


def test_loader_yields_what_the_pure_plan_says(tiny):
    """order.plan, which the order tests check exhaustively, is exactly what a rank's loader yields."""
    from mmdata.order import PlanConfig, World, plan

    ds = open_dataset(tiny)
    keys = ds.split_index("train").keys
    cfg = PlanConfig(batch_size=3, seed=5)
    for rank in range(2):
        loader = make_loader(ds, "train", batch_size=3, rank=rank, world_size=2, seed=5, modalities=["text"],
                             tasks=[])
        loader.set_epoch(1)
        expected = [[str(keys[i]) for i in batch] for batch in plan(ds.split_index("train").shard_sizes, 1,
                                                                     World(rank, 2, 0, 0), cfg)]
        assert epoch_keys(loader) == expected


def test_same_seed_and_epoch_same_order_other_epoch_other(tiny):
    def run(epoch, seed=0):
        loader = make_loader(tiny, "train", batch_size=4, seed=seed, modalities=["text"], tasks=[])
        loader.set_epoch(epoch)
        return epoch_keys(loader)

    assert run(1) == run(1)
    assert run(1) != run(2) and run(1, seed=1) != run(1)


def test_memory_url_reads_like_local(tiny):
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in os.listdir(tiny):
        if os.path.isfile(os.path.join(tiny, name)):
            fs.pipe(f"/tinyds/{name}", Path(tiny, name).read_bytes())
    fs.pipe(f"/tinyds/{TOKENIZER_DIR}/tokenizer.json", Path(tiny, TOKENIZER_DIR, "tokenizer.json").read_bytes())
    kw = dict(batch_size=4, seed=3)
    remote, local = list(make_loader("memory://tinyds", "train", **kw)), list(make_loader(tiny, "train", **kw))
    assert [b.keys for b in remote] == [b.keys for b in local]
    assert all(torch.equal(a.text_ids, b.text_ids) and torch.equal(a.image, b.image) for a, b in zip(remote, local))


def test_missing_and_truncated_shard_name_the_shard(tmp_path):
    root = write_dataset(tmp_path / "d")
    os.remove(os.path.join(root, "train-000001.tar"))
    for workers in (0, 2):  # from a worker process the error still names the shard, and nothing hangs
        with pytest.raises(CorruptShardError, match="train-000001.tar"):
            list(make_loader(root, "train", batch_size=4, num_workers=workers))
    root = write_dataset(tmp_path / "e")
    path = os.path.join(root, "train-000002.tar")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CorruptShardError, match="train-000002.tar.*truncated"):
        list(make_loader(root, "train", batch_size=4, shuffle=False))


def _corrupt_member(root: str, key: str) -> None:
    """Flip bytes in the tar header of ``key``'s first member (its checksum then fails)."""
    ds = open_dataset(root)
    idx = ds.split_index("train")
    s = list(idx.keys).index(key)
    with open(os.path.join(root, idx.files[idx.shard[s]]), "r+b") as f:
        f.seek(int(idx.offset[s]) + 130)
        f.write(b"zz")


def test_corrupt_sample_raise_names_it_and_skip_keeps_counts(tmp_path):
    root = write_dataset(tmp_path / "d")
    _corrupt_member(root, "s0007")
    with pytest.raises(CorruptShardError, match="train-000001.tar.*s0007"):
        list(make_loader(root, "train", batch_size=4, shuffle=False))
    loaders = [make_loader(root, "train", batch_size=4, on_error="skip", rank=r, world_size=2) for r in range(2)]
    per_rank = [epoch_keys(lo) for lo in loaders]
    assert [len(k) for k in per_rank] == [len(lo) for lo in loaders] == [len(loaders[0])] * 2
    keys = {k for r in per_rank for b in r for k in b}
    assert keys == {f"s{i:04d}" for i in range(23)} - {"s0007"}
    assert sum(lo.skipped for lo in loaders) == 1
    assert [s[:2] for lo in loaders for s in lo.skipped_samples] == [("train-000001.tar", "s0007")]


def test_jpegs_travel_undecoded_for_the_device(tiny):
    from mmdata.gpudecode import decode_images

    cfg = LoaderConfig(decode_images_on="device", image_size=8)
    loader = make_loader(tiny, "train", batch_size=8, shuffle=False, modalities=["image"], config=cfg)
    dev, images = next(loader.iter_packed())
    cpu = next(iter(make_loader(tiny, "train", batch_size=8, shuffle=False, modalities=["image"])))
    jpeg_rows = [r for r, k in enumerate(dev.keys) if index_of(k) % 2 == 0 and has_image(index_of(k))]
    assert images.rows.tolist() == jpeg_rows
    assert torch.equal(dev.image_mask, cpu.image_mask)
    assert torch.equal(decode_images(dev, images, "cpu").image, cpu.image)
    with pytest.raises(ConfigError, match="DevicePrefetcher"):  # read directly, its JPEG rows would be zeros
        iter(loader)


@pytest.mark.timeout(120)
def test_the_prefetcher_is_the_one_decoder_of_the_packed_jpegs(tiny, monkeypatch):
    """Through a worker, the packed JPEGs ride beside each Batch (never in it) to DevicePrefetcher, whose
    one decode per batch gives, on the CPU, the CPU loader's images; the transform decodes nothing more."""
    from dataclasses import fields

    import mmdata.gpudecode as gpudecode
    import mmdata.prefetch as prefetch
    from mmdata.augment import AugmentConfig, Pipeline
    from mmdata.batch import Batch

    decoded, by_prefetcher = [], []
    real_decode, real_decode_images = gpudecode._decode, prefetch.decode_images

    def spy_decode(datas, *args):  # every JPEG decode, whoever asks
        decoded.append(len(datas))
        return real_decode(datas, *args)

    def spy_decode_images(batch, images, *args):
        by_prefetcher.append(len(images.rows))
        return real_decode_images(batch, images, *args)

    monkeypatch.setattr(gpudecode, "_decode", spy_decode)
    monkeypatch.setattr(prefetch, "decode_images", spy_decode_images)
    kw = dict(batch_size=8, shuffle=False, modalities=["image"], num_workers=1)
    loader = make_loader(tiny, "train", config=LoaderConfig(decode_images_on="device", image_size=8), **kw)
    for batch, images in loader.iter_packed():
        assert isinstance(images, gpudecode.PackedImages) and isinstance(batch, Batch)
        assert not any(isinstance(getattr(batch, f.name), gpudecode.PackedImages) for f in fields(Batch))
    aug = Pipeline(AugmentConfig.from_dict({"image": {"size": [8, 8]}})).eval()
    got = list(prefetch.DevicePrefetcher(loader, "cpu", transform=aug))
    want = [aug(b) for b in make_loader(tiny, "train", config=LoaderConfig(image_size=8), **kw)]
    assert [b.keys for b in got] == [b.keys for b in want] and len(got) == len(loader)
    for g, w in zip(got, want):
        assert torch.equal(g.image, w.image) and torch.equal(g.image_mask, w.image_mask)
    assert decoded == by_prefetcher and len(by_prefetcher) == len(loader)  # once per batch, all in the prefetcher


def test_iter_is_a_whole_epoch_as_with_a_dataloader(tiny):
    """Each iter() starts its epoch afresh; a full pass moves to the next epoch; set_epoch picks one."""
    import itertools

    kw = dict(batch_size=3, seed=4, modalities=["text"], tasks=[])
    ref = make_loader(tiny, "train", **kw)
    epochs = [epoch_keys(ref) for _ in range(3)]  # no set_epoch: epochs 0, 1, 2 by themselves
    assert len({str(e) for e in epochs}) == 3
    ds = open_dataset(tiny)
    loader = make_loader(ds, "train", **kw)
    assert loader.batch_size == 3 and loader.dataset is ds and len(loader) == 8 and loader.sources == ()
    assert list(next(iter(loader)).keys) == epochs[0][0]  # a peek ...
    assert epoch_keys(loader) == epochs[0]  # ... eats nothing of the epoch
    assert epoch_keys(loader) == epochs[1]
    list(itertools.islice(iter(loader), 3))  # a break mid-epoch: the next pass starts the epoch again
    assert epoch_keys(loader) == epochs[2]
    loader.set_epoch(1)
    assert epoch_keys(loader) == epochs[1] and loader.state_dict()["epoch"] == 2


def test_loaded_state_continues_once(tiny):
    import itertools

    kw = dict(batch_size=3, seed=4, modalities=["text"], tasks=[])
    ref = make_loader(tiny, "train", **kw)
    epochs = [epoch_keys(ref) for _ in range(2)]
    first = make_loader(tiny, "train", **kw)
    it = iter(first)
    head = [list(next(it).keys) for _ in range(3)]
    state = first.state_dict()
    assert (state["epoch"], state["batches"]) == (0, 3) and head == epochs[0][:3]
    fresh = make_loader(tiny, "train", **kw)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["batches"] == 3  # the position as loaded, until a pass moves it
    fresh.set_epoch(0)  # a training loop's set_epoch at the top of the resumed epoch keeps the position
    assert epoch_keys(fresh) == epochs[0][3:] and epoch_keys(fresh) == epochs[1]
    fresh.load_state_dict(state)
    list(itertools.islice(iter(fresh), 1))  # the loaded position is used once: the next pass is whole
    assert epoch_keys(fresh) == epochs[0]
    fresh.load_state_dict(state)
    fresh.set_epoch(1)  # another epoch drops the loaded position
    assert epoch_keys(fresh) == epochs[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("persistent", [False, True])
def test_peek_with_workers_then_the_whole_epoch(tiny, persistent):
    kw = dict(batch_size=3, seed=4, num_workers=2, modalities=["text"], tasks=[],
              config=LoaderConfig(persistent_workers=persistent))
    ref = make_loader(tiny, "train", **kw)
    epochs = [epoch_keys(ref) for _ in range(2)]
    loader = make_loader(tiny, "train", **kw)
    assert list(next(iter(loader)).keys) == epochs[0][0]
    assert epoch_keys(loader) == epochs[0] and epoch_keys(loader) == epochs[1]
    ref.close()
    loader.close()


def test_loader_stream_pickles(tiny):
    loader = make_loader(tiny, "train", batch_size=4, seed=2)
    stream = loader.stream()
    copy = pickle.loads(pickle.dumps(stream))
    a = [b.keys for b, *_ in stream]
    assert a == [b.keys for b, *_ in copy] == epoch_keys(loader)


def test_batch_to_moves_every_tensor(tiny):
    b = next(iter(make_loader(tiny, "train", batch_size=4)))
    moved = b.to("cpu", non_blocking=True)
    assert torch.equal(moved.image, b.image) and set(moved.labels) == {"digit", "score"}


@pytest.mark.gpu
def test_batch_pin_memory_and_to_cuda(tiny):
    b = next(iter(make_loader(tiny, "train", batch_size=4))).pin_memory()
    assert b.image.is_pinned() and b.labels["digit"].is_pinned()
    assert b.to("cuda", non_blocking=True).audio.is_cuda


def test_tars_without_card_say_how_to_build(tmp_path):
    w = ShardFile("shard-000000.tar", tmp_path / "shard-000000.tar")
    w.write_sample("a", {"txt": b"x"})
    w.finish()
    with pytest.raises(DatasetNotFoundError, match="--layout webdataset"):
        open_dataset(tmp_path)


def test_sample_data_built_then_streamed(tmp_path):
    import csv

    from mmdata.build import build_dataset

    here = os.path.join(os.path.dirname(__file__), "..", "sample_data")
    build_dataset(here, tmp_path / "built", progress=False)
    with open(os.path.join(here, "manifest.csv")) as f:
        digit = {r["id"]: r["digit"] for r in csv.DictReader(f)}
    ds = open_dataset(tmp_path / "built")
    split = ds.splits[0]
    loader = make_loader(ds, split, batch_size=16, modalities=["image", "audio"], tasks=["digit"],
                         config=LoaderConfig(audio_seconds=0.5))
    seen = {}
    classes = ds.tasks["digit"].classes
    for b in loader:
        assert b.image.shape[1:] == (3, 28, 28) and b.audio.shape[1] == ds.card.modalities["audio"]["sample_rate"] // 2
        assert b.image_mask.all() and b.audio_mask.all() and (b.image.flatten(1).amax(1) > 0).all()
        seen.update({k: classes[int(v)] for k, v in zip(b.keys, b.labels["digit"])})
    assert len(seen) == ds.num_samples(split)
    assert all(digit[k] == v for k, v in seen.items())  # keys are the source ids here


def _ddp_rank(rank: int, root: str, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loader = make_loader(root, "train", batch_size=3, drop_last=True, modalities=["text"], tasks=[])
        ids = [index_of(k) for b in loader for k in b.keys]
        gathered = [None, None]
        dist.all_gather_object(gathered, ids)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_processes_under_torch_distributed(tiny, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "keys.json")
    mp.spawn(_ddp_rank, args=(tiny, port, out), nprocs=2, join=True)
    with open(out) as f:
        a, b = json.load(f)
    assert len(a) == len(b) == 23 // 2 // 3 * 3 and not set(a) & set(b)


def test_tokenizer_from_a_given_folder(tiny, tmp_path):
    import shutil

    shutil.copytree(os.path.join(tiny, TOKENIZER_DIR), tmp_path / "tok")
    cfg = LoaderConfig(tokenizer=str(tmp_path / "tok"), max_text_tokens=3)
    b = next(iter(make_loader(tiny, "train", batch_size=6, shuffle=False, modalities=["text"], config=cfg)))
    assert b.text_ids.shape == (6, 3) and b.attention_mask[0].tolist() == [1, 1, 1]  # truncated: [CLS] x [SEP]
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        make_loader(tiny, "train", batch_size=2, config=LoaderConfig(tokenizer=str(tmp_path / "nowhere")))


def _ramp_flac(n: int, rate: int = 8000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (np.arange(n) / n).astype(np.float32), rate, format="FLAC", subtype="PCM_24")
    return buf.getvalue()


def test_audio_crop_random_per_epoch_centre_in_evaluation():
    from mmdata.decode import decode_audio

    data = _ramp_flac(1000)
    first = lambda wav: round(float(wav[0]) * 1000)  # noqa: E731  (the ramp's value is its sample index)
    assert first(decode_audio(data, 8000, 200, crop="center")) == 400
    assert first(decode_audio(data, 8000, 200, crop="start")) == 0
    again = [first(decode_audio(data, 8000, 200, crop="random", salt=f"0:{e}:k")) for e in range(8)]
    assert again == [first(decode_audio(data, 8000, 200, crop="random", salt=f"0:{e}:k")) for e in range(8)]
    assert len(set(again)) > 4 and all(0 <= s <= 800 for s in again)
    assert len(decode_audio(_ramp_flac(100), 8000, 200, crop="random", salt="x")) == 100  # short: untouched


def test_audio_at_another_rate_is_resampled_as_librosa_does_by_default():
    import librosa

    from mmdata.decode import decode_audio

    data = _ramp_flac(1000, rate=22050)
    want = librosa.resample(decode_audio(data, None, None), orig_sr=22050, target_sr=16000)
    got = decode_audio(data, 16000, None)
    assert got.dtype == np.float32 and len(got) == len(want) == -(-1000 * 16000 // 22050)
    np.testing.assert_array_equal(got, want)


def test_loader_crops_training_audio_per_epoch(tmp_path):
    from mmdata.build import build_dataset

    root = Path(__file__).resolve().parents[1]
    build_dataset(root / "sample_data", tmp_path / "ds", progress=False)
    ds = open_dataset(tmp_path / "ds")
    cfg = LoaderConfig(audio_seconds=0.1)  # every clip is longer

    def audio_by_key(shuffle: bool, epoch: int) -> dict[str, torch.Tensor]:
        loader = make_loader(ds, "train", batch_size=50, shuffle=shuffle, modalities=["audio"], config=cfg)
        loader.set_epoch(epoch)
        return {k: b.audio[r] for b in loader for r, k in enumerate(b.keys)}

    a, b = audio_by_key(True, 0), audio_by_key(True, 1)
    assert sum(not torch.equal(a[k], b[k]) for k in a) > len(a) // 2
    c, d = audio_by_key(False, 0), audio_by_key(False, 1)
    assert all(torch.equal(c[k], d[k]) for k in c)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_persistent_workers_same_batches_same_processes_flat_memory(tiny):
    ds = open_dataset(tiny)
    args = dict(batch_size=4, num_workers=2, seed=3)
    plain = make_loader(ds, "train", **args, config=LoaderConfig(audio_seconds=0.1))
    kept = make_loader(ds, "train", **args, config=LoaderConfig(audio_seconds=0.1, persistent_workers=True))
    pids, rss = None, []
    for epoch in range(4):
        plain.set_epoch(epoch)
        kept.set_epoch(epoch)
        assert epoch_keys(kept) == epoch_keys(plain)
        workers = [w.pid for w in kept._dataloader._iterator._workers]
        assert pids is None or workers == pids  # the same processes serve every epoch
        pids = workers
        rss.append(sum(_rss_kb(p) for p in workers))
    assert rss[-1] - rss[1] < 20_000  # KiB: no growth from epoch to epoch
    # a break mid-epoch, then the state of a fresh persistent loader, resumes exactly
    kept.set_epoch(5)
    it = iter(kept)
    first = [next(it).keys for _ in range(2)]
    state = kept.state_dict()
    rest = [b.keys for b in it]
    again = make_loader(ds, "train", **args, config=LoaderConfig(audio_seconds=0.1, persistent_workers=True))
    again.load_state_dict(state)
    assert [b.keys for b in again] == rest and len(first + rest) == len(kept)
    kept.close()
    again.close()


def test_reader_keeps_few_shards_open(tmp_path, monkeypatch):
    """A worker that visits many shards closes the least recently used: no descriptor exhaustion."""
    import mmdata.reader as reader_mod
    from mmdata.reader import ShardReader

    monkeypatch.setattr(reader_mod, "MAX_OPEN", 3)
    root = write_dataset(tmp_path / "many", shard_sizes=(2,) * 10)
    ds = open_dataset(root)
    reader = ShardReader(ds, "train")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for shard in range(10):
            head = reader.read_range(shard, 0, 512)
            assert head[:5] == f"s{2 * shard:04d}".encode()[:5]
            assert len(reader._fds) <= 3
            assert len(os.listdir("/proc/self/fd")) - before <= 3
    reader.close()
    assert len(os.listdir("/proc/self/fd")) == before
