"""What a hostile or damaged dataset folder must not do to a reader (issue 14, read side).

Each test tampers with a copy of one tiny built dataset (8 samples, two train shards of 4) and checks that
`mmdata verify`, `make_loader(on_error="raise")` and `make_loader(on_error="skip")` end within seconds,
with one clear line naming the shard, the key and the bad value, or with only the bad sample left out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_folders

from mmdata import CorruptShardError, DecodeError, LoaderConfig, SchemaError, make_loader, open_dataset
from mmdata.build import BuildConfig, build_dataset
from mmdata.cli import main
from mmdata.storage import open_regular
from mmdata.verify import verify_dataset

pytestmark = pytest.mark.timeout(60)  # a FIFO or /dev/zero must never hang a reader

SHARDS = ("train-000000.tar", "train-000001.tar")
ESC = "\x1b[2J\x1b[31m"  # clear the screen, then red


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    raw = write_folders(base / "raw", n=8)
    build_dataset(raw, base / "ds", BuildConfig(workers=1, max_samples=4, tokenizer_vocab=40), progress=False)
    return base / "ds"


@pytest.fixture
def ds(built, tmp_path) -> Path:
    """A copy of the built dataset to tamper with; ``tmp_path`` itself is the folder around it."""
    out = tmp_path / "ds"
    shutil.copytree(built, out)
    return out


def rows(root: Path) -> list[dict]:
    """The index rows in shard order (shard, offset)."""
    table = pq.read_table(root / "index.parquet").to_pylist()
    return sorted(table, key=lambda r: (r["shard"], -1 if r["offset"] is None else r["offset"]))


def card_bytes(root: Path, file: str) -> int:
    card = json.loads((root / "dataset.json").read_text())
    return next(s["bytes"] for split in card["splits"].values() for s in split["shards"] if s["file"] == file)


def all_keys(root: Path) -> set[str]:
    return {r["key"] for r in rows(root)}


def set_index(root: Path, key: str, **values) -> None:
    """Set columns of the index row of ``key`` (None writes a null)."""
    table = pq.read_table(root / "index.parquet")
    row = table["key"].to_pylist().index(key)
    for name, value in values.items():
        col = table[name].to_pylist()
        col[row] = value
        table = table.set_column(table.column_names.index(name), name, pa.array(col, pa.int64()))
    pq.write_table(table, root / "index.parquet")


def edit_card(root: Path, edit) -> None:
    """Change dataset.json in place with ``edit(card)``; a list or dict it returns replaces the card."""
    card = json.loads((root / "dataset.json").read_text())
    result = edit(card)
    card = result if isinstance(result, (list, dict)) else card
    (root / "dataset.json").write_text(json.dumps(card))


def verify_cli(root: Path, capsys) -> tuple[int, list[str], list[str]]:
    code = main(["verify", str(root), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def load(root: Path, on_error: str, num_workers: int = 0):
    """(keys read, loader) of one unshuffled epoch of the train split."""
    loader = make_loader(str(root), "train", batch_size=3, shuffle=False, on_error=on_error,
                         num_workers=num_workers, config=LoaderConfig(image_size=8))  # the fixture's images are 8 to 10 px wide
    return [k for batch in loader for k in batch.keys], loader


def bytes_read() -> int:
    """Bytes this process has read through read()/pread() so far (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def one_line_error(err: list[str], *parts: str) -> str:
    assert len(err) == 1, err
    assert err[0].startswith("mmdata verify: error:") and all(p in err[0] for p in parts), err[0]
    return err[0]


# ---- dataset.json ---------------------------------------------------------------------------------------


def test_card_naming_a_shard_outside_the_folder_is_refused(ds, tmp_path, capsys):
    shutil.copy(ds / SHARDS[1], tmp_path / "x.tar")  # a real shard, one folder up
    edit_card(ds, lambda c: c["splits"]["train"]["shards"][1].update(file="../x.tar"))
    code, out, err = verify_cli(ds, capsys)
    assert code == 1 and out == []
    one_line_error(err, "splits.train.shards[1].file", "'../x.tar'", "not a plain file name")
    for on_error in ("raise", "skip"):
        with pytest.raises(SchemaError, match=r"shards\[1\]\.file.*'\.\./x\.tar'"):
            load(ds, on_error)


@pytest.mark.parametrize("name", ["/etc/passwd", "sub/x.tar", "..\\x.tar", ".hidden.tar", "", "a\x1b[2Jb.tar"])
def test_card_shard_names_must_be_plain(ds, name):
    edit_card(ds, lambda c: c["splits"]["train"]["shards"][0].update(file=name))
    with pytest.raises(SchemaError, match="not a plain file name") as caught:
        open_dataset(ds)
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda c: [1, 2], "must hold a JSON object, got a list"),
    (lambda c: c.update(splits=[]), "'splits' must be an object, got a list"),
    (lambda c: c["splits"]["train"]["shards"][0].update(bytes="20480"), "shards[0].bytes' must be an integer"),
    (lambda c: c["splits"]["train"]["shards"][0].update(samples=-1), "shards[0].samples' must be a count"),
    (lambda c: c["splits"]["train"]["shards"][0].pop("sha256"), "lacks field 'splits.train.shards[0].sha256'"),
    (lambda c: c["tasks"][0].update(classes="abc"), "'tasks[0].classes' must be a list"),
    (lambda c: c["tasks"][0].update(type="guess"), "'tasks[0]': task 'digit': type must be one of"),
    (lambda c: c.update(modalities={"audio": {"sample_rate": "fast"}}), "sample_rate' must be a positive integer"),
    (lambda c: c["splits"]["train"]["shards"].append(dict(c["splits"]["train"]["shards"][0])), "twice"),
])
def test_card_of_wrong_shape_is_one_schema_error_naming_the_field(ds, capsys, edit, field):
    edit_card(ds, edit)
    with pytest.raises(SchemaError) as caught:
        open_dataset(ds)
    assert field in str(caught.value) and "\n" not in str(caught.value)
    code, out, err = verify_cli(ds, capsys)
    assert code == 1
    one_line_error(err, field)
    with pytest.raises(SchemaError, match=re.escape(field)):
        load(ds, "skip")


