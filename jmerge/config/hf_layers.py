"""A decoder checkpoint's stack of layers, read from tensor names (headers only), and the
output ``config.json`` (layer count and dtype, as mergekit 0.1.5's ``_model_out_config`` sets them).

Layer tensors are named ``<prefix>.<i>.<part>`` with ``prefix`` ending in ``layers``, ``h`` or
``blocks`` (Llama, Mistral, Qwen2: ``model.layers``; GPT-2: ``h`` or ``transformer.h``). The
other tensors sit before the layers (embeddings: ``embed_tokens``, ``wte``, ``wpe``) or after
them (final norm, head), which is what a frankenmerge takes from its first or last slice. A
multimodal checkpoint's stacks are read per module (:mod:`.hf_modules`), each module's tensors alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from jmerge.config.hf_modules import MODULES, WHOLE, Module
from jmerge.config.schema import ConfigError
from jmerge.io import safetensors_io as st

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # config.json's layer count, by architecture
_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks))\.(?P<n>\d+)\.(?P<part>.+)$")
_BEFORE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|embeddings?|pre_layrnorm|ln_pre|patch_conv)(?:\.|$)")


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


def layers_of(ckpt: st.Checkpoint, module: Module = WHOLE) -> Layers:
    """The layer stack of ``module`` in ``ckpt`` (a module of a multimodal checkpoint may have
    none: every tensor is then before); a config error naming the checkpoint when there is not
    exactly one stack, its layers differ, or ``config.json`` gives another count."""
    stacks: dict[str, dict[int, list[str]]] = {}
    other = []
    for name in filter(module.owns, ckpt.tensors):
        m = _LAYER.match(name)
        if m is None:
            other.append(name)
        else:
            stacks.setdefault(m["prefix"], {}).setdefault(int(m["n"]), []).append(m["part"])
    if not stacks and module != WHOLE:
        return Layers("", 0, (), tuple(other), ())
    if len(stacks) != 1:
        found = ", ".join(sorted(stacks)) or "none"
        where = "" if module == WHOLE else f" (module {module.name})"
        multimodal = module == WHOLE and architecture(ckpt.directory) in MODULES
        hint = "; merge each stack's module with `modules:`" if multimodal else ""
        raise ConfigError(f"{ckpt.path}{where}: slices and gradients need one stack of layers named "
                          f"<prefix>.<i>.<part> (prefix ending in layers, h or blocks); found: {found}{hint}")
    prefix, by_index = next(iter(stacks.items()))
    count = max(by_index) + 1
    parts = tuple(by_index[0]) if 0 in by_index else ()
    for i in range(count):
        if sorted(by_index.get(i, [])) != sorted(parts):
            raise ConfigError(f"{ckpt.path}: layer {prefix}.{i} does not hold the tensors of {prefix}.0")
    declared = _declared_layers(ckpt.directory, module.config)
    if declared is not None and declared != count:
        where = "" if module.config is None else f" ({module.config})"
        raise ConfigError(f"{ckpt.directory / 'config.json'}{where} says {declared} layers; the weights hold {count}")
    return Layers(prefix, count, parts, tuple(n for n in other if _BEFORE.search(n)),
                  tuple(n for n in other if not _BEFORE.search(n)))


def read_config(directory: Path) -> dict | None:
    """``directory``'s config.json, or None when it has none."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def architecture(directory: Path) -> str | None:
    """config.json's ``architectures[0]``, or None."""
    return ((read_config(directory) or {}).get("architectures") or [None])[0]


def _section(cfg: dict, key: str | None) -> dict:
    """The config.json section ``key`` (a module's, e.g. ``text_config``; None: the top level)."""
    return cfg if key is None else cfg.setdefault(key, {})


def _declared_layers(directory: Path, section: str | None = None) -> int | None:
    cfg = _section(read_config(directory) or {}, section)
    return next((cfg[k] for k in LAYER_KEYS if isinstance(cfg.get(k), int)), None)


def _set_layers(cfg: dict, layers: list[tuple[Path, int]], section: str | None) -> None:
    """Sets the layer count of ``cfg``'s ``section`` to ``len(layers)`` and takes its per-layer
    lists from the layers' models (output layer ``j`` is layer ``index`` of ``model`` for ``layers[j]``)."""
    cfg = _section(cfg, section)
    key = next((k for k in LAYER_KEYS if k in cfg), LAYER_KEYS[0])
    per_layer = [k for k, v in cfg.items() if isinstance(v, list) and len(v) == cfg.get(key)]
    sources = {p: _section(read_config(p) or {}, section) for p in dict.fromkeys(p for p, _ in layers)}
    for k in per_layer:
        if all(isinstance(sources[p].get(k), list) and i < len(sources[p][k]) for p, i in layers):
            cfg[k] = [sources[p][k][i] for p, i in layers]
    cfg[key] = len(layers)


def out_config(directory: Path, *, dtype: str | None, layers: dict[Module, list[tuple[Path, int]]] | None,
               vocab_size: int | None = None) -> str | None:
    """The output ``config.json``: the donor's, with ``torch_dtype`` (and ``dtype``, when the
    donor has it: transformers 5's name) set to the output dtype, as mergekit writes them, and,
    for a frankenmerge whose output layer ``j`` of a module is layer ``layers[module][j] = (model,
    index)``, the module's layer count set to ``len(layers[module])`` and every per-layer list
    (e.g. Qwen2's ``layer_types``) taken from those layers' models, in the module's config.json
    section, and ``vocab_size`` to the output vocabulary's (mergekit's ``_update_config_vocab``);
    None when the donor has no ``config.json``."""
    cfg = read_config(directory)
    if cfg is None:
        return None
    if dtype is not None:
        cfg["torch_dtype"] = dtype
        if "dtype" in cfg:
            cfg["dtype"] = dtype
    for module, taken in (layers or {}).items():
        _set_layers(cfg, taken, module.config)
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return json.dumps(cfg, indent=2) + "\n"
