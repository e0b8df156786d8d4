"""A built dataset opened for reading: its card, its index and where its shards live (local or fsspec URL)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .card import LABEL_PREFIX, Card
from .errors import DatasetNotFoundError, SchemaError
from .format import CARD_NAME, INDEX_NAME, TOKENIZER_DIR
from .tasks import TaskList

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitIndex:
    """The index rows of one split as arrays, ordered shard by shard (card order), then by offset.

    Sample number ``i`` (what ``mmdata.order`` plans with) is row ``i`` here.
    """

    keys: np.ndarray  # (N,) object str
    shard: np.ndarray  # (N,) int64, index into ``files``
    offset: np.ndarray  # (N,) int64 byte offset of the sample's first header in its shard
    size: np.ndarray  # (N,) int64 bytes of the sample's members
    files: tuple[str, ...]  # shard file names, card order
    shard_sizes: tuple[int, ...]  # samples per shard, card order

    def __len__(self) -> int:
        return len(self.keys)


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
        t = self.index(split).select(["key", "shard", "offset", "size"]).to_pydict()
        pos = {f: i for i, f in enumerate(files)}
        unknown = sorted(set(t["shard"]) - set(pos))
        if unknown:
            raise SchemaError(f"index.parquet names shards {unknown[:3]} that dataset.json does not list for "
                              f"split {split!r}; rebuild the dataset")
        shard = np.array([pos[s] for s in t["shard"]], dtype=np.int64)
        offset = np.asarray(t["offset"], dtype=np.int64)
        order = np.lexsort((offset, shard))
        sizes = np.bincount(shard, minlength=len(files))
        expected = [s.samples for s in info.shards]
        if sizes.tolist() != expected:
            raise SchemaError(f"index.parquet has {sizes.tolist()} samples per shard of split {split!r} but "
                              f"dataset.json says {expected}; rebuild the dataset")
        return SplitIndex(
            keys=np.asarray(t["key"], dtype=object)[order], shard=shard[order], offset=offset[order],
            size=np.asarray(t["size"], dtype=np.int64)[order], files=files, shard_sizes=tuple(expected),
        )

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
            return self.read(f"{TOKENIZER_DIR}/{TOKENIZER_FILE}")
        except FileNotFoundError:
            return None

    def tokenizer(self):
        """The dataset's ``tokenizers.Tokenizer`` (trained at build on the train split's text)."""
        from .tokenizer import load_tokenizer

        if self.tokenizer_json is None:
            raise DatasetNotFoundError(f"{self.root!r} has no {TOKENIZER_DIR}/ folder; rebuild it with text and "
                                       "tokenizer_vocab > 0, or pass LoaderConfig(tokenizer=PATH)")
        return load_tokenizer(self.tokenizer_json)

    def read(self, name: str) -> bytes:
        """The bytes of file ``name`` in the dataset folder (FileNotFoundError when absent)."""
        return _read_bytes(self.url(name), self.storage_options)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_split_cache", None)  # rebuilt on demand in the worker
        return state


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _read_bytes(path: str, storage_options: dict | None = None) -> bytes:
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            return f.read()
    with open(_local(path), "rb") as f:
        return f.read()


def open_dataset(path_or_url: str | os.PathLike, *, storage_options: dict | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_bytes: int = 20 * 2**30) -> Dataset:
    """Open a dataset built by ``mmdata build``: a local folder, ``file://``, or any fsspec URL.

    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for S3). With
    ``cache_dir``, shards behind a URL are read from whole local copies kept there (``mmdata.cache``,
    at most ``cache_bytes``, shared by processes), so later epochs do not fetch them again.
    """
    import pyarrow.parquet as pq

    root = os.fspath(path_or_url)
    root = root if is_url(root) else os.path.abspath(_local(root))
    cache = None
    if cache_dir is not None and is_url(root):
        from .cache import ShardCache

        cache = (os.path.abspath(os.fspath(cache_dir)), int(cache_bytes))
        ShardCache(*cache)  # checks the limit, makes the folder, cleans partial downloads left by a crash
    try:
        card = Card.from_json(_read_bytes(f"{root.rstrip('/')}/{CARD_NAME}", storage_options).decode("utf-8"))
    except FileNotFoundError:
        hint = ""
        if not is_url(root) and os.path.isdir(root) and any(n.endswith(".tar") for n in os.listdir(root)):
            hint = (f"; {root!r} holds tar shards without a card: run `mmdata build --layout webdataset "
                    f"{root} OUT` to check them and write the card and index")
        raise DatasetNotFoundError(f"no {CARD_NAME} under {root!r}{hint}; build one with `mmdata build SOURCE OUT`"
                                   ) from None
    index_path = f"{root.rstrip('/')}/{INDEX_NAME}"
    try:
        if is_url(root):
            import fsspec

            with fsspec.open(index_path, "rb", **(storage_options or {})) as f:
                table = pq.read_table(f)
        else:
            table = pq.read_table(index_path)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{index_path!r} is missing; rebuild the dataset with `mmdata build`") from None
    missing = {"key", "split", "shard", "offset", "size"} - set(table.column_names)
    if missing:
        raise SchemaError(f"{index_path!r} lacks columns {sorted(missing)}; rebuild the dataset")
    ds = Dataset(root, card, table, storage_options, cache)
    log.debug("opened %r", ds)
    return ds


def as_dataset(dataset: str | os.PathLike | Dataset, storage_options: dict | None = None) -> Dataset:
    """``dataset`` itself when already open, else ``open_dataset(dataset, storage_options=...)``."""
    if isinstance(dataset, Dataset):
        return dataset
    return open_dataset(dataset, storage_options=storage_options)
