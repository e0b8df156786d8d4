"""Hugging Face Parquet (``Dataset.to_parquet``, the Hub's ``data/train-00000-of-00001.parquet``): a record a row.

``Image``/``Audio`` cells are ``{bytes, path}`` structs: the bytes go to the spool batch by batch, never all in
memory. ``ClassLabel`` indices come out as the names in the schema metadata (``huggingface``: info.features).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DatasetNotFoundError, SchemaError
from .config import BuildConfig
from .guard import Refused, listed, listed_target, parse_json
from .records import SPLIT_NAMES, MediaRef, RawRecord, modality_of_ext
from .spool import Spool
from .tars import split_of_shard

log = logging.getLogger(__name__)

HF_KEY = b"huggingface"
MEDIA_TYPES = {"Image": "image", "Audio": "audio"}  # HF feature _type -> modality
LIST_TYPES = ("Sequence", "List", "LargeList")  # 5.x writes List; older versions Sequence
BATCH_ROWS = 64  # rows turned into records at once
READ_BUFFER = 1 << 20  # bytes read from the file at a time
BIG_ROW_GROUP = 2**30  # bytes: a row group this large is worth a warning, as arrow holds one in memory
# (pattern of the first bytes, extension), first match wins; an MPEG audio frame starts with 11 sync bits and a
# layer (bits 2-1 of byte 1) that is not 00, which would be AAC's ADTS
MAGIC = tuple((re.compile(p, re.S), ext) for p, ext in (
    (rb"\x89PNG\r\n\x1a\n", "png"), (rb"\xff\xd8\xff", "jpg"), (rb"GIF8[79]a", "gif"), (rb"II\*\x00|MM\x00\*", "tiff"),
    (rb"RIFF....WEBP", "webp"), (rb"RIFF....WAVE", "wav"), (rb"fLaC", "flac"), (rb"OggS.{24}OpusHead", "opus"),
    (rb"OggS", "ogg"), (rb"....ftypM4A", "m4a"), (rb"ID3|\xff[\xe2-\xe7\xea-\xef\xf2-\xf7\xfa-\xff]", "mp3"),
    (rb"BM", "bmp")))


def sniff_ext(data: bytes) -> str:
    """The extension the first bytes of a media file call for; "" when none is known."""
    head = bytes(data[:40])  # also a pyarrow Buffer's
    return next((ext for pattern, ext in MAGIC if pattern.match(head)), "")


def split_of(path: Path) -> str | None:
    """The split a file's name starts with (train*, val*/valid*/validation*/dev*, test*), as train/val/test."""
    return split_of_shard(Path(path).name)  # the name alone: a folder named test_data names no split


def _is_media_struct(t: pa.DataType) -> bool:
    """struct<bytes: binary, path: string>, the storage of HF's Image and Audio."""
    fields = {f.name: f.type for f in t} if pa.types.is_struct(t) else {}
    b = fields.get("bytes", pa.null())
    return (pa.types.is_binary(b) or pa.types.is_large_binary(b)) and _is_str(fields.get("path", pa.string()))


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_hf_parquet(path: Path) -> bool:
    """A regular .parquet file with ``huggingface`` schema metadata or a {bytes, path} media column."""
    if Path(path).suffix.lower() != ".parquet":
        return False
    target, outside = listed_target(path, "Parquet file")
    if outside is not None:  # a link out of the folder it was listed in: not read, not even its footer
        return False
    try:
        if not stat.S_ISREG(os.stat(target).st_mode):  # a FIFO would block the read
            return False
        schema = pq.read_schema(target)  # the footer only
    except (pa.ArrowException, OSError):
        return False
    return HF_KEY in (schema.metadata or {}) or any(_is_media_struct(f.type) for f in schema)


def parquet_files(source: Path) -> list[Path] | None:
    """The data files in a folder and its ``data/``, sorted; None when there are none.

    A data file's name starts with a split (``train-00000-of-00001.parquet``) or its schema is Hugging Face's:
    a stems folder's plain ``labels.parquet`` is none. The files are Listed: read only inside ``source``.
    """
    source = Path(source)
    names = [sub + p.name for sub in ("", "data/") if (source / sub).is_dir()
             for p in (source / sub).glob("*.parquet")]
    found = sorted(p for p in (listed(source, n) for n in names)
                   if p.is_file() and (split_of(p) or is_hf_parquet(p)))  # Spark's train.parquet/ is a folder
    return found or None


def class_names(path: Path) -> dict[str, tuple[list[str], bool]]:
    """{column: (class names in source order, is a list)} of the (Sequence of) ClassLabel columns of a file.

    Tasks built from these keep Hugging Face's class indices and unseen classes; inferred ones sort the names seen.
    A listed file that links out of its folder gives none (its rows are a reject).
    """
    path = path if isinstance(path, Path) else Path(path)  # Path() of a Listed path drops its found_in
    try:
        pf = _open(path)
    except Refused:
        return {}
    with pf:
        named = {c: _class_names(f) for c, f in _features(pf.schema_arrow, path).items()}
    return {c: (names, many) for c, (names, many) in named.items() if names is not None}


