"""The optax loop that learns merge coefficients: DivMerge and AdaMerging on one engine.

    Γ* = argmin_Γ  Σ_t  E_{x ∈ X_t} D( expert_t(·|x) , merged_Γ(·|x) )     (DivMerge Eq. 4)
    Γ* = argmin_Γ  Σ_t  E_{x ∈ X_t} H( merged_Γ(·|x) )                     (AdaMerging)

with ``merged_Γ = θ0 + Σ_t Γ_t^l τ_t`` (:mod:`jmerge.learn.coefficients`). Every step takes
``batch_per_task`` inputs of each task (DivMerge: 4 per task, batch 4 × #tasks); task
``t``'s loss uses only its own inputs, targets and apply function (head). The whole step
(merge, K forwards, backward, optimizer update, projection) is one ``jax.jit``; the loop
is a Python loop over that step with a progress bar, or one ``lax.scan`` when
``progress=False``. Both give the same coefficients. Memory: base and the K task vectors
(inputs), plus the merged parameters, one task's parameter gradient, a float32 gradient
accumulator and one task's activations (tasks run one after another inside the step); use
``jax.checkpoint`` inside ``apply_fn`` (e.g. per block) to cut activations further.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmerge._util import progress_bar, register_cache
from jmerge import tree as jtree
from jmerge.tree import PyTree
from jmerge import validate
from jmerge.layers import LayerGrouping, LayerRule
from jmerge.learn import coefficients as coef
from jmerge.learn import objectives as obj
from jmerge.learn.targets import TaskTargets, classifier_targets, clear_memory, num_examples, per_task
from jmerge.validate import MergeInputError

DEFAULT_OPTIMIZER = optax.adam(1e-2)  # DivMerge App. D.2; one object, so compilations are reused
ADAMERGING_OPTIMIZER = optax.adam(1e-3)


@dataclass(frozen=True)
class LearnResult:
    """``coefficients``: ``(K,)`` (task level) or ``(K, L)`` with ``layer_names``; ``params``:
    the merged parameters at those coefficients; ``losses``: the loss of every step (at the
    coefficients before its update) and ``task_losses`` its per-task terms ``(steps, K)``."""

    coefficients: np.ndarray
    layer_names: tuple[str, ...] | None
    params: PyTree
    losses: np.ndarray
    task_losses: np.ndarray
    objective: str
    granularity: str
    steps_per_epoch: int


class NonFiniteLossError(FloatingPointError):
    """The loss or the updated coefficients became NaN/inf at ``step``; ``coefficients`` are
    the last finite ones (never returned as a result)."""

    def __init__(self, message: str, step: int, coefficients: np.ndarray):
        super().__init__(message)
        self.step = step
        self.coefficients = coefficients


# ---------------------------------------------------------------------------- validation
def _check_task_vectors(base: PyTree, tvs) -> None:
    if not isinstance(tvs, (list, tuple)) or len(tvs) == 0:
        raise MergeInputError("tvs must be a non-empty list of task-vector pytrees (one per task)")
    base_flat = jtree.flatten(base)
    if not base_flat:
        raise MergeInputError("base has no array leaves")
    for path, b in base_flat.items():
        if not jnp.issubdtype(b.dtype, jnp.floating):
            raise MergeInputError(f"parameter {path!r} has non-float dtype {b.dtype}")
    for t, tv in enumerate(tvs):
        flat = jtree.flatten(tv)
        missing = [p for p in base_flat if p not in flat]
        extra = [p for p in flat if p not in base_flat]
        if missing or extra or jax.tree.structure(tv) != jax.tree.structure(base):
            raise MergeInputError(f"task vector {t} does not match the base's parameters: missing {missing[:5]}, unexpected {extra[:5]}")
        for path, b in base_flat.items():
            if tuple(flat[path].shape) != tuple(b.shape):
                raise MergeInputError(f"parameter {path!r}: task vector {t} has shape {tuple(flat[path].shape)}, base {tuple(b.shape)}")
    validate.check_finite_tree(base, "base")
    for t, tv in enumerate(tvs):
        validate.check_finite_tree(tv, f"task vector {t}")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise MergeInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _task_data(num_tasks: int, unlabeled, targets, needs_targets: bool) -> list[TaskTargets]:
    """One :class:`TaskTargets` per task (log-probs still ``None`` when they are to be computed)."""
    if targets is None:
        if unlabeled is None or not isinstance(unlabeled, (list, tuple)):
            raise MergeInputError("unlabeled must be a list with one array (or pytree) of inputs per task")
        if len(unlabeled) != num_tasks:
            raise MergeInputError(f"{len(unlabeled)} unlabelled data sets for {num_tasks} task vectors")
        data = []
        for t, xs in enumerate(unlabeled):
            if xs is None or not jax.tree.leaves(xs):
                raise MergeInputError(f"task {t} has no unlabelled inputs")
            data.append(TaskTargets(xs))
    else:
        if not isinstance(targets, (list, tuple)) or len(targets) != num_tasks:
            n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise MergeInputError(f"targets must be a list with one entry per task: got {n} for {num_tasks} task vectors")
        kinds = {isinstance(d, TaskTargets) for d in targets}
        if len(kinds) > 1:
            raise MergeInputError("targets mix TaskTargets and plain arrays: give one kind for every task")
        if kinds == {True}:
            if unlabeled is not None:
                raise MergeInputError("targets already hold each task's inputs: pass unlabeled=None")
            data = list(targets)
        else:
            if unlabeled is None or len(unlabeled) != num_tasks:
                raise MergeInputError("targets given as arrays need unlabeled: one input set per task, aligned with them")
            data = [TaskTargets(xs, lp) for xs, lp in zip(unlabeled, targets)]
    for t, d in enumerate(data):
        try:
            n = num_examples(d.inputs)
        except MergeInputError as e:
            raise MergeInputError(f"task {t}: {e}") from None
        if n == 0:
            raise MergeInputError(f"task {t} has no unlabelled inputs (0 examples)")
        for name, arr in (("targets", d.log_probs), ("mask", d.mask)):
            if arr is not None and np.shape(arr)[0] != n:
                raise MergeInputError(f"task {t}: {name} cover {np.shape(arr)[0]} examples, the inputs {n}")
        if not needs_targets:
            data[t] = dataclasses.replace(d, log_probs=None)
    return data


def _check_shapes(fns: Sequence[Callable], base: PyTree, data: Sequence[TaskTargets], batch: int) -> None:
    """One ``jax.eval_shape`` per task: the apply function accepts a batch and its logits line
    up with the targets."""
    for t, (fn, d) in enumerate(zip(fns, data)):
        b = min(batch, d.num_examples)
        spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct((b,) + tuple(np.shape(a)[1:]), a.dtype), d.inputs)
        try:
            out = jax.eval_shape(fn, base, spec)
        except Exception as e:
            raise MergeInputError(f"task {t}: apply_fn failed on a batch of {b} of its unlabelled inputs: {type(e).__name__}: {e}") from e
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise MergeInputError(f"task {t}: apply_fn must return one logits array, got {type(out).__name__} (e.g. return outputs.logits)")
        shape = tuple(out.shape)
        if len(shape) < 2 or shape[0] != b:
            raise MergeInputError(f"task {t}: apply_fn returned shape {shape} for a batch of {b}; expected (batch, ..., classes)")
        if d.logits_slice is not None:
            start, stop = d.logits_slice
            if len(shape) < 3 or shape[1] < stop:
                raise MergeInputError(f"task {t}: logits of shape {shape} have no positions {start}..{stop - 1} on axis 1")
            shape = (b, stop - start) + shape[2:]
        if d.log_probs is not None and tuple(np.shape(d.log_probs)[1:]) != shape[1:]:
            raise MergeInputError(
                f"task {t}: apply_fn gives logits of shape {shape[1:]} per example but the targets have {tuple(np.shape(d.log_probs)[1:])}"
            )
        if d.mask is not None and tuple(np.shape(d.mask)[1:]) != shape[1:-1]:
            raise MergeInputError(f"task {t}: mask has shape {tuple(np.shape(d.mask)[1:])} per example, the logits {shape[1:-1]} positions")


def _check_finite_targets(data: Sequence[TaskTargets]) -> None:
    for t, d in enumerate(data):
        if d.log_probs is not None and np.any(np.isnan(np.asarray(d.log_probs))):
            raise MergeInputError(f"task {t}: the expert's targets hold NaN (check the expert and its inputs)")


# ---------------------------------------------------------------------------- schedule and step
def batch_schedule(key: jax.Array, sizes: Sequence[int], batch_per_task: int, epochs: int) -> np.ndarray:
    """Example indices ``(steps, K, batch_per_task)``: task ``t`` walks through fresh
    permutations of its ``sizes[t]`` examples (a numpy generator seeded with the bits of
    ``fold_in(key, t)``); an epoch is ``ceil(max(sizes) / batch_per_task)`` steps, so
    smaller tasks are revisited within one."""
    steps_per_epoch = -(-max(sizes) // batch_per_task)
    need = epochs * steps_per_epoch * batch_per_task
    cols = []
    for t, n in enumerate(sizes):
        rng = np.random.default_rng(np.asarray(jax.random.key_data(jax.random.fold_in(key, t))).ravel())
        perms = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
        cols.append(perms.reshape(-1, batch_per_task))
    return np.stack(cols, 1).astype(np.int32)


def _value_and_grad_fn(fns, lay, objective_fn):
    """``(coeffs, base, tvs, data, idx) -> ((loss, per-task losses), dloss/dΓ)``.

    θ(Γ) is built once; the tasks then run one after another in a ``fori_loop`` (a
    ``lax.switch`` picks task ``t``'s apply function and data), each adding its parameter
    gradient ``∂L_t/∂θ`` to one float32 accumulator, so only one task's activations and
    gradient are alive at a time (an unrolled sum let XLA keep all K gradients, measured in
    ``bench/learn_bench.py``). Finally ``dL/dΓ_t^l = Σ_{p ∈ l} ⟨∂L/∂θ_p, τ_t^p⟩``
    (:func:`jmerge.learn.coefficients.coefficient_grad`).
    """

    def task_loss(t, params, data, idx):
        d = data[t]
        take = lambda a: jnp.take(a, idx[t], axis=0)
        logits = fns[t](params, jax.tree.map(take, d.inputs))
        if d.logits_slice is not None:
            logits = logits[:, d.logits_slice[0] : d.logits_slice[1]]
        log_q = jax.nn.log_softmax(logits.astype(jnp.float32))
        log_p = None if d.log_probs is None else take(d.log_probs)
        return obj.masked_mean(objective_fn(log_p, log_q), None if d.mask is None else take(d.mask))

    branches = [jax.value_and_grad(functools.partial(task_loss, t)) for t in range(len(fns))]

    def value_and_grad(coeffs, base, tvs, data, idx):
        params = coef.merged_params(base, tvs, coeffs, lay)

        def body(t, carry):
            acc, losses = carry
            loss, grad = jax.lax.switch(t, branches, params, data, idx)
            acc = jax.tree.map(lambda a, g: a + g.astype(jtree.ACCUM_DTYPE), acc, grad)
            return acc, losses.at[t].set(loss)

        init = (jtree.zeros_like(params), jnp.zeros((len(fns),), jnp.float32))
        grad_params, losses = jax.lax.fori_loop(0, len(fns), body, init)
        return (jnp.sum(losses), losses), coef.coefficient_grad(grad_params, tvs, lay)

    return value_and_grad


def _step_fn(value_and_grad, optimizer: optax.GradientTransformation, constraint):
    def step(coeffs, opt_state, base, tvs, data, idx):
        (loss, per_task_loss), grad = value_and_grad(coeffs, base, tvs, data, idx)
        updates, new_state = optimizer.update(grad, opt_state, coeffs)
        new = coef.project(optax.apply_updates(coeffs, updates), constraint)
        ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(new))
        keep = lambda n, o: jnp.where(ok, n, o)
        return keep(new, coeffs), jax.tree.map(keep, new_state, opt_state), loss, per_task_loss, ok

    return step


def _scan_fn(step, num_tasks: int, merge):
    """All steps in one ``lax.scan`` (after a non-finite step the rest are skipped with
    ``lax.cond``), then the merged parameters."""

    def run(coeffs, opt_state, base, tvs, data, schedule):
        def body(carry, idx):
            coeffs, opt_state, failed = carry

            def live(_):
                c, s, loss, per, ok = step(coeffs, opt_state, base, tvs, data, idx)
                return (c, s, ~ok), (loss, per, ok)

            def dead(_):
                nan = jnp.float32(jnp.nan)
                return (coeffs, opt_state, failed), (nan, jnp.full((num_tasks,), nan), jnp.bool_(False))

            return jax.lax.cond(failed, dead, live, None)

        (coeffs, opt_state, _), history = jax.lax.scan(body, (coeffs, opt_state, jnp.bool_(False)), schedule)
        return coeffs, history, merge(base, tvs, coeffs)

    return run


@functools.lru_cache(maxsize=8)
def _compiled(fns: tuple, lay: coef.CoefficientLayout, objective: str, optimizer, constraint):
    """The jitted step, scan and merge, reused by calls with the same functions and settings
    (``clear_cache`` empties this)."""
    step = _step_fn(_value_and_grad_fn(list(fns), lay, obj.get_objective(objective)), optimizer, constraint)
    merge = lambda b, ts, c: coef.merged_params(b, ts, c, lay)
    return jax.jit(step), jax.jit(_scan_fn(step, len(fns), merge)), jax.jit(merge)


register_cache(_compiled.cache_clear)


def clear_cache() -> None:
    """Empties the in-memory caches: computed targets and compiled steps (disk files stay)."""
    clear_memory()
    _compiled.cache_clear()


def _get_compiled(*args):
    try:
        return _compiled(*args)
    except TypeError:  # an unhashable optimizer or apply function
        return _compiled.__wrapped__(*args)


def _raise_non_finite(step: int, steps_per_epoch: int, loss, per_task_loss, coeffs) -> None:
    where = f"step {step} (epoch {step // steps_per_epoch + 1}, batch {step % steps_per_epoch + 1} of {steps_per_epoch})"
    if np.isfinite(loss):
        cause = "the optimizer update made the coefficients non-finite (non-finite gradient)"
    else:
        cause = f"the loss is {float(loss)} (per-task terms {np.round(np.asarray(per_task_loss), 6).tolist()})"
    raise NonFiniteLossError(
        f"stopped at {where}: {cause}; lower the learning rate or check the models and inputs. "
        "The last finite coefficients are in this error's .coefficients",
        step,
        np.asarray(coeffs),
    )


def _as_device(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), tree)


# ---------------------------------------------------------------------------- entry points
def fit_coefficients(
    base: PyTree,
    tvs: Sequence[PyTree],
    apply_fn: Callable | Sequence[Callable],
    unlabeled: Sequence[PyTree] | None = None,
    *,
    objective: str = "js",
    granularity: str = "task",
    layers: LayerRule | LayerGrouping = None,
    optimizer: optax.GradientTransformation | None = None,
    epochs: int = 4,
    batch_per_task: int = 4,
    init: Any = None,
    constraint: str | None = None,
    targets: Sequence[TaskTargets] | Sequence[Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    key: jax.Array | int | None = None,
    progress: bool = True,
) -> LearnResult:
    """Learns task-arithmetic coefficients Γ on unlabelled data (DivMerge / AdaMerging).

    Args:
      base: pre-trained parameters θ0 (any pytree of float arrays, possibly sharded).
      tvs: one float32 task vector per task, possibly pre-processed (TIES-trimmed,
        DARE-dropped, LwPTV-masked): Γ scales whatever they hold.
      apply_fn: ``apply_fn(params, batch) -> logits (batch, ..., classes)``, or a list with one
        per task (task-specific heads); task ``t``'s loss calls only its own.
      unlabeled: one input array/pytree per task (leading axis = examples); ``None`` when
        ``targets`` are :class:`TaskTargets` (which carry the inputs).
      objective: ``"js"`` (DivMerge default), ``"kl"`` (KL(expert‖merged)), ``"reverse_kl"``
        or ``"entropy"`` (AdaMerging, needs no targets).
      granularity: ``"task"``, ``"layer"`` (with the ``layers`` rule of
        :func:`jmerge.layers.group_layers` or a grouping) or ``"tensor"``.
      optimizer: an optax transformation (default ``optax.adam(1e-2)``, DivMerge App. D.2).
      epochs, batch_per_task: passes over the largest task's data; inputs per task per step.
      init: ``None`` (1/K, DivMerge Alg. 1), a scalar (0.5: DivMerge Table 9; 0.3: AdaMerging),
        one per task, or the full coefficient shape. Projected onto ``constraint``.
      constraint: ``None`` (unconstrained, DivMerge), ``"clip01"`` (AdaMerging) or
        ``"simplex"`` (per layer, over tasks); applied after every update.
      targets: ``None`` to compute each expert ``θ0 + τ_t``'s log-probs on its task's inputs
        (classifiers), or precomputed: :func:`classifier_targets` / :func:`lm_targets`
        results, or one ``(N_t, ..., C)`` log-prob array per task aligned with ``unlabeled``.
        Compute them from the unprocessed task vectors when ``tvs`` are pre-processed.
      cache_dir: where computed targets are cached on disk (they are always cached in memory).
      key: PRNG key (or int seed) fixing the batch order; default ``jax.random.key(0)``.
      progress: a rich progress bar over a jitted step; ``False`` runs one ``lax.scan``.

    Returns:
      A :class:`LearnResult`. Raises :class:`NonFiniteLossError` naming the step when the
      loss or the coefficients stop being finite.
    """
    obj.get_objective(objective)
    needs_targets = objective in obj.NEEDS_TARGETS
    coef.check_constraint(constraint)
    _check_task_vectors(base, tvs)
    num_tasks = len(tvs)
    lay = coef.layout(base, num_tasks, granularity, layers)
    epochs = _check_positive_int("epochs", epochs)
    batch_per_task = _check_positive_int("batch_per_task", batch_per_task)
    fns = per_task(apply_fn, num_tasks)
    data = _task_data(num_tasks, unlabeled, targets, needs_targets)
    if needs_targets and targets is not None and any(d.log_probs is None for d in data):
        raise MergeInputError(f"objective {objective!r} needs expert targets, and some TaskTargets have none")
    _check_shapes(fns, base, data, batch_per_task)
    coeffs = coef.project(coef.initial(lay, init), constraint)
    optimizer = DEFAULT_OPTIMIZER if optimizer is None else optimizer
    key = jax.random.key(0) if key is None else (jax.random.key(key) if isinstance(key, (int, np.integer)) else key)

    if needs_targets and targets is None:
        data = classifier_targets(base, tvs, fns, [d.inputs for d in data], cache_dir=cache_dir)
    _check_finite_targets(data)

    sizes = [d.num_examples for d in data]
    schedule = batch_schedule(key, sizes, batch_per_task, epochs)
    steps_per_epoch = len(schedule) // epochs
    base, tvs, data = _as_device(base), _as_device(list(tvs)), _as_device(data)
    jstep, jscan, jmerge_params = _get_compiled(tuple(fns), lay, objective, optimizer, constraint)
    opt_state = optimizer.init(coeffs)

    if progress:
        losses, task_losses = [], []
        bar = progress_bar(transient=False, loss=True)
        task = bar.add_task(f"{objective} {granularity}-level, {num_tasks} tasks", total=len(schedule), loss=float("nan"))
        with bar:
            for s, idx in enumerate(schedule):
                new, opt_state, loss, per, ok = jstep(coeffs, opt_state, base, tvs, data, idx)
                if not bool(ok):
                    _raise_non_finite(s, steps_per_epoch, loss, per, coeffs)
                coeffs = new
                losses.append(float(loss))
                task_losses.append(np.asarray(per))
                bar.update(task, advance=1, loss=losses[-1])
        losses, task_losses = np.asarray(losses, np.float32), np.stack(task_losses)
        params = jmerge_params(base, tvs, coeffs)
    else:
        coeffs, (losses, task_losses, oks), params = jscan(coeffs, opt_state, base, tvs, data, schedule)
        oks = np.asarray(oks)
        if not oks.all():
            s = int(np.argmin(oks))
            _raise_non_finite(s, steps_per_epoch, losses[s], task_losses[s], coeffs)
        losses, task_losses = np.asarray(losses), np.asarray(task_losses)
    return LearnResult(np.asarray(coeffs), lay.layer_names, params, losses, task_losses, objective, granularity, steps_per_epoch)


def divmerge(base, tvs, apply_fn, unlabeled=None, **kwargs) -> LearnResult:
    """DivMerge (arXiv 2509.02108): JS objective, Adam lr 1e-2, 4 epochs, 4 inputs per task
    per step, init 1/K, unconstrained (the paper's defaults). Keyword arguments override."""
    kwargs = {"objective": "js", "optimizer": DEFAULT_OPTIMIZER, "epochs": 4, "batch_per_task": 4, **kwargs}
    return fit_coefficients(base, tvs, apply_fn, unlabeled, **kwargs)


def adamerging(base, tvs, apply_fn, unlabeled, **kwargs) -> LearnResult:
    """AdaMerging (arXiv 2310.02575): entropy of the merged model's predictions, init 0.3,
    coefficients clipped to [0, 1], Adam lr 1e-3, per-tensor coefficients for "layer-wise"
    (``granularity="tensor"``), 5 epochs (DivMerge Table 9's classification setting; the
    official code runs 500 steps of 16 inputs per task). Keyword arguments override."""
    kwargs = {
        "objective": "entropy",
        "init": 0.3,
        "constraint": "clip01",
        "optimizer": ADAMERGING_OPTIMIZER,
        "epochs": 5,
        "batch_per_task": 4,
        **kwargs,
    }
    return fit_coefficients(base, tvs, apply_fn, unlabeled, **kwargs)
