"""The exact k-th largest ``|tau|`` per unit: one question, one :func:`solve`, four backends.

TIES trims each task vector at ``t = `` the ``int(d n)``-th largest ``|tau_t|`` over a unit
(the whole task vector or one tensor; Yadav et al., 2023, arXiv 2306.01708); Model
Breadcrumbs keeps ``t_lo <= |tau| < t_hi`` with two such ranks per tensor (Davari &
Belilovsky, 2024, arXiv 2312.06795); LwPTV's scores rank within the task vector or a layer.
A :class:`Query` states what is asked (the unit and the ranks), :func:`solve` answers it
with the backend the inputs call for, chosen here and nowhere else:

* a mesh of several devices (``jmerge.shard.mesh_of``): :mod:`.mesh`, ``shard_map`` bisection
  with one ``psum`` of the counts per step (no gather);
* numpy or single-device CPU arrays: :mod:`.host`, numpy's introselect on threads;
* tracers (inside ``jit``) or accelerator arrays: :mod:`.xla`, the sample-bracketed search;
* :class:`jmerge.io.safetensors_io.Checkpoint` inputs, global scope: :mod:`.streamed`, a
  sampling pass and a counting pass over the files.

A query may also ask, per tensor, where keeping exactly ``k`` entries stops among the ties at
the k-th value (``Query.positions``, TIES's ``tie_break="first"``): a scan of the host's numpy
arrays, or row counts in XLA for the other backends (:func:`last_tied_kept`), so the trim
itself is one elementwise pass: the cumulative counts, which XLA:CPU compiles slowly, stay
out of the merge's programs (one per tensor shape).

Every backend returns the same float32 value, bit for bit (tests/test_thresholds.py), and
the rules they share are written once below: the rank (:func:`keep_count`), the trivial
answers (:func:`trivial_threshold`), the sample bracket (:func:`bracket_positions`),
strided sampling (:func:`strided_starts`), the keep rule on bit patterns (:func:`keep`) and
integer bisection on bit patterns (:func:`bisect_bits`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


Ranks = Callable[[int, int], tuple[int, ...]]


class Query(NamedTuple):
    """What a sparsifier needs measured before it masks.

    Attributes:
      scope: ``"global"`` (one unit: the whole task vector), ``"tensor"`` (one unit per
        leaf) or explicit units, a tuple of tuples of leaf indices (e.g. LwPTV's layers).
      ranks: ``ranks(task, n) -> (k_1, ...)``, the ranks asked of a unit of ``n`` entries
        of task ``task``; answer ``j`` is the ``k_j``-th largest ``|tau|`` of the unit.
      positions: also answer where keeping exactly ``k`` entries stops among the ties
        (:func:`last_tied_kept`): tensor scope and one rank only; the answers of a task are
        then ``[kth, positions]``, two pytrees of per-tensor scalars.
    """

    scope: Any
    ranks: Ranks
    positions: bool = False


def keep_count(density: float, size: int, at_least_one: bool = False) -> int:
    """Entries kept at ``density``: ``int(density * size)`` (PEFT's rounding); ``at_least_one``:
    ``max(1, int(density * size))`` for ``0 < density < 1`` (mergekit 0.1.5's ``sparsify.magnitude``)."""
    k = int(density * size)
    return max(1, k) if at_least_one and 0 < density < 1 and size > 0 else k


def last_tied_kept(k: int, n: int, above: int, tied_positions) -> int:
    """The first-k rule's cut: keeping exactly ``k`` of ``n`` entries, those above the k-th
    largest ``|tau|`` (``above`` of them) then the ones equal to it in row-major order
    (``tied_positions``: ascending, all of them or at least the first ``k - above``), the
    row-major index of the last tied entry kept: -1 if none, ``n`` if fewer than ``k - above``
    are tied. An entry is kept iff ``|tau| > kth``, or ``|tau| == kth`` and its index is at most
    the cut (:func:`jmerge.stages.magnitude_trim`)."""
    room = k - above
    if room <= 0:
        return -1
    return n if len(tied_positions) < room else int(tied_positions[room - 1])


def one_rank(query: Query, task: int, n: int) -> int:
    """The one rank a ``positions`` query asks of a tensor of ``n`` entries of ``task``."""
    ranks = tuple(query.ranks(task, n))
    if len(ranks) != 1:
        raise ValueError(f"tie positions answer one rank per tensor; the query asks {len(ranks)}")
    return ranks[0]


def trivial_threshold(k: int, n: int) -> float | None:
    """The threshold that keeps the top ``k`` of ``n`` when no search is needed: 0 (keep all)
    for ``k >= n``, ``inf`` (keep none) for ``k = 0``; None otherwise."""
    return 0.0 if k >= n else math.inf if k <= 0 else None


def bracket_positions(q, s: int, z: float, xp=np):
    """Sample positions ``(floor(r - w), ceil(r + w))`` around the ascending position
    ``r = (1 - q) s`` of the top-``q`` quantile in a sorted uniform sample of ``s``,
    ``w = z (sqrt(s q (1 - q)) + 1)``: ``z`` binomial standard deviations plus one."""
    rank = (1.0 - q) * s
    spread = z * (xp.sqrt(s * q * (1.0 - q)) + 1.0)
    return xp.floor(rank - spread), xp.ceil(rank + spread)


def strided_starts(sizes: Sequence[int], sample: int) -> tuple[int, list[int]]:
    """``(stride, starts)``: every ``stride``-th entry of the concatenation of pieces of
    ``sizes`` (``stride = max(n // sample, 1)``) is entry ``starts[i], + stride, ...`` of piece i."""
    stride = max(sum(sizes) // sample, 1)
    starts, offset = [], 0
    for size in sizes:
        starts.append((-offset) % stride)
        offset += size
    return stride, starts


def bits(x):
    """float32 bit patterns as int32: they order non-negative floats like their values,
    and compare exactly (XLA:CPU flushes subnormals to zero in float comparisons)."""
    return jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)


def keep(x, lower, upper=None):
    """``lower <= |x|`` (and ``|x| < upper``), compared as float32 bit patterns: ``lower = 0``
    keeps everything, ``inf`` nothing; ``upper = inf`` drops nothing finite."""
    b = bits(jnp.abs(jnp.asarray(x).astype(jnp.float32)))
    kept = b >= bits(lower)
    return kept if upper is None else kept & (b < bits(upper))


def bisect_bits(ok: Callable, lo, hi, first=None):
    """The largest bit pattern ``b`` in ``[lo, hi)`` with ``ok(b)``, for ``ok`` true up to the
    answer and false above it (``ok(lo)`` holds): integer bisection, elementwise over arrays
    of brackets; ``first`` is the first probe (then the midpoints). A while loop, so that
    ``vmap`` does not run it for inputs whose bracket is already closed."""

    def step(state):
        lo, hi, fresh = state
        mid = lo + (hi - lo) // 2
        if first is not None:
            mid = jnp.where(fresh, first, mid)
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid), jnp.bool_(False)

    return jax.lax.while_loop(lambda st: jnp.any(st[1] - st[0] > 1), step, (lo, hi, jnp.bool_(True)))[0]


class Job(NamedTuple):
    """One search: the ``k``-th largest ``|tau|`` over leaves ``leaves`` of task ``task``."""

    task: int
    leaves: tuple[int, ...]
    k: int


def plan(query: Query, sizes: Sequence[int], num_tasks: int):
    """The units of ``query`` over leaves of ``sizes``, the searches to run and the answers
    known without one: ``(units, jobs, where, values)``; ``values[t, u, j]`` is filled for
    trivial ranks, ``where[i] = (t, u, j)`` says which answer job ``i`` gives."""
    if query.scope == "global":
        units = [tuple(range(len(sizes)))]
    elif query.scope == "tensor":
        units = [(i,) for i in range(len(sizes))]
    elif isinstance(query.scope, (tuple, list)):
        units = [tuple(u) for u in query.scope]
    else:
        raise ValueError(f"trim scope must be 'global' or 'tensor', got {query.scope!r}")
    jobs, where, values, n_ranks = [], [], {}, []
    for t in range(num_tasks):
        for u, unit in enumerate(units):
            n = sum(int(sizes[i]) for i in unit)
            ranks = tuple(query.ranks(t, n))
            if u == 0:
                n_ranks.append(len(ranks))
            for j, k in enumerate(ranks):
                if (fixed := trivial_threshold(k, n)) is not None:
                    values[t, u, j] = fixed
                else:
                    jobs.append(Job(t, unit, k))
                    where.append((t, u, j))
    return units, jobs, where, values, n_ranks


def answers(query: Query, values: dict, units, n_ranks, treedef) -> list[list]:
    """``out[t][j]``, the answer to rank ``j`` of task ``t``: a scalar (global scope), a pytree
    of scalars shaped like the task vector (tensor scope) or a tuple, one per unit."""
    num_units = len(units)
    out = []
    for t, r in enumerate(n_ranks):
        per_rank = []
        for j in range(r):
            found = [values[t, u, j] for u in range(num_units)]
            if query.scope == "global":
                per_rank.append(found[0])
            elif query.scope == "tensor":
                per_rank.append(jax.tree.unflatten(treedef, found))
            else:
                per_rank.append(tuple(found))
        out.append(per_rank)
    return out


def backend(experts: Sequence, base=None, mesh=None) -> str:
    """The backend :func:`solve` uses for these inputs (see the module docstring)."""
    from jmerge.io.safetensors_io import Checkpoint
    from jmerge.thresholds import host

    if isinstance(base, Checkpoint) or any(isinstance(e, Checkpoint) for e in experts):
        return "streamed"
    tree = (base, list(experts))
    if mesh is not None:
        return "mesh"
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree)):
        return "xla"
    from jmerge.shard import mesh_of

    if mesh_of(experts[0]) is not None:
        return "mesh"
    return "host" if host.on_host_cpu(tree) else "xla"