def from_parquet(files: list[Path], config: BuildConfig, spool: Spool, root: Path | None = None) -> list[RawRecord]:
    """One RawRecord per row of every file, media bytes spooled; a path-only cell names a file next to its
    Parquet file, made relative to ``root`` (default: that file's folder) for the build's root checks."""
    records: list[RawRecord] = []
    for file in files:
        file = file if isinstance(file, Path) else Path(file)  # Path() of a Listed path drops its found_in
        try:
            pf = _open(file)
        except Refused as e:  # a listed file that links out of its folder: not read, one reject for its rows
            records.append(RawRecord(file.name, problems=[(e.reason, e.message)]))
            continue
        with pf:
            records += _rows(pf, file, config, spool, root)
    return records


def _features(schema: pa.Schema, file: Path) -> dict[str, Any]:
    """``info.features`` of the ``huggingface`` metadata: {column: {"_type": ..., ...}}; {} when absent."""
    raw = (schema.metadata or {}).get(HF_KEY)
    try:
        features = parse_json(raw, f"{file.name} huggingface metadata")["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable huggingface metadata (%s); reading the columns without it", file.name, e)
        return {}
    return features if isinstance(features, dict) else {}


def _class_names(feature: Any) -> tuple[list[str] | None, bool]:
    """(class names, is a list of them) of a ClassLabel or a list-of-ClassLabel feature; (None, False) else."""
    if not isinstance(feature, dict):
        return None, False
    inner = feature.get("feature") if feature.get("_type") in LIST_TYPES else None
    for f, many in ((feature, False), (inner, True)):
        if isinstance(f, dict) and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list):
            return [str(n) for n in f["names"]], many
    return None, False


def _has_binary(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    return any(_has_binary(t.field(i).type) for i in range(t.num_fields)) if t.num_fields else False


@dataclass(frozen=True)
class _Columns:
    """What a file's columns are: {modality: column} of media, the text column, labels with class names."""

    media: dict[str, str]
    text: str | None
    names: dict[str, tuple[list[str] | None, bool]]  # label column -> _class_names of its feature


def _columns(schema: pa.Schema, features: dict[str, Any], config: BuildConfig, file: Path) -> _Columns:
    types = {f.name: f.type for f in schema}
    media: dict[str, str] = {}
    for modality, wanted in (("image", config.image_column), ("audio", config.audio_column)):
        typed = [c for c, f in features.items() if isinstance(f, dict) and MEDIA_TYPES.get(f.get("_type")) ==
                 modality and c in types and _is_media_struct(types[c])]
        if wanted in typed or (not typed and wanted in types and (_is_media_struct(types[wanted]) or
                                                                  _is_str(types[wanted]))):
            media[modality] = wanted  # with no HF type: the config's column, {bytes, path} or paths
        elif typed:
            media[modality] = typed[0]
    text = config.text_column if _is_str(types.get(config.text_column, pa.null())) else None
    skip = {*media.values(), text, config.id_column, config.split_column, *config.ignore_columns}
    dropped = [c for c in types if c not in skip and _has_binary(types[c])]
    if dropped:
        log.warning("%s: columns %s hold bytes but are not the image or audio column; they are not read "
                    "(name one in image_column/audio_column, or list them in ignore_columns)", file.name, dropped)
    labels = [c for c in types if c not in skip and c not in dropped]
    return _Columns(media, text, {c: _class_names(features.get(c)) for c in labels})


def _open(file: Path) -> pq.ParquetFile:
    """The file as a ParquetFile: a regular file, read by pyarrow a row group at a time; a Listed one only
    inside its folder (else Refused, outside_root)."""
    target, outside = listed_target(file, "Parquet file")
    if outside is not None:
        raise Refused(*outside)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"Parquet file {str(file)!r} does not exist; give an existing file") from None
    except OSError as e:
        raise SchemaError(f"Parquet file {str(file)!r} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SchemaError(f"Parquet file {str(file)!r} is not a regular file; give a .parquet file")
    try:  # arrow reads a row group's column whole: unbuffered, that costs ~3x its bytes (pre-buffered: ~9x)
        return pq.ParquetFile(target, pre_buffer=False, buffer_size=READ_BUFFER)
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{str(file)!r} is not a readable Parquet file ({_line(e)})") from None


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]  # arrow's messages may run to many lines


