"""mmdata build on bad input: every record is written or rejected with its reason; nothing outside the root is read."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import audio_bytes, image_bytes

from mmdata.build import BuildConfig, build_dataset
from mmdata.cli import main
from mmdata.errors import RejectThresholdError
from mmdata.format import KEY_RE


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose IHDR declares width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def empty_wav() -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((0,), np.float32), 8000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture
def bad_corpus(tmp_path) -> tuple[Path, dict[str, str | None]]:
    """A JSONL manifest mixing good rows and one row per kind of bad input; returns (path, id -> reason)."""
    root = tmp_path / "root"
    (root / "m").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    outside.write_bytes(image_bytes(1))

    def put(name: str, data: bytes) -> str:
        (root / "m" / name).write_bytes(data)
        return f"m/{name}"

    os.symlink(outside, root / "m" / "link.png")
    good = lambda i, **kw: {"id": f"g{i}", "image": put(f"g{i}.png", image_bytes(i)), "digit": i % 3, **kw}  # noqa: E731
    rows, expect = [], {}

    def add(row, reason):
        rows.append(row)
        expect.setdefault(row["id"], reason)

    for i in range(4):
        add(good(i, score=float(i)), None)
    jpg = image_bytes(7, "jpg")
    wav = audio_bytes(7)
    add({"id": "corrupt_jpeg", "image": put("c.jpg", jpg[: len(jpg) // 2]), "digit": 0}, "unreadable")
    add({"id": "truncated_wav", "image": put("t.png", image_bytes(2)), "audio": put("t.wav", wav[: len(wav) // 2]),
         "digit": 1}, "unreadable")
    add({"id": "empty", "image": put("e.png", b""), "digit": 0}, "empty_file")
    add({"id": "not_utf8", "image": put("u.png", image_bytes(3)), "text": put("u.txt", b"caf\xe9 \xff"),
         "digit": 0}, "bad_text_encoding")
    add({"id": "undeclared", "image": put("d.png", image_bytes(4)), "digit": 7}, "bad_label")
    add({"id": "nan_score", "image": put("n.png", image_bytes(5)), "digit": 0, "score": float("nan")},
        "bad_label")
    add(good(0), "duplicate_id")  # second g0
    add({"id": "a.b c", "image": put("dots.png", image_bytes(6)), "digit": 2}, None)
    add({"id": "dotdot", "image": "../outside.png", "digit": 0}, "outside_root")
    add({"id": "absolute", "image": str(outside), "digit": 0}, "outside_root")
    add({"id": "symlink", "image": "m/link.png", "digit": 0}, "outside_root")
    add({"id": "bomb", "image": put("bomb.png", huge_png_header()), "digit": 0}, "too_large")
    add({"id": "no_image", "text": "inline words", "digit": 0}, "missing_modality")
    add({"id": "missing_file", "image": "m/nope.png", "digit": 0}, "unreadable")
    add({"id": "audio_as_image", "image": put("x.png", wav), "digit": 0}, "unreadable")
    add({"id": "silent", "image": put("s.png", image_bytes(8)), "audio": put("s.wav", empty_wav()), "digit": 0},
        "empty_file")
    add({"id": "weird_ext", "image": put("w.heic", b"1234"), "digit": 0}, "unsupported_format")
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN is written as a bare NaN
    (tmp_path / "build.yaml").write_text(
        "required: [image]\ntasks:\n  digit: {type: classification, classes: ['0', '1', '2']}\n"
        "  score: {type: regression}\nworkers: 1\n")
    return manifest, expect


def test_every_bad_record_is_rejected_with_its_reason(bad_corpus, tmp_path):
    manifest, expect = bad_corpus
    cfg = BuildConfig.from_yaml(tmp_path / "build.yaml")
    with pytest.raises(RejectThresholdError) as over:  # most rows are bad: past max_reject_fraction
        build_dataset(manifest, tmp_path / "out", cfg, progress=False)
    card = over.value.card  # the dataset and its rejects are written all the same
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    n_rows = len(manifest.read_text().splitlines())
    assert card.counts["written"] + len(rejects) == card.counts["input"] == n_rows
    got = {r["source_id"]: r["reason"] for r in rejects if r["source_id"] != "g0"}
    assert got == {k: v for k, v in expect.items() if v is not None}
    assert [r["reason"] for r in rejects if r["source_id"] == "g0"] == ["duplicate_id"]
    assert all(set(r) == {"source_id", "paths", "reason", "message"} and r["message"] for r in rejects)
    assert sum(card.counts["rejected"].values()) == len(rejects)
    # the id with dots and spaces is kept under a clean key
    rows = {r["source_id"]: r for r in pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()}
    assert sorted(rows) == ["a.b c", "g0", "g1", "g2", "g3"]
    assert all(KEY_RE.match(r["key"]) for r in rows.values()) and rows["a.b c"]["key"] != "a.b c"
    assert rows["g2"]["label:score"] == [2.0] and rows["a.b c"]["label:score"] is None


def test_exit_status_follows_max_reject_fraction(bad_corpus, tmp_path, capsys):
    manifest, _ = bad_corpus
    cfg = str(tmp_path / "build.yaml")
    status = main(["build", str(manifest), str(tmp_path / "a"), "--config", cfg, "--no-progress"])
    out = capsys.readouterr().out
    assert status == 1 and "rejected outside_root: 3" in out
    counts = json.loads((tmp_path / "a" / "dataset.json").read_text())["counts"]
    fraction = sum(counts["rejected"].values()) / counts["input"]
    for margin, want in ((0.01, 0), (-0.01, 1)):
        status = main(["build", str(manifest), str(tmp_path / "b"), "--config", cfg, "--no-progress",
                       "--overwrite", "--set", f"max_reject_fraction={fraction + margin:.3f}"])
        assert status == want


def _png_variants() -> dict[str, bytes]:
    """Valid PNGs of several kinds and broken copies, each decodable or not by Pillow."""
    import io

    import numpy as np
    from PIL import Image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def png(**kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kw)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    out = {}
    for mode, shape in [("L", (9, 7)), ("RGB", (9, 7, 3)), ("RGBA", (5, 11, 4)), ("LA", (6, 6, 2)), ("1", (13, 3))]:
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)
        out[mode] = png()
    img = Image.fromarray(rng.integers(0, 60000, (8, 5), dtype=np.uint16))
    out["I;16"] = png()
    img = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    out["interlaced"] = png(interlace=1)
    img = img.convert("P")
    out["palette"] = png()
    good = out["RGB"]
    idat = good.index(b"IDAT") - 4
    length = struct.unpack_from(">I", good, idat)[0]
    pixels = zlib.decompress(good[idat + 8:idat + 8 + length])
    out["truncated"] = good[:-20]
    out["bad crc"] = good[:idat + 9] + bytes([good[idat + 9] ^ 1]) + good[idat + 10:]
    out["bad filter byte"] = good[:idat] + chunk(b"IDAT", zlib.compress(b"\x07" + pixels[1:])) + good[idat + 12 + length:]
    out["short pixels"] = good[:idat] + chunk(b"IDAT", zlib.compress(pixels[:-5])) + good[idat + 12 + length:]
    out["no IEND"] = good[:-12]
    out["not a png"] = b"GIF89a" + good[6:]
    head, tail = good[:idat], good[idat + 12 + length:]  # signature + IHDR; IEND
    stream = good[idat + 8:idat + 8 + length]
    half = len(stream) // 2
    out["two IDATs"] = head + chunk(b"IDAT", stream[:half]) + chunk(b"IDAT", stream[half:]) + tail
    out["IDAT split by tIME"] = (head + chunk(b"IDAT", stream[:half]) + chunk(b"tIME", b"\x07\xea\x01\x01\0\0\0")
                                 + chunk(b"IDAT", stream[half:]) + tail)
    out["IDAT before IHDR"] = good[:8] + good[idat:idat + 12 + length] + good[8:idat] + tail
    out["empty gAMA"] = head + chunk(b"gAMA", b"") + good[idat:]
    out["short pHYs"] = head + chunk(b"pHYs", b"\0\0") + good[idat:]
    return out


BROKEN_PNGS = ["truncated", "bad crc", "bad filter byte", "short pixels", "no IEND", "not a png",
               "IDAT split by tIME", "IDAT before IHDR", "empty gAMA", "short pHYs"]


@pytest.mark.parametrize("name", ["L", "RGB", "RGBA", "LA", "1", "I;16", "two IDATs", "interlaced", "palette",
                                  *BROKEN_PNGS])
def test_fast_png_check_agrees_with_pillow(name):
    """The fast path accepts only what Pillow decodes, with the same size, and takes the common cases."""
    import io

    from PIL import Image

    from mmdata.build.media import plain_png_size

    data = _png_variants()[name]
    fast = plain_png_size(data, max_pixels=10**8)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            pillow = im.size
    except Exception:  # noqa: BLE001
        pillow = None
    if fast is not None:
        assert fast == pillow
    if name in ("L", "RGB", "RGBA", "LA", "1", "I;16", "two IDATs"):
        assert fast is not None  # the common case never falls back to Pillow
    if name in BROKEN_PNGS:
        assert fast is None


def test_fast_png_check_never_inflates_what_it_would_refuse():
    """Over max_pixels it stops at the header; within, it inflates in bounded steps, never the whole image."""
    import tracemalloc

    from mmdata.build.media import plain_png_size

    side = 4096
    row = b"\0" + b"\0" * side
    data = b"\x89PNG\r\n\x1a\n"
    for kind, body in [(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)),
                       (b"IDAT", zlib.compress(row * side, 9)), (b"IEND", b"")]:
        data += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    assert len(data) < 100_000  # 16 MB of pixels in a small file
    assert plain_png_size(data, max_pixels=side * side - 1) is None
    tracemalloc.start()
    assert plain_png_size(data, max_pixels=side * side) == (side, side)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20


def test_colliding_long_ids_get_keys_that_fit(tmp_path):
    """An id equal to another id's derived key forces the collision suffix; the key still fits a tar name."""
    from mmdata.build.align import Ids
    from mmdata.build.records import RawRecord
    from mmdata.format import MAX_KEY, make_key

    spaced = "y" * 80 + " z"
    ids = Ids()
    keys = [ids.check(RawRecord(i)) for i in (spaced, make_key(spaced), "w" * MAX_KEY)]
    assert len(set(keys)) == 3 and all(KEY_RE.match(k) and len(k) <= MAX_KEY for k in keys)
    assert keys[0] == make_key(spaced) and keys[2] == "w" * MAX_KEY  # first come keeps the plain key


