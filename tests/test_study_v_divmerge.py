"""The Suite V DivMerge study's pieces (experiments.study_v_divmerge): the validation choice rule,
the aggregation (means, CIs, paired differences) against numpy on synthetic folds, and the
errors of running out of order. No suite is built."""

import json
import re

import numpy as np
import pytest

from experiments import study_v_divmerge as sv

PAIRS = [("fashion_mnist", "openclipart"), ("mnist", "fashion_mnist"), ("mnist", "openclipart")]
TRIPLE = ("mnist", "fashion_mnist", "openclipart")


def _boot(values, resamples=10_000, seed=0):
    """Percentile bootstrap 95 % CI of the mean, written out in numpy."""
    x = np.asarray(values, np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return tuple(np.quantile(means, [0.025, 0.975]))


def test_grid_is_ta_scales_then_ties_density_by_scale():
    g = sv.grid()
    assert [hp["scale"] for m, hp in g if m == "task_arithmetic"] == [0.2, 0.3, 0.5, 0.7, 1.0]
    assert [(hp["density"], hp["scale"]) for m, hp in g if m == "ties"] == [
        (0.1, 0.5), (0.1, 1.0), (0.2, 0.5), (0.2, 1.0), (0.5, 0.5), (0.5, 1.0)]


def test_choose_takes_the_best_validation_accuracy_and_the_first_on_ties():
    rows = [{"method": "task_arithmetic", "setting": {"scale": s}, "normalized_acc": a}
            for s, a in [(0.2, 70.0), (0.3, 81.5), (0.5, 81.5), (0.7, 60.0)]]
    rows += [{"method": "ties", "setting": {"density": d, "scale": s}, "normalized_acc": a}
             for d, s, a in [(0.1, 0.5, 80.0), (0.1, 1.0, 84.0), (0.2, 0.5, 83.9)]]
    assert sv.choose(rows) == {"task_arithmetic": {"scale": 0.3}, "ties": {"density": 0.1, "scale": 1.0}}


def test_chosen_settings_read_the_chosen_rows(tmp_path):
    rows = [{"suite": "V", "method": "task_arithmetic", "setting": {"scale": 0.5}, "chosen": True},
            {"suite": "V", "method": "task_arithmetic", "setting": {"scale": 0.3}, "chosen": False},
            {"suite": "T2", "method": "ties", "setting": {"density": 0.2}, "chosen": True}]
    (tmp_path / f"{sv.VALIDATION}.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=re.escape("has no chosen suite V setting for ties: rerun `validate`")):
        sv.chosen_settings(tmp_path)
    rows.append({"suite": "V", "method": "ties", "setting": {"density": 0.1, "scale": 1.0}, "chosen": True})
    (tmp_path / f"{sv.VALIDATION}.json").write_text(json.dumps(rows))
    assert sv.chosen_settings(tmp_path) == {"task_arithmetic": {"scale": 0.5}, "ties": {"density": 0.1, "scale": 1.0}}


def test_run_before_validate_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sv.results, "RESULTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'divmerge_validation.json'} does not exist: "
                                                          "run `python -m experiments.study_v_divmerge validate` first")):
        sv.main(["run", "--methods", "task_arithmetic"])


def test_report_before_run_names_the_folds_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sv.results, "RESULTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no folds in {tmp_path / 'divmerge_tasks_v_folds.json'}")):
        sv.main(["report"])


def _fold(method, subset, seed, acc, steps=None):
    return {"suite": "V", "method": method, "n_tasks": len(subset), "subset": list(subset), "seed": seed,
            "normalized_acc": acc, "coverage": 1.0, "steps": steps, "setting": None}


def _synthetic(rng):
    ta = {k: float(rng.uniform(70, 85)) for k in PAIRS + [TRIPLE]}
    dm = {(k, s): float(rng.uniform(85, 95)) for k in PAIRS + [TRIPLE] for s in sv.SEEDS}
    ada = {(k, s): float(rng.uniform(80, 90)) for k in PAIRS + [TRIPLE] for s in sv.SEEDS}
    folds = [_fold("task_arithmetic", k, 0, v) for k, v in ta.items()]
    folds += [_fold("divmerge_layer", k, s, v, sv.STEPS) for (k, s), v in dm.items()]
    folds += [_fold("adamerging_layer", k, s, v, sv.ADA_STEPS) for (k, s), v in ada.items()]
    return ta, dm, ada, folds


