"""GGUF checkpoints (llama.cpp's format) in and out, on the ``gguf`` package (llama.cpp's own).

Reading. :func:`open_gguf` parses the header with ``gguf.GGUFReader`` and returns a
:class:`GGUFCheckpoint`: a :class:`jmerge.io.safetensors_io.Checkpoint` whose tensors carry
Hugging Face Llama names and float32 numpy shapes, so merges stream it like any safetensors
checkpoint. :meth:`GGUFCheckpoint.read` dequantizes one tensor (``gguf.quants.dequantize``,
every type ``gguf`` implements) and undoes llama.cpp's converter: GGUF lists dimensions
fastest-first (``dequantize`` already returns numpy order, torch's ``(out, in)``), and q/k
rows are permuted from HF's half-split RoPE layout to GGML's interleaved one (inverse:
``w.reshape(h, out/h/2, 2, in).swapaxes(1, 2)``, ``h`` = heads for q, KV heads for k;
llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``, transformers
``LlamaTensorProcessor``). A GGUF without ``output.weight`` has its LM head tied to the token
embedding: no ``lm_head.weight`` appears and ``config.json`` says ``tie_word_embeddings``.
:func:`hf_files` builds ``config.json`` (``LlamaConfig``: rope_theta, rms eps, tying),
``tokenizer.json`` (``tokenizers``' BPE model, byte-level, with the GGUF's merges and its
control tokens as special tokens), ``tokenizer_config.json`` (bos/eos/pad, chat template)
and ``generation_config.json`` from the metadata.

Writing. :func:`write_gguf` streams ``(HF name, array)`` pairs into a GGUF file as F32, F16,
BF16, Q8_0, Q4_0 or Q4_1 (``gguf.quants.quantize``; 1-D tensors stay F32 as llama.cpp keeps
them, and a tensor whose rows are not a multiple of the quant block is stored F16, logged and
counted). Metadata is the base GGUF's, or is built from an HF directory's ``config.json`` and
``tokenizer.json``; ``general.file_type`` is set to the output type and the merge is recorded
under ``jmerge.*`` keys. The file appears atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import gguf
import numpy as np

from jmerge._util import atomic_write
from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
QUANTS: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
_FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
               Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
               Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}
ARCHITECTURES = ("llama",)
_BLOCK = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Header keys the writer sets itself (counts, architecture, tensor type of the file).
_OWN_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "jmerge.")
# tokenizer.ggml.pre values whose pre-tokenizer is rebuilt here (llama.cpp llama-vocab.cpp).
_PRE = ("smollm", "gpt-2", "default")
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)


class GGUFError(st.CheckpointError):
    """A GGUF file that cannot be read, converted or written (named in the message)."""


# ---------------------------------------------------------------------------- names, permutation
def hf_names(n_layers: int, tied: bool) -> list[str]:
    """The HF Llama tensor names of a model with ``n_layers`` blocks, in GGUF file order."""
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        names += [f"model.layers.{i}.{p}.weight" for p in _BLOCK]
    names.append("model.norm.weight")
    return names if tied else [*names, "lm_head.weight"]


def name_map(n_layers: int) -> dict[str, str]:
    """``{HF name: GGUF name}`` for Llama, from ``gguf``'s own tensor-name table."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    return {n: table.get_name(n, try_suffixes=(".weight",)) for n in hf_names(n_layers, tied=False)}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split RoPE rows -> GGUF interleaved rows (llama.cpp ``LlamaModel.permute``)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`: GGUF row ``2j + s`` of a head is HF row ``s*hd/2 + j``."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(name: str, hp: Mapping[str, int]) -> int | None:
    if name.endswith("self_attn.q_proj.weight"):
        return hp["heads"]
    if name.endswith("self_attn.k_proj.weight"):
        return hp["kv_heads"]
    return None


