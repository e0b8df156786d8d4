"""Discover: one RawRecord per sample id from any input layout; nothing is decoded here."""

from __future__ import annotations

import io
import logging
import operator
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DatasetNotFoundError, SchemaError
from .config import BuildConfig
from .guard import Refused, open_regular, parse_json, read_file, read_inside
from .hfparquet import from_parquet, is_hf_parquet, parquet_files
from .records import AUDIO_EXTS, IMAGE_EXTS, SPLIT_NAMES, TEXT_EXTS, MediaRef, RawRecord, modality_of_ext  # noqa: F401 - the names discovery has always exported
from .spool import Spool
from .tars import TAR_EXTS, from_tars, source_card, tar_files

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "folders", "stems", "manifest", "webdataset", "hfparquet")
TABLE_EXTS = (".csv", ".jsonl", ".parquet")
LABEL_TABLE_NAMES = ("labels.csv", "labels.jsonl", "labels.parquet")
MAX_LABELS_BYTES = 16 * 2**20  # one sample's labels.json
PARQUET_BATCH = 8192  # manifest rows read at a time
BY_NAME = operator.attrgetter("name")  # scandir entries sorted by name


def detect_layout(source: Path) -> str:
    """Guess the layout of ``source`` (a folder, a table file, a tar file or a glob/brace pattern)."""
    text = str(source)
    if any(c in text for c in "*?{"):
        return "webdataset"
    if source.is_file():
        if text.endswith(TAR_EXTS):
            return "webdataset"
        if source.suffix.lower() == ".parquet" and is_hf_parquet(source):
            return "hfparquet"
        if source.suffix.lower() in TABLE_EXTS:
            return "manifest"
        raise SchemaError(f"cannot tell the layout of file {text!r}; give a CSV/JSONL/Parquet manifest or a tar")
    if not source.is_dir():
        if os.path.lexists(source):
            raise SchemaError(f"source {text!r} is neither a regular file nor a folder (a FIFO, a device or a "
                              "broken link); give a folder, a manifest file or tar shards")
        raise DatasetNotFoundError(f"source {text!r} does not exist; give a folder, a manifest file or tar shards")
    with os.scandir(source) as it:  # d_type from the listing: no stat per child
        children = sorted(it, key=lambda e: e.name)
    if any(c.is_file() and c.name.endswith(TAR_EXTS) for c in children):
        return "webdataset"
    if parquet_files(source):  # Hugging Face's SPLIT-00000-of-00001.parquet, maybe under data/
        return "hfparquet"
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


def discover(source: str | Path, layout: str, config: BuildConfig, exclude: Path | None = None,
             spool: Spool | None = None) -> tuple[Path, str, Iterable[RawRecord]]:
    """Return (root, resolved layout, records) for ``source``; records come in a deterministic order, from
    folders and manifests as they are read (a generator), from tars and Parquet files once spooled.

    ``exclude`` is the build's output folder: when it lies inside the source, it is not input. ``spool``
    keeps member bytes that cannot stay where they are (in compressed shards).
    """
    if layout not in LAYOUTS:
        raise SchemaError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    src = Path(source)
    if layout == "auto":
        layout = detect_layout(src)
    if layout == "webdataset":
        files = tar_files(str(source))
        root = src if src.is_dir() else Path(files[0]).parent
        if spool is None:
            raise SchemaError("the webdataset layout needs a spool folder for compressed shards")
        return root, layout, from_tars(files, config, spool, source_card(root))
    if layout == "hfparquet":
        files = [src] if src.is_file() else parquet_files(src)
        if not files:
            raise DatasetNotFoundError(f"no Parquet files in {str(src)!r}; give a .parquet file or a folder of "
                                       "SPLIT-*.parquet files")
        root = src.parent if src.is_file() else src
        if spool is None:
            raise SchemaError("the hfparquet layout needs a spool folder for embedded bytes")
        return root, layout, from_parquet(files, config, spool, root=root)
    if layout == "manifest":
        if not src.is_file():
            raise DatasetNotFoundError(f"manifest {str(src)!r} is not a file; give a CSV, JSONL or Parquet file")
        return src.parent, layout, _from_manifest(src, config)
    if not src.is_dir():
        raise DatasetNotFoundError(f"source {str(src)!r} is not a folder; the {layout} layout reads a folder")
    skip = _excluded(src, exclude)
    if layout == "folders":
        return src, layout, _from_folders(src, skip)
    return src, layout, _from_stems(src, config, skip)


