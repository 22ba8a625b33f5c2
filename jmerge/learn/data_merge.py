"""RegMean and Fisher merging in one call: each expert's statistics on its own task's inputs, then the merge.

``regmean(base, tvs, apply_fn, unlabeled)`` and ``fisher_merge(...)`` take the learn engine's
data interface (:func:`jmerge.learn.fit_coefficients`): one apply function (or one per task,
for separate heads) and one input pytree per task. Expert ``t`` is ``θ0 + τ_t``; its
statistics (:mod:`jmerge.learn.statistics`) are measured on ``unlabeled[t]`` with apply
function ``t``; the merge is the registered method (:mod:`jmerge.methods.data_driven`), jitted.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

from jmerge import tree as jtree
from jmerge.learn.statistics import fisher_diagonal, gram_matrices
from jmerge.learn.targets import per_task
from jmerge.methods.registry import merge_task_vectors
from jmerge.tree import PyTree
from jmerge.validate import MergeInputError


def _tasks(tvs, apply_fn, unlabeled) -> list[Callable]:
    if not isinstance(tvs, (list, tuple)) or not tvs:
        raise MergeInputError("tvs must be a non-empty list of task-vector pytrees (one per task)")
    if not isinstance(unlabeled, (list, tuple)) or len(unlabeled) != len(tvs):
        n = len(unlabeled) if isinstance(unlabeled, (list, tuple)) else type(unlabeled).__name__
        raise MergeInputError(f"unlabeled must be a list with one input set per task: got {n} for {len(tvs)} task vectors")
    return per_task(apply_fn, len(tvs))


def regmean(base: PyTree, tvs: Sequence[PyTree], apply_fn, unlabeled: Sequence[PyTree], *, alpha: float = 0.95,
            batch_size: int = 32) -> PyTree:
    """RegMean (arXiv 2212.09849): Gram matrices of every linear layer's inputs per expert, then
    ``(Σ G̃_t)⁻¹ Σ G̃_t W_t`` per layer (``alpha``: FusionBench's 0.95)."""
    fns = _tasks(tvs, apply_fn, unlabeled)
    apply = jax.jit(jtree.apply)
    grams = tuple(gram_matrices(apply(base, tv), fn, xs, batch_size=batch_size) for tv, fn, xs in zip(tvs, fns, unlabeled))
    return jax.jit(lambda b, ts, g: merge_task_vectors(b, ts, "regmean", grams=g, alpha=alpha))(base, list(tvs), grams)


def fisher_merge(base: PyTree, tvs: Sequence[PyTree], apply_fn, unlabeled: Sequence[PyTree], *, weights=None,
                 normalize: bool = True, min_fisher: float = 1e-6, estimator: str = "exact", batch_size: int = 8) -> PyTree:
    """Fisher merging (arXiv 2111.09832): each expert's diagonal Fisher on its task, then the
    Fisher-weighted mean (FusionBench's normalisation and floor by default)."""
    fns = _tasks(tvs, apply_fn, unlabeled)
    apply = jax.jit(jtree.apply)
    fishers = tuple(fisher_diagonal(apply(base, tv), fn, xs, batch_size=batch_size, estimator=estimator)
                    for tv, fn, xs in zip(tvs, fns, unlabeled))
    hp = dict(weights=weights, normalize=normalize, min_fisher=min_fisher)
    return jax.jit(lambda b, ts, f: merge_task_vectors(b, ts, "fisher", fishers=f, **hp))(base, list(tvs), fishers)
