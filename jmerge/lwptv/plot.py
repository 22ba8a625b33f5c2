"""Heatmaps of LwPTV scores and masks (matplotlib, Agg, PNG written atomically).

Rows are tasks and columns layers, in the grouping's order (embeddings first for presets).
Uses ``matplotlib.figure.Figure`` directly, so no pyplot state or GUI backend is touched.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jmerge._util import atomic_write
from jmerge.lwptv.masks import LayerMask
from jmerge.validate import MergeInputError


def _figure(num_tasks: int, num_layers: int):
    from matplotlib.figure import Figure

    width = min(40.0, max(6.0, 0.3 * num_layers + 3.0))
    height = max(2.5, 0.45 * num_tasks + 2.2)
    return Figure(figsize=(width, height), layout="constrained")


def _axes_labels(ax, layer_names, task_names):
    step = max(1, len(layer_names) // 80)  # at most ~80 tick labels
    ax.set_xticks(range(0, len(layer_names), step), [layer_names[i] for i in range(0, len(layer_names), step)],
                  rotation=90, fontsize=7)
    ax.set_yticks(range(len(task_names)), list(task_names), fontsize=8)
    ax.set_xlabel("layer")


def _save(fig, path, overwrite: bool):
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), overwrite=overwrite)


def plot_scores(
    scores,
    layer_names: Sequence[str],
    task_names: Sequence[str],
    path,
    *,
    mask: LayerMask | np.ndarray | None = None,
    title: str | None = None,
    overwrite: bool = False,
):
    """Writes a heatmap of ``(K, L)`` scores to ``path`` (PNG); dropped cells of ``mask`` get an ``x``."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(task_names), len(layer_names)):
        raise MergeInputError(f"scores have shape {s.shape}, expected ({len(task_names)} tasks, {len(layer_names)} layers)")
    m = None if mask is None else np.asarray(mask.mask if isinstance(mask, LayerMask) else mask, bool)
    if m is not None and m.shape != s.shape:
        raise MergeInputError(f"mask has shape {m.shape}, scores {s.shape}")
    fig = _figure(*s.shape)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(s), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="saliency (higher = kept)")
    if m is not None:
        rows, cols = np.nonzero(~m)
        ax.scatter(cols, rows, marker="x", color="red", s=18, linewidths=1.0, label="dropped")
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.15), fontsize=7, frameon=False)
    _axes_labels(ax, list(layer_names), list(task_names))
    ax.set_title(title or "LwPTV saliency scores", fontsize=10)
    return _save(fig, path, overwrite)


def plot_mask(mask: LayerMask, path, *, title: str | None = None, overwrite: bool = False):
    """Writes the mask as a two-colour grid to ``path`` (PNG): dark = kept, light = dropped;
    the labels of layers no task keeps (base weights in the merge) are red."""
    from matplotlib.colors import ListedColormap

    if not isinstance(mask, LayerMask):
        raise MergeInputError(f"plot_mask needs a LayerMask, got {type(mask).__name__}")
    fig = _figure(mask.num_tasks, mask.num_layers)
    ax = fig.add_subplot()
    ax.imshow(mask.mask.astype(float), aspect="auto", cmap=ListedColormap(["#f0e6d2", "#2b5d8a"]), vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, mask.num_layers), minor=True)
    ax.set_yticks(np.arange(-0.5, mask.num_tasks), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    _axes_labels(ax, list(mask.layer_names), list(mask.task_names))
    base_layers = set(mask.dropped_by_all())
    for label in ax.get_xticklabels():
        if label.get_text() in base_layers:
            label.set_color("#b22222")
    kept = int(mask.mask.sum())
    note = f"; red: {len(base_layers)} layer(s) kept by no task = base weights" if base_layers else ""
    ax.set_title(title or f"LwPTV layer mask: {kept}/{mask.mask.size} task-layers kept (dark){note}", fontsize=10)
    return _save(fig, path, overwrite)
