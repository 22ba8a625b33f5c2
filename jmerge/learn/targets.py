"""Expert targets for learned coefficients, computed once and cached.

A task's training data is a :class:`TaskTargets`: its unlabelled inputs, the expert's
log-probabilities on them, and (for language models) a mask and the slice of the merged
model's logits aligned with the targets.

* Classifiers (:func:`classifier_targets`): ``log softmax(apply_fn_t(θ0 + τ_t, x))`` for the
  inputs ``x`` of task ``t`` only (DivMerge Eq. 4 compares expert ``t`` on ``X_t``), with
  task ``t``'s own apply function when tasks have separate heads.
* Causal LMs (:func:`lm_targets`, DivMerge App. B.1): greedy generation by the expert until
  EOS or ``max_new_tokens``, keeping the expert's distribution at every generated position
  and a mask of the positions up to and including EOS; the merged model later sees
  ``prompt + generation`` in one teacher-forced forward.

Targets are cached in memory (until :func:`jmerge.learn.clear_cache`) and, with
``cache_dir``, on disk as ``targets-<hash>.npz`` (written to a temporary file, then
renamed). The hash covers the base and task-vector (or expert) values, the inputs, the
generation settings, the apply function's qualified name and the values it captured
(closure cells, defaults, ``functools.partial`` arguments; arrays by value) and
``cache_tag``. It cannot see globals an apply function reads: pass a distinct ``cache_tag``
when two apply functions differ only there.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge._util import atomic_write
from jmerge._util import register_cache
from jmerge import tree as jtree
from jmerge.tree import PyTree
from jmerge.validate import MergeInputError

_FORMAT = "jmerge-targets-v1"
_MEMORY: dict[str, dict[str, np.ndarray]] = {}
register_cache(_MEMORY.clear)


@dataclass(frozen=True)
class TaskTargets:
    """One task's data: ``inputs`` (pytree, leading example axis N), the expert's
    ``log_probs`` ``(N, ..., C)`` (``None`` for the entropy objective), a ``mask`` of the
    positions that count (``(N, T)`` or ``None``), and ``logits_slice`` ``(start, stop)``
    on axis 1 of the merged model's logits aligned with ``log_probs`` (``None``: all)."""

    inputs: PyTree
    log_probs: Any = None
    mask: Any = None
    logits_slice: tuple[int, int] | None = None

    @property
    def num_examples(self) -> int:
        return num_examples(self.inputs)


jax.tree_util.register_dataclass(TaskTargets, data_fields=["inputs", "log_probs", "mask"], meta_fields=["logits_slice"])


def num_examples(inputs: PyTree) -> int:
    """The common leading size of the leaves of ``inputs``."""
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree.leaves(inputs)}
    if not sizes:
        raise MergeInputError("unlabelled inputs hold no arrays")
    if len(sizes) != 1 or -1 in sizes:
        raise MergeInputError(f"unlabelled input arrays disagree on the number of examples (leading sizes {sorted(sizes)})")
    return sizes.pop()


def per_task(apply_fn: Callable | Sequence[Callable], num_tasks: int) -> list[Callable]:
    """One apply function per task from a shared one or a list."""
    if callable(apply_fn):
        return [apply_fn] * num_tasks
    fns = list(apply_fn)
    if len(fns) != num_tasks:
        raise MergeInputError(f"{len(fns)} apply functions (heads) for {num_tasks} tasks")
    for t, f in enumerate(fns):
        if not callable(f):
            raise MergeInputError(f"apply function of task {t} is not callable: {f!r}")
    return fns


