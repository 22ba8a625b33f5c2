"""A tiny random Llama as an HF directory (safetensors, config.json, byte-level BPE tokenizer.json
with a chat template), for the GGUF and Llama tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jmerge.io import safetensors_io as st

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def config(vocab: int, *, layers: int = 2, hidden: int = 64, ffn: int = 128, heads: int = 4, kv_heads: int = 2,
           tied: bool = False, rope_theta: float = 10000.0) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "hidden_act": "silu",
            "max_position_embeddings": 64, "rms_norm_eps": 1e-05, "rope_theta": rope_theta,
            "tie_word_embeddings": tied, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 2}


def tokenizer():
    """Byte-level BPE: 3 special tokens, the 256 byte symbols, 8 merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate([*SPECIALS, *sorted(alphabet)])}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("i", "s"), ("a", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def weights(cfg: dict, seed: int = 0, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(*shape):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": 1 + w(d), p + "self_attn.q_proj.weight": w(q, d),
                p + "self_attn.k_proj.weight": w(kv, d), p + "self_attn.v_proj.weight": w(kv, d),
                p + "self_attn.o_proj.weight": w(d, q), p + "post_attention_layernorm.weight": 1 + w(d),
                p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f)}
    out["model.norm.weight"] = 1 + w(d)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = w(v, d)
    return out


def save(path: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    st.save_safetensors(path, tensors)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
         "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_bos_token": False, "chat_template": TEMPLATE}))
    return path


def make(path: Path, *, seed: int = 0, **kw) -> Path:
    """A random tiny Llama HF directory at ``path``; ``kw`` go to :func:`config`."""
    cfg = config(tokenizer().get_vocab_size(), **kw)
    return save(path, cfg, weights(cfg, seed))
