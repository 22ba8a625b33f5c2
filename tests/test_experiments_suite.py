"""experiments/: expert fine-tuning + cache and Suite evaluation, on a tiny random BERT
with synthetic keyword tasks and a tiny image encoder with synthetic image tasks (no real
data or weights needed)."""

import itertools
import json
from dataclasses import dataclass, replace
from functools import partial

import jax
import numpy as np
import pytest

import jmerge
from experiments import finetune, suite
from experiments.encoders import Images, TextEncoder, Tokens, tokenize, trim
from experiments.evaluate import embed, fit_linear_head, head_accuracy, probe_accuracy
from experiments.data import Task
from experiments.models.bert import Bert
from synthetic_suite import CFG, MAX_LEN, RECIPE, TASKS, tokenizer
pytestmark = pytest.mark.standard_promotion("optax 0.2.8's adam computes decay ** count (float ** int32): the fixtures fine-tune experts")

CONFIG = suite.SuiteConfig(name="T", model="minilm", tasks=("alpha", "beta", "gamma"), ood_tasks=("delta",),
                           recipe=RECIPE, validation_size=24, test_size=24, probe_train=60)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("JMERGE_CACHE_DIR", str(cache))
    bert = Bert(CFG)
    base = bert.init(jax.random.key(0))
    kw = dict(encoder=TextEncoder(bert), base=base, prepare=partial(tokenize, tokenizer), loader=TASKS.__getitem__,
              log=lambda m: None)
    built = suite.build_suite(CONFIG, **kw)
    again = suite.build_suite(CONFIG, **kw)
    smaller_eval = suite.build_suite(replace(CONFIG, validation_size=12), **kw)
    yield built, again, cache, smaller_eval
    mp.undo()


def test_experts_learn_and_are_cached(built):
    suite, again, cache, smaller_eval = built
    for name in CONFIG.tasks:
        m = suite.expert_metrics[name]
        assert not m["cached"] and again.expert_metrics[name]["cached"]
        assert m["validation_acc"] > 100.0 / TASKS[name].num_classes + 15  # well above chance
        folder = cache / "experts" / m["cache"].rsplit("/", 1)[1]
        files = {p.name for p in folder.iterdir()}
        assert {"encoder.safetensors", "head.safetensors", "metrics.json"} < files
        # A different validation subset reuses the expert and scores it again, beside the first scores.
        small = smaller_eval.expert_metrics[name]
        assert small["cached"] and small["cache"] == m["cache"] and small["validation_size"] == 12
        assert small["test_acc"] == m["test_acc"]
        assert len([f for f in files if f.startswith("eval-")]) == 2
        assert json.loads((folder / "metrics.json").read_text())["recipe"]["steps"] == RECIPE.steps
        for a, b in zip(jax.tree.leaves(suite.experts[name]), jax.tree.leaves(again.experts[name])):
            np.testing.assert_array_equal(a, b)
        assert jmerge.tree.paths(suite.experts[name]) == jmerge.tree.paths(suite.base)
    assert not list(cache.glob("experts/.*"))  # no temp folders left behind


def test_cache_key_depends_on_recipe_data_and_base():
    k = finetune.expert_key(RECIPE, "alpha", "d0", "b0")
    assert k == finetune.expert_key(RECIPE, "alpha", "d0", "b0")
    assert len({k, finetune.expert_key(replace(RECIPE, steps=41), "alpha", "d0", "b0"),
                finetune.expert_key(RECIPE, "alpha", "d1", "b0"), finetune.expert_key(RECIPE, "alpha", "d0", "b1"),
                finetune.expert_key(RECIPE, "beta", "d0", "b0")}) == 5


def test_evaluate_expert_reproduces_its_metrics(built):
    suite = built[0]
    res = suite.evaluate(suite.experts["beta"], "validation", tasks=["beta"])
    assert res["id"]["beta"] == pytest.approx(suite.expert_metrics["beta"]["validation_acc"])
    assert res["normalized"]["beta"] == pytest.approx(100.0)
    assert set(res["ood"]) == {"delta"} and 0 <= res["ood_acc"] <= 100
    test = suite.evaluate(suite.experts["beta"], "test", tasks=["beta"], probes=[])
    assert test["id"]["beta"] == pytest.approx(suite.expert_metrics["beta"]["test_acc"]) and test["ood_acc"] is None
    with pytest.raises(ValueError, match="split"):
        suite.evaluate(suite.base, "train")


