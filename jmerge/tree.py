"""Pytree helpers: path-aware flattening, task vectors and their algebra.

Any pytree of arrays is a model: nested dicts (HF Flax ``params``), ``nnx.State``,
or a flat ``{"encoder.layer.0.attention.self.query.weight": array}`` dict read from
safetensors. A parameter's *path* is its keys joined by ``/`` (a flat dict's key is
kept as it is), and every rule in jmerge (layer grouping, per-parameter
hyper-parameters, sharding) is a regex or callable over that path.

Task vectors (Ilharco et al., 2023): ``tau_t = theta_t - theta_0``, computed and kept
in float32 whatever the checkpoint dtype (the difference of two bf16 numbers is
exact in float32); ``apply`` adds ``scale * tau`` in float32 and casts once to the
base dtype; ``apply_tasks`` is task arithmetic with one coefficient per task and layer, the one
kernel behind ``task_arithmetic``, learned coefficients and their checkpoint writer.

mergekit's arithmetic (``jmerge.merge(..., compute_dtype=)``): inside :func:`rounding` the methods
follow mergekit's order of operations, and every step that calls :func:`rounded` rounds its float32
result to the dtype mergekit computes in, as torch rounds each bf16/fp16 operation on CPU (computed
in float32, rounded to nearest even): its ``dtype`` for the methods mergekit computes in it, float32
(nothing to round) for the others. Outside it :func:`rounded` is the identity and the methods use
jmerge's own float32 arithmetic.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

PyTree = Any
ACCUM_DTYPE = jnp.float32
# the dtype mergekit computes in (read at trace time), None: jmerge's own arithmetic; a ContextVar, so
# a merge traced in one thread does not see another thread's setting
_ROUND_TO: contextvars.ContextVar = contextvars.ContextVar("jmerge_round_to", default=None)


@contextlib.contextmanager
def rounding(dtype) -> Iterator[None]:
    """Within the block, mergekit's arithmetic in ``dtype``: :func:`rounded` rounds to it (e.g.
    ``"bfloat16"``; float32: nothing to round) and the methods take mergekit's order of operations
    (:func:`rounding_dtype` is not None). None: jmerge's own arithmetic. Read when a function is
    traced, so a jitted function must be cached per dtype (:func:`jmerge.methods.registry.merge` does)."""
    token = _ROUND_TO.set(None if dtype is None else jnp.dtype(dtype))
    try:
        yield
    finally:
        _ROUND_TO.reset(token)


def rounding_dtype():
    """The dtype mergekit computes in now (:func:`rounding`), or None (jmerge's own arithmetic)."""
    return _ROUND_TO.get()


def rounded(tree: PyTree) -> PyTree:
    """Every float leaf rounded to the :func:`rounding` dtype and back to float32 (round to
    nearest even, subnormals kept: an ``astype`` pair, which XLA keeps); unchanged outside it and
    in float32."""
    dt = _ROUND_TO.get()
    if dt is None or dt == ACCUM_DTYPE:
        return tree
    def leaf(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return jnp.asarray(x, ACCUM_DTYPE).astype(dt).astype(ACCUM_DTYPE)

    return jax.tree.map(leaf, tree)


def rounded_task_vectors(base: PyTree, experts: Sequence[PyTree], dtype) -> list[PyTree]:
    """``tau_t = theta_t - theta_0`` in float32, each entry rounded to ``dtype`` (as inside
    :func:`rounding`), computed outside ``jit``: what a sparsifier's thresholds are measured on."""
    with rounding(dtype):
        return [rounded(tv) for tv in task_vectors(base, experts)]


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path) -> str:
    """Joins a jax key path into ``a/b/0/c``."""
    return "/".join(_key_name(k) for k in path)


def paths(tree: PyTree) -> list[str]:
    """Path strings of the leaves of ``tree``, in ``jax.tree.leaves`` order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def flatten(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` in leaf order."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(like: PyTree, flat: dict[str, Any]) -> PyTree:
    """Rebuilds a pytree with the structure of ``like`` from a ``{path: leaf}`` dict."""
    treedef = jax.tree.structure(like)
    return jax.tree.unflatten(treedef, [flat[p] for p in paths(like)])


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``jax.tree.map`` whose function also receives the leaf's path string."""
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest)


