"""Spherical interpolation: SLERP of two experts and barycentric Multi-SLERP.

Both work per tensor, on the tensor flattened to one vector.

* ``slerp`` with ``space="weights"`` (mergekit, FusionBench): interpolate the two experts'
  full weights ``w_1, w_2`` along the great circle through their directions,
  ``sin((1-t) Omega)/sin Omega w_1 + sin(t Omega)/sin Omega w_2`` with
  ``cos Omega = <w_1/|w_1|, w_2/|w_2|>`` (a vector of norm <= 1e-8 is left unnormalised),
  falling back to ``(1-t) w_1 + t w_2`` when ``|cos Omega| > 0.9995``.
* ``slerp`` with ``space="task_vectors"`` (DivMerge, App. E): the same interpolation of
  ``tau_1, tau_2``, added to the base: ``theta_0 + sin((1-t) Omega)/sin Omega tau_1 +
  sin(t Omega)/sin Omega tau_2``, ``Omega = angle(tau_1, tau_2)``, here per tensor.
* ``multislerp`` (mergekit's Multi-SLERP) on task vectors: unit vectors ``u_t = tau_t/|tau_t|``,
  their weighted mean direction ``mu = m/|m|`` with ``m = sum_t w_t u_t`` (weights summing
  to 1), rescaled by the weighted mean norm: ``theta_0 + mu sum_t w_t |tau_t|``. mergekit
  describes it as a weighted mean in the tangent space at ``mu`` followed by the exponential
  map; that tangent mean is ``m - <m, mu> mu = 0`` identically, so the exponential map
  returns ``mu`` itself and is left out here (the tests check the equivalence).
  Fallbacks: ``u_t = 0`` when ``|tau_t| <= 1e-8``; when ``|m| <= 1e-6`` (e.g. two opposite
  task vectors of equal weight) the weighted sum ``sum_t w_t tau_t`` (mergekit does this for
  two experts and raises for more; under ``jit`` we cannot raise). mergekit's threshold is
  1e-8, but ``|m| <= 1`` is a sum of float32 unit vectors whose exact cancellation leaves
  ~1e-7 of rounding, which would otherwise pick a direction made of noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import tree as jtree
from jmerge import validate
from jmerge.methods.registry import Mergekit, register

EPS = 1e-8
DOT_THRESHOLD = 0.9995
MEAN_EPS = 1e-6  # |m| below this (float32 rounding of cancelling unit vectors): weighted-sum fallback


def _unit(x):
    """``x/|x|`` over all entries; ``x`` itself when ``|x| <= EPS`` (mergekit's normalize)."""
    n = jnp.linalg.norm(x)
    return jnp.where(n > EPS, x / jnp.where(n > EPS, n, 1.0), x)


def slerp_pair(t, a, b):
    """SLERP from ``a`` (t=0) to ``b`` (t=1), lerp when the directions are nearly (anti)parallel:
    ``s_0 a + s_1 b``. XLA:CPU fuses one of the products into the sum; under
    :func:`jmerge.tree.rounding` both are rounded first, as mergekit's ``coef_a * x + coef_b * y``
    (three torch ops): each is multiplied by ``sin_omega / sin_omega``, an exact 1 XLA does not
    fold, so whichever product XLA fuses is exact. (``s_0, s_1`` still differ from mergekit's in
    their last bits: torch's sums run in another order, and one that depends on its thread
    count, and its ``acos`` and ``sin`` are SLEEF's; docs/mergekit.md.)"""
    dot = jnp.sum(_unit(a) * _unit(b))
    colinear = jnp.abs(dot) > DOT_THRESHOLD
    omega = jnp.arccos(jnp.where(colinear, 0.0, dot))
    sin_omega = jnp.where(colinear, 1.0, jnp.sin(omega))
    s0 = jnp.where(colinear, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin_omega)
    s1 = jnp.where(colinear, t, jnp.sin(t * omega) / sin_omega)
    if jtree.rounding_dtype() is not None:
        one = sin_omega / sin_omega
        return (s0 * a) * one + (s1 * b) * one
    return s0 * a + s1 * b


def _slerp_check(num_experts, hp):
    if num_experts != 2:
        raise validate.MergeInputError(f"slerp interpolates exactly two experts, got {num_experts}")
    validate.check_fraction("t", hp["t"], low_open=False)
    if hp["space"] not in ("weights", "task_vectors"):
        raise validate.MergeInputError(f"space must be 'weights' or 'task_vectors', got {hp['space']!r}")


@register("slerp", static=("space",), check=_slerp_check, reference="Shoemake, 1985 (SIGGRAPH)",
          mergekit=Mergekit("slerp", {"t": None}, fixed={"space": "weights"}, passed={"t": "t"}, base_merged=True,
                            required=("t",), models=1))
def slerp(base, tvs, *, key=None, t=0.5, space="weights"):
    """SLERP of two experts per tensor, on their full weights or on their task vectors.

    ``space="weights"``: ``θ = sin((1-t)Ω)/sin Ω θ_1 + sin(tΩ)/sin Ω θ_2`` with ``cos Ω`` the
    cosine of the flattened ``θ_1, θ_2``, lerp ``(1-t) θ_1 + t θ_2`` when ``|cos Ω| > 0.9995``;
    ``"task_vectors"``: ``θ = θ0 + slerp(t, τ_1, τ_2)``.

    Args:
      base: the pre-trained parameters θ0; the experts' weights are θ_t = θ0 + τ_t.
      tvs: the two experts' float32 task vectors τ_1, τ_2.
      key: unused (SLERP is deterministic).
      t: the interpolation point; 0 gives expert 1, 1 expert 2, 0.5 (default) the midpoint.
      space: ``"weights"`` (mergekit, FusionBench) or ``"task_vectors"`` (DivMerge, App. E).

    Returns:
      The interpolated parameters, with the base's structure, shapes and dtypes.

    Warning:
      mergekit and FusionBench interpolate full weights, DivMerge task vectors (Ω their angle,
      here per tensor). In a mergekit YAML ``t = 0`` is the ``base_model``, which jmerge then
      passes as expert 1.

    References:
      Shoemake, 1985, "Animating rotation with quaternion curves", SIGGRAPH 1985 (no paper on
      arXiv); mergekit (Goddard et al., 2024, arXiv 2403.13257); Touayouch et al., 2025, "DivMerge:
      a divergence-based model merging method for multi-tasking", arXiv 2509.02108.
    """
    tau1, tau2 = tvs
    if space == "task_vectors":
        return jtree.apply(base, jtree.map_tasks(lambda _, ts: slerp_pair(t, *ts), [tau1, tau2]))

    def leaf(b, t1, t2):
        b32 = b.astype(jtree.ACCUM_DTYPE)
        return slerp_pair(t, b32 + t1, b32 + t2).astype(b.dtype)

    return jax.tree.map(leaf, base, tau1, tau2)


def _multislerp_check(num_experts, hp):
    if num_experts < 2:
        raise validate.MergeInputError(f"multislerp needs at least 2 experts, got {num_experts}")
    if hp["space"] not in ("weights", "task_vectors"):
        raise validate.MergeInputError(f"space must be 'weights' or 'task_vectors', got {hp['space']!r}")
    if hp["weights"] is not None:
        validate.check_weights(hp["weights"], num_experts)
        w = np.asarray(hp["weights"], dtype=np.float64)
        if np.any(w < 0) or w.sum() <= 0:
            raise validate.MergeInputError(f"multislerp weights must be >= 0 with a positive sum, got {hp['weights']!r}")


@register("multislerp", static=("space",), check=_multislerp_check,
          reference="mergekit's multislerp (Goddard et al., 2024, arXiv 2403.13257)",
          mergekit=Mergekit("multislerp", {"normalize_weights": True, "eps": 1e-8}, {"weight": 1.0}, base="optional",
                            only={"normalize_weights": True, "eps": 1e-8}))
def multislerp(base, tvs, *, key=None, weights=None, space="task_vectors"):
    """Multi-SLERP: the weighted mean direction of the unit task vectors, at their weighted mean norm.

    Per tensor, ``u_t = τ_t / |τ_t|`` (0 when ``|τ_t| <= 1e-8``), ``m = Σ_t w_t u_t`` with
    ``Σ_t w_t = 1``, ``θ = θ0 + (m / |m|) Σ_t w_t |τ_t|``; ``θ0 + Σ_t w_t τ_t`` when ``|m| <= 1e-6``.

    Args:
      base: the pre-trained parameters θ0 (zeros with ``space="weights"``).
      tvs: the experts' float32 task vectors τ_t (at least two).
      key: unused (Multi-SLERP is deterministic).
      weights: one w_t >= 0 per expert, normalised to sum 1; None: equal weights.
      space: ``"task_vectors"`` (mergekit with a ``base_model``); ``"weights"``: the experts'
        full weights θ_t instead of τ_t (mergekit without one).

    Returns:
      The merged parameters, shaped and typed like ``base``.

    Warning:
      mergekit describes a weighted mean in the tangent space at ``m/|m|`` followed by the
      exponential map; that tangent mean is 0, so this is the same merge. mergekit falls back to
      the weighted sum below 1e-8 for two experts and raises for more; jmerge falls back below
      1e-6 (float32 rounding of cancelling unit vectors) for any number.

    References:
      mergekit 0.1.5 ``multislerp`` (no paper; the toolkit: Goddard et al., 2024, "Arcee's MergeKit:
      a toolkit for merging large language models", arXiv 2403.13257).
    """
    if space == "weights":
        tvs = [jax.tree.map(lambda b, t: b.astype(jtree.ACCUM_DTYPE) + t, base, tv) for tv in tvs]
        base = jax.tree.map(jnp.zeros_like, base)
    k = len(tvs)
    w = jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    w = w / jnp.sum(w)

    def leaf(_, ts):
        norms = jnp.stack([jnp.sqrt(jnp.sum(x * x)) for x in ts])  # no reshape: keeps sharded axes sharded
        coef = jnp.where(norms > EPS, w / jnp.where(norms > EPS, norms, 1.0), 0.0)  # w_t / |tau_t|
        mean = sum(coef[i] * ts[i] for i in range(k))  # m = sum_t w_t u_t
        mean_norm = jnp.linalg.norm(mean)
        ok = mean_norm > MEAN_EPS
        spherical = mean * (jnp.sum(w * norms) / jnp.where(ok, mean_norm, 1.0))
        linear = sum(w[i] * ts[i] for i in range(k))
        return jnp.where(ok, spherical, linear)

    return jtree.apply(base, jtree.map_tasks(leaf, tvs))
