"""Classification tasks: the :class:`Task` interface (CSV/JSONL/arrays) and offline data loaders.

``load(name)`` returns one of the offline tasks; each loader raises :class:`DataUnavailable`
naming the missing package or file and the make target that installs it.
"""

from __future__ import annotations

from typing import Callable

from experiments.data import images, text
from experiments.data.task import SPLITS, DataUnavailable, Split, Task, split_indices

LOADERS: dict[str, Callable[..., Task]] = {
    "rotten_tomatoes": text.rotten_tomatoes,
    "wordnet_noun": lambda seed=0: text.wordnet_supersense("noun", seed=seed),
    "wordnet_verb": lambda seed=0: text.wordnet_supersense("verb", seed=seed),
    "wordnet_adj": text.wordnet_adjective_type,
    "fortunes_language": text.fortunes_language,
    "fortunes_topic": text.fortunes_topic,
    "wordnet_pos": text.wordnet_pos,
    "fortunes_genre": lambda seed=0: text.fortunes_topic(seed, text.FORTUNES_GENRES, "fortunes_genre"),
    "debates_2016": text.debates_2016,
    "mnist": images.mnist,
    "fashion_mnist": images.fashion_mnist,
    "digits": images.sklearn_digits,
    "openclipart": images.openclipart,
}


def load(name: str, seed: int = 0) -> Task:
    """The offline task ``name`` (one of ``LOADERS``), split deterministically from ``seed``."""
    if name not in LOADERS:
        raise ValueError(f"unknown task {name!r} (available: {', '.join(LOADERS)})")
    return LOADERS[name](seed=seed)


__all__ = ["LOADERS", "SPLITS", "DataUnavailable", "Split", "Task", "load", "split_indices"]
