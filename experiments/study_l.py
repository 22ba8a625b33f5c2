"""DivMerge study on Suite L (issue 14): SmolLM2-135M-Instruct experts, normalized accuracy vs
the number of merged tasks, in DivMerge's own language-model setting.

``entry``: the base and each expert on validation, task arithmetic at all the suite's tasks over
:data:`TA_SCALES` on validation (its best scale is the one every TA fold uses), and the entry
criteria of :mod:`experiments.criteria` on rank-classification accuracy (base normalized
<= 65 %, experts >= 10 points above the base, TA <= 85 % normalized), stored in
``suite_l_entry.json``; ``run`` refuses to start unless they pass.

``run``: each merge scored once on the test split of its subset's tasks, rank classification
(the headline, ``normalized_acc``) and exact match of the greedy answer (``em_normalized``);
normalized = merged / expert x 100, averaged over the subset's tasks. Methods:

- data-free, on the subsets of :func:`subsets` for every count from 2 to all tasks (all of them
  where a count has at most ``--subsets``, else a seeded sample of that many): task arithmetic
  (scale from ``entry``) and TIES (jmerge's defaults: top 20 %, scale 1);
- learned, through the CLI's own path (:func:`jmerge.learn.causal_lm.learn`, jmerge's Llama),
  on the prompts of ``examples/smollm2_divmerge/prompts`` (unlabelled train-split texts in the
  experts' chat format), :data:`SAMPLES` per task, :data:`STEPS` optimizer steps whatever the
  sample count: ``divmerge_task`` / ``divmerge_layer`` (DivMerge's LM protocol: each expert's
  greedy answer until ``<|im_end|>`` or :data:`MAX_NEW` tokens, then per-token JS; Adam
  :data:`DIVMERGE_LR`, init 1/K; layers = jmerge's llama preset) and ``adamerging_task``
  (entropy of the next-token distributions over the prompts, init 0.3, clip [0, 1], Adam 1e-3),
  on the subsets of ``--learned-counts`` (default: the full task set only; the budget).

Rows: per-fold rows (method, subset, seed, per-task accuracies and per-example correctness) in
``divmerge_tasks_l_folds.json``; ``report`` adds ``"suite": "L"`` rows to ``divmerge_tasks.json``
(mean over the planned folds, stored folds of other subsets left out and counted in the notes;
``ci_low``/``ci_high`` a percentile-bootstrap 95 % CI over folds when a
count has several, else over the test examples, ``ci_over`` says which;
:mod:`experiments.stats`) and paired differences ``divmerge_layer - X`` over the test examples
of the same subsets, and writes ``suite_l.md``.

    python -m experiments.study_l entry
    python -m experiments.study_l run [--methods ...] [--counts 2 3 4 5 6] [--learned-counts 6] [--subsets 2] [--seeds 0 1 2]
    python -m experiments.study_l report
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

import jmerge
from experiments import criteria, results, stats, suite_l
from experiments.study_t2_divmerge import epochs_for
from jmerge._util import atomic_write

TA_SCALES = (0.3, 0.5, 0.8)
COUNTS = tuple(range(2, len(suite_l.TASKS) + 1))
SUBSETS = 2  # subsets per task count (a seeded sample where the count has more): the budget
DATA_FREE = ("task_arithmetic", "ties")
LEARNED = ("divmerge_task", "divmerge_layer", "adamerging_task")
METHODS = DATA_FREE + LEARNED
SAMPLES, BATCH, STEPS = 8, 2, 8  # prompts per task, per task per step, optimizer steps
MAX_NEW = 3  # the experts answer one label token then <|im_end|>
DIVMERGE_LR, ADAMERGING_LR = 2e-2, 1e-3
PROMPTS = Path(__file__).resolve().parents[1] / "examples" / "smollm2_divmerge" / "prompts"
ENTRY, FOLDS, STEM = "suite_l_entry", "divmerge_tasks_l_folds", "divmerge_tasks"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mean_rank(res: dict) -> float:
    return float(np.mean([r["rank_acc"] for r in res.values()]))


def normalized(res: dict, key: str = "rank_norm") -> float | None:
    vals = [r[key] for r in res.values()]
    return None if any(v is None for v in vals) else float(np.mean(vals))


def entry(args) -> dict:
    """Entry criteria on validation (module docstring), stored before any study fold."""
    results.check_writable(results.RESULTS_DIR, [f"{ENTRY}.json"], args.overwrite)
    t0 = time.perf_counter()
    s = suite_l.build(train=False)
    base = s.evaluate(s.base, "validation")
    experts = {t: s.expert_metrics[t]["validation"] for t in s.names}
    ta = {}
    for lam in TA_SCALES:
        ta[lam] = s.evaluate(jmerge.merge(s.base, [s.expert(t) for t in s.names], "task_arithmetic", scale=lam),
                             "validation")
        _log(f"task arithmetic {lam}: normalized rank {normalized(ta[lam]):.2f}")
    best = max(TA_SCALES, key=lambda lam: normalized(ta[lam]))
    values = {"base_normalized": normalized(base),
              "expert_gain": float(np.mean([experts[t]["rank_acc"] - base[t]["rank_acc"] for t in s.names])),
              "ta_normalized": normalized(ta[best])}
    strip = lambda res: {t: {k: v for k, v in r.items() if not k.endswith("_correct")} for t, r in res.items()}  # noqa: E731
    out = {"suite": "L", "split": "validation", "metric": "rank classification accuracy", "tasks": list(s.names),
           "criteria": criteria.judge(values), "base": strip(base), "experts": experts, "ta_best_scale": best,
           "ta": [{"scale": lam, "normalized_rank": normalized(ta[lam]), "normalized_em": normalized(ta[lam], "em_norm"),
                   "per_task": strip(ta[lam])} for lam in TA_SCALES],
           "expert_recipe": s.expert_metrics[s.names[0]]["recipe"],
           "expert_train_seconds": {t: s.expert_metrics[t]["cost"]["train_seconds"] for t in s.names},
           "command": "python -m experiments.study_l entry", "seconds": round(time.perf_counter() - t0, 1)}
    results.write_json(ENTRY, [out], overwrite=args.overwrite)
    for r in out["criteria"]:
        _log(f"{r['criterion']} {r['rule']}: {r['value']:.2f} {'passed' if r['passed'] else 'FAILED'}")
    markdown(s, out)
    criteria.check(out["criteria"], "L")
    return out


@dataclass(frozen=True)
class _Options:
    """The learn block of :func:`jmerge.learn.causal_lm.learn` (what ``jmerge run`` passes)."""

    method: str
    granularity: str
    prompts: tuple
    learning_rate: float
    seed: int
    layers: object = None
    samples: int = SAMPLES
    prompt_tokens: int = 128
    max_new_tokens: int = MAX_NEW
    epochs: int = epochs_for(STEPS, SAMPLES, BATCH)
    batch_per_task: int = BATCH
    init: object = None
    chat_template: bool = True


def learned(s, method: str, names: Sequence[str], seed: int = 0):
    from jmerge.learn import causal_lm

    kind, level = method.rsplit("_", 1)
    opts = _Options(kind, level, tuple(PROMPTS / f"{t}.jsonl" for t in names),
                    DIVMERGE_LR if kind == "divmerge" else ADAMERGING_LR, seed)
    result, _ = causal_lm.learn(s.base_dir, [s.expert_dirs[t] for t in names], opts, progress=False)
    return result


def _fold(s, method: str, names, seed: int, flat, seconds: float, **extra) -> dict:
    res = s.evaluate(flat, "test", names)
    row = {"suite": "L", "method": method, "n_tasks": len(names), "subset": list(names), "seed": seed,
           "normalized_acc": normalized(res), "em_normalized": normalized(res, "em_norm"),
           "rank_acc": {t: r["rank_acc"] for t, r in res.items()}, "em_acc": {t: r["em_acc"] for t, r in res.items()},
           "rank_correct": {t: r["rank_correct"] for t, r in res.items()}, "merge_seconds": seconds, **extra}
    _log(f"  {method:16s} n={len(names)} {','.join(names)}: normalized rank {row['normalized_acc']:6.2f} "
         f"EM {row['em_normalized'] if row['em_normalized'] is None else round(row['em_normalized'], 2)} ({seconds:.0f} s)")
    return row


def _key(f: dict) -> tuple:
    """A fold's identity: method, subset, seed."""
    return f["method"], tuple(f["subset"]), f["seed"]


