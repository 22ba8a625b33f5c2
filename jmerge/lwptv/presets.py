"""Layer-grouping presets: which transformer block (or embedding, norm, head group) each
parameter belongs to, from its path, for Hugging Face Flax and torch-style checkpoints.

A preset is an ordered list of rules ``(regex, name template, rank)``, tried in order on
each parameter path (``jmerge.tree.paths``: nested keys joined by ``/``, flat keys as
they are, so ``[./]`` matches both separators). The first match names the layer
(``template.format(**match.groupdict())``); ``rank`` and the block number order the layers
as they sit in the model (embeddings, blocks by index, final norm, pooler, head). A preset
is a callable ``path -> name | None``, so it plugs into :func:`jmerge.layers.group_layers`.

Presets: ``bert`` (BERT/MiniLM/RoBERTa), ``gpt2``, ``llama`` (Llama/Mistral/Gemma),
``vit`` and ``clip`` (HF ViT and CLIP, one rule set), ``jmerge_bert`` (jmerge's own BERT in
:mod:`experiments.models.bert`), ``jmerge_mobilenet`` (stem, 17 blocks, head conv and classifier of
:mod:`experiments.models.mobilenet`), and ``tensor`` (one layer per tensor). Embeddings, final
norms, poolers and task heads are layers of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

from jmerge._util import did_you_mean
from jmerge import layers as jlayers
from jmerge import tree as jtree
from jmerge.validate import MergeInputError

_S = r"[./]"  # a path separator: "/" in nested pytrees, "." in torch-style flat names
_P = r"(?:^|.*[./])"  # start of the path, or any prefix ending in a separator ("bert/", "model.")


@dataclass(frozen=True)
class Preset:
    """A named layer rule: ``rules`` are ``(regex, name template, rank)``, first match wins."""

    name: str
    rules: tuple[tuple[str, str, int], ...]

    def __post_init__(self):
        object.__setattr__(self, "_compiled", tuple((re.compile(p), t, r) for p, t, r in self.rules))

    def match(self, path: str) -> tuple[str, tuple] | None:
        """``(layer name, sort key)`` of ``path``, or None when no rule matches."""
        for pattern, template, rank in self._compiled:
            m = pattern.search(path)
            if m is not None:
                groups = m.groupdict()
                block = int(groups["n"]) if groups.get("n") is not None else -1
                return template.format(**groups), (rank, block)
        return None

    def __call__(self, path: str) -> str | None:
        hit = self.match(path)
        return None if hit is None else hit[0]


def _block(prefix: str, word: str, name: str, rank: int) -> tuple[str, str, int]:
    return (rf"{prefix}{word}{_S}(?P<n>\d+)(?:{_S}|$)", name + ".{n}", rank)


def _part(prefix: str, word: str, name: str, rank: int) -> tuple[str, str, int]:
    return (rf"{prefix}(?:{word})(?:{_S}|$)", name, rank)


# Ranks order layers as they sit in the model: 0 embeddings, 1 pre-norm, 2 blocks,
# 3 final norm, 4 pooler, 5 head (+10 per tower in CLIP).
_HEADS = r"classifier|cls|qa_outputs|lm_head|score|head"

BERT = Preset(
    "bert",
    (
        _block(_P + rf"encoder{_S}", "layers?", "layer", 2),
        _part(_P, "embeddings", "embeddings", 0),
        _part(_P, "pooler", "pooler", 4),
        _part(_P, _HEADS, "head", 5),
    ),
)

GPT2 = Preset(
    "gpt2",
    (
        _block(_P, "h", "layer", 2),
        _part(_P, "wte|wpe", "embeddings", 0),
        _part(_P, "ln_f", "final_norm", 3),
        _part(_P, _HEADS, "head", 5),
    ),
)

LLAMA = Preset(
    "llama",
    (
        _block(_P, "layers", "layer", 2),
        _part(_P, "embed_tokens", "embeddings", 0),
        _part(_P, "norm", "final_norm", 3),
        _part(_P, _HEADS, "head", 5),
    ),
)


def _tower(tower: str, offset: int) -> tuple[tuple[str, str, int], ...]:
    pre = rf"{_P}{tower}{_S}"
    return (
        _block(pre + rf"encoder{_S}", "layers?", f"{tower}.layer", offset + 2),
        _part(pre, "embeddings", f"{tower}.embeddings", offset),
        _part(pre, "pre_layrnorm|pre_layernorm", f"{tower}.pre_norm", offset + 1),
        _part(pre, "post_layernorm|final_layer_norm|layernorm", f"{tower}.final_norm", offset + 3),
        _part(pre, "pooler", f"{tower}.pooler", offset + 4),
    )


VIT = Preset(
    "vit",
    _tower("text_model", 0)
    + (_part(_P, "text_projection", "text_model.projection", 5),)
    + _tower("vision_model", 10)
    + (
        _part(_P, "visual_projection", "vision_model.projection", 15),
        _part(_P, "logit_scale", "logit_scale", 20),
        # HF ViT (no towers): vit/embeddings, vit/encoder/layer/N, vit/layernorm, vit/pooler, classifier
        _block(_P + rf"encoder{_S}", "layers?", "layer", 2),
        _part(_P, "embeddings", "embeddings", 0),
        _part(_P, "pre_layrnorm|pre_layernorm", "pre_norm", 1),
        _part(_P, "post_layernorm|layernorm", "final_norm", 3),
        _part(_P, "pooler", "pooler", 4),
        _part(_P, _HEADS, "head", 5),
    ),
)

# jmerge's own BERT (experiments/models/bert.py): embeddings/{word,position,token_type,norm}/...,
# layers/<n>/...; a pooler or task head beside it (e.g. {"encoder": ..., "head": ...}) is its own layer.
JMERGE_BERT = Preset(
    "jmerge_bert",
    (
        _block(_P, "layers", "layer", 2),
        _part(_P, "embeddings", "embeddings", 0),
        _part(_P, "pooler", "pooler", 4),
        _part(_P, _HEADS, "head", 5),
    ),
)

# jmerge's MobileNetV2 (experiments/models/mobilenet.py): stem/..., blocks/<n>/..., head_conv/..., classifier/...
JMERGE_MOBILENET = Preset(
    "jmerge_mobilenet",
    (
        _block(_P, "blocks", "block", 1),
        _part(_P, "stem", "stem", 0),
        _part(_P, "head_conv", "head_conv", 2),
        _part(_P, _HEADS, "head", 3),
    ),
)

PRESETS: dict[str, Preset] = {
    p.name: p for p in (BERT, GPT2, LLAMA, VIT, Preset("clip", VIT.rules), JMERGE_BERT, JMERGE_MOBILENET)
}

LayerSpec = Union[str, re.Pattern, Preset, Callable[[str], Union[str, None]]]


def get_preset(name: str) -> Preset:
    """The preset called ``name``; unknown names get the closest suggestion."""
    if name not in PRESETS:
        hint = did_you_mean(name, [*PRESETS, "tensor"])
        raise MergeInputError(
            f"unknown layer preset {name!r}{hint} (presets: {', '.join([*PRESETS, 'tensor'])}; "
            "or pass a regex with at least one regex character, re.compile(...), or a callable)"
        )
    return PRESETS[name]


def _as_rule(layers: LayerSpec):
    """``(rule for group_layers, preset or None)``.

    A string is a preset name when it is one, ``"tensor"`` for one layer per tensor, and
    otherwise a regex; a bare word (letters, digits, ``_``) that names no preset is refused
    as a misspelt preset (pass ``re.compile(word)`` to use it as a regex).
    """
    if isinstance(layers, Preset):
        return layers, layers
    if isinstance(layers, str):
        if layers == "tensor":
            return "tensor", None
        if layers in PRESETS or re.fullmatch(r"\w+", layers):
            preset = get_preset(layers)
            return preset, preset
        return layers, None
    if isinstance(layers, re.Pattern):
        return layers.pattern, None
    if callable(layers):
        return layers, None
    raise MergeInputError(
        f"layers must be a preset name, 'tensor', a regex, a Preset or a callable path -> name, got {layers!r}"
    )


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _reorder(grouping: jlayers.LayerGrouping, order: list[str]) -> jlayers.LayerGrouping:
    new_index = {name: i for i, name in enumerate(order)}
    leaf_layer = tuple(new_index[grouping.names[l]] for l in grouping.leaf_layer)
    return jlayers.LayerGrouping(tuple(order), leaf_layer, grouping.leaf_paths)


def describe(layers: LayerSpec) -> str:
    """A short printable name for a layer spec (preset name or regex)."""
    if isinstance(layers, Preset):
        return layers.name
    if isinstance(layers, re.Pattern):
        return layers.pattern
    if isinstance(layers, str):
        return layers
    return getattr(layers, "__name__", repr(layers))


def group(params, layers: LayerSpec = "tensor", *, unassigned: str = "error") -> jlayers.LayerGrouping:
    """Groups the leaves of ``params`` into layers with a preset, regex or callable (a ready
    ``LayerGrouping`` is checked against ``params`` and returned as is).

    Layers are ordered as in the model for presets (embeddings, blocks by number, final
    norm, pooler, head) and in natural order of their names otherwise (``layer/2`` before
    ``layer/10``). Raises :class:`MergeInputError` naming the parameters a rule leaves
    without a layer (unless ``unassigned`` is ``"own"`` or ``"rest"``).
    """
    all_paths = jtree.paths(params)
    if not all_paths:
        raise MergeInputError("params has no leaves to group into layers")
    if isinstance(layers, jlayers.LayerGrouping):
        if tuple(all_paths) != layers.leaf_paths:
            raise MergeInputError("the layer grouping was made for other parameters than these")
        return layers
    rule, preset = _as_rule(layers)
    try:
        fn = jlayers._rule_fn(rule)
    except re.error as e:
        raise MergeInputError(f"layer regex {rule!r} is invalid: {e}") from None
    names = {p: fn(p) for p in all_paths}
    missing = [p for p, n in names.items() if n is None]
    if missing and unassigned == "error":
        what = f"layer rule {describe(layers)!r}"
        if len(missing) == len(all_paths):
            raise MergeInputError(
                f"{what} matches none of the {len(all_paths)} parameters (first: {all_paths[0]!r}); "
                f"check the rule against jmerge.tree.paths(params)"
            )
        shown = ", ".join(repr(p) for p in missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise MergeInputError(
            f"{what} assigns no layer to parameter {shown}; extend the rule or pass unassigned='own' or 'rest'"
        )
    try:
        grouping = jlayers.group_layers(params, rule, unassigned=unassigned)
    except ValueError as e:
        raise MergeInputError(str(e)) from None
    first_path = {}
    for path, l in zip(grouping.leaf_paths, grouping.leaf_layer):
        first_path.setdefault(grouping.names[l], path)

    def key(name):
        hit = preset.match(first_path[name]) if preset is not None else None
        return (0, hit[1], ()) if hit is not None else (1, (0, 0), _natural_key(name))

    return _reorder(grouping, sorted(grouping.names, key=key))
