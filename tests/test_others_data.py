"""Data that other tools made: img2dataset and ShardWriter shards, damaged tars, our own datasets rebuilt."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, write_folders

from mmdata.build import BuildConfig, build_dataset
from mmdata.card import Card
from mmdata.errors import ConfigError
from mmdata.format import CARD_NAME

ROOT = Path(__file__).resolve().parents[1]
CONFIG = BuildConfig(workers=1, tokenizer_vocab=40, max_reject_fraction=1.0)
ANIMALS = ("cat", "dog", "eel")


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar (as ShardWriter and img2dataset write them: ustar headers, members in order)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_shards(root: Path, n: int = 6) -> Path:
    """img2dataset's output: 00000.tar with KEY.jpg/.txt/.json, and its side .parquet and _stats.json."""
    root.mkdir(parents=True)
    members = []
    for i in range(n):
        key = f"{i:09d}"
        meta = {"url": f"https://example.com/{i}.jpg", "caption": f"photo {i}", "key": key, "status": "success",
                "error_message": None, "width": 8, "height": 8, "original_width": 640, "exif": "{}",
                "sha256": f"{i:064x}", "label": i % 3, "class_name": ANIMALS[i % 3]}
        members += [(f"{key}.jpg", image_bytes(i, "jpg")), (f"{key}.txt", f"photo {i}".encode()),
                    (f"{key}.json", json.dumps(meta).encode())]
    _tar(root / "00000.tar", members)
    (root / "00000_stats.json").write_text(json.dumps({"count": n, "successes": n}))
    import pyarrow as pa

    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(n)]}), root / "00000.parquet")
    return root


def rows_of(out: Path) -> list[dict]:
    return pq.read_table(out / "index.parquet").to_pylist()


def sample_jsons(out: Path) -> dict[str, dict]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    d = json.loads(tar.extractfile(m).read())
                    found[d["id"]] = d
    return found


def test_img2dataset_shards_keep_every_sample_label_and_field(tmp_path, caplog):
    src = img2dataset_shards(tmp_path / "crawl")
    caplog.set_level("INFO", logger="mmdata")
    card = build_dataset(src, tmp_path / "out", CONFIG, progress=False)
    assert card.counts == {"input": 6, "written": 6, "rejected": {}}
    assert "labels from the shards' json fields ['class_name', 'label']" in caplog.text
    tasks = {t.name: t.classes for t in card.tasks}
    assert tasks == {"class_name": ANIMALS, "label": ("0", "1", "2")}
    got = sample_jsons(tmp_path / "out")
    assert set(got) == {f"{i:09d}" for i in range(6)}
    for i in range(6):
        d = got[f"{i:09d}"]
        assert ANIMALS[d["labels"]["class_name"]] == ANIMALS[i % 3]
        assert d["meta"]["url"] == f"https://example.com/{i}.jpg" and d["meta"]["width"] == 8
        assert d["meta"]["sha256"] == f"{i:064x}" and "label" not in d["meta"]
    index = pq.read_table(tmp_path / "out" / "index.parquet")  # the meta fields, filterable
    by_id = {r["source_id"]: r for r in index.to_pylist()}
    assert by_id["000000004"]["meta.url"] == "https://example.com/4.jpg"
    assert index.schema.field("meta.width").type == "int64" and index.schema.field("meta.caption").type == "string"


def test_a_declared_task_reads_a_json_field_and_infers_its_classes(tmp_path):
    src = img2dataset_shards(tmp_path / "crawl")
    (tmp_path / "b.yaml").write_text("tasks:\n  animal: {type: classification, column: class_name}\n"
                                     "  wide: {type: regression, column: original_width}\n")
    config = BuildConfig.from_yaml(tmp_path / "b.yaml").with_overrides(["workers=1", "tokenizer_vocab=40"])
    card = build_dataset(src, tmp_path / "out", config, progress=False)
    assert [(t.name, t.type, t.classes) for t in card.tasks] == [("animal", "classification", ANIMALS),
                                                                  ("wide", "regression", ())]
    assert card.splits["train"].label_counts["animal"] == {"cat": 2, "dog": 2, "eel": 2, "missing": 0}
    (tmp_path / "c.yaml").write_text("tasks:\n  animal: {type: classification, column: species}\n")
    with pytest.raises(ConfigError, match=r"reads column 'species', which no record has.*'class_name'"):
        build_dataset(src, tmp_path / "out2", BuildConfig.from_yaml(tmp_path / "c.yaml"), progress=False)


def test_a_dotted_column_reaches_into_nested_json(tmp_path):
    members = []
    for i in range(4):
        members += [(f"k{i}.png", image_bytes(i)), (f"k{i}.json", json.dumps({"meta": {"label": ANIMALS[i % 2]}}).encode())]
    _tar((tmp_path / "src").mkdir() or tmp_path / "src" / "a.tar", members)
    config = BuildConfig(workers=1, tasks=BuildConfig.from_dict(
        {"tasks": {"animal": {"type": "classification", "column": "meta.label"}}}).tasks)
    card = build_dataset(tmp_path / "src", tmp_path / "out", config, progress=False)
    assert card.splits["train"].label_counts["animal"] == {"cat": 2, "dog": 2, "missing": 0}


