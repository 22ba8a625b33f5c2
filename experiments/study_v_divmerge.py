"""DivMerge study on Suite V under the evidence-v2 protocol (issue 13 §4): normalized accuracy
vs number of merged tasks, MobileNetV2 experts on mnist / fashion_mnist / openclipart.

The Suite V counterpart of :mod:`experiments.study_t2_divmerge` (its fold key, fold store,
step arithmetic and mean rows are imported from there):

- ``validate``: on the validation split, at the full 3-task merge, task arithmetic's scale over
  :data:`TA_SCALES` and TIES' (density, scale) over :data:`TIES_GRID`; each method's setting is
  the best normalized validation accuracy (ties: the first in grid order, as
  :mod:`experiments.study_t2` chooses). Rows and choice in ``divmerge_validation.json``
  (``"chosen": true`` marks the choice) and ``divmerge_validation_v.md``.
- ``run``: every 2-subset and the triple (:func:`experiments.study_divmerge.subsets` with
  :data:`SUBSETS` = 10, so all of them). Data-free folds: TA and TIES at the chosen settings,
  TSV-M and Iso-CTS at jmerge's defaults (``conv="matrix"``: conv kernels, depthwise included,
  are SVD-merged as their im2col matrix; each fold's ``coverage`` from :mod:`jmerge.coverage`).
  Learned folds (:mod:`jmerge.learn`), seeds :data:`SEEDS` (seed = pool draw and batch order),
  on study_divmerge's V setting: each task's own expert head as apply function
  (:meth:`experiments.suite.Suite.apply_fn`), :data:`SAMPLES` unlabelled train inputs per task
  (:meth:`~experiments.suite.Suite.unlabeled`), DivMerge layer level = the base's layers
  (``jmerge_mobilenet``), AdaMerging layer level = one coefficient per tensor. Step counts are
  fixed whatever the pool size: DivMerge (JS, Adam 1e-2, 4 inputs per task per step, init 1/K)
  :data:`STEPS` steps; AdaMerging (entropy, init 0.3, clip [0, 1], Adam 1e-3, 16 inputs per task
  per step: the official batch and rate) ``--adamerging-steps`` steps, default
  :data:`ADA_STEPS`, fewer than the official 500 for the CPU budget (every row says what ran).
  Each merge is scored once on the test split of its subset's tasks. Folds accumulate in
  ``divmerge_tasks_v_folds.json`` (stored folds are skipped unless ``--redo``).
- ``report``: ``"suite": "V"`` rows of ``divmerge_tasks.json`` (replacing the old ones): mean over
  folds with a percentile-bootstrap 95 % CI over folds (:func:`experiments.stats.ci_fields`), and
  ``divmerge_layer - X`` paired differences over subsets per count (learned methods averaged over
  seeds first, :func:`experiments.stats.paired_difference`), both by
  :func:`experiments.study_t2_divmerge.aggregate`; table ``divmerge_tasks_v.md`` and
  plot ``divmerge_tasks_v.png``. Only folds at this module's step counts enter (others are
  counted in the notes).

Run (from the repository root, ``JMERGE_DATA_DIR`` set)::

    python -m experiments.study_v_divmerge validate
    python -m experiments.study_v_divmerge run [--methods ...] [--counts 2 3] [--seeds 0 1 2]
    python -m experiments.study_v_divmerge report
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

import jmerge
from experiments import results, stats
from experiments import study_t2_divmerge as t2
from experiments.study_divmerge import _plot, subsets
from jmerge import coverage, learn, lwptv

SUITE = "V"
COUNTS = (2, 3)
SUBSETS, SUBSET_SEED = 10, 0  # at most 10 subsets per count: all of Suite V's (3 pairs, 1 triple)
SEEDS = (0, 1, 2)
SAMPLES = 100  # pool inputs per task: study_divmerge's V run (`--samples` default)
STEPS = 100  # DivMerge: Adam steps whatever SAMPLES is (the old V run's 4 epochs x 25 steps)
BATCH = t2.BATCH  # DivMerge: inputs per task per step (arXiv 2509.02108 App. D.2)
ADA_BATCH = t2.ADA_BATCH  # AdaMerging's official batch per task (arXiv 2310.02575 code)
ADA_STEPS = 21  # AdaMerging: 3 epochs of ceil(100 / 16) = 7 steps; the official 500 did not fit (module docstring)
TA_SCALES = (0.2, 0.3, 0.5, 0.7, 1.0)
TIES_GRID = {"density": (0.1, 0.2, 0.5), "scale": (0.5, 1.0)}
DATA_FREE = t2.DATA_FREE  # task_arithmetic, ties, tsv, iso_cts
LEARNED = ("divmerge_task", "divmerge_layer", "adamerging_task", "adamerging_layer")
METHODS = DATA_FREE + LEARNED
VALIDATION = "divmerge_validation"
FOLDS = "divmerge_tasks_v_folds"
STEM = t2.STEM  # divmerge_tasks


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def grid() -> list[tuple[str, dict]]:
    """The validation grid: ``(method, setting)`` in grid order."""
    out = [("task_arithmetic", {"scale": s}) for s in TA_SCALES]
    out += [("ties", {"density": d, "scale": s}) for d, s in itertools.product(TIES_GRID["density"], TIES_GRID["scale"])]
    return out


def choose(rows: Sequence[dict]) -> dict[str, dict]:
    """Per method, the setting of the row with the best ``normalized_acc`` (ties: the first row)."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["method"] not in best or r["normalized_acc"] > best[r["method"]]["normalized_acc"]:
            best[r["method"]] = r
    return {m: r["setting"] for m, r in best.items()}


