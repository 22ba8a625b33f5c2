"""Streamed (out-of-core) merges equal in-memory merges, method by method."""

import jax
import ml_dtypes
import numpy as np
import pytest

import jmerge
from helpers import BUFFERS, STREAM_NAMES, stream_models, streamed, write_checkpoint
from jmerge import streaming
from jmerge import tree as jtree
from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st
from jmerge.methods import registry

def _write(root, name, tensors):
    return write_checkpoint(root / name, tensors, shard_size=600, buffers=True)  # several shards


PER_TENSOR = [
    ("average", {"weights": (1.0, 2.0, 0.5)}),
    ("task_arithmetic", {"scale": 0.7, "weights": (1.0, 0.5, 2.0)}),
    ("ties", {"trim": "tensor", "density": (0.3, 0.5, 0.7)}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}),
    ("magmax", {}),
    ("consensus", {"k": 2}),
    ("multislerp", {}),
    ("model_stock", {}),
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {"svd_filter": r"^l0\."}),  # path-sensitive: streamed with real names
    ("sce", {"select_topk": 0.5}),
    ("karcher", {}),
    ("ram", {"epsilon": 0.05}),
    ("ramplus_tl", {"epsilon": 0.05}),
]
FEWER_EXPERTS = [("nearswap", 1, {"t": 0.05}), ("arcee_fusion", 1, {}), ("nuslerp", 2, {"weights": (1.0, 3.0)}),
                 ("passthrough", 1, {"scale": 0.5})]


def test_every_streamable_method_is_covered():
    covered = {m for m, _ in PER_TENSOR} | {m for m, _, _ in FEWER_EXPERTS} | {"ties", "slerp", "dare_linear",
                                                                                 "dare_ties", "della", "della_linear"}
    assert covered == {m for m in jmerge.available() if jmerge.get(m).streamable}


@pytest.mark.parametrize("method,hp", PER_TENSOR, ids=[m for m, _ in PER_TENSOR])
def test_streamed_equals_in_memory(stream_ckpts, method, hp):
    _, base, experts, paths = stream_ckpts
    got = streamed(paths, method, **hp)
    ref = jmerge.merge(base, experts, method, **hp)
    for n in STREAM_NAMES:
        np.testing.assert_allclose(got[n], np.asarray(ref[n]), rtol=0, atol=1e-6, err_msg=n)
        assert got[n].dtype == np.float32
    np.testing.assert_array_equal(got["position_ids"], BUFFERS["position_ids"])  # copied from the base


@pytest.mark.parametrize("method,n,hp", FEWER_EXPERTS, ids=[m for m, _, _ in FEWER_EXPERTS])
def test_streamed_equals_in_memory_with_fewer_experts(stream_ckpts, method, n, hp):
    _, base, experts, paths = stream_ckpts
    got = streamed(paths, method, n_experts=n, **hp)
    ref = jmerge.merge(base, experts[:n], method, **hp)
    for n_ in STREAM_NAMES:
        np.testing.assert_allclose(got[n_], np.asarray(ref[n_]), rtol=0, atol=1e-6, err_msg=n_)


def test_slerp_two_experts(stream_ckpts):
    _, base, experts, paths = stream_ckpts
    got = streamed(paths, "slerp", n_experts=2, t=0.3)
    ref = jmerge.merge(base, experts[:2], "slerp", t=0.3)
    for n in STREAM_NAMES:
        np.testing.assert_allclose(got[n], np.asarray(ref[n]), atol=1e-6)


