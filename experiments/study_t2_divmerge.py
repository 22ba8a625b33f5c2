"""DivMerge study on Suite T v2 (issue 13 §4-5): normalized accuracy vs number of merged tasks.

Counts :data:`COUNTS`; per count the task subsets of :func:`experiments.study_divmerge.subsets`
(all when there are at most :data:`SUBSETS`, else that many seeded ones). Methods:

- data-free: task arithmetic and TIES at the settings :mod:`experiments.study_t2` chose on
  validation (read from ``suite_t2_study.json``), TSV-M and Iso-CTS at their defaults with the
  word embeddings left out of their SVD rule (:data:`SVD_SETTING`);
- learned (:mod:`jmerge.learn`), each at task and layer level (the base's layers; AdaMerging's
  "layer-wise" is one coefficient per tensor), on :data:`SAMPLES` pool inputs per task drawn
  from the train split, seeds :data:`SEEDS` (seed = pool draw and batch order):
  ``divmerge`` (JS to each expert, Adam 1e-2, 4 inputs per task per step, init 1/K) for
  the step count chosen on validation (``steps``) whatever the pool size; ``adamerging`` (entropy, init 0.3, clip [0, 1],
  Adam 1e-3, 16 inputs per task per step: the official schedule's batch and rate) for
  ``--adamerging-steps`` steps (the official 500 when the budget allows; the rows say what ran);
  ``supervised`` (the same Γ fit by labelled cross-entropy on the pool's own labels: the
  ``kl`` objective against one-hot targets, ``KL(onehot_y || q) = -log q_y``), an upper bound
  for the unlabelled objectives.

Every merge is scored once, on the test split of its subset's tasks; normalized accuracy =
merged / expert x 100, averaged over the subset's tasks. Fold rows (one per method, subset
and seed) accumulate in ``divmerge_tasks_t2_folds.json`` (each run adds its methods' folds);
``--report`` turns them into ``"suite": "T2"`` rows of ``divmerge_tasks.json`` (mean over
folds, percentile-bootstrap 95 % CI over folds, :func:`experiments.stats.ci_fields`), paired
differences of ``divmerge_layer`` against every other method (per subset, learned methods
averaged over seeds first; :func:`experiments.stats.paired_difference`) and the table
``divmerge_tasks_t2.{md,png}``.

Each learned method's step count (DivMerge and the supervised bound, task and layer level) is
chosen on validation by ``steps`` (:data:`STEP_GRID`, the full task set, seed 0;
``divmerge_steps.json`` and ``divmerge_steps_t2.md``, with each fit's per-epoch loss);
``run`` reads it from there (:func:`chosen_steps`) unless ``--divmerge-steps`` / ``--supervised-steps`` is given.

Run: ``python -m experiments.study_t2_divmerge steps``, ``run --methods ...``, then ``report``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jmerge
from experiments import criteria, results, stats
from experiments.study_divmerge import _plot, subsets
from experiments.study_t2 import STEM as T2_STUDY
from jmerge import coverage, learn, lwptv

COUNTS = (2, 4, 8)
SUBSETS, SUBSET_SEED = 5, 0
SEEDS = (0, 1, 2)
SAMPLES = 64  # pool inputs per task
STEP_GRID = (48, 400)  # `steps`: 3 epochs of the pool; the paper's layer-level count (4 epochs x 400 / 4, App. D.2)
STEPS_STEM = "divmerge_steps"
BATCH = 4  # DivMerge: inputs per task per step (arXiv 2509.02108 App. D.2)
ADA_BATCH, ADA_STEPS = 16, 500  # AdaMerging's official schedule (arXiv 2310.02575 code)
DATA_FREE = ("task_arithmetic", "ties", "tsv", "iso_cts")
# TSV-M and Iso-CTS leave the 30522 x 384 word-embedding table (53 % of the encoder) out of their
# SVD rule: it gets the task-vector mean (the documented svd_filter; coverage in every row). Its
# thin SVD (3 per 2-task TSV-M merge) costs as much in numpy's LAPACK gesdd as in jnp.linalg.svd
# (bench/results/tsv_profile.md), which did not fit the session's shared CPU.
SVD_SETTING = {"svd_filter": r"^(?!embeddings/word/)"}
LEARNED = ("divmerge", "supervised", "adamerging")
GRANULARITY = {"task": "task", "layer": "layer"}  # row suffix -> granularity (AdaMerging: "tensor")
FOLDS = "divmerge_tasks_t2_folds"
STEM = "divmerge_tasks"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def chosen_settings(directory=results.RESULTS_DIR) -> dict[str, dict]:
    """TA's and TIES' settings chosen on validation by :mod:`experiments.study_t2` (the rows of
    its subset study carry them)."""
    rows = json.loads((Path(directory) / f"{T2_STUDY}.json").read_text())
    out = {}
    for m in ("task_arithmetic", "ties"):
        picked = {json.dumps(r["setting"], sort_keys=True) for r in rows
                  if r["suite"] == "T2" and r["method"] == m and r["tasks"] != 8}
        if len(picked) != 1:
            raise ValueError(f"{T2_STUDY}.json: expected one chosen {m} setting, found {sorted(picked)}")
        out[m] = json.loads(picked.pop())
    return out


def epochs_for(steps: int, samples: int, batch: int) -> int:
    """Epochs of :func:`jmerge.learn.fit_coefficients` that make exactly ``steps`` steps
    (an epoch is ``ceil(samples / batch)`` steps)."""
    per_epoch = -(-samples // batch)
    if steps % per_epoch:
        raise ValueError(f"{steps} steps are not a whole number of epochs of {per_epoch} steps "
                         f"({samples} samples, batch {batch})")
    return steps // per_epoch


def _shared_logits(encoder, kernels, biases, scale, params, batch):
    """Logits of the zero-shot head of each example's task (``batch["task"]``), classes padded
    to the largest task's with bias -1e4 (probability 0): one apply function for every
    task, so the learned steps compile once per task count and granularity."""
    emb = encoder.encode(params, batch)
    emb = scale * emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return jnp.einsum("bd,bdc->bc", emb, kernels[batch["task"]]) + biases[batch["task"]]


class Pools:
    """Each task's pool inputs (full ``max_len``, plus its task index) and labels, and the
    shared apply function (:func:`_shared_logits`)."""

    def __init__(self, s):
        self.s = s
        heads = [s.heads[t] for t in s.names]
        self.classes = max(h["kernel"].shape[1] for h in heads)
        pad = lambda a, v: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, self.classes - a.shape[-1])], constant_values=v)
        kernels = jnp.stack([pad(h["kernel"], 0.0) for h in heads])
        biases = jnp.stack([pad(h["bias"], -1e4) for h in heads])
        scales = {float(np.asarray(h["scale"]).ravel()[0]) for h in heads}
        if len(scales) != 1:
            raise ValueError(f"the zero-shot heads have different scales {sorted(scales)}")
        self.apply = partial(_shared_logits, s.encoder, kernels, biases, scales.pop())

    def inputs(self, task: str, seed: int) -> tuple[dict, np.ndarray]:
        p = self.s.pool(task, SAMPLES, seed=seed)
        task_index = np.full(len(p), self.s.names.index(task), np.int32)
        return {"ids": p.ids, "mask": p.mask, "task": task_index}, p.labels


def _learned(s, pools: Pools, method: str, granularity: str, names, seed: int, steps: int):
    data = [pools.inputs(t, seed) for t in names]
    xs = [d[0] for d in data]
    kw = dict(granularity=granularity, key=seed, progress=False,
              layers=lwptv.group(s.base, s.config.layers) if granularity == "layer" else None)
    tvs = s.task_vectors(names)
    if method == "divmerge":
        return learn.divmerge(s.base, tvs, pools.apply, xs, epochs=epochs_for(steps, SAMPLES, BATCH),
                              batch_per_task=BATCH, **kw)
    if method == "supervised":
        targets = []
        for _, y in data:
            lp = np.full((len(y), pools.classes), -np.inf, np.float32)
            lp[np.arange(len(y)), y] = 0.0
            targets.append(lp)
        return learn.divmerge(s.base, tvs, pools.apply, xs, targets=targets, objective="kl",
                              epochs=epochs_for(steps, SAMPLES, BATCH), batch_per_task=BATCH, **kw)
    kw["granularity"] = "tensor" if granularity == "layer" else granularity
    kw["layers"] = None
    return learn.adamerging(s.base, tvs, pools.apply, xs, epochs=epochs_for(steps, SAMPLES, ADA_BATCH),
                            batch_per_task=ADA_BATCH, **kw)


def _fold(s, method: str, names, seed: int, params, seconds: float, **extra) -> dict:
    res = s.evaluate(params, "test", tasks=names, probes=())
    _log(f"  {method:18s} seed {seed} n={len(names)} {','.join(names)}: normalized {res['normalized_acc']:6.2f} "
         f"({seconds:.0f} s)")
    return {"suite": "T2", "method": method, "n_tasks": len(names), "subset": list(names), "seed": seed,
            "normalized_acc": res["normalized_acc"], "id_acc": res["id_acc"], "normalized": res["normalized"],
            "merge_seconds": seconds, **extra}


def _key(f: dict) -> tuple:
    """A fold's identity: method, step count, subset, seed."""
    return f["method"], f.get("steps"), tuple(f["subset"]), f["seed"]


