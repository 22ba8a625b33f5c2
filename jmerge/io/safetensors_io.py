"""Safetensors checkpoints, one file or HF shards, without torch (output directories:
:mod:`jmerge.io.hf_dir`).

Reading. :func:`open_checkpoint` takes a ``.safetensors`` file, or a directory holding
``model.safetensors`` or a sharded ``model.safetensors.index.json``, and parses only the
headers: names, shapes, dtypes, byte ranges (the safetensors format is an 8-byte
little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the
raw bytes). Every header is checked against its file before any tensor is read (a truncated
or corrupt file is named). :meth:`Checkpoint.read` then loads one tensor as a numpy array
(bfloat16 through ``ml_dtypes``): a copy-on-write ``numpy.memmap`` of its byte range, so no
bytes are copied (the page cache is read in place; writing into the array changes a private
copy, never the file) and the pages stay mapped only while the array lives (long-lived whole-file handles held 2 GiB
RSS for 1.5 GiB of inputs, measured here).
JAX on CPU uses a 64-byte aligned map in place, so no copy is made there either.

Writing. :class:`ShardWriter` writes tensors whose names, shapes and dtypes are known in
advance (a :class:`ShardPlan`) straight to their final byte offsets, one tensor at a time,
so writing a model needs memory for one tensor, not one shard. Shards follow the HF layout
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``; one shard is
``model.safetensors``), with metadata ``{"format": "pt"}`` so transformers loads them.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from jmerge.validate import MergeInputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 10**9  # bytes, HF's "5GB"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class CheckpointError(MergeInputError):
    """A checkpoint file or directory that cannot be used (missing, corrupt, mismatched)."""



def dtype_code(dtype: Any) -> str:
    """The safetensors code (``"BF16"``...) of a numpy/ml_dtypes dtype or a name like ``"bfloat16"``."""
    dt = np.dtype(getattr(ml_dtypes, dtype) if isinstance(dtype, str) and hasattr(ml_dtypes, dtype) else dtype)
    if dt not in _CODES:
        raise ValueError(f"dtype {dt} cannot be stored in safetensors")
    return _CODES[dt]


def numpy_dtype(name: str) -> np.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or a safetensors code) to a numpy dtype."""
    if name.upper() in _DTYPES:
        return _DTYPES[name.upper()]
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    if name in ("float32", "float16", "float64"):
        return np.dtype(name)
    raise ValueError(f"unsupported dtype {name!r}; use float32, float16 or bfloat16")


def as_dtype(dtype: Any) -> np.dtype | None:
    """A dtype argument (None, a name like ``"bfloat16"``, or a numpy/ml_dtypes dtype) as a numpy dtype."""
    if dtype is None:
        return None
    return numpy_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)


def is_float_array(x: np.ndarray) -> bool:
    """True for float16/32/64 and bfloat16 arrays."""
    return _CODES.get(np.dtype(x.dtype)) in FLOAT_CODES


# ---------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""

    name: str
    shape: tuple[int, ...]
    code: str
    file: Path
    offsets: tuple[int, int]  # byte range within the data section
    data_start: int = 0  # file offset of the data section (8 + header length)

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.code]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.code in FLOAT_CODES


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and checks one safetensors header: ``({name: TensorInfo}, metadata)``.

    Raises :class:`CheckpointError` naming the file when it is missing, not a safetensors
    file, or shorter than its header says (truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {entry!r}") from None
        if code not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        if end - begin != math.prod(shape) * _DTYPES[code].itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has byte range {begin}:{end} inconsistent with {code}{list(shape)}")
        tensors[name] = TensorInfo(name, shape, code, path, (int(begin), int(end)), 8 + n)
        end_max = max(end_max, end)
    if end_max > data_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header needs {end_max} bytes of tensor data, "
            f"the file holds {data_size}"
        )
    tensors = dict(sorted(tensors.items(), key=lambda kv: kv[1].offsets[0]))  # file order
    return tensors, {str(k): str(v) for k, v in metadata.items()}


