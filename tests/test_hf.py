"""README.md in OUT makes a built dataset load with Hugging Face `datasets` (class names, images, audio bytes)."""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import NO_AUDIO, NO_TEXT, write_manifest

from mmdata.build import BuildConfig, build_dataset
from mmdata.build.hfcard import hf_split
from mmdata.card import LABEL_PREFIX, Card
from mmdata.format import README_NAME

TAGS = ("red", "blue")


def write_raw(root: Path) -> Path:
    """12 manifest records + a multilabel ``tags`` and a regression ``score`` label, and one empty image."""
    root.mkdir(parents=True)
    manifest = write_manifest(root, n=12, fmt="jsonl")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["tags"] = None if i == 7 else [TAGS[j] for j in range(2) if (i >> j) & 1]
        r["score"] = i / 4 + 0.5
    (root / "media" / "bad.png").write_bytes(b"")
    rows.append({**rows[0], "id": "x_empty", "image": "media/bad.png", "audio": None, "text": None})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


CONFIG = BuildConfig(val=0.25, test=0.25, max_samples=3, workers=1, tokenizer_vocab=0, max_reject_fraction=0.5)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Train 6 / val 3 / test 3 in shards of 3: classification, multilabel and regression tasks; one reject."""
    base = tmp_path_factory.mktemp("hf")
    build_dataset(write_raw(base / "raw"), base / "ds", CONFIG, progress=False)
    return base / "ds"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """`datasets` imported offline, with every cache under a temporary folder."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        import datasets

        yield datasets, home


