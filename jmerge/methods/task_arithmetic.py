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
    """Weighted parameter average: ``theta = sum_t w_t theta_t / sum_t w_t`` (model soup);
    ``normalize=False`` (mergekit ``linear`` with ``normalize: false``) gives ``sum_t w_t theta_t``,
    in float32, accumulated from 0 over the models in order and divided once.

    Under :func:`jmerge.tree.rounding`, mergekit's ``linear`` kernel as torch runs it on an AVX2 or
    AVX-512 CPU: ``result = zeros``, then per model ``result.addcmul_(theta_t, w_t)``, a fused
    multiply-add ``fma(theta_t, w_t, result)`` (torch's default, unvectorised kernel,
    ``ATEN_CPU_CAPABILITY=default``, rounds ``theta_t w_t`` first), then ``result.div_(sum_t w_t)``,
    a true division by the weights summed in torch's order (:func:`_torch_sum`). XLA:CPU fuses
    ``total + w_t theta_t`` likewise, provided its simplifier neither drops the ``0 +`` (it then fuses
    the first product into the second: ``fma(w_0, theta_0, w_1 theta_1)``) nor turns the division
    into a product with the reciprocal: an optimization barrier hides the zeros and the divisor."""
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
    """Task arithmetic (Ilharco et al., 2023): ``theta = theta_0 + lambda sum_t w_t tau_t``; lambda 0.3.
    ``normalize`` divides the sum by ``sum_t w_t`` (mergekit's ``normalize``).

    In float32 this is :func:`jmerge.tree.apply_tasks` with ``Gamma_t = lambda w_t`` (``/ sum_t w_t``),
    the kernel of learned coefficients; under :func:`jmerge.tree.rounding` mergekit's steps in
    its ``dtype``: ``base + lambda * (sum_t w_t tau_t [/ sum_t w_t])``, each rounded."""
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
    """TIES (Yadav et al., 2023): trim to the top ``density`` magnitudes, elect signs, disjoint mean, scale.

    The trim's exact thresholds come from :func:`jmerge.thresholds.solve` (on a mesh by
    collectives, on the host CPU by numpy, inside ``jit`` by the XLA search). ``tie_break``
    settles entries tied with the k-th largest (:func:`jmerge.stages.magnitude_trim`): ``"all"``
    keeps them all, ``"first"`` exactly ``max(1, int(d n))`` per tensor (mergekit's count),
    ``"torch"`` those mergekit's ``torch.argsort`` keeps (mergekit's trim exactly). ``rescale``
    multiplies each trimmed tensor back to its L1 norm before the election (mergekit's
    ``rescale: true``, :func:`jmerge.stages.l1_rescale`).
    """
    return _elect_and_combine(base, tvs, weights, sign, normalize, scale)


def _dare(hp):
    return stages.dare(hp["density"], hp["rescale"])


@register("dare_linear", static=("density", "rescale"), needs_key=True, check=_check, sparsify=_dare,
          reference="Yu et al., 2024, arXiv 2311.03099", per_model=_PER_MODEL,
          mergekit=Mergekit("dare_linear", {**MERGEKIT_GTA, "rescale": True}, {"weight": 1.0, "density": 1.0}, in_dtype=True))
def dare_linear(base, tvs, *, key=None, density=0.5, scale=1.0, weights=None, rescale=True, normalize=False):
    """DARE + task arithmetic (Yu et al., 2024): drop with rate ``1 - density``, rescale, weighted sum
    (divided by ``sum_t w_t`` when ``normalize``)."""
    return jtree.apply(base, stages.combine(tvs, weights, normalize=normalize), scale)


@register("dare_ties", static=("density", "rescale", "sign", "normalize"), needs_key=True, check=_check, sparsify=_dare,
          reference="Yu et al., 2024, arXiv 2311.03099", per_model=_PER_MODEL,
          mergekit=Mergekit("dare_ties", {**MERGEKIT_GTA, "rescale": True}, {"weight": 1.0, "density": 1.0}, fixed={"sign": "sum"}, in_dtype=True))
def dare_ties(base, tvs, *, key=None, density=0.5, scale=1.0, sign="sum", weights=None, rescale=True, normalize=True):
    """DARE + TIES: random drop and rescale instead of the magnitude trim, then elect and disjoint mean."""
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
    """Model Breadcrumbs (Davari & Belilovsky, 2024): drop per-tensor outliers and small entries, weighted sum
    (divided by ``sum_t w_t`` when ``normalize``); ``tie_break`` as :func:`jmerge.stages.breadcrumbs`."""
    return jtree.apply(base, stages.combine(tvs, weights, normalize=normalize), scale)


@register("breadcrumbs_ties", static=("density", "gamma", "sign", "normalize", "tie_break"), check=_breadcrumbs_check,
          sparsify=_crumbs, reference="Davari & Belilovsky, 2024, arXiv 2312.06795", per_model=_PER_MODEL,
          mergekit=Mergekit("breadcrumbs_ties", MERGEKIT_GTA, {"weight": 1.0, "density": 1.0, "gamma": 0.01},
                            fixed={"sign": "sum"}, in_dtype=True))
def breadcrumbs_ties(base, tvs, *, key=None, density=0.9, gamma=0.01, scale=1.0, sign="sum", weights=None, normalize=True,
                     tie_break="all"):
    """Breadcrumbs sparsification followed by TIES sign election and disjoint mean."""
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
    """DELLA (Deep et al., 2024): magnitude-ranked stochastic drop, sign election, disjoint mean."""
    return _elect_and_combine(base, tvs, weights, sign, normalize, scale)


@register("magmax", check=_check, reference="Marczak et al., 2024, arXiv 2407.07089")
def magmax(base, tvs, *, key=None, scale=0.5):
    """MagMax (Marczak et al., 2024): per entry the largest-magnitude task-vector value, scaled by 0.5."""
    return jtree.apply(base, stages.magnitude_max(tvs), scale)


def _consensus_check(num_experts, hp):
    _check(num_experts, hp)
    if not isinstance(hp["k"], (int, np.integer)) or not 0 <= hp["k"] <= num_experts:
        raise validate.MergeInputError(f"consensus k={hp['k']} must lie in [0, {num_experts}]")
    validate.check_fraction("tall_lambda", hp["tall_lambda"], low_open=False, high=float("inf"), count=num_experts)


@register("consensus", static=("k", "tall_lambda"), check=_consensus_check, reference="Wang et al., 2024 (TALL masks), arXiv 2405.07813",
          per_model=("tall_lambda",))
def consensus(base, tvs, *, key=None, k=2, tall_lambda=0.6, scale=0.3):
    """TALL-mask consensus (Wang et al., 2024): keep entries that >= k TALL masks keep, of the summed task vector."""
    masks = stages.tall_masks(tvs, tall_lambda)
    keep = stages.consensus_mask(masks, k)
    total = jtree.add(*tvs)
    return jtree.apply(base, jtree.masked(total, keep), scale)
