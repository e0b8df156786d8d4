"""Scaling out: Ray builds byte-identical to local ones; datasets on a loopback S3 server, streamed and cached."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

from mmdata.cli import main
from mmdata.errors import ConfigError

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
BUILD_ARGS = ["--val", "0.2", "--max-samples", "5", "--max-bytes", "60000", "--set", "max_reject_fraction=0.1",
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


def test_ray_build_is_byte_identical_to_local(raw_slice, local_build, ray_session, tmp_path):
    out = tmp_path / "ray"
    assert main(["build", str(raw_slice), str(out), *BUILD_ARGS, "--executor", "ray"]) == 0
    local, ray = output_files(local_build), output_files(out)
    shards = [n for n in local if n.endswith(".tar")]
    assert len(shards) >= 8 and "tokenizer/tokenizer.json" in local  # several shards per split, cut by both limits
    assert sorted(local) == sorted(ray)
    for name in local:
        assert local[name] == ray[name], name
    assert b'"empty_file"' in local["rejects.jsonl"]


def test_ray_build_writes_straight_to_s3(raw_slice, local_build, ray_session, s3):
    import s3fs

    from mmdata.build import BuildConfig, build_dataset

    config = BuildConfig(val=0.2, max_samples=5, max_bytes=60000, max_reject_fraction=0.1)
    build_dataset(raw_slice, "s3://bucket/ray", config, executor="ray", storage_options=s3, progress=False)
    fs = s3fs.S3FileSystem(**s3)
    for name, data in output_files(local_build).items():
        assert fs.cat_file(f"bucket/ray/{name}") == data, name


def test_s3_build_refuses_a_non_empty_destination_and_replaces_with_overwrite(raw_slice, s3, capsys):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.pipe_file("bucket/busy/train-000099.tar", b"old")
    fs.pipe_file("bucket/busy/notes.md", b"mine")
    args = ["build", str(raw_slice), "s3://bucket/busy", *BUILD_ARGS, "--storage-options", _json(s3)]
    assert main(args) != 0
    assert "'s3://bucket/busy' is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("bucket/busy", refresh=True)}
    assert "train-000099.tar" not in names and {"notes.md", "dataset.json", "index.parquet"} <= names


def _json(opts: dict) -> str:
    import json

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
