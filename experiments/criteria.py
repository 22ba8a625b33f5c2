"""Entry criteria of a merging suite (issue 13 §2), checked on validation before any study runs.

A suite separates merging methods only if there is room between "no merge" and the experts,
and if the simplest merge does not already close it. With normalized accuracy
``n_t = 100 * acc(model, t) / acc(expert_t, t)`` averaged over the ID tasks:

1. ``base_normalized``: the base encoder with the (shared) heads, ``mean_t n_t(base) <= 65``;
2. ``expert_gain``: ``mean_t (acc(expert_t, t) - acc(base, t)) >= 10`` accuracy points;
3. ``ta_normalized``: task arithmetic (arXiv 2212.04089) at the full task count, with its
   scale the best of :data:`TA_SCALES` on validation, ``mean_t n_t <= 85``.

``python -m experiments.criteria`` builds Suite T v2, prints the criteria and writes them to
``experiments/results/suite_t2_entry.json``; studies call :func:`require` first, which stops
with :class:`EntryCriteriaError` naming the failed criterion and its measured value.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import jmerge
from experiments import results

TA_SCALES = (0.2, 0.3, 0.4, 0.6, 1.0)
# (name, comparison, threshold, what is measured)
CRITERIA = (
    ("base_normalized", "<=", 65.0, "the base model (with the suite's shared heads, where it has them), normalized accuracy %"),
    ("expert_gain", ">=", 10.0, "experts minus base, mean accuracy points"),
    ("ta_normalized", "<=", 85.0, "task arithmetic at the full task count (best scale), normalized %"),
)
STEM = "suite_t2_entry"


class EntryCriteriaError(RuntimeError):
    """A suite misses an entry criterion; the message names it and the measured value."""


def judge(values: dict[str, float]) -> list[dict]:
    """One row per criterion: ``criterion``, ``rule``, ``value``, ``passed``."""
    missing = [name for name, *_ in CRITERIA if name not in values]
    if missing:
        raise ValueError(f"no measured value for criteria {missing}")
    rows = []
    for name, op, threshold, what in CRITERIA:
        v = float(values[name])
        ok = v <= threshold if op == "<=" else v >= threshold
        rows.append({"criterion": name, "rule": f"{op} {threshold:g}", "value": v, "passed": bool(ok), "what": what})
    return rows


def check(rows: Sequence[dict], suite: str = "T2") -> None:
    """Raises :class:`EntryCriteriaError` for the first failed criterion of ``rows`` (:func:`judge`)."""
    for r in rows:
        if not r["passed"]:
            raise EntryCriteriaError(f"suite {suite} fails entry criterion {r['criterion']}: measured "
                                     f"{r['value']:.2f}, must be {r['rule']} ({r['what']})")


def measure(suite, split: str = "validation", scales: Sequence[float] = TA_SCALES, log=print) -> dict:
    """The criteria's values on ``suite`` (:class:`experiments.suite.Suite`) and what they come
    from: the base and expert rows per task, and TA's normalized accuracy at every scale."""
    ref = suite.reference_rows(split, probe_id=False)
    base, experts = ref["base"], ref["experts"]
    ta = {}
    for lam in scales:
        merged = jmerge.merge(suite.base, suite.experts_for(suite.names), "task_arithmetic", scale=lam)
        ta[lam] = suite.evaluate(merged, split, probes=())
        log(f"task arithmetic scale {lam}: normalized {ta[lam]['normalized_acc']:.2f}%")
    best = max(scales, key=lambda lam: ta[lam]["normalized_acc"])
    gain = float(np.mean([experts["id"][t] - base["id"][t] for t in suite.names]))
    values = {"base_normalized": base["normalized_acc"], "expert_gain": gain,
              "ta_normalized": ta[best]["normalized_acc"]}
    return {"suite": suite.config.name, "split": split, "tasks": list(suite.names), "criteria": judge(values),
            "base": base, "experts": experts, "ta_best_scale": best,
            "ta": [{"scale": lam, **ta[lam]} for lam in scales],
            "expert_train_seconds": {t: suite.expert_metrics[t].get("train_seconds") for t in suite.names}}


def require(path: str | Path = results.RESULTS_DIR / f"{STEM}.json", exploratory: bool = False) -> dict:
    """The stored criteria of ``path``; raises if they are missing or one failed, unless
    ``exploratory`` (then the failure is printed and the caller must label its rows exploratory)."""
    path = Path(path)
    if not path.is_file():
        raise EntryCriteriaError(f"no entry criteria at {path}: run `python -m experiments.criteria` first")
    (stored,) = json.loads(path.read_text())
    try:
        check(stored["criteria"], stored["suite"])
    except EntryCriteriaError as e:
        if not exploratory:
            raise
        print(f"EXPLORATORY run past a failed entry gate: {e}")
    return stored


def _table(rows: Sequence[dict], suite: str):
    from rich.table import Table

    table = Table(title=f"Suite {suite} entry criteria (validation)")
    for col in ("criterion", "rule", "value", "passed"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["criterion"], r["rule"], f"{r['value']:.2f}", "yes" if r["passed"] else "NO")
    return table


def main(argv: Sequence[str] | None = None) -> dict:
    from rich.console import Console

    from experiments import suite_t
    from experiments.suite import build_suite

    ap = argparse.ArgumentParser(description="Measure and check Suite T v2's entry criteria on validation.")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    results.check_writable(results.RESULTS_DIR, [f"{STEM}.json"], args.overwrite)
    t0 = time.perf_counter()
    out = measure(build_suite(suite_t.V2))
    out["command"] = "python -m experiments.criteria"
    out["seconds"] = round(time.perf_counter() - t0, 1)
    Console().print(_table(out["criteria"], out["suite"]))
    results.write_json(STEM, [out], overwrite=args.overwrite)
    check(out["criteria"], out["suite"])
    return out


if __name__ == "__main__":
    main()