def chosen_settings(directory: str | Path | None = None) -> dict[str, dict]:
    """TA's and TIES' settings chosen by ``validate`` (the ``"chosen"`` rows of ``divmerge_validation.json``)."""
    path = Path(results.RESULTS_DIR if directory is None else directory) / f"{VALIDATION}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python -m experiments.study_v_divmerge validate` first "
                                "(TA and TIES settings are chosen on validation)")
    picked = {}
    for r in json.loads(path.read_text()):
        if r.get("suite") == SUITE and r.get("chosen"):
            if r["method"] in picked:
                raise ValueError(f"{path}: two chosen {r['method']} settings")
            picked[r["method"]] = r["setting"]
    missing = [m for m in ("task_arithmetic", "ties") if m not in picked]
    if missing:
        raise ValueError(f"{path} has no chosen suite {SUITE} setting for {', '.join(missing)}: rerun `validate`")
    return picked


def _open_suite():
    from experiments import suite_v
    from experiments.suite import build_suite
    from jmerge.cache import enable_compilation_cache

    enable_compilation_cache(min_compile_seconds=1.0)
    return build_suite(suite_v.STUDY, log=_log)


def validate(args) -> dict[str, dict]:
    """The validation grid at the full task count; writes its rows and the choice."""
    s = _open_suite()
    rows = []
    for method, hp in grid():
        t0 = time.perf_counter()
        params = jax.block_until_ready(jmerge.merge(s.base, s.experts_for(s.names), method, **hp))
        res = s.evaluate(params, "validation", tasks=s.names, probes=())
        rows.append({"suite": SUITE, "split": "validation", "method": method, "setting": hp, "n_tasks": len(s.names),
                     "normalized_acc": res["normalized_acc"], "id_acc": res["id_acc"], "normalized": res["normalized"],
                     "seconds": time.perf_counter() - t0})
        _log(f"  {method:16s} {hp}: validation normalized {res['normalized_acc']:6.2f}")
    chosen = choose(rows)
    for r in rows:
        r["chosen"] = r["setting"] == chosen[r["method"]]
    notes = (f"Suite V (study config: {s.config.validation_size} validation examples per task), validation split only, "
             f"the full {len(s.names)}-task merge. Chosen (best normalized validation accuracy, ties: first in grid "
             f"order): TA {chosen['task_arithmetic']}, TIES {chosen['ties']} (`chosen` column). The test split is not read.")
    results.write_rows(VALIDATION, rows, suite=SUITE,
                       columns=["method", "setting", "n_tasks", "normalized_acc", "id_acc", "chosen"],
                       title="Suite V: TA and TIES settings on validation (DivMerge study)",
                       command="python -m experiments.study_v_divmerge validate", notes=notes, overwrite=True)
    return chosen