def _open_suite():
    from experiments import suite_t
    from experiments.suite import build_suite
    from jmerge.cache import enable_compilation_cache

    criteria.require()
    enable_compilation_cache(min_compile_seconds=1.0)
    return build_suite(suite_t.V2, log=_log)


def per_epoch(losses: Sequence[float], samples: int = SAMPLES, batch: int = BATCH) -> list[float]:
    """Mean training loss of each epoch (``ceil(samples / batch)`` steps): the convergence curve."""
    n = -(-samples // batch)
    return [round(float(np.mean(losses[i:i + n])), 5) for i in range(0, len(losses), n)]


def choose_steps(rows: Sequence[dict]) -> dict[str, int]:
    """Per method, the step count of :data:`STEP_GRID` with the best validation normalized accuracy
    (ties: the fewer steps)."""
    best: dict[str, tuple] = {}
    for r in rows:
        cand = (r["normalized_acc"], -r["steps"])
        if r["method"] not in best or cand > best[r["method"]][0]:
            best[r["method"]] = (cand, r["steps"])
    return {m: st for m, (_, st) in best.items()}


def steps(args) -> dict[str, int]:
    """Validation only: DivMerge and the supervised bound, task and layer level, on the full task set
    (seed 0) at every step count of :data:`STEP_GRID`; stores each fit's validation normalized
    accuracy and per-epoch loss (``STEPS_STEM``); returns the choice (:func:`choose_steps`)."""
    s = _open_suite()
    pools = Pools(s)
    rows = []
    for method in ("divmerge_layer", "divmerge_task", "supervised_layer", "supervised_task"):
        base_method, level = method.rsplit("_", 1)
        for n_steps in STEP_GRID:
            t0 = time.perf_counter()
            res = _learned(s, pools, base_method, GRANULARITY[level], s.names, 0, n_steps)
            ev = s.evaluate(jax.block_until_ready(res.params), "validation", tasks=s.names, probes=())
            rows.append({"suite": "T2", "split": "validation", "method": method, "n_tasks": len(s.names), "seed": 0,
                         "steps": n_steps, "samples_per_task": SAMPLES, "normalized_acc": ev["normalized_acc"],
                         "final_loss": float(res.losses[-1]), "loss_per_epoch": per_epoch(res.losses),
                         "merge_seconds": time.perf_counter() - t0})
            _log(f"  {method:18s} {n_steps:4d} steps: validation normalized {ev['normalized_acc']:6.2f}, "
                 f"loss per epoch {rows[-1]['loss_per_epoch']}")
    chosen = choose_steps(rows)
    notes = (f"Validation split (200 examples per task), the {len(s.names)}-task set, seed 0, {SAMPLES} pool inputs "
             f"per task. Chosen (best validation normalized accuracy): "
             f"{', '.join(f'{m} {n}' for m, n in chosen.items())}. `loss_per_epoch`: mean training loss of "
             f"each pass over the pool (in `{STEPS_STEM}.json`).")
    results.write_rows(STEPS_STEM, rows, suite="T2", columns=["method", "steps", "normalized_acc", "final_loss", "merge_seconds"],
                       title="Suite T v2: DivMerge and supervised-bound step counts (validation)",
                       command="python -m experiments.study_t2_divmerge steps", notes=notes, overwrite=True)
    _log(f"chosen step counts: {chosen}")
    return chosen


def chosen_steps(directory=results.RESULTS_DIR) -> dict[str, int]:
    """The step count ``steps`` chose per learned method, from its stored validation rows."""
    path = Path(directory) / f"{STEPS_STEM}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m experiments.study_t2_divmerge steps` first "
                                f"(it chooses the learned methods' step counts on validation)")
    return choose_steps([r for r in json.loads(path.read_text()) if r.get("suite") == "T2"])


