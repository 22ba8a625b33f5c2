"""Confidence intervals for study rows: percentile bootstrap over folds (Efron & Tibshirani,
*An Introduction to the Bootstrap*, 1993, §13), where a fold is one (task subset, seed) run.

- :func:`bootstrap_ci`: 95 % CI of the mean of per-fold values ``x_1..x_n``: draw ``B``
  resamples of ``n`` folds with replacement, take each resample's mean, report the 2.5th and
  97.5th percentiles (numpy's default linear interpolation).
- :func:`paired_difference`: the same for ``d_i = a_i - b_i`` over the folds both methods
  ran: one resample of folds is shared by the two methods (the paired bootstrap), so the
  between-fold variation common to both cancels.
- :func:`ci_fields`: the fields every result row carries: ``ci_low``, ``ci_high`` (CI of the
  row's metric), ``seeds`` and ``subsets`` (distinct seeds and task subsets among its folds).
- :func:`paired_example_bootstrap`: when a study has too few folds to resample (Suite V's three
  leave-one-out merges), the paired bootstrap over test *examples* instead, stratified per
  (fold, task), with the same example indices drawn for both variants.

With fewer than two folds there is nothing to resample: the CI is ``None`` (stored as
``null``), never a zero-width interval.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000


def bootstrap_ci(values: Sequence[float], *, level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float | None, float | None]:
    """``(low, high)`` percentile-bootstrap CI of ``mean(values)`` (module docstring)."""
    x = np.asarray(values, np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one number per fold, got shape {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values must be finite, got {x[~np.isfinite(x)][:3].tolist()}")
    if len(x) < 2:
        return None, None
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float], **kw) -> dict:
    """Mean and bootstrap CI of ``a[f] - b[f]`` over the folds ``f`` (e.g. ``(subset, seed)``)
    of both; both must hold the same folds. Returns ``{"diff", "ci_low", "ci_high", "folds"}``."""
    if set(a) != set(b):
        only = sorted(map(str, set(a) ^ set(b)))
        raise ValueError(f"paired folds differ: {only[:5]} are in only one of the two")
    keys = sorted(a, key=str)
    d = np.array([a[k] - b[k] for k in keys], np.float64)
    low, high = bootstrap_ci(d, **kw)
    return {"diff": float(d.mean()), "ci_low": low, "ci_high": high, "folds": len(keys)}


def ci_fields(folds: Sequence[Mapping], metric: str, **kw) -> dict:
    """``ci_low``/``ci_high`` of the mean of ``fold[metric]`` over ``folds`` (each with a
    ``subset`` and a ``seed``), and the numbers of distinct ``seeds`` and ``subsets``."""
    for f in folds:
        absent = [k for k in (metric, "subset", "seed") if k not in f]
        if absent:
            raise ValueError(f"fold {dict(f)} has no {absent[0]!r}")
    low, high = bootstrap_ci([f[metric] for f in folds], **kw)
    return {"ci_low": low, "ci_high": high, "seeds": len({f["seed"] for f in folds}),
            "subsets": len({tuple(f["subset"]) for f in folds})}


EXAMPLE_RESAMPLES = 2000


def paired_example_bootstrap(a: Mapping[Hashable, Sequence[float]], b: Mapping[Hashable, Sequence[float]], *,
                             shared: Mapping[Hashable, Hashable] | None = None, level: float = LEVEL,
                             resamples: int = EXAMPLE_RESAMPLES, seed: int = 0) -> dict:
    """Paired, stratified percentile bootstrap over examples: 95 % CI of ``mean_s(mean(a[s] - b[s]))``.

    ``a`` and ``b`` map each stratum ``s`` (e.g. ``(fold, task)``) to per-example scores (e.g. 0/1
    correctness) of the same examples in the same order; the statistic weighs every stratum
    equally. A resample draws, for each stratum, as many example indices with replacement as it
    has examples, and applies the *same* indices to ``a`` and ``b`` (paired). ``shared`` maps strata
    to a draw group: strata of one group score the same examples (one task's test set in several
    folds) and share one draw per resample; by default every stratum draws on its own. Groups
    draw in the order of ``sorted(groups, key=str)``, each a ``(resamples, n)`` block of
    ``numpy.random.default_rng(seed).integers``. Returns ``{"diff", "ci_low", "ci_high", "strata",
    "examples"}`` (``examples``: the total over strata)."""
    if set(a) != set(b):
        only = sorted(map(str, set(a) ^ set(b)))
        raise ValueError(f"paired strata differ: {only[:5]} are in only one of the two")
    if not a:
        raise ValueError("no strata to resample")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    shared = {s: s for s in a} if shared is None else shared
    missing = [s for s in a if s not in shared]
    if missing:
        raise ValueError(f"strata {sorted(map(str, missing))[:5]} have no draw group in `shared`")
    d = {}
    for s in a:
        x, y = np.asarray(a[s], np.float64), np.asarray(b[s], np.float64)
        if x.ndim != 1 or x.shape != y.shape or not len(x):
            raise ValueError(f"stratum {s!r}: a and b must be equally long non-empty 1-D arrays, got shapes "
                             f"{x.shape} and {y.shape}")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError(f"stratum {s!r}: scores must be finite")
        d[s] = x - y
    groups: dict = {}
    for s in d:
        groups.setdefault(shared[s], []).append(s)
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples, np.float64)
    for g in sorted(groups, key=str):
        sizes = {len(d[s]) for s in groups[g]}
        if len(sizes) != 1:
            raise ValueError(f"draw group {g!r} holds strata of different sizes {sorted(sizes)}: "
                             "strata sharing a draw must score the same examples")
        n = sizes.pop()
        idx = rng.integers(0, n, size=(resamples, n))
        for s in groups[g]:
            total += d[s][idx].mean(axis=1)
    means = total / len(d)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"diff": float(np.mean([v.mean() for v in d.values()])), "ci_low": float(low), "ci_high": float(high),
            "strata": len(d), "examples": int(sum(len(v) for v in d.values()))}