def _gate(args) -> tuple[dict, bool]:
    """The stored entry criteria and whether they all passed (``--exploratory`` runs past a failure)."""
    stored = criteria.require(results.RESULTS_DIR / f"{ENTRY}.json", exploratory=args.exploratory)
    return stored, all(r["passed"] for r in stored["criteria"])


def subsets(names: Sequence[str], n: int, cap: int, seed: int = 0) -> list[tuple[str, ...]]:
    """The subsets of ``n`` of ``names`` a count is measured on: all of them if there are at most
    ``cap``, else ``cap`` drawn without replacement from ``seed`` (chosen before any result)."""
    every = list(itertools.combinations(names, n))
    if len(every) <= cap:
        return every
    pick = np.random.default_rng([seed, n]).choice(len(every), cap, replace=False)
    return [every[i] for i in sorted(pick)]


def plan(names: Sequence[str], args) -> list[tuple[int, str, tuple[str, ...], int]]:
    """``(count, method, subset, seed)`` folds in run order: every method on the full set first
    (the budget keeps it), then the counts downwards; learned methods once per ``args.seeds``
    (the seed draws their prompts and batches), data-free ones once (seed 0: deterministic)."""
    counts, learned_counts = _counts(args.counts, names), _counts(args.learned_counts, names)
    return [(n, method, sub, seed) for n in sorted(set(counts) | set(learned_counts), reverse=True)
            for method in args.methods if n in (learned_counts if method in LEARNED else counts)
            for sub in subsets(names, n, args.subsets)
            for seed in (args.seeds if method in LEARNED else (0,))]


