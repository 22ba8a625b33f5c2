"""Suite T: merging fully fine-tuned all-MiniLM-L6-v2 text experts (offline data).

In-domain (ID) tasks, each with an expert (encoder + own linear head on mean-pooled
output, :mod:`experiments.finetune`, cached on disk): Rotten Tomatoes sentiment, WordNet
noun and verb supersense, fortunes language ID, fortunes topic-10. Out-of-domain (OOD):
WordNet adjective type (no expert), and in :meth:`Suite.rotation` the tasks left out of a
merge. OOD tasks are scored by a linear probe (sklearn logistic regression) fit on frozen
mean-pooled embeddings of the merged encoder (``probe_train`` training examples), scored on
the validation or test split. Heads are never merged: each ID task uses its expert's head.

All numbers are accuracies in percent; normalized accuracy = merged / expert x 100 on the
same split. Hyper-parameters are chosen on ``split="validation"`` (``validation_size``
examples per task); ``split="test"`` is for the one final evaluation.

A study::

    suite = build_suite(FULL)
    for method, hp in [("task_arithmetic", {"scale": 0.3}), ("ties", {})]:
        merged = jmerge.merge(suite.base, suite.experts_for(suite.names), method, **hp)
        rows.append({"method": method, **suite.evaluate(merged, split="validation")})

Run ``python -m experiments.suite_t [--config full|demo]`` to fine-tune (or load) the
experts and print the base, expert and task-arithmetic rows.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Sequence

import numpy as np

import jmerge
from experiments.evaluate import Tokens, embed, head_accuracy, head_logits, probe_accuracy, tokenize
from experiments.finetune import Recipe, load_or_train, params_fingerprint
from jmerge import data
from jmerge.models.bert import Bert, load_minilm, minilm_tokenizer

ID_TASKS = ("rotten_tomatoes", "wordnet_noun", "wordnet_verb", "fortunes_language", "fortunes_topic")
OOD_TASKS = ("wordnet_adj",)


@dataclass(frozen=True)
class SuiteConfig:
    tasks: tuple[str, ...] = ID_TASKS
    ood_tasks: tuple[str, ...] = OOD_TASKS
    recipe: Recipe = field(default_factory=Recipe)
    validation_size: int = 1000
    test_size: int = 2000
    probe_train: int = 1000
    data_seed: int = 0


FULL = SuiteConfig()
# The demo's experts: few steps, so a larger encoder learning rate makes them move away from the
# base (measured, validation: base + expert head / expert, RT 61.0 / 69.7 and WordNet verb
# 42.3 / 50.3 at lr 2e-4; at 5e-5 the five experts averaged 70.6 against 64.6 for the base).
DEMO = SuiteConfig(recipe=Recipe(steps=100, batch=16, lr=2e-4, max_len=32, train_size=2000),
                   validation_size=300, test_size=500, probe_train=300)
# The studies' setting: FULL's experts with smaller evaluation splits, so that the hundreds of
# merged encoders a study scores fit in a CPU session (paired comparisons on the same examples).
STUDY = replace(FULL, validation_size=200, test_size=600, probe_train=300)
CONFIGS = {"full": FULL, "demo": DEMO, "study": STUDY}


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


@dataclass(eq=False)
class Suite:
    """Base, experts, heads and tokenised tasks of a built suite (see :func:`build_suite`)."""

    config: SuiteConfig
    bert: Bert
    base: dict
    tasks: dict[str, data.Task]  # ID and OOD tasks, subsampled
    tokens: dict[str, dict[str, Tokens]]  # task -> "train" | "validation" | "test" | "probe"
    experts: dict[str, dict]
    heads: dict[str, dict]
    expert_metrics: dict[str, dict]
    _apply_fns: dict = field(default_factory=dict, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        """The ID task names, in config order."""
        return self.config.tasks

    def experts_for(self, names: Sequence[str]) -> list[dict]:
        return [self.experts[n] for n in names]

    def task_vectors(self, names: Sequence[str]) -> list[dict]:
        return jmerge.task_vectors(self.base, self.experts_for(names))

    def logits(self, params, task: str, ids, mask):
        """Differentiable class logits of ``task``'s expert head on the encoder ``params``."""
        return head_logits(self.heads[task], self.bert.encode(params, ids, mask))

    def apply_fn(self, task: str) -> Callable:
        """``fn(params, {"ids", "mask"}) -> logits`` with ``task``'s head, one stable object per
        task (so ``jmerge.learn`` reuses its compiled steps and cached targets)."""
        if task not in self._apply_fns:
            self._apply_fns[task] = partial(_batch_logits, self.bert, self.heads[task])
        return self._apply_fns[task]

    def unlabeled(self, task: str, n: int, split: str = "train", seed: int = 0) -> dict[str, np.ndarray]:
        """``{"ids", "mask"}`` of ``n`` seeded inputs of ``task`` (labels withheld), e.g. the
        unlabelled pool of DivMerge / AdaMerging (``jmerge.learn``)."""
        t = self.tokens[task][split]
        if n > len(t):
            raise ValueError(f"task {task!r} has {len(t)} {split} examples, asked for {n}")
        idx = np.sort(np.random.default_rng(seed).choice(len(t), n, replace=False))
        return {"ids": t.ids[idx], "mask": t.mask[idx]}

    def id_accuracy(self, params, task: str, split: str = "validation") -> float:
        t = self.tokens[task][split]
        return head_accuracy(self.heads[task], embed(self.bert, params, t), t.labels)

    def probe(self, params, task: str, split: str = "validation") -> float:
        """Linear-probe accuracy of ``task`` on frozen embeddings of the encoder ``params``."""
        tr, ev = self.tokens[task]["probe"], self.tokens[task][split]
        return probe_accuracy(embed(self.bert, params, tr), tr.labels, embed(self.bert, params, ev), ev.labels)

    def evaluate(self, params, split: str = "validation", tasks: Sequence[str] | None = None,
                 probes: Sequence[str] | None = None) -> dict:
        """ID accuracy (own expert head) on ``tasks`` (default: all ID tasks), normalized by the
        expert's accuracy, and probe accuracy on ``probes`` (default: the OOD tasks)."""
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        tasks = self.names if tasks is None else tuple(tasks)
        probes = self.config.ood_tasks if probes is None else tuple(probes)
        id_acc = {t: self.id_accuracy(params, t, split) for t in tasks}
        norm = {t: 100.0 * a / self.expert_metrics[t][f"{split}_acc"] for t, a in id_acc.items()}
        ood = {t: self.probe(params, t, split) for t in probes}
        return {"split": split, "id": id_acc, "normalized": norm, "ood": ood, "id_acc": _mean(id_acc.values()),
                "normalized_acc": _mean(norm.values()), "ood_acc": _mean(ood.values())}

    def rotation(self, merge_fn: Callable[[tuple[str, ...]], dict], k: int = 1, split: str = "validation",
                 ood_tasks: bool = True) -> dict:
        """Leave-``k``-out: for every ``k``-subset of ID tasks, merge the others with
        ``merge_fn(names) -> params`` and score them (ID) and the held-out tasks (probe), plus
        the OOD tasks unless ``ood_tasks=False``.

        Returns per-fold results and their means: ``id_acc``, ``normalized_acc``,
        ``heldout_acc`` (probe on the left-out tasks) and ``ood_acc`` (the OOD tasks' probe).
        """
        if not 1 <= k < len(self.names):
            raise ValueError(f"k must lie in [1, {len(self.names) - 1}], got {k}")
        folds = []
        for held in itertools.combinations(self.names, k):
            merged_names = tuple(n for n in self.names if n not in held)
            res = self.evaluate(merge_fn(merged_names), split, merged_names,
                                held + (self.config.ood_tasks if ood_tasks else ()))
            res["merged"], res["held_out"] = merged_names, held
            res["heldout_acc"] = _mean(res["ood"][t] for t in held)
            folds.append(res)
        summary = {m: _mean(f[m] for f in folds) for m in ("id_acc", "normalized_acc", "heldout_acc")}
        summary["ood_acc"] = _mean(f["ood"][t] for f in folds for t in self.config.ood_tasks if t in f["ood"])
        return {"k": k, "split": split, "folds": folds, **summary}

    def reference_rows(self, split: str = "validation", probe_id: bool = True) -> dict[str, dict]:
        """The base encoder (with each expert's head) and the individual experts.

        ``base`` also gets ``probe_id``: its probe accuracy on every ID task (the floor for
        held-out tasks in :meth:`rotation`). ``experts``: each expert on its own task; OOD is
        the mean over experts of their probe accuracy on each OOD task.
        """
        base = self.evaluate(self.base, split)
        if probe_id:
            base["probe_id"] = {t: self.probe(self.base, t, split) for t in self.names}
        ood = {o: _mean(self.probe(self.experts[t], o, split) for t in self.names) for o in self.config.ood_tasks}
        id_acc = {t: self.expert_metrics[t][f"{split}_acc"] for t in self.names}
        experts = {"split": split, "id": id_acc, "normalized": {t: 100.0 for t in self.names}, "ood": ood,
                   "id_acc": _mean(id_acc.values()), "normalized_acc": 100.0, "ood_acc": _mean(ood.values())}
        return {"base": base, "experts": experts}


