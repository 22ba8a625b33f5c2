"""Suite L's building blocks (experiments.suite_l) on a tiny random Llama: the answer-only
loss mask, the loss against a numpy reference, rank classification of multi-token labels
against separate unpadded forwards, exact match, and the bad task definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from experiments import suite_l
from experiments.data import Task
from jmerge.learn import llama
from tests.helpers import tiny_llama

EOS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tiny_llama(tmp_path_factory.mktemp("suite_l") / "m", seed=3)
    cfg = llama.LlamaConfig.from_hf(d)
    from jmerge.io import safetensors_io as st

    return cfg, llama.stack(st.load(d), cfg), AutoTokenizer.from_pretrained(d)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_answer_mask_marks_exactly_the_answer_and_eos():
    prompts, answers = [[5, 6, 7], [8, 9, 10, 11, 12]], [[20, 21], [30]]
    ids, mask, loss_mask = suite_l.answer_batch(prompts, answers, EOS, 12)
    assert ids.shape == (2, 12) and loss_mask.shape == (2, 11)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        assert ids[i, 1:][loss_mask[i]].tolist() == a + [EOS]  # the targets of the counted positions
        assert loss_mask[i].sum() == len(a) + 1
        assert ids[i][mask[i]].tolist() == p + a + [EOS]  # left padding, real tokens intact
    with pytest.raises(ValueError, match="more than seq_len=6"):
        suite_l.answer_batch(prompts, answers, EOS, 6)


def test_answer_loss_matches_numpy(tiny):
    cfg, params, _ = tiny
    ids, mask, loss_mask = suite_l.answer_batch([[5, 6, 7, 40], [8, 9]], [[20, 21], [30]], EOS, 10)
    got = float(suite_l.answer_loss(params, cfg, ids, mask, loss_mask))
    lp = _log_softmax(llama.logits(params, cfg, ids, mask))[:, :-1]
    nll = -np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, nll[loss_mask].mean(), rtol=1e-5)


def test_label_log_probs_of_multi_token_labels_match_separate_forwards(tiny):
    cfg, params, _ = tiny
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    answers = [[20], [20, 21, 22], [23, 24], [25, 24]]  # one shared first token, lengths 1-3
    got = suite_l.label_log_probs(params, cfg, prompts, answers, batch=4, pad=EOS)
    want = np.zeros((3, 4))
    for i, p in enumerate(prompts):
        for c, a in enumerate(answers):
            row = np.array([p + a], np.int32)
            lp = _log_softmax(llama.logits(params, cfg, row))[0]
            want[i, c] = sum(lp[len(p) - 1 + j, t] for j, t in enumerate(a))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert suite_l.rank_predictions(got).tolist() == np.argmax(want, 1).tolist()


def test_rank_classification_picks_the_higher_log_prob():
    lp = np.array([[-3.0, -1.0, -2.0], [-0.5, -4.0, -0.6], [-1.0, -1.0, -5.0]])
    assert suite_l.rank_predictions(lp).tolist() == [1, 0, 0]  # ties: the first label


def test_exact_match_needs_the_label_then_eos():
    assert suite_l.exact_match([20, 21, EOS], [20, 21], EOS)
    assert not suite_l.exact_match([20, 21], [20, 21], EOS)  # no EOS within the cap
    assert not suite_l.exact_match([20, EOS], [20, 21], EOS)
    assert not suite_l.exact_match([20, 21, 22, EOS], [20, 21], EOS)


def _task(n_per_class=(6, 6)):
    """A two-class task whose three splits each hold ``n_per_class`` examples of classes a, b."""
    texts, labels = [], []
    for c, n in zip(("a", "b"), n_per_class):
        texts += [f"text {c} {i}" for i in range(n)]
        labels += [c] * n
    splits = [s for s in ("train", "validation", "test") for _ in texts]
    return Task.from_records("toy", texts * 3, labels * 3, splits=splits)


@pytest.mark.parametrize("labels, match", [
    ((("a", "yes"), ("a", "no")), "duplicate class name 'a'"),
    ((("a", "yes"), ("b", "yes")), "duplicate label word 'yes'"),
    ((("a", "yes"), ("b", " ")), "class 'b' has no label word"),
    ((("a", "yes"), ("c", "no")), "class 'c' is not one of"),
])
def test_bad_task_definitions_name_the_task(tiny, labels, match):
    spec = suite_l.LTask("toy", labels, "Answer yes or no.")
    with pytest.raises(ValueError, match=f"task 'mytask': {match}"):
        suite_l.prepare_task("mytask", spec, tiny[2], {"train": 4}, loader=lambda _: _task())


def test_too_few_examples_for_a_split(tiny):
    spec = suite_l.LTask("toy", (("a", "yes"), ("b", "no")), "Answer yes or no.")
    with pytest.raises(ValueError, match=r"task 'mytask': the validation split has 12 examples .* fewer than the 13"):
        suite_l.prepare_task("mytask", spec, tiny[2], {"train": 4, "validation": 13}, loader=lambda _: _task())
    ok = suite_l.prepare_task("mytask", spec, tiny[2], {"train": 12, "validation": 4}, loader=lambda _: _task((9, 3)))
    assert sorted(np.bincount(ok.labels["train"]).tolist()) == [3, 9]  # round robin, then the class left over
    assert ok.prompts["train"][0][-3:] == tiny[2].encode("<|im_start|>assistant\n", add_special_tokens=False)[-3:]


def test_study_rows_from_example_values():
    from experiments import study_l

    expert = {"x": 80.0, "y": 50.0}
    fold = {"method": "ties", "n_tasks": 2, "subset": ["x", "y"], "seed": 0, "em_normalized": 90.0,
            "rank_correct": {"x": [1, 1, 0, 1], "y": [0, 1, 0, 0]}}
    fold["normalized_acc"] = (100 * 0.75 / 80 * 100 + 100 * 0.25 / 50 * 100) / 2  # 71.875
    ours = {**fold, "method": "divmerge_layer", "rank_correct": {"x": [1, 1, 1, 1], "y": [0, 1, 0, 0]},
            "normalized_acc": (100 * 1.0 / 80 * 100 + 100 * 0.25 / 50 * 100) / 2}
    rows = study_l.aggregate([fold, ours], expert)
    by = {r["method"]: r for r in rows}
    vals = study_l.example_values({**fold, "expert_rank_acc": expert})
    assert np.mean(list(vals.values())) == pytest.approx(fold["normalized_acc"])  # equal examples per task
    assert by["ties"]["ci_over"] == "examples" and by["ties"]["ci_low"] <= by["ties"]["normalized_acc"] <= by["ties"]["ci_high"]
    diff = by["divmerge_layer - ties"]
    assert diff["normalized_acc"] == pytest.approx(ours["normalized_acc"] - fold["normalized_acc"])


def test_study_pairs_each_example_once_averaged_over_seeds():
    from experiments import study_l

    expert = {"x": 50.0}
    base = {"n_tasks": 1, "subset": ["x"], "em_normalized": None}
    ties = {**base, "method": "ties", "seed": 0, "rank_correct": {"x": [0, 1]}, "normalized_acc": 100.0}
    ours = [{**base, "method": "divmerge_layer", "seed": s, "rank_correct": {"x": c}, "normalized_acc": 100.0 * sum(c)}
            for s, c in ((0, [1, 1]), (1, [1, 0]), (2, [0, 0]))]
    rows = {r["method"]: r for r in study_l.aggregate([ties, *ours], expert)}
    assert study_l.seed_mean([{**f, "expert_rank_acc": expert} for f in ours]) == {
        (("x",), "x", 0): pytest.approx(400 / 3), (("x",), "x", 1): pytest.approx(200 / 3)}
    assert rows["divmerge_layer"]["seeds"] == 3 and rows["divmerge_layer"]["ci_over"] == "folds"
    assert rows["divmerge_layer"]["normalized_acc"] == pytest.approx(100.0)
    diff = rows["divmerge_layer - ties"]
    assert (diff["seeds"], diff["seeds_other"]) == (3, 1)
    assert diff["normalized_acc"] == pytest.approx(0.0)  # (400/3 + 200/3) / 2 - (0 + 200) / 2


def test_study_plan_samples_subsets_per_count_and_runs_the_full_set_first():
    from types import SimpleNamespace

    from experiments import study_l

    names = ("a", "b", "c", "d", "e", "f")
    pairs = study_l.subsets(names, 2, 3)
    assert len(pairs) == len(set(pairs)) == 3 and pairs == study_l.subsets(names, 2, 3)  # seeded, distinct
    assert study_l.subsets(names, 2, 3, seed=1) != pairs  # the seed draws them
    assert study_l.subsets(names, 5, 6) == list(itertools.combinations(names, 5))  # all when few enough
    args = SimpleNamespace(counts=[2, 6], learned_counts=None, subsets=2, methods=["ties", "divmerge_layer"], seeds=[0, 3])
    got = study_l.plan(names, args)
    assert got[:3] == [(6, "ties", names, 0), (6, "divmerge_layer", names, 0), (6, "divmerge_layer", names, 3)]
    assert [f for f in got[3:]] == [(2, "ties", s, 0) for s in study_l.subsets(names, 2, 2)]  # data-free: once
    with pytest.raises(ValueError, match="^task count 7 is outside 2..6 "):
        study_l.plan(names, SimpleNamespace(**{**vars(args), "counts": [7]}))
