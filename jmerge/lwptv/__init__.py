"""LwPTV: layer-wise pruning of task vectors, composable with every merge method.

LwPTV (Zhang et al., 2025, "Merging Smarter, Generalizing Better", arXiv 2506.09093)
scores each task vector's layers, masks the least salient layers of each task, and merges
the pruned task vectors, so a layer no task keeps holds the pre-trained weights. Its exact
score is not public; the scores here are our own, documented designs (:mod:`.scores`).

    import jmerge
    from jmerge.lwptv import LwPTV
    merged = jmerge.merge(base, experts, "ties", lwptv=LwPTV(layers="bert", score="trim_survival",
                                                              rule="keep_ratio", value=0.8))
    scores, mask = jmerge.lwptv.inspect(base, experts, layers="bert", score="relative_update")
    print(mask)                                   # table: layers x tasks, keep/drop
    jmerge.lwptv.plot_scores(scores, mask.layer_names, mask.task_names, "scores.png", mask=mask)

Modules: :mod:`.presets` (layer grouping), :mod:`.scores`, :mod:`.masks` (LayerMask and
rules), :mod:`.stage` (prune, merge integration), :mod:`.plot`.
"""

from jmerge.lwptv.masks import LayerMask, RULES, keep_ratio, make_mask, normalize, table, threshold, top_k
from jmerge.lwptv.plot import plot_mask, plot_scores
from jmerge.lwptv.presets import PRESETS, Preset, get_preset, group
from jmerge.lwptv.scores import (
    SCORES,
    compute as compute_scores,
    cross_task_agreement,
    energy_concentration,
    get_score,
    layer_sum,
    relative_update,
    sign_agreement,
    task_leaf_sums,
    trim_survival,
)
from jmerge.lwptv.stage import LwPTV, inspect, keep_base, prune, select

__all__ = [
    "LayerMask",
    "LwPTV",
    "PRESETS",
    "Preset",
    "RULES",
    "SCORES",
    "compute_scores",
    "cross_task_agreement",
    "energy_concentration",
    "get_preset",
    "get_score",
    "group",
    "inspect",
    "keep_base",
    "keep_ratio",
    "layer_sum",
    "make_mask",
    "normalize",
    "plot_mask",
    "plot_scores",
    "prune",
    "relative_update",
    "select",
    "sign_agreement",
    "task_leaf_sums",
    "table",
    "threshold",
    "top_k",
    "trim_survival",
]
