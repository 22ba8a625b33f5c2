"""Study (a): data-free merge methods with and without LwPTV, ID vs OOD, on Suite T or V.

For each base method (task arithmetic, TIES, DARE-TIES, TSV-M, Iso-CTS at their published
defaults) the study runs a leave-one-out rotation (:meth:`experiments.suite.Suite.rotation`):
each fold merges all experts but one, scores the merged encoder on their tasks with their
own heads (ID) and by a linear probe on the held-out task and on the suite's OOD task, which
has no expert (WordNet adjective type for T, scikit-learn digits for V). ``ood_acc``
averages the two probes over folds on the test split; on validation it is the held-out
probe alone.

LwPTV's score and keep ratio are chosen per method on the validation split only, from
``--scores`` x ``--ratios`` (per-task keep ratio over the base's layers: MiniLM's embeddings
and 6 blocks; MobileNetV2's stem, 17 blocks and last conv): the choice maximises validation
OOD among the settings whose validation ID stays within ``--id-tolerance`` points of the
method without LwPTV (if none does, the best ID + OOD). The test split is then read once,
for the method with and without its chosen LwPTV.

Writes ``experiments/results/lwptv.json`` (rows of every suite) and, for suite T,
``lwptv.{md,png}``, ``lwptv_validation.json`` (every setting tried) and ``lwptv_scores.png``
(the chosen score and mask of an all-task TIES merge); suite V's files end in ``_v``.

Run: ``python -m experiments.study_lwptv [--suite V]`` (experts are fine-tuned once, then cached).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from typing import Sequence

import jax
import numpy as np

import jmerge
from jmerge import coverage
from jmerge.cache import enable_compilation_cache
from experiments import results, suite
from jmerge.lwptv import LwPTV, group, inspect, plot_scores

METHODS = {  # name -> hyper-parameters (the published defaults of papers.md §3)
    "task_arithmetic": {"scale": 0.3},
    "ties": {},
    "dare_ties": {"key": 0},
    "tsv": {},
    "iso_cts": {},
}
SCORES = ("trim_survival", "relative_update")
RATIOS = (0.85,)  # Suite T: 6 of the 7 layers kept per task; --ratios 0.6 0.85 adds 4 of 7 (see README)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _merge(s, method: str, lwptv: LwPTV | None, names: tuple[str, ...]):
    hp = dict(METHODS[method])
    if "key" in hp:
        hp["key"] = jax.random.key(hp["key"])
    if lwptv is not None:
        hp["lwptv"] = LwPTV(layers=lwptv.layers, score=lwptv.score, value=lwptv.value, task_names=names)
    return jmerge.merge(s.base, s.experts_for(names), method, **hp)


def _row(s, method: str, setting: LwPTV | None, res: dict, seconds: float) -> dict:
    """One table row from a rotation result; OOD averages every (fold, probe task) pair."""
    ood = float(np.mean([np.mean(list(f["ood"].values())) for f in res["folds"]]))
    return {"suite": s.config.name, "method": method, "lwptv": setting is not None,
            "score": setting.score if setting else None, "keep_ratio": setting.value if setting else None,
            "id_acc": res["id_acc"], "normalized_acc": res["normalized_acc"], "ood_acc": ood,
            "heldout_acc": res["heldout_acc"], "no_expert_acc": res["ood_acc"], "seconds": seconds,
            "coverage": coverage.of(method, s.base, METHODS[method]).fraction}


def _evaluate(s, method: str, setting: LwPTV | None, split: str) -> dict:
    t0 = time.perf_counter()
    # Validation scores the held-out task only (WordNet adj is near its ceiling and costs a third).
    res = s.rotation(partial(_merge, s, method, setting), k=1, split=split, ood_tasks=split == "test")
    row = _row(s, method, setting, res, time.perf_counter() - t0)
    nox = "-" if row["no_expert_acc"] is None else f"{row['no_expert_acc']:.2f}"
    _log(f"  {split:10s} {method:16s} {_label(setting):34s} ID {row['id_acc']:6.2f}  OOD {row['ood_acc']:6.2f} "
         f"(held-out {row['heldout_acc']:.2f}, no-expert task {nox})  {row['seconds']:.0f} s")
    return row


def _label(setting: LwPTV | None) -> str:
    return "-" if setting is None else f"{setting.score} keep {setting.value}"


def choose(plain: dict, tried: Sequence[dict], tolerance: float) -> dict:
    """The validation row with the best OOD whose ID is within ``tolerance`` of ``plain``'s
    (else the best ID + OOD)."""
    ok = [r for r in tried if r["id_acc"] >= plain["id_acc"] - tolerance]
    return max(ok, key=lambda r: r["ood_acc"]) if ok else max(tried, key=lambda r: r["id_acc"] + r["ood_acc"])


def plot(rows: Sequence[dict], path, suite_name: str, ood_tasks: Sequence[str]) -> None:
    """ID vs OOD, one arrow per method from without to with LwPTV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        off, on = (next(r for r in rows if r["method"] == method and r["lwptv"] == flag) for flag in (False, True))
        color = f"C{i}"
        ax.annotate("", (on["ood_acc"], on["id_acc"]), (off["ood_acc"], off["id_acc"]),
                    arrowprops={"arrowstyle": "->", "color": color})
        ax.scatter([off["ood_acc"]], [off["id_acc"]], color=color, marker="o", label=method)
        ax.scatter([on["ood_acc"]], [on["id_acc"]], color=color, marker="*", s=90)
    ax.set_xlabel(f"OOD accuracy % (probe: held-out task, {', '.join(ood_tasks)})")
    ax.set_ylabel("ID accuracy % (merged tasks, own heads)")
    ax.set_title(f"Suite {suite_name}, test split: o without LwPTV, * with LwPTV")
    ax.legend(fontsize=8)
    fig.tight_layout()
    results.save_figure(fig, path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=("T", "V"), default="T")
    ap.add_argument("--config", default="study", help="a config of the suite (default: study)")
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    ap.add_argument("--scores", nargs="+", default=list(SCORES))
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--id-tolerance", type=float, default=0.5)
    ap.add_argument("--out", default=str(results.RESULTS_DIR))
    ap.add_argument("--overwrite", action="store_true", help="replace existing result files")
    args = ap.parse_args(argv)
    configs = suite.configs(args.suite)
    if args.config not in configs:
        ap.error(f"suite {args.suite} has no config {args.config!r} (choose from {', '.join(configs)})")
    config = configs[args.config]
    stem = results.suite_stem("lwptv", args.suite)
    results.check_study_writable(args.out, "lwptv", args.suite, [".md", ".png", "_validation.json", "_scores.png"],
                                 args.overwrite)
    enable_compilation_cache(min_compile_seconds=1.0)

    t0 = time.perf_counter()
    s = suite.build_suite(config, log=_log)
    grid = [LwPTV(layers=config.layers, score=sc, value=r) for sc in args.scores for r in args.ratios]
    validation, rows = [], []
    for method in args.methods:
        _log(f"{method}: choosing the LwPTV setting on validation")
        plain = _evaluate(s, method, None, "validation")
        tried = [_evaluate(s, method, g, "validation") for g in grid]
        validation += [plain, *tried]
        best = choose(plain, tried, args.id_tolerance)
        setting = LwPTV(layers=config.layers, score=best["score"], value=best["keep_ratio"])
        rows += [_evaluate(s, method, None, "test"), _evaluate(s, method, setting, "test")]

    mean = lambda flag, key: float(np.mean([r[key] for r in rows if r["lwptv"] == flag]))
    d_ood, d_id = mean(True, "ood_acc") - mean(False, "ood_acc"), mean(True, "id_acc") - mean(False, "id_acc")
    n_layers = group(s.base, config.layers).num_layers
    command = "python -m experiments.study_lwptv " + " ".join(argv if argv is not None else sys.argv[1:])
    notes = (f"Suite {args.suite} ({args.config} config: {config.validation_size} validation / {config.test_size} "
             f"test examples per task, probes fit on {config.probe_train}), leave-one-out over the "
             f"{len(s.names)} ID tasks; no-expert OOD task: {', '.join(config.ood_tasks)}. "
             f"LwPTV layers: `{config.layers}` ({n_layers} layers); score and keep ratio chosen per method on "
             f"validation (OOD max with ID within {args.id_tolerance} pt), test read once. "
             f"Mean over methods, test: OOD {d_ood:+.2f} pt, ID {d_id:+.2f} pt with LwPTV. "
             f"Total {time.perf_counter() - t0:.0f} s.")
    cols = ["suite", "method", "lwptv", "score", "keep_ratio", "id_acc", "normalized_acc", "ood_acc",
            "heldout_acc", "no_expert_acc"]
    results.write_rows("lwptv", rows, suite=args.suite, columns=cols, command=command, notes=notes,
                       title=f"LwPTV on Suite {args.suite}: ID vs OOD (test split)", directory=args.out,
                       overwrite=args.overwrite)
    results.write_json(f"{stem}_validation", validation, directory=args.out, overwrite=args.overwrite)
    plot(rows, f"{args.out}/{stem}.png", args.suite, config.ood_tasks)
    _plot_chosen_mask(s, rows, f"{args.out}/{stem}_scores.png")
    _log(notes)
    return rows


def _plot_chosen_mask(s, rows: Sequence[dict], path) -> None:
    """Scores and mask of the setting chosen for TIES (or the first method), on all the experts."""
    row = next((r for r in rows if r["lwptv"] and r["method"] == "ties"), next(r for r in rows if r["lwptv"]))
    setting = LwPTV(layers=s.config.layers, score=row["score"], value=row["keep_ratio"], task_names=s.names)
    scores, mask = inspect(s.base, s.experts_for(s.names), setting)
    _log(str(mask))
    plot_scores(scores, mask.layer_names, mask.task_names, path, mask=mask, overwrite=True,
                title=f"LwPTV {row['score']} (keep {row['keep_ratio']}): x = layer pruned")


if __name__ == "__main__":
    main()
