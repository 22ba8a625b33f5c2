"""Out-of-core merging: stream tensors from safetensors checkpoints, write the output shard by shard.

Every method that works tensor by tensor (task arithmetic, average, TIES with
``trim="tensor"``, DARE, breadcrumbs, DELLA, MagMax, consensus, SLERP, Multi-SLERP, Model
Stock, TSV-M, Iso-C, Iso-CTS) is run by calling :func:`jmerge.merge` on one-tensor
pytrees, so a streamed merge computes what the in-memory merge computes. Per tensor we read
the base and the K experts (each through a scoped ``safe_open``), merge, and write the result
straight to its place in the output shard; peak memory is a few copies of one tensor times
K + 1, not the model size.

TIES trims by magnitude thresholds found on the host, then passed to
``ties(..., thresholds=...)`` (:func:`jmerge.stages.threshold_trim`). The threshold is the
exact k-th largest ``|tau_t|``, found on the host by numpy's introselect
(:mod:`jmerge.selection`). With ``trim="tensor"`` (mergekit's scope) :func:`jmerge.merge`
finds it itself for each one-tensor call (TIES' ``prepare`` hook, numpy inputs). Global-trim TIES (the paper's ``trim="global"``,
jmerge's default) ranks over the whole task vector, so it runs in three passes: a sampling
pass and a counting pass bracket and find the thresholds (:func:`global_thresholds`), the
merge pass trims. Both equal the in-memory TIES exactly.

Details that differ from an in-memory merge of the same dicts:

* Pytree key. Each call merges ``{"tensor": x}``, so ``jax.jit`` compiles once per distinct
  (shape, dtype) rather than once per tensor name. Methods whose hyper-parameters look at
  parameter paths (``svd_filter``) get ``{name: x}`` instead.
* PRNG keys (DARE, DELLA). Tensor ``name`` gets ``fold_in(key, h(name))``, ``h`` a stable
  31-bit BLAKE2 hash of the name, so a streamed stochastic merge is deterministic and
  independent of tensor order, but it draws other masks than the in-memory merge (which
  folds in the leaf index).
* Non-float tensors (e.g. int64 ``position_ids`` buffers) are copied from the base.
* Experts may store another float dtype than the base: that tensor is then merged in
  float32 (exact for bf16/f16 inputs) and cast to the output dtype (``out_dtype``, default
  the base tensor's dtype).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from jmerge import coverage, selection, stages
from jmerge.io import safetensors_io as st
from jmerge.methods import registry
from jmerge.validate import MergeInputError

STREAMABLE = frozenset(
    {
        "average",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "magmax",
        "consensus",
        "slerp",
        "multislerp",
        "model_stock",
        "tsv",
        "iso_c",
        "iso_cts",
        # jmerge/methods/mergekit_extra.py: all per tensor, as in mergekit
        "della_linear",
        "sce",
        "nearswap",
        "arcee_fusion",
        "karcher",
        "nuslerp",
        "ram",
        "ramplus_tl",
    }
)
PATH_PARAMS = ("svd_filter",)
LEAF = "tensor"

Progress = Callable[[str, str], None]  # (phase, tensor name), called after each tensor


def name_hash(name: str) -> int:
    """A stable 31-bit hash of a tensor name (BLAKE2b), independent of Python's hash seed."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


def tensor_key(key: jax.Array, name: str) -> jax.Array:
    """The PRNG key of tensor ``name``: ``fold_in(key, name_hash(name))``."""
    return jax.random.fold_in(key, name_hash(name))


def _open(ckpt: st.Checkpoint | str | os.PathLike) -> st.Checkpoint:
    return ckpt if isinstance(ckpt, st.Checkpoint) else st.open_checkpoint(ckpt)


def prepare(
    base, experts: Sequence, method: str, *, key: jax.Array | None = None, in_memory: bool = False, **hparams
) -> tuple[st.Checkpoint, list[st.Checkpoint], dict[str, Any]]:
    """Opens the checkpoints (headers only), checks they match and the method and its
    hyper-parameters can be streamed (or run ``in_memory``); returns ``(base, experts, resolved hparams)``."""
    m = registry.get(method)
    if method not in STREAMABLE and not in_memory:
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
    return base, experts, hp


