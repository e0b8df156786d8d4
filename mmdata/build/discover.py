"""Discover: one RawRecord per sample id from any input layout; nothing is decoded here."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetNotFoundError, SchemaError
from .config import BuildConfig

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "folders", "stems", "manifest", "webdataset")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "opus", "m4a")
TEXT_EXTS = ("txt",)
TABLE_EXTS = (".csv", ".jsonl", ".parquet")
TAR_EXTS = (".tar", ".tgz", ".tar.gz")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
LABEL_TABLE_NAMES = ("labels.csv", "labels.jsonl", "labels.parquet")


@dataclass(frozen=True)
class MediaRef:
    """Where one modality of a record lives: a path relative to the root, or inline bytes."""

    ext: str  # lower-case extension without the dot ("" when unknown)
    path: str | None = None
    data: bytes | None = None
    size: int | None = None  # bytes, once checked


@dataclass
class RawRecord:
    """One input record before any check: ids, media references, raw label values."""

    source_id: str
    media: dict[str, MediaRef] = field(default_factory=dict)  # modality -> reference
    labels: dict[str, Any] = field(default_factory=dict)  # column -> raw value
    split: str | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason, message) found while discovering

    @property
    def paths(self) -> list[str]:
        return [m.path if m.path is not None else f"<inline {m.ext}>" for m in self.media.values()]


def read_file(path: str, limit: int | None = None, size: int | None = None) -> bytes:
    """The bytes of a file (its first ``limit`` bytes) with few system calls: open, read, close.

    ``open().read()`` costs twice as many (fstat, ioctl, a read to see the end), which is most of a build's
    time on small files. ``size`` is what a stat already said (else one fstat asks). A regular file returns
    everything in the first read, which asks for one byte more to see the end; a file that grew meanwhile
    is read on to its end.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if limit is not None:
            return os.read(fd, limit)
        if size is None:
            size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) <= size:
            return data
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def modality_of_ext(ext: str) -> str | None:
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TEXT_EXTS:
        return "text"
    return None


def detect_layout(source: Path) -> str:
    """Guess the layout of ``source`` (a folder, a table file, a tar file or a glob/brace pattern)."""
    text = str(source)
    if any(c in text for c in "*?{"):
        return "webdataset"
    if source.is_file():
        if text.endswith(TAR_EXTS):
            return "webdataset"
        if source.suffix.lower() in TABLE_EXTS:
            return "manifest"
        raise SchemaError(f"cannot tell the layout of file {text!r}; give a CSV/JSONL/Parquet manifest or a tar")
    if not source.is_dir():
        raise DatasetNotFoundError(f"source {text!r} does not exist; give a folder, a manifest file or tar shards")
    with os.scandir(source) as it:  # d_type from the listing: no stat per child
        children = sorted(it, key=lambda e: e.name)
    if any(c.is_file() and c.name.endswith(TAR_EXTS) for c in children):
        return "webdataset"
    for c in children:
        if not c.is_dir():
            continue
        if _is_sample_dir(Path(c.path)):
            return "folders"
        if c.name.lower() in SPLIT_NAMES and any(_is_sample_dir(Path(g.path)) for g in _subdirs(c.path)):
            return "folders"
    return "stems"


def _is_sample_dir(d: Path) -> bool:
    """A per-sample folder: a labels.json, or at most one file of each modality (a stems folder has many)."""
    files = [f for f in d.iterdir() if f.is_file()]
    if any(f.name == "labels.json" for f in files):
        return True
    kinds = [m for m in (modality_of_ext(f.suffix[1:]) for f in files) if m]
    return bool(kinds) and len(kinds) == len(set(kinds))


def discover(source: str | Path, layout: str, config: BuildConfig) -> tuple[Path, str, list[RawRecord]]:
    """Return (root, resolved layout, records) for ``source``; records come in a deterministic order."""
    if layout not in LAYOUTS:
        raise SchemaError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src = Path(source)
    if layout == "auto":
        layout = detect_layout(src)
    if layout == "webdataset":
        files = _tar_files(str(source))
        root = src if src.is_dir() else Path(files[0]).parent
        return root, layout, _from_tars(files)
    if layout == "manifest":
        if not src.is_file():
            raise DatasetNotFoundError(f"manifest {str(src)!r} is not a file; give a CSV, JSONL or Parquet file")
        return src.parent, layout, _from_manifest(src, config)
    if not src.is_dir():
        raise DatasetNotFoundError(f"source {str(src)!r} is not a folder; the {layout} layout reads a folder")
    if layout == "folders":
        return src, layout, _from_folders(src)
    return src, layout, _from_stems(src, config)


