"""Task-arithmetic family: average, task arithmetic, TIES, DARE, breadcrumbs, DELLA,
MagMax and TALL-mask consensus, each a preset of :mod:`jmerge.stages`.

Where implementations disagree, the choice is a named hyper-parameter:

* TIES trim scope: ``trim="global"`` (the paper and FusionBench rank over the whole
  flattened task vector) or ``"tensor"`` (mergekit and PEFT rank within each tensor).
* Sign election: ``sign="sum"`` (the paper's mass election, mergekit's default) or
  ``"count"`` (mergekit's ``consensus_method: count``, PEFT's ``frequency``).
* Disjoint combination: ``normalize=True`` divides by the summed weights of the agreeing
  tasks (the paper's disjoint mean; mergekit's ``normalize``), ``False`` sums them
  (AdaMerging and FusionBench's dis-sum).
* ``weights`` multiply each task vector before election (mergekit's per-model ``weight``).
"""

from __future__ import annotations

import jax
import numpy as np

from jmerge import collectives, selection, shard, stages
from jmerge import tree as jtree
from jmerge import validate
from jmerge.methods.registry import register


def _check(num_experts, hp, fractions=("density",), min_experts=1):
    """Checks shared by the family: expert count, fractions, weights, scale, sign and flags."""
    if num_experts < min_experts:
        raise validate.MergeInputError(f"this method needs at least {min_experts} experts, got {num_experts}")
    for name in fractions:
        if name in hp:
            validate.check_fraction(name, hp[name], count=num_experts)
    if hp.get("weights") is not None:
        validate.check_weights(hp["weights"], num_experts)
    if "scale" in hp:
        validate.check_finite_number("scale", hp["scale"])
    if "sign" in hp and hp["sign"] not in ("sum", "count"):
        raise validate.MergeInputError(f"sign must be 'sum' or 'count', got {hp['sign']!r}")
    for flag in ("normalize", "rescale"):
        if flag in hp and not isinstance(hp[flag], bool):
            raise validate.MergeInputError(f"{flag} must be True or False, got {hp[flag]!r}")


def _average_check(num_experts, hp):
    _check(num_experts, hp)
    if hp["normalize"] and hp["weights"] is not None and validate.concrete(hp["weights"]) and float(np.sum(hp["weights"])) == 0.0:
        raise validate.MergeInputError(f"average needs weights with a non-zero sum, got {hp['weights']!r}")


def _ties_check(num_experts, hp):
    _check(num_experts, hp)
    if hp["trim"] not in ("global", "tensor"):
        raise validate.MergeInputError(f"trim must be 'global' or 'tensor', got {hp['trim']!r}")
    th = hp.get("thresholds")
    if th is not None:  # one magnitude, or one pytree of per-tensor magnitudes, per task
        per_task = list(th) if isinstance(th, (list, tuple)) or np.ndim(th) == 1 else [th]
        leaves = [x for t in per_task for x in jax.tree.leaves(t) if validate.concrete(x)]
        values = np.asarray([np.asarray(x, np.float64) for x in leaves]).reshape(-1)
        if len(per_task) != num_experts or np.any(np.isnan(values)) or np.any(values < 0):
            raise validate.MergeInputError(
                f"thresholds must be {num_experts} magnitudes >= 0 (or pytrees of them, one per task), got {th!r}"
            )


def _weighted(tvs, weights):
    if weights is None:
        return list(tvs)
    return [jtree.scale(tv, w) for tv, w in zip(tvs, weights)]


def _elect_and_combine(base, tvs, weights, sign, normalize, scale):
    """Shared tail of the TIES-style methods: weight, elect, disjoint combine, apply."""
    weighted = _weighted(tvs, weights)
    gamma = stages.elect_sign(weighted, sign)
    masks = stages.agreement_masks(weighted, gamma)
    merged = stages.combine(tvs, weights, masks=masks, normalize=normalize)
    return jtree.apply(base, merged, scale)


@register("average", static=("normalize",), check=_average_check)
def average(base, tvs, *, key=None, weights=None, normalize=True):
    """Weighted parameter average: ``theta = sum_t w_t theta_t / sum_t w_t`` (model soup);
    ``normalize=False`` (mergekit ``linear`` with ``normalize: false``) gives ``sum_t w_t theta_t``."""
    if normalize:
        return jtree.apply(base, stages.combine(tvs, weights, normalize=True))
    total = len(tvs) if weights is None else sum(weights[i] for i in range(len(tvs)))  # sum_t w_t theta_t =
    mixed = stages.combine(tvs, weights)  # (sum_t w_t) theta_0 + sum_t w_t tau_t
    return jax.tree.map(lambda b, t: (total * b.astype(jtree.ACCUM_DTYPE) + t).astype(b.dtype), base, mixed)