# ---------------------------------------------------------------------------- cache
def fingerprint(*parts: str | PyTree) -> str:
    """blake2b-128 hex digest of strings and pytrees (paths, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_FORMAT.encode())
    for part in parts:
        if isinstance(part, str):
            h.update(b"s" + part.encode() + b"\0")
            continue
        for path, leaf in jtree.flatten(part).items():
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"a{path}|{a.dtype}|{a.shape}\0".encode())
            h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _fn_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _fn_parts(fn: Callable) -> list:
    """An apply function's name and the values it captured (``functools.partial`` arguments,
    default arguments, closure cells): arrays are hashed by value, so two closures over
    different heads get different cache keys."""
    if isinstance(fn, functools.partial):
        name, captured = f"partial:{_fn_name(fn.func)}", [*fn.args, *(fn.keywords[k] for k in sorted(fn.keywords))]
    else:
        cells = []
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # an empty cell
                cells.append(None)
        name, captured = _fn_name(fn), [*(getattr(fn, "__defaults__", None) or ()), *cells]
    parts: list = [name]
    for value in captured:
        leaves = jax.tree.leaves(value)
        if isinstance(value, (str, int, float, bool, type(None))):
            parts.append(repr(value))
        elif leaves and all(isinstance(x, (np.ndarray, np.generic, jax.Array)) for x in leaves):
            parts.append(value)
        elif callable(value):
            parts.append(_fn_name(value))
        else:
            parts.append(type(value).__qualname__)
    return parts


def _savez(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to other names
        np.savez(f, **arrays)


def cached(key: str, compute: Callable[[], dict[str, np.ndarray]], cache_dir: str | os.PathLike | None) -> dict[str, np.ndarray]:
    """``compute()``'s arrays, from memory, else from ``cache_dir/targets-<key>.npz``, else computed
    (and stored in both)."""
    if key in _MEMORY:
        return _MEMORY[key]
    path = None if cache_dir is None else Path(cache_dir) / f"targets-{key}.npz"
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise MergeInputError(f"cannot read the target cache file {path} ({e}); delete it to recompute") from e
    else:
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        if path is not None:
            atomic_write(path, lambda tmp: _savez(tmp, arrays), overwrite=True)
    _MEMORY[key] = arrays
    return arrays


def clear_memory() -> None:
    """Empties the in-memory target cache (files in ``cache_dir`` stay)."""
    _MEMORY.clear()


# ---------------------------------------------------------------------------- computing
def _batched(fn: Callable, params: PyTree, inputs: PyTree, batch_size: int) -> list[np.ndarray]:
    """``fn(params, chunk)`` over chunks of ``batch_size`` examples (the last one padded, so one
    compilation), outputs (a tuple of arrays) concatenated on host."""
    n = num_examples(inputs)
    size = min(batch_size, n)
    outs = []
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        chunk = jax.tree.map(lambda a: a[idx], inputs)
        outs.append([np.asarray(o)[: n - start] for o in fn(params, chunk)])
    return [np.concatenate(parts) for parts in zip(*outs)]


def classifier_targets(
    base: PyTree,
    tvs: Sequence[PyTree],
    apply_fn: Callable | Sequence[Callable],
    unlabeled: Sequence[PyTree],
    *,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    cache_tag: str = "",
) -> list[TaskTargets]:
    """Each expert ``θ0 + τ_t``'s log-probabilities ``log softmax(apply_fn_t(θ_t, x))`` on its own
    task's inputs ``unlabeled[t]`` (pass the *unprocessed* task vectors here when the merge
    uses trimmed or masked ones: the targets are the real experts')."""
    fns = per_task(apply_fn, len(tvs))
    if len(unlabeled) != len(tvs):
        raise MergeInputError(f"{len(unlabeled)} unlabelled data sets for {len(tvs)} task vectors")
    base_hash = fingerprint(base)
    make_expert = jax.jit(jtree.apply)
    log_probs = {fn: jax.jit(lambda p, x, fn=fn: (jax.nn.log_softmax(fn(p, x).astype(jnp.float32)),)) for fn in set(fns)}
    out = []
    for fn, tv, xs in zip(fns, tvs, unlabeled):

        def compute(fn=fn, tv=tv, xs=xs):
            return {"log_probs": _batched(log_probs[fn], make_expert(base, tv), xs, batch_size)[0]}

        key = fingerprint("classifier", *_fn_parts(fn), cache_tag, base_hash, tv, xs)
        out.append(TaskTargets(xs, cached(key, compute, cache_dir)["log_probs"]))
    return out