def test_evaluate_means_and_reference_rows(built):
    suite = built[0]
    merged = jmerge.merge(suite.base, suite.experts_for(suite.names), "task_arithmetic", scale=0.5)
    res = suite.evaluate(merged)
    assert set(res["id"]) == set(CONFIG.tasks)
    assert res["id_acc"] == pytest.approx(np.mean(list(res["id"].values())))
    for t in CONFIG.tasks:
        assert res["normalized"][t] == pytest.approx(100 * res["id"][t] / suite.expert_metrics[t]["validation_acc"])
    rows = suite.reference_rows("validation")
    assert rows["experts"]["normalized_acc"] == 100.0 and set(rows["base"]["probe_id"]) == set(CONFIG.tasks)


def test_rotation_holds_out_each_subset(built):
    suite = built[0]
    calls = []

    def merge_fn(names):
        calls.append(names)
        return jmerge.merge(suite.base, suite.experts_for(names), "average")

    rot = suite.rotation(merge_fn, k=1)
    assert calls == [("beta", "gamma"), ("alpha", "gamma"), ("alpha", "beta")]
    assert [f["held_out"] for f in rot["folds"]] == [("alpha",), ("beta",), ("gamma",)]
    for f in rot["folds"]:
        assert set(f["id"]) == set(f["merged"]) and set(f["ood"]) == set(f["held_out"]) | {"delta"}
    assert rot["heldout_acc"] == pytest.approx(np.mean([f["ood"][f["held_out"][0]] for f in rot["folds"]]))
    assert len(suite.rotation(merge_fn, k=2)["folds"]) == len(list(itertools.combinations(CONFIG.tasks, 2)))
    with pytest.raises(ValueError, match="k must"):
        suite.rotation(merge_fn, k=3)


def test_logits_and_unlabeled_pool(built):
    suite = built[0]
    pool = suite.unlabeled("alpha", 10, seed=1)
    assert pool["ids"].shape == pool["mask"].shape and pool["ids"].shape[0] == 10
    logits = suite.logits(suite.experts["alpha"], "alpha", pool)
    assert logits.shape == (10, 2)
    fn = suite.apply_fn("alpha")
    assert fn is suite.apply_fn("alpha")  # stable, so jmerge.learn reuses its compiled steps
    np.testing.assert_allclose(fn(suite.experts["alpha"], pool), logits, atol=1e-6)
    with pytest.raises(ValueError, match="asked for 10000"):
        suite.unlabeled("alpha", 10_000)


def test_embed_is_order_and_batch_invariant():
    bert = Bert(CFG)
    params = bert.init(jax.random.key(2))
    ids, mask = tokenizer([" ".join(["w"] * (i % 6)) + f" x{i}" for i in range(37)])
    t = Tokens(ids, mask, np.zeros(37, np.int32))
    full = np.asarray(bert.encode(params, ids, mask))
    np.testing.assert_allclose(embed(TextEncoder(bert), params, t, batch_size=8), full, atol=1e-5)
    np.testing.assert_allclose(embed(TextEncoder(bert), params, t, batch_size=64), full, atol=1e-5)
    short_ids, short_mask = trim(ids[:1], mask[:1])
    assert short_ids.shape[1] == MAX_LEN if mask[0].sum() > 16 else short_ids.shape[1] in (MAX_LEN, 16)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_fit_linear_head_folds_the_standardisation(num_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(num_classes)
    x = rng.normal(size=(120, 6)) * rng.uniform(0.1, 10, 6) + rng.normal(size=6)
    y = rng.integers(0, num_classes, 120)
    y[y == num_classes - 1] = 0 if num_classes > 2 else y[y == num_classes - 1]  # last class absent when C > 2
    head = fit_linear_head(x, y, num_classes)
    assert head["kernel"].shape == (6, num_classes) and head["bias"].shape == (num_classes,)
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    logits = np.asarray(x @ head["kernel"] + head["bias"])
    np.testing.assert_array_equal(logits.argmax(1), ref.predict(x))
    # Same probabilities as sklearn on the classes it saw; an unseen class gets none.
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(probs[:, ref.classes_], ref.predict_proba(x), atol=1e-4)
    assert head_accuracy(head, x, y) == pytest.approx(100 * ref.score(x, y))


def test_probe_accuracy_on_separable_and_random_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 5)) + 4.0 * y[:, None]
    assert probe_accuracy(x[:100], y[:100], x[100:], y[100:]) == 100.0
    noise = rng.normal(size=(200, 5))
    assert probe_accuracy(noise[:100], y[:100], noise[100:], y[100:]) < 75.0


