"""Catalog: what a build keeps of each packed record until its shards are cut, in compact columns.

A record costs a key, a few numbers in typed arrays and its raw labels in a spill file (read back once,
in order, when the tasks are known): no Python object per record beyond its key. That bounds a build's
memory to about a hundred bytes per record, whatever the input's size.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from typing import Any

import numpy as np

from ..format import BLOCK, member_header
from ..tasks import BadLabel, Task
from .align import Reject, RejectLog, encode_labels, sample_meta
from .pack import Packed
from .records import Found

SAMPLE_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # a sample's .json
NUMBERS = {  # column -> array type code
    "offset": "q", "size": "q", "image_width": "i", "image_height": "i", "audio_seconds": "d", "audio_rate": "i",
    "text_chars": "i", "text_at": "i", "text_bytes": "i", "input_bytes": "q",
    "spill": "H", "exts": "B", "split": "b", "group": "i", "labels_at": "q", "labels_len": "i",
}
LINE = json.JSONEncoder(ensure_ascii=False, check_circular=False, default=str)  # a record's raw labels
READ_STEP = 1 << 20  # bytes of the label and json spills read and written at a time


class Codes:
    """Small integer codes for values that repeat (split names, groups, spill files, member sets)."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self._code: dict[Any, int] = {}

    def __call__(self, value: Any) -> int:
        if value is None:
            return -1
        code = self._code.get(value)
        if code is None:
            code = self._code[value] = len(self.values)
            self.values.append(value)
        return code


class Catalog:
    """The packed records of a build, in input order; ``finish`` turns the columns into numpy arrays."""

    def __init__(self, folder: str):
        self.keys: list[str] = []
        self.other_ids: dict[int, str] = {}  # record -> source id, where it is not the key
        self.cols = {name: array(code) for name, code in NUMBERS.items()}
        self.splits, self.groups, self.spills, self.exts = Codes(), Codes(), Codes(), Codes()
        self.labels_path = os.path.join(folder, "labels.jsonl")
        self._labels = open(self.labels_path, "wb")
        self._labels_pos = 0
        self.arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, raw: Found, key: str, packed: Packed, group: str | None) -> None:
        """Keep a packed record: its key, facts, and its labels, fields and meta in the label spill."""
        if raw.source_id != key:
            self.other_ids[len(self.keys)] = raw.source_id
        self.keys.append(key)
        c = self.cols
        for name in ("offset", "size", "image_width", "image_height", "audio_seconds", "audio_rate", "text_chars",
                     "text_at", "text_bytes", "input_bytes"):
            c[name].append(getattr(packed, name))
        c["spill"].append(self.spills(packed.spill))
        c["exts"].append(self.exts(packed.exts))
        c["split"].append(self.splits(raw.split))
        c["group"].append(self.groups(group))
        line = LINE.encode([packed.labels, packed.fields, packed.meta]).encode("utf-8") + b"\n"
        c["labels_at"].append(self._labels_pos)
        c["labels_len"].append(len(line))
        self._labels.write(line)
        self._labels_pos += len(line)

    def close(self) -> None:
        self._labels.close()

    def source_id(self, i: int) -> str:
        return self.other_ids.get(i, self.keys[i])

    def finish(self) -> None:
        self._labels.close()
        while self.cols:  # one column at a time: never all of them twice
            name, col = self.cols.popitem()
            self.arrays[name] = np.frombuffer(col, dtype=col.typecode).copy()
            del col

    def replace(self, i: int, spill: str, offset: int, size: int, audio_seconds: float, audio_rate: int,
                text_at: int) -> None:
        """Point record ``i`` at a re-packed block (its audio re-encoded at the dataset's rate)."""
        a = self.arrays
        a["spill"][i] = self.spills(spill)
        a["offset"][i], a["size"][i], a["text_at"][i] = offset, size, text_at
        a["audio_seconds"][i], a["audio_rate"][i] = audio_seconds, audio_rate

    def raw_labels(self) -> Any:
        """(labels, fields, meta) of every record, in order, read back from the label spill."""
        with open(self.labels_path, "rb", buffering=READ_STEP) as f:
            for line in f:
                yield json.loads(line)


class Samples:
    """Every record's ``KEY.json`` member, made once the tasks are known, in a spill file of its own."""

    def __init__(self, folder: str, catalog: Catalog, tasks: tuple[Task, ...], used: set[str], rejects: RejectLog):
        self.path = os.path.join(folder, "json.bin")
        n = len(catalog)
        self.at = np.zeros(n, dtype=np.int64)
        self.size = np.zeros(n, dtype=np.int64)
        self.kept = np.ones(n, dtype=bool)
        self.meta_types: dict[str, set[type]] = {}
        digest = hashlib.sha256()
        pos = 0
        with open(self.path, "wb", buffering=READ_STEP) as out:
            for i, (labels, fields, meta) in enumerate(catalog.raw_labels()):
                if catalog.arrays["size"][i] == 0:  # rejected since it was packed
                    self.kept[i] = False
                    continue
                sid = catalog.source_id(i)
                try:
                    stored = encode_labels(tasks, labels, fields)
                except BadLabel as e:
                    self.kept[i] = False
                    rejects.add(Reject(sid, (), "bad_label", str(e)))
                    continue
                sample: dict[str, Any] = {"id": sid, "labels": stored}
                kept_meta = sample_meta(labels, meta, used)
                if kept_meta:  # facts that are no label (an url, a caption, a size): kept, never a task
                    sample["meta"] = kept_meta
                    for k, v in kept_meta.items():
                        self.meta_types.setdefault(k, set()).add(type(v))
                data = SAMPLE_JSON.encode(sample).encode("utf-8")
                member = b"".join((member_header(f"{catalog.keys[i]}.json", len(data)), data,
                                   b"\0" * (-len(data) % BLOCK)))
                out.write(member)
                self.at[i], self.size[i] = pos, len(member)
                pos += len(member)
                digest.update(member)  # the key, the id, the stored labels and meta
                digest.update(b"%d\0" % catalog.arrays["input_bytes"][i])
        self.digest = digest.hexdigest()
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def member(self, i: int) -> bytes:
        return os.pread(self._fd, int(self.size[i]), int(self.at[i]))

    def close(self) -> None:
        os.close(self._fd)