def test_shardwriter_shards_named_by_split_keep_their_splits(tmp_path):
    import webdataset as wds

    src = tmp_path / "sw"
    src.mkdir()
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        with wds.ShardWriter(str(src / f"{split}-%06d.tar"), maxcount=4, verbose=0) as w:
            for i in range(n):
                w.write({"__key__": f"{split}{i}", "png": image_bytes(i), "cls": i % 2})
    card = build_dataset(src, tmp_path / "out", CONFIG, progress=False)
    assert {s: info.num_samples for s, info in card.splits.items()} == {"train": 5, "val": 2, "test": 3}
    assert [(t.name, t.classes) for t in card.tasks] == [("cls", ("0", "1"))]
    assert Counter(r["split"] for r in rows_of(tmp_path / "out")) == {"train": 5, "val": 2, "test": 3}
    again = build_dataset(src, tmp_path / "out2", BuildConfig(workers=1, val=0.2, tokenizer_vocab=40),
                          progress=False)  # flags override the file names
    assert set(again.splits) == {"train", "val"}


def test_a_built_dataset_rebuilds_to_the_same_splits_classes_and_labels(tmp_path):
    first = tmp_path / "first"
    build_dataset(ROOT / "sample_data", first, BuildConfig.from_dict(
        {"split_by": "speaker", "test_groups": ["george"], "val": 0.15}), progress=False)
    second = tmp_path / "second"
    card = build_dataset(first, second, BuildConfig(), progress=False)
    a, b = Card.from_json((first / CARD_NAME).read_text()), card
    assert [(t.name, t.type, t.classes) for t in a.tasks] == [(t.name, t.type, t.classes) for t in b.tasks]
    assert {s: i.num_samples for s, i in a.splits.items()} == {s: i.num_samples for s, i in b.splits.items()}
    assert {s: i.label_counts for s, i in a.splits.items()} == {s: i.label_counts for s, i in b.splits.items()}
    key = ("source_id", "split")
    labels = [c for c in pq.read_schema(first / "index.parquet").names if c.startswith("label:")]
    assert (sorted(tuple(r[k] for k in (*key, *labels)) for r in rows_of(first))
            == sorted(tuple(r[k] for k in (*key, *labels)) for r in rows_of(second)))


def _three_samples() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(3):
            for ext, data in (("png", image_bytes(i)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _header_offsets(data: bytes) -> list[tuple[str, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.offset) for m in tar]


def _damaged(kind: str) -> bytes:
    data = bytearray(_three_samples())
    offsets = dict(_header_offsets(bytes(data)))
    if kind == "bad_header":  # a flipped byte in the size field of s1.png's header
        data[offsets["s1.png"] + 130] ^= 0x01
    elif kind == "bad_header_and_name":  # s1.png's whole header is noise
        data[offsets["s1.png"]: offsets["s1.png"] + 512] = bytes(range(256)) * 2
    elif kind == "cut_at_header":
        data = data[: offsets["s2.cls"]]
    elif kind == "cut_inside_header":
        data = data[: offsets["s2.png"] + 100]
    elif kind == "cut_inside_data":
        data = data[: offsets["s2.png"] + 600]
    elif kind == "junk_after_member":  # 100 stray bytes after s0.cls: every later header is off the grid
        end = offsets["s1.png"]
        data = data[:end] + bytes([7]) * 100 + data[end:]
    return bytes(data)


@pytest.mark.parametrize("kind", ["bad_header", "bad_header_and_name", "cut_at_header", "cut_inside_header",
                                  "cut_inside_data", "junk_after_member"])
@pytest.mark.parametrize("packed", [False, True])
def test_a_damaged_tar_accounts_for_every_sample(tmp_path, kind, packed):
    src = tmp_path / "src"
    src.mkdir()
    data = _damaged(kind)
    (src / ("part.tar.gz" if packed else "part.tar")).write_bytes(gzip.compress(data, mtime=0) if packed else data)
    card = build_dataset(src, tmp_path / "out", CONFIG, progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert card.counts["written"] + len(rejects) == 3, rejects
    corrupt = [r for r in rejects if r["reason"] == "corrupt_shard"]
    assert corrupt and all("part.tar" in r["message"] and "at byte" in r["message"] for r in corrupt)
    if kind in ("bad_header", "junk_after_member"):  # the damage is found and passed: the rest is kept
        assert card.counts["written"] == 2


def test_dotted_keys_are_explained_by_the_first_dot_rule(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _tar(src / "a.tar", [("img.v1.0001.png", image_bytes(1)), ("img.v1.0002.png", image_bytes(2))])
    build_dataset(src, tmp_path / "out", CONFIG, progress=False)
    (reject,) = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["reason"] == "unsupported_format" and "first dot" in reject["message"]


def test_a_compressed_shard_with_a_huge_member_is_rejected_without_holding_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = bytes(32 * 2**20)  # compresses to 32 kB
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, blob in (("big.png", big), ("big.cls", b"1"), ("ok.png", image_bytes(1)), ("ok.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (src / "a.tgz").write_bytes(data.getvalue())
    del big
    tracemalloc.start()
    card = build_dataset(src, tmp_path / "out", BuildConfig(workers=1, tokenizer_vocab=0, max_file_bytes=2**20,
                                                            max_reject_fraction=1.0), progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert card.counts == {"input": 2, "written": 1, "rejected": {"too_large": 1}}
    assert peak < 8 * 2**20  # the 32 MB member was never held


def test_folder_labels_keep_extra_fields_as_meta(tmp_path):
    raw = write_folders(tmp_path / "raw", n=4)
    for i, d in enumerate(sorted(raw.iterdir())):
        labels = json.loads((d / "labels.json").read_text())
        (d / "labels.json").write_text(json.dumps({**labels, "note": f"n{i}"}))
    config = BuildConfig(workers=1, tokenizer_vocab=40, tasks=BuildConfig.from_dict(
        {"tasks": {"parity": {"type": "classification"}}}).tasks)
    build_dataset(raw, tmp_path / "out", config, progress=False)
    got = sample_jsons(tmp_path / "out")
    assert got["s001"]["meta"] == {"digit": 1, "note": "n1", "speaker": "bob"}
