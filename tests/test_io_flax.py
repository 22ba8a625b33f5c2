"""Flax msgpack I/O and Flax <-> PyTorch layout conversion, checked against transformers' own loaders."""

import jax
import ml_dtypes
import numpy as np
import pytest

import jmerge
from helpers import tiny_transformer
from jmerge import tree as jtree
from jmerge.io import flax_io, hf_dir
from jmerge.io import safetensors_io as st

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.standard_promotion("transformers' Flax models mix int32 and bool")


def _perturbed(params, seed, scale=0.05):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + scale * r.standard_normal(x.shape).astype(np.float32), params)


def _output(model, params, ids):
    out = model(ids, params=params)
    return np.asarray(out.logits if hasattr(out, "logits") else out.last_hidden_state)


IDS = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)


def test_msgpack_round_trip(tmp_path):
    params = {"dense": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, ml_dtypes.bfloat16)}, "s": np.float16(1)}
    flax_io.write_msgpack(tmp_path / "m.msgpack", params)
    back = flax_io.read_msgpack(tmp_path / "m.msgpack")
    assert jtree.paths(back) == jtree.paths(params)
    for a, b in zip(jtree.flatten(back).values(), jtree.flatten(params).values()):
        assert a.dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(a.astype(np.float32), np.asarray(b).astype(np.float32))


def test_corrupt_msgpack_is_named(tmp_path):
    path = tmp_path / "flax_model.msgpack"
    flax_io.write_msgpack(path, {"a": np.ones((64, 64), np.float32)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(st.CheckpointError, match="flax_model.msgpack: corrupt or truncated"):
        flax_io.read_msgpack(tmp_path)
    with pytest.raises(st.CheckpointError, match="not found"):
        flax_io.read_msgpack(tmp_path / "missing.msgpack")


def test_layout_rules():
    r = np.random.default_rng(0)
    flax = {
        "enc": {
            "dense": {"kernel": r.standard_normal((4, 6)).astype(np.float32), "bias": np.zeros(6, np.float32)},
            "conv": {"kernel": r.standard_normal((3, 3, 2, 5)).astype(np.float32)},
            "LayerNorm": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)},
            "word_embeddings": {"embedding": r.standard_normal((10, 4)).astype(np.float32)},
        }
    }
    torch = flax_io.flax_to_torch(flax)
    assert torch["enc.dense.weight"].shape == (6, 4)
    np.testing.assert_array_equal(torch["enc.dense.weight"], flax["enc"]["dense"]["kernel"].T)
    assert torch["enc.conv.weight"].shape == (5, 2, 3, 3)  # (out, in, H, W)
    np.testing.assert_array_equal(torch["enc.conv.weight"][4, 1], flax["enc"]["conv"]["kernel"][:, :, 1, 4])
    assert set(torch) == {
        "enc.dense.weight", "enc.dense.bias", "enc.conv.weight", "enc.LayerNorm.weight", "enc.LayerNorm.bias",
        "enc.word_embeddings.weight",
    }
    back = flax_io.torch_to_flax(torch)
    assert set(jtree.paths(back)) == set(jtree.paths(flax))
    for p, x in jtree.flatten(flax).items():
        np.testing.assert_array_equal(jtree.flatten(back)[p], x)
    # RMSNorm weights stay `weight` for Llama-style names and T5-family model types
    rms = flax_io.torch_to_flax({"model.norm.weight": np.ones(4), "enc.layer_norm.weight": np.ones(4)}, model_type="t5")
    assert set(jtree.paths(rms)) == {"model/norm/weight", "enc/layer_norm/weight"}
    # like= resolves every name against a real model
    like = {"x": {"proj": {"kernel": np.zeros((2, 3))}, "ln": {"weight": np.zeros(3)}}}
    got = flax_io.torch_to_flax({"x.proj.weight": np.zeros((3, 2)), "x.ln.weight": np.zeros(3)}, like=like)
    assert set(jtree.paths(got)) == {"x/proj/kernel", "x/ln/weight"}
    with pytest.raises(KeyError, match="matches no parameter"):
        flax_io.torch_to_flax({"y.weight": np.zeros(3)}, like=like)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_transformers_round_trip(tmp_path, kind):
    """Flax msgpack -> PT-layout safetensors loads in transformers with the same outputs;
    PT -> Flax gives back the msgpack bit for bit."""
    model = tiny_transformer(kind)
    params = _perturbed(model.params, 1)  # differs from any seed-0 random init
    model.save_pretrained(tmp_path / "flax", params=params, safe_serialization=False)
    info = flax_io.convert(tmp_path / "flax", tmp_path / "pt")
    assert info["from"] == "flax" and info["to"] == "safetensors" and "config.json" in info["copied"]
    ck = st.open_checkpoint(tmp_path / "pt")
    assert ck.metadata == {"format": "pt"}
    loaded = type(model).from_pretrained(tmp_path / "pt")
    np.testing.assert_allclose(_output(loaded, loaded.params, IDS), _output(model, params, IDS), rtol=0, atol=1e-6)

    flax_io.convert(tmp_path / "pt", tmp_path / "flax2")
    a = jtree.flatten(flax_io.read_msgpack(tmp_path / "flax"))
    b = jtree.flatten(flax_io.read_msgpack(tmp_path / "flax2"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])


def test_merge_transformers_flax_params_and_save_back(tmp_path):
    """Load a transformers Flax model's params, merge with jmerge, run, save back, reload."""
    model = tiny_transformer("bert")
    base = jax.tree.map(np.asarray, model.params)
    experts = [_perturbed(base, s) for s in (1, 2)]
    merged = jmerge.merge(base, experts, "task_arithmetic", scale=0.5)
    ref = jax.tree.map(lambda b, e1, e2: b + 0.5 * ((e1 - b) + (e2 - b)), base, *experts)
    out = _output(model, merged, IDS)
    np.testing.assert_allclose(out, _output(model, ref, IDS), atol=1e-5)
    model.save_pretrained(tmp_path / "merged", params=merged, safe_serialization=False)
    back = flax_io.read_msgpack(tmp_path / "merged")
    np.testing.assert_array_equal(
        back["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
        np.asarray(merged["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]),
    )
    reloaded = type(model).from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(_output(reloaded, reloaded.params, IDS), out, atol=1e-6)


def test_convert_refuses_existing_output_and_casts(tmp_path):
    flax_io.write_msgpack(tmp_path / "flax_model.msgpack", {"dense": {"kernel": np.ones((2, 3), np.float32)}})
    (tmp_path / "out").mkdir()
    with pytest.raises(hf_dir.OutputError, match="already exists"):
        flax_io.convert(tmp_path / "flax_model.msgpack", tmp_path / "out")
    flax_io.convert(tmp_path / "flax_model.msgpack", tmp_path / "out", force=True, dtype="bfloat16")
    ck = st.open_checkpoint(tmp_path / "out")
    assert ck.tensors["dense.weight"].shape == (3, 2) and ck.tensors["dense.weight"].code == "BF16"
