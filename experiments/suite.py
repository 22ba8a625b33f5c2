"""A merging suite: a pretrained base, one fully fine-tuned expert per in-domain task, and
evaluation in and out of domain, for any encoder of :mod:`experiments.encoders`.

Suite T (:mod:`experiments.suite_t`): all-MiniLM-L6-v2 on five text tasks. Suite V
(:mod:`experiments.suite_v`): MobileNetV2 on three image tasks.

In-domain (ID) tasks each have an expert (encoder + own linear head on pooled features,
:mod:`experiments.finetune`, cached on disk). Out-of-domain (OOD) tasks have no expert, and
in :meth:`Suite.rotation` the tasks left out of a merge are OOD too. OOD tasks are scored by
a linear probe (sklearn logistic regression) fit on frozen features of the merged encoder
(``probe_train`` training examples), scored on the validation or test split. Heads are never
merged: each ID task uses its expert's head.

All numbers are accuracies in percent; normalized accuracy = merged / expert x 100 on the
same split. Suite T v2 (``suite_t.V2``, ``head_scale`` set) replaces the experts' own heads by
frozen zero-shot heads shared by the base, the experts and every merge
(:mod:`experiments.zeroshot`); its entry criteria are :mod:`experiments.criteria`.
Hyper-parameters are chosen on ``split="validation"`` (``validation_size``
examples per task); ``split="test"`` is for the one final evaluation.

A study::

    suite = build_suite(suite_t.FULL)
    for method, hp in [("task_arithmetic", {"scale": 0.3}), ("ties", {})]:
        merged = jmerge.merge(suite.base, suite.experts_for(suite.names), method, **hp)
        rows.append({"method": method, **suite.evaluate(merged, split="validation")})
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
from experiments import encoders, zeroshot
from experiments.evaluate import embed, head_correct, head_logits, percent, probe_correct
from experiments.finetune import Recipe, load_or_train, params_fingerprint
from experiments import data

LAYER_PRESETS = {"minilm": "jmerge_bert", "mobilenet_v2": "jmerge_mobilenet"}  # model -> LwPTV/DivMerge layers


@dataclass(frozen=True)
class SuiteConfig:
    """A suite: its ``name`` in result rows, base ``model``, ID and OOD tasks, the experts'
    recipe and the evaluation sizes (examples per task)."""

    name: str
    model: str
    tasks: tuple[str, ...]
    ood_tasks: tuple[str, ...]
    recipe: Recipe = field(default_factory=Recipe)
    validation_size: int = 1000
    test_size: int = 2000
    probe_train: int = 1000
    data_seed: int = 0
    # None: each expert trains its own linear head (Suite T v1, V). A number: frozen cosine heads
    # with this logit scale from the base's class-description embeddings (experiments.zeroshot),
    # shared by the base, the experts and every merge (Suite T v2).
    head_scale: float | None = None
    # True: a task whose validation or test split is smaller than asked, whose train split holds
    # less than a batch (ID) or than probe_train (OOD), is an error raised before any fine-tuning.
    require_sizes: bool = False

    @property
    def layers(self) -> str:
        """The layer preset of the base (``jmerge.lwptv`` presets) for layer-wise methods."""
        return LAYER_PRESETS[self.model]


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


@dataclass(eq=False)
class Suite:
    """Base, experts, heads and prepared tasks of a built suite (see :func:`build_suite`)."""

    config: SuiteConfig
    encoder: object  # experiments.encoders.TextEncoder or ImageEncoder
    base: dict
    tasks: dict[str, data.Task]  # ID and OOD tasks, subsampled
    inputs: dict[str, dict]  # task -> "train" | "validation" | "test" | "probe" -> prepared split
    experts: dict[str, dict]
    heads: dict[str, dict]  # each ID task's head: its expert's own, or the shared zero-shot head
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

    def logits(self, params, task: str, batch: dict):
        """Differentiable class logits of ``task``'s expert head on the encoder ``params``."""
        return _batch_logits(self.encoder, self.heads[task], params, batch)

    def apply_fn(self, task: str) -> Callable:
        """``fn(params, batch) -> logits`` with ``task``'s head, one stable object per task (so
        ``jmerge.learn`` reuses its compiled steps and cached targets)."""
        if task not in self._apply_fns:
            self._apply_fns[task] = partial(_batch_logits, self.encoder, self.heads[task])
        return self._apply_fns[task]

    def pool(self, task: str, n: int, split: str = "train", seed: int = 0):
        """The prepared split (with labels) of ``n`` seeded examples of ``task``: the pool
        :meth:`unlabeled` withholds the labels of (a supervised bound fits on its labels)."""
        t = self.inputs[task][split]
        if n > len(t):
            raise ValueError(f"task {task!r} has {len(t)} {split} examples, asked for {n}")
        return t.take(np.sort(np.random.default_rng(seed).choice(len(t), n, replace=False)))

    def unlabeled(self, task: str, n: int, split: str = "train", seed: int = 0) -> dict[str, np.ndarray]:
        """The model inputs (e.g. ``{"ids", "mask"}``) of ``n`` seeded examples of ``task``
        (labels withheld): the unlabelled pool of DivMerge / AdaMerging (``jmerge.learn``)."""
        pool = self.pool(task, n, split, seed)
        return pool.batch(np.arange(n))

    def id_correct(self, params, task: str, split: str = "validation") -> np.ndarray:
        """Per-example correctness (bool, in split order) of ``task``'s head on the encoder ``params``."""
        t = self.inputs[task][split]
        return head_correct(self.heads[task], embed(self.encoder, params, t), t.labels)

    def id_accuracy(self, params, task: str, split: str = "validation") -> float:
        return percent(self.id_correct(params, task, split))

    def probe_correct(self, params, task: str, split: str = "validation") -> np.ndarray:
        """Per-example correctness (bool, in split order) of :meth:`probe`'s linear probe."""
        tr, ev = self.inputs[task]["probe"], self.inputs[task][split]
        return probe_correct(embed(self.encoder, params, tr), tr.labels, embed(self.encoder, params, ev), ev.labels)

    def probe(self, params, task: str, split: str = "validation") -> float:
        """Linear-probe accuracy of ``task`` on frozen features of the encoder ``params``."""
        return percent(self.probe_correct(params, task, split))

    def evaluate(self, params, split: str = "validation", tasks: Sequence[str] | None = None,
                 probes: Sequence[str] | None = None, per_example: bool = False) -> dict:
        """ID accuracy (own expert head) on ``tasks`` (default: all ID tasks), normalized by the
        expert's accuracy, and probe accuracy on ``probes`` (default: the OOD tasks). With
        ``per_example``, also the correctness arrays the accuracies are the means of:
        ``id_correct`` and ``ood_correct`` (task -> bool array in split order)."""
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        tasks = self.names if tasks is None else tuple(tasks)
        probes = self.config.ood_tasks if probes is None else tuple(probes)
        id_ok = {t: self.id_correct(params, t, split) for t in tasks}
        ood_ok = {t: self.probe_correct(params, t, split) for t in probes}
        id_acc = {t: percent(c) for t, c in id_ok.items()}
        norm = {t: 100.0 * a / self.expert_metrics[t][f"{split}_acc"] for t, a in id_acc.items()}
        ood = {t: percent(c) for t, c in ood_ok.items()}
        out = {"split": split, "id": id_acc, "normalized": norm, "ood": ood, "id_acc": _mean(id_acc.values()),
               "normalized_acc": _mean(norm.values()), "ood_acc": _mean(ood.values())}
        return {**out, "id_correct": id_ok, "ood_correct": ood_ok} if per_example else out

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
        """The base encoder (with each task's head: the expert's, or the shared zero-shot head)
        and the individual experts.

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


def _batch_logits(encoder, head: dict, params, batch: dict):
    return head_logits(head, encoder.encode(params, batch))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_suite(config: SuiteConfig, log: Callable[[str], None] = _log, *, encoder=None, base: dict | None = None,
                prepare: Callable | None = None, loader: Callable[[str], data.Task] | None = None) -> Suite:
    """Loads base and tasks, then loads or fine-tunes one expert per ID task.

    ``encoder``/``base``/``prepare`` default to ``config.model``'s pretrained weights and
    input preparation (:func:`experiments.encoders.load`), ``loader`` to
    :func:`experiments.data.load`; tests pass a tiny random model and synthetic tasks.
    """
    if encoder is None or base is None or prepare is None:
        encoder, base, prepare = encoders.load(config.model, config.recipe.max_len, config.recipe.image_size)
    loader = loader or (lambda name: data.load(name, seed=config.data_seed))
    base_fp = params_fingerprint(base)
    r, seed = config.recipe, config.data_seed
    tasks, inputs, experts, heads, metrics = {}, {}, {}, {}, {}
    for name in config.tasks + config.ood_tasks:  # all data first: bad input fails before fine-tuning
        caps = {"train": r.train_size if name in config.tasks else config.probe_train,
                "validation": config.validation_size, "test": config.test_size}
        full = loader(name)
        if config.require_sizes:  # an expert's train split needs one batch, an OOD task's the probe's size
            needs = {**caps, "train": r.batch if name in config.tasks else config.probe_train}
            for s, need in needs.items():
                if len(full.split(s)) < need:
                    raise ValueError(f"task {name!r}: the {s} split has {len(full.split(s))} examples, "
                                     f"the suite needs {need}")
        tasks[name] = task = full.subsample(**caps, seed=seed)
        if config.head_scale is not None and name in config.tasks:
            zeroshot.check_descriptions(task)
        prepared = {s: prepare(task.split(s)) for s in data.SPLITS}
        n_probe = min(config.probe_train, len(prepared["train"]))
        pick = np.random.default_rng(seed).choice(len(prepared["train"]), n_probe, replace=False)
        prepared["probe"] = prepared["train"].take(np.sort(pick))
        inputs[name] = prepared
    for name in config.tasks:
        t0 = time.perf_counter()
        head = (None if config.head_scale is None
                else zeroshot.zero_shot_head(encoder, base, prepare, tasks[name], config.head_scale))
        experts[name], heads[name], metrics[name] = load_or_train(encoder, base, base_fp, tasks[name], inputs[name],
                                                                  r, log, head)
        how = "cached" if metrics[name]["cached"] else f"trained in {time.perf_counter() - t0:.0f} s"
        log(f"expert {name}: validation {metrics[name]['validation_acc']:.2f}% ({how})")
    return Suite(config, encoder, base, tasks, inputs, experts, heads, metrics)


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


def configs(suite: str) -> dict[str, SuiteConfig]:
    """The named configs of suite ``"T"`` (text) or ``"V"`` (vision)."""
    from experiments import suite_t, suite_v

    known = {"T": suite_t.CONFIGS, "V": suite_v.CONFIGS}
    if suite not in known:
        raise ValueError(f"unknown suite {suite!r} (T, V)")
    return known[suite]


def main(configs: dict[str, SuiteConfig], description: str, argv: Sequence[str] | None = None) -> None:
    """Fine-tunes (or loads) the experts of ``configs[--config]`` and prints the base, expert
    and task-arithmetic rows."""
    from rich.console import Console

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", choices=sorted(configs), default="full")
    ap.add_argument("--split", choices=("validation", "test"), default="validation")
    ap.add_argument("--steps", type=int, help="override the recipe's fine-tuning steps")
    args = ap.parse_args(argv)
    config = configs[args.config]
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
    Console().print(_table(rows, f"Suite {config.name} ({args.config}), {args.split} split, accuracy %"))
    _log(f"total {time.perf_counter() - t0:.0f} s")