@dataclass
class Checkpoint:
    """A safetensors checkpoint (one file, or HF sharded) opened by header only.

    ``tensors`` maps each name to its :class:`TensorInfo`, shard by shard in byte order (the
    order that reads each file front to back); no tensor data has been read. :meth:`read`
    loads one tensor.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(t.file for t in self.tensors.values()))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def model_files(self) -> dict[str, str]:
        """``{file name: text}`` of the HF text files (config, tokenizer) this checkpoint implies
        beyond those beside it: none for safetensors (an output copies the directory's own)."""
        return {}

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a copy-on-write memory map of its bytes (nothing is copied)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if info.size == 0:
            return np.zeros(info.shape, info.dtype)
        try:
            mm = np.memmap(info.file, info.dtype, mode="c", offset=info.data_start + info.offsets[0], shape=info.shape)
            return mm.view(np.ndarray)  # keeps the map alive through .base
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from None

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, array)`` one tensor at a time."""
        for name in self.tensors:
            yield name, self.read(name)

    def load(self) -> dict[str, np.ndarray]:
        """All tensors as a flat ``{name: array}`` dict (the whole model in memory)."""
        return dict(self.items())


def find_weights(path: Path) -> Path | None:
    """The safetensors entry point of an HF directory (index or single file), or None."""
    for name in (INDEX_NAME, SINGLE_NAME):
        if (path / name).is_file():
            return path / name
    files = sorted(path.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Opens a ``.safetensors`` file, an ``*.index.json``, an HF directory, a ``.gguf`` file or a
    ``model+lora`` reference (a PEFT adapter applied on read), reading headers only."""
    path = Path(path)
    if not path.exists() and "+" in str(path):  # mergekit's model+lora reference (jmerge.lora)
        from jmerge.lora import open_with_lora

        return open_with_lora(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.suffix.lower() == ".gguf":  # llama.cpp files: dequantized, HF names (jmerge.io.gguf)
        from jmerge.io.gguf import open_gguf

        return open_gguf(path)
    entry = path
    if path.is_dir():
        entry = find_weights(path)
        if entry is None:
            others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".msgpack", ".pt", ".h5"))
            hint = f" (found {', '.join(others)}; convert with `jmerge convert`)" if others else ""
            raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} in this directory{hint}")
    if entry.name.endswith(".index.json"):
        return _open_index(path, entry)
    tensors, metadata = read_header(entry)
    return Checkpoint(path, tensors, metadata)


