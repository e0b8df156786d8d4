"""mmdata build: every layout gives the same checked samples, byte for byte, readable by any tar reader."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NO_AUDIO, NO_DIGIT, NO_TEXT, SPEAKERS, sample_id, write_folders, write_manifest

from mmdata.build import BuildConfig, build_dataset
from mmdata.card import LABEL_PREFIX, Card
from mmdata.errors import ConfigError
from mmdata.format import KEY_RE, group_samples, parse_members

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
ONE = BuildConfig(workers=1)


def read_tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    return dict(group_samples(iter(members)))


def output_files(out: Path) -> dict[str, bytes]:
    """Every output file, the tokenizer included."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_folders_build_round_trips_every_sample(raw_folders, tmp_path):
    card = build_dataset(raw_folders, tmp_path / "out", ONE, progress=False)
    assert card.counts == {"input": 12, "written": 12, "rejected": {}}
    assert card.modalities["audio"] == {"sample_rate": 8000, "channels": 1, "format": "flac"}
    assert card.modalities["image"]["formats"] == ["jpg", "png"]
    assert [t.name for t in card.tasks] == ["digit", "parity", "speaker"]
    samples = read_tar_samples(tmp_path / "out" / "train-000000.tar")
    assert len(samples) == 12
    import soundfile as sf
    from PIL import Image

    for key, members in samples.items():
        meta = json.loads(members["json"])
        i = int(meta["id"][1:])
        assert key == sample_id(i) and KEY_RE.match(key)
        img = Image.open(io.BytesIO(members.get("png") or members["jpg"]))
        assert img.size == (8 + i % 3, 8)
        assert ("flac" in members) == (i != NO_AUDIO)
        if i != NO_AUDIO:
            y, rate = sf.read(io.BytesIO(members["flac"]))
            assert rate == 8000 and len(y) == 200 + 10 * i
        assert members.get("txt") == (None if i == NO_TEXT else f"sample {i}".encode())
        digit = None if i == NO_DIGIT else i % 3
        assert meta["labels"] == {"digit": digit, "parity": i % 2, "speaker": SPEAKERS.index(SPEAKERS[i % 4])}
    # the index points at each sample's bytes in its shard
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    blob = (tmp_path / "out" / "train-000000.tar").read_bytes()
    for row in index:
        (key, members), = group_samples(parse_members(blob[row["offset"]:row["offset"] + row["size"]]))
        assert key == row["key"] and json.loads(members["json"])["id"] == row["source_id"]
        i = int(row["source_id"][1:])
        assert row[LABEL_PREFIX + "digit"] == (None if i == NO_DIGIT else i % 3)
        assert row["image_width"] == 8 + i % 3 and row["text_chars"] == (None if i == NO_TEXT else len(f"sample {i}"))
        assert ("audio" in row["modalities"]) == (i != NO_AUDIO)
    assert Card.from_json((tmp_path / "out" / "dataset.json").read_text()).counts["written"] == 12


def test_layouts_give_identical_shards(tmp_path, raw_folders, raw_stems, raw_tars):
    ref = build_dataset(raw_folders, tmp_path / "folders", ONE, progress=False)
    assert ref.counts["written"] == 12
    want = output_files(tmp_path / "folders")
    stems = build_dataset(raw_stems, tmp_path / "stems", ONE, progress=False)
    assert stems.counts["written"] == 12
    for fmt in ("csv", "jsonl", "parquet"):
        (tmp_path / fmt).mkdir()
        manifest = write_manifest(tmp_path / fmt, fmt=fmt)
        build_dataset(manifest, tmp_path / f"out-{fmt}", ONE, progress=False)
        got = output_files(tmp_path / f"out-{fmt}")
        for name in ("train-000000.tar", "index.parquet", "rejects.jsonl"):
            assert got[name] == want[name], (fmt, name)
    assert output_files(tmp_path / "stems")["train-000000.tar"] == want["train-000000.tar"]


def test_webdataset_layout_builds_cls_task(raw_tars, tmp_path):
    card = build_dataset(raw_tars, tmp_path / "out", ONE, progress=False)
    assert card.counts["written"] == 12
    assert card.tasks["cls"].classes == ("0", "1", "2")
    samples = read_tar_samples(tmp_path / "out" / "train-000000.tar")
    assert {json.loads(m["json"])["labels"]["cls"] for m in samples.values()} == {0, 1, 2}
    assert all(json.loads(m["json"])["labels"]["cls"] == int(k[1:]) % 3 for k, m in samples.items())
    # a glob pattern finds the same tars
    card2 = build_dataset(str(raw_tars / "part-*.tar"), tmp_path / "out2", ONE, progress=False)
    assert card2.counts["written"] == 12