def _batch_logits(bert: Bert, head: dict, params, batch: dict):
    return head_logits(head, bert.encode(params, batch["ids"], batch["mask"]))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_suite(config: SuiteConfig = FULL, log: Callable[[str], None] = _log, *, bert: Bert | None = None,
                base: dict | None = None, tokenizer=None, loader: Callable[[str], data.Task] | None = None) -> Suite:
    """Loads base and tasks, then loads or fine-tunes one expert per ID task.

    ``bert``/``base``/``tokenizer``/``loader`` default to all-MiniLM-L6-v2, its tokenizer
    and :func:`jmerge.data.load`; tests pass a tiny random BERT and synthetic tasks.
    """
    if bert is None or base is None:
        bert, base = load_minilm()
    tokenizer = tokenizer or minilm_tokenizer(config.recipe.max_len)
    loader = loader or (lambda name: data.load(name, seed=config.data_seed))
    base_fp = params_fingerprint(base)
    r, seed = config.recipe, config.data_seed
    tasks, tokens, experts, heads, metrics = {}, {}, {}, {}, {}
    for name in config.tasks + config.ood_tasks:
        is_id = name in config.tasks
        task = loader(name).subsample(train=r.train_size if is_id else config.probe_train,
                                      validation=config.validation_size, test=config.test_size, seed=seed)
        tasks[name] = task
        tok = {s: tokenize(tokenizer, task.split(s)) for s in data.SPLITS}
        n_probe = min(config.probe_train, len(tok["train"]))
        tok["probe"] = tok["train"].take(np.sort(np.random.default_rng(seed).choice(len(tok["train"]), n_probe,
                                                                                     replace=False)))
        tokens[name] = tok
        if is_id:
            t0 = time.perf_counter()
            experts[name], heads[name], metrics[name] = load_or_train(bert, base, base_fp, task, tok, r, log)
            how = "cached" if metrics[name]["cached"] else f"trained in {time.perf_counter() - t0:.0f} s"
            log(f"expert {name}: validation {metrics[name]['validation_acc']:.2f}% ({how})")
    return Suite(config, bert, base, tasks, tokens, experts, heads, metrics)


