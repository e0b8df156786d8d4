"""Storage: a dataset folder on any fsspec filesystem, with retried reads/writes and a card-last commit.

Object stores (S3, GCS) have no rename, so a dataset there is committed by order, not by rename:

1. ``decommit`` removes an existing card first, so a reader finds no dataset rather than a half-old one;
2. shards, index, rejects and tokenizer are written (each object PUT is atomic; locally a file is written
   under a ``.partial`` staging name and renamed);
3. the card, ``dataset.json``, is written last: it is the commit point. A reader opens a dataset by its card
   and the card lists every shard with its size and sha256, so a reader never sees a dataset without its
   card, nor a card whose shards are not all in place.

A local build for a remote destination is staged in a local folder and published with ``publish``.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from .cache import ShardCache
from .errors import ConfigError, CorruptShardError, DatasetNotFoundError, MmdataError
from .format import CARD_NAME, PARTIAL_SUFFIX

log = logging.getLogger(__name__)

T = TypeVar("T")
# errors that a retry cannot fix: raised at once
PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, MmdataError)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a read or write is retried: delay doubles from ``base_delay``."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"attempts must be positive, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigError(f"retry delays must be 0 or more, got {self.base_delay}, {self.max_delay}")


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://`` (those go through fsspec)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    """The local path of a path or ``file://`` URL."""
    return os.fspath(path).removeprefix("file://")


def url_to_fs(url: str | os.PathLike, storage_options: dict[str, Any] | None = None):
    """(fsspec filesystem, path inside it) for a local path or URL; ConfigError naming a missing backend."""
    import fsspec

    text = os.fspath(url)
    try:
        return fsspec.core.url_to_fs(text, **(storage_options or {}))
    except ImportError as e:
        scheme = text.split("://", 1)[0]
        extra = {"s3": "mmdata[s3] (s3fs)", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
        raise ConfigError(f"{text!r} needs the fsspec backend for {scheme!r}: install "
                          f"{extra.get(scheme, 'its fsspec package')} ({e})") from None


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy = RetryPolicy()) -> T:
    """Call ``fn``; retry transient errors with exponential backoff, raise permanent ones at once."""
    delay = policy.base_delay
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except PERMANENT:
            raise
        except (OSError, TimeoutError, ConnectionError) as e:
            if attempt == policy.attempts:
                raise
            log.warning("%s failed (%s: %s); retry %d of %d in %.1f s", what, type(e).__name__, e, attempt,
                        policy.attempts - 1, delay)
            time.sleep(delay)
            delay = min(policy.max_delay, max(delay * 2, 0.01))
    raise AssertionError("unreachable")


def atomic_write(path: Path, data: bytes) -> None:
    """Write a local file under a staging name, fsync it, then rename it into place."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_copy(src: str | os.PathLike, path: Path) -> None:
    """Copy the local file ``src`` to ``path`` under a staging name, fsync it, then rename it into place."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    shutil.copyfile(src, tmp)
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(root: str | os.PathLike, name: str,
                 error: type[MmdataError] = CorruptShardError) -> tuple[int, int]:
    """(descriptor, size) of the local regular file ``name`` inside folder ``root``, opened read-only.

    A dataset folder may be hostile, so this refuses with ``error`` what a reader must not follow: a name
    or link that resolves outside ``root`` (``../x``, a link to /dev/zero or to another folder's file), a
    FIFO (opened O_NONBLOCK, so it cannot block), a device, a socket or a folder. Links inside ``root``
    are followed. FileNotFoundError when ``name`` is absent.
    """
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, name))
    if path != base and os.path.commonpath([base, path]) != base:
        raise error(f"{name!r} in {os.fspath(root)!r} resolves to {path!r}, outside the dataset folder; a "
                    "dataset reads only its own files: restore the file or rebuild the dataset")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW  # the path is resolved
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{name!r} in {os.fspath(root)!r} cannot be opened: {e.strerror or e}; restore it or "
                    "rebuild the dataset") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
            raise error(f"{name!r} in {os.fspath(root)!r} is {kind}, not a regular file; a dataset holds only "
                        "regular files: restore it or rebuild the dataset")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_regular(root: str | os.PathLike, name: str, limit: int | None = None,
                 error: type[MmdataError] = CorruptShardError) -> bytes:
    """The bytes of local file ``name`` in ``root`` (see ``open_regular``); ``error`` when over ``limit``."""
    fd, size = open_regular(root, name, error)
    with os.fdopen(fd, "rb") as f:
        if limit is not None and size > limit:
            raise error(f"{name!r} in {os.fspath(root)!r} has {size} bytes, more than the {limit} such a file "
                        "may have; restore it or rebuild the dataset")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:  # it grew after fstat
        raise error(f"{name!r} in {os.fspath(root)!r} has more than the {limit} bytes such a file may have")
    return data


