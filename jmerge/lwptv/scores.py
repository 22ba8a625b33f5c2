"""Per-task, per-layer saliency scores of task vectors for LwPTV.

A score is a function ``(tvs, base, grouping, **hparams) -> (num_tasks, num_layers)``
float32 array, traceable under ``jax.jit``. **Higher means more salient, so the layer is
kept**; the mask rules in :mod:`jmerge.lwptv.masks` drop the lowest-scoring layers of each task.

Origin. The LwPTV abstract (Zhang et al., 2025, arXiv 2506.09093) says only that the score
"measur[es] the redundancy of parameters in task vectors" and yields a layer mask per
task; its formula is not available to us. **Every score here is
our own design** in the spirit of that sentence; none claims to reproduce the paper.

Each score works on all tasks and layers at once in one jit: per-leaf, per-task partial
sums (:func:`task_leaf_sums`, the task loop unrolled at trace time, which XLA fuses)
and one segment-sum per quantity over the layer grouping (:func:`layer_sum`). Scores do not depend
on the order of the tasks (permuting tasks permutes the rows, up to float rounding of sums
over tasks in :func:`cross_task_agreement` and :func:`sign_agreement`).
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge._util import did_you_mean, register_cache
from jmerge import layers as jlayers
from jmerge import stages, thresholds
from jmerge import tree as jtree
from jmerge.tree import PyTree
from jmerge.validate import MergeInputError, check_fraction

ScoreFn = Callable[..., jax.Array]


# ---------------------------------------------------------------------------- helpers
def task_leaf_sums(fn: Callable[..., jax.Array], *task_trees: Sequence[PyTree]) -> list[jax.Array]:
    """One ``(K,)`` array per leaf (leaf order): ``[fn(a_t[leaf], b_t[leaf], ...) for t in tasks]``.

    ``task_trees`` are lists of K pytrees each (task vectors, masks, ...); ``fn`` reduces
    leaves to a scalar. The loop over tasks is unrolled at trace time, which XLA fuses into
    one pass per leaf; stacking the task vectors instead was slower and materialised
    ``K x model`` (bench/lwptv_bench.py).
    """
    leaves = [[jax.tree.leaves(tree) for tree in trees] for trees in task_trees]  # [arg][task][leaf]
    num_tasks, num_leaves = len(leaves[0]), len(leaves[0][0])
    return [jnp.stack([fn(*(arg[t][i] for arg in leaves)) for t in range(num_tasks)]) for i in range(num_leaves)]


def layer_sum(per_leaf: Sequence[jax.Array], grouping: jlayers.LayerGrouping) -> jax.Array:
    """Adds per-leaf values (each ``(K,)`` or scalar) into per-layer ones, ``(K, L)`` or ``(L,)``,
    with one segment-sum over ``grouping.leaf_layer`` (dtype kept)."""
    parts = jnp.stack([jnp.asarray(p) for p in per_leaf], axis=0)  # (n_leaves, [K])
    ids = jnp.asarray(np.asarray(grouping.leaf_layer, np.int32))
    return jax.ops.segment_sum(parts, ids, num_segments=grouping.num_layers).T


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 where ``den`` is 0 (a layer with no update scores 0)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise MergeInputError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _f32(tvs: Sequence[PyTree]) -> list[PyTree]:
    return [jax.tree.map(lambda x: x.astype(jnp.float32), tv) for tv in tvs]


_sq = lambda x: jnp.sum(x * x)


# ---------------------------------------------------------------------------- scores
def trim_survival(tvs, base, grouping, *, density: float = 0.2, measure: str = "energy", answers=None) -> jax.Array:
    """Share of a layer's update that survives a global top-``density`` magnitude trim.

    ``m_t = 1[|tau_t| >= kth_t]``, ``kth_t`` the ``int(density * n)``-th largest ``|tau_t|``
    over the whole task vector (the TIES trim at the same density, ``jmerge.stages.magnitude_trim``;
    ``answers``: those thresholds, solved before ``jit`` by :func:`jmerge.thresholds.solve`).
    ``measure="energy"``: ``s_t^l = sum_{i in l} m_ti tau_ti^2 / sum_{i in l} tau_ti^2``;
    ``measure="count"``: ``s_t^l = #{i in l: m_ti, tau_ti != 0} / n_l``.

    Orientation: a layer whose update is mostly trimmed away holds only small, redundant
    entries of the task vector (low score, dropped first); a layer that keeps many of the
    task's largest entries scores high. Origin: our own design, reading the abstract's
    "redundancy of parameters in task vectors" through TIES' observation that small
    entries are redundant (Yadav et al., 2023).
    """
    check_fraction("density", density)
    _choice("measure", measure, ("energy", "count"))
    tvs = _f32(tvs)
    answers = answers or thresholds.solve(_trim_query(grouping, density), tvs)
    keep = [[thresholds.keep(x, a[0]) for x in jax.tree.leaves(tv)] for tv, a in zip(tvs, answers)]
    if measure == "energy":
        num = task_leaf_sums(lambda m, x: jnp.sum(jnp.where(m, x * x, 0.0)), keep, tvs)
        return _ratio(layer_sum(num, grouping), layer_sum(task_leaf_sums(_sq, tvs), grouping))
    kept = layer_sum(task_leaf_sums(lambda m, x: jnp.sum(m & (x != 0), dtype=jnp.float32), keep, tvs), grouping)
    sizes = jlayers.layer_sizes(base, grouping).astype(np.float32)
    return kept / jnp.asarray(sizes)[None, :]


def relative_update(tvs, base, grouping) -> jax.Array:
    """Size of the update relative to the pre-trained weights: ``s_t^l = ||tau_t^l||_F / ||theta_0^l||_F``.

    Norms are over all entries of the layer; ``||theta_0^l||_F`` is floored at 1e-12. Orientation:
    a layer the fine-tuning barely moved (relative to its own scale) is redundant for the
    task (low score, dropped first). Origin: our own design (the abstract does not say the
    score involves the base weights).
    """
    tau_sq = layer_sum(task_leaf_sums(_sq, _f32(tvs)), grouping)
    base_sq = layer_sum([_sq(b.astype(jnp.float32)) for b in jax.tree.leaves(base)], grouping)
    return jnp.sqrt(tau_sq) / jnp.maximum(jnp.sqrt(base_sq), 1e-12)[None, :]


def cross_task_agreement(tvs, base, grouping) -> jax.Array:
    """Cosine between a task's layer update and the other tasks' summed update:
    ``s_t^l = <tau_t^l, o_t^l> / (||tau_t^l|| ||o_t^l||)``, ``o_t^l = sum_{j != t} tau_j^l``,
    in [-1, 1]; 0 when either vector is 0 (so every layer scores 0 with one task).

    Orientation: a layer whose update conflicts with the other tasks (negative cosine) or
    is orthogonal to them (task-specific) scores low and is dropped first; layers whose
    update is shared with other tasks are kept. Origin: our own design (cross-task
    conflict, the interference TIES measures).
    """
    tvs = _f32(tvs)
    totals = [jtree.add(*tvs)] * len(tvs)
    dot = layer_sum(task_leaf_sums(lambda x, s: jnp.sum(x * (s - x)), tvs, totals), grouping)
    nx = layer_sum(task_leaf_sums(_sq, tvs), grouping)
    no = layer_sum(task_leaf_sums(lambda x, s: _sq(s - x), tvs, totals), grouping)
    return _ratio(dot, jnp.sqrt(nx) * jnp.sqrt(no))


def sign_agreement(tvs, base, grouping, *, sign: str = "sum", weighting: str = "magnitude") -> jax.Array:
    """Share of a layer's update that agrees with the TIES elected sign.

    ``gamma = jmerge.stages.elect_sign(tvs, sign)``; ``a_ti = 1[sign(tau_ti) = gamma_i]``.
    ``weighting="magnitude"``: ``s_t^l = sum_{i in l} a_ti |tau_ti| / sum_{i in l} |tau_ti|``
    (the share of the layer's L1 mass TIES' disjoint merge would use);
    ``weighting="count"``: ``s_t^l = #{i in l: a_ti} / #{i in l: tau_ti != 0}``.

    Orientation: layers whose update is mostly outvoted by the other tasks' signs score low
    and are dropped first. Origin: our own design, built on TIES' sign election (Yadav et al., 2023).
    """
    _choice("sign", sign, ("sum", "count"))
    _choice("weighting", weighting, ("magnitude", "count"))
    tvs = _f32(tvs)
    agree = stages.agreement_masks(tvs, stages.elect_sign(tvs, sign))
    if weighting == "magnitude":
        num = task_leaf_sums(lambda a, x: jnp.sum(jnp.where(a, jnp.abs(x), 0.0)), agree, tvs)
        den = task_leaf_sums(lambda x: jnp.sum(jnp.abs(x)), tvs)
    else:
        num = task_leaf_sums(lambda a: jnp.sum(a, dtype=jnp.float32), agree)
        den = task_leaf_sums(lambda x: jnp.sum(x != 0, dtype=jnp.float32), tvs)
    return _ratio(layer_sum(num, grouping), layer_sum(den, grouping))


def energy_concentration(tvs, base, grouping, *, top: float = 0.05, answers=None) -> jax.Array:
    """Share of a layer's update energy held by its largest entries:
    ``s_t^l = sum_{i in l, |tau_ti| >= kth_tl} tau_ti^2 / ||tau_t^l||^2``, ``kth_tl`` the
    ``max(1, int(top * n_l))``-th largest ``|tau_t|`` within layer l.

    Orientation: a concentrated (sparse, structured) update scores high and is kept; an
    update spread evenly over the layer's entries, like noise, scores low and is dropped
    first (i.i.d. Gaussian entries give about 0.28 at ``top=0.05``; a constant update gives
    ``top``). Origin: our own design (an entry-wise concentration measure;
    TSV's finding that task matrices are low-rank motivates it).
    """
    check_fraction("top", top)
    tvs = _f32(tvs)
    answers = answers or thresholds.solve(_energy_query(grouping, top), tvs)  # one search per task and layer
    num = []
    for tv, a in zip(tvs, answers):
        kth = a[0]  # per layer
        leaves = jax.tree.leaves(tv)
        num.append(jnp.stack([jnp.sum(jnp.where(thresholds.keep(x, kth[l]), x * x, 0.0)) for x, l in zip(leaves, grouping.leaf_layer)]))
    return _ratio(layer_sum(list(jnp.stack(num, axis=1)), grouping), layer_sum(task_leaf_sums(_sq, tvs), grouping))


def _trim_query(grouping, density: float = 0.2, measure: str = "energy") -> thresholds.Query:
    """:func:`trim_survival`'s thresholds: the ``int(density n)``-th largest ``|tau_t|`` of the task vector."""
    return thresholds.Query("global", lambda t, n: (thresholds.keep_count(density, n),))


def _energy_query(grouping, top: float = 0.05) -> thresholds.Query:
    """:func:`energy_concentration`'s thresholds: the ``max(1, int(top n_l))``-th largest of each layer."""
    units = tuple(tuple(i for i, l in enumerate(grouping.leaf_layer) if l == layer) for layer in range(grouping.num_layers))
    return thresholds.Query(units, lambda t, n: (max(1, int(top * n)),))


QUERIES = {trim_survival: _trim_query, energy_concentration: _energy_query}  # scores that rank magnitudes

SCORES: dict[str, ScoreFn] = {
    "trim_survival": trim_survival,
    "relative_update": relative_update,
    "cross_task_agreement": cross_task_agreement,
    "sign_agreement": sign_agreement,
    "energy_concentration": energy_concentration,
}


def get_score(score: str | ScoreFn) -> ScoreFn:
    """A score function by name (closest name suggested for typos), or ``score`` if callable."""
    if callable(score):
        return score
    if score not in SCORES:
        hint = did_you_mean(score, SCORES)
        raise MergeInputError(f"unknown saliency score {score!r}{hint} (available: {', '.join(SCORES)})")
    return SCORES[score]


def _check_kwargs(fn: ScoreFn, kwargs: dict) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "answers"]
    for name in kwargs:
        if name not in known:
            hint = did_you_mean(name, known)
            raise MergeInputError(
                f"score {getattr(fn, '__name__', fn)!r} has no parameter {name!r}{hint} (known: {', '.join(known) or 'none'})"
            )


