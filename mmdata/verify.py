"""`mmdata verify`: prove a dataset intact: shard hashes and counts, index rows, tar structure, decoding.

Works from dataset.json, index.parquet and the raw shard bytes (local or fsspec URL); nothing is trusted
that can be checked. Each shard is checked on its own (in a process pool with ``workers`` > 1).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from .card import LABEL_PREFIX, count_labels
from .cli import add_storage_options
from .dataset import Dataset, int_column, open_dataset, range_problems
from .errors import ConfigError, MmdataError, SchemaError
from .format import (
    AUDIO_EXTS,
    BLOCK,
    CARD_NAME,
    IMAGE_EXTS,
    INDEX_NAME,
    KEY_RE,
    MEMBER_ORDER,
    META_EXT,
    TEXT_EXT,
    TarError,
    TarStream,
    tar_members,
)
from .storage import Storage
from .tasks import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """One thing that does not hold: where (shard file, sample key or None) and what."""

    shard: str
    key: str | None
    what: str

    def __str__(self) -> str:
        return f"{self.shard}  {self.key or '-'}  {self.what}"


@dataclass(frozen=True)
class ShardJob:
    """What one shard must hold: the card's entry and the index rows naming it."""

    storage: Storage  # the dataset's folder: a local shard must be a regular file inside it
    file: str
    samples: int
    bytes: int
    sha256: str
    rows: tuple[dict[str, Any], ...]  # key, offset, size, image_width, image_height, label:<task>...
    decode: bool
    tasks: tuple[Task, ...] = ()  # the card's: each decoded label must be a stored label of its task

    @property
    def url(self) -> str:
        return f"{self.storage.url}/{self.file}"


def verify_dataset(path: str, decode: bool = False, workers: int = 1, progress: bool = True,
                   storage_options: dict[str, Any] | None = None) -> list[Failure]:
    """Check every shard against the card and index; return the failures (empty when all holds)."""
    from tqdm.auto import tqdm

    if workers < 1:
        raise ConfigError(f"workers must be positive, got {workers}")
    ds = open_dataset(path, storage_options=storage_options)
    for column in ("offset", "size"):
        int_column(ds.index(), column)  # SchemaError when the column is not integers at all
    index = ds.index().to_pylist()
    failures: list[Failure] = []
    card_files = {s.file: split for split, info in ds.card.splits.items() for s in info.shards}
    rows_of: dict[str, list[dict[str, Any]]] = {f: [] for f in card_files}
    for r in index:
        if r["shard"] not in card_files:
            failures.append(Failure(str(r["shard"]), r["key"], "index row names a shard that dataset.json does not "
                                                               "list"))
        elif card_files[r["shard"]] != r["split"]:
            failures.append(Failure(r["shard"], r["key"], f"index row says split {r['split']!r} but the card "
                                                          f"lists the shard under {card_files[r['shard']]!r}"))
        else:
            rows_of[r["shard"]].append(r)
    for key, n in Counter(r["key"] for r in index).items():
        if n > 1:
            failures.append(Failure("index.parquet", key, f"key appears in {n} index rows; keys must be unique"))
    failures += _label_count_failures(ds)
    for stray in _tar_files(ds.storage) - set(card_files):
        failures.append(Failure(stray, None, "tar file in the dataset folder is not listed in dataset.json; "
                                             "remove it or rebuild"))
    jobs = [ShardJob(ds.storage, s.file, s.samples, s.bytes, s.sha256, tuple(rows_of[s.file]), decode,
                     tuple(ds.tasks))
            for info in ds.card.splits.values() for s in info.shards]
    keys_seen: dict[str, str] = {}
    bar = tqdm(total=len(jobs), unit="shard", desc="verify", disable=not progress)
    try:
        for job, (found, keys) in zip(jobs, _map(check_shard, jobs, workers)):
            failures += found
            for k in keys:
                if k in keys_seen:
                    failures.append(Failure(job.file, k, f"key also used in {keys_seen[k]}; keys must be unique "
                                                         "across the dataset"))
                keys_seen.setdefault(k, job.file)
            bar.update(1)
            bar.set_postfix(failures=len(failures), refresh=False)
    finally:
        bar.close()
    return failures


