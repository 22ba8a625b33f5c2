"""The LwPTV stage: score layers, mask them per task, prune the task vectors, merge.

``jmerge.merge(base, experts, method, lwptv=LwPTV(layers="bert", score=..., rule=..., value=...))``
(or ``lwptv=`` a :class:`~jmerge.lwptv.masks.LayerMask`) runs

1. saliency scores ``s = score(tvs, base, grouping)``, ``(K, L)``, in one jit;
2. the mask rule on the host, giving an explicit ``(K, L)`` :class:`LayerMask`;
3. in one jit: ``tau~_t^l = m_t^l tau_t^l`` (:func:`prune`), the method on the pruned
   task vectors, and :func:`keep_base`, which puts the base weights back, bit for bit, in
   every layer no task keeps ("only keeping the pre-trained model parameters at the
   corresponding layer", the LwPTV abstract). Methods that do not map zero task vectors
   exactly to the base (rounding, SLERP) therefore still give the base there. Methods
   that take a ``task_mask`` (``Method.task_mask``: TSV-M, Iso-C, Iso-CTS) get, per leaf, which
   tasks keep it, and merge each leaf over those tasks only, not over the dropped tasks' zeros.

They plug into :func:`jmerge.merge` as a pre/post pair around the method (:func:`stage`). An
all-True mask runs the method itself, so it reproduces it bit for bit. :func:`prune` and :func:`keep_base` are
pure functions on task-vector pytrees, usable inside any jit (e.g. before learning merge
coefficients, ``jmerge.learn``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import layers as jlayers
from jmerge.tree import PyTree
from jmerge import validate
from jmerge.lwptv import masks as jmasks
from jmerge.lwptv import presets
from jmerge.lwptv import scores as jscores
from jmerge.lwptv.masks import LayerMask
from jmerge.validate import MergeInputError


@dataclass(frozen=True)
class LwPTV:
    """How LwPTV picks the layers to keep.

    Attributes:
      layers: the layer grouping: a preset name (``"bert"``, ``"gpt2"``, ``"llama"``,
        ``"vit"``, ``"clip"``, ``"jmerge_bert"``), ``"tensor"``, a regex, a callable or a ready
        ``LayerGrouping`` (see :func:`jmerge.lwptv.presets.group`).
      score: a name from ``jmerge.lwptv.SCORES`` or a callable ``(tvs, base, grouping) -> (K, L)``.
        Default ``trim_survival``, the score closest to the abstract's "redundancy"; on Suite T
        ``relative_update`` gave identical validation results at keep ratio 6/7, so the evidence
        does not separate them (``experiments/results/lwptv.md``).
      rule: ``"keep_ratio"``, ``"top_k"`` or ``"threshold"`` (:mod:`jmerge.lwptv.masks`).
      value: the rule's parameter: the ratio in [0, 1], k, or tau.
      score_kwargs: the score's hyper-parameters, e.g. ``{"density": 0.1}``.
      normalize: per-task score normalisation before a threshold (None, "max", "minmax").
      unassigned: what to do with parameters the layer rule misses ("error", "own", "rest").
      task_names: names for the mask's rows (default ``task_0``, ``task_1``, ...).
    """

    layers: Any
    score: Any = "trim_survival"
    rule: str = "keep_ratio"
    value: float = 0.8
    score_kwargs: Mapping[str, Any] = field(default_factory=dict)
    normalize: str | None = None
    unassigned: str = "error"
    task_names: Sequence[str] | None = None

    def check(self, num_layers: int | None = None) -> None:
        """Validates names and values (``k <= num_layers`` once the grouping is known)."""
        jscores._check_kwargs(jscores.get_score(self.score), dict(self.score_kwargs))
        if self.rule not in jmasks.RULES:
            raise MergeInputError(f"unknown mask rule {self.rule!r} (rules: {', '.join(jmasks.RULES)})")
        if self.rule == "keep_ratio":
            validate.check_fraction("keep ratio", self.value, low_open=False)
        elif self.rule == "top_k":
            k = self.value
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
                raise MergeInputError(f"top_k value k={k!r} must be a non-negative integer")
            if num_layers is not None and k > num_layers:
                raise MergeInputError(f"top_k value k={k} exceeds the {num_layers} layers")
        elif not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise MergeInputError(f"threshold value tau={self.value!r} must be a finite number")
        if self.normalize not in (None, "max", "minmax"):
            raise MergeInputError(f"normalize must be None, 'max' or 'minmax', got {self.normalize!r}")
        if self.unassigned not in ("error", "own", "rest"):
            raise MergeInputError(f"unassigned must be 'error', 'own' or 'rest', got {self.unassigned!r}")


def _mask_array(mask, grouping: jlayers.LayerGrouping, num_tasks: int):
    """The ``(K, L)`` boolean array of ``mask`` in ``grouping``'s layer order, checked."""
    if isinstance(mask, LayerMask):
        if mask.layer_names != grouping.names:
            if set(mask.layer_names) != set(grouping.names):
                missing = [n for n in grouping.names if n not in mask.layer_names]
                unexpected = [n for n in mask.layer_names if n not in grouping.names]
                raise MergeInputError(
                    f"the mask's layers do not match the grouping's: expected {list(grouping.names)[:8]}"
                    f"{'...' if grouping.num_layers > 8 else ''}, got {list(mask.layer_names)[:8]}"
                    f"{'...' if mask.num_layers > 8 else ''}; missing from the mask {missing[:5]}, "
                    f"not in the grouping {unexpected[:5]}"
                )
            cols = [mask.layer_names.index(n) for n in grouping.names]
            mask = dataclasses.replace(mask, mask=mask.mask[:, cols], layer_names=grouping.names)
        arr = mask.mask
    else:
        arr = mask
    shape = tuple(np.shape(arr))
    expected = (num_tasks, grouping.num_layers)
    if shape != expected:
        raise MergeInputError(
            f"layer mask has shape {shape}, expected (num_tasks, num_layers) = {expected} "
            f"(layers: {list(grouping.names)[:8]}{'...' if grouping.num_layers > 8 else ''})"
        )
    return arr


