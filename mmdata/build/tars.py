"""The webdataset layout: tar shards (ours, img2dataset's, ShardWriter's) read member by member.

Memory stays flat: a member's header is read, its declared size checked against the limits, and only
then its bytes: label members (``.json``, ``.cls``) into memory, media of a plain tar not at all (a
MediaRef points at its offset in the shard), media of a compressed tar copied to the spool. A bad
header is not the end of the shard: the reader finds the next good header and the sample that lost
members is a ``corrupt_shard`` reject naming the shard and the byte offset.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import logging
import lzma
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..card import Card
from ..errors import DatasetNotFoundError, MmdataError, SchemaError
from ..tasks import Task
from .config import BuildConfig
from .guard import Refused, listed, listed_target, parse_json, read_regular
from .records import SPLIT_NAMES, MediaRef, RawRecord, modality_of_ext
from .spool import Spool

log = logging.getLogger(__name__)

BLOCK = 512
MAX_LABEL_MEMBER = 16 * 2**20  # a .json / .cls member larger than this is no label
COMMON_LABELS = ("label", "labels", "class", "class_name", "cls")  # fields that others' shards label with
TAR_EXTS = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")
OPENERS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


@dataclass
class Damage:
    """Bytes of a shard that are not a readable tar; ``name`` is the member's name when its header shows it."""

    offset: int
    message: str
    name: str | None = None


@dataclass
class Member:
    name: str
    offset: int  # of its data in the (decompressed) stream
    size: int


class TarStream:
    """Walk a tar's members over a byte stream, reading a member's data only when asked."""

    def __init__(self, f: BinaryIO, total: int | None):
        self.f, self.total = f, total  # total: the stream's length, when known (a plain file)
        self.pos = 0  # of the next byte in the stream
        self._buf, self._at = b"", 0  # read ahead; bytes before _at are consumed (no copy per header)
        self._unread = 0  # data bytes + padding of the current member not yet consumed

    def _take(self, n: int) -> bytes:
        """Up to ``n`` bytes from the read-ahead buffer."""
        out = self._buf[self._at:self._at + n]
        self._at += len(out)
        self.pos += len(out)
        return out

    def _read(self, n: int) -> bytes:
        if len(self._buf) - self._at < n:  # refill: what is left, then at least 64 kB more
            parts = [self._buf[self._at:]]
            have = len(parts[0])
            while have < n:
                chunk = self.f.read(max(n - have, 1 << 16))
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
            self._buf, self._at = b"".join(parts), 0
        return self._take(n)

    def _push_back(self, data: bytes) -> None:
        """Make ``data`` the next bytes read (resync found a header inside bytes already read)."""
        self._buf, self._at = data + self._buf[self._at:], 0
        self.pos -= len(data)

    def read_data(self, size: int) -> bytes:
        """The current member's data (call at most once, before the next member)."""
        data = self._read(min(size, self._unread))
        self._unread -= len(data)
        return data

    def copy_data(self, spool: Spool, size: int) -> tuple[str, int, int]:
        """Append the current member's data to the spool; return (path, offset, bytes copied)."""
        take = min(size, self._unread)
        head = self._take(take)
        path, offset = spool.put(head)
        path, _, copied = spool.copy_from(self.f, take - len(head))
        self.pos += copied
        self._unread -= len(head) + copied
        return path, offset, len(head) + copied

    def _skip(self, n: int) -> int:
        """Skip ``n`` bytes (a seek in a plain file); return how many were there."""
        done = len(self._take(n))
        if done < n:
            if self.total is not None:
                target = min(self.pos + n - done, self.total)
                self.f.seek(target)
                done += target - self.pos
                self.pos = target
            else:
                while done < n:
                    chunk = self.f.read(min(n - done, 1 << 20))
                    if not chunk:
                        break
                    done += len(chunk)
                    self.pos += len(chunk)
        return done

    def members(self) -> Iterator[Member | Damage]:
        """Every file member, and a Damage for every stretch that is not tar, in stream order."""
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            if self._unread:
                want = self._unread
                self._unread = 0
                if self._skip(want) < want:
                    yield Damage(self.pos, "the shard ends inside a member's data (truncated?)")
                    return
            start = self.pos
            block = self._read(BLOCK)
            if not block:
                yield Damage(start, "the shard ends without the end-of-archive blocks (truncated?)")
                return
            if len(block) < BLOCK:
                yield Damage(start, "the shard ends inside a tar header (truncated?)", _name_hint(block))
                return
            if block == bytes(BLOCK):
                return  # end of archive (a second zero block and padding may follow)
            header = _parse_header(block)
            if header is None:
                yield Damage(start, "a tar header fails its checksum", _name_hint(block))
                if not self._resync():
                    return
                long_name, pax = None, {}
                continue
            name, size, kind = header
            self._unread = size + (-size % BLOCK)
            if kind in (b"L", b"x", b"g"):
                data = self.read_data(size) if size <= MAX_LABEL_MEMBER else b""
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                elif kind == b"x":
                    pax = _pax_records(data)
                    size_text = pax.get("size")
                    if size_text is not None and not size_text.isdigit():
                        pax.pop("size")
                continue
            name = pax.get("path") or long_name or name
            if "size" in pax:
                size = int(pax["size"])
                self._unread = size + (-size % BLOCK)
            long_name, pax = None, {}
            if kind in (b"0", b"\0", b"7"):
                if self.total is not None and self.pos + size > self.total:
                    yield Damage(self.pos, f"member {name!r} declares {size} bytes, more than the shard holds "
                                 "(truncated?)", name)
                    return
                yield Member(name, self.pos, size)

    def _resync(self) -> bool:
        """Move to the next valid ustar header after a bad one; False at the end of the stream."""
        window = self._read(1 << 16)
        while True:
            i = window.find(b"ustar", 257)
            while i != -1:
                h = i - 257
                if h + BLOCK > len(window):
                    break
                if _parse_header(window[h:h + BLOCK]) is not None:
                    self._push_back(window[h:])
                    return True
                i = window.find(b"ustar", i + 1)
            more = self._read(1 << 16)
            if not more:
                return False
            window = window[-(BLOCK + 257):] + more  # a header may straddle the two reads


