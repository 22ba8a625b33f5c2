"""Learned merge coefficients: DivMerge (divergence to each expert) and AdaMerging (entropy).

``fit_coefficients(base, tvs, apply_fn, unlabeled, objective=..., granularity=...)`` learns
Γ in ``θ0 + Σ_t Γ_t^l τ_t`` with optax on unlabelled inputs of each task; see
:mod:`jmerge.learn.engine`. Pieces: :mod:`~jmerge.learn.objectives` (JS, KL, entropy in log
space), :mod:`~jmerge.learn.coefficients` (granularity, constraints, θ(Γ)),
:mod:`~jmerge.learn.targets` (expert targets, cached; the causal-LM protocol),
:mod:`~jmerge.learn.causal_lm` (the ``jmerge run`` learn block) and :mod:`~jmerge.learn.llama`
(the pure-JAX Llama it runs). RegMean and Fisher merging (:func:`regmean`, :func:`fisher_merge`)
measure :mod:`~jmerge.learn.statistics` (Gram matrices, diagonal Fisher) on the same data interface.
"""

from jmerge.learn.data_merge import fisher_merge, regmean
from jmerge.learn.statistics import fisher_diagonal, gram_matrices
from jmerge.learn.coefficients import CoefficientLayout, layout, merged_params
from jmerge.learn.engine import LearnResult, NonFiniteLossError, adamerging, batch_schedule, clear_cache, divmerge, fit_coefficients
from jmerge.learn.objectives import entropy, js, kl, masked_mean
from jmerge.learn.targets import TaskTargets, classifier_targets, lm_targets

__all__ = [
    "CoefficientLayout",
    "LearnResult",
    "NonFiniteLossError",
    "TaskTargets",
    "adamerging",
    "batch_schedule",
    "classifier_targets",
    "clear_cache",
    "divmerge",
    "entropy",
    "fisher_diagonal",
    "fisher_merge",
    "fit_coefficients",
    "gram_matrices",
    "js",
    "kl",
    "layout",
    "lm_targets",
    "masked_mean",
    "merged_params",
    "regmean",
]
