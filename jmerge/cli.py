"""The ``jmerge`` command line: ``run`` a YAML merge, ``convert`` checkpoints, ``inspect`` task vectors.

``main(argv)`` returns the exit status (0 success, 2 bad input, 130 interrupted), so tests
call it in-process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from jmerge.io import safetensors_io as st

EXAMPLES_RUN = """\
examples:
  jmerge run ties.yaml ./merged                 # merge as the YAML says, into ./merged
  jmerge run ties.yaml ./merged --force         # replace ./merged once the new one is complete
  jmerge run ta.yaml ./merged --shard-size 2GB --out-dtype bfloat16
  jmerge run ta.yaml merged.gguf --out-format gguf --quant q8_0   # models may be .gguf files too

config (mergekit's format; jmerge's own keys under `jmerge:`):
  models:
    - model: ./math-ft
      parameters: {weight: 1.0, density: 0.2}
    - model: ./code-ft
      parameters: {weight: 1.0, density: 0.2}
  base_model: ./base
  merge_method: ties          # mergekit names or any jmerge method (`jmerge methods`)
  parameters: {lambda: 1.0}
  dtype: float32
  jmerge: {trim: global}      # the TIES paper's global trim (mergekit trims per tensor)
"""

EXAMPLES_CONVERT = """\
examples:
  jmerge convert ./flax-model ./pt-model        # flax_model.msgpack -> PyTorch-layout safetensors
  jmerge convert ./pt-model ./flax-model        # model.safetensors(.index.json) -> flax_model.msgpack
  jmerge convert ./pt-model ./resharded --to safetensors --shard-size 1GB --dtype bfloat16
  jmerge convert model.gguf ./hf-model           # llama.cpp GGUF -> HF Llama directory (float32)
  jmerge convert ./hf-model out.gguf --quant q8_0   # f32, f16, bf16, q8_0, q4_0, q4_1
"""

EXAMPLES_INSPECT = """\
examples:
  jmerge inspect ./base ./math-ft ./code-ft                 # task-vector norms and cosines
  jmerge inspect ./base ./math-ft ./code-ft --layers gpt2 --png tv.png
                                                            # + per-layer LwPTV saliency and masks
