"""What a run reads: one dataset, or an ``mmdata.Mixture`` of several named ones (``--data A --data B``).

A single dataset stays a plain ``Dataset`` and is read exactly as before. Several become a Mixture:
tasks and modalities united by name, a task or modality a source lacks masked in its samples. What a
session asks of its data beyond what a Mixture answers itself (the audio rate, the tokenizer, the
training labels of a regression task, a digest of the cards, which tasks each modality is labelled
with) is answered here for both.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

from mmdata import Dataset, Mixture, open_dataset
from mmdata.errors import ConfigError
from mmdata.tasks import TaskList

from .config import DataConfig

DataSpec = str | dict[str, str]  # a path or URL, or {source name: path or URL}
Data = Dataset | Mixture

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # no dot or slash: SOURCE/val_TASK_METRIC reads back


def parse_data(values: Sequence[str]) -> DataSpec:
    """``--data`` values as a DataSpec: one is its path; several are {name: path}.

    ``NAME=PATH`` names a source; otherwise it is named after the path's last folder
    (``runs/images`` -> ``images``). Two sources of one name are refused, with the fix.
    """
    if not values:
        raise ConfigError("give a dataset with --data PATH (repeat it to train on a mixture)")
    pairs = [_split_name(v) for v in values]
    if len(pairs) == 1:
        return pairs[0][1]
    out: dict[str, str] = {}
    for name, path in pairs:
        if name in out:
            raise ConfigError(f"two --data are named {name!r} ({out[name]!r} and {path!r}); name them apart with "
                              f"--data NAME=PATH")
        out[name] = path
    return out


def _split_name(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if sep and path and _NAME.fullmatch(name):
        return name, path
    name = value.rstrip("/").rsplit("/", 1)[-1]
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--data {value!r}: cannot name a source after {name!r}; give it a name: --data NAME={value}")
    return name, value


def describe(data: DataSpec) -> str:
    """``data`` in one line for messages and logs."""
    return data if isinstance(data, str) else ", ".join(f"{n}={p}" for n, p in data.items())


def open_data(data: DataSpec, cfg: DataConfig) -> Data:
    """The Dataset, or for several sources their Mixture with ``cfg``'s weights and epoch length."""
    options = dict(storage_options=cfg.storage_options, cache_dir=cfg.cache_dir,
                   cache_bytes=int(cfg.cache_gb * 2**30))
    if isinstance(data, str):
        if cfg.weights is not None or cfg.samples_per_epoch is not None:
            raise ConfigError(f"data.weights and data.samples_per_epoch shape a mixture, but one dataset was given "
                              f"({data!r}); give several --data, or set both to null")
        return open_dataset(data, **options)
    if not data:
        raise ConfigError("a mixture needs at least one --data")
    return Mixture({name: open_dataset(path, **options) for name, path in data.items()}, cfg.weights,
                   samples_per_epoch=cfg.samples_per_epoch)


def every_sample(data: Data) -> Data:
    """``data`` read so that an epoch of any split is each of its samples once (a Mixture's weights dropped)."""
    if not isinstance(data, Mixture) or (data.weights is None and data.samples_per_epoch is None):
        return data
    return Mixture(dict(zip(data.names, data.datasets)))


def digest(data: Data) -> str:
    """A short hash of the card(s): tells a resumed or evaluated run whether its data changed."""
    if isinstance(data, Mixture):
        text = json.dumps({n: d.card.to_json() for n, d in zip(data.names, data.datasets)})
    else:
        text = data.card.to_json()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sample_rate(data: Data) -> int | None:
    """The stored audio rate (every source with audio shares it: a Mixture checks), None without audio."""
    if isinstance(data, Mixture):
        return data.sample_rate
    return data.card.modalities.get("audio", {}).get("sample_rate")


def vocab_size(data: Data) -> int:
    """Size of the vocabulary the loader tokenises text with (a Mixture's sources share one tokenizer)."""
    if isinstance(data, Dataset):
        return data.tokenizer().get_vocab_size()
    from mmdata.tokenizer import load_tokenizer

    tok = data.tokenizer_json
    if tok is None:
        raise ConfigError("no source of the mixture has a tokenizer; rebuild the text sources with "
                          "tokenizer_vocab > 0")
    return load_tokenizer(tok).get_vocab_size()


def drawn(data: Data, split: str) -> list[Dataset]:
    """The datasets ``split`` reads: the dataset itself, or the Mixture's sources drawn for it."""
    return [data] if isinstance(data, Dataset) else [data.datasets[i] for i in data.drawn(split)]


def label_values(data: Data, split: str, task: str) -> list:
    """Stored labels of ``task`` over the sources ``split`` reads that have it (None where missing)."""
    return [v for d in drawn(data, split) if task in d.tasks.names for v in d.label_values(split, task)]


def branch_tasks(data: Data, split: str, modalities: Sequence[str],
                 tasks: TaskList) -> dict[str, tuple[str, ...]] | None:
    """Per modality, the tasks some source of ``split`` labels samples of that modality with.

    None when every modality comes with every task (one dataset, or a mixture whose sources all have
    everything). A modality no source of ``split`` has, and a task labelled only in sources that have
    none of ``modalities``, cannot be learned: ConfigError naming them.
    """
    sources = drawn(data, split)
    out = {m: tuple(t.name for t in tasks if any(m in d.modalities and t.name in d.tasks.names for d in sources))
           for m in modalities}
    alone = [m for m, ts in out.items() if not ts]
    if alone:
        raise ConfigError(f"model.modalities has {alone}, which no source of split {split!r} labels with any of "
                          f"the tasks {tasks.names}; drop them from model.modalities or add a source that has them")
    unlearnt = [t.name for t in tasks if not any(t.name in ts for ts in out.values())]
    if unlearnt:
        raise ConfigError(f"tasks {unlearnt} are labelled only in sources without any of the model's modalities "
                          f"{list(modalities)}; leave them out of data.tasks")
    return None if all(len(ts) == len(tasks) for ts in out.values()) else out
