"""The Suite V LwPTV controls study: the validation choice it reads (and its errors), the report on
synthetic folds (known per-example differences give known CIs; random seeds and methods averaged
per example), and its folds on a tiny text suite (per-example correctness is what the accuracies
are the means of; the masked merges' identities; resume)."""

import json
import re
from functools import partial

import jax
import numpy as np
import pytest

import jmerge
from experiments import lwptv_controls as lc
from experiments import results, stats, suite
from experiments import study_v_lwptv_controls as sv
from experiments.encoders import TextEncoder, tokenize
from experiments.models.bert import Bert
from jmerge.lwptv import LwPTV
from synthetic_suite import CFG, RECIPE, TASKS, tokenizer

TASK_NAMES, OOD = ("a", "b", "c"), ("digits",)
METHODS = ("task_arithmetic", "ties")


def _choice_rows(method, score="trim_survival", ratio=0.85):
    test = [{"suite": "V", "method": method, "lwptv": False, "score": None, "keep_ratio": None},
            {"suite": "V", "method": method, "lwptv": True, "score": score, "keep_ratio": ratio}]
    val = [{"method": method, "lwptv": False, "id_acc": 70.0, "ood_acc": 60.0, "score": None, "keep_ratio": None},
           {"method": method, "lwptv": True, "id_acc": 70.0, "ood_acc": 65.0, "score": score, "keep_ratio": ratio},
           {"method": method, "lwptv": True, "id_acc": 69.0, "ood_acc": 70.0, "score": "other", "keep_ratio": ratio}]
    return test, val


def test_chosen_settings_reads_the_validation_choice_and_names_a_missing_method():
    test, val = _choice_rows("ties", "relative_update")
    assert sv.chosen_settings(["ties"], test, val) == {"ties": {"score": "relative_update", "keep_ratio": 0.85}}
    with pytest.raises(ValueError, match=re.escape("no validation choice for Suite V method 'tsv': lwptv.json holds "
                                                   "0 Suite V rows of tsv with LwPTV (need 1)")):
        sv.chosen_settings(["ties", "tsv"], test, val)
    with pytest.raises(ValueError, match=re.escape("no validation grid for Suite V method 'ties' in "
                                                   "lwptv_v_validation.json (plain rows: 0, LwPTV rows: 2)")):
        sv.chosen_settings(["ties"], test, val[1:])
    # the stored run must be the choice the validation grid makes (OOD max within 0.5 ID points)
    _, other = _choice_rows("ties", "relative_update")
    other[2]["id_acc"] = 69.8
    with pytest.raises(ValueError, match=re.escape("Suite V method 'ties': lwptv.json ran {'score': 'relative_update', "
                                                   "'keep_ratio': 0.85} but its validation grid chooses score 'other'")):
        sv.chosen_settings(["ties"], test, other)


def _bits(x):
    return "".join(str(int(v)) for v in x)


def _fold(method, variant, seed, held, id_c, ood_c, mask=None):
    names = [t for t in TASK_NAMES if t != held]
    return {"suite": "V", "split": "test", "method": method, "variant": variant, "seed": seed, "held_out": [held],
            "merged": names, "score": "trim_survival" if variant == "lwptv" else None,
            "keep_ratio": None if variant == "plain" else 0.85, "top_k": None if variant == "plain" else 16,
            "layers": 19, "mask": mask, "setting": {},
            "id_correct": {t: _bits(id_c[t]) for t in names}, "ood_correct": {t: _bits(ood_c[t]) for t in (held, *OOD)}}


N = {"a": 30, "b": 25, "c": 20, "digits": 18}


@pytest.fixture
def synthetic_folds():
    """lwptv right everywhere; first_layers wrong everywhere for ties, right for TA; plain = lwptv;
    random: seed-dependent 0/1 per example. Returns (folds, random correctness by (method, seed, held))."""
    rng = np.random.default_rng(0)
    ones = {t: np.ones(n, int) for t, n in N.items()}
    zeros = {t: np.zeros(n, int) for t, n in N.items()}
    first, last = "1" * 16 + "0" * 3, "0" * 3 + "1" * 16
    rotated = lambda s: first[s:] + first[:s]
    folds, rand = [], {}
    for m in METHODS:
        for h in TASK_NAMES:
            folds.append(_fold(m, "plain", 0, h, ones, ones))
            pair = [first, last] if TASK_NAMES.index(h) % 2 == 0 else [last, first]
            folds.append(_fold(m, "lwptv", 0, h, ones, ones, pair))
            fl = zeros if m == "ties" else ones
            folds.append(_fold(m, "first_layers", 0, h, fl, fl, [last, last]))
            for s in lc.RANDOM_SEEDS:
                rand[m, s, h] = {t: (rng.random(n) < 0.5).astype(int) for t, n in N.items()}
                folds.append(_fold(m, "random", s, h, rand[m, s, h], rand[m, s, h], [rotated(s), first]))
    return folds, rand


