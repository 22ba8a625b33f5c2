"""RegMean and Fisher merging on Suite T v2 (issue 15 §4), on the folds of :mod:`experiments.study_t2_divmerge`.

Counts 2/4/8, the same seeded subsets (:func:`experiments.study_divmerge.subsets`, ``SUBSETS``,
``SUBSET_SEED``) and the same pool: ``SAMPLES`` train inputs per task, seed = pool draw (the
inputs DivMerge learns on). Each task's statistics are measured once, at its expert on its own
pool with its own frozen zero-shot head (``Suite.apply_fn``), and reused by every subset:

- ``regmean``: Gram matrices of every Dense kernel's inputs (:func:`jmerge.learn.gram_matrices`),
  ``alpha`` = 0.95 (FusionBench's default, not tuned); every other parameter is averaged;
- ``fisher``: the exact diagonal Fisher (:func:`jmerge.learn.fisher_diagonal`), FusionBench's
  normalisation and floor 1e-6, equal weights.

No hyper-parameter is chosen here, so nothing is read on validation. Every merge is scored once,
on the test split of its subset's tasks (normalized accuracy = merged / expert x 100, averaged
over the subset). Fold rows go to ``data_merge_t2_folds.json``; ``report`` writes
``data_merge.json`` and ``data_merge_t2.md``: per method and count the mean over folds with a percentile-bootstrap
95 % CI (:func:`experiments.stats.ci_fields`), and paired differences (seeds averaged first;
:func:`experiments.study_t2_divmerge.paired_folds`) against task arithmetic, TIES and DivMerge
(layer level, at its validation-chosen step count), read from ``divmerge_tasks_t2_folds.json``.

Run (niced): ``nice -n 10 python -m experiments.study_t2_data_merge run --methods regmean fisher --seeds 0``,
then ``python -m experiments.study_t2_data_merge report``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import jax
import numpy as np

from experiments import criteria, results, stats
from experiments.study_divmerge import subsets
from experiments.study_t2_divmerge import (FOLDS as DIVMERGE_FOLDS, SAMPLES, SUBSET_SEED, SUBSETS, COUNTS, _fold,
                                          chosen_steps, paired_folds)
from jmerge import coverage, learn
from jmerge.methods.registry import merge_task_vectors

METHODS = ("regmean", "fisher")
REFERENCES = ("task_arithmetic", "ties", "divmerge_layer")
ALPHA = 0.95
FOLDS = "data_merge_t2_folds"
STEM = "data_merge"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(stem: str) -> list[dict]:
    path = results.RESULTS_DIR / f"{stem}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _save(new: list[dict]) -> None:
    key = lambda f: (f["method"], tuple(f["subset"]), f["seed"])
    done = {key(f) for f in new}
    results.write_json(FOLDS, [f for f in _load(FOLDS) if key(f) not in done] + new, overwrite=True)


def _statistics(s, method: str, task: str, seed: int):
    expert, apply, xs = s.experts[task], s.apply_fn(task), s.unlabeled(task, SAMPLES, seed=seed)
    if method == "regmean":
        return learn.gram_matrices(expert, apply, xs, batch_size=16)
    return learn.fisher_diagonal(expert, apply, xs, batch_size=8)


def run(args) -> None:
    from experiments import suite_t
    from experiments.suite import build_suite
    from jmerge.cache import enable_compilation_cache

    criteria.require()
    enable_compilation_cache(min_compile_seconds=1.0)
    s = build_suite(suite_t.V2, log=_log)
    plan = [(n, names) for n in args.counts for names in subsets(s.names, n, SUBSETS, SUBSET_SEED)]
    for method in args.methods:
        for seed in args.seeds:
            stats_by_task, seconds = {}, {}
            for task in sorted({t for _, names in plan for t in names}):
                t0 = time.perf_counter()
                stats_by_task[task] = jax.block_until_ready(_statistics(s, method, task, seed))
                seconds[task] = time.perf_counter() - t0
                _log(f"  {method} statistics of {task} (seed {seed}): {seconds[task]:.0f} s")
            for n, names in plan:
                t0 = time.perf_counter()
                per = tuple(stats_by_task[t] for t in names)
                hp = {"grams": per, "alpha": ALPHA} if method == "regmean" else {"fishers": per}
                merged = jax.jit(lambda b, ts, h: merge_task_vectors(b, ts, method, **h))(s.base, s.task_vectors(names), hp)
                merged = jax.block_until_ready(merged)
                elapsed = time.perf_counter() - t0 + sum(seconds[t] for t in names)
                cov = coverage.of(method, s.base, hp, len(names)).fraction
                _save([_fold(s, method, names, seed, merged, elapsed, samples_per_task=SAMPLES, coverage=cov,
                             setting={"alpha": ALPHA} if method == "regmean" else {"normalize": True, "min_fisher": 1e-6})])


def aggregate(folds: Sequence[dict], reference_folds: Sequence[dict], divmerge_steps: int) -> list[dict]:
    """Per method and count the mean row with its CI, then ``method - reference`` for each of
    :data:`REFERENCES` (:func:`experiments.study_t2_divmerge.paired_folds`); DivMerge's folds are
    the ones at ``divmerge_steps`` (its step count chosen on validation)."""
    rows = []
    for n in sorted({f["n_tasks"] for f in folds}):
        for method in METHODS:
            fs = [f for f in folds if f["method"] == method and f["n_tasks"] == n]
            if not fs:
                continue
            rows.append({"suite": "T2", "method": method, "n_tasks": n,
                         "normalized_acc": float(np.mean([f["normalized_acc"] for f in fs])),
                         **stats.ci_fields(fs, "normalized_acc"), "coverage": fs[0]["coverage"],
                         "samples_per_task": SAMPLES, "split": "test"})
            for ref in REFERENCES:
                theirs = [f for f in reference_folds if f["method"] == ref and f["n_tasks"] == n
                          and (ref != "divmerge_layer" or f.get("steps") == divmerge_steps)]
                d = paired_folds(fs, theirs)
                if d is not None:
                    rows.append({"suite": "T2", "method": f"{method} - {ref}", "n_tasks": n,
                                 "normalized_acc": d.pop("diff"), **d, "seeds": None, "split": "test",
                                 **({"steps": divmerge_steps} if ref == "divmerge_layer" else {})})
    return rows


def report(args) -> list[dict]:
    folds = _load(FOLDS)
    if not folds:
        raise FileNotFoundError(f"no folds in {FOLDS}.json: run `python -m experiments.study_t2_data_merge run` first")
    steps = chosen_steps()["divmerge_layer"]
    rows = aggregate(folds, _load(DIVMERGE_FOLDS), steps)
    notes = (f"Suite T v2, test split (200 examples per task), read once per merge. Counts "
             f"{sorted({f['n_tasks'] for f in folds})}; per count {SUBSETS} seeded subsets (seed {SUBSET_SEED}; the one "
             f"8-task set), as experiments.study_t2_divmerge. Statistics on {SAMPLES} train pool inputs per task, at "
             f"each task's expert with its own zero-shot head; seeds = pool draws. RegMean alpha {ALPHA}; Fisher exact, "
             f"normalized, floor 1e-6 (FusionBench defaults, not tuned). ci_low/ci_high: percentile bootstrap 95 % CI "
             f"over folds (null with one fold). `X - Y` rows: paired differences (seeds averaged first), their CI over "
             f"subsets, or over the tasks of the one 8-task set (`ci_over`); Y's folds from `{DIVMERGE_FOLDS}.json`, "
             f"DivMerge layer at its validation-chosen {steps} steps. Per-fold rows: `{FOLDS}.json`.")
    cols = ["suite", "method", "n_tasks", "normalized_acc", "ci_low", "ci_high", "ci_over", "subsets", "seeds", "coverage"]
    results.write_rows(STEM, rows, suite="T2", columns=cols, title="Suite T v2: RegMean and Fisher merging vs merged tasks",
                       command="python -m experiments.study_t2_data_merge report", notes=notes, overwrite=True)
    return rows


def main(argv: Sequence[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=("run", "report"))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="run: the methods")
    ap.add_argument("--counts", nargs="+", type=int, default=list(COUNTS), help="run: numbers of merged tasks")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="run: pool draws")
    args = ap.parse_args(argv)
    return run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