def check_inputs(tvs: Sequence[PyTree], base: PyTree, grouping: jlayers.LayerGrouping) -> None:
    """At least one task vector, each with the base's parameters, all grouped by ``grouping``."""
    if not isinstance(tvs, (list, tuple)) or len(tvs) == 0:
        raise MergeInputError("saliency scores need a non-empty list of task vectors")
    base_paths = tuple(jtree.paths(base))
    if base_paths != tuple(grouping.leaf_paths):
        extra = sorted(set(base_paths) - set(grouping.leaf_paths))[:5]
        missing = sorted(set(grouping.leaf_paths) - set(base_paths))[:5]
        raise MergeInputError(
            f"the layer grouping was built for other parameters: not grouped {extra}, grouped but absent {missing}"
        )
    for t, tv in enumerate(tvs):
        if tuple(jtree.paths(tv)) != base_paths:
            raise MergeInputError(f"task vector {t} does not have the base's parameters")


_JITTED: dict = {}
register_cache(_JITTED.clear)


def _jitted(fn: ScoreFn, grouping, kwargs: dict, from_experts: bool):
    key = (fn, grouping, tuple(sorted(kwargs.items())), from_experts)
    if key not in _JITTED:

        def run(base, models, answers):
            tvs = jtree.task_vectors(base, models) if from_experts else models
            solved = {} if answers is None else {"answers": answers}
            return fn(list(tvs), base, grouping, **solved, **kwargs).astype(jnp.float32)

        _JITTED[key] = jax.jit(run)
    return _JITTED[key]