class Storage:
    """A folder (local path or URL) with retried, staged file operations; pickles as its URL and options.

    The one door to a dataset's bytes: every read of a dataset goes through it. A local folder may be
    hostile, so reads there open only regular files inside it (``open_regular``); a remote one is read
    through fsspec with ``storage_options``, by byte range or, with ``cache`` (folder, bytes), as whole
    local copies kept in a ``ShardCache``.
    """

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                 retry: RetryPolicy = RetryPolicy(), cache: tuple[str, int] | None = None):
        self.url = os.fspath(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.retry = retry
        self.cache = cache  # (folder, max bytes) of the ShardCache that remote files are copied into, or None
        self._fs = None
        self._pid = None
        self._shard_cache = None

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    @property
    def fs(self):
        """The fsspec filesystem, made in this process: one inherited through a fork is not used (an async
        filesystem's event loop does not survive a fork; a DataLoader worker makes its own)."""
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = url_to_fs(self.url, self.storage_options)
            self._pid = os.getpid()
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 (resolves _root)
        return self._root.rstrip("/")

    @property
    def is_local(self) -> bool:
        """True for a local path or ``file://`` URL: read with the checks of ``open_regular``."""
        return not is_url(self.url)

    @property
    def ranged(self) -> bool:
        """True when parts of a file are read by byte range (remote, no cache), not from a descriptor."""
        return not self.is_local and self.cache is None

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``start:end`` of file ``name`` (all of it by default); FileNotFoundError when absent."""
        return with_retries(lambda: self.fs.cat_file(self.path(name), start=start, end=end),
                            f"reading {self.url}/{name}", self.retry)

    def read_file(self, name: str, limit: int | None = None,
                  error: type[MmdataError] = CorruptShardError) -> bytes:
        """The whole of file ``name`` of a dataset; ``error`` when it has more than ``limit`` bytes.

        Locally only a regular file inside the folder is read (``error`` for a FIFO, a device, a folder or
        a link out of it). FileNotFoundError when absent.
        """
        if self.is_local:
            return read_regular(local_path(self.url), name, limit, error)

        def whole() -> bytes:
            with self.fs.open(self.path(name), "rb") as f:
                return f.read() if limit is None else f.read(limit + 1)

        data = with_retries(whole, f"reading {self.url}/{name}", self.retry)
        if limit is not None and len(data) > limit:
            raise error(f"{name!r} in {self.url!r} has more than the {limit} bytes such a file may have; "
                        "restore it or rebuild the dataset")
        return data

    def open_file(self, name: str, error: type[MmdataError] = CorruptShardError) -> tuple[BinaryIO, int | None]:
        """(binary file, its size or None when the store does not say) of file ``name``, to read in order.

        Refuses with ``error`` what is not a file (and locally, what ``open_regular`` refuses);
        FileNotFoundError when absent.
        """
        if self.is_local:
            fd, size = open_regular(local_path(self.url), name, error)
            return os.fdopen(fd, "rb"), size
        info = with_retries(lambda: self.fs.info(self.path(name)), f"checking {self.url}/{name}", self.retry)
        if info.get("type", "file") != "file":
            raise error(f"{self.url + '/' + name!r} is a {info.get('type')}, not a file; restore it or rebuild "
                        "the dataset")
        return self.fs.open(self.path(name), "rb"), info.get("size")

    def descriptor(self, name: str, size: int | None = None, error: type[MmdataError] = CorruptShardError) -> int:
        """A read-only descriptor of file ``name``, for ``os.pread``: the local file itself, or the cache's
        whole local copy of a remote one (downloaded once; ``size``: the bytes it must have).

        ConfigError for a remote folder without a cache (read it by range with ``read``).
        """
        if self.is_local:
            return open_regular(local_path(self.url), name, error)[0]
        if self.cache is None:
            raise ConfigError(f"{self.url!r} has no local cache to copy {name!r} into; read it by byte range")
        if self._shard_cache is None:
            self._shard_cache = ShardCache(*self.cache)
        return self._shard_cache.open(f"{self.url}/{name}", lambda tmp: self.download(name, tmp), size)

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` whole: locally under a staging name then renamed; on an object store one PUT."""
        if self.is_local:
            path = Path(self.path(name))
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
            return
        with_retries(lambda: self.fs.pipe_file(self.path(name), data), f"writing {self.url}/{name}", self.retry)

    def upload(self, local: str | os.PathLike, name: str) -> None:
        """Copy local file ``local`` to ``name`` (staged like ``write``) and check its size."""
        size = os.path.getsize(local)
        if self.is_local:
            import shutil

            path = Path(self.path(name))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + PARTIAL_SUFFIX)
            shutil.copyfile(local, tmp)
            os.replace(tmp, path)
            return
        with_retries(lambda: self.fs.put_file(os.fspath(local), self.path(name)), f"uploading {name}", self.retry)
        got = self.size(name)
        if got != size:
            raise OSError(f"{self.url}/{name} has {got} bytes after upload, expected {size}; retry the build")

    def download(self, name: str, local: str | os.PathLike) -> None:
        with_retries(lambda: self.fs.get_file(self.path(name), os.fspath(local)), f"downloading {name}",
                     self.retry)

    def exists(self, name: str) -> bool:
        return with_retries(lambda: self.fs.exists(self.path(name)), f"checking {self.url}/{name}", self.retry)

    def size(self, name: str) -> int:
        return int(with_retries(lambda: self.fs.size(self.path(name)), f"sizing {self.url}/{name}", self.retry))

    def remove(self, name: str) -> None:
        """Remove file or folder ``name``; absent is fine."""
        try:
            self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def names(self) -> list[str]:
        """Names directly under the folder (files and folders); empty when it does not exist."""
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:  # filesystems without ``refresh``
            entries = self.fs.ls(self.root, detail=False)
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != self.root)

    def decommit(self) -> None:
        """Remove the card first: from here on readers see no dataset until ``publish`` writes a new one."""
        self.remove(CARD_NAME)

    def __getstate__(self):  # no filesystem, no open cache: rebuilt where it is unpickled
        return {"url": self.url, "storage_options": self.storage_options, "retry": self.retry,
                "cache": self.cache, "_fs": None, "_pid": None, "_shard_cache": None}