@pytest.mark.parametrize("fmt", ["wav", "flac"])
@pytest.mark.parametrize("rate", [8000, 22050, 48000])
def test_audio_keeps_its_native_rate_until_the_build_settles_on_one(fmt, rate):
    """With no sample_rate set, packing keeps each file's own rate and says which it was."""
    import io

    import soundfile as sf

    from mmdata.build.media import MediaSettings, encode_audio

    data = audio_bytes(1, fmt, rate)
    ext, stored, seconds, got = encode_audio(data, fmt, MediaSettings(sample_rate=None, audio_format=fmt))
    assert got == sf.info(io.BytesIO(stored)).samplerate == rate and ext == fmt
    assert stored == data  # already in the stored form: the bytes are kept


def test_a_huge_label_value_is_a_reject_and_never_reaches_the_card(tmp_path):
    """The card holds label counts and shard lists only: a 5 MB label string is one bad_label reject."""
    rows = [{"id": f"r{i}", "text": f"text {i}", "colour": ["red", "green"][i % 2]} for i in range(20)]
    rows[7]["colour"] = "x" * (5 * 2**20)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = build_dataset(tmp_path / "m.jsonl", tmp_path / "out", BuildConfig(workers=1, max_reject_fraction=0.5),
                         progress=False)
    assert card.counts == {"input": 20, "written": 19, "rejected": {"bad_label": 1}}
    assert card.tasks["colour"].classes == ("green", "red")
    assert (tmp_path / "out" / "dataset.json").stat().st_size < 64 * 2**10
    assert (tmp_path / "out" / "rejects.jsonl").stat().st_size < 2**10  # the message quotes 40 characters
    (reject,) = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["source_id"] == "r7" and "too long to be a class name" in reject["message"]