def _parse_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type flag) of a valid header block, else None."""
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return None
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    if stored not in (unsigned, signed):
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    field = block[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        size = int.from_bytes(field[1:], "big")
    else:
        try:
            size = int(field.replace(b"\0", b" ").strip() or b"0", 8)
        except ValueError:
            return None
    return name.decode("utf-8", "replace"), size, block[156:157]


def _name_hint(block: bytes) -> str | None:
    """The name field of a damaged header, when it still reads as a plain member name."""
    raw = block[:100].split(b"\0", 1)[0]
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return name if re.fullmatch(r"[\w./-]{1,100}", name) and "." in name else None


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        m = re.match(rb"(\d+) ", data[pos:pos + 32])
        if not m or int(m.group(1)) <= 0:
            break
        record = data[pos + m.end(): pos + int(m.group(1))].rstrip(b"\n")
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += int(m.group(1))
    return out


# ---- which shards ------------------------------------------------------------------------------------------


def tar_files(pattern: str) -> list[str | Path]:
    """The shards ``pattern`` names: a folder's tars (Listed: read only inside it), a file, a glob, braces."""
    p = Path(pattern)
    files: list[str | Path]
    if p.is_dir():
        files = [listed(p, name) for name in sorted(os.listdir(p)) if name.endswith(TAR_EXTS)]
    elif p.is_file():
        files = [pattern]
    else:
        files = sorted({f for pat in _expand_braces(pattern) for f in glob.glob(pat)})
    # a link out of the folder is no error here: it becomes a reject (outside_root), whatever it points at
    odd = [f for f in files if not os.path.isfile(f) and listed_target(f, "tar shard")[1] is None]
    if odd:
        raise SchemaError(f"{str(odd[0])!r} is not a regular file; keep only tar files among the input "
                          "shards")
    if not files:
        raise DatasetNotFoundError(f"no tar shards match {pattern!r}; give a folder of .tar files, a glob or "
                                   "a brace pattern like 'shards-{000000..000009}.tar'")
    return files


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [p for i in range(lo, hi + 1)
                for p in _expand_braces(pattern[:m.start()] + f"{i:0{width}d}" + pattern[m.end():])]
    m = re.search(r"\{([^{}]*,[^{}]*)\}", pattern)
    if m:
        return [p for alt in m.group(1).split(",")
                for p in _expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]
    return [pattern]


# ---- shards -> records -------------------------------------------------------------------------------------