def _answers(fn: ScoreFn, grouping, kwargs: dict, models, base=None):
    """The thresholds a magnitude-ranking score needs, by :func:`jmerge.thresholds.solve`
    outside ``jit`` (host or mesh for concrete inputs), or None."""
    query = QUERIES.get(fn)
    return None if query is None else thresholds.solve(query(grouping, **kwargs), list(models), base)


def compute(tvs, base, grouping, score: str | ScoreFn = "trim_survival", **kwargs) -> jax.Array:
    """Scores ``(num_tasks, num_layers)`` of task vectors ``tvs``, in one ``jax.jit``."""
    fn = get_score(score)
    _check_kwargs(fn, kwargs)
    check_inputs(tvs, base, grouping)
    answers = _answers(fn, grouping, kwargs, tvs)
    return _check_shape(_jitted(fn, grouping, kwargs, False)(base, list(tvs), answers), len(tvs), grouping, fn)


def compute_from_experts(base, experts, grouping, score: str | ScoreFn = "trim_survival", **kwargs) -> jax.Array:
    """Like :func:`compute`, with the task vectors ``experts - base`` formed inside the jit."""
    fn = get_score(score)
    _check_kwargs(fn, kwargs)
    answers = _answers(fn, grouping, kwargs, experts, base)
    return _check_shape(_jitted(fn, grouping, kwargs, True)(base, list(experts), answers), len(experts), grouping, fn)


def _check_shape(scores: jax.Array, k: int, grouping, fn) -> jax.Array:
    if scores.shape != (k, grouping.num_layers):
        raise MergeInputError(
            f"score {getattr(fn, '__name__', fn)!r} returned shape {scores.shape}, expected "
            f"(num_tasks, num_layers) = ({k}, {grouping.num_layers})"
        )
    return scores
