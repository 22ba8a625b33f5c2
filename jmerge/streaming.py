"""Out-of-core merging: stream tensors from safetensors checkpoints, write the output shard by shard.

Every method that works tensor by tensor (``Method.streamable``: all registered ones except
the data-driven ``regmean`` and ``fisher``, which need every input at once and are merged in
memory; global TIES gets its thresholds from streamed passes first) is run by calling
:func:`jmerge.merge` on one-tensor pytrees, so a streamed merge computes what the in-memory
merge computes. Per tensor we read the base and the K experts (each a copy-on-write memory
map from :meth:`jmerge.io.Checkpoint.read`, dropped once the tensor is merged), merge, and
write the result straight to its place in the output shard; peak memory is a few copies of
one tensor times K + 1, not the model size.

Thresholds (TIES, Breadcrumbs): a method whose sparsifier ranks per tensor (TIES with
``trim="tensor"``, mergekit's scope; Breadcrumbs) finds them in each one-tensor call
(:func:`jmerge.thresholds.solve` on numpy inputs: the host backend). One that ranks over the
whole task vector (TIES' ``trim="global"``, the paper's and jmerge's default) gets them
first from two streamed passes over the checkpoints (:mod:`jmerge.thresholds.streamed`);
the merge pass then trims with them. Both equal the in-memory TIES exactly.

Details that differ from an in-memory merge of the same dicts:

* Pytree key. Each call merges ``{"tensor": x}``, so ``jax.jit`` compiles once per distinct
  (shape, dtype) rather than once per tensor name. Methods whose hyper-parameters look at
  parameter paths (``Method.path_params``, e.g. ``svd_filter``) get ``{name: x}`` instead.
* PRNG keys (DARE, DELLA). Tensor ``name`` gets ``fold_in(key, h(name))``, ``h`` a stable
  31-bit BLAKE2 hash of the name (:func:`jmerge.tree.keys_like`), which is the key the
  in-memory merge of ``{name: array}`` dicts gives that leaf: streamed and in-memory
  stochastic merges draw the same masks.
* Non-float tensors (e.g. int64 ``position_ids`` buffers) are copied from the base.
* Experts may store another float dtype than the base: that tensor is then merged in
  float32 (exact for bf16/f16 inputs) and cast to the output dtype (``out_dtype``, default
  the base tensor's dtype). One rule (:func:`unified_dtype`) for the streamed, in-memory and
  sharded (:func:`merge_to_orbax`) merges.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from jmerge import coverage, thresholds
from jmerge import tree as jtree
from jmerge.io import safetensors_io as st
from jmerge.io.hf_dir import WriteResult, write_dir
from jmerge.io.safetensors_io import output_plan
from jmerge.methods import registry
from jmerge.thresholds import streamed
from jmerge.validate import MergeInputError, MergeOutputError


LEAF = "tensor"

Progress = Callable[[str, str], None]  # (phase, tensor name), called after each tensor


def _open(ckpt: st.Checkpoint | str | os.PathLike) -> st.Checkpoint:
    return ckpt if isinstance(ckpt, st.Checkpoint) else st.open_checkpoint(ckpt)


class Inputs(NamedTuple):
    """Opened and checked inputs of a merge (:func:`open_inputs`): checkpoints, resolved hyper-parameters."""

    base: st.Checkpoint
    experts: list[st.Checkpoint]
    hparams: dict[str, Any]


def open_inputs(
    base, experts: Sequence, method: str, *, key: jax.Array | None = None, in_memory: bool = False, **hparams
) -> Inputs:
    """Opens the checkpoints (headers only), checks they match and the method and its
    hyper-parameters can be streamed (or run ``in_memory``); returns ``(base, experts, resolved
    hparams)``. Runs once per merge: the functions below take its result."""
    m = registry.get(method)
    if not m.streamable and not in_memory:
        raise MergeInputError(
            f"method {method!r} does not work tensor by tensor, so it cannot be streamed; merge in memory"
        )
    base = _open(base)
    experts = [_open(e) for e in experts]
    if not experts:
        raise MergeInputError("no experts: a merge needs at least one fine-tuned model")
    for i, e in enumerate(experts):
        st.check_compatible(base, e, f"expert {i} ({e.path})")
    hp = m.resolve(len(experts), hparams)
    if m.needs_key and key is None:
        raise MergeInputError(f"method {method!r} is stochastic: pass key=jax.random.key(seed)")
    if not any(t.is_float for t in base.tensors.values()):
        raise MergeInputError(f"{base.path}: no float tensors to merge")
    return Inputs(base, experts, hp)


def unified_dtype(base: np.dtype, experts: Sequence[np.dtype], out: np.dtype | None = None,
                  compute: np.dtype | None = None) -> np.dtype | None:
    """The one mixed-dtype rule, on the stored dtypes of one tensor: the dtype every model's
    tensor is taken in, or None to take them as stored. When an expert stores another float
    dtype than the base, or the output dtype ``out`` is not the base's, float32 (exact for
    bf16/f16 inputs), so the merge is rounded once, to the output dtype (a bf16 merge written
    as float32 keeps its float32 result). ``compute`` (mergekit's ``dtype`` under
    ``jmerge: {compute_dtype: model}``) instead rounds every tensor to it first, as mergekit
    loads its inputs, and the merge computes in it as mergekit does
    (``jmerge.merge(..., compute_dtype=)``) and returns that dtype. Headers suffice, so a
    merge knows each tensor's dtype before reading it (:func:`merge_to_orbax` casts blocks as
    it reads them)."""
    if compute is not None:
        return np.dtype(compute)
    if any(d != base for d in experts) or (out is not None and out != base):
        return np.dtype(np.float32)
    return None


def unify_dtypes(base: np.ndarray, experts: Sequence[np.ndarray], out: np.dtype | None = None,
                 compute: np.dtype | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """One tensor of every model in the dtype :func:`unified_dtype` gives (unchanged if None)."""
    dtype = unified_dtype(base.dtype, [x.dtype for x in experts], out, compute)
    if dtype is None:
        return base, list(experts)
    return base.astype(dtype), [x.astype(dtype) for x in experts]


def global_answers(base: st.Checkpoint, experts: Sequence[st.Checkpoint], method: str, hp: dict[str, Any],
                   progress: Progress | None = None):
    """The method's thresholds when its sparsifier ranks over the whole task vector, from
    streamed passes (:mod:`jmerge.thresholds.streamed`); None when it needs none or ranks per
    tensor (each one-tensor merge then finds its own)."""
    sparsifier = registry.get(method).sparsifier(hp)
    query = None if sparsifier is None else sparsifier.query
    if query is None or query.scope != "global":
        return None
    return thresholds.solve(query, experts, base, progress=progress)


def passes(method: str, hp: dict[str, Any]) -> int:
    """Reads of every tensor a streamed merge makes (progress bars): 1, plus the threshold passes."""
    sparsifier = registry.get(method).sparsifier(hp)
    query = None if sparsifier is None else sparsifier.query
    return 1 + (streamed.PASSES if query is not None and query.scope == "global" else 0)


def _all_finite(x: np.ndarray) -> bool:
    # A float32 sum is finite unless an entry is NaN/inf (or the sum overflows, which the exact
    # check then settles): one fused read, half the time of isfinite(x).all().
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow or inf - inf is the answer, not news
        return bool(np.isfinite(np.sum(x, dtype=np.float32)) or np.isfinite(x).all())


def _check_finite(ckpt: st.Checkpoint, name: str, x: np.ndarray) -> None:
    if not _all_finite(x):
        raise MergeInputError(f"{ckpt.path}: tensor {name!r} holds NaN or infinite values")


def _stored(method: str, name: str, x: np.ndarray, dtype: np.dtype, check_finite: bool) -> np.ndarray:
    """The merged tensor ``name`` cast to its stored ``dtype``. With ``check_finite`` (its inputs
    were checked finite) a non-finite result raises :class:`MergeOutputError`, which says whether
    the merge itself or the cast (a value beyond ``dtype``'s range, e.g. above 65504 in float16) made it."""
    with np.errstate(over="ignore") if check_finite else contextlib.nullcontext():  # checked: the error is the news
        y = x.astype(dtype, copy=False)
    if check_finite and not _all_finite(y):
        if not _all_finite(x):
            raise MergeOutputError(f"{method} produced NaN or infinite values in tensor {name!r} from finite inputs")
        raise MergeOutputError(f"{method}: tensor {name!r} overflows its output dtype {np.dtype(dtype).name} "
                               f"(largest magnitude {float(np.max(np.abs(x))):.6g})")
    return y


def iter_merged(
    base,
    experts: Sequence,
    method: str,
    *,
    key: jax.Array | None = None,
    out_dtype: Any = None,
    check_finite: bool = True,
    progress: Progress | None = None,
    **hparams,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, merged tensor)`` in the base's tensor order, one tensor in memory at a time.

    ``out_dtype`` (e.g. ``"bfloat16"``) casts float outputs; the default keeps each base
    tensor's dtype. Hyper-parameters are those of ``jmerge.methods.get(method)``.
    """
    return stream_inputs(open_inputs(base, experts, method, key=key, **hparams), method, key=key, out_dtype=out_dtype,
                         check_finite=check_finite, progress=progress)


class Job(NamedTuple):
    """One output tensor ``name``: merged from ``base``'s and ``experts``' tensors (each a
    ``(checkpoint, tensor name)``) with ``hparams`` (the merge's when None). A merge of whole
    checkpoints is one job per base tensor; mergekit's slices and gradients
    (:mod:`jmerge.config.slices`) give each output tensor its own sources and hyper-parameters."""

    name: str
    base: tuple[st.Checkpoint, str]
    experts: tuple[tuple[st.Checkpoint, str], ...]
    hparams: dict[str, Any] | None = None
    rows: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None  # [base, *experts] remapped (tokenizer_source)
    shape: tuple[int, ...] | None = None  # the output's shape when ``rows`` changes it

    @property
    def info(self) -> st.TensorInfo:
        info = self.base[0].tensors[self.base[1]]
        return info if self.shape is None else replace(info, shape=self.shape)


def stream_inputs(
    inputs: Inputs, method: str, *, key: jax.Array | None = None, out_dtype: Any = None, check_finite: bool = True,
    progress: Progress | None = None, compute_dtype: Any = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """:func:`iter_merged` on inputs already opened by :func:`open_inputs`."""
    base, experts, hp = inputs
    answers = global_answers(base, experts, method, hp, progress)
    coverage.report(coverage.of_checkpoint(method, base, hp, len(experts)))
    jobs = [Job(n, (base, n), tuple((e, n) for e in experts)) for n in base.tensors]
    yield from stream_jobs(jobs, method, hp, key=key, answers=answers, out_dtype=out_dtype, check_finite=check_finite,
                           progress=progress, compute_dtype=compute_dtype)


def stream_jobs(
    jobs: Sequence[Job], method: str, hparams: dict[str, Any], *, key: jax.Array | None = None, answers=None,
    out_dtype: Any = None, check_finite: bool = True, progress: Progress | None = None, compute_dtype: Any = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(job.name, merged tensor)`` for each job in order, one tensor in memory at a
    time (plus one of lookahead). Non-float tensors are copied from the job's base. Dtypes:
    :func:`unify_dtypes`."""
    m = registry.get(method)
    cast, compute = st.as_dtype(out_dtype), st.as_dtype(compute_dtype)

    def dispatch(job: Job):
        """Reads one tensor of every model and starts its merge; JAX runs it asynchronously."""
        (ckpt, src), info = job.base, job.info
        b = ckpt.read(src)
        if not info.is_float:
            return b
        es = [c.read(n) for c, n in job.experts]
        if check_finite:
            for (c, n), x in zip([job.base, *job.experts], [b, *es]):
                _check_finite(c, n, x)
        b, es = unify_dtypes(b, es, cast, compute)
        if job.rows is not None:
            b, *es = job.rows([b, *es])
        hp = hparams if job.hparams is None else job.hparams
        leaf = job.name if any(hp.get(p) is not None for p in m.path_params) else LEAF
        with coverage.quiet():  # reported once for the whole merge
            return registry.merge(
                {leaf: b},
                [{leaf: x} for x in es],
                method,
                key=None if key is None else {leaf: jtree.keys_like(key, {job.name: b})[job.name]},
                check_finite=False,
                answers=answers,
                compute_dtype=compute,
                **hp,
            )[leaf]

    # One tensor of lookahead: the host reads tensor i+1 (and finds its thresholds) while
    # XLA merges tensor i, so disk, numpy and XLA overlap; memory stays at two tensors.
    pending = None
    for job in [*jobs, None]:
        current = None if job is None else (job, dispatch(job))
        if pending is not None:
            pjob, result = pending
            info = pjob.info
            if info.is_float:  # waits for this tensor's merge only: the next one is already dispatched
                result = _stored(method, pjob.name, np.asarray(result), cast or info.dtype, check_finite)
            yield pjob.name, result
            if progress:
                progress("merge", pjob.name)
        pending = current


def iter_merged_in_memory(
    base,
    experts: Sequence,
    method: str,
    *,
    key: jax.Array | None = None,
    out_dtype: Any = None,
    check_finite: bool = True,
    lwptv: Any = None,
    **hparams,
) -> Iterator[tuple[str, np.ndarray]]:
    """The in-memory counterpart of :func:`iter_merged`: loads every float tensor of every
    model and runs one :func:`jmerge.merge` on flat ``{name: array}`` dicts, for what needs
    the whole model at once (``lwptv=``, a ``jmerge.lwptv.LwPTV`` or ``LayerMask``; methods
    whose ``Method.streamable`` is False). Memory: all inputs at once."""
    inputs = open_inputs(base, experts, method, key=key, in_memory=True, **hparams)
    return merge_in_memory(inputs, method, key=key, out_dtype=out_dtype, check_finite=check_finite, lwptv=lwptv)


def read_floats(base: st.Checkpoint, experts: Sequence[st.Checkpoint], out: np.dtype | None = None,
                compute: np.dtype | None = None) -> tuple[dict, list[dict]]:
    """Every float tensor of every model as flat ``{name: array}`` dicts, :func:`unify_dtypes` per tensor."""
    b, es = {}, [{} for _ in experts]
    for n, t in base.tensors.items():
        if t.is_float:
            b[n], values = unify_dtypes(base.read(n), [e.read(n) for e in experts], out, compute)
            for e, x in zip(es, values):
                e[n] = x
    return b, es


def merge_in_memory(
    inputs: Inputs, method: str, *, key: jax.Array | None = None, out_dtype: Any = None, check_finite: bool = True,
    lwptv: Any = None, compute_dtype: Any = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """:func:`iter_merged_in_memory` on inputs already opened by :func:`open_inputs`."""
    base, experts, hp = inputs
    cast = st.as_dtype(out_dtype)
    compute = st.as_dtype(compute_dtype)
    b, es = read_floats(base, experts, cast, compute)
    extra = {} if lwptv is None else {"lwptv": lwptv}
    merged = registry.merge(b, es, method, key=key, check_finite=check_finite, compute_dtype=compute, **extra, **hp)
    del es
    for name, info in base.tensors.items():
        if not info.is_float:
            yield name, base.read(name)
            continue
        x, dtype = np.asarray(merged[name]), np.dtype(cast or info.dtype)
        # registry.merge checked the merge itself; only a cast to another dtype can add an inf
        yield name, _stored(method, name, x, dtype, check_finite and x.dtype != dtype)


def merge_to_orbax(
    base,
    experts: Sequence,
    out: str | os.PathLike,
    method: str = "task_arithmetic",
    *,
    mesh,
    rule=None,
    key: jax.Array | None = None,
    out_dtype: Any = None,
    force: bool = False,
    **hparams,
) -> Path:
    """Merges safetensors checkpoints on ``mesh`` (read straight into shards by ``rule``,
    default :func:`jmerge.shard.spec_for`) and saves the sharded result with orbax.

    Inputs are opened and checked by :func:`open_inputs` (headers, method, hyper-parameters,
    key) before any tensor is read. Float tensors are merged; other tensors (integer
    buffers) are copied from the base. Dtypes follow :func:`merge_to_dir`'s rule
    (:func:`unified_dtype`, decided from the headers; blocks are cast as they are read), and
    each merged tensor is stored in ``out_dtype`` (default: the base tensor's). Returns ``out``.
    """
    from jmerge.io import sharded
    from jmerge.shard import spec_for

    base, experts, _ = open_inputs(base, experts, method, key=key, in_memory=True, **hparams)
    rule = rule or spec_for
    cast = st.as_dtype(out_dtype)
    floats = [n for n, info in base.tensors.items() if info.is_float]
    dtypes = {n: unified_dtype(base.tensors[n].dtype, [e.tensors[n].dtype for e in experts], cast) for n in floats}
    dtypes = {n: d for n, d in dtypes.items() if d is not None}
    base_tree = sharded.read_sharded(base, mesh, rule, dtypes=dtypes)
    expert_trees = [sharded.read_sharded(e, mesh, rule, names=floats, dtypes=dtypes) for e in experts]
    merged = registry.merge({n: base_tree[n] for n in floats}, expert_trees, method, key=key, **hparams)
    stored = {n: cast or info.dtype for n, info in base.tensors.items()}
    merged = {n: (x if x.dtype == stored[n] else x.astype(stored[n])) for n, x in merged.items()}
    merged = {n: merged.get(n, base_tree[n]) for n in base.names}
    meta = {"method": method, "hparams": {k: repr(v) for k, v in hparams.items()},
            "base": str(base.path), "experts": [str(e.path) for e in experts]}
    return sharded.save_sharded(out, merged, metadata=meta, force=force)


def merge_to_dir(
    out: str | os.PathLike,
    base,
    experts: Sequence,
    method: str,
    *,
    key: jax.Array | None = None,
    out_dtype: Any = None,
    shard_size: int | str = st.DEFAULT_SHARD_SIZE,
    force: bool = False,
    card: str | None = None,
    extra_files: Mapping[str, str] | None = None,
    check_finite: bool = True,
    in_memory: bool = False,
    lwptv: Any = None,
    progress: Progress | None = None,
    compute_dtype: Any = None,
    **hparams,
) -> WriteResult:
    """Merges into an HF directory ``out``: sharded safetensors + index, the base's
    ``config.json`` and tokenizer files, ``card`` as README.md, ``extra_files`` as given.

    Streams tensor by tensor (:func:`iter_merged`) unless ``in_memory`` or ``lwptv`` is given
    (:func:`iter_merged_in_memory`). Written atomically: nothing appears at ``out`` unless
    every tensor was written, and an existing ``out`` is replaced only with ``force``.
    ``base`` may be the :class:`Inputs` of :func:`open_inputs` (``experts`` None, no
    ``hparams``): ``jmerge run`` opens and checks its inputs once.
    """
    start = time.perf_counter()
    in_memory = in_memory or lwptv is not None
    inputs = base if isinstance(base, Inputs) else open_inputs(base, experts, method, key=key, in_memory=in_memory, **hparams)
    plan = output_plan(inputs.base.tensors, out_dtype, shard_size)
    common = dict(key=key, out_dtype=out_dtype, check_finite=check_finite, compute_dtype=compute_dtype)
    if in_memory:
        tensors = merge_in_memory(inputs, method, lwptv=lwptv, **common)
    else:
        tensors = stream_inputs(inputs, method, progress=progress, **common)
    return write_dir(out, inputs.base, tensors, plan, protect=[e.path for e in inputs.experts], force=force, card=card,
                     extra_files=extra_files, progress=progress if in_memory else None, start=start)
