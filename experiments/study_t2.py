"""First small study on Suite T v2, on the validation split only (issue 13 §4 groundwork).

1. Grids at the full task count (8): task arithmetic's scale (arXiv 2212.04089; the values of
   the entry-criteria run, :data:`experiments.criteria.TA_SCALES`) and TIES' density x scale
   (arXiv 2306.01708; :data:`TIES_GRID`). Each method's setting is the best by normalized
   accuracy on validation.
2. The chosen settings on :data:`SUBSETS` seeded ``SUBSET_SIZE``-task subsets (folds
   ``(subset, seed)``; the data-free merges are deterministic, so one seed), with each row's
   bootstrap 95 % CI over folds and the paired CI of TIES minus TA (:mod:`experiments.stats`).

The entry criteria must have passed (:func:`experiments.criteria.require`). Writes
``experiments/results/suite_t2_study.json`` and ``suite_t2_study_t2.md`` (rows, named as
:func:`experiments.results.write_rows` names a suite's files) and ``suite_t2_study_folds.json``
(one row per fold). The test split is never read.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Sequence

import jmerge
from experiments import criteria, results, stats
from experiments.study_divmerge import subsets

TIES_GRID = {"density": (0.05, 0.1, 0.2, 0.4), "scale": (0.7, 1.0, 1.3)}
SUBSET_SIZE, SUBSETS, SEED = 4, 5, 0
STEM = "suite_t2_study"
COLUMNS = ["suite", "method", "setting", "tasks", "normalized_acc", "ci_low", "ci_high", "subsets", "seeds"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fold(s, method: str, hp: dict, names: Sequence[str]) -> dict:
    merged = jmerge.merge(s.base, s.experts_for(names), method, **hp)
    res = s.evaluate(merged, "validation", tasks=names, probes=())
    _log(f"{method} {hp} on {len(names)} tasks: normalized {res['normalized_acc']:.2f}%")
    return {"suite": s.config.name, "method": method, "setting": hp, "subset": list(names), "seed": SEED,
            "normalized_acc": res["normalized_acc"], "id_acc": res["id_acc"], "normalized": res["normalized"]}


def _row(folds: Sequence[dict]) -> dict:
    f0 = folds[0]
    return {"suite": f0["suite"], "method": f0["method"], "setting": f0["setting"], "tasks": len(f0["subset"]),
            "normalized_acc": sum(f["normalized_acc"] for f in folds) / len(folds),
            **stats.ci_fields(folds, "normalized_acc")}


def run(s, entry: dict) -> tuple[list[dict], list[dict], dict]:
    """``(rows, folds, chosen settings)`` of the study on the built suite ``s`` given its stored
    entry criteria ``entry`` (:func:`experiments.criteria.measure`)."""
    folds = [{"suite": entry["suite"], "method": "task_arithmetic", "setting": {"scale": r["scale"]},
              "subset": entry["tasks"], "seed": SEED, "normalized_acc": r["normalized_acc"], "id_acc": r["id_acc"],
              "normalized": r["normalized"]} for r in entry["ta"]]  # the criteria run's TA grid (same suite)
    for density, scale in itertools.product(TIES_GRID["density"], TIES_GRID["scale"]):
        folds.append(_fold(s, "ties", {"density": density, "scale": scale}, s.names))
    rows = [_row([f]) for f in folds]
    chosen = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["normalized_acc"])["setting"]
              for m in ("task_arithmetic", "ties")}
    per_method = {}
    for method, hp in chosen.items():
        per_method[method] = [_fold(s, method, hp, names) for names in subsets(s.names, SUBSET_SIZE, SUBSETS, SEED)]
        folds += per_method[method]
        rows.append(_row(per_method[method]))
    key = {m: {(tuple(f["subset"]), f["seed"]): f["normalized_acc"] for f in fs} for m, fs in per_method.items()}
    d = stats.paired_difference(key["ties"], key["task_arithmetic"])
    rows.append({"suite": s.config.name, "method": "ties - task_arithmetic", "setting": chosen, "tasks": SUBSET_SIZE,
                 "normalized_acc": d["diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                 "subsets": d["folds"], "seeds": 1})
    return rows, folds, chosen


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from experiments import suite_t
    from experiments.suite import build_suite

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    results.check_study_writable(results.RESULTS_DIR, STEM, suite_t.V2.name, [".md"], args.overwrite)
    results.check_writable(results.RESULTS_DIR, [f"{STEM}_folds.json"], args.overwrite)
    entry = criteria.require()
    s = build_suite(suite_t.V2)
    rows, folds, chosen = run(s, entry)
    notes = (f"Validation split only. Settings chosen at the full count (8 tasks) on validation: "
             f"TA {chosen['task_arithmetic']}, TIES {chosen['ties']}. Rows with `tasks` = {SUBSET_SIZE} average "
             f"{SUBSETS} seeded subsets; ci_low/ci_high: percentile bootstrap 95 % CI over folds (null with one "
             "fold); the last row is the paired difference TIES - TA.")
    results.write_rows(STEM, rows, suite=s.config.name, columns=COLUMNS, title="Suite T v2: first small study",
                       command="python -m experiments.study_t2", notes=notes, overwrite=args.overwrite)
    results.write_json(f"{STEM}_folds", folds, overwrite=args.overwrite)
    return rows


if __name__ == "__main__":
    main()
