"""Suite T v2: frozen zero-shot heads from class descriptions, encoder-only experts, size and
description checks, entry criteria, and the bootstrap CIs of experiments.stats (tiny random
BERT and synthetic keyword tasks from test_experiments_suite; no real data or weights)."""

import json
import re
from dataclasses import replace

import jax
import jmerge
import numpy as np
import pytest
from synthetic_suite import DESCRIPTIONS, NAMED, T2_CONFIG as CONFIG, synthetic_task

from experiments import criteria, finetune, stats, suite, zeroshot
from experiments.data import Split, Task
from experiments.evaluate import embed, head_logits
pytestmark = pytest.mark.standard_promotion("optax 0.2.8's adam computes decay ** count (float ** int32): the fixtures fine-tune experts")

def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_zero_shot_head_matches_numpy_reference(t2_encoder):
    encoder, base, prepare = t2_encoder
    task = NAMED["alpha"]
    head = zeroshot.zero_shot_head(encoder, base, prepare, task, 7.0, DESCRIPTIONS)
    texts = ["apple", "an apple w1", "banana"]
    e = _unit(embed(encoder, base, prepare(Split(np.array(texts, dtype=object), np.zeros(3, np.int32)))))
    want = np.stack([_unit(e[:2].mean(0)), e[2]], axis=1)
    np.testing.assert_allclose(np.asarray(head["kernel"]), want, rtol=1e-5, atol=1e-6)
    assert float(head["scale"][0]) == 7.0 and not np.asarray(head["bias"]).any()
    x = np.random.default_rng(0).normal(size=(5, encoder.dim)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(head_logits(head, x)), 7.0 * _unit(x) @ want, rtol=1e-4, atol=1e-5)


def test_bad_descriptions_and_classes_name_the_task():
    task = NAMED["alpha"]
    with pytest.raises(ValueError, match=re.escape("task 'alpha': no class description for classes ['banana']")):
        zeroshot.check_descriptions(task, {"alpha": {"apple": ("apple",), "banana": (" ",)}})
    with pytest.raises(ValueError, match=re.escape("task 'alpha' has no class descriptions")):
        zeroshot.check_descriptions(task, {})
    with pytest.raises(ValueError, match=re.escape("task 'alpha': class descriptions for unknown classes ['cherry']")):
        zeroshot.check_descriptions(task, {"alpha": {**DESCRIPTIONS["alpha"], "cherry": ("cherry",)}})
    with pytest.raises(ValueError, match=re.escape("task 'dup': duplicate class names ['a']")):
        Task.from_records("dup", ["x", "y", "z"] * 4, ["a", "b", "a"] * 4, classes=("a", "b", "a"))
    with pytest.raises(ValueError, match=re.escape("task 'alpha': duplicate class names ['apple']")):
        replace(task, classes=("apple", "apple"))


def test_every_v2_task_has_descriptions():
    from experiments import suite_t

    assert len(set(suite_t.V2.tasks)) >= 8 and all(t in zeroshot.CLASS_DESCRIPTIONS for t in suite_t.V2.tasks)


def test_too_small_split_fails_before_fine_tuning(t2_encoder, monkeypatch, tmp_path):
    monkeypatch.setenv("JMERGE_CACHE_DIR", str(tmp_path))
    for name, d in DESCRIPTIONS.items():
        monkeypatch.setitem(zeroshot.CLASS_DESCRIPTIONS, name, d)
    encoder, base, prepare = t2_encoder
    small = synthetic_task("gamma", ["cat", "dog"], n=100, seed=3)  # 10 validation examples
    logs = []
    with pytest.raises(ValueError, match=re.escape("task 'gamma': the validation split has 10 examples, "
                                                   "the suite needs 24")):
        suite.build_suite(CONFIG, logs.append, encoder=encoder, base=base, prepare=prepare,
                          loader={**NAMED, "gamma": small}.__getitem__)
    assert logs == [] and not any(tmp_path.iterdir())  # no expert was trained
    monkeypatch.delitem(zeroshot.CLASS_DESCRIPTIONS, "alpha")
    with pytest.raises(ValueError, match=re.escape("task 'alpha' has no class descriptions")):
        suite.build_suite(CONFIG, logs.append, encoder=encoder, base=base, prepare=prepare, loader=NAMED.__getitem__)


