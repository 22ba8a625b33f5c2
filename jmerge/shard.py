"""Meshes, the parameter sharding rule, and placing pytrees on a mesh.

A merge is one ``jax.jit`` over pytrees; give it inputs sharded with ``NamedSharding`` and
XLA partitions it (elementwise work and reductions stay local; a global reduction becomes
one all-reduce of a scalar). The same code runs on one CPU, 8 fake CPU devices in tests,
or a TPU pod (``jax.distributed`` for many hosts, see :mod:`jmerge.distributed`).

The default rule is big_vision's ``fsdp`` rule (``google-research/big_vision:big_vision/
sharding.py``): shard the **largest** dimension divisible by the size of the ``model``
axis, replicate tensors below ``min_size`` elements or with no divisible dimension;
regex overrides over the parameter path (``jmerge.tree.paths``) come first, first match
wins. A rule is any ``rule(path, shape, mesh) -> PartitionSpec``; customise the default
with ``functools.partial(spec_for, overrides=[...], min_size=...)``.

Example::

    mesh = jmerge.shard.make_mesh(model=8)
    rule = functools.partial(spec_for, overrides=[(r"embed", P(None, "model"))])
    base, *experts = (jmerge.shard.shard_params(t, mesh, rule) for t in (base, *experts))
    merged = jmerge.merge(base, experts, "ties")      # merged is sharded like base
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jmerge import tree as jtree
from jmerge.tree import PyTree
from jmerge.validate import MergeInputError

Rule = Callable[[str, tuple, Mesh], P]

DATA, MODEL = "data", "model"
DEFAULT_MIN_SIZE = 2**16  # elements (256 KiB in float32): biases and norms stay replicated


def make_mesh(data: int = 1, model: int | None = None, *, explicit: bool = False, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: every device of every process).

    ``model=None`` takes all devices left after ``data``. Parameters are sharded over
    ``model`` (see :func:`spec_for`); ``data`` is for batch parallelism in learned-coefficient
    runs, parameters are replicated along it.

    Axis types are ``Auto`` by default: XLA chooses the layout of intermediates, and a
    merge's inputs may carry any sharding. ``explicit=True`` gives ``Explicit`` axes
    ("sharding in types", ``jax.make_mesh``'s own default since jax 0.8): every array's
    sharding is part of its type (``jax.typeof(x)`` shows ``f32[64@model,32]``) and an op
    whose output sharding is ambiguous is a ``ShardingTypeError`` instead of a silent
    reshard. The elementwise merges (average, task arithmetic, MagMax, consensus, DARE)
    and TIES with :func:`jmerge.thresholds.mesh.magnitude_trim` run there; methods that sort or
    reshape along a sharded dimension (the XLA thresholds search, DELLA, Model Stock,
    Multi-SLERP) or factorise whole matrices (SVD methods) need ``Auto`` axes
    (docs/scaling.md).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data < 1 or n % data:
        raise MergeInputError(f"data={data} must be a positive divisor of the {n} devices")
    model = n // data if model is None else model
    if data * model != n:
        raise MergeInputError(f"mesh data={data} x model={model} needs {data * model} devices, have {n}")
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(kind, kind), devices=devices)


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    for name in names:
        if name not in mesh.shape:
            raise MergeInputError(f"mesh has no axis {name!r} (axes: {tuple(mesh.shape)})")
    return math.prod(mesh.shape[name] for name in names)


def _check_spec(path: str, shape: tuple, mesh: Mesh, spec: P) -> None:
    if len(spec) > len(shape):
        raise MergeInputError(f"sharding override {spec} for {path!r} has more entries than its shape {shape}")
    for dim, axis in enumerate(spec):
        if axis is None:
            continue
        n = _axis_size(mesh, axis)
        if shape[dim] % n:
            raise MergeInputError(
                f"sharding override {spec} for {path!r}: dimension {dim} of shape {shape} "
                f"is not divisible by the {n} devices of mesh axis {axis!r}"
            )


def spec_for(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    *,
    overrides: Sequence[tuple[str | re.Pattern, P]] = (),
    min_size: int = DEFAULT_MIN_SIZE,
    axis: str | tuple[str, ...] = MODEL,
) -> P:
    """The ``PartitionSpec`` of one parameter.

    1. The first ``(regex, spec)`` in ``overrides`` whose regex ``re.search``-matches
       ``path`` wins (``P()`` replicates); its dimensions must divide evenly.
    2. Tensors with fewer than ``min_size`` elements, and every tensor when ``axis`` has
       size 1, are replicated.
    3. Otherwise the largest dimension divisible by the size of ``axis`` is sharded over it
       (the earliest such dimension on ties); with none divisible, the tensor is replicated.

    ``axis`` may be a tuple of mesh axes, e.g. ``("data", "model")`` to shard parameters
    over the whole mesh (FSDP style).
    """
    shape = tuple(int(s) for s in shape)
    for pattern, spec in overrides:
        if re.search(pattern, path):
            _check_spec(path, shape, mesh, spec)
            return spec
    n = _axis_size(mesh, axis)
    if n == 1 or math.prod(shape) < min_size:
        return P()
    divisible = [d for d, s in enumerate(shape) if s % n == 0]
    if not divisible:
        return P()
    dim = max(divisible, key=lambda d: (shape[d], -d))
    return P(*([None] * dim), axis)


def shardings_for(tree: PyTree, mesh: Mesh, rule: Rule = spec_for) -> PyTree:
    """A ``NamedSharding`` per leaf of ``tree`` (arrays, numpy arrays or ``jax.ShapeDtypeStruct``)."""
    return jtree.map_with_path(lambda path, x: NamedSharding(mesh, rule(path, tuple(x.shape), mesh)), tree)


def abstract_for(tree: PyTree, mesh: Mesh, rule: Rule = spec_for) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves carrying the rule's sharding: the target tree for an
    orbax restore straight into sharded arrays (``ocp.StandardCheckpointer().restore(path, it)``)."""
    shardings = shardings_for(tree, mesh, rule)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s), tree, shardings)


def _place(x, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or sharding.is_fully_addressable):
        return jax.device_put(x, sharding)
    # A host value (or a local array) placed on a mesh spanning several processes: every
    # process hands over only the blocks its own devices hold.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(tree: PyTree, mesh: Mesh, rule: Rule = spec_for) -> PyTree:
    """``tree`` with every leaf placed on ``mesh`` with the rule's ``NamedSharding``.

    Works for jax and numpy leaves, in one process or many (a host value must then be the
    same on every process; to read only the local blocks from disk, see
    :mod:`jmerge.io.sharded`).
    """
    return jax.tree.map(_place, tree, shardings_for(tree, mesh, rule))


def spec_table(tree: PyTree, mesh: Mesh, rule: Rule = spec_for) -> list[tuple[str, tuple, P]]:
    """``(path, shape, spec)`` per leaf, to log or print which parameters the rule shards."""
    return [(p, tuple(x.shape), rule(p, tuple(x.shape), mesh)) for p, x in jtree.flatten(tree).items()]


def mesh_of(tree: PyTree) -> Mesh | None:
    """The mesh of ``tree``'s leaves when they are jax arrays with ``NamedSharding``s on one
    mesh of several devices (with at least one leaf actually split), else None."""
    leaves = jax.tree.leaves(tree)
    shardings = [getattr(x, "sharding", None) for x in leaves]
    if not leaves or not all(isinstance(s, NamedSharding) for s in shardings):
        return None
    mesh = shardings[0].mesh
    if mesh.size < 2 or any(s.mesh != mesh for s in shardings):
        return None
    return mesh if any(any(e is not None for e in s.spec) for s in shardings) else None
