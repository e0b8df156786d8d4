"""A built dataset opened for reading: its card, its index and where its shards live (local or fsspec URL)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .card import LABEL_PREFIX, Card, count_labels, empty_label_counts
from .errors import DatasetNotFoundError, SchemaError
from .format import BLOCK, CARD_NAME, INDEX_NAME, TOKENIZER_DIR
from .storage import Storage, is_url, local_path
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

    keys: Keys  # (N,) the samples' keys
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


LOADER_COLUMNS = ("key", "split", "shard", "offset", "size", "image_width", "image_height", "audio_seconds")


class Keys:
    """The keys of a split's samples, kept as one Arrow string array (not a Python string per sample)."""

    def __init__(self, array):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i) -> str:
        return self.array[int(i)].as_py()

    def __iter__(self):
        return iter(self.array.to_pylist())


class Dataset:
    """A dataset on disk or behind an fsspec URL; cheap to pickle (the card and arrays, no open files)."""

    def __init__(self, root: str, card: Card, index_table=None, storage_options: dict | None = None,
                 cache: tuple[str, int] | None = None):
        self.root = root.rstrip("/")
        self.card = card
        self._full = index_table  # pyarrow.Table of index.parquet, every column; read when first asked for
        # every read of the dataset's files: fsspec options and the ShardCache (folder, bytes) for a URL root
        self.storage = Storage(self.root, storage_options, cache=cache)

    @property
    def storage_options(self) -> dict:
        return self.storage.storage_options

    @property
    def cache(self) -> tuple[str, int] | None:
        return self.storage.cache

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
        """The index as a pyarrow Table: every row, or the rows of ``split``; every column."""
        if self._full is None:
            self._full = _read_index(self.storage)
        return self._table_rows(self._full, split)

    def _rows(self, split: str):
        """The rows of ``split`` with the columns the loader plans with (read when needed, not kept)."""
        table = self._full if self._full is not None else _read_index(self.storage, LOADER_COLUMNS)
        return self._table_rows(table, split)

    def _table_rows(self, table, split: str | None):
        if split is None:
            return table
        import pyarrow as pa
        import pyarrow.compute as pc

        self._split_info(split)
        return table.filter(pc.equal(table["split"], pa.scalar(split)))

    def url(self, file: str) -> str:
        """Path or URL of a file of the dataset."""
        return f"{self.root}/{file}"

    def split_index(self, split: str) -> SplitIndex:
        """The arrays the loader plans and seeks with; checked against the card."""
        return self._facts(split)[0]

    def _facts(self, split: str) -> tuple[SplitIndex, tuple[int, int] | None, float]:
        """(split index, common image size, longest clip) of ``split``, from one read of its index rows."""
        cache = self.__dict__.setdefault("_split_cache", {})
        if split not in cache:
            rows = self._rows(split)
            cache[split] = (self._make_split_index(split, rows), _common_image_size(rows), _max_audio_seconds(rows))
        return cache[split]

    def _make_split_index(self, split: str, table) -> SplitIndex:
        info = self._split_info(split)
        files = tuple(s.file for s in info.shards)
        import pyarrow as pa
        import pyarrow.compute as pc

        offset, null_offset = int_column(table, "offset")
        size, null_size = int_column(table, "size")
        column = table["shard"].combine_chunks()
        if pa.types.is_dictionary(column.type):  # as read at open: a file's position per distinct name
            names, codes = column.dictionary, column.indices
        else:
            names, codes = column, None
        shard = pc.index_in(names, value_set=pa.array(files, type=pa.string())).fill_null(-1)
        shard = shard.to_numpy(zero_copy_only=False).astype(np.int64)  # -1: a name the card does not list
        if codes is not None:
            shard = shard[codes.fill_null(0).to_numpy(zero_copy_only=False)] if len(names) else shard[:0]
            if codes.null_count:
                shard[codes.is_null().to_numpy(zero_copy_only=False)] = -1
        if (shard < 0).any():
            unknown = sorted(set(pc.filter(table["shard"], pa.array(shard < 0)).to_pylist()), key=str)
            raise SchemaError(f"index.parquet names shards {unknown[:3]} that dataset.json does not list for "
                              f"split {split!r}; rebuild the dataset")
        offset = np.where(null_offset, -1, offset)  # a null offset sorts first in its shard
        order = np.lexsort((offset, shard))
        sizes = np.bincount(shard, minlength=len(files))
        expected = [s.samples for s in info.shards]
        if sizes.tolist() != expected:
            raise SchemaError(f"index.parquet has {sizes.tolist()} samples per shard of split {split!r} but "
                              f"dataset.json says {expected}; rebuild the dataset")
        shard_bytes = np.array([s.bytes for s in info.shards], dtype=np.int64)
        keys = Keys(table["key"].take(pa.array(order)).combine_chunks().cast(pa.string()).fill_null(""))
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
        table = self.index(split)
        column = LABEL_PREFIX + task
        return table[column].to_pylist() if column in table.column_names else [None] * len(table)

    def label_counts(self, split: str, task: str) -> dict[str, int]:
        """{class: samples, ..., "missing": n} of ``task`` in ``split`` (regression: "present", "missing").

        Read from the card; counted from the index only for a card that lacks them.
        """
        t = self.tasks[task]
        stored = self._split_info(split).label_counts.get(task)
        if stored is None:
            return count_labels(t, self.label_values(split, task))
        return {k: stored.get(k, 0) for k in empty_label_counts(t)}

    def common_image_size(self, split: str) -> tuple[int, int] | None:
        """(H, W) shared by every image of ``split``, None when they differ or there are none."""
        return self._facts(split)[1]

    def max_audio_seconds(self, split: str) -> float:
        """Longest clip of ``split`` in seconds (0 without audio)."""
        return self._facts(split)[2]

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
        return self.storage.read_file(name, limit, SchemaError)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_split_cache", None)  # rebuilt on demand in the worker
        return state


