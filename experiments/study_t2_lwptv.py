"""LwPTV on Suite T v2 against score-free controls (issue 13 §4; LwPTV: arXiv 2506.09093).

Folds are the :data:`SUBSETS` seeded :data:`SUBSET_SIZE`-task subsets of the eight tasks
(:func:`experiments.study_divmerge.subsets`, seed 0: the subsets of :mod:`experiments.study_t2`).
Each fold merges its subset's experts and scores the merged encoder on all eight tasks through
the suite's frozen zero-shot heads (shared by base, experts and merges):

- ID  = mean accuracy (points) on the merged tasks;
- OOD = mean accuracy (points) on the held-out tasks, the ``8 - n`` tasks whose experts are not in
  the merge (:func:`split_scores`). Raw points, not normalized by the base: chance differs across
  tasks (2 to 26 classes) and the base sits near chance on some (``debates_2016`` 30 % for 3
  classes), so ratios to the base would weigh noise; the base's OOD is a row of its own.

Variants of each base method, at ``k`` kept layers of the ``L = 7`` of ``jmerge_bert``
(embeddings, layer.0 .. layer.5), all through ``jmerge.merge(..., lwptv=LayerMask)``:

- ``plain``: the method alone;
- ``lwptv``: LwPTV's own mask (score :data:`SCORE`, rule ``top_k``, ``k``);
- ``first_layers``: control (a), every task drops the first ``L - k`` layers;
- ``random``: control (b), each task keeps ``k`` layers drawn uniformly, seeds :data:`RANDOM_SEEDS`
(the masks and the masked merge: :mod:`experiments.lwptv_controls`, shared with Suite V's study).

``validate`` (validation split only): the base and every method plain; the OOD entry criterion
of each method (:func:`ood_entry`: the method must move held-out accuracy away from the base by
more than the paired 95 % CI's width, else OOD cannot show what LwPTV recovers for it); for each
method that passes, LwPTV at every ``k`` of :data:`TOP_K` and the ``k`` with the best OOD among
those losing at most :data:`ID_TOLERANCE` ID points (:func:`experiments.study_lwptv.choose`),
chosen on that method's own folds. A method that fails its criterion gets no choice and is not
tested; if none passes, the study stops. (Protocol v2: v1 gated every method on task
arithmetic's spread and chose one ``k`` on TA's folds; it stopped at that gate on validation,
TA moving held-out accuracy by +0.03 points, before the test split was read.) ``test`` then
reads the test split once: base, plain, and the three masked variants at the chosen ``k``. ``report``:
rows with percentile-bootstrap 95 % CIs over folds and paired differences over subsets
(:mod:`experiments.stats`; random seeds averaged first), per method and averaged over methods.

Files (``experiments/results/``): folds ``lwptv_t2_folds.json`` (one row per merge, both splits,
with its mask), the validation choice ``lwptv_t2_validation.json``, rows in ``lwptv.json``
(``"suite": "T2"``) and the table ``lwptv_t2.md``.

``explore --methods M --k K`` (validation only, exploratory): M plain and the three masks at a
``K`` fixed beforehand, rows in ``lwptv_t2_explore.json``; for a study stopped at its gate, to see
what LwPTV does where OOD moves. No claim rests on it.

Run: ``python -m experiments.study_t2_lwptv validate``, then ``test``, then ``report``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments import criteria, results, stats
from experiments import lwptv_controls as controls
from experiments.lwptv_controls import (ID_TOLERANCE, RANDOM_SEEDS, VARIANTS, control_mask, distinct_masks, runs,
                                        verdict)
from experiments.study_divmerge import subsets
from experiments.study_lwptv import choose
from experiments.study_t2_divmerge import chosen_settings
from experiments.suite_t import ISO_SVD_FILTER
from jmerge import coverage
from jmerge.lwptv import LwPTV, group, inspect

SUBSET_SIZE, SUBSETS, SUBSET_SEED = 4, 5, 0
TOP_K = (4, 5, 6)  # layers kept per task, of 7, tried on validation
SCORE = "trim_survival"  # the library default; v1 found relative_update gave the same masks
# Base methods beyond TA and TIES (whose settings study_t2 chose on validation), at their published
# defaults; DARE's drop is seeded; Iso-CTS averages the 30522 x 384 embedding table (its SVD took
# minutes per merge here) and factorises every other matrix.
OTHER_METHODS = {"dare_ties": {"key": 0}, "consensus": {}, "iso_cts": {"svd_filter": ISO_SVD_FILTER}}
METHODS = ("task_arithmetic", "ties", *OTHER_METHODS)
STEM = "lwptv"
FOLDS = "lwptv_t2_folds"
VALIDATION = "lwptv_t2_validation"
EXPLORE = "lwptv_t2_explore"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_scores(acc: dict[str, float], merged: Sequence[str]) -> dict:
    """``id_acc`` (mean over ``merged``) and ``ood_acc`` (mean over the other tasks of ``acc``,
    the held-out ones) of per-task accuracies ``acc``; ``held_out`` names them."""
    unknown = [t for t in merged if t not in acc]
    if unknown:
        raise ValueError(f"merged tasks {unknown} have no accuracy (tasks scored: {sorted(acc)})")
    held = [t for t in acc if t not in merged]
    if not held:
        raise ValueError("no held-out task: OOD needs at least one task outside the merge")
    return {"id_acc": float(np.mean([acc[t] for t in merged])), "ood_acc": float(np.mean([acc[t] for t in held])),
            "held_out": held}


def ood_entry(base: dict, merged: dict) -> dict:
    """The OOD metric's entry criterion from per-subset OOD of the base and of a merge (TA for
    the gate): the paired difference ``merge - base`` must exceed its 95 % CI's width in size."""
    d = stats.paired_difference(merged, base)
    width = d["ci_high"] - d["ci_low"]
    return {"criterion": "ood_spread", "rule": "|merge - base| > CI width", "minus_base": d["diff"],
            "ci_low": d["ci_low"], "ci_high": d["ci_high"], "ci_width": width, "subsets": d["folds"],
            "passed": bool(abs(d["diff"]) > width)}


