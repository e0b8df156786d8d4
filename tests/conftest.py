"""Shared fixtures: tiny raw datasets in every input layout, and the gpu marker.

Every raw sample ``i`` encodes its index: the image is (8 + i % 3) px wide and filled with grey level
10 * i, the audio has 200 + 10 * i samples at 8 kHz, the text reads ``"sample {i}"``. Labels: ``digit`` =
i % 3 (missing for i == 4), ``parity`` = even/odd, ``speaker`` = one of four names (i % 4). Sample 3 has
no audio and sample 5 no text. Even samples have PNG images and WAV audio, odd ones JPEG and FLAC.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

SPEAKERS = ("ann", "bob", "cat", "dan")
NO_AUDIO, NO_TEXT, NO_DIGIT = 3, 5, 4


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def image_bytes(i: int, fmt: str = "png") -> bytes:
    from PIL import Image

    im = Image.new("L", (8 + i % 3, 8), color=(10 * i) % 256)
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
    return buf.getvalue()


def audio_bytes(i: int, fmt: str = "wav", rate: int = 8000) -> bytes:
    import soundfile as sf

    n = 200 + 10 * i
    y = 0.1 * np.sin(np.arange(n) * (i + 1) / 10.0).astype(np.float32)  # (N,)
    buf = io.BytesIO()
    sf.write(buf, y, rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def sample_media(i: int) -> dict[str, tuple[str, bytes]]:
    """{modality: (ext, bytes)} of raw sample i."""
    img_ext, aud_ext = ("png", "wav") if i % 2 == 0 else ("jpg", "flac")
    media = {"image": (img_ext, image_bytes(i, img_ext))}
    if i != NO_AUDIO:
        media["audio"] = (aud_ext, audio_bytes(i, aud_ext))
    if i != NO_TEXT:
        media["text"] = ("txt", f"sample {i}".encode())
    return media


def sample_labels(i: int) -> dict:
    return {"digit": None if i == NO_DIGIT else i % 3, "parity": "even" if i % 2 == 0 else "odd",
            "speaker": SPEAKERS[i % 4]}


def sample_id(i: int) -> str:
    return f"s{i:03d}"


def write_folders(root: Path, n: int = 12, splits: bool = False) -> Path:
    """SOURCE/[SPLIT/]ID/{image,audio,text}.ext + labels.json."""
    for i in range(n):
        base = root / ("test" if i % 4 == 3 else "train") if splits else root
        d = base / sample_id(i)
        d.mkdir(parents=True)
        for modality, (ext, data) in sample_media(i).items():
            (d / f"{modality}.{ext}").write_bytes(data)
        labels = {k: v for k, v in sample_labels(i).items() if v is not None}
        (d / "labels.json").write_text(json.dumps(labels))
    return root


def write_stems(root: Path, n: int = 12) -> Path:
    """images/ID.ext, audio/ID.ext, text/ID.txt + labels.csv."""
    folders = {"image": "images", "audio": "audio", "text": "text"}
    for i in range(n):
        for modality, (ext, data) in sample_media(i).items():
            (root / folders[modality]).mkdir(parents=True, exist_ok=True)
            (root / folders[modality] / f"{sample_id(i)}.{ext}").write_bytes(data)
    rows = [{"id": sample_id(i), **sample_labels(i)} for i in range(n)]
    _write_csv(root / "labels.csv", rows)
    return root


def manifest_rows(root: Path, n: int = 12) -> list[dict]:
    """Write the media under root/media/ and return manifest rows with relative paths."""
    rows = []
    for i in range(n):
        d = root / "media" / sample_id(i)
        d.mkdir(parents=True)
        row = {"id": sample_id(i), "image": None, "audio": None, "text": None}
        for modality, (ext, data) in sample_media(i).items():
            (d / f"{modality}.{ext}").write_bytes(data)
            row[modality] = f"media/{sample_id(i)}/{modality}.{ext}"
        row.update(sample_labels(i))
        rows.append(row)
    return rows


def write_manifest(root: Path, n: int = 12, fmt: str = "csv") -> Path:
    rows = manifest_rows(root, n)
    path = root / f"manifest.{fmt}"
    if fmt == "csv":
        _write_csv(path, rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_tars(root: Path, n: int = 12, per_tar: int = 5) -> Path:
    """Tars written by webdataset.TarWriter with png + cls members (img2dataset-like)."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    for t in range(0, n, per_tar):
        with wds.TarWriter(str(root / f"part-{t // per_tar:05d}.tar")) as w:
            for i in range(t, min(n, t + per_tar)):
                w.write({"__key__": sample_id(i), "png": image_bytes(i, "png"), "cls": i % 3})
    return root


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})


@pytest.fixture
def raw_folders(tmp_path) -> Path:
    return write_folders(tmp_path / "raw_folders")


@pytest.fixture
def raw_stems(tmp_path) -> Path:
    return write_stems(tmp_path / "raw_stems")


@pytest.fixture(params=["csv", "jsonl", "parquet"])
def raw_manifest(tmp_path, request) -> Path:
    (tmp_path / "raw_manifest").mkdir()
    return write_manifest(tmp_path / "raw_manifest", fmt=request.param)


@pytest.fixture
def raw_tars(tmp_path) -> Path:
    return write_tars(tmp_path / "raw_tars")
