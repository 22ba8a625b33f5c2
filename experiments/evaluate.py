"""Evaluation pieces shared by the suites: batched features of any encoder
(:mod:`experiments.encoders`), linear heads, accuracy, and the sklearn linear probe used for
out-of-domain scoring."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@partial(jax.jit, static_argnums=0)
def _encode(encoder, params, batch):
    return encoder.encode(params, batch)


def _pad(batch: dict, size: int) -> dict:
    """Each array of ``batch`` zero-padded along axis 0 to ``size`` rows."""
    return {k: np.concatenate([v, np.zeros((size - len(v), *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def embed(encoder, params, inputs, batch_size: int = 128) -> np.ndarray:
    """Features ``[N, encoder.dim]`` (float32) of prepared ``inputs``, in their order.

    Batches follow ``inputs.order()`` (texts longest first, each batch trimmed: a few
    compiled shapes), and the last batch is padded to ``batch_size``.
    """
    n = len(inputs)
    order = inputs.order()
    out = np.zeros((n, encoder.dim), np.float32)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = _pad(inputs.batch(idx), batch_size)
        out[idx] = np.asarray(_encode(encoder, params, batch))[: len(idx)]
    return out


def init_head(dim: int, num_classes: int) -> dict:
    """A zero-initialised linear head ``{kernel [d, C], bias [C]}``."""
    return {"kernel": jnp.zeros((dim, num_classes), jnp.float32), "bias": jnp.zeros((num_classes,), jnp.float32)}


def head_logits(head: dict, emb):
    """``emb @ kernel + bias``; a head with a ``scale`` (the cosine heads of
    :mod:`experiments.zeroshot`, unit-norm kernel columns) first maps ``emb`` to
    ``scale * emb / ||emb||``, so the logits are ``scale * cos(emb, w_c) + bias``."""
    if "scale" in head:
        emb = head["scale"] * emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb @ head["kernel"] + head["bias"]


def percent(correct) -> float:
    """Accuracy in percent of per-example correctness."""
    return float(100.0 * np.mean(correct))


def head_correct(head: dict, emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example correctness (bool ``[N]``) of the linear head's argmax on embeddings."""
    return np.asarray(head_logits(head, jnp.asarray(emb))).argmax(-1) == np.asarray(labels)


def head_accuracy(head: dict, emb: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy in percent of the linear head on embeddings."""
    return percent(head_correct(head, emb, labels))


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


def probe_correct(train_emb: np.ndarray, train_labels: np.ndarray, eval_emb: np.ndarray, eval_labels: np.ndarray,
                  *, c: float = 1.0) -> np.ndarray:
    """Per-example correctness (bool ``[N]``) on ``eval_emb`` of a linear probe (:func:`fit_linear_head`) fit on
    ``train_emb``."""
    num_classes = int(max(train_labels.max(), eval_labels.max())) + 1
    return head_correct(fit_linear_head(train_emb, train_labels, num_classes, c=c), eval_emb, eval_labels)


def probe_accuracy(train_emb: np.ndarray, train_labels: np.ndarray, eval_emb: np.ndarray, eval_labels: np.ndarray,
                   *, c: float = 1.0) -> float:
    """Accuracy in percent of a linear probe (:func:`fit_linear_head`) fit on ``train_emb``, scored on ``eval_emb``."""
    return percent(probe_correct(train_emb, train_labels, eval_emb, eval_labels, c=c))