"""


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="jmerge",
        formatter_class=fmt,
        description="Merge fine-tuned models of one base model (task arithmetic, TIES, DARE, SLERP, "
        "SVD merges, LwPTV, ...) on CPU, GPU or TPU, streaming tensors from disk.",
        epilog="Run `jmerge COMMAND --help` for a command's options and examples.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="merge models as a YAML config says",
        description="Merge the models of CONFIG (mergekit's YAML format plus `jmerge:` keys) into the "
        "Hugging Face directory OUT_DIR: sharded safetensors, the base's config and tokenizer, a model "
        "card with the config. The config and every input header are checked before any tensor is "
        "read; OUT_DIR appears only once complete.",
        epilog=EXAMPLES_RUN,
        formatter_class=fmt,
    )
    run.add_argument("config", type=Path, metavar="CONFIG.yaml")
    run.add_argument("out", type=Path, metavar="OUT_DIR")
    run.add_argument("--force", action="store_true", help="replace an existing OUT_DIR (after the new one is complete)")
    run.add_argument("--shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB (default: %(default)s)")
    run.add_argument("--out-dtype", choices=("float32", "float16", "bfloat16"), help="output dtype (overrides the config)")
    run.add_argument("--seed", type=int, help="PRNG seed of DARE/DELLA (overrides jmerge.seed)")
    run.add_argument("--in-memory", action="store_true", help="load whole models instead of streaming tensor by tensor")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--out-format", choices=("hf", "gguf"), default="hf", help="HF directory or one GGUF file (default: %(default)s)")
    run.add_argument("--quant", help="GGUF output type: f32, f16, bf16, q8_0, q4_0, q4_1 (default: f32)")
    run.set_defaults(func=cmd_run)

    conv = sub.add_parser(
        "convert",
        help="convert between Flax msgpack and PyTorch-layout safetensors",
        description="Convert a checkpoint (HF directory or file) between flax_model.msgpack and "
        "PyTorch-layout safetensors (kernels transposed, LayerNorm scale <-> weight, ...). "
        "config.json and tokenizer files are copied.",
        epilog=EXAMPLES_CONVERT,
        formatter_class=fmt,
    )
    conv.add_argument("src", type=Path, metavar="IN")
    conv.add_argument("dst", type=Path, metavar="OUT")
    conv.add_argument("--to", choices=("flax", "safetensors"), help="target format (default: the other one)")
    conv.add_argument("--model-type", help="config.json model_type, for PyTorch -> Flax names (default: read config.json)")
    conv.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast float tensors")
    conv.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default: %(default)s)")
    conv.add_argument("--quant", help="GGUF output type (OUT ending in .gguf): f32, f16, bf16, q8_0, q4_0, q4_1")
    conv.add_argument("--force", action="store_true", help="replace an existing OUT")
    conv.set_defaults(func=cmd_convert)

    ins = sub.add_parser(
        "inspect",
        help="task-vector norms, cosines, per-layer saliency and masks",
        description="Task vectors tau_t = expert_t - base: their norms and pairwise cosines (streamed), "
        "and with --layers the per-layer LwPTV saliency scores and keep/drop masks (in memory).",
        epilog=EXAMPLES_INSPECT,
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

    meth = sub.add_parser("methods", help="list merge methods and their hyper-parameters")
    meth.set_defaults(func=cmd_methods)
    return p


def _console(stdout: bool = False):
    """Results go to stdout; progress and errors to stderr."""
    from rich.console import Console

    return Console(stderr=not stdout, highlight=False)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _progress(disable: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=_console(), transient=True, disable=disable,
    )


# ---------------------------------------------------------------------------- run
def cmd_run(args) -> int:
    import jax

    from jmerge import __version__, config, coverage, streaming
    from jmerge.methods import registry

    if args.out_format == "gguf" or args.quant:
        from jmerge.io import gguf as gguf_io

        if args.out_format != "gguf":
            raise ValueError("--quant needs --out-format gguf")
        return gguf_io.run_to_gguf(args, cmd_run)
    start = time.perf_counter()
    plan = config.plan_from_yaml(args.config)
    out_dtype = args.out_dtype or plan.out_dtype
    in_memory = plan.in_memory or args.in_memory
    seed = plan.seed if args.seed is None else args.seed
    key = jax.random.key(seed) if registry.get(plan.method).needs_key else None
    if (args.out.exists() or args.out.is_symlink()) and not args.force:
        raise st.OutputError(f"output {args.out} already exists; pass --force to replace it")
    st.parse_size(args.shard_size)
    inputs = streaming.open_inputs(plan.base, plan.experts, plan.method, key=key, in_memory=in_memory, **plan.hparams)
    base, experts, hp = inputs
    cov = coverage.of_checkpoint(plan.method, base, hp, len(experts))
    card = st.model_card(
        method=plan.method if plan.method == plan.source_method else f"{plan.source_method} (jmerge {plan.method})",
        base=str(plan.base), experts=[str(e) for e in plan.experts], config_text=plan.config_text, version=__version__,
        extra=_hparams_text(plan.hparams, seed if key is not None else None, out_dtype) + cov.markdown(),
    )
    from jmerge.io.gguf import model_files

    extra = {**model_files(base), "jmerge_config.yml": plan.config_text}  # a GGUF base: its config and tokenizer
    _console(stdout=True).print(
        f"merging {len(experts)} model(s) into {args.out} with {'learned ' if plan.learn else ''}{plan.method} "
        f"({'in memory' if in_memory else 'streamed'}; {len(base.tensors)} tensors, "
        f"{_human(base.nbytes * (len(experts) + 1))} of inputs)\ncoverage: {cov.line()}"
    )
    if plan.learn is not None:
        _learn_and_write(args, plan, base, experts, card, extra, out_dtype)
        _summary(args.out, start, base.nbytes * (len(experts) + 1))
        return 0
    passes = 1 if in_memory else streaming.passes(plan.method, hp)
    with _progress(args.no_progress) as bar:
        task = bar.add_task("merge", total=len(base.tensors) * passes)

        def tick(phase: str, name: str) -> None:
            bar.update(task, advance=1, description=phase)

        streaming.merge_to_dir(
            args.out, inputs, None, plan.method, key=key, out_dtype=out_dtype, shard_size=args.shard_size,
            force=args.force, card=card, extra_files=extra, check_finite=plan.check_finite, in_memory=in_memory,
            lwptv=plan.lwptv_config(), progress=tick,
        )
    _summary(args.out, start, base.nbytes * (len(experts) + 1))
    return 0


def _learn_and_write(args, plan, base, experts, card: str, extra: dict, out_dtype) -> None:
    """``jmerge.learn``: learns the coefficients (:mod:`jmerge.learn.causal_lm`), then writes
    θ0 + Σ_t Γ_t τ_t with them, recorded in the card and in ``coefficients.json``."""
    import json

    from jmerge import streaming
    from jmerge.learn import causal_lm

    opts = plan.learn
    _console(stdout=True).print(f"learning {opts.granularity}-level {opts.method} coefficients for "
                                f"{len(experts)} model(s) on {opts.samples} prompts each")
    result, per_tensor = causal_lm.learn(plan.base, plan.experts, opts, progress=not args.no_progress)
    coefficients = {"method": opts.method, "granularity": opts.granularity, "layer_names": result.layer_names,
                    "models": [str(e) for e in plan.experts], "coefficients": np.asarray(result.coefficients).tolist(),
                    "steps_per_epoch": result.steps_per_epoch, "losses": np.asarray(result.losses).tolist()}
    text = json.dumps(coefficients, indent=1)
    card = card.replace("## Configuration", f"## Learned coefficients\n\n```json\n{text}\n```\n\n## Configuration", 1)
    tensors = causal_lm.merged_tensors(base, experts, per_tensor, out_dtype)
    streaming.write_dir(args.out, base, tensors, streaming.output_plan(base, out_dtype, args.shard_size),
                        protect=[e.path for e in experts], force=args.force, card=card,
                        extra_files={**extra, "coefficients.json": text + "\n"})
    _console(stdout=True).print(f"coefficients: {np.round(np.asarray(result.coefficients), 4).tolist()}")


def _hparams_text(hp: dict, seed: int | None, out_dtype: str | None) -> str:
    lines = [f"- `{k}`: `{v!r}`" for k, v in sorted(hp.items())]
    if seed is not None:
        lines.append(f"- `seed`: `{seed}`")
    if out_dtype:
        lines.append(f"- output dtype: `{out_dtype}`")
    return "jmerge hyper-parameters:\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def _summary(out: Path, start: float, input_bytes: int) -> None:
    from rich.table import Table

    table = Table(title="jmerge run", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("output", str(out))
    table.add_row("output size", _human(st.dir_size(out)))
    table.add_row("inputs", _human(input_bytes))
    table.add_row("time", f"{time.perf_counter() - start:.2f} s")
    table.add_row("peak RSS", _human(_peak_rss_bytes()))
    _console(stdout=True).print(table)


# ---------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    from jmerge.io import flax_io

    start = time.perf_counter()
    if args.src.suffix.lower() == ".gguf" or args.dst.suffix.lower() == ".gguf":
        from jmerge.io import gguf as gguf_io

        info = gguf_io.convert(args.src, args.dst, quant=args.quant, dtype=args.dtype, shard_size=args.shard_size, force=args.force)
    else:
        info = flax_io.convert(
            args.src, args.dst, to=args.to, model_type=args.model_type, force=args.force, shard_size=args.shard_size, dtype=args.dtype
        )
    _console(stdout=True).print(
        f"converted {info['tensors']} tensors {info['from']} -> {info['to']} into {args.dst} "
        f"(model_type {info['model_type']}; copied {', '.join(info['copied']) or 'no other files'}) "
        f"in {time.perf_counter() - start:.2f} s, {_human(st.dir_size(args.dst))}"
    )
    return 0


# ---------------------------------------------------------------------------- inspect
def task_vector_stats(base, experts, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Streams ``(norms (K,), Gram matrix (K, K))`` of the float32 task vectors over all float tensors."""
    k = len(experts)
    gram = np.zeros((k, k), np.float64)
    for name, info in base.tensors.items():
        if not info.is_float:
            continue
        b = base.read(name).astype(np.float32).ravel()
        tvs = np.stack([e.read(name).astype(np.float32).ravel() - b for e in experts]).astype(np.float64)
        gram += tvs @ tvs.T
        if progress:
            progress("task vectors", name)
    return np.sqrt(np.diag(gram)), gram