def _learned(s, method: str, names, seed: int, steps: int):
    """One learned merge of ``names``' experts (study_divmerge's V setting, ``steps`` optimizer steps)."""
    base_method, level = method.rsplit("_", 1)
    xs = [s.unlabeled(t, SAMPLES, seed=seed) for t in names]
    fns = [s.apply_fn(t) for t in names]
    tvs = s.task_vectors(names)
    if base_method == "divmerge":
        return learn.divmerge(s.base, tvs, fns, xs, granularity=level, key=seed, progress=False,
                              layers=lwptv.group(s.base, s.config.layers) if level == "layer" else None,
                              epochs=t2.epochs_for(steps, SAMPLES, BATCH), batch_per_task=BATCH)
    return learn.adamerging(s.base, tvs, fns, xs, granularity="tensor" if level == "layer" else "task", key=seed,
                            progress=False, epochs=t2.epochs_for(steps, SAMPLES, ADA_BATCH), batch_per_task=ADA_BATCH)


def _fold(s, method: str, names, seed: int, params, seconds: float, **extra) -> dict:
    res = s.evaluate(params, "test", tasks=names, probes=())  # the test split, read once per merge
    _log(f"  {method:17s} seed {seed} n={len(names)} {','.join(names)}: normalized {res['normalized_acc']:6.2f} "
         f"({seconds:.0f} s)")
    return {"suite": SUITE, "method": method, "n_tasks": len(names), "subset": list(names), "seed": seed,
            "normalized_acc": res["normalized_acc"], "id_acc": res["id_acc"], "normalized": res["normalized"],
            "merge_seconds": seconds, **extra}


def steps_of(method: str, args=None) -> int | None:
    """The step count ``method`` runs at (None: data-free)."""
    if method.startswith("divmerge"):
        return getattr(args, "divmerge_steps", STEPS) if args is not None else STEPS
    if method.startswith("adamerging"):
        return getattr(args, "adamerging_steps", ADA_STEPS) if args is not None else ADA_STEPS
    return None


def run(args) -> None:
    settings = chosen_settings()  # before the suite is built: a missing validation fails at once
    s = _open_suite()
    plan = [names for n in args.counts for names in subsets(s.names, n, SUBSETS, SUBSET_SEED)]
    stored = set() if args.redo else {t2._key(f) for f in results.load_folds(FOLDS)}
    for method in args.methods:
        if method in DATA_FREE:  # TA and TIES: chosen on validation; TSV-M, Iso-CTS: defaults
            t2.data_free_folds(s, method, settings.get(method, {}), plan, stored, _fold, FOLDS)
            continue
        steps = steps_of(method, args)
        for names in plan:  # seeds innermost: one compilation per (method, subset)
            for seed in args.seeds:
                if (method, steps, tuple(names), seed) in stored:
                    continue
                t0 = time.perf_counter()
                res = _learned(s, method, names, seed, steps)
                params = jax.block_until_ready(res.params)
                fold = _fold(s, method, names, seed, params, time.perf_counter() - t0, steps=steps,
                             samples_per_task=SAMPLES, granularity=res.granularity,
                             batch_per_task=BATCH if method.startswith("divmerge") else ADA_BATCH,
                             final_loss=float(res.losses[-1]),
                             losses=np.asarray(res.losses, np.float64).round(5).tolist(),
                             coefficients=np.asarray(res.coefficients, np.float64).round(5).tolist(),
                             coverage=coverage.of("task_arithmetic", s.base, None).fraction)
                results.save_folds(FOLDS, [fold], key=t2._key)


