"""Composable stages on task vectors, in the spirit of optax's transformations.

A merge is a chain ``sparsify -> elect sign -> combine -> apply``:

* a **sparsifier** maps a list of K task vectors (and a PRNG key) to K sparser ones:
  :func:`magnitude_trim`, :func:`dare`, :func:`breadcrumbs`, :func:`della`; :func:`chain`
  composes them;
* :func:`elect_sign` picks one sign per entry (TIES), :func:`agreement_masks` keeps
  the entries that agree with it;
* a **combiner** turns K task vectors into one: :func:`combine` (weighted sum, mean,
  disjoint mean/sum), :func:`magnitude_max` (MagMax), :func:`consensus_mask` (TALL);
* :func:`jmerge.tree.apply` adds the result to the base.

Every function is pure and jit-traceable; hyper-parameters that fix array sizes (densities)
are Python numbers. Thresholds are exact k-th largest magnitudes found by bisection on the
float32 bit pattern (31 counting passes, no sort: sorts of millions of elements take seconds
on XLA:CPU, research/jax_ecosystem.md §7.4).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import tree as jtree

PyTree = jtree.PyTree
Sparsifier = Callable[[Sequence[PyTree], jax.Array | None], list[PyTree]]


# ---------------------------------------------------------------------------- thresholds
def kth_largest_magnitude(arrays: Sequence[jax.Array], k: int) -> jax.Array:
    """Exact k-th largest ``|x|`` over all entries of ``arrays`` (1 <= k <= total size).

    Bisection on the int32 bit pattern of non-negative float32 values, which is monotone
    in the value: after 31 passes of "count entries >= t" the lower end is exactly the
    k-th largest magnitude. Counts are uint32 (up to 4.29e9 entries per call).
    """
    mags = [jnp.abs(a.astype(jnp.float32)) for a in arrays]

    def count_at_least(bits):
        t = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return sum(jnp.sum(m >= t, dtype=jnp.uint32) for m in mags)

    hi = jax.lax.bitcast_convert_type(jnp.max(jnp.stack([jnp.max(m) for m in mags])), jnp.int32) + 1
    lo = jnp.int32(0)  # count(>= 0.0) = everything >= k

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = count_at_least(mid) >= jnp.uint32(k)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _keep_count(density: float, size: int) -> int:
    """Entries kept at ``density``: ``int(density * size)`` (mergekit's and PEFT's rounding)."""
    return int(density * size)


def top_magnitude_mask(arrays: Sequence[jax.Array], density: float) -> list[jax.Array]:
    """Boolean masks keeping the ``int(density * n)`` largest ``|x|`` jointly over ``arrays``."""
    n = sum(int(np.prod(a.shape)) for a in arrays)
    k = _keep_count(density, n)
    if k >= n:
        return [jnp.ones(a.shape, bool) for a in arrays]
    if k == 0:
        return [jnp.zeros(a.shape, bool) for a in arrays]
    t = kth_largest_magnitude(arrays, k)
    return [jnp.abs(a) >= t for a in arrays]


def per_task(value, k_tasks: int) -> list:
    """One value per task from a scalar or a length-K sequence."""
    values = list(np.atleast_1d(np.asarray(value, dtype=np.float64)))
    return values * k_tasks if len(values) == 1 else values


def _task_key(key: jax.Array, task: int, leaf: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, task), leaf)


# ---------------------------------------------------------------------------- sparsifiers
def magnitude_trim(density: float | Sequence[float], scope: str = "global") -> Sparsifier:
    """TIES trim: keep the top ``density`` fraction of ``|tau_t|``, zero the rest.

    ``scope="global"`` ranks over the whole flattened task vector (TIES paper, FusionBench);
    ``scope="tensor"`` ranks within each tensor (mergekit, PEFT). ``density`` may be one
    value or one per task.
    """
    if scope not in ("global", "tensor"):
        raise ValueError(f"trim scope must be 'global' or 'tensor', got {scope!r}")

    def trim(tvs, key=None):
        out = []
        for tv, d in zip(tvs, per_task(density, len(tvs))):
            leaves, treedef = jax.tree.flatten(tv)
            if scope == "global":
                masks = top_magnitude_mask(leaves, d)
            else:
                masks = [top_magnitude_mask([x], d)[0] for x in leaves]
            out.append(jax.tree.unflatten(treedef, [jnp.where(m, x, 0.0) for m, x in zip(masks, leaves)]))
        return out

    return trim


def dare(density: float | Sequence[float], rescale: bool = True) -> Sparsifier:
    """DARE (Yu et al., 2024): keep each entry with probability ``density = 1 - p``, and
    divide survivors by ``density`` when ``rescale`` so the expectation is unchanged."""

    def drop(tvs, key):
        if key is None:
            raise ValueError("dare needs a PRNG key (jax.random.key(seed))")
        out = []
        for t, (tv, d) in enumerate(zip(tvs, per_task(density, len(tvs)))):
            leaves, treedef = jax.tree.flatten(tv)
            new = []
            for i, x in enumerate(leaves):
                keep = jax.random.bernoulli(_task_key(key, t, i), d, x.shape)
                new.append(jnp.where(keep, x / d if rescale else x, 0.0))
            out.append(jax.tree.unflatten(treedef, new))
        return out

    return drop


def breadcrumbs(density: float | Sequence[float], gamma: float = 0.01) -> Sparsifier:
    """Model Breadcrumbs (Davari & Belilovsky, 2024), per tensor, mergekit's parametrisation:
    drop the ``gamma`` fraction of largest ``|tau|`` (outliers) and enough of the smallest that
    a ``density`` fraction survives."""

    def crumbs(tvs, key=None):
        out = []
        for tv, d in zip(tvs, per_task(density, len(tvs))):
            new = []
            for x in jax.tree.leaves(tv):
                n = int(np.prod(x.shape))
                n_keep = _keep_count(d, n)
                n_top = int(gamma * n)
                if n_keep + n_top > n:
                    n_top = n - n_keep
                keep = top_magnitude_mask([x], (n_keep + n_top) / n)[0] if n_keep + n_top < n else jnp.ones(x.shape, bool)
                if n_top > 0:
                    keep = keep & ~(jnp.abs(x) >= kth_largest_magnitude([x], n_top))
                new.append(jnp.where(keep, x, 0.0))
            out.append(jax.tree.unflatten(jax.tree.structure(tv), new))
        return out

    return crumbs


def della(density: float | Sequence[float], epsilon: float = 0.15, rescale: bool = True) -> Sparsifier:
    """DELLA MagPrune (Deep et al., 2024): keep entry i with probability
    ``p_i = (d - eps) + 2 eps r_i``, ``r_i`` in [0, 1] its magnitude rank normalised along the
    last axis (mergekit ranks rows the same way); survivors divided by ``p_i`` when ``rescale``
    (the paper; mergekit does not rescale this way)."""

    def magprune(tvs, key):
        if key is None:
            raise ValueError("della needs a PRNG key (jax.random.key(seed))")
        out = []
        for t, (tv, d) in enumerate(zip(tvs, per_task(density, len(tvs)))):
            leaves, treedef = jax.tree.flatten(tv)
            new = []
            for i, x in enumerate(leaves):
                rows = x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])
                width = rows.shape[-1]
                ranks = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=-1), axis=-1).astype(jnp.float32)
                r = ranks / max(width - 1, 1)
                p = (d - epsilon) + 2.0 * epsilon * r
                keep = jax.random.uniform(_task_key(key, t, i), rows.shape) < p
                kept = jnp.where(keep, rows / p if rescale else rows, 0.0)
                new.append(kept.reshape(x.shape))
            out.append(jax.tree.unflatten(treedef, new))
        return out

    return magprune


def chain(*sparsifiers: Sparsifier) -> Sparsifier:
    """Applies sparsifiers in order, each with its own key folded from the given one."""

    def chained(tvs, key=None):
        for i, s in enumerate(sparsifiers):
            tvs = s(tvs, None if key is None else jax.random.fold_in(key, 1000 + i))
        return list(tvs)

    return chained


# ---------------------------------------------------------------------------- sign election
def elect_sign(tvs: Sequence[PyTree], method: str = "sum") -> PyTree:
    """TIES sign election: ``gamma = sign(sum_t tau_t)`` ("sum", the paper's mass election)
    or ``sign(sum_t sign(tau_t))`` ("count"); ties (0) elect +1, as mergekit does."""
    if method not in ("sum", "count"):
        raise ValueError(f"sign election must be 'sum' or 'count', got {method!r}")
    f = (lambda x: x) if method == "sum" else jnp.sign
    return jax.tree.map(lambda *ts: jnp.where(sum(f(t) for t in ts) >= 0, 1.0, -1.0), *tvs)


def agreement_masks(tvs: Sequence[PyTree], sign: PyTree) -> list[PyTree]:
    """``1[sign(tau_t) == gamma]`` per task: zero entries never agree."""
    return [jax.tree.map(lambda t, g: jnp.sign(t) == g, tv, sign) for tv in tvs]


# ---------------------------------------------------------------------------- combiners
def combine(
    tvs: Sequence[PyTree],
    weights: Sequence[float] | jax.Array | None = None,
    *,
    masks: Sequence[PyTree] | None = None,
    normalize: bool = False,
) -> PyTree:
    """``sum_t w_t m_t tau_t``, divided by ``sum_t w_t m_t`` entrywise when ``normalize``.

    With ``masks`` from :func:`agreement_masks` this is TIES' disjoint mean (``normalize``,
    the paper) or disjoint sum; without masks and with ``normalize`` it is the weighted mean.
    Entries where the divisor is 0 stay 0.
    """
    k = len(tvs)
    w = jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)

    if masks is None:
        if not normalize:
            return jax.tree.map(lambda *ts: sum(w[i] * ts[i] for i in range(k)), *tvs)
        return jax.tree.map(lambda *ts: sum(w[i] * ts[i] for i in range(k)) / jnp.sum(w), *tvs)

    def leaf(*args):
        ts, ms = args[:k], args[k:]
        total = sum(w[i] * jnp.where(ms[i], ts[i], 0.0) for i in range(k))
        if not normalize:
            return total
        div = sum(w[i] * ms[i].astype(jnp.float32) for i in range(k))
        nonzero = jnp.abs(div) > 1e-8
        return jnp.where(nonzero, total / jnp.where(nonzero, div, 1.0), 0.0)

    return jax.tree.map(leaf, *tvs, *masks)


def magnitude_max(tvs: Sequence[PyTree]) -> PyTree:
    """MagMax (Marczak et al., 2024): per entry, the task-vector value of largest ``|tau_t|``
    (first task wins ties)."""

    def leaf(*ts):
        best = ts[0]
        for t in ts[1:]:
            best = jnp.where(jnp.abs(t) > jnp.abs(best), t, best)
        return best

    return jax.tree.map(leaf, *tvs)


def tall_masks(tvs: Sequence[PyTree], lambdas: float | Sequence[float] = 0.6) -> list[PyTree]:
    """TALL masks (Wang et al., 2024): ``m_t = 1[|tau_t| > lambda_t |tau_MTL - tau_t|]``,
    ``tau_MTL = sum_t tau_t`` (since ``theta_0 - theta_t = -tau_t``)."""
    total = jtree.add(*tvs)
    lams = per_task(lambdas, len(tvs))
    return [jax.tree.map(lambda t, s, lam=lam: jnp.abs(t) > lam * jnp.abs(s - t), tv, total) for tv, lam in zip(tvs, lams)]


def consensus_mask(masks: Sequence[PyTree], k: int = 2) -> PyTree:
    """Consensus (Wang et al., 2024): keep entries that at least ``k`` task masks keep."""
    return jax.tree.map(lambda *ms: sum(m.astype(jnp.int32) for m in ms) >= k, *masks)
