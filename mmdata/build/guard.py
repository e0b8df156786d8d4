"""Guarded reads: the one way a build opens an input file (media, labels, tables, manifests, configs).

A file is read only when it is a regular file (a FIFO cannot block the open, a device cannot feed an
endless read), inside the source root once links are resolved, and within its size limit, checked
before the read and enforced during it (a file that grows is not read past the limit).
"""

from __future__ import annotations

import functools
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_JSON_DEPTH = 32  # label JSON nests a few levels; deeper is hostile, not data
OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: opening a FIFO returns at once


class Refused(Exception):
    """A file the build will not read; ``reason`` is the reject code (unreadable, outside_root, too_large)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def read_file(path: str, limit: int | None = None, size: int | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (its first ``limit`` bytes), in few system calls.

    ``open().read()`` costs twice as many (fstat, ioctl, a read to see the end), which is most of a build's
    time on small files. ``size`` is what a stat already said (a checked regular file: no fstat needed);
    otherwise one fstat refuses anything but a regular file. A file that grew since is read on to its end,
    but never past ``max_bytes``.
    """
    fd = os.open(path, OPEN_FLAGS)
    try:
        if size is None:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Refused("unreadable", f"{path!r} is not a regular file ({_kind(st.st_mode)})")
            size = st.st_size
        if max_bytes is not None and size > max_bytes:
            raise Refused("too_large", f"{path!r} has {size} bytes, more than the limit of {max_bytes}")
        if limit is not None:
            return os.read(fd, limit)
        data = os.read(fd, size + 1)
        if len(data) <= size:
            return data
        chunks, total = [data], len(data)
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise Refused("too_large", f"{path!r} grew past the limit of {max_bytes} bytes while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_member(container: str, offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` of a regular file holding members (a tar, a spool): one pread."""
    fd = os.open(container, OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("unreadable", f"{container!r} is not a regular file ({_kind(st.st_mode)})")
        if offset < 0 or offset + size > st.st_size:
            raise Refused("unreadable", f"{container!r} ends before byte {offset + size} (it has {st.st_size})")
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise Refused("unreadable", f"{container!r} gave {len(data)} of {size} bytes at {offset}")
        return data
    finally:
        os.close(fd)


def read_inside(path: str | Path, real_root: Path, max_bytes: int, what: str) -> bytes:
    """Read ``path`` (absolute, or relative to the root) only if it resolves to a regular file inside the root."""
    rel = os.path.relpath(path, real_root) if os.path.isabs(path) else str(path)
    target, size, problem = locate(rel, real_root)
    if problem:
        raise Refused(problem[0], f"{what}: {problem[1]}")
    if size > max_bytes:
        raise Refused("too_large", f"{what} {rel!r} has {size} bytes, more than the limit of {max_bytes}")
    try:
        return read_file(target, max_bytes=max_bytes)
    except Refused as e:
        raise Refused(e.reason, f"{what}: {e.message}") from None


def read_regular(path: str | Path, max_bytes: int, what: str) -> bytes:
    """Read a file the user named (a manifest, a config): a regular file within ``max_bytes``, links followed."""
    try:
        return read_file(str(path), max_bytes=max_bytes)
    except Refused as e:
        raise Refused(e.reason, f"{what}: {e.message}") from None


def open_regular(path: str | Path, max_bytes: int, what: str) -> io.BufferedReader:
    """Open a file the user named (a manifest) to read it in a stream: a regular file within ``max_bytes``
    (links followed); reading past ``max_bytes`` (a file that grows) raises Refused."""
    fd = os.open(str(path), OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("unreadable", f"{what}: {str(path)!r} is not a regular file ({_kind(st.st_mode)})")
        if st.st_size > max_bytes:
            raise Refused("too_large", f"{what}: {str(path)!r} has {st.st_size} bytes, more than the limit of "
                          f"{max_bytes}")
        os.set_blocking(fd, True)
        return io.BufferedReader(_Limited(fd, max_bytes, f"{what}: {str(path)!r}"), 1 << 20)
    except BaseException:
        os.close(fd)
        raise


class _Limited(io.RawIOBase):
    """A file descriptor read up to a limit: one byte more is an error, not a silent cut."""

    def __init__(self, fd: int, limit: int, what: str):
        self.fd, self.limit, self.what = fd, limit, what

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def readinto(self, buf) -> int:
        n = os.readv(self.fd, [buf])
        if n and self.tell() > self.limit:
            raise Refused("too_large", f"{self.what} grew past the limit while read")
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def locate(rel: str, real_root: Path) -> tuple[str, int, tuple[str, str] | None]:
    """Resolve ``rel`` under the root to (real path, size); refuse absolute paths, ``..`` and links out."""
    root_s = str(real_root)
    if not rel:
        return root_s, 0, ("unreadable", "empty path")
    if os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        return root_s, 0, ("outside_root", f"{rel!r} is an absolute path; give paths relative to the source root")
    # realpath of the folder (cached: a sample's files share it), then of the file only if it is a link
    parent, _, name = f"{root_s}/{rel}".rpartition("/")
    if name in ("", ".", ".."):  # "a/..", "a/.": let normpath find the last real name
        parent, name = os.path.split(os.path.normpath(os.path.join(root_s, rel)))
    target = os.path.join(realdir(parent), name)
    try:
        st = os.lstat(target)  # one call: is it a link, and if not, its type and size
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(target)
        try:
            st = os.stat(target)
        except OSError:
            st = None
    if not (target.startswith(root_s + os.sep) or target == root_s):
        return root_s, 0, ("outside_root", f"{rel!r} resolves to {target!r}, outside the source root "
                           f"{root_s!r}; copy the file inside the root")
    if st is None:
        return target, 0, ("unreadable", f"{rel!r} does not exist")
    if not stat.S_ISREG(st.st_mode):
        return target, 0, ("unreadable", f"{rel!r} is not a regular file ({_kind(st.st_mode)})")
    return target, st.st_size, None


class Listed(type(Path())):  # PosixPath: every Path method, and Path(...) of it is a plain path again
    """A file found by listing a source folder, which the user did not name (a named one is his choice).

    ``found_in`` is (the folder's real path, the file's path below the folder): the file is read only where
    it resolves inside the folder (``listed_target``). Paths derived from it (``.parent``) carry none.
    """

    found_in: tuple[str, str] | None = None


def listed(folder: str | Path, rel: str) -> Listed:
    """The file ``rel`` (a relative path) found by listing ``folder``."""
    path = Listed(folder, rel)
    path.found_in = (os.path.realpath(folder), rel)
    return path


def listed_target(path: str | Path, what: str) -> tuple[str, tuple[str, str] | None]:
    """(the path to open, None), or (``path``, ("outside_root", message)) for a Listed file that resolves
    outside the folder it was found in. A missing or odd file is the caller's to report, as for a named one."""
    if getattr(path, "found_in", None) is None:
        return str(path), None
    real_root, rel = path.found_in
    target, _, problem = locate(rel, Path(real_root))
    if problem is None:
        return target, None
    if problem[0] == "outside_root":
        return str(path), ("outside_root", f"{what} {problem[1]} instead of linking to it")
    return str(path), None


@functools.lru_cache(maxsize=4096)
def realdir(path: str) -> str:
    """``os.path.realpath`` of a folder from its parent's (cached) and one lstat of its own name.

    realpath walks every component with an lstat each; a build's folders share their parents, so only
    the last name needs looking at. A link, or anything odd, goes to realpath.
    """
    head, _, tail = path.rpartition("/")
    if head and tail not in ("", ".", ".."):
        try:
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                return f"{realdir(head)}/{tail}"
        except OSError:
            pass
    return os.path.realpath(path)


def parse_json(data: bytes | str, what: str) -> Any:
    """Parse JSON that may be hostile: a ValueError (never a RecursionError) for bad or too deeply nested input."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"{what} nests deeper than Python can parse") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not JSON ({e})") from None
    raw = data.encode() if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:  # cannot nest deeper: no walk (most labels)
        return value
    stack = [(value, 1)]
    while stack:  # iterative: a depth check must not recurse itself
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return value


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"
