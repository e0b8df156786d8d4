"""Tasks: a name, a type and (for classes) an ordered class list; label values checked against them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

TASK_TYPES = ("classification", "multilabel", "regression")


class BadLabel(ValueError):
    """A label value does not fit its task (the caller turns it into a reject)."""


@dataclass(frozen=True)
class Task:
    """One prediction target of the dataset."""

    name: str
    type: str
    classes: tuple[str, ...] = ()  # empty in a build config: the build infers them (sorted values seen)
    dims: int = 1
    column: str | None = None  # source column; defaults to name

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ConfigError(f"task {self.name!r}: type must be one of {TASK_TYPES}, got {self.type!r}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"task {self.name!r}: classes must be unique, got {list(self.classes)}")
        if self.dims < 1:
            raise ConfigError(f"task {self.name!r}: dims must be positive, got {self.dims}")

    @property
    def num_outputs(self) -> int:
        """Width of a model head for this task."""
        return self.dims if self.type == "regression" else len(self.classes)

    @property
    def source_column(self) -> str:
        return self.column or self.name

    def encode(self, value: Any) -> Any:
        """Return the stored form of a raw label (class index, index list, floats) or None; raise BadLabel."""
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        if isinstance(value, float) and math.isnan(value):
            if self.type == "regression":
                raise BadLabel(f"{self.name}: NaN is not a valid regression target")
            return None
        if self.type == "classification":
            return self._class_index(value)
        if self.type == "multilabel":
            if isinstance(value, str):
                value = [v for v in value.replace(";", "|").split("|") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise BadLabel(f"{self.name}: multilabel value must be a list, got {type(value).__name__}")
            return sorted({self._class_index(v) for v in value})
        return self._regression(value)

    def _class_index(self, value: Any) -> int:
        if isinstance(value, bool):
            value = str(value).lower()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        key = str(value).strip()
        try:
            return self.classes.index(key)
        except ValueError:
            if len(key) > MAX_CLASS_CHARS:
                raise BadLabel(f"{self.name}: a value of {len(key)} characters ({key[:40]!r}...) is too long to be "
                               f"a class name (at most {MAX_CLASS_CHARS})") from None
            shown = list(self.classes) if len(self.classes) <= 50 else [*self.classes[:50], "..."]
            raise BadLabel(f"{self.name}: {_short(value)} is not a declared class {shown}") from None

    def _regression(self, value: Any) -> list[float]:
        values = value if isinstance(value, (list, tuple)) else [value]
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise BadLabel(f"{self.name}: regression value must be a number, got {v!r}")
            try:
                f = float(v)
            except ValueError:
                raise BadLabel(f"{self.name}: regression value must be a number, got {v!r}") from None
            if not math.isfinite(f):
                raise BadLabel(f"{self.name}: regression value must be finite, got {v!r}")
            out.append(f)
        if len(out) != self.dims:
            raise BadLabel(f"{self.name}: expected {self.dims} regression values, got {len(out)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.type == "regression":
            d["dims"] = self.dims
        else:
            d["classes"] = list(self.classes)
        if self.column and self.column != self.name:
            d["column"] = self.column
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str | None = None) -> Task:
        name = name or d.get("name")
        if not name:
            raise ConfigError(f"a task needs a name, got {d!r}")
        unknown = set(d) - {"name", "type", "classes", "dims", "column"}
        if unknown:
            raise ConfigError(f"task {name!r}: unknown keys {sorted(unknown)}; allowed: type, classes, dims, column")
        classes = tuple(str(c) for c in d.get("classes") or ())
        return cls(name=name, type=d.get("type", "classification"), classes=classes,
                   dims=int(d.get("dims", 1)), column=d.get("column"))


def infer_task(name: str, values: list[Any]) -> Task:
    """Infer a task from raw values: strings/ints -> classification, floats -> regression, lists -> multilabel."""
    stats = ValueStats()
    for v in values:
        stats.add(v)
    return stats.task(name)


MAX_CLASSES = 10_000  # distinct values a task's classes are inferred from, at most
MAX_CLASS_CHARS = 256  # characters of a class name, at most


class ValueStats:
    """What task inference needs of a label column, gathered one value at a time (no value list kept).

    Memory grows with the distinct classes, not with the records: a build of millions of records keeps
    one of these per label column.
    """

    __slots__ = ("present", "lists", "numeric", "fractional", "objects", "scalar_classes", "list_classes",
                 "too_many")

    def __init__(self) -> None:
        self.present = 0
        self.lists = 0  # values that are lists
        self.numeric = 0  # ints and floats (not bools)
        self.fractional = 0  # floats that are not whole
        self.objects = 0  # dicts: no task unless declared
        self.scalar_classes: set[str] = set()  # each value as a class name
        self.list_classes: set[str] = set()  # each list's items as class names
        self.too_many = False  # more distinct values than MAX_CLASSES (no longer gathered)

    def add(self, v: Any) -> None:
        if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
            return
        self.present += 1
        if isinstance(v, (list, tuple)):
            self.lists += 1
            self._classes(self.list_classes, (str(c) for c in v))
        elif isinstance(v, dict):
            self.objects += 1
            return
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            self.numeric += 1
            if isinstance(v, float) and not v.is_integer():
                self.fractional += 1
        self._classes(self.scalar_classes, (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v),))

    def _classes(self, into: set[str], names) -> None:
        for name in names:
            if len(name) > MAX_CLASS_CHARS:
                continue  # no class: such a value is rejected as a bad label, never put in the card
            if len(into) >= MAX_CLASSES and name not in into:
                self.too_many = True
                continue
            into.add(name)

    @property
    def regression(self) -> bool:
        return self.present > 0 and self.numeric == self.present and self.fractional > 0

    def task(self, name: str) -> Task:
        if not self.present:
            raise ConfigError(f"task {name!r} has no labels at all; declare it in the build config or drop the column")
        if self.too_many and not self.regression:
            raise ConfigError(f"task {name!r} has more than {MAX_CLASSES} distinct values: too many to be classes; "
                              "declare it as regression, give its classes, or leave the column out of the tasks")
        if self.lists == self.present:
            return Task(name, "multilabel", tuple(sorted(self.list_classes, key=natural_key)))
        if self.regression:
            return Task(name, "regression")
        return Task(name, "classification", tuple(sorted(self.scalar_classes, key=natural_key)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:80]}... ({len(text)} characters)"


def natural_key(s: str) -> tuple:
    """Sort '2' before '10' and numbers before words."""
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


@dataclass(frozen=True)
class TaskList:
    """The ordered tasks of a dataset."""

    tasks: tuple[Task, ...] = field(default_factory=tuple)

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {[t.name for t in self.tasks]}")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]
