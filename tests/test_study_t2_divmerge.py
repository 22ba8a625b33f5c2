"""The Suite T v2 DivMerge study's pieces: the shared padded head equals each task's own head,
the supervised bound's objective is labelled cross-entropy, step counts, stored settings and
the aggregation (means, CIs, paired differences) against numpy (tiny random BERT suite of
test_suite_t2)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import stats, study_t2_divmerge as st
from jmerge.learn import objectives
pytestmark = pytest.mark.standard_promotion("optax 0.2.8's adam computes decay ** count (float ** int32): the fixtures fine-tune experts")


def test_shared_head_equals_each_tasks_own_head(t2_suite, monkeypatch):
    s, _ = t2_suite
    monkeypatch.setattr(st, "SAMPLES", 20)
    pools = st.Pools(s)
    assert pools.classes == max(s.tasks[t].num_classes for t in s.names)
    for t in s.names:
        xs, y = pools.inputs(t, seed=1)
        assert len(y) == 20 and set(xs["task"]) == {s.names.index(t)}
        np.testing.assert_array_equal(y, s.pool(t, 20, seed=1).labels)
        got = np.asarray(pools.apply(s.base, xs))
        own = np.asarray(s.logits(s.base, t, {"ids": xs["ids"], "mask": xs["mask"]}))
        c = own.shape[1]
        np.testing.assert_allclose(got[:, :c], own, rtol=1e-5, atol=1e-5)
        probs = np.asarray(jax.nn.softmax(got))
        assert np.all(probs[:, c:] == 0.0)  # padded classes carry no probability


def test_supervised_objective_is_cross_entropy():
    rng = np.random.default_rng(0)
    log_q = np.asarray(jax.nn.log_softmax(jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)))
    y = rng.integers(0, 5, 6)
    onehot = np.full((6, 5), -np.inf, np.float32)
    onehot[np.arange(6), y] = 0.0
    np.testing.assert_allclose(np.asarray(objectives.kl(jnp.asarray(onehot), jnp.asarray(log_q))),
                               -log_q[np.arange(6), y], rtol=1e-6)


def test_epochs_for_fixes_the_step_count():
    assert st.epochs_for(48, 64, 4) == 3
    assert st.epochs_for(500, 64, 16) == 125
    with pytest.raises(ValueError, match=re.escape("50 steps are not a whole number of epochs of 16 steps (64 samples, batch 4)")):
        st.epochs_for(50, 64, 4)


def test_chosen_settings_are_the_validation_study_s(tmp_path):
    got = st.chosen_settings()
    assert got == {"task_arithmetic": {"scale": 0.3}, "ties": {"density": 0.1, "scale": 1.0}}
    rows = [{"suite": "T2", "method": "ties", "tasks": 4, "setting": {"density": d}} for d in (0.1, 0.2)]
    rows.append({"suite": "T2", "method": "task_arithmetic", "tasks": 4, "setting": {"scale": 0.3}})
    (tmp_path / f"{st.T2_STUDY}.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=re.escape("expected one chosen ties setting, found")):
        st.chosen_settings(tmp_path)


def _fold(method, subset, seed, acc, steps=None):
    return {"suite": "T2", "method": method, "n_tasks": len(subset), "subset": list(subset), "seed": seed,
            "normalized_acc": acc, "coverage": 1.0, "steps": steps}


def test_aggregate_means_cis_and_paired_differences():
    rng = np.random.default_rng(0)
    subsets = [("a", "b"), ("a", "c"), ("b", "c")]
    ta = {k: float(rng.uniform(80, 90)) for k in subsets}
    dm = {(k, seed): float(rng.uniform(85, 95)) for k in subsets for seed in (0, 1, 2)}
    folds = [_fold("task_arithmetic", k, 0, v) for k, v in ta.items()]
    folds += [_fold("divmerge_layer", k, seed, v, 400) for (k, seed), v in dm.items()]
    rows = {r["method"]: r for r in st.aggregate(folds, 400)}
    r = rows["divmerge_layer"]
    assert r["normalized_acc"] == pytest.approx(np.mean(list(dm.values())))
    assert (r["seeds"], r["subsets"]) == (3, 3)
    assert (r["ci_low"], r["ci_high"]) == stats.bootstrap_ci(list(dm.values()))
    d = rows["divmerge_layer - task_arithmetic"]
    per_subset = [np.mean([dm[(k, s)] for s in (0, 1, 2)]) - ta[k] for k in sorted(subsets, key=str)]
    assert d["normalized_acc"] == pytest.approx(np.mean(per_subset))
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(stats.bootstrap_ci(per_subset))
    assert d["subsets"] == 3 and rows["task_arithmetic"]["seeds"] == 1


def test_aggregate_difference_on_one_subset_has_its_ci_over_that_subsets_tasks():
    subset = ("a", "b", "c")
    tsv = {"a": 90.0, "b": 80.0, "c": 70.0}
    dm = {0: {"a": 91.0, "b": 79.0, "c": 75.0}, 1: {"a": 93.0, "b": 79.0, "c": 73.0}}
    folds = [{**_fold("tsv", subset, 0, float(np.mean(list(tsv.values())))), "normalized": tsv}]
    folds += [{**_fold("divmerge_layer", subset, s, float(np.mean(list(v.values()))), 400), "normalized": v}
              for s, v in dm.items()]
    d = {r["method"]: r for r in st.aggregate(folds, 400)}["divmerge_layer - tsv"]
    per_task = [np.mean([dm[s][t] for s in dm]) - tsv[t] for t in sorted(tsv)]  # 2, -1, 4
    assert d["normalized_acc"] == pytest.approx(np.mean(per_task)) == pytest.approx(5 / 3)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(stats.bootstrap_ci(per_task))
    assert (d["ci_over"], d["subsets"]) == ("tasks", 1)


def test_aggregate_difference_over_several_subsets_says_so():
    subsets = [("a", "b"), ("a", "c")]
    folds = [_fold("divmerge_layer", k, 0, 90.0 + i, 400) for i, k in enumerate(subsets)]
    folds += [_fold("ties", k, 0, 85.0 - i) for i, k in enumerate(subsets)]
    d = {r["method"]: r for r in st.aggregate(folds, 400)}["divmerge_layer - ties"]
    assert (d["ci_over"], d["subsets"], d["normalized_acc"]) == ("subsets", 2, pytest.approx(6.0))


def test_aggregate_keeps_step_counts_apart():
    subsets = [("a", "b"), ("a", "c")]
    folds = [_fold("divmerge_layer", k, 0, 90.0 + i, 400) for i, k in enumerate(subsets)]
    folds += [_fold("supervised_layer", k, 0, 80.0 + i, 400) for i, k in enumerate(subsets)]
    folds += [_fold("supervised_layer", k, 0, 95.0 + 2 * i, 384) for i, k in enumerate(subsets)]
    rows = st.aggregate(folds, 400)
    means = {r["steps"]: r["normalized_acc"] for r in rows if r["method"] == "supervised_layer"}
    assert means == {400: 80.5, 384: 96.0}
    diffs = {r["steps"]: r["normalized_acc"] for r in rows if r["method"] == "divmerge_layer - supervised_layer"}
    assert diffs == {400: pytest.approx(10.0), 384: pytest.approx(-5.5)}
    assert [r["method"] for r in rows].count("divmerge_layer") == 1


def test_save_replaces_only_the_same_method_steps_subset_and_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(st.results, "RESULTS_DIR", tmp_path)
    first = [_fold("supervised_layer", ("a", "b"), 0, 80.0, 48), _fold("supervised_layer", ("a", "b"), 1, 81.0, 48)]
    save = lambda new: st.results.save_folds(st.FOLDS, new, key=st._key)  # noqa: E731
    save(first)
    save([_fold("supervised_layer", ("a", "b"), 0, 90.0, 384)])  # another step count: kept apart
    save([_fold("supervised_layer", ("a", "b"), 1, 85.0, 48)])  # same key: replaces
    got = sorted((f["steps"], f["seed"], f["normalized_acc"]) for f in json.loads((tmp_path / f"{st.FOLDS}.json").read_text()))
    assert got == [(48, 0, 80.0), (48, 1, 85.0), (384, 0, 90.0)]


def test_per_epoch_is_the_mean_loss_of_each_pass_over_the_pool():
    losses = np.arange(40, dtype=float)
    assert st.per_epoch(losses, samples=64, batch=4) == [7.5, 23.5, 35.5]  # 16 steps per epoch, last one partial
    assert st.per_epoch(losses[:32], samples=30, batch=4) == [3.5, 11.5, 19.5, 27.5]  # ceil(30 / 4) = 8


def test_choose_steps_takes_the_best_validation_accuracy_and_the_fewer_steps_on_ties():
    rows = [{"method": "divmerge_layer", "steps": 48, "normalized_acc": 81.9},
            {"method": "divmerge_layer", "steps": 400, "normalized_acc": 85.1},
            {"method": "supervised_task", "steps": 48, "normalized_acc": 80.5},
            {"method": "supervised_task", "steps": 400, "normalized_acc": 80.5}]
    assert st.choose_steps(rows) == {"divmerge_layer": 400, "supervised_task": 48}
    for n in st.STEP_GRID:
        assert st.epochs_for(n, st.SAMPLES, st.BATCH) * -(-st.SAMPLES // st.BATCH) == n


def test_chosen_steps_reads_the_validation_rows_and_refuses_a_missing_file(tmp_path):
    rows = [{"suite": "T2", "method": "divmerge_layer", "steps": n, "normalized_acc": a} for n, a in ((48, 81.9), (400, 85.1))]
    rows.append({"suite": "V", "method": "divmerge_layer", "steps": 48, "normalized_acc": 99.0})  # another suite's row
    (tmp_path / f"{st.STEPS_STEM}.json").write_text(json.dumps(rows))
    assert st.chosen_steps(tmp_path) == {"divmerge_layer": 400}
    missing = tmp_path / "none"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing / st.STEPS_STEM}.json is missing: run "
                                                          "`python -m experiments.study_t2_divmerge steps` first")):
        st.chosen_steps(missing)
