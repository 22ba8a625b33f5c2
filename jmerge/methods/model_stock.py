"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522), meant for k fine-tunes of one task.

Per tensor: ``cos`` is the mean over pairs ``i < j`` of ``<tau_i, tau_j> / max(|tau_i||tau_j|, 1e-6)``
(each clipped to [-1, 1]; the paper uses one angle, mergekit and FusionBench average the
pairwise ones), ``t = k cos / ((k-1) cos + 1)`` and ``theta = theta_0 + t mean_i(tau_i)``,
i.e. ``t w_avg + (1 - t) w_0``. With ``filter_wise=True`` there is one ``t`` per index of
the first axis (cosines over the remaining axes), as mergekit's ``filter_wise``; 0-D and 1-D
tensors keep one ``t``. Note that the first axis is the output filter in torch layout
(out, in) but the input row of a Flax kernel (in, out).

The mean pairwise cosine of k vectors is >= -1/(k-1), so the denominator is >= 0; it is
floored at 1e-6 so that the degenerate case (unit task vectors summing to zero) stays finite.
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
    """Mean over pairs of the clipped cosine, per first-axis row (``rows``) or over the whole tensor.

    All inner products come from one Gram contraction of the stacked task vectors (K(K-1)/2
    separate reductions per tensor compiled several times slower for the same memory); the
    contraction runs over the tensor's own axes, with no reshape, so sharded axes stay sharded.
    """
    k = len(ts)
    stacked = jnp.stack(ts)  # (K, *shape)
    if rows:
        gram = jnp.einsum("ir...,jr...->rij", stacked, stacked, precision=jax.lax.Precision.HIGHEST)
    else:
        gram = jnp.einsum("i...,j...->ij", stacked, stacked, precision=jax.lax.Precision.HIGHEST)[None]
    norms = jnp.sqrt(jnp.diagonal(gram, axis1=1, axis2=2))
    cos = jnp.clip(gram / jnp.maximum(norms[:, :, None] * norms[:, None, :], 1e-6), -1.0, 1.0)
    i, j = np.triu_indices(k, 1)
    return jnp.mean(cos[:, i, j], axis=-1)  # (R,)


@register("model_stock", static=("filter_wise",), check=_check, reference="Jang et al., 2024, arXiv 2403.19522",
          mergekit=Mergekit("model_stock", {"filter_wise": False}, passed={"filter_wise": "filter_wise"}))
def model_stock(base, tvs, *, key=None, filter_wise=False):
    """Model Stock: ``theta_0 + t mean(tau)`` with ``t = k cos / ((k-1) cos + 1)`` per tensor (or per row)."""
    k = len(tvs)

    def leaf(_, ts):
        rows = filter_wise and ts[0].ndim >= 2
        cos = _mean_pairwise_cosine(ts, rows)
        t = k * cos / jnp.maximum((k - 1) * cos + 1.0, 1e-6)
        t = t.reshape((-1,) + (1,) * (ts[0].ndim - 1)) if rows else t.reshape(())
        return t * (sum(ts[1:], ts[0]) / k)

    return jtree.apply(base, jtree.map_tasks(leaf, tvs))
