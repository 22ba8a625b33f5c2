"""Divergences and entropy on log-probabilities, and their masked averages.

All functions take log-probabilities over the last axis (``jax.nn.log_softmax`` of logits)
and reduce that axis; everything stays in log space so near-zero probabilities neither
underflow nor produce NaN (terms with ``p_i = 0`` count 0, with a zero gradient).

* ``KL(p‖q) = Σ_i p_i (log p_i − log q_i)``
* ``JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m)``, ``m = ½(p + q)``, ``log m = max + log1p(exp(−|log p − log q|)) − log 2``
  (DivMerge, arXiv 2509.02108 §2 and App. B.1)
* ``H(q) = −Σ_i q_i log q_i`` (AdaMerging's test-time entropy, arXiv 2310.02575)

The objectives of :func:`jmerge.learn.fit_coefficients` compare an expert's distribution
``p`` (the target) with the merged model's ``q``:

========== ========================= ======================================================
name       per-position loss         source
========== ========================= ======================================================
js         ``JS(p, q)``              DivMerge default
kl         ``KL(p‖q)`` (expert first) DivMerge's "KL" / "forward" (Prop. 2: M-projection)
reverse_kl ``KL(q‖p)``               the other direction
entropy    ``H(q)`` (no targets)     AdaMerging
========== ========================= ======================================================
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

from jmerge._util import did_you_mean
from jmerge.validate import MergeInputError

_LOG2 = math.log(2.0)


def _p_log_ratio(log_p, log_q):
    """``p (log p − log q)`` elementwise, 0 where ``p = 0`` (value and gradient)."""
    pos = log_p != -jnp.inf  # NaN stays NaN
    lp = jnp.where(pos, log_p, 0.0)
    lq = jnp.where(pos, log_q, 0.0)
    return jnp.where(pos, jnp.exp(lp) * (lp - lq), 0.0)


def kl(log_p, log_q, axis: int = -1):
    """``KL(p‖q) = Σ_i p_i (log p_i − log q_i)`` over ``axis`` (≥ 0; inf where q = 0 < p)."""
    return jnp.maximum(jnp.sum(_p_log_ratio(log_p, log_q), axis), 0.0)


def js(log_p, log_q, axis: int = -1):
    """Jensen-Shannon divergence in nats: symmetric, in ``[0, log 2]``, exactly 0 for ``p = q``,
    finite for any log-probabilities in [-inf, 0] (NaN propagates)."""
    hi = jnp.maximum(log_p, log_q)
    gap = jnp.where(hi > -jnp.inf, jnp.abs(log_p - log_q), 0.0)
    log_m = hi + (jnp.log1p(jnp.exp(-gap)) - _LOG2)  # exactly log p where q = p
    total = jnp.sum(_p_log_ratio(log_p, log_m), axis) + jnp.sum(_p_log_ratio(log_q, log_m), axis)
    return jnp.maximum(0.5 * total, 0.0)


def entropy(log_q, axis: int = -1):
    """Shannon entropy ``H(q) = −Σ_i q_i log q_i`` in nats."""
    return jnp.sum(-_p_log_ratio(log_q, jnp.zeros_like(log_q)), axis)


# (target log p, merged log q) -> per-position loss
OBJECTIVES: dict[str, Callable] = {
    "js": lambda log_p, log_q: js(log_p, log_q),
    "kl": lambda log_p, log_q: kl(log_p, log_q),
    "reverse_kl": lambda log_p, log_q: kl(log_q, log_p),
    "entropy": lambda log_p, log_q: entropy(log_q),
}
NEEDS_TARGETS = frozenset({"js", "kl", "reverse_kl"})


def get_objective(name: str) -> Callable:
    """The per-position loss called ``name``; unknown names get the closest suggestion."""
    if name not in OBJECTIVES:
        hint = did_you_mean(name, OBJECTIVES)
        raise MergeInputError(f"unknown objective {name!r}{hint} (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def masked_mean(values, mask=None):
    """Mean over examples of each example's mean over its remaining axes.

    ``values`` is ``(B, ...)``; ``mask`` (same shape, or ``None`` for all ones) marks the
    positions that count, e.g. an LM's generated tokens: per sequence
    ``Σ_t m_t d_t / Σ_t m_t``, then the mean over sequences (DivMerge App. B.1).
    """
    values = jnp.reshape(values, (values.shape[0], -1))
    if mask is None:
        return jnp.mean(values)
    mask = jnp.reshape(mask, values.shape).astype(bool)
    per_example = jnp.sum(jnp.where(mask, values, 0.0), 1) / jnp.maximum(jnp.sum(mask, 1), 1)
    return jnp.mean(per_example)