def path_hash(path: str) -> int:
    """A stable 31-bit hash of a parameter path (BLAKE2b), independent of Python's hash seed."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def keys_like(key, tree: PyTree) -> PyTree:
    """Per-leaf PRNG keys shaped like ``tree``: ``fold_in(key, path_hash(path))``, so a
    parameter's key depends on its path only (not on the leaf order or the other leaves),
    and a merge of one tensor at a time draws what the whole-model merge draws. A ``key``
    that is already a pytree of keys shaped like ``tree`` is returned as it is."""
    if not isinstance(key, jax.Array):
        return key
    return map_with_path(lambda p, x: jax.random.fold_in(key, path_hash(p)), tree)


def task_vector(base: PyTree, expert: PyTree) -> PyTree:
    """``tau = expert - base`` in float32."""
    return jax.tree.map(lambda b, e: e.astype(ACCUM_DTYPE) - b.astype(ACCUM_DTYPE), base, expert)


def task_vectors(base: PyTree, experts: Sequence[PyTree]) -> list[PyTree]:
    """One float32 task vector per expert."""
    return [task_vector(base, e) for e in experts]


def apply(base: PyTree, tv: PyTree, scale: float | jax.Array = 1.0) -> PyTree:
    """``theta_0 + scale * tau``, accumulated in float32, cast once to each base leaf's dtype
    (:func:`rounding`: ``scale * tau`` and the sum each rounded, as mergekit's ``base + lambda * mixed``)."""
    return jax.tree.map(lambda b, t: rounded(b.astype(ACCUM_DTYPE) + rounded(scale * t)).astype(b.dtype), base, tv)


def apply_tasks(base: PyTree, tvs: Sequence[PyTree], coefficients, leaf_layer: Sequence[int] | None = None) -> PyTree:
    """Task arithmetic per layer, ``theta^p = theta_0^p + sum_t Gamma[t, l(p)] tau_t^p``
    (arXiv 2212.04089; per layer: AdaMerging, arXiv 2310.02575, and DivMerge, arXiv 2509.02108).

    ``coefficients``: ``(K,)`` (one per task) or ``(K, L)`` with ``leaf_layer[i]`` the layer of
    leaf ``i`` (``jax.tree.leaves`` order). An unrolled sum over tasks accumulated in float32
    from ``theta_0``, cast once to each base leaf's dtype; differentiable in ``coefficients``.
    """
    leaves = jax.tree.leaves(base)
    layer_of = [0] * len(leaves) if leaf_layer is None else list(leaf_layer)
    if len(layer_of) != len(leaves):
        raise ValueError(f"leaf_layer names {len(layer_of)} layers for {len(leaves)} leaves")
    c = jnp.reshape(jnp.asarray(coefficients, ACCUM_DTYPE), (len(tvs), -1))
    out = []
    for b, taus, l in zip(leaves, transpose_leaves(tvs)[0], layer_of):
        total = b.astype(ACCUM_DTYPE)
        for t, tau in enumerate(taus):
            total = total + c[t, l] * tau
        out.append(total.astype(b.dtype))
    return jax.tree.unflatten(jax.tree.structure(base), out)


def add(*tvs: PyTree) -> PyTree:
    """Elementwise sum of task vectors (an unrolled sum, which XLA:CPU fuses)."""
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *tvs)


def scale(tv: PyTree, factor: float | jax.Array) -> PyTree:
    """``factor * tau``."""
    return jax.tree.map(lambda t: factor * t, tv)


def negate(tv: PyTree) -> PyTree:
    """``-tau`` (task negation, Ilharco et al., 2023)."""
    return jax.tree.map(jnp.negative, tv)


def zeros_like(tree: PyTree) -> PyTree:
    """A float32 task vector of zeros shaped like ``tree``."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, ACCUM_DTYPE), tree)


def transpose_leaves(tvs: Sequence[PyTree]) -> tuple[list[tuple[Any, ...]], Any]:
    """From K pytrees to a list (one per leaf) of K-tuples, plus the treedef."""
    leaves = [jax.tree.leaves(t) for t in tvs]
    return [tuple(ls) for ls in zip(*leaves)], jax.tree.structure(tvs[0])


def map_tasks(fn: Callable[..., Any], tvs: Sequence[PyTree], *extra: PyTree) -> PyTree:
    """Applies ``fn(path, (tau_1[p], ..., tau_K[p]), *extra[p])`` leaf by leaf.

    ``fn`` returns one array (a combined leaf) or a K-tuple (per-task leaves); in the
    second case the result is returned as a list of K pytrees.
    """
    per_leaf, treedef = transpose_leaves(tvs)
    extra_leaves = [jax.tree.leaves(e) for e in extra]
    names = paths(tvs[0])
    out = [fn(n, ts, *(e[i] for e in extra_leaves)) for i, (n, ts) in enumerate(zip(names, per_leaf))]
    if out and isinstance(out[0], tuple):
        return [jax.tree.unflatten(treedef, [o[k] for o in out]) for k in range(len(tvs))]
    return jax.tree.unflatten(treedef, out)


def masked(tv: PyTree, mask: PyTree) -> PyTree:
    """``mask ⊙ tau``: entries where ``mask`` is false become 0."""
    return jax.tree.map(lambda t, m: jnp.where(m, t, 0.0), tv, mask)
