"""The method registry and the one entry point, :func:`merge`.

A method is a pure function ``fn(base, tvs, *, key, **hparams) -> merged`` over the
base pytree and the experts' float32 task vectors (so any pre-processing of task
vectors, such as LwPTV masks, composes with every method). Each registered method
declares its hyper-parameters with defaults, which of them are static (they fix array
sizes or code paths, so changing them recompiles), whether it needs a PRNG key, and a
check run on the hyper-parameters before any heavy work.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax

from jmerge import coverage
from jmerge import tree as jtree
from jmerge import validate

PyTree = jtree.PyTree


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., PyTree]
    defaults: dict[str, Any]
    static: frozenset[str]
    needs_key: bool
    check: Callable[[int, dict[str, Any]], None]
    summary: str = field(default="")
    prepare: Callable[..., dict[str, Any]] | None = None
    # covers(path, shape, hparams, num_experts): whether the method's own rule merges that leaf
    # (False: a fallback, e.g. the SVD methods' mean); None: every leaf. Counted by jmerge.coverage.
    covers: Callable[[str, tuple[int, ...], dict[str, Any], int | None], bool] | None = None
    task_mask: bool = False  # fn takes task_mask (per leaf, which tasks enter it): LwPTV passes it

    def resolve(self, num_experts: int, hparams: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, unknown names rejected (with the closest known one), values checked."""
        for name in hparams:
            if name not in self.defaults:
                close = difflib.get_close_matches(name, list(self.defaults), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                known = ", ".join(sorted(self.defaults)) or "none"
                raise validate.MergeInputError(
                    f"method {self.name!r} has no hyper-parameter {name!r}{hint} (known: {known})"
                )
        resolved = {**self.defaults, **hparams}
        resolved = {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()}
        self.check(num_experts, resolved)
        return resolved


_REGISTRY: dict[str, Method] = {}


def _no_check(num_experts: int, hparams: dict[str, Any]) -> None:
    del num_experts, hparams


def register(
    name: str, *, static: Sequence[str] = (), needs_key: bool = False, check=_no_check, prepare=None, covers=None
):
    """Decorator registering ``fn(base, tvs, *, key, **hparams)`` under ``name``.

    The hyper-parameters and defaults are read from ``fn``'s keyword-only arguments.
    ``prepare(base, experts, hparams) -> hparams``, when given, runs eagerly in :func:`merge`
    before the jitted merge (with ``lwptv``, on the pruned experts), to compute outside
    ``jit`` what is faster there: TIES and Breadcrumbs thresholds by collectives on a mesh,
    or by numpy on the host CPU. ``covers``: see :class:`Method`. A keyword-only ``task_mask``
    argument of ``fn`` is no hyper-parameter: :mod:`jmerge.lwptv` passes it (``Method.task_mask``).
    """

    def deco(fn):
        params = inspect.signature(fn).parameters
        defaults = {
            k: p.default
            for k, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("key", "task_mask")
        }
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = Method(
            name, fn, defaults, frozenset(static), needs_key, check, summary, prepare, covers, "task_mask" in params
        )
        return fn

    return deco


def available() -> list[str]:
    """Names of all registered merge methods."""
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    """The registered method ``name``; unknown names get the closest suggestion."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise validate.MergeInputError(f"unknown merge method {name!r}{hint} (available: {', '.join(available())})")
    return _REGISTRY[name]


_JITTED: dict[tuple, Callable] = {}


def static_names(method: Method, hparams: dict[str, Any]) -> tuple[str, ...]:
    """Hyper-parameters passed to ``jax.jit`` as static: the method's declared ones, plus any
    string or bool value (they select code paths and cannot be traced)."""
    return tuple(sorted(k for k, v in hparams.items() if k in method.static or isinstance(v, (str, bool))))


def _jitted(method: Method, static_names: tuple[str, ...], donate_base: bool = False) -> Callable:
    cache_key = (method.name, method.fn, static_names, donate_base)
    if cache_key not in _JITTED:

        def run(base, experts, key, **hp):
            tvs = jtree.task_vectors(base, experts)
            return method.fn(base, tvs, key=key, **hp)

        _JITTED[cache_key] = jax.jit(run, static_argnames=static_names, donate_argnums=(0,) if donate_base else ())
    return _JITTED[cache_key]


def _placed_like(out: PyTree, shardings: list) -> PyTree:
    """Puts each output leaf on its base leaf's sharding where XLA chose another one."""
    leaves, treedef = jax.tree.flatten(out)
    placed = [
        x if s is None or x.sharding.is_equivalent_to(s, x.ndim) else jax.device_put(x, s)
        for x, s in zip(leaves, shardings)
    ]
    return jax.tree.unflatten(treedef, placed)


def merge_task_vectors(
    base: PyTree, tvs: Sequence[PyTree], method: str, *, key: jax.Array | None = None, **hparams
) -> PyTree:
    """Runs ``method`` on already computed (e.g. pre-processed) task vectors, under the caller's jit."""
    m = get(method)
    hp = m.resolve(len(tvs), hparams)
    return m.fn(base, list(tvs), key=key, **hp)


def merge(
    base: PyTree,
    experts: Sequence[PyTree],
    method: str = "task_arithmetic",
    *,
    key: jax.Array | None = None,
    check_finite: bool = True,
    lwptv=None,
    donate_base: bool = False,
    **hparams,
) -> PyTree:
    """Merges fine-tuned ``experts`` of ``base`` into one pytree shaped like ``base``.

    Args:
      base: the pre-trained parameters (any pytree of float arrays).
      experts: fine-tuned parameters with the base's structure, shapes and dtypes.
      method: a name from :func:`available`.
      key: ``jax.random.key`` for stochastic methods (DARE, DELLA).
      check_finite: refuse inputs holding NaN or infinities (one extra read of the inputs).
      lwptv: layer-wise pruning of the task vectors before the method, a
        ``jmerge.lwptv.LwPTV`` config or an explicit ``jmerge.lwptv.LayerMask``; layers no
        task keeps hold the base weights exactly (see :mod:`jmerge.lwptv`).
      donate_base: let the merge reuse ``base``'s buffers for its output (``base`` must not
        be used afterwards). Skips allocating the output, which on CPU costs as much as
        reading the inputs (bench/merge_bench.py).
      **hparams: the method's hyper-parameters; see ``jmerge.methods.get(name).defaults``.

    All checks (structure, shapes, dtypes, hyper-parameters, key, finiteness) run before the
    merge is compiled, and errors name the offending parameter or hyper-parameter. Then the
    fraction of parameters the method's own rule merges is logged, with a ``CoverageWarning``
    under half (:mod:`jmerge.coverage`).

    Returns:
      The merged parameters, with each leaf in the base leaf's dtype and on the base leaf's
      sharding (the merge is one ``jax.jit``).
    """
    m = get(method)
    validate.check_models(base, experts, check_finite=False)  # structure, shapes, dtypes
    hp = m.resolve(len(experts), hparams)
    if m.needs_key and key is None:
        raise validate.MergeInputError(f"method {method!r} is stochastic: pass key=jax.random.key(seed)")
    if check_finite:
        validate.check_all_finite(base, experts)
    coverage.report(coverage.of(m, base, hp, len(experts)))
    if m.prepare is not None and lwptv is None:  # with lwptv, on the pruned task vectors (merge_with_lwptv)
        hp = m.prepare(base, list(experts), hp)
    static = static_names(m, hp)
    shardings = [x.sharding if isinstance(x, jax.Array) else None for x in jax.tree.leaves(base)]
    if lwptv is not None:
        from jmerge.lwptv.stage import merge_with_lwptv  # lazy: the registry loads without lwptv

        out = merge_with_lwptv(m, base, experts, key, static, hp, lwptv, plain=_jitted(m, static, donate_base))
    else:
        out = _jitted(m, static, donate_base)(base, list(experts), key, **hp)
    return _placed_like(out, shardings)
