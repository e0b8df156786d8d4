"""`mmdata verify`: prove a dataset intact: shard hashes and counts, index rows, tar structure, decoding.

Works from dataset.json, index.parquet and the raw shard bytes (local or fsspec URL); nothing is trusted
that can be checked. Each shard is checked on its own (in a process pool with ``workers`` > 1).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .card import LABEL_PREFIX
from .cli import add_storage_options
from .format import AUDIO_EXTS, BLOCK, IMAGE_EXTS, KEY_RE, MEMBER_ORDER, META_EXT, TEXT_EXT

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

    url: str
    file: str
    samples: int
    bytes: int
    sha256: str
    rows: tuple[dict[str, Any], ...]  # key, offset, size, image_width, image_height, label:<task>...
    decode: bool
    storage_options: dict[str, Any] | None = None  # fsspec options for a URL


def verify_dataset(path: str, decode: bool = False, workers: int = 1, progress: bool = True,
                   storage_options: dict[str, Any] | None = None) -> list[Failure]:
    """Check every shard against the card and index; return the failures (empty when all holds)."""
    from tqdm.auto import tqdm

    from .dataset import open_dataset

    if workers < 1:
        from .errors import ConfigError

        raise ConfigError(f"workers must be positive, got {workers}")
    ds = open_dataset(path, storage_options=storage_options)
    index = ds.index().to_pylist()
    failures: list[Failure] = []
    card_files = {s.file: split for split, info in ds.card.splits.items() for s in info.shards}
    rows_of: dict[str, list[dict[str, Any]]] = {f: [] for f in card_files}
    for r in index:
        if r["shard"] not in card_files:
            failures.append(Failure(r["shard"], r["key"], "index row names a shard that dataset.json does not list"))
        elif card_files[r["shard"]] != r["split"]:
            failures.append(Failure(r["shard"], r["key"], f"index row says split {r['split']!r} but the card "
                                                          f"lists the shard under {card_files[r['shard']]!r}"))
        else:
            rows_of[r["shard"]].append(r)
    for key, n in Counter(r["key"] for r in index).items():
        if n > 1:
            failures.append(Failure("index.parquet", key, f"key appears in {n} index rows; keys must be unique"))
    for stray in _tar_files(ds.root, storage_options) - set(card_files):
        failures.append(Failure(stray, None, "tar file in the dataset folder is not listed in dataset.json; "
                                             "remove it or rebuild"))
    jobs = [ShardJob(ds.url(s.file), s.file, s.samples, s.bytes, s.sha256, tuple(rows_of[s.file]), decode,
                     storage_options)
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


def _tar_files(root: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """Names of the ``*.tar`` files directly under ``root`` (local or fsspec)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(f"{path.rstrip('/')}/*.tar")}
    except (FileNotFoundError, NotImplementedError):
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
    """All checks of one shard; return (failures, keys of the samples found in it)."""
    fail: list[Failure] = []

    def bad(key: str | None, what: str) -> None:
        fail.append(Failure(job.file, key, what))

    try:
        data = _read(job.url, job.storage_options)
    except FileNotFoundError:
        bad(None, f"shard file is missing ({job.url}); the card lists it with {job.samples} samples")
        return fail, [r["key"] for r in job.rows]  # its keys are still claimed, so no false duplicates
    if len(data) != job.bytes:
        what = "truncated" if len(data) < job.bytes else "longer than the card says"
        bad(None, f"{what}: {len(data)} bytes, the card says {job.bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != job.sha256:
        bad(None, f"sha256 {digest[:16]}... does not match the card's {job.sha256[:16]}...")
    members, error = walk_tar(data)
    if error:
        bad(None, error)
    samples = _group(members, bad)
    if len(samples) != job.samples and not error:
        bad(None, f"holds {len(samples)} samples, the card says {job.samples}")
    if len(job.rows) != job.samples:
        bad(None, f"index.parquet has {len(job.rows)} rows for this shard, the card says {job.samples}")
    at = {s["offset"]: s for s in samples}
    indexed = set()
    for r in job.rows:
        s = at.get(r["offset"])
        if s is None:
            holder = next((x for x in samples if x["key"] == r["key"]), None)
            where = f"; the shard holds it at byte {holder['offset']}" if holder else "; the shard has no such key"
            bad(r["key"], f"index row points at byte {r['offset']} where no sample starts{where}")
            continue
        if s["key"] != r["key"]:
            holder = next((x for x in samples if x["key"] == r["key"]), None)
            where = f"it sits at byte {holder['offset']}" if holder else f"the shard has no key {r['key']!r}"
            bad(r["key"], f"index row points at byte {r['offset']} but the sample there is {s['key']!r}; {where}")
            continue
        indexed.add(s["offset"])
        if s["size"] != r["size"]:
            bad(r["key"], f"sample spans {s['size']} bytes, the index says {r['size']}")
        if job.decode:
            for what in decode_sample(s["members"], r):
                bad(r["key"], what)
    row_keys = {r["key"] for r in job.rows}
    for s in samples:
        if s["offset"] not in indexed and s["key"] not in row_keys:
            bad(s["key"], f"sample at byte {s['offset']} is not in index.parquet")
    return fail, [s["key"] for s in samples]


def _read(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    import fsspec

    with fsspec.open(url, "rb", **(storage_options or {})) as f:  # plain paths and file:// too
        return f.read()


def walk_tar(data: bytes) -> tuple[list[tuple[int, str, bytes]], str | None]:
    """Regular members as (header offset, name, data) and the first structural error (or None)."""
    out: list[tuple[int, str, bytes]] = []
    view, pos, n = memoryview(data), 0, len(data)
    while True:
        if pos + BLOCK > n:
            return out, f"truncated: ends at byte {n} inside or before a tar header (no end-of-archive blocks)"
        header = bytes(view[pos:pos + BLOCK])
        if header == b"\0" * BLOCK:
            return out, None
        try:
            name, size, typeflag = _header(header)
        except ValueError as e:
            return out, f"corrupt tar header at byte {pos}: {e}"
        start = pos + BLOCK
        if start + size > n:
            return out, f"truncated: member {name!r} at byte {pos} needs {size} bytes, {n - start} remain"
        if typeflag in (b"0", b"\0"):
            out.append((pos, name, bytes(view[start:start + size])))
        pos = start + (size + BLOCK - 1) // BLOCK * BLOCK


def _header(h: bytes) -> tuple[str, int, bytes]:
    stored = h[148:156].rstrip(b"\0 ").strip()
    if not stored or int(stored, 8) != sum(h[:148]) + 8 * 32 + sum(h[156:]):
        raise ValueError("checksum mismatch")
    name = h[0:100].split(b"\0", 1)[0].decode("utf-8")
    prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8")
    size_field = h[124:136].rstrip(b"\0 ").strip()
    return (f"{prefix}/{name}" if prefix else name), int(size_field or b"0", 8), h[156:157]


def _group(members: list[tuple[int, str, bytes]], bad) -> list[dict[str, Any]]:
    """Group adjacent members by key; report keys split apart, bad keys and unknown extensions."""
    samples: list[dict[str, Any]] = []
    for pos, name, data in members:
        base = name.rsplit("/", 1)[-1]
        key, _, ext = base.partition(".")
        if "/" in name:
            bad(key, f"member {name!r} is inside a folder; members must sit at the archive root")
        if not KEY_RE.match(key):
            bad(key, f"member {name!r}: key {key!r} does not match {KEY_RE.pattern}")
        if "." in ext:
            bad(key, f"member {name!r}: the key has a dot (readers split at the first dot, seeing key {key!r} "
                     f"and extension {ext!r})")
        elif ext not in MEMBER_ORDER:
            bad(key, f"member {name!r}: unknown extension {ext!r}; expected one of {list(MEMBER_ORDER)}")
        if samples and samples[-1]["key"] == key:
            s = samples[-1]
            if ext in s["members"]:
                bad(key, f"member {name!r} appears twice in the sample")
            s["members"][ext] = data
            s["end"] = pos + BLOCK + (len(data) + BLOCK - 1) // BLOCK * BLOCK
        else:
            samples.append({"key": key, "offset": pos, "members": {ext: data},
                            "end": pos + BLOCK + (len(data) + BLOCK - 1) // BLOCK * BLOCK})
    first: dict[str, int] = {}
    for s in samples:
        s["size"] = s["end"] - s["offset"]
        if s["key"] in first:
            bad(s["key"], f"members are not adjacent: the key reappears at byte {s['offset']} after other keys "
                          f"(first at byte {first[s['key']]})")
        first.setdefault(s["key"], s["offset"])
        if META_EXT not in s["members"]:
            bad(s["key"], f"sample at byte {s['offset']} has no {s['key']}.{META_EXT} (id and labels)")
    return samples


def decode_sample(members: dict[str, bytes], row: dict[str, Any]) -> list[str]:
    """Decode every member of a sample; return what failed or disagrees with its index row."""
    problems: list[str] = []
    for ext, data in members.items():
        try:
            if ext in IMAGE_EXTS:
                from PIL import Image

                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    size = im.size
                if row.get("image_width") is not None and size != (row["image_width"], row["image_height"]):
                    problems.append(f"{ext} is {size[0]}x{size[1]}, the index says "
                                    f"{row['image_width']}x{row['image_height']}")
            elif ext in AUDIO_EXTS:
                import soundfile as sf

                wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
                secs = row.get("audio_seconds")
                if secs is not None and abs(len(wav) / sr - secs) > 1.0 / sr + 1e-6:
                    problems.append(f"{ext} lasts {len(wav) / sr:.4f} s, the index says {secs:.4f} s")
            elif ext == TEXT_EXT:
                text = data.decode("utf-8")
                if row.get("text_chars") is not None and len(text) != row["text_chars"]:
                    problems.append(f"{ext} has {len(text)} characters, the index says {row['text_chars']}")
            elif ext == META_EXT:
                meta = json.loads(data.decode("utf-8"))
                labels = meta.get("labels") or {}
                for col in row:
                    if col.startswith(LABEL_PREFIX) and labels.get(col[len(LABEL_PREFIX):]) != row[col]:
                        task = col[len(LABEL_PREFIX):]
                        problems.append(f"label {task!r} is {labels.get(task)!r} in {ext}, the index says {row[col]!r}")
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
                         indent=2, ensure_ascii=False))
    elif not failures:
        if not args.quiet:
            print(f"ok: {args.dataset} holds what its card and index say" + (" (every member decodes)"
                                                                              if args.decode else ""))
    else:
        from .info import table

        print(f"{len(failures)} failure(s) in {args.dataset}:")
        print("\n".join(table(["shard", "key", "what"], [[f.shard, f.key or "-", f.what] for f in failures])))
    return 1 if failures else 0
