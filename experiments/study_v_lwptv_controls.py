"""LwPTV on Suite V against score-free controls, with paired bootstrap CIs over test examples
(issue 13; LwPTV: arXiv 2506.09093).

Suite V (study config), leave-one-out over its three tasks as in :mod:`experiments.study_lwptv`:
each fold merges two experts; ID = accuracy on their test examples through their own heads, OOD =
linear probes on the held-out task and on digits (the same evaluation as
:meth:`experiments.suite.Suite.rotation`). Each method of :data:`experiments.study_lwptv.METHODS`
(same hyper-parameters) runs at the LwPTV score and keep ratio already chosen for it on validation
by ``python -m experiments.study_lwptv --suite V`` (:func:`chosen_settings`: the ``"V"`` rows of
``lwptv.json``, checked against ``lwptv_v_validation.json``). Nothing is chosen here and only the
test split is read. Variants (:mod:`experiments.lwptv_controls`), at ``k`` = the layers LwPTV's
keep ratio keeps per task (16 of MobileNetV2's 19 at 0.85): ``plain``, ``lwptv``, ``first_layers``
(control a) and ``random`` (control b, seeds :data:`~experiments.lwptv_controls.RANDOM_SEEDS`).

CIs: three folds are too few to resample, so every figure's 95 % CI is a paired percentile
bootstrap over test examples (:func:`experiments.stats.paired_example_bootstrap`, :data:`RESAMPLES`
resamples, seed :data:`BOOTSTRAP_SEED`). A stratum is one (fold, task) pair: a merged task for ID,
a probe task for OOD; strata weigh equally, so the point figures are the means over folds of the
fold means, as in ``lwptv_v.md``. A resample draws each task's test examples once and uses that
draw in every fold that scores them and for both variants of a difference. ``random``'s
per-example correctness is averaged over its seeds first; the mean over methods averages the
per-example differences over methods first. The CIs cover the sampling of test examples only:
not the experts' fine-tuning, the probes' training examples, or the choice made on validation.

Files (``experiments/results/``): folds ``lwptv_v_folds.json`` (one row per method, variant,
seed and fold, with its mask and per-example correctness as 0/1 strings), rows ``"suite":
"V_controls"`` in ``lwptv.json`` (Suite V's own ``"V"`` rows stay) and the table
``lwptv_v_controls.md``.

Run: ``python -m experiments.study_v_lwptv_controls`` (resumable: stored folds are read back),
``--report`` to rewrite the table from the stored folds only.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Sequence

import numpy as np

from experiments import lwptv_controls as controls
from experiments import results, stats
from experiments.study_lwptv import METHODS, choose
from jmerge.lwptv import LwPTV, group, inspect

SPLIT = "test"
LABEL = "V_controls"  # the rows' suite in lwptv.json; table lwptv_v_controls.md
FOLDS = "lwptv_v_folds"
CHOICE_ROWS, CHOICE_GRID = "lwptv", "lwptv_v_validation"  # where study_lwptv --suite V stored its choice
RESAMPLES = stats.EXAMPLE_RESAMPLES
BOOTSTRAP_SEED = 0
DIFFS = ("plain", *controls.CONTROLS)  # lwptv - X


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def chosen_settings(methods: Sequence[str], rows: Sequence[dict], validation: Sequence[dict],
                    tolerance: float = controls.ID_TOLERANCE) -> dict[str, dict]:
    """Each method's LwPTV ``score`` and ``keep_ratio`` as chosen on validation: its ``"V"`` row
    with LwPTV in ``rows`` (``lwptv.json``), checked against the choice rule
    (:func:`experiments.study_lwptv.choose`, ID ``tolerance``) re-applied to its validation rows."""
    out = {}
    for m in methods:
        picked = [r for r in rows if r.get("suite") == "V" and r.get("method") == m and r.get("lwptv")]
        if len(picked) != 1:
            raise ValueError(f"no validation choice for Suite V method {m!r}: {CHOICE_ROWS}.json holds {len(picked)} "
                             f"Suite V rows of {m} with LwPTV (need 1); run `python -m experiments.study_lwptv "
                             f"--suite V` first")
        val = [r for r in validation if r.get("method") == m]
        plain, tried = [r for r in val if not r["lwptv"]], [r for r in val if r["lwptv"]]
        if len(plain) != 1 or not tried:
            raise ValueError(f"no validation grid for Suite V method {m!r} in {CHOICE_GRID}.json (plain rows: "
                             f"{len(plain)}, LwPTV rows: {len(tried)})")
        best = choose(plain[0], tried, tolerance)
        got = {"score": picked[0]["score"], "keep_ratio": picked[0]["keep_ratio"]}
        if (best["score"], best["keep_ratio"]) != (got["score"], got["keep_ratio"]):
            raise ValueError(f"Suite V method {m!r}: {CHOICE_ROWS}.json ran {got} but its validation grid chooses "
                             f"score {best['score']!r}, keep ratio {best['keep_ratio']}")
        out[m] = got
    return out


def _bits(correct) -> str:
    return "".join("1" if c else "0" for c in np.asarray(correct, bool))


def _unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), np.uint8) - ord("0")


def _key(f: dict) -> tuple:
    return f["method"], f["variant"], f["seed"], tuple(f["held_out"])


class Study:
    """The built suite, its layer grouping, the methods' chosen settings and the stored folds."""

    def __init__(self, s, chosen: dict[str, dict]):
        self.s, self.chosen = s, chosen
        self.grouping = group(s.base, s.config.layers)
        self.folds = results.load_folds(FOLDS)

    def k(self, method: str) -> int:
        return controls.kept_layers(self.chosen[method]["keep_ratio"], self.grouping.num_layers)

    def mask(self, method: str, variant: str, seed: int, names: tuple[str, ...]) -> np.ndarray | None:
        """The ``(K, L)`` mask of ``variant`` when merging ``names`` (None for ``plain``)."""
        if variant == "plain":
            return None
        k, L = self.k(method), self.grouping.num_layers
        if variant == "lwptv":
            c = self.chosen[method]
            _, m = inspect(self.s.base, self.s.experts_for(names),
                           LwPTV(layers=self.s.config.layers, score=c["score"], rule="keep_ratio",
                                 value=c["keep_ratio"], task_names=names))
            if not (m.mask.sum(axis=1) == k).all():
                raise AssertionError(f"LwPTV kept {m.mask.sum(axis=1).tolist()} layers, expected {k} per task")
            return m.mask
        if variant in controls.CONTROLS:
            return controls.control_mask(variant, len(names), L, k, seed, [self.s.names.index(n) for n in names])
        raise ValueError(f"unknown variant {variant!r} (variants: {', '.join(controls.VARIANTS)})")

    def fold(self, method: str, variant: str, seed: int, held: tuple[str, ...]) -> dict:
        """One merge (all tasks but ``held``) scored on the test split, stored as soon as it exists
        (or read back when a previous run stored it)."""
        key = (method, variant, seed, tuple(held))
        masked = variant != "plain"
        want = {"keep_ratio": self.chosen[method]["keep_ratio"] if masked else None,
                "score": self.chosen[method]["score"] if variant == "lwptv" else None}
        for f in self.folds:
            if _key(f) == key:
                stale = {k: f[k] for k in want if f[k] != want[k]}
                if stale:
                    raise ValueError(f"{FOLDS}.json holds {method} {variant} seed {seed} held out {','.join(held)} "
                                     f"run at {stale}, this run asks {want}: remove those folds to rerun them")
                return f
        names = tuple(n for n in self.s.names if n not in held)
        t0 = time.perf_counter()
        mask = self.mask(method, variant, seed, names)
        merged = controls.merge(self.s.base, self.s.experts_for(names), method, METHODS[method], mask,
                                self.grouping.names, names, self.s.config.layers)
        t1 = time.perf_counter()
        ood_tasks = self.s.config.ood_tasks
        res = self.s.evaluate(merged, SPLIT, names, tuple(held) + ood_tasks, per_example=True)
        f = {"suite": "V", "split": SPLIT, "method": method, "variant": variant, "seed": seed, "held_out": list(held),
             "merged": list(names), **want,
             "top_k": self.k(method) if masked else None, "layers": self.grouping.num_layers,
             "mask": None if mask is None else [_bits(r) for r in mask], "setting": METHODS[method],
             "id": res["id"], "ood": res["ood"], "id_acc": res["id_acc"], "ood_acc": res["ood_acc"],
             "heldout_acc": float(np.mean([res["ood"][t] for t in held])),
             "no_expert_acc": float(np.mean([res["ood"][t] for t in ood_tasks])),
             "id_correct": {t: _bits(c) for t, c in res["id_correct"].items()},
             "ood_correct": {t: _bits(c) for t, c in res["ood_correct"].items()},
             "merge_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1}
        _log(f"  {method:16s} {variant:12s} seed {seed} held out {','.join(held):14s} ID {f['id_acc']:6.2f} "
             f"OOD {f['ood_acc']:6.2f} ({t1 - t0:.0f} + {f['eval_seconds']:.0f} s)")
        results.save_folds(FOLDS, [f], _key)
        self.folds = [g for g in self.folds if _key(g) != key] + [f]
        return f

    def run(self, methods: Sequence[str]) -> None:
        """Every variant of ``methods`` on every leave-one-out fold, method by method."""
        for m in methods:
            for variant, seed in controls.runs():
                for held in itertools.combinations(self.s.names, 1):
                    self.fold(m, variant, seed, held)


# ---- aggregation: per-example correctness -> rows with paired CIs -------------------------------------------------

def per_example(folds: Sequence[dict]) -> dict[str, dict[tuple, np.ndarray]]:
    """``{"id": {(held_out, task): correctness}, "ood": ...}`` of one method's variant (0/1, or
    the mean over seeds when ``folds`` hold several)."""
    out: dict = {"id": {}, "ood": {}}
    for kind in out:
        by: dict = {}
        for f in folds:
            for t, bits in f[f"{kind}_correct"].items():
                by.setdefault((tuple(f["held_out"]), t), []).append(_unbits(bits))
        bad = sorted(str(s) for s, v in by.items() if len({len(x) for x in v}) != 1)
        if bad:
            raise ValueError(f"strata {bad} have correctness strings of different lengths across seeds")
        out[kind] = {s: np.mean(v, axis=0) for s, v in by.items()}
    return out


def _ci(a: dict, b: dict | None) -> dict:
    """Paired bootstrap of ``100 * (a - b)`` (``b`` None: of ``a`` alone) over the strata of ``a``,
    each task's examples drawn once per resample."""
    b = {s: np.zeros_like(v) for s, v in a.items()} if b is None else b
    scale = lambda d: {s: 100.0 * np.asarray(v, np.float64) for s, v in d.items()}
    return stats.paired_example_bootstrap(scale(a), scale(b), shared={s: s[1] for s in a}, resamples=RESAMPLES,
                                          seed=BOOTSTRAP_SEED)


def _ood_part(ex: dict, ood_tasks: Sequence[str], no_expert: bool) -> float:
    """Mean accuracy (points) over the OOD strata of the no-expert tasks (or of the held-out tasks)."""
    return float(np.mean([100 * v.mean() for s, v in ex["ood"].items() if (s[1] in ood_tasks) == no_expert]))


def _figures(a: dict, b: dict | None, ood_tasks: Sequence[str]) -> dict:
    """ID and OOD (with CIs) of ``a - b`` (or of ``a``), and the OOD's held-out / no-expert parts."""
    ood, idm = _ci(a["ood"], None if b is None else b["ood"]), _ci(a["id"], None if b is None else b["id"])
    part = lambda no_expert: _ood_part(a, ood_tasks, no_expert) - (0.0 if b is None else
                                                                   _ood_part(b, ood_tasks, no_expert))
    return {"id_acc": idm["diff"], "id_ci_low": idm["ci_low"], "id_ci_high": idm["ci_high"],
            "ood_acc": ood["diff"], "ci_low": ood["ci_low"], "ci_high": ood["ci_high"],
            "heldout_acc": part(False), "no_expert_acc": part(True), "examples_id": idm["examples"],
            "examples_ood": ood["examples"]}


def _mean_over(exs: Sequence[dict]) -> dict:
    """Per-example values averaged over methods (every method scores the same strata)."""
    keys = [set(e[k]) for e in exs for k in ("id", "ood")]
    if any(k != keys[i % 2] for i, k in enumerate(keys)):
        raise ValueError("methods differ in their folds or tasks: the mean over methods needs the same strata")
    return {k: {s: np.mean([e[k][s] for e in exs], axis=0) for s in exs[0][k]} for k in ("id", "ood")}


def missing(folds: Sequence[dict], method: str, held_outs: Sequence[tuple]) -> list[str]:
    """The ``variant seed held-out`` merges ``method`` lacks."""
    have = {(f["variant"], f["seed"], tuple(f["held_out"])) for f in folds if f["method"] == method}
    return [f"{v} seed {s} held out {','.join(h)}" for v, s in controls.runs() for h in held_outs
            if (v, s, tuple(h)) not in have]


def aggregate(folds: Sequence[dict], methods: Sequence[str], ood_tasks: Sequence[str]) -> list[dict]:
    """Rows: per method and for the mean over ``methods``, each variant's ID and OOD (CIs over
    test examples, distinct masks) and the paired differences ``lwptv - plain``, ``lwptv -
    first_layers``, ``lwptv - random``. Every method needs every variant on every fold."""
    held_outs = sorted({tuple(f["held_out"]) for f in folds})
    short = {m: missing(folds, m, held_outs) for m in methods}
    short = {m: v for m, v in short.items() if v}
    if short:
        raise ValueError("incomplete folds: " + "; ".join(f"{m} lacks {', '.join(v[:3])}"
                                                           + (f" and {len(v) - 3} more" if len(v) > 3 else "")
                                                           for m, v in short.items()))
    pick = lambda m, v: [f for f in folds if f["method"] == m and f["variant"] == v]
    ex = {(m, v): per_example(pick(m, v)) for m in methods for v in controls.VARIANTS}
    mean_name = f"mean of {len(methods)} methods"
    rows = []
    for m in [*methods, mean_name]:
        one = m != mean_name
        get = (lambda v: ex[m, v]) if one else (lambda v: _mean_over([ex[x, v] for x in methods]))
        lw = pick(m, "lwptv")[0] if one else {"top_k": None, "keep_ratio": None, "score": None}
        for v in controls.VARIANTS:
            fs = pick(m, v) if one else [f for x in methods for f in pick(x, v)]
            masks = [np.array([list(map(int, r)) for r in f["mask"]], bool) for f in fs if f["mask"] is not None]
            counts = controls.distinct_masks(masks) if masks else None
            rows.append({"method": m, "variant": v, **_figures(get(v), None, ood_tasks),
                         "top_k": None if v == "plain" else lw["top_k"],
                         "keep_ratio": None if v == "plain" else lw["keep_ratio"],
                         "score": lw["score"] if v == "lwptv" else None,
                         "setting": fs[0]["setting"] if one else None,
                         "seeds": len({f["seed"] for f in fs}), "subsets": len(held_outs),
                         **({"masks": counts, "distinct_masks": counts["distinct"], "task_masks": counts["task_masks"]}
                            if counts else {})})
        for other in DIFFS:
            fs = pick(m, other) if one else [f for x in methods for f in pick(x, other)]
            rows.append({"method": m, "variant": f"lwptv - {other}", **_figures(get("lwptv"), get(other), ood_tasks),
                         "top_k": lw["top_k"], "keep_ratio": lw["keep_ratio"], "score": None, "seeds": len({f["seed"] for f in fs}), "subsets": len(held_outs)})
    return [{"suite": LABEL, "split": SPLIT, "lwptv": r["variant"] == "lwptv", "ci_over": "test examples",
             "resamples": RESAMPLES, **r} for r in rows]


def reproduction(rows: Sequence[dict], stored: Sequence[dict]) -> str:
    """How far this study's ``plain`` and ``lwptv`` rows are from the single-run ``"V"`` rows of
    ``lwptv.json`` (the same merges and evaluation; equal when the cached experts are the same)."""
    gaps = []
    for r in rows:
        if r["variant"] in ("plain", "lwptv") and not r["method"].startswith("mean of"):
            old = [s for s in stored if s.get("suite") == "V" and s["method"] == r["method"]
                   and s["lwptv"] == (r["variant"] == "lwptv")]
            if old:
                gaps += [abs(r["id_acc"] - old[0]["id_acc"]), abs(r["ood_acc"] - old[0]["ood_acc"])]
    return ("no stored Suite V rows to compare" if not gaps else
            f"largest |difference| of the plain and lwptv ID/OOD figures from lwptv_v.md's single run: "
            f"{max(gaps):.2f} points over {len(gaps)} figures")


def report(methods: Sequence[str], ood_tasks: Sequence[str], command: str) -> list[dict]:
    """Writes the rows (``lwptv.json``, suite :data:`LABEL`) and ``lwptv_v_controls.md`` from the stored folds."""
    folds = [f for f in results.load_folds(FOLDS) if f["split"] == SPLIT]
    if not folds:
        raise FileNotFoundError(f"no folds in {FOLDS}.json: run `python -m experiments.study_v_lwptv_controls` first")
    rows = aggregate(folds, methods, ood_tasks)
    v = controls.verdict(rows)
    lw = [f for f in folds if f["variant"] == "lwptv"]
    k = sorted({(f["top_k"], f["layers"]) for f in lw})
    notes = (f"Suite V (study config), test split read once per merge; leave-one-out over the 3 tasks (each fold "
             f"merges 2 experts). ID = accuracy on the merged tasks' test examples through their own heads; OOD = "
             f"linear probes on the held-out task and on {', '.join(ood_tasks)} (points; heldout_acc / no_expert_acc "
             f"are its two parts). LwPTV's score and keep ratio per method as chosen on validation by "
             f"`python -m experiments.study_lwptv --suite V` (lwptv_v.md), not re-tuned; kept layers per task k "
             f"(of L) = {', '.join(f'{a} of {b}' for a, b in k)}. Controls at the same k: first_layers (every task "
             f"drops the first L-k layers), random (per-task uniform masks, seeds {list(controls.RANDOM_SEEDS)}; "
             f"correctness averaged over seeds). CIs (ci_low/ci_high: OOD, id_ci_*: ID): 95 % paired percentile "
             f"bootstrap over test examples, {RESAMPLES} resamples, stratified per (fold, task), one draw per task "
             f"shared by the folds that score it and by both variants of a difference; mean rows average the "
             f"per-example values over methods first. They cover test-example sampling only (not fine-tuning, "
             f"probe training or the validation choice). distinct_masks / task_masks: distinct per-task mask rows "
             f"among all of the variant's merges. Targets (mean over methods, ID loss <= {controls.ID_TOLERANCE}): "
             f"{v}. {reproduction(rows, results.load_folds(CHOICE_ROWS))}. Per-fold rows: `{FOLDS}.json`.")
    left = [m for m in METHODS if m not in methods]
    if left:
        notes = (f"PARTIAL: {len(methods)} of the {len(METHODS)} methods ({', '.join(methods)}); not in this table: "
                 f"{', '.join(left)}. ") + notes
    cols = ["method", "variant", "top_k", "id_acc", "id_ci_low", "id_ci_high", "ood_acc", "ci_low", "ci_high",
            "heldout_acc", "no_expert_acc", "seeds", "distinct_masks", "task_masks"]
    results.write_rows(CHOICE_ROWS, rows, suite=LABEL, columns=cols, command=command, notes=notes, overwrite=True,
                       title="LwPTV on Suite V with score-free controls and per-example paired CIs (test split)")
    _log(notes)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from experiments import suite_v
    from experiments.suite import build_suite
    from jmerge.cache import enable_compilation_cache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--report", action="store_true", help="only rewrite the rows and table from the stored folds")
    args = ap.parse_args(argv)
    command = "python -m experiments.study_v_lwptv_controls" + (" --report" if args.report else "") + (
        "" if list(args.methods) == list(METHODS) else " --methods " + " ".join(args.methods))
    if not args.report:
        chosen = chosen_settings(args.methods, results.load_folds(CHOICE_ROWS), results.load_folds(CHOICE_GRID))
        for m, c in chosen.items():
            _log(f"{m}: LwPTV {c['score']}, keep ratio {c['keep_ratio']} (chosen on validation)")
        enable_compilation_cache(min_compile_seconds=1.0)
        t0 = time.perf_counter()
        st = Study(build_suite(suite_v.STUDY, log=_log), chosen)
        st.run(args.methods)
        _log(f"folds done in {time.perf_counter() - t0:.0f} s")
    return report(args.methods, suite_v.OOD_TASKS, command)


if __name__ == "__main__":
    main()
