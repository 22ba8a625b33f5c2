"""Runs in mergekit's venv (torch, transformers, mergekit 0.1.5), driven by
:mod:`bench.mergekit_configs`: ``make ROOT`` writes tiny random HF models, ``make_vocab ROOT``
tiny Llamas with differing tokenizers (``tests/test_config_tokenizer.py``), ``merge JOBS.json``
runs each ``[config.yaml, out_dir]`` through mergekit's own ``run_merge`` in this one process (as ``mergekit-yaml CONFIG OUT --allow-crimes`` would) and prints one JSON status line per job.
"""

import json
import sys
import traceback
from pathlib import Path

ARCHS = {  # tiny configs as mergekit's tests make them (tests/common.py make_picollama), 6 layers
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                      num_attention_heads=16, num_hidden_layers=6)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                            num_attention_heads=8, num_key_value_heads=4,
                                                            num_hidden_layers=6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                      num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=6,
                                                      tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=32, n_layer=6, n_head=4, n_positions=32)),
}


def make(root: Path) -> None:
    """``root/<arch>/{base,e0,e1,e2}``: a random base, experts = base + 0.01 N(0,1) per weight (float32)."""
    import torch
    import transformers

    for arch, (cfg_name, model_name, kwargs) in ARCHS.items():
        torch.manual_seed(sorted(ARCHS).index(arch))
        cfg = getattr(transformers, cfg_name)(**kwargs)
        model = getattr(transformers, model_name)(cfg)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name in ("base", "e0", "e1", "e2"):
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(base[k] if name == "base" else base[k] + 0.01 * torch.randn_like(base[k]))
            model.save_pretrained(root / arch / name, safe_serialization=True)


# tokenizers of the vocabulary models (make_vocab): regular tokens, then added ones (content, special)
VOCABS = {
    "base": ([f"t{i}" for i in range(60)], [("<s>", True), ("</s>", True)]),
    "e0": ([f"t{i}" for i in range(60)], [("<s>", True), ("</s>", True), ("<tool>", True)]),
    "e1": ([f"t{i}" for i in reversed(range(61))], [("<s>", True), ("</s>", True), ("<img>", True), ("<tool>", True)]),
}


def make_vocab(root: Path) -> None:
    """``root/{base,e0,e1}``: tiny Llamas whose tokenizer.json (``tokenizers`` WordLevel) differ
    as :data:`VOCABS` says: e0 adds a token, e1 orders the tokens otherwise and adds a regular
    and two added tokens. A token's embedding and head rows are the base's + 0.01 N(0,1) (random
    for new tokens); the other weights are the base's + 0.01 N(0,1)."""
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer, models

    torch.manual_seed(0)
    ids = {}
    for name, (regular, added) in VOCABS.items():
        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(regular)}, unk_token="t0"))
        tok.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in added])
        ids[name] = tok.get_vocab(with_added_tokens=True)
        cfg = transformers.LlamaConfig(vocab_size=len(ids[name]), hidden_size=16, intermediate_size=24,
                                       num_attention_heads=4, num_hidden_layers=2)
        model = transformers.LlamaForCausalLM(cfg)
        state = model.state_dict()
        if name == "base":
            base = {k: v.detach().clone() for k, v in state.items()}
        with torch.no_grad():
            for k, v in state.items():
                if k in ("model.embed_tokens.weight", "lm_head.weight"):
                    for t, i in ids[name].items():
                        j = ids["base"].get(t)
                        v[i] = torch.randn(v.shape[1]) if j is None else base[k][j] + (0 if name == "base" else 0.01) * torch.randn(v.shape[1])
                elif name != "base":
                    v.copy_(base[k] + 0.01 * torch.randn_like(base[k]))
        model.save_pretrained(root / name, safe_serialization=True)
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(root / name)


def merge(jobs_file: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    for cfg_path, out in json.loads(jobs_file.read_text()):
        try:
            config = MergeConfiguration.model_validate(yaml.safe_load(Path(cfg_path).read_text()))
            run_merge(config, out_path=out, options=MergeOptions(allow_crimes=True, quiet=True, random_seed=0))
            status = {"config": cfg_path, "ok": True}
        except Exception as e:  # a refused config: its message is the result
            status = {"config": cfg_path, "ok": False,
                      "error": f"{type(e).__name__}: {e}".splitlines()[0][:300] if str(e) else traceback.format_exc()[-300:]}
        print(json.dumps(status), flush=True)


if __name__ == "__main__":
    {"make": make, "make_vocab": make_vocab, "merge": merge}[sys.argv[1]](Path(sys.argv[2]))
