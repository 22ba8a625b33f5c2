"""Checks a merge of this example: it loads and generates with jmerge's Llama, and its GGUF
twin (``--out-format gguf``) reads back through jmerge.io.gguf close to it and generates too.

For the first prompt of each task, prints the merged model's greedy answer (the tokenizer and
chat template copied into the output directory), then the largest |GGUF - HF| per tensor.

    .venv/bin/python examples/smollm2_divmerge/check_output.py merged/ [merged.gguf]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from jmerge.io import gguf as jgguf
from jmerge.io import safetensors_io as st
from jmerge.learn import llama

HERE = Path(__file__).parent
# the prompt files divmerge.yml learns from, one per merged expert
PROMPTS = [HERE / f for f in yaml.safe_load((HERE / "divmerge.yml").read_text())["jmerge"]["learn"]["prompts"]]


def answers(tensors: dict, cfg: llama.LlamaConfig, tok, rows: list[dict], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of the model ``tensors`` to the chat-template prompts of ``rows``."""
    ids = [list(tok.apply_chat_template([{"role": "system", "content": r["system"]}, {"role": "user", "content": r["text"]}],
                                        add_generation_prompt=True)) for r in rows]
    x, mask = llama.left_pad(ids, cfg.eos_token_id)
    out = np.asarray(llama.generate(llama.stack(tensors, cfg), cfg, jnp.asarray(x), jnp.asarray(mask), max_new_tokens,
                                    cfg.eos_token_id))
    return [tok.decode(o[: list(o).index(cfg.eos_token_id)] if cfg.eos_token_id in o else o) for o in out]


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("merged", type=Path, help="the HF output directory of `jmerge run`")
    p.add_argument("gguf", type=Path, nargs="?", help="the GGUF output of the same merge")
    args = p.parse_args(argv)

    cfg = llama.LlamaConfig.from_hf(args.merged)
    tok = AutoTokenizer.from_pretrained(args.merged)
    rows = [json.loads(f.read_text(encoding="utf-8").splitlines()[0]) for f in PROMPTS]
    tensors = st.load(args.merged)
    gamma = json.loads((args.merged / "coefficients.json").read_text())["coefficients"]
    print(f"{args.merged}: {len(tensors)} tensors, Γ {np.asarray(gamma).shape}, rope_theta {cfg.rope_theta}, "
          f"tied head {cfg.tie_word_embeddings}")
    for r, a in zip(rows, answers(tensors, cfg, tok, rows)):
        print(f"  HF   {r['system'][:40]!r} / {r['text'][:40]!r} -> {a!r}")
    if args.gguf:
        back = jgguf.open_gguf(args.gguf)
        gg = back.load()
        worst = max(float(np.abs(gg[n] - tensors[n]).max()) for n in tensors)
        print(f"{args.gguf}: {len(gg)} tensors, file_type {back.fields['general.file_type']}, "
              f"method {back.fields['jmerge.method']}; max |GGUF - HF| over all tensors {worst:.3g}")
        for r, a in zip(rows, answers(gg, cfg, tok, rows)):
            print(f"  GGUF {r['system'][:40]!r} / {r['text'][:40]!r} -> {a!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