def test_rebuild_is_byte_identical_for_any_worker_count(tmp_path, monkeypatch):
    from mmdata.build import executors

    raw = write_folders(tmp_path / "raw", n=40)
    cfg = BuildConfig(max_samples=7, split_by="speaker", val=0.25, seed=3)
    build_dataset(raw, tmp_path / "a", BuildConfig(**{**cfg.__dict__, "workers": 1}), progress=False)
    monkeypatch.setattr(executors, "PROBE_WINDOW", 4)  # ship all but the first few records to the pool
    monkeypatch.setattr(executors, "SHIP_ABOVE", 0.0)
    build_dataset(raw, tmp_path / "b", BuildConfig(**{**cfg.__dict__, "workers": 2}), progress=False)
    a, b = output_files(tmp_path / "a"), output_files(tmp_path / "b")
    assert len([n for n in a if n.endswith(".tar")]) >= 4
    assert a == b
    # shuffled before sharding: a shard is not a run of consecutive ids
    first = sorted(read_tar_samples(tmp_path / "a" / "train-000000.tar"))
    assert first != [sample_id(i) for i in range(len(first))]


def test_group_splits_never_straddle_and_follow_the_seed(tmp_path):
    raw = write_folders(tmp_path / "raw", n=24)

    def splits_of(seed, out):
        cfg = BuildConfig(workers=1, split_by="speaker", val=0.25, test_groups=("dan",), seed=seed)
        build_dataset(raw, tmp_path / out, cfg, progress=False)
        rows = pq.read_table(tmp_path / out / "index.parquet").to_pylist()
        return {r["source_id"]: r["split"] for r in rows}

    got = splits_of(0, "a")
    by_speaker: dict[str, set] = {}
    for sid, split in got.items():
        by_speaker.setdefault(SPEAKERS[int(sid[1:]) % 4], set()).add(split)
    assert all(len(s) == 1 for s in by_speaker.values())
    assert by_speaker["dan"] == {"test"}
    assert sorted(s for v in by_speaker.values() for s in v) == ["test", "train", "train", "val"]
    assert splits_of(0, "b") == got
    # another seed may pick another val speaker (whole groups still)
    val_speakers = {SPEAKERS[int(sid[1:]) % 4] for s in range(1, 6)
                    for sid, split in splits_of(s, f"s{s}").items() if split == "val"}
    assert len(val_speakers) > 1 and "dan" not in val_speakers


def test_layout_split_folders_are_kept(tmp_path):
    raw = write_folders(tmp_path / "raw", n=12, splits=True)
    card = build_dataset(raw, tmp_path / "out", ONE, progress=False)
    assert list(card.splits) == ["train", "test"]
    assert card.splits["test"].num_samples == 3