def open_dataset(path_or_url: str | os.PathLike, *, storage_options: dict | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_bytes: int = 20 * 2**30) -> Dataset:
    """Open a dataset built by ``mmdata build``: a local folder, ``file://``, or any fsspec URL.

    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for S3). With
    ``cache_dir``, shards behind a URL are read from whole local copies kept there (``mmdata.cache``,
    at most ``cache_bytes``, shared by processes), so later epochs do not fetch them again.
    """
    root = os.fspath(path_or_url)
    root = root if is_url(root) else os.path.abspath(local_path(root))
    cache = None
    if cache_dir is not None and is_url(root):
        from .cache import ShardCache

        cache = (os.path.abspath(os.fspath(cache_dir)), int(cache_bytes))
        ShardCache(*cache)  # checks the limit, makes the folder, cleans partial downloads left by a crash
    storage = Storage(root, storage_options, cache=cache)
    try:
        text = storage.read_file(CARD_NAME, MAX_CARD_BYTES, SchemaError)
    except FileNotFoundError:
        hint = ""
        names = storage.names() if storage.is_local else []
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
    missing = {"key", "split", "shard", "offset", "size"} - set(_read_index(storage, ()).column_names)
    if missing:
        raise SchemaError(f"{INDEX_NAME} in {root!r} lacks columns {sorted(missing)}; rebuild the dataset")
    ds = Dataset(root, card, None, storage_options, cache)
    log.debug("opened %r", ds)
    return ds


def _common_image_size(rows) -> tuple[int, int] | None:
    if "image_width" not in rows.column_names or "image_height" not in rows.column_names:
        return None
    import pyarrow.compute as pc

    t = rows.select(["image_width", "image_height"]).drop_null()
    sizes = pc.unique(pc.add(pc.multiply(t["image_height"].cast("int64"), 2**32), t["image_width"].cast("int64")))
    return divmod(sizes[0].as_py(), 2**32) if len(sizes) == 1 else None


def _max_audio_seconds(rows) -> float:
    if "audio_seconds" not in rows.column_names:
        return 0.0
    import pyarrow.compute as pc

    return float(pc.max(rows["audio_seconds"]).as_py() or 0.0)


def _read_index(storage: Storage, columns: tuple[str, ...] | None = None):
    """index.parquet as a pyarrow Table (those of ``columns`` it has, or all); a one-line error when it is
    missing, not a file, or not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = f"{storage.url}/{INDEX_NAME}"
    try:
        f, _ = storage.open_file(INDEX_NAME, SchemaError)
        with f:
            # not pq.read_table, which imports pyarrow.dataset; names that repeat read as dictionaries
            parquet = pq.ParquetFile(f, read_dictionary=["split", "shard"] if columns else None)
            have = parquet.schema_arrow.names
            if columns == ():  # the schema only: an empty table with every column
                return parquet.schema_arrow.empty_table()
            return parquet.read(columns=None if columns is None else [c for c in columns if c in have])
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
