"""A Llama decoder in pure JAX, on Hugging Face-named flat parameter dicts, with greedy generation.

The causal-LM forward of the learn path (:mod:`jmerge.learn.causal_lm`) for Llama checkpoints,
and of the experiments' SmolLM2 suite. Llama (arXiv 2302.13971) as in transformers
``LlamaForCausalLM``: per block ``h = h + Attn(RMSNorm(h))``, ``h = h + W_down(silu(W_gate x) * W_up x)``
with ``x = RMSNorm(h)``, ``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w`` computed in float32;
rotary embeddings (arXiv 2104.09864) in HF's half-split layout with ``inv_freq_i = rope_theta^(-2i/d)``
(the config's ``rope_theta``, which transformers 4.57's Flax Llama ignores); grouped-query
attention (arXiv 2305.13245; each KV head serves ``heads / kv_heads`` consecutive query heads,
HF's ``repeat_kv``); the LM head tied to the token embedding when ``tie_word_embeddings``
(transformers 4.57's Flax Llama always has its own, randomly initialised, head).

Parameters are the flat ``{HF name: array}`` dict of a checkpoint (torch layout ``(out, in)``,
e.g. from ``jmerge.io.gguf.open_gguf(path).load()`` or ``jmerge.io.load(hf_dir)``);
:func:`stack` turns it into per-kind ``(L, ...)`` arrays so the blocks run under one
``lax.scan`` (it traces, so merged parameters can be stacked inside a jitted loss). Left-padded
batches carry an attention mask; positions count real tokens only.

Usage::

    cfg = LlamaConfig.from_hf(hf_dir)
    params = stack(jmerge.io.load(hf_dir), cfg)
    tokens = generate(params, cfg, ids, mask, max_new_tokens=16, eos_id=cfg.eos_token_id)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    eos_token_id: int | None = None

    @classmethod
    def from_dict(cls, c: Mapping[str, Any]) -> "LlamaConfig":
        unsupported = {k: c[k] for k in ("rope_scaling", "attention_bias", "mlp_bias") if c.get(k)}
        if c.get("hidden_act", "silu") != "silu":
            unsupported["hidden_act"] = c["hidden_act"]
        if unsupported:
            raise ValueError(f"jmerge's Llama does not implement {', '.join(f'{k}={v!r}' for k, v in unsupported.items())}")
        heads = c["num_attention_heads"]
        c = {**c, "num_key_value_heads": c.get("num_key_value_heads") or heads,
             "head_dim": c.get("head_dim") or c["hidden_size"] // heads}
        eos = c.get("eos_token_id")
        c["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
        return cls(**{f.name: c[f.name] for f in fields(cls) if f.name in c})

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> "LlamaConfig":
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))


def param_names(cfg: LlamaConfig) -> list[str]:
    """The HF names :func:`stack` reads (``lm_head.weight`` only for an untied head)."""
    names = [f"model.layers.{i}.{p}.weight" for p in _PROJ for i in range(cfg.num_hidden_layers)]
    return [*names, "model.embed_tokens.weight", "model.norm.weight", *([] if cfg.tie_word_embeddings else ["lm_head.weight"])]


def stack(flat: Mapping[str, Any], cfg: LlamaConfig, dtype=jnp.float32) -> dict[str, jax.Array]:
    """HF-named flat dict -> ``{"embed", "norm", "head", <kind>: (L, ...)}`` (head = embedding if tied)."""
    missing = [n for n in param_names(cfg) if n not in flat]
    if missing:
        raise KeyError(f"parameter {missing[0]!r} is missing ({len(missing)} of {len(param_names(cfg))} missing)")

    def get(name):
        return jnp.asarray(flat[name]).astype(dtype)

    out = {p: jnp.stack([get(f"model.layers.{i}.{p}.weight") for i in range(cfg.num_hidden_layers)]) for p in _PROJ}
    out["embed"] = get("model.embed_tokens.weight")
    out["norm"] = get("model.norm.weight")
    out["head"] = out["embed"] if cfg.tie_word_embeddings else get("lm_head.weight")
    return out


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype) * w


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF rotary embedding of ``x (B, S, H, d)`` at integer ``positions (B, S)``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # (B, S, d/2)
    emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _forward(params, cfg: LlamaConfig, ids, positions, slot_mask, cache, index):
    """Logits of ``ids (B, S)`` written at cache slots ``index .. index+S-1``.

    ``slot_mask (B, C)`` marks the real (not padding) slots of the cache; a query at slot
    ``i`` attends to real slots ``j <= i``. ``cache``: ``(k, v)`` of shape ``(L, B, C, KV, d)``.
    """
    b, s = ids.shape
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    slots = index + jnp.arange(s)
    allowed = slot_mask[:, None, :] & (jnp.arange(slot_mask.shape[1])[None, None, :] <= slots[None, :, None])
    bias = jnp.where(allowed, 0.0, -1e30)[:, None]  # (B, 1, S, C); finite: an all-padding row stays finite
    x = params["embed"][ids]

    def block(x, layer):
        w, (ck, cv) = layer
        y = rms_norm(x, w["input_layernorm"], cfg.rms_norm_eps)
        q = (y @ w["self_attn.q_proj"].T).reshape(b, s, h, d)
        k = (y @ w["self_attn.k_proj"].T).reshape(b, s, kvh, d)
        v = (y @ w["self_attn.v_proj"].T).reshape(b, s, kvh, d)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, 1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, 1)
        keys, values = jnp.repeat(ck, h // kvh, 2), jnp.repeat(cv, h // kvh, 2)
        scores = jnp.einsum("bshd,bchd->bhsc", q, keys).astype(jnp.float32) / np.sqrt(d) + bias
        att = jnp.einsum("bhsc,bchd->bshd", jax.nn.softmax(scores, -1).astype(values.dtype), values)
        x = x + att.reshape(b, s, h * d) @ w["self_attn.o_proj"].T
        y = rms_norm(x, w["post_attention_layernorm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(y @ w["mlp.gate_proj"].T) * (y @ w["mlp.up_proj"].T)) @ w["mlp.down_proj"].T
        return x, (ck, cv)

    layers = {p: params[p] for p in _PROJ}
    x, cache = jax.lax.scan(block, x, (layers, cache))
    x = rms_norm(x, params["norm"], cfg.rms_norm_eps)
    return (x @ params["head"].T).astype(jnp.float32), cache


def _empty_cache(params, cfg: LlamaConfig, b: int, c: int):
    shape = (cfg.num_hidden_layers, b, c, cfg.num_key_value_heads, cfg.head_dim)
    return jnp.zeros(shape, params["embed"].dtype), jnp.zeros(shape, params["embed"].dtype)


def positions_of(mask: jax.Array) -> jax.Array:
    """Position of each token of a left-padded batch: the count of real tokens before it."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), -1) - 1, 0)


