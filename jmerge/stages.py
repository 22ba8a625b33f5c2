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

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import tree as jtree

PyTree = jtree.PyTree
Sparsifier = Callable[[Sequence[PyTree], jax.Array | None], list[PyTree]]


# ---------------------------------------------------------------------------- thresholds
_SORT_MAX = 1 << 14  # groups this small are sorted outright
_CHUNK = 1 << 23  # float32 sums of 0/1 values are exact below 2**24 terms
_PACK = 1 << 16  # arrays smaller than this are packed into one buffer for counting
_SAMPLE = 1 << 15  # strided sample that brackets the threshold
_Z = 3.5  # bracket half-width in sample standard deviations
_KAPPA = 0.02  # ITP truncation constant (relative to the initial bracket width)
_TINY, _HUGE = 2.0**-100, 2.0**100  # magnitudes are clamped to [_TINY, _HUGE] for fast counting
_TINY_BITS, _HUGE_BITS = 0x0D800000, 0x71800000  # their bit patterns
_ABOVE_INF = 0x7F800001  # no finite float is >= this bit pattern (a NaN's)


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _value(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _magnitude_chunks(arrays: Sequence[jax.Array]) -> list[jax.Array]:
    """``|x|`` clamped to ``[_TINY, _HUGE]``, as 1-D chunks of at most ``_CHUNK`` entries
    (small arrays packed together). Clamping leaves ``count(|x| >= t)`` unchanged for every
    ``t`` in ``(_TINY, _HUGE]``; the chunks are written once and read by every pass."""
    flat = [jnp.clip(jnp.abs(a.astype(jnp.float32)), _TINY, _HUGE).reshape(-1) for a in arrays]
    small = [f for f in flat if f.size < _PACK]
    pieces = [f for f in flat if f.size >= _PACK] + ([jnp.concatenate(small)] if small else [])
    return [p[i : i + _CHUNK] for p in pieces for i in range(0, p.size, _CHUNK)]


def _indicator(chunk: jax.Array, bits: jax.Array) -> jax.Array:
    """Exactly 1.0 where ``chunk >= value(bits)``, else 0.0 (for ``bits`` in the clamped range).

    With ``below`` the float just under ``t``, ``clip(x, below, t) - below`` is 0 or the gap.
    It is written with max/min/sub/mul because XLA:CPU fuses those into a vectorised full
    reduction, while compare/select or integer reductions materialise a full-size temporary
    and run 4-10x slower (measured for bench/merge_bench.py)."""
    t, below = _value(bits), _value(bits - 1)
    inv_gap = 1.0 / (t - below)
    # Adding a zero read from this chunk keeps XLA from sharing the scalars' broadcasts
    # between same-shaped chunks, which would materialise them as full-size arrays (3x slower).
    zero = chunk[0] * 0.0
    t, below, inv_gap = t + zero, below + zero, inv_gap + zero
    return (jnp.minimum(jnp.maximum(chunk, below), t) - below) * inv_gap


def _count_at_least(chunks: Sequence[jax.Array], bits: jax.Array) -> jax.Array:
    """Exact number (uint32) of entries ``>= value(bits)``: one full reduction per chunk."""
    return sum((jnp.sum(_indicator(c, bits)).astype(jnp.uint32) for c in chunks), jnp.uint32(0))


def _min_at_least(chunks: Sequence[jax.Array], bits: jax.Array) -> jax.Array:
    """Bit pattern of the smallest entry ``>= value(bits)`` (excluded entries become the
    largest float)."""
    big = jnp.finfo(jnp.float32).max
    return _bits(jnp.min(jnp.stack([jnp.min(jnp.maximum(c, (1.0 - _indicator(c, bits)) * big)) for c in chunks])))


def _max_below(chunks: Sequence[jax.Array], bits: jax.Array) -> jax.Array:
    """Bit pattern of the largest entry ``< value(bits)`` (excluded entries become 0)."""
    big = jnp.finfo(jnp.float32).max
    return _bits(jnp.max(jnp.stack([jnp.max(jnp.minimum(c, (1.0 - _indicator(c, bits)) * big)) for c in chunks])))


def _sample_bracket(chunks: Sequence[jax.Array], n: int, k: int):
    """Bit patterns ``lo < hi`` with ``count(>= lo) >= k > count(>= hi)``, and both counts.

    The candidates lie ``_Z`` standard deviations of the sample rank either side of the k-th
    largest in a sorted strided sample; two counting passes verify them, and a side that
    fails falls back to the end of the clamped range (still exact, only more passes)."""
    stride = max(n // _SAMPLE, 1)
    parts, offset = [], 0
    for c in chunks:
        start = (-offset) % stride
        if start < c.size:
            parts.append(c[start::stride])
        offset += c.size
    sample = jnp.sort(_bits(jnp.concatenate(parts)))  # positive floats sort like their bits
    s = sample.shape[0]
    q = k / n
    rank = (1.0 - q) * s  # ascending sample position of the k-th largest
    spread = _Z * (math.sqrt(s * q * (1.0 - q)) + 1.0)
    i_lo, i_hi = math.floor(rank - spread), math.ceil(rank + spread)
    kk = jnp.uint32(k)
    lo, c_lo = (sample[i_lo], _count_at_least(chunks, sample[i_lo])) if i_lo >= 0 else (jnp.int32(_TINY_BITS), jnp.uint32(n))
    if i_hi < s:
        hi, c_hi = sample[i_hi] + 1, _count_at_least(chunks, sample[i_hi] + 1)
    else:
        hi, c_hi = _bits(jnp.max(jnp.stack([jnp.max(c) for c in chunks]))) + 1, jnp.uint32(0)
    low_miss, high_miss = c_lo < kk, c_hi >= kk
    return (
        jnp.where(low_miss, _TINY_BITS, jnp.where(high_miss, hi, lo)),
        jnp.where(low_miss, lo, jnp.where(high_miss, _HUGE_BITS + 1, hi)),
        jnp.where(low_miss, jnp.uint32(n), jnp.where(high_miss, c_hi, c_lo)),
        jnp.where(low_miss, c_lo, jnp.where(high_miss, jnp.uint32(0), c_hi)),
    )


def _refine(chunks, k: int, lo, hi, c_lo, c_hi):
    """Shrinks the bracket until ``hi = lo + 1`` or a count equals ``k`` or ``k - 1``.

    Each step counts at the ITP point (Oliveira & Takahashi, 2021: regula falsi on the counts,
    truncated and projected so that it never needs more steps than bisection plus one). When
    a count shows an empty gap (it equals an end's count), the next step snaps both ends to
    the nearest entries (a min and a max pass), which ends searches over discrete values
    (e.g. differences of bfloat16 weights) quickly. Returns the bracket, its counts and the
    number of passes."""
    kk = jnp.uint32(k)
    w0 = (hi - lo).astype(jnp.float32)
    n_max = jnp.ceil(jnp.log2(jnp.maximum(w0, 2.0))) + 1.0
    kappa = _KAPPA / w0

    def running(state):
        lo, hi, c_lo, c_hi, j, _, passes = state
        return (hi - lo > 1) & (c_lo != kk) & (c_hi != kk - 1) & (passes < 96)

    def snap(state):
        lo, hi, c_lo, c_hi, j, _, passes = state
        return _min_at_least(chunks, lo), _max_below(chunks, hi) + 1, c_lo, c_hi, j, False, passes + 2

    def count(state):
        lo, hi, c_lo, c_hi, j, _, passes = state
        w = (hi - lo).astype(jnp.float32)
        above = (c_lo - kk).astype(jnp.float32) + 0.5  # count(>= t) - k + 1/2 at both ends
        below = (kk - c_hi).astype(jnp.float32) - 0.5
        x_f = w * above / (above + below)
        x_h = 0.5 * w
        radius = jnp.maximum(0.5 * jnp.exp2(n_max - j.astype(jnp.float32)) - x_h, 0.0)
        delta = kappa * w * w
        sigma = jnp.sign(x_h - x_f)
        x_t = jnp.where(delta <= jnp.abs(x_h - x_f), x_f + sigma * delta, x_h)
        x = jnp.where(jnp.abs(x_t - x_h) <= radius, x_t, x_h - sigma * radius)
        t = lo + jnp.minimum(jnp.clip(jnp.round(x), 1.0, 2.0**30).astype(jnp.int32), hi - lo - 1)
        c = _count_at_least(chunks, t)
        ok = c >= kk
        gap = (c == c_lo) | (c == c_hi)
        return (
            jnp.where(ok, t, lo), jnp.where(ok, hi, t), jnp.where(ok, c, c_lo), jnp.where(ok, c_hi, c),
            j + 1, gap, passes + 1,
        )

    state = (lo, hi, c_lo, c_hi, jnp.int32(0), jnp.bool_(False), jnp.int32(0))
    state = jax.lax.while_loop(running, lambda s: jax.lax.cond(s[5], snap, count, s), state)
    lo, hi, c_lo, c_hi, _, _, passes = state
    return lo, hi, c_lo, c_hi, passes


def _bisect(arrays: Sequence[jax.Array], k: int) -> jax.Array:
    """Exact k-th largest ``|x|`` by 31 passes of integer bisection on the bit patterns (the
    fallback when it lies outside ``(_TINY, _HUGE)``; integer comparisons see subnormals,
    which XLA:CPU's float comparisons flush to zero)."""
    bits = [_bits(jnp.abs(a.astype(jnp.float32))) for a in arrays]

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = sum((jnp.sum(b >= mid, dtype=jnp.uint32) for b in bits), jnp.uint32(0)) >= jnp.uint32(k)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, body, (jnp.int32(0), jnp.int32(_ABOVE_INF)))
    return _value(lo)


def kth_largest_magnitude(arrays: Sequence[jax.Array], k: int) -> jax.Array:
    """Exact k-th largest ``|x|`` over all entries of ``arrays`` (1 <= k <= total size).

    Up to ``_SORT_MAX`` entries are sorted. Larger inputs are searched on the float32 bit
    pattern, monotone in the value for non-negative floats: a strided sample brackets the
    answer, and exact counting passes (``count(|x| >= t)``, one fused read of the magnitudes)
    narrow the bracket until it is one bit pattern wide or a count equals ``k`` (one more
    pass takes the smallest entry at or above the bracket) or ``k - 1`` (the largest entry
    below it); typically 5-10 passes instead of bisection's 31. A full sort of millions of
    entries takes seconds on XLA:CPU (research/jax_ecosystem.md §7.4). Counts are uint32
    (up to 4.29e9 entries).
    """
    arrays = [jnp.asarray(a) for a in arrays]
    n = sum(int(a.size) for a in arrays)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, {n}]")
    if n <= _SORT_MAX:
        return _value(jnp.sort(jnp.concatenate([_bits(jnp.abs(a.astype(jnp.float32))).reshape(-1) for a in arrays]))[n - k])
    chunks = _magnitude_chunks(arrays)
    lo, hi, c_lo, c_hi, _ = _refine(chunks, k, *_sample_bracket(chunks, n, k))
    case = jnp.where(hi - lo <= 1, 0, jnp.where(c_lo == jnp.uint32(k), 1, 2))
    found = jax.lax.switch(case, [lambda: lo, lambda: _min_at_least(chunks, lo), lambda: _max_below(chunks, hi)])
    inside = (found > _TINY_BITS) & (found < _HUGE_BITS)  # else clamping may have changed the answer
    return jax.lax.cond(inside, lambda: _value(found), lambda: _bisect(arrays, k))


