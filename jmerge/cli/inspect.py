"""``jmerge inspect BASE EXPERT...``: task-vector norms and cosines (:mod:`jmerge.similarity`),
with ``--layers`` the per-layer LwPTV saliency and masks, with ``--png`` the figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from jmerge.cli._output import console, progress

EXAMPLES = """\
examples:
  jmerge inspect ./base ./math-ft ./code-ft                 # task-vector norms and cosines
  jmerge inspect ./base ./math-ft ./code-ft --layers gpt2 --png tv.png
                                                            # + per-layer LwPTV saliency and masks
"""


def add_parser(sub, fmt) -> None:
    ins = sub.add_parser(
        "inspect",
        help="task-vector norms, cosines, per-layer saliency and masks",
        description="Task vectors tau_t = expert_t - base: their norms and pairwise cosines (streamed), "
        "and with --layers the per-layer LwPTV saliency scores and keep/drop masks (in memory).",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    ins.add_argument("base", type=Path, metavar="BASE")
    ins.add_argument("experts", type=Path, nargs="+", metavar="EXPERT")
    ins.add_argument("--layers", help="layer grouping: a preset (bert, gpt2, llama, vit, clip) or a regex")
    ins.add_argument("--score", default="trim_survival", help="LwPTV saliency score (default: %(default)s)")
    ins.add_argument("--rule", default="keep_ratio", help="LwPTV mask rule (default: %(default)s)")
    ins.add_argument("--value", type=float, default=0.8, help="the rule's value (default: %(default)s)")
    ins.add_argument("--png", type=Path, help="write the figures (cosines/norms; with --layers, saliency too)")
    ins.add_argument("--force", action="store_true", help="overwrite existing PNG files")
    ins.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from jmerge import similarity
    from jmerge.io import hf_dir
    from jmerge.io import safetensors_io as st

    out = console(stdout=True)
    base = st.open_checkpoint(args.base)
    experts = [st.open_checkpoint(e) for e in args.experts]
    for i, e in enumerate(experts):
        st.check_compatible(base, e, f"expert {i} ({e.path})")
    names = [_short(e.path) for e in experts]
    if args.png is not None:
        hf_dir.refuse_existing(args.png, args.force, "pass --force")
    with progress(False) as bar:
        task = bar.add_task("task vectors", total=len(base.tensors))
        norms, gram = similarity.task_vector_stats(base, experts, lambda phase, name: bar.update(task, advance=1))
    cos = similarity.cosines(norms, gram)

    table = Table(title=f"task vectors (base {_short(base.path)})")
    table.add_column("expert")
    table.add_column("||tau||", justify="right")
    for n in names:
        table.add_column(f"cos({n})", justify="right")
    for i, n in enumerate(names):
        table.add_row(n, f"{norms[i]:.4g}", *(f"{cos[i, j]:+.3f}" for j in range(len(names))))
    out.print(table)

    scores = mask = None
    if args.layers:
        import jmerge.lwptv as lwptv
        from jmerge import streaming

        b, es = streaming.read_floats(base, experts)  # the merge's own dtype rule
        value = int(args.value) if args.rule == "top_k" else args.value
        scores, mask = lwptv.inspect(
            b, es, layers=args.layers, score=args.score, rule=args.rule, value=value, task_names=tuple(names)
        )
        out.print(f"LwPTV saliency ({args.score}) and mask ({args.rule} {value}):")
        out.print(lwptv.table(mask.layer_names, mask.task_names, scores=scores, mask=mask.mask), soft_wrap=True)
    if args.png is not None:
        from jmerge import plot

        plot.overview(args.png, names, norms, cos)
        out.print(f"wrote {args.png}")
        if scores is not None:
            import jmerge.lwptv as lwptv

            png = args.png.with_name(f"{args.png.stem}-lwptv{args.png.suffix}")
            lwptv.plot_scores(scores, mask.layer_names, mask.task_names, png, mask=mask, overwrite=args.force)
            out.print(f"wrote {png}")
    return 0


def _short(path: Path) -> str:
    return Path(path).name or str(path)