@dataclass
class _Sample:
    key: str
    members: dict[str, MediaRef | bytes] = field(default_factory=dict)  # ext -> media ref or label bytes
    problems: list[tuple[str, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # member names, for messages


def split_of_shard(path: str) -> str | None:
    """The split a shard's file name (or folder) names: train*, val*/valid*/validation*/dev*, test*."""
    for part in (Path(path).name, Path(path).parent.name):
        m = re.match(r"[a-z]+", part.lower())
        if m and m.group() in SPLIT_NAMES:
            return SPLIT_NAMES[m.group()]
    return None


def from_tars(files: list[str | Path], config: BuildConfig, spool: Spool,
              card: Card | None = None) -> list[RawRecord]:
    """One RawRecord per sample key of every shard; ``card`` is the source's own (an mmdata dataset)."""
    records = []
    for file in files:
        records += _from_tar(file, config, spool, card)
    found = sorted({k for r in records if r.fields for k in r.labels})
    if found and not config.tasks:
        log.info("labels from the shards' json fields %s; declare tasks in the build config to use other "
                 "fields (by name, or a dotted path into nested objects)", found)
    return records


def _from_tar(file: str | Path, config: BuildConfig, spool: Spool, card: Card | None) -> list[RawRecord]:
    name = Path(file).name
    path, outside = listed_target(file, "tar shard")  # path: resolved, so later reads find the checked file
    if outside is not None:  # not read: one reject stands for the shard's samples
        return [RawRecord(name, problems=[outside])]
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise SchemaError(f"tar shard {str(file)!r} is not a regular file; keep only tar files among the shards")
        raw = open(path, "rb")  # noqa: SIM115 - closed below, maybe through the decompressor
    except OSError as e:
        raise SchemaError(f"tar shard {str(file)!r} cannot be read ({e.strerror or e})") from None
    magic = raw.read(6)
    raw.seek(0)
    opener = next((o for m, o in OPENERS.items() if magic.startswith(m)), None)
    f = opener(raw) if opener else raw
    packed = opener is not None  # a compressed shard: media go to the spool
    samples: dict[str, _Sample] = {}
    damaged_next: Damage | None = None
    try:
        stream = TarStream(f, None if packed else st.st_size)
        for item in stream.members():
            if isinstance(item, Damage):
                where = f"{name}: {item.message} at byte {item.offset}" + (" of the decompressed stream" if packed
                                                                           else "")
                hint = _key_ext(item.name)[0] if item.name else None
                if hint is not None:
                    samples.setdefault(hint, _Sample(hint)).problems.append(("corrupt_shard", where))
                else:
                    damaged_next = Damage(item.offset, where)
                continue
            key, ext = _key_ext(item.name)
            sample = samples.get(key)
            if sample is None:
                sample = samples[key] = _Sample(key)
                if damaged_next is not None:  # the first sample after unreadable bytes may have lost members
                    sample.problems.append(("corrupt_shard", damaged_next.message))
                    damaged_next = None
            sample.names.append(item.name)
            _add_member(sample, item, ext, stream, packed, name, path, config, spool)
    except (OSError, EOFError, lzma.LZMAError) as e:  # a broken compressed stream
        where = f"{name}: the compressed stream breaks off ({e})"
        last = next(reversed(samples.values()), None)
        if last is None:
            raise SchemaError(f"{where}; repair or remove the shard") from None
        last.problems.append(("corrupt_shard", where))
    finally:
        f.close()
        raw.close()
    if damaged_next is not None:  # unreadable bytes at the end: the last sample may have lost members
        last = next(reversed(samples.values()), None)
        if last is None:
            raise SchemaError(f"{damaged_next.message}; no sample could be read from it: repair or remove it")
        last.problems.append(("corrupt_shard", damaged_next.message))
    split = split_of_shard(file)
    return [_record(s, name, split, card) for s in samples.values()]


def _key_ext(member: str) -> tuple[str, str]:
    """WebDataset's rule: the key ends at the first dot of the file name (its folder is part of the key)."""
    base = member.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return member[: len(member) - len(base)] + key, ext.lower()


def _add_member(sample: _Sample, m: Member, ext: str, stream: TarStream, packed: bool, shard: str, file: str,
                config: BuildConfig, spool: Spool) -> None:
    last = ext.rsplit(".", 1)[-1]
    where = f"{shard}:{m.name}"
    modality = modality_of_ext(last)
    if modality is not None:
        clash = next((r.path for r in sample.members.values()
                      if isinstance(r, MediaRef) and modality_of_ext(r.ext) == modality), None)
        if clash is not None:
            sample.problems.append(("unsupported_format", f"{shard}: members {clash.split(':', 1)[1]!r} and "
                                    f"{m.name!r} share the key {sample.key!r} (a WebDataset key ends at the "
                                    "first dot of the file name): keep one per modality, or rename them so "
                                    "the key holds no dot"))
            return
        if m.size > config.max_file_bytes:
            sample.problems.append(("too_large", f"{where} has {m.size} bytes > max_file_bytes "
                                    f"{config.max_file_bytes}; raise max_file_bytes to keep it (not read)"))
            sample.members[last] = MediaRef(last, path=where, size=m.size)
            return
        if packed:
            path, offset, copied = stream.copy_data(spool, m.size)
            sample.members[last] = MediaRef(last, path=where, size=copied, container=path, offset=offset)
        else:
            sample.members[last] = MediaRef(last, path=where, size=m.size, container=os.path.abspath(file),
                                            offset=m.offset)
        return
    if ext in ("json", "cls", "label", "class"):
        if m.size > MAX_LABEL_MEMBER:
            sample.problems.append(("bad_label", f"{where} has {m.size} bytes: too large for labels"))
            return
        sample.members[ext] = stream.read_data(m.size)


def _record(s: _Sample, shard: str, split: str | None, card: Card | None) -> RawRecord:
    rec = RawRecord(s.key, split=split, problems=list(s.problems))
    for ext, value in sorted(s.members.items()):
        if isinstance(value, MediaRef):
            rec.media[modality_of_ext(ext) or ext] = value
        elif ext == "json":
            try:
                _json_fields(rec, parse_json(value, f"{shard}:{s.key}.json"), card)
            except ValueError as e:
                rec.problems.append(("bad_label", str(e)))
        else:  # .cls and friends: one value
            text = value.decode("utf-8", "replace").strip()
            rec.labels["cls" if ext == "cls" else ext] = _typed(text)
    return rec


def _json_fields(rec: RawRecord, obj: Any, card: Card | None) -> None:
    if not isinstance(obj, dict):
        rec.problems.append(("bad_label", f"{rec.source_id}.json is not a JSON object"))
        return
    if isinstance(obj.get("id"), str) and obj["id"].strip():
        rec.source_id = obj["id"]
    if isinstance(obj.get("labels"), dict):  # mmdata's own: {"id", "labels": {task: stored value}, "meta"}
        rec.labels.update(_named(obj["labels"], card))
        if isinstance(obj.get("meta"), dict):
            rec.meta.update({k: v for k, v in obj["meta"].items() if _scalar(v)})
        return
    rec.fields.update(obj)  # others': any field may be a task's column, by name or dotted path
    for k, v in obj.items():
        if k == "id":
            continue
        if k in COMMON_LABELS:
            rec.labels[k] = v
        elif _scalar(v):
            rec.meta[k] = v


def _named(labels: dict[str, Any], card: Card | None) -> dict[str, Any]:
    """Stored class indices back to class names, by the source dataset's own card."""
    if card is None:
        return labels
    tasks = {t.name: t for t in card.tasks}
    out = {}
    for name, v in labels.items():
        t = tasks.get(name)
        if t is not None and t.type == "classification" and isinstance(v, int) and 0 <= v < len(t.classes):
            v = t.classes[v]
        elif t is not None and t.type == "multilabel" and isinstance(v, list):
            v = [t.classes[i] if isinstance(i, int) and 0 <= i < len(t.classes) else i for i in v]
        out[name] = v
    return out


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _typed(text: str) -> Any:
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def source_card(root: Path) -> Card | None:
    """The card of a source that is itself an mmdata dataset (its tasks and class names carry over)."""
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        return Card.from_json(read_regular(path, 64 * 2**20, "source dataset.json").decode("utf-8"))
    except (Refused, MmdataError, UnicodeDecodeError) as e:
        log.warning("the source's dataset.json cannot be read (%s): its class names are not used", e)
        return None


def card_tasks(card: Card) -> tuple[Task, ...]:
    return tuple(card.tasks)
