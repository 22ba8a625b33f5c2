"""The mesh backend of :mod:`jmerge.thresholds`: exact k-th largest magnitudes by ``jax.shard_map``.

Under plain ``jax.jit`` the elementwise merges need no collective at all, and the exact
TIES threshold of the XLA search (:mod:`jmerge.thresholds.xla`) becomes scalar all-reduces
of counts plus all-gathers of a small strided sample (and, for groups under 2**14 entries,
of the whole group, which it sorts); it also does not type-check under ``Explicit`` mesh
axes. :func:`kth_largest_magnitudes` computes the same exact value with nothing but local
work and one ``psum`` per step (docs/scaling.md lists what every method moves):

* **one bisection for every threshold**: all tasks (and, for per-tensor trimming, all
  tensors) are bisected together, so each of the 32 steps is *one* ``psum`` of a ``(2, G)``
  uint32 count vector for G thresholds;
* **exact counts past 2**32 entries**: per-device counts are split in 16-bit halves before
  the ``psum`` and recombined with a carry, so a task vector of a 70B model (7e10 entries)
  is ranked exactly; the XLA search counts in uint32 (4.29e9 entries per call);
* **no gather, any axis types**: each device reads only its own blocks (a block replicated
  over some mesh axes is counted by its first replica only).

Counts compare float32 bit patterns as integers (exact for subnormals, which XLA:CPU
flushes in float comparisons), and both searches are exact, so the thresholds equal
the XLA search's bit for bit. The price on XLA:CPU: integer compare-and-sum passes are slower
than its fused float counting, and up to 32 of them run.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmerge._util import register_cache
from jmerge import shard
from jmerge import tree as jtree
from jmerge.shard import Rule, spec_for
from jmerge.thresholds import Query, answers, bisect_bits, bits as _bits, plan

_HALF = 16
_LOW = (1 << _HALF) - 1


def _spec_of(x, mesh: Mesh) -> P:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.shape == mesh.shape:
        return sharding.spec
    return P()


def _axes_in(spec: P) -> set[str]:
    used = set()
    for entry in spec:
        if entry is not None:
            used.update(entry if isinstance(entry, tuple) else (entry,))
    return used


def kth_largest_magnitudes(
    groups: Sequence[Sequence[jax.Array]],
    ks: Sequence[int],
    mesh: Mesh,
    specs: Sequence[Sequence[P]] | None = None,
) -> jax.Array:
    """For each group of arrays, the exact ``ks[g]``-th largest ``|x|`` over the group.

    Runs as one ``jax.shard_map`` over ``mesh``: each device counts ``|x| >= t`` on its own
    blocks (a replicated block is counted by one device only), and one ``psum`` of the
    per-group counts per bisection step makes them global. ``specs`` are the arrays'
    ``PartitionSpec``s on ``mesh``; by default they are read from the arrays' shardings
    (pass them explicitly inside ``jit``, where arrays are tracers). Needs
    ``1 <= ks[g] <= size of group g`` and fewer than 2**32 entries of a group per device.

    Returns:
      float32 array of shape ``(len(groups),)``, replicated.
    """
    groups = [list(g) for g in groups]
    if len(ks) != len(groups):
        raise ValueError(f"{len(groups)} groups but {len(ks)} values of k")
    for g, (arrays, k) in enumerate(zip(groups, ks)):
        n = sum(int(np.prod(a.shape)) for a in arrays)
        if not 1 <= k <= n:
            raise ValueError(f"group {g}: k={k} must lie in [1, {n}] (its number of entries)")
        if n >= 1 << (2 * _HALF + 16):
            raise ValueError(f"group {g}: {n} entries exceed the 2**48 this count supports")
    if specs is None:
        specs = [[_spec_of(a, mesh) for a in arrays] for arrays in groups]
    flat = [a for arrays in groups for a in arrays]
    flat_specs = tuple(s for group_specs in specs for s in group_specs)
    fn = _bisection(mesh, flat_specs, tuple(len(arrays) for arrays in groups))
    k_hi = np.asarray([k >> _HALF for k in ks], np.uint32)
    k_lo = np.asarray([k & _LOW for k in ks], np.uint32)
    return fn(k_hi, k_lo, *flat)


@functools.lru_cache(maxsize=128)
def _bisection(mesh: Mesh, flat_specs: tuple[P, ...], sizes: tuple[int, ...]):
    """The jitted shard_map for one layout of groups (cached: calls with new k reuse it)."""
    all_axes = tuple(mesh.axis_names)
    bounds = np.cumsum((0,) + sizes)
    # Within a group, blocks replicated over the same mesh axes share one owner predicate.
    classes = []
    for g in range(len(sizes)):
        by_unused: dict[tuple[str, ...], list[int]] = {}
        for i in range(bounds[g], bounds[g + 1]):
            by_unused.setdefault(tuple(sorted(set(all_axes) - _axes_in(flat_specs[i]))), []).append(i)
        classes.append(list(by_unused.items()))

    def local(k_hi, k_lo, *blocks):
        # Bit patterns of |x| order like the values and compare exactly (XLA:CPU flushes
        # subnormal floats to zero in float comparisons).
        bits = [_bits(jnp.abs(b.astype(jnp.float32))) for b in blocks]

        def owner(unused):  # this device holds the first replica of such blocks
            mine = jnp.bool_(True)
            for axis in unused:
                mine = mine & (jax.lax.axis_index(axis) == 0)
            return mine

        def count_at_least(t):
            c = jnp.stack([
                sum(jnp.where(owner(unused), sum(jnp.sum(bits[i] >= t[g], dtype=jnp.uint32) for i in idx), jnp.uint32(0))
                    for unused, idx in group)
                for g, group in enumerate(classes)
            ])
            halves = jax.lax.psum(jnp.stack([c & _LOW, c >> _HALF]), all_axes)
            return halves[1] + (halves[0] >> _HALF), halves[0] & _LOW

        local_max = jnp.stack([jnp.max(jnp.stack([jnp.max(bits[i]) for i in range(bounds[g], bounds[g + 1])]))
                               for g in range(len(sizes))])
        hi = jax.lax.pmax(local_max, all_axes) + 1  # count(>= hi) = 0 < k <= count(>= 0)
        lo = jnp.zeros_like(hi)

        def ok(mid):
            c_hi, c_lo = count_at_least(mid)
            return (c_hi > k_hi) | ((c_hi == k_hi) & (c_lo >= k_lo))

        return jax.lax.bitcast_convert_type(bisect_bits(ok, lo, hi), jnp.float32)  # <= 32 halvings

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P()) + flat_specs, out_specs=P()))


register_cache(_bisection.cache_clear)


def kth_largest_magnitude(arrays: Sequence[jax.Array], k: int, mesh: Mesh, specs: Sequence[P] | None = None) -> jax.Array:
    """Sharded :func:`jmerge.thresholds.xla.kth_largest_magnitude`: the exact k-th largest ``|x|``."""
    return kth_largest_magnitudes([arrays], [k], mesh, None if specs is None else [specs])[0]


_task_vectors = jax.jit(jtree.task_vectors)


def solve(query: Query, experts: Sequence, base=None, *, mesh: Mesh | None = None, spec=None) -> list[list]:
    """:func:`jmerge.thresholds.solve` by one :func:`kth_largest_magnitudes` call for every
    search (the task vectors are formed first, sharded like the inputs). ``spec(path, x)``
    gives an array's ``PartitionSpec`` (needed inside ``jit``); by default it is read from
    the arrays' shardings, and ``mesh`` from the inputs'."""
    tvs = list(experts) if base is None else _task_vectors(base, list(experts))
    mesh = mesh or shard.mesh_of(tvs[0])
    spec = spec or (lambda path, x: _spec_of(x, mesh))
    leaves = [jax.tree.leaves(tv) for tv in tvs]
    specs = [spec(p, x) for p, x in zip(jtree.paths(tvs[0]), leaves[0])]
    units, jobs, where, values, n_ranks = plan(query, [int(np.prod(x.shape)) for x in leaves[0]], len(tvs))
    if jobs:
        found = kth_largest_magnitudes(
            [[leaves[j.task][i] for i in j.leaves] for j in jobs], [j.k for j in jobs], mesh, [[specs[i] for i in j.leaves] for j in jobs]
        )
        values.update((w, found[i]) for i, w in enumerate(where))
    return answers(query, values, units, n_ranks, jax.tree.structure(tvs[0]))


def magnitude_trim(density: float | Sequence[float], mesh: Mesh, rule: Rule = spec_for, scope: str = "global"):
    """:func:`jmerge.stages.magnitude_trim` (the TIES trim) with its thresholds found on
    ``mesh``, for use inside ``jit``: the specs come from ``rule``, the rule the inputs were
    placed with. Same results."""
    from jmerge import stages

    trim = stages.magnitude_trim(density, scope)
    return lambda tvs, key=None: trim(tvs, mesh=mesh, spec=lambda p, x: rule(p, tuple(x.shape), mesh))
