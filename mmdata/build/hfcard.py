"""README.md in OUT: a Hugging Face dataset card (YAML header + summary) so the folder loads with `datasets`.

Everything is drawn from the card (and the rejects' ids), never from the clock or OUT's path, so a rebuild
writes the same bytes. Audio is declared ``binary``: the ``audio`` feature makes ``load_dataset`` fail in
``datasets`` >= 4 without torchcodec, while bytes load in every version and decode with soundfile.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from ..card import LABEL_PREFIX, Card
from ..format import MEMBER_ORDER, README_NAME
from ..storage import atomic_write
from ..tasks import Task
from .config import BuildConfig
from .index import LABEL_NAME_PREFIX

HF_SPLITS = {"val": "validation"}  # mmdata split -> the name `datasets` gives it
HEADER_KEYS = ("license", "pretty_name")  # copied into the YAML header when the build config has them
EXAMPLE_IDS = 3  # source ids shown per reject reason


def write_readme(out: Path, card: Card, rejected_ids: dict[str, list[str]],
                 meta: dict[str, str] | None = None) -> None:
    """Write OUT/README.md atomically: the Hugging Face YAML header, then a summary for people.

    ``rejected_ids``: a few of each reject reason's smallest source ids (``RejectLog.examples``).

    ``meta`` maps the samples' meta fields to their `datasets` dtypes (undeclared, `datasets` drops them).
    """
    atomic_write(Path(out) / README_NAME, readme_text(card, rejected_ids, meta).encode("utf-8"))


def readme_text(card: Card, rejected_ids: dict[str, list[str]], meta: dict[str, str] | None = None) -> str:
    """Return the whole README.md: the ``---``-fenced YAML header, then Markdown."""
    header = yaml.safe_dump(hf_header(card, meta), sort_keys=False, allow_unicode=True, width=100)
    title = card.build_config.get("pretty_name") or "Multimodal dataset"
    parts = [f"---\n{header}---\n\n# {title}\n", _intro(card), _splits(card), _tasks(card),
             _rejects(card, rejected_ids), _how_built(card), _loading(card)]
    return "\n".join(parts)


def hf_split(split: str) -> str:
    """Name an mmdata split as `datasets` does (``val`` -> ``validation``)."""
    return HF_SPLITS.get(split, re.sub(r"\W", "_", split))


def hf_header(card: Card, meta: dict[str, str] | None = None) -> dict[str, Any]:
    """Return the YAML header: one ``default`` config with a shard glob per split, and the features."""
    header: dict[str, Any] = {k: card.build_config[k] for k in HEADER_KEYS if card.build_config.get(k)}
    files = []
    for split, info in card.splits.items():
        clash = any(s != split and s.startswith(split + "-") for s in card.splits)
        path: str | list[str] = [s.file for s in info.shards] if clash else f"{split}-*.tar"
        files.append({"split": hf_split(split), "path": path})
    header["configs"] = [{"config_name": "default", "data_files": files}]
    header["dataset_info"] = {"features": hf_features(card, meta)}
    return header


def hf_features(card: Card, meta: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """List the features as `datasets` writes them in YAML: a column per member extension, then key and url."""
    m = card.modalities
    dtypes: dict[str, Any] = {}
    for ext in _image_formats(card):
        dtypes[ext] = "image"
    if "audio" in m:
        dtypes[m["audio"]["format"]] = "binary"  # not `audio`: see the module docstring
    if "text" in m:
        dtypes["txt"] = "string"
    feats = [{"name": ext, "dtype": dtypes[ext]} for ext in sorted(dtypes, key=MEMBER_ORDER.index)]
    fields: list[dict[str, Any]] = [{"name": "id", "dtype": "string"}]
    if card.tasks:
        fields.append({"name": "labels", "struct": [_task_feature(t) for t in card.tasks]})
    if meta:
        fields.append({"name": "meta", "struct": [{"name": k, "dtype": v} for k, v in sorted(meta.items())]})
    feats.append({"name": "json", "struct": fields})
    return feats + [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


def _image_formats(card: Card) -> list[str]:
    """List the stored image extensions (``formats``; a single ``format`` in older cards)."""
    image = card.modalities.get("image")
    if not image:
        return []
    return list(image.get("formats") or [image["format"]])


def _task_feature(t: Task) -> dict[str, Any]:
    """Declare a task as ClassLabel, a sequence of them, or floats (``sequence`` reads in datasets 3 and 5)."""
    if t.type == "regression":
        return {"name": t.name, "sequence": "float64"}
    label = {"class_label": {"names": {str(i): c for i, c in enumerate(t.classes)}}}
    return {"name": t.name, "dtype": label} if t.type == "classification" else {"name": t.name, "sequence": label}


# ---- the summary ---------------------------------------------------------------------------------------------


def _intro(card: Card) -> str:
    m = card.modalities
    have = []
    if "image" in m:
        have.append(f"image ({', '.join(_image_formats(card))})")
    if "audio" in m:
        a = m["audio"]
        have.append(f"audio ({a['format']}, {a['sample_rate']} Hz, {a['channels']} channel(s))")
    if "text" in m:
        have.append("text (`txt`, UTF-8)")
    return (f"Built by mmdata {card.tool_version} (format version {card.format_version}) as WebDataset tar shards: "
            "each sample is adjacent members `KEY.<ext>` sharing one key, with `KEY.json` holding "
            '`{"id": source id, "labels": {task: value or null}}`. Modalities: '
            f"{', '.join(have) or 'none'}. `dataset.json` is the card (shard hashes, tasks, counts), "
            "`index.parquet` has one row per sample, `rejects.jsonl` one line per input record left out. "
            "This README is generated from `dataset.json` by every build.\n")


def _table(head: list[str], rows: list[list[Any]], numbers: tuple[int, ...]) -> str:
    """Render a Markdown table; the columns numbered in ``numbers`` are right-aligned."""
    align = ["---:" if i in numbers else "---" for i in range(len(head))]
    lines = [head, align, *[[str(x) for x in r] for r in rows]]
    return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)


def _splits(card: Card) -> str:
    rows = [[f"`{s}`", f"`{hf_split(s)}`", i.num_samples, len(i.shards), i.num_bytes] for s, i in card.splits.items()]
    total = ["**total**", "", sum(r[2] for r in rows), sum(r[3] for r in rows), sum(r[4] for r in rows)]
    head = ["split", "`datasets` split", "samples", "shards", "bytes"]
    return "## Splits\n\n" + _table(head, [*rows, total], (2, 3, 4))


def _tasks(card: Card) -> str:
    if not card.tasks:
        return "## Tasks\n\nNo labels.\n"
    out = ["## Tasks\n"]
    splits = list(card.splits)
    for t in card.tasks:
        counts = {s: card.splits[s].label_counts.get(t.name, {}) for s in splits}
        if t.type == "regression":
            out.append(f"### `{t.name}`: regression, {t.dims} value(s)\n\nStored as a float list in "
                       f"`labels.{t.name}` and index column `{LABEL_PREFIX}{t.name}`.\n")
            names = ["present", "missing"]
        else:
            kind = "class index" if t.type == "classification" else "list of class indices"
            out.append(f"### `{t.name}`: {t.type}, {len(t.classes)} classes\n\nStored as a {kind} in "
                       f"`labels.{t.name}`; index columns `{LABEL_PREFIX}{t.name}` and "
                       f"`{LABEL_NAME_PREFIX}{t.name}` (class names).\n")
            names = [*t.classes, "missing"]
        rows = [[_cell(n) if n in t.classes else f"({n})", *[counts[s].get(n, 0) for s in splits]] for n in names]
        out.append(_table(["class" if t.classes else "label", *[f"`{s}`" for s in splits]], rows,
                          tuple(range(1, len(splits) + 1))))
    return "\n".join(out)


def _cell(text: str) -> str:
    """Quote ``text`` as inline code inside a table cell."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`"