def test_heads_are_frozen_and_shared(t2_suite, t2_encoder):
    s, logs = t2_suite
    encoder, base, prepare = t2_encoder
    for name in CONFIG.tasks:
        want = zeroshot.zero_shot_head(encoder, base, prepare, s.tasks[name], CONFIG.head_scale)
        for k in ("kernel", "bias", "scale"):
            np.testing.assert_array_equal(np.asarray(s.heads[name][k]), np.asarray(want[k]))
        m = s.expert_metrics[name]
        assert m["frozen_head"] and not m["cached"]
        moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), s.experts[name], base)
        assert max(jax.tree.leaves(moved)) > 0  # the encoder was fine-tuned
        assert m["validation_acc"] > s.id_accuracy(base, name) + 10  # ... and learned the task under the frozen head
    # the base row uses the same heads as the experts
    ref = s.reference_rows(probe_id=False)
    assert ref["base"]["id"] == {t: s.id_accuracy(s.base, t) for t in CONFIG.tasks}


def test_frozen_head_enters_the_cache_key(t2_suite, t2_encoder):
    s, _ = t2_suite
    encoder, base, prepare = t2_encoder
    task, inputs = s.tasks["alpha"], s.inputs["alpha"]
    fp = finetune.params_fingerprint(base)
    _, _, again = finetune.load_or_train(encoder, base, fp, task, inputs, CONFIG.recipe, lambda m: None,
                                         s.heads["alpha"])
    assert again["cached"] and again["cache"] == s.expert_metrics["alpha"]["cache"]
    other = {**s.heads["alpha"], "scale": s.heads["alpha"]["scale"] * 2}
    key = finetune.expert_key(CONFIG.recipe, "alpha", task.fingerprint(("train",)) + "+head:"
                              + finetune.params_fingerprint(other), fp)
    assert key not in again["cache"]


def test_judge_and_check_name_the_failed_criterion():
    rows = criteria.judge({"base_normalized": 60.0, "expert_gain": 12.5, "ta_normalized": 80.0})
    assert [r["passed"] for r in rows] == [True, True, True]
    criteria.check(rows)
    rows = criteria.judge({"base_normalized": 60.0, "expert_gain": 9.5, "ta_normalized": 91.25})
    assert [r["passed"] for r in rows] == [True, False, False]
    with pytest.raises(criteria.EntryCriteriaError, match=re.escape(
            "suite T2 fails entry criterion expert_gain: measured 9.50, must be >= 10 "
            "(experts minus base, mean accuracy points)")):
        criteria.check(rows)
    with pytest.raises(ValueError, match=re.escape("no measured value for criteria ['ta_normalized']")):
        criteria.judge({"base_normalized": 60.0, "expert_gain": 12.5})


def test_measure_and_require(t2_suite, tmp_path):
    s, _ = t2_suite
    out = criteria.measure(s, scales=(0.3, 1.0), log=lambda m: None)
    ref = s.reference_rows(probe_id=False)
    values = {r["criterion"]: r["value"] for r in out["criteria"]}
    assert values["base_normalized"] == pytest.approx(ref["base"]["normalized_acc"])
    gain = np.mean([s.expert_metrics[t]["validation_acc"] - s.id_accuracy(s.base, t) for t in s.names])
    assert values["expert_gain"] == pytest.approx(gain)
    ta = {r["scale"]: r["normalized_acc"] for r in out["ta"]}
    assert values["ta_normalized"] == max(ta.values()) and ta[out["ta_best_scale"]] == max(ta.values())
    merged = jax.tree.map(lambda b, *e: b + 0.3 * sum(x - b for x in e), s.base, *s.experts_for(s.names))
    assert ta[0.3] == pytest.approx(s.evaluate(merged, probes=())["normalized_acc"], abs=1e-6)
    path = tmp_path / "entry.json"
    path.write_text(json.dumps([{**out, "criteria": criteria.judge({"base_normalized": 50.0, "expert_gain": 20.0, "ta_normalized": 99.0})}]))
    with pytest.raises(criteria.EntryCriteriaError, match=re.escape(
            "suite T2 fails entry criterion ta_normalized: measured 99.00, must be <= 85")):
        criteria.require(path)
    with pytest.raises(criteria.EntryCriteriaError, match=re.escape(f"no entry criteria at {tmp_path / 'x.json'}")):
        criteria.require(tmp_path / "x.json")


# ----- experiments.stats --------------------------------------------------------------


