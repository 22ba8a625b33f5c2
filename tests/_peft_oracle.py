"""Run inside the mergekit venv (torch + PEFT): PEFT's own answers for tests/test_lora_peft.py.

``python _peft_oracle.py WORK`` builds a tiny random LlamaForCausalLM in ``WORK/base`` and two
LoRA adapters ``WORK/a0``, ``WORK/a1`` (random A and B, different ranks' alphas), then writes
``WORK/combined-<type>/`` for each deterministic ``add_weighted_adapter`` type and
``WORK/merged-a0/`` (``merge_and_unload`` of a0). ``python _peft_oracle.py WORK load`` loads
``WORK/jmerge-adapter`` (written by jmerge) onto the base and writes ``WORK/merged-jmerge/``.
"""

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TYPES = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
WEIGHTS = [0.7, -0.4]


def load(work: Path) -> None:
    m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "base"), work / "jmerge-adapter").merge_and_unload()
    m.save_pretrained(work / "merged-jmerge", safe_serialization=True)


def main(work: Path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(work / "base", safe_serialization=True)
    targets = ["q_proj", "v_proj", "down_proj"]
    for i, (r, alpha, rslora) in enumerate([(4, 8, False), (4, 6, True)]):
        m = get_peft_model(LlamaForCausalLM.from_pretrained(work / "base"),
                           LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, init_lora_weights=False))
        m.save_pretrained(work / f"a{i}")
    for kind in TYPES:
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "base"), work / "a0", adapter_name="a0")
        model.load_adapter(work / "a1", adapter_name="a1")
        model.add_weighted_adapter(["a0", "a1"], WEIGHTS, "mix", combination_type=kind, density=0.5, svd_rank=6)
        model.save_pretrained(work / f"combined-{kind}", selected_adapters=["mix"])
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "base"), work / "a0").merge_and_unload()
    merged.save_pretrained(work / "merged-a0", safe_serialization=True)
    (work / "done.json").write_text(json.dumps({"types": TYPES, "weights": WEIGHTS}))


if __name__ == "__main__":
    (load if sys.argv[2:] == ["load"] else main)(Path(sys.argv[1]))
