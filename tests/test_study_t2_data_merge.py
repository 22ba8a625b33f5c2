"""The Suite T v2 RegMean/Fisher study's aggregation: means, CIs and paired differences against
numpy, on synthetic folds (no model runs)."""

import numpy as np
import pytest

from experiments import stats, study_t2_data_merge as sd


def _fold(method, subset, seed, acc, steps=None):
    return {"suite": "T2", "method": method, "n_tasks": len(subset), "subset": list(subset), "seed": seed,
            "normalized_acc": acc, "coverage": 0.5, "steps": steps}


def test_aggregate_means_and_paired_differences():
    subsets = [("a", "b"), ("a", "c"), ("b", "c")]
    ours = [_fold("regmean", s, seed, 90.0 + i + 0.5 * seed) for i, s in enumerate(subsets) for seed in (0, 1)]
    refs = [_fold("ties", s, 0, 88.0 + 2 * i) for i, s in enumerate(subsets)]
    refs += [_fold("divmerge_layer", s, seed, 91.0, 400) for s in subsets for seed in (0, 1, 2)]
    refs += [_fold("divmerge_layer", s, seed, 50.0, 48) for s in subsets for seed in (0, 1, 2)]  # not the chosen count
    rows = {r["method"]: r for r in sd.aggregate(ours, refs, 400)}
    assert set(rows) == {"regmean", "regmean - ties", "regmean - divmerge_layer"}  # no task_arithmetic folds
    assert rows["regmean"]["normalized_acc"] == pytest.approx(np.mean([f["normalized_acc"] for f in ours]))
    assert (rows["regmean"]["subsets"], rows["regmean"]["seeds"]) == (3, 2)
    per = [90.25, 91.25, 92.25]  # seeds averaged per subset
    d = rows["regmean - ties"]
    assert d["normalized_acc"] == pytest.approx(np.mean(np.array(per) - np.array([88.0, 90.0, 92.0])))
    want = stats.paired_difference({s: p for s, p in zip(subsets, per)}, {s: 91.0 for s in subsets})
    assert rows["regmean - divmerge_layer"]["ci_low"] == pytest.approx(want["ci_low"])
    assert rows["regmean - divmerge_layer"]["normalized_acc"] == pytest.approx(want["diff"])
    assert (rows["regmean - divmerge_layer"]["subsets"], rows["regmean - divmerge_layer"]["steps"]) == (3, 400)
