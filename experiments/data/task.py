"""Classification tasks with train/validation/test splits, from files or arrays.

A :class:`Task` is a name, a kind (``"text"``: inputs are strings; ``"image"``: inputs are
an array ``[N, H, W]`` or ``[N, H, W, C]``), the class names, and three :class:`Split`s of
``(inputs, labels)`` with integer labels indexing ``classes``. Users bring their own
tasks as CSV or JSONL with an input column (a text, or with ``kind="image"`` an image file
path relative to the file's folder) and a label column; an optional split column
holds ``train`` / ``validation`` (or ``val``, ``dev``) / ``test``. Without it the rows are
split at random (fractions ``0.8/0.1/0.1`` by default), deterministically from ``seed``;
with ``group_col`` whole groups go to one split (no leakage between, e.g., reviews of the
same movie).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
KINDS = ("text", "image")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test",
}


class DataUnavailable(FileNotFoundError):
    """A data set's files are missing; the message names the package and the make target."""


def missing(what: str, path: str | os.PathLike, install: str) -> DataUnavailable:
    """A ``DataUnavailable`` error: ``<what> not found at <path>: <install> (run `make data`)``."""
    return DataUnavailable(f"{what} not found at {path}: {install} (`make data` installs it)")


@dataclass(frozen=True, eq=False)
class Split:
    """Inputs (an object array of strings, or an image array) and int32 labels of equal length."""

    inputs: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "labels", np.asarray(self.labels, np.int32))
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"split has {len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> "Split":
        return Split(self.inputs[idx], self.labels[idx])


def _as_inputs(inputs, kind: str) -> np.ndarray:
    if kind == "text":
        out = np.empty(len(inputs), dtype=object)
        out[:] = [str(x) for x in inputs]
        return out
    arr = np.asarray(inputs)
    if arr.ndim not in (3, 4):
        raise ValueError(f"image inputs must be [N, H, W] or [N, H, W, C], got shape {arr.shape}")
    return arr


@dataclass(frozen=True, eq=False)
class Task:
    """A named classification task with train/validation/test splits (see module docstring)."""

    name: str
    kind: str
    classes: tuple[str, ...]
    train: Split
    validation: Split
    test: Split

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if repeated:
            raise ValueError(f"task {self.name!r}: duplicate class names {repeated}")
        if len(self.classes) < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 classes, got {self.classes}")
        for s in SPLITS:
            split = self.split(s)
            if len(split) == 0:
                raise ValueError(f"task {self.name!r}: the {s} split is empty")
            if split.labels.min() < 0 or split.labels.max() >= len(self.classes):
                raise ValueError(f"task {self.name!r}: {s} labels must lie in [0, {len(self.classes)})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}

    def subsample(self, train: int | None = None, validation: int | None = None, test: int | None = None,
                  *, seed: int = 0) -> "Task":
        """At most ``train/validation/test`` examples per split, a seeded random subset (order kept).

        Each split draws from its own stream, so one split's subset does not depend on the others' caps.
        """
        new = {}
        for i, (s, cap) in enumerate(zip(SPLITS, (train, validation, test))):
            split = self.split(s)
            if cap is not None and cap < len(split):
                rng = np.random.default_rng([seed, i])
                new[s] = split.take(np.sort(rng.choice(len(split), cap, replace=False)))
        return replace(self, **new)

    def fingerprint(self, splits: Sequence[str] = SPLITS) -> str:
        """sha256 of the name, kind, classes and the inputs and labels of ``splits``."""
        h = hashlib.sha256(json.dumps([self.name, self.kind, list(self.classes)]).encode())
        for s in splits:
            split = self.split(s)
            h.update(s.encode())
            if self.kind == "text":
                h.update("\0".join(split.inputs).encode("utf-8", "surrogatepass"))
            else:
                x = np.ascontiguousarray(split.inputs)
                h.update(f"{x.dtype}{x.shape}".encode())
                h.update(x.tobytes())
            h.update(split.labels.tobytes())
        return h.hexdigest()

    # ----- construction ---------------------------------------------------------------

    @classmethod
    def from_records(cls, name: str, inputs, labels, *, kind: str = "text", splits: Sequence[str] | None = None,
                     groups: Sequence | None = None, classes: Sequence[str] | None = None,
                     fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0) -> "Task":
        """Builds a task from parallel inputs and labels (any hashable label values).

        ``classes`` fixes the class order (labels are then class names); by default it is
        the sorted distinct labels (numerically when all are integers). ``splits`` gives each
        row's split (aliases ``val``/``dev`` accepted); a missing validation split is carved
        out of train; otherwise rows (or ``groups``) are split at random by ``fractions``.
        """
        labels = [str(y) for y in labels]
        if len(labels) != len(inputs):
            raise ValueError(f"task {name!r}: {len(inputs)} inputs but {len(labels)} labels")
        if classes is None:
            distinct = set(labels)
            numeric = all(y.lstrip("-").isdigit() for y in distinct)
            classes = sorted(distinct, key=int if numeric else str)
        classes = tuple(str(c) for c in classes)
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"task {name!r}: labels {unknown[:5]} are not among classes {list(index)[:10]}")
        y = np.array([index[v] for v in labels], np.int32)
        x = _as_inputs(inputs, kind)
        parts = split_indices(len(y), fractions=fractions, seed=seed, splits=splits, groups=groups, name=name)
        return cls(name, kind, classes, *(Split(x[parts[s]], y[parts[s]]) for s in SPLITS))

    @classmethod
    def from_csv(cls, path: str | os.PathLike, text_col: str, label_col: str, split_col: str | None = None, *,
                 seed: int = 0, name: str | None = None, group_col: str | None = None,
                 fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), delimiter: str = ",",
                 kind: str = "text", image_size: int | None = None) -> "Task":
        """A task from a CSV file with a header row (see :meth:`from_records`); ``text_col``
        holds the texts, or for ``kind="image"`` image paths (see :func:`read_images`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} not found")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=delimiter))
        return cls._from_rows(rows, path, text_col, label_col, split_col, group_col, seed, name, fractions,
                              kind, image_size)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, text_col: str, label_col: str, split_col: str | None = None, *,
                   seed: int = 0, name: str | None = None, group_col: str | None = None,
                   fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), kind: str = "text",
                   image_size: int | None = None) -> "Task":
        """A task from a JSON-lines file, one object per line (see :meth:`from_csv`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} not found")
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        return cls._from_rows(rows, path, text_col, label_col, split_col, group_col, seed, name, fractions,
                              kind, image_size)

    @classmethod
    def _from_rows(cls, rows: list[dict], path: Path, text_col, label_col, split_col, group_col, seed, name,
                   fractions, kind, image_size) -> "Task":
        if not rows:
            raise ValueError(f"{path} holds no rows")
        cols = [c for c in (text_col, label_col, split_col, group_col) if c is not None]
        for i, row in enumerate(rows):
            absent = [c for c in cols if c not in row or row[c] is None]
            if absent:
                raise ValueError(f"{path}: row {i + 1} has no column {absent[0]!r} (columns: {sorted(row)})")
        inputs = [r[text_col] for r in rows]
        if kind == "image":
            inputs = read_images([path.parent / str(x) for x in inputs], image_size)
        return cls.from_records(
            name or path.stem,
            inputs,
            [r[label_col] for r in rows],
            kind=kind,
            splits=[r[split_col] for r in rows] if split_col else None,
            groups=[r[group_col] for r in rows] if group_col else None,
            fractions=fractions,
            seed=seed,
        )