def test_a_column_of_too_many_distinct_values_is_meta_not_a_task(tmp_path, monkeypatch, caplog):
    import mmdata.tasks

    monkeypatch.setattr(mmdata.tasks, "MAX_CLASSES", 8)
    rows = [{"id": f"r{i}", "text": f"text {i}", "caption": f"a picture of {i}", "digit": i % 3} for i in range(20)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = build_dataset(tmp_path / "m.jsonl", tmp_path / "out", BuildConfig(workers=1), progress=False)
    assert card.tasks.names == ["digit"] and card.counts["written"] == 20
    assert "'caption' has more than 8 distinct values" in caplog.text
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    assert sorted(r["meta.caption"] for r in index) == sorted(r["caption"] for r in rows)


def test_audio_of_several_rates_is_resampled_to_16k_and_of_one_rate_kept(tmp_path):
    """sample_rate unset: one rate among the inputs is kept; several become 16 kHz, every clip re-encoded."""
    import io

    import soundfile as sf

    from mmdata.format import parse_members

    def build(rates, name):
        root = tmp_path / name
        root.mkdir()
        for i, rate in enumerate(rates):
            (root / f"a{i}").mkdir()
            (root / f"a{i}" / "clip.wav").write_bytes(audio_bytes(i, "wav", rate))
        return build_dataset(root, tmp_path / f"{name}-out", BuildConfig(workers=1, audio_format="wav"),
                             progress=False)

    card = build([22050, 22050, 22050], "one")
    assert card.modalities["audio"]["sample_rate"] == 22050
    card = build([8000, 22050, 16000, 8000], "mixed")
    assert card.modalities["audio"]["sample_rate"] == 16000 and card.counts["written"] == 4
    rates, seconds = [], {}
    for shard in (tmp_path / "mixed-out").glob("*.tar"):
        for name, data in parse_members(shard.read_bytes()):
            if name.endswith(".wav"):
                info = sf.info(io.BytesIO(data))
                rates.append(info.samplerate)
                seconds[name.split(".")[0]] = info.frames / info.samplerate
    assert rates == [16000] * 4
    index = {r["key"]: r["audio_seconds"] for r in pq.read_table(tmp_path / "mixed-out" / "index.parquet").to_pylist()}
    assert index == pytest.approx(seconds)


def test_rejects_are_logged_in_input_order_with_a_few_ids_per_reason(tmp_path):
    from mmdata.build.align import Reject, RejectLog

    with RejectLog(str(tmp_path / "r.jsonl")) as log:
        for i in reversed(range(30)):  # ids come largest first: the log keeps the smallest
            log.add(Reject(f"r{i:02d}", (), "empty_file" if i % 3 else "bad_label", "why"))
        log.add(Reject("r00", (), "bad_label", "again"))  # the same id twice counts twice, is shown once
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["source_id"] for r in lines] == [f"r{i:02d}" for i in reversed(range(30))] + ["r00"]
    assert len(log) == 31 and log.reasons == {"empty_file": 20, "bad_label": 11}
    assert log.examples["bad_label"] == [f"r{i:02d}" for i in range(0, 24, 3)]  # the 8 smallest, once each
    assert log.examples["empty_file"] == ["r01", "r02", "r04", "r05", "r07", "r08", "r10", "r11"]


def test_a_build_of_many_rejects_holds_none_of_them(tmp_path):
    """Rejects go to rejects.jsonl as they come: memory grows by the ids only (for duplicates), not the rejects."""
    import tracemalloc

    def peak(n: int) -> int:
        rows = "".join(json.dumps({"id": f"row-{i:06d}-with-a-longer-id", "label": "x"}) + "\n" for i in range(n))
        (tmp_path / f"m{n}.jsonl").write_text(rows)  # no media column: every row is a missing_modality reject
        tracemalloc.start()
        with pytest.raises(RejectThresholdError) as over:
            build_dataset(tmp_path / f"m{n}.jsonl", tmp_path / f"out{n}", BuildConfig(workers=1), progress=False)
        got = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert over.value.card.counts["rejected"] == {"missing_modality": n}
        assert len((tmp_path / f"out{n}" / "rejects.jsonl").read_text().splitlines()) == n
        return got

    peak(100)  # the first build pays for imports and caches
    small, large = peak(2_000), peak(22_000)
    assert (large - small) / 20_000 < 250  # bytes a reject: ~160 (its id, kept to find duplicates); ~360 if held
