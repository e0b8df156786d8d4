"""A built dataset opened for reading: its card, its index and where its shards live (local or fsspec URL)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .card import LABEL_PREFIX, Card
from .errors import DatasetNotFoundError, SchemaError
from .format import BLOCK, CARD_NAME, INDEX_NAME, TOKENIZER_DIR
from .storage import open_regular, read_regular
from .tasks import TaskList

log = logging.getLogger(__name__)

MAX_CARD_BYTES = 256 << 20  # a card lists shards: past this a dataset.json is not one
MAX_TOKENIZER_BYTES = 256 << 20  # a tokenizer.json of a large vocabulary has a few MB


@dataclass(frozen=True)
class SplitIndex:
    """The index rows of one split as arrays, ordered shard by shard (card order), then by offset.

    Sample number ``i`` (what ``mmdata.order`` plans with) is row ``i`` here. ``problems`` holds the rows
    whose byte range cannot be read (a null, negative, unaligned or out-of-shard offset or size): a reader
    never reads them, it fails (or skips) only those samples.
    """

    keys: np.ndarray  # (N,) object str
    shard: np.ndarray  # (N,) int64, index into ``files``
    offset: np.ndarray  # (N,) int64 byte offset of the sample's first header in its shard (-1 when null)
    size: np.ndarray  # (N,) int64 bytes of the sample's members (0 when null)
    files: tuple[str, ...]  # shard file names, card order
    shard_sizes: tuple[int, ...]  # samples per shard, card order
    shard_bytes: tuple[int, ...] = ()  # bytes per shard (dataset.json), card order
    problems: dict[int, str] = field(default_factory=dict)  # row -> what is wrong with its byte range

    def __len__(self) -> int:
        return len(self.keys)

    def row_error(self, row: int) -> SchemaError:
        """The error of a row in ``problems``: names the shard, the key and the bad value."""
        return SchemaError(f"shard {self.files[self.shard[row]]!r}, sample {self.keys[row]!r}: index.parquet "
                           f"{self.problems[row]}; rebuild the dataset")

    def overlaps(self) -> list[tuple[int, int]]:
        """(row, next row) of one shard whose byte ranges overlap, among rows without ``problems``.

        Rows are sorted by offset, so any overlap shows between some row and the next good one.
        """
        keep = np.ones(len(self), dtype=bool)
        keep[list(self.problems)] = False
        good = np.flatnonzero(keep)
        if len(good) < 2:
            return []
        a, b = good[:-1], good[1:]
        hit = (self.shard[a] == self.shard[b]) & (self.offset[b] < self.offset[a] + self.size[a])
        return list(zip(a[hit].tolist(), b[hit].tolist()))

    def overlap_error(self, a: int, b: int) -> SchemaError:
        file, end = self.files[self.shard[a]], int(self.offset[a] + self.size[a])
        return SchemaError(f"shard {file!r}: index.parquet puts sample {self.keys[a]!r} at bytes "
                           f"{self.offset[a]}..{end} and sample {self.keys[b]!r} at bytes {self.offset[b]}.."
                           f"{self.offset[b] + self.size[b]}, which overlap; rebuild the dataset")


def range_problems(offset: np.ndarray, size: np.ndarray, null: np.ndarray,
                   shard_bytes: np.ndarray) -> dict[int, str]:
    """{row: what is wrong} for index byte ranges that cannot be a sample of their shard.

    ``offset``, ``size``: (N,) int64 (any value where null); ``null``: (N, 2) bool, offset and size null;
    ``shard_bytes``: (N,) the row's shard size from dataset.json. A sample starts on a tar block, spans
    whole blocks (at least its first header) and ends inside its shard.
    """
    out: dict[int, str] = {}
    off_ok = ~null[:, 0] & (offset >= 0) & (offset % BLOCK == 0)
    size_ok = ~null[:, 1] & (size >= BLOCK) & (size % BLOCK == 0)
    # offset + size <= bytes, written so that no sum can overflow
    fits = off_ok & size_ok & (offset <= shard_bytes) & (size <= shard_bytes - np.where(off_ok, offset, 0))
    for i in np.flatnonzero(~fits).tolist():
        o, n = int(offset[i]), int(size[i])
        if null[i, 0] or null[i, 1]:
            what = f"{'offset' if null[i, 0] else 'size'} is null"
        elif o < 0 or n < 0:
            what = f"{'offset' if o < 0 else 'size'} {o if o < 0 else n} is negative"
        elif not off_ok[i]:
            what = f"offset {o} is not a multiple of {BLOCK} (a sample starts on a tar block)"
        elif not size_ok[i]:
            what = f"size {n} is not a positive multiple of {BLOCK} (a sample spans whole tar blocks)"
        else:
            what = (f"offset {o} + size {n} runs past the shard's end at byte {int(shard_bytes[i])} (its "
                    "size in dataset.json)")
        out[i] = what
    return out


def int_column(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values (N,) int64 with nulls as 0, null mask (N,)) of an integer column; SchemaError otherwise."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table[name]
    if pa.types.is_null(col.type):
        return np.zeros(len(col), dtype=np.int64), np.ones(len(col), dtype=bool)
    if not pa.types.is_integer(col.type):
        raise SchemaError(f"index.parquet column {name!r} holds {str(col.type)!r}, not integers; rebuild the "
                          "dataset")
    null = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_uint64(col.type):  # past int64: clip to a value no shard reaches (the row is refused)
        col = pc.min_element_wise(col, pa.scalar(2**62, pa.uint64()))
    values = col.fill_null(0).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return values.astype(np.int64, copy=False), null


class Dataset:
    """A dataset on disk or behind an fsspec URL; cheap to pickle (the card and arrays, no open files)."""

    def __init__(self, root: str, card: Card, index_table, storage_options: dict | None = None,
                 cache: tuple[str, int] | None = None):
        self.root = root.rstrip("/")
        self.card = card
        self._table = index_table  # pyarrow.Table of index.parquet
        self.storage_options = dict(storage_options or {})  # fsspec options for a URL root
        self.cache = cache  # (folder, bytes) of a mmdata.cache.ShardCache for a URL root, or None

    def __repr__(self) -> str:
        return f"Dataset({self.root!r}, splits={ {s: self.num_samples(s) for s in self.splits} })"

    @property
    def tasks(self) -> TaskList:
        return self.card.tasks

    @property
    def splits(self) -> list[str]:
        return list(self.card.splits)

    @property
    def modalities(self) -> list[str]:
        return [m for m in ("image", "audio", "text") if m in self.card.modalities]

    def num_samples(self, split: str) -> int:
        return self._split_info(split).num_samples

    def index(self, split: str | None = None):
        """The index as a pyarrow Table: every row, or the rows of ``split``."""
        if split is None:
            return self._table
        import pyarrow.compute as pc

        self._split_info(split)
        return self._table.filter(pc.equal(self._table["split"], split))

    def url(self, file: str) -> str:
        """Path or URL of a file of the dataset."""
        return f"{self.root}/{file}"

    def split_index(self, split: str) -> SplitIndex:
        """The arrays the loader plans and seeks with; checked against the card."""
        cache = self.__dict__.setdefault("_split_cache", {})
        if split not in cache:
            cache[split] = self._make_split_index(split)
        return cache[split]

    def _make_split_index(self, split: str) -> SplitIndex:
        info = self._split_info(split)
        files = tuple(s.file for s in info.shards)
        table = self.index(split)
        t = table.select(["key", "shard"]).to_pydict()
        offset, null_offset = int_column(table, "offset")
        size, null_size = int_column(table, "size")
        pos = {f: i for i, f in enumerate(files)}
        unknown = sorted(set(t["shard"]) - set(pos), key=str)
        if unknown:
            raise SchemaError(f"index.parquet names shards {unknown[:3]} that dataset.json does not list for "
                              f"split {split!r}; rebuild the dataset")
        shard = np.array([pos[s] for s in t["shard"]], dtype=np.int64)
        offset = np.where(null_offset, -1, offset)  # a null offset sorts first in its shard
        order = np.lexsort((offset, shard))
        sizes = np.bincount(shard, minlength=len(files))
        expected = [s.samples for s in info.shards]
        if sizes.tolist() != expected:
            raise SchemaError(f"index.parquet has {sizes.tolist()} samples per shard of split {split!r} but "
                              f"dataset.json says {expected}; rebuild the dataset")
        shard_bytes = np.array([s.bytes for s in info.shards], dtype=np.int64)
        keys = np.array(["" if k is None else str(k) for k in t["key"]], dtype=object)[order]
        shard, offset, size = shard[order], offset[order], np.where(null_size, 0, size)[order]
        null = np.stack([null_offset, null_size], axis=1)[order]  # (N, 2)
        problems = range_problems(offset, size, null, shard_bytes[shard])
        return SplitIndex(keys=keys, shard=shard, offset=offset, size=size, files=files,
                          shard_sizes=tuple(expected), shard_bytes=tuple(shard_bytes.tolist()), problems=problems)

    def _split_info(self, split: str):
        try:
            return self.card.splits[split]
        except KeyError:
            raise SchemaError(f"split {split!r} is not in the dataset; splits are {self.splits}") from None

    def label_values(self, split: str, task: str) -> list:
        """Stored labels of ``task`` in ``split`` (class index, index list, floats; None where missing)."""
        self.tasks[task]  # KeyError naming the tasks when unknown
        return self.index(split)[LABEL_PREFIX + task].to_pylist()

    def common_image_size(self, split: str) -> tuple[int, int] | None:
        """(H, W) shared by every image of ``split``, None when they differ or there are none."""
        t = self.index(split).select(["image_width", "image_height"]).drop_null().to_pydict()
        sizes = set(zip(t["image_height"], t["image_width"]))
        return sizes.pop() if len(sizes) == 1 else None

    def max_audio_seconds(self, split: str) -> float:
        """Longest clip of ``split`` in seconds (0 without audio)."""
        col = self.index(split)["audio_seconds"].drop_null()
        return float(max(col.to_pylist(), default=0.0))

    @cached_property
    def tokenizer_json(self) -> bytes | None:
        """The bytes of ``tokenizer/tokenizer.json``, or None when the dataset has no tokenizer."""
        from .tokenizer import TOKENIZER_FILE

        try:
            return self.read(f"{TOKENIZER_DIR}/{TOKENIZER_FILE}", MAX_TOKENIZER_BYTES)
        except FileNotFoundError:
            return None

    def tokenizer(self):
        """The dataset's ``tokenizers.Tokenizer`` (trained at build on the train split's text)."""
        from .tokenizer import load_tokenizer

        if self.tokenizer_json is None:
            raise DatasetNotFoundError(f"{self.root!r} has no {TOKENIZER_DIR}/ folder; rebuild it with text and "
                                       "tokenizer_vocab > 0, or pass LoaderConfig(tokenizer=PATH)")
        return load_tokenizer(self.tokenizer_json)

    def read(self, name: str, limit: int | None = None) -> bytes:
        """The bytes of file ``name`` in the dataset folder (FileNotFoundError when absent).

        Locally only a regular file inside the folder is read (SchemaError for a FIFO, a device, a folder
        or a link out of it); ``limit``: SchemaError when the file has more bytes.
        """
        return _read_bytes(self.root, name, self.storage_options, limit)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_split_cache", None)  # rebuilt on demand in the worker
        return state


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _read_bytes(root: str, name: str, storage_options: dict | None = None, limit: int | None = None) -> bytes:
    """File ``name`` of dataset ``root``: a regular file inside it when local, at most ``limit`` bytes."""
    if not is_url(root):
        return read_regular(_local(root), name, limit, error=SchemaError)
    import fsspec

    with fsspec.open(f"{root.rstrip('/')}/{name}", "rb", **(storage_options or {})) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise SchemaError(f"{name!r} in {root!r} has more than the {limit} bytes such a file may have; restore "
                          "it or rebuild the dataset")
    return data


def open_dataset(path_or_url: str | os.PathLike, *, storage_options: dict | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_bytes: int = 20 * 2**30) -> Dataset:
    """Open a dataset built by ``mmdata build``: a local folder, ``file://``, or any fsspec URL.

    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for S3). With
    ``cache_dir``, shards behind a URL are read from whole local copies kept there (``mmdata.cache``,
    at most ``cache_bytes``, shared by processes), so later epochs do not fetch them again.
    """
    root = os.fspath(path_or_url)
    root = root if is_url(root) else os.path.abspath(_local(root))
    cache = None
    if cache_dir is not None and is_url(root):
        from .cache import ShardCache

        cache = (os.path.abspath(os.fspath(cache_dir)), int(cache_bytes))
        ShardCache(*cache)  # checks the limit, makes the folder, cleans partial downloads left by a crash
    try:
        text = _read_bytes(root, CARD_NAME, storage_options, MAX_CARD_BYTES)
    except FileNotFoundError:
        hint = ""
        names = os.listdir(root) if not is_url(root) and os.path.isdir(root) else []
        if ".mmdata-build.jsonl" in names:  # the journal of a build that did not finish
            hint = (f"; {root!r} holds an interrupted build: rerun the same `mmdata build SOURCE {root}` "
                    "with --resume to finish it")
        elif any(n.endswith(".tar") for n in names):
            hint = (f"; {root!r} holds tar shards without a card: run `mmdata build --layout webdataset "
                    f"{root} OUT` to check them and write the card and index")
        raise DatasetNotFoundError(f"no {CARD_NAME} under {root!r}{hint}; build one with `mmdata build SOURCE OUT`"
                                   ) from None
    try:
        card = Card.from_json(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SchemaError(f"{CARD_NAME} in {root!r} is not UTF-8 text ({e}); rebuild the dataset") from None
    table = _read_index(root, storage_options)
    missing = {"key", "split", "shard", "offset", "size"} - set(table.column_names)
    if missing:
        raise SchemaError(f"{INDEX_NAME} in {root!r} lacks columns {sorted(missing)}; rebuild the dataset")
    ds = Dataset(root, card, table, storage_options, cache)
    log.debug("opened %r", ds)
    return ds


def _read_index(root: str, storage_options: dict | None):
    """index.parquet as a pyarrow Table; a one-line error when it is missing, not a file, or not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = f"{root.rstrip('/')}/{INDEX_NAME}"
    try:
        if is_url(root):
            import fsspec

            with fsspec.open(where, "rb", **(storage_options or {})) as f:
                return pq.read_table(f)
        fd, _ = open_regular(_local(root), INDEX_NAME, SchemaError)
        with os.fdopen(fd, "rb") as f:
            return pq.read_table(f)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{where!r} is missing; rebuild the dataset with `mmdata build`") from None
    except (pa.ArrowException, EOFError) as e:  # an empty, cut or foreign file
        what = " ".join(str(e).split()) or type(e).__name__
        raise SchemaError(f"{where!r} cannot be read as Parquet ({what!r}); rebuild the dataset") from None


def as_dataset(dataset: str | os.PathLike | Dataset, storage_options: dict | None = None) -> Dataset:
    """``dataset`` itself when already open, else ``open_dataset(dataset, storage_options=...)``."""
    if isinstance(dataset, Dataset):
        return dataset
    return open_dataset(dataset, storage_options=storage_options)
