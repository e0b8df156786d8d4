"""Finish: what a build writes once its shards are there: tokenizer, index, README, rejects, then the card.

The card goes last: a dataset is there once its card is. Label counts are gathered while the index
rows go by (``LabelCounts``), so nothing here holds a row per sample.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..card import Card, ShardInfo, SplitInfo, add_label, empty_label_counts
from ..format import CARD_NAME, PARTIAL_SUFFIX, REJECTS_NAME, TOKENIZER_DIR
from ..storage import atomic_copy, atomic_write
from ..tasks import Task, TaskList
from .align import RejectLog
from .hfcard import write_readme
from .media import MediaSettings


class LabelCounts:
    """Per split and task: samples per class (or with a value, for regression) and samples without one."""

    def __init__(self, tasks: tuple[Task, ...]):
        self.tasks = tasks
        self.counts: dict[str, dict[str, dict[str, int]]] = {}

    def add(self, split: str, labels: dict[str, Any]) -> None:
        per_task = self.counts.get(split)
        if per_task is None:
            per_task = self.counts[split] = {t.name: empty_label_counts(t) for t in self.tasks}
        for t in self.tasks:
            add_label(per_task[t.name], t, labels.get(t.name))

    def of(self, split: str) -> dict[str, dict[str, int]]:
        return self.counts.get(split) or {t.name: empty_label_counts(t) for t in self.tasks}


def modalities_of(exts: set[str], settings: MediaSettings) -> dict[str, dict[str, Any]]:
    """The card's modalities: what the stored members are."""
    modalities: dict[str, dict[str, Any]] = {}
    if exts & {"jpg", "png", "webp"}:
        modalities["image"] = {"formats": sorted(exts & {"jpg", "png", "webp"})}
    if exts & {"flac", "wav"}:
        modalities["audio"] = {"sample_rate": settings.sample_rate, "channels": settings.channels,
                               "format": settings.audio_format}
    if "txt" in exts:
        modalities["text"] = {"encoding": "utf-8", "normalization": "NFC"}
    return modalities


def finish(out: Path, *, modalities: dict[str, dict[str, Any]], tasks: tuple[Task, ...],
           shards: dict[str, list[ShardInfo]], counts: LabelCounts, rejects: RejectLog, num_input: int,
           resolved: dict[str, Any], fingerprint: str, texts: Iterable[str], has_text: bool, vocab: int,
           meta: dict[str, str]) -> Card:
    """Write the tokenizer, README, rejects and, last, the card; return the card."""
    written = sum(s.samples for infos in shards.values() for s in infos)
    if written + len(rejects) != num_input:
        raise AssertionError(f"accounting: {written} written + {len(rejects)} rejected != {num_input} input")
    splits = {s: SplitInfo(tuple(infos), counts.of(s)) for s, infos in shards.items() if infos}
    reasons = rejects.reasons
    card = Card(modalities=modalities, tasks=TaskList(tuple(tasks)), splits=splits, build_config=resolved,
                counts={"input": num_input, "written": written, "rejected": dict(sorted(reasons.items()))},
                fingerprint=fingerprint)
    if has_text and vocab > 0:
        _write_tokenizer(out, texts, vocab)
    write_readme(out, card, rejects.examples, meta)
    atomic_copy(rejects.path, out / REJECTS_NAME)
    atomic_write(out / CARD_NAME, card.to_json().encode("utf-8"))
    return card


def _write_tokenizer(out: Path, texts: Iterable[str], vocab: int) -> None:
    from ..tokenizer import save_tokenizer, train_tokenizer

    tmp = out / (TOKENIZER_DIR + PARTIAL_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(train_tokenizer(texts, vocab_size=vocab), tmp)
    final = out / TOKENIZER_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