def test_report_rows_known_differences_give_known_cis(synthetic_folds):
    folds, rand = synthetic_folds
    rows = sv.aggregate(folds, METHODS, OOD)
    by = {(r["method"], r["variant"]): r for r in rows}
    mean = "mean of 2 methods"
    assert {r["suite"] for r in rows} == {sv.LABEL} and len(rows) == 3 * (4 + 3)
    # lwptv = plain everywhere: 0 [0, 0]; ties' first_layers always wrong: +100 [100, 100], TA's always right: 0
    for m in (*METHODS, mean):
        r = by[m, "lwptv - plain"]
        assert (r["ood_acc"], r["ci_low"], r["ci_high"], r["id_acc"], r["id_ci_low"], r["id_ci_high"]) == (0,) * 6
    r = by["ties", "lwptv - first_layers"]
    assert (r["ood_acc"], r["ci_low"], r["ci_high"]) == pytest.approx((100, 100, 100))
    assert (r["id_acc"], r["id_ci_low"], r["id_ci_high"]) == pytest.approx((100, 100, 100))
    assert (r["heldout_acc"], r["no_expert_acc"]) == pytest.approx((100, 100))
    assert by["task_arithmetic", "lwptv - first_layers"]["ood_acc"] == 0
    r = by[mean, "lwptv - first_layers"]  # per-example mean over methods: +50 on every example
    assert (r["ood_acc"], r["ci_low"], r["ci_high"], r["id_ci_low"], r["id_ci_high"]) == pytest.approx((50,) * 5)
    # random: correctness averaged over the seeds per example, then the paired bootstrap over examples
    seed_mean = lambda m, h, t: np.mean([rand[m, s, h][t] for s in lc.RANDOM_SEEDS], axis=0)
    for m in METHODS:
        for kind, pre, tasks in (("ood", "", lambda h: (h, *OOD)), ("id", "id_", lambda h: [t for t in TASK_NAMES
                                                                                            if t != h])):
            a = {(h, t): np.full(N[t], 100.0) for h in TASK_NAMES for t in tasks(h)}
            b = {(h, t): 100 * seed_mean(m, h, t) for h in TASK_NAMES for t in tasks(h)}
            want = stats.paired_example_bootstrap(a, b, shared={s: s[1] for s in a}, resamples=sv.RESAMPLES,
                                                  seed=sv.BOOTSTRAP_SEED)
            r = by[m, "lwptv - random"]
            assert r[f"{pre}ci_low"] == pytest.approx(want["ci_low"]) and r[f"{pre}ci_high"] == pytest.approx(
                want["ci_high"])
            assert r["id_acc" if pre else "ood_acc"] == pytest.approx(want["diff"])
            assert want["ci_low"] < want["diff"] < want["ci_high"]
        assert by[m, "random"]["seeds"] == 3 and by[m, "lwptv - random"]["seeds"] == 3
        assert by[m, "random"]["ood_acc"] == pytest.approx(100 - by[m, "lwptv - random"]["ood_acc"])
    # levels: a variant right everywhere is 100 [100, 100]; OOD = mean over (fold, probe) strata
    r = by["ties", "lwptv"]
    assert (r["ood_acc"], r["ci_low"], r["ci_high"], r["top_k"], r["score"]) == (100, 100, 100, 16, "trim_survival")
    assert r["examples_ood"] == sum(N[h] + N["digits"] for h in TASK_NAMES)
    assert r["examples_id"] == 2 * (N["a"] + N["b"] + N["c"])
    # distinct masks: lwptv's 3 folds alternate two rows; first_layers one row; random 3 seeds x (own row, all-ones)
    assert r["masks"] == {"task_masks": 6, "distinct": 2, "uniform_folds": 0}
    assert by["ties", "first_layers"]["masks"] == {"task_masks": 6, "distinct": 1, "uniform_folds": 3}
    assert by["ties", "random"]["distinct_masks"] == 3 and by["ties", "random"]["task_masks"] == 18
    assert "masks" not in by["ties", "plain"]
    assert lc.verdict(rows) == {"gain": False, "beats_first_layers": True, "beats_random": True}


def test_report_refuses_incomplete_folds_naming_the_method(synthetic_folds):
    folds, _ = synthetic_folds
    cut = [f for f in folds if not (f["method"] == "ties" and f["variant"] == "random" and f["seed"] == 2)]
    with pytest.raises(ValueError, match=re.escape("incomplete folds: ties lacks random seed 2 held out a, random "
                                                   "seed 2 held out b, random seed 2 held out c")):
        sv.aggregate(cut, METHODS, OOD)


