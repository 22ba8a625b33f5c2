"""Which entries torch's CPU sort puts at positions ``[start, stop)``, ties included.

mergekit 0.1.5 trims by sorting: TIES keeps ``torch.argsort(|tau|, descending=True)[:k]``,
Breadcrumbs ``torch.sort(|tau|).indices[n_bot:n_bot + n_keep]`` (``mergekit/sparsify.py``).
Entries tied at a cut (frequent in bfloat16, with 256 values per octave) are then kept in the
order torch's unstable CPU sort leaves them: libstdc++'s ``std::sort`` (introsort) on (value,
index) pairs, which torch 2.13 runs for float tensors (checked against it entry by entry,
tests/test_compute_dtype.py). :func:`kept` replays that algorithm with numpy:

* the partition phase (``__introsort_loop``): median-of-three pivot moved to the front,
  Hoare's unguarded partition (vectorised: the i-th left stop swaps with the i-th right stop
  while they have not crossed), recursion while a range holds more than 16 entries, heapsort
  (``__partial_sort``) where the depth limit ``2 floor(log2 n)`` runs out;
* the final insertion sort, which is stable, so the result is a stable sort of the
  partitioned array.

Only ranges holding an entry equal to a cut value are replayed (the others cannot change
the order of those entries), so the cost is a few passes over the tensor plus the ranges of
tied entries. Runs on the host; :func:`kept_in_jit` calls it from a jitted merge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

THRESHOLD = 16  # libstdc++'s _S_threshold


def _partition(keys: np.ndarray, idx: np.ndarray, lo: int, hi: int) -> int:
    """``std::__unguarded_partition_pivot`` on ``[lo, hi)`` (ascending keys), in place; the cut."""
    mid = lo + (hi - lo) // 2
    a, b, c = lo + 1, mid, hi - 1
    ka, kb, kc = keys[a], keys[b], keys[c]
    if ka < kb:
        pick = b if kb < kc else (c if ka < kc else a)
    else:
        pick = a if ka < kc else (c if kb < kc else b)
    keys[[lo, pick]], idx[[lo, pick]] = keys[[pick, lo]], idx[[pick, lo]]
    pivot = keys[lo]
    seg = keys[lo:hi]
    left = lo + 1 + np.flatnonzero(~(seg[1:] < pivot))  # stops of `while (*first < pivot) ++first`
    right = lo + np.flatnonzero(~(pivot < seg))[::-1]  # stops of `while (pivot < *last) --last`
    m = min(left.size, right.size)
    crossed = np.flatnonzero(left[:m] >= right[:m])
    swaps = int(crossed[0]) if crossed.size else m
    if swaps == 0:
        cut = int(left[0])
    else:  # after swap i the left scan stops at the next left stop or at right[i], now a stop
        cut = min(int(left[swaps]) if swaps < left.size else hi, int(right[swaps - 1]))
        li, ri = left[:swaps], right[:swaps]
        keys[li], keys[ri] = keys[ri], keys[li].copy()
        idx[li], idx[ri] = idx[ri], idx[li].copy()
    return cut


def _heapsort(keys: np.ndarray, idx: np.ndarray, lo: int, hi: int) -> None:
    """``std::__partial_sort(first, last, last)``: libstdc++'s make_heap then sort_heap, in place."""
    k, v = keys[lo:hi].tolist(), idx[lo:hi].tolist()

    def adjust(hole: int, length: int, value) -> None:  # std::__adjust_heap + __push_heap
        top, child = hole, hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if k[child] < k[child - 1]:
                child -= 1
            k[hole], v[hole] = k[child], v[child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            k[hole], v[hole] = k[child - 1], v[child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and k[parent] < value[0]:
            k[hole], v[hole] = k[parent], v[parent]
            hole, parent = parent, (parent - 1) // 2
        k[hole], v[hole] = value

    n = len(k)
    for parent in range((n - 2) // 2, -1, -1) if n >= 2 else ():
        adjust(parent, n, (k[parent], v[parent]))
    for last in range(n - 1, 0, -1):  # std::__pop_heap(first, last, last)
        value = (k[last], v[last])
        k[last], v[last] = k[0], v[0]
        adjust(0, last, value)
    keys[lo:hi], idx[lo:hi] = k, v


def partitioned(keys: np.ndarray, watch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, idx)`` after the partition phase of ``std::sort`` (ascending) of ``(keys[i], i)``,
    replaying only the ranges that hold a value in ``watch`` (the others keep their input order)."""
    keys = np.array(keys, copy=True)
    idx = np.arange(keys.size, dtype=np.int64)
    if keys.size < 2:
        return keys, idx
    stack = [(0, keys.size, 2 * (keys.size.bit_length() - 1))]
    while stack:
        lo, hi, depth = stack.pop()
        while hi - lo > THRESHOLD and np.isin(keys[lo:hi], watch).any():
            if depth == 0:
                _heapsort(keys, idx, lo, hi)
                break
            depth -= 1
            cut = _partition(keys, idx, lo, hi)
            stack.append((cut, hi, depth))
            hi = cut
    return keys, idx


def kept(values: np.ndarray, start: int, stop: int, descending: bool) -> np.ndarray:
    """A mask shaped like ``values``: the entries torch's CPU ``sort`` of ``values.ravel()``
    (float32, no NaN) puts at positions ``start <= p < stop``."""
    flat = np.asarray(values, np.float32).reshape(-1)
    n = flat.size
    start, stop = max(0, start), min(n, stop)
    out = np.zeros(n, bool)
    if start >= stop:
        return out.reshape(np.shape(values))
    keys = -flat if descending else flat  # descending: x > y is -x < -y
    ordered = np.partition(keys, (start, stop - 1))
    cuts = np.unique([ordered[start], ordered[stop - 1]])
    out[(keys > ordered[start]) & (keys < ordered[stop - 1])] = True
    after, idx = partitioned(keys, cuts)
    for v in cuts:  # the tied entries, in the stable (insertion-sort) order of the partitioned array
        tied = idx[after == v]
        first = int(np.count_nonzero(keys < v))  # the sorted position of the first of them
        pos = first + np.arange(tied.size)
        out[tied[(pos >= start) & (pos < stop)]] = True
    return out.reshape(np.shape(values))


def kept_in_jit(x: jax.Array, start: int, stop: int, descending: bool) -> jax.Array:
    """:func:`kept` of ``x`` (traced) through ``jax.pure_callback``, for a jitted merge."""
    return jax.pure_callback(lambda v: kept(v, start, stop, descending), jax.ShapeDtypeStruct(x.shape, jnp.bool_),
                             x.astype(jnp.float32))