def data_free_folds(s, method: str, hp: dict, plan: Sequence, stored: set, fold, stem: str) -> None:
    """Merges each subset of ``plan`` (task names) not yet in ``stored`` with the data-free ``method``
    at ``hp``, scores it with ``fold`` (the suite's :func:`_fold`) and saves it to ``stem`` at once."""
    for names in plan:
        if (method, None, tuple(names), 0) in stored:
            continue
        t0 = time.perf_counter()
        params = jax.block_until_ready(jmerge.merge(s.base, s.experts_for(names), method, **hp))
        results.save_folds(stem, [fold(s, method, names, 0, params, time.perf_counter() - t0, setting=hp,
                                       coverage=coverage.of(method, s.base, hp, len(names)).fraction)], key=_key)


def run(args) -> None:
    settings = chosen_settings()
    s = _open_suite()
    pools = Pools(s)
    plan = [(n, names) for n in args.counts for names in subsets(s.names, n, SUBSETS, SUBSET_SEED)]
    stored = set() if args.redo else {_key(f) for f in results.load_folds(FOLDS)}
    for method in args.methods:
        if method in DATA_FREE:  # TA and TIES: chosen on validation; TSV-M, Iso-CTS: SVD_SETTING
            data_free_folds(s, method, settings.get(method, SVD_SETTING), [names for _, names in plan], stored, _fold, FOLDS)
            continue
        base_method, level = method.rsplit("_", 1)
        steps = getattr(args, f"{base_method}_steps", None) or chosen_steps().get(method)
        if steps is None:
            raise ValueError(f"no step count for {method}: `steps` chose none; pass --{base_method}-steps")
        for seed in args.seeds:
            for n, names in plan:
                if (method, steps, tuple(names), seed) in stored:
                    continue
                t0 = time.perf_counter()
                res = _learned(s, pools, base_method, GRANULARITY[level], names, seed, steps)
                params = jax.block_until_ready(res.params)
                fold = _fold(s, method, names, seed, params, time.perf_counter() - t0, steps=steps,
                             samples_per_task=SAMPLES, granularity=res.granularity, final_loss=float(res.losses[-1]),
                             losses=np.asarray(res.losses, np.float64).round(5).tolist(),
                             coefficients=np.asarray(res.coefficients, np.float64).round(5).tolist(),
                             coverage=coverage.of("task_arithmetic", s.base, None).fraction)
                results.save_folds(FOLDS, [fold], key=_key)


