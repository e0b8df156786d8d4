"""Runner: discover -> align -> encode (process pool) -> shards -> card, resumable shard by shard."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from ..card import Card, SplitInfo
from ..errors import ConfigError, MmdataError, RejectThresholdError
from ..format import CARD_NAME, INDEX_NAME, REJECTS_NAME, TOKENIZER_DIR
from ..storage import atomic_write
from ..tasks import Task
from .align import Record, Reject, align
from .config import BuildConfig, replace
from .discover import discover
from .hfcard import write_readme
from .hfparquet import class_names, parquet_files
from .index import write_index
from .media import MediaSettings, encode_and_pack
from .outdir import DATASET_FILES, JOURNAL, OutLock, done_from_entry, journal_shard, prepare_out
from .shards import TMP_SUFFIX, ShardDone, SplitWriter
from .splits import assign_splits, shuffled, split_sort_key
from .spool import Spool
from .tars import source_card

log = logging.getLogger(__name__)

DEFAULT_RATE = 16000


def build_dataset(source: str | Path, out: str | Path, config: BuildConfig | None = None, *, layout: str = "auto",
                  overwrite: bool = False, progress: bool = True, resume: bool = False, executor: str = "local",
                  ray_address: str | None = None, storage_options: dict[str, Any] | None = None) -> Card:
    """Build a sharded dataset in ``out`` from ``source``; return its card. Every record is written or rejected.

    Past ``config.max_reject_fraction`` the dataset and ``rejects.jsonl`` are still written, then
    ``RejectThresholdError`` is raised (its ``card`` says what was built).

    ``source`` and ``out`` may be fsspec URLs (``s3://bucket/ds``; ``storage_options`` reach the filesystem).
    A remote source is fetched to a local temporary folder first. A remote ``out`` is committed card-last
    (see ``mmdata.storage``): its shards are written there directly by Ray tasks, or staged in a local
    folder by the local executor, and the card goes up last. ``executor="ray"`` runs the same plan as
    Ray tasks and writes the same bytes; resuming is for the local executor and a local ``out``.
    """
    import tempfile

    from ..storage import Storage, fetch_tree, is_url, publish
    from .executors import make_executor

    config = config or BuildConfig()
    remote_out = is_url(out)
    if resume and (remote_out or executor != "local"):
        raise ConfigError("--resume works with --executor local and a local output folder; rerun without "
                          "--resume (with --overwrite) to build again")
    with tempfile.TemporaryDirectory(prefix="mmdata-build-") as tmp, contextlib.ExitStack() as held:
        if is_url(source):
            source = fetch_tree(str(source), Path(tmp) / "source", storage_options)
        if not remote_out:
            _check_not_source(Path(source), Path(out))
            Path(out).mkdir(parents=True, exist_ok=True)
            held.enter_context(OutLock(Path(out)))  # one build at a time writes OUT
        spool = Spool(Path(tmp) / "spool")
        try:
            root, layout, raws = discover(source, layout, config, exclude=None if remote_out else Path(out),
                                          spool=spool)
        finally:
            spool.close()  # before any worker reads it
        log.info("discovered %d records (%s layout) under %s", len(raws), layout, root)
        if not config.tasks:
            config = replace(config, tasks=_source_tasks(source, root, layout))
        dest = Storage(out if remote_out else Path(out).absolute(), storage_options)
        if remote_out:
            _prepare_remote(dest, overwrite=overwrite)
        work = Path(tmp) / "staging" if remote_out else Path(out)
        pool = make_executor(executor, workers=config.num_workers, jobs=len(raws), ray_address=ray_address)
        try:
            card = _build(raws, root, layout, work, config, pool, dest, overwrite=overwrite, resume=resume,
                          progress=progress)
        finally:
            pool.close()
        if remote_out:
            publish(work, dest)
    _check_reject_fraction(card, config.max_reject_fraction, out)
    return card


def _source_tasks(source: str | Path, root: Path, layout: str) -> tuple[Task, ...]:
    """Tasks the input declares itself, with their class order: an mmdata dataset's card, a Hugging Face
    file's ClassLabel features (others' classes are inferred from the values: sorted)."""
    if layout == "webdataset" and (own := source_card(root)) is not None:
        log.info("the source is an mmdata dataset: its tasks and class names carry over")
        return tuple(own.tasks)
    if layout == "hfparquet":
        first = Path(source) if Path(source).is_file() else (parquet_files(Path(source)) or [None])[0]
        labels = class_names(first) if first is not None else {}
        if labels:
            log.info("ClassLabel columns %s keep their Hugging Face class order; other label columns are "
                     "tasks only when declared in the build config", sorted(labels))
        return tuple(Task(c, "multilabel" if many else "classification", tuple(names))
                     for c, (names, many) in labels.items())
    return ()


def _check_not_source(source: Path, out: Path) -> None:
    """Refuse to write shards among the input: OUT must not be the source folder (or the tars' folder)."""
    folder = source if source.is_dir() else source.parent
    if out.exists() and os.path.realpath(out) == os.path.realpath(folder):
        raise ConfigError(f"output folder {str(out)!r} is the source folder; the build would write its shards "
                          "among its input: give another output folder")


def _check_reject_fraction(card: Card, limit: float, out: str | Path) -> None:
    """Raise RejectThresholdError (the dataset and rejects.jsonl are written) past ``max_reject_fraction``."""
    counts = card.counts
    rejected = sum(counts["rejected"].values())
    if counts["input"] and rejected / counts["input"] > limit:
        raise RejectThresholdError(
            f"{rejected} of {counts['input']} records ({rejected / counts['input']:.1%}) were rejected, more than "
            f"max_reject_fraction {limit:.1%}; the dataset is written: see {str(out).rstrip('/')}/{REJECTS_NAME} "
            "for why, fix the input or raise max_reject_fraction", card)


def _prepare_remote(dest, *, overwrite: bool) -> None:
    """Decommit and clear the files the old card lists under a remote ``out``; never touch anything else."""
    names = dest.names()
    if names and not overwrite:
        raise ConfigError(f"output {dest.url!r} is not empty; pass --overwrite to replace the dataset there")
    ours: set[str] = set()
    if CARD_NAME in names:
        try:
            card = Card.from_json(dest.read(CARD_NAME).decode("utf-8"))
        except (MmdataError, UnicodeDecodeError) as e:
            raise ConfigError(f"{dest.url!r} holds a {CARD_NAME} that cannot be read ({e}); remove it to "
                              "build there") from None
        ours = {s.file for split in card.splits.values() for s in split.shards} | set(DATASET_FILES)
    dest.decommit()
    for name in names:
        if name in ours:
            dest.remove(name)


def _build(raws, root: Path, layout: str, out: Path, config: BuildConfig, pool, dest,
           *, overwrite: bool, resume: bool, progress: bool) -> Card:
    records, rejects, tasks = align(raws, root, config, map_fn=pool.check_map)
    settings = _media_settings(records, config)
    pool.start(decoding=_decodes(records, settings))
    split_of = assign_splits(records, config)
    resolved = config.to_dict()
    resolved.update(layout=layout, sample_rate=settings.sample_rate,
                    tasks={t.name: {k: v for k, v in t.to_dict().items() if k != "name"} for t in tasks})
    fingerprint = _fingerprint(resolved, records, split_of)
    split_names = sorted(set(split_of.values()), key=split_sort_key)
    journal = prepare_out(out, fingerprint, split_names, overwrite=overwrite, resume=resume)

    by_key = {r.key: r for r in records}
    orders = {s: shuffled([k for k, v in split_of.items() if v == s], s, config.seed) for s in split_names}
    done: dict[str, list[ShardDone]] = {s: [] for s in split_names}
    consumed: dict[str, int] = dict.fromkeys(split_names, 0)
    for entry in journal:  # shards finished by an earlier, interrupted run (checked by hash)
        done[entry["split"]].append(done_from_entry(entry))
        consumed[entry["split"]] = entry["consumed"]
        rejects += [Reject(**{**r, "paths": tuple(r["paths"])}) for r in entry["rejects"]]
    todo = sum(len(orders[s]) - consumed[s] for s in split_names)
    if journal:
        log.info("resuming: %d shards kept, %d records left", len(journal), todo)

    from tqdm import tqdm

    bar = tqdm(total=todo, unit="rec", desc="build", disable=not progress, dynamic_ncols=True)
    writers: list[SplitWriter] = []
    with open(out / JOURNAL, "a", encoding="utf-8") as jf:
        for split in split_names:
            order = orders[split]
            if pool.writes_shards:  # Ray: one task per shard, written straight to the destination
                jobs = [(by_key[k], settings) for k in order]
                done[split], more = pool.write_split(split, jobs, config.max_samples, config.max_bytes, dest)
                rejects += more
                bar.update(len(order))
                continue
            kept = sum(len(t.encode("utf-8")) for d in done[split] for t in d.texts)  # by a resumed build's shards
            budget = max(0, config.tokenizer_sample_bytes - kept) if split == "train" else 0
            writer = SplitWriter(out, split, config.max_samples, config.max_bytes, first_index=len(done[split]),
                                 text_budget=budget)
            writers.append(writer)
            pending: list[Reject] = []
            jobs = ((by_key[k], settings) for k in order[consumed[split]:])
            try:
                for pos, result in enumerate(pool.map(encode_and_pack, jobs), consumed[split]):
                    bar.update(1)
                    if isinstance(result, Reject):
                        pending.append(result)
                        bar.set_postfix(rejected=len(rejects) + len(pending), refresh=False)
                        continue
                    closed = writer.add(result)
                    if closed:
                        journal_shard(jf, split, closed, pos, pending)
                        done[split].append(closed)
                        rejects, pending = rejects + pending, []
                closed = writer.close()
            finally:
                writer.abandon()  # after an error: stop the open shard's thread
            if closed:
                journal_shard(jf, split, closed, len(order), pending)
                done[split].append(closed)
            rejects += pending
    bar.close()
    for writer in writers:  # every shard on disk before the card says the dataset is there
        writer.sync()
    return _finish(out, config, resolved, tasks, settings, done, rejects, len(raws), fingerprint)


def _decodes(records: list[Record], s: MediaSettings) -> bool:
    """Whether encoding will decode media: anything but PNGs kept as they are and audio already in the
    stored format and rate (a WAV's sample format is only known once read: it counts as kept)."""
    for r in records:
        image, audio = r.media.get("image"), r.media.get("audio")
        if image is not None and (image.ext != "png" or s.max_side is not None
                                  or s.image_format not in ("keep", "png")):
            return True
        if audio is not None and (audio.ext != s.audio_format or r.audio_rate != s.sample_rate):
            return True
    return False


def _media_settings(records: list[Record], config: BuildConfig) -> MediaSettings:
    rate = config.sample_rate
    if rate is None:
        rates = {r.audio_rate for r in records if r.audio_rate}
        rate = rates.pop() if len(rates) == 1 else DEFAULT_RATE
        if len(rates) > 0:
            log.info("audio inputs have several sample rates; resampling all to %d Hz", rate)
    return MediaSettings(config.image_format, config.image_quality, config.max_side, config.max_pixels, rate,
                         config.channels, config.audio_format, config.max_audio_seconds)


def _fingerprint(resolved: dict[str, Any], records: list[Record], split_of: dict[str, str]) -> str:
    facts = [[r.key, r.source_id, split_of[r.key], r.paths, [m.size for m in r.media.values()], r.labels]
             for r in sorted(records, key=lambda r: r.key)]
    return hashlib.sha256(json.dumps([resolved, facts], sort_keys=True).encode()).hexdigest()


# ---- card, index, rejects, tokenizer (written last) --------------------------------------------------------


def _finish(out: Path, config: BuildConfig, resolved: dict[str, Any], tasks: tuple[Task, ...],
            settings: MediaSettings, done: dict[str, list[ShardDone]], rejects: list[Reject],
            num_input: int, fingerprint: str) -> Card:
    rows = [row for split in done for d in done[split] for row in d.rows]
    written = len(rows)
    if written + len(rejects) != num_input:
        raise AssertionError(f"accounting: {written} written + {len(rejects)} rejected != {num_input} input")
    exts = {e for row in rows for e in row["exts"]}
    modalities: dict[str, dict[str, Any]] = {}
    if exts & {"jpg", "png", "webp"}:
        modalities["image"] = {"formats": sorted(exts & {"jpg", "png", "webp"})}
    if exts & {"flac", "wav"}:
        modalities["audio"] = {"sample_rate": settings.sample_rate, "channels": settings.channels,
                               "format": settings.audio_format}
    if "txt" in exts:
        modalities["text"] = {"encoding": "utf-8", "normalization": "NFC"}
    splits = {
        s: SplitInfo(tuple(d.info for d in ds), _label_counts(tasks, [r for d in ds for r in d.rows]))
        for s, ds in done.items() if ds
    }
    reasons = Counter(r.reason for r in rejects)
    counts = {"input": num_input, "written": written, "rejected": dict(sorted(reasons.items()))}
    card = Card(modalities=modalities, tasks=_task_list(tasks), splits=splits, build_config=resolved,
                counts=counts, fingerprint=fingerprint)
    texts = [t for d in done.get("train", []) for t in d.texts]
    if texts and config.tokenizer_vocab > 0:
        _write_tokenizer(out, texts, config.tokenizer_vocab)
    meta = write_index(out / INDEX_NAME, rows, tasks)
    write_readme(out, card, rejects, meta)
    lines = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n"
                    for r in sorted(rejects, key=lambda r: (r.source_id, r.reason, r.paths)))
    atomic_write(out / REJECTS_NAME, lines.encode("utf-8"))
    atomic_write(out / CARD_NAME, card.to_json().encode("utf-8"))
    os.remove(out / JOURNAL)
    return card


def _task_list(tasks: tuple[Task, ...]):
    from ..tasks import TaskList

    return TaskList(tuple(tasks))


def _label_counts(tasks: tuple[Task, ...], rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in tasks:
        vals = [r["labels"].get(t.name) for r in rows]
        if t.type == "regression":
            c = {"present": sum(v is not None for v in vals)}
        else:
            c = dict.fromkeys(t.classes, 0)
            for v in vals:
                for i in ([v] if t.type == "classification" else v) if v is not None else []:
                    c[t.classes[i]] += 1
        c["missing"] = sum(v is None for v in vals)
        out[t.name] = c
    return out


def _write_tokenizer(out: Path, texts: list[str], vocab: int) -> None:
    from ..tokenizer import save_tokenizer, train_tokenizer

    tmp = out / (TOKENIZER_DIR + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(train_tokenizer(texts, vocab_size=vocab), tmp)
    final = out / TOKENIZER_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