def cmd_inspect(args) -> int:
    from rich.table import Table

    console = _console(stdout=True)
    base = st.open_checkpoint(args.base)
    experts = [st.open_checkpoint(e) for e in args.experts]
    for i, e in enumerate(experts):
        st.check_compatible(base, e, f"expert {i} ({e.path})")
    names = [_short(e.path) for e in experts]
    if args.png is not None and args.png.exists() and not args.force:
        raise st.OutputError(f"{args.png} exists; pass --force to overwrite it")
    with _progress(False) as bar:
        task = bar.add_task("task vectors", total=len(base.tensors))
        norms, gram = task_vector_stats(base, experts, lambda phase, name: bar.update(task, advance=1))
    cos = gram / np.maximum(np.outer(norms, norms), 1e-30)

    table = Table(title=f"task vectors (base {_short(base.path)})")
    table.add_column("expert")
    table.add_column("||tau||", justify="right")
    for n in names:
        table.add_column(f"cos({n})", justify="right")
    for i, n in enumerate(names):
        table.add_row(n, f"{norms[i]:.4g}", *(f"{cos[i, j]:+.3f}" for j in range(len(names))))
    console.print(table)

    scores = mask = None
    if args.layers:
        import jmerge.lwptv as lwptv
        from jmerge import streaming

        b, es = streaming.read_floats(base, experts)  # the merge's own dtype rule
        value = int(args.value) if args.rule == "top_k" else args.value
        scores, mask = lwptv.inspect(
            b, es, layers=args.layers, score=args.score, rule=args.rule, value=value, task_names=tuple(names)
        )
        console.print(f"LwPTV saliency ({args.score}) and mask ({args.rule} {value}):")
        console.print(lwptv.table(mask.layer_names, mask.task_names, scores=scores, mask=mask.mask), soft_wrap=True)
    if args.png is not None:
        _plot_overview(args.png, names, norms, cos)
        console.print(f"wrote {args.png}")
        if scores is not None:
            import jmerge.lwptv as lwptv

            png = args.png.with_name(f"{args.png.stem}-lwptv{args.png.suffix}")
            lwptv.plot_scores(scores, mask.layer_names, mask.task_names, png, mask=mask, overwrite=args.force)
            console.print(f"wrote {png}")
    return 0