def _reference_ci(x, resamples, level, seed):
    """Plain-numpy loop: one resample of folds at a time, percentile of the means."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        means.append(np.mean([x[i] for i in rng.integers(0, len(x), size=len(x))]))
    return _percentile_ci(means, level)


def _percentile_ci(means, level):
    """The (alpha/2, 1 - alpha/2) percentiles of ``means``, numpy's default (linear) rule by hand."""
    means = np.sort(means)
    alpha = (1 - level) / 2

    def pct(q):
        pos = q * (len(means) - 1)
        lo = int(np.floor(pos))
        return means[lo] + (pos - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    return pct(alpha), pct(1 - alpha)


def _reference_example_ci(a, b, shared, resamples, level, seed):
    """Plain-numpy loop: per draw group (sorted by str), one resample of its examples at a time;
    each resample's statistic is the mean over strata of the mean paired difference."""
    rng = np.random.default_rng(seed)
    draws = {}
    for g in sorted({shared[s] for s in a}, key=str):
        n = len(a[next(s for s in a if shared[s] == g)])
        draws[g] = [rng.integers(0, n, size=n) for _ in range(resamples)]
    means = [np.mean([np.mean([a[s][i] - b[s][i] for i in draws[shared[s]][r]]) for s in a]) for r in range(resamples)]
    return _percentile_ci(means, level)


def test_bootstrap_ci_matches_numpy_reference_and_scipy():
    x = np.random.default_rng(1).normal(2.0, 1.5, size=12)
    got = stats.bootstrap_ci(x, resamples=2000, seed=3)
    np.testing.assert_allclose(got, _reference_ci(x, 2000, 0.95, 3), rtol=1e-12)
    from scipy.stats import bootstrap

    sp = bootstrap((x,), np.mean, n_resamples=20_000, method="percentile", random_state=0).confidence_interval
    np.testing.assert_allclose(stats.bootstrap_ci(x, resamples=20_000), (sp.low, sp.high), atol=0.03)
    assert stats.bootstrap_ci([4.0] * 5) == (4.0, 4.0)
    assert stats.bootstrap_ci([4.0]) == (None, None)
    with pytest.raises(ValueError, match=re.escape("values must be finite, got [nan]")):
        stats.bootstrap_ci([1.0, float("nan")])


def test_paired_difference_cancels_shared_fold_effects():
    rng = np.random.default_rng(0)
    folds = [(("a", "b"), seed) for seed in range(3)] + [(("a", "c"), seed) for seed in range(3)]
    effect = {f: rng.normal(0, 10) for f in folds}  # large between-fold variation shared by both methods
    a = {f: effect[f] + 1.0 + rng.normal(0, 0.1) for f in folds}
    b = {f: effect[f] for f in folds}
    d = stats.paired_difference(a, b, seed=5)
    diffs = [a[f] - b[f] for f in sorted(folds, key=str)]
    assert d["folds"] == 6 and d["diff"] == pytest.approx(np.mean(diffs))
    assert (d["ci_low"], d["ci_high"]) == stats.bootstrap_ci(diffs, seed=5)
    assert 0.5 < d["ci_low"] < 1.0 < d["ci_high"] < 1.5  # unpaired, the CI would span about +-8
    with pytest.raises(ValueError, match=re.escape("paired folds differ: [\"(('a', 'c'), 2)\"] are in only one")):
        stats.paired_difference(a, {f: v for f, v in b.items() if f != (("a", "c"), 2)})


def test_paired_example_bootstrap_matches_numpy_reference():
    rng = np.random.default_rng(2)
    # two tasks' examples scored in two folds each (0/1 correctness), plus a third task in one fold
    n = {"t1": 20, "t2": 15, "t3": 12}
    strata = [("f1", "t1"), ("f2", "t1"), ("f1", "t2"), ("f3", "t2"), ("f2", "t3")]
    a = {s: (rng.random(n[s[1]]) < 0.7).astype(float) for s in strata}
    b = {s: (rng.random(n[s[1]]) < 0.6).astype(float) for s in strata}
    shared = {s: s[1] for s in strata}
    got = stats.paired_example_bootstrap(a, b, shared=shared, resamples=400, seed=4)
    assert got["diff"] == pytest.approx(np.mean([np.mean(a[s] - b[s]) for s in strata]))
    assert (got["strata"], got["examples"]) == (5, 20 + 20 + 15 + 15 + 12)
    np.testing.assert_allclose((got["ci_low"], got["ci_high"]), _reference_example_ci(a, b, shared, 400, 0.95, 4),
                               rtol=1e-12)
    alone = stats.paired_example_bootstrap(a, b, resamples=400, seed=4)  # every stratum its own draw
    np.testing.assert_allclose((alone["ci_low"], alone["ci_high"]),
                               _reference_example_ci(a, b, {s: s for s in strata}, 400, 0.95, 4), rtol=1e-12)
    # Paired: a shift common to both variants cancels; a constant difference has a zero-width CI.
    c = stats.paired_example_bootstrap({s: v + 5 for s, v in a.items()}, {s: v + 5 for s, v in b.items()},
                                       shared=shared, resamples=400, seed=4)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((got["ci_low"], got["ci_high"]))
    const = stats.paired_example_bootstrap({s: b[s] + 1 for s in strata}, b, shared=shared, resamples=50)
    assert (const["diff"], const["ci_low"], const["ci_high"]) == pytest.approx((1.0, 1.0, 1.0))
    # Folds that score the same examples with the same differences are one stratum when they share a draw.
    d = {("f1", "t1"): a[("f1", "t1")], ("f2", "t1"): a[("f1", "t1")]}
    zero = {s: np.zeros(20) for s in d}
    twice = stats.paired_example_bootstrap(d, zero, shared={s: "t1" for s in d}, resamples=400, seed=1)
    once = stats.paired_example_bootstrap({("f1", "t1"): d[("f1", "t1")]}, {("f1", "t1"): np.zeros(20)},
                                          resamples=400, seed=1)
    assert (twice["ci_low"], twice["ci_high"]) == pytest.approx((once["ci_low"], once["ci_high"]))
    with pytest.raises(ValueError, match=re.escape("paired strata differ: [\"('f2', 't3')\"] are in only one")):
        stats.paired_example_bootstrap(a, {s: v for s, v in b.items() if s != ("f2", "t3")})
    with pytest.raises(ValueError, match="draw group 't1' holds strata of different sizes \\[12, 20\\]"):
        stats.paired_example_bootstrap(a, b, shared={**shared, ("f2", "t3"): "t1"})
    with pytest.raises(ValueError, match=re.escape("stratum ('f1', 't1'): a and b must be equally long")):
        stats.paired_example_bootstrap(a, {**b, ("f1", "t1"): np.zeros(3)})


def test_ci_fields_counts_seeds_and_subsets():
    folds = [{"subset": ("a", "b"), "seed": 0, "acc": 80.0}, {"subset": ("a", "b"), "seed": 1, "acc": 82.0},
             {"subset": ("a", "c"), "seed": 0, "acc": 90.0}]
    f = stats.ci_fields(folds, "acc")
    assert f["seeds"] == 2 and f["subsets"] == 2
    assert (f["ci_low"], f["ci_high"]) == stats.bootstrap_ci([80.0, 82.0, 90.0])
    with pytest.raises(ValueError, match=re.escape("has no 'seed'")):
        stats.ci_fields([{"subset": ("a",), "acc": 1.0}], "acc")


def test_study_chooses_on_validation_and_pairs_folds(t2_suite, monkeypatch):
    from experiments import study_t2

    s, _ = t2_suite
    monkeypatch.setattr(study_t2, "TIES_GRID", {"density": (0.2, 0.5), "scale": (1.0,)})
    monkeypatch.setattr(study_t2, "SUBSET_SIZE", 2)
    monkeypatch.setattr(study_t2, "SUBSETS", 2)
    entry = criteria.measure(s, scales=(0.3, 1.0), log=lambda m: None)
    seen = []
    real = s.evaluate
    monkeypatch.setattr(s, "evaluate", lambda *a, **k: seen.append(a[1] if len(a) > 1 else k["split"]) or real(*a, **k))
    rows, folds, chosen = study_t2.run(s, entry)
    assert set(seen) == {"validation"}  # never the test split
    full = [r for r in rows if r["tasks"] == 3]
    assert len(full) == 4 and all(r["ci_low"] is None and r["subsets"] == 1 for r in full)
    for m in ("task_arithmetic", "ties"):
        best = max((r for r in full if r["method"] == m), key=lambda r: r["normalized_acc"])
        assert chosen[m] == best["setting"]
    sub = {r["method"]: r for r in rows if r["tasks"] == 2}
    assert sub["task_arithmetic"]["subsets"] == 2 and sub["ties"]["seeds"] == 1
    diff = sub["ties - task_arithmetic"]
    assert diff["normalized_acc"] == pytest.approx(sub["ties"]["normalized_acc"] - sub["task_arithmetic"]["normalized_acc"])
    merged = jmerge.merge(s.base, s.experts_for(folds[-1]["subset"]), "ties", **chosen["ties"])
    assert folds[-1]["normalized_acc"] == pytest.approx(real(merged, "validation", tasks=folds[-1]["subset"],
                                                             probes=())["normalized_acc"])
