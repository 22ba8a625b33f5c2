"""The modules of a multimodal checkpoint (mergekit's ``modules:``), each merged on its own:
per architecture (config.json's ``architectures[0]``), each module's name (mergekit 0.1.5's),
the name prefixes of its tensors and the config.json section holding its layer count.

The prefixes cover both layouts transformers writes: before 4.52 ``language_model.model.layers...``,
``vision_tower...``, ``multi_modal_projector...``; since, ``model.language_model.layers...`` and so
on, with the head at the top (``lm_head``). Within a module, layers are numbered from 0 and the
stack comes from the tensor names (:func:`jmerge.config.hf_layers.layers_of`).

Every other architecture is one module, ``default`` (mergekit's name for it), holding every tensor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Module:
    """A module: the tensors whose names start with one of ``prefixes``; its layer count sits in
    config.json's ``config`` section (None: the top level)."""

    name: str
    prefixes: tuple[str, ...] = ("",)
    config: str | None = None

    def owns(self, tensor: str) -> bool:
        return tensor.startswith(self.prefixes)


WHOLE = Module("default")

_VISION_LANGUAGE = (  # LLaVA and the models laid out as it is
    Module("text_decoder", ("language_model.", "model.language_model.", "lm_head."), "text_config"),
    Module("vision_tower", ("vision_tower.", "model.vision_tower."), "vision_config"),
    Module("multi_modal_projector", ("multi_modal_projector.", "model.multi_modal_projector.")),
)

MODULES: dict[str, tuple[Module, ...]] = {
    # mergekit 0.1.5 has no LLaVA definition (it infers modules from tensor names, named by their layer
    # prefixes); jmerge names LLaVA's modules as mergekit's Mistral3 and Gemma3 definitions do
    "LlavaForConditionalGeneration": _VISION_LANGUAGE,
    "Mistral3ForConditionalGeneration": _VISION_LANGUAGE,
    "Gemma3ForConditionalGeneration": _VISION_LANGUAGE,
}


def modules_of(architecture: str | None) -> dict[str, Module]:
    """The modules of ``architecture`` by name (``{"default": WHOLE}`` for a single-module one)."""
    return {m.name: m for m in MODULES.get(architecture, (WHOLE,))}