@pytest.mark.parametrize(("content", "what"), [(b"\xff\xfe{}", "not UTF-8"),
                                               (b"[" * 100_000 + b"]" * 100_000, "not valid JSON: RecursionError"),
                                               (b'{"format_version": 1' + b"9" * 5000 + b"}", "not valid JSON"),
                                               (None, "more than the 268435456 such a file may have")])
def test_card_that_is_not_json_text_or_too_big_is_one_line(ds, capsys, content, what):
    if content is None:  # a sparse card of 1 TiB: refused by its size, never read
        with open(ds / "dataset.json", "r+b") as f:
            f.truncate(2**40)
    else:
        (ds / "dataset.json").write_bytes(content)
    code, _, err = verify_cli(ds, capsys)
    assert code == 1
    one_line_error(err, what)


# ---- shards that are not regular files inside the folder ------------------------------------------------


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def _dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _outside(path: Path) -> None:
    outside = path.parent.parent / "elsewhere.tar"
    shutil.move(path, outside)  # the very bytes the card expects, but not in the dataset folder
    path.symlink_to(outside)


@pytest.mark.parametrize(("tamper", "what"), [(_fifo, "is a FIFO, not a regular file"),
                                              (_folder, "is a folder, not a regular file"),
                                              (_dev_zero, "resolves to '/dev/zero', outside the dataset folder"),
                                              (_outside, "outside the dataset folder")])
def test_shard_that_is_not_a_regular_file_in_the_folder(ds, capsys, tamper, what):
    tamper(ds / SHARDS[1])
    before = bytes_read()
    found = verify_dataset(str(ds), progress=False)
    assert bytes_read() - before < 2 * card_bytes(ds, SHARDS[0]) + (1 << 20)  # shard 0, the index; no /dev/zero
    assert [(f.shard, f.key) for f in found] == [(SHARDS[1], None)] and what in found[0].what
    code, out, err = verify_cli(ds, capsys)
    assert code == 1 and err == [] and len(out) == 4 and SHARDS[1] in out[3] and what in out[3]
    with pytest.raises(CorruptShardError, match=f"{SHARDS[1]}.*{what.split(',')[0]}"):
        load(ds, "raise")
    keys, loader = load(ds, "skip")
    good = {r["key"] for r in rows(ds) if r["shard"] == SHARDS[0]}
    assert set(keys) == good and len(keys) == 4
    assert loader.skipped == 4 and {s[0] for s in loader.skipped_samples} == {SHARDS[1]}


