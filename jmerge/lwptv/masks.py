"""Layer masks for LwPTV: which layers of each task vector are kept.

A :class:`LayerMask` is an explicit boolean array of shape ``(num_tasks, num_layers)``
(True = keep the task's update in that layer, False = drop it) with the layer and task
names attached. It prints as a table, saves to and loads from JSON, and can be built by
hand. The rules below turn scores (higher = more salient, :mod:`jmerge.lwptv.scores`)
into masks, per task:

* :func:`threshold`: keep ``s_t^l >= tau``, optionally after normalising each task's
  scores (``normalize="max"``: divide by the task's largest ``|s|``; ``"minmax"``: map
  the task's scores to [0, 1]). Normalising makes one ``tau`` usable across tasks whose
  scores differ in scale; it does not change the ranking, so it does not matter for the
  two other rules.
* :func:`keep_ratio`: keep the ``floor(ratio * L + 0.5)`` highest-scoring layers
  (ratio in [0, 1]; 1 keeps all, 0 drops all).
* :func:`top_k`: keep the ``k`` highest-scoring layers (0 <= k <= L).

Ranking ties go to the lower layer index (the order of the grouping); NaN scores rank
last and never pass a threshold.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jmerge._util import atomic_write
from jmerge.lwptv.presets import Preset, describe
from jmerge.validate import MergeInputError, check_fraction

FORMAT = "jmerge.lwptv.LayerMask/1"


def default_task_names(num_tasks: int) -> tuple[str, ...]:
    return tuple(f"task_{t}" for t in range(num_tasks))


@dataclass(frozen=True, eq=False)
class LayerMask:
    """``mask[t, l]`` is True when task ``t`` keeps its update in layer ``layer_names[l]``.

    ``layers`` optionally records the layer rule the names come from (a preset name or a
    regex string; a ``Preset`` or compiled regex is stored as its name or pattern), so the
    mask can be applied to parameters later without repeating it. For a callable rule,
    leave it None and pass the grouping to :func:`jmerge.lwptv.prune`.
    """

    mask: np.ndarray
    layer_names: tuple[str, ...]
    task_names: tuple[str, ...] | None = None
    layers: str | None = None

    def __post_init__(self):
        raw = np.asarray(self.mask)
        if raw.ndim != 2:
            raise MergeInputError(f"a layer mask is (num_tasks, num_layers), got shape {raw.shape}")
        if raw.dtype != np.bool_ and not np.all((raw == 0) | (raw == 1)):
            raise MergeInputError("a layer mask holds booleans (or 0/1), got other values")
        mask = raw.astype(bool)
        mask.setflags(write=False)
        layer_names = tuple(str(n) for n in self.layer_names)
        task_names = default_task_names(mask.shape[0]) if self.task_names is None else tuple(map(str, self.task_names))
        for what, names, size in (("layer", layer_names, mask.shape[1]), ("task", task_names, mask.shape[0])):
            if len(names) != size:
                raise MergeInputError(f"mask of shape {mask.shape} has {size} {what}s but {len(names)} {what} names")
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise MergeInputError(f"duplicate {what} names in a layer mask: {dup}")
        layers = self.layers
        if layers is not None and not isinstance(layers, str):
            if not (isinstance(layers, Preset) or hasattr(layers, "pattern")):
                raise MergeInputError(
                    f"LayerMask.layers is a preset name or regex string, got {layers!r}; "
                    "for a callable rule leave it None and pass the grouping to prune()"
                )
            layers = describe(layers)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "layer_names", layer_names)
        object.__setattr__(self, "task_names", task_names)

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape

    @property
    def num_tasks(self) -> int:
        return self.mask.shape[0]

    @property
    def num_layers(self) -> int:
        return self.mask.shape[1]

    def kept(self, task: int | str) -> list[str]:
        """Names of the layers task ``task`` keeps."""
        row = self.mask[self.task_names.index(task) if isinstance(task, str) else task]
        return [n for n, k in zip(self.layer_names, row) if k]

    def dropped_by_all(self) -> list[str]:
        """Layers no task keeps: the merged model holds the base weights there."""
        return [n for n, any_kept in zip(self.layer_names, self.mask.any(axis=0)) if not any_kept]

    def __eq__(self, other) -> bool:
        if not isinstance(other, LayerMask):
            return NotImplemented
        return (
            self.layer_names == other.layer_names
            and self.task_names == other.task_names
            and self.layers == other.layers
            and np.array_equal(self.mask, other.mask)
        )

    __hash__ = None

    def __str__(self) -> str:
        return table(self.layer_names, self.task_names, mask=self.mask)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "layers": self.layers,
            "layer_names": list(self.layer_names),
            "task_names": list(self.task_names),
            "mask": self.mask.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LayerMask":
        if d.get("format") != FORMAT:
            raise MergeInputError(f"not a layer mask (format {d.get('format')!r}, expected {FORMAT!r})")
        return cls(np.asarray(d["mask"], bool).reshape(len(d["task_names"]), len(d["layer_names"])),
                   tuple(d["layer_names"]), tuple(d["task_names"]), d.get("layers"))

    def save(self, path, *, overwrite: bool = False):
        """Writes the mask as JSON (atomically; an existing file only with ``overwrite``)."""

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")

        return atomic_write(path, write, overwrite=overwrite)

    @classmethod
    def load(cls, path) -> "LayerMask":
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise MergeInputError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (KeyError, ValueError) as e:
            raise MergeInputError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------- rules
def _scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise MergeInputError(f"scores must be (num_tasks, num_layers), got shape {s.shape}")
    return s


def normalize(scores, how: str | None = None) -> np.ndarray:
    """Per-task normalisation of a ``(K, L)`` score array: None, ``"max"`` (``s / max_l |s|``,
    a zero row stays 0) or ``"minmax"`` (``(s - min) / (max - min)``, a constant row becomes 1)."""
    s = _scores(scores)
    if how is None:
        return s
    with np.errstate(invalid="ignore", divide="ignore"):
        if how == "max":
            m = np.nanmax(np.abs(s), axis=1, keepdims=True)
            return np.where(m > 0, s / np.where(m > 0, m, 1.0), 0.0)
        if how == "minmax":
            lo, hi = np.nanmin(s, axis=1, keepdims=True), np.nanmax(s, axis=1, keepdims=True)
            span = hi - lo
            return np.where(span > 0, (s - lo) / np.where(span > 0, span, 1.0), 1.0)
    raise MergeInputError(f"normalize must be None, 'max' or 'minmax', got {how!r}")


def threshold(scores, tau: float, *, normalize_by: str | None = None) -> np.ndarray:
    """Keep ``s_t^l >= tau`` (after :func:`normalize` with ``normalize_by``)."""
    if not isinstance(tau, (int, float, np.floating, np.integer)) or not math.isfinite(tau):
        raise MergeInputError(f"threshold tau must be a finite number, got {tau!r}")
    with np.errstate(invalid="ignore"):
        return normalize(scores, normalize_by) >= tau


def top_k(scores, k: int) -> np.ndarray:
    """Keep each task's ``k`` highest-scoring layers (ties to the lower index)."""
    s = _scores(scores)
    num_layers = s.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= num_layers:
        raise MergeInputError(f"top_k k={k!r} must be an integer in [0, {num_layers}] (the number of layers)")
    order = np.argsort(-np.nan_to_num(s, nan=-np.inf), axis=1, kind="stable")
    keep = np.zeros(s.shape, bool)
    np.put_along_axis(keep, order[:, :k], True, axis=1)
    return keep


