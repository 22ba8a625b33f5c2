"""Merge coefficients Γ: their granularity, initial values, constraints, and θ(Γ).

Task arithmetic with learned coefficients (DivMerge Eq. 3; AdaMerging):

    θ(Γ)^p = θ0^p + Σ_t Γ_t^{l(p)} τ_t^p

where ``l(p)`` is the layer of parameter ``p``. Granularities:

* ``"task"``: one Γ_t per task, coefficients of shape ``(K,)`` (DivMerge/AdaMerging "task level").
* ``"layer"``: one Γ_t^l per task and layer, shape ``(K, L)``, layers from a
  :func:`jmerge.layers.group_layers` rule (e.g. ``r"layer/\\d+"`` for transformer blocks).
* ``"tensor"``: one per task and parameter tensor, ``(K, #tensors)`` (AdaMerging's
  "layer-wise", Yang et al., 2024, arXiv 2310.02575).

The base coefficient is fixed at 1. Coefficients are unconstrained reals (DivMerge) or, by
option, projected after every update onto ``[0, 1]`` (``"clip01"``, AdaMerging's clamp) or
onto the probability simplex over tasks, separately for each layer (``"simplex"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmerge._util import did_you_mean
from jmerge import tree as jtree
from jmerge.tree import PyTree
from jmerge.layers import LayerGrouping, LayerRule, group_layers
from jmerge.validate import MergeInputError

GRANULARITIES = ("task", "layer", "tensor")
CONSTRAINTS = (None, "clip01", "simplex")


def _closest(kind: str, name, known) -> MergeInputError:
    hint = did_you_mean(name, known)
    return MergeInputError(f"unknown {kind} {name!r}{hint} (known: {', '.join(map(repr, known))})")


@dataclass(frozen=True)
class CoefficientLayout:
    """Which coefficient scales each parameter: ``grouping.leaf_layer[i]`` for leaf ``i``."""

    granularity: str
    num_tasks: int
    grouping: LayerGrouping

    @property
    def shape(self) -> tuple[int, ...]:
        if self.granularity == "task":
            return (self.num_tasks,)
        return (self.num_tasks, self.grouping.num_layers)

    @property
    def layer_names(self) -> tuple[str, ...] | None:
        return None if self.granularity == "task" else self.grouping.names


def layout(base: PyTree, num_tasks: int, granularity: str = "task", layers: LayerRule | LayerGrouping = None) -> CoefficientLayout:
    """The coefficient layout for ``base``; ``layers`` is a layer rule or a ready grouping
    (``"layer"`` only; ``"layer"`` without a rule is one layer per tensor)."""
    if granularity not in GRANULARITIES:
        raise _closest("granularity", granularity, GRANULARITIES)
    if layers is not None and granularity != "layer":
        raise MergeInputError(f"layers={layers!r} is only used with granularity='layer', not {granularity!r}")
    paths = tuple(jtree.paths(base))
    if granularity == "task":
        grouping = LayerGrouping(("all",), (0,) * len(paths), paths)
    elif isinstance(layers, LayerGrouping):
        if layers.leaf_paths != paths:
            raise MergeInputError("the layer grouping was made for other parameters than base")
        grouping = layers
    else:
        try:
            grouping = group_layers(base, "tensor" if granularity == "tensor" else layers)
        except (ValueError, TypeError) as e:
            raise MergeInputError(str(e)) from e
    return CoefficientLayout(granularity, num_tasks, grouping)


def initial(lay: CoefficientLayout, init=None) -> jax.Array:
    """Initial Γ: ``None`` is ``1/K`` (DivMerge Algorithm 1); a scalar (0.5: DivMerge Table 9,
    0.3: AdaMerging); one value per task ``(K,)``; or the full ``lay.shape``."""
    k = lay.num_tasks
    value = np.full(lay.shape, 1.0 / k) if init is None else np.asarray(init, np.float64)
    if value.ndim == 1 and value.shape == (k,) and len(lay.shape) == 2:
        value = np.repeat(value[:, None], lay.shape[1], axis=1)
    if value.ndim == 0:
        value = np.full(lay.shape, float(value))
    if value.shape != lay.shape:
        raise MergeInputError(f"init has shape {value.shape}; {lay.granularity}-level coefficients need {lay.shape} (or a scalar, or one per task)")
    if not np.all(np.isfinite(value)):
        raise MergeInputError(f"init holds non-finite values: {value}")
    return jnp.asarray(value, jnp.float32)


def project(coefficients: jax.Array, constraint: str | None) -> jax.Array:
    """Γ projected onto the feasible set of ``constraint`` (identity for ``None``)."""
    if constraint is None:
        return coefficients
    if constraint == "clip01":
        return optax.projections.projection_box(coefficients, 0.0, 1.0)
    if constraint == "simplex":
        if coefficients.ndim == 1:
            return optax.projections.projection_simplex(coefficients)
        return jax.vmap(optax.projections.projection_simplex, in_axes=1, out_axes=1)(coefficients)
    raise _closest("constraint", constraint, CONSTRAINTS)


def check_constraint(constraint) -> None:
    if constraint not in CONSTRAINTS:
        raise _closest("constraint", constraint, CONSTRAINTS)


def merged_params(base: PyTree, tvs, coefficients: jax.Array, lay: CoefficientLayout) -> PyTree:
    """``θ0 + Σ_t Γ_t^{l(p)} τ_t`` (:func:`jmerge.tree.apply_tasks` on the layout's layers);
    differentiable in ``coefficients``."""
    return jtree.apply_tasks(base, list(tvs), coefficients, lay.grouping.leaf_layer)


def coefficient_grad(grad_params: PyTree, tvs, lay: CoefficientLayout) -> jax.Array:
    """Chain rule through :func:`merged_params`: ``dL/dΓ_t^l = Σ_{p ∈ l} ⟨∂L/∂θ_p, τ_t^p⟩``
    (float32), shaped like the coefficients."""
    out = jnp.zeros((lay.num_tasks, lay.grouping.num_layers), jtree.ACCUM_DTYPE)
    per_leaf, _ = jtree.transpose_leaves(list(tvs))
    for g, taus, l in zip(jax.tree.leaves(grad_params), per_leaf, lay.grouping.leaf_layer):
        g = g.astype(jtree.ACCUM_DTYPE)
        out = out.at[:, l].add(jnp.stack([jnp.sum(g * tau) for tau in taus]))
    return out.reshape(lay.shape)
