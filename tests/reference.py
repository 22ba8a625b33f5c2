"""Plain-numpy reference implementations of the merge formulas, for tests.

Models are flat ``{path: np.ndarray}`` dicts (use :func:`flat`). Task vectors are float32,
as in jmerge (``e.astype(f32) - b.astype(f32)`` rounds identically in numpy and XLA), so
masks that depend on exact magnitudes (top-k trims, sign agreement) can be compared bit for
bit; sums are taken in float64 and compared with a tolerance.
"""

from __future__ import annotations

import numpy as np

import jmerge

F32 = np.float32


def flat(tree) -> dict[str, np.ndarray]:
    """``{path: numpy array}`` of a pytree (bfloat16 stays bfloat16 via ml_dtypes)."""
    return {p: np.asarray(x) for p, x in jmerge.tree.flatten(tree).items()}


def task_vectors(base: dict, experts: list[dict]) -> list[dict]:
    """``tau_t = theta_t - theta_0`` in float32 (Ilharco et al., 2023)."""
    return [{p: e[p].astype(F32) - base[p].astype(F32) for p in base} for e in experts]


def apply(base: dict, tv: dict, scale: float = 1.0) -> dict:
    """``theta_0 + scale * tau`` in float64, cast once to each base dtype."""
    return {p: (base[p].astype(np.float64) + scale * tv[p].astype(np.float64)).astype(base[p].dtype) for p in base}


def weighted_sum(tvs: list[dict], weights=None) -> dict:
    w = np.ones(len(tvs)) if weights is None else np.asarray(weights, np.float64)
    return {p: sum(w[i] * tvs[i][p].astype(np.float64) for i in range(len(tvs))) for p in tvs[0]}


def task_arithmetic(base, experts, scale=0.3, weights=None) -> dict:
    """``theta_0 + lambda * sum_t w_t tau_t``."""
    return apply(base, weighted_sum(task_vectors(base, experts), weights), scale)


def average(base, experts, weights=None) -> dict:
    """``sum_t w_t theta_t / sum_t w_t``, computed directly on the experts."""
    w = np.ones(len(experts)) if weights is None else np.asarray(weights, np.float64)
    return {
        p: (sum(w[i] * experts[i][p].astype(np.float64) for i in range(len(experts))) / w.sum()).astype(base[p].dtype)
        for p in base
    }


# ---------------------------------------------------------------------------- magnitude ranks
def kth_largest(values: np.ndarray, k: int) -> np.float32:
    """k-th largest of ``values`` (1-based) by a full sort."""
    return np.sort(values.reshape(-1))[::-1][k - 1]


def top_mask(tv: dict, density: float, scope: str = "global") -> dict:
    """Keeps the ``int(density * n)`` largest ``|tau|`` over the whole task vector (``global``)
    or within each tensor (``tensor``); entries tied with the k-th largest are kept too."""

    def mask_of(arrays: dict) -> dict:
        mags = np.concatenate([np.abs(a).reshape(-1) for a in arrays.values()])
        k = int(density * mags.size)
        if k >= mags.size:
            return {p: np.ones(a.shape, bool) for p, a in arrays.items()}
        if k == 0:
            return {p: np.zeros(a.shape, bool) for p, a in arrays.items()}
        t = kth_largest(mags, k)
        return {p: np.abs(a) >= t for p, a in arrays.items()}

    if scope == "global":
        return mask_of(tv)
    return {p: mask_of({p: a})[p] for p, a in tv.items()}


def per_task(value, k: int) -> list[float]:
    return [float(v) for v in np.broadcast_to(np.asarray(value, np.float64), (k,))]


def trim(tv: dict, density: float, scope: str = "global") -> dict:
    m = top_mask(tv, density, scope)
    return {p: np.where(m[p], tv[p], F32(0)) for p in tv}


def sum32(arrays) -> np.ndarray:
    """Left-to-right float32 sum (jmerge's order), so signs of near-zero sums match exactly."""
    arrays = list(arrays)
    out = arrays[0].astype(F32)
    for a in arrays[1:]:
        out = out + a.astype(F32)
    return out


def elect_sign(tvs: list[dict], method: str = "sum") -> dict:
    """``sign(sum_t tau_t)`` or ``sign(sum_t sign(tau_t))``; 0 elects +1."""
    f = (lambda x: x) if method == "sum" else np.sign
    return {p: np.where(sum32(f(tv[p]) for tv in tvs) >= 0, 1.0, -1.0) for p in tvs[0]}


def disjoint_merge(tvs: list[dict], weights=None, sign: str = "sum", normalize: bool = True) -> dict:
    """TIES disjoint mean (``normalize``) or sum over the tasks agreeing with the elected sign;
    weights multiply each task vector before the election."""
    w = np.ones(len(tvs)) if weights is None else np.asarray(weights, np.float64)
    weighted = [{p: F32(w[i]) * tv[p] for p in tv} for i, tv in enumerate(tvs)]
    gamma = elect_sign(weighted, sign)
    out = {}
    for p in tvs[0]:
        agree = [np.sign(tv[p]) == gamma[p] for tv in weighted]
        total = sum(np.where(a, tv[p].astype(np.float64), 0.0) for a, tv in zip(agree, weighted))
        if normalize:
            div = sum(w[i] * agree[i] for i in range(len(tvs)))
            total = np.where(np.abs(div) > 1e-8, total / np.where(np.abs(div) > 1e-8, div, 1.0), 0.0)
        out[p] = total
    return out


