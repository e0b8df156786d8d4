"""What discovery makes of any input layout: RawRecords with MediaRefs, before any check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "opus", "m4a")
TEXT_EXTS = ("txt",)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class MediaRef:
    """Where one modality of a record lives: a path relative to the root, or inline bytes."""

    ext: str  # lower-case extension without the dot ("" when unknown)
    path: str | None = None  # relative to the root; for a member: "shard.tar:KEY.ext", shown in rejects
    data: bytes | None = None
    size: int | None = None  # bytes, once checked (a member's: declared by its container)
    container: str | None = None  # a member's bytes lie in this file (a tar, a spool) at ``offset``
    offset: int | None = None
    real: str | None = None  # the file's path once discovery has checked it (a regular file inside the root)


@dataclass
class RawRecord:
    """One input record before any check: ids, media references, raw label values."""

    source_id: str
    media: dict[str, MediaRef] = field(default_factory=dict)  # modality -> reference
    labels: dict[str, Any] = field(default_factory=dict)  # column -> raw value (candidates for tasks)
    split: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # more values a declared task's column may name
    meta: dict[str, Any] = field(default_factory=dict)  # scalar facts kept with the sample (url, caption...)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason, message) found while discovering

    @property
    def paths(self) -> list[str]:
        return [m.path if m.path is not None else f"<inline {m.ext}>" for m in self.media.values()]

    def load(self) -> RawRecord:
        """The record itself (a layout whose records are found lazily gives an object that reads it here)."""
        return self


class Found(Protocol):
    """A record as discovery hands it to the build: its id, split and paths known; ``load`` gives the
    RawRecord (a folder layout's record lists and reads its folder there, in whichever process packs it)."""

    source_id: str
    split: str | None

    @property
    def paths(self) -> list[str]: ...

    def load(self) -> RawRecord: ...


def modality_of_ext(ext: str) -> str | None:
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TEXT_EXTS:
        return "text"
    return None
