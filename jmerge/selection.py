"""Exact k-th largest values on the host (numpy), for thresholds computed outside XLA.

TIES trims at ``t = `` the k-th largest ``|tau|``, per tensor or over a whole task vector.
:func:`jmerge.merge` on CPU arrays (:func:`trim_thresholds`) and the streamed merge
(:mod:`jmerge.streaming`, where a task vector never sits in memory at once) find it here:

* one array: :func:`kth_largest`, numpy's introselect (``ndarray.partition``, O(n), no sort;
  bench/merge_bench.py: 4 GPT-2-sized task vectors in 1.15 s on 2 threads, against 6.25 s
  for the jitted XLA search);
* values streamed in pieces: :func:`bracket` turns a uniform sample into a value range
  ``[lo, hi)`` that holds the k-th largest with high probability (``z`` standard deviations
  of the sample rank on each side); one pass then counts the entries ``>= hi`` and keeps
  those inside the range, and :func:`kth_in_bracket` finds the answer among the kept ones,
  or reports a miss, after which the caller widens ``z`` and repeats the pass. Every result
  is exact; only the number of passes is random.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Sequence

import jax
import numpy as np

from jmerge import stages, validate

# numpy's ufuncs and partition release the GIL: tasks' thresholds run on parallel threads
THREADS = concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="jmerge-select")


def kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest entry of ``values`` (``1 <= k <= values.size``); reorders ``values``
    in place (pass a temporary)."""
    flat = values.reshape(-1)
    if not 1 <= k <= flat.size:
        raise ValueError(f"k={k} must lie in [1, {flat.size}]")
    i = flat.size - k
    flat.partition(i)
    return float(flat[i])


def trivial_threshold(k: int, n: int) -> float | None:
    """The threshold that keeps the top ``k`` of ``n`` when no search is needed: 0 (keep all)
    for ``k >= n``, ``inf`` (keep none) for ``k = 0``; None otherwise."""
    return 0.0 if k >= n else math.inf if k == 0 else None


def magnitude_threshold(base: Sequence[np.ndarray], expert: Sequence[np.ndarray], k: int) -> float:
    """The k-th largest ``|expert - base|`` jointly over the arrays (one float32 temporary of
    all their entries, partitioned in place); 0 when ``k >= n`` (keep all), ``inf`` when
    ``k = 0`` (keep none)."""
    n = sum(int(np.size(b)) for b in base)
    if (fixed := trivial_threshold(k, n)) is not None:
        return fixed
    mags = np.empty(n, np.float32)
    offset = 0
    for b, e in zip(base, expert, strict=True):
        part = mags[offset : offset + np.size(b)]
        np.subtract(np.reshape(e, -1), np.reshape(b, -1), out=part, dtype=np.float32)
        offset += np.size(b)
    np.abs(mags, out=mags)
    return kth_largest(mags, k)


def on_host_cpu(tree) -> bool:
    """Every leaf a numpy array or a concrete jax array on one CPU device (read in place)."""

    def host(x):
        if isinstance(x, np.ndarray):
            return True
        if not (isinstance(x, jax.Array) and validate.concrete(x)) or len(x.devices()) != 1:
            return False
        return next(iter(x.devices())).platform == "cpu"

    return all(host(x) for x in jax.tree.leaves(tree))


def trim_thresholds(base, experts, density, *, scope: str = "global") -> tuple:
    """Per task, the exact thresholds of :func:`jmerge.stages.magnitude_trim` (the TIES trim)
    for :func:`jmerge.stages.threshold_trim`, by :func:`magnitude_threshold` on parallel
    threads: the ``int(d_t n)``-th largest ``|tau_t|`` over the whole task vector
    (``scope="global"``: one float per task) or over each tensor (``scope="tensor"``: a
    pytree of floats shaped like ``base``). Leaves are numpy arrays or CPU jax arrays."""
    b = [np.asarray(x) for x in jax.tree.leaves(base)]
    es = [[np.asarray(x) for x in jax.tree.leaves(e)] for e in experts]
    densities = stages.per_task(density, len(es))
    if scope == "global":
        n = sum(x.size for x in b)
        return tuple(THREADS.map(lambda e, d: magnitude_threshold(b, e, stages._keep_count(d, n)), es, densities))
    jobs = [(e[i], b[i], d) for e, d in zip(es, densities) for i in range(len(b))]
    found = list(THREADS.map(lambda job: magnitude_threshold([job[1]], [job[0]], stages._keep_count(job[2], job[1].size)), jobs))
    treedef = jax.tree.structure(base)
    return tuple(jax.tree.unflatten(treedef, found[t * len(b) : (t + 1) * len(b)]) for t in range(len(es)))


def bracket(sample: np.ndarray, k: int, n: int, z: float) -> tuple[float, float]:
    """``(lo, hi)`` such that the k-th largest of ``n`` values, of which ``sample`` is a uniform
    sample, lies in ``[lo, hi)`` unless its sample rank is more than ``z`` binomial standard
    deviations (plus one) off. ``lo = 0`` and ``hi = inf`` when the range reaches past the
    sample's ends (values are magnitudes, so that covers everything)."""
    s = np.sort(sample.reshape(-1))
    m = s.size
    q = k / n
    rank = (1.0 - q) * m  # ascending sample position of the k-th largest
    spread = z * (math.sqrt(m * q * (1.0 - q)) + 1.0)
    i_lo, i_hi = math.floor(rank - spread), math.ceil(rank + spread)
    lo = float(s[i_lo]) if i_lo > 0 else 0.0
    hi = float(s[i_hi]) if i_hi < m else math.inf
    return lo, hi


def kth_in_bracket(inside: list[np.ndarray], above: int, k: int) -> float | None:
    """The k-th largest of all values, given the ``above`` values ``>= hi`` and the pieces of
    those in ``[lo, hi)``; None when the k-th largest is not in the bracket (widen it)."""
    j = k - above
    kept = np.concatenate([np.reshape(x, -1) for x in inside]) if inside else np.zeros(0, np.float32)
    if not 0 < j <= kept.size:
        return None
    return kth_largest(kept, j)