# ---- tables ------------------------------------------------------------------------------------------------


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV (values typed: int, float or str; empty -> None), JSONL or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            return [{k: _typed(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SchemaError(f"{path}: line {n} is not JSON ({e}); fix or remove it") from None
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise SchemaError(f"table {str(path)!r} must be .csv, .jsonl or .parquet")


_INT_RE = re.compile(r"^-?(0|[1-9][0-9]*)$")


def _typed(v: str | None) -> Any:
    """A CSV cell as the value a JSON file would hold: '' -> None, '3' -> 3, '0.5' -> 0.5, else the string."""
    if v is None or v == "":
        return None
    if _INT_RE.match(v):
        return int(v)
    try:
        return float(v)
    except ValueError:
        return v


def _row_id(row: dict[str, Any], config: BuildConfig, where: str) -> str:
    if config.id_column not in row:
        raise SchemaError(f"{where}: no id column {config.id_column!r} (columns: {sorted(row)}); "
                          "set id_column in the build config")
    v = row[config.id_column]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return "" if v is None else str(v)


def _label_columns(row: dict[str, Any], config: BuildConfig, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    skip = {config.id_column, config.split_column, config.image_column, config.audio_column,
            config.text_column, *config.ignore_columns, *extra}
    return {k: v for k, v in row.items() if k not in skip}


def _from_manifest(path: Path, config: BuildConfig) -> list[RawRecord]:
    rows = read_table(path)
    records = []
    for n, row in enumerate(rows, 1):
        rec = RawRecord(_row_id(row, config, f"{path.name} row {n}"))
        for modality, col in (("image", config.image_column), ("audio", config.audio_column),
                              ("text", config.text_column)):
            v = row.get(col)
            if v is None or v == "":
                continue
            v = str(v)
            if modality == "text" and not (v.lower().endswith(".txt") and "\n" not in v):
                rec.media["text"] = MediaRef("txt", data=v.encode("utf-8"))  # inline text
                continue
            ext = Path(v).suffix[1:].lower()
            rec.media[modality] = MediaRef(ext, path=v)
            if modality_of_ext(ext) != modality:
                rec.problems.append(("unsupported_format", f"{col} {v!r}: extension {ext!r} is not a known "
                                     f"{modality} format"))
        split = row.get(config.split_column)
        rec.split = None if split is None else SPLIT_NAMES.get(str(split).lower(), str(split))
        rec.labels = _label_columns(row, config)
        records.append(rec)
    return records


# ---- folders and stems -------------------------------------------------------------------------------------


def _from_folders(root: Path) -> list[RawRecord]:
    records = []
    for child in _subdirs(str(root)):
        split_name = SPLIT_NAMES.get(child.name.lower())
        if split_name and not _is_sample_dir(Path(child.path)):
            records += [_folder_record(d, f"{child.name}/{d.name}", split_name) for d in _subdirs(child.path)]
        else:
            records.append(_folder_record(child, child.name, None))
    return records


def _subdirs(path: str) -> list[os.DirEntry]:
    """The folders in ``path`` (links to folders included), by name; scandir spares a stat per entry."""
    with os.scandir(path) as it:
        return sorted((e for e in it if e.is_dir()), key=lambda e: e.name)


def _folder_record(d: os.DirEntry, rel_dir: str, split: str | None) -> RawRecord:
    rec = RawRecord(d.name, split=split)
    with os.scandir(d.path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for f in entries:
        rel = f"{rel_dir}/{f.name}"
        if f.name == "labels.json":
            try:
                labels = json.loads(read_file(f.path).decode("utf-8"))
                if not isinstance(labels, dict):
                    raise ValueError("not a JSON object")
                rec.labels = labels
            except (ValueError, UnicodeDecodeError) as e:
                rec.problems.append(("bad_label", f"{rel}: not a JSON object of labels ({e})"))
            except OSError as e:
                rec.problems.append(("unreadable", f"{rel}: cannot read ({e.strerror or e})"))
            continue
        ext = os.path.splitext(f.name)[1][1:].lower()
        modality = modality_of_ext(ext)
        if modality is None:
            continue  # README, notes, ...: not part of the sample
        if modality in rec.media:
            rec.problems.append(("unsupported_format", f"{d.name}: more than one {modality} file "
                                 f"({rec.media[modality].path}, {rel}); keep one per sample folder"))
            continue
        rec.media[modality] = MediaRef(ext, path=rel)
    return rec


def _from_stems(root: Path, config: BuildConfig) -> list[RawRecord]:
    table_path = root / config.labels_file if config.labels_file else None
    if table_path is None:
        found = [root / n for n in LABEL_TABLE_NAMES if (root / n).is_file()]
        table_path = found[0] if found else None
    by_id: dict[str, RawRecord] = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        if table_path is not None and f == table_path:
            continue
        ext = f.suffix[1:].lower()
        modality = modality_of_ext(ext)
        if modality is None:
            continue
        rel = f.relative_to(root).as_posix()
        rec = by_id.setdefault(f.stem, RawRecord(f.stem))
        if modality in rec.media:
            rec.problems.append(("unsupported_format", f"{f.stem}: more than one {modality} file "
                                 f"({rec.media[modality].path}, {rel}); keep one per stem"))
            continue
        rec.media[modality] = MediaRef(ext, path=rel)
    if table_path is not None:
        if not table_path.is_file():
            raise DatasetNotFoundError(f"label table {str(table_path)!r} does not exist; fix labels_file")
        for n, row in enumerate(read_table(table_path), 1):
            sid = _row_id(row, config, f"{table_path.name} row {n}")
            rec = by_id.setdefault(sid, RawRecord(sid))
            split = row.get(config.split_column)
            rec.split = None if split is None else SPLIT_NAMES.get(str(split).lower(), str(split))
            rec.labels = _label_columns(row, config)
    return [by_id[k] for k in sorted(by_id)]


# ---- webdataset tars ---------------------------------------------------------------------------------------


def _tar_files(pattern: str) -> list[str]:
    p = Path(pattern)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.name.endswith(TAR_EXTS))
    elif p.is_file():
        files = [pattern]
    else:
        files = sorted({f for pat in _expand_braces(pattern) for f in glob.glob(pat)})
    if not files:
        raise DatasetNotFoundError(f"no tar shards match {pattern!r}; give a folder of .tar files, a glob or "
                                   "a brace pattern like 'shards-{000000..000009}.tar'")
    return files


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [p for i in range(lo, hi + 1)
                for p in _expand_braces(pattern[:m.start()] + f"{i:0{width}d}" + pattern[m.end():])]
    m = re.search(r"\{([^{}]*,[^{}]*)\}", pattern)
    if m:
        return [p for alt in m.group(1).split(",")
                for p in _expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]
    return [pattern]


def _from_tars(files: list[str]) -> list[RawRecord]:
    records = []
    for file in files:
        name = Path(file).name
        try:
            with tarfile.open(file, "r:*") as tar:
                groups: dict[str, dict[str, bytes]] = {}
                for info in tar:
                    if not info.isfile():
                        continue
                    base = info.name.rsplit("/", 1)[-1]
                    prefix = info.name[: len(info.name) - len(base)]
                    key, _, ext = base.partition(".")
                    f = tar.extractfile(info)
                    groups.setdefault(prefix + key, {})[ext.lower()] = f.read() if f else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            raise SchemaError(f"tar shard {file!r} cannot be read ({e}); remove or repair it") from None
        for key, members in groups.items():
            records.append(_tar_record(name, key, members))
    return records


def _tar_record(tar_name: str, key: str, members: dict[str, bytes]) -> RawRecord:
    rec = RawRecord(key)
    for ext, data in sorted(members.items()):
        last = ext.rsplit(".", 1)[-1]
        modality = modality_of_ext(last)
        if modality is not None:
            if modality in rec.media:
                rec.problems.append(("unsupported_format", f"{tar_name}:{key}: more than one {modality} member"))
                continue
            rec.media[modality] = MediaRef(last, path=f"{tar_name}:{key}.{ext}", data=data)
        elif ext == "cls":
            rec.labels["cls"] = _typed(data.decode("utf-8", "replace").strip())
        elif ext == "json":
            try:
                meta = json.loads(data)
            except (ValueError, UnicodeDecodeError) as e:
                rec.problems.append(("bad_label", f"{tar_name}:{key}.json is not JSON ({e})"))
                continue
            if isinstance(meta, dict):
                if isinstance(meta.get("id"), str):
                    rec.source_id = meta["id"]
                labels = meta.get("labels")
                if isinstance(labels, dict):  # mmdata's own format: {"id", "labels": {...}}
                    rec.labels.update(labels)
    return rec
