"""The streamed backend of :mod:`jmerge.thresholds`: global thresholds over checkpoints.

A task vector of a checkpoint never sits in memory at once, so the k-th largest ``|tau_t|``
over all its float tensors takes two passes over the files: a sampling pass reads every
``N // sample``-th entry (:func:`jmerge.thresholds.strided_starts`), which brackets the answer
at 5 sample standard deviations (:func:`jmerge.thresholds.host.bracket`); a counting pass
counts the entries above the bracket and keeps the ~``10 N / sqrt(sample)`` inside it, where
introselect finds the exact value (a miss, which is rare, repeats the counting pass with a
4x wider bracket). The value equals the in-memory backends' bit for bit.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jmerge.thresholds import Query, answers, host, plan, strided_starts

PASSES = 2  # reads of the inputs before the merge's own (a missed bracket adds one)


def solve(
    query: Query, experts: Sequence, base, *, progress: Callable[[str, str], None] | None = None, sample: int = 1 << 20
) -> list[list]:
    """:func:`jmerge.thresholds.solve` for ``Checkpoint`` inputs, global scope only: answer
    ``j`` of task ``t`` is the ``k_j``-th largest ``|tau_t|`` over all float tensors.
    ``progress(phase, tensor name)`` is called after each tensor of each pass."""
    if query.scope != "global":
        raise ValueError(f"streamed thresholds rank over the whole task vector (scope 'global'), got {query.scope!r}")
    names = [n for n, t in base.tensors.items() if t.is_float]
    total = sum(base.tensors[n].size for n in names)
    units, jobs, where, values, n_ranks = plan(query, [total], len(experts))
    todo = list(range(len(jobs)))
    if todo:
        stride, starts = strided_starts([base.tensors[n].size for n in names], sample)
        samples: dict[int, list[np.ndarray]] = {t: [] for t in {jobs[i].task for i in todo}}
        for name, start in zip(names, starts):
            b = base.read(name).reshape(-1)[start::stride].astype(np.float32)
            for t in samples:
                samples[t].append(np.abs(experts[t].read(name).reshape(-1)[start::stride].astype(np.float32) - b))
            if progress:
                progress("threshold sample", name)
        sample_of = {t: np.concatenate(s) for t, s in samples.items()}
        z = dict.fromkeys(todo, 5.0)
    while todo:
        brackets = {i: host.bracket(sample_of[jobs[i].task], jobs[i].k, total, z[i]) for i in todo}
        above = dict.fromkeys(todo, 0)
        inside: dict[int, list[np.ndarray]] = {i: [] for i in todo}
        for name in names:
            b = base.read(name).astype(np.float32, copy=False)
            mags = {t: np.abs(experts[t].read(name).astype(np.float32, copy=False) - b) for t in {jobs[i].task for i in todo}}
            for i in todo:
                lo, hi = brackets[i]
                m = mags[jobs[i].task]
                above[i] += int(np.count_nonzero(m >= hi))
                inside[i].append(m[(m >= lo) & (m < hi)])
            if progress:
                progress("threshold pass", name)
        for i in list(todo):
            found = host.kth_in_bracket(inside[i], above[i], jobs[i].k)
            if found is None:
                z[i] *= 4.0
            else:
                values[where[i]] = found
                todo.remove(i)
    return answers(query, values, units, n_ranks, None)
