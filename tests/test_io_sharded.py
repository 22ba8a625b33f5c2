"""Safetensors blocks straight onto a mesh, sharded merge, orbax out (one process, 8 devices)."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import jmerge
from helpers import RULE, random_models
from jmerge import shard, streaming
from jmerge.io import orbax_io, sharded
from jmerge.io.hf_dir import OutputError
from jmerge.io import safetensors_io as st
from jmerge.io.safetensors_io import CheckpointError

SHAPES = {"w": (16, 24), "u": (6, 32), "b": (5,)}


def _model(seed, dtype=np.float32):
    out = random_models(SHAPES, 0, seed, dtype=dtype, numpy=True)[0]
    out["ids"] = np.arange(7, dtype=np.int64)  # a non-float buffer: copied from the base
    return out


def _save_hf_sharded(directory, tensors):
    """Two shard files and an index, as Hugging Face writes them."""
    directory.mkdir()
    names = sorted(tensors)
    files = {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors") for i, n in enumerate(names)}
    for f in set(files.values()):
        save_file({n: tensors[n] for n in names if files[n] == f}, str(directory / f))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    return directory


@pytest.fixture
def checkpoints(tmp_path):
    base = _save_hf_sharded(tmp_path / "base", _model(0))
    experts = [_save_hf_sharded(tmp_path / f"e{i}", _model(i + 1)) for i in range(2)]
    return base, experts


def test_read_sharded_places_blocks_by_rule(checkpoints, mesh8):
    base, _ = checkpoints
    arrays = sharded.read_sharded(base, mesh8, RULE)
    ref = _model(0)
    for name, x in arrays.items():
        np.testing.assert_array_equal(np.asarray(x), ref[name])
        assert x.sharding.spec == RULE(name, ref[name].shape, mesh8), name
    assert arrays["w"].sharding.spec == P(None, "model") and arrays["u"].sharding.spec == P(None, "model")
    assert arrays["w"].addressable_shards[0].data.shape == (16, 3)


def test_read_sharded_reads_each_block_once(tmp_path, monkeypatch):
    save_file({"w": np.ones((8, 4), np.float32), "r": np.ones((3,), np.float32)}, str(tmp_path / "m.safetensors"))
    reads = []
    real = sharded._read_block
    monkeypatch.setattr(sharded, "_read_block", lambda ckpt, name, index: reads.append((name, index)) or real(ckpt, name, index))
    mesh = shard.make_mesh(data=2, model=4)  # "w" rows over model, replicated over data
    sharded.read_sharded(tmp_path / "m.safetensors", mesh, RULE)
    assert sorted(i[0].start for n, i in reads if n == "w") == [0, 2, 4, 6]
    assert [n for n, _ in reads].count("r") == 1


def test_read_sharded_reads_through_the_checkpoint_reader(tmp_path, monkeypatch, mesh8):
    """One safetensors reader: every block is a slice of ``Checkpoint.read``'s array."""
    save_file({"w": _model(0)["w"]}, str(tmp_path / "m.safetensors"))
    calls = []
    real = st.Checkpoint.read
    monkeypatch.setattr(st.Checkpoint, "read", lambda self, name: calls.append(name) or real(self, name))
    x = sharded.read_sharded(tmp_path / "m.safetensors", mesh8, RULE)["w"]
    np.testing.assert_array_equal(np.asarray(x), _model(0)["w"])
    assert calls and set(calls) == {"w"}


def test_read_sharded_bfloat16_and_errors(tmp_path, mesh8):
    save_file({"w": _model(0)["w"].astype(ml_dtypes.bfloat16)}, str(tmp_path / "m.safetensors"))
    x = sharded.read_sharded(tmp_path / "m.safetensors", mesh8, RULE)["w"]
    assert x.dtype == jax.numpy.bfloat16 and x.sharding.spec == P(None, "model")
    np.testing.assert_array_equal(np.asarray(x), _model(0)["w"].astype(ml_dtypes.bfloat16))
    with pytest.raises(CheckpointError, match="no tensor"):
        sharded.read_sharded(tmp_path / "m.safetensors", mesh8, RULE, names=["nope"])