def test_fifo_shard_does_not_hang_worker_processes_or_show(ds, tmp_path, capsys):
    _fifo(ds / SHARDS[0])
    keys, loader = load(ds, "skip", num_workers=2)
    assert sorted(keys) == sorted(r["key"] for r in rows(ds) if r["shard"] == SHARDS[1]) and loader.skipped == 4
    assert main(["show", str(ds), "-n", "8", "-o", str(tmp_path / "sheet.png")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is a FIFO" in err[0]
    assert main(["info", str(ds)]) == 0  # info reads no shard


@pytest.mark.parametrize("name", ["index.parquet", "dataset.json", "rejects.jsonl"])
def test_fifo_in_place_of_a_metadata_file_is_one_line(ds, capsys, name):
    _fifo(ds / name)
    command = ["show", str(ds), "--rejects"] if name == "rejects.jsonl" else ["verify", str(ds), "--no-progress"]
    assert main(command) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"'{name}'" in err[0] and "is a FIFO" in err[0]


def test_shard_linked_inside_the_folder_is_read(ds, capsys):
    (ds / "store").mkdir()
    shutil.move(ds / SHARDS[0], ds / "store" / "real.tar")
    (ds / SHARDS[0]).symlink_to(Path("store") / "real.tar")
    assert verify_dataset(str(ds), progress=False) == []
    assert sorted(load(ds, "raise")[0]) == sorted(all_keys(ds))


def test_reads_stop_at_the_cards_byte_count(ds, capsys):
    """A shard far longer than its card (a sparse 1 TiB file) is read only up to the card's size."""
    size = card_bytes(ds, SHARDS[0])
    with open(ds / SHARDS[0], "r+b") as f:
        f.truncate(2**40)
    before = bytes_read()
    found = verify_dataset(str(ds), progress=False)
    assert bytes_read() - before < 4 << 20
    assert [(f.shard, f.key) for f in found] == [(SHARDS[0], None)]
    assert found[0].what == f"longer than the card says: {2**40} bytes, the card says {size}"
    assert sorted(load(ds, "raise")[0]) == sorted(all_keys(ds))


def test_card_and_index_that_agree_on_a_huge_sample_read_only_the_file(ds):
    """A card claiming 1 TiB and a row spanning it: reads stop at the file's end (no 1 TiB buffer)."""
    size = card_bytes(ds, SHARDS[0])
    edit_card(ds, lambda c: c["splits"]["train"]["shards"][0].update(bytes=2**40))
    victim = rows(ds)[1]
    set_index(ds, victim["key"], size=2**40 - victim["offset"])
    before = bytes_read()
    found = verify_dataset(str(ds), progress=False)
    assert bytes_read() - before < 4 << 20
    assert {f.key for f in found} == {None, victim["key"]}
    assert any(f.what == f"truncated: {size} bytes, the card says {2**40}" for f in found)
    keys, loader = load(ds, "skip")
    assert sorted(keys) == sorted(all_keys(ds) - {victim["key"]}) and loader.skipped == 1
    assert "the shard is truncated" in loader.skipped_samples[0][2]


def test_open_regular_refuses_a_device_even_inside_its_folder():
    with pytest.raises(CorruptShardError, match="'zero' in '/dev' is a character device"):
        open_regular("/dev", "zero")


# ---- index.parquet ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "what"), [
    ({"size": 2**40}, "offset {offset} + size 1099511627776 runs past the shard's end at byte {end}"),
    ({"offset": None}, "offset is null"),
    ({"size": None}, "size is null"),
    ({"offset": -512}, "offset -512 is negative"),
    ({"offset": 4100}, "offset 4100 is not a multiple of 512"),  # on no tar block
    ({"offset": 2**62}, f"offset {2**62} + size"),
])
def test_bad_index_values_cost_only_their_sample(ds, capsys, values, what):
    victim = rows(ds)[1]  # the second sample of shard 0: its neighbours share its reads
    what = what.format(offset=victim["offset"], end=card_bytes(ds, victim["shard"]))
    set_index(ds, victim["key"], **values)
    found = verify_dataset(str(ds), progress=False)
    assert [(f.shard, f.key) for f in found] == [(victim["shard"], victim["key"])]
    assert found[0].what.startswith(f"index row: {what}")
    code, out, err = verify_cli(ds, capsys)
    assert code == 1 and len(out) == 4 and what in out[3]
    with pytest.raises(SchemaError) as caught:
        load(ds, "raise")
    message = str(caught.value)
    assert "\n" not in message and message.count("shard '") == 1
    assert f"shard {victim['shard']!r}, sample {victim['key']!r}: index.parquet {what}" in message
    keys, loader = load(ds, "skip")
    assert sorted(keys) == sorted(all_keys(ds) - {victim["key"]})
    assert loader.skipped == 1 and [s[:2] for s in loader.skipped_samples] == [(victim["shard"], victim["key"])]