def test_report_writes_its_rows_beside_suite_vs_own(synthetic_folds, tmp_path, monkeypatch):
    folds, _ = synthetic_folds
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="no folds in lwptv_v_folds.json"):
        sv.report(METHODS, OOD, "cmd")
    old = [{"suite": "V", "method": m, "lwptv": f, "id_acc": 100.0, "ood_acc": 100.0} for m in METHODS
           for f in (False, True)]
    results.write_json("lwptv", old)
    results.write_json(sv.FOLDS, folds)
    rows = sv.report(METHODS, OOD, "python -m experiments.study_v_lwptv_controls")
    stored = json.loads((tmp_path / "lwptv.json").read_text())
    assert stored[:4] == old and stored[4:] == json.loads(json.dumps(rows))
    md = (tmp_path / "lwptv_v_controls.md").read_text()
    assert md.splitlines()[2] == "Command: `python -m experiments.study_v_lwptv_controls`"
    assert "| ties | lwptv - first_layers | 16 | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 |" in md
    assert "largest |difference| of the plain and lwptv ID/OOD figures from lwptv_v.md's single run: 0.00" in md
    assert ("PARTIAL: 2 of the 5 methods (task_arithmetic, ties); not in this table: dare_ties, tsv, iso_cts." in md)
    sv.report(METHODS, OOD, "again")  # rewrites its own rows only
    assert json.loads((tmp_path / "lwptv.json").read_text())[:4] == old


CONFIG = suite.SuiteConfig(name="V", model="minilm", tasks=("alpha", "beta", "gamma"), ood_tasks=("delta",),
                           recipe=RECIPE, validation_size=24, test_size=24, probe_train=60)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("JMERGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    bert = Bert(CFG)
    yield suite.build_suite(CONFIG, encoder=TextEncoder(bert), base=bert.init(jax.random.key(0)),
                            prepare=partial(tokenize, tokenizer), loader=TASKS.__getitem__, log=lambda m: None)
    mp.undo()


@pytest.mark.standard_promotion("optax 0.2.8's adam computes decay ** count (float ** int32): the fixture fine-tunes experts")
def test_folds_per_example_identities_and_resume(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    s = tiny
    st = sv.Study(s, {"ties": {"score": "relative_update", "keep_ratio": 0.6}})
    assert st.grouping.names == ("embeddings", "layer.0", "layer.1") and st.k("ties") == 2  # floor(0.6 * 3 + 0.5)
    held = ("gamma",)
    plain = st.fold("ties", "plain", 0, held)
    # per-example correctness: the accuracies are its means, and they are the rotation's fold
    for kind in ("id", "ood"):
        for t, bits in plain[f"{kind}_correct"].items():
            assert len(bits) == 24 and plain[kind][t] == pytest.approx(100 * np.mean(sv._unbits(bits)))
    merged = jmerge.merge(s.base, s.experts_for(("alpha", "beta")), "ties")
    rot = s.evaluate(merged, "test", ("alpha", "beta"), ("gamma", "delta"))
    assert (plain["id"], plain["ood"]) == (rot["id"], rot["ood"])
    assert plain["heldout_acc"] == rot["ood"]["gamma"] and plain["no_expert_acc"] == rot["ood"]["delta"]
    # lwptv's explicit mask is LwPTV's own keep-ratio stage
    lw = st.fold("ties", "lwptv", 0, held)
    direct = jmerge.merge(s.base, s.experts_for(("alpha", "beta")), "ties",
                          lwptv=LwPTV(layers=s.config.layers, score="relative_update", value=0.6))
    assert lw["id"] == s.evaluate(direct, "test", ("alpha", "beta"), ())["id"]
    assert [r.count("1") for r in lw["mask"]] == [2, 2] and (lw["top_k"], lw["score"]) == (2, "relative_update")
    rand = [st.fold("ties", "random", seed, held) for seed in lc.RANDOM_SEEDS]
    assert all(r.count("1") == 2 for f in rand for r in f["mask"]) and rand[0]["score"] is None
    # keep ratio 1: every control keeps all layers (the method itself); 0: none (the base)
    every = sv.Study(s, {"ties": {"score": "relative_update", "keep_ratio": 1.0}})
    assert every.fold("ties", "first_layers", 0, ("alpha",))["id"] == every.fold("ties", "plain", 0, ("alpha",))["id"]
    none = sv.Study(s, {"task_arithmetic": {"score": "relative_update", "keep_ratio": 0.0}})
    f = none.fold("task_arithmetic", "random", 1, ("alpha",))
    assert f["id"] == s.evaluate(s.base, "test", ("beta", "gamma"), ())["id"] and f["mask"] == ["000", "000"]
    # stored folds are read back, not merged again; one stored at another setting is an error
    monkeypatch.setattr(jmerge, "merge", lambda *a, **k: pytest.fail("merged again"))
    assert sv.Study(s, st.chosen).fold("ties", "random", 1, held) == json.loads(json.dumps(rand[1]))
    with pytest.raises(ValueError, match=re.escape("lwptv_v_folds.json holds ties lwptv seed 0 held out gamma run at "
                                                   "{'score': 'relative_update'}, this run asks {'keep_ratio': 0.6, "
                                                   "'score': 'trim_survival'}")):
        sv.Study(s, {"ties": {"score": "trim_survival", "keep_ratio": 0.6}}).fold("ties", "lwptv", 0, held)
    with pytest.raises(ValueError, match=re.escape("unknown variant 'shuffled' (variants: plain, lwptv, "
                                                   "first_layers, random)")):
        st.mask("ties", "shuffled", 0, ("alpha", "beta"))
