"""The Suite T v2 LwPTV study's pieces (its control masks are tested in test_lwptv_controls.py): the
OOD definition (held-out tasks through the shared zero-shot heads, against numpy) and the masked
merges' identities on the tiny random BERT suite of test_suite_t2, the OOD entry criterion, and the
aggregation's paired differences."""

import json
import re

import numpy as np
import pytest

import jmerge
from experiments import stats, study_t2_lwptv as st
from experiments.evaluate import embed

pytestmark = pytest.mark.standard_promotion("optax 0.2.8's adam computes decay ** count (float ** int32): the t2_suite fixture fine-tunes experts")


def test_split_scores_and_errors():
    acc = {"a": 50.0, "b": 70.0, "c": 20.0, "d": 40.0}
    assert st.split_scores(acc, ("a", "c")) == {"id_acc": 35.0, "ood_acc": 55.0, "held_out": ["b", "d"]}
    with pytest.raises(ValueError, match=re.escape("merged tasks ['e'] have no accuracy (tasks scored: "
                                                   "['a', 'b', 'c', 'd'])")):
        st.split_scores(acc, ("a", "e"))
    with pytest.raises(ValueError, match="no held-out task: OOD needs at least one task outside the merge"):
        st.split_scores(acc, tuple(acc))


def test_ood_is_the_shared_heads_accuracy_on_held_out_tasks(t2_suite):
    s, _ = t2_suite
    merged = jmerge.merge(s.base, s.experts_for(("alpha", "beta")), "task_arithmetic", scale=0.5)
    res = s.evaluate(merged, "validation", tasks=s.names, probes=())
    got = st.split_scores(res["id"], ("alpha", "beta"))
    # numpy reference: the frozen cosine head of the held-out task on the merged encoder's features.
    t = s.inputs["gamma"]["validation"]
    emb = embed(s.encoder, merged, t)
    head = {k: np.asarray(v) for k, v in s.heads["gamma"].items()}
    logits = head["scale"].ravel()[0] * (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ head["kernel"] + head["bias"]
    assert got["held_out"] == ["gamma"]
    assert got["ood_acc"] == pytest.approx(100 * np.mean(logits.argmax(1) == t.labels))
    assert got["id_acc"] == pytest.approx((res["id"]["alpha"] + res["id"]["beta"]) / 2)


@pytest.fixture
def study(t2_suite, tmp_path, monkeypatch):
    s, _ = t2_suite
    monkeypatch.setattr(st, "SUBSET_SIZE", 2)
    return st.Study(s, tmp_path)


def test_folds_masks_identities_and_resume(study, monkeypatch):
    s = study.s
    L = study.grouping.num_layers
    assert study.grouping.names == ("embeddings", "layer.0", "layer.1")
    assert study.subsets == [("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")]  # all 3 (<= SUBSETS)
    names = study.subsets[0]
    base = {f["subset"][0] + f["subset"][1]: f for f in study.base_folds("validation")}["alphabeta"]
    plain = study.fold("validation", "ties", "plain", None, 0, names)
    every = study.fold("validation", "ties", "first_layers", L, 0, names)  # keeps all layers: the method itself
    none = study.fold("validation", "ties", "first_layers", 0, 0, names)  # reverts all layers: the base
    assert every["acc"] == plain["acc"] and none["acc"] == base["acc"]
    assert (none["id_acc"], none["ood_acc"]) == (base["id_acc"], base["ood_acc"]) and base["held_out"] == ["gamma"]
    lw = study.fold("validation", "ties", "lwptv", 2, 0, names)
    _, want = jmerge.lwptv.inspect(s.base, s.experts_for(names), layers=s.config.layers, score=st.SCORE,
                                   rule="top_k", value=2)
    np.testing.assert_array_equal(np.asarray(lw["mask"], bool), want.mask)
    merged = jmerge.merge(s.base, s.experts_for(names), "ties", lwptv=want, **study.settings["ties"])
    assert lw["acc"] == s.evaluate(merged, "validation", tasks=s.names, probes=())["id"]
    rand = [study.fold("validation", "ties", "random", 2, seed, names) for seed in (0, 1, 2)]
    for f in rand:
        assert (np.asarray(f["mask"]).sum(axis=1) == 2).all() and f["keep_ratio"] == pytest.approx(2 / 3)
    assert len({str(f["mask"]) for f in rand}) > 1  # the seed draws the mask
    r1 = rand[1]
    # A stored fold is read back (from the file too), not merged again.
    monkeypatch.setattr(jmerge, "merge", lambda *a, **k: pytest.fail("merged again"))
    assert study.fold("validation", "ties", "random", 2, 1, names) == r1
    again = st.Study(s, study.directory)
    assert again.fold("validation", "ties", "lwptv", 2, 0, names)["acc"] == lw["acc"]
    with pytest.raises(ValueError, match=re.escape("unknown variant 'shuffled' (variants: plain, lwptv, "
                                                   "first_layers, random)")):
        study.mask("ties", "shuffled", 2, 0, names)


def test_ood_entry_needs_a_spread_above_the_ci_width():
    rng = np.random.default_rng(0)
    base = {(f"s{i}",): float(rng.uniform(40, 60)) for i in range(5)}
    moved = {k: v - 4 + float(rng.normal(0, 0.5)) for k, v in base.items()}
    e = st.ood_entry(base, moved)
    d = stats.paired_difference(moved, base)
    assert e["passed"] and e["minus_base"] == pytest.approx(d["diff"]) and e["ci_width"] == pytest.approx(
        d["ci_high"] - d["ci_low"])
    noise = {k: v + float(rng.normal(0, 2)) for k, v in base.items()}
    assert not st.ood_entry(base, noise)["passed"]


def _f(method, variant, subset, seed, id_acc, ood_acc, k=4):
    mask = None if variant in ("plain", "base") else np.ones((2, 7), int).tolist()
    return {"split": "test", "method": method, "variant": variant, "top_k": None if mask is None else k,
            "keep_ratio": None if mask is None else k / 7, "seed": seed, "subset": list(subset), "id_acc": id_acc,
            "ood_acc": ood_acc, "normalized_acc": id_acc, "mask": mask, "setting": {}, "coverage": 1.0}


def test_aggregate_paired_differences_average_seeds_then_methods():
    rng = np.random.default_rng(1)
    subs = [("a", "b"), ("a", "c"), ("b", "c")]
    folds = [_f("base", "base", k, 0, 40.0, 60.0) for k in subs]
    val = {}
    for m in ("task_arithmetic", "ties"):
        for k in subs:
            for v, seeds in (("plain", [0]), ("lwptv", [0]), ("first_layers", [0]), ("random", [0, 1, 2])):
                for seed in seeds:
                    val[m, v, k, seed] = (float(rng.uniform(60, 70)), float(rng.uniform(40, 50)))
                    folds.append(_f(m, v, k, seed, *val[m, v, k, seed]))
    rows = st.aggregate(folds, ["task_arithmetic", "ties"])
    by = {(r["method"], r["variant"]): r for r in rows}
    r = by["ties", "random"]
    oods = [val["ties", "random", k, s][1] for k in subs for s in range(3)]
    assert r["ood_acc"] == pytest.approx(np.mean(oods)) and (r["seeds"], r["subsets"]) == (3, 3)
    assert (r["ci_low"], r["ci_high"]) == stats.bootstrap_ci(oods)
    assert r["masks"] == {"task_masks": 18, "distinct": 1, "uniform_folds": 9}
    rand = lambda m, k, i: np.mean([val[m, "random", k, s][i] for s in range(3)])
    for i, metric in ((1, "ood_acc"), (0, "id_acc")):
        d = {k: np.mean([val[m, "lwptv", k, 0][i] - rand(m, k, i) for m in ("task_arithmetic", "ties")]) for k in subs}
        mean = by["mean of 2 methods", "lwptv - random"]
        assert mean[metric] == pytest.approx(np.mean(list(d.values())))
        lo, hi = stats.bootstrap_ci([d[k] for k in sorted(d, key=str)])
        assert (mean["ci_low" if i else "id_ci_low"], mean["ci_high" if i else "id_ci_high"]) == pytest.approx((lo, hi))
    assert by["ties", "lwptv - plain"]["ood_acc"] == pytest.approx(
        np.mean([val["ties", "lwptv", k, 0][1] - val["ties", "plain", k, 0][1] for k in subs]))
    v = st.verdict(rows)
    assert set(v) == {"gain", "beats_first_layers", "beats_random"}


def test_demo_takes_the_studys_layer_count(t2_suite, tmp_path, monkeypatch):
    from experiments import demo

    s, _ = t2_suite
    assert st.chosen_top_k(tmp_path / "absent.json") == {}
    path = tmp_path / "v.json"
    path.write_text(json.dumps([{"chosen": {"ties": {"top_k": 2, "setting": {}}}}]))
    assert st.chosen_top_k(path) == {"ties": 2}
    monkeypatch.setattr(st, "chosen_top_k", lambda: {"ties": 2})
    chosen = {"task_arithmetic": {"scale": 0.3, "lwptv_top_k": 1}, "ties": {"density": 0.2, "scale": 1.0, "lwptv_top_k": 1}}
    names = [n for n, _ in demo.methods(s, chosen)]
    assert names[:4] == ["task_arithmetic (scale=0.3)", "task_arithmetic + LwPTV (top 1 of 7 layers, demo tuning)",
                         "ties (density=0.2, scale=1.0)", "ties + LwPTV (top 2 of 7 layers, Suite T v2 LwPTV study)"]


def test_complete_needs_every_variant_and_seed():
    folds = [_f("ties", v, ("a", "b"), s, 60.0, 40.0) for v, s in
             (("plain", 0), ("lwptv", 0), ("first_layers", 0), ("random", 0), ("random", 1), ("random", 2))]
    folds += [_f("ties", v, ("a", "c"), 0, 60.0, 40.0) for v in ("plain", "lwptv", "first_layers", "random")]
    assert st.complete(folds, "ties") == {("a", "b")} and st.complete(folds, "task_arithmetic") == set()


def test_validate_gates_each_method_and_chooses_its_k_on_its_own_validation_folds(study, monkeypatch):
    seen = []
    real = study.s.evaluate
    monkeypatch.setattr(study.s, "evaluate", lambda p, split, **k: seen.append(split) or real(p, split, **k))
    monkeypatch.setattr(st, "TOP_K", (1, 2))
    fake = {"minus_base": 0.0, "ci_low": -1.0, "ci_high": 1.0, "ci_width": 2.0}
    monkeypatch.setattr(st, "ood_entry", lambda b, m: {**fake, "passed": False})
    out = st.validate(study, ["task_arithmetic", "ties"])
    assert out["chosen"] == {} and not any(f["variant"] == "lwptv" for f in study.folds)
    assert st.entry_message("ties", out["ood_entry_by_method"]["ties"]) == (
        "suite T2 fails entry criterion ood_spread for ties: ties - base on held-out tasks +0.00 points "
        "(95 % CI [-1.00, 1.00], width 2.00); the difference must exceed the CI width in size")
    # only ties passes: it alone gets LwPTV folds and a k, chosen on its own rows
    passes = iter([False, True])  # entries are computed in the order of the methods
    monkeypatch.setattr(st, "ood_entry", lambda b, m: {**fake, "passed": next(passes)})
    out = st.validate(study, ["task_arithmetic", "ties"])
    assert set(out["chosen"]) == {"ties"}
    assert {f["method"] for f in study.folds if f["variant"] == "lwptv"} == {"ties"}
    lw = {r["top_k"]: r for r in out["rows"] if r["variant"] == "lwptv"}
    plain = next(r for r in out["rows"] if r["variant"] == "plain" and r["method"] == "ties")
    best = st.choose(plain, list(lw.values()), st.ID_TOLERANCE)
    assert set(lw) == {1, 2} and out["chosen"]["ties"]["top_k"] == best["top_k"]
    assert out["chosen"]["ties"]["within_tolerance"] == (best["id_acc"] >= plain["id_acc"] - st.ID_TOLERANCE)
    assert set(seen) == {"validation"}
