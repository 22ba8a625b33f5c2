"""A decoder checkpoint's stack of layers, read from tensor names (headers only), and the
output ``config.json`` (layer count and dtype, as mergekit 0.1.5's ``_model_out_config`` sets them).

Layer tensors are named ``<prefix>.<i>.<part>`` with ``prefix`` ending in ``layers``, ``h`` or
``blocks`` (Llama, Mistral, Qwen2: ``model.layers``; GPT-2: ``h`` or ``transformer.h``). The
other tensors sit before the layers (embeddings: ``embed_tokens``, ``wte``, ``wpe``) or after
them (final norm, head), which is what a frankenmerge takes from its first or last slice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from jmerge.config.schema import ConfigError
from jmerge.io import safetensors_io as st

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # config.json's layer count, by architecture
_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks))\.(?P<n>\d+)\.(?P<part>.+)$")
_BEFORE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embeddings?)(?:\.|$)")


@dataclass(frozen=True)
class Layers:
    """``count`` layers ``<prefix>.<i>.<part>`` (every layer has the same ``parts``); the
    other tensors ``before`` (embeddings) and ``after`` (norms, head) them."""

    prefix: str
    count: int
    parts: tuple[str, ...]
    before: tuple[str, ...]
    after: tuple[str, ...]

    def name(self, index: int, part: str) -> str:
        return f"{self.prefix}.{index}.{part}"


def layers_of(ckpt: st.Checkpoint) -> Layers:
    """The layer stack of ``ckpt``; a config error naming the checkpoint when there is not
    exactly one stack, its layers differ, or ``config.json`` gives another count."""
    stacks: dict[str, dict[int, list[str]]] = {}
    other = []
    for name in ckpt.tensors:
        m = _LAYER.match(name)
        if m is None:
            other.append(name)
        else:
            stacks.setdefault(m["prefix"], {}).setdefault(int(m["n"]), []).append(m["part"])
    if len(stacks) != 1:
        found = ", ".join(sorted(stacks)) or "none"
        raise ConfigError(f"{ckpt.path}: slices and gradients need one stack of layers named "
                          f"<prefix>.<i>.<part> (prefix ending in layers, h or blocks); found: {found}")
    prefix, by_index = next(iter(stacks.items()))
    count = max(by_index) + 1
    parts = tuple(by_index[0]) if 0 in by_index else ()
    for i in range(count):
        if sorted(by_index.get(i, [])) != sorted(parts):
            raise ConfigError(f"{ckpt.path}: layer {prefix}.{i} does not hold the tensors of {prefix}.0")
    declared = _declared_layers(ckpt.directory)
    if declared is not None and declared != count:
        raise ConfigError(f"{ckpt.directory / 'config.json'} says {declared} layers; the weights hold {count}")
    return Layers(prefix, count, parts, tuple(n for n in other if _BEFORE.search(n)),
                  tuple(n for n in other if not _BEFORE.search(n)))


def _read_config(directory: Path) -> dict | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _declared_layers(directory: Path) -> int | None:
    cfg = _read_config(directory) or {}
    return next((cfg[k] for k in LAYER_KEYS if isinstance(cfg.get(k), int)), None)


def out_config(directory: Path, *, dtype: str | None, layers: list[tuple[Path, int]] | None,
               vocab_size: int | None = None) -> str | None:
    """The output ``config.json``: the donor's, with ``torch_dtype`` (and ``dtype``, when the
    donor has it: transformers 5's name) set to the output dtype, as mergekit writes them, and,
    for a frankenmerge whose output layer ``j`` is layer ``layers[j] = (model, index)``, the layer
    count set to ``len(layers)`` and every per-layer list (e.g. Qwen2's ``layer_types``) taken
    from those layers' models, and ``vocab_size`` to the output vocabulary's (mergekit's
    ``_update_config_vocab``); None when the donor has no ``config.json``."""
    cfg = _read_config(directory)
    if cfg is None:
        return None
    if dtype is not None:
        cfg["torch_dtype"] = dtype
        if "dtype" in cfg:
            cfg["dtype"] = dtype
    if layers is not None:
        key = next((k for k in LAYER_KEYS if k in cfg), LAYER_KEYS[0])
        per_layer = [k for k, v in cfg.items() if isinstance(v, list) and len(v) == cfg.get(key)]
        sources = {p: _read_config(p) or {} for p in dict.fromkeys(p for p, _ in layers)}
        for k in per_layer:
            if all(isinstance(sources[p].get(k), list) and i < len(sources[p][k]) for p, i in layers):
                cfg[k] = [sources[p][k][i] for p, i in layers]
        cfg[key] = len(layers)
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return json.dumps(cfg, indent=2) + "\n"
