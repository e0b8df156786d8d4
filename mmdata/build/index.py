"""index.parquet: one row per written sample, for filtering and random access without opening a shard."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..card import LABEL_PREFIX
from ..tasks import Task
from .shards import TMP_SUFFIX

LABEL_NAME_PREFIX = "label_name:"  # class names beside each classification/multilabel ``label:`` column
META_PREFIX = "meta."  # a sample's meta fields (others' json fields, a manifest's extra columns): filterable
CLASSES_KEY = b"mmdata:classes"
HF_DTYPES = {"int64": "int64", "double": "float64", "bool": "bool", "string": "string"}  # arrow -> `datasets`  # schema metadata: JSON {task: [class names]}


def write_index(path: Path, rows: list[dict[str, Any]], tasks: tuple[Task, ...]) -> dict[str, str]:
    """One row per sample (key, split, shard, byte offset and size, media sizes, source id) + columns per task.

    Each meta field of the samples is a ``meta.NAME`` column; returns their `datasets` dtypes. Every task has ``label:TASK`` (class index, index list or floats); a classification task also has
    ``label_name:TASK`` (dictionary-encoded class name), a multilabel task a list of them; the schema
    metadata ``mmdata:classes`` holds every class list as JSON.
    """
    fields = [("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
              ("size", pa.int64()), ("modalities", pa.list_(pa.string())), ("image_width", pa.int64()),
              ("image_height", pa.int64()), ("audio_seconds", pa.float64()), ("text_chars", pa.int64()),
              ("source_id", pa.string())]
    cols = {name: pa.array([r[name] for r in rows], type=typ) for name, typ in fields}
    label_type = {"classification": pa.int64(), "multilabel": pa.list_(pa.int64()),
                  "regression": pa.list_(pa.float64())}
    for t in tasks:
        values = [r["labels"].get(t.name) for r in rows]
        cols[LABEL_PREFIX + t.name] = pa.array(values, type=label_type[t.type])
        if t.type != "regression":
            cols[LABEL_NAME_PREFIX + t.name] = _class_names(values, t)
    for name in sorted({k for r in rows for k in r.get("meta") or ()}):
        cols[META_PREFIX + name] = _meta_column([(r.get("meta") or {}).get(name) for r in rows])
    classes = {t.name: list(t.classes) for t in tasks if t.type != "regression"}
    table = pa.table(cols).replace_schema_metadata({CLASSES_KEY: json.dumps(classes).encode("utf-8")})
    tmp = path.with_name(path.name + TMP_SUFFIX)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return {name[len(META_PREFIX):]: HF_DTYPES.get(str(table.schema.field(name).type), "string")
            for name in table.column_names if name.startswith(META_PREFIX)}


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


def _meta_column(values: list[Any]) -> pa.Array:
    """One meta field as a typed column (int, float, bool, string), or as strings when its values disagree."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                        type=pa.string())
