"""Task-arithmetic family: average, task arithmetic, TIES, DARE, breadcrumbs, DELLA,
MagMax and TALL-mask consensus, each a preset of :mod:`jmerge.stages`.

Where implementations disagree, the choice is a named hyper-parameter:

* TIES trim scope: ``trim="global"`` (the paper and FusionBench rank over the whole
  flattened task vector) or ``"tensor"`` (mergekit and PEFT rank within each tensor).
* Sign election: ``sign="sum"`` (the paper's mass election, mergekit's default) or
  ``"count"`` (mergekit's ``consensus_method: count``, PEFT's ``frequency``).
* Disjoint combination: ``normalize=True`` divides by the summed weights of the agreeing
  tasks (the paper's disjoint mean; mergekit's ``normalize``), ``False`` sums them
  (AdaMerging and FusionBench's dis-sum).
* ``weights`` multiply each task vector before election (mergekit's per-model ``weight``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import stages
from jmerge import tree as jtree
from jmerge import validate
from jmerge.methods.registry import MERGEKIT_GTA, Mergekit, register


def _check(num_experts, hp, fractions=("density",), min_experts=1):
    """Checks shared by the family: expert count, fractions, weights, scale, sign and flags."""
    if num_experts < min_experts:
        raise validate.MergeInputError(f"this method needs at least {min_experts} experts, got {num_experts}")
    for name in fractions:
        if name in hp:
            validate.check_fraction(name, hp[name], count=num_experts)
    if hp.get("weights") is not None:
        validate.check_weights(hp["weights"], num_experts)
    if "scale" in hp:
        validate.check_finite_number("scale", hp["scale"])
    if "sign" in hp and hp["sign"] not in ("sum", "count"):
        raise validate.MergeInputError(f"sign must be 'sum' or 'count', got {hp['sign']!r}")
    for flag in ("normalize", "rescale"):
        if flag in hp and not isinstance(hp[flag], bool):
            raise validate.MergeInputError(f"{flag} must be True or False, got {hp[flag]!r}")


def _average_check(num_experts, hp):
    _check(num_experts, hp)
    if hp["normalize"] and hp["weights"] is not None and validate.concrete(hp["weights"]) and float(np.sum(hp["weights"])) == 0.0:
        raise validate.MergeInputError(f"average needs weights with a non-zero sum, got {hp['weights']!r}")


def _ties_check(num_experts, hp):
    _check(num_experts, hp)
    if hp["trim"] not in ("global", "tensor"):
        raise validate.MergeInputError(f"trim must be 'global' or 'tensor', got {hp['trim']!r}")
    if hp["tie_break"] not in stages.TIE_BREAKS:
        raise validate.MergeInputError(f"tie_break must be one of {', '.join(map(repr, stages.TIE_BREAKS))}, "
                                       f"got {hp['tie_break']!r}")
    if hp["tie_break"] != "all" and hp["trim"] != "tensor":
        raise validate.MergeInputError(f"tie_break={hp['tie_break']!r} (mergekit's exactly k per tensor) needs trim='tensor'")


_PER_MODEL = ("weights", "density")  # one value per expert in a YAML model's parameters


def _elect_and_combine(base, tvs, weights, sign, normalize, scale):
    """Shared tail of the TIES-style methods: weight, elect, disjoint combine, apply."""
    weighted = stages.weighted(tvs, weights)
    gamma = stages.elect_sign(weighted, sign)
    masks = stages.agreement_masks(weighted, gamma)
    merged = stages.combine(tvs, weights, masks=masks, normalize=normalize)
    return jtree.apply(base, merged, scale)


@register("average", static=("normalize",), check=_average_check,
          reference="Wortsman et al., 2022 (model soups), arXiv 2203.05482",
          mergekit=Mergekit("linear", {"normalize": True}, {"weight": 1.0}, base="none"))
def average(base, tvs, *, key=None, weights=None, normalize=True):
    """Weighted parameter average of the experts (model soup).

    ``θ = Σ_t w_t θ_t / Σ_t w_t`` with ``θ_t = θ0 + τ_t``, accumulated in float32 from 0 over
    the models in order and divided once; ``normalize=False`` gives ``Σ_t w_t θ_t``.

    Args:
      base: the pre-trained parameters θ0 (only the experts are averaged).
      tvs: the experts' float32 task vectors τ_t = θ_t − θ0, one pytree per expert.
      key: unused (the average is deterministic).
      weights: one w_t per expert (mergekit's per-model ``weight``); None: all 1, the uniform soup.
      normalize: divide by Σ_t w_t (default); False: the weighted sum, mergekit ``linear`` with
        ``normalize: false``.

    Returns:
      The averaged parameters, with the base's structure, shapes and dtypes.

    References:
      Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned models
      improves accuracy without increasing inference time", arXiv 2203.05482; mergekit ``linear``.
    """
    # Under jmerge.tree.rounding, mergekit's `linear` kernel as torch runs it on an AVX2 or AVX-512
    # CPU: `result = zeros`, then per model `result.addcmul_(theta_t, w_t)`, a fused multiply-add
    # `fma(theta_t, w_t, result)` (torch's default, unvectorised kernel, ATEN_CPU_CAPABILITY=default,
    # rounds `theta_t w_t` first), then `result.div_(sum_t w_t)`, a true division by the weights
    # summed in torch's order (_torch_sum). XLA:CPU fuses `total + w_t theta_t` likewise, provided its
    # simplifier neither drops the `0 +` (it then fuses the first product into the second:
    # `fma(w_0, theta_0, w_1 theta_1)`) nor turns the division into a product with the reciprocal:
    # an optimization barrier hides the zeros and the divisor.
    k = len(tvs)
    w = jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    mergekit = jtree.rounding_dtype() is not None

    def leaf(b, *ts):
        b32 = b.astype(jtree.ACCUM_DTYPE)
        total = jnp.zeros_like(b32)
        if mergekit:
            total = jax.lax.optimization_barrier(total)
        for i in range(k):
            total = total + w[i] * (b32 + ts[i])  # theta_t = theta_0 + tau_t
        if not normalize:
            return total.astype(b.dtype)
        if mergekit:
            return (total / jax.lax.optimization_barrier(jnp.full(total.shape, _torch_sum(w)))).astype(b.dtype)
        return (total / sum(w[i] for i in range(k))).astype(b.dtype)

    return jax.tree.map(leaf, base, *tvs)


def _torch_sum(x):
    """``x.sum()`` of a 1-D float32 array in the order of torch's CPU sum over a contiguous row
    (aten ``SumKernel.cpp``, one thread, 8 lanes: fewer than 512 values): fewer than 8 values in 4
    interleaved running sums, the ones left over added to the first, then the 4 summed in order;
    from 8 values, lanes of 8 summed that way, then ``((0 + leftover values in order) + lane 0) + ...
    + lane 7``. mergekit sums ``linear``'s weights so (in order for up to 4 models)."""
    def row_sum(v):  # torch's row_sum with its 4 accumulators (no cascade levels below 64 rows)
        n = len(v) // 4 * 4
        acc = [sum(v[j:n:4], 0.0) for j in range(4)]
        acc[0] = sum(v[n:], acc[0])
        return sum(acc[1:], acc[0])

    k = x.shape[0]
    if k >= 512:  # torch's cascade levels start there; not replayed
        raise ValueError(f"compute_dtype: model replays torch's sum of linear's weights for fewer than 512 models, got {k}")
    if k < 8:
        return row_sum([x[i] for i in range(k)])
    m = k // 8 * 8
    lanes = row_sum([x[i:i + 8] for i in range(0, m, 8)])
    return sum((lanes[j] for j in range(8)), sum((x[i] for i in range(m, k)), 0.0))


@register("task_arithmetic", check=_check, reference="Ilharco et al., 2023, arXiv 2212.04089",
          mergekit=Mergekit("task_arithmetic", MERGEKIT_GTA, {"weight": 1.0, "density": 1.0}, in_dtype=True))
def task_arithmetic(base, tvs, *, key=None, scale=0.3, weights=None, normalize=False):
    """Task arithmetic: the base plus the scaled, weighted sum of the task vectors.

    ``θ = θ0 + λ Σ_t w_t τ_t``, the sum divided by ``Σ_t w_t`` with ``normalize``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t = θ_t − θ0, in the experts' order.
      key: unused (task arithmetic is deterministic).
      scale: λ; 0.3 as AdaMerging and FusionBench (mergekit's ``lambda`` defaults to 1).
      weights: one w_t per expert (mergekit's per-model ``weight``); None: all 1.
      normalize: divide the sum by Σ_t w_t (mergekit's ``normalize``); a sum below 1e-8 in
        magnitude is left undivided, as mergekit.

    Returns:
      θ as a pytree like ``base`` (same structure, shapes and dtypes).

    References:
      Ilharco et al., 2023, "Editing models with task arithmetic", ICLR 2023, arXiv 2212.04089.
    """
    # In float32 this is jmerge.tree.apply_tasks with Gamma_t = lambda w_t (/ sum_t w_t), the kernel
    # of learned coefficients; under jmerge.tree.rounding mergekit's steps in its `dtype`:
    # base + lambda * (sum_t w_t tau_t [/ sum_t w_t]), each rounded.
    if jtree.rounding_dtype() is not None:
        return jtree.apply(base, stages.combine(tvs, weights, normalize=normalize), scale)
    w = jnp.ones((len(tvs),), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    if normalize:
        total = jnp.sum(w)
        w = w / jnp.where(jnp.abs(total) < 1e-8, 1.0, total)  # mergekit leaves a ~0 weight sum undivided
    return jtree.apply_tasks(base, tvs, scale * w)


def _trim(hp):
    """TIES' sparsifier: the magnitude trim, then (``rescale``) mergekit's L1 rescale."""
    trim = stages.magnitude_trim(hp["density"], hp["trim"], hp["tie_break"])
    if not hp["rescale"]:
        return trim
    return stages.Sparsifier(trim.query, lambda tvs, answers, key=None: stages.l1_rescale(tvs, trim.apply(tvs, answers, key)))


@register("ties", static=("density", "trim", "tie_break", "sign", "normalize", "rescale"), check=_ties_check, sparsify=_trim,
          reference="Yadav et al., 2023, arXiv 2306.01708", per_model=_PER_MODEL,
          mergekit=Mergekit("ties", {**MERGEKIT_GTA, "normalize": True}, {"weight": 1.0, "density": 1.0}, fixed={"trim": "tensor", "tie_break": "first", "sign": "sum"}, in_dtype=True))
def ties(
    base, tvs, *, key=None, density=0.2, scale=1.0, trim="global", tie_break="all", sign="sum", weights=None,
    normalize=True, rescale=False,
):
    """TIES-Merging: trim to the top ``density`` magnitudes, elect signs, disjoint mean, scale.

    ``τ̂_t = trim_d(τ_t)`` (the ``int(d n)`` largest ``|τ_t|``), ``γ = sign(Σ_t w_t τ̂_t)``,
    ``m_t = 1[sign(w_t τ̂_t) = γ]``, ``θ = θ0 + λ Σ_t w_t m_t τ̂_t / Σ_t w_t m_t``. The trim's
    exact thresholds come from :func:`jmerge.thresholds.solve` (mesh, host or XLA search).

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, before the trim.
      key: unused (TIES is deterministic).
      density: the fraction d of entries each task keeps, one value or one per expert; 0.2 (k = 20 %).
      scale: λ on the merged task vector; 1.0, the paper's setting without a validation set.
      trim: ``"global"`` ranks |τ_t| over the whole task vector; ``"tensor"`` within each tensor.
      tie_break: entries tied with the k-th largest: ``"all"`` keeps them all; ``"first"`` exactly
        ``max(1, int(d n))`` per tensor, row-major; ``"torch"`` those mergekit's ``torch.argsort`` keeps.
      sign: ``"sum"`` elects the sign of the summed mass; ``"count"`` the sign most entries have.
      weights: one w_t per expert, applied before the election; None: all 1.
      normalize: divide by Σ_t w_t m_t (the disjoint mean, default); False: the disjoint sum.
      rescale: multiply each trimmed tensor back to its L1 norm first (mergekit's ``rescale: true``).

    Returns:
      The merged parameters: the base's structure, shapes and dtypes.

    Warning:
      Implementations disagree. The paper and FusionBench trim globally (``trim="global"``), mergekit
      and PEFT per tensor (``"tensor"``, which a mergekit YAML selects with ``tie_break="first"``).
      Signs are elected by mass (the paper, mergekit's default) or by count (mergekit's
      ``consensus_method: count``, PEFT's ``frequency``). AdaMerging and FusionBench use the
      disjoint sum (``normalize=False``) with λ = 0.3.

    References:
      Yadav et al., 2023, "TIES-Merging: Resolving interference when merging models", NeurIPS 2023,
      arXiv 2306.01708.
    """
    return _elect_and_combine(base, tvs, weights, sign, normalize, scale)


def _dare(hp):
    return stages.dare(hp["density"], hp["rescale"])


@register("dare_linear", static=("density", "rescale"), needs_key=True, check=_check, sparsify=_dare,
          reference="Yu et al., 2024, arXiv 2311.03099", per_model=_PER_MODEL,
          mergekit=Mergekit("dare_linear", {**MERGEKIT_GTA, "rescale": True}, {"weight": 1.0, "density": 1.0}, in_dtype=True))
def dare_linear(base, tvs, *, key=None, density=0.5, scale=1.0, weights=None, rescale=True, normalize=False):
    """DARE + task arithmetic: random drop with rate ``1 - density``, rescale, weighted sum.

    ``τ̃_t = m_t ⊙ τ_t / d`` with ``m_t ~ Bernoulli(d)`` per entry (``d = 1 - p``, ``p`` the drop
    rate), then ``θ = θ0 + λ Σ_t w_t τ̃_t``, divided by ``Σ_t w_t`` with ``normalize``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, before the drop.
      key: a ``jax.random.key`` for the drop masks (required).
      density: the keep probability d, one value or one per expert; 0.5 (FusionBench's p = 0.5).
      scale: λ on the summed task vectors; 1.0.
      weights: one w_t per expert; None: all 1.
      rescale: divide the survivors by d, so that E[τ̃_t] = τ_t; False: keep them as they are.
      normalize: divide the sum by Σ_t w_t (mergekit's ``normalize``).

    Returns:
      The merged parameters, each leaf in the base leaf's shape and dtype.

    Warning:
      ``rescale`` divides by the density (the paper, FusionBench); mergekit's ``rescale: true``
      multiplies each tensor back to its L1 norm. The masks come from jax's generator (mergekit:
      torch's), so the two tools' outputs differ entry by entry.

    References:
      Yu et al., 2024, "Language models are Super Mario: absorbing abilities from homologous models
      as a free lunch", ICML 2024, arXiv 2311.03099.
    """
    return jtree.apply(base, stages.combine(tvs, weights, normalize=normalize), scale)


@register("dare_ties", static=("density", "rescale", "sign", "normalize"), needs_key=True, check=_check, sparsify=_dare,
          reference="Yu et al., 2024, arXiv 2311.03099", per_model=_PER_MODEL,
          mergekit=Mergekit("dare_ties", {**MERGEKIT_GTA, "rescale": True}, {"weight": 1.0, "density": 1.0}, fixed={"sign": "sum"}, in_dtype=True))
def dare_ties(base, tvs, *, key=None, density=0.5, scale=1.0, sign="sum", weights=None, rescale=True, normalize=True):
    """DARE + TIES: random drop and rescale instead of TIES' trim, then elect signs and disjoint mean.

    ``τ̃_t = m_t ⊙ τ_t / d``, ``m_t ~ Bernoulli(d)``; ``γ = sign(Σ_t w_t τ̃_t)``,
    ``m'_t = 1[sign(w_t τ̃_t) = γ]``, ``θ = θ0 + λ Σ_t w_t m'_t τ̃_t / Σ_t w_t m'_t``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, before the random drop.
      key: a ``jax.random.key`` for the drop masks; the merge refuses to run without one.
      density: the keep probability d = 1 - p, one value or one per expert; 0.5.
      scale: λ on the merged task vector; 1.0.
      sign: ``"sum"`` (mass election, the default) or ``"count"``, as :func:`ties`.
      weights: one w_t per expert, applied before the election; None: all 1.
      rescale: divide the survivors by d (default); False: no rescale.
      normalize: the disjoint mean (default); False: the disjoint sum (mergekit's default for
        ``dare_ties``, which a mergekit YAML gets).

    Returns:
      The merged parameters with the base's structure, shapes and dtypes.

    Warning:
      As :func:`dare_linear`: the rescale is by the density here and by the L1 norm in mergekit,
      and the random masks differ from mergekit's (jax's generator, not torch's).

    References:
      Yu et al., 2024 (DARE), arXiv 2311.03099; Yadav et al., 2023 (TIES), arXiv 2306.01708.
    """
    return _elect_and_combine(base, tvs, weights, sign, normalize, scale)


def _breadcrumbs_check(num_experts, hp):
    _check(num_experts, hp)
    validate.check_fraction("gamma", hp["gamma"], low_open=False)
    if hp["tie_break"] not in ("all", "torch"):
        raise validate.MergeInputError(f"breadcrumbs tie_break must be 'all' or 'torch', got {hp['tie_break']!r}")


def _crumbs(hp):
    return stages.breadcrumbs(hp["density"], hp["gamma"], hp["tie_break"])


@register("breadcrumbs", static=("density", "gamma", "tie_break", "normalize"), check=_breadcrumbs_check, sparsify=_crumbs,
          reference="Davari & Belilovsky, 2024, arXiv 2312.06795", per_model=_PER_MODEL,
          mergekit=Mergekit("breadcrumbs", MERGEKIT_GTA, {"weight": 1.0, "density": 1.0, "gamma": 0.01}, in_dtype=True))
def breadcrumbs(base, tvs, *, key=None, density=0.9, gamma=0.01, scale=1.0, weights=None, tie_break="all", normalize=False):
    """Model Breadcrumbs: drop each tensor's largest and smallest entries, then a weighted sum.

    Per tensor of n entries, ``m_t`` keeps ``kth(n_keep + n_top) <= |τ_t| < kth(n_top)`` with
    ``n_keep = int(d n)``, ``n_top = min(int(γ n), n - n_keep)``;
    ``θ = θ0 + λ Σ_t w_t m_t τ_t``, divided by ``Σ_t w_t`` with ``normalize``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, before the masks.
      key: unused (the masks are deterministic).
      density: the fraction d of each tensor kept, one value or one per expert; 0.9.
      gamma: the fraction γ of largest |τ_t| dropped as outliers; 0.01 (mergekit's default).
      scale: λ on the summed task vectors; 1.0.
      weights: one w_t per expert; None: all 1.
      tie_break: ``"all"`` keeps entries tied at a bound; ``"torch"`` exactly n_keep, ties in the
        order of mergekit's torch sort (:func:`jmerge.stages.breadcrumbs`).
      normalize: divide the sum by Σ_t w_t (mergekit's ``normalize``).

    Returns:
      The merged parameters, shaped and typed like ``base``.

    Warning:
      jmerge takes mergekit's parametrisation (``magnitude_outliers``): ``density`` is the fraction
      kept and ``gamma`` the fraction of *largest* entries dropped; the paper's γ names the smallest
      fraction dropped (β the largest). The paper masks per tensor, as here; one implementation
      masked over the whole model (mergekit issue #455).

    References:
      Davari & Belilovsky, 2024, "Model Breadcrumbs: scaling multi-task model merging with sparse
      masks", ECCV 2024, arXiv 2312.06795.
    """
    return jtree.apply(base, stages.combine(tvs, weights, normalize=normalize), scale)


@register("breadcrumbs_ties", static=("density", "gamma", "sign", "normalize", "tie_break"), check=_breadcrumbs_check,
          sparsify=_crumbs, reference="Davari & Belilovsky, 2024, arXiv 2312.06795", per_model=_PER_MODEL,
          mergekit=Mergekit("breadcrumbs_ties", MERGEKIT_GTA, {"weight": 1.0, "density": 1.0, "gamma": 0.01},
                            fixed={"sign": "sum"}, in_dtype=True))
def breadcrumbs_ties(base, tvs, *, key=None, density=0.9, gamma=0.01, scale=1.0, sign="sum", weights=None, normalize=True,
                     tie_break="all"):
    """Breadcrumbs masks followed by TIES' sign election and disjoint mean.

    ``τ̂_t = m_t ⊙ τ_t`` with the masks of :func:`breadcrumbs`; ``γ = sign(Σ_t w_t τ̂_t)``,
    ``a_t = 1[sign(w_t τ̂_t) = γ]``, ``θ = θ0 + λ Σ_t w_t a_t τ̂_t / Σ_t w_t a_t``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, before masking and election.
      key: unused (deterministic masks and election).
      density: the fraction of each tensor kept, one value or one per expert; 0.9.
      gamma: the fraction of largest |τ_t| dropped as outliers (mergekit's parametrisation); 0.01.
      scale: λ on the merged task vector; 1.0.
      sign: ``"sum"`` (mass election, mergekit's) or ``"count"``.
      weights: one w_t per expert, applied before the election; None: all 1.
      normalize: the disjoint mean (default); False: the disjoint sum (mergekit's ``normalize: false``).
      tie_break: ``"all"`` or ``"torch"``, as :func:`breadcrumbs`.

    Returns:
      The merged parameters, with the base's structure, shapes and dtypes.

    Warning:
      ``gamma`` and ``density`` follow mergekit, not the paper (see :func:`breadcrumbs`).

    References:
      Davari & Belilovsky, 2024, arXiv 2312.06795; Yadav et al., 2023 (TIES), arXiv 2306.01708.
    """
    return _elect_and_combine(base, tvs, weights, sign, normalize, scale)


def _della_check(num_experts, hp):
    _check(num_experts, hp)
    validate.check_fraction("epsilon", hp["epsilon"], low_open=False)
    for d in stages.per_task(hp["density"], num_experts):
        if not (0 < d - hp["epsilon"] and d + hp["epsilon"] <= 1):
            raise validate.MergeInputError(
                f"della needs 0 < density - epsilon and density + epsilon <= 1, got density={d}, epsilon={hp['epsilon']}"
            )


def _magprune(hp):
    return stages.della(hp["density"], hp["epsilon"], hp["rescale"])


@register("della", static=("density", "epsilon", "rescale", "sign", "normalize"), needs_key=True, check=_della_check,
          sparsify=_magprune, reference="Deep et al., 2024, arXiv 2406.11617", per_model=_PER_MODEL,
          mergekit=Mergekit("della", {**MERGEKIT_GTA, "normalize": True, "rescale": True},
                            {"weight": 1.0, "density": 1.0, "epsilon": 0.15}, fixed={"sign": "sum"}, below={"density": (1.0, "with density 1 it prunes nothing; use ties or dare_ties")},
                            in_dtype=True))
def della(base, tvs, *, key=None, density=0.7, epsilon=0.15, scale=1.0, sign="sum", weights=None, rescale=True, normalize=True):
    """DELLA: magnitude-ranked stochastic drop (MagPrune), sign election, disjoint mean.

    MagPrune keeps entry i with probability ``p_i = (d - ε) + 2ε r_i`` (``r_i`` in [0, 1] its
    magnitude rank along the last axis) and divides survivors by ``p_i``; then, as :func:`ties`,
    ``θ = θ0 + λ Σ_t w_t m_t τ̃_t / Σ_t w_t m_t`` over the entries agreeing with the elected sign.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, before MagPrune.
      key: a ``jax.random.key`` for MagPrune's draws (required).
      density: the mean keep probability d, one value or one per expert; 0.7.
      epsilon: ε, the spread of keep probabilities around d (0 < d - ε, d + ε <= 1); 0.15.
      scale: λ on the merged task vector; 1.0.
      sign: ``"sum"`` (mass election) or ``"count"``.
      weights: one w_t per expert, applied before the election; None: all 1.
      rescale: divide each survivor by its p_i (the paper); False: keep survivors as they are.
      normalize: the disjoint mean (default); False: the disjoint sum.

    Returns:
      The merged parameters: the base's structure, shapes and dtypes.

    Warning:
      mergekit ranks 3-D and larger tensors along axis 1, jmerge along the last axis (the same for
      matrices); mergekit's ``rescale`` multiplies each pruned tensor back to its L1 norm (jmerge's
      :func:`della_linear` with ``rescale_norm="l1"``) and refuses ``d + ε >= 1``, jmerge allows
      ``= 1``. The random masks come from jax's generator, not torch's.

    References:
      Deep et al., 2024, "DELLA-Merging: reducing interference in model merging through
      magnitude-based sampling", arXiv 2406.11617.
    """
    return _elect_and_combine(base, tvs, weights, sign, normalize, scale)


@register("magmax", check=_check, reference="Marczak et al., 2024, arXiv 2407.06322")
def magmax(base, tvs, *, key=None, scale=0.5):
    """MagMax: per entry the task-vector value of largest magnitude, scaled.

    ``τ_max[j] = τ_s[j]`` with ``s = argmax_t |τ_t[j]|`` (the first task wins ties);
    ``θ = θ0 + λ τ_max``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t (in the paper, of sequential fine-tunes).
      key: unused (MagMax is deterministic).
      scale: λ; 0.5, the paper's.

    Returns:
      The merged parameters, with each leaf shaped and typed as the base's.

    References:
      Marczak et al., 2024, "MagMax: leveraging model merging for seamless continual learning",
      ECCV 2024, arXiv 2407.06322.
    """
    return jtree.apply(base, stages.magnitude_max(tvs), scale)


def _consensus_check(num_experts, hp):
    _check(num_experts, hp)
    if not isinstance(hp["k"], (int, np.integer)) or not 0 <= hp["k"] <= num_experts:
        raise validate.MergeInputError(f"consensus k={hp['k']} must lie in [0, {num_experts}]")
    validate.check_fraction("tall_lambda", hp["tall_lambda"], low_open=False, high=float("inf"), count=num_experts)


@register("consensus", static=("k", "tall_lambda"), check=_consensus_check, reference="Wang et al., 2024 (TALL masks), arXiv 2405.07813",
          per_model=("tall_lambda",))
def consensus(base, tvs, *, key=None, k=2, tall_lambda=0.6, scale=0.3):
    """TALL-mask consensus: the summed task vector where at least ``k`` TALL masks keep it.

    ``τ_MTL = Σ_t τ_t``, TALL masks ``m_t = 1[|τ_t| > λ_t |τ_MTL - τ_t|]``,
    ``θ = θ0 + α 1[Σ_t m_t >= k] ⊙ τ_MTL``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, summed unscaled.
      key: unused (the masks are deterministic).
      k: how many task masks must keep an entry; 2 (the paper's ``prun_thre_k``).
      tall_lambda: λ_t, one value or one per expert; 0.6 (the paper picks it per task on
        validation data from 0.2 to 0.6).
      scale: α on the masked sum; 0.3.

    Returns:
      The merged parameters, structured and typed like ``base``.

    References:
      Wang et al., 2024, "Localizing task information for improved model merging and
      compression", ICML 2024, arXiv 2405.07813.
    """
    masks = stages.tall_masks(tvs, tall_lambda)
    keep = stages.consensus_mask(masks, k)
    total = jtree.add(*tvs)
    return jtree.apply(base, jtree.masked(total, keep), scale)