@partial(jax.jit, static_argnums=(1,))
def logits(params, cfg: LlamaConfig, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``(B, S, V)`` float32 logits of ``ids``; ``mask`` (default all ones) marks real tokens (left padding)."""
    mask = jnp.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    out, _ = _forward(params, cfg, ids, positions_of(mask), mask, _empty_cache(params, cfg, *ids.shape), 0)
    return out


@partial(jax.jit, static_argnums=(1, 4, 5))
def generate(params, cfg: LlamaConfig, ids: jax.Array, mask: jax.Array, max_new_tokens: int, eos_id: int) -> jax.Array:
    """Greedy continuation ``(B, T)`` of left-padded prompts ``ids (B, P)`` with a KV cache;
    after EOS a row repeats ``eos_id``."""
    b, p = ids.shape
    mask = mask.astype(bool)
    slot_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), bool)], 1)
    cache = _empty_cache(params, cfg, b, p + max_new_tokens)
    out, cache = _forward(params, cfg, ids, positions_of(mask), slot_mask, cache, 0)
    first = jnp.argmax(out[:, -1], -1).astype(ids.dtype)
    n_real = mask.sum(1).astype(jnp.int32)

    def step(carry, s):
        tok, done, slot_mask, cache = carry
        slot_mask = slot_mask.at[:, p + s].set(True)
        out, cache = _forward(params, cfg, tok[:, None], (n_real + s)[:, None], slot_mask, cache, p + s)
        nxt = jnp.argmax(out[:, -1], -1).astype(ids.dtype)
        done = done | (tok == eos_id)
        nxt = jnp.where(done, eos_id, nxt)
        return (nxt, done, slot_mask, cache), tok

    init = (first, jnp.zeros((b,), bool), slot_mask, cache)
    (last, _, _, _), toks = jax.lax.scan(step, init, jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([toks.T, last[:, None]], 1)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` int32/bool ``(B, P_max)`` of token lists padded on the left."""
    n = max(len(r) for r in rows)
    ids = np.full((len(rows), n), pad_id, np.int32)
    mask = np.zeros((len(rows), n), bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, n - len(r):], mask[i, n - len(r):] = r, True
    return ids, mask