@pytest.mark.parametrize("method,hp", [("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.6}),
                                       ("della", {"density": 0.6, "epsilon": 0.1}),
                                       ("della_linear", {"density": 0.6, "epsilon": 0.1})])
def test_streamed_stochastic_merges_equal_in_memory(stream_ckpts, method, hp):
    """Streamed DARE/DELLA draw the in-memory merge's masks: every parameter's key is
    fold_in(key, path_hash(path)), and a tensor's path is its name in both."""
    _, base, experts, paths = stream_ckpts
    key = jax.random.key(7)
    got = streamed(paths, method, key=key, **hp)
    ref = jmerge.merge(base, experts, method, key=key, **hp)
    for n in STREAM_NAMES:
        np.testing.assert_array_equal(got[n], np.asarray(ref[n]), err_msg=n)
    other = streamed(paths, method, key=jax.random.key(8), **hp)
    assert any(not np.array_equal(got[n], other[n]) for n in STREAM_NAMES)


def test_path_hash_is_stable():
    """Pinned values: a seeded hash (Python's hash()) would change them between processes."""
    assert jtree.path_hash("model.layers.0.mlp.up_proj.weight") == 24799617
    assert jtree.path_hash("a") == 1431053258
    assert 0 <= jtree.path_hash("x") < 2**31


def test_mixed_dtypes_and_out_dtype(tmp_path):
    base, experts = stream_models(2, seed=3)
    b = _write(tmp_path, "base", base)
    e0 = _write(tmp_path, "e0", {n: x.astype(ml_dtypes.bfloat16) for n, x in experts[0].items()})
    e1 = _write(tmp_path, "e1", experts[1])
    got = dict(streaming.iter_merged(b, [e0, e1], "task_arithmetic", scale=0.5, out_dtype="bfloat16"))
    e0_up = {n: x.astype(ml_dtypes.bfloat16).astype(np.float32) for n, x in experts[0].items()}
    ref = jmerge.merge(base, [e0_up, experts[1]], "task_arithmetic", scale=0.5)
    for n in STREAM_NAMES:
        assert got[n].dtype == np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got[n], np.asarray(ref[n]).astype(ml_dtypes.bfloat16))


def test_merge_to_dir_writes_a_sharded_hf_dir(stream_ckpts, tmp_path):
    _, base, experts, paths = stream_ckpts
    (paths[0] / "config.json").write_text("{}")
    res = streaming.merge_to_dir(tmp_path / "out", paths[0], paths[1:], "ties", trim="tensor", density=0.5,
                                 shard_size=700, card="# card\n")
    assert (tmp_path / "out" / st.INDEX_NAME).exists() and len(res.files) > 2
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "README.md").read_text() == "# card\n"
    ref = jmerge.merge(base, experts, "ties", trim="tensor", density=0.5)
    out = st.load(tmp_path / "out")
    for n in STREAM_NAMES:
        np.testing.assert_allclose(out[n], np.asarray(ref[n]), atol=1e-6)
    assert res.tensors == len(STREAM_NAMES) + 1 and res.bytes_written == hf_dir.dir_size(tmp_path / "out")


def test_bad_inputs(stream_ckpts, tmp_path):
    _, base, experts, paths = stream_ckpts
    bad = dict(experts[0])
    bad["l1.w"] = bad["l1.w"].copy()
    bad["l1.w"][2, 3] = np.nan
    nan_dir = _write(tmp_path, "nan", bad)
    out = tmp_path / "out"
    with pytest.raises(jmerge.MergeInputError, match=r"nan: tensor 'l1.w' holds NaN"):
        streaming.merge_to_dir(out, paths[0], [paths[1], nan_dir], "task_arithmetic")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    with pytest.raises(jmerge.MergeInputError, match="stochastic"):
        streaming.open_inputs(paths[0], paths[1:], "dare_linear")
    with pytest.raises(jmerge.MergeInputError, match="no hyper-parameter 'densty'; did you mean 'density'"):
        streaming.open_inputs(paths[0], paths[1:], "ties", densty=0.2)
    registry.register("test_whole_model_only", streamable=False)(lambda base, tvs, *, key=None: base)
    try:
        with pytest.raises(jmerge.MergeInputError, match="cannot be streamed"):
            streaming.open_inputs(paths[0], paths[1:], "test_whole_model_only")
    finally:
        registry._REGISTRY.pop("test_whole_model_only")
    short = _write(tmp_path, "short", {n: x for n, x in experts[0].items() if n != "l1.w"})
    with pytest.raises(st.CheckpointError, match=r"missing 1 tensor\(s\) of the base: l1.w"):
        streaming.open_inputs(paths[0], [short], "task_arithmetic")