@register("task_arithmetic", check=_check)
def task_arithmetic(base, tvs, *, key=None, scale=0.3, weights=None):
    """Task arithmetic (Ilharco et al., 2023): ``theta = theta_0 + lambda sum_t w_t tau_t``; lambda 0.3."""
    return jtree.apply(base, stages.combine(tvs, weights), scale)


_task_vectors = jax.jit(jtree.task_vectors)


def _ties_prepare(base, experts, hp):
    """Exact trim thresholds found before the jitted merge where that beats the jitted search
    of :func:`jmerge.stages.magnitude_trim` (which stays for accelerators and tracers):

    * inputs sharded over several devices: per-device counts and one ``psum`` per search step
      (:func:`jmerge.collectives.trim_thresholds`; the jitted search would all-gather a sample
      and small tensors), at the cost of the task vectors once more, sharded;
    * inputs on the host CPU: numpy's introselect on parallel threads (4 GPT-2-sized experts:
      bench/merge_bench.py), with one float32 copy of a task vector per thread.
    """
    if hp["thresholds"] is not None:
        return hp
    mesh = shard.mesh_of(base)
    if mesh is not None:
        tvs = _task_vectors(base, experts)
        return {**hp, "thresholds": tuple(collectives.trim_thresholds(tvs, hp["density"], mesh, scope=hp["trim"]))}
    if selection.on_host_cpu((base, experts)):
        return {**hp, "thresholds": selection.trim_thresholds(base, experts, hp["density"], scope=hp["trim"])}
    return hp


@register("ties", static=("density", "trim", "sign", "normalize", "rescale"), check=_ties_check, prepare=_ties_prepare)
def ties(
    base, tvs, *, key=None, density=0.2, scale=1.0, trim="global", sign="sum", weights=None, normalize=True,
    thresholds=None, rescale=False,
):
    """TIES (Yadav et al., 2023): trim to the top ``density`` magnitudes, elect signs, disjoint mean, scale.

    ``thresholds`` (per task one magnitude, or a pytree of per-tensor ones, e.g. the k-th
    largest found by a streaming first pass or by :mod:`jmerge.collectives` on a mesh)
    replaces the ranking: entries with ``|tau_t| >= thresholds[t]`` are kept. On a mesh of
    several devices, or on the host CPU, :func:`jmerge.merge` computes them before the jitted
    merge (:func:`_ties_prepare`). ``rescale`` multiplies each trimmed tensor back to its L1
    norm before the election (mergekit's ``rescale: true``, :func:`jmerge.stages.l1_rescale`).
    """
    trim_fn = stages.threshold_trim(thresholds) if thresholds is not None else stages.magnitude_trim(density, trim)
    trimmed = trim_fn(tvs)
    if rescale:
        trimmed = stages.l1_rescale(tvs, trimmed)
    return _elect_and_combine(base, trimmed, weights, sign, normalize, scale)


@register("dare_linear", static=("density", "rescale"), needs_key=True, check=_check)
def dare_linear(base, tvs, *, key=None, density=0.5, scale=1.0, weights=None, rescale=True):
    """DARE + task arithmetic (Yu et al., 2024): drop with rate ``1 - density``, rescale, weighted sum."""
    dropped = stages.dare(density, rescale)(tvs, key)
    return jtree.apply(base, stages.combine(dropped, weights), scale)


@register("dare_ties", static=("density", "rescale", "sign", "normalize"), needs_key=True, check=_check)
def dare_ties(base, tvs, *, key=None, density=0.5, scale=1.0, sign="sum", weights=None, rescale=True, normalize=True):
    """DARE + TIES: random drop and rescale instead of the magnitude trim, then elect and disjoint mean."""
    dropped = stages.dare(density, rescale)(tvs, key)
    return _elect_and_combine(base, dropped, weights, sign, normalize, scale)


def _breadcrumbs_check(num_experts, hp):
    _check(num_experts, hp)
    validate.check_fraction("gamma", hp["gamma"], low_open=False)
    th = hp["thresholds"]
    if th is not None and (len(th) != num_experts or any(len(pair) != 2 for pair in th)):
        raise validate.MergeInputError(f"thresholds must be {num_experts} (lower, upper) pairs, one per task")