def _grouping_for(params, layers, mask) -> jlayers.LayerGrouping:
    if isinstance(layers, jlayers.LayerGrouping):
        return layers
    if layers is None:
        layers = mask.layers if isinstance(mask, LayerMask) else None
        if layers is None:
            raise MergeInputError(
                "the mask does not say which layer rule its names come from: build it with "
                "LayerMask(..., layers='bert' or a regex), or pass the grouping"
            )
    return presets.group(params, layers)


def prune(tvs: Sequence[PyTree], mask, grouping=None) -> list[PyTree]:
    """LwPTV's layer-wise pruning: ``tau~_t^l = m_t^l * tau_t^l``.

    Args:
      tvs: K task-vector pytrees.
      mask: a :class:`LayerMask` or a ``(K, L)`` boolean array (numpy, or jax, also traced).
      grouping: a ``LayerGrouping`` or a layer spec (preset name, regex, callable); default the
        mask's own ``layers``.

    Returns K pytrees in which every dropped layer is 0 and every kept one is ``tau`` unchanged.
    """
    if not isinstance(tvs, (list, tuple)) or not tvs:
        raise MergeInputError("prune needs a non-empty list of task vectors")
    grouping = _grouping_for(tvs[0], grouping, mask)
    arr = jnp.asarray(_mask_array(mask, grouping, len(tvs)), bool)
    out = []
    for t, tv in enumerate(tvs):
        leaves, treedef = jax.tree.flatten(tv)
        if len(leaves) != len(grouping.leaf_layer):
            raise MergeInputError(f"task vector {t} has {len(leaves)} parameters, the grouping {len(grouping.leaf_layer)}")
        out.append(jax.tree.unflatten(treedef, [jnp.where(arr[t, l], x, 0) for x, l in zip(leaves, grouping.leaf_layer)]))
    return out


def keep_base(merged: PyTree, base: PyTree, mask, grouping) -> PyTree:
    """``merged`` with each layer that no task keeps replaced by the base layer, bit for bit."""
    grouping = _grouping_for(base, grouping, mask)
    arr = mask.mask if isinstance(mask, LayerMask) else mask
    arr = jnp.asarray(_mask_array(mask, grouping, arr.shape[0]), bool)
    dropped = ~jnp.any(arr, axis=0)
    m_leaves, treedef = jax.tree.flatten(merged)
    b_leaves = jax.tree.leaves(base)
    return jax.tree.unflatten(
        treedef,
        [jnp.where(dropped[l], b, m.astype(b.dtype)) for m, b, l in zip(m_leaves, b_leaves, grouping.leaf_layer)],
    )