def read_members(root: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every shard, read with tarfile (independently of mmdata and `datasets`)."""
    out: dict[str, dict[str, bytes]] = defaultdict(dict)
    for tar_path in sorted(root.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                out[key][ext] = tf.extractfile(m).read()
    return dict(out)


@pytest.mark.parametrize("streaming", [False, True], ids=["arrow", "streaming"])
def test_load_dataset_gives_splits_class_names_images_and_audio(built, hf, streaming):
    import soundfile as sf
    from PIL import Image

    datasets, home = hf
    card = Card.from_json((built / "dataset.json").read_text())
    members = read_members(built)
    ds = datasets.load_dataset(str(built), streaming=streaming, cache_dir=str(home / "datasets"))
    assert sorted(ds) == sorted(hf_split(s) for s in card.splits) == ["test", "train", "validation"]
    seen = set()
    for split, info in card.splits.items():
        part = ds[hf_split(split)]
        labels = part.features["json"]["labels"]
        for t in card.tasks:
            if t.type == "classification":
                assert labels[t.name] == datasets.ClassLabel(names=list(t.classes))
            elif t.type == "multilabel":
                assert labels[t.name].feature == datasets.ClassLabel(names=list(t.classes))
            else:
                assert labels[t.name].feature == datasets.Value("float64")
        rows = list(part)
        assert len(rows) == info.num_samples
        for row in rows:
            stored = members[row["__key__"]]
            meta = json.loads(stored["json"])
            i = int(meta["id"][1:])
            assert row["json"] == meta  # labels as stored: class indices, index lists, float lists, nulls
            ext = "png" if i % 2 == 0 else "jpg"
            assert row["png" if ext == "jpg" else "jpg"] is None
            want = Image.open(io.BytesIO(stored[ext]))
            assert isinstance(row[ext], Image.Image) and row[ext].size == want.size == (8 + i % 3, 8)
            assert np.array_equal(np.asarray(row[ext]), np.asarray(want))
            if i == NO_AUDIO:
                assert row["flac"] is None
            else:
                y, rate = sf.read(io.BytesIO(row["flac"]))
                y_stored, rate_stored = sf.read(io.BytesIO(stored["flac"]))
                assert rate == rate_stored == 8000 and len(y) == 200 + 10 * i
                assert np.array_equal(y, y_stored)
            assert row["txt"] == (None if i == NO_TEXT else f"sample {i}")
            seen.add(row["__key__"])
    assert seen == set(members) and len(seen) == card.counts["written"] == 12


def test_index_parquet_names_the_classes(built):
    table = pq.read_table(built / "index.parquet")
    card = Card.from_json((built / "dataset.json").read_text())
    assert {t.name: t.type for t in card.tasks} == {"digit": "classification", "parity": "classification",
                                                    "speaker": "classification", "tags": "multilabel",
                                                    "score": "regression"}
    classes = json.loads(table.schema.metadata[b"mmdata:classes"])
    assert classes == {t.name: list(t.classes) for t in card.tasks if t.type != "regression"}
    assert "label_name:score" not in table.column_names
    for t in card.tasks:
        if t.type == "regression":
            continue
        ids, names = table[LABEL_PREFIX + t.name].to_pylist(), table["label_name:" + t.name].to_pylist()
        typ = table.schema.field("label_name:" + t.name).type
        if t.type == "classification":
            assert table.schema.field(LABEL_PREFIX + t.name).type == pa.int64()  # the index column is unchanged
            assert pa.types.is_dictionary(typ)
            assert names == [None if i is None else t.classes[i] for i in ids]
        else:
            assert table.schema.field(LABEL_PREFIX + t.name).type == pa.list_(pa.int64())
            assert pa.types.is_dictionary(typ.value_type)
            assert names == [None if v is None else [t.classes[i] for i in v] for v in ids]
    rows = table.to_pylist()
    tags = {r["source_id"]: r["label_name:tags"] for r in rows}
    assert tags["s003"] == ["blue", "red"] and tags["s007"] is None and tags["s004"] == []


def test_readme_summarises_the_card_and_its_build_line_gives_the_same_config(built):
    text = (built / README_NAME).read_text()
    card = Card.from_json((built / "dataset.json").read_text())
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "train-*.tar"}, {"split": "validation", "path": "val-*.tar"},
        {"split": "test", "path": "test-*.tar"}]}]
    assert "license" not in header and "pretty_name" not in header  # the build config gives neither
    for split, info in card.splits.items():
        assert re.search(rf"^\| `{split}` \| `{hf_split(split)}` \| {info.num_samples} \| {len(info.shards)} \|",
                         text, re.M)
    assert re.search(r"^\| `empty_file` \| 1 \| `x_empty` \|$", text, re.M)
    assert re.search(r"^\| `blue` \| \d+ \| \d+ \| \d+ \|$", text, re.M)
    line = re.search(r"```bash\n(.*?)\n```", text, re.S).group(1).replace("\\\n", " ")
    args = shlex.split(line)
    assert args[:4] == ["mmdata", "build", "SOURCE", "OUT"]
    assert args[args.index("--layout") + 1] == card.build_config["layout"] == "manifest"
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    again = BuildConfig().with_overrides(pairs).to_dict()
    assert again == {k: v for k, v in card.build_config.items() if k != "layout"}
    resolved = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    assert resolved == card.build_config


def test_license_and_pretty_name_of_the_config_head_the_readme(tmp_path):
    config = BuildConfig.from_dict({**CONFIG.to_dict(), "workers": 1, "license": "mit",
                                    "pretty_name": "Tiny digits: images & audio"})
    raw = write_raw(tmp_path / "raw")
    build_dataset(raw, tmp_path / "ds", config, progress=False)
    text = (tmp_path / "ds" / README_NAME).read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["license"] == "mit" and header["pretty_name"] == "Tiny digits: images & audio"
    assert list(header)[:2] == ["license", "pretty_name"] and "\n# Tiny digits: images & audio\n" in text
    line = re.search(r"```bash\n(.*?)\n```", text, re.S).group(1).replace("\\\n", " ")
    args = shlex.split(line)
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    again = BuildConfig().with_overrides(pairs)  # the build line gives them back
    assert (again.license, again.pretty_name) == (config.license, config.pretty_name)
    build_dataset(raw, tmp_path / "again", config, progress=False)
    assert (tmp_path / "again" / README_NAME).read_bytes() == text.encode("utf-8")


def test_readme_loading_code_runs(built, hf):
    datasets, home = hf
    blocks = re.findall(r"```python\n(.*?)```", (built / README_NAME).read_text(), re.S)
    assert [b.count("import ") > 0 for b in blocks] == [True] * 3  # mmdata, webdataset, datasets
    mmdata_code, hf_code = blocks[0], blocks[2]
    env: dict = {}
    exec(mmdata_code.replace('"OUT"', json.dumps(str(built))).replace("num_workers=2", "num_workers=0")
         .replace("    ...\n", "    break\n"), env)
    assert env["batch"].image.shape[-2:] == (224, 224) and set(env["batch"].labels) == set(env["ds"].tasks.names)
    env = {}
    exec(hf_code.replace('load_dataset("OUT")', f"load_dataset({str(built)!r}, cache_dir={str(home / 'datasets')!r})"),
         env)
    assert env["names"] == ["0", "1", "2"] and env["image"].size[1] == 8
    assert env["rate"] == 8000 and len(env["audio"]) >= 200


def test_rebuild_is_byte_identical_readme_included(tmp_path):
    raw = write_raw(tmp_path / "raw")
    for out in ("a", "b/deeper"):
        build_dataset(raw, tmp_path / out, CONFIG, progress=False)
    a, b = ({str(p.relative_to(tmp_path / out)): p.read_bytes() for p in sorted((tmp_path / out).rglob("*"))
             if p.is_file()} for out in ("a", "b/deeper"))
    assert README_NAME in a and a == b
    readme = a[README_NAME].decode("utf-8")
    assert str(tmp_path) not in readme and "/tmp" not in readme
    assert not list((tmp_path / "a").glob("*.partial"))


def test_meta_fields_of_others_shards_load_with_datasets(tmp_path, hf):
    import tarfile

    from conftest import image_bytes

    datasets, home = hf
    src = tmp_path / "crawl"
    src.mkdir()
    with tarfile.open(src / "train-00000.tar", "w") as tar:
        for i in range(4):
            meta = {"url": f"https://example.com/{i}.png", "width": 8 + i % 3, "score": i / 2, "label": i % 2}
            for ext, data in (("png", image_bytes(i)), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    build_dataset(src, tmp_path / "ds", BuildConfig(workers=1, tokenizer_vocab=0), progress=False)
    rows = list(datasets.load_dataset(str(tmp_path / "ds"), cache_dir=str(home / "datasets"))["train"])
    members = read_members(tmp_path / "ds")
    assert len(rows) == 4
    for row in rows:
        stored = json.loads(members[row["__key__"]]["json"])
        assert row["json"] == stored and set(stored["meta"]) == {"url", "width", "score"}  # nothing dropped
