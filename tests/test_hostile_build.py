"""Hostile input and concurrent runs: no hang, no read outside the root, nothing lost, nothing of the user's deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import write_folders, write_stems

from mmdata.build import BuildConfig, build_dataset
from mmdata.build.outdir import LOCK, OutLock
from mmdata.cli import main
from mmdata.errors import ConfigError, OutputLockedError, SchemaError
from mmdata.format import CARD_NAME

pytestmark = pytest.mark.timeout(60)
CONFIG = BuildConfig(workers=1, tokenizer_vocab=40, max_reject_fraction=1.0)


def rejects_of(out: Path) -> dict[str, str]:
    return {r["source_id"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry below ``folder`` (links not followed) with its type, size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), folder)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def hostile(tmp_path) -> tuple[Path, dict[str, str]]:
    """Sample folders whose labels.json is a FIFO, a device, a link out, 100,000 levels deep; and a folder link out."""
    raw = write_folders(tmp_path / "raw", n=6)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "labels.json").write_text(json.dumps({"digit": 7, "parity": "secret", "speaker": "eve"}))
    (outside / "image.png").write_bytes((raw / "s000" / "image.png").read_bytes())
    expect = {}

    def sample(name: str, reason: str) -> Path:
        d = raw / name
        d.mkdir()
        (d / "image.png").write_bytes((raw / "s000" / "image.png").read_bytes())
        expect[name] = reason
        return d / "labels.json"

    os.mkfifo(sample("x_fifo", "unreadable"))
    sample("x_zero", "outside_root").symlink_to("/dev/zero")  # never opened: outside the root
    sample("x_urandom", "outside_root").symlink_to("/dev/urandom")
    sample("x_out", "outside_root").symlink_to(outside / "labels.json")
    sample("x_deep", "bad_label").write_text('{"digit": ' + "[" * 100_000 + "]" * 100_000 + "}")
    sample("x_deep33", "bad_label").write_text('{"digit": ' + "[" * 40 + "1" + "]" * 40 + "}")
    (raw / "x_dirlink").symlink_to(outside, target_is_directory=True)
    expect["x_dirlink"] = "outside_root"
    return raw, expect


def test_hostile_labels_are_rejects_with_their_reason_and_nothing_outside_is_read(hostile, tmp_path):
    raw, expect = hostile
    before = snapshot(tmp_path / "outside")
    card = build_dataset(raw, tmp_path / "out", CONFIG, progress=False)
    got = rejects_of(tmp_path / "out")
    assert got == expect
    assert card.counts["written"] + len(got) == card.counts["input"] == 6 + len(expect)
    classes = {c for t in card.tasks for c in t.classes}
    assert not {"secret", "eve", "7"} & classes  # the rejected records' labels add no class
    assert snapshot(tmp_path / "outside") == before


def rejects_full(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_a_listed_tar_linked_from_outside_is_a_reject_and_a_named_one_is_read(tmp_path):
    import webdataset as wds
    from conftest import image_bytes, write_tars

    raw = write_tars(tmp_path / "raw", n=6)  # part-00000.tar (5 samples), part-00001.tar (1)
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.tar"
    with wds.TarWriter(str(secret)) as w:
        for i in range(3):
            w.write({"__key__": f"out{i}", "png": image_bytes(i, "png"), "cls": 7})
    (raw / "zz-00000.tar").symlink_to(secret)
    card = build_dataset(raw, tmp_path / "out", CONFIG, progress=False)
    [reject] = rejects_full(tmp_path / "out")
    assert (reject["source_id"], reject["reason"]) == ("zz-00000.tar", "outside_root")
    assert "'zz-00000.tar'" in reject["message"] and "copy the file inside" in reject["message"]
    assert "instead of linking" in reject["message"]
    assert card.counts["written"] + 1 == card.counts["input"] == 7  # nothing of the link's samples read
    assert {c for t in card.tasks for c in t.classes} == {"0", "1", "2"}  # no class 7 from outside
    for named in (str(raw / "*.tar"), str(raw / "zz-00000.tar")):  # a glob, a path: the user's choice
        again = build_dataset(named, tmp_path / "named", CONFIG, progress=False, overwrite=True)
        assert again.counts["rejected"] == {} and again.counts["written"] == (9 if "*" in named else 3)


def test_a_listed_parquet_linked_from_outside_is_a_reject_and_a_named_one_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import image_bytes

    def write(path: Path, ids: list[str], label: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        media = pa.struct({"bytes": pa.binary(), "path": pa.string()})
        images = pa.array([{"bytes": image_bytes(i), "path": None} for i in range(len(ids))], media)
        pq.write_table(pa.table({"id": ids, "image": images, "animal": [label] * len(ids)}), path)

    raw = tmp_path / "raw"
    write(raw / "data" / "train-00000-of-00001.parquet", [f"t{i}" for i in range(4)], "dog")
    outside = tmp_path / "outside" / "rows.parquet"
    write(outside, ["o0", "o1"], "secret")
    (raw / "data" / "test-00000-of-00001.parquet").symlink_to(outside)
    card = build_dataset(raw, tmp_path / "out", CONFIG, progress=False)
    [reject] = rejects_full(tmp_path / "out")
    assert (reject["source_id"], reject["reason"]) == ("test-00000-of-00001.parquet", "outside_root")
    assert "'data/test-00000-of-00001.parquet'" in reject["message"] and "instead of linking" in reject["message"]
    assert card.counts["written"] + 1 == card.counts["input"] == 5
    assert {c for t in card.tasks for c in t.classes} == {"dog"}  # the outside file's labels were not read
    named = build_dataset(raw / "data" / "test-00000-of-00001.parquet", tmp_path / "named", CONFIG, progress=False)
    assert named.counts == {"input": 2, "written": 2, "rejected": {}}  # a file named by the user is read


def test_a_label_table_outside_the_root_or_a_fifo_is_one_line_error(tmp_path, capsys):
    raw = write_stems(tmp_path / "raw", n=4)
    outside = tmp_path / "elsewhere.csv"
    (raw / "labels.csv").rename(outside)
    (raw / "labels.csv").symlink_to(outside)
    with pytest.raises(SchemaError, match="outside the source root"):
        build_dataset(raw, tmp_path / "out", CONFIG, progress=False)
    (raw / "labels.csv").unlink()
    os.mkfifo(raw / "labels.csv")
    assert main(["build", str(raw), str(tmp_path / "out2"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "not a regular file (a FIFO)" in err and len(err.strip().splitlines()) == 1


def test_a_source_that_is_a_fifo_is_one_line_naming_what_it_is(tmp_path, capsys):
    os.mkfifo(tmp_path / "manifest.jsonl")
    assert main(["build", str(tmp_path / "manifest.jsonl"), str(tmp_path / "out"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "neither a regular file nor a folder (a FIFO" in err and len(err.strip().splitlines()) == 1


def test_a_config_that_is_a_fifo_is_a_config_error(tmp_path):
    os.mkfifo(tmp_path / "build.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        BuildConfig.from_yaml(tmp_path / "build.yaml")


def test_nfc_equal_ids_are_one_id_and_an_empty_id_is_rejected(tmp_path):
    (tmp_path / "raw").mkdir()
    img = "media/a.png"
    write_folders(tmp_path / "tmp", n=1)
    (tmp_path / "raw" / "media").mkdir()
    (tmp_path / "raw" / img).write_bytes((tmp_path / "tmp" / "s000" / "image.png").read_bytes())
    rows = [{"id": "caf\u00e9", "image": img, "digit": 1}, {"id": "cafe\u0301", "image": img, "digit": 2},
            {"id": "  ", "image": img, "digit": 1}, {"id": "ok", "image": img, "digit": 2}]
    (tmp_path / "raw" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = build_dataset(tmp_path / "raw" / "m.jsonl", tmp_path / "out", CONFIG, progress=False)
    assert rejects_of(tmp_path / "out") == {"caf\u00e9": "duplicate_id", "  ": "bad_id"}
    assert card.counts["written"] == 2


def test_out_inside_source_is_not_read_as_input(tmp_path):
    raw = write_folders(tmp_path / "raw", n=4)
    out = raw / "built"
    first = build_dataset(raw, out, CONFIG, progress=False)
    again = build_dataset(raw, out, CONFIG, progress=False, overwrite=True)
    assert first.counts == again.counts == {"input": 4, "written": 4, "rejected": {}}


def test_out_equal_to_source_is_refused_and_nothing_is_touched(tmp_path):
    from conftest import write_tars

    raw = write_tars(tmp_path / "tars", n=6)
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    with pytest.raises(ConfigError, match="is the source folder"):
        build_dataset(raw, raw, CONFIG, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before


def test_overwrite_and_resume_delete_only_the_builds_own_files(tmp_path):
    raw = write_folders(tmp_path / "raw", n=12)
    out = tmp_path / "out"
    out.mkdir()
    mine = {"backup-000001.tar": b"user's backup", "notes.txt": b"mine", "old-000000.tar": b"another tar"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    with pytest.raises(ConfigError, match="not empty"):
        build_dataset(raw, out, CONFIG, progress=False)
    config = BuildConfig(workers=1, tokenizer_vocab=40, max_samples=5)
    build_dataset(raw, out, config, progress=False, overwrite=True)
    build_dataset(raw, out, BuildConfig(workers=1, tokenizer_vocab=40, max_samples=12), progress=False,
                  overwrite=True)  # fewer shards: the old train-000001/2 go, listed in the old card
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar"]
    for name, data in mine.items():
        assert (out / name).read_bytes() == data
    (out / CARD_NAME).unlink()  # a folder with shards no card lists: they are not ours to replace
    with pytest.raises(ConfigError, match="which no mmdata build there wrote"):
        build_dataset(raw, out, config, progress=False, overwrite=True)
    assert (out / "train-000000.tar").is_file()


def test_resume_onto_a_finished_dataset_from_other_input_refuses(tmp_path):
    a, b = write_folders(tmp_path / "a", n=6), write_folders(tmp_path / "b", n=8)
    out = tmp_path / "out"
    build_dataset(a, out, CONFIG, progress=False)
    before = (out / CARD_NAME).read_bytes()
    with pytest.raises(ConfigError, match="finished dataset built from other input"):
        build_dataset(b, out, CONFIG, progress=False, resume=True)
    assert (out / CARD_NAME).read_bytes() == before
    assert build_dataset(a, out, CONFIG, progress=False, resume=True).counts["written"] == 6  # same input: fine


def test_a_held_lock_stops_a_second_build_at_once_and_a_stale_one_is_taken_over(tmp_path, capsys, caplog):
    raw = write_folders(tmp_path / "raw", n=4)
    out = tmp_path / "out"
    out.mkdir()
    with OutLock(out):
        with pytest.raises(OutputLockedError, match=rf"pid {os.getpid()} on "):
            build_dataset(raw, out, CONFIG, progress=False)
        assert main(["build", str(raw), str(out), "--workers", "1"]) == 1
        assert "another build (pid" in capsys.readouterr().err
    assert not (out / LOCK).exists()
    (out / LOCK).write_text(json.dumps({"pid": 999999, "host": "gone"}))  # left by a killed build
    build_dataset(raw, out, CONFIG, progress=False, overwrite=True)
    assert "taking over the lock of an earlier build (pid 999999 on gone)" in caplog.text
    assert not (out / LOCK).exists()


# the first build pauses after its first sample until the test says go: the two builds overlap for certain
PAUSING = textwrap.dedent("""
    import os, sys, time
    from mmdata.build import runner
    from mmdata.cli import main
    ready, go = sys.argv[1], sys.argv[2]
    def patched(shard):
        if not os.path.exists(ready):
            open(ready, "w").close()
            deadline = time.monotonic() + 50
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.01)
    runner.shard_hook = patched
    sys.exit(main(sys.argv[3:]))
