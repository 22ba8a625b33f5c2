"""Studies (b) and (c): learned merge coefficients on Suite T or V.

``tasks``: DivMerge (task and layer level) vs AdaMerging (task and layer level) vs task
arithmetic and TIES as the number of merged tasks grows from 2 to all (5 for T, 3 for V). For each count, up to
``--subsets`` seeded task subsets (all of them when there are fewer); each method merges the
subset's experts and is scored on the subset's tasks with their own heads, test split.
Reported: normalized accuracy (merged / expert x 100) averaged over tasks, then subsets
(DivMerge, arXiv 2509.02108, Tables 6-7).

``data``: DivMerge's normalized accuracy on all the tasks vs unlabelled samples per task.

Learned methods use the papers' settings (:func:`jmerge.learn.divmerge`: JS, Adam 1e-2,
4 epochs, 4 inputs per task per step, init 1/K; :func:`jmerge.learn.adamerging`: entropy,
init 0.3, clipped to [0, 1], Adam 1e-3, 5 epochs), with no tuning, on unlabelled inputs
drawn from the tasks' training splits. "layer" level is the base's layers for DivMerge
(MiniLM: embeddings and 6 blocks; MobileNetV2: stem, 17 blocks, last conv), and one
coefficient per tensor for AdaMerging (its "layer-wise").

Run: ``python -m experiments.study_divmerge tasks`` and
``python -m experiments.study_divmerge data [--suite V]``; suite V's files end in ``_v``
(the JSON rows of both suites share ``divmerge_{tasks,data}.json``). Suite V's tasks study is
:mod:`experiments.study_v_divmerge`.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np

import jmerge
from jmerge.cache import enable_compilation_cache
from experiments import results, suite
from jmerge import coverage, learn, lwptv

DATA_FREE = {"task_arithmetic": {"scale": 0.3}, "ties": {}}
LEARNED = {  # row name -> (jmerge.learn function, granularity)
    "divmerge_task": (learn.divmerge, "task"),
    "divmerge_layer": (learn.divmerge, "layer"),
    "adamerging_task": (learn.adamerging, "task"),
    "adamerging_layer": (learn.adamerging, "tensor"),
}
METHODS = tuple(DATA_FREE) + tuple(LEARNED)
SAMPLES = (8, 32, 128, 400)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def merge(s, method: str, names: Sequence[str], samples: int, seed: int = 0):
    """The encoder ``method`` makes of ``names``' experts (``samples`` unlabelled inputs per
    task for the learned methods)."""
    if method in DATA_FREE:
        return jmerge.merge(s.base, s.experts_for(names), method, **DATA_FREE[method])
    fn, granularity = LEARNED[method]
    result = fn(s.base, s.task_vectors(names), [s.apply_fn(t) for t in names],
                [s.unlabeled(t, samples, seed=seed) for t in names], granularity=granularity,
                layers=lwptv.group(s.base, s.config.layers) if granularity == "layer" else None,
                key=seed, progress=False)
    return result.params


def subsets(names: Sequence[str], n: int, limit: int, seed: int) -> list[tuple[str, ...]]:
    """All ``n``-subsets of ``names`` if there are at most ``limit``, else ``limit`` seeded ones."""
    combos = list(itertools.combinations(names, n))
    if len(combos) <= limit:
        return combos
    pick = np.random.default_rng([seed, n]).choice(len(combos), limit, replace=False)
    return [combos[i] for i in sorted(pick)]


def _score(s, params, names) -> float:
    return s.evaluate(params, "test", tasks=names, probes=())["normalized_acc"]


def _run(s, method: str, names, samples: int, raw: list, **extra) -> None:
    t0 = time.perf_counter()
    params = jax.block_until_ready(merge(s, method, names, samples))
    t_merge = time.perf_counter() - t0
    acc = _score(s, params, names)
    raw.append({"suite": s.config.name, "method": method, "tasks": list(names), "n_tasks": len(names),
                "samples_per_task": samples if method in LEARNED else 0, "normalized_acc": acc,
                "merge_seconds": t_merge, "coverage": _coverage(s, method), **extra})
    _log(f"  {method:17s} n={len(names)} samples={samples:4d} {','.join(names)}: normalized {acc:6.2f} "
         f"(merge {t_merge:.0f} s, total {time.perf_counter() - t0:.0f} s)")


def _coverage(s, method: str) -> float:
    """Fraction of the encoder's parameters the method's own rule merges (:mod:`jmerge.coverage`);
    the learned methods apply ``theta_0 + sum_t Gamma_t tau_t`` to every leaf, as task arithmetic."""
    return coverage.of(method if method in DATA_FREE else "task_arithmetic", s.base, DATA_FREE.get(method)).fraction


def _mean_rows(raw: list, key: str) -> list[dict]:
    groups: dict = {}
    for r in raw:
        groups.setdefault((r["suite"], r["method"], r[key], r["coverage"]), []).append(r["normalized_acc"])
    return [{"suite": name, "method": m, key: k, "normalized_acc": float(np.mean(v)), "subsets": len(v), "coverage": c}
            for (name, m, k, c), v in groups.items()]


def _plot(rows: list, key: str, xlabel: str, title: str, path, log_x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r[key], r["normalized_acc"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=method)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("normalized accuracy % (merged / expert)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    results.save_figure(fig, path)
    plt.close(fig)


def study_tasks(s, args) -> tuple[list, list]:
    raw = []
    for n in range(2, len(s.names) + 1):
        for names in subsets(s.names, n, args.subsets, args.seed):
            for method in args.methods:
                _run(s, method, names, args.samples, raw)
    return _mean_rows(raw, "n_tasks"), raw


def study_data(s, args) -> tuple[list, list]:
    raw = []
    for samples in args.sample_sizes:
        for method in args.methods:
            _run(s, method, s.names, samples, raw)
    return _mean_rows(raw, "samples_per_task"), raw


STUDIES: dict[str, tuple[Callable, str, str, dict]] = {
    # name -> (run, output stem, x key, defaults)
    "tasks": (study_tasks, "divmerge_tasks", "n_tasks", {"methods": list(METHODS)}),
    "data": (study_data, "divmerge_data", "samples_per_task", {"methods": ["divmerge_task", "divmerge_layer"]}),
}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--suite", choices=("T", "V"), default="T")
    ap.add_argument("--config", default="study", help="a config of the suite (default: study)")
    ap.add_argument("--methods", nargs="+", choices=METHODS)
    ap.add_argument("--samples", type=int, default=100, help="unlabelled inputs per task (tasks study)")
    ap.add_argument("--sample-sizes", nargs="+", type=int, default=list(SAMPLES), help="(data study)")
    ap.add_argument("--subsets", type=int, default=2, help="task subsets per count, at most (tasks study)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(results.RESULTS_DIR))
    ap.add_argument("--overwrite", action="store_true", help="replace existing result files")
    args = ap.parse_args(argv)
    if (args.study, args.suite) == ("tasks", "V"):
        ap.error("suite V's tasks study is `python -m experiments.study_v_divmerge` (issue 13's protocol: "
                 "validation-chosen baselines, TSV-M and Iso-CTS, seeds and CIs); it writes divmerge_tasks_v.md")
    run, stem, key, defaults = STUDIES[args.study]
    args.methods = args.methods or defaults["methods"]
    configs = suite.configs(args.suite)
    if args.config not in configs:
        ap.error(f"suite {args.suite} has no config {args.config!r} (choose from {', '.join(configs)})")
    config = configs[args.config]
    own = results.suite_stem(stem, args.suite)
    results.check_study_writable(args.out, stem, args.suite, [".md", ".png", "_raw.json"], args.overwrite)
    enable_compilation_cache(min_compile_seconds=1.0)

    t0 = time.perf_counter()
    s = suite.build_suite(config, log=_log)
    rows, raw = run(s, args)
    command = f"python -m experiments.study_divmerge " + " ".join(argv if argv is not None else sys.argv[1:])
    setting = (f"{args.samples} unlabelled inputs per task, up to {args.subsets} subsets per task count"
               if args.study == "tasks" else f"all {len(s.names)} tasks")
    notes = (f"Suite {args.suite} ({args.config} config, {config.test_size} test examples per task), {setting}; "
             f"normalized accuracy = merged / expert x 100 on the test split, averaged over tasks then subsets. "
             f"Per-merge rows (tasks, seconds): `{own}_raw.json`. Total {time.perf_counter() - t0:.0f} s.")
    rows.sort(key=lambda r: (r[key], METHODS.index(r["method"])))
    results.write_rows(stem, rows, suite=args.suite, columns=["suite", "method", key, "normalized_acc", "subsets"],
                       title=f"Suite {args.suite}: normalized accuracy vs {key.replace('_', ' ')}", command=command,
                       notes=notes, directory=args.out, overwrite=args.overwrite)
    results.write_json(f"{own}_raw", raw, directory=args.out, overwrite=args.overwrite)
    _plot(rows, key, "merged tasks" if args.study == "tasks" else "unlabelled samples per task",
          f"Suite {args.suite}, test split ({args.study} study)", f"{args.out}/{own}.png", log_x=args.study == "data")
    _log(notes)
    return rows


if __name__ == "__main__":
    main()
