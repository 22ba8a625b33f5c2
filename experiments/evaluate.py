"""Evaluation pieces shared by the suites: tokenised splits, batched embeddings, linear heads,
accuracy, and the sklearn linear probe used for out-of-domain scoring."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.data import Split
from jmerge.models.bert import Bert

BUCKET = 16  # sequences are cut to the batch's longest length, rounded up to a multiple of this


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


def tokenize(tokenizer, split: Split) -> Tokens:
    ids, mask = tokenizer(list(split.inputs))
    return Tokens(ids, mask, split.labels)


def trim(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drops all-padding columns beyond the longest row (rounded up to ``BUCKET``)."""
    n = int(mask.sum(1).max()) if len(mask) else 1
    n = min(ids.shape[1], -(-n // BUCKET) * BUCKET)
    return ids[:, :n], mask[:, :n]


@partial(jax.jit, static_argnums=0)
def _encode(bert: Bert, params, ids, mask):
    return bert.encode(params, ids, mask)


def embed(bert: Bert, params, tokens: Tokens, batch_size: int = 128) -> np.ndarray:
    """Mean-pooled embeddings ``[N, d]`` (float32), in the order of ``tokens``.

    Rows are sorted by length and each batch is trimmed to its longest row (a few
    compiled shapes), and the last batch is padded to ``batch_size``.
    """
    n = len(tokens)
    lengths = tokens.mask.sum(1)
    order = np.argsort(-lengths, kind="stable")
    out = np.zeros((n, bert.config.hidden_size), np.float32)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        ids, mask = trim(tokens.ids[idx], tokens.mask[idx])
        pad = batch_size - len(idx)
        if pad:
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
        out[idx] = np.asarray(_encode(bert, params, ids, mask))[: len(idx)]
    return out


def init_head(dim: int, num_classes: int) -> dict:
    """A zero-initialised linear head ``{kernel [d, C], bias [C]}``."""
    return {"kernel": jnp.zeros((dim, num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}


def head_logits(head: dict, emb):
    """``emb @ kernel + bias``."""
    return emb @ head["kernel"] + head["bias"]


def head_accuracy(head: dict, emb: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy in percent of the linear head on embeddings."""
    pred = np.asarray(head_logits(head, jnp.asarray(emb))).argmax(-1)
    return float(100.0 * (pred == labels).mean())


def fit_linear_head(emb: np.ndarray, labels: np.ndarray, num_classes: int, *, c: float = 1.0) -> dict:
    """A linear head ``{kernel [d, C], bias [C]}`` from an L2 logistic regression (sklearn,
    lbfgs, ``C=c``) fit on standardised embeddings, with the standardisation folded in:
    ``kernel = (W / s)^T``, ``bias = b - (W / s) mu``. A binary problem becomes logits
    ``[0, z]`` (same softmax as sigmoid(z)); classes absent from ``labels`` get bias -1e4."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = emb.mean(0), emb.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=2000).fit((emb - mu) / sd, labels)
    w, b = clf.coef_ / sd, clf.intercept_
    if len(clf.classes_) == 2:
        w, b = np.concatenate([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    kernel = np.zeros((emb.shape[1], num_classes), np.float32)
    bias = np.full((num_classes,), -1e4, np.float32)
    kernel[:, clf.classes_] = w.T
    bias[clf.classes_] = b - w @ mu
    return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}


def probe_accuracy(train_emb: np.ndarray, train_labels: np.ndarray, eval_emb: np.ndarray, eval_labels: np.ndarray,
                   *, c: float = 1.0) -> float:
    """Accuracy in percent of a linear probe (:func:`fit_linear_head`) fit on ``train_emb``, scored on ``eval_emb``."""
    num_classes = int(max(train_labels.max(), eval_labels.max())) + 1
    return head_accuracy(fit_linear_head(train_emb, train_labels, num_classes, c=c), eval_emb, eval_labels)
