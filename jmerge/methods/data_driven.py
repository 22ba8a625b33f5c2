"""RegMean and Fisher merging: merges weighted by statistics of each expert on its task's data.

The statistics are hyper-parameters, computed beforehand by :mod:`jmerge.learn.statistics`
(or :func:`jmerge.learn.regmean` / :func:`jmerge.learn.fisher_merge`, which do both steps):

* ``regmean`` (Jin et al., 2023, arXiv 2212.09849), per linear weight with inputs ``X_t``:
  ``W* = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t``, ``G̃_t = α G_t + (1 - α) diag(G_t)`` (off-diagonals
  shrunk by ``alpha``; FusionBench's ``reduce_non_diagonal_ratio``, 0.95), ``G_t = X_tᵀX_t / n_t``;
  on task vectors ``τ* = (Σ G̃_t)⁻¹ Σ G̃_t τ_t`` (the same ``θ0 + τ*``). Every other
  parameter (biases, norms, embeddings, weights without a Gram) is the mean of the experts,
  as FusionBench; :mod:`jmerge.coverage` counts them as the fallback.
* ``fisher`` (Matena & Raffel, 2022, arXiv 2111.09832), elementwise:
  ``θ* = Σ_t c_t (F_t + ε) θ_t / Σ_t c_t (F_t + ε)`` with ``c_t`` the ``weights`` (default
  ``1/K``), times, with ``normalize`` (FusionBench's ``normalize_fisher_weight``, default),
  ``(1/(‖F_t‖ + ε)) / Σ_s 1/(‖F_s‖ + ε)`` (‖·‖ the L2 norm over all parameters); ``ε`` =
  ``min_fisher`` (1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jmerge import tree as jtree
from jmerge import validate
from jmerge.methods.registry import register


@dataclass(frozen=True)
class Grams:
    """RegMean statistics of one expert on its task (:func:`jmerge.learn.gram_matrices`):
    ``matrices[path]`` the mean Gram ``XᵀX / n`` of the inputs of parameter ``path``; ``axes``
    ``((path, axis), ...)``, the parameter axis those inputs contract (0: Flax ``(in, out)``,
    1: torch ``(out, in)``); ``rows`` ``((path, n), ...)``; ``untapped``: 2-D parameters no
    linear map was found for. A pytree (``matrices`` are its leaves)."""

    matrices: dict
    axes: tuple[tuple[str, int], ...]
    rows: tuple[tuple[str, int], ...] = ()
    untapped: tuple[str, ...] = ()


jax.tree_util.register_dataclass(Grams, data_fields=["matrices"], meta_fields=["axes", "rows", "untapped"])


class _Measured:
    """Stands for statistics a plan measures later (``jmerge run`` with a ``jmerge.learn`` block):
    the hyper-parameter checks then skip them."""

    def __repr__(self) -> str:
        return "<measured on the jmerge.learn prompts>"


MEASURED = _Measured()
STATISTICS = {"regmean": "grams", "fisher": "fishers"}  # the hyper-parameter holding each method's statistics


def _given(method: str, hp, num_experts: int, measure: str, what: str, helper: str):
    """The method's statistics from ``hp``, checked for one per expert; None while :data:`MEASURED`."""
    stats = hp[STATISTICS[method]]
    if stats is MEASURED:
        return None
    if stats is None:
        raise validate.MergeInputError(f"{method} needs {STATISTICS[method]}=: one jmerge.learn.{measure}(...) per "
                                       f"expert (or use jmerge.learn.{helper}, which computes them)")
    if len(stats) != num_experts:
        raise validate.MergeInputError(f"{method} needs one {what} per expert: got {len(stats)} for {num_experts} experts")
    return stats


def _regmean_check(num_experts, hp):
    validate.check_fraction("alpha", hp["alpha"], low_open=False)
    grams = _given("regmean", hp, num_experts, "gram_matrices", "Grams", "regmean")
    if grams is None:
        return
    if not all(isinstance(g, Grams) for g in grams):
        raise validate.MergeInputError("regmean's grams must be jmerge.learn.gram_matrices results (Grams)")
    ref = grams[0].axes
    for t, g in enumerate(grams[1:], 1):
        if g.axes != ref:
            diff = sorted(set(ref) ^ set(g.axes))
            raise validate.MergeInputError(f"regmean: the Grams of expert {t} cover other parameters or axes than "
                                           f"expert 0's: {[p for p, _ in diff][:5]}")


def _regmean_covers(path, shape, hp, num_experts):
    """Leaves with a Gram matrix; before measuring (:data:`MEASURED`), every 2-D leaf."""
    grams = hp.get("grams")
    if grams is MEASURED:
        return len(shape) == 2
    return grams is not None and path in dict(grams[0].axes)


@register("regmean", check=_regmean_check, per_model=(), covers=_regmean_covers, streamable=False,
          reference="Jin et al., 2023, arXiv 2212.09849")
