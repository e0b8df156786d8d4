"""Hugging Face Parquet (Image/Audio structs, ClassLabel names in the metadata) becomes RawRecords; bytes spooled."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import audio_bytes, image_bytes

from mmdata.build import BuildConfig, hfparquet
from mmdata.build.guard import read_member
from mmdata.build.hfparquet import (
    class_names,
    from_parquet,
    is_hf_parquet,
    parquet_files,
    sniff_ext,
    split_of,
)
from mmdata.build.spool import Spool
from mmdata.errors import DatasetNotFoundError, SchemaError

ANIMALS = ("dog", "cat", "eel")  # not sorted: the source order is kept
TAGS = ("red", "blue")
MEDIA = pa.struct({"bytes": pa.binary(), "path": pa.string()})


def hf_rows(first: int, n: int) -> dict[str, list]:
    """Rows first..first+n-1: row i has image i (png if even, else jpg without a path), audio i, label i % 3
    (missing: -1 for i == 4), tags by the bits of i, text "sample i"."""
    idx = range(first, first + n)
    return {
        "image": [{"bytes": image_bytes(i, "png" if i % 2 == 0 else "jpg"), "path": f"img{i}.png" if i % 2 == 0
                   else None} for i in idx],
        "audio": [{"bytes": audio_bytes(i, "wav" if i % 2 == 0 else "flac"), "path": None} for i in idx],
        "label": [-1 if i == 4 else i % 3 for i in idx],
        "text": [f"sample {i}" for i in idx],
        "tags": [[j for j in range(2) if (i >> j) & 1] for i in idx],
    }


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A Hub-style folder written by the real `datasets`: data/train-00000-of-00001.parquet (6 rows) and
    data/test-00000-of-00001.parquet (2 rows, ids continuing at 6)."""
    root = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(root / "home"))):
            mp.setenv(k, v)
        import datasets
        from datasets import Audio, ClassLabel, Features, Image, Sequence, Value

        # Audio() encodes only through torchcodec (absent): the bytes go in as a plain struct, then the
        # column is cast to Audio(), which needs no codec and makes `datasets` write {"_type": "Audio"}
        features = Features({"image": Image(), "audio": {"bytes": Value("binary"), "path": Value("string")},
                             "label": ClassLabel(names=list(ANIMALS)), "text": Value("string"),
                             "tags": Sequence(ClassLabel(names=list(TAGS)))})
        datasets.disable_progress_bars()
        for name, first, n in (("train", 0, 6), ("test", 6, 2)):
            ds = datasets.Dataset.from_dict(hf_rows(first, n), features=features).cast_column("audio", Audio())
            ds.to_parquet(str(root / "ds" / "data" / f"{name}-00000-of-00001.parquet"))
    return root / "ds"


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    yield s
    s.close()


def spooled(ref) -> bytes:
    return read_member(ref.container, ref.offset, ref.size)


def test_hf_parquet_from_datasets(hf_dir, spool):
    files = parquet_files(hf_dir)
    assert [f.name for f in files] == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    assert all(is_hf_parquet(f) for f in files)
    features = json.loads(pq.read_schema(files[1]).metadata[b"huggingface"])["info"]["features"]
    assert features["audio"] == {"_type": "Audio"} and features["image"] == {"_type": "Image"}
    assert class_names(files[0]) == {"label": (list(ANIMALS), False), "tags": (list(TAGS), True)}
    records = from_parquet(files, BuildConfig(), spool)
    spool.close()
    by_index = {int(r.media["text"].data.decode().split()[1]): r for r in records}
    assert sorted(by_index) == list(range(8)) and len(records) == 8
    for i, rec in by_index.items():
        stem = "train-00000-of-00001" if i < 6 else "test-00000-of-00001"
        assert rec.source_id == f"{stem}-{i if i < 6 else i - 6}"
        assert rec.split == ("train" if i < 6 else "test")
        assert not rec.problems
        assert rec.media["image"].ext == ("png" if i % 2 == 0 else "jpg")
        assert spooled(rec.media["image"]) == image_bytes(i, rec.media["image"].ext)
        assert rec.media["audio"].ext == ("wav" if i % 2 == 0 else "flac")
        assert spooled(rec.media["audio"]) == audio_bytes(i, rec.media["audio"].ext)
        assert rec.media["image"].path == f"{stem}.parquet:row{rec.source_id.rsplit('-', 1)[1]}.image"
        assert rec.labels == {"label": None if i == 4 else ANIMALS[i % 3],
                              "tags": [TAGS[j] for j in range(2) if (i >> j) & 1]}


