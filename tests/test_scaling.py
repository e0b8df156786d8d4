"""Scaling out: Ray builds byte-identical to local ones; datasets on a loopback S3 server, streamed and cached."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from mmdata.cli import main
from mmdata.errors import ConfigError

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
BUILD_ARGS = ["--val", "0.2", "--max-samples", "5", "--max-bytes", "51200", "--set", "max_reject_fraction=0.1",
              "--no-progress"]


def output_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw_slice(tmp_path_factory) -> Path:
    """40 records of sample_data behind a manifest, plus one with an empty text file (a reject)."""
    root = tmp_path_factory.mktemp("raw")
    with open(SAMPLE_DATA / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::5][:40]
    for r in rows:
        shutil.copytree(SAMPLE_DATA / r["id"], root / r["id"])
    bad = dict(rows[0], id="broken")
    (root / "broken").mkdir()
    shutil.copy(root / rows[0]["id"] / "image.png", root / "broken" / "image.png")
    (root / "broken" / "text.txt").write_bytes(b"")
    bad.update(image="broken/image.png", audio="", text="broken/text.txt")
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([*rows, bad])
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def local_build(raw_slice, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "ds"
    assert main(["build", str(raw_slice), str(out), *BUILD_ARGS, "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket ``bucket``; yields the fsspec storage options that reach it."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **opts["client_kwargs"]).create_bucket(Bucket="bucket")
    yield opts
    server.stop()


def test_ray_build_is_byte_identical_to_local(raw_slice, local_build, ray_session, tmp_path, monkeypatch):
    from mmdata.build import executors

    def fetch(*args):  # the tokenizer's texts come back with the shards' write tasks
        raise AssertionError("a packed record was fetched to the driver")

    monkeypatch.setattr(executors.RayExecutor, "_fetch", fetch)
    kept = []  # what the driver holds for the tokenizer: one object per train shard, none per record
    keep = executors.RayExecutor._keep_texts
    monkeypatch.setattr(executors.RayExecutor, "_keep_texts",
                        lambda self, name, *rest: (keep(self, name, *rest), kept.append(len(self._texts)))[0])
    out = tmp_path / "ray"
    assert main(["build", str(raw_slice), str(out), *BUILD_ARGS, "--executor", "ray"]) == 0
    local, ray = output_files(local_build), output_files(out)
    assert "tokenizer/tokenizer.json" in local
    card = json.loads(local["dataset.json"])
    assert max(kept) <= len(card["splits"]["train"]["shards"]) < card["splits"]["train"]["samples"]
    counts = [[s["samples"] for s in split["shards"]] for split in card["splits"].values()]
    assert any(5 in c for c in counts) and any(n < 5 for c in counts for n in c[:-1])  # cut by both limits
    assert sorted(local) == sorted(ray)
    for name in local:
        assert local[name] == ray[name], name
    assert b'"empty_file"' in local["rejects.jsonl"]


def test_ray_build_writes_straight_to_s3(raw_slice, local_build, ray_session, s3):
    import s3fs

    from mmdata.build import BuildConfig, build_dataset

    config = BuildConfig(val=0.2, max_samples=5, max_bytes=51200, max_reject_fraction=0.1)
    build_dataset(raw_slice, "s3://bucket/ray", config, executor="ray", storage_options=s3, progress=False)
    fs = s3fs.S3FileSystem(**s3)
    for name, data in output_files(local_build).items():
        assert fs.cat_file(f"bucket/ray/{name}") == data, name


def test_s3_build_refuses_a_non_empty_destination_and_replaces_with_overwrite(raw_slice, s3, capsys):
    import s3fs

    from mmdata.card import Card, ShardInfo, SplitInfo
    from mmdata.tasks import TaskList

    fs = s3fs.S3FileSystem(**s3)
    old = Card({}, TaskList(()), {"train": SplitInfo((ShardInfo("train-000099.tar", 1, 3, "0" * 64),))})
    fs.pipe_file("bucket/busy/dataset.json", old.to_json().encode())  # an old dataset: its shard is ours
    fs.pipe_file("bucket/busy/train-000099.tar", b"old")
    fs.pipe_file("bucket/busy/notes.md", b"mine")
    fs.pipe_file("bucket/busy/backup-000001.tar", b"mine too")  # named like a shard, listed by no card
    args = ["build", str(raw_slice), "s3://bucket/busy", *BUILD_ARGS, "--storage-options", _json(s3)]
    assert main(args) != 0
    assert "'s3://bucket/busy' is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("bucket/busy", refresh=True)}
    assert "train-000099.tar" not in names
    assert {"notes.md", "backup-000001.tar", "dataset.json", "index.parquet"} <= names


def _json(opts: dict) -> str:
    return json.dumps(opts)


def test_unsupported_executor_choices_are_named(raw_slice, tmp_path):
    from mmdata.build import build_dataset

    with pytest.raises(ConfigError, match="--resume works with --executor local"):
        build_dataset(raw_slice, tmp_path / "o", executor="ray", resume=True)
    with pytest.raises(ConfigError, match="executor must be one of"):
        build_dataset(raw_slice, tmp_path / "o", executor="spark")
    with pytest.raises(ConfigError, match="needs --executor ray"):
        build_dataset(raw_slice, tmp_path / "o", ray_address="auto")


# ---- the local shard cache -------------------------------------------------------------------------------


def _fetcher(calls: list, payload: dict):
    def fetch_for(url):
        def fetch(path):
            calls.append(url)
            Path(path).write_bytes(payload[url])
        return fetch
    return fetch_for


def _read(fd: int) -> bytes:
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def test_cache_keeps_the_most_recently_used_copies_within_its_limit(tmp_path):
    from mmdata.cache import ShardCache

    payload = {f"s3://b/ds/train-{i:06d}.tar": bytes([i]) * 100 for i in range(5)}
    urls = list(payload)
    calls: list = []
    fetch = _fetcher(calls, payload)
    cache = ShardCache(tmp_path / "c", max_bytes=250)
    assert _read(cache.open(urls[0], fetch(urls[0]), size=100)) == payload[urls[0]]
    assert _read(cache.open(urls[1], fetch(urls[1]), size=100)) == payload[urls[1]]
    assert _read(cache.open(urls[0], fetch(urls[0]), size=100)) == payload[urls[0]]  # a hit: no fetch
    assert calls == urls[:2]
    assert _read(cache.open(urls[2], fetch(urls[2]), size=100)) == payload[urls[2]]
    assert cache.usage() <= 250
    calls.clear()
    _read(cache.open(urls[0], fetch(urls[0])))  # recently used: kept
    _read(cache.open(urls[1], fetch(urls[1])))  # least recently used: was evicted
    assert calls == [urls[1]]


def test_cache_ignores_and_cleans_a_stale_partial_download(tmp_path):
    from mmdata.cache import ShardCache

    url = "s3://b/ds/train-000000.tar"
    cache = ShardCache(tmp_path / "c", max_bytes=1000)
    stale = cache.entries / f"{cache.name(url)}.4242.partial"
    stale.write_bytes(b"half")
    calls: list = []
    assert _read(cache.open(url, _fetcher(calls, {url: b"whole"})(url), size=5)) == b"whole"
    assert calls == [url]
    stale.write_bytes(b"half")  # a crash left it; the next cache on this folder removes it
    ShardCache(tmp_path / "c", max_bytes=1000)
    assert not stale.exists() and (cache.entries / cache.name(url)).read_bytes() == b"whole"


def test_cache_rejects_a_download_of_the_wrong_size_and_keeps_nothing(tmp_path):
    from mmdata.cache import ShardCache
    from mmdata.errors import CorruptShardError

    url = "s3://b/ds/train-000000.tar"
    cache = ShardCache(tmp_path / "c", max_bytes=1000)
    with pytest.raises(CorruptShardError, match="train-000000.tar.*has 3 bytes but the card says 9"):
        cache.open(url, lambda p: Path(p).write_bytes(b"abc"), size=9)
    assert list(cache.entries.iterdir()) == []


def test_cache_downloads_once_under_concurrent_readers(tmp_path):
    import threading
    import time

    from mmdata.cache import ShardCache

    url = "s3://b/ds/train-000000.tar"
    calls: list = []

    def slow_fetch(path):
        calls.append(path)
        time.sleep(0.2)
        Path(path).write_bytes(b"x" * 64)

    results: list = []

    def reader():  # each thread its own ShardCache: locks are taken as separate processes would
        results.append(_read(ShardCache(tmp_path / "c", max_bytes=1000).open(url, slow_fetch, size=64)))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [b"x" * 64] * 4 and len(calls) == 1


# ---- streaming from the loopback S3 server ----------------------------------------------------------------

def _loader(ds, **kw):
    from mmdata import LoaderConfig, make_loader

    args = {"batch_size": 4, "seed": 3, "config": LoaderConfig(audio_seconds=0.25, pin_memory=False), **kw}
    return make_loader(ds, "train", **args)


def _copy_to_s3(local: Path, url: str, opts: dict) -> None:
    from mmdata.storage import Storage, publish

    publish(local, Storage(url, opts))


@pytest.fixture(scope="module")
def s3_dataset(raw_slice, s3) -> str:
    url = "s3://bucket/ds"
    assert main(["build", str(raw_slice), url, *BUILD_ARGS, "--storage-options", _json(s3)]) == 0
    return url


def test_s3_dataset_streams_like_local_files(s3_dataset, s3, local_build):
    import torch

    from mmdata import open_dataset

    remote, local = open_dataset(s3_dataset, storage_options=s3), open_dataset(local_build)
    got = list(_loader(remote, num_workers=2))
    want = list(_loader(local, num_workers=2))  # the order depends on the worker count
    assert [b.keys for b in got] == [b.keys for b in want]
    assert sorted(k for b in got for k in b.keys) == sorted(local.index("train")["key"].to_pylist())
    for g, w in zip(got, want):
        assert torch.equal(g.image, w.image) and torch.equal(g.audio, w.audio) and torch.equal(g.text_ids, w.text_ids)
        assert all(torch.equal(g.labels[t], w.labels[t]) for t in w.labels)


def test_s3_ranks_are_equal_and_cover_and_resume_exactly(s3_dataset, s3):
    from mmdata import open_dataset

    ds = open_dataset(s3_dataset, storage_options=s3)
    per_rank = [[b.keys for b in _loader(ds, rank=r, world_size=2, drop_last=False)] for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(_loader(ds, rank=0, world_size=2))
    seen = [k for keys in per_rank for b in keys for k in b]
    assert set(seen) == set(ds.index("train")["key"].to_pylist())
    first = _loader(ds, rank=1, world_size=2)
    it = iter(first)
    head = [next(it).keys for _ in range(2)]
    fresh = _loader(open_dataset(s3_dataset, storage_options=s3), rank=1, world_size=2)
    fresh.load_state_dict(first.state_dict())
    assert head + [b.keys for b in fresh] == per_rank[1]


def test_shard_deleted_on_the_server_is_named(local_build, s3):
    import s3fs

    from mmdata import open_dataset
    from mmdata.errors import CorruptShardError

    _copy_to_s3(local_build, "s3://bucket/gone", s3)
    ds = open_dataset("s3://bucket/gone", storage_options=s3)
    victim = ds.card.splits["train"].shards[1].file
    s3fs.S3FileSystem(**s3).rm_file(f"bucket/gone/{victim}")
    with pytest.raises(CorruptShardError, match=f"{victim}.*missing"):
        list(_loader(ds, shuffle=False))


def test_second_epoch_reads_the_cache_within_its_limit(local_build, s3, tmp_path):
    import s3fs

    from mmdata import open_dataset

    _copy_to_s3(local_build, "s3://bucket/cached", s3)
    ds = open_dataset("s3://bucket/cached", storage_options=s3, cache_dir=tmp_path / "big", cache_bytes=1 << 30)
    shards = ds.card.splits["train"].shards
    loader = _loader(ds)
    first = sorted(k for b in loader for k in b.keys)
    cached = sorted((tmp_path / "big" / "entries").iterdir())
    assert len(cached) == len(shards) and sum(p.stat().st_size for p in cached) == sum(s.bytes for s in shards)
    fs = s3fs.S3FileSystem(**s3)
    for s in shards:  # the server loses every shard: epoch 2 is served from the cache alone
        fs.rm_file(f"bucket/cached/{s.file}")
    loader.set_epoch(1)
    assert sorted(k for b in loader for k in b.keys) == first
    _copy_to_s3(local_build, "s3://bucket/small", s3)
    limit = 2 * max(s.bytes for s in shards)
    small = open_dataset("s3://bucket/small", storage_options=s3, cache_dir=tmp_path / "small", cache_bytes=limit)
    assert sorted(k for b in _loader(small, num_workers=2) for k in b.keys) == first  # two processes share it
    assert 0 < sum(p.stat().st_size for p in (tmp_path / "small" / "entries").iterdir()) <= limit


def test_build_from_a_manifest_on_s3_equals_the_local_build(raw_slice, local_build, s3, tmp_path):
    import s3fs

    s3fs.S3FileSystem(**s3).put(str(raw_slice.parent), "bucket/raw", recursive=True)
    out = tmp_path / "from-s3"
    args = ["build", "s3://bucket/raw/manifest.csv", str(out), *BUILD_ARGS, "--storage-options", _json(s3)]
    assert main(args) == 0
    assert output_files(out) == output_files(local_build)


def test_an_interrupted_publish_leaves_no_dataset_until_the_card_is_written(local_build, s3, monkeypatch):
    from mmdata import open_dataset
    from mmdata.errors import DatasetNotFoundError
    from mmdata.storage import Storage, publish

    url = "s3://bucket/commit"
    _copy_to_s3(local_build, url, s3)
    assert open_dataset(url, storage_options=s3).num_samples("train") == 32
    real, calls = Storage.upload, []

    def failing(self, local, name):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("connection reset")  # the build dies here
        real(self, local, name)

    monkeypatch.setattr(Storage, "upload", failing)
    with pytest.raises(OSError, match="connection reset"):
        publish(local_build, Storage(url, s3))
    with pytest.raises(DatasetNotFoundError, match="no dataset.json"):
        open_dataset(url, storage_options=s3)  # the old card went first: no mix of old card and new shards
    assert "dataset.json" not in calls
    order = []
    monkeypatch.setattr(Storage, "upload", lambda self, local, name: order.append(name) or real(self, local, name))
    publish(local_build, Storage(url, s3))
    assert order[-1] == "dataset.json" and len(order) == len(output_files(local_build))
    assert open_dataset(url, storage_options=s3).num_samples("train") == 32


def test_retries_transient_errors_and_not_missing_files():
    from mmdata.storage import RetryPolicy, with_retries

    fast = RetryPolicy(attempts=3, base_delay=0)
    tries = []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionError("reset by peer")
        return b"ok"

    assert with_retries(flaky, "reading x", fast) == b"ok" and len(tries) == 3
    tries.clear()
    with pytest.raises(ConnectionError):  # still failing after its last attempt
        with_retries(flaky, "reading x", RetryPolicy(attempts=2, base_delay=0))
    assert len(tries) == 2
    missing = []

    def gone():
        missing.append(1)
        raise FileNotFoundError("bucket/ds/train-000003.tar")

    with pytest.raises(FileNotFoundError):
        with_retries(gone, "reading x", fast)
    assert len(missing) == 1