def global_thresholds(
    base, experts: Sequence, density: float | Sequence[float], *, progress: Progress | None = None,
    sample: int = 1 << 20,
) -> np.ndarray:
    """Per task, the exact k-th largest ``|tau_t|`` over all float tensors, ``k = int(d_t N)``.

    Streamed (:mod:`jmerge.selection`): a first pass draws every ``N // sample``-th entry of
    each task vector (reading only those), which brackets the answer at 5 sample standard
    deviations; a second pass counts the entries above the bracket and keeps the ~``10 N /
    sqrt(sample)`` inside it, where introselect finds the exact value (a miss, which is
    rare, repeats the second pass with a 4x wider bracket). The value equals
    :func:`jmerge.stages.kth_largest_magnitude` on the whole task vector. ``k >= N`` gives 0
    (keep all), ``k = 0`` gives ``inf`` (keep none).
    """
    base, experts = _open(base), [_open(e) for e in experts]
    names = [n for n, t in base.tensors.items() if t.is_float]
    total = sum(base.tensors[n].size for n in names)
    ks = [stages._keep_count(d, total) for d in stages.per_task(density, len(experts))]
    fixed = [selection.trivial_threshold(k, total) for k in ks]
    out = np.array([np.nan if t is None else t for t in fixed], np.float32)
    todo = [t for t, f in enumerate(fixed) if f is None]
    if not todo:
        return out
    stride, offset = max(total // sample, 1), 0
    samples: dict[int, list[np.ndarray]] = {t: [] for t in todo}
    for name in names:  # entries offset + start, + stride, ... of the concatenated task vectors
        start = (-offset) % stride
        offset += base.tensors[name].size
        b = base.read(name).reshape(-1)[start::stride].astype(np.float32)
        for t in todo:
            samples[t].append(np.abs(experts[t].read(name).reshape(-1)[start::stride].astype(np.float32) - b))
        if progress:
            progress("threshold sample", name)
    sample_of = {t: np.concatenate(samples[t]) for t in todo}
    z = {t: 5.0 for t in todo}
    while todo:
        brackets = {t: selection.bracket(sample_of[t], ks[t], total, z[t]) for t in todo}
        above = dict.fromkeys(todo, 0)
        inside: dict[int, list[np.ndarray]] = {t: [] for t in todo}
        for name in names:
            b = base.read(name).astype(np.float32, copy=False)
            for t in todo:
                lo, hi = brackets[t]
                mags = np.abs(experts[t].read(name).astype(np.float32, copy=False) - b)
                above[t] += int(np.count_nonzero(mags >= hi))
                inside[t].append(mags[(mags >= lo) & (mags < hi)])
            if progress:
                progress("threshold pass", name)
        for t in list(todo):
            found = selection.kth_in_bracket(inside[t], above[t], ks[t])
            if found is None:
                z[t] *= 4.0
            else:
                out[t] = found
                todo.remove(t)
    return out


def _check_finite(ckpt: st.Checkpoint, name: str, x: np.ndarray) -> None:
    # A float32 sum is finite unless an entry is NaN/inf (or the sum overflows, which the exact
    # check then settles): one fused read, half the time of isfinite(x).all().
    if not (np.isfinite(np.sum(x, dtype=np.float32)) or np.isfinite(x).all()):
        raise MergeInputError(f"{ckpt.path}: tensor {name!r} holds NaN or infinite values")


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
    base, experts, hp = prepare(base, experts, method, key=key, **hparams)
    if method == "ties" and hp["trim"] == "global" and hp.get("thresholds") is None:
        hparams = {**hparams, "thresholds": tuple(float(x) for x in global_thresholds(base, experts, hp["density"], progress=progress))}
    use_names = any(hp.get(p) is not None for p in PATH_PARAMS)
    coverage.report(coverage.of_checkpoint(method, base, hp, len(experts)))
    cast = _np_dtype(out_dtype)

    def dispatch(name: str, info: st.TensorInfo):
        """Reads one tensor of every model and starts its merge; JAX runs it asynchronously."""
        b = base.read(name)
        if not info.is_float:
            return b
        es = [e.read(name) for e in experts]
        if check_finite:
            for ckpt, x in zip([base, *experts], [b, *es]):
                _check_finite(ckpt, name, x)
        if any(x.dtype != b.dtype for x in es):
            b, es = b.astype(np.float32), [x.astype(np.float32) for x in es]
        leaf = name if use_names else LEAF
        with coverage.quiet():  # reported once for the whole checkpoint, above
            return registry.merge(
                {leaf: b},
                [{leaf: x} for x in es],
                method,
                key=None if key is None else tensor_key(key, name),
                check_finite=False,
                **hparams,
            )[leaf]

    # One tensor of lookahead: the host reads tensor i+1 (and finds its thresholds) while
    # XLA merges tensor i, so disk, numpy and XLA overlap; memory stays at two tensors.
    pending = None
    for name, info in [*base.tensors.items(), (None, None)]:
        current = None if name is None else (name, info, dispatch(name, info))
        if pending is not None:
            pname, pinfo, result = pending
            yield pname, np.asarray(result).astype(cast or pinfo.dtype, copy=False) if pinfo.is_float else result
            if progress:
                progress("merge", pname)
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
    not in :data:`STREAMABLE`). Memory: all inputs at once."""
    base, experts, _ = prepare(base, experts, method, key=key, in_memory=True, **hparams)
    floats = [n for n, t in base.tensors.items() if t.is_float]
    b = {n: base.read(n) for n in floats}
    es = [{n: e.read(n) for n in floats} for e in experts]
    for n in floats:  # mixed float dtypes: that tensor is merged in float32
        if any(e[n].dtype != b[n].dtype for e in es):
            b[n] = b[n].astype(np.float32)
            for e in es:
                e[n] = e[n].astype(np.float32)
    extra = {} if lwptv is None else {"lwptv": lwptv}
    merged = registry.merge(b, es, method, key=key, check_finite=check_finite, **extra, **hparams)
    del es
    cast = _np_dtype(out_dtype)
    for name, info in base.tensors.items():
        yield name, (np.asarray(merged[name]).astype(cast or info.dtype, copy=False) if info.is_float else base.read(name))


def _np_dtype(dtype: Any) -> np.dtype | None:
    if dtype is None:
        return None
    return st.numpy_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)


@dataclass(frozen=True)
class StreamResult:
    """What :func:`merge_to_dir` wrote."""

    out: Path
    files: tuple[str, ...]
    tensors: int
    bytes_written: int
    seconds: float


def output_plan(base: st.Checkpoint, out_dtype: Any = None, shard_size: int | str = st.DEFAULT_SHARD_SIZE) -> st.ShardPlan:
    """The output shards of a merge of ``base``: its tensors, float ones cast to ``out_dtype``."""
    code = None if out_dtype is None else st.dtype_code(_np_dtype(out_dtype))
    specs = [(n, t.shape, code if (code and t.is_float) else t.code) for n, t in base.tensors.items()]
    return st.ShardPlan.build(specs, st.parse_size(shard_size))


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
    **hparams,
) -> StreamResult:
    """Merges into an HF directory ``out``: sharded safetensors + index, the base's
    ``config.json`` and tokenizer files, ``card`` as README.md, ``extra_files`` as given.

    Streams tensor by tensor (:func:`iter_merged`) unless ``in_memory`` or ``lwptv`` is given
    (:func:`iter_merged_in_memory`). Written atomically: nothing appears at ``out`` unless
    every tensor was written, and an existing ``out`` is replaced only with ``force``.
    """
    start = time.perf_counter()
    in_memory = in_memory or lwptv is not None
    base, experts, _ = prepare(base, experts, method, key=key, in_memory=in_memory, **hparams)
    plan = output_plan(base, out_dtype, shard_size)
    common = dict(key=key, out_dtype=out_dtype, check_finite=check_finite, **hparams)
    if in_memory:
        tensors = iter_merged_in_memory(base, experts, method, lwptv=lwptv, **common)
    else:
        tensors = iter_merged(base, experts, method, progress=progress, **common)
    return write_dir(out, base, tensors, plan, protect=[e.path for e in experts], force=force, card=card,
                     extra_files=extra_files, progress=progress if in_memory else None, start=start)


def write_dir(
    out: str | os.PathLike,
    base: st.Checkpoint,
    tensors: Iterator[tuple[str, np.ndarray]],
    plan: st.ShardPlan,
    *,
    protect: Sequence[str | os.PathLike] = (),
    force: bool = False,
    card: str | None = None,
    extra_files: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    start: float | None = None,
) -> StreamResult:
    """Writes ``(name, array)`` pairs as the HF directory ``out`` (shards by ``plan``), with the
    base's ``config.json`` and tokenizer files, ``card`` as README.md and ``extra_files``;
    atomically (see :func:`jmerge.io.safetensors_io.atomic_dir`)."""
    start = time.perf_counter() if start is None else start
    with st.atomic_dir(out, force=force, protect=[base.path, *protect]) as tmp:
        writer = st.ShardWriter(tmp, plan)
        try:
            for name, array in tensors:
                writer.write(name, array)
                if progress:
                    progress("write", name)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        if base.path.is_dir():
            st.copy_model_files(base.path, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    out = Path(out)
    return StreamResult(out, tuple(p.name for p in files), len(base.tensors), st.dir_size(out), time.perf_counter() - start)
