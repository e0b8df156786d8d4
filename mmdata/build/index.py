"""index.parquet: one row per written sample, for filtering and random access without opening a shard."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..card import LABEL_PREFIX
from ..format import PARTIAL_SUFFIX
from ..tasks import Task

LABEL_NAME_PREFIX = "label_name:"  # class names beside each classification/multilabel ``label:`` column
META_PREFIX = "meta."  # a sample's meta fields (others' json fields, a manifest's extra columns): filterable
CLASSES_KEY = b"mmdata:classes"  # schema metadata: JSON {task: [class names]}
HF_DTYPES = {"int64": "int64", "double": "float64", "bool": "bool", "string": "string"}  # arrow -> `datasets`


ROW_GROUP = 16384  # index rows written at a time
FIELDS = (("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
          ("size", pa.int64()), ("modalities", pa.list_(pa.string())), ("image_width", pa.int64()),
          ("image_height", pa.int64()), ("audio_seconds", pa.float64()), ("text_chars", pa.int64()),
          ("source_id", pa.string()))
LABEL_TYPES = {"classification": pa.int64(), "multilabel": pa.list_(pa.int64()), "regression": pa.list_(pa.float64())}


def meta_type(types: set[type]) -> pa.DataType:
    """The column type of a meta field whose values have these Python types (strings when they disagree)."""
    types = types - {type(None)}
    if not types:
        return pa.string()
    if types <= {int}:
        return pa.int64()
    if types <= {int, float}:
        return pa.float64()
    if types <= {bool}:
        return pa.bool_()
    return pa.string()


class IndexWriter:
    """index.parquet, written in row groups as shards are finished: one row per sample.

    Columns: key, split, shard, byte offset and size, media sizes, source id; ``label:TASK`` per task
    (class index, index list or floats); ``label_name:TASK`` (dictionary-encoded class name, a list of
    them for a multilabel task); ``meta.NAME`` per meta field of the samples. The schema metadata
    ``mmdata:classes`` holds every class list as JSON.
    """

    def __init__(self, path: Path, tasks: tuple[Task, ...], meta_types: dict[str, set[type]]):
        self.path, self.tasks = path, tasks
        self.meta = {name: meta_type(types) for name, types in sorted(meta_types.items())}
        names = pa.string()
        fields = [pa.field(n, t) for n, t in FIELDS]
        for t in tasks:
            fields.append(pa.field(LABEL_PREFIX + t.name, LABEL_TYPES[t.type]))
            if t.type == "classification":
                fields.append(pa.field(LABEL_NAME_PREFIX + t.name, pa.dictionary(pa.int32(), names)))
            elif t.type == "multilabel":
                fields.append(pa.field(LABEL_NAME_PREFIX + t.name, pa.list_(pa.dictionary(pa.int32(), names))))
        fields += [pa.field(META_PREFIX + n, t) for n, t in self.meta.items()]
        classes = {t.name: list(t.classes) for t in tasks if t.type != "regression"}
        self.schema = pa.schema(fields, metadata={CLASSES_KEY: json.dumps(classes).encode("utf-8")})
        self.tmp = path.with_name(path.name + PARTIAL_SUFFIX)
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        rows, self.rows = self.rows, []
        cols = {name: pa.array([r[name] for r in rows], type=typ) for name, typ in FIELDS}
        for t in self.tasks:
            values = [r["labels"].get(t.name) for r in rows]
            cols[LABEL_PREFIX + t.name] = pa.array(values, type=LABEL_TYPES[t.type])
            if t.type != "regression":
                cols[LABEL_NAME_PREFIX + t.name] = _class_names(values, t)
        for name, typ in self.meta.items():
            values = [(r.get("meta") or {}).get(name) for r in rows]
            if typ == pa.string():
                values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
            cols[META_PREFIX + name] = pa.array(values, type=typ)
        self.writer.write_table(pa.table(cols, schema=self.schema))

    def close(self) -> dict[str, str]:
        """Write the last rows and give the file its name; return the `datasets` dtype of each meta field."""
        if self.rows:
            self._flush()
        self.writer.close()
        os.replace(self.tmp, self.path)
        return {name: HF_DTYPES.get(str(typ), "string") for name, typ in self.meta.items()}


def _class_names(values: list[Any], task: Task) -> pa.Array:
    """Class names of stored labels: dictionary<int32, string> over the task's classes (in class order)."""
    names = pa.array(task.classes, type=pa.string())
    if task.type == "classification":
        return pa.DictionaryArray.from_arrays(pa.array(values, type=pa.int32()), names)
    flat = pa.DictionaryArray.from_arrays(pa.array([i for v in values for i in v or ()], type=pa.int32()), names)
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v or ()))
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), flat, mask=mask)