def _table(rows: dict[str, dict], title: str):
    from rich.table import Table

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    table = Table(title=title)
    for col in ("model", "ID acc", "normalized ID", "OOD acc"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in rows.items():
        table.add_row(name, fmt(r["id_acc"]), fmt(r["normalized_acc"]), fmt(r["ood_acc"]))
    return table


def main(argv: Sequence[str] | None = None) -> None:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="full")
    ap.add_argument("--split", choices=("validation", "test"), default="validation")
    ap.add_argument("--steps", type=int, help="override the recipe's fine-tuning steps")
    args = ap.parse_args(argv)
    config = CONFIGS[args.config]
    if args.steps:
        config = replace(config, recipe=replace(config.recipe, steps=args.steps))
    t0 = time.perf_counter()
    suite = build_suite(config)
    _log(f"suite built in {time.perf_counter() - t0:.0f} s")
    rows = suite.reference_rows(args.split, probe_id=False)
    for name in suite.names:
        rows[f"expert {name}"] = {"id_acc": suite.expert_metrics[name][f"{args.split}_acc"],
                                  "normalized_acc": 100.0, "ood_acc": None}
    merged = jmerge.merge(suite.base, suite.experts_for(suite.names), "task_arithmetic", scale=0.3)
    rows["task_arithmetic (0.3)"] = suite.evaluate(merged, args.split)
    Console().print(_table(rows, f"Suite T ({args.config}), {args.split} split, accuracy %"))
    _log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