def test_plain_parquet_struct_columns(tmp_path, spool):
    """No metadata: the config's columns name the media; ids, split and nested values from the table."""
    (tmp_path / "data").mkdir()
    img = image_bytes(1)
    table = pa.table({
        "id": ["a", "b", "c", "d"],
        "image": pa.array([{"bytes": img, "path": None}, {"bytes": None, "path": "pics/b.jpg"},
                           {"bytes": None, "path": None}, None], MEDIA),
        "audio": ["a.wav", None, None, None],  # a column of paths, as in a manifest
        "split": ["train", "validation", None, "dev"],
        "score": [0.5, 1.5, 2.5, None],
        "box": [{"x": 1, "y": 2}] * 4,
        "blob": [b"x"] * 4,
    })
    pq.write_table(table, tmp_path / "data" / "frames.parquet")
    files = parquet_files(tmp_path)
    assert files == [tmp_path / "data" / "frames.parquet"] and is_hf_parquet(files[0])
    a, b, c, d = from_parquet(files, BuildConfig(), spool, root=tmp_path)
    spool.close()
    assert [r.source_id for r in (a, b, c, d)] == ["a", "b", "c", "d"]
    assert [r.split for r in (a, b, c, d)] == ["train", "val", None, "val"]
    assert a.media["image"].ext == "png" and spooled(a.media["image"]) == img
    assert b.media["image"].path == "data/pics/b.jpg" and b.media["image"].container is None
    assert a.media["audio"].path == "data/a.wav" and a.media["audio"].ext == "wav"
    assert c.media == {} and d.media == {}
    assert a.labels == {"score": 0.5} and a.fields == {"box": {"x": 1, "y": 2}}  # blob: bytes, not read


def test_too_large_cell_is_a_problem_not_spooled(hf_dir, spool):
    sizes = [len(audio_bytes(i, "wav" if i % 2 == 0 else "flac")) for i in range(6)]  # the largest cells
    records = from_parquet([parquet_files(hf_dir)[1]], BuildConfig(max_file_bytes=max(sizes) - 1), spool)
    spool.close()
    big = [r for r in records if r.problems]
    assert [r.source_id for r in big] == [f"train-00000-of-00001-{i}" for i in range(6) if sizes[i] == max(sizes)]
    assert all(r.problems == [("too_large", r.problems[0][1])] and ".audio has" in r.problems[0][1] for r in big)
    assert all("audio" not in r.media and "image" in r.media for r in big)
    total = sum(ref.size for r in records for ref in r.media.values() if ref.container)
    assert os.path.getsize(spool.path) == total  # nothing of the too-large cells went to the spool


def test_bad_class_index_is_a_bad_label(tmp_path, spool):
    meta = {"info": {"features": {"label": {"names": ["a", "b"], "_type": "ClassLabel"}}}}
    table = pa.table({"image": pa.array([{"bytes": image_bytes(0), "path": None}] * 2, MEDIA), "label": [1, 7]})
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), tmp_path / "train.parquet")
    ok, bad = from_parquet([tmp_path / "train.parquet"], BuildConfig(), spool)
    assert ok.labels == {"label": "b"} and not ok.problems
    assert bad.problems[0][0] == "bad_label" and "7" in bad.problems[0][1]


def test_memory_stays_below_file_size(tmp_path, spool):
    """300 images of 100 kB: the rows are read batch by batch and the bytes are never Python objects."""
    n, size = 300, 100_000
    cells = [{"bytes": b"\x89PNG\r\n\x1a\n" + os.urandom(size), "path": None} for _ in range(n)]
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": pa.array(cells, MEDIA), "label": list(range(n))}), path, row_group_size=100)
    del cells
    tracemalloc.start()
    try:
        records = from_parquet([path], BuildConfig(), spool)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    spool.close()
    assert len(records) == n and os.path.getsize(spool.path) == n * (size + 8)
    assert peak < os.path.getsize(path) / 10, f"peak {peak} bytes for a {os.path.getsize(path)}-byte file"


def test_unreadable_files(tmp_path, spool):
    (tmp_path / "train.parquet").write_bytes(b"not parquet at all")
    os.mkfifo(tmp_path / "test.parquet")
    for name, err in (("train.parquet", SchemaError), ("test.parquet", SchemaError), ("val.parquet",
                                                                                       DatasetNotFoundError)):
        with pytest.raises(err) as e:
            from_parquet([tmp_path / name], BuildConfig(), spool)
        assert name in str(e.value) and "\n" not in str(e.value)
    assert not is_hf_parquet(tmp_path / "train.parquet") and not is_hf_parquet(tmp_path / "test.parquet")


