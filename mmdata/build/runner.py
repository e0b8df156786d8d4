"""Runner: the build's plan, from input to card. One pass packs every record as it is found (``pack``),
then the shuffled shards are cut out of the spill files (``assemble``), then the card (``finish``).
Resumable shard by shard."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..card import Card, ShardInfo
from ..errors import ConfigError, MmdataError, RejectThresholdError
from ..format import (
    BLOCK,
    CARD_NAME,
    INDEX_NAME,
    REJECTS_NAME,
    modality_of,
    parse_members,
    sample_block,
    shard_name,
)
from ..tasks import Task
from .align import Ids, LabelStats, Reject, RejectLog, group_of
from .assemble import cut
from .catalog import Catalog, Samples
from .config import BuildConfig, replace
from .discover import discover
from .executors import RAY_PREFIX, ShardPlan, make_executor
from .finish import LabelCounts, finish, modalities_of
from .guard import realdir
from .hfparquet import class_names, parquet_files
from .index import IndexWriter
from .media import MediaReject, MediaSettings, encode_audio
from .outdir import DATASET_FILES, JOURNAL, OutLock, journal_shard, prepare_out, shard_of_entry
from .pack import PackContext
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
        if not config.tasks:
            config = replace(config, tasks=_source_tasks(source, root, layout))
        dest = Storage(out if remote_out else Path(out).absolute(), storage_options)
        if remote_out:
            _prepare_remote(dest, overwrite=overwrite)
        work = Path(tmp) / "staging" if remote_out else Path(out)
        pool = make_executor(executor, workers=config.num_workers, ray_address=ray_address)
        try:
            rejects = held.enter_context(RejectLog(str(Path(tmp) / "rejects.jsonl")))
            card = _build(raws, root, layout, work, Path(tmp), config, pool, dest, rejects, overwrite=overwrite,
                          resume=resume, progress=progress)
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


def _build(raws, root: Path, layout: str, out: Path, tmp: Path, config: BuildConfig, pool, dest, rejects: RejectLog,
           *, overwrite: bool, resume: bool, progress: bool) -> Card:
    from tqdm import tqdm

    realdir.cache_clear()  # links may have changed since the last build in this process
    folder = tmp / "pack"
    folder.mkdir()
    settings = media_settings(config)
    ctx = PackContext(Path(os.path.realpath(root)), config, settings, str(folder))
    catalog, stats, seen = _pack_pass(raws, ctx, pool, config, progress, rejects)
    log.info("packed %d of %d records (%s layout) under %s", len(catalog), seen, layout, root)
    settings = settle_rate(catalog, settings, pool, str(folder), rejects)
    tasks = stats.tasks()
    samples = Samples(str(folder), catalog, tasks, {t.source_column for t in tasks} | {config.split_by}, rejects)
    rejects.close()
    kept = np.flatnonzero(samples.kept & (catalog.arrays["size"] > 0))
    keys = pa.array(catalog.keys)
    ids_of = pa.array([catalog.source_id(int(i)) for i in kept]) if config.split_by or config.val or config.test \
        else pa.array([], pa.string())
    split_of = assign_splits(catalog.splits.values, catalog.arrays["split"][kept], catalog.groups.values,
                             catalog.arrays["group"][kept], ids_of, config)
    resolved = config.to_dict()
    resolved.update(layout=layout, sample_rate=settings.sample_rate,
                    tasks={t.name: {k: v for k, v in t.to_dict().items() if k != "name"} for t in tasks})
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode())
    digest.update(samples.digest.encode())
    digest.update(json.dumps(split_of.tolist()).encode())
    split_names = sorted(set(split_of.tolist()), key=split_sort_key)
    journal = prepare_out(out, digest.hexdigest(), split_names, overwrite=overwrite, resume=resume)
    finished = {e["file"]: e for e in journal}
    if journal:
        log.info("resuming: %d shards kept", len(journal))

    size = catalog.arrays["size"] + samples.size  # a sample's bytes in its shard
    plans = _shard_plans(kept, split_of, split_names, keys, size, config)
    index = IndexWriter(out / INDEX_NAME, tasks, samples.meta_types)
    counts = LabelCounts(tasks)
    shards: dict[str, list[ShardInfo]] = {s: [] for s in split_names}
    bar = tqdm(total=len(plans), unit="shard", desc="shards", disable=not progress, dynamic_ncols=True)
    for split, name, recs, info, members in _write_shards(plans, finished, catalog, samples, pool, out, dest):
        shards[split].append(info)
        jsons = [json.loads(m[BLOCK:].rstrip(b"\0")) for m in members]
        for sample in jsons:
            counts.add(split, sample["labels"])
        for row in _index_rows(catalog, recs, split, name, size[recs], jsons):
            index.add(row)
        bar.update(1)
    bar.close()
    samples.close()
    meta = index.close()
    exts = {e for code in np.unique(catalog.arrays["exts"][kept]).tolist() for e in catalog.exts.values[code]}
    card = finish(out, modalities=modalities_of(exts, settings), tasks=tasks, shards=shards, counts=counts,
                  rejects=rejects, num_input=seen,
                  resolved=resolved, fingerprint=digest.hexdigest(),
                  texts=train_texts(catalog, plans, config.tokenizer_sample_bytes, pool),
                  has_text=bool((catalog.arrays["text_at"][kept[split_of == "train"]] >= 0).any()),
                  vocab=config.tokenizer_vocab, meta=meta)
    os.remove(out / JOURNAL)
    return card


def _pack_pass(raws, ctx: PackContext, pool, config: BuildConfig, progress: bool,
               rejects: RejectLog) -> tuple[Catalog, LabelStats, int]:
    """Pack every record as it is found, in input order (its reject logged); return the catalog, the labels
    seen and the input count."""
    from tqdm import tqdm

    catalog, stats, ids = Catalog(ctx.folder), LabelStats(config), Ids()
    pending: deque = deque()  # (record, key) handed to the executor, in order
    seen = 0

    def jobs():  # may run in the pool's feeding thread: ids are checked and keys given in input order
        nonlocal seen  # (a record whose id is refused travels with its Reject, so rejects stay in input order)
        for raw in raws:
            seen += 1
            key = ids.check(raw)
            pending.append((raw, key))
            yield raw, key

    total = len(raws) if hasattr(raws, "__len__") else None  # a streamed input's count is known at its end
    bar = tqdm(total=total, unit="rec", desc="pack", disable=not progress, dynamic_ncols=True)
    try:
        for result in pool.pack(jobs(), ctx):
            raw, key = pending.popleft()
            bar.update(1)
            if isinstance(result, Reject):
                rejects.add(result)
                bar.set_postfix(rejected=len(rejects), refresh=False)
                continue
            stats.add(result.labels, result.fields)
            catalog.add(raw, key, result, group_of(result.labels, result.fields, config))
    finally:
        bar.close()
        catalog.close()
    catalog.finish()
    return catalog, stats, seen


def _shard_plans(kept: np.ndarray, split_of: np.ndarray, split_names: list[str], keys: pa.Array, size: np.ndarray,
                 config: BuildConfig) -> list[tuple[str, str, np.ndarray]]:
    """(split, shard name, records) of every shard, in the order the card lists them."""
    plans = []
    for split in split_names:
        order = shuffled(kept[split_of == split], keys, split, config.seed)
        starts = cut(size[order], config.max_samples, config.max_bytes)
        for n, (a, b) in enumerate(zip(starts, [*starts[1:], len(order)])):
            plans.append((split, shard_name(split, n), order[a:b]))
    return plans


def _write_shards(plans, finished: dict[str, dict], catalog: Catalog, samples: Samples, pool, out: Path, dest):
    """Write the shards a resumed build does not keep, journal each; yield every shard in order with its
    records' ``KEY.json`` members (read once: for its tar and for its index rows)."""
    members: dict[str, list[bytes]] = {}

    def todo():
        for split, name, recs in plans:
            if name not in finished:
                members[name] = [samples.member(i) for i in recs.tolist()]
                yield _shard_plan(catalog, name, recs, members[name], texts=split == "train")

    spills = [p for p in catalog.spills.values if not p.startswith(RAY_PREFIX)]
    written = pool.write(todo(), str(out), spills, storage=dest, hook=shard_hook)
    with open(out / JOURNAL, "a", encoding="utf-8") as jf:
        for split, name, recs in plans:
            if name in finished:
                info = shard_of_entry(finished[name])
                yield split, name, recs, info, [samples.member(i) for i in recs.tolist()]
                continue
            info = next(written)
            journal_shard(jf, split, info)
            yield split, name, recs, info, members.pop(name)