def ties(base, experts, density=0.2, scale=1.0, trim_scope="global", sign="sum", weights=None, normalize=True):
    """TIES-merging (Yadav et al., 2023): trim, elect, disjoint merge, scale."""
    tvs = [trim(tv, d, trim_scope) for tv, d in zip(task_vectors(base, experts), per_task(density, len(experts)))]
    return apply(base, disjoint_merge(tvs, weights, sign, normalize), scale)


def breadcrumbs_mask(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Per tensor: drop the ``int(gamma n)`` largest ``|x|`` (outliers) and keep the next ones up
    to ``int(density n)`` survivors (mergekit's ``magnitude_outliers``). Entries tied with a cut's
    k-th largest fall on the same side of it (on tie-free data exactly ``int(density n)`` survive)."""
    n = x.size
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    mags = np.abs(x)
    if n_keep == 0:
        return np.zeros(x.shape, bool)
    keep = np.ones(x.shape, bool) if n_keep + n_top >= n else mags >= kth_largest(mags, n_keep + n_top)
    if n_top > 0:
        keep &= ~(mags >= kth_largest(mags, n_top))
    return keep


def breadcrumbs(base, experts, density=0.9, gamma=0.01, scale=1.0, weights=None):
    tvs = task_vectors(base, experts)
    dens = per_task(density, len(tvs))
    kept = [{p: np.where(breadcrumbs_mask(tv[p], d, gamma), tv[p], F32(0)) for p in tv} for tv, d in zip(tvs, dens)]
    return apply(base, weighted_sum(kept, weights), scale)


def breadcrumbs_ties(base, experts, density=0.9, gamma=0.01, scale=1.0, sign="sum", weights=None, normalize=True):
    tvs = task_vectors(base, experts)
    dens = per_task(density, len(tvs))
    kept = [{p: np.where(breadcrumbs_mask(tv[p], d, gamma), tv[p], F32(0)) for p in tv} for tv, d in zip(tvs, dens)]
    return apply(base, disjoint_merge(kept, weights, sign, normalize), scale)


def magmax(base, experts, scale=0.5):
    """MagMax (Marczak et al., 2024): per entry the value of largest ``|tau_t|`` (first wins ties)."""
    tvs = task_vectors(base, experts)
    out = {}
    for p in base:
        stack = np.stack([tv[p] for tv in tvs])
        idx = np.argmax(np.abs(stack), axis=0)  # first maximal index
        out[p] = np.take_along_axis(stack, idx[None], axis=0)[0]
    return apply(base, out, scale)


def tall_masks(tvs: list[dict], lambdas=0.6) -> list[dict]:
    """``m_t = 1[|tau_t| > lambda_t |tau_MTL - tau_t|]``, ``tau_MTL = sum_t tau_t`` (Wang et al., 2024)."""
    lams = np.broadcast_to(np.asarray(lambdas, F32), (len(tvs),))
    total = {p: sum32(tv[p] for tv in tvs) for p in tvs[0]}  # float32 like jmerge: masks match exactly
    return [{p: np.abs(tv[p]) > lam * np.abs(total[p] - tv[p]) for p in tv} for tv, lam in zip(tvs, lams)]


def consensus(base, experts, k=2, tall_lambda=0.6, scale=0.3):
    """TALL-mask consensus: ``theta_0 + alpha * 1[sum_t m_t >= k] * tau_MTL``."""
    tvs = task_vectors(base, experts)
    masks = tall_masks(tvs, tall_lambda)
    total = weighted_sum(tvs)
    keep = {p: sum(m[p].astype(int) for m in masks) >= k for p in base}
    return apply(base, {p: np.where(keep[p], total[p], 0.0) for p in base}, scale)


def rounder(dtype=None):
    """``x`` rounded to ``dtype`` and back to float32 (torch's rounding of each bf16/fp16 step
    on CPU: computed in float32, rounded to nearest even); None: float32, unchanged."""
    if dtype is None:
        return lambda x: np.asarray(x, F32)
    return lambda x: np.asarray(x, F32).astype(dtype).astype(F32)


def in_order(xs):
    """``((0 + x_0) + x_1) + ...`` in float32: torch's CPU ``sum(dim=0)`` over a stacked axis."""
    total = np.zeros_like(xs[0], F32)
    for x in xs:
        total = total + x
    return total


def mergekit_gta(base, experts, weights, densities, *, lam=1.0, normalize, consensus, sparsify, dtype=None):
    """mergekit's generalized task arithmetic for one tensor (TIES when ``consensus`` and
    ``sparsify``), as in mergekit's ``merge_methods/generalized_task_arithmetic.py`` and
    ``sparsify.magnitude``: per expert keep the ``int(d n)`` largest ``|delta|`` (argsort; ties by
    position), ``w_t delta_t``, sum-elected sign (a zero sum elects +1, zero entries agree with
    neither), ``base + lam * sum_t w_t m_t delta_t / sum_t w_t m_t`` (a zero divisor counts as 1;
    without consensus the divisor is ``sum_t w_t``, 1 if under 1e-8). Unlike :func:`ties` (Yadav
    et al., 2023, arXiv:2306.01708), entries tied with the k-th largest are not all kept.

    ``dtype`` (e.g. ``ml_dtypes.bfloat16``): mergekit's arithmetic in its ``dtype``: the inputs,
    task vectors, weights, products, sums, quotient, ``lam * mixed`` and the final sum each
    rounded to it (:func:`rounder`), sums over the experts in order (:func:`in_order`)."""
    r = rounder(dtype)
    base = r(base)
    deltas = []
    for e, d in zip(experts, densities):
        delta = r(r(e) - base)
        if sparsify and d < 1:
            k = int(d * delta.size)
            mask = np.zeros(delta.size, np.float32)
            mask[np.argsort(-np.abs(delta).ravel(), kind="stable")[:k]] = 1
            delta = delta * mask.reshape(delta.shape)
        deltas.append(delta)
    w = r(np.asarray(weights, np.float32)).reshape((-1,) + (1,) * base.ndim)
    wd = [r(delta * w[i]) for i, delta in enumerate(deltas)]
    if consensus:
        majority = np.where(r(in_order(wd)) >= 0, 1.0, -1.0)
        mask = [np.sign(x) == majority for x in wd]
        mixed = r(in_order([x * m for x, m in zip(wd, mask)]))
        divisor = r(in_order([w[i] * m for i, m in enumerate(mask)]))
        divisor[divisor == 0] = 1
    else:
        mixed = r(in_order(wd))
        total = r(in_order(list(w)))
        divisor = np.where(np.abs(total) >= 1e-8, total, 1.0).astype(F32)
    if normalize:
        mixed = r(mixed / divisor)
    return r(base + r(mixed * F32(lam)))


def fma32(x, y, z) -> np.ndarray:
    """``x y + z`` rounded once to float32 (a fused multiply-add), elementwise: ``x y`` is exact in
    float64 and the float64 sum's rounding error is known exactly (TwoSum), so where that sum lies on
    a float32 halfway point the error decides the side, as a single rounding would."""
    x, y, z = (np.asarray(v, F32).astype(np.float64) for v in (x, y, z))
    x, y, z = np.broadcast_arrays(x, y, z)
    s = x * y + z  # x * y exact (48 bits), one float64 rounding of the sum
    bz = s - x * y
    err = (x * y - (s - bz)) + (z - bz)  # s + err == x y + z exactly
    r = s.astype(F32)
    other = np.where(s > r, np.nextafter(r, F32(np.inf)), np.nextafter(r, F32(-np.inf)))
    halfway = s == (r.astype(np.float64) + other) / 2
    return np.where(halfway & (err != 0) & ((err > 0) == (other > r)), other, r).astype(F32)


def torch_sum(x) -> F32:
    """``x.sum()`` of a float32 vector as torch's CPU kernel sums a contiguous row with one thread
    (aten ``SumKernel.cpp``; fewer than 512 values): under 8 values in 4 interleaved running sums
    (``row_sum``), the leftover values added to the first, the 4 then summed in order; from 8 values,
    vectors of 8 lanes summed that way, then the leftover values in order and the 8 lanes onto them."""
    x = np.asarray(x, F32)
    assert x.size < 512, "torch adds cascade levels from 64 rows of 4"

    def row_sum(rows):
        n = len(rows) // 4 * 4
        acc = [np.zeros_like(rows[0]) for _ in range(4)]
        for i in range(n):
            acc[i % 4] = acc[i % 4] + rows[i]
        for row in rows[n:]:
            acc[0] = acc[0] + row
        return acc[0] + acc[1] + acc[2] + acc[3]

    if x.size < 8:
        return F32(row_sum(list(x)))
    m = x.size // 8 * 8
    lanes = row_sum([x[i:i + 8] for i in range(0, m, 8)])
    total = F32(0)
    for v in list(x[m:]) + list(lanes):
        total = F32(total + v)
    return total


def mergekit_linear(models, weights, *, dtype, normalize=True) -> np.ndarray:
    """mergekit's ``linear`` kernel (``merge_methods/linear.py``) on one tensor as torch runs it on an
    AVX2/AVX-512 CPU: the models rounded to ``dtype`` as mergekit loads them, ``result = 0`` in
    float32, ``result.addcmul_(theta_t, w_t)`` per model, a fused multiply-add (:func:`fma32`), then
    ``result.div_(w.sum())`` (a true division by :func:`torch_sum`), rounded to ``dtype``."""
    w = np.asarray(weights, F32)
    total = np.zeros(np.shape(models[0]), F32)
    for m, wt in zip(models, w):
        total = fma32(np.asarray(m).astype(dtype).astype(F32), wt, total)
    if normalize:
        total = total / torch_sum(w)
    return total.astype(dtype)
