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
            raise BadLabel(f"{self.name}: {value!r} is not a declared class {list(self.classes)}") from None

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
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)) and v != ""]
    if not present:
        raise ConfigError(f"task {name!r} has no labels at all; declare it in the build config or drop the column")
    if all(isinstance(v, (list, tuple)) for v in present):
        classes = sorted({str(c) for v in present for c in v}, key=_natural)
        return Task(name, "multilabel", tuple(classes))
    if all(isinstance(v, float) and not v.is_integer() for v in present) or (
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
        and any(isinstance(v, float) and not v.is_integer() for v in present)
    ):
        return Task(name, "regression")
    classes = sorted({str(int(v)) if isinstance(v, float) else str(v) for v in present}, key=_natural)
    return Task(name, "classification", tuple(classes))


def _natural(s: str) -> tuple:
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
