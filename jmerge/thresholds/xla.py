"""The XLA backend of :mod:`jmerge.thresholds`: exact k-th largest magnitudes inside ``jit``.

For tracers and accelerator arrays. No sort (a sort of millions of entries takes seconds on
XLA:CPU): the search runs on float32 bit patterns, which order non-negative floats like
their values, with exact counting passes ``count(|x| >= t)``. A strided sample brackets the
answer (:func:`jmerge.thresholds.bracket_positions`), ITP steps (Oliveira & Takahashi, 2021,
ACM TOMS 47(1): regula falsi on the counts, truncated and projected so that it never needs
more steps than bisection plus one) shrink the bracket, and min/max passes snap its ends to
actual entries: typically 6-10 passes instead of bisection's 31 (bench/merge_bench.py).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge._util import register_cache
from jmerge import tree as jtree
from jmerge.thresholds import (Job, Query, answers, bisect_bits, bits as _bits, bracket_positions, one_rank, plan,
                               strided_starts)

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
    stride, starts = strided_starts([int(c.size) for c in chunks], _SAMPLE)
    parts = [c[start::stride] for c, start in zip(chunks, starts) if start < c.size]
    sample = jnp.sort(jnp.clip(_bits(jnp.concatenate(parts)), _TINY_BITS, _HUGE_BITS))  # sorts like the values
    s = sample.shape[0]
    q = kf / n
    i_lo, i_hi = (i.astype(jnp.int32) for i in bracket_positions(q, s, _Z, xp=jnp))
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
        return n_lo, n_hi, n_c_lo, n_c_hi, nxt, j + (phase == _SEARCH).astype(jnp.int32), w0, passes + 1, answer

    first = jnp.where(i_lo >= 0, _BRACKET_LO, _BRACKET_HI)
    state = (
        jnp.int32(_TINY_BITS), jnp.int32(_HUGE_BITS + 1), jnp.uint32(n), jnp.uint32(0), first,
        jnp.int32(0), jnp.float32(0), jnp.int32(0), jnp.int32(0),
    )
    state = jax.lax.while_loop(lambda st: (st[4] != _DONE) & (st[7] < _MAX_PASSES), step, state)
    return state[-1], state[7]


def _exact_outside(chunks: Sequence[jax.Array], k: jax.Array, needed: jax.Array) -> jax.Array:
    """Bit pattern of the exact k-th largest when it lies outside ``(_TINY, _HUGE)`` (only
    if ``needed``; 0 otherwise): :func:`jmerge.thresholds.bisect_bits`, whose first probe asks
    whether fewer than k entries are non-zero (sparse task vectors: the answer is 0 after one
    pass). Integer comparisons also see subnormals, which XLA:CPU's float comparisons flush to
    zero."""
    patterns = [_bits(c) for c in chunks]
    k = jnp.asarray(k).astype(jnp.uint32)
    ok = lambda mid: sum((jnp.sum(b >= mid, dtype=jnp.uint32) for b in patterns), jnp.uint32(0)) >= k
    return bisect_bits(ok, jnp.int32(0), jnp.where(needed, _ABOVE_INF, 1).astype(jnp.int32), first=1)


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


def kth_of_jobs(tv_leaves: Sequence[Sequence[jax.Array]], jobs: Sequence[Job]) -> list[jax.Array]:
    """The answer of each job (``1 <= k < n``), jobs over same-shaped leaves batched into one
    :func:`kth_largest_magnitudes` call (one compiled search for many tensors or tasks)."""
    out: list = [None] * len(jobs)
    batches: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        batches.setdefault(tuple(tuple(tv_leaves[job.task][l].shape) for l in job.leaves), []).append(i)
    for idx in batches.values():
        groups = [[tv_leaves[jobs[i].task][l] for l in jobs[i].leaves] for i in idx]
        found = kth_largest_magnitudes(groups, [jobs[i].k for i in idx])
        for j, i in enumerate(idx):
            out[i] = found[j]
    return out


@functools.lru_cache(maxsize=64)
def _jitted(jobs: tuple[Job, ...], from_experts: bool):
    """The searches of ``jobs`` as one jitted function of ``(base, experts)`` (concrete inputs)."""

    def run(base, experts):
        tvs = jtree.task_vectors(base, experts) if from_experts else experts
        return kth_of_jobs([jax.tree.leaves(tv) for tv in tvs], jobs)

    return jax.jit(run)


register_cache(_jitted.cache_clear)


def solve(query: Query, experts: Sequence, base=None) -> list[list]:
    """:func:`jmerge.thresholds.solve` by the XLA search: traced inputs stay in the caller's
    trace; concrete ones run one cached ``jit`` of all searches."""
    leaves0 = jax.tree.leaves(experts[0])
    units, jobs, where, values, n_ranks = plan(query, [int(np.prod(x.shape)) for x in leaves0], len(experts))
    if jobs:
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((base, experts))):
            tvs = experts if base is None else jtree.task_vectors(base, experts)
            found = kth_of_jobs([jax.tree.leaves(tv) for tv in tvs], jobs)
        else:
            found = _jitted(tuple(jobs), base is not None)(base, list(experts))
        values.update(zip(where, found))
    return answers(query, values, units, n_ranks, jax.tree.structure(experts[0]))


_ROW = 1 << 14  # widest row tied_cut counts in: its counts must fit 16 bits


def tied_cut(x: jax.Array, kth: jax.Array, k: int) -> jax.Array:
    """:func:`jmerge.thresholds.last_tied_kept` of ``|x|`` in XLA (int32).

    A cumulative count over every entry is slow on XLA:CPU, so the entries are cut into rows
    (the last axis, or a width dividing the size when that axis is 2**15 or wider), one pass
    counts each row's entries above and tied (the halves of one int32 sum), the row where the
    kept ties run out is found from the running tie count, and only that row is counted entry
    by entry."""
    n = x.size
    if k <= 0 or k >= n:
        return jnp.int32(-1 if k <= 0 else n)
    last = x.shape[-1] if x.ndim else 1
    width = last if last <= _ROW else next(c for c in range(_ROW, 0, -1) if n % c == 0)
    rows, lb = _bits(jnp.abs(x.astype(jnp.float32))).reshape(-1, width), _bits(kth)
    code = jnp.sum(jnp.where(rows > lb, 1, jnp.where(rows == lb, 1 << 16, 0)), axis=1)
    tied_per_row = code >> 16
    room = k - jnp.sum(code & 0xFFFF)
    through = jnp.cumsum(tied_per_row)
    last_row = jnp.argmax(through >= room)
    within = jnp.cumsum(rows[last_row] == lb) + (through[last_row] - tied_per_row[last_row])
    cut = last_row * width + jnp.argmax(within >= room)
    return jnp.where(room <= 0, -1, jnp.where(through[-1] < room, n, cut)).astype(jnp.int32)


def _tied_cuts(base, expert, kths, ks):
    es = jax.tree.leaves(expert)
    tvs = es if base is None else [e.astype(jnp.float32) - b.astype(jnp.float32) for e, b in zip(es, jax.tree.leaves(base))]
    return [tied_cut(tv, kth, k) for tv, kth, k in zip(tvs, kths, ks)]


@functools.lru_cache(maxsize=64)
def _jitted_cuts(ks: tuple[int, ...]):
    return jax.jit(functools.partial(_tied_cuts, ks=ks))


register_cache(_jitted_cuts.cache_clear)


def positions(query: Query, task: int, kth, expert, base=None):
    """The ``positions`` answer of ``task`` (``query.positions``): per tensor, :func:`tied_cut`
    at its k-th largest ``kth``; traced inputs stay in the caller's trace, concrete ones
    (a mesh's sharded arrays, accelerator arrays) run one cached ``jit``."""
    ks = tuple(one_rank(query, task, int(np.prod(x.shape))) for x in jax.tree.leaves(expert))
    kths = [jnp.asarray(v, jnp.float32) for v in jax.tree.leaves(kth)]
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((base, expert, kths)))
    cuts = _tied_cuts(base, expert, kths, ks) if traced else _jitted_cuts(ks)(base, expert, kths)
    return jax.tree.unflatten(jax.tree.structure(expert), list(cuts))
