"""Flax msgpack checkpoints, and Flax <-> PyTorch parameter layouts, without transformers.

``flax_model.msgpack`` (what transformers' Flax classes save) is read and written with
``flax.serialization.msgpack_restore`` / ``msgpack_serialize``: a nested dict of arrays.

Layouts. Hugging Face Flax models name parameters like their PyTorch twins, with Flax leaf
names and layouts (the same rules as transformers' ``convert_pytorch_state_dict_to_flax``,
written here per tensor so they stream):

==============================  ====================================  ================
Flax leaf                       PyTorch leaf                          array
==============================  ====================================  ================
``Dense/kernel`` (in, out)      ``Linear.weight`` (out, in)           transposed
``FlaxConv1D/kernel`` (out,in)  GPT-2 ``Conv1D.weight`` (in, out)     transposed
``Conv/kernel`` (H, W, in, out) ``Conv2d.weight`` (out, in, H, W)     axes permuted
``Embed/embedding``             ``Embedding.weight``                  as is
``LayerNorm/scale``             ``LayerNorm.weight``                  as is
``RMSNorm/weight`` (Llama, T5)  ``RMSNorm.weight``                    as is
anything else (``bias``...)     same name                             as is
==============================  ====================================  ================

GPT-2's ``Conv1D`` stores its torch weight as (in, out), the transpose of ``nn.Linear``, and
transformers' Flax GPT-2 stores the kernel as (out, in) (``FlaxConv1D`` computes
``x @ kernel.T``), so "transpose every 2-D kernel" holds there too.

Flax -> PyTorch is unambiguous. PyTorch -> Flax must tell an embedding from a kernel and a
LayerNorm ``scale`` from an RMSNorm ``weight``; :class:`NamingRules` decides by the module
name (``*embeddings``, ``embed_tokens``, ``wte``... are embeddings; Llama-style norm names
keep ``weight``) and by ``model_type`` from ``config.json`` (T5-family norms keep ``weight``).
Pass ``like=`` (any Flax params pytree or set of Flax paths) to resolve every name against a
real model instead. Flax -> PyTorch -> Flax is bit-exact (transposes copy values unchanged).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import serialization

from jmerge._util import atomic_write
from jmerge import tree as jtree
from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st

FLAX_NAME = "flax_model.msgpack"

_EMBED_MODULE = re.compile(r"(^|_)(embeddings?|embed_tokens|embed_positions|wte|wpe|shared)$")
_RMS_MODULE = re.compile(
    r"^(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm|norm|q_norm|k_norm)$"
)
_WEIGHT_NORM_MODELS = frozenset({"t5", "mt5", "longt5", "umt5"})


# ---------------------------------------------------------------------------- msgpack files
def read_msgpack(path: str | os.PathLike) -> dict:
    """A ``flax_model.msgpack`` file (or an HF directory holding one) as a nested dict of numpy arrays."""
    path = Path(path)
    if path.is_dir():
        if (path / f"{FLAX_NAME}.index.json").exists():
            raise st.CheckpointError(f"{path}: sharded Flax msgpack checkpoints are not supported; convert a single file")
        path = path / FLAX_NAME
    if not path.is_file():
        raise st.CheckpointError(f"{path}: file not found")
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on bad bytes
        raise st.CheckpointError(f"{path}: corrupt or truncated Flax msgpack file ({type(e).__name__}: {e})") from None
    if not isinstance(tree, dict):
        raise st.CheckpointError(f"{path}: expected a dict of parameters, got {type(tree).__name__}")
    return jax_free(tree)


def jax_free(tree: Any) -> Any:
    """The same nested dict with every leaf a numpy array."""
    if isinstance(tree, Mapping):
        return {k: jax_free(v) for k, v in tree.items()}
    return np.asarray(tree)


def write_msgpack(path: str | os.PathLike, params: Any) -> None:
    """Writes ``params`` (nested dict of arrays) to ``path`` via a temporary file and a rename."""
    data = serialization.msgpack_serialize(jax_free(params))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=True)


# ---------------------------------------------------------------------------- layout conversion
def _kernel_to_torch(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return x.T
    if x.ndim >= 3:  # (spatial..., in, out) -> (out, in, spatial...)
        return np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))
    return x


def _kernel_to_flax(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return x.T
    if x.ndim >= 3:  # (out, in, spatial...) -> (spatial..., in, out)
        return np.transpose(x, (*range(2, x.ndim), 1, 0))
    return x


def flax_to_torch_name(path: str, ndim: int) -> tuple[str, bool]:
    """Flax path (``a/b/kernel``) to PyTorch name (``a.b.weight``), and whether to transpose."""
    parts = path.split("/")
    leaf = parts[-1]
    if leaf == "kernel" and ndim >= 2:
        return ".".join(parts[:-1] + ["weight"]), True
    if leaf in ("embedding", "scale"):
        return ".".join(parts[:-1] + ["weight"]), False
    return ".".join(parts), False


def flax_to_torch(params: Any) -> dict[str, np.ndarray]:
    """Flax params (nested dict, or flat with ``/`` paths) to a flat PyTorch-layout dict."""
    out: dict[str, np.ndarray] = {}
    for path, x in jtree.flatten(params).items():
        x = np.asarray(x)
        name, transpose = flax_to_torch_name(path, x.ndim)
        if name in out:
            raise ValueError(f"Flax parameters {path!r} and another map to the same PyTorch name {name!r}")
        out[name] = _kernel_to_torch(x) if transpose else x
    return out


@dataclass(frozen=True)
class NamingRules:
    """How PyTorch ``weight`` tensors map back to Flax leaves (see module docstring)."""

    model_type: str | None = None
    like: frozenset[str] | None = None

    @classmethod
    def make(cls, model_type: str | None = None, like: Any = None) -> "NamingRules":
        if like is not None and not isinstance(like, (set, frozenset)):
            like = set(jtree.paths(like))
        return cls(model_type, frozenset(like) if like is not None else None)

    def flax_name(self, name: str, ndim: int) -> tuple[str, bool]:
        """PyTorch name to ``(Flax path, transpose?)``."""
        parts = name.split(".")
        leaf, module, prefix = parts[-1], (parts[-2] if len(parts) > 1 else ""), parts[:-1]
        if leaf in ("gamma", "beta") and ndim == 1:  # legacy LayerNorm names
            leaf = "weight" if leaf == "gamma" else "bias"
        if leaf != "weight":
            return "/".join(prefix + [leaf]), False
        if self.like is not None:
            candidates = [("kernel", ndim >= 2), ("embedding", False), ("scale", False), ("weight", False)]
            for cand, transpose in candidates:
                path = "/".join(prefix + [cand])
                if path in self.like:
                    return path, transpose
            raise KeyError(f"PyTorch tensor {name!r} matches no parameter of the given Flax model")
        if ndim >= 3:
            return "/".join(prefix + ["kernel"]), True
        if ndim == 2:
            if _EMBED_MODULE.search(module):
                return "/".join(prefix + ["embedding"]), False
            return "/".join(prefix + ["kernel"]), True
        if self.model_type in _WEIGHT_NORM_MODELS or _RMS_MODULE.match(module):
            return "/".join(prefix + ["weight"]), False
        return "/".join(prefix + ["scale"]), False


def torch_to_flax(
    tensors: Mapping[str, np.ndarray], *, model_type: str | None = None, like: Any = None
) -> dict:
    """Flat PyTorch-layout ``{name: array}`` to nested Flax params (see :class:`NamingRules`)."""
    rules = NamingRules.make(model_type, like)
    nested: dict = {}
    for name, x in tensors.items():
        x = np.asarray(x)
        path, transpose = rules.flax_name(name, x.ndim)
        node = nested
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"PyTorch tensor {name!r}: Flax path {path!r} collides with another parameter")
        if leaf in node:
            raise ValueError(f"PyTorch tensor {name!r}: Flax path {path!r} is produced twice")
        node[leaf] = _kernel_to_flax(x) if transpose else x
    return nested


# ---------------------------------------------------------------------------- HF directories
def detect_format(path: str | os.PathLike) -> str:
    """``"flax"`` (msgpack) or ``"safetensors"`` for a file or an HF directory."""
    path = Path(path)
    if not path.exists():
        raise st.CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".msgpack":
            return "flax"
        if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
            return "safetensors"
        raise st.CheckpointError(f"{path}: unknown checkpoint format (expected .msgpack or .safetensors)")
    if (path / FLAX_NAME).exists() or (path / f"{FLAX_NAME}.index.json").exists():
        if st.find_weights(path) is not None:
            raise st.CheckpointError(f"{path}: holds both Flax msgpack and safetensors weights; pass the file itself")
        return "flax"
    if st.find_weights(path) is not None:
        return "safetensors"
    raise st.CheckpointError(f"{path}: no {FLAX_NAME} or safetensors weights found")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    model_type: str | None = None,
    force: bool = False,
    shard_size: int | str = st.DEFAULT_SHARD_SIZE,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Converts an HF directory (or file) between Flax msgpack and PyTorch-layout safetensors.

    ``to`` defaults to the other format. ``dst`` is an HF directory, written atomically, with
    ``config.json`` and tokenizer files copied from ``src``. Returns a small summary.
    """
    src = Path(src)
    fmt = detect_format(src)
    to = to or ("safetensors" if fmt == "flax" else "flax")
    if to not in ("flax", "safetensors"):
        raise ValueError(f"to must be 'flax' or 'safetensors', got {to!r}")
    src_dir = src if src.is_dir() else src.parent
    mtype = model_type or st.read_model_type(src_dir)
    cast = st.numpy_dtype(dtype) if dtype else None
    with hf_dir.atomic_dir(dst, force=force, protect=[src]) as tmp:
        tensors = flax_to_torch(read_msgpack(src)) if fmt == "flax" else st.open_checkpoint(src).load()
        if cast is not None:
            tensors = {k: v.astype(cast) if st.is_float_array(v) else v for k, v in tensors.items()}
        if to == "safetensors":
            st.save_safetensors(tmp, tensors, shard_size=shard_size)
        else:
            write_msgpack(tmp / FLAX_NAME, torch_to_flax(tensors, model_type=mtype))
        copied = hf_dir.copy_model_files(src_dir, tmp) if src.is_dir() else []
    return {"from": fmt, "to": to, "tensors": len(tensors), "copied": copied, "model_type": mtype}
