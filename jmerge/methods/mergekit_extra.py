"""The merge methods mergekit 0.1.5 registers beyond jmerge's task-arithmetic family and
spherical methods, with mergekit's per-tensor semantics as the defaults (read from
``mergekit/merge_methods/{generalized_task_arithmetic,sce,nearswap,arcee_fusion,karcher,
nuslerp,ram}.py`` and ``mergekit/sparsify.py`` of the 0.1.5 wheel; arcee-ai/mergekit a6e4028
has the same formulas except nuslerp's colinearity test).

Every method works tensor by tensor (so it streams, like mergekit) on float32 task vectors
``tau_t = theta_t - theta_0``; ``theta_t = theta_0 + tau_t`` where a method needs the weights.
Reductions run over a tensor's own axes without reshapes, so sharded axes stay sharded
(except where a sort is needed: ``sce``'s top-k and ``arcee_fusion``'s quantiles).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import stages
from jmerge import tree as jtree
from jmerge import validate
from jmerge.methods.registry import MERGEKIT_GTA, Mergekit, register
from jmerge.methods.task_arithmetic import _della_check

F32 = jtree.ACCUM_DTYPE


def _per_model(w, ndim):
    """A (K,) vector shaped to broadcast against a (K, *shape) stack."""
    return w.reshape((-1,) + (1,) * ndim)


def _exactly(name, n, num_experts, what):
    if num_experts != n:
        raise validate.MergeInputError(f"{name} merges {what}, got {num_experts} experts")


# ----------------------------------------------------------------------------- della_linear
def _della_linear_check(num_experts, hp):
    _della_check(num_experts, hp)
    if hp["rescale_norm"] not in ("l1", "keep_probability"):
        raise validate.MergeInputError(f"rescale_norm must be 'l1' or 'keep_probability', got {hp['rescale_norm']!r}")


@register("della_linear", static=("density", "epsilon", "rescale", "rescale_norm"), needs_key=True,
          check=_della_linear_check, reference="Deep et al., 2024, arXiv 2406.11617", per_model=("weights", "density"),
          mergekit=Mergekit("della_linear", {**MERGEKIT_GTA, "rescale": True},
                            {"weight": 1.0, "density": 1.0, "epsilon": 0.15}, below={"density": (1.0, "with density 1 it prunes nothing; use ties or dare_ties")},
                            in_dtype=True))
def della_linear(base, tvs, *, key=None, density=0.7, epsilon=0.15, scale=1.0, weights=None, rescale=True,
                 rescale_norm="l1", normalize=False):
    """Linear DELLA: MagPrune, then a weighted sum with no sign election (mergekit ``della_linear``).

    MagPrune keeps entry i with probability ``p_i = (d - ε) + 2ε r_i`` (``r_i`` its magnitude
    rank in [0, 1] along the last axis, :func:`jmerge.stages.della`);
    ``θ = θ0 + λ Σ_t w_t MagPrune(τ_t)``, divided by ``Σ_t w_t`` with ``normalize``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, before MagPrune.
      key: a ``jax.random.key`` for the keep draws (required).
      density: d, the mean keep probability, one value or one per expert; 0.7.
      epsilon: ε, the spread of the keep probabilities around d; 0.15.
      scale: λ (mergekit's ``lambda``); 1.0.
      weights: one w_t per expert; None: all 1.
      rescale: rescale the survivors as ``rescale_norm`` says (default); False: leave them.
      rescale_norm: ``"l1"``: each pruned tensor back to its L1 norm (mergekit);
        ``"keep_probability"``: each survivor divided by its p_i (the paper).
      normalize: divide the sum by Σ_t w_t (mergekit's ``normalize``).

    Returns:
      The merged parameters, each leaf shaped and typed as the base's.

    Warning:
      The rescale differs between the paper (1/p_i) and mergekit (L1 norm; the default here).
      mergekit ranks 3-D and larger tensors along axis 1, jmerge along the last axis (the same for
      matrices); mergekit refuses ``d + ε >= 1``, jmerge allows ``= 1``. The random masks differ
      from mergekit's (jax's generator, not torch's).

    References:
      Deep et al., 2024, "DELLA-Merging", arXiv 2406.11617; mergekit 0.1.5 ``della_linear``.
    """
    tvs = jtree.rounded(tvs)  # mergekit's task vectors in `dtype` (jmerge.tree.rounding)
    by_probability = rescale and rescale_norm == "keep_probability"
    kept = stages.della(density, epsilon, by_probability)(tvs, key)
    if rescale and rescale_norm == "l1":
        kept = stages.l1_rescale(tvs, kept)
    return jtree.apply(base, stages.combine(kept, weights, normalize=normalize), scale)


# ----------------------------------------------------------------------------- sce
def _sce_check(num_experts, hp):
    if num_experts < 1:
        raise validate.MergeInputError("sce needs at least 1 expert")
    validate.check_fraction("select_topk", hp["select_topk"], low_open=False)


def _top_variance_mask(x, fraction):
    """mergekit's ``sce_mask``: the ``int(fraction * count_nonzero(var))`` entries of largest
    variance across the experts (population variance), ties broken by position."""
    var = jnp.var(x, axis=0)
    k = jnp.floor(jnp.count_nonzero(var).astype(F32) * fraction).astype(jnp.int32)
    order = jnp.argsort(-var.reshape(-1), stable=True)
    rank = jnp.zeros(var.size, jnp.int32).at[order].set(jnp.arange(var.size, dtype=jnp.int32))
    return (rank < k).reshape(var.shape)


@register("sce", static=("select_topk",), check=_sce_check, reference="Wan et al., 2024 (FuseChat), arXiv 2408.07990",
          mergekit=Mergekit("sce", {"select_topk": 1.0, "int8_mask": False}, passed={"select_topk": "select_topk"}))
def sce(base, tvs, *, key=None, select_topk=1.0):
    """SCE (select, calculate, erase) of FuseChat, per tensor, as mergekit ``sce``.

    Select: with ``select_topk < 1``, keep in every ``τ_t`` only the top ``select_topk`` fraction
    of the (non-zero-variance) entries by variance across experts. Calculate:
    ``w_t = mean(τ_t²) / Σ_s mean(τ_s²)`` (``1/K`` when that sum is below 1e-6). Erase:
    ``m_t = 1[sign(τ_t) = sign(Σ_s τ_s)]`` (TIES' mass election, ties to +).
    ``θ = θ0 + Σ_t w_t m_t τ_t / max(Σ_t w_t m_t, 1e-6)``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, selected and weighted per tensor.
      key: unused (SCE is deterministic).
      select_topk: the fraction of entries kept by variance; 1.0 (mergekit's default) keeps all.

    Returns:
      The merged parameters, with the base's structure, shapes and dtypes.

    References:
      Wan et al., 2024, "FuseChat: knowledge fusion of chat models", arXiv 2408.07990; mergekit
      0.1.5 ``sce``.
    """

    def leaf(_, ts):
        x = jnp.stack(ts)
        if select_topk < 1:
            x = jnp.where(_top_variance_mask(x, select_topk), x, 0.0)
        keep = jnp.sign(x) == jnp.where(jnp.sum(x, axis=0) >= 0, 1.0, -1.0)
        w = jnp.mean(x * x, axis=tuple(range(1, x.ndim)))
        total = jnp.sum(w)
        w = jnp.where(jnp.abs(total) < 1e-6, 1.0 / len(ts), w / jnp.where(jnp.abs(total) < 1e-6, 1.0, total))
        ew = jnp.where(keep, _per_model(w, x.ndim - 1), 0.0)
        return jnp.sum(x * ew, axis=0) / jnp.maximum(jnp.sum(ew, axis=0), 1e-6)

    return jtree.apply(base, jtree.map_tasks(leaf, tvs))


# ----------------------------------------------------------------------------- nearswap
def _nearswap_check(num_experts, hp):
    _exactly("nearswap", 1, num_experts, "one model into the base")
    if hp["t"] is None:
        raise validate.MergeInputError("nearswap needs the parameter t (the distance below which the model's value is taken)")
    validate.check_finite_number("t", hp["t"])


@register("nearswap", check=_nearswap_check, reference="mergekit (Goddard et al., 2024, arXiv 2403.13257)",
          mergekit=Mergekit("nearswap", {"t": None}, passed={"t": "t"}))
def nearswap(base, tvs, *, key=None, t=None):
    """NearSwap: the model's value where it is near the base, moving toward the base as they differ.

    Per entry, ``w = clip(t / max(|θ_1 - θ0|, 1e-6), 0, 1)`` and ``θ = θ0 + w τ_1``: the
    model's value within ``t`` of the base, beyond it a step of length ``t`` from the base.

    Args:
      base: the pre-trained parameters θ0.
      tvs: one float32 task vector τ_1 = θ_1 − θ0 (exactly one model).
      key: unused (NearSwap is deterministic).
      t: the distance below which the model's value is taken; required (mergekit has no default).

    Returns:
      The merged parameters, shaped and typed like ``base``.

    References:
      mergekit 0.1.5 ``nearswap`` (no paper; alchemonaut,
      huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).
    """
    (tau,) = tvs
    return jtree.apply(base, jax.tree.map(lambda x: jnp.clip(t / jnp.maximum(jnp.abs(x), 1e-6), 0.0, 1.0) * x, tau))


# ----------------------------------------------------------------------------- arcee_fusion
def _arcee_fusion_check(num_experts, hp):
    del hp
    _exactly("arcee_fusion", 1, num_experts, "one model into the base")


def _quantile_lower(sorted_flat, q):
    """``sorted[floor(q (n - 1))]``, mergekit's ``approximate_quantiles`` index."""
    return sorted_flat[int(q * (sorted_flat.size - 1))]


@register("arcee_fusion", check=_arcee_fusion_check, reference="mergekit (Goddard et al., 2024, arXiv 2403.13257)",
          mergekit=Mergekit("arcee_fusion"))
def arcee_fusion(base, tvs, *, key=None):
    """Arcee Fusion: the model's value at entries of outlying importance, the base's elsewhere.

    Per tensor, importance ``s = |τ_1| · KL(softmax(θ_1) ‖ softmax(θ0))`` with the KL taken
    along the last axis (``+1e-8`` on both distributions) and broadcast over it;
    ``θ = θ0 + 1[s >= median(s) + 1.5 IQR(s)] ⊙ τ_1``, quantiles ``sorted(s)[⌊q (n-1)⌋]``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: one float32 task vector τ_1 (exactly one model is fused into the base).
      key: unused (jmerge's quantiles are exact).

    Returns:
      The fused parameters, with the base's structure, shapes and dtypes.

    Warning:
      mergekit estimates the quantiles of a tensor of more than 10^6 entries from a random
      sample (not reproducible); jmerge always uses every entry. The KL terms cancel in float32,
      so entries within ~0.3 % of the threshold can flip between torch and XLA.

    References:
      mergekit 0.1.5 ``arcee_fusion`` (no paper; Arcee AI's blog).
    """
    (tau,) = tvs

    def leaf(b, x):
        shape = b.shape
        b0 = b.astype(F32).reshape(shape or (1,))
        x = x.reshape(shape or (1,))
        p = jax.nn.softmax(b0 + x, axis=-1) + 1e-8
        q = jax.nn.softmax(b0, axis=-1) + 1e-8
        kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
        s = jnp.abs(x) * kl
        ordered = jnp.sort(s.reshape(-1))
        median = _quantile_lower(ordered, 0.5)
        threshold = median + 1.5 * (_quantile_lower(ordered, 0.75) - _quantile_lower(ordered, 0.25))
        return jnp.where(s >= threshold, x, 0.0).reshape(shape)

    return jtree.apply(base, jax.tree.map(leaf, base, tau))


# ----------------------------------------------------------------------------- karcher
def _karcher_check(num_experts, hp):
    if num_experts < 1:
        raise validate.MergeInputError("karcher needs at least 1 model")
    if not isinstance(hp["max_iter"], (int, np.integer)) or hp["max_iter"] < 0:
        raise validate.MergeInputError(f"max_iter must be an integer >= 0, got {hp['max_iter']!r}")
    validate.check_fraction("tol", hp["tol"], high=float("inf"))


def _karcher_mean(xs, max_iter, tol):
    """mergekit's ``karcher_merge_tensors`` with equal weights ``a = 1/K`` on flattened tensors."""
    k = len(xs)
    x = jnp.stack(xs)
    axes = tuple(range(1, x.ndim))
    norms = jnp.sqrt(jnp.sum(x * x, axis=axes))  # (K,)
    units = jnp.where(_per_model(norms > 0, x.ndim - 1), x / _per_model(jnp.where(norms > 0, norms, 1.0), x.ndim - 1), 0.0)
    valid = norms > tol
    a = jnp.where(valid, 1.0 / k, 0.0)
    a = a / jnp.where(jnp.any(valid), jnp.sum(a), 1.0)
    u = jnp.sum(_per_model(a, x.ndim - 1) * units, axis=0)
    nu = jnp.sqrt(jnp.sum(u * u))
    u = jnp.where(nu < tol, units[jnp.argmax(valid)], u / jnp.where(nu < tol, 1.0, nu))

    def step(_, carry):
        u, done = carry
        cos = jnp.clip(jnp.sum(units * u, axis=axes), -1.0, 1.0)  # (K,)
        theta = jnp.arccos(cos)
        moves = valid & (theta >= tol)
        coef = jnp.where(moves, a * theta / jnp.where(moves, jnp.sin(theta), 1.0), 0.0)
        tangent = jnp.sum(_per_model(coef, x.ndim - 1) * (units - _per_model(cos, x.ndim - 1) * u), axis=0)
        nt = jnp.sqrt(jnp.sum(tangent * tangent))
        stop = done | (nt < tol)
        new = jnp.cos(nt) * u + jnp.sin(nt) * (tangent / jnp.where(nt > 0, nt, 1.0))
        nn = jnp.sqrt(jnp.sum(new * new))
        new = jnp.where(nn > tol, new / jnp.where(nn > tol, nn, 1.0), new)
        return jnp.where(stop, u, new), stop

    u, _ = jax.lax.fori_loop(0, max_iter, step, (u, jnp.asarray(False)))
    return jnp.where(jnp.any(valid), jnp.sum(norms) / k * u, 0.0)


@register("karcher", static=("max_iter",), check=_karcher_check,
          reference="Karcher, 1977 (Riemannian centre of mass); mergekit (Goddard et al., 2024, arXiv 2403.13257)",
          mergekit=Mergekit("karcher", {"max_iter": 10, "tol": 1e-5}, base="none", base_merged=True,
                            passed={"max_iter": "max_iter", "tol": "tol"}))
def karcher(base, tvs, *, key=None, max_iter=10, tol=1e-5):
    """Karcher (Riemannian) mean of the models' weights on the sphere, per tensor.

    With unit vectors ``u_t = θ_t / |θ_t|`` (``θ_t = θ0 + τ_t``; those of norm <= ``tol`` left
    out) and equal weights, start at the normalised mean of the ``u_t`` and repeat up to
    ``max_iter`` times: ``T = mean_t φ_t / sin(φ_t) (u_t - cos(φ_t) u)`` over the ``u_t`` at
    angle ``φ_t >= tol`` from ``u``; stop when ``|T| < tol``, else
    ``u ← normalise(cos|T| u + sin|T| T/|T|)``. Result: ``θ = mean_t |θ_t| · u``.

    Args:
      base: the pre-trained parameters θ0, from which the models' weights are rebuilt.
      tvs: the models' float32 task vectors τ_t (every listed model is averaged).
      key: unused (the iteration is deterministic).
      max_iter: the most iterations; 10 (mergekit's).
      tol: the norm, angle and step size below which a vector is ignored or the loop stops; 1e-5.

    Returns:
      The mean weights, each leaf in the base leaf's shape and dtype.

    References:
      Karcher, 1977, "Riemannian center of mass and mollifier smoothing" (no paper on arXiv);
      mergekit 0.1.5 ``karcher`` (the toolkit: Goddard et al., 2024, arXiv 2403.13257).
    """

    def leaf(b, *ts):
        b32 = b.astype(F32)
        return _karcher_mean([b32 + t for t in ts], max_iter, tol).astype(b.dtype)

    return jax.tree.map(leaf, base, *tvs)


# ----------------------------------------------------------------------------- nuslerp
def _nuslerp_check(num_experts, hp):
    _exactly("nuslerp", 2, num_experts, "exactly two models (plus an optional base)")
    if hp["weights"] is not None:
        validate.check_weights(hp["weights"], num_experts)
    if hp["space"] not in ("weights", "task_vectors"):
        raise validate.MergeInputError(f"space must be 'weights' or 'task_vectors', got {hp['space']!r}")


def _nuslerp_pair(t, v0, v1, axis):
    """mergekit 0.1.5's ``nuslerp``: SLERP along ``axis`` (None: the whole tensor), lerp where
    ``1 - cos^2 theta <= 1e-16``; directions normalised with norms floored at 1e-7."""
    norm = lambda v: jnp.maximum(jnp.sqrt(jnp.sum(v * v, axis=axis, keepdims=True)), 1e-7)  # noqa: E731
    cos = jnp.clip(jnp.sum((v0 / norm(v0)) * (v1 / norm(v1)), axis=axis, keepdims=True), -1.0, 1.0)
    colinear = 1.0 - cos * cos <= 1e-16
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    sin = jnp.sin(theta)
    spherical = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / jnp.where(colinear, 1.0, sin)
    return jnp.where(colinear, (1 - t) * v0 + t * v1, spherical)


@register("nuslerp", static=("flatten", "row_wise", "space"), check=_nuslerp_check, reference="mergekit (Goddard et al., 2024, arXiv 2403.13257)",
          mergekit=Mergekit("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": None}, base="optional",
                            passed={"nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}))
def nuslerp(base, tvs, *, key=None, weights=None, flatten=True, row_wise=False, space="weights"):
    """NuSLERP: SLERP of two models at the point their weights set, per tensor or per row.

    ``t = w_2 / (w_1 + w_2)`` (0.5 when ``|w_1 + w_2| < 1e-6`` or without ``weights``);
    ``θ = slerp(t, θ_1, θ_2)``, or ``θ0 + slerp(t, τ_1, τ_2)`` on task vectors, with
    directions normalised (norms floored at 1e-7) and a lerp where ``1 - cos² <= 1e-16``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the two models' float32 task vectors τ_1, τ_2.
      key: unused (NuSLERP is deterministic).
      weights: (w_1, w_2); None: t = 0.5. (mergekit requires a ``weight`` per model; the YAML
        mapping does too.)
      flatten: one angle per tensor (mergekit's ``nuslerp_flatten``, default); False: one per row.
      row_wise: with ``flatten=False``, rows along the first axis (``nuslerp_row_wise``); else
        along the last.
      space: ``"weights"`` (mergekit without ``base_model``) or ``"task_vectors"`` (with one).

    Returns:
      The interpolated parameters, with the base's structure, shapes and dtypes.

    References:
      mergekit 0.1.5 ``nuslerp`` (no paper; the toolkit: Goddard et al., 2024, arXiv 2403.13257).
    """
    w = jnp.ones((2,), F32) if weights is None else jnp.asarray(weights, F32)
    total = w[0] + w[1]
    small = jnp.abs(total) < 1e-6
    t = jnp.where(small, 0.5, w[1] / jnp.where(small, 1.0, total))

    def leaf(b, t1, t2):
        b32 = b.astype(F32)
        axis = None if (flatten or b.ndim == 0) else (0 if row_wise else b.ndim - 1)
        if space == "task_vectors":
            return (b32 + _nuslerp_pair(t, t1, t2, axis)).astype(b.dtype)
        return _nuslerp_pair(t, b32 + t1, b32 + t2, axis).astype(b.dtype)

    return jax.tree.map(leaf, base, *tvs)


# ----------------------------------------------------------------------------- ram, ramplus_tl
def _ram_check(num_experts, hp):
    if num_experts < 1:
        raise validate.MergeInputError("ram needs at least 1 expert")
    validate.check_fraction("epsilon", hp["epsilon"], low_open=False, high=float("inf"))
    for name in ("r", "alpha"):
        if name in hp:
            validate.check_fraction(name, hp[name], low_open=False, high=float("inf"))


def _ram_parts(ts, epsilon):
    """Stacked task vectors with entries of ``|tau| <= epsilon`` zeroed, and the masks of
    entries one expert (``unique``) or several (``shared``) change, with the counts."""
    x = jnp.stack(ts)
    changed = jnp.abs(x) > epsilon
    count = jnp.sum(changed, axis=0)
    return jnp.where(changed, x, 0.0), changed, count == 1, count > 1, count.astype(x.dtype)


@register("ram", check=_ram_check, reference="Reinforced Agent Merging, arXiv 2601.13572",
          mergekit=Mergekit("ram", {"epsilon": 1e-5}, passed={"epsilon": "epsilon"}))
def ram(base, tvs, *, key=None, epsilon=1e-5):
    """RAM (Reinforced Agent Merging): unique changes kept, shared ones averaged, per entry.

    An entry only one expert changes (``|τ_t| > ε``) takes that change, an entry several change
    takes the mean of their changes: ``θ = θ0 + Σ_t τ_t 1[unique] + Σ_t τ_t 1[shared] / n``,
    ``n`` the number of experts changing the entry.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t (in the paper, of RL-trained agents).
      key: unused (RAM is deterministic).
      epsilon: ε, the size below which an entry counts as unchanged; 1e-5 (mergekit's).

    Returns:
      The merged parameters, shaped and typed like ``base``.

    References:
      Yuan et al., 2026, "Behavior knowledge merge in reinforced agentic models",
      arXiv 2601.13572; mergekit 0.1.5 ``ram``.
    """

    def leaf(_, ts):
        x, _changed, unique, shared, count = _ram_parts(ts, epsilon)
        return jnp.sum(jnp.where(unique, x, 0.0) + jnp.where(shared, x / jnp.maximum(count, 1), 0.0), axis=0)

    return jtree.apply(base, jtree.map_tasks(leaf, tvs))


@register("ramplus_tl", check=_ram_check, reference="Reinforced Agent Merging, arXiv 2601.13572",
          mergekit=Mergekit("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
                            passed={"r": "r", "alpha": "alpha", "epsilon": "epsilon"}))
def ramplus_tl(base, tvs, *, key=None, r=0.1, alpha=0.2, epsilon=1e-5):
    """RAM+ with tensor-local overlap ratios: RAM with each expert's unique changes boosted.

    As :func:`ram`, but expert t's unique changes are scaled by ``λ_t = 1 + r clip(ρ_t, 0, α)``,
    ``ρ_t = #shared_t / max(#unique_t, ε)`` counted within the tensor.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, compared entry by entry.
      key: unused (RAM+ is deterministic).
      r: the boost's strength; 0.1 (mergekit's).
      alpha: α, the cap on the overlap ratio ρ_t; 0.2.
      epsilon: ε, the size below which an entry counts as unchanged (and the floor of #unique_t); 1e-5.

    Returns:
      The merged parameters with the base's structure, shapes and dtypes.

    References:
      Yuan et al., 2026 (RAM), arXiv 2601.13572; mergekit 0.1.5 ``ramplus_tl`` (tensor-local RAM+).
    """

    def leaf(_, ts):
        x, changed, unique, shared, count = _ram_parts(ts, epsilon)
        axes = tuple(range(1, x.ndim))
        n_shared = jnp.sum(changed & shared, axis=axes).astype(F32)
        n_unique = jnp.sum(changed & unique, axis=axes).astype(F32)
        lam = 1.0 + r * jnp.clip(n_shared / jnp.maximum(n_unique, epsilon), 0.0, alpha)
        boosted = jnp.where(unique, x * _per_model(lam, x.ndim - 1), 0.0)
        return jnp.sum(boosted + jnp.where(shared, x / jnp.maximum(count, 1), 0.0), axis=0)

    return jtree.apply(base, jtree.map_tasks(leaf, tvs))


# ----------------------------------------------------------------------------- passthrough
def _passthrough_check(num_experts, hp):
    _exactly("passthrough", 1, num_experts, "one model (per slice: a frankenmerge lists one source per slice)")


@register("passthrough", check=_passthrough_check, reference="mergekit (Goddard et al., 2024, arXiv 2403.13257)",
          per_model=("scale",), mergekit=Mergekit("passthrough", model_params={"scale": 1.0}, base="refused"))
def passthrough(base, tvs, *, key=None, scale=1.0):
    """Passthrough: the one model's tensors, times ``scale`` (frankenmerges' copy step).

    ``θ = scale · θ_1``; jmerge passes that model as the base, so ``θ_1 = θ0`` exactly.

    Args:
      base: the one model θ_1, passed as the base.
      tvs: ignored (one zero task vector: the model is the base).
      key: unused (a copy is deterministic).
      scale: the factor on every tensor (mergekit's per-model ``scale``); 1.0, a plain copy.

    Returns:
      ``scale · θ_1``, with the base's structure, shapes and dtypes.

    References:
      mergekit 0.1.5 ``passthrough`` (no paper; the toolkit: Goddard et al., 2024, arXiv 2403.13257).
    """
    del tvs
    return jax.tree.map(lambda b: b * scale, base)
