"""The demo's tuning (validation only, argmax of its grid), its stored settings and its entry gate."""

import json
import re
from dataclasses import replace

import jmerge
import pytest
from synthetic_suite import T2_CONFIG as CONFIG

from experiments import criteria, demo
pytestmark = pytest.mark.standard_promotion("optax 0.2.8's adam computes decay ** count (float ** int32): the fixtures fine-tune experts")


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(demo, "CONFIG", CONFIG)
    monkeypatch.setattr(demo, "GRIDS", {"task_arithmetic": [{"scale": 0.3}, {"scale": 1.0}],
                                        "ties": [{"density": 0.2, "scale": 1.0}, {"density": 0.5, "scale": 1.0}]})
    monkeypatch.setattr(demo, "LWPTV_TOP_K", (1, 2))


def test_tune_picks_the_validation_argmax(t2_suite, small, monkeypatch):
    s, _ = t2_suite
    seen = []
    real = s.evaluate
    monkeypatch.setattr(s, "evaluate", lambda *a, **k: seen.append(a[1] if len(a) > 1 else k["split"]) or real(*a, **k))
    out = demo.tune(s)
    assert set(seen) == {"validation"}  # never the test split
    assert out["tasks"] == list(CONFIG.tasks) and len(out["folds"]) == 2 * (2 + 2)
    json.dumps(out)  # storable: the LwPTV objects are replaced by their layer count
    for m, grid in demo.GRIDS.items():
        folds = [f for f in out["folds"] if f["method"] == m]
        plain = max(folds[:len(grid)], key=lambda f: f["normalized_acc"])["setting"]
        lw = max(folds[len(grid):], key=lambda f: f["normalized_acc"])["setting"]
        assert out["chosen"][m] == lw and {k: v for k, v in lw.items() if k != "lwptv_top_k"} == plain
        hp = dict(lw)
        k = hp.pop("lwptv_top_k")
        merged = jmerge.merge(s.base, s.experts_for(s.names), m, lwptv=demo._lwptv(k), **hp)
        best = max(f["normalized_acc"] for f in folds[len(grid):])
        assert best == pytest.approx(real(merged, "validation", probes=())["normalized_acc"])


def test_load_tuning_round_trip_missing_and_stale(small, tmp_path, monkeypatch):
    path = tmp_path / "demo_tuning.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no tuned settings at {path}: run `python -m "
                                                          "experiments.demo --tune` first")):
        demo.load_tuning(path)
    stored = {**demo._fingerprint(), "chosen": {"task_arithmetic": {"scale": 0.3, "lwptv_top_k": 1}}}
    path.write_text(json.dumps([stored]))
    assert demo.load_tuning(path)["chosen"] == stored["chosen"]
    monkeypatch.setattr(demo, "CONFIG", replace(CONFIG, tasks=("alpha", "beta")))
    with pytest.raises(ValueError, match=re.escape(f"{path} was tuned for another demo config (tasks differ): "
                                                   "rerun `python -m experiments.demo --tune --overwrite`")):
        demo.load_tuning(path)


def test_failed_entry_criterion_stops_before_the_test_split(t2_suite, small, monkeypatch):
    s, _ = t2_suite
    seen = []
    real = s.evaluate
    monkeypatch.setattr(s, "evaluate", lambda *a, **k: seen.append(a[1] if len(a) > 1 else k["split"]) or real(*a, **k))
    monkeypatch.setattr(demo, "build_suite", lambda config, log: s)
    monkeypatch.setattr(demo, "load_tuning", lambda: {"chosen": {"task_arithmetic": {"scale": 0.3, "lwptv_top_k": 1}}})
    monkeypatch.setattr(criteria, "CRITERIA", (("expert_gain", ">=", 1e3, "experts minus base, mean accuracy points"),
                                               *criteria.CRITERIA[::2]))
    with pytest.raises(SystemExit, match=r"^suite T2 fails entry criterion expert_gain: measured -?\d+\.\d\d, must be "
                                         r">= 1000 \(experts minus base, mean accuracy points\)$"):
        demo.demo()
    assert "test" not in seen
