"""Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522), meant for k fine-tunes of one task.

Per tensor: ``cos`` is the mean over pairs ``i < j`` of ``<tau_i, tau_j> / max(|tau_i||tau_j|, 1e-6)``
(each clipped to [-1, 1]; the paper uses one angle, mergekit and FusionBench average the
pairwise ones), ``t = k cos / ((k-1) cos + 1)`` and ``theta = theta_0 + t mean_i(tau_i)``,
computed as ``t w_avg + (1 - t) w_0`` (mergekit's order). With ``filter_wise=True`` the cosines run over the last
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
    Under :func:`jmerge.tree.rounding` mergekit rounds each product ``tau_i tau_j`` before its
    sum, which a contraction cannot, so there the pairs are reduced one by one, each step rounded.
    """
    k = len(ts)
    i, j = np.triu_indices(k, 1)
    if jtree.rounding_dtype() is not None:  # mergekit in `dtype`: norm, (a*b).sum, their quotient, the mean
        r, axis = jtree.rounded, -1 if rows else None
        norms = [r(jnp.sqrt(jnp.sum(x * x, axis=axis))) for x in ts]
        cos = [jnp.clip(r(r(jnp.sum(r(ts[a] * ts[b]), axis=axis)) / r(jnp.maximum(r(norms[a] * norms[b]), 1e-6))),
                        -1.0, 1.0) for a, b in zip(i, j)]
        return r(sum(cos) / len(cos))
    stacked = jnp.stack(ts)  # (K, *shape)
    spec = "i...r,j...r->...ij" if rows else "i...,j...->ij"
    gram = jnp.einsum(spec, stacked, stacked, precision=jax.lax.Precision.HIGHEST)  # (*lead, K, K)
    norms = jnp.sqrt(jnp.diagonal(gram, axis1=-2, axis2=-1))
    cos = jnp.clip(gram / jnp.maximum(norms[..., :, None] * norms[..., None, :], 1e-6), -1.0, 1.0)
    return jnp.mean(cos[..., i, j], axis=-1)


@register("model_stock", static=("filter_wise",), check=_check, reference="Jang et al., 2024, arXiv 2403.19522",
          mergekit=Mergekit("model_stock", {"filter_wise": False}, passed={"filter_wise": "filter_wise"}, in_dtype=True))
def model_stock(base, tvs, *, key=None, filter_wise=False):
    """Model Stock: interpolate from the base to the experts' mean by their task vectors' angle.

    Per tensor, ``cos`` = the mean over pairs i < j of ``<τ_i, τ_j> / max(|τ_i||τ_j|, 1e-6)``
    (each clipped to [-1, 1]), ``t = k cos / ((k-1) cos + 1)`` (0 where the denominator is below
    1e-6), ``θ = t w_avg + (1 - t) θ0`` with ``w_avg = mean_t θ_t``, in mergekit's order.

    Args:
      base: the pre-trained parameters θ0 (w_0).
      tvs: the k >= 2 experts' float32 task vectors τ_t, ideally fine-tunes of one task.
      key: unused (Model Stock is deterministic).
      filter_wise: one t per index of all axes but the last (cosines over the last axis, mergekit's
        ``filter_wise``); False: one t per tensor. 0-D and 1-D tensors keep one t.

    Returns:
      The merged parameters, each leaf in the base leaf's shape and dtype.

    Warning:
      The paper uses one angle; mergekit and FusionBench (and jmerge) average the pairwise cosines.
      ``filter_wise`` follows mergekit 0.1.5 (``dim=-1``): one t per output row of a torch
      (out, in) matrix, but per *input* row of a Flax (in, out) kernel.

    References:
      Jang et al., 2024, "Model Stock: all we need is just a few fine-tuned models", ECCV 2024,
      arXiv 2403.19522.
    """
    k = len(tvs)
    r = jtree.rounded

    def leaf(b, *ts):
        w0 = b.astype(jtree.ACCUM_DTYPE)
        rows = filter_wise and b.ndim >= 2
        cos = _mean_pairwise_cosine([r(x) for x in ts], rows)  # mergekit's offsets `w_t - w_0`, in `dtype`
        den = r(1.0 + r((k - 1) * cos))
        singular = jnp.abs(den) < 1e-6
        t = jnp.where(singular, 0.0, r(r(k * cos) / jnp.where(singular, 1.0, den)))
        t = t[..., None] if rows else t
        ws = [r(w0 + x) for x in ts]  # the experts' weights w_t = w_0 + tau_t
        total = ws[0]  # mergekit's sum(ws), in order
        for w in ws[1:]:
            total = r(total + w)
        return r(r(t * r(total / k)) + r(r(1.0 - t) * w0)).astype(b.dtype)

    return jax.tree.map(leaf, base, *tvs)