def _rejects(card: Card, rejected_ids: dict[str, list[str]]) -> str:
    c = card.counts
    rejected = c.get("rejected", {})
    text = (f"## Rejects\n\n{c.get('input', 0)} input records: {c.get('written', 0)} written, "
            f"{sum(rejected.values())} rejected.")
    if not rejected:
        return text + "\n"
    rows = []
    for reason, n in rejected.items():
        ids = rejected_ids.get(reason, [])  # the smallest few, sorted
        shown = ", ".join(_cell(i) for i in ids[:EXAMPLE_IDS]) + (", ..." if len(ids) > EXAMPLE_IDS else "")
        rows.append([f"`{reason}`", n, shown])
    return (text + " `rejects.jsonl` gives each one's id, paths and message.\n\n"
            + _table(["reason", "records", "for example"], rows, (1,)))


def build_command(build_config: dict[str, Any]) -> str:
    """Return an ``mmdata build SOURCE OUT`` line giving the same config: ``--set`` per non-default key."""
    default = BuildConfig().to_dict()
    args = ["mmdata build SOURCE OUT"]
    if build_config.get("layout"):
        args.append(f"--layout {shlex.quote(str(build_config['layout']))}")
    for k, v in build_config.items():
        if k in default and v != default[k]:
            args.append("--set " + shlex.quote(f"{k}={_yaml_value(v)}"))
    return " \\\n    ".join(args)


def _yaml_value(v: Any) -> str:
    """Write ``v`` as one line that ``yaml.safe_load`` reads back as ``v`` (JSON where it does)."""
    if isinstance(v, str) and yaml.safe_load(v) == v and "\n" not in v:
        return v
    text = json.dumps(v, ensure_ascii=False)
    if yaml.safe_load(text) == v:
        return text
    return yaml.safe_dump(v, default_flow_style=True, allow_unicode=True, width=10**9).removesuffix("\n...\n").strip()