def test_write_rows_json_and_markdown(tmp_path):
    from experiments.results import check_study_writable, write_rows

    rows = [{"suite": "T", "method": "ties", "lwptv": True, "id_acc": 71.234, "ood_acc": None}]
    cols = ["suite", "method", "lwptv", "id_acc", "ood_acc"]
    j, m = write_rows("s", rows, suite="T", columns=cols, title="T", command="python -m x", directory=tmp_path)
    assert json.loads(j.read_text()) == rows and m.name == "s.md"
    assert "| T | ties | True | 71.23 | - |" in m.read_text() and "`python -m x`" in m.read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_rows("s", rows, suite="T", columns=cols, title="T", command="c", directory=tmp_path)
    with pytest.raises(FileExistsError, match="suite T rows"):
        check_study_writable(tmp_path, "s", "T", [".png"], overwrite=False)
    write_rows("s", rows, suite="T", columns=cols, title="T2", command="c", directory=tmp_path, overwrite=True)
    assert m.read_text().startswith("# T2") and not list(tmp_path.glob(".*tmp"))
    # Another suite's rows join the same JSON (the first suite's rows kept); its table gets its own file.
    v_rows = [dict(rows[0], suite="V", id_acc=50.0)]
    check_study_writable(tmp_path, "s", "V", [".md", ".png"], overwrite=False)
    j2, m2 = write_rows("s", v_rows, suite="V", columns=cols, title="V", command="c", directory=tmp_path)
    assert j2 == j and json.loads(j.read_text()) == rows + v_rows and m2.name == "s_v.md"
    assert m.read_text().startswith("# T2")
    write_rows("s", [dict(v_rows[0], id_acc=60.0)], suite="V", columns=cols, title="V", command="c",
               directory=tmp_path, overwrite=True)
    assert [r["id_acc"] for r in json.loads(j.read_text())] == [71.234, 60.0]
    with pytest.raises(ValueError, match="normalized_acc"):
        write_rows("t", rows, suite="T", columns=["normalized_acc"], title="T", command="c", directory=tmp_path)
    with pytest.raises(ValueError, match="suite 'V'"):
        write_rows("t", rows, suite="V", columns=cols, title="T", command="c", directory=tmp_path)



def test_results_default_directory_is_read_at_call_time(tmp_path, monkeypatch):
    from experiments import results
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    assert results.write_json("s", [{"a": 1}]) == tmp_path / "s.json"
    rows = [{"suite": "T", "normalized_acc": 1.0}]
    j, m = results.write_rows("r", rows, suite="T", columns=["normalized_acc"], title="T", command="c")
    assert (j.parent, m.parent) == (tmp_path, tmp_path)
    assert json.loads((tmp_path / "s.json").read_text()) == [{"a": 1}]

@pytest.fixture
def study_suite(built, monkeypatch):
    """The studies run on the tiny built suite instead of Suite T."""
    monkeypatch.setattr(suite, "build_suite", lambda config, log: built[0])
    return built[0]


def test_study_divmerge_writes_rows_per_task_count(study_suite, tmp_path):
    from experiments import study_divmerge

    argv = ["tasks", "--methods", "task_arithmetic", "divmerge_task", "--samples", "8", "--subsets", "2",
            "--out", str(tmp_path)]
    rows = study_divmerge.main(argv)
    saved = json.loads((tmp_path / "divmerge_tasks.json").read_text())
    assert saved == rows and {(r["method"], r["n_tasks"]) for r in rows} == {
        (m, n) for m in ("task_arithmetic", "divmerge_task") for n in (2, 3)}
    raw = json.loads((tmp_path / "divmerge_tasks_raw.json").read_text())
    assert len(raw) == 2 * (2 + 1)  # 2 of the 3 pairs, the one triple
    for r in rows:  # each row is the mean of its subsets' normalized accuracies
        mine = [x["normalized_acc"] for x in raw if (x["method"], x["n_tasks"]) == (r["method"], r["n_tasks"])]
        assert r["normalized_acc"] == pytest.approx(np.mean(mine)) and 0 < r["normalized_acc"] <= 200
    assert (tmp_path / "divmerge_tasks.png").stat().st_size > 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        study_divmerge.main(argv)