def test_merge_to_orbax_equals_in_memory_merge(checkpoints, mesh8, tmp_path):
    base, experts = checkpoints
    out = streaming.merge_to_orbax(base, experts, tmp_path / "merged", "ties", mesh=mesh8, rule=RULE, density=0.5)
    floats = [k for k in SHAPES]
    ref = jmerge.merge({k: _model(0)[k] for k in floats}, [{k: _model(i + 1)[k] for k in floats} for i in range(2)], "ties", density=0.5)
    like = {**{k: jax.ShapeDtypeStruct(s, np.float32) for k, s in SHAPES.items()}, "ids": jax.ShapeDtypeStruct((7,), np.int64)}
    restored = orbax_io.restore(out, shard.abstract_for(like, mesh8, RULE))
    for k in floats:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(ref[k]), err_msg=k)
    assert restored["w"].sharding.spec == P(None, "model")
    np.testing.assert_array_equal(np.asarray(restored["ids"]), np.arange(7))
    assert orbax_io.metadata(out)["method"] == "ties"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(OutputError, match="already exists"):
        streaming.merge_to_orbax(base, experts, out, mesh=mesh8, rule=RULE)
    streaming.merge_to_orbax(base, experts, out, mesh=mesh8, rule=RULE, force=True)
    assert orbax_io.metadata(out)["method"] == "task_arithmetic"


@pytest.mark.parametrize("out_dtype", [None, "bfloat16"])
def test_merge_to_orbax_unifies_dtypes_as_merge_to_dir(tmp_path, mesh8, out_dtype):
    """A bfloat16 and a float32 expert: one dtype rule (``streaming.unified_dtype``), so no
    refusal and merge_to_dir's tensors and dtypes, with or without ``out_dtype``."""
    base = _save_hf_sharded(tmp_path / "base", _model(0))
    experts = [_save_hf_sharded(tmp_path / "e0", _model(1, ml_dtypes.bfloat16)), _save_hf_sharded(tmp_path / "e1", _model(2))]
    out = streaming.merge_to_orbax(base, experts, tmp_path / "orbax", "ties", mesh=mesh8, rule=RULE, density=0.5,
                                   out_dtype=out_dtype)
    ref = st.load(streaming.merge_to_dir(tmp_path / "hf", base, experts, "ties", density=0.5, out_dtype=out_dtype).out)
    restored = orbax_io.restore(out)
    assert sorted(restored) == sorted(ref)
    for name, x in ref.items():
        np.testing.assert_array_equal(np.asarray(restored[name]), x, err_msg=name)
    for name in SHAPES:  # ("ids" is int32 in JAX without x64)
        assert restored[name].dtype == ref[name].dtype == st.as_dtype(out_dtype or "float32"), name


def test_merge_to_orbax_checks_before_reading(checkpoints, mesh8, tmp_path, monkeypatch):
    base, experts = checkpoints
    bad = _model(3)
    bad["w"] = bad["w"][:8]
    bad_dir = _save_hf_sharded(tmp_path / "bad", bad)
    monkeypatch.setattr(sharded, "_read_block", lambda *a: pytest.fail("read a tensor before checking"))
    with pytest.raises(CheckpointError, match="w"):
        streaming.merge_to_orbax(base, [experts[0], bad_dir], tmp_path / "o", mesh=mesh8, rule=RULE)
    with pytest.raises(jmerge.MergeInputError, match="density"):
        streaming.merge_to_orbax(base, experts, tmp_path / "o", "ties", mesh=mesh8, rule=RULE, density=1.5)
    with pytest.raises(jmerge.MergeInputError, match="method 'dare_linear' is stochastic: pass key"):
        streaming.merge_to_orbax(base, experts, tmp_path / "o", "dare_linear", mesh=mesh8, rule=RULE)
    assert not (tmp_path / "o").exists()
