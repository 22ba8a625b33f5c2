"""The method registry and the one entry point, :func:`merge`.

A method is a pure function ``fn(base, tvs, *, key, **hparams) -> merged`` over the
base pytree and the experts' float32 task vectors (so any pre-processing of task
vectors, such as LwPTV masks, composes with every method). Each registered method
declares its hyper-parameters with defaults, which of them are static (they fix array
sizes or code paths, so changing them recompiles), whether it needs a PRNG key, a check
run on the hyper-parameters before any heavy work, and its sparsifier
(:class:`jmerge.stages.Sparsifier`), whose thresholds :func:`merge` finds with
:func:`jmerge.thresholds.solve` before the jitted merge.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jmerge import coverage
from jmerge._util import did_you_mean, register_cache
from jmerge import thresholds
from jmerge import tree as jtree
from jmerge.tree import PyTree
from jmerge import validate


@dataclass(frozen=True)
class Mergekit:
    """How mergekit's YAML names a method and reads its parameters (mergekit 0.1.5,
    ``mergekit/merge_methods/``), for :mod:`jmerge.config.mergekit`, which maps any method
    from these facts alone.

    * ``name``: mergekit's ``merge_method``;
    * ``global_params``/``model_params``: the parameters mergekit reads, with its defaults
      (a model's value overrides the global one); ``weight`` maps to ``weights``, ``lambda``
      to ``scale``, any other to the hyper-parameter of that name if the method has it, one
      value per model if it is per-model, else one value for all;
    * ``fixed``: jmerge hyper-parameters that give mergekit's semantics (TIES' per-tensor trim);
    * ``passed``: global parameter -> hyper-parameter, typed like mergekit's default;
    * ``base``: ``"required"``, ``"optional"`` (task vectors with one, whole weights without:
      the ``space`` hyper-parameter), ``"none"`` (every listed model is merged) or
      ``"refused"`` (as ``"none"``, and a ``base_model`` is an error: passthrough's one input);
    * ``base_merged``: the base_model is merged as the first model (SLERP's ``t = 0``);
    * ``required``: global parameters without a default; ``models``: how many models besides
      the base it takes, if fixed;
    * ``only``: parameters jmerge supports at one value; ``below``: per-model values that
      must stay under a bound, with the reason;
    * ``in_dtype``: mergekit computes the method in its ``dtype`` (task vectors, products,
      sums and quotients each rounded to it), so :func:`merge` with ``compute_dtype`` rounds
      the same steps (:func:`jmerge.tree.rounding`); otherwise mergekit computes in float32
      from inputs rounded to ``dtype``, and so does :func:`merge`, in mergekit's order of
      operations (:func:`jmerge.tree.rounding` of float32).
    """

    name: str
    global_params: dict[str, Any] = field(default_factory=dict)
    model_params: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    passed: dict[str, str] = field(default_factory=dict)
    base: str = "required"
    base_merged: bool = False
    required: tuple[str, ...] = ()
    models: int | None = None
    only: dict[str, Any] = field(default_factory=dict)
    below: dict[str, tuple[float, str]] = field(default_factory=dict)
    in_dtype: bool = False

    def __post_init__(self):
        if self.base not in ("required", "optional", "none", "refused"):
            raise ValueError(f"mergekit {self.name!r}: base must be 'required', 'optional', 'none' or 'refused', "
                             f"got {self.base!r}")


# mergekit's generalized task arithmetic (generalized_task_arithmetic.py): its global parameters
MERGEKIT_GTA = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., PyTree]
    defaults: dict[str, Any]
    static: frozenset[str]
    needs_key: bool
    check: Callable[[int, dict[str, Any]], None]
    summary: str = field(default="")
    sparsify: Callable[[dict[str, Any]], Any] | None = None
    reference: str = ""
    per_model: frozenset[str] = frozenset()
    streamable: bool = True
    path_params: frozenset[str] = frozenset()
    # covers(path, shape, hparams, num_experts): whether the method's own rule merges that leaf
    # (False: a fallback, e.g. the SVD methods' mean); None: every leaf. Counted by jmerge.coverage.
    covers: Callable[[str, tuple[int, ...], dict[str, Any], int | None], bool] | None = None
    task_mask: bool = False  # fn takes task_mask (per leaf, which tasks enter it): LwPTV passes it
    mergekit: Mergekit | None = None

    def sparsifier(self, hparams: dict[str, Any]):
        """The method's :class:`jmerge.stages.Sparsifier` for resolved ``hparams``, or None."""
        return None if self.sparsify is None else self.sparsify(hparams)

    def resolve(self, num_experts: int, hparams: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, unknown names rejected (with the closest known one), values checked."""
        for name in hparams:
            if name not in self.defaults:
                hint = did_you_mean(name, self.defaults)
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


def _sparsified(fn: Callable, sparsify: Callable) -> Callable:
    """``fn`` on the task vectors its sparsifier keeps: ``answers`` (the sparsifier's query,
    solved before ``jit``) or, without them, a search on the task vectors themselves."""

    def run(base, tvs, *, key=None, answers=None, **hparams):
        tvs = jtree.rounded(tvs)  # mergekit sparsifies its task vectors in `dtype` (jmerge.tree.rounding)
        return fn(base, sparsify(hparams)(tvs, key, answers=answers), key=key, **hparams)

    return functools.update_wrapper(run, fn)  # fn's name, module and docstring; __wrapped__ for its signature


def register(
    name: str,
    *,
    static: Sequence[str] = (),
    needs_key: bool = False,
    check=_no_check,
    sparsify=None,
    reference: str = "",
    per_model: Sequence[str] = ("weights",),
    streamable: bool = True,
    path_params: Sequence[str] = (),
    covers=None,
    mergekit: Mergekit | None = None,
):
    """Decorator registering ``fn(base, tvs, *, key, **hparams)`` under ``name``.

    The hyper-parameters and defaults are read from ``fn``'s keyword-only arguments; the
    method's facts are declared here, and ``jmerge methods``, the YAML config and
    :mod:`jmerge.streaming` read them from the :class:`Method`:

    * ``reference``: the paper (authors, year, arXiv id);
    * ``per_model``: hyper-parameters that take one value per expert (a YAML model's
      ``parameters: {weight: ..., density: ...}``; ``weight`` maps to ``weights``), among
      those ``fn`` has; the others are global;
    * ``streamable``: the method works tensor by tensor, so ``jmerge run`` can stream it;
    * ``path_params``: hyper-parameters that look at parameter paths (a streamed merge then
      passes each tensor under its real name);
    * ``covers``: see :class:`Method` (counted by :mod:`jmerge.coverage`);
    * ``mergekit``: its name and parameters in mergekit's YAML (:class:`Mergekit`).

    ``sparsify(hparams) -> jmerge.stages.Sparsifier``, when given, maps the task vectors
    before ``fn`` sees them (TIES' trim, DARE's drop); :func:`merge` solves its query
    (thresholds) outside ``jit`` with the backend the inputs call for. A keyword-only
    ``task_mask`` argument of ``fn`` is no hyper-parameter: :mod:`jmerge.lwptv` passes it
    (``Method.task_mask``).
    """

    def deco(fn):
        params = inspect.signature(fn).parameters
        defaults = {
            k: p.default
            for k, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("key", "task_mask")
        }
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        full = fn if sparsify is None else _sparsified(fn, sparsify)
        unknown = sorted((set(per_model) | set(path_params)) - set(defaults) - {"weights"})
        if unknown:
            raise ValueError(f"method {name!r}: per_model/path_params name no hyper-parameter of it: {unknown}")
        _REGISTRY[name] = Method(
            # LwPTV's per-leaf task_mask is static: it sets how many matrices enter each SVD
            name, full, defaults, frozenset(static) | ({"task_mask"} & set(params)), needs_key, check, summary, sparsify, reference,
            frozenset(p for p in per_model if p in defaults), streamable, frozenset(path_params),
            covers, "task_mask" in params, mergekit,
        )
        return fn

    return deco


def available() -> list[str]:
    """Names of all registered merge methods."""
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    """The registered method ``name``; unknown names get the closest suggestion."""
    if name not in _REGISTRY:
        hint = did_you_mean(name, _REGISTRY)
        raise validate.MergeInputError(f"unknown merge method {name!r}{hint} (available: {', '.join(available())})")
    return _REGISTRY[name]


_JITTED: dict[tuple, Callable] = {}
register_cache(_JITTED.clear)


def static_names(method: Method, hparams: dict[str, Any]) -> tuple[str, ...]:
    """Hyper-parameters passed to ``jax.jit`` as static: the method's declared ones, plus any
    string or bool value (they select code paths and cannot be traced)."""
    return tuple(sorted(k for k, v in hparams.items() if k in method.static or isinstance(v, (str, bool))))


def _jitted(method: Method, static_names: tuple[str, ...], donate_base: bool = False, pre=None, post=None,
            rounding=None) -> Callable:
    """The jitted merge ``(base, experts, key, answers, extra, **hp)``: task vectors, ``pre(tvs,
    extra)``, the method, ``post(merged, base, extra)`` (LwPTV's prune and keep_base); traced
    under :func:`jmerge.tree.rounding` of ``rounding`` (None: jmerge's own float32 arithmetic)."""
    cache_key = (method.name, method.fn, static_names, donate_base, pre, post, rounding)
    if cache_key not in _JITTED:

        def run(base, experts, key, answers=None, extra=None, **hp):
            with jtree.rounding(rounding):
                tvs = jtree.task_vectors(base, experts)
                if pre is not None:
                    tvs = pre(tvs, extra)
                solved = {} if method.sparsify is None else {"answers": answers}
                out = method.fn(base, tvs, key=key, **solved, **hp)
                return out if post is None else post(out, base, extra)

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
    answers=None,
    compute_dtype=None,
    **hparams,
) -> PyTree:
    """Merges fine-tuned ``experts`` of ``base`` into one pytree shaped like ``base``.

    Args:
      base: the pre-trained parameters (any pytree of float arrays).
      experts: fine-tuned parameters with the base's structure, shapes and dtypes.
      method: a name from :func:`available`.
      key: ``jax.random.key`` for stochastic methods (DARE, DELLA).
      check_finite: refuse inputs holding NaN or infinities (one extra read of the inputs),
        and raise :class:`jmerge.MergeOutputError` (naming the method and the parameter) if
        the merge of those finite inputs holds NaN or infinities (one read of the output),
        e.g. where an SVD did not converge. False returns whatever the method computed.
      lwptv: layer-wise pruning of the task vectors before the method, a
        ``jmerge.lwptv.LwPTV`` config or an explicit ``jmerge.lwptv.LayerMask``; layers no
        task keeps hold the base weights exactly (see :mod:`jmerge.lwptv`).
      donate_base: let the merge reuse ``base``'s buffers for its output (``base`` must not
        be used afterwards). Skips allocating the output, which on CPU costs as much as
        reading the inputs (bench/merge_bench.py).
      answers: the method's thresholds when already known (``jmerge.thresholds.solve`` of its
        sparsifier's query: a streamed merge finds global ones over the checkpoints first).
      compute_dtype: mergekit's low-precision arithmetic (e.g. ``"bfloat16"``, its ``dtype``):
        every input is cast to it first, and a method mergekit computes in that dtype
        (``Mergekit.in_dtype``: the task-arithmetic family, Model Stock) rounds each step as
        torch does on CPU (:func:`jmerge.tree.rounding`); the others compute in float32 from
        the cast inputs, as mergekit does, in mergekit's order of operations (``linear``'s fused
        multiply-adds, ``slerp``'s separately rounded products). The output is in ``compute_dtype``.
        None: jmerge's float32 arithmetic on the inputs as given.
      **hparams: the method's hyper-parameters; see ``jmerge.methods.get(name).defaults``.

    All input checks (structure, shapes, dtypes, hyper-parameters, key, finiteness) run before the
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
    rounding = None
    if compute_dtype is not None:
        compute_dtype = jnp.dtype(compute_dtype)
        if not jnp.issubdtype(compute_dtype, jnp.floating):
            raise validate.MergeInputError(f"compute_dtype must be a float dtype, got {compute_dtype}")
        base, experts = jax.tree.map(lambda x: x.astype(compute_dtype), (base, list(experts)))
        if m.mergekit is not None:  # mergekit's arithmetic: in `dtype`, or in float32 from the cast inputs
            rounding = compute_dtype if m.mergekit.in_dtype else jnp.dtype(jnp.float32)
    if m.needs_key and key is None:
        raise validate.MergeInputError(f"method {method!r} is stochastic: pass key=jax.random.key(seed)")
    if check_finite:
        validate.check_all_finite(base, experts)
    experts = list(experts)
    coverage.report(coverage.of(m, base, hp, len(experts)))
    pre = post = extra = None
    measured = experts  # what the sparsifier's thresholds are measured on
    if lwptv is not None:
        from jmerge.lwptv.stage import stage  # lazy: the registry loads without lwptv

        pre, post, extra, measured, leaf_tasks = stage(base, experts, lwptv)
        if m.task_mask and leaf_tasks is not None:
            hp = {**hp, "task_mask": leaf_tasks}
    sparsifier = m.sparsifier(hp)
    if answers is None and sparsifier is not None and sparsifier.query is not None:
        against = base
        if rounding is not None:  # measured on the task vectors the method sees: rounded (ties and all)
            measured, against = jtree.rounded_task_vectors(base, measured, rounding), None
        answers = thresholds.solve(sparsifier.query, measured, against)
    static = static_names(m, hp)
    shardings = [x.sharding if isinstance(x, jax.Array) else None for x in jax.tree.leaves(base)]
    out = _jitted(m, static, donate_base, pre, post, rounding)(base, experts, key, answers, extra, **hp)
    if check_finite and validate.concrete(out):  # traced under jit: nothing to check yet
        validate.check_output_finite(out, method)
    return _placed_like(out, shardings)