def keep_ratio(scores, ratio: float) -> np.ndarray:
    """Keep each task's ``floor(ratio * L + 0.5)`` highest-scoring layers (``ratio`` in [0, 1])."""
    check_fraction("keep ratio", ratio, low_open=False)
    s = _scores(scores)
    return top_k(s, min(s.shape[1], math.floor(float(ratio) * s.shape[1] + 0.5)))


RULES = {"threshold": threshold, "keep_ratio": keep_ratio, "top_k": top_k}


def make_mask(
    scores,
    rule: str,
    value,
    *,
    layer_names: Sequence[str],
    task_names: Sequence[str] | None = None,
    normalize_by: str | None = None,
    layers: str | None = None,
) -> LayerMask:
    """A :class:`LayerMask` from scores by ``rule`` (``"threshold"``, ``"keep_ratio"``, ``"top_k"``)."""
    if rule not in RULES:
        raise MergeInputError(f"unknown mask rule {rule!r} (rules: {', '.join(RULES)})")
    if normalize_by is not None and rule != "threshold":
        normalize(np.zeros((1, 1)), normalize_by)  # validates the name; rankings ignore it
    keep = threshold(scores, value, normalize_by=normalize_by) if rule == "threshold" else RULES[rule](scores, value)
    return LayerMask(keep, tuple(layer_names), None if task_names is None else tuple(task_names), layers)


# ---------------------------------------------------------------------------- text
def table(layer_names: Sequence[str], task_names: Sequence[str], *, scores=None, mask=None) -> str:
    """A text table, one row per layer and one column per task: the score (when given), and
    ``keep``/``drop`` or an ``x`` after dropped scores (when a mask is given)."""
    if scores is None and mask is None:
        raise ValueError("table needs scores, a mask or both")
    s = None if scores is None else _scores(scores)
    m = None if mask is None else np.asarray(mask, bool)
    shape = (s if s is not None else m).shape
    if shape != (len(task_names), len(layer_names)) or (s is not None and m is not None and s.shape != m.shape):
        raise MergeInputError(f"table: got shape {shape} for {len(task_names)} tasks x {len(layer_names)} layers")

    def cell(t, l):
        if s is None:
            return "keep" if m[t, l] else "drop"
        v = s[t, l]
        text = f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.3e}"
        return text if m is None else text + ("  " if m[t, l] else " x")

    header = ["layer", *task_names]
    rows = [[name, *(cell(t, l) for t in range(shape[0]))] for l, name in enumerate(layer_names)]
    if m is not None:
        rows.append(["kept", *(f"{int(m[t].sum())}/{shape[1]}" for t in range(shape[0]))])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    fmt = lambda r: "  ".join(x.ljust(w) if c == 0 else x.rjust(w) for c, (x, w) in enumerate(zip(r, widths)))
    lines = [fmt(header), *(fmt(r) for r in rows)]
    if m is not None and s is not None:
        lines.append("x: layer dropped for that task")
    return "\n".join(lines)
