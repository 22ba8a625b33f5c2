"""jmerge.learn.llama, the pure-JAX Llama: against transformers' Flax Llama (a valid oracle
with rope_theta 10000 and an untied head, the two settings it handles) and torch Llama where torch
is installed; left padding; KV-cache generation against full recomputation; RoPE against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.learn import llama
from jmerge.io import flax_io

from helpers import llama_config, llama_weights

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.standard_promotion("transformers' Flax models mix int32 and bool")


def _flax_logits(cfg_dict, flat, ids):
    hf = transformers.LlamaConfig(**{**cfg_dict, "tie_word_embeddings": False})
    model = transformers.FlaxLlamaForCausalLM(hf, _do_init=False)
    like = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, 1)))
    if cfg_dict["tie_word_embeddings"]:
        flat = {**flat, "lm_head.weight": flat["model.embed_tokens.weight"]}
    params = flax_io.torch_to_flax(flat, like=like)
    return np.asarray(model(ids, params=params).logits)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_flax_llama(tied):
    cfg_dict = llama_config(64, tied=tied)
    flat = llama_weights(cfg_dict, seed=2, scale=0.2)
    cfg = llama.LlamaConfig.from_dict(cfg_dict)
    ids = np.random.default_rng(0).integers(0, 64, (2, 11)).astype(np.int32)
    ours = np.asarray(llama.logits(llama.stack(flat, cfg), cfg, jnp.asarray(ids)))
    ref = _flax_logits(cfg_dict, flat, ids)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_logits_match_torch_llama_with_rope_theta_and_tied_head():
    torch = pytest.importorskip("torch")
    cfg_dict = llama_config(64, tied=True, rope_theta=100000.0)
    flat = llama_weights(cfg_dict, seed=2, scale=0.2)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg_dict)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in flat.items()}, strict=False)
    ids = np.random.default_rng(0).integers(0, 64, (2, 11))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    cfg = llama.LlamaConfig.from_dict(cfg_dict)
    np.testing.assert_allclose(np.asarray(llama.logits(llama.stack(flat, cfg), cfg, jnp.asarray(ids))), ref, atol=2e-5, rtol=1e-4)


def test_rope_matches_numpy_half_split_rotation():
    theta, d = 100000.0, 8
    x = np.random.default_rng(0).standard_normal((1, 3, 2, d)).astype(np.float32)
    pos = np.array([[0, 5, 17]])
    out = np.asarray(llama.rope(jnp.asarray(x), jnp.asarray(pos), theta))
    for s in range(3):
        for i in range(d // 2):  # the pair (i, i + d/2) rotates by angle pos * theta^(-2i/d)
            a = pos[0, s] * theta ** (-2 * i / d)
            c, sn = np.cos(a), np.sin(a)
            x1, x2 = x[0, s, :, i], x[0, s, :, i + d // 2]
            np.testing.assert_allclose(out[0, s, :, i], x1 * c - x2 * sn, atol=1e-5)
            np.testing.assert_allclose(out[0, s, :, i + d // 2], x2 * c + x1 * sn, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    cfg_dict = llama_config(64, tied=True, rope_theta=100000.0)
    cfg = llama.LlamaConfig.from_dict(cfg_dict)
    return cfg, llama.stack(llama_weights(cfg_dict, seed=4, scale=0.3), cfg)


def test_left_padding_leaves_the_real_tokens_logits_unchanged(model):
    cfg, params = model
    rows = [[5, 9, 3, 7, 1, 8], [4, 2, 6]]
    ids, mask = llama.left_pad(rows, pad_id=0)
    padded = np.asarray(llama.logits(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))
    for i, r in enumerate(rows):
        alone = np.asarray(llama.logits(params, cfg, jnp.asarray([r])))[0]
        np.testing.assert_allclose(padded[i, ids.shape[1] - len(r):], alone, atol=1e-5)


def test_cached_generation_equals_greedy_full_recomputation(model):
    cfg, params = model
    rows = [[5, 9, 3, 7, 1, 8], [4, 2, 6], [11]]
    ids, mask = llama.left_pad(rows, pad_id=0)
    eos, steps = 2, 6
    got = np.asarray(llama.generate(params, cfg, jnp.asarray(ids), jnp.asarray(mask), steps, eos))
    for i, r in enumerate(rows):  # one row at a time, no padding, no cache
        seq = list(r)
        for _ in range(steps):
            seq.append(int(np.argmax(np.asarray(llama.logits(params, cfg, jnp.asarray([seq])))[0, -1])))
        want = np.asarray(seq[len(r):])
        after = np.flatnonzero(want == eos)
        if after.size:  # after EOS the row repeats EOS
            want[after[0]:] = eos
        np.testing.assert_array_equal(got[i], want)
    assert len(set(map(tuple, got))) > 1