def test_corrupt_row_group_fails_naming_the_file(tmp_path, spool):
    path = tmp_path / "train.parquet"
    cells = [{"bytes": bytes([i]) * 1000, "path": None} for i in range(200)]
    pq.write_table(pa.table({"image": pa.array(cells, MEDIA)}), path, row_group_size=50, compression="snappy")
    chunk = pq.ParquetFile(path).metadata.row_group(2).column(0)
    data = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle:middle + 64] = b"\xab" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(SchemaError, match=r"train\.parquet.*after its first \d+ rows") as e:
        from_parquet([path], BuildConfig(), spool)
    assert "\n" not in str(e.value)


def test_big_row_groups_warn(tmp_path, spool, monkeypatch, caplog):
    pq.write_table(pa.table({"image": pa.array([{"bytes": image_bytes(0), "path": None}], MEDIA)}),
                   tmp_path / "train.parquet")
    monkeypatch.setattr(hfparquet, "BIG_ROW_GROUP", 10)
    assert len(from_parquet([tmp_path / "train.parquet"], BuildConfig(), spool)) == 1
    assert "row groups of" in caplog.text


def test_parquet_files_leaves_other_folders(tmp_path):
    assert parquet_files(tmp_path) is None
    pq.write_table(pa.table({"id": ["a"], "digit": [1]}), tmp_path / "labels.parquet")
    assert parquet_files(tmp_path) is None  # a stems folder's label table is not a dataset
    (tmp_path / "train.parquet").mkdir()  # Spark writes folders of part files
    assert parquet_files(tmp_path) is None


def test_split_of():
    names = {"train-00000-of-00002.parquet": "train", "training.parquet": "train", "validation-0.parquet": "val",
             "valid_1.parquet": "val", "dev.parquet": "val", "test.parquet": "test", "trainval.parquet": None,
             "data.parquet": None}
    assert {k: split_of(Path("/x/test") / k) for k in names} == names


@pytest.mark.parametrize("data, ext", [
    (image_bytes(0, "png"), "png"), (image_bytes(0, "jpg"), "jpg"), (image_bytes(0, "webp"), "webp"),
    (image_bytes(0, "gif"), "gif"), (image_bytes(0, "bmp"), "bmp"), (image_bytes(0, "tiff"), "tiff"),
    (audio_bytes(0, "wav"), "wav"), (audio_bytes(0, "flac"), "flac"), (b"OggS" + bytes(24) + b"\x01vorbis", "ogg"),
    (b"OggS" + bytes(24) + b"OpusHead", "opus"),
    (b"ID3\x04\x00" + bytes(20), "mp3"), (b"\xff\xfb\x90\x64" + bytes(20), "mp3"),
    (b"\xff\xf1\x50\x80" + bytes(20), ""),  # AAC ADTS: sync bits, but layer 00
    (b"\x00\x00\x00\x20ftypM4A " + bytes(20), "m4a"), (b"", ""), (b"hello world", ""),
])
def test_sniff_ext(data, ext):
    assert sniff_ext(data) == ext


def test_a_hub_folder_builds_with_every_row_its_splits_and_class_order(hf_dir, tmp_path):
    from mmdata.build import BuildConfig, build_dataset

    card = build_dataset(hf_dir, tmp_path / "out", BuildConfig(workers=1, tokenizer_vocab=40), progress=False)
    assert card.build_config["layout"] == "hfparquet"
    assert card.counts == {"input": 8, "written": 8, "rejected": {}}
    assert {s: i.num_samples for s, i in card.splits.items()} == {"train": 6, "test": 2}
    assert [(t.name, t.type, t.classes) for t in card.tasks] == [("label", "classification", ANIMALS),
                                                                  ("tags", "multilabel", TAGS)]
    assert card.splits["train"].label_counts["label"] == {"dog": 2, "cat": 1, "eel": 2, "missing": 1}  # i % 3
    ids = pq.read_table(tmp_path / "out" / "index.parquet", columns=["source_id"]).column(0).to_pylist()
    assert sorted(ids) == sorted(
        [f"train-00000-of-00001-{i}" for i in range(6)] + [f"test-00000-of-00001-{i}" for i in range(2)])
