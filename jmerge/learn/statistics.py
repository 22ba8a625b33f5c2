"""Data statistics of one model for the data-driven merges: RegMean's Gram matrices and Fisher's diagonal.

Both take the learn engine's data interface: ``apply_fn(params, inputs) -> logits`` and a pytree
of inputs with a leading example axis (:class:`jmerge.learn.TaskTargets` ``.inputs``). Each
runs batch by batch under one ``jax.jit`` per batch shape, on whatever devices and shardings
the parameters and inputs carry.

* :func:`gram_matrices` (RegMean, Jin et al., 2023, arXiv 2212.09849): for every 2-D parameter
  ``W`` used as a linear map ``y = x W`` (a ``dot_general`` contracting one axis of ``W``
  against the features of ``x``), ``G = XᵀX / n`` over the ``n`` rows (examples × positions,
  padding included, as FusionBench) of its inputs. No hooks are needed: the apply function is
  traced to a jaxpr and re-run by a small interpreter that, at each such ``dot_general``,
  adds ``xᵀx`` to the parameter's Gram (through ``jit``/``pjit`` calls, dtype conversions and
  2-D transposes, so Flax ``Dense`` kernels ``(in, out)`` and torch-layout ``x @ W.T`` both
  count; so does a tied embedding used as the LM head, whose lookup is a gather). A parameter
  used under ``scan``/``while`` (stacked layers) or only by other primitives is not tapped,
  nor one contracted along both of its axes; :attr:`Grams.untapped` names the 2-D ones, which
  the merge then averages.
* :func:`fisher_diagonal` (Fisher merging, Matena & Raffel, 2022, arXiv 2111.09832): for
  classifier logits ``(B, C)``, ``F = (1/N) Σ_x Σ_c p(c|x) (∇_θ log p(c|x))²``, the exact
  expectation over the model's own predictive distribution (``estimator="exact"``: C
  backward passes per example), or FusionBench's estimate ``estimator="batch"``: per batch
  the squared gradient of ``Σ_x Σ_c sqrt(p(c|x)) log p(c|x)`` (``p`` held constant), summed
  over batches and divided by ``N`` (cross terms between examples and classes included); it
  also takes per-position logits ``(B, T, C)`` with a ``mask`` of the positions that count.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jmerge import tree as jtree
from jmerge.learn.targets import num_examples
from jmerge.methods.data_driven import Grams
from jmerge.tree import PyTree
from jmerge.validate import MergeInputError

logger = logging.getLogger("jmerge.learn.statistics")

_CALLS = ("pjit", "jit", "closed_call", "core_call")
_SAME = ("convert_element_type", "copy", "copy_p", "optimization_barrier")


def _interpret(jaxpr, consts, args, tags, acc) -> list:
    """Evaluates ``jaxpr`` on ``args``; ``tags[i] = (path, flipped)`` marks args that are (a
    transpose of) parameter ``path``; every ``dot_general`` of a tagged 2-D operand adds the
    Gram of the other operand's contracted features to ``acc[path]``."""
    env, tag = {}, {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a, t in zip(jaxpr.invars, args, tags):
        env[v] = a
        if t is not None:
            tag[v] = t
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        in_tags = [None if isinstance(v, jcore.Literal) else tag.get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS and isinstance(eqn.params.get("jaxpr"), jcore.ClosedJaxpr):
            sub = eqn.params["jaxpr"]
            outs = _interpret(sub.jaxpr, sub.consts, invals, in_tags, acc)
        else:
            if name == "dot_general":
                _tap(eqn, invals, in_tags, acc)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
            t = in_tags[0] if in_tags else None
            if t is not None and name in _SAME:
                tag[eqn.outvars[0]] = t
            elif t is not None and name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0):
                tag[eqn.outvars[0]] = (t[0], not t[1])
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _tap(eqn, invals, in_tags, acc) -> None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or len(lc) != 1:
        return
    for w, x, wc, xc, t in ((1, 0, rc, lc, in_tags[1]), (0, 1, lc, rc, in_tags[0])):
        if t is None or in_tags[x] is not None or invals[w].ndim != 2:
            continue
        path, flipped = t
        axis = wc[0] if not flipped else 1 - wc[0]
        feats = jnp.moveaxis(invals[x], xc[0], -1)
        feats = feats.reshape(-1, feats.shape[-1]).astype(jnp.float32)
        gram, prev = feats.T @ feats, acc.get(path)
        if prev is None:
            acc[path] = (axis, gram, feats.shape[0])
        elif prev[0] == axis:
            acc[path] = (axis, prev[1] + gram, prev[2] + feats.shape[0])
        else:
            acc[path] = (-1, None, 0)  # contracted along both axes (a tied embedding and head): no RegMean solve
        return


def _batches(inputs: PyTree, batch_size: int):
    n = num_examples(inputs)
    for start in range(0, n, batch_size):
        yield jax.tree.map(lambda a: a[start:start + batch_size], inputs)


def _check(params, inputs, batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MergeInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_examples(inputs) == 0:
        raise MergeInputError("no inputs (0 examples)")
    if not jtree.flatten(params):
        raise MergeInputError("params has no array leaves")


def gram_matrices(params: PyTree, apply_fn: Callable, inputs: PyTree, *, batch_size: int = 32) -> Grams:
    """RegMean's Gram matrices of ``params`` on ``inputs`` (module docstring)."""
    _check(params, inputs, batch_size)
    paths = jtree.paths(params)
    compiled: dict[Any, tuple[Callable, dict]] = {}

    def jitted(info: dict) -> Callable:
        def run(p, x):
            closed = jax.make_jaxpr(apply_fn)(p, x)
            tags = [(path, False) for path in paths] + [None] * (len(closed.jaxpr.invars) - len(paths))
            acc: dict[str, tuple] = {}
            _interpret(closed.jaxpr, closed.consts, jax.tree.leaves((p, x)), tags, acc)
            info.update({k: (a, n) for k, (a, _, n) in acc.items()})  # static: filled while tracing
            return {k: g for k, (a, g, _) in acc.items() if a >= 0}

        return jax.jit(run)

    sums: dict[str, jax.Array] = {}
    rows: dict[str, int] = {}
    info: dict[str, tuple[int, int]] = {}
    for batch in _batches(inputs, batch_size):
        shape = tuple((np.shape(a), str(a.dtype)) for a in jax.tree.leaves(batch))
        if shape not in compiled:
            info = {}
            compiled[shape] = (jitted(info), info)
        fn, info = compiled[shape]
        for path, g in fn(params, batch).items():
            rows[path] = rows.get(path, 0) + info[path][1]
            sums[path] = g if path not in sums else sums[path] + g
    both = sorted(k for k, (a, _) in info.items() if a < 0)
    if both:
        logger.info("gram_matrices: %d parameter(s) are contracted along both axes (left to the average): %s",
                    len(both), ", ".join(both[:5]))
    matrices = {p: sums[p] / rows[p] for p in paths if p in sums}
    flat = jtree.flatten(params)
    untapped = tuple(p for p in paths if np.ndim(flat[p]) == 2 and p not in matrices)
    if untapped:
        logger.info("gram_matrices: %d 2-D parameter(s) are not used as a linear map RegMean can see: %s",
                    len(untapped), ", ".join(untapped[:5]))
    return Grams(matrices, tuple((p, info[p][0]) for p in matrices), tuple((p, rows[p]) for p in matrices), untapped)


def _log_probs(apply_fn, params, x, exact: bool):
    logits = apply_fn(params, x)
    if exact and logits.ndim != 2:
        raise MergeInputError(f"fisher_diagonal's exact estimator needs classifier logits (batch, classes), got shape "
                              f"{tuple(logits.shape)}; use estimator='batch' for per-position outputs")
    return jax.nn.log_softmax(logits.astype(jnp.float32))


def fisher_diagonal(params: PyTree, apply_fn: Callable, inputs: PyTree, *, batch_size: int = 8,
                    estimator: str = "exact", mask=None) -> PyTree:
    """The diagonal Fisher of ``params`` on ``inputs``, shaped like ``params`` (module docstring).

    ``estimator="batch"`` also takes per-position logits ``(B, T, C)`` (a language model's next
    tokens), with ``mask`` ``(N, T)`` marking the positions that count; the sum still divides by
    the ``N`` examples (FusionBench)."""
    _check(params, inputs, batch_size)
    if estimator not in ("exact", "batch"):
        raise MergeInputError(f"estimator must be 'exact' or 'batch', got {estimator!r}")
    if mask is not None and estimator == "exact":
        raise MergeInputError("a mask needs estimator='batch' (the exact estimator takes classifier logits)")
    n = num_examples(inputs)
    exact_mode = estimator == "exact"
    first = jax.tree.map(lambda a: a[:1], inputs)
    out = jax.eval_shape(lambda p, x: _log_probs(apply_fn, p, x, exact_mode), params, first)  # checks before any work
    if mask is not None and (np.shape(mask)[0] != n or tuple(np.shape(mask)[1:]) != tuple(out.shape[1:-1])):
        raise MergeInputError(f"mask has shape {np.shape(mask)}; the outputs need ({n}, {', '.join(map(str, out.shape[1:-1]))})")
    mask = np.ones((n,) + tuple(out.shape[1:-1]), np.float32) if mask is None else np.asarray(mask, np.float32)

    def exact(p, x, m):
        def one(xi):
            xi = jax.tree.map(lambda a: a[None], xi)
            probs = jnp.exp(_log_probs(apply_fn, p, xi, True))[0]

            def cls(c, acc):
                g = jax.grad(lambda q: _log_probs(apply_fn, q, xi, True)[0, c])(p)
                return jax.tree.map(lambda a, gi: a + probs[c] * jnp.square(gi.astype(jnp.float32)), acc, g)

            return jax.lax.fori_loop(0, probs.shape[0], cls, jtree.zeros_like(p))

        per = jax.lax.map(one, x)
        return jax.tree.map(lambda a: jnp.sum(a, 0), per)

    def batch(p, x, m):
        probs = jax.lax.stop_gradient(jnp.exp(_log_probs(apply_fn, p, x, False)))
        g = jax.grad(lambda q: jnp.sum(m[..., None] * jnp.sqrt(probs) * _log_probs(apply_fn, q, x, False)))(p)
        return jax.tree.map(lambda x: jnp.square(x.astype(jnp.float32)), g)

    step = jax.jit(exact if exact_mode else batch)
    total = None
    for b, m in _batches((inputs, mask), batch_size):
        f = step(params, b, m)
        total = f if total is None else jax.tree.map(jnp.add, total, f)
    return jax.tree.map(lambda a: a / n, total)