def regmean(base, tvs, *, key=None, grams=None, alpha=0.95):
    """RegMean: each linear weight merged by its inputs' Gram matrices, the rest averaged.

    On task vectors, ``τ* = (Σ_t G̃_t)⁻¹ Σ_t G̃_t τ_t`` and ``θ = θ0 + τ*``, with
    ``G̃_t = α G_t + (1 - α) diag(G_t)`` and ``G_t = X_tᵀX_t / n_t`` the Gram of the weight's
    inputs on task t. Parameters without a Gram (biases, norms, embeddings) get the experts' mean.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t.
      key: unused (RegMean is a closed form).
      grams: one :class:`Grams` per expert (``jmerge.learn.gram_matrices``); required.
      alpha: α, the share of the off-diagonal Gram entries kept; 0.95 (FusionBench's
        ``reduce_non_diagonal_ratio``).

    Returns:
      The merged parameters, with the base's structure, shapes and dtypes.

    References:
      Jin et al., 2023, "Dataless knowledge fusion by merging weights of language models",
      ICLR 2023, arXiv 2212.09849.
    """
    axes = dict(grams[0].axes)

    def leaf(path, b, *ts):
        if path not in axes:
            return sum(ts) / len(ts)
        axis = axes[path]
        orient = (lambda x: x) if axis == 0 else (lambda x: x.T)
        num = den = 0.0
        for t, g in zip(ts, grams):
            gram = g.matrices[path].astype(jtree.ACCUM_DTYPE)
            if gram.shape != (b.shape[axis],) * 2:
                raise validate.MergeInputError(f"regmean: Gram of {path!r} is {gram.shape}, the parameter's axis {axis} "
                                               f"has {b.shape[axis]} entries")
            shrunk = alpha * gram + (1.0 - alpha) * jnp.diag(jnp.diag(gram))
            num = num + shrunk @ orient(t)
            den = den + shrunk
        return orient(jnp.linalg.solve(den, num))

    return jtree.apply(base, jtree.map_with_path(leaf, base, *tvs))


def _fisher_check(num_experts, hp):
    if hp["weights"] is not None:
        validate.check_weights(hp["weights"], num_experts)
    validate.check_finite_number("min_fisher", hp["min_fisher"])
    if hp["min_fisher"] < 0:
        raise validate.MergeInputError(f"min_fisher must be >= 0, got {hp['min_fisher']}")
    _given("fisher", hp, num_experts, "fisher_diagonal", "Fisher pytree", "fisher_merge")


@register("fisher", static=("normalize",), check=_fisher_check, streamable=False,
          reference="Matena & Raffel, 2022, arXiv 2111.09832")
def fisher(base, tvs, *, key=None, fishers=None, weights=None, normalize=True, min_fisher=1e-6):
    """Fisher merging: the elementwise Fisher-weighted mean of the experts.

    ``θ* = Σ_t c_t (F_t + ε) θ_t / Σ_t c_t (F_t + ε)``, computed on task vectors as
    ``θ0 + Σ_t c_t (F_t + ε) τ_t / Σ_t c_t (F_t + ε)``; with ``normalize`` each ``c_t`` is also
    multiplied by ``(1/(‖F_t‖ + ε)) / Σ_s 1/(‖F_s‖ + ε)`` (‖·‖ the L2 norm over all parameters).

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t.
      key: unused (Fisher merging is a closed form).
      fishers: one diagonal Fisher pytree per expert, shaped like the base
        (``jmerge.learn.fisher_diagonal``); required.
      weights: c_t, one per expert; None: 1/K.
      normalize: also weight expert t by 1/(‖F_t‖ + ε), normalised over the experts (FusionBench's
        ``normalize_fisher_weight``, default).
      min_fisher: ε, added to every Fisher entry; 1e-6 (FusionBench's ``minimal_fisher_weight``).

    Returns:
      The merged parameters, shaped and typed like ``base``.

    References:
      Matena & Raffel, 2022, "Merging models with Fisher-weighted averaging", NeurIPS 2022,
      arXiv 2111.09832.
    """
    k = len(tvs)
    for t, f in enumerate(fishers):
        if jax.tree.structure(f) != jax.tree.structure(base):
            raise validate.MergeInputError(f"fisher: the Fisher of expert {t} is not shaped like the base's parameters")
    c = jnp.full((k,), 1.0 / k, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if normalize:
        norms = jnp.stack([jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(f)))
                           for f in fishers])
        inv = 1.0 / (norms + min_fisher)
        c = c * inv / jnp.sum(inv)

    def leaf(b, *args):
        ts, fs = args[:k], args[k:]
        w = [c[i] * (fs[i].astype(jnp.float32) + min_fisher) for i in range(k)]
        return sum(wi * t for wi, t in zip(w, ts)) / sum(w)

    return jtree.apply(base, jax.tree.map(leaf, base, *tvs, *fishers))
