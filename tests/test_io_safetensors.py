"""Safetensors I/O: round trips, header-only inspection, bad files; a full disk while writing shards."""

import errno
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st

from helpers import leftovers


def _tensors(seed=0):
    r = np.random.default_rng(seed)
    return {
        "a.weight": r.standard_normal((6, 4)).astype(np.float32),
        "a.bias": r.standard_normal((6,)).astype(np.float16),
        "b.weight": r.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "scalar": np.array(2.5, np.float32),
        "position_ids": np.arange(7, dtype=np.int64).reshape(1, 7),
    }


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(np.asarray(a[k]).reshape(-1).view(np.uint8), np.asarray(b[k]).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("shard_size", [10**9, 64])
def test_round_trip_single_and_sharded(tmp_path, shard_size):
    t = _tensors()
    files = st.save_safetensors(tmp_path, t, shard_size=shard_size)
    names = sorted(p.name for p in files)
    if shard_size == 64:
        assert st.INDEX_NAME in names and len(names) > 2
        index = json.loads((tmp_path / st.INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(t)
        assert index["metadata"]["total_size"] == sum(x.nbytes for x in t.values())
    else:
        assert names == [st.SINGLE_NAME]
    _assert_same(st.load(tmp_path), t)
    # the official reader agrees, and the metadata says PyTorch layout
    ck = st.open_checkpoint(tmp_path)
    assert ck.metadata == {"format": "pt"}
    official = {}
    for f in ck.files:
        official.update(load_file(f))
    _assert_same({k: official[k] for k in t}, t)


def test_reads_files_written_by_safetensors(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "x.safetensors", metadata={"k": "v"})
    ck = st.open_checkpoint(tmp_path / "x.safetensors")
    assert ck.metadata == {"k": "v"}
    _assert_same(ck.load(), t)
    assert st.open_checkpoint(tmp_path).names == ck.names  # a directory with one file


def test_header_only_inspection_reads_no_tensor(tmp_path, monkeypatch):
    t = _tensors()
    st.save_safetensors(tmp_path, t, shard_size=64)
    monkeypatch.setattr(np, "memmap", lambda *a, **k: pytest.fail("a tensor was read"))
    ck = st.open_checkpoint(tmp_path)
    assert {n: ck.tensors[n].shape for n in ck.names} == {n: x.shape for n, x in t.items()}
    assert ck.tensors["b.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert not ck.tensors["position_ids"].is_float and ck.tensors["a.bias"].is_float
    assert ck.nbytes == sum(x.nbytes for x in t.values())


def test_read_arrays_are_writable_copies_on_write(tmp_path):
    t = _tensors()
    st.save_safetensors(tmp_path, t)
    before = (tmp_path / st.SINGLE_NAME).read_bytes()
    x = st.open_checkpoint(tmp_path).read("a.bias")
    assert type(x) is np.ndarray and x.flags.writeable
    x[...] = 7
    assert (tmp_path / st.SINGLE_NAME).read_bytes() == before
    np.testing.assert_array_equal(st.open_checkpoint(tmp_path).read("a.bias"), t["a.bias"])


def test_a_big_tensor_gets_its_own_shard():
    plan = st.ShardPlan.build([("a", (10,), "F32"), ("big", (100,), "F32"), ("c", (10,), "F32")], 100)
    assert [tuple(m[0] for m in s) for s in plan.members] == [("a",), ("big",), ("c",)]
    assert plan.files[0] == "model-00001-of-00003.safetensors"


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    plan = st.ShardPlan.build([("a", (2,), "F32"), ("b", (2,), "F32")])
    w = st.ShardWriter(tmp_path, plan)
    with pytest.raises(ValueError, match="plan order"):
        w.write("b", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="shape"):
        w.write("a", np.zeros(3, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="never written: b"):
        w.close()


def test_missing_paths(tmp_path):
    with pytest.raises(st.CheckpointError, match="no such file"):
        st.open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(st.CheckpointError, match="no model.safetensors"):
        st.open_checkpoint(tmp_path / "empty")
    shard = st.save_safetensors(tmp_path, _tensors(), shard_size=64)[1]
    shard.unlink()
    with pytest.raises(st.CheckpointError, match=f"missing: {shard.name}"):
        st.open_checkpoint(tmp_path)


def test_truncated_and_corrupt_files_are_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(st.CheckpointError, match=r"model\.safetensors: truncated"):
        st.open_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(st.CheckpointError, match="not a safetensors file"):
        st.open_checkpoint(path)
    path.write_bytes(data[:8] + b"x" * (len(data) - 8))
    with pytest.raises(st.CheckpointError, match="corrupt safetensors header"):
        st.open_checkpoint(path)
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(st.CheckpointError, match="corrupt or truncated"):
        st.open_checkpoint(path)


def test_check_compatible_names_the_differences(tmp_path):
    t = _tensors()
    for name, d in [("base", t), ("renamed", {**{k: v for k, v in t.items() if k != "a.bias"}, "a.b": t["a.bias"]}),
                    ("reshaped", {**t, "a.weight": np.zeros((4, 6), np.float32)})]:
        (tmp_path / name).mkdir()
        st.save_safetensors(tmp_path / name, d)
    base = st.open_checkpoint(tmp_path / "base")
    with pytest.raises(st.CheckpointError, match=r"missing 1 tensor\(s\) of the base: a\.bias.*not in the base: a\.b"):
        st.check_compatible(base, st.open_checkpoint(tmp_path / "renamed"))
    with pytest.raises(st.CheckpointError, match=r"a\.weight \[4, 6\] vs base \[6, 4\]"):
        st.check_compatible(base, st.open_checkpoint(tmp_path / "reshaped"))
    st.check_compatible(base, base)


def test_parse_size():
    assert st.parse_size("5GB") == 5 * 10**9
    assert st.parse_size("2GiB") == 2 * 2**30
    assert st.parse_size("1.5MB") == 1_500_000
    assert st.parse_size(1234) == 1234
    for bad in ("5 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError):
            st.parse_size(bad)


@pytest.mark.parametrize("where, fail_at", [("write", 2), ("_write_bytes", 0), ("_write_bytes", 3)])
def test_disk_full_is_reported_and_cleaned_up(tmp_path, monkeypatch, where, fail_at):
    """A full disk in the caller's thread (``write``) or on the writer's I/O thread
    (``_write_bytes``, first or a later tensor): the error reaches the caller, nothing is left."""
    real = getattr(st.ShardWriter, where)
    calls = []

    def failing(self, *args):
        calls.append(1)
        if len(calls) > fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(st.ShardWriter, where, failing)
    out = tmp_path / "out"
    with pytest.raises(hf_dir.OutputError, match="disk full"):
        with hf_dir.atomic_dir(out) as tmp:
            st.save_safetensors(tmp, _tensors(), shard_size=64)
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_tensor_data_starts_64_byte_aligned(tmp_path):
    for name in ("a", "ab", "abcdefg"):  # header lengths that differ mod 64
        (tmp_path / name).mkdir()
        st.save_safetensors(tmp_path / name, {name: np.ones(3, np.float32)})
        ck = st.open_checkpoint(tmp_path / name)
        assert ck.tensors[name].data_start % 64 == 0
        np.testing.assert_array_equal(ck.read(name), np.ones(3, np.float32))