class Study:
    """The built suite, its layer grouping and subsets, and the fold file in ``directory``
    (resumable: a fold already stored is read back, not merged again)."""

    def __init__(self, s, directory=results.RESULTS_DIR):
        self.s, self.directory = s, directory
        self.grouping = group(s.base, s.config.layers)
        self.subsets = subsets(s.names, SUBSET_SIZE, SUBSETS, SUBSET_SEED)
        self.settings = {**chosen_settings(), **OTHER_METHODS}
        self.folds = _load(FOLDS, directory)

    def mask(self, method: str, variant: str, k: int, seed: int, names: tuple[str, ...]) -> np.ndarray | None:
        """The ``(K, L)`` mask of ``variant`` on the subset ``names`` (None for ``plain``)."""
        L = self.grouping.num_layers
        if variant == "plain":
            return None
        if variant == "lwptv":
            _, m = inspect(self.s.base, self.s.experts_for(names),
                           LwPTV(layers=self.s.config.layers, score=SCORE, rule="top_k", value=k, task_names=names))
            return m.mask
        if variant in controls.CONTROLS:
            return control_mask(variant, len(names), L, k, seed, [self.s.names.index(n) for n in names])
        raise ValueError(f"unknown variant {variant!r} (variants: {', '.join(VARIANTS)})")

    def base_folds(self, split: str) -> list[dict]:
        """The base's fold on each subset (one scoring of the base per split, reused)."""
        done = [f for f in self.folds if f["split"] == split and f["method"] == "base"]
        acc = done[0]["acc"] if done else self.s.evaluate(self.s.base, split, tasks=self.s.names, probes=())["id"]
        have = {tuple(f["subset"]) for f in done}
        new = [{"suite": "T2", "split": split, "method": "base", "variant": "base", "top_k": None, "seed": 0,
                "subset": list(names), **split_scores(acc, names), "acc": acc} for names in self.subsets
               if names not in have]
        if new:
            self._save(new)
        return [f for f in self.folds if f["split"] == split and f["method"] == "base"
                and tuple(f["subset"]) in set(self.subsets)]

    def fold(self, split: str, method: str, variant: str, k: int | None, seed: int, names: tuple[str, ...]) -> dict:
        """One merge scored on ``split`` (stored, or loaded when a previous run stored it)."""
        key = (split, method, variant, k, seed, tuple(names))
        for f in self.folds:
            if _key(f) == key:
                return f
        t0 = time.perf_counter()
        mask = self.mask(method, variant, k, seed, names)
        merged = controls.merge(self.s.base, self.s.experts_for(names), method, self.settings[method], mask,
                                self.grouping.names, names, self.s.config.layers)
        t1 = time.perf_counter()
        res = self.s.evaluate(merged, split, tasks=self.s.names, probes=())
        sc = split_scores(res["id"], names)
        f = {"suite": "T2", "split": split, "method": method, "variant": variant, "top_k": k, "seed": seed,
             "keep_ratio": None if k is None else k / self.grouping.num_layers, "subset": list(names), **sc,
             "normalized_acc": float(np.mean([res["normalized"][t] for t in names])), "acc": res["id"],
             "mask": None if mask is None else mask.astype(int).tolist(), "setting": self.settings[method],
             "coverage": coverage.of(method, self.s.base, self.settings[method]).fraction,
             "merge_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1}
        _log(f"  {split:10s} {method:15s} {variant:12s} k={k} seed {seed} {','.join(names)}: ID {sc['id_acc']:6.2f} "
             f"OOD {sc['ood_acc']:6.2f} ({t1 - t0:.0f} + {f['eval_seconds']:.0f} s)")
        self._save([f])
        return f

    def _save(self, new: list[dict]) -> None:
        """Adds ``new`` to the fold file, re-read first (a test run may go on beside a validation run)."""
        keys = {_key(f) for f in new}
        self.folds = [f for f in _load(FOLDS, self.directory) if _key(f) not in keys] + new
        results.write_json(FOLDS, self.folds, directory=self.directory, overwrite=True)


def _key(f: dict) -> tuple:
    return f["split"], f["method"], f["variant"], f["top_k"], f["seed"], tuple(f["subset"])


def _load(stem: str, directory=results.RESULTS_DIR):
    path = Path(directory) / f"{stem}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _mean_row(folds: Sequence[dict], **fields) -> dict:
    """Mean ID and OOD over ``folds`` with the OOD's CI (``ci_low``/``ci_high``) and the ID's."""
    ood, idm = stats.ci_fields(folds, "ood_acc"), stats.ci_fields(folds, "id_acc")
    return {**fields, "id_acc": float(np.mean([f["id_acc"] for f in folds])),
            "ood_acc": float(np.mean([f["ood_acc"] for f in folds])), **ood,
            "id_ci_low": idm["ci_low"], "id_ci_high": idm["ci_high"]}


def entry_message(method: str, entry: dict) -> str:
    """The message of ``method``'s failed OOD entry criterion, with the measured values."""
    return (f"suite T2 fails entry criterion ood_spread for {method}: {method} - base on held-out tasks "
            f"{entry['minus_base']:+.2f} points (95 % CI [{entry['ci_low']:.2f}, {entry['ci_high']:.2f}], width "
            f"{entry['ci_width']:.2f}); the difference must exceed the CI width in size")


def validate(st: Study, methods: Sequence[str] = METHODS) -> dict:
    """Validation only: the base and each of ``methods`` plain and its OOD entry criterion; for
    each method that passes, LwPTV at every ``k`` of :data:`TOP_K` and the ``k`` chosen on its own
    folds. Methods that fail get no choice (``chosen`` empty when none passes)."""
    base = st.base_folds("validation")
    per_subset = lambda fs: {tuple(f["subset"]): f["ood_acc"] for f in fs}
    plain = {m: [st.fold("validation", m, "plain", None, 0, n) for n in st.subsets] for m in methods}
    entries = {m: ood_entry(per_subset(base), per_subset(fs)) for m, fs in plain.items()}
    rows = [_mean_row(base, method="base", variant="base", top_k=None)]
    rows += [_mean_row(fs, method=m, variant="plain", top_k=None) for m, fs in plain.items()]
    out = {"split": "validation", "score": SCORE, "top_k_grid": list(TOP_K), "id_tolerance": ID_TOLERANCE,
           "subset_size": SUBSET_SIZE, "gate": "per method", "ood_entry_by_method": entries, "chosen": {},
           "rows": rows}
    for m, e in entries.items():
        _log(f"OOD entry criterion, {m}: {e['minus_base']:+.2f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}] "
             f"{'passed' if e['passed'] else 'FAILED'}")
    for i, m in enumerate(methods):
        if not entries[m]["passed"]:
            continue
        tried = [_mean_row([st.fold("validation", m, "lwptv", k, 0, n) for n in st.subsets],
                           method=m, variant="lwptv", top_k=k) for k in TOP_K]
        plain_row, best = rows[1 + i], choose(rows[1 + i], tried, ID_TOLERANCE)
        _log(f"{m}: chosen k={best['top_k']} (validation ID {best['id_acc']:.2f} vs {plain_row['id_acc']:.2f}, "
             f"OOD {best['ood_acc']:.2f} vs {plain_row['ood_acc']:.2f})")
        out["rows"] += tried
        out["chosen"][m] = {"top_k": best["top_k"], "setting": st.settings[m],
                            "within_tolerance": best["id_acc"] >= plain_row["id_acc"] - ID_TOLERANCE}
    return out


def test(st: Study, chosen: dict, methods: Sequence[str]) -> None:
    """The test split, read once: base, and per method plain and the three masks at its chosen ``k``."""
    st.base_folds("test")
    for method in methods:
        k = chosen[method]["top_k"]
        for names in st.subsets:
            for variant, seed in runs():
                st.fold("test", method, variant, None if variant == "plain" else k, seed, names)


def _by_subset(folds: Sequence[dict], metric: str) -> dict[tuple, float]:
    """``metric`` per subset, seeds averaged."""
    by: dict = {}
    for f in folds:
        by.setdefault(tuple(f["subset"]), []).append(f[metric])
    return {k: float(np.mean(v)) for k, v in by.items()}


def aggregate(folds: Sequence[dict], methods: Sequence[str], split: str = "test") -> list[dict]:
    """Rows of ``split``: base; per method each variant (mean, CIs, distinct masks); per method and
    averaged over ``methods`` the paired differences ``lwptv - plain``, ``lwptv - first_layers``,
    ``lwptv - random`` in ID and OOD."""
    test_folds = [f for f in folds if f["split"] == split]
    pick = lambda m, v: [f for f in test_folds if f["method"] == m and f["variant"] == v]
    rows = [_mean_row(pick("base", "base"), method="base", variant="base", top_k=None)]
    for m in methods:
        for v in VARIANTS:
            fs = pick(m, v)
            if not fs:
                continue
            masks = [np.asarray(f["mask"], bool) for f in fs if f["mask"] is not None]
            rows.append(_mean_row(fs, method=m, variant=v, top_k=fs[0]["top_k"], keep_ratio=fs[0]["keep_ratio"],
                                  setting=fs[0]["setting"],
                                  normalized_acc=float(np.mean([f["normalized_acc"] for f in fs])),
                                  coverage=fs[0]["coverage"], **({"masks": distinct_masks(masks)} if masks else {})))
    ran = [m for m in methods if all(pick(m, v) for v in VARIANTS)]
    for other in ("plain", "first_layers", "random"):
        diffs = {metric: {m: (_by_subset(pick(m, "lwptv"), metric), _by_subset(pick(m, other), metric)) for m in ran}
                 for metric in ("ood_acc", "id_acc")}
        for m in [*ran, "mean"] if ran else []:
            row = {"method": m if m != "mean" else f"mean of {len(ran)} methods", "variant": f"lwptv - {other}"}
            for metric, per in diffs.items():
                if m == "mean":  # over the subsets every method ran
                    common = set.intersection(*(set(per[x][0]) for x in ran))
                    a, b = ({k: float(np.mean([per[x][i][k] for x in ran])) for k in common} for i in (0, 1))
                else:
                    a, b = per[m]
                d = stats.paired_difference(a, b)
                pre = "" if metric == "ood_acc" else "id_"
                row.update({metric: d["diff"], f"{pre}ci_low": d["ci_low"], f"{pre}ci_high": d["ci_high"]})
                row["subsets"] = d["folds"]
                row["seeds"] = len({f["seed"] for x in (ran if m == "mean" else [m]) for f in pick(x, other)})
            lw = None if m == "mean" else pick(m, "lwptv")[0]
            row["top_k"], row["keep_ratio"] = (None, None) if lw is None else (lw["top_k"], lw["keep_ratio"])
            rows.append(row)
    return [{"suite": "T2", "split": split, "lwptv": r["variant"] == "lwptv", "keep_ratio": None,
             "score": SCORE if r["variant"] == "lwptv" else None, "heldout_acc": r.get("ood_acc"), "no_expert_acc": None,
             **r} for r in rows]


def complete(folds: Sequence[dict], method: str) -> set[tuple]:
    """The subsets on which ``method`` has every variant (and every random seed)."""
    return controls.complete(folds, method, lambda f: tuple(f["subset"]))


def report(methods: Sequence[str], overwrite: bool, partial: bool = False) -> list[dict]:
    """Rows of the test folds; with ``partial``, each method on the subsets it completed only."""
    folds = [f for f in _load(FOLDS) if f["split"] == "test"]
    if not folds:
        raise FileNotFoundError(f"no test folds in {FOLDS}.json: run `python -m experiments.study_t2_lwptv test` first")
    n = len({tuple(f["subset"]) for f in folds if f["method"] == "base"})
    done = {m: complete(folds, m) for m in methods}
    short = [f"{m}: {len(done[m])} of {n} subsets" for m in methods if len(done[m]) != n]
    if short and not partial:
        raise ValueError(f"incomplete test folds ({'; '.join(short)}): rerun `python -m experiments.study_t2_lwptv "
                         "test`, or report them with --partial")
    methods = [m for m in methods if done[m]]
    folds = [f for f in folds if f["method"] == "base" or tuple(f["subset"]) in done.get(f["method"], ())]
    rows = aggregate(folds, methods)
    v = verdict(rows)
    notes = (f"Suite T v2, test split (200 examples per task), read once per merge. {SUBSETS} seeded "
             f"{SUBSET_SIZE}-task subsets (seed {SUBSET_SEED}); ID = accuracy on the merged tasks, OOD = accuracy "
             f"on the 4 held-out tasks, both through the shared frozen zero-shot heads (points). LwPTV: score {SCORE}, "
             f"top-k of the 7 layers chosen per method on its own validation folds ({VALIDATION}.json), for the "
             f"methods that pass their OOD entry criterion there. Controls at the same k: "
             f"first_layers (every task drops the first 7-k layers), random (per-task uniform masks, seeds "
             f"{list(RANDOM_SEEDS)}). ci_low/ci_high: 95 % percentile-bootstrap CI of the OOD figure, id_ci_*: of "
             f"the ID figure (over folds; for `lwptv - X` rows paired over subsets, random seeds averaged first). "
             f"Targets: {v}. Per-fold rows: `{FOLDS}.json`."
             + (f" PARTIAL: {'; '.join(short)} (rows use the completed subsets only)." if short else ""))
    cols = ["method", "variant", "top_k", "id_acc", "id_ci_low", "id_ci_high", "ood_acc", "ci_low", "ci_high",
            "subsets", "seeds"]
    results.write_rows(STEM, rows, suite="T2", columns=cols, title="LwPTV on Suite T v2 with score-free controls",
                       command=f"python -m experiments.study_t2_lwptv report --methods {' '.join(methods)}"
                       + (" --partial" if partial else ""), notes=notes, overwrite=overwrite)
    for r in rows:
        if "masks" in r:
            _log(f"{r['method']} {r['variant']}: masks {r['masks']}")
    _log(f"targets: {v}")
    return rows


def explore(st: Study, methods: Sequence[str], k: int, seeds: Sequence[int] = RANDOM_SEEDS) -> list[dict]:
    """Validation only, for a study stopped at its gate: each method plain and the three masks
    at a ``k`` fixed beforehand (not selected), as :func:`aggregate`'s rows. Exploratory: no test
    split, and no claim rests on it."""
    st.base_folds("validation")
    for m in methods:
        for names in st.subsets:
            for variant, seed in runs(seeds):
                st.fold("validation", m, variant, None if variant == "plain" else k, seed, names)
    subs = set(st.subsets)
    folds = [f for f in st.folds if f["split"] == "validation" and tuple(f["subset"]) in subs
             and f["top_k"] in (None, k) and f["method"] in ("base", *methods)
             and (f["variant"] != "random" or f["seed"] in seeds)]
    return aggregate(folds, methods, "validation")


def chosen_top_k(path=results.RESULTS_DIR / f"{VALIDATION}.json") -> dict[str, int]:
    """LwPTV's layer count per method chosen on validation by ``validate`` ({} before it ran)."""
    return {m: c["top_k"] for m, c in json.loads(path.read_text())[0]["chosen"].items()} if path.is_file() else {}


def main(argv: Sequence[str] | None = None):
    from experiments import suite_t
    from experiments.suite import build_suite
    from jmerge.cache import enable_compilation_cache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=("validate", "test", "report", "explore"))
    ap.add_argument("--k", type=int, default=4, help="explore: LwPTV's and the controls' kept layers (fixed)")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(RANDOM_SEEDS), help="explore: the random masks' seeds")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="these methods (validate: their plain folds, OOD spreads and, where it passes, k)")
    ap.add_argument("--overwrite", action="store_true", help="replace the stored validation choice / T2 rows")
    ap.add_argument("--partial", action="store_true", help="report: each method on the subsets it completed")
    args = ap.parse_args(argv)
    if args.cmd == "report":
        return report(args.methods, args.overwrite, args.partial)
    criteria.require()
    if args.cmd == "validate":
        results.check_writable(results.RESULTS_DIR, [f"{VALIDATION}.json"], args.overwrite)
    elif args.cmd == "test":
        stored = _load(VALIDATION)
        if not stored:
            raise SystemExit(f"no {VALIDATION}.json: run `python -m experiments.study_t2_lwptv validate` first")
        chosen, entries = stored[0]["chosen"], stored[0]["ood_entry_by_method"]
        failed = [m for m in args.methods if m in entries and not entries[m]["passed"]]
        if failed:
            raise criteria.EntryCriteriaError("; ".join(entry_message(m, entries[m]) for m in failed)
                                              + ": the test split stays unread for them")
        missing = [m for m in args.methods if m not in chosen]
        if missing:
            raise SystemExit(f"no validation choice for {missing}: run `validate --methods {' '.join(missing)}` first")
    enable_compilation_cache(min_compile_seconds=1.0)
    st = Study(build_suite(suite_t.V2, log=_log))
    if args.cmd == "explore":
        rows = explore(st, args.methods, args.k, args.seeds)
        results.write_json(EXPLORE, rows, overwrite=True)
        ci = lambda lo, hi: "-" if lo is None else f"[{lo:.2f}, {hi:.2f}]"
        for r in rows:
            _log(f"{r['method']:18s} {r['variant']:22s} ID {r['id_acc']:7.2f} {ci(r['id_ci_low'], r['id_ci_high'])} "
                 f"OOD {r['ood_acc']:7.2f} {ci(r['ci_low'], r['ci_high'])} {r.get('masks', '')}")
        return rows
    if args.cmd == "validate":
        out = {**validate(st, args.methods),
               "command": f"python -m experiments.study_t2_lwptv validate --methods {' '.join(args.methods)}"}
        results.write_json(VALIDATION, [out], overwrite=args.overwrite)
        if not out["chosen"]:
            raise criteria.EntryCriteriaError("; ".join(entry_message(m, e) for m, e in out["ood_entry_by_method"].items()))
        return out
    test(st, chosen, args.methods)
    return report(args.methods, True)


if __name__ == "__main__":
    main()
