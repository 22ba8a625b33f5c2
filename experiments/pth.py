"""PyTorch ``.pth`` state dicts as numpy arrays, without torch.

``torch.save`` writes one of two formats; both pickle the object with each tensor reduced
to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
and each storage replaced by a persistent id ``('storage', torch.<T>Storage, key, location,
numel[, view_metadata])``, whose bytes are kept outside the pickle:

* zip (torch >= 1.6): a zip archive with ``<prefix>/data.pkl`` (the object pickle) and one
  entry ``<prefix>/data/<key>`` of raw bytes per storage (``<prefix>/byteorder`` may say
  ``big``; little-endian otherwise).
* legacy: consecutive pickles in one file: the magic number ``0x1950a86a20f9469cfc6c``, the
  protocol version (1001), sys info (``little_endian``...), the object pickle, the list of
  storage keys; then, per key in that order, an int64 element count and the raw bytes.

The pickles are read by an unpickler that resolves only ``_rebuild_tensor_v2``, the
``torch.*Storage`` types and ``collections.OrderedDict`` (to stand-ins; nothing from torch
runs) and refuses any other global with ``pickle.UnpicklingError``. A tensor is a strided view
of its storage (``numpy.lib.stride_tricks.as_strided``, bounds checked), copied out.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """Elements ``[offset, offset + numel)`` of the storage called ``key``."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list (told apart from truncation, which is a ValueError)."""


class _Unpickler(pickle.Unpickler):
    """Resolves only tensor rebuilds, storage types and OrderedDict; storages become references."""

    def __init__(self, f, legacy: bool = False):
        super().__init__(f)
        self.legacy = legacy

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, np.dtype(_STORAGE_DTYPES[name]))
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise _Refused(f"refusing global {module}.{name} (not a tensor, storage or OrderedDict)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == (6 if self.legacy else 5) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, stype, key, _location, numel, *view = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"persistent id {pid!r} names no storage type")
        if view and view[0] is not None:  # legacy view of a root storage: (view_key, offset, size)
            _view_key, offset, size = view[0]
            return _StorageRef(str(key), stype.dtype, int(size), int(offset))
        return _StorageRef(str(key), stype.dtype, int(numel))


def _unpickle(path: Path, f, legacy: bool = False) -> Any:
    try:
        return _Unpickler(f, legacy).load()
    except _Refused:
        raise
    except Exception as e:  # EOFError, UnpicklingError, or a malformed rebuild call
        raise ValueError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def _read_zip(path: Path, zf: zipfile.ZipFile) -> tuple[Any, dict[str, np.ndarray]]:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise ValueError(f"{path}: zip archive without exactly one <prefix>/data.pkl; not a torch.save file")
    prefix = pkls[0][: -len("data.pkl")]
    names = set(zf.namelist())
    big = f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() == b"big"
    obj = _unpickle(path, io.BytesIO(zf.read(pkls[0])))
    storages = {}
    for ref in _storage_refs(obj):
        if ref.key in storages:
            continue
        entry = f"{prefix}data/{ref.key}"
        if entry not in names:
            raise ValueError(f"{path}: storage {entry!r} is missing (truncated or corrupt file)")
        dtype = ref.dtype.newbyteorder(">" if big else "<")
        raw = zf.read(entry)
        if len(raw) < (ref.offset + ref.numel) * dtype.itemsize:
            raise ValueError(f"{path}: storage {entry!r} has {len(raw)} bytes, fewer than its tensors need")
        storages[ref.key] = np.frombuffer(raw, dtype, len(raw) // dtype.itemsize)
    return obj, storages


def _read_legacy(path: Path, f) -> tuple[Any, dict[str, np.ndarray]]:
    try:
        magic = _Unpickler(f).load()
    except Exception:
        magic = None
    if magic != MAGIC_NUMBER:
        raise ValueError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save file)")
    version, sys_info = _unpickle(path, f), _unpickle(path, f)
    if version != PROTOCOL_VERSION or not isinstance(sys_info, dict):
        raise ValueError(f"{path}: unsupported legacy torch.save protocol version {version!r}")
    obj, keys = _unpickle(path, f, legacy=True), _unpickle(path, f)
    order = "<" if sys_info.get("little_endian", True) else ">"
    refs = {r.key: r for r in _storage_refs(obj)}
    end = os.fstat(f.fileno()).st_size
    storages = {}
    for key in keys:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated legacy torch.save file (storage {key!r} missing)")
        if key not in refs:
            raise ValueError(f"{path}: storage {key!r} is not used by any tensor (corrupt file)")
        dtype = refs[key].dtype.newbyteorder(order)
        (count,) = struct.unpack(order + "q", head)
        nbytes = count * dtype.itemsize
        if count < 0 or nbytes > end - f.tell():
            raise ValueError(f"{path}: truncated legacy torch.save file (storage {key!r} needs {nbytes} bytes)")
        storages[key] = np.frombuffer(f.read(nbytes), dtype, count)
    return obj, storages


def _storage_refs(obj) -> list[_StorageRef]:
    if isinstance(obj, Mapping):
        return [r for v in obj.values() for r in _storage_refs(v)]
    return [obj.storage] if isinstance(obj, _TensorRef) else []


def _materialise(path: Path, name: str, t: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    ref = t.storage
    if ref.key not in storages:
        raise ValueError(f"{path}: tensor {name!r} refers to storage {ref.key!r}, which the file does not hold")
    if len(t.size) != len(t.stride) or min((*t.size, *t.stride, t.offset), default=0) < 0:
        raise ValueError(f"{path}: tensor {name!r} has invalid size {t.size} / stride {t.stride} / offset {t.offset}")
    base = storages[ref.key]
    dtype = base.dtype.newbyteorder("=")
    if 0 in t.size:
        return np.empty(t.size, dtype)
    last = ref.offset + t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if ref.offset + ref.numel > base.size or last >= ref.offset + ref.numel:
        raise ValueError(f"{path}: tensor {name!r} (size {t.size}, stride {t.stride}) reaches past its storage")
    view = np.lib.stride_tricks.as_strided(
        base[ref.offset + t.offset :], t.size, [s * base.itemsize for s in t.stride], writeable=False
    )
    return np.array(view, dtype)


def _flatten(path: Path, obj, storages, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(path, v, storages, name + "."))
        elif isinstance(v, _TensorRef):
            out[name] = _materialise(path, name, v, storages)
        else:
            raise ValueError(f"{path}: entry {name!r} is a {type(v).__name__}, not a tensor (not a state dict)")
    return out


def load_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``torch.save``-d state dict as ``{name: array}`` (nested dicts joined with ``.``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
        f.seek(0)
        if is_zip:
            try:
                with zipfile.ZipFile(f) as zf:
                    obj, storages = _read_zip(path, zf)
            except (zipfile.BadZipFile, EOFError) as e:
                raise ValueError(f"{path}: truncated or corrupt zip archive ({e})") from None
        else:
            obj, storages = _read_legacy(path, f)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return _flatten(path, obj, storages)
