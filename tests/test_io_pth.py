"""experiments.pth: torch-free .pth reading, on files written here without torch."""

import collections
import contextlib
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from experiments.pth import MAGIC_NUMBER, PROTOCOL_VERSION, load_pth


# ---------------------------------------------------------------- a torch.save stand-in
class _Storage:
    def __init__(self, key, data):
        self.key, self.data = key, np.ascontiguousarray(data).ravel()
        self.type = _STORAGE_TYPES[self.data.dtype]


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return _rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())


def _rebuild_tensor_v2(*args):  # only ever pickled by reference, as torch._utils._rebuild_tensor_v2
    raise AssertionError("not called")


_rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
_STORAGE_TYPES = {np.dtype(d): type(n, (), {"__module__": "torch"}) for d, n in
                  [(np.float32, "FloatStorage"), (np.int64, "LongStorage"), (np.float16, "HalfStorage")]}


@contextlib.contextmanager
def _fake_torch():
    """``torch`` and ``torch._utils`` in sys.modules while pickling, so pickle finds the globals."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    utils._rebuild_tensor_v2, torch._utils = _rebuild_tensor_v2, utils
    for cls in _STORAGE_TYPES.values():
        setattr(torch, cls.__name__, cls)
    assert "torch" not in sys.modules
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield
    finally:
        del sys.modules["torch"], sys.modules["torch._utils"]


class _Pickler(pickle.Pickler):
    legacy = False

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            pid = ("storage", obj.type, obj.key, "cpu", obj.data.size)
            return pid + (None,) if self.legacy else pid
        return None


def _pickled(obj, legacy=False):
    buf = io.BytesIO()
    p = _Pickler(buf, protocol=2)
    p.legacy = legacy
    with _fake_torch():
        p.dump(obj)
    return buf.getvalue()


def _storages(state):
    return list({t.storage.key: t.storage for t in state.values()}.values())


def _save(state, path, fmt):
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("archive/data.pkl", _pickled(state))
            zf.writestr("archive/version", "3\n")
            for s in _storages(state):
                zf.writestr(f"archive/data/{s.key}", s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
    else:
        with open(path, "wb") as f:
            for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(_pickled(state, legacy=True))
            pickle.dump([s.key for s in _storages(state)], f, protocol=2)
            for s in _storages(state):
                f.write(struct.pack("<q", s.data.size) + s.data.tobytes())


def _example():
    shared = _Storage("0", np.arange(20, dtype=np.float32))
    ints = _Storage("1", np.array([3, -1, 2**40], np.int64))
    half = _Storage("2", np.array([0.5, -2.0], np.float16))
    state = collections.OrderedDict(
        w=_Tensor(shared, 0, (2, 3), (3, 1)),
        w_t=_Tensor(shared, 8, (4, 3), (1, 4)),  # non-contiguous (a transpose), offset 8 in the same storage
        ids=_Tensor(ints, 0, (3,), (1,)),
        h=_Tensor(half, 1, (), ()),
    )
    a = np.arange(20, dtype=np.float32)
    expected = {"w": a[:6].reshape(2, 3), "w_t": a[8:20].reshape(3, 4).T, "ids": np.array([3, -1, 2**40]),
                "h": np.array(-2.0, np.float16)}
    return state, expected


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_round_trip(tmp_path, fmt):
    state, expected = _example()
    _save(state, tmp_path / "m.pth", fmt)
    assert "torch" not in sys.modules
    got = load_pth(tmp_path / "m.pth")
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
        assert got[k].flags.writeable and got[k].flags.owndata


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_refuses_other_globals(tmp_path, fmt):
    path = tmp_path / "evil.pth"
    evil = pickle.dumps({"x": os.system}, protocol=2)
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", evil)
    else:
        with open(path, "wb") as f:
            for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(evil)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global \w+\.system"):
        load_pth(path)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_file_is_named(tmp_path, fmt, keep):
    state, _ = _example()
    path = tmp_path / "m.pth"
    _save(state, path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"m\.pth.*(truncated|corrupt)"):
        load_pth(path)


def test_missing_and_non_torch_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pth(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pth: not a PyTorch checkpoint"):
        load_pth(tmp_path / "text.pth")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match=r"other\.zip: .*not a torch\.save file"):
        load_pth(tmp_path / "other.zip")


def test_tensor_past_its_storage_is_refused(tmp_path):
    s = _Storage("0", np.zeros(4, np.float32))
    _save({"w": _Tensor(s, 2, (2, 2), (2, 1))}, tmp_path / "m.pth", "zip")
    with pytest.raises(ValueError, match="'w'.*reaches past its storage"):
        load_pth(tmp_path / "m.pth")
