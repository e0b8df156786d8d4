"""mmdata info / verify / show / stats on one small built dataset (copied per test when a test corrupts it)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_folders

from mmdata.build import BuildConfig, build_dataset
from mmdata.cli import main
from mmdata.info import dataset_info
from mmdata.verify import verify_dataset

N_RAW = 12
BAD_IDS = ("x_empty", "x_corrupt")  # raw records that the build rejects


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """12 samples (train 9 / val 3, shards of 4) and 2 rejects: an empty image and a corrupt one."""
    base = tmp_path_factory.mktemp("inspect")
    raw = write_folders(base / "raw", n=N_RAW)
    for sid, data in zip(BAD_IDS, (b"", b"not a png at all")):
        (raw / sid).mkdir()
        (raw / sid / "image.png").write_bytes(data)
        (raw / sid / "labels.json").write_text(json.dumps({"digit": 1, "parity": "odd", "speaker": "ann"}))
    cfg = BuildConfig(val=0.25, max_samples=4, workers=1, tokenizer_vocab=60, max_reject_fraction=0.5)
    build_dataset(raw, base / "ds", cfg, progress=False)
    return base / "ds"


@pytest.fixture
def copy(built, tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(built, out)
    return out


def read_shards(root: Path) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """{split: [(key, {ext: bytes})]} read with tarfile, independently of mmdata."""
    out = defaultdict(list)
    for tar_path in sorted(root.glob("*.tar")):
        split = tar_path.name.rsplit("-", 1)[0]
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if not out[split] or out[split][-1][0] != key:
                    out[split].append((key, {}))
                out[split][-1][1][ext] = tf.extractfile(m).read()
    return dict(out)


# ---- info -----------------------------------------------------------------------------------------------


def test_info_json_equals_counts_from_the_shards(built, capsys):
    import soundfile as sf
    from PIL import Image

    assert main(["info", str(built), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    card = json.loads((built / "dataset.json").read_text())
    classes = {t["name"]: t["classes"] for t in card["tasks"]}
    shards = read_shards(built)
    assert info["samples"] == sum(len(v) for v in shards.values()) == N_RAW
    assert info["shards"] == len(list(built.glob("*.tar")))
    assert info["bytes"] == sum(p.stat().st_size for p in built.glob("*.tar"))
    for split, samples in shards.items():
        got = info["splits"][split]
        assert got["samples"] == len(samples)
        present = Counter()
        labels = {t: Counter() for t in classes}
        seconds, sizes, chars = [], Counter(), []
        for _, members in samples:
            meta = json.loads(members["json"])
            for t, v in meta["labels"].items():
                labels[t]["missing" if v is None else classes[t][v]] += 1
            for ext, data in members.items():
                if ext in ("png", "jpg"):
                    present["image"] += 1
                    w, h = Image.open(io.BytesIO(data)).size
                    sizes[f"{w}x{h}"] += 1
                elif ext in ("flac", "wav"):
                    present["audio"] += 1
                    seconds.append(sf.info(io.BytesIO(data)).duration)
                elif ext == "txt":
                    present["text"] += 1
                    chars.append(len(data.decode()))
        for m in ("image", "audio", "text"):
            assert got["modalities"][m]["present"] == present[m]
            assert got["modalities"][m]["percent"] == pytest.approx(100 * present[m] / len(samples), abs=0.01)
        for t in classes:
            assert {k: v for k, v in got["labels"][t].items() if v} == dict(labels[t])
        assert got["audio_seconds"]["total"] == pytest.approx(sum(seconds))
        assert got["audio_seconds"]["max"] == pytest.approx(max(seconds))
        assert got["image_sizes"]["most_common"] == dict(sizes)
        assert got["text_chars"]["total"] == sum(chars)
    rejects = [json.loads(line) for line in (built / "rejects.jsonl").read_text().splitlines()]
    assert {r["source_id"] for r in rejects} == set(BAD_IDS)
    assert info["rejected"]["by_reason"] == dict(Counter(r["reason"] for r in rejects))
    assert info["input_records"] == N_RAW + len(BAD_IDS)


def test_info_reads_fsspec_urls_without_shards(built, capsys):
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("dataset.json", "index.parquet", "rejects.jsonl"):  # no shard: info must not need one
        fs.pipe(f"/inspect_ds/{name}", (built / name).read_bytes())
    local = dataset_info(str(built))
    remote = dataset_info("memory://inspect_ds")
    assert {**remote, "path": None} == {**local, "path": None}
    assert dataset_info(f"file://{built}")["samples"] == N_RAW
    assert main(["info", str(built)]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "rejected because" in text
    fs.rm("/inspect_ds", recursive=True)


def test_info_and_stats_show_the_cards_label_counts_and_verify_checks_them(copy):
    import matplotlib.pyplot as plt

    from mmdata.stats import stats_figure

    before = dataset_info(str(copy))
    card = json.loads((copy / "dataset.json").read_text())
    assert before["splits"]["train"]["labels"]["parity"] == card["splits"]["train"]["label_counts"]["parity"]
    n = before["splits"]["train"]["samples"]
    card["splits"]["train"]["label_counts"]["parity"] = {"even": n, "odd": 0, "missing": 0}  # not what the index says
    (copy / "dataset.json").write_text(json.dumps(card))
    assert dataset_info(str(copy))["splits"]["train"]["labels"]["parity"] == {"even": n, "odd": 0, "missing": 0}
    fig = stats_figure(str(copy))
    try:  # the parity panel: train's bars are the card's shares
        assert [b.get_height() for b in fig.axes[1].containers[0]] == [100.0, 0.0]
    finally:
        plt.close(fig)
    found = failures_of(copy)
    assert [(f.shard, f.key) for f in found] == [("dataset.json", None)]
    assert found[0].what.startswith(f"label counts of task 'parity' in split 'train' are {{'even': {n}, 'odd': 0, ")
    for split in card["splits"].values():  # a card without label counts: they are counted from the index
        del split["label_counts"]
    (copy / "dataset.json").write_text(json.dumps(card))
    assert dataset_info(str(copy)) == before
    assert failures_of(copy) == []


# ---- verify ---------------------------------------------------------------------------------------------


def failures_of(path: Path, **kw) -> list:
    return verify_dataset(str(path), progress=False, **kw)


def set_card_shard(root: Path, file: str, **fields) -> None:
    card = json.loads((root / "dataset.json").read_text())
    for split in card["splits"].values():
        for s in split["shards"]:
            if s["file"] == file:
                s.update(fields)
    (root / "dataset.json").write_text(json.dumps(card))


def test_verify_passes_a_clean_dataset(built, capsys):
    assert failures_of(built, decode=True) == []
    assert main(["verify", str(built), "--decode", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("ok")


def test_verify_catches_one_changed_byte(copy, capsys):
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # inside the first member's data
    shard.write_bytes(bytes(data))
    found = failures_of(copy)
    assert [(f.shard, f.key) for f in found] == [("train-000001.tar", None)]
    assert "sha256" in found[0].what
    assert main(["verify", str(copy), "--no-progress"]) == 1
    assert "train-000001.tar" in capsys.readouterr().out


def test_verify_catches_a_deleted_shard(copy):
    (copy / "val-000000.tar").unlink()
    found = failures_of(copy, workers=2)
    assert [(f.shard, f.key) for f in found] == [("val-000000.tar", None)]
    assert "missing" in found[0].what


def test_verify_reads_fsspec_urls_and_flags_a_stray_shard(built):
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in built.iterdir():
        if f.is_file():
            fs.pipe(f"/verify_ds/{f.name}", f.read_bytes())
    try:
        assert verify_dataset("memory://verify_ds", decode=True, progress=False) == []
        fs.pipe("/verify_ds/train-000009.tar", (built / "val-000000.tar").read_bytes())
        found = verify_dataset("memory://verify_ds", progress=False)
        assert [(f.shard, f.key) for f in found] == [("train-000009.tar", None)]
        assert "not listed in dataset.json" in found[0].what
    finally:
        fs.rm("/verify_ds", recursive=True)


def test_verify_catches_a_truncated_shard(copy):
    shard = copy / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    found = [f for f in failures_of(copy) if f.shard == "train-000000.tar"]
    whats = " | ".join(f.what for f in found)
    assert "truncated: 5000 bytes, the card says" in whats
    assert "sha256" in whats
    assert all(f.shard == "train-000000.tar" for f in failures_of(copy))


def test_verify_catches_an_index_row_pointing_at_a_missing_key(copy):
    table = pq.read_table(copy / "index.parquet")
    keys = table["key"].to_pylist()
    victim = keys[0]
    keys[0] = "ghost"
    pq.write_table(table.set_column(0, "key", pa.array(keys)), copy / "index.parquet")
    found = failures_of(copy)
    ghost = [f for f in found if f.key == "ghost"]
    assert len(ghost) == 1 and "has no key 'ghost'" in ghost[0].what
    assert any(f.key == victim and "not in index.parquet" in f.what for f in found)


def test_verify_catches_members_that_are_not_adjacent(copy):
    shard = copy / "train-000000.tar"
    members = [(m, tf_data) for m, tf_data in _members(shard)]
    # move the first sample's last member (its .json) behind the second sample's members
    first_key = members[0][0].name.partition(".")[0]
    n_first = sum(m.name.startswith(first_key + ".") for m, _ in members)
    n_second = sum(m.name.startswith(members[n_first][0].name.partition(".")[0] + ".") for m, _ in members)
    moved = members[n_first - 1]
    members = members[:n_first - 1] + members[n_first:n_first + n_second] + [moved] + members[n_first + n_second:]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    import hashlib

    set_card_shard(copy, shard.name, bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    found = failures_of(copy)
    assert any(f.key == first_key and "not adjacent" in f.what for f in found)
    assert any("holds 5 samples, the card says 4" in f.what for f in found)
    assert all(f.shard == shard.name for f in found)


def test_verify_catches_a_dot_in_a_key_and_a_label_that_disagrees(copy):
    shard = copy / "val-000000.tar"
    members = list(_members(shard))
    members[0][0].name = members[0][0].name.replace(".", ".v2.", 1)  # "KEY.png" -> "KEY.v2.png"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    assert any("the key has a dot" in f.what for f in failures_of(copy))
    table = pq.read_table(copy / "index.parquet")
    col = table["label:parity"].to_pylist()
    col[0] = 1 - col[0]
    pq.write_table(table.set_column(table.column_names.index("label:parity"), "label:parity",
                                    pa.array(col, pa.int64())), copy / "index.parquet")
    assert any("label 'parity'" in f.what for f in failures_of(copy, decode=True))


def _members(path: Path):
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            yield m, tf.extractfile(m).read()


# ---- show / stats ---------------------------------------------------------------------------------------


def _png_ok(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_show_draws_every_sample_of_a_split_with_blanks_for_missing_media(built):
    import matplotlib.pyplot as plt

    from mmdata.show import contact_sheet

    index = pq.read_table(built / "index.parquet").to_pylist()
    train = [r for r in index if r["split"] == "train"]
    fig = contact_sheet(str(built), "train", n=100, seed=3)  # more than the split holds: every sample once
    try:
        assert len(fig.axes) == 4 * len(train)
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert sorted(t for t in texts if t in {r["key"] for r in train}) == sorted(r["key"] for r in train)
        no_audio = sum("audio" not in r["modalities"] for r in train)
        assert no_audio and texts.count("no audio") == 2 * no_audio  # waveform and log-mel panels
        assert texts.count("(no text)") == sum("text" not in r["modalities"] for r in train)
    finally:
        plt.close(fig)


def test_show_leaves_out_columns_of_modalities_the_dataset_lacks(tmp_path):
    import matplotlib.pyplot as plt
    from conftest import write_tars

    from mmdata.show import contact_sheet

    build_dataset(write_tars(tmp_path / "raw"), tmp_path / "ds", BuildConfig(workers=1, tokenizer_vocab=0),
                  progress=False)  # images and one label only
    fig = contact_sheet(str(tmp_path / "ds"), "train", n=3)
    try:
        assert len(fig.axes) == 2 * 3  # image, text and labels
        assert [ax.get_title() for ax in fig.axes[:2]] == ["image", "text and labels"]
    finally:
        plt.close(fig)


def test_show_cli_writes_a_png_and_the_same_seed_draws_the_same_samples(built, tmp_path, capsys):
    from mmdata.dataset import open_dataset
    from mmdata.show import pick_samples

    out = tmp_path / "sheet.png"
    assert main(["show", str(built), "--split", "train", "-n", "3", "--seed", "1", "-o", str(out)]) == 0
    assert "12 panels" in capsys.readouterr().out
    w, h = _png_ok(out)
    assert h > 200 and w > 400
    ds = open_dataset(built)
    keys = [s.key for s in pick_samples(ds, "train", 3, seed=1)]
    assert keys == [s.key for s in pick_samples(ds, "train", 3, seed=1)] and len(set(keys)) == 3
    assert any([s.key for s in pick_samples(ds, "train", 3, seed=k)] != keys for k in range(2, 6))


def test_show_augment_draws_before_and_after(built, tmp_path):
    import matplotlib.pyplot as plt
    import numpy as np

    from mmdata.show import contact_sheet, read_augment_config

    cfg = tmp_path / "aug.yaml"
    cfg.write_text("augment:\n  image: {size: [6, 7]}\n  audio: {n_mels: 16, noise_p: 1.0, snr_db: [0, 5]}\n")
    fig = contact_sheet(str(built), "val", n=2, seed=0, augment=read_augment_config(str(cfg)))
    try:
        assert len(fig.axes) == 6 * 2
        for row in range(2):
            before, after = (fig.axes[6 * row + c].images[0].get_array() for c in (0, 1))
            assert before.shape[0] == 8 and 8 <= before.shape[1] <= 10  # the stored size (8 + i % 3 wide)
            assert after.shape[:2] == (6, 7)  # the config's output size
            mel, aug_mel = (np.asarray(fig.axes[6 * row + c].images[0].get_array()) for c in (3, 4))
            assert mel.shape == aug_mel.shape and mel.shape[0] == 16  # the config's n_mels
            assert not np.allclose(mel, aug_mel, atol=1e-3)  # noise at 0-5 dB SNR on every clip
        assert fig.axes[3].get_title() == "log-mel"
    finally:
        plt.close(fig)
    cfg.write_text("augment:\n  audio: {n_mels: 16, cepstra: 5, freq_mask_bins: 2}\n")
    fig = contact_sheet(str(built), "val", n=2, seed=0, augment=read_augment_config(str(cfg)))
    try:  # the pipeline's features are MFCCs, and the sheet says so
        assert [fig.axes[c].get_title() for c in (3, 4)] == ["MFCC", "augmented MFCC"]
        assert fig.axes[3].images[0].get_array().shape[0] == 5 and "5 MFCCs" in fig.axes[3].get_xlabel()
    finally:
        plt.close(fig)


def test_show_decodes_members_as_the_loader_does(built):
    from mmdata.dataset import open_dataset
    from mmdata.decode import Decoder, DecodeSpec
    from mmdata.show import label_name, pick_samples

    ds = open_dataset(built)
    spec = DecodeSpec(modalities=("image", "audio"), tasks=tuple(ds.tasks), image_size=None, audio_samples=None,
                      sample_rate=None, max_text_tokens=8)  # the stored size and rate: nothing resized
    shown = pick_samples(ds, "train", 100)
    assert len(shown) == ds.num_samples("train")
    for s in shown:
        want = Decoder(spec, None)(s.key, s.members)
        assert (s.image == want.image.permute(1, 2, 0).numpy()).all()
        assert (s.audio is None) == (want.audio is None) and (s.audio is None or (s.audio == want.audio).all())
        assert s.labels == {t.name: label_name(t, want.labels[t.name]) for t in ds.tasks}


def test_show_reads_a_url_dataset_through_its_storage_and_shard_cache(built, tmp_path):
    import fsspec

    from mmdata import CorruptShardError
    from mmdata.dataset import open_dataset
    from mmdata.show import pick_samples

    fs = fsspec.filesystem("memory")
    for f in built.rglob("*"):
        if f.is_file():
            fs.pipe(f"/cached_ds/{f.relative_to(built).as_posix()}", f.read_bytes())

    def drawn(ds) -> list:
        return [(s.key, s.members) for s in pick_samples(ds, "train", 100)]

    try:
        local = drawn(open_dataset(built))
        cache = {"cache_dir": tmp_path / "cache", "cache_bytes": 1 << 30}
        assert drawn(open_dataset("memory://cached_ds", **cache)) == local
        shards = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "entries").iterdir())
        assert shards == sorted(s.file for s in open_dataset(built).card.splits["train"].shards)
        for name in shards:  # the store loses them: the cache still serves them
            fs.rm(f"/cached_ds/{name}")
        assert drawn(open_dataset("memory://cached_ds", **cache)) == local
        with pytest.raises(CorruptShardError, match="is missing"):  # without the cache: ranged reads, which fail
            drawn(open_dataset("memory://cached_ds"))
    finally:
        fs.rm("/cached_ds", recursive=True)


def test_show_rejects_prints_each_reject_and_its_reason(built, capsys):
    assert main(["show", str(built), "--rejects"]) == 0
    out = capsys.readouterr().out
    rejects = [json.loads(line) for line in (built / "rejects.jsonl").read_text().splitlines()]
    for r in rejects:
        assert r["source_id"] in out and r["reason"] in out


def test_stats_has_a_panel_per_task_and_media_kind_and_label_shares_add_up(built, tmp_path, capsys):
    import matplotlib.pyplot as plt

    from mmdata.stats import stats_figure

    fig = stats_figure(str(built))
    try:
        assert len(fig.axes) == 3 + 3  # digit, parity, speaker; audio seconds, image sizes, text length
        for ax in fig.axes[:3]:  # each split's bars are % of that split, missing included
            for bars in ax.containers:
                assert sum(b.get_height() for b in bars) == pytest.approx(100.0)
        sizes = fig.axes[4]
        assert sorted(t.get_text() for t in sizes.get_xticklabels()) == ["10x8", "8x8", "9x8"]
    finally:
        plt.close(fig)
    out = tmp_path / "stats.png"
    assert main(["stats", str(built), "-o", str(out)]) == 0
    assert _png_ok(out)[0] > 400
