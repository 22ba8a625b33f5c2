"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522), meant for k fine-tunes of one task.

Per tensor: ``cos`` is the mean over pairs ``i < j`` of ``<tau_i, tau_j> / max(|tau_i||tau_j|, 1e-6)``
(each clipped to [-1, 1]; the paper uses one angle, mergekit and FusionBench average the
pairwise ones), ``t = k cos / ((k-1) cos + 1)`` and ``theta = theta_0 + t mean_i(tau_i)``,
i.e. ``t w_avg + (1 - t) w_0``. With ``filter_wise=True`` the cosines run over the last
axis, one ``t`` per index of all the others, as mergekit 0.1.5's ``filter_wise`` (``dim=-1``):
one per output row of a torch (out, in) matrix, one per (out, in, kh) of a 4-D conv
weight; 0-D and 1-D tensors keep one ``t``. (For a Flax kernel (in, out) that is one per input row.)

The mean pairwise cosine of k vectors is >= -1/(k-1), so the denominator is >= 0; where it is
below 1e-6 (unit task vectors summing to zero) ``t = 0`` keeps the base, as mergekit does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import tree as jtree
from jmerge import validate
from jmerge.methods.registry import Mergekit, register


def _check(num_experts, hp):
    del hp
    if num_experts < 2:
        raise validate.MergeInputError(f"model_stock needs at least 2 experts (an angle between task vectors), got {num_experts}")


def _mean_pairwise_cosine(ts, rows: bool):
    """Mean over pairs of the clipped cosine, over the last axis (``rows``: shape ``shape[:-1]``)
    or over the whole tensor (shape ``()``).

    All inner products come from one Gram contraction of the stacked task vectors (K(K-1)/2
    separate reductions per tensor compiled several times slower for the same memory); the
    contraction runs over the tensor's own axes, with no reshape, so sharded axes stay sharded.
    """
    k = len(ts)
    stacked = jnp.stack(ts)  # (K, *shape)
    spec = "i...r,j...r->...ij" if rows else "i...,j...->ij"
    gram = jnp.einsum(spec, stacked, stacked, precision=jax.lax.Precision.HIGHEST)  # (*lead, K, K)
    norms = jnp.sqrt(jnp.diagonal(gram, axis1=-2, axis2=-1))
    cos = jnp.clip(gram / jnp.maximum(norms[..., :, None] * norms[..., None, :], 1e-6), -1.0, 1.0)
    i, j = np.triu_indices(k, 1)
    return jnp.mean(cos[..., i, j], axis=-1)


@register("model_stock", static=("filter_wise",), check=_check, reference="Jang et al., 2024, arXiv 2403.19522",
          mergekit=Mergekit("model_stock", {"filter_wise": False}, passed={"filter_wise": "filter_wise"}))
def model_stock(base, tvs, *, key=None, filter_wise=False):
    """Model Stock: ``theta_0 + t mean(tau)`` with ``t = k cos / ((k-1) cos + 1)`` per tensor (or per row)."""
    k = len(tvs)

    def leaf(_, ts):
        rows = filter_wise and ts[0].ndim >= 2
        cos = _mean_pairwise_cosine(ts, rows)
        den = (k - 1) * cos + 1.0
        singular = jnp.abs(den) < 1e-6
        t = jnp.where(singular, 0.0, k * cos / jnp.where(singular, 1.0, den))
        t = t[..., None] if rows else t
        return t * (sum(ts[1:], ts[0]) / k)

    return jtree.apply(base, jtree.map_tasks(leaf, tvs))