@pytest.mark.parametrize("how", ["offset inside the previous sample", "size over the next sample"])
def test_overlapping_rows_cost_only_the_wrong_one(ds, capsys, how):
    first, second = rows(ds)[1:3]
    if how == "offset inside the previous sample":
        victim = second
        set_index(ds, second["key"], offset=first["offset"] + 512)
    else:
        victim = first
        set_index(ds, first["key"], size=first["size"] + second["size"])
    found = verify_dataset(str(ds), progress=False)
    assert [(f.shard, f.key) for f in found] == [(victim["shard"], victim["key"])], found
    with pytest.raises(SchemaError, match=f"{first['key']!r} at bytes .*{second['key']!r} at bytes .*overlap"):
        load(ds, "raise")
    keys, loader = load(ds, "skip")
    assert sorted(keys) == sorted(all_keys(ds) - {victim["key"]})
    assert loader.skipped == 1 and loader.skipped_samples[0][:2] == (victim["shard"], victim["key"])
    reason = loader.skipped_samples[0][2]
    assert reason.count("shard '") == 1 and f"sample {victim['key']!r} at byte " in reason


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet PAR1", b"\x00" * 100])
def test_corrupt_or_empty_index_is_one_schema_error(ds, capsys, content):
    (ds / "index.parquet").write_bytes(content)
    code, out, err = verify_cli(ds, capsys)
    assert code == 1
    one_line_error(err, "index.parquet", "cannot be read as Parquet")
    for on_error in ("raise", "skip"):
        with pytest.raises(SchemaError, match="cannot be read as Parquet"):
            load(ds, on_error)


def test_index_offsets_that_are_not_integers_are_one_schema_error(ds, capsys):
    table = pq.read_table(ds / "index.parquet")
    table = table.set_column(table.column_names.index("offset"), "offset",
                             pa.array([str(v) for v in table["offset"].to_pylist()]))
    pq.write_table(table, ds / "index.parquet")
    code, _, err = verify_cli(ds, capsys)
    assert code == 1
    one_line_error(err, "column 'offset' holds 'string', not integers")


# ---- a corrupt tar header ---------------------------------------------------------------------------------


@pytest.mark.parametrize("member", [0, 1])
def test_one_corrupt_header_is_one_failure_with_its_absolute_offset(ds, capsys, member):
    shard = ds / SHARDS[0]
    with tarfile.open(shard) as tf:
        infos = tf.getmembers()
    victim = rows(ds)[1]
    header = [m.offset for m in infos if m.name.startswith(victim["key"] + ".")][member]
    with open(shard, "r+b") as f:  # break the header's checksum
        f.seek(header + 130)
        f.write(b"zz")
    found = verify_dataset(str(ds), progress=False)
    assert [(f.shard, f.key) for f in found] == [(SHARDS[0], None), (SHARDS[0], victim["key"])], found
    assert "sha256" in found[0].what
    assert found[1].what.startswith(f"corrupt tar header at byte {header}: checksum mismatch; read on")
    with pytest.raises(CorruptShardError) as caught:
        load(ds, "raise")
    assert str(caught.value) == (f"shard {SHARDS[0]!r}, sample {victim['key']!r} at byte {victim['offset']}: "
                                 f"corrupt tar header at byte {header}; rebuild the dataset")
    keys, loader = load(ds, "skip")
    assert sorted(keys) == sorted(all_keys(ds) - {victim["key"]})
    assert loader.skipped == 1 and loader.skipped_samples[0][2] == str(caught.value)


