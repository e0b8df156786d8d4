"""Spool: member bytes a build must keep until encoding (from compressed tars, Parquet cells), kept on disk.

Discovery appends them to one file in the build's temporary folder and hands out (path, offset, size),
which a MediaRef carries as its container: memory stays flat however large the input.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import BinaryIO


class Spool:
    """An append-only file of member bytes; ``close`` before workers read it."""

    def __init__(self, folder: str | Path, name: str = "spool.bin"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = str(Path(folder) / name)
        self._file: BinaryIO = open(self.path, "wb")
        self._pos = 0

    def put(self, data: bytes) -> tuple[str, int]:
        """Append ``data``; return (path, offset) of its first byte."""
        offset = self._pos
        self._file.write(data)
        self._pos += len(data)
        return self.path, offset

    def copy_from(self, f: BinaryIO, size: int) -> tuple[str, int, int]:
        """Append up to ``size`` bytes read from ``f``; return (path, offset, bytes copied)."""
        offset = self._pos
        remaining = size
        while remaining:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            self._file.write(chunk)
            remaining -= len(chunk)
        self._pos += size - remaining
        return self.path, offset, size - remaining

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()  # flushed: forked workers read it by path, through the page cache

    def remove(self) -> None:
        self.close()
        shutil.rmtree(Path(self.path).parent, ignore_errors=True)