def _keep_count(density: float, size: int) -> int:
    """Entries kept at ``density``: ``int(density * size)`` (mergekit's and PEFT's rounding)."""
    return int(density * size)


def top_k_magnitude_mask(arrays: Sequence[jax.Array], k: int) -> list[jax.Array]:
    """Boolean masks keeping the ``k`` largest ``|x|`` jointly over ``arrays`` (entries tied
    with the k-th largest are kept too)."""
    n = sum(int(np.prod(a.shape)) for a in arrays)
    if k >= n:
        return [jnp.ones(a.shape, bool) for a in arrays]
    if k <= 0:
        return [jnp.zeros(a.shape, bool) for a in arrays]
    t = _bits(kth_largest_magnitude(arrays, k))
    return [_bits(jnp.abs(a.astype(jnp.float32))) >= t for a in arrays]  # exact for subnormals too


def top_magnitude_mask(arrays: Sequence[jax.Array], density: float) -> list[jax.Array]:
    """Boolean masks keeping the ``int(density * n)`` largest ``|x|`` jointly over ``arrays``."""
    n = sum(int(np.prod(a.shape)) for a in arrays)
    return top_k_magnitude_mask(arrays, _keep_count(density, n))


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


def threshold_trim(thresholds: Sequence[float] | jax.Array) -> Sparsifier:
    """Keeps the entries of ``tau_t`` with ``|tau_t| >= thresholds[t]``, zeroes the rest.

    With ``thresholds[t]`` the k-th largest magnitude of the whole task vector this is the
    global TIES trim applied tensor by tensor (how :mod:`jmerge.streaming` trims after a
    first pass over the model): ``0`` keeps everything, ``inf`` nothing.
    """

    def trim(tvs, key=None):
        ts = jnp.asarray(thresholds, jnp.float32).reshape(-1)
        return [jax.tree.map(lambda x, t=ts[i]: jnp.where(jnp.abs(x) >= t, x, 0.0), tv) for i, tv in enumerate(tvs)]

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