def select(base: PyTree, experts: Sequence[PyTree], config: LwPTV) -> tuple[jlayers.LayerGrouping, jax.Array, LayerMask]:
    """Grouping, scores and mask for ``config`` (no model validation: see :func:`inspect`)."""
    config.check()
    grouping = presets.group(base, config.layers, unassigned=config.unassigned)
    config.check(grouping.num_layers)
    k = len(experts)
    if config.task_names is not None and len(config.task_names) != k:
        raise MergeInputError(f"LwPTV task_names has {len(config.task_names)} names for {k} experts")
    s = jscores.compute_from_experts(base, experts, grouping, config.score, **dict(config.score_kwargs))
    mask = jmasks.make_mask(
        np.asarray(s),
        config.rule,
        config.value,
        layer_names=grouping.names,
        task_names=config.task_names,
        normalize_by=config.normalize,
        layers=config.layers if isinstance(config.layers, (str, presets.Preset, re.Pattern)) else None,
    )
    return grouping, s, mask


def inspect(base: PyTree, experts: Sequence[PyTree], config: LwPTV | None = None, **fields) -> tuple[np.ndarray, LayerMask]:
    """Scores ``(K, L)`` and the mask LwPTV would use, for tables and plots.

    ``config`` is an :class:`LwPTV`, or pass its fields: ``inspect(base, experts, layers="bert",
    score="relative_update", rule="keep_ratio", value=0.8)``.
    """
    if config is None:
        config = LwPTV(**fields)
    elif fields:
        config = dataclasses.replace(config, **fields)
    validate.check_models(base, experts)
    _, s, mask = select(base, list(experts), config)
    return np.asarray(s), mask


@dataclass(frozen=True)
class _Prune:
    """``pre`` of :func:`jmerge.merge`: :func:`prune` with a traced mask (hashable: one
    compilation per grouping, whatever the mask)."""

    grouping: jlayers.LayerGrouping

    def __call__(self, tvs, mask):
        return prune(tvs, mask, self.grouping)


@dataclass(frozen=True)
class _KeepBase:
    """``post`` of :func:`jmerge.merge`: :func:`keep_base` with a traced mask."""

    grouping: jlayers.LayerGrouping

    def __call__(self, merged, base, mask):
        return keep_base(merged, base, mask, self.grouping)


def _pruned_experts(base, experts, arr: np.ndarray, grouping) -> list[PyTree]:
    """The experts with every layer their task drops replaced by the base's leaves: their task
    vectors are exactly :func:`prune`'s (``b - b = 0``), and nothing is computed."""
    base_leaves, treedef = jax.tree.flatten(base)
    return [
        jax.tree.unflatten(treedef, [x if arr[t, l] else b for x, b, l in zip(jax.tree.leaves(e), base_leaves, grouping.leaf_layer)])
        for t, e in enumerate(experts)
    ]


def stage(base, experts, lwptv) -> tuple:
    """The ``lwptv=`` path of :func:`jmerge.merge` (inputs already validated): ``(pre, post,
    mask, measured, leaf_tasks)``, LwPTV's prune and keep_base for the jitted merge, the
    ``(K, L)`` mask they take, the experts a sparsifier's thresholds are measured on (the
    pruned ones), and per leaf which tasks keep it (the static ``task_mask`` of methods that
    take one: a dropped task leaves that leaf's SVD merge instead of entering it as zeros).

    An all-True mask gives no ``pre``/``post``: the method itself runs, bit for bit
    (recompiling it with them can change the last bit of some methods, e.g. multislerp).
    """
    experts = list(experts)
    if isinstance(lwptv, LwPTV):
        grouping, _, mask = select(base, experts, lwptv)
    elif isinstance(lwptv, LayerMask):
        mask = lwptv
        grouping = _grouping_for(base, None, mask)
    else:
        raise MergeInputError(f"lwptv must be an LwPTV config or a LayerMask, got {type(lwptv).__name__}")
    arr = np.asarray(_mask_array(mask, grouping, len(experts)), bool)
    if arr.all():
        return None, None, None, experts, None
    # Methods that take task_mask (per-matrix SVD merges) leave a task out of each leaf it drops
    # instead of merging its zeros; the mask is static: it sets the number of matrices per SVD.
    leaf_tasks = tuple(tuple(map(bool, arr[:, l])) for l in grouping.leaf_layer)
    return _Prune(grouping), _KeepBase(grouping), arr, _pruned_experts(base, experts, arr, grouping), leaf_tasks
