"""The suites' two kinds of model behind one interface: an encoder maps a batch of prepared
inputs to features, ``encode(params, batch) -> [B, dim]``.

- :class:`TextEncoder`: jmerge's BERT (all-MiniLM-L6-v2) over :class:`Tokens`, mean-pooled.
- :class:`ImageEncoder`: MobileNetV2 over :class:`Images` (normalised pixels), average-pooled.

Prepared inputs have ``labels``, ``take(idx)``, ``batch(idx)`` (the model's input arrays for
those rows) and ``order()``, the row order that makes batching cheap (texts longest first,
so that each batch, trimmed to its longest row, compiles to few shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from experiments.data import Split
from experiments.models.bert import Bert

BUCKET = 16  # sequences are cut to the batch's longest length, rounded up to a multiple of this


def trim(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drops all-padding columns beyond the longest row (rounded up to ``BUCKET``)."""
    n = int(mask.sum(1).max()) if len(mask) else 1
    n = min(ids.shape[1], -(-n // BUCKET) * BUCKET)
    return ids[:, :n], mask[:, :n]


@dataclass(frozen=True, eq=False)
class Tokens:
    """A tokenised split: ``ids``/``mask`` int32 ``[N, max_len]`` and int32 ``labels``."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> "Tokens":
        return Tokens(self.ids[idx], self.mask[idx], self.labels[idx])

    def batch(self, idx) -> dict[str, np.ndarray]:
        """``{"ids", "mask"}`` of rows ``idx``, trimmed (:func:`trim`)."""
        ids, mask = trim(self.ids[idx], self.mask[idx])
        return {"ids": ids, "mask": mask}

    def order(self) -> np.ndarray:
        return np.argsort(-self.mask.sum(1), kind="stable")


@dataclass(frozen=True, eq=False)
class Images:
    """A prepared image split: normalised float32 ``pixels [N, H, W, 3]`` and int32 ``labels``."""

    pixels: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> "Images":
        return Images(self.pixels[idx], self.labels[idx])

    def batch(self, idx) -> dict[str, np.ndarray]:
        return {"pixels": self.pixels[idx]}

    def order(self) -> np.ndarray:
        return np.arange(len(self))


def tokenize(tokenizer: Callable, split: Split) -> Tokens:
    ids, mask = tokenizer(list(split.inputs))
    return Tokens(ids, mask, split.labels)


@dataclass(frozen=True)
class TextEncoder:
    """Mean-pooled BERT embeddings of ``{"ids", "mask"}`` batches."""

    bert: Bert

    @property
    def dim(self) -> int:
        return self.bert.config.hidden_size

    def encode(self, params, batch: dict):
        return self.bert.encode(params, batch["ids"], batch["mask"])


@dataclass(frozen=True)
class ImageEncoder:
    """MobileNetV2's pooled 1280-d features of ``{"pixels"}`` batches (batch norm frozen)."""

    net: "MobileNetV2"  # noqa: F821 (experiments.models.mobilenet, imported on use)

    dim: int = 1280

    def encode(self, params, batch: dict):
        return self.net.encode(params, batch["pixels"])


def load(model: str, max_len: int, image_size: int) -> tuple[object, dict, Callable[[Split], object]]:
    """``(encoder, base params, prepare)`` for ``model`` ("minilm" or "mobilenet_v2"), where
    ``prepare(split)`` tokenises (``max_len``) or resizes and normalises (``image_size``) a split."""
    if model == "minilm":
        from experiments.models.bert import load_minilm, minilm_tokenizer

        bert, base = load_minilm()
        tokenizer = minilm_tokenizer(max_len)
        return TextEncoder(bert), base, lambda split: tokenize(tokenizer, split)
    if model == "mobilenet_v2":
        from experiments.models.mobilenet import load_mobilenet_v2, preprocess

        net, params = load_mobilenet_v2()
        base = {k: v for k, v in params.items() if k != "classifier"}  # the ImageNet head is not used
        return (ImageEncoder(net), base,
                lambda split: Images(np.asarray(preprocess(split.inputs, size=image_size)), split.labels))
    raise ValueError(f"unknown suite model {model!r} (minilm, mobilenet_v2)")
