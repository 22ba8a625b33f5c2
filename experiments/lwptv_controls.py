"""LwPTV's score-free controls and the masked merges, shared by the LwPTV control studies
(:mod:`experiments.study_t2_lwptv` on Suite T v2, :mod:`experiments.study_v_lwptv_controls` on
Suite V; issue 13: "LwPTV must beat score-free controls at the same keep ratio").

Variants of a base method, all at ``k`` kept layers of the ``L`` of the layer grouping and all
merged through ``jmerge.merge(..., lwptv=LayerMask)`` (:func:`merge`):

- ``plain``: the method alone;
- ``lwptv``: LwPTV's own mask (the study's score and rule);
- ``first_layers``: control (a), every task drops the first ``L - k`` layers (:func:`first_layers_mask`);
- ``random``: control (b), each task keeps ``k`` layers drawn uniformly (:func:`random_mask`),
  seeds :data:`RANDOM_SEEDS`, each draw seeded by the seed and the merged tasks (:func:`control_mask`).

:func:`distinct_masks` counts how varied a run's masks are; :func:`verdict` states the targets
on a study's mean-over-methods difference rows.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import jax
import numpy as np

import jmerge
from jmerge.lwptv import LayerMask, keep_ratio

VARIANTS = ("plain", "lwptv", "first_layers", "random")
CONTROLS = ("first_layers", "random")
RANDOM_SEEDS = (0, 1, 2)
ID_TOLERANCE = 0.5  # ID points LwPTV may lose (the target's bound)


def runs(seeds: Sequence[int] = RANDOM_SEEDS) -> list[tuple[str, int]]:
    """The ``(variant, seed)`` merges of one fold: one of each variant, ``random`` once per seed."""
    return [(v, s) for v in VARIANTS for s in (seeds if v == "random" else (0,))]


def check_k(k: int, num_layers: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= num_layers:
        raise ValueError(f"kept layers k={k!r} must be an integer in [0, {num_layers}]")


def kept_layers(ratio: float, num_layers: int) -> int:
    """The layers per task LwPTV's ``keep_ratio`` rule keeps of ``num_layers`` (jmerge's own
    rounding, :func:`jmerge.lwptv.keep_ratio`: ``floor(ratio * L + 0.5)``)."""
    return int(keep_ratio(np.zeros((1, num_layers)), ratio).sum())


def first_layers_mask(num_tasks: int, num_layers: int, k: int) -> np.ndarray:
    """Control (a): ``(K, L)`` mask in which every task drops the first ``L - k`` layers."""
    check_k(k, num_layers)
    mask = np.ones((num_tasks, num_layers), bool)
    mask[:, : num_layers - k] = False
    return mask


def random_mask(num_tasks: int, num_layers: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Control (b): ``(K, L)`` mask in which each task keeps ``k`` layers drawn uniformly."""
    check_k(k, num_layers)
    mask = np.zeros((num_tasks, num_layers), bool)
    for t in range(num_tasks):
        mask[t, rng.choice(num_layers, k, replace=False)] = True
    return mask


def control_mask(variant: str, num_tasks: int, num_layers: int, k: int, seed: int,
                 task_ids: Sequence[int]) -> np.ndarray:
    """The ``(K, L)`` mask of a control ``variant``; ``random`` draws from
    ``numpy.random.default_rng([seed, *task_ids])`` (``task_ids``: the merged tasks' indices in
    the suite, so each fold and seed has its own draw)."""
    if variant == "first_layers":
        return first_layers_mask(num_tasks, num_layers, k)
    if variant == "random":
        return random_mask(num_tasks, num_layers, k, np.random.default_rng([seed, *map(int, task_ids)]))
    raise ValueError(f"unknown control {variant!r} (controls: {', '.join(CONTROLS)})")


def distinct_masks(masks: Sequence[np.ndarray]) -> dict:
    """How varied the ``(K, L)`` masks of a run are: ``task_masks`` (task rows over all folds),
    ``distinct`` (distinct rows among them), ``uniform_folds`` (folds whose tasks all share one
    row: a per-task mask that is not per task)."""
    rows = [tuple(map(bool, r)) for m in masks for r in np.asarray(m, bool)]
    return {"task_masks": len(rows), "distinct": len(set(rows)),
            "uniform_folds": sum(len({tuple(r) for r in np.asarray(m, bool)}) == 1 for m in masks)}


def method_kwargs(setting: dict) -> dict:
    """A method's stored hyper-parameters as ``jmerge.merge`` keywords (an integer ``key`` becomes a JAX key)."""
    hp = dict(setting)
    if "key" in hp:
        hp["key"] = jax.random.key(hp["key"])
    return hp


def merge(base, experts: Sequence, method: str, setting: dict, mask: np.ndarray | None, layer_names: Sequence[str],
          task_names: Sequence[str], layers) -> dict:
    """``method`` at ``setting`` on ``experts``, with the ``(K, L)`` ``mask`` as LwPTV's stage
    (``None``: the method alone); ``layer_names``/``layers``: the grouping the mask's columns follow."""
    hp = method_kwargs(setting)
    if mask is not None:
        hp["lwptv"] = LayerMask(np.asarray(mask, bool), tuple(layer_names), tuple(task_names), layers)
    return jax.block_until_ready(jmerge.merge(base, experts, method, **hp))


def complete(folds: Sequence[dict], method: str, fold_key: Callable[[dict], Hashable],
             seeds: Sequence[int] = RANDOM_SEEDS) -> set:
    """The folds (by ``fold_key``) on which ``method`` has every variant of :func:`runs`."""
    want = set(runs(seeds))
    have: dict = {}
    for f in folds:
        if f["method"] == method:
            have.setdefault(fold_key(f), set()).add((f["variant"], f["seed"]))
    return {k for k, v in have.items() if want <= v}


def verdict(rows: Sequence[dict], tolerance: float = ID_TOLERANCE) -> dict:
    """The targets on the mean-over-methods rows (``method`` starting ``"mean of"``, ``variant``
    ``"lwptv - X"``): OOD gain >= 3 at ID loss <= ``tolerance`` against ``plain``; against each
    control, an OOD difference whose CI is above 0 at ID loss <= ``tolerance``."""
    mean = {r["variant"]: r for r in rows if r["method"].startswith("mean of")}
    out = {"gain": mean["lwptv - plain"]["ood_acc"] >= 3 and mean["lwptv - plain"]["id_acc"] >= -tolerance}
    for c in CONTROLS:
        r = mean[f"lwptv - {c}"]
        out[f"beats_{c}"] = r["ci_low"] is not None and r["ci_low"] > 0 and r["id_acc"] >= -tolerance
    return out