def fake_label(root: Path, label: bytes) -> dict:
    """Write ``label`` over the labels in KEY.json of the second sample of shard 0; return its index row."""
    victim = rows(root)[1]
    shard = root / SHARDS[0]
    data = shard.read_bytes()
    start = data.index(b'"digit":', victim["offset"])
    end = data.index(b"}", start)  # the other labels go: they are then missing, which is fine
    fake = label.ljust(end - start, b" ")  # JSON allows the blanks; the tar layout stays the same
    shard.write_bytes(data[:start] + fake + data[end:])
    return victim


@pytest.mark.parametrize("label", [b'"digit":9', b'"digit":"x"'])
def test_label_that_is_no_class_costs_only_its_sample(ds, label):
    """A KEY.json label out of the task's classes fails its sample, not the batch's collate."""
    victim = fake_label(ds, label)
    with pytest.raises(DecodeError) as caught:
        load(ds, "raise")
    assert str(caught.value).startswith(f"shard {SHARDS[0]!r}, sample {victim['key']!r} at byte "
                                        f"{victim['offset']}: cannot be decoded: ValueError: label 'digit' is ")
    keys, loader = load(ds, "skip")
    assert sorted(keys) == sorted(all_keys(ds) - {victim["key"]}) and loader.skipped == 1


@pytest.mark.parametrize(("label", "what"), [(b'"digit":9', "label 'digit' is 9, not a stored classification"),
                                              (b'"digit":"x"', "label 'digit' is 'x', not a stored classification")])
def test_verify_decodes_labels_as_the_loader_does(ds, label, what):
    """What fails the loader's decode fails `verify --decode`, under the sample's key."""
    victim = fake_label(ds, label)
    found = verify_dataset(str(ds), decode=True, progress=False)
    assert [f.what for f in found if f.key == victim["key"] and what in f.what] == [
        f"json does not decode: ValueError: {what} label (class indices below 3)"]


def test_truncated_shard_fails_only_the_samples_past_its_end(ds):
    shard = ds / SHARDS[0]
    cut = rows(ds)[2]["offset"] + 1024  # inside the third sample
    shard.write_bytes(shard.read_bytes()[:cut])
    keys, loader = load(ds, "skip")
    lost = {r["key"] for r in rows(ds)[2:4]}
    assert sorted(keys) == sorted(all_keys(ds) - lost) and loader.skipped == 2
    assert all("truncated" in s[2] for s in loader.skipped_samples)


# ---- text output ---------------------------------------------------------------------------------------------


def test_control_characters_are_printed_escaped(ds, capsys):
    evil = f"{ESC}evil\n"
    (ds / "rejects.jsonl").write_text(json.dumps({"source_id": evil, "reason": "bad_label" + ESC,
                                                  "message": "m" + ESC, "paths": [ESC]}) + "\n")
    assert main(["show", str(ds), "--rejects"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J\\x1b[31mevil\\n" in out
    edit_card(ds, lambda c: (c["tasks"][1].update(classes=["even", "odd" + ESC]),
                             c["counts"].update(rejected={"bad" + ESC: 1})))
    assert main(["info", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "odd\\x1b[2J\\x1b[31m" in out and "bad\\x1b[2J" in out
    assert main(["info", str(ds), "--json"]) == 0
    assert "\x1b" not in capsys.readouterr().out  # json.dumps escapes them itself
    set_index(ds, rows(ds)[0]["key"], size=2**40)
    table = pq.read_table(ds / "index.parquet")
    keys = table["key"].to_pylist()
    keys[keys.index(rows(ds)[0]["key"])] = "k" + ESC
    pq.write_table(table.set_column(0, "key", pa.array(keys)), ds / "index.parquet")
    code, out, _ = verify_cli(ds, capsys)
    assert code == 1 and "\x1b" not in "\n".join(out) and "k\\x1b[2J\\x1b[31m" in "\n".join(out)
