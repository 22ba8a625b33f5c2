"""Frozen zero-shot heads from class descriptions: the text analogue of CLIP's zero-shot heads
in the task-arithmetic papers (Ilharco et al., arXiv 2212.04089, §2: the head is built once
from the *pretrained* text tower and kept frozen for fine-tuning and for every merge).

For task ``t`` with classes ``c = 1..C`` and descriptions ``D_c``, the base encoder ``f_0``
gives the class vector ``w_c = normalize(mean_{d in D_c} normalize(f_0(d)))`` and the head
scores ``logits_c(x) = scale * cos(f(x), w_c)``: :func:`experiments.evaluate.head_logits` with
``kernel = [w_1 .. w_C]`` and ``scale``. The base, every expert (trained with this head frozen,
:mod:`experiments.finetune`) and every merge share it, so all task skill lives in the
encoder's task vector.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from experiments.data import Split, Task
from experiments.data.text import DEBATE_PARTIES, FORTUNES_GENRES, FORTUNES_TOPICS, LEXNAMES
from experiments.evaluate import embed

# Task -> class -> descriptions (keys: each task's class names). As CLIP's "a photo of a {class}",
# each class is described by its name alone; richer hand-written descriptions made the base too
# strong for the entry criteria (experiments/results/suite_t2_design.md).
_LANGUAGES = {"en": "English", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
              "pl": "Polish", "ru": "Russian", "cs": "Czech"}


def _named(classes, name=lambda c: c) -> dict[str, tuple[str, ...]]:
    return {c: (name(c),) for c in classes}


CLASS_DESCRIPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "rotten_tomatoes": _named(("rotten", "fresh")),
    "wordnet_noun": _named([c for c in LEXNAMES if c.startswith("noun.")], lambda c: c.split(".")[1]),
    "wordnet_verb": _named([c for c in LEXNAMES if c.startswith("verb.")], lambda c: c.split(".")[1]),
    "wordnet_pos": {"noun": ("noun",), "verb": ("verb",), "adv": ("adverb",)},
    "fortunes_language": _named(_LANGUAGES, _LANGUAGES.get),
    "fortunes_topic": _named(FORTUNES_TOPICS),
    "fortunes_genre": _named(FORTUNES_GENRES, lambda c: c.replace("-", " and ")),
    "debates_2016": _named(DEBATE_PARTIES),
}


def check_descriptions(task: Task, descriptions: Mapping[str, Mapping[str, Sequence[str]]] = CLASS_DESCRIPTIONS
                       ) -> dict[str, tuple[str, ...]]:
    """``task``'s class descriptions, in class order; raises ``ValueError`` naming the task when
    it has none, when a class has none or when one names a class the task lacks."""
    if task.name not in descriptions:
        raise ValueError(f"task {task.name!r} has no class descriptions")
    given = descriptions[task.name]
    missing = [c for c in task.classes if not [d for d in given.get(c, ()) if d.strip()]]
    if missing:
        raise ValueError(f"task {task.name!r}: no class description for classes {missing}")
    extra = sorted(set(given) - set(task.classes))
    if extra:
        raise ValueError(f"task {task.name!r}: class descriptions for unknown classes {extra}")
    return {c: tuple(given[c]) for c in task.classes}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_head(encoder, base, prepare: Callable[[Split], object], task: Task, scale: float,
                   descriptions: Mapping[str, Mapping[str, Sequence[str]]] = CLASS_DESCRIPTIONS) -> dict:
    """The frozen cosine head ``{kernel [d, C], bias [C] = 0, scale}`` of ``task`` from the base
    encoder's embeddings of its class descriptions (module docstring)."""
    per_class = check_descriptions(task, descriptions)
    texts = [d for c in task.classes for d in per_class[c]]
    owner = np.array([i for i, c in enumerate(task.classes) for _ in per_class[c]], np.int32)
    emb = _unit(embed(encoder, base, prepare(Split(np.array(texts, dtype=object), owner))))
    kernel = np.stack([_unit(emb[owner == i].mean(0)) for i in range(task.num_classes)], axis=1)
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.zeros((task.num_classes,), jnp.float32),
            "scale": jnp.asarray([scale], jnp.float32)}