def shard_hook(shard) -> None:
    """Called after each sample a shard gets (a test's place to interrupt a build)."""


def _shard_plan(catalog: Catalog, name: str, recs: np.ndarray, jsons: list[bytes], texts: bool) -> ShardPlan:
    a, paths = catalog.arrays, catalog.spills.values
    spill, offset, size = (a[k][recs].tolist() for k in ("spill", "offset", "size"))
    where = list(zip(a["text_at"][recs].tolist(), a["text_bytes"][recs].tolist())) if texts else None
    return ShardPlan(name, [(paths[c], o, n) for c, o, n in zip(spill, offset, size)], jsons, where)


def _index_rows(catalog: Catalog, recs: np.ndarray, split: str, shard: str, sizes: np.ndarray,
                samples: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The index rows of one shard's samples."""
    a, exts = catalog.arrays, catalog.exts.values
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    columns = [a[k][recs].tolist() for k in ("exts", "image_width", "image_height", "audio_seconds", "text_chars")]
    for i, pos, size, sample, (code, width, height, seconds, chars) in zip(
            recs.tolist(), offsets, sizes.tolist(), samples, zip(*columns)):
        yield {
            "key": catalog.keys[i], "split": split, "shard": shard, "offset": pos, "size": size,
            "modalities": sorted(filter(None, map(modality_of, exts[code]))),
            "image_width": None if width < 0 else width, "image_height": None if height < 0 else height,
            "audio_seconds": None if seconds < 0 else seconds, "text_chars": None if chars < 0 else chars,
            "source_id": sample["id"], "labels": sample["labels"], "meta": sample.get("meta") or {},
        }


def train_texts(catalog: Catalog, plans, budget: int, pool) -> Iterator[str]:
    """The train split's texts, in shard order, up to ``budget`` UTF-8 bytes: what the tokenizer learns from.

    Read a shard at a time as the tokenizer asks for them (from the spill files, or what a Ray write task
    handed back): none is held."""
    a, paths = catalog.arrays, catalog.spills.values
    for split, name, recs in plans:
        if split != "train":
            continue
        recs = recs[a["text_at"][recs] >= 0]
        where = list(zip([paths[c] for c in a["spill"][recs].tolist()], a["offset"][recs].tolist(),
                         a["text_at"][recs].tolist(), a["text_bytes"][recs].tolist()))
        for data in pool.texts(name, where):
            if budget <= 0:
                return
            text = data[:budget].decode("utf-8", "ignore")  # cut at a character
            budget -= len(text.encode("utf-8")) or 1
            yield text


def media_settings(config: BuildConfig) -> MediaSettings:
    return MediaSettings(config.image_format, config.image_quality, config.max_side, config.max_pixels,
                         config.sample_rate, config.channels, config.audio_format, config.max_audio_seconds)


def settle_rate(catalog: Catalog, settings: MediaSettings, pool, folder: str, rejects: RejectLog) -> MediaSettings:
    """The dataset's one audio rate, when the config leaves it open: the files' own rate when they all
    share one, else ``DEFAULT_RATE``, to which the records of other rates are then re-encoded."""
    if settings.sample_rate is not None:
        return settings
    rates = catalog.arrays["audio_rate"]
    found = sorted(set(np.unique(rates[rates > 0]).tolist()))
    rate = found[0] if len(found) == 1 else DEFAULT_RATE
    settings = dataclasses.replace(settings, sample_rate=rate)
    redo = np.flatnonzero((rates > 0) & (rates != rate))
    if len(redo):
        log.info("audio inputs have several sample rates %s; resampling all to %d Hz", found, rate)
    for i in redo.tolist():
        a = catalog.arrays
        block = pool.read(catalog.spills.values[a["spill"][i]], int(a["offset"][i]), 0, int(a["size"][i]))
        members = {name.partition(".")[2]: data for name, data in parse_members(block)}
        ext = next(e for e in members if e in ("flac", "wav"))
        try:
            new_ext, members[new_ext], seconds, _ = encode_audio(members.pop(ext), ext, settings)
        except MediaReject as e:
            rejects.add(Reject(catalog.source_id(i), (), e.reason, str(e)))
            a["size"][i] = 0  # left out of the dataset
            continue
        block = sample_block(catalog.keys[i], members)
        text = members.get("txt")
        at = -1 if text is None else len(block) - len(text) - (-len(text) % BLOCK)
        spill, offset = pool.store(block, folder)
        catalog.replace(i, spill, offset, len(block), seconds, rate, at)
    return settings