METHODS = DATA_FREE + tuple(f"{m}_{lvl}" for m in LEARNED for lvl in GRANULARITY)


def _means(folds: Sequence[dict]) -> tuple[dict, dict]:
    """Per subset, the mean ``normalized_acc`` of ``folds``; per (subset, task), the mean of the
    task's normalized accuracy (``fold["normalized"]``): seeds averaged."""
    by, by_task = {}, {}
    for f in folds:
        by.setdefault(tuple(f["subset"]), []).append(f["normalized_acc"])
        for task, acc in f.get("normalized", {}).items():
            by_task.setdefault((tuple(f["subset"]), task), []).append(acc)
    return ({k: float(np.mean(v)) for k, v in by.items()}, {k: float(np.mean(v)) for k, v in by_task.items()})


def paired_folds(ours: Sequence[dict], theirs: Sequence[dict]) -> dict | None:
    """``ours - theirs`` in normalized accuracy, paired on the subsets both hold (learned methods'
    seeds averaged per subset first), with a percentile-bootstrap 95 % CI over those subsets
    (``ci_over`` ``"subsets"``); with one subset in common (the one 8-task set), over its tasks
    (``"tasks"``, whose mean is the same difference; no CI without per-task figures). ``None``
    when no subset is common (a partial run). Keys: ``diff``, ``ci_low``, ``ci_high``,
    ``ci_over``, ``subsets``."""
    (a, a_task), (b, b_task) = _means(ours), _means(theirs)
    common = sorted(set(a) & set(b))
    if not common:
        return None
    x, y, over = {k: a[k] for k in common}, {k: b[k] for k in common}, "subsets"
    if len(common) == 1:
        x, y = ({k: v for k, v in t.items() if k[0] == common[0]} for t in (a_task, b_task))
        over = "tasks" if x and set(x) == set(y) else None
    d = stats.paired_difference(x, y) if over else {"diff": a[common[0]] - b[common[0]], "ci_low": None, "ci_high": None}
    return {"diff": d["diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "ci_over": over, "subsets": len(common)}


def aggregate(folds: Sequence[dict], reference_steps: int, suite: str = "T2") -> list[dict]:
    """Mean rows (labelled ``suite``) with CIs per (method, count, step count), then the paired
    differences of ``divmerge_layer`` (at ``reference_steps``) against every other row per count
    (:func:`paired_folds`; module docstring)."""
    rows, groups = [], {}
    for f in folds:
        groups.setdefault((f["method"], f["n_tasks"], f.get("steps")), []).append(f)
    order = lambda kv: (kv[0][1], METHODS.index(kv[0][0]), kv[0][2] or 0)  # noqa: E731
    for (method, n, steps), fs in sorted(groups.items(), key=order):
        f0 = fs[0]
        rows.append({"suite": suite, "method": method, "n_tasks": n,
                     "normalized_acc": float(np.mean([f["normalized_acc"] for f in fs])),
                     **stats.ci_fields(fs, "normalized_acc"), "coverage": f0["coverage"],
                     "setting": f0.get("setting"), "steps": steps,
                     "samples_per_task": f0.get("samples_per_task", 0), "split": "test"})
    for (method, n, steps), fs in sorted(groups.items(), key=order):
        ours = groups.get(("divmerge_layer", n, reference_steps))
        d = None if ours is None or (method, steps) == ("divmerge_layer", reference_steps) else paired_folds(ours, fs)
        if d is not None:
            rows.append({"suite": suite, "method": f"divmerge_layer - {method}", "n_tasks": n,
                         "normalized_acc": d.pop("diff"), **d, "seeds": None, "steps": steps, "split": "test"})
    return rows


def report(args) -> list[dict]:
    folds = results.load_folds(FOLDS)
    if not folds:
        raise FileNotFoundError(f"no folds in {FOLDS}.json: run `python -m experiments.study_t2_divmerge run` first")
    rows = aggregate(folds, chosen_steps()["divmerge_layer"])
    ran = sorted({(f["method"], f.get("steps")) for f in folds}, key=lambda x: METHODS.index(x[0]))
    notes = (f"Suite T v2, test split (200 examples per task), read once per merge. Counts {sorted({f['n_tasks'] for f in folds})}; "
             f"per count {SUBSETS} seeded subsets (seed {SUBSET_SEED}; the one 8-task set). TA/TIES settings chosen "
             f"on validation by `experiments.study_t2`; TSV-M and Iso-CTS at their defaults with svd_filter "
             f"`{SVD_SETTING['svd_filter']}` (the word embeddings get the task-vector mean; `coverage` in the rows). "
             f"Learned methods: {SAMPLES} "
             f"pool inputs per task from train, seeds = distinct values in `seeds`; steps per method: "
             f"{', '.join(f'{m} {st}' for m, st in ran if st)}. ci_low/ci_high: percentile bootstrap 95 % CI over "
             f"folds (null with one fold). `divmerge_layer - X` rows: paired differences, their CI over subsets, or over "
             f"the tasks of the one subset where only one is common (`ci_over`; learned methods averaged over seeds "
             f"first). Per-fold rows: `{FOLDS}.json`.")
    cols = ["method", "n_tasks", "normalized_acc", "ci_low", "ci_high", "ci_over", "subsets", "seeds", "steps"]
    results.write_rows(STEM, rows, suite="T2", columns=["suite"] + cols, title="Suite T v2: normalized accuracy vs merged tasks",
                       command="python -m experiments.study_t2_divmerge report", notes=notes, overwrite=True)
    means = [r for r in rows if " - " not in r["method"]]
    variants = {m: {r["steps"] for r in means if r["method"] == m} for m in {r["method"] for r in means}}
    label = lambda r: r["method"] + (f" ({r['steps']} steps)" if len(variants[r["method"]]) > 1 else "")  # noqa: E731
    _plot([{**r, "method": label(r)} for r in means], "n_tasks", "merged tasks",
          "Suite T v2, test split (mean over subsets and seeds)", results.RESULTS_DIR / f"{STEM}_t2.png")
    return rows


def main(argv: Sequence[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    r.add_argument("--counts", nargs="+", type=int, default=list(COUNTS))
    r.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    r.add_argument("--divmerge-steps", type=int, help="default: the count `steps` chose for each level")
    r.add_argument("--supervised-steps", type=int, help="default: the count `steps` chose for each level")
    r.add_argument("--adamerging-steps", type=int, default=ADA_STEPS)
    r.add_argument("--redo", action="store_true", help="recompute folds already stored (default: skip them)")
    sub.add_parser("report")
    sub.add_parser("steps", help="choose the learned methods' step count on validation (STEP_GRID)")
    args = ap.parse_args(argv)
    return {"run": run, "report": report, "steps": steps}[args.cmd](args)


if __name__ == "__main__":
    main()
