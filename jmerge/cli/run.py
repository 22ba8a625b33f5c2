"""``jmerge run CONFIG OUT``: a YAML merge into an HF directory (or a GGUF file)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from jmerge.cli._output import console, human, peak_rss_bytes, progress

EXAMPLES = """\
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


def add_parser(sub, fmt) -> None:
    run = sub.add_parser(
        "run",
        help="merge models as a YAML config says",
        description="Merge the models of CONFIG (mergekit's YAML format plus `jmerge:` keys) into the "
        "Hugging Face directory OUT_DIR: sharded safetensors, the base's config and tokenizer, a model "
        "card with the config. The config and every input header are checked before any tensor is "
        "read; OUT_DIR appears only once complete.",
        epilog=EXAMPLES,
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


def cmd_run(args: argparse.Namespace) -> int:
    import jax

    from jmerge import __version__, config, coverage, streaming
    from jmerge.io import hf_dir
    from jmerge.io import safetensors_io as st
    from jmerge.methods import registry

    if args.out_format == "gguf" or args.quant:
        from jmerge.cli.run_gguf import run_to_gguf

        if args.out_format != "gguf":
            raise ValueError("--quant needs --out-format gguf")
        return run_to_gguf(args, cmd_run)
    start = time.perf_counter()
    plan = config.plan_from_yaml(args.config)
    out_dtype = args.out_dtype or plan.out_dtype
    in_memory = plan.in_memory or args.in_memory
    seed = plan.seed if args.seed is None else args.seed
    key = jax.random.key(seed) if registry.get(plan.method).needs_key else None
    hf_dir.refuse_existing(args.out, args.force, "pass --force")
    st.parse_size(args.shard_size)
    if plan.slices is not None:
        _run_slices(args, plan, out_dtype, key, seed)
        _summary(args.out, start, sum(hf_dir.dir_size(p) for p in {plan.base, *plan.experts}))
        return 0
    inputs = streaming.open_inputs(plan.base, plan.experts, plan.method, key=key, in_memory=in_memory, **plan.hparams)
    base, experts, hp = inputs
    cov = coverage.of_checkpoint(plan.method, base, hp, len(experts))
    card = hf_dir.model_card(
        method=plan.method if plan.method == plan.source_method else f"{plan.source_method} (jmerge {plan.method})",
        base=str(plan.base), experts=[str(e) for e in plan.experts], config_text=plan.config_text, version=__version__,
        extra=_hparams_text(plan.hparams, seed if key is not None else None, out_dtype) + cov.markdown(),
    )
    extra = {**base.model_files(), **_out_config(plan.base, out_dtype, None),  # a GGUF base: its config and tokenizer
             **plan.extra_files, "jmerge_config.yml": plan.config_text}
    console(stdout=True).print(
        f"merging {len(experts)} model(s) into {args.out} with {'learned ' if plan.learn else ''}{plan.method} "
        f"({'in memory' if in_memory else 'streamed'}; {len(base.tensors)} tensors, "
        f"{human(base.nbytes * (len(experts) + 1))} of inputs)\ncoverage: {cov.line()}"
    )
    if plan.learn is not None:
        _learn_and_write(args, plan, base, experts, card, extra, out_dtype)
        _summary(args.out, start, base.nbytes * (len(experts) + 1))
        return 0
    passes = 1 if in_memory else streaming.passes(plan.method, hp)
    with progress(args.no_progress) as bar:
        task = bar.add_task("merge", total=len(base.tensors) * passes)

        def tick(phase: str, name: str) -> None:
            bar.update(task, advance=1, description=phase)

        streaming.merge_to_dir(
            args.out, inputs, None, plan.method, key=key, out_dtype=out_dtype, shard_size=args.shard_size,
            force=args.force, card=card, extra_files=extra, check_finite=plan.check_finite, in_memory=in_memory,
            lwptv=plan.lwptv_config(), progress=tick, compute_dtype=plan.compute_dtype,
        )
    _summary(args.out, start, base.nbytes * (len(experts) + 1))
    return 0


def _out_config(base: Path, out_dtype: str | None, layers: dict | None, vocab_size: int | None = None) -> dict[str, str]:
    """``{"config.json": text}`` with the output's dtype, layer count and vocabulary size, when the base directory has one."""
    from jmerge.config.hf_layers import out_config

    given = out_dtype or layers or vocab_size
    text = out_config(base, dtype=out_dtype, layers=layers, vocab_size=vocab_size) if base.is_dir() and given else None
    return {} if text is None else {"config.json": text}


def _run_slices(args, plan, out_dtype, key, seed) -> None:
    """A per-tensor plan (mergekit ``slices``, gradients, filters): :func:`jmerge.config.slices.jobs`, streamed."""
    from jmerge import __version__, streaming
    from jmerge.config import slices
    from jmerge.io import hf_dir
    from jmerge.io import safetensors_io as st

    jobs, layers = slices.jobs(plan)
    count = sum(map(len, layers.values()))
    base = jobs[0].base[0]
    card = hf_dir.model_card(
        method=plan.source_method if plan.method == plan.source_method else f"{plan.source_method} (jmerge {plan.method})",
        base=str(plan.base), experts=[str(e) for e in dict.fromkeys(p for sp in plan.slices for p in sp.experts)],
        config_text=plan.config_text, version=__version__,
        extra=_hparams_text(plan.hparams, seed if key is not None else None, out_dtype)
        + f"Per-tensor plan: {len(plan.slices)} slice(s), {count} output layers, {len(jobs)} tensors; the "
        "hyper-parameters above are those at t = 0.\n\n",
    )
    extra = {**_out_config(plan.base, out_dtype, _sliced(plan.config, layers),
                           None if plan.vocab is None else plan.vocab.size),
             **plan.extra_files, "jmerge_config.yml": plan.config_text}
    console(stdout=True).print(f"merging {len(plan.slices)} slice(s) into {args.out} with {plan.method} "
                               f"(streamed; {len(jobs)} tensors, {count} layers)")
    tensors = {j.name: j.info for j in jobs}
    with progress(args.no_progress) as bar:
        task = bar.add_task("merge", total=len(jobs))
        stream = streaming.stream_jobs(jobs, plan.method, plan.hparams, key=key, out_dtype=out_dtype,
                                       check_finite=plan.check_finite, compute_dtype=plan.compute_dtype,
                                       progress=lambda phase, name: bar.update(task, advance=1, description=phase))
        hf_dir.write_dir(args.out, base, stream, st.output_plan(tensors, out_dtype, args.shard_size),
                         protect=[p for sp in plan.slices for p in sp.experts], force=args.force, card=card,
                            extra_files=extra)


def _sliced(cfg, layers: dict) -> dict | None:
    """The output layers of the modules given as ``slices`` (mergekit sets those modules' layer counts alone)."""
    sliced = {m: taken for m, taken in layers.items()
              if (cfg.slices if cfg.modules is None else cfg.modules[m.name].slices) is not None}
    return sliced or None


def _learn_and_write(args, plan, base, experts, card: str, extra: dict, out_dtype) -> None:
    """``jmerge.learn``: learns the coefficients (:mod:`jmerge.learn.causal_lm`), then writes
    θ0 + Σ_t Γ_t τ_t with them, recorded in the card and in ``coefficients.json``."""
    import json

    from jmerge.io import hf_dir
    from jmerge.io import safetensors_io as st
    from jmerge.learn import causal_lm

    opts = plan.learn
    if opts.method in ("regmean", "fisher"):  # the prompts are the data these methods measure
        from jmerge.learn import causal_lm_data

        console(stdout=True).print(f"measuring {opts.method} statistics of {len(experts)} model(s) on {opts.samples} prompts each")
        merged = causal_lm_data.merged_tensors(base, experts, opts, plan.method,
                                               {k: v for k, v in plan.hparams.items() if k not in ("grams", "fishers")})
        tensors = ((n, merged[n].astype(st.numpy_dtype(out_dtype) if out_dtype else info.dtype) if info.is_float
                    else base.read(n)) for n, info in base.tensors.items())
        hf_dir.write_dir(args.out, base, tensors, st.output_plan(base.tensors, out_dtype, args.shard_size),
                         protect=[e.path for e in experts], force=args.force, card=card, extra_files=extra)
        return
    console(stdout=True).print(f"learning {opts.granularity}-level {opts.method} coefficients for "
                               f"{len(experts)} model(s) on {opts.samples} prompts each")
    result, per_tensor = causal_lm.learn(base, experts, opts, progress=not args.no_progress)
    coefficients = {"method": opts.method, "granularity": opts.granularity, "layer_names": result.layer_names,
                    "models": [str(e) for e in plan.experts], "coefficients": np.asarray(result.coefficients).tolist(),
                    "steps_per_epoch": result.steps_per_epoch, "losses": np.asarray(result.losses).tolist()}
    text = json.dumps(coefficients, indent=1)
    card = card.replace("## Configuration", f"## Learned coefficients\n\n```json\n{text}\n```\n\n## Configuration", 1)
    tensors = causal_lm.merged_tensors(base, experts, per_tensor, out_dtype)
    hf_dir.write_dir(args.out, base, tensors, st.output_plan(base.tensors, out_dtype, args.shard_size),
                     protect=[e.path for e in experts], force=args.force, card=card,
                     extra_files={**extra, "coefficients.json": text + "\n"})
    console(stdout=True).print(f"coefficients: {np.round(np.asarray(result.coefficients), 4).tolist()}")


def _hparams_text(hp: dict, seed: int | None, out_dtype: str | None) -> str:
    lines = [f"- `{k}`: `{v!r}`" for k, v in sorted(hp.items())]
    if seed is not None:
        lines.append(f"- `seed`: `{seed}`")
    if out_dtype:
        lines.append(f"- output dtype: `{out_dtype}`")
    return "jmerge hyper-parameters:\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def _summary(out: Path, start: float, input_bytes: int) -> None:
    from rich.table import Table

    from jmerge.io import hf_dir

    table = Table(title="jmerge run", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("output", str(out))
    table.add_row("output size", human(hf_dir.dir_size(out)))
    table.add_row("inputs", human(input_bytes))
    table.add_row("time", f"{time.perf_counter() - start:.2f} s")
    table.add_row("peak RSS", human(peak_rss_bytes()))
    console(stdout=True).print(table)