def read_images(paths: Sequence[Path], size: int | None = None) -> np.ndarray:
    """uint8 RGB images ``[N, H, W, 3]`` from image files (any format PIL reads; transparency
    composited on white), resized to ``size`` x ``size`` when given; without ``size`` every
    image must have the same size. Missing or unreadable files raise, naming the file."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image file {p} not found")
        try:
            with Image.open(p) as im:
                rgba = im.convert("RGBA")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{p}: not a readable image ({e})") from e
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        elif out and im.size != (out[0].shape[1], out[0].shape[0]):
            raise ValueError(f"{p} is {im.size[0]}x{im.size[1]}, the first image {out[0].shape[1]}x{out[0].shape[0]}: "
                             "pass image_size to resize them all")
        out.append(np.asarray(im))
    return np.stack(out)


def split_indices(n: int, *, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
                  splits: Sequence[str] | None = None, groups: Sequence | None = None,
                  name: str = "task") -> dict[str, np.ndarray]:
    """Sorted row indices of each split (see :meth:`Task.from_records`); deterministic in ``seed``."""
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    if splits is not None:
        if len(splits) != n:
            raise ValueError(f"task {name!r}: {len(splits)} split values for {n} rows")
        canon = []
        for v in splits:
            key = str(v).strip().lower()
            if key not in _SPLIT_ALIASES:
                raise ValueError(f"task {name!r}: unknown split value {v!r} (use train, validation/val/dev or test)")
            canon.append(_SPLIT_ALIASES[key])
        canon = np.array(canon)
        parts = {s: np.flatnonzero(canon == s) for s in SPLITS}
        if len(parts["test"]) == 0:
            raise ValueError(f"task {name!r}: the split column has no test rows")
        if len(parts["validation"]) == 0:  # carve validation out of train, in the fractions' proportion
            tr = rng.permutation(parts["train"])
            n_val = max(1, round(len(tr) * fractions[1] / (fractions[0] + fractions[1])))
            parts["validation"], parts["train"] = np.sort(tr[:n_val]), np.sort(tr[n_val:])
        return parts
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"task {name!r}: {len(groups)} group values for {n} rows")
        keys = [str(g) for g in groups]
        uniq = sorted(set(keys))
        order = rng.permutation(len(uniq))
        of_group = {uniq[j]: r for r, j in enumerate(order)}  # each group's rank in a random order
        rank = np.array([of_group[k] for k in keys])
        counts = np.bincount(rank, minlength=len(uniq))
        cum = np.cumsum(counts) / n  # fraction of rows covered by the first r+1 groups
        cut1 = np.searchsorted(cum, fractions[0])
        cut2 = np.searchsorted(cum, fractions[0] + fractions[1])
        which = np.where(rank <= cut1, 0, np.where(rank <= cut2, 1, 2))
        return {s: np.flatnonzero(which == i) for i, s in enumerate(SPLITS)}
    perm = rng.permutation(n)
    a = round(n * fractions[0])
    b = a + round(n * fractions[1])
    return {s: np.sort(p) for s, p in zip(SPLITS, (perm[:a], perm[a:b], perm[b:]))}


def dedupe(inputs: Iterable[str], labels: Iterable) -> tuple[list[str], list]:
    """Drops repeated texts, keeping the first (and dropping every copy of a text seen with two labels)."""
    first: dict[str, object] = {}
    conflict = set()
    for x, y in zip(inputs, labels):
        if x in first and first[x] != y:
            conflict.add(x)
        first.setdefault(x, y)
    kept = [(x, y) for x, y in first.items() if x not in conflict]
    return [x for x, _ in kept], [y for _, y in kept]