def planned(folds: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """``(kept, left out)``: the folds at this module's step counts, and the others."""
    kept = [f for f in folds if f.get("steps") == steps_of(f["method"])]
    return kept, [f for f in folds if f.get("steps") != steps_of(f["method"])]


def missing(folds: Sequence[dict]) -> dict[str, int]:
    """Per method, how many of its planned folds (every subset of :data:`COUNTS`; seeds :data:`SEEDS`
    for the learned methods, seed 0 for the data-free ones) are not among ``folds``."""
    from experiments.suite_v import ID_TASKS

    have = {t2._key(f) for f in folds}
    plan = [names for n in COUNTS for names in subsets(ID_TASKS, n, SUBSETS, SUBSET_SEED)]
    out = {}
    for m in METHODS:
        keys = [(m, steps_of(m), tuple(names), seed) for names in plan for seed in (SEEDS if m in LEARNED else (0,))]
        if any(k not in have for k in keys):
            out[m] = sum(k not in have for k in keys)
    return out


def aggregate(folds: Sequence[dict]) -> list[dict]:
    """:func:`experiments.study_t2_divmerge.aggregate` with the reference ``divmerge_layer`` at
    :data:`STEPS`, its rows labelled suite V: mean rows with CIs per (method, count, step count),
    then ``divmerge_layer - X`` paired differences per count (learned methods averaged over seeds
    per subset first)."""
    return t2.aggregate(folds, STEPS, suite=SUITE)


def report(args) -> list[dict]:
    folds, left_out = planned(results.load_folds(FOLDS))
    if not folds:
        raise FileNotFoundError(f"no folds in {results.RESULTS_DIR / (FOLDS + '.json')}: run "
                                "`python -m experiments.study_v_divmerge run` first")
    rows = aggregate(folds)
    gaps = missing(folds)
    settings = chosen_settings()
    counts = sorted({f["n_tasks"] for f in folds})
    notes = (f"Suite V (study config: 500 test examples per task), test split read once per merge. Counts {counts}, "
             f"every task subset (3 pairs, 1 triple). TA {settings['task_arithmetic']} and TIES {settings['ties']} "
             f"chosen on validation at 3 tasks (`{VALIDATION}_v.md`); TSV-M and Iso-CTS at jmerge's defaults "
             f"(conv kernels SVD-merged as im2col matrices; `coverage` in the fold rows). Learned methods: {SAMPLES} "
             f"unlabelled train inputs per task, each task's own expert head, seeds {list(SEEDS)}; DivMerge {STEPS} "
             f"Adam steps (lr 1e-2, {BATCH} inputs per task per step); AdaMerging {ADA_STEPS} steps (lr 1e-3, "
             f"{ADA_BATCH} inputs per task per step, init 0.3, clip [0, 1]): REDUCED from the official 500 steps for "
             f"the CPU budget. ci_low/ci_high: percentile bootstrap 95 % CI over folds (subset x seed). "
             f"`divmerge_layer - X`: paired differences (learned methods averaged over seeds first), their CI over "
             f"the 3 pairs (coarse) at 2 tasks and over the triple's 3 tasks at 3 (`ci_over`). "
             f"Per-fold rows: `{FOLDS}.json`"
             + (f"; {len(left_out)} stored folds at other step counts left out." if left_out else ".")
             + (" INCOMPLETE: planned folds not run yet: " + ", ".join(f"{m} {k}" for m, k in gaps.items()) + "."
                if gaps else ""))
    cols = ["suite", "method", "n_tasks", "normalized_acc", "ci_low", "ci_high", "ci_over", "subsets", "seeds", "steps"]
    results.write_rows(STEM, rows, suite=SUITE, columns=cols, title="Suite V: normalized accuracy vs merged tasks",
                       command="python -m experiments.study_v_divmerge report", notes=notes, overwrite=True)
    means = [r for r in rows if " - " not in r["method"]]
    _plot(means, "n_tasks", "merged tasks", "Suite V, test split (mean over subsets and seeds)",
          results.RESULTS_DIR / f"{results.suite_stem(STEM, SUITE)}.png")
    return rows


def main(argv: Sequence[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("validate", help="choose TA's and TIES' settings on validation")
    r = sub.add_parser("run")
    r.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    r.add_argument("--counts", nargs="+", type=int, choices=COUNTS, default=list(COUNTS))
    r.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    r.add_argument("--divmerge-steps", type=int, default=STEPS)
    r.add_argument("--adamerging-steps", type=int, default=ADA_STEPS)
    r.add_argument("--redo", action="store_true", help="recompute folds already stored (default: skip them)")
    sub.add_parser("report")
    args = ap.parse_args(argv)
    return {"validate": validate, "run": run, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
