"""The experiments tests' synthetic text suite: a tiny random BERT config, a word-hash tokenizer,
keyword tasks (class c iff the text holds keyword c), the fine-tuning recipe, and Suite T2's class
descriptions and config (its encoder and built suite are the ``t2_encoder``/``t2_suite`` fixtures)."""

import zlib
from dataclasses import replace

import numpy as np

from experiments import finetune, suite
from experiments.data import Task
from experiments.models.bert import BertConfig

CFG = BertConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position=16)
MAX_LEN = 8


def tokenizer(texts):
    """Word-hash tokenizer: [CLS]=1, words -> 3 + crc32 % 61, [SEP]=2, padded with 0."""
    ids = np.zeros((len(texts), MAX_LEN), np.int32)
    for i, t in enumerate(texts):
        toks = [1] + [3 + zlib.crc32(w.encode()) % 61 for w in t.split()][: MAX_LEN - 2] + [2]
        ids[i, : len(toks)] = toks
    return ids, (ids > 0).astype(np.int32)


def synthetic_task(name, keywords, n=240, seed=0):
    """Class c iff the text contains keyword c, among random filler words."""
    rng = np.random.default_rng(seed)
    filler = [f"w{i}" for i in range(20)]
    texts, labels = [], []
    for i in range(n):
        c = i % len(keywords)
        words = list(rng.choice(filler, rng.integers(1, 5))) + [keywords[c]]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(c)
    return Task.from_records(name, texts, labels, seed=seed)


TASKS = {
    "alpha": synthetic_task("alpha", ["apple", "banana"], seed=1),
    "beta": synthetic_task("beta", ["red", "green", "blue"], seed=2),
    "gamma": synthetic_task("gamma", ["cat", "dog"], seed=3),
    "delta": synthetic_task("delta", ["up", "down"], seed=4),  # OOD, no expert
}
RECIPE = finetune.Recipe(steps=40, batch=16, lr=3e-3, head_lr=3e-2, max_len=MAX_LEN, train_size=150)
DESCRIPTIONS = {
    "alpha": {"apple": ("apple", "an apple w1"), "banana": ("banana",)},
    "beta": {"red": ("red",), "green": ("green",), "blue": ("blue w3",)},
    "gamma": {"cat": ("cat",), "dog": ("dog",)},
}
# The synthetic tasks' classes are "0", "1", ...: name them by their keywords.
NAMED = {n: replace(TASKS[n], classes=tuple(DESCRIPTIONS[n])) for n in DESCRIPTIONS} | {"delta": TASKS["delta"]}
T2_CONFIG = suite.SuiteConfig(name="T2", model="minilm", tasks=("alpha", "beta", "gamma"), ood_tasks=("delta",),
                              recipe=replace(RECIPE, steps=30), validation_size=24, test_size=24, probe_train=60,
                              head_scale=10.0, require_sizes=True)