def _excluded(src: Path, exclude: Path | None) -> str | None:
    """The output folder's path relative to the source, when the output lies inside it (else None)."""
    if exclude is None:
        return None
    real_src, real_out = os.path.realpath(src), os.path.realpath(exclude)
    if os.path.commonpath([real_src, real_out]) != real_src or real_out == real_src:
        return None
    rel = os.path.relpath(real_out, real_src).replace(os.sep, "/")
    log.warning("the output folder %s lies inside the source: it is not read as input", rel)
    return rel


# ---- tables ------------------------------------------------------------------------------------------------


def read_table(path: Path, max_bytes: int, real_root: Path | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a CSV (values typed: int, float or str; empty -> None), JSONL or Parquet file, as they are read.

    With ``real_root`` the table must lie inside it (a label table, read whole); without, it is the file the
    user named (a manifest), read in a stream, so a build never holds a manifest's text. Either way it is read
    through the guard: a regular file within ``max_bytes``.
    """
    suffix = path.suffix.lower()
    if suffix not in TABLE_EXTS:
        raise SchemaError(f"table {str(path)!r} must be .csv, .jsonl or .parquet")
    try:
        f = (io.BytesIO(read_inside(path, real_root, max_bytes, "label table")) if real_root is not None
             else open_regular(path, max_bytes, "manifest"))
    except Refused as e:
        raise SchemaError(f"{e.message}; give a regular file inside the source, within max_file_bytes") from None
    with f:
        try:
            yield from _rows(f, suffix, path)
        except Refused as e:
            raise SchemaError(f"{e.message}; raise max_file_bytes or fix the file") from None


def _rows(f: BinaryIO, suffix: str, path: Path) -> Iterator[dict[str, Any]]:
    if suffix == ".csv":
        import csv

        try:
            text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
            for row in csv.DictReader(text):
                yield {k: _typed(v) for k, v in row.items() if k is not None}
        except (UnicodeDecodeError, csv.Error) as e:
            raise SchemaError(f"{path}: not a readable UTF-8 CSV ({e}); fix the file") from None
        return
    if suffix == ".jsonl":
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield parse_json(line, f"line {n}")
                except ValueError as e:
                    raise SchemaError(f"{path}: {e}; fix or remove that line") from None
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{path}: not a readable Parquet file ({e})") from None


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


def _from_manifest(path: Path, config: BuildConfig) -> Iterator[RawRecord]:
    for n, row in enumerate(read_table(path, config.max_file_bytes), 1):
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
        yield rec


# ---- folders and stems -------------------------------------------------------------------------------------


def _from_folders(root: Path, skip: str | None = None) -> Iterator[SampleFolder]:
    real_root = str(os.path.realpath(root))
    for child in _subdirs(str(root)):
        if child.name == skip:
            continue
        split_name = SPLIT_NAMES.get(child.name.lower())
        if split_name and not _is_sample_dir(Path(child.path)):
            for d in _subdirs(child.path):
                if f"{child.name}/{d.name}" != skip:
                    yield SampleFolder(d.name, d.path, f"{child.name}/{d.name}", split_name, real_root,
                                       child.is_symlink() or d.is_symlink())
        else:
            yield SampleFolder(child.name, child.path, child.name, None, real_root, child.is_symlink())


class SampleFolder:
    """A sample folder as listed: its id and split known, its files listed and read by ``load``, in the
    process that packs it (a record's discovery is part of its one pass, on any core)."""

    __slots__ = ("source_id", "path", "rel_dir", "split", "real_root", "linked")

    def __init__(self, source_id: str, path: str, rel_dir: str, split: str | None, real_root: str, linked: bool):
        self.source_id, self.path, self.rel_dir, self.split = source_id, path, rel_dir, split
        self.real_root, self.linked = real_root, linked  # linked: a link on the way down from the root

    def __getstate__(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __setstate__(self, state: tuple) -> None:
        for k, v in zip(self.__slots__, state):
            setattr(self, k, v)

    @property
    def paths(self) -> list[str]:
        return [self.rel_dir]

    def load(self) -> RawRecord:
        return _folder_record(self)


def _subdirs(path: str) -> list[os.DirEntry]:
    """The folders in ``path`` (links to folders included), by name; scandir spares a stat per entry."""
    with os.scandir(path) as it:
        return sorted((e for e in it if e.is_dir()), key=BY_NAME)


def _folder_record(d: SampleFolder) -> RawRecord:
    rec = RawRecord(d.source_id, split=d.split)
    rel_dir, linked = d.rel_dir, d.linked
    try:
        with os.scandir(d.path) as it:
            entries = sorted(it, key=BY_NAME)
    except OSError as e:
        rec.problems.append(("unreadable", f"{rel_dir}: cannot list ({e.strerror or e})"))
        return rec
    for f in entries:
        rel = f"{rel_dir}/{f.name}"
        if f.name == "labels.json":
            try:
                # no link on the way down from the root: inside it for certain, and read_file refuses
                # anything but a regular file; else resolve the links and check
                data = (read_inside(rel, Path(d.real_root), MAX_LABELS_BYTES, "labels.json") if linked or f.is_symlink()
                        else read_file(f.path, max_bytes=MAX_LABELS_BYTES))
                labels = parse_json(data, rel)
                if not isinstance(labels, dict):
                    raise ValueError(f"{rel} is not a JSON object of labels")
                rec.labels = labels
            except Refused as e:
                rec.problems.append((e.reason, e.message))
            except ValueError as e:
                rec.problems.append(("bad_label", str(e)))
            except OSError as e:
                rec.problems.append(("unreadable", f"{rel}: cannot read ({e.strerror or e})"))
            continue
        ext = os.path.splitext(f.name)[1][1:].lower()
        modality = modality_of_ext(ext)
        if modality is None:
            continue  # README, notes, ...: not part of the sample
        if modality in rec.media:
            rec.problems.append(("unsupported_format", f"{d.source_id}: more than one {modality} file "
                                 f"({rec.media[modality].path}, {rel}); keep one per sample folder"))
            continue
        rec.media[modality] = _folder_file(f, ext, rel, linked)
    return rec


def _folder_file(f: os.DirEntry, ext: str, rel: str, linked: bool) -> MediaRef:
    """A sample folder's file; when no link leads to it, a regular file is inside the root for certain, so
    its check is done here from one lstat (``real`` and ``size`` set); anything else is located later."""
    if not linked and not f.is_symlink():  # d_type from the listing: no stat
        try:
            st = f.stat(follow_symlinks=False)
        except OSError:
            return MediaRef(ext, path=rel)
        if stat.S_ISREG(st.st_mode):
            return MediaRef(ext, path=rel, size=st.st_size, real=f.path)
    return MediaRef(ext, path=rel)


def _from_stems(root: Path, config: BuildConfig, skip: str | None = None) -> list[RawRecord]:
    table_path = root / config.labels_file if config.labels_file else None
    if table_path is None:
        found = [root / n for n in LABEL_TABLE_NAMES if os.path.lexists(root / n)]
        table_path = found[0] if found else None
    skip_prefix = None if skip is None else skip + "/"
    by_id: dict[str, RawRecord] = {}
    for f in sorted(p for p in root.rglob("*") if p.is_symlink() or not p.is_dir()):  # FIFOs too: rejected
        if table_path is not None and f == table_path:
            continue
        if skip_prefix and f.relative_to(root).as_posix().startswith(skip_prefix):
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
        if not os.path.lexists(table_path):
            raise DatasetNotFoundError(f"label table {str(table_path)!r} does not exist; fix labels_file")
        for n, row in enumerate(read_table(table_path, config.max_file_bytes, Path(os.path.realpath(root))), 1):
            sid = _row_id(row, config, f"{table_path.name} row {n}")
            rec = by_id.setdefault(sid, RawRecord(sid))
            split = row.get(config.split_column)
            rec.split = None if split is None else SPLIT_NAMES.get(str(split).lower(), str(split))
            rec.labels = _label_columns(row, config)
    return [by_id[k] for k in sorted(by_id)]
