"""PEFT LoRA adapter directories, without torch.

An adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``,
``use_rslora``, ``fan_in_fan_out``, ``rank_pattern``, ``alpha_pattern``...) and
``adapter_model.safetensors`` with, per adapted module ``m``, the factors
``base_model.model.<m>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight`` ``(out, r)``
(embeddings: ``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B`` ``(dim, r)``). The
weight update is (Hu et al., 2021, arXiv 2106.09685; rsLoRA: Kalajdzievski, 2023, arXiv 2312.03732)

    ΔW = s · B A,   s = alpha / r   (alpha / sqrt(r) with use_rslora),

in torch's ``(out, in)`` layout; GPT-2's ``Conv1D`` (``fan_in_fan_out``) stores ``ΔWᵀ`` and an
embedding ``(B A)ᵀ``. :func:`open_adapter` reads the config and the safetensors header only;
:meth:`Adapter.check_base` matches every module to a base tensor (HF Llama, GPT-2 and other
names: ``<m>.weight``, or with leading components of ``m`` dropped, e.g.
``transformer.h.0.attn.c_attn`` -> ``h.0.attn.c_attn.weight``) and checks ranks and shapes,
naming the module, before any tensor is read. :func:`save_adapter` writes a directory
atomically, in the form PEFT loads (one rank for every module, ``use_rslora: false``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from jmerge.io.hf_dir import atomic_dir
from jmerge.io.safetensors_io import Checkpoint, CheckpointError, TensorInfo, read_header, save_safetensors

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
_FACTOR = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?")


class AdapterError(CheckpointError):
    """An adapter directory that cannot be used, or does not fit its base model."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its factors (header only), rank and alpha."""

    name: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    use_rslora: bool

    @property
    def embedding(self) -> bool:
        return "lora_embedding" in self.a.name

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``k`` with ``module``
    ending in ``k`` at a dot boundary (``k`` is a regular expression)."""
    for key, value in patterns.items():
        if re.match(rf"(?:.*\.)?{key}$", module):
            return value
    return default


def targets(module: str, target_modules) -> bool:
    """PEFT's ``target_modules`` rule: a string is a regular expression the whole module name
    matches; a list names modules by their last components."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter opened by header only; :meth:`factors` and :meth:`delta` read tensors."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    checkpoint: Checkpoint

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def factors(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """``(A, B)`` of ``module`` as float32."""
        m = self.modules[module]
        return (np.asarray(self.checkpoint.read(m.a.name), np.float32),
                np.asarray(self.checkpoint.read(m.b.name), np.float32))

    def product(self, module: str) -> np.ndarray:
        """``s · B A`` in factor layout ``(B rows, A columns)``: PEFT's SVD combinations work on it."""
        a, b = self.factors(module)
        return np.float32(self.modules[module].scaling) * (b @ a)

    def delta(self, module: str) -> np.ndarray:
        """ΔW of ``module`` in its base tensor's layout (transposed for embeddings and
        ``fan_in_fan_out``)."""
        return to_base_layout(self.product(module), self.modules[module].embedding, self.fan_in_fan_out)

    def base_names(self, base_names: Iterable[str]) -> dict[str, str]:
        """``{module: base tensor name}``; an adapter module the base lacks is refused, naming it."""
        names = set(base_names)
        out = {}
        for module in self.modules:
            found = base_tensor(module, names)
            if found is None:
                raise AdapterError(f"{self.path}: adapter module {module!r} has no weight in the base model "
                                   f"(looked for {module}.weight and its suffixes)")
            out[module] = found
        return out

    def check_base(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
        """Checks the adapter against a base's ``{tensor name: shape}`` (headers): every module has
        a base weight of the shape its factors give, and every ``target_modules`` entry names a
        module the base has. Returns ``{module: base tensor name}``."""
        mapping = self.base_names(shapes)
        listed = self.config.get("target_modules")
        if isinstance(listed, (list, tuple)):
            base_modules = [n[: -len(".weight")] for n in shapes if n.endswith(".weight")]
            absent = [t for t in listed if not any(targets(m, [t]) for m in base_modules)]
            if absent:
                raise AdapterError(f"{self.path}: target_modules {absent} match no module of the base model")
        for module, name in mapping.items():
            m = self.modules[module]
            rows, cols = m.b.shape[0], m.a.shape[1]
            want = to_base_shape((rows, cols), m.embedding, self.fan_in_fan_out)
            if tuple(shapes[name]) != want:
                raise AdapterError(f"{self.path}: module {module!r}: factors A{list(m.a.shape)} B{list(m.b.shape)} "
                                   f"give a {list(want)} update, but base tensor {name!r} is {list(shapes[name])}")
        return mapping


def to_base_shape(shape: tuple[int, int], embedding: bool, fan_in_fan_out: bool) -> tuple[int, int]:
    return shape[::-1] if embedding or fan_in_fan_out else tuple(shape)


def to_base_layout(product: np.ndarray, embedding: bool, fan_in_fan_out: bool) -> np.ndarray:
    """``B A`` in factor layout to the base tensor's layout."""
    return product.T if embedding or fan_in_fan_out else product


def base_tensor(module: str, names: set[str]) -> str | None:
    """The base tensor a module adapts: ``<module>.weight``, else with leading components dropped."""
    parts = module.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[i:]) + ".weight"
        if name in names:
            return name
    return None


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {kind!r} is not supported (only LORA adapters)")
    for key, bad, why in (("use_dora", True, "DoRA adapters are not supported"),
                          ("bias", None, "adapters that train biases are not supported (bias must be 'none')")):
        value = cfg.get(key)
        if (bad is True and value) or (bad is None and value not in (None, "none")):
            raise AdapterError(f"{cfg_path}: {key}={value!r}: {why}")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(f"{cfg_path}: {key} must be a positive number, got {value!r}")
    if cfg.get("target_modules") is None:
        raise AdapterError(f"{cfg_path}: target_modules is missing")
    return cfg


def open_adapter(path: str | os.PathLike) -> Adapter:
    """Opens a PEFT LoRA adapter directory: config and safetensors header, no tensor data.

    Refused, naming the file and tensor: a missing or invalid config, DoRA, trained biases,
    tensors other than LoRA factors (``modules_to_save``), a module with only one factor, a
    module outside ``target_modules``, factors whose rank is not the configured one
    (``r`` / ``rank_pattern``), or whose shapes do not chain (``A (r, in)``, ``B (out, r)``).
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory (a PEFT adapter is a directory with {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg = _read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        hint = " (adapter_model.bin is a torch pickle: convert it to safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path}: no {WEIGHTS_NAME}{hint}")
    tensors, metadata = read_header(weights)
    found: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        m = _FACTOR.fullmatch(name[len(_PREFIX):] if name.startswith(_PREFIX) else name)
        if m is None:
            raise AdapterError(f"{weights}: tensor {name!r} is not a LoRA factor (modules_to_save and other "
                               "trained tensors are not supported)")
        found.setdefault(m["module"], {})[m["kind"].replace("embedding_", "")] = info
    modules = {}
    for module, parts in found.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{weights}: module {module!r} has {sorted(parts)} but needs both lora_A and lora_B")
        if not targets(module, cfg["target_modules"]):
            raise AdapterError(f"{weights}: module {module!r} is not in target_modules {cfg['target_modules']!r}")
        a, b = parts["lora_A"], parts["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise AdapterError(f"{weights}: module {module!r}: only linear and embedding LoRA is supported, "
                               f"got A{list(a.shape)} B{list(b.shape)}")
        rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"{weights}: module {module!r} has rank {a.shape[0]} (A{list(a.shape)}, B{list(b.shape)}) "
                               f"but the config says r={rank}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
        modules[module] = LoraModule(module, a, b, rank, alpha, bool(cfg.get("use_rslora", False)))
    if not modules:
        raise AdapterError(f"{weights}: no LoRA factors")
    return Adapter(path, cfg, modules, Checkpoint(weights, tensors, metadata))


def save_adapter(
    out: str | os.PathLike,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    embeddings: Iterable[str] = (),
    fan_in_fan_out: bool = False,
    base_model: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Writes ``{module: (A, B)}`` (scaling 1: ``ΔW = B A``) as a PEFT adapter directory, atomically.

    Every module must have one rank ``r``; the config says ``r = lora_alpha = r`` and
    ``use_rslora: false``, so PEFT's scaling is 1. ``embeddings`` names modules stored as
    ``lora_embedding_A/B``. ``target_modules`` lists the modules' last components.
    """
    if not factors:
        raise AdapterError(f"{out}: no modules to write")
    ranks = {m: int(np.shape(a)[0]) for m, (a, _) in factors.items()}
    if len(set(ranks.values())) != 1:
        raise AdapterError(f"{out}: modules have different ranks {sorted(set(ranks.values()))}; pad them to one rank")
    r = next(iter(ranks.values()))
    emb = set(embeddings)
    tensors = {}
    for module, (a, b) in factors.items():
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if module in emb else ("lora_A.weight", "lora_B.weight")
        tensors[f"{_PREFIX}{module}.{a_name}"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{_PREFIX}{module}.{b_name}"] = np.ascontiguousarray(b, np.float32)
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False, "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}), "bias": "none", "lora_dropout": 0.0,
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "base_model_name_or_path": base_model, "inference_mode": True, "task_type": None,
        **dict(extra_config or {}),
    }
    with atomic_dir(out, force=force) as tmp:
        files = save_safetensors(tmp, tensors, shard_size=2**62)
        files[0].rename(tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)