# ---------------------------------------------------------------------------- reading
@dataclass
class GGUFCheckpoint(st.Checkpoint):
    """A GGUF file opened by header only, with HF Llama names and float32 tensors.

    ``fields`` holds the metadata as Python values; ``hparams`` the Llama shape numbers.
    ``directory`` is the file itself, so no neighbouring ``config.json`` is mistaken for it.
    """

    reader: Any = None
    sources: dict[str, Any] = field(default_factory=dict)  # HF name -> gguf ReaderTensor
    fields: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.path

    @property
    def tied(self) -> bool:
        return "lm_head.weight" not in self.tensors

    def model_files(self) -> dict[str, str]:
        """The HF files built from the GGUF's metadata (:func:`hf_files`): its config and tokenizer."""
        return hf_files(self)

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32, in HF layout (q/k un-permuted)."""
        t = self.sources.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: no tensor named {name!r}")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {t.name!r} has quant type {t.tensor_type.name}, "
                            f"which gguf cannot dequantize") from None
        w = np.asarray(w, np.float32).reshape(self.tensors[name].shape)
        heads = _qk_heads(name, self.hparams)
        return unpermute_qk(w, heads) if heads else w


def _value(f) -> Any:
    v = f.contents()
    return v.tolist() if isinstance(v, np.ndarray) else v


class _Reader(gguf.GGUFReader):
    """``gguf.GGUFReader`` that names a tensor whose bytes lie past the end of the file
    (the stock reader fails on it with a bare reshape error)."""

    def _build_tensors(self, start_offs: int, fields) -> None:
        size = len(self.data)
        for f in fields:
            _, name, _, dims, raw_dtype, offset = f.parts
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_dtype[0])]
            end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
            if end > size:
                raise GGUFError(f"truncated GGUF file: tensor {bytes(name).decode()!r} needs bytes up to {end}, "
                                f"the file holds {size}")
        super()._build_tensors(start_offs, fields)


def _reader(path: Path):
    if not path.is_file():
        raise GGUFError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return _Reader(path, "r")
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    except Exception as e:  # the reader fails with ValueError/IndexError/KeyError/... on a bad header
        raise GGUFError(f"{path}: corrupt or truncated GGUF header ({type(e).__name__}: {e}; file size {size} bytes)") from None


def _check_quant_types(path: Path, tensors) -> None:
    """Every tensor type can be dequantized: one zero block of each type is tried first."""
    for qtype in sorted({t.tensor_type for t in tensors}):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros(size, np.uint8), qtype)
        except NotImplementedError:
            names = [t.name for t in tensors if t.tensor_type == qtype]
            raise GGUFError(f"{path}: unsupported quant type {qtype.name} (tensor {names[0]!r} and "
                            f"{len(names) - 1} more); gguf cannot dequantize it") from None


def open_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Opens a Llama-family GGUF file by header; names and shapes are HF's (see module doc)."""
    path = Path(path)
    reader = _reader(path)
    fields = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r} (general.architecture); "
                        f"jmerge maps {', '.join(ARCHITECTURES)} GGUFs to Hugging Face names")
    _check_quant_types(path, reader.tensors)

    def key(k: str, default: Any = None) -> Any:
        v = fields.get(f"{arch}.{k}", default)
        if v is None:
            raise GGUFError(f"{path}: metadata key {arch}.{k} is missing")
        return v

    n_layers, hidden, heads = int(key("block_count")), int(key("embedding_length")), int(key("attention.head_count"))
    hp = {"layers": n_layers, "hidden": hidden, "ffn": int(key("feed_forward_length")), "heads": heads,
          "kv_heads": int(key("attention.head_count_kv", heads)),
          "head_dim": int(key("rope.dimension_count", hidden // heads)),
          "context": int(key("context_length")), "rope_theta": float(key("rope.freq_base", 10000.0)),
          "rms_eps": float(key("attention.layer_norm_rms_epsilon"))}
    by_gguf = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in by_gguf
    mapping = {g: h for h, g in name_map(n_layers).items() if not (tied and h == "lm_head.weight")}
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in by_gguf or scaling not in (None, "none"):
        raise GGUFError(f"{path}: RoPE scaling ({arch}.rope.scaling.type {scaling!r}"
                        f"{', rope_freqs.weight' if 'rope_freqs.weight' in by_gguf else ''}) is not supported")
    unknown = [n for n in by_gguf if n not in mapping]
    missing = [g for g in mapping if g not in by_gguf]
    if unknown or missing:
        parts = ([f"tensors a {n_layers}-block Llama does not have: {st._show(unknown)}"] if unknown else []) + (
            [f"missing tensors: {st._show(missing)}"] if missing else [])
        raise GGUFError(f"{path}: not a standard Llama GGUF: " + "; ".join(parts))
    tensors, sources = {}, {}
    for g, h in mapping.items():
        t = by_gguf[g]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        n = int(np.prod(shape)) * 4
        tensors[h] = st.TensorInfo(h, shape, "F32", path, (0, n))
        sources[h] = t
    hp["vocab"] = tensors["model.embed_tokens.weight"].shape[0]
    return GGUFCheckpoint(path, tensors, {}, reader=reader, sources=sources, fields=fields, hparams=hp)


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf"


# ---------------------------------------------------------------------------- HF files from metadata
def _f32(x: float) -> float:
    """The shortest decimal of a float32 metadata value (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def hf_config(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    """``config.json`` (``LlamaConfig``) of a Llama GGUF."""
    hp, f = ckpt.hparams, ckpt.fields
    ids = {k: f.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": hp["vocab"],
        "hidden_size": hp["hidden"], "intermediate_size": hp["ffn"], "num_hidden_layers": hp["layers"],
        "num_attention_heads": hp["heads"], "num_key_value_heads": hp["kv_heads"], "head_dim": hp["head_dim"],
        "hidden_act": "silu", "max_position_embeddings": hp["context"], "rms_norm_eps": _f32(hp["rms_eps"]),
        "rope_theta": _f32(hp["rope_theta"]), "rope_scaling": None, "tie_word_embeddings": ckpt.tied,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
        "pretraining_tp": 1, "use_cache": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"], "torch_dtype": "float32",
    }


def hf_tokenizer(ckpt: GGUFCheckpoint):
    """The GGUF's byte-level BPE tokenizer as a ``tokenizers.Tokenizer``.

    ``tokenizer.ggml.pre`` picks the pre-tokenizer: ``smollm`` splits every digit, then the
    GPT-2 regex; ``gpt-2``/``default`` the GPT-2 regex alone. Control tokens (type 3) are
    special tokens, user-defined ones (type 4) added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    f = ckpt.fields
    kind, pre = f.get("tokenizer.ggml.model"), f.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise GGUFError(f"{ckpt.path}: tokenizer.ggml.model {kind!r} is not supported (jmerge rebuilds "
                        f"byte-level BPE tokenizers, 'gpt2')")
    if pre not in _PRE:
        raise GGUFError(f"{ckpt.path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(_PRE)})")
    tokens, types = f["tokenizer.ggml.tokens"], f.get("tokenizer.ggml.token_type") or [1] * len(f["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None,
                               byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return tok


def hf_files(ckpt: GGUFCheckpoint) -> dict[str, str]:
    """``{file name: text}``: config.json, generation_config.json, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json of a Llama GGUF."""
    f = ckpt.fields
    config = hf_config(ckpt)
    tokens = f.get("tokenizer.ggml.tokens")
    files = {"config.json": json.dumps(config, indent=2) + "\n",
             "generation_config.json": json.dumps({k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
                                                  | {"do_sample": False}, indent=2) + "\n"}
    if tokens is None:
        log.warning("%s: no tokenizer in the GGUF metadata; no tokenizer files written", ckpt.path)
        return files
    special = {name: tokens[i] for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"),
                                                 ("unk_token", "unknown"))
               if (i := f.get(f"tokenizer.ggml.{key}_token_id")) is not None and 0 <= i < len(tokens)}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": ckpt.hparams["context"],
                  "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False)),
                  "add_eos_token": bool(f.get("tokenizer.ggml.add_eos_token", False)), "clean_up_tokenization_spaces": False,
                  **special}
    if f.get("tokenizer.chat_template"):
        tok_config["chat_template"] = f["tokenizer.chat_template"]
    files["tokenizer.json"] = hf_tokenizer(ckpt).to_str(pretty=True)
    files["tokenizer_config.json"] = json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"
    files["special_tokens_map.json"] = json.dumps(special, indent=2, ensure_ascii=False) + "\n"
    return files


def to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
          shard_size: int | str = st.DEFAULT_SHARD_SIZE, force: bool = False) -> dict[str, Any]:
    """``model.gguf`` -> an HF Llama directory (safetensors in ``dtype``, default float32)."""
    ckpt = open_gguf(src)
    files = hf_files(ckpt)
    hf_dir.write_dir(dst, ckpt, ckpt.items(), st.output_plan(ckpt.tensors, dtype, shard_size), force=force,
                     extra_files=files)
    return {"tensors": len(ckpt.tensors), "from": "gguf", "to": "safetensors", "model_type": "llama",
            "copied": sorted(files)}


# ---------------------------------------------------------------------------- writing
def _tokenizer_fields(directory: Path) -> dict[str, tuple[Any, Any]]:
    """GGUF tokenizer metadata from an HF directory's byte-level BPE ``tokenizer.json``."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        log.warning("%s: no tokenizer.json; the GGUF gets no tokenizer metadata", directory)
        return {}
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFError(f"{path}: tokenizer model {model.get('type')!r} is not supported for GGUF output (BPE only)")
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        pre_name = "gpt-2"
    elif pre.get("type") == "Sequence" and [p.get("type") for p in pre.get("pretokenizers", [])] == ["Digits", "ByteLevel"] \
            and pre["pretokenizers"][0].get("individual_digits"):
        pre_name = "smollm"
    else:
        raise GGUFError(f"{path}: pre-tokenizer {json.dumps(pre)[:120]} has no llama.cpp equivalent here "
                        f"(supported: ByteLevel; Digits(individual) + ByteLevel)")
    vocab = dict(model["vocab"])
    special = {}
    for a in tj.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        special[a["id"]] = a.get("special", False)
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    holes = [i for i, t in enumerate(tokens) if t == "" and i not in special]
    if holes:
        raise GGUFError(f"{path}: token ids {holes[:5]} are unassigned; GGUF needs a dense vocabulary")
    types = [(_CONTROL if special[i] else _USER_DEFINED) if i in special else int(gguf.TokenType.NORMAL) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    V = gguf.GGUFValueType
    out = {"tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": (pre_name, V.STRING),
           "tokenizer.ggml.tokens": (tokens, V.ARRAY), "tokenizer.ggml.token_type": (types, V.ARRAY),
           "tokenizer.ggml.merges": (merges, V.ARRAY)}
    tc_path = directory / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    template = tc.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        out["tokenizer.chat_template"] = (template, V.STRING)
    out["tokenizer.ggml.add_bos_token"] = (bool(tc.get("add_bos_token", False)), V.BOOL)
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
        tok = tc.get(name)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and tok in vocab:
            out[f"tokenizer.ggml.{key}_token_id"] = (vocab[tok], V.UINT32)
    return out


def metadata_from_hf(directory: str | os.PathLike) -> dict[str, tuple[Any, Any]]:
    """``{key: (value, GGUFValueType)}`` of a Llama HF directory (config.json, tokenizer.json)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise GGUFError(f"{directory}: GGUF output needs the model's config.json")
    c = json.loads(cfg_path.read_text())
    if c.get("model_type") != "llama":
        raise GGUFError(f"{cfg_path}: unsupported architecture {c.get('model_type')!r} for GGUF output (llama only)")
    if c.get("attention_bias") or c.get("mlp_bias") or c.get("rope_scaling"):
        raise GGUFError(f"{cfg_path}: attention_bias, mlp_bias and rope_scaling are not supported for GGUF output")
    V = gguf.GGUFValueType
    heads = int(c["num_attention_heads"])
    md = {"general.name": (c.get("_name_or_path") or directory.name, V.STRING),
          "llama.block_count": (int(c["num_hidden_layers"]), V.UINT32),
          "llama.context_length": (int(c.get("max_position_embeddings", 2048)), V.UINT32),
          "llama.embedding_length": (int(c["hidden_size"]), V.UINT32),
          "llama.feed_forward_length": (int(c["intermediate_size"]), V.UINT32),
          "llama.attention.head_count": (heads, V.UINT32),
          "llama.attention.head_count_kv": (int(c.get("num_key_value_heads") or heads), V.UINT32),
          "llama.rope.freq_base": (float(c.get("rope_theta", 10000.0)), V.FLOAT32),
          "llama.attention.layer_norm_rms_epsilon": (float(c.get("rms_norm_eps", 1e-6)), V.FLOAT32),
          "llama.vocab_size": (int(c["vocab_size"]), V.UINT32),
          "llama.rope.dimension_count": (int(c.get("head_dim") or c["hidden_size"] // heads), V.UINT32)}
    return {**md, **_tokenizer_fields(directory)}


def metadata_from_gguf(ckpt: GGUFCheckpoint) -> dict[str, tuple[Any, Any]]:
    """The base GGUF's metadata, as ``{key: (value, type[, sub type])}``, minus the keys the writer sets."""
    out = {}
    for k, f in ckpt.reader.fields.items():
        if k.startswith(_OWN_KEYS):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        out[k] = (_value(f), vtype, sub)
    return out


def _hp_from_metadata(md: Mapping[str, tuple]) -> dict[str, int]:
    heads = int(md["llama.attention.head_count"][0])
    return {"layers": int(md["llama.block_count"][0]), "heads": heads,
            "kv_heads": int(md.get("llama.attention.head_count_kv", (heads,))[0])}


@dataclass(frozen=True)
class _Planned:
    hf: str
    gguf: str
    shape: tuple[int, ...]
    qtype: Q


def _plan(shapes: Mapping[str, tuple[int, ...]], hp: Mapping[str, int], qtype: Q, where: str) -> list[_Planned]:
    names = name_map(hp["layers"])
    unknown = [n for n in shapes if n not in names]
    if unknown:
        raise GGUFError(f"{where}: tensor(s) with no Llama GGUF name: {st._show(unknown)}")
    planned, fallback = [], []
    for n, shape in shapes.items():
        q = qtype
        if len(shape) < 2:
            q = Q.F32  # norms stay F32, as llama.cpp keeps 1-D tensors
        elif q not in (Q.F32, Q.F16, Q.BF16) and shape[-1] % gguf.GGML_QUANT_SIZES[q][0]:
            q = Q.F16
            fallback.append(n)
        planned.append(_Planned(n, names[n], tuple(shape), q))
    if fallback:
        log.warning("%s: %d tensor(s) have rows not a multiple of the %s block (%d) and are stored F16: %s", where,
                    len(fallback), qtype.name, gguf.GGML_QUANT_SIZES[qtype][0], st._show(fallback))
    return planned


def write_gguf(
    out: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, tuple],
    *,
    quant: str = "f32",
    tied: bool = True,
    record: Mapping[str, str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Writes ``(HF name, array)`` pairs (in the order of ``shapes``) as a Llama GGUF file.

    ``metadata`` is ``{key: (value, GGUFValueType[, sub type])}`` (:func:`metadata_from_gguf`,
    :func:`metadata_from_hf`); ``record`` is stored as ``jmerge.<key>`` strings. With ``tied``,
    ``lm_head.weight`` (if given) must equal the embedding and is not stored. One tensor is in
    memory at a time. Returns ``{"tensors", "types": {type: count}, "fallback_f16"}``.
    """
    out = Path(out)
    qtype = QUANTS.get(quant.lower())
    if qtype is None:
        raise GGUFError(f"unsupported GGUF output type {quant!r}; choose one of {', '.join(QUANTS)}")
    hf_dir.refuse_existing(out, force)
    shapes = {n: tuple(s) for n, s in shapes.items() if not (tied and n == "lm_head.weight")}
    hp = _hp_from_metadata(metadata)
    planned = _plan(shapes, hp, qtype, str(out))
    writer = gguf.GGUFWriter(None, "llama")
    for k, (v, vtype, *sub) in metadata.items():
        writer.add_key_value(k, v, vtype, sub_type=sub[0] if sub else None)
    writer.add_file_type(int(_FILE_TYPES[qtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in (record or {}).items():
        writer.add_string(f"jmerge.{k}", str(v))
    for p in planned:
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(p.shape, p.qtype)))
        writer.add_tensor_info(p.gguf, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)
    counts: dict[str, int] = {}

    def write(tmp: str) -> None:
        try:
            writer.write_header_to_file(Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            by_name = {p.hf: p for p in planned}
            done, embed = 0, None
            for name, array in tensors:
                if tied and name == "lm_head.weight":
                    if embed is not None and not np.array_equal(np.asarray(array, np.float32), embed):
                        raise GGUFError(f"{out}: lm_head.weight differs from model.embed_tokens.weight but the model "
                                        f"is tied (tie_word_embeddings); GGUF stores one of them")
                    continue
                p = by_name.get(name)
                if p is None or done >= len(planned) or p is not planned[done]:
                    expected = repr(planned[done].hf) if done < len(planned) else "no more tensors"
                    raise GGUFError(f"{out}: tensor {name!r} arrives out of order (expected {expected})")
                if tuple(array.shape) != p.shape:
                    raise GGUFError(f"{out}: tensor {name!r} has shape {list(array.shape)}, the plan says {list(p.shape)}")
                w = np.asarray(array, np.float32)
                if name == "model.embed_tokens.weight" and tied:
                    embed = w
                heads = _qk_heads(name, hp)
                w = np.ascontiguousarray(permute_qk(w, heads) if heads else w)
                writer.write_tensor_data(gguf.quants.quantize(w, p.qtype))
                counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
                done += 1
            if done != len(planned):
                raise GGUFError(f"{out}: {len(planned) - done} tensor(s) were never given, first {planned[done].hf!r}")
        finally:
            writer.close()

    try:
        atomic_write(out, write, overwrite=True)  # existence checked above, before any work
    except OSError as e:
        if isinstance(e, hf_dir.OutputError):
            raise
        raise hf_dir.OutputError(hf_dir.describe_os_error(e, out) + "; nothing was written") from e
    return {"tensors": len(planned), "types": counts,
            "fallback_f16": sum(1 for p in planned if p.qtype == Q.F16 and qtype != Q.F16)}


def from_hf(src: str | os.PathLike, out: str | os.PathLike, *, quant: str = "f32", template: str | os.PathLike | None = None,
            record: Mapping[str, str] | None = None, force: bool = False) -> dict[str, Any]:
    """An HF Llama directory -> ``out.gguf``. Metadata: the ``template`` GGUF's when given (a
    merge keeps its base's), else built from ``src``'s config.json and tokenizer.json."""
    ckpt = st.open_checkpoint(src)
    cfg = json.loads((Path(src) / "config.json").read_text()) if (Path(src) / "config.json").is_file() else {}
    if template is not None and is_gguf(template):
        base = open_gguf(template)
        md, tied = metadata_from_gguf(base), base.tied
        if base.hparams["vocab"] != ckpt.tensors["model.embed_tokens.weight"].shape[0]:
            raise GGUFError(f"{src}: model.embed_tokens.weight has vocabulary "
                            f"{ckpt.tensors['model.embed_tokens.weight'].shape[0]}, base {template} has {base.hparams['vocab']}")
    else:
        md, tied = metadata_from_hf(src), bool(cfg.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in ckpt.tensors:
        raise GGUFError(f"{src}: tie_word_embeddings is false but there is no lm_head.weight")
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    order = [n for n in hf_names(_hp_from_metadata(md)["layers"], tied=False) if n in shapes]
    order += [n for n in shapes if n not in order]  # unknown names are refused by the plan, by name
    info = write_gguf(out, ((n, ckpt.read(n)) for n in order), {n: shapes[n] for n in order}, md, quant=quant,
                      tied=tied, record=record, force=force)
    return {**info, "from": "safetensors", "to": f"gguf {quant.lower()}", "model_type": "llama", "copied": []}


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, quant: str | None = None, dtype: str | None = None,
            shard_size: int | str = st.DEFAULT_SHARD_SIZE, force: bool = False) -> dict[str, Any]:
    """``jmerge convert``: ``model.gguf -> hf_dir/`` or ``hf_dir/ -> out.gguf`` (``quant``, default f32).
    A jmerge output directory's merge record (``jmerge_config.yml``, ``coefficients.json``) goes into
    the GGUF as ``jmerge.config`` / ``jmerge.coefficients``, so a learned merge is written to HF
    and GGUF from one learning run."""
    if is_gguf(src) and is_gguf(dst):
        raise GGUFError(f"{src} -> {dst}: GGUF to GGUF is not a conversion; give an HF directory on one side")
    if is_gguf(src):
        if quant is not None:
            raise GGUFError("--quant applies to GGUF output; HF output takes --dtype")
        return to_hf(src, dst, dtype=dtype, shard_size=shard_size, force=force)
    if dtype is not None:
        raise GGUFError("--dtype applies to HF output; GGUF output takes --quant")
    from jmerge import __version__

    record = {"version": __version__, "source": str(src)}
    for key, name in (("config", "jmerge_config.yml"), ("coefficients", "coefficients.json")):
        if (Path(src) / name).is_file():
            record[key] = (Path(src) / name).read_text(encoding="utf-8")
    return from_hf(src, dst, quant=quant or "f32", record=record, force=force)
