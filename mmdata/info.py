"""`mmdata info`: what is in a dataset, from its card and index alone (no shard is read).

Works on a local folder, ``file://`` or any fsspec URL (``s3://``, ``gs://``, ``memory://``).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter
from typing import Any

from .card import LABEL_PREFIX
from .cli import add_storage_options
from .errors import SchemaError
from .format import REJECTS_NAME

log = logging.getLogger(__name__)

MODALITIES = ("image", "audio", "text")
TOP_IMAGE_SIZES = 5
MAX_REJECTS_BYTES = 1 << 30  # millions of rejects; past this rejects.jsonl is not read into memory


def dataset_info(dataset) -> dict[str, Any]:
    """Summarise a dataset as plain JSON values: totals, per split coverage, labels and media sizes, rejects.

    Coverage and media sizes come from ``index.parquet`` (one row per sample); shard sizes, label counts
    and rejects from ``dataset.json`` (the index and ``rejects.jsonl`` when the card lacks them).
    """
    from .dataset import as_dataset

    ds = as_dataset(dataset)
    card = ds.card
    splits: dict[str, Any] = {}
    for name, split in card.splits.items():
        rows = ds.index(name).to_pydict()
        splits[name] = {
            "samples": len(rows["key"]),
            "shards": len(split.shards),
            "bytes": split.num_bytes,
            "modalities": _coverage(rows),
            "labels": {t.name: _labels(ds, name, t, rows) for t in card.tasks},
            "audio_seconds": _summary(rows.get("audio_seconds", [])),
            "image_sizes": _image_sizes(rows),
            "text_chars": _summary(rows.get("text_chars", [])),
        }
    counts = card.counts or {}
    rejected = counts.get("rejected")
    if rejected is None:
        rejected = dict(Counter(str(r.get("reason", "?")) for r in read_rejects(ds)))
    return {
        "path": ds.root,
        "format_version": card.format_version,
        "tool_version": card.tool_version,
        "samples": sum(s["samples"] for s in splits.values()),
        "shards": sum(s["shards"] for s in splits.values()),
        "bytes": sum(s["bytes"] for s in splits.values()),
        "input_records": counts.get("input"),
        "rejected": {"total": sum(rejected.values()), "by_reason": dict(sorted(rejected.items()))},
        "modalities": card.modalities,
        "tasks": [t.to_dict() for t in card.tasks],
        "splits": splits,
    }


def read_rejects(ds) -> list[dict[str, Any]]:
    """The lines of the dataset's ``rejects.jsonl`` (empty when the file is absent)."""
    try:
        text = ds.read(REJECTS_NAME, MAX_REJECTS_BYTES).decode("utf-8")
    except FileNotFoundError:
        return []
    except UnicodeDecodeError as e:
        raise SchemaError(f"{REJECTS_NAME} is not UTF-8 text ({e}); rebuild the dataset") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{REJECTS_NAME} line {n} is not JSON ({e}); rebuild the dataset") from None
        if not isinstance(r, dict):
            raise SchemaError(f"{REJECTS_NAME} line {n} is not a JSON object; rebuild the dataset")
        out.append(r)
    return out


def _coverage(rows: dict[str, list]) -> dict[str, dict[str, float]]:
    n = len(rows["key"])
    present = Counter(m for ms in rows["modalities"] for m in (ms or ()))
    return {m: {"present": present[m], "percent": round(100.0 * present[m] / n, 2) if n else 0.0}
            for m in MODALITIES}


def _labels(ds, split: str, task, rows: dict[str, list]) -> dict[str, Any]:
    """The card's label counts of ``task`` in ``split``: {class name: n, ..., "missing": n}; for regression
    present/missing, with min/mean/max of the values (from the index: the card holds no values)."""
    counts = ds.label_counts(split, task.name)
    if task.type != "regression":
        return counts
    out: dict[str, Any] = {"present": counts["present"]}
    flat = [x for v in rows.get(LABEL_PREFIX + task.name, []) if v is not None for x in v]
    if flat:
        out.update(min=min(flat), mean=sum(flat) / len(flat), max=max(flat))
    out["missing"] = counts["missing"]
    return out