def test_aggregate_means_cis_and_paired_differences_against_numpy():
    ta, dm, ada, folds = _synthetic(np.random.default_rng(0))
    rows = {(r["method"], r["n_tasks"]): r for r in sv.aggregate(folds)}
    assert all(r["suite"] == "V" for r in rows.values())
    # mean rows: mean and percentile-bootstrap CI over folds (subset x seed)
    r = rows[("divmerge_layer", 2)]
    vals = [dm[(k, s)] for k in PAIRS for s in sv.SEEDS]
    assert r["normalized_acc"] == pytest.approx(np.mean(vals))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(_boot(vals))
    assert (r["seeds"], r["subsets"], r["steps"]) == (3, 3, sv.STEPS)
    r = rows[("task_arithmetic", 2)]
    assert r["normalized_acc"] == pytest.approx(np.mean([ta[k] for k in PAIRS]))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(_boot([ta[k] for k in PAIRS]))
    assert (r["seeds"], r["subsets"]) == (1, 3)
    r = rows[("task_arithmetic", 3)]
    assert (r["normalized_acc"], r["ci_low"], r["ci_high"]) == (pytest.approx(ta[TRIPLE]), None, None)
    assert rows[("adamerging_layer", 3)]["ci_low"] is not None  # three seeds on the one triple
    # paired differences: learned methods averaged over seeds per subset first, sorted by str(subset)
    for other, table in (("task_arithmetic", None), ("adamerging_layer", ada)):
        per = [np.mean([dm[(k, s)] for s in sv.SEEDS])
               - (ta[k] if table is None else np.mean([table[(k, s)] for s in sv.SEEDS]))
               for k in sorted(PAIRS, key=str)]
        d = rows[(f"divmerge_layer - {other}", 2)]
        assert d["normalized_acc"] == pytest.approx(np.mean(per))
        assert (d["ci_low"], d["ci_high"]) == pytest.approx(_boot(per))
        assert d["subsets"] == 3
        d3 = rows[(f"divmerge_layer - {other}", 3)]
        want = np.mean([dm[(TRIPLE, s)] for s in sv.SEEDS]) - (
            ta[TRIPLE] if table is None else np.mean([table[(TRIPLE, s)] for s in sv.SEEDS]))
        assert d3["normalized_acc"] == pytest.approx(want)
        assert (d3["ci_low"], d3["ci_high"], d3["subsets"]) == (None, None, 1)
    assert ("divmerge_layer - divmerge_layer", 2) not in rows
    assert rows[("divmerge_layer - adamerging_layer", 2)]["steps"] == sv.ADA_STEPS


def test_planned_leaves_out_folds_at_other_step_counts():
    _, _, _, folds = _synthetic(np.random.default_rng(1))
    extra = [_fold("adamerging_layer", PAIRS[0], 0, 50.0, 500), _fold("divmerge_task", PAIRS[0], 0, 50.0, 400)]
    kept, left = sv.planned(folds + extra)
    assert kept == folds and left == extra


def test_differences_skip_methods_sharing_no_subset_with_divmerge_layer():
    folds = [_fold("divmerge_layer", PAIRS[0], 0, 90.0, sv.STEPS), _fold("task_arithmetic", PAIRS[1], 0, 80.0),
             _fold("ties", PAIRS[0], 0, 85.0)]
    rows = [r for r in sv.aggregate(folds) if " - " in r["method"]]
    assert [(r["method"], r["normalized_acc"], r["subsets"]) for r in rows] == [("divmerge_layer - ties", 5.0, 1)]


def test_missing_counts_the_planned_folds_not_run():
    _, _, _, folds = _synthetic(np.random.default_rng(2))
    gaps = sv.missing(folds[:-1])  # the last adamerging_layer fold (triple, seed 2) dropped
    assert gaps == {"ties": 4, "tsv": 4, "iso_cts": 4, "divmerge_task": 12, "adamerging_task": 12, "adamerging_layer": 1}