def _how_built(card: Card) -> str:
    if not card.build_config:
        return "## How it was built\n\nThe card holds no build config.\n"
    resolved = yaml.safe_dump(card.build_config, sort_keys=False, allow_unicode=True, width=100)
    return ("## How it was built\n\nAn equivalent command (SOURCE: the raw data, OUT: this folder):\n\n"
            f"```bash\n{build_command(card.build_config)}\n```\n\n"
            f"The resolved build config (also in `dataset.json`):\n\n```yaml\n{resolved}```\n")


def _loader_args(card: Card) -> str:
    """Write make_loader's extra arguments: a resize for images, no text without a trained tokenizer."""
    args = []
    if "text" in card.modalities and not card.build_config.get("tokenizer_vocab"):
        kept = [m for m in ("image", "audio") if m in card.modalities]
        args.append(f"modalities={json.dumps(kept)},  # no tokenizer/ was trained: text is left out")
    if "image" in card.modalities:
        args.append("config=LoaderConfig(image_size=224),  # one (H, W) for every image")
    return "".join("\n    " + a for a in args) + "\n"


def _loading(card: Card) -> str:
    split = "train" if "train" in card.splits else next(iter(card.splits), "train")
    shards = card.splits[split].shards if split in card.splits else ()
    urls = f"OUT/{split}-{{000000..{len(shards) - 1:06d}}}.tar" if len(shards) > 1 else f"OUT/{split}-000000.tar"
    image_exts = _image_formats(card)
    audio = card.modalities.get("audio", {}).get("format")
    task = next((t for t in card.tasks if t.type != "regression"), None)
    wds_lines, hf_lines = [], []
    if len(image_exts) == 1:
        wds_lines.append(f'image = sample.get("{image_exts[0]}")  # PIL image, or None')
        hf_lines.append(f'image = row["{image_exts[0]}"]  # PIL image, or None')
    elif image_exts:
        exts = ", ".join(f'"{e}"' for e in image_exts)
        wds_lines.append(f"image = next((sample[e] for e in ({exts}) if e in sample), None)  # PIL image")
        hf_lines.append(f"image = next((row[e] for e in ({exts}) if row[e] is not None), None)  # PIL image")
    if audio:
        wds_lines += [f'if "{audio}" in sample:', f'    audio, rate = sf.read(io.BytesIO(sample["{audio}"]))']
        hf_lines += [f'if row["{audio}"] is not None:  # bytes: decoded without torchcodec',
                     f'    audio, rate = sf.read(io.BytesIO(row["{audio}"]))']
    wds_lines.append('labels = sample["json"]["labels"]  # class indices; names in dataset.json')
    if task:
        hf_lines += [f'names = ds["{hf_split(split)}"].features["json"]["labels"][{json.dumps(task.name)}]'
                     + (".names" if task.type == "classification" else ".feature.names")]
    ind = "\n    "
    mmdata_code = ("from mmdata import LoaderConfig, make_loader, open_dataset\n\n"
                   'ds = open_dataset("OUT")  # this folder: a local path or an fsspec URL\n'
                   f'loader = make_loader(\n    ds, "{split}", batch_size=32, num_workers=2,{_loader_args(card)})\n'
                   "for batch in loader:  # Batch: tensors + presence masks, labels[task] + label_mask[task]\n"
                   "    ...\n")
    wds_code = ("import io\n\nimport soundfile as sf\nimport webdataset as wds\n\n"
                f'for sample in wds.WebDataset("{urls}", shardshuffle=False).decode("pil"):'
                f"{ind}{ind.join(wds_lines)}\n")
    hf_code = ("import io\n\nimport soundfile as sf\nfrom datasets import load_dataset\n\n"
               'ds = load_dataset("OUT")  # or load_dataset("OUT", streaming=True)\n'
               f'row = ds["{hf_split(split)}"][0]\n' + "".join(line + "\n" for line in hf_lines))
    text = ("## Loading\n\nWith mmdata (batches for PyTorch, deterministic and resumable):\n\n"
            f"```python\n{mmdata_code}```\n\nWith the `webdataset` library:\n\n```python\n{wds_code}```\n\n"
            "With Hugging Face `datasets` (this README's header declares the splits and features, class names "
            f"included):\n\n```python\n{hf_code}```\n")
    if audio:
        text += (f"\nAudio is declared as bytes (`binary`): `datasets` >= 4 decodes its `Audio` feature with "
                 f'torchcodec only. In `datasets` 3.x, `ds = ds.cast_column("{audio}", Audio())` decodes it to '
                 '`{"array", "sampling_rate"}`.\n')
    return text