def _open_index(path: Path, index: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt index file ({e!r})") from None
    files = list(dict.fromkeys(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard file(s) listed in the index are missing: {', '.join(missing)}")
    headers, metadata = {}, {}
    for f in files:
        headers[f], md = read_header(index.parent / f)
        metadata = metadata or md
    for name, f in weight_map.items():
        if name not in headers[f]:
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to {f}, which does not hold it")
    tensors = {name: info for f in files for name, info in headers[f].items()}  # shard by shard, file order
    unlisted = [n for f, h in headers.items() for n in h if weight_map.get(n) != f]
    if unlisted:
        raise CheckpointError(f"{index}: tensors stored in a shard the index does not map them to: {unlisted[:5]}")
    return Checkpoint(path, tensors, metadata)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A whole safetensors checkpoint (file, index or HF directory) as ``{name: np.ndarray}``."""
    return open_checkpoint(path).load()


def check_compatible(base: Checkpoint, other: Checkpoint, label: str | None = None) -> None:
    """``other`` has the base's tensor names and shapes, and float tensors where the base has them.

    HF directories whose ``config.json`` name different ``model_type`` are refused. Dtypes may differ between float types (merges compute in float32). The error names the
    missing, unexpected and mis-shaped tensors and both checkpoints.
    """
    label = label or str(other.path)
    kinds = (read_model_type(base.directory), read_model_type(other.directory))
    if None not in kinds and kinds[0] != kinds[1]:
        raise CheckpointError(f"{label} is a {kinds[1]!r} model but base {base.path} is {kinds[0]!r} (mixed architectures)")
    missing = [n for n in base.tensors if n not in other.tensors]
    extra = [n for n in other.tensors if n not in base.tensors]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) of the base: {_show(missing)}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) not in the base: {_show(extra)}")
        hint = " (a different architecture?)" if len(missing) + len(extra) > len(base.tensors) // 2 else ""
        raise CheckpointError(f"{label} does not match base {base.path}{hint}: " + "; ".join(parts))
    bad = [
        f"{n} {list(other.tensors[n].shape)} vs base {list(t.shape)}"
        for n, t in base.tensors.items()
        if other.tensors[n].shape != t.shape
    ]
    if bad:
        raise CheckpointError(f"{label}: {len(bad)} tensor shape(s) differ from base {base.path}: {_show(bad)}")
    kinds = [n for n, t in base.tensors.items() if other.tensors[n].is_float != t.is_float]
    if kinds:
        raise CheckpointError(f"{label}: float/non-float dtype differs from the base for {_show(kinds)}")


def read_model_type(directory: str | os.PathLike) -> str | None:
    """``model_type`` from an HF directory's ``config.json``, None when there is none."""
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except ValueError:
        raise CheckpointError(f"{cfg}: not valid JSON") from None
    return data.get("model_type") if isinstance(data, dict) else None


def _show(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------- writing
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``5000000``, ``"5GB"`` (10^9, HF's convention), ``"500MiB"`` (2^20) to a byte count."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read size {size!r}; write e.g. 5GB, 500MB, 2GiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class ShardPlan:
    """Which tensors go to which shard file, and each shard's header bytes.

    Tensors are assigned in order; a shard is closed when the next tensor would take it
    past ``max_shard_bytes`` (a tensor larger than that gets a shard of its own).
    """

    files: tuple[str, ...]
    members: tuple[tuple[tuple[str, tuple[int, ...], str], ...], ...]  # per shard: (name, shape, code)

    @classmethod
    def build(cls, specs: Sequence[tuple[str, Sequence[int], Any]], max_shard_bytes: int = DEFAULT_SHARD_SIZE) -> "ShardPlan":
        shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        used = 0
        names = set()
        for name, shape, dtype in specs:
            if name in names:
                raise ValueError(f"tensor {name!r} listed twice")
            names.add(name)
            code = dtype if isinstance(dtype, str) and dtype in _DTYPES else dtype_code(dtype)
            nbytes = math.prod(shape) * _DTYPES[code].itemsize
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(int(s) for s in shape), code))
            used += nbytes
        n = len(shards)
        files = (SINGLE_NAME,) if n == 1 else tuple(f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n))
        return cls(files, tuple(tuple(s) for s in shards))

    def header(self, shard: int, metadata: Mapping[str, str]) -> bytes:
        """8-byte length + JSON header of one shard, space-padded so that the tensor data starts
        64-byte aligned: JAX on CPU then uses a memory-mapped tensor in place (no copy)."""
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, shape, code in self.members[shard]:
            nbytes = math.prod(shape) * _DTYPES[code].itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 64)
        return struct.pack("<Q", len(raw)) + raw

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * _DTYPES[c].itemsize for shard in self.members for _, s, c in shard)


def output_plan(tensors: Mapping[str, TensorInfo], out_dtype: Any = None,
                shard_size: int | str = DEFAULT_SHARD_SIZE) -> ShardPlan:
    """The output shards of a model with ``tensors`` (e.g. a merge's base): float ones cast to ``out_dtype``."""
    code = None if out_dtype is None else dtype_code(as_dtype(out_dtype))
    specs = [(n, t.shape, code if (code and t.is_float) else t.code) for n, t in tensors.items()]
    return ShardPlan.build(specs, parse_size(shard_size))