def _label_count_failures(ds: Dataset) -> list[Failure]:
    """The card's label counts that the index does not bear out (`info` and `stats` show the card's)."""
    out = []
    for split, info in ds.card.splits.items():
        for task in ds.tasks:
            stored = info.label_counts.get(task.name)
            if stored is None:  # a card without counts: readers count the index
                continue
            try:
                counted = count_labels(task, ds.label_values(split, task.name))
            except SchemaError as e:
                out.append(Failure(INDEX_NAME, None, f"split {split!r}: {e}"))
                continue
            if stored != counted:
                out.append(Failure(CARD_NAME, None, f"label counts of task {task.name!r} in split {split!r} are "
                                                    f"{stored}, the index counts {counted}; rebuild the dataset"))
    return out


def _tar_files(storage: Storage) -> set[str]:
    """Names of the ``*.tar`` files directly under the dataset's folder (local or fsspec)."""
    try:
        return {n for n in storage.names() if n.endswith(".tar")}
    except NotImplementedError:  # a store that cannot list: nothing to compare
        return set()


def _map(fn, jobs: list, workers: int):
    if workers == 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may hold threads (fsspec, tqdm); a fork could inherit a held lock
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
        yield from pool.map(fn, jobs)


def check_shard(job: ShardJob) -> tuple[list[Failure], list[str]]:
    """All checks of one shard, read once front to back; return (failures, keys of the samples found in it).

    Memory stays bounded: the shard is hashed in chunks and its tar headers parsed as they stream by
    (member bytes are kept only to decode one sample at a time), and never more than the card's byte
    count is read. After a corrupt header the walk resumes at the next sample the index knows of, so
    one bad header is one failure.
    """
    fail: list[Failure] = []

    def bad(key: str | None, what: str) -> None:
        fail.append(Failure(job.file, key, what))

    claimed = [r["key"] for r in job.rows]  # an unreadable shard still claims its keys: no false duplicates
    problems = _row_problems(job)
    rows = [r for i, r in enumerate(job.rows) if i not in problems]
    try:
        f, size = job.storage.open_file(job.file)
    except FileNotFoundError:
        bad(None, f"shard file is missing ({job.url}); the card lists it with {job.samples} samples")
        return fail, claimed
    except (MmdataError, OSError) as e:
        bad(None, " ".join(str(e).split()))
        return fail, claimed
    walked: list[Failure] = []
    with f:
        if size is not None and size != job.bytes:
            what = "truncated" if size < job.bytes else "longer than the card says"
            bad(None, f"{what}: {size} bytes, the card says {job.bytes}")
        stream = TarStream(f, limit=job.bytes if size is None else min(size, job.bytes), sha256=True)
        samples, errors = _walk(stream, rows, job.tasks if job.decode else None,
                                lambda key, what: walked.append(Failure(job.file, key, what)))
        digest = stream.digest()
    if digest != job.sha256:
        bad(None, f"sha256 {digest[:16]}... does not match the card's {job.sha256[:16]}...")
    fail += walked
    if len(samples) != job.samples and not errors:
        bad(None, f"holds {len(samples)} samples, the card says {job.samples}")
    if len(job.rows) != job.samples:
        bad(None, f"index.parquet has {len(job.rows)} rows for this shard, the card says {job.samples}")
    for i, what in problems.items():
        bad(job.rows[i]["key"], f"index row: {what}")
    at = {s["offset"]: s for s in samples}
    by_key: dict[str, dict[str, Any]] = {}
    for s in samples:
        by_key.setdefault(s["key"], s)
    indexed = set()
    for r in rows:
        if any(_covers(r, e) for e in errors):
            continue  # the structural failure already names this sample
        s = at.get(r["offset"])
        if s is None:
            holder = by_key.get(r["key"])
            where = f"; the shard holds it at byte {holder['offset']}" if holder else "; the shard has no such key"
            bad(r["key"], f"index row points at byte {r['offset']} where no sample starts{where}")
            continue
        if s["key"] != r["key"]:
            holder = by_key.get(r["key"])
            where = f"it sits at byte {holder['offset']}" if holder else f"the shard has no key {r['key']!r}"
            bad(r["key"], f"index row points at byte {r['offset']} but the sample there is {s['key']!r}; {where}")
            continue
        indexed.add(s["offset"])
        if s["size"] != r["size"]:
            bad(r["key"], f"sample spans {s['size']} bytes, the index says {r['size']}")
        for what in s.get("decoded", ()):
            bad(r["key"], what)
    row_keys = {r["key"] for r in job.rows}
    for s in samples:
        if s["offset"] not in indexed and s["key"] not in row_keys:
            bad(s["key"], f"sample at byte {s['offset']} is not in index.parquet")
    return fail, [s["key"] for s in samples]