def _summary(values: list) -> dict[str, Any]:
    """count / min / median / max / total of the non-null values (nulls when there are none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"count": 0, "min": None, "median": None, "max": None, "total": None}
    return {"count": len(vals), "min": min(vals), "median": statistics.median(vals), "max": max(vals),
            "total": sum(vals)}


def _image_sizes(rows: dict[str, list]) -> dict[str, Any]:
    """Width and height summaries and the most common ``WxH`` sizes."""
    ws, hs = rows.get("image_width", []), rows.get("image_height", [])
    sizes = Counter(f"{w}x{h}" for w, h in zip(ws, hs) if w is not None and h is not None)
    return {"count": sum(sizes.values()), "distinct": len(sizes), "width": _summary(ws), "height": _summary(hs),
            "most_common": dict(sizes.most_common(TOP_IMAGE_SIZES))}


# ---- human output ------------------------------------------------------------------------------------------


def format_info(info: dict[str, Any]) -> str:
    """Render ``dataset_info`` as aligned plain-text tables (every string from the dataset escaped)."""
    info = escaped(info)
    splits = list(info["splits"])
    out = [f"dataset  {info['path']}  (format {info['format_version']}, mmdata {info['tool_version']})"]
    rej = info["rejected"]["total"]
    inp = info["input_records"]
    out.append(f"samples  {info['samples']} in {len(splits)} split(s), {info['shards']} shard(s), "
               f"{human_bytes(info['bytes'])}" + (f"; {inp} input records, {rej} rejected" if inp is not None else ""))
    mods = ", ".join(f"{m} ({', '.join(f'{k}={v}' for k, v in d.items())})" for m, d in info["modalities"].items())
    out += [f"stored   {mods}", ""]
    sp = info["splits"]
    rows = [[s, sp[s]["samples"], sp[s]["shards"], human_bytes(sp[s]["bytes"]),
             *(f"{sp[s]['modalities'][m]['percent']:.1f}%" for m in MODALITIES)] for s in splits]
    out += [*table(["split", "samples", "shards", "bytes", *MODALITIES], rows), ""]
    for t in info["tasks"]:
        kind = t["type"] + (f", {len(t['classes'])} classes" if "classes" in t else f", {t.get('dims', 1)} dims")
        out.append(f"task {t['name']} ({kind})")
        names = list(sp[splits[0]]["labels"][t["name"]]) if splits else []
        rows = [[c, *(_fmt(sp[s]["labels"][t["name"]].get(c)) for s in splits)] for c in names]
        out += [*table(["label", *splits], rows), ""]
    audio, text, image = [], [], []
    for s in splits:
        a, im, tx = sp[s]["audio_seconds"], sp[s]["image_sizes"], sp[s]["text_chars"]
        if a["count"]:
            audio.append(["audio seconds", s, a["count"], _fmt(a["min"]), _fmt(a["median"]), _fmt(a["max"]),
                          _fmt(a["total"])])
        if tx["count"]:
            text.append(["text chars", s, tx["count"], tx["min"], _fmt(tx["median"]), tx["max"], tx["total"]])
        if im["count"]:
            common = ", ".join(f"{k} ({v})" for k, v in im["most_common"].items())
            image.append(["image WxH", s, im["count"], f"{im['width']['min']}x{im['height']['min']}",
                          f"{_fmt(im['width']['median'])}x{_fmt(im['height']['median'])}",
                          f"{im['width']['max']}x{im['height']['max']}", common])
    media = audio + text + image
    if media:
        out += [*table(["media", "split", "n", "min", "median", "max", "total / most common"], media), ""]
    by_reason = info["rejected"]["by_reason"]
    if by_reason:
        out += table(["rejected because", "records"], [[r, n] for r, n in by_reason.items()])
    else:
        out.append("rejected: none")
    return "\n".join(out)


def printable(value: Any) -> str:
    """``str(value)`` safe for a terminal: control and other unprintable characters written as in a repr.

    Ids, labels and names come from files anyone can write; an ANSI escape (``\\x1b[2J``) or a newline
    in them must show as text, not act on the terminal or break a table.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def escaped(value: Any) -> Any:
    """``value`` (plain JSON values) with every string, keys included, made ``printable``."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {escaped(k): escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escaped(v) for v in value]
    return value


def table(header: list[str], rows: list[list]) -> list[str]:
    """Lines of a table: columns of numbers right-aligned, the others left-aligned; cells ``printable``."""
    cells = [[printable(c) for c in header]] + [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [i > 0 and all(r[i][:1].isdigit() or r[i] == "-" for r in cells[1:]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# ---- CLI ---------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL (s3://..., file://...)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_options(p)


def run(args) -> int:
    from .dataset import open_dataset

    info = dataset_info(open_dataset(args.dataset, storage_options=args.storage_options))
    if args.json:
        print(json.dumps(info, indent=2))
    elif not args.quiet:
        print(format_info(info))
    return 0