def _short(path: Path) -> str:
    return Path(path).name or str(path)


def _plot_overview(path: Path, names, norms, cos) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(names), 3 + 0.3 * len(names)))
    im = a.imshow(cos, vmin=-1, vmax=1, cmap="coolwarm")
    a.set_xticks(range(len(names)), names, rotation=45, ha="right")
    a.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            a.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=8)
    a.set_title("cosine(tau_i, tau_j)")
    fig.colorbar(im, ax=a, fraction=0.046)
    b.bar(range(len(names)), norms)
    b.set_xticks(range(len(names)), names, rotation=45, ha="right")
    b.set_title("||tau||")
    fig.tight_layout()
    from jmerge._util import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), overwrite=True)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- methods
def cmd_methods(args) -> int:
    from rich.table import Table

    from jmerge import config
    from jmerge.methods import registry

    table = Table(title="jmerge merge methods")
    table.add_column("method", no_wrap=True)  # names are what users type: never truncated
    table.add_column("mergekit name", no_wrap=True)
    table.add_column("hyper-parameters (defaults; * per model)")
    table.add_column("streamed")
    table.add_column("reference")
    aliases = {}
    for mk, m in config.MERGEKIT.items():
        aliases.setdefault(m.jmerge, []).append(mk)
    for name in registry.available():
        m = registry.get(name)
        hp = ", ".join(f"{k}{'*' if k in m.per_model else ''}={v!r}" for k, v in m.defaults.items())
        table.add_row(name, ", ".join(aliases.get(name, [])), hp, "yes" if m.streamable else "no", m.reference)
    _console(stdout=True).print(table)
    return 0


# ---------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``jmerge`` command; returns the exit status."""
    from jmerge.validate import MergeInputError

    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (MergeInputError, st.OutputError, ValueError) as e:
        from rich.text import Text

        _console().print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        _console().print("interrupted: no output was written", soft_wrap=True)
        return 130


def entry() -> None:
    """The console script: :func:`main` with JAX's persistent compilation cache on
    (``jmerge.cache``; tests call ``main`` and leave the cache alone)."""
    from jmerge.cache import enable_compilation_cache

    enable_compilation_cache()
    sys.exit(main())


if __name__ == "__main__":
    entry()