def _counts(counts: Sequence[int] | None, names: Sequence[str]) -> list[int]:
    """``counts`` (None: the full task count only), each checked against the suite's size."""
    counts = [len(names)] if counts is None else list(counts)
    bad = [n for n in counts if not 2 <= n <= len(names)]
    if bad:
        raise ValueError(f"task count {bad[0]} is outside 2..{len(names)} (Suite L has {len(names)} tasks)")
    return counts


def run(args) -> None:
    stored, _ = _gate(args)
    s = suite_l.build(train=False)
    done = {_key(f) for f in results.load_folds(FOLDS)}
    hp = {"task_arithmetic": {"scale": stored["ta_best_scale"]}, "ties": {}}
    for n, method, names, seed in plan(s.names, args):
        if (method, names, seed) in done:
            continue
        t0 = time.perf_counter()
        if method in DATA_FREE:
            flat = jax.block_until_ready(jmerge.merge(s.base, [s.expert(t) for t in names], method, **hp[method]))
            fold = _fold(s, method, names, 0, flat, time.perf_counter() - t0, setting=hp[method])
        else:
            res = learned(s, method, names, seed)
            flat = jax.block_until_ready(res.params)
            fold = _fold(s, method, names, seed, flat, time.perf_counter() - t0, steps=STEPS,
                         samples_per_task=SAMPLES, batch_per_task=BATCH, granularity=res.granularity,
                         losses=np.asarray(res.losses, np.float64).round(5).tolist(),
                         coefficients=np.asarray(res.coefficients, np.float64).round(4).tolist())
        results.save_folds(FOLDS, [fold], key=_key)
        del flat


def example_values(fold: dict) -> dict:
    """Per test example ``(subset, task, i)``: 100 x (100 x correct) / expert accuracy (%), whose mean
    over a fold's examples (equal counts per task) is the fold's normalized accuracy."""
    expert = fold["expert_rank_acc"]
    return {(tuple(fold["subset"]), t, i): 100.0 * (100.0 * c) / expert[t]
            for t, cs in fold["rank_correct"].items() for i, c in enumerate(cs)}


def seed_mean(folds: Sequence[dict]) -> dict:
    """:func:`example_values` of ``folds`` (one method and count), each example averaged over the
    seeds that scored it, so a paired difference compares the same examples once."""
    per: dict = {}
    for f in folds:
        for k, v in example_values(f).items():
            per.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in per.items()}