def publish(local_dir: str | os.PathLike, dest: Storage) -> None:
    """Upload every file of ``local_dir`` to ``dest``, the card last (the commit point)."""
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.endswith(PARTIAL_SUFFIX))
    card = local_dir / CARD_NAME
    if card not in files:
        raise DatasetNotFoundError(f"no {CARD_NAME} in {str(local_dir)!r}: nothing to publish")
    dest.decommit()
    for p in files:
        if p != card:
            dest.upload(p, p.relative_to(local_dir).as_posix())
    dest.upload(card, CARD_NAME)
    log.info("published %d files to %s", len(files), dest.url)


def fetch_tree(url: str, local_dir: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Path:
    """Copy a remote folder (or the folder of a remote file, e.g. a manifest) into ``local_dir``.

    Returns the local path that stands for ``url``: the folder, or the file inside it.
    """
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise DatasetNotFoundError(f"source {url!r} does not exist; check the URL and --storage-options")
    is_file = fs.isfile(path)
    folder = path.rsplit("/", 1)[0] if is_file else path
    local_dir = Path(local_dir)
    for remote in fs.find(folder):
        rel = remote[len(folder):].lstrip("/")
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with_retries(lambda r=remote, t=target: fs.get_file(r, os.fspath(t)), f"fetching {remote}")
    return local_dir / path.rsplit("/", 1)[-1] if is_file else local_dir


__all__ = ["RetryPolicy", "Storage", "fetch_tree", "is_url", "local_path", "open_regular", "publish", "read_regular",
           "url_to_fs", "with_retries"]
