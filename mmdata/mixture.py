"""Mixture: several datasets read as one, by weight, with their tasks and modalities united.

``make_loader(Mixture({"images": a, "speech": b}, weights={"images": 1, "speech": 2}), "train", ...)``
streams both: the plan (``mmdata.order.Blend``) draws each epoch's (source, sample) pairs, and every
guarantee of a single dataset's loader holds (determinism, rank-equal batches, exact resume).

Schemas are united by name: a task must have the same type (and dims) in every source that has it;
the class lists are united in the first source's order, new classes appended, and each source's stored
class indices are remapped to that order as they are decoded. A task or modality that a source lacks is
a False mask in its samples, as a missing label is in a single dataset.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import replace
from fractions import Fraction
from functools import cached_property
from typing import Any

import numpy as np

from .dataset import Dataset, as_dataset
from .decode import Decoder, DecodeSpec, Sample
from .errors import ConfigError, SchemaError
from .order import Blend
from .tasks import Task, TaskList


class Mixture:
    """Named datasets with weights, accepted by ``make_loader`` wherever a dataset is.

    ``weights``: each source's expected share of an epoch's samples (any non-negative numbers, at least
    one positive; 0 leaves a source out of the stream, its tasks stay in the schema). None: shares in
    proportion to the split's sizes, so an epoch reads every sample once. ``samples_per_epoch``: the
    epoch's length; None: the summed sizes of the split in the sources drawn. A source smaller than its
    share repeats within an epoch; a larger one is subsampled without repeats, and later epochs go on
    through its samples, so all of them are seen. A source without the split is left out of that split.
    """

    def __init__(self, datasets: Mapping[str, Dataset | str | os.PathLike], weights: Mapping[str, float] | None = None,
                 *, samples_per_epoch: int | None = None, storage_options: dict | None = None):
        if not datasets:
            raise ConfigError("a Mixture needs at least one dataset, got none")
        bad = [n for n in datasets if not isinstance(n, str) or not n]
        if bad:
            raise ConfigError(f"Mixture source names must be non-empty strings, got {bad}")
        self.names: tuple[str, ...] = tuple(datasets)
        self.datasets: tuple[Dataset, ...] = tuple(as_dataset(d, storage_options) for d in datasets.values())
        self.weights = None if weights is None else _check_weights(self.names, weights)
        if samples_per_epoch is not None and (type(samples_per_epoch) is not int or samples_per_epoch < 1):
            raise ConfigError(f"samples_per_epoch must be a positive integer or None, got {samples_per_epoch!r}")
        self.samples_per_epoch = samples_per_epoch
        self.tasks, self.remaps = _unite_tasks(self.names, self.datasets)
        self.sample_rate = _common_rate(self.names, self.datasets)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n!r}: {d.root!r}" for n, d in zip(self.names, self.datasets))
        return f"Mixture({{{parts}}}, weights={self.weights}, samples_per_epoch={self.samples_per_epoch})"

    @property
    def modalities(self) -> list[str]:
        """Modalities of any source, in the order image, audio, text."""
        return [m for m in ("image", "audio", "text") if any(m in d.modalities for d in self.datasets)]

    @property
    def splits(self) -> list[str]:
        """Splits of any source, in the order the sources list them."""
        return list(dict.fromkeys(s for d in self.datasets for s in d.splits))

    def drawn(self, split: str) -> list[int]:
        """Indices of the sources that ``split`` reads: having it, with samples, and a positive weight."""
        if split not in self.splits:
            raise SchemaError(f"split {split!r} is in none of the mixture's sources; splits are {self.splits}")
        out = [i for i, (n, d) in enumerate(zip(self.names, self.datasets))
               if split in d.splits and d.num_samples(split) and (self.weights is None or self.weights[n])]
        if not out:
            raise SchemaError(f"split {split!r} has no samples in any source of positive weight; weights are "
                              f"{self.weights}")
        return out

    def num_samples(self, split: str) -> int:
        """Samples per epoch of ``split``: ``samples_per_epoch``, or the drawn sources' summed sizes."""
        drawn = self.drawn(split)
        return self.samples_per_epoch or sum(self.datasets[i].num_samples(split) for i in drawn)

    def blend(self, split: str) -> Blend:
        """The plan's view of ``split``: every source's shard sizes and exact share (0 when not drawn)."""
        drawn = self.drawn(split)
        given = [Fraction(self.weights[self.names[i]]) if self.weights else
                 Fraction(self.datasets[i].num_samples(split)) for i in drawn]
        share = dict(zip(drawn, (w / sum(given) for w in given)))
        sizes = tuple(self.datasets[i].split_index(split).shard_sizes if i in share else () for i in
                      range(len(self.names)))
        return Blend(sizes, tuple(share.get(i, Fraction(0)) for i in range(len(self.names))),
                     self.num_samples(split), self.names)

    def common_image_size(self, split: str) -> tuple[int, int] | None:
        """(H, W) shared by the images that set the split's shape (``shaping``), None when they differ."""
        sizes = {d.common_image_size(s) for d, s in self.shaping(split, "image")}
        return sizes.pop() if len(sizes) == 1 else None

    def max_audio_seconds(self, split: str) -> float:
        """Longest clip of those that set the split's shape (``shaping``), in seconds (0 without audio)."""
        return max((d.max_audio_seconds(s) for d, s in self.shaping(split, "audio")), default=0.0)

    def shaping(self, split: str, modality: str) -> list[tuple[Dataset, str]]:
        """(dataset, split) pairs whose ``modality`` sets its shape in ``split``'s batches.

        The drawn sources that have it; when none has, every source that has it, in all its splits, so
        that the masked zeros keep the shape a model sees in the other splits.
        """
        drawn = [(self.datasets[i], split) for i in self.drawn(split) if modality in self.datasets[i].modalities]
        return drawn or [(d, s) for d in self.datasets if modality in d.modalities for s in d.splits]

    @cached_property
    def tokenizer_json(self) -> bytes | None:
        """The tokenizer the text sources share; ConfigError when they have different ones."""
        toks = {}
        for name, d in zip(self.names, self.datasets):
            if "text" in d.modalities and d.tokenizer_json is not None:
                toks.setdefault(d.tokenizer_json, name)
        if len(toks) > 1:
            a, b = list(toks.values())[:2]
            raise ConfigError(f"sources {a!r} and {b!r} have different tokenizers, so their token ids differ; "
                              "set LoaderConfig(tokenizer=PATH) to one tokenizer.json for all")
        return next(iter(toks), None)

    def decoders(self, spec: DecodeSpec, tokenizer_json: bytes | None) -> tuple[SourceDecoder, ...]:
        """One decoder per source for the united ``spec``: only what the source has, labels remapped."""
        out = []
        for d, remap in zip(self.datasets, self.remaps):
            mine = replace(spec, modalities=tuple(m for m in spec.modalities if m in d.modalities),
                           tasks=tuple(d.tasks[t.name] for t in spec.tasks if t.name in d.tasks.names))
            tok = tokenizer_json if "text" in mine.modalities else None
            out.append(SourceDecoder(Decoder(mine, tok), {t.name: remap[t.name] for t in mine.tasks
                                                          if t.name in remap}))
        return tuple(out)

    def fingerprint(self, split: str) -> dict[str, Any]:
        """What a loader state of ``split`` is only valid for: each source's size and share."""
        b = self.blend(split)
        return {n: [sum(s), str(w)] for n, s, w in zip(self.names, b.shard_sizes, b.weights)}