""")


def test_two_concurrent_builds_one_wins_the_other_exits_1_naming_it(tmp_path, capsys):
    raw = write_folders(tmp_path / "raw", n=12)
    out = tmp_path / "out"
    ready, go = tmp_path / "ready", tmp_path / "go"
    args = ["build", str(raw), str(out), "--workers", "1", "--overwrite", "--no-progress", "--max-samples", "4"]
    first = subprocess.Popen([sys.executable, "-c", PAUSING, str(ready), str(go), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 50
        while not ready.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), first.stderr.read().decode()[-2000:]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"another build (pid {first.pid} on " in err and len(err.strip().splitlines()) == 1
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=50)
    assert first.returncode == 0, stderr.decode()[-2000:]
    assert main(["verify", str(out), "--decode", "--no-progress"]) == 0


# VmHWM, not getrusage: ru_maxrss survives exec, so it would report the forking pytest process's peak
RSS = textwrap.dedent("""
    import sys
    from mmdata.cli import main
    code = main(sys.argv[1:])
    with open("/proc/self/status") as f:
        print(next(line.split()[1] for line in f if line.startswith("VmHWM:")), file=sys.stderr)  # KiB
    sys.exit(code)
""")


def test_a_20_mb_text_builds_in_bounded_memory(tmp_path):
    raw = write_folders(tmp_path / "raw", n=3)
    (raw / "s001" / "text.txt").write_text(" ".join(f"w{i % 5000}x" for i in range(4_000_000)))  # 22 MB
    done = subprocess.run([sys.executable, "-c", RSS, "build", str(raw), str(tmp_path / "out"), "--workers", "1",
                           "--no-progress", "--set", "tokenizer_vocab=6000"],
                          capture_output=True, text=True, timeout=55)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stderr.strip().splitlines()[-1]) < 500 * 1024
    vocab = json.loads((tmp_path / "out" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "w4999x" in vocab  # the whole text (under the default 50 MB sample) made the vocabulary