def _breadcrumbs_prepare(base, experts, hp):
    """On a mesh of several devices, each tensor's two Breadcrumbs thresholds come from
    per-device counts and one ``psum`` per step (:func:`jmerge.collectives.breadcrumbs_thresholds`)
    instead of the gathering jitted search; costs the task vectors once more."""
    mesh = shard.mesh_of(base)
    if hp["thresholds"] is not None or mesh is None:
        return hp
    tvs = _task_vectors(base, experts)
    return {**hp, "thresholds": tuple(collectives.breadcrumbs_thresholds(tvs, hp["density"], hp["gamma"], mesh))}


def _crumbs(tvs, density, gamma, thresholds):
    if thresholds is None:
        return stages.breadcrumbs(density, gamma)(tvs)
    return stages.threshold_trim([lo for lo, _ in thresholds], upper=[hi for _, hi in thresholds])(tvs)


@register("breadcrumbs", static=("density", "gamma"), check=_breadcrumbs_check, prepare=_breadcrumbs_prepare)
def breadcrumbs(base, tvs, *, key=None, density=0.9, gamma=0.01, scale=1.0, weights=None, thresholds=None):
    """Model Breadcrumbs (Davari & Belilovsky, 2024): drop per-tensor outliers and small entries, weighted sum.

    ``thresholds`` (per task a ``(lower, upper)`` pair of pytrees of per-tensor magnitudes,
    as :func:`jmerge.collectives.breadcrumbs_thresholds` finds them) keeps ``lower <= |tau| <
    upper`` instead of ranking; on a mesh of several devices :func:`jmerge.merge` computes them so.
    """
    kept = _crumbs(tvs, density, gamma, thresholds)
    return jtree.apply(base, stages.combine(kept, weights), scale)


@register("breadcrumbs_ties", static=("density", "gamma", "sign", "normalize"), check=_breadcrumbs_check,
          prepare=_breadcrumbs_prepare)
def breadcrumbs_ties(
    base, tvs, *, key=None, density=0.9, gamma=0.01, scale=1.0, sign="sum", weights=None, normalize=True, thresholds=None
):
    """Breadcrumbs sparsification followed by TIES sign election and disjoint mean (``thresholds``: as breadcrumbs)."""
    kept = _crumbs(tvs, density, gamma, thresholds)
    return _elect_and_combine(base, kept, weights, sign, normalize, scale)


def _della_check(num_experts, hp):
    _check(num_experts, hp)
    validate.check_fraction("epsilon", hp["epsilon"], low_open=False)
    for d in stages.per_task(hp["density"], num_experts):
        if not (0 < d - hp["epsilon"] and d + hp["epsilon"] <= 1):
            raise validate.MergeInputError(
                f"della needs 0 < density - epsilon and density + epsilon <= 1, got density={d}, epsilon={hp['epsilon']}"
            )


@register("della", static=("density", "epsilon", "rescale", "sign", "normalize"), needs_key=True, check=_della_check)
def della(base, tvs, *, key=None, density=0.7, epsilon=0.15, scale=1.0, sign="sum", weights=None, rescale=True, normalize=True):
    """DELLA (Deep et al., 2024): magnitude-ranked stochastic drop, sign election, disjoint mean."""
    kept = stages.della(density, epsilon, rescale)(tvs, key)
    return _elect_and_combine(base, kept, weights, sign, normalize, scale)


@register("magmax", check=_check)
def magmax(base, tvs, *, key=None, scale=0.5):
    """MagMax (Marczak et al., 2024): per entry the largest-magnitude task-vector value, scaled by 0.5."""
    return jtree.apply(base, stages.magnitude_max(tvs), scale)


def _consensus_check(num_experts, hp):
    _check(num_experts, hp)
    if not isinstance(hp["k"], (int, np.integer)) or not 0 <= hp["k"] <= num_experts:
        raise validate.MergeInputError(f"consensus k={hp['k']} must lie in [0, {num_experts}]")
    validate.check_fraction("tall_lambda", hp["tall_lambda"], low_open=False, high=float("inf"), count=num_experts)


@register("consensus", static=("k", "tall_lambda"), check=_consensus_check)
def consensus(base, tvs, *, key=None, k=2, tall_lambda=0.6, scale=0.3):
    """TALL-mask consensus (Wang et al., 2024): keep entries that >= k TALL masks keep, of the summed task vector."""
    masks = stages.tall_masks(tvs, tall_lambda)
    keep = stages.consensus_mask(masks, k)
    total = jtree.add(*tvs)
    return jtree.apply(base, jtree.masked(total, keep), scale)
