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
are Python numbers. Thresholds are exact k-th largest magnitudes found without sorting, by
a sample-bracketed search of exact counting passes on the float32 bit pattern
(:func:`kth_largest_magnitudes`; sorts of millions of elements take seconds on XLA:CPU,
research/jax_ecosystem.md §7.4).
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
# Exact k-th largest magnitudes without sorting (a sort of millions of entries takes seconds
# on XLA:CPU, research/jax_ecosystem.md §7.4). The search runs on float32 bit patterns, which
# order non-negative floats like their values, with exact counting passes ``count(|x| >= t)``:
# a strided sample brackets the answer, ITP steps (Oliveira & Takahashi, 2021: regula falsi
# on the counts, truncated and projected so that it never needs more steps than bisection
# plus one) shrink the bracket, and min/max passes snap its ends to actual entries. Typically
# 6-10 passes instead of bisection's 31 (bench/merge_bench.py).
_SORT_MAX = 1 << 14  # groups this small are sorted outright
_CHUNK = 1 << 23  # float32 sums of 0/1 values are exact below 2**24 terms
_SAMPLE = 1 << 15  # strided sample that brackets the threshold
_Z = 3.5  # bracket half-width in sample standard deviations
_KAPPA = 0.02  # ITP truncation constant (relative to the initial bracket width)
_TINY, _HUGE = 2.0**-100, 2.0**100  # the search runs on magnitudes clamped to [_TINY, _HUGE]
_TINY_BITS, _HUGE_BITS = 0x0D800000, 0x71800000  # their bit patterns
_ABOVE_INF = 0x7F800001  # no finite float is >= this bit pattern (a NaN's)
_MAX_PASSES = 96
# search phases; each loop iteration is one pass over the magnitudes
_BRACKET_LO, _BRACKET_HI, _SEARCH, _SNAP_LO, _SNAP_HI, _FINAL_MIN, _FINAL_MAX, _DONE = range(8)
_COUNT, _MIN, _MAX = range(3)  # pass kinds


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _value(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _magnitude_chunks(arrays: Sequence[jax.Array]) -> list[jax.Array]:
    """``|x|`` of all arrays, concatenated and cut into 1-D float32 chunks of at most
    ``_CHUNK`` entries and pairwise different sizes: written once, read by every pass.

    Few chunks keep the per-pass overhead low (one fused reduction each); different sizes
    keep XLA from sharing the threshold's broadcasts between same-shaped chunks, which would
    materialise them as full-size arrays (3x slower passes)."""
    flat = [jnp.abs(a.astype(jnp.float32)).reshape(-1) for a in arrays]
    n = sum(int(f.size) for f in flat)
    count = -(-n // _CHUNK)
    while True:  # sizes above n / count by 1, 2, ... and a smaller last one: all different
        top = -(-n // count) + count - 1
        sizes = [top - j for j in range(count - 1)]
        sizes.append(n - sum(sizes))
        if top <= _CHUNK and 0 < sizes[-1]:
            break
        count += 1
    chunks, pieces, need, idx, offset = [], [], sizes[0], 0, 0
    while len(chunks) < count:
        take = min(need, int(flat[idx].size) - offset)
        pieces.append(flat[idx][offset : offset + take])
        need, offset = need - take, offset + take
        if offset == flat[idx].size:
            idx, offset = idx + 1, 0
        if need == 0:
            chunks.append(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces))
            pieces = []
            if len(chunks) < count:
                need = sizes[len(chunks)]
    return chunks


def _pass(chunks: Sequence[jax.Array], kind: jax.Array, bits: jax.Array) -> jax.Array:
    """One read of the magnitudes, clamped to ``[_TINY, _HUGE]`` (``bits`` in its interior):
    ``_COUNT``: number of entries ``>= t = value(bits)`` (exact: one float32 full reduction
    per chunk of < 2**24 zeros and ones); ``_MIN``: bit pattern of the smallest entry ``>= t``;
    ``_MAX``: that of the largest entry ``< t``. Returned as uint32.

    The min/max passes push excluded entries past every candidate with the same fusible
    arithmetic: with ``below`` the float under ``t`` and ``gap = t - below`` (a power of two),
    an entry ``x <= below`` has ``t - x >= gap`` and an entry ``x >= t`` has ``t - x <= 0``."""
    t, below = _value(bits), _value(bits - 1)
    inv_gap = 1.0 / (t - below)

    # clip(x, below, t) - below is 0 or the gap: written with max/min/sub/mul because XLA:CPU
    # fuses those into a vectorised full reduction, while compare/select or integer reductions
    # materialise a full-size temporary and run 4-10x slower (bench/merge_bench.py's machine)
    def count():  # sums of 0s and gaps are exact multiples of the gap; times 1/gap (a power of two)
        sums = jnp.stack([jnp.sum(jnp.minimum(jnp.maximum(c, below), t) - below) for c in chunks]) * inv_gap
        return jnp.sum(sums.astype(jnp.uint32))

    def smallest():  # x >= t stays; x <= below becomes >= 2**101 (clamped x above 2**100 fall back)
        # ((t - x) / gap) <= t / gap <= 2**24, so the product cannot overflow (inv_gap * 2**101 could)
        mins = [jnp.min(jnp.maximum(jnp.maximum(c, _TINY), (t - jnp.maximum(c, _TINY)) * inv_gap * 2.0**101)) for c in chunks]
        return _bits(jnp.min(jnp.stack(mins))).astype(jnp.uint32)

    def largest():  # x <= below stays (2t / gap * (t - x) >= 2t > x); x >= t becomes <= 0
        far = 2.0 * t * inv_gap
        maxs = [jnp.max(jnp.minimum(jnp.minimum(c, _HUGE), (t - jnp.minimum(c, _HUGE)) * far)) for c in chunks]
        return _bits(jnp.max(jnp.stack(maxs))).astype(jnp.uint32)

    return jax.lax.switch(kind, [count, smallest, largest])


def _search(chunks: Sequence[jax.Array], n: int, k: jax.Array) -> jax.Array:
    """Bit pattern of the k-th largest of the clamped magnitudes (``k`` may be traced).

    Counts at thresholds in ``(_TINY, _HUGE]`` are the same for clamped and raw magnitudes,
    so the search only ever counts there; the answer is exact for the raw magnitudes when
    it lies strictly inside ``(_TINY, _HUGE)``."""
    k = jnp.asarray(k).astype(jnp.uint32)
    kf = k.astype(jnp.float32)
    stride = max(n // _SAMPLE, 1)
    parts, offset = [], 0
    for c in chunks:
        start = (-offset) % stride
        if start < c.size:
            parts.append(c[start::stride])
        offset += c.size
    sample = jnp.sort(jnp.clip(_bits(jnp.concatenate(parts)), _TINY_BITS, _HUGE_BITS))  # sorts like the values
    s = sample.shape[0]
    q = kf / n
    rank = (1.0 - q) * s  # ascending sample position of the k-th largest
    spread = _Z * (jnp.sqrt(s * q * (1.0 - q)) + 1.0)
    i_lo = jnp.floor(rank - spread).astype(jnp.int32)
    i_hi = jnp.ceil(rank + spread).astype(jnp.int32)
    cand_lo = sample[jnp.clip(i_lo, 0, s - 1)]
    cand_hi = sample[jnp.clip(i_hi, 0, s - 1)] + 1

    def action(st):
        lo, hi, _, _, phase, *_ = st
        kind = jnp.select(
            [phase <= _SEARCH, (phase == _SNAP_LO) | (phase == _FINAL_MIN)], [_COUNT, _MIN], _MAX
        )
        kind = jnp.where((phase == _BRACKET_HI) & (i_hi >= s), _MAX, kind)  # no upper candidate: max
        bits = jnp.select(
            [phase == _BRACKET_LO, phase == _BRACKET_HI, phase == _SEARCH, kind == _MIN],
            [cand_lo, jnp.where(i_hi >= s, _HUGE_BITS + 1, cand_hi), itp_point(st), lo],
            hi,
        )
        return kind, bits

    def itp_point(st):
        lo, hi, c_lo, c_hi, _, j, w0, *_ = st
        w = (hi - lo).astype(jnp.float32)
        w0 = jnp.where(w0 > 0, w0, w)
        n_max = jnp.ceil(jnp.log2(jnp.maximum(w0, 2.0))) + 1.0
        above = (c_lo - k).astype(jnp.float32) + 0.5  # count(>= t) - k + 1/2 at both ends
        below = (k - c_hi).astype(jnp.float32) - 0.5
        x_f = w * above / (above + below)
        x_h = 0.5 * w
        radius = jnp.maximum(0.5 * jnp.exp2(n_max - j.astype(jnp.float32)) - x_h, 0.0)
        delta = _KAPPA / w0 * w * w
        sigma = jnp.sign(x_h - x_f)
        x_t = jnp.where(delta <= jnp.abs(x_h - x_f), x_f + sigma * delta, x_h)
        x = jnp.where(jnp.abs(x_t - x_h) <= radius, x_t, x_h - sigma * radius)
        return lo + jnp.minimum(jnp.clip(jnp.round(x), 1.0, 2.0**30).astype(jnp.int32), hi - lo - 1)

    def step(st):
        lo, hi, c_lo, c_hi, phase, j, w0, passes, answer = st
        kind, bits = action(st)
        r = _pass(chunks, kind, bits)
        found = r.astype(jnp.int32)
        counted = kind == _COUNT
        ok = counted & (r >= k)  # the k-th largest is >= value(bits)
        short = counted & (r < k)
        gap = counted & (phase == _SEARCH) & ((r == c_lo) | (r == c_hi))  # no entry between
        n_lo = jnp.select([ok, (kind == _MIN) & (phase == _SNAP_LO)], [bits, found], lo)
        n_hi = jnp.select([short, (kind == _MAX) & (phase != _FINAL_MAX)], [bits, found + 1], hi)
        n_c_lo = jnp.where(ok, r, c_lo)
        n_c_hi = jnp.where(short, r, jnp.where((kind == _MAX) & (phase == _BRACKET_HI), 0, c_hi))
        final = (phase == _FINAL_MIN) | (phase == _FINAL_MAX)
        # next phase: bracket, then search; a gap triggers both snaps; exact counts finish
        nxt = jnp.select(
            [final, (phase == _BRACKET_LO) & ok, phase == _SNAP_LO, gap], [_DONE, _BRACKET_HI, _SNAP_HI, _SNAP_LO], _SEARCH
        )
        done_width = (n_hi - n_lo <= 1) & ~final
        nxt = jnp.select(
            [final, done_width, n_c_lo == k, n_c_hi == k - 1], [_DONE, _DONE, _FINAL_MIN, _FINAL_MAX], nxt
        )
        answer = jnp.select([final, done_width], [found, n_lo], answer)
        w0 = jnp.where((phase == _SEARCH) & (w0 == 0), (hi - lo).astype(jnp.float32), w0)
        return n_lo, n_hi, n_c_lo, n_c_hi, nxt, j + (phase == _SEARCH), w0, passes + 1, answer

    first = jnp.where(i_lo >= 0, _BRACKET_LO, _BRACKET_HI)
    state = (
        jnp.int32(_TINY_BITS), jnp.int32(_HUGE_BITS + 1), jnp.uint32(n), jnp.uint32(0), first,
        jnp.int32(0), jnp.float32(0), jnp.int32(0), jnp.int32(0),
    )
    state = jax.lax.while_loop(lambda st: (st[4] != _DONE) & (st[7] < _MAX_PASSES), step, state)
    return state[-1], state[7]


def _exact_outside(chunks: Sequence[jax.Array], k: jax.Array, needed: jax.Array) -> jax.Array:
    """Bit pattern of the exact k-th largest when it lies outside ``(_TINY, _HUGE)`` (only
    if ``needed``; 0 otherwise): integer bisection on the bit patterns, whose first probe asks
    whether fewer than k entries are non-zero (sparse task vectors: the answer is 0 after one
    pass). Integer comparisons also see subnormals, which XLA:CPU's float comparisons flush to
    zero. A while loop rather than a cond, so that ``vmap`` does not run it for every input."""
    bits = [_bits(c) for c in chunks]
    k = jnp.asarray(k).astype(jnp.uint32)

    def step(state):
        lo, hi, first = state
        mid = jnp.where(first, 1, lo + (hi - lo) // 2)
        ok = sum((jnp.sum(b >= mid, dtype=jnp.uint32) for b in bits), jnp.uint32(0)) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid), jnp.bool_(False)

    start = (jnp.int32(0), jnp.where(needed, _ABOVE_INF, 1), jnp.bool_(True))
    return jax.lax.while_loop(lambda st: st[1] - st[0] > 1, step, start)[0]


def _kth_of_chunks(chunks: Sequence[jax.Array], n: int, k: jax.Array) -> jax.Array:
    found, _ = _search(chunks, n, k)
    inside = (found > _TINY_BITS) & (found < _HUGE_BITS)  # else clamping may have changed it
    return _value(jnp.where(inside, found, _exact_outside(chunks, k, ~inside)))


def kth_largest_magnitudes(groups: Sequence[Sequence[jax.Array]], ks: Sequence[int]) -> jax.Array:
    """Exact ``k_g``-th largest ``|x|`` over all entries of each group (``1 <= k_g <= size``).

    Groups must hold arrays of the same shapes; they share one compiled search
    (``jax.lax.map``), so many same-shaped tensors (per-tensor trims) or many tasks (global
    trims) cost one compilation. Groups of up to ``_SORT_MAX`` entries are sorted.
    Counts are uint32 (up to 4.29e9 entries per group)."""
    groups = [[jnp.asarray(a) for a in g] for g in groups]
    shapes = [tuple(a.shape) for a in groups[0]]
    if any([tuple(a.shape) for a in g] != shapes for g in groups):
        raise ValueError("kth_largest_magnitudes: every group must hold arrays of the same shapes")
    n = sum(int(np.prod(s)) for s in shapes)
    if len(ks) != len(groups) or not all(1 <= k <= n for k in ks):
        raise ValueError(f"need one k in [1, {n}] per group, got {list(ks)}")
    ks_arr = jnp.asarray(ks, jnp.int32)
    if n <= _SORT_MAX:
        bits = jnp.stack([jnp.concatenate([_bits(jnp.abs(a.astype(jnp.float32))).reshape(-1) for a in g]) for g in groups])
        ranked = jnp.sort(bits, axis=-1)
        return _value(jnp.take_along_axis(ranked, (n - ks_arr)[:, None], axis=-1)[:, 0])
    if len(groups) == 1:
        return _kth_of_chunks(_magnitude_chunks(groups[0]), n, ks_arr[0])[None]
    stacked = [jnp.stack(cs) for cs in zip(*(_magnitude_chunks(g) for g in groups))]
    return jax.lax.map(lambda args: _kth_of_chunks(list(args[0]), n, args[1]), (stacked, ks_arr))


def kth_largest_magnitude(arrays: Sequence[jax.Array], k: int) -> jax.Array:
    """Exact k-th largest ``|x|`` over all entries of ``arrays`` (``1 <= k <= total size``);
    see :func:`kth_largest_magnitudes`."""
    return kth_largest_magnitudes([arrays], [k])[0]


def _keep_count(density: float, size: int) -> int:
    """Entries kept at ``density``: ``int(density * size)`` (mergekit's and PEFT's rounding)."""
    return int(density * size)


def top_k_magnitude_masks(queries: Sequence[tuple[Sequence[jax.Array], int]]) -> list[list[jax.Array]]:
    """For each ``(arrays, k)`` query, boolean masks keeping the ``k`` largest ``|x|`` jointly
    over ``arrays`` (entries tied with the k-th largest are kept too). Queries over arrays of
    the same shapes share one compiled search (:func:`kth_largest_magnitudes`)."""
    out: list = [None] * len(queries)
    batches: dict[tuple, list[int]] = {}
    for i, (arrays, k) in enumerate(queries):
        n = sum(int(np.prod(a.shape)) for a in arrays)
        if k >= n:
            out[i] = [jnp.ones(a.shape, bool) for a in arrays]
        elif k <= 0:
            out[i] = [jnp.zeros(a.shape, bool) for a in arrays]
        else:
            batches.setdefault(tuple(tuple(a.shape) for a in arrays), []).append(i)
    for idx in batches.values():
        ts = kth_largest_magnitudes([queries[i][0] for i in idx], [queries[i][1] for i in idx])
        for j, i in enumerate(idx):
            t = _bits(ts[j])  # compare bit patterns: exact for subnormals too
            out[i] = [_bits(jnp.abs(a.astype(jnp.float32))) >= t for a in queries[i][0]]
    return out


def top_k_magnitude_mask(arrays: Sequence[jax.Array], k: int) -> list[jax.Array]:
    """Boolean masks keeping the ``k`` largest ``|x|`` jointly over ``arrays`` (entries tied
    with the k-th largest are kept too)."""
    return top_k_magnitude_masks([(arrays, k)])[0]


def top_magnitude_mask(arrays: Sequence[jax.Array], density: float) -> list[jax.Array]:
    """Boolean masks keeping the ``int(density * n)`` largest ``|x|`` jointly over ``arrays``."""
    n = sum(int(np.prod(a.shape)) for a in arrays)
    return top_k_magnitude_mask(arrays, _keep_count(density, n))


def per_task(value, k_tasks: int) -> list[float]:
    """One Python float per task from a scalar or a length-K sequence."""
    values = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
    if len(values) not in (1, k_tasks):
        raise ValueError(f"expected one value or {k_tasks} (one per task), got {len(values)}")
    return values * k_tasks if len(values) == 1 else values


def _task_key(key: jax.Array, task: int, leaf: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, task), leaf)


def _uniform_per_leaf(key: jax.Array, shapes: Sequence[Sequence[tuple[int, ...]]], below=None) -> list[list[jax.Array]]:
    """``u = jax.random.uniform(fold_in(fold_in(key, t), i), shapes[t][i])`` for every task
    ``t`` and leaf ``i``, or the masks ``u < below[t]`` when ``below`` (one value per task) is
    given (then ``u < below[t]`` is ``jax.random.bernoulli(key_ti, below[t], shape)``).

    Keys and draws of one shape are each a single vmapped call (the same values as separate
    calls): with one ``fold_in`` and one generator per leaf, DARE on a GPT-2-sized model
    took minutes to compile."""
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for t, task_shapes in enumerate(shapes):
        for i, shape in enumerate(task_shapes):
            groups.setdefault(tuple(shape), []).append((t, i))
    out: list[list] = [[None] * len(task_shapes) for task_shapes in shapes]
    for shape, members in groups.items():
        tasks, leaves = (jnp.asarray(v, jnp.uint32) for v in zip(*members))
        keys = jax.vmap(lambda t, i: _task_key(key, t, i))(tasks, leaves)  # one vectorised hash
        draws = jax.vmap(lambda k, shape=shape: jax.random.uniform(k, shape))(keys)
        if below is not None:
            limits = jnp.asarray([below[t] for t, _ in members], jnp.float32).reshape((-1,) + (1,) * len(shape))
            draws = draws < limits
        for j, (t, i) in enumerate(members):
            out[t][i] = draws[j]
    return out


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
        flat = [jax.tree.flatten(tv) for tv in tvs]
        densities = per_task(density, len(tvs))
        if scope == "global":
            queries = [(leaves, _keep_count(d, sum(int(x.size) for x in leaves))) for (leaves, _), d in zip(flat, densities)]
            masks = top_k_magnitude_masks(queries)
        else:
            queries = [([x], _keep_count(d, int(x.size))) for (leaves, _), d in zip(flat, densities) for x in leaves]
            per_leaf = iter(m for (m,) in top_k_magnitude_masks(queries))
            masks = [[next(per_leaf) for _ in leaves] for leaves, _ in flat]
        return [
            jax.tree.unflatten(treedef, [jnp.where(m, x, 0.0) for m, x in zip(ms, leaves)])
            for (leaves, treedef), ms in zip(flat, masks)
        ]

    return trim


def threshold_trim(thresholds: Sequence, upper: Sequence | None = None) -> Sparsifier:
    """Keeps the entries of ``tau_t`` with ``|tau_t| >= thresholds[t]`` (and, given ``upper``,
    ``|tau_t| < upper[t]``), zeroes the rest.

    ``thresholds[t]`` is one magnitude for the whole task vector (with the k-th largest of
    all its entries this is the global TIES trim applied tensor by tensor, as
    :mod:`jmerge.streaming` runs it after a first pass) or a pytree shaped like ``tau_t``
    with one magnitude per tensor (per-tensor trims, as :mod:`jmerge.collectives` computes
    them on a mesh; with ``upper``, Model Breadcrumbs). ``0`` keeps everything, ``inf``
    nothing (as an upper bound: drops nothing finite). Magnitudes compare as float32 bit
    patterns, exactly like :func:`magnitude_trim` (subnormals included).
    """
    upper = [None] * len(thresholds) if upper is None else upper

    def per_leaf(tv, t):
        return jax.tree.leaves(t) if jax.tree.structure(t) == jax.tree.structure(tv) else [t] * len(jax.tree.leaves(tv))

    def trim(tvs, key=None):
        out = []
        for tv, lo, hi in zip(tvs, thresholds, upper, strict=True):
            leaves, treedef = jax.tree.flatten(tv)
            his = [None] * len(leaves) if hi is None else per_leaf(tv, hi)
            kept = []
            for x, l, h in zip(leaves, per_leaf(tv, lo), his):
                bits = _bits(jnp.abs(x.astype(jnp.float32)))
                keep = bits >= _bits(jnp.asarray(l, jnp.float32))
                if h is not None:
                    keep = keep & (bits < _bits(jnp.asarray(h, jnp.float32)))
                kept.append(jnp.where(keep, x, 0.0))
            out.append(jax.tree.unflatten(treedef, kept))
        return out

    return trim


def dare(density: float | Sequence[float], rescale: bool = True) -> Sparsifier:
    """DARE (Yu et al., 2024): keep each entry with probability ``density = 1 - p``, and
    divide survivors by ``density`` when ``rescale`` so the expectation is unchanged."""

    def drop(tvs, key):
        if key is None:
            raise ValueError("dare needs a PRNG key (jax.random.key(seed))")
        flat = [jax.tree.flatten(tv) for tv in tvs]
        densities = per_task(density, len(tvs))
        masks = _uniform_per_leaf(key, [[x.shape for x in leaves] for leaves, _ in flat], below=densities)
        out = []
        for (leaves, treedef), keep, d in zip(flat, masks, densities):
            new = [jnp.where(m, x / d if rescale else x, 0.0) for x, m in zip(leaves, keep)]
            out.append(jax.tree.unflatten(treedef, new))
        return out

    return drop


def breadcrumbs(density: float | Sequence[float], gamma: float = 0.01) -> Sparsifier:
    """Model Breadcrumbs (Davari & Belilovsky, 2024), per tensor, mergekit's parametrisation:
    drop the ``gamma`` fraction of largest ``|tau|`` (outliers) and enough of the smallest that
    a ``density`` fraction survives."""

    def crumbs(tvs, key=None):
        flat = [jax.tree.flatten(tv) for tv in tvs]
        queries = []  # per leaf: keep the top n_keep + n_top, then drop the top n_top
        for (leaves, _), d in zip(flat, per_task(density, len(tvs))):
            for x in leaves:
                n = int(x.size)
                n_keep = _keep_count(d, n)
                n_top = min(int(gamma * n), n - n_keep)
                queries += [([x], n_keep + n_top), ([x], n_top)]
        masks = iter(m for (m,) in top_k_magnitude_masks(queries))
        return [
            jax.tree.unflatten(treedef, [jnp.where(next(masks) & ~next(masks), x, 0.0) for x in leaves])
            for leaves, treedef in flat
        ]

    return crumbs


def della(density: float | Sequence[float], epsilon: float = 0.15, rescale: bool = True) -> Sparsifier:
    """DELLA MagPrune (Deep et al., 2024): keep entry i with probability
    ``p_i = (d - eps) + 2 eps r_i``, ``r_i`` in [0, 1] its magnitude rank normalised along the
    last axis (mergekit ranks rows the same way); survivors divided by ``p_i`` when ``rescale``
    (the paper; mergekit does not rescale this way)."""

    def magprune(tvs, key):
        if key is None:
            raise ValueError("della needs a PRNG key (jax.random.key(seed))")
        flat = [jax.tree.flatten(tv) for tv in tvs]
        as_rows = lambda x: x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])
        draws = _uniform_per_leaf(key, [[as_rows(x).shape for x in leaves] for leaves, _ in flat])
        out = []
        for (leaves, treedef), u, d in zip(flat, draws, per_task(density, len(tvs))):
            new = []
            for x, ui in zip(leaves, u):
                rows = as_rows(x)
                width = rows.shape[-1]
                ranks = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=-1), axis=-1).astype(jnp.float32)
                p = (d - epsilon) + 2.0 * epsilon * (ranks / max(width - 1, 1))
                new.append(jnp.where(ui < p, rows / p if rescale else rows, 0.0).reshape(x.shape))
            out.append(jax.tree.unflatten(treedef, new))
        return out

    return magprune


def l1_rescale(original: Sequence[PyTree], sparse: Sequence[PyTree], eps: float = 1e-7) -> list[PyTree]:
    """mergekit's ``rescale`` (``sparsify.rescaled_masked_tensor``, L1 norm): each sparsified
    tensor times ``|tau|_1 / |sparse(tau)|_1``, per tensor, unchanged where either norm is
    below ``eps``."""

    def leaf(x, kept):
        before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(kept))
        ok = (before >= eps) & (after >= eps)
        return kept * jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0)

    return [jax.tree.map(leaf, tv, kept) for tv, kept in zip(original, sparse)]


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