def _greedy(apply_fn: Callable, max_new_tokens: int, eos_id: int, pad_id: int) -> Callable:
    """Greedy decoding with a full forward per step over the fixed ``P + T`` buffer (causal
    models ignore the not-yet-written positions)."""

    def generate(params, prompts):
        b, p = prompts.shape
        tokens = jnp.concatenate([prompts, jnp.full((b, max_new_tokens), pad_id, prompts.dtype)], 1)

        def body(s, carry):
            tokens, log_probs, mask, done = carry
            logits = apply_fn(params, tokens)
            lp = jax.nn.log_softmax(jax.lax.dynamic_index_in_dim(logits, p - 1 + s, 1, False).astype(jnp.float32))
            nxt = jnp.argmax(lp, -1).astype(tokens.dtype)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, jnp.where(done, pad_id, nxt), p + s, 1)
            log_probs = jax.lax.dynamic_update_index_in_dim(log_probs, lp, s, 1)
            mask = jax.lax.dynamic_update_index_in_dim(mask, ~done, s, 1)
            return tokens, log_probs, mask, done | (nxt == eos_id)

        vocab = jax.eval_shape(apply_fn, params, tokens).shape[-1]
        init = (
            tokens,
            jnp.zeros((b, max_new_tokens, vocab), jnp.float32),
            jnp.zeros((b, max_new_tokens), bool),
            jnp.zeros((b,), bool),
        )
        tokens, log_probs, mask, _ = jax.lax.fori_loop(0, max_new_tokens, body, init)
        return tokens, log_probs, mask

    return generate


def lm_targets(
    expert_apply: Callable,
    params: PyTree,
    prompts,
    max_new_tokens: int,
    eos_id: int,
    *,
    pad_id: int | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    cache_tag: str = "",
) -> TaskTargets:
    """The expert's greedy continuation of each prompt and its distributions along it.

    Args:
      expert_apply: ``apply(params, tokens (B, S) int) -> logits (B, S, V)``, causal.
      params: the expert's parameters (``jmerge.tree.apply(base, tau_t)``).
      prompts: ``(N, P)`` integer token ids, all of one length (the logits slice is shared
        by the whole task: pad or truncate prompts to one length first).
      max_new_tokens: generation stops at EOS or after this many tokens.
      eos_id: the end-of-sequence token; ``pad_id`` (default ``eos_id``) fills after it.

    Returns:
      ``TaskTargets(inputs=tokens (N, P+T), log_probs (N, T, V), mask (N, T),
      logits_slice=(P-1, P+T-1))``: the merged model's logits at positions ``P-1 .. P+T-2``
      predict the generated tokens; ``mask`` is true up to and including EOS.
    """
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer) or prompts.shape[1] < 1 or prompts.shape[0] < 1:
        raise MergeInputError(f"prompts must be a non-empty (N, P) integer array of token ids, got {prompts.dtype}{prompts.shape}")
    if int(max_new_tokens) < 1:
        raise MergeInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad_id = eos_id if pad_id is None else pad_id
    p = prompts.shape[1]

    def compute():
        gen = jax.jit(_greedy(expert_apply, int(max_new_tokens), int(eos_id), int(pad_id)))
        tokens, log_probs, mask = _batched(gen, params, prompts, batch_size)
        return {"tokens": tokens, "log_probs": log_probs, "mask": mask}

    key = fingerprint("lm", *_fn_parts(expert_apply), cache_tag, f"{max_new_tokens}|{eos_id}|{pad_id}", params, prompts)
    arrays = cached(key, compute, cache_dir)
    return TaskTargets(arrays["tokens"], arrays["log_probs"], arrays["mask"], (p - 1, p - 1 + int(max_new_tokens)))