def _row_problems(job: ShardJob) -> dict[int, str]:
    """{row number: what is wrong} for the job's index rows whose byte range cannot be a sample."""
    def value(v) -> int:
        return 0 if v is None else min(int(v), 2**62)  # a uint64 past int64 is out of any shard anyway

    n = len(job.rows)
    offset = np.array([value(r["offset"]) for r in job.rows], dtype=np.int64).reshape(n)
    size = np.array([value(r["size"]) for r in job.rows], dtype=np.int64).reshape(n)
    null = np.array([(r["offset"] is None, r["size"] is None) for r in job.rows], dtype=bool).reshape(n, 2)
    return range_problems(offset, size, null, np.full(n, job.bytes, dtype=np.int64))


def _covers(row: dict[str, Any], e: TarError) -> bool:
    """True when structural error ``e`` already accounts for index row ``row``."""
    return row["offset"] <= e.pos < row["offset"] + row["size"] or (e.final and row["offset"] > e.pos)


def _walk(stream: TarStream, rows: list[dict[str, Any]], tasks: tuple[Task, ...] | None,
          bad) -> tuple[list[dict[str, Any]], list[TarError]]:
    """Group the shard's members into samples as they stream by; report structural errors and resync.

    Returns (samples: key, offset, size and with ``tasks`` (decode) what failed to decode; the structural
    errors). ``rows``: the shard's index rows whose byte ranges fit it; a corrupt header is reported once,
    under the key of the row it falls in, and the walk resumes at the next row's offset.
    """
    row_at = {r["offset"]: r for r in rows}
    starts = sorted(row_at)
    samples: list[dict[str, Any]] = []
    first: dict[str, int] = {}
    errors: list[TarError] = []
    current: dict[str, Any] | None = None

    def finish(s: dict[str, Any]) -> None:
        s["size"] = s["end"] - s["offset"]
        if s["key"] in first:
            bad(s["key"], f"members are not adjacent: the key reappears at byte {s['offset']} after other keys "
                          f"(first at byte {first[s['key']]})")
        first.setdefault(s["key"], s["offset"])
        if META_EXT not in s["exts"]:
            bad(s["key"], f"sample at byte {s['offset']} has no {s['key']}.{META_EXT} (id and labels)")
        members = s.pop("members")
        row = row_at.get(s["offset"])
        if tasks is not None and row is not None and row["key"] == s["key"]:
            s["decoded"] = decode_sample(members, row, tasks)
        samples.append(s)

    def resync(e: TarError) -> int | None:
        """Report ``e`` once and return the next indexed sample's offset to read on from (None: stop)."""
        nonlocal current
        i = bisect.bisect_right(starts, e.pos)
        nxt = starts[i] if i < len(starts) else None
        if current is not None and e.pos in row_at:
            finish(current)  # the error starts the next sample: the one before is whole
        current = None  # else the sample being read is damaged: the error stands for it
        if e.final or nxt is None or nxt >= stream.limit:
            e.final = True
        row = row_at[starts[i - 1]] if i else None
        key = row["key"] if row is not None and e.pos < row["offset"] + row["size"] else None
        bad(key, e.detail + ("" if e.final else f"; read on from the next indexed sample at byte {nxt}"))
        errors.append(e)
        return None if e.final else nxt

    for pos, name, size in tar_members(stream, on_error=resync):
        key, _, ext = name.rsplit("/", 1)[-1].partition(".")
        if current is not None and current["key"] == key:
            if ext in current["exts"]:
                bad(key, f"member {name!r} appears twice in the sample")
        else:
            if current is not None:
                finish(current)
            current = {"key": key, "offset": pos, "exts": [], "members": {}}
        _check_member(name, key, ext, bad)
        current["exts"].append(ext)
        if tasks is not None and current["offset"] in row_at:  # bytes kept for this sample only
            current["members"][ext] = stream.read(size)
        current["end"] = pos + BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    if current is not None:
        finish(current)
    return samples, errors