class SourceDecoder:
    """A source's Decoder whose class labels come out in the mixture's united class order."""

    def __init__(self, decoder: Decoder, remap: dict[str, np.ndarray]):
        self.decoder = decoder
        self.remap = remap  # task -> (C_source,) int64 united index of each source class

    def __call__(self, key: str, members: dict[str, bytes], salt: str = "") -> Sample:
        s = self.decoder(key, members, salt)
        for name, table in self.remap.items():
            v = s.labels.get(name)
            if v is not None:  # a class index, or a multilabel list of them; checked by the decoder
                s.labels[name] = int(table[v]) if isinstance(v, int) else sorted(int(table[i]) for i in v)
        return s


def _check_weights(names: tuple[str, ...], weights: Mapping[str, float]) -> dict[str, float]:
    """The weights as {name: float}: one per source, finite, non-negative, not all 0."""
    for n in weights:
        if n not in names:
            near = difflib.get_close_matches(str(n), names, 1)
            raise ConfigError(f"weights name {n!r}, which is not a source" +
                              (f"; did you mean {near[0]!r}?" if near else f"; sources are {list(names)}"))
    missing = [n for n in names if n not in weights]
    if missing:
        raise ConfigError(f"weights lack sources {missing}; give every source a weight (0 leaves it out)")
    out = {}
    for n in names:
        w = weights[n]
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"weight of source {n!r} must be a finite number >= 0, got {w!r}")
        out[n] = float(w)
    if not any(out.values()):
        raise ConfigError(f"at least one weight must be positive, got {out}")
    return out


def _unite_tasks(names: tuple[str, ...], datasets: tuple[Dataset, ...]
                 ) -> tuple[TaskList, tuple[dict[str, np.ndarray], ...]]:
    """The united tasks, and per source {task: (C,) united class index of each of its classes}.

    Only remaps that change an index are kept. ConfigError naming both sources when a task's type or
    dims differ.
    """
    united: dict[str, Task] = {}
    owner: dict[str, int] = {}
    for i, d in enumerate(datasets):
        for t in d.tasks:
            first = united.get(t.name)
            if first is None:
                united[t.name], owner[t.name] = t, i
                continue
            o = owner[t.name]
            if (first.type, first.dims) != (t.type, t.dims):
                what = (lambda x: x.type) if first.type != t.type else (lambda x: f"{x.type} with {x.dims} dims")
                raise ConfigError(f"task {t.name!r} is {what(first)} in source {names[o]!r} ({datasets[o].root}) "
                                  f"but {what(t)} in source {names[i]!r} ({d.root}); a task of a mixture has one "
                                  "type: rename it in one dataset's build config, or leave one source out")
            new = tuple(c for c in t.classes if c not in first.classes)
            if new:
                united[t.name] = replace(first, classes=first.classes + new)
    remaps = []
    for d in datasets:
        remap = {}
        for t in d.tasks:
            classes = united[t.name].classes
            table = np.asarray([classes.index(c) for c in t.classes], dtype=np.int64)
            if not np.array_equal(table, np.arange(len(table))):
                remap[t.name] = table
        remaps.append(remap)
    return TaskList(tuple(united.values())), tuple(remaps)


def _common_rate(names: tuple[str, ...], datasets: tuple[Dataset, ...]) -> int | None:
    """The audio sample rate every source with audio has; ConfigError naming two that differ."""
    rates = {}
    for n, d in zip(names, datasets):
        sr = d.card.modalities.get("audio", {}).get("sample_rate")
        if "audio" in d.modalities and sr:
            rates.setdefault(sr, n)
    if len(rates) > 1:
        (ra, a), (rb, b) = list(rates.items())[:2]
        raise ConfigError(f"sources {a!r} ({ra} Hz) and {b!r} ({rb} Hz) store audio at different sample rates; "
                          "rebuild one with the other's rate (--set sample_rate=HZ) so their clips can be batched")
    return next(iter(rates), None)
