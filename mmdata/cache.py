"""ShardCache: local copies of remote shards, size-limited (least recently used out), safe across processes.

Layout under ``root``::

    entries/NAME          a complete copy (NAME = hash of the URL + the shard's file name)
    entries/NAME.PID.partial  a download in progress; never read, removed when found stale
    locks/NAME.lock       flock'd while NAME is downloaded (one download per shard across processes)
    locks/.evict.lock     flock'd while evicting

A copy becomes visible only by ``os.replace`` of a complete, size-checked download, so a crash leaves at
most a ``.partial`` file, which lookups ignore and the next ``ShardCache`` (or the next download of that
shard) deletes. ``open`` hands out an open file descriptor: a copy evicted by another process while a
reader still holds it stays readable until closed (POSIX unlink semantics). Recency is the file's mtime,
touched on every hit. The limit holds after each download, except that the copy just fetched is never
evicted (a shard larger than the limit is kept until the next download).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError, CorruptShardError
from .format import PARTIAL_SUFFIX

log = logging.getLogger(__name__)


class ShardCache:
    """A shared local cache of whole shards under ``root``, at most ``max_bytes`` of complete copies."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        if max_bytes < 1:
            raise ConfigError(f"cache_bytes must be positive, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.entries = self.root / "entries"
        self.locks = self.root / "locks"
        self.entries.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(parents=True, exist_ok=True)
        self.clean_stale()

    def __repr__(self) -> str:
        return f"ShardCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    def name(self, url: str) -> str:
        """The entry name of ``url``: unique per URL, readable by its file name."""
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
        return f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}"

    def open(self, url: str, fetch: Callable[[str], None], size: int | None = None) -> int:
        """An O_RDONLY descriptor of ``url``'s copy; ``fetch(path)`` downloads it to ``path`` when absent.

        ``size``: the expected byte count (from the card); a download of another size is a CorruptShardError.
        """
        final = self.entries / self.name(url)
        fd = self._open_hit(final)
        if fd is not None:
            return fd
        with _flock(self.locks / (final.name + ".lock")):
            fd = self._open_hit(final)  # another process may have fetched it while we waited
            if fd is not None:
                return fd
            tmp = final.with_name(f"{final.name}.{os.getpid()}{PARTIAL_SUFFIX}")
            try:
                fetch(str(tmp))
                got = os.path.getsize(tmp)
                if size is not None and got != size:
                    raise CorruptShardError(f"shard {url!r} has {got} bytes but the card says {size}; the "
                                            "dataset changed after its card was written, rebuild it")
                os.replace(tmp, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
            fd = os.open(final, os.O_RDONLY)
        log.debug("cached %s as %s", url, final.name)
        self.evict(keep=final.name)
        return fd

    def _open_hit(self, final: Path) -> int | None:
        try:
            fd = os.open(final, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(final)  # most recently used
        return fd

    def usage(self) -> int:
        """Bytes held by complete copies."""
        return sum(size for _, size, _ in self._complete())

    def evict(self, keep: str | None = None) -> None:
        """Delete least recently used copies until at most ``max_bytes`` remain (never ``keep``)."""
        with _flock(self.locks / ".evict.lock"):
            entries = sorted(self._complete())  # oldest first
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                if path.name == keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    total -= size
                    log.debug("evicted %s (%d bytes)", path.name, size)

    def clean_stale(self) -> int:
        """Remove ``.partial`` downloads that no process is writing (left by a crash); return how many."""
        removed = 0
        for p in self.entries.glob(f"*{PARTIAL_SUFFIX}"):
            entry = p.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[0]
            with _flock(self.locks / (entry + ".lock"), blocking=False) as held:
                if held:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(p)
                        removed += 1
        if removed:
            log.info("removed %d stale partial downloads from %s", removed, self.entries)
        return removed

    def _complete(self) -> list[tuple[float, int, Path]]:
        out = []
        for p in self.entries.iterdir():
            if p.name.endswith(PARTIAL_SUFFIX):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            out.append((st.st_mtime, st.st_size, p))
        return out


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True):
    """Hold an exclusive flock on ``path``; yields False when ``blocking`` is off and another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


__all__ = ["ShardCache"]