def test_study_divmerge_sends_suite_v_tasks_to_its_own_study(tmp_path, capsys):
    from experiments import study_divmerge

    with pytest.raises(SystemExit) as exit_info:
        study_divmerge.main(["tasks", "--suite", "V", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "python -m experiments.study_v_divmerge" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_study_subsets_are_seeded_and_complete_when_few():
    from experiments.study_divmerge import subsets

    names = ("a", "b", "c", "d", "e")
    assert subsets(names, 4, 5, seed=0) == list(itertools.combinations(names, 4))
    picked = subsets(names, 2, 3, seed=0)
    assert len(set(picked)) == 3 and picked == subsets(names, 2, 3, seed=0) != subsets(names, 2, 3, seed=1)


def test_study_lwptv_rows_and_choice_on_validation(study_suite, tmp_path):
    from experiments import study_lwptv

    rows = study_lwptv.main(["--methods", "task_arithmetic", "ties", "--scores", "relative_update",
                             "--ratios", "0.4", "1.0", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "lwptv.json").read_text()) == rows
    assert [(r["method"], r["lwptv"]) for r in rows] == [("task_arithmetic", False), ("task_arithmetic", True),
                                                         ("ties", False), ("ties", True)]
    for r in rows:
        assert set(r) >= {"suite", "method", "lwptv", "id_acc", "ood_acc"} and r["suite"] == "T"
    validation = json.loads((tmp_path / "lwptv_validation.json").read_text())
    assert len(validation) == 2 * 3
    for p in ("lwptv.png", "lwptv_scores.png", "lwptv.md"):
        assert (tmp_path / p).stat().st_size > 0


def test_study_lwptv_choice_rule():
    from experiments.study_lwptv import choose

    plain = {"id_acc": 80.0, "ood_acc": 50.0}
    tried = [{"id_acc": 79.8, "ood_acc": 53.0}, {"id_acc": 78.0, "ood_acc": 60.0}, {"id_acc": 80.5, "ood_acc": 52.0}]
    assert choose(plain, tried, 0.5) is tried[0]  # the 60.0 costs 2 ID points
    assert choose(plain, tried[1:2], 0.5) is tried[1]  # none within tolerance: best ID + OOD


# ----- an image suite: the same pipeline over prepared pixels ---------------------------------


@dataclass(frozen=True)
class TinyImageEncoder:
    """relu(flatten(pixels) @ w + b): a stand-in for MobileNetV2 with the same interface."""

    dim: int = 12

    def init(self, key, size):
        k1, _ = jax.random.split(key)
        return {"dense": {"kernel": 0.1 * jax.random.normal(k1, (size * size * 3, self.dim)),
                          "bias": jax.numpy.zeros(self.dim)}}

    def encode(self, params, batch):
        x = batch["pixels"].reshape(batch["pixels"].shape[0], -1)
        return jax.nn.relu(x @ params["dense"]["kernel"] + params["dense"]["bias"])


def image_task(name, n=200, size=6, seed=0):
    """Class c iff quadrant c is the brightest, on noise; uint8 RGB images."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, (n, size, size, 3)).astype(np.uint8)
    y = np.arange(n) % 4
    h = size // 2
    for i, c in enumerate(y):
        r, q = divmod(c, 2)
        x[i, r * h:(r + 1) * h, q * h:(q + 1) * h] += 120
    return Task.from_records(name, list(x), [str(v) for v in y], kind="image", seed=seed)


def _prepare_images(split):
    return Images(np.asarray(split.inputs, np.float32) / 255.0, split.labels)


def test_image_suite_trains_merges_and_rotates(tmp_path, monkeypatch):
    monkeypatch.setenv("JMERGE_CACHE_DIR", str(tmp_path))
    tasks = {n: image_task(n, seed=i) for i, n in enumerate(("a", "b", "c", "ood"))}
    config = suite.SuiteConfig(name="V", model="mobilenet_v2", tasks=("a", "b", "c"), ood_tasks=("ood",),
                               recipe=finetune.Recipe(steps=30, batch=16, lr=1e-2, head_lr=5e-2, train_size=120),
                               validation_size=30, test_size=30, probe_train=60)
    enc = TinyImageEncoder()
    built = suite.build_suite(config, encoder=enc, base=enc.init(jax.random.key(0), 6), prepare=_prepare_images,
                              loader=tasks.__getitem__, log=lambda m: None)
    assert isinstance(built.inputs["a"]["train"], Images) and built.config.layers == "jmerge_mobilenet"
    for name in config.tasks:
        assert built.expert_metrics[name]["validation_acc"] > 50.0  # chance is 25
    pool = built.unlabeled("b", 8)
    assert pool["pixels"].shape == (8, 6, 6, 3)
    rot = built.rotation(lambda names: jmerge.merge(built.base, built.experts_for(names), "task_arithmetic",
                                                    scale=0.5), k=1)
    assert len(rot["folds"]) == 3 and 0 <= rot["ood_acc"] <= 100 and 0 < rot["normalized_acc"]
