"""The output folder: one build at a time (a lock), and only the build's own files ever replaced or deleted.

A build's own files are those its card lists (shards, index, rejects, tokenizer, README) or its journal
lists (shards finished by an interrupted run). Anything else in OUT, a user's ``backup-000001.tar``
included, is left alone; a file that would be overwritten without being ours stops the build.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from ..card import Card, ShardInfo
from ..errors import ConfigError, MmdataError, OutputLockedError
from ..format import CARD_NAME, INDEX_NAME, PARTIAL_SUFFIX, README_NAME, REJECTS_NAME, TOKENIZER_DIR
from .assemble import file_sha256

log = logging.getLogger(__name__)

JOURNAL = ".mmdata-build.jsonl"  # header line with the fingerprint, then one line per finished shard
LOCK = ".mmdata-build.lock"  # flock'ed while a build writes OUT; holds the owner's pid and host
DATASET_FILES = (CARD_NAME, INDEX_NAME, REJECTS_NAME, TOKENIZER_DIR, README_NAME)  # written last, by _finish


class OutLock:
    """An exclusive ``flock`` on ``OUT/.mmdata-build.lock`` for the length of a build.

    The kernel drops the lock when its process dies, so a lock file left by a killed build is simply
    taken over (with a notice). A second build fails at once, naming the first.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = None

    def __enter__(self) -> OutLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise OutputLockedError(f"another build ({holder}) is writing {str(self.path.parent)!r}; wait "
                                        f"for it to finish, or stop it and rerun") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else a finishing build unlinked the file we locked: lock the one there now
                break
            os.close(fd)
        previous = _holder(fd)
        if previous != "unknown":
            log.warning("taking over the lock of an earlier build (%s) that is no longer running", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.unlink(self.path)  # while still locked: a waiting build then locks a fresh file
            os.close(self.fd)
            self.fd = None


def _holder(fd: int) -> str:
    try:
        d = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {d['pid']} on {d['host']}"
    except (ValueError, TypeError, KeyError):
        return "unknown"


def prepare_out(out: Path, fingerprint: str, splits: list[str], *, overwrite: bool,
                resume: bool) -> list[dict[str, Any]]:
    """Make ``out`` ready; return the journal entries of shards that a resumed build keeps."""
    out.mkdir(parents=True, exist_ok=True)
    card, card_error = _old_card(out)
    journal = _read_journal(out)
    ours = _own_files(out, card, journal)
    entries: list[dict[str, Any]] = []
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and p.name != LOCK)
    if resume and journal:
        if journal[0].get("fingerprint") != fingerprint and not overwrite:
            raise ConfigError(f"the partial build in {str(out)!r} came from other input or config; rerun "
                              "with the same input and config, or with --overwrite to start over")
        if journal[0].get("fingerprint") == fingerprint:
            entries = _valid_entries(out, journal[1:])
    elif resume and card_error is None and card is not None:
        if card.fingerprint != fingerprint and not overwrite:
            raise ConfigError(f"{str(out)!r} holds a finished dataset built from other input or config; "
                              "--resume only continues an interrupted build: pass --overwrite to replace it")
    elif (ours or others) and not (overwrite or resume):
        raise ConfigError(f"output folder {str(out)!r} is not empty; pass --overwrite to replace the dataset "
                          "there, or --resume to continue an interrupted build")
    if card_error is not None:
        if not overwrite:
            raise ConfigError(f"{str(out)!r} holds a {CARD_NAME} that cannot be read ({card_error}); pass "
                              "--overwrite to replace it")
        ours |= {n for n in DATASET_FILES if os.path.lexists(out / n)}  # the broken dataset's files
        others = [n for n in others if n not in ours]
    clash = [n for n in others if n in DATASET_FILES or n == JOURNAL or _is_our_shard_name(n, splits)]
    if clash:
        raise ConfigError(f"{str(out)!r} holds {clash[:5]}, which no mmdata build there wrote; the build would "
                          "overwrite them: move them away or choose another output folder")
    keep = {e["file"] for e in entries}
    for name in sorted(ours - keep):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)
    with open(out / JOURNAL, "w", encoding="utf-8") as f:
        f.write(json.dumps({"fingerprint": fingerprint, "splits": splits}) + "\n")
        for e in entries:
            f.write(json.dumps(e) + "\n")
    return entries


def _old_card(out: Path) -> tuple[Card | None, str | None]:
    path = out / CARD_NAME
    if not os.path.lexists(path):
        return None, None
    try:
        if not path.is_file() or path.stat().st_size > 64 * 2**20:
            return None, "not a regular file of a sane size"
        return Card.from_json(path.read_text(encoding="utf-8")), None
    except (MmdataError, OSError, UnicodeDecodeError) as e:
        return None, str(e)


def _read_journal(out: Path) -> list[dict[str, Any]]:
    path = out / JOURNAL
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            break  # a line cut by a crash: what follows is not trusted
        if isinstance(d, dict):
            lines.append(d)
    return lines if lines and "fingerprint" in lines[0] else []


def _own_files(out: Path, card: Card | None, journal: list[dict[str, Any]]) -> set[str]:
    """Names in ``out`` that an earlier build wrote: listed by its card or its journal."""
    names: set[str] = set()
    if card is not None:
        names |= {s.file for split in card.splits.values() for s in split.shards}
        names |= set(DATASET_FILES)
    if journal:
        names |= {e["file"] for e in journal[1:] if isinstance(e.get("file"), str)}
        names |= set(DATASET_FILES) | {JOURNAL}
        splits = journal[0].get("splits") or []
        # the interrupted build's shards of its own splits, renamed before their journal line could be
        # written, or still being written; and the files _finish was replacing
        names |= {p.name for p in out.iterdir()
                  if _is_our_shard_name(p.name.removesuffix(PARTIAL_SUFFIX), splits)
                  or (p.name.endswith(PARTIAL_SUFFIX) and p.name[: -len(PARTIAL_SUFFIX)] in DATASET_FILES)}
    names.discard(LOCK)
    return {n for n in names if "/" not in n and n not in ("", ".", "..") and os.path.lexists(out / n)}


def _is_our_shard_name(name: str, splits: list[str]) -> bool:
    return any(re.fullmatch(rf"{re.escape(s)}-\d{{6}}\.tar", name) for s in splits)


def _valid_entries(out: Path, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Journal entries whose shard is present with the recorded hash (the others are written again)."""
    good = []
    for e in lines:
        p = out / str(e.get("file"))
        if isinstance(e.get("sha256"), str) and p.is_file() and file_sha256(p) == e["sha256"]:
            good.append(e)
    return good


def journal_shard(jf, split: str, info: ShardInfo) -> None:
    entry = {"split": split, "file": info.file, "samples": info.samples, "bytes": info.bytes, "sha256": info.sha256}
    jf.write(json.dumps(entry) + "\n")
    jf.flush()  # no fsync: a resumed build checks each listed shard's hash, so a lost line only costs a redo


def shard_of_entry(e: dict[str, Any]) -> ShardInfo:
    return ShardInfo(e["file"], e["samples"], e["bytes"], e["sha256"])