def solve(query: Query, experts: Sequence, base=None, *, mesh=None, spec=None, using: str = "auto", **options) -> list[list]:
    """Answers ``query`` for the task vectors ``experts - base`` (``experts`` themselves when
    ``base`` is None): ``out[t][j]``, the ``k_j``-th largest ``|tau_t|`` of each unit (see
    :func:`answers` for the shapes), exact; ``k >= n`` gives 0 (keep all), ``k = 0`` ``inf``.

    Args:
      query: the units and ranks.
      experts: K pytrees (arrays, possibly traced) or K checkpoints.
      base: the base pytree or checkpoint, or None when ``experts`` are task vectors.
      mesh, spec: run the :mod:`.mesh` backend on ``mesh``, with ``spec(path, x)`` giving
        each array's ``PartitionSpec`` (needed inside ``jit``; default: read from shardings).
      using: ``"auto"`` (:func:`backend`) or a backend's name.
      **options: the backend's own (``progress``, ``sample`` for :mod:`.streamed`).
    """
    from jmerge.thresholds import host, mesh as mesh_backend, streamed, xla

    experts = list(experts)
    name = backend(experts, base, mesh) if using == "auto" else using
    if query.positions and (query.scope != "tensor" or name == "streamed"):
        raise ValueError(f"tie positions are answered per tensor of in-memory arrays, not scope {query.scope!r} "
                         f"with the {name} backend")
    if query.positions:  # before any search
        for t, e in enumerate(experts):
            one_rank(query, t, int(np.prod(np.shape(jax.tree.leaves(e)[0]))))
    if name == "streamed":
        return streamed.solve(query, experts, base, **options)
    if name == "mesh":
        out = mesh_backend.solve(query, experts, base, mesh=mesh, spec=spec)
    elif name == "host":
        out = host.solve(query, experts, base)
    elif name == "xla":
        out = xla.solve(query, experts, base)
    else:
        raise ValueError(f"unknown threshold backend {name!r} (backends: auto, host, mesh, streamed, xla)")
    if not query.positions:
        return out
    located = host.positions if name == "host" else xla.positions  # the mesh's arrays: XLA, sharded
    return [[kth, located(query, t, kth, experts[t], base)] for t, (kth,) in enumerate(out)]  # one rank: checked
