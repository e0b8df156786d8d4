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
    card = build_dataset(manifest, tmp_path / "out", cfg, progress=False)
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