def _rows(pf: pq.ParquetFile, file: Path, config: BuildConfig, spool: Spool, root: Path | None) -> list[RawRecord]:
    plan = _columns(pf.schema_arrow, _features(pf.schema_arrow, file), config, file)
    big = max((pf.metadata.row_group(g).total_byte_size for g in range(pf.num_row_groups)), default=0)
    if big > BIG_ROW_GROUP:
        log.warning("%s: row groups of %d MB, and arrow holds one in memory; write smaller ones (`datasets` "
                    "writes 100 rows a group for images and audio)", file.name, big >> 20)
    prefix = "" if root is None else os.path.relpath(file.parent, root).replace(os.sep, "/")
    prefix = "" if prefix == "." else prefix + "/"
    file_split = split_of(file)
    records: list[RawRecord] = []
    for cols, media, rows in _batches(pf, plan, config, file):
        for i in range(rows):
            n = len(records)  # the row's number in the file
            rec = RawRecord(_row_id(cols, i, file, n, config))
            for modality, (data, paths) in media.items():
                _add_media(rec, modality, data[i], paths[i], f"{file.name}:row{n}.{plan.media[modality]}", prefix,
                           config, spool)
            if plan.text and cols[plan.text][i]:
                rec.media["text"] = MediaRef("txt", data=cols[plan.text][i].encode("utf-8"))
            split = cols[config.split_column][i] if config.split_column in cols else None
            rec.split = file_split if split is None else SPLIT_NAMES.get(str(split).lower(), str(split))
            for c, names in plan.names.items():
                _add_label(rec, c, cols[c][i], names, f"{file.name} row {n}")
            records.append(rec)
    return records


def _batches(pf: pq.ParquetFile, plan: _Columns, config: BuildConfig, file: Path) -> Iterator[tuple[dict, dict, int]]:
    """(columns as lists, {modality: media cells}, rows) of each batch; a read error names the file."""
    batches, done = pf.iter_batches(batch_size=BATCH_ROWS), 0  # arrow holds the batch's whole row group
    while True:
        try:  # only arrow's errors: the spool's (a full disk) are no fault of the file
            if (batch := next(batches, None)) is None:
                return
            wanted = (*plan.names, plan.text, config.id_column, config.split_column)
            cols = {c: batch.column(c).to_pylist() for c in wanted if c in batch.schema.names}
            media = {m: _cells(batch.column(c)) for m, c in plan.media.items()}  # bytes stay arrow buffers
        except (pa.ArrowException, OSError) as e:
            raise SchemaError(f"{str(file)!r}: unreadable after its first {done} rows ({_line(e)}); "
                              "fix or drop the file") from None
        yield cols, media, batch.num_rows
        done += batch.num_rows


def _cells(column: pa.Array) -> tuple[list[Any], list[Any]]:
    """(bytes cells as zero-copy arrow buffers or None, path cells) of a media column of one batch."""
    if _is_str(column.type):  # a column of paths, as in a manifest
        return [None] * len(column), column.to_pylist()
    parts = dict(zip((f.name for f in column.type), column.flatten()))  # flatten: a null struct nulls its fields
    data = parts["bytes"]
    paths = parts["path"].to_pylist() if "path" in parts else [None] * len(column)
    return [data[i].as_buffer() if data[i].is_valid else None for i in range(len(data))], paths  # no copy


def _add_media(rec: RawRecord, modality: str, data: Any, path: str | None, where: str, prefix: str,
               config: BuildConfig, spool: Spool) -> None:
    suffix = Path(path).suffix[1:].lower() if path else ""
    if data is None:
        if path:  # a file next to the Parquet file; the build's root checks apply to it
            rec.media[modality] = MediaRef(suffix, path=path if os.path.isabs(path) else prefix + path)
        return
    if len(data) > config.max_file_bytes:
        rec.problems.append(("too_large", f"{where} has {len(data)} bytes > max_file_bytes "
                             f"{config.max_file_bytes}; raise max_file_bytes to keep it"))
        return
    ext = suffix if modality_of_ext(suffix) == modality else sniff_ext(data) or suffix
    container, offset = spool.put(data)
    rec.media[modality] = MediaRef(ext, path=where, size=len(data), container=container, offset=offset)


def _add_label(rec: RawRecord, column: str, v: Any, names: tuple[list[str] | None, bool], where: str) -> None:
    classes, many = names
    if classes is not None:
        try:
            if many:  # Sequence(ClassLabel): the names of the classes present
                v = None if v is None else [c for c in (_name(x, classes) for x in v) if c is not None]
            else:
                v = _name(v, classes)
        except ValueError as e:
            rec.problems.append(("bad_label", f"{where}: column {column!r} {e}"))
            return
    if v is None or isinstance(v, (str, int, float, bool)) or (classes is not None and many):
        rec.labels[column] = v
    else:
        rec.fields[column] = v  # a struct or list: a declared task may name it by a dotted path


def _name(v: Any, classes: list[str]) -> str | None:
    """A ClassLabel cell's class name; -1 and None mean a missing label."""
    if v is None or v == -1:
        return None
    if isinstance(v, int) and 0 <= v < len(classes):
        return classes[v]
    raise ValueError(f"has class index {v!r}, outside 0..{len(classes) - 1} of its ClassLabel names")


def _row_id(cols: dict[str, list[Any]], i: int, file: Path, n: int, config: BuildConfig) -> str:
    if config.id_column not in cols:
        return f"{file.stem}-{n}"
    v = cols[config.id_column][i]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return "" if v is None else str(v)