def aggregate(folds: Sequence[dict], expert_acc: dict[str, float]) -> list[dict]:
    """Mean rows with CIs per (method, count) (over folds, i.e. subsets x seeds, where there are
    several), then ``divmerge_layer - X`` paired over the examples (:func:`seed_mean`)."""
    folds = [{**f, "expert_rank_acc": expert_acc} for f in folds]
    groups: dict = {}
    for f in folds:
        groups.setdefault((f["method"], f["n_tasks"]), []).append(f)
    rows, values = [], {}
    for (method, n), fs in sorted(groups.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        ex = seed_mean(fs)
        values[(method, n)] = ex, len({f["seed"] for f in fs})
        ci = stats.ci_fields(fs, "normalized_acc")
        over = "folds"
        if len(fs) == 1:
            ci["ci_low"], ci["ci_high"] = stats.bootstrap_ci(list(ex.values()))
            over = "examples"
        em = [f["em_normalized"] for f in fs]
        rows.append({"suite": "L", "method": method, "n_tasks": n,
                     "normalized_acc": float(np.mean([f["normalized_acc"] for f in fs])), **ci, "ci_over": over,
                     "em_normalized": None if None in em else float(np.mean(em)),
                     "setting": fs[0].get("setting"), "steps": fs[0].get("steps"),
                     "samples_per_task": fs[0].get("samples_per_task", 0), "split": "test", "metric": "rank"})
    for (method, n), (ref, ref_seeds) in sorted(values.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        ours, seeds = values.get(("divmerge_layer", n), (None, 0))
        if ours is None or method == "divmerge_layer":
            continue
        common = sorted(set(ours) & set(ref), key=str)
        if not common:
            continue
        d = stats.paired_difference({k: ours[k] for k in common}, {k: ref[k] for k in common})
        rows.append({"suite": "L", "method": f"divmerge_layer - {method}", "n_tasks": n, "normalized_acc": d["diff"],
                     "ci_low": d["ci_low"], "ci_high": d["ci_high"], "ci_over": "examples",
                     "subsets": len({k[0] for k in common}), "seeds": seeds, "seeds_other": ref_seeds,
                     "split": "test", "metric": "rank"})
    return rows


def report(args) -> list[dict]:
    folds = results.load_folds(FOLDS)
    if not folds:
        raise FileNotFoundError(f"no folds in {FOLDS}.json: run `python -m experiments.study_l run` first")
    stored, passed = _gate(args)
    s = suite_l.build(train=False)
    planned = {(method, names, seed) for _, method, names, seed in plan(s.names, args)}
    missing = len(planned - {_key(f) for f in folds})
    left_out = [f for f in folds if _key(f) not in planned]
    folds = [f for f in folds if _key(f) in planned]
    expert_acc = {t: s.expert_metrics[t]["test"]["rank_acc"] for t in s.names}
    rows = [{**r, "entry_criteria_passed": passed, "exploratory": not passed} for r in aggregate(folds, expert_acc)]
    cols = ["method", "n_tasks", "normalized_acc", "ci_low", "ci_high", "ci_over", "subsets", "seeds", "em_normalized"]
    gate = "" if passed else ("EXPLORATORY: the suite fails its entry criteria (" + ", ".join(
        f"{r['criterion']} {r['value']:.2f}, must be {r['rule']}" for r in stored["criteria"] if not r["passed"])
        + "), so these rows cannot support a claim that one method beats another; every row says so. ")
    notes = (gate + f"Suite L (SmolLM2-135M-Instruct), test split ({s.config.test_size} examples per task), read once per "
             f"merge; normalized_acc = rank-classification accuracy / expert's x 100, em_normalized the same for "
             f"exact match of the greedy answer. TA scale {stored['ta_best_scale']} (chosen on validation at "
             f"{len(stored['tasks'])} tasks, `{ENTRY}.json`); TIES at jmerge's defaults. Subsets per count: all, or "
             f"{args.subsets} drawn with a fixed seed (`study_l.subsets`). Learned methods: {SAMPLES} prompts per task, "
             f"{STEPS} steps of {BATCH} per task, seeds {args.seeds} (each draws the prompts and batches; a row's "
             f"`seeds` counts those stored; paired differences average each example over its seeds first). "
             f"Per-fold rows: `{FOLDS}.json` ({len(left_out)} stored folds outside this plan left out; "
             f"{missing} planned folds not run).")
    results.write_rows(STEM, rows, suite="L", columns=["suite"] + cols, title="Suite L: normalized accuracy vs merged tasks",
                       command=report_command(args), notes=notes, overwrite=True)
    markdown(s, stored, rows, folds, notes, cols, report_command(args))
    return rows


def report_command(args) -> str:
    """The ``report`` command line that plans these folds (its options where not the defaults)."""
    opts = [("--methods", args.methods, list(METHODS)), ("--counts", args.counts, list(COUNTS)),
            ("--learned-counts", args.learned_counts, None), ("--subsets", args.subsets, SUBSETS),
            ("--seeds", args.seeds, [0])]
    extra = "".join(f" {flag} {' '.join(map(str, v)) if isinstance(v, list) else v}" for flag, v, default in opts if v != default)
    return "python -m experiments.study_l report" + extra


def markdown(s, stored: dict, rows=(), folds=(), notes: str = "", cols=("method",),
             report: str = "python -m experiments.study_l report") -> Path:
    """``suite_l.md``: the commands, the experts (recipe, cost, accuracy), the entry criteria and the study."""
    r = s.expert_metrics[s.names[0]]["recipe"]
    experts = [{"task": t, "key": s.expert_dirs[t].name[:16], "seq_len": m["cost"]["seq_len"],
                "median_step_s": float(np.median(m["cost"]["step_seconds"][1:])), "train_s": m["cost"]["train_seconds"],
                "base_val_rank": stored["base"][t]["rank_acc"], "val_rank": m["validation"]["rank_acc"],
                "val_em": m["validation"]["em_acc"], "test_rank": m["test"]["rank_acc"], "test_em": m["test"]["em_acc"]}
               for t, m in ((t, s.expert_metrics[t]) for t in s.names)]
    ta = [{"scale": x["scale"], "normalized_rank": x["normalized_rank"], "normalized_em": x["normalized_em"]}
          for x in stored["ta"]]
    fold_cols = ["method", "n_tasks", "subset", "normalized_acc", "em_normalized", "merge_seconds"]
    md = "\n".join([
        "# Suite L: SmolLM2-135M-Instruct experts and the DivMerge study", "",
        "Commands (in order): `python -m experiments.suite_l train`, `python -m experiments.study_l entry`, "
        f"`python -m experiments.study_l run`, `{report}` (this file).", "",
        f"## Experts\n\nRecipe: full fine-tuning of all 134.5M parameters, loss on the answer tokens only, {r}; "
        f"AdamW (optax), params and optimizer state donated. Accuracy in % on {s.config.validation_size} validation / "
        f"{s.config.test_size} test examples per task (balanced); rank = rank classification over the label words, "
        "EM = exact match of the greedy answer (label then `<|im_end|>`). Cost: wall seconds on the shared 2-core CPU "
        "(the log: `suite_l/train.log`).", "",
        results.markdown_table(experts, list(experts[0])),
        "## Entry criteria (validation, rank classification)\n", results.markdown_table(stored["criteria"],
                                                                                       ["criterion", "rule", "value", "passed", "what"]),
        f"Task arithmetic over the scales ({len(stored['tasks'])} tasks, validation); best {stored['ta_best_scale']}:\n",
        results.markdown_table(ta, ["scale", "normalized_rank", "normalized_em"]),
        "## Study (test split)\n",
        notes if rows else "Not run: `study_l run` refuses to start while an entry criterion fails.", "",
        results.markdown_table(rows, cols),
        "Folds:\n", results.markdown_table(folds, fold_cols)])
    path = results.RESULTS_DIR / "suite_l.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(md, encoding="utf-8"), overwrite=True)
    return path


def main(argv: Sequence[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("entry")
    e.add_argument("--overwrite", action="store_true")
    r = sub.add_parser("run")
    rep = sub.add_parser("report")
    for p in (r, rep):
        p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
        p.add_argument("--counts", nargs="+", type=int, default=list(COUNTS))
        p.add_argument("--learned-counts", nargs="+", type=int, default=None, help="default: the full task count")
        p.add_argument("--subsets", type=int, default=SUBSETS, help="subsets per task count (seeded sample)")
        p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the learned methods")
        p.add_argument("--exploratory", action="store_true",
                       help="run past failed entry criteria; every row is labelled exploratory")
    args = ap.parse_args(argv)
    return {"entry": entry, "run": run, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