class ShardWriter:
    """Writes the tensors of a :class:`ShardPlan`, in plan order, into ``directory``.

    Each tensor goes straight to its place in its shard file. The bytes are written by a
    background thread while the caller computes the next tensors, with up to ``IN_FLIGHT``
    bytes queued (memory: that plus one tensor), and writeback starts every ``SYNC_EVERY``
    bytes; a failed write is raised by a later call. An array handed to :meth:`write` must
    not change until :meth:`close` returns (it may be written from in place). ``close()``
    makes the shards durable (``fsync``), checks every tensor was written and writes the
    index (several shards).
    """

    SYNC_EVERY = 64 << 20
    IN_FLIGHT = 128 << 20

    def __init__(self, directory: str | os.PathLike, plan: ShardPlan, metadata: Mapping[str, str] | None = None):
        self.directory = Path(directory)
        self.plan = plan
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self._order = [(i, m) for i, shard in enumerate(plan.members) for m in shard]
        self._next = 0
        self._file = None
        self._shard = -1
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jmerge-write")
        self._pending: list[tuple[concurrent.futures.Future, int]] = []
        self._unsynced = 0

    def write(self, name: str, array: np.ndarray) -> None:
        """Writes the next tensor of the plan (``array`` is cast to the planned dtype)."""
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} is not in the output plan (all planned tensors are written)")
        shard, (pname, shape, code) = self._order[self._next]
        if name != pname:
            raise ValueError(f"tensors must be written in plan order: expected {pname!r}, got {name!r}")
        if tuple(array.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, planned {shape}")
        data = np.ascontiguousarray(np.asarray(array).astype(_DTYPES[code], copy=False)).reshape(-1).view(np.uint8)
        if shard != self._shard:
            self._close_file()
            self._file = open(self.directory / self.plan.files[shard], "wb")
            self._shard = shard
            self._file.write(self.plan.header(shard, self.metadata))
        self._wait(limit=self.IN_FLIGHT - data.nbytes)
        self._pending.append((self._io.submit(self._write_bytes, self._file, data), data.nbytes))
        self._next += 1

    def _write_bytes(self, file, data: np.ndarray) -> None:
        """On the I/O thread: writes, and starts writeback every ``SYNC_EVERY`` bytes so that
        the disk works during the merge rather than in ``close()``'s ``fsync``."""
        file.write(data)
        self._unsynced += data.nbytes
        if self._unsynced >= self.SYNC_EVERY:
            file.flush()
            os.fdatasync(file.fileno())
            self._unsynced = 0

    def _wait(self, limit: int = 0) -> None:
        """Waits until at most ``limit`` bytes are in flight; re-raises a write's error (e.g. a full disk)."""
        while self._pending and (sum(n for _, n in self._pending) > limit or self._pending[0][0].done()):
            self._pending.pop(0)[0].result()

    def _close_file(self) -> None:
        if self._file is not None:
            self._wait()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[Path]:
        """Finishes the last shard, writes ``model.safetensors.index.json`` when sharded."""
        try:
            self._close_file()
        finally:
            self._io.shutdown()
        if self._next != len(self._order):
            missing = [m[0] for _, m in self._order[self._next :]]
            raise ValueError(f"{len(missing)} planned tensor(s) were never written: {_show(missing)}")
        paths = [self.directory / f for f in self.plan.files]
        if len(paths) > 1:
            index = {
                "metadata": {"total_size": self.plan.total_bytes},
                "weight_map": {name: f for f, shard in zip(self.plan.files, self.plan.members) for name, _, _ in shard},
            }
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            paths.append(self.directory / INDEX_NAME)
        return paths

    def abort(self) -> None:
        """Closes an open file without checks (the caller discards the directory)."""
        concurrent.futures.wait([f for f, _ in self._pending])
        self._pending = []
        self._io.shutdown()
        if self._file is not None:
            self._file.close()
            self._file = None


def save_safetensors(
    directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Writes a flat ``{name: array}`` dict as HF-sharded safetensors into an existing ``directory``."""
    plan = ShardPlan.build([(n, a.shape, a.dtype) for n, a in tensors.items()], parse_size(shard_size))
    writer = ShardWriter(directory, plan, metadata)
    try:
        for name, array in tensors.items():
            writer.write(name, array)
        return writer.close()
    except BaseException:
        writer.abort()
        raise
