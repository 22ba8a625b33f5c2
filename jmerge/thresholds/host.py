"""The host backend of :mod:`jmerge.thresholds`: exact k-th largest magnitudes by numpy.

For numpy arrays and single-device CPU jax arrays (read in place): numpy's introselect
(``ndarray.partition``, O(n), no sort) on a thread pool, one float32 temporary of a unit's
magnitudes per thread (bench/merge_bench.py: 4 GPT-2-sized task vectors in about 1.2 s on
2 threads, against about 6 s for the XLA search). :func:`bracket` and
:func:`kth_in_bracket` find the same value from a sample and one counting pass, for values
that never sit in memory at once (:mod:`jmerge.thresholds.streamed`).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Sequence

import jax
import numpy as np

from jmerge import validate
from jmerge.thresholds import Query, answers, bracket_positions, last_tied_kept, one_rank, plan

# numpy's ufuncs and partition release the GIL: the searches run on parallel threads
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


def magnitudes(base: Sequence[np.ndarray] | None, expert: Sequence[np.ndarray]) -> np.ndarray:
    """``|expert - base|`` (``|expert|`` when ``base`` is None) of all the arrays' entries, in
    order, as one new float32 vector (a temporary the caller may reorder)."""
    mags = np.empty(sum(int(np.size(e)) for e in expert), np.float32)
    offset = 0
    for i, e in enumerate(expert):
        part = mags[offset : offset + np.size(e)]
        if base is None:
            part[...] = np.reshape(e, -1)
        else:
            np.subtract(np.reshape(e, -1), np.reshape(base[i], -1), out=part, dtype=np.float32)
        offset += np.size(e)
    return np.abs(mags, out=mags)


def magnitude_threshold(base: Sequence[np.ndarray] | None, expert: Sequence[np.ndarray], k: int) -> float:
    """The k-th largest ``|expert - base|`` (``|expert|`` when ``base`` is None) jointly over
    the arrays: one float32 temporary of all their entries, partitioned in place."""
    return kth_largest(magnitudes(base, expert), k)


def on_host_cpu(tree) -> bool:
    """Every leaf a numpy array or a concrete jax array on one CPU device (read in place)."""

    def host(x):
        if isinstance(x, np.ndarray):
            return True
        if not (isinstance(x, jax.Array) and validate.concrete(x)) or len(x.devices()) != 1:
            return False
        return next(iter(x.devices())).platform == "cpu"

    return all(host(x) for x in jax.tree.leaves(tree))


def solve(query: Query, experts: Sequence, base=None) -> list[list]:
    """:func:`jmerge.thresholds.solve` by :func:`magnitude_threshold`, one job per thread."""
    b = None if base is None else [np.asarray(x) for x in jax.tree.leaves(base)]
    es = [[np.asarray(x) for x in jax.tree.leaves(e)] for e in experts]
    units, jobs, where, values, n_ranks = plan(query, [x.size for x in es[0]], len(es))

    def run(job):
        return magnitude_threshold(None if b is None else [b[i] for i in job.leaves], [es[job.task][i] for i in job.leaves], job.k)

    values.update(zip(where, THREADS.map(run, jobs)))
    return answers(query, values, units, n_ranks, jax.tree.structure(experts[0]))


def bracket(sample: np.ndarray, k: int, n: int, z: float) -> tuple[float, float]:
    """``(lo, hi)`` such that the k-th largest of ``n`` values, of which ``sample`` is a uniform
    sample, lies in ``[lo, hi)`` unless its sample rank is more than ``z`` binomial standard
    deviations (plus one) off (:func:`jmerge.thresholds.bracket_positions`). ``lo = 0`` and
    ``hi = inf`` when the range reaches past the sample's ends (values are magnitudes)."""
    s = np.sort(sample.reshape(-1))
    m = s.size
    i_lo, i_hi = (int(i) for i in bracket_positions(k / n, m, z))
    lo = float(s[i_lo]) if i_lo > 0 else 0.0
    hi = float(s[i_hi]) if i_hi < m else np.inf
    return lo, hi


def kth_in_bracket(inside: list[np.ndarray], above: int, k: int) -> float | None:
    """The k-th largest of all values, given the ``above`` values ``>= hi`` and the pieces of
    those in ``[lo, hi)``; None when the k-th largest is not in the bracket (widen it)."""
    j = k - above
    kept = np.concatenate([np.reshape(x, -1) for x in inside]) if inside else np.zeros(0, np.float32)
    if not 0 < j <= kept.size:
        return None
    return kth_largest(kept, j)


_SCAN = 1 << 18  # entries per step of the scan for tied positions


def tied_cut(base: np.ndarray | None, expert: np.ndarray, kth: float, k: int) -> int:
    """:func:`jmerge.thresholds.last_tied_kept` of one tensor's ``|expert - base|``: a counting
    pass, then a scan for the tied entries that stops once enough are found. Compared as
    float32 bit patterns, as :func:`jmerge.thresholds.keep`."""
    n = int(np.size(expert))
    if k <= 0 or k >= n:
        return -1 if k <= 0 else n
    mags = magnitudes(None if base is None else [base], [expert])
    b, lb = mags.view(np.int32), np.float32(kth).view(np.int32)
    above = int(np.count_nonzero(b > lb))
    tied, found = [np.zeros(0, np.int64)], 0
    for start in range(0, n, _SCAN):
        if found >= k - above:
            break
        tied.append(start + np.flatnonzero(b[start : start + _SCAN] == lb))
        found += tied[-1].size
    return last_tied_kept(k, n, above, np.concatenate(tied))


def positions(query: Query, task: int, kth, expert, base=None):
    """The ``positions`` answer of ``task`` (``query.positions``): per tensor, :func:`tied_cut`
    at its k-th largest ``kth``; one job per thread."""
    es = [np.asarray(x) for x in jax.tree.leaves(expert)]
    bs = [None] * len(es) if base is None else [np.asarray(x) for x in jax.tree.leaves(base)]
    ks = [one_rank(query, task, x.size) for x in es]
    cuts = THREADS.map(lambda job: tied_cut(*job), zip(bs, es, map(float, jax.tree.leaves(kth)), ks))
    return jax.tree.unflatten(jax.tree.structure(expert), [np.int32(c) for c in cuts])