def _check_member(name: str, key: str, ext: str, bad) -> None:
    """Report a member name that is not ``KEY.ext`` at the archive root with a known extension."""
    if "/" in name:
        bad(key, f"member {name!r} is inside a folder; members must sit at the archive root")
    if not KEY_RE.match(key):
        bad(key, f"member {name!r}: key {key!r} does not match {KEY_RE.pattern}")
    if "." in ext:
        bad(key, f"member {name!r}: the key has a dot (readers split at the first dot, seeing key {key!r} "
                 f"and extension {ext!r})")
    elif ext not in MEMBER_ORDER:
        bad(key, f"member {name!r}: unknown extension {ext!r}; expected one of {list(MEMBER_ORDER)}")


def decode_sample(members: dict[str, bytes], row: dict[str, Any], tasks: tuple[Task, ...] = ()) -> list[str]:
    """Decode every member of a sample as the loader does; return what failed or disagrees with its index row."""
    # torch is imported only to decode
    from .decode import decode_labels, decode_meta, decode_rgb, decode_text, read_audio

    problems: list[str] = []
    for ext, data in members.items():
        try:
            if ext in IMAGE_EXTS:
                h, w = decode_rgb(data).shape[-2:]  # (3, H, W)
                if row.get("image_width") is not None and (w, h) != (row["image_width"], row["image_height"]):
                    problems.append(f"{ext} is {w}x{h}, the index says {row['image_width']}x{row['image_height']}")
            elif ext in AUDIO_EXTS:
                wav, sr = read_audio(data)  # (T,)
                secs = row.get("audio_seconds")
                if secs is not None and abs(len(wav) / sr - secs) > 1.0 / sr + 1e-6:
                    problems.append(f"{ext} lasts {len(wav) / sr:.4f} s, the index says {secs:.4f} s")
            elif ext == TEXT_EXT:
                text = decode_text(data)
                if row.get("text_chars") is not None and len(text) != row["text_chars"]:
                    problems.append(f"{ext} has {len(text)} characters, the index says {row['text_chars']}")
            elif ext == META_EXT:
                meta = decode_meta(data)
                labels = meta.get("labels") or {}
                for col in row:
                    task = col[len(LABEL_PREFIX):]
                    if col.startswith(LABEL_PREFIX) and labels.get(task) != row[col]:
                        problems.append(f"label {task!r} is {labels.get(task)!r} in {ext}, the index says {row[col]!r}")
                decode_labels(tasks, meta)  # ValueError for a label that is not a stored label of its task
        except Exception as e:  # any decoder error is a finding, not a crash
            problems.append(f"{ext} does not decode: {type(e).__name__}: {e}")
    return problems


# ---- CLI ---------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")
    p.add_argument("--decode", action="store_true", help="also decode every member and compare with the index")
    p.add_argument("--workers", type=int, default=1, help="shards checked in parallel processes (default 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON: ok, and every failure with "
                   "shard, key and reason")
    add_storage_options(p)


def run(args) -> int:
    failures = verify_dataset(args.dataset, decode=args.decode, workers=args.workers,
                              progress=args.progress and not args.quiet, storage_options=args.storage_options)
    if args.json:
        print(json.dumps({"dataset": args.dataset, "ok": not failures, "decoded": args.decode,
                          "failures": [{"shard": f.shard, "key": f.key, "reason": f.what} for f in failures]},
                         indent=2))  # ASCII: control and bidi characters of hostile ids escaped
    elif not failures:
        if not args.quiet:
            print(f"ok: {args.dataset} holds what its card and index say" + (" (every member decodes)"
                                                                              if args.decode else ""))
    else:
        from .info import table

        print(f"{len(failures)} failure(s) in {args.dataset}:")
        print("\n".join(table(["shard", "key", "what"], [[f.shard, f.key or "-", f.what] for f in failures])))
    return 1 if failures else 0