# webdataset.WebDataset leaves each shard's file for the garbage collector to close (its group_by_keys
# never closes the stream it was given): the warning is the library's, not ours
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_shards_read_by_webdataset_library(raw_folders, tmp_path):
    import webdataset as wds

    build_dataset(raw_folders, tmp_path / "out", BuildConfig(workers=1, max_samples=5), progress=False)
    seen = []
    for shard in sorted((tmp_path / "out").glob("train-*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            assert "." not in sample["__key__"]
            meta = json.loads(sample["json"])
            i = int(meta["id"][1:])
            assert ("png" in sample or "jpg" in sample) and ("flac" in sample) == (i != NO_AUDIO)
            seen.append(i)
    assert sorted(seen) == list(range(12))


def test_declared_tasks_and_regression_from_config(tmp_path):
    (tmp_path / "raw").mkdir()
    manifest = write_manifest(tmp_path / "raw", fmt="jsonl")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["score"] = i / 2 + 0.25
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_text = "tasks:\n  even: {type: classification, classes: [even, odd], column: parity}\n  score: {type: regression}\n"
    (tmp_path / "b.yaml").write_text(yaml_text)
    cfg = BuildConfig.from_yaml(tmp_path / "b.yaml").with_overrides(["workers=1", "audio_format=wav"])
    card = build_dataset(manifest, tmp_path / "out", cfg, progress=False)
    assert [t.name for t in card.tasks] == ["even", "score"] and card.modalities["audio"]["format"] == "wav"
    table = pq.read_table(tmp_path / "out" / "index.parquet")
    assert table.schema.field(LABEL_PREFIX + "score").type.value_type == pa.float64()
    for row in table.to_pylist():
        i = int(row["source_id"][1:])
        assert row[LABEL_PREFIX + "score"] == [i / 2 + 0.25] and row[LABEL_PREFIX + "even"] == i % 2
    with pytest.raises(ConfigError, match="unknown build config keys"):
        BuildConfig.from_dict({"max_sample": 3})
    with pytest.raises(ConfigError, match="max_samples must be positive"):
        BuildConfig(max_samples=0)


def test_refuses_to_overwrite_without_flag(raw_folders, tmp_path):
    build_dataset(raw_folders, tmp_path / "out", ONE, progress=False)
    with pytest.raises(ConfigError, match="--overwrite"):
        build_dataset(raw_folders, tmp_path / "out", ONE, progress=False)
    (tmp_path / "out" / "notes.md").write_text("mine")
    card = build_dataset(raw_folders, tmp_path / "out", BuildConfig(workers=1, max_samples=5), overwrite=True,
                         progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [n for n in names if n.endswith(".tar")] == [s.file for s in card.splits["train"].shards]
    assert "notes.md" in names  # only the dataset's own files are replaced


def test_sample_data_manifest_and_folders_agree(tmp_path):
    from mmdata.cli import main

    args = ["--split-by", "speaker", "--test-groups", "george", "--val", "0.15", "--no-progress"]
    assert main(["build", str(SAMPLE_DATA), str(tmp_path / "f"), *args]) == 0
    assert main(["build", str(SAMPLE_DATA / "manifest.csv"), str(tmp_path / "m"), *args, "--workers", "2"]) == 0
    f, m = output_files(tmp_path / "f"), output_files(tmp_path / "m")
    assert [n for n in f if n.endswith(".tar")] == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    for name in f:
        if name not in ("dataset.json", "README.md"):  # the card, and the README drawn from it, name the layout
            assert f[name] == m[name], name
    card = Card.from_json(f["dataset.json"].decode())
    assert card.counts == {"input": 200, "written": 200, "rejected": {}}
    assert card.splits["test"].label_counts["speaker"]["george"] == 50
    assert (tmp_path / "f" / "tokenizer" / "tokenizer.json").is_file()
    index = pq.read_table(tmp_path / "f" / "index.parquet")
    assert np.all(np.asarray(index.column("audio_seconds").to_pylist()) > 0)


def test_a_full_disk_is_an_error_not_a_short_shard(tmp_path):
    from mmdata.build.assemble import ShardFile
    from mmdata.format import PARTIAL_SUFFIX, sample_block

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    (tmp_path / ("train-000000.tar" + PARTIAL_SUFFIX)).symlink_to("/dev/full")  # every write fails: ENOSPC
    shard = ShardFile("train-000000.tar", tmp_path / "train-000000.tar")
    with pytest.raises(OSError, match="space"):
        for i in range(300):
            shard.start_sample()
            shard.add(sample_block(f"k{i}", {"txt": b"x" * 5000, "json": b"{}"}))
        shard.finish()
    shard.abandon()
    assert not (tmp_path / "train-000000.tar").exists()


def test_shard_file_writes_the_same_bytes_from_spans_and_from_bytes(tmp_path):
    """The one shard writer: spans of a spill file copied by the kernel, or bytes (Ray, tests), give one shard."""
    import hashlib
    import os
    import tarfile

    from mmdata.build.assemble import ShardFile, Span
    from mmdata.format import sample_block

    blocks = [sample_block(f"k{i}", {"png": bytes([i]) * (100 * i + 1), "txt": f"t{i}".encode(), "json": b"{}"})
              for i in range(30)]
    spill = tmp_path / "spill.bin"
    spill.write_bytes(b"".join(blocks))
    fd = os.open(spill, os.O_RDONLY)
    on_disk = ShardFile("train-000000.tar", tmp_path / "train-000000.tar")
    in_memory = ShardFile("train-000000.tar")
    pos = 0
    for block in blocks:
        on_disk.start_sample()
        on_disk.add(Span(fd, pos, len(block)))
        in_memory.start_sample()
        in_memory.add(block)
        pos += len(block)
    a, b = on_disk.finish(), in_memory.finish()
    os.close(fd)
    data = (tmp_path / "train-000000.tar").read_bytes()
    assert data == in_memory.data and a == b
    assert (a.bytes, a.sha256, a.samples) == (len(data), hashlib.sha256(data).hexdigest(), 30)
    assert on_disk.offsets == in_memory.offsets and on_disk.offsets[1] == len(blocks[0])
    with tarfile.open(tmp_path / "train-000000.tar") as tar:  # any tar reader reads it
        assert len(tar.getnames()) == 90 and tar.extractfile("k3.png").read() == bytes([3]) * 301


def test_shards_are_cut_by_samples_and_by_bytes():
    from mmdata.build.assemble import cut
    from mmdata.format import archive_bytes

    sizes = np.array([5120] * 10)
    assert cut(sizes, max_samples=4, max_bytes=1 << 30) == [0, 4, 8]
    limit = archive_bytes(3 * 5120)  # three samples fit with the end blocks, a fourth does not
    assert cut(sizes, max_samples=100, max_bytes=limit) == [0, 3, 6, 9]
    assert cut(np.array([1 << 20, 10]), max_samples=100, max_bytes=1024) == [0, 1]  # an oversized sample: alone
    assert cut(np.array([], dtype=np.int64), 5, 1 << 20) == []


def _pid(job: int) -> int:
    import os

    return os.getpid()


@pytest.mark.parametrize("seconds,shipped", [(0.0, False), (0.002, True)])
def test_local_executor_ships_only_work_that_pays_for_it(seconds, shipped):
    import itertools
    import os

    from mmdata.build.executors import PROBE_WINDOW, LocalExecutor

    ticks = itertools.count()  # a clock on which every job takes exactly `seconds`: no timing in the test
    ex = LocalExecutor(workers=2, clock=lambda: next(ticks) * seconds)
    try:
        pids = list(ex.map(_pid, range(PROBE_WINDOW + 100)))
        assert (ex.pool is not None) == shipped  # no process is forked for work that stays here
    finally:
        ex.close()
    assert len(pids) == PROBE_WINDOW + 100
    assert pids[:PROBE_WINDOW] == [os.getpid()] * PROBE_WINDOW  # timed here first
    assert (set(pids[PROBE_WINDOW:]) != {os.getpid()}) == shipped


def test_shipped_jobs_are_read_at_most_a_window_ahead(monkeypatch):
    """The pool's feeding thread must not read a whole manifest ahead: memory stays bounded."""
    import itertools
    import time

    from mmdata.build import executors

    monkeypatch.setattr(executors, "SHIP_WINDOW", 32)
    monkeypatch.setattr(executors, "CHUNK_SECONDS", 0.008)  # 4 jobs a message: the window, not the chunks, bounds
    pulled = [0]

    def jobs():
        for i in range(400):
            pulled[0] += 1
            yield i

    ticks = itertools.count()
    ex = executors.LocalExecutor(workers=2, clock=lambda: next(ticks) * 0.002)  # every job "slow": shipped
    try:
        results = ex.map(abs, jobs())
        got = [next(results) for _ in range(executors.PROBE_WINDOW + 10)]
        time.sleep(0.5)  # let the feeding thread run as far as it may
        assert pulled[0] <= executors.PROBE_WINDOW + 10 + 32 + 1  # taken + the window (+ one waiting), not 400
        got += list(results)
    finally:
        ex.close()
    assert got == list(range(400)) and pulled[0] == 400


def test_read_file_reads_to_the_end_whatever_the_size_hint_but_never_past_its_limit(tmp_path):
    import os

    from mmdata.build.guard import Refused, read_file

    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * 40)
    assert read_file(str(p)) == p.read_bytes()
    assert read_file(str(p), size=10) == p.read_bytes()  # the file grew since it was looked at
    assert read_file(str(p), size=1 << 20) == p.read_bytes()  # or shrank
    assert read_file(str(p), limit=4) == bytes(range(4))
    (tmp_path / "empty").write_bytes(b"")
    assert read_file(str(tmp_path / "empty")) == b""
    with pytest.raises(Refused, match="grew past the limit of 100 bytes"):
        read_file(str(p), size=10, max_bytes=100)
    with pytest.raises(Refused, match="more than the limit"):
        read_file(str(p), max_bytes=100)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(Refused, match="a FIFO"):  # at once: the open does not wait for a writer
        read_file(str(tmp_path / "fifo"))


def test_realdir_agrees_with_realpath_through_links(tmp_path):
    import os

    from mmdata.build.guard import realdir as _realdir

    (tmp_path / "root" / "a" / "b").mkdir(parents=True)
    (tmp_path / "out" / "c").mkdir(parents=True)
    (tmp_path / "root" / "link").symlink_to(tmp_path / "out")
    (tmp_path / "root" / "a" / "hop").symlink_to("../link")
    _realdir.cache_clear()
    for rel in ["a", "a/b", "a/b/..", "a/./b", "link", "link/c", "a/hop/c", "a/hop/../a", "missing/x", "a//b"]:
        path = f"{tmp_path}/root/{rel}"
        assert _realdir(path) == os.path.realpath(path), rel
