"""PEFT adapters without torch (jmerge.io.peft) and LoRA algebra (jmerge.lora) against plain numpy."""

import json
import re

import jax
import numpy as np
import pytest

from jmerge import lora
from jmerge.io import peft
from jmerge.io.peft import AdapterError
from jmerge.io.hf_dir import OutputError
from jmerge.validate import MergeInputError

D, F = 8, 12  # hidden, intermediate
LLAMA = {
    "model.embed_tokens.weight": (20, D),
    "model.layers.0.self_attn.q_proj.weight": (D, D),
    "model.layers.0.self_attn.v_proj.weight": (D, D),
    "model.layers.0.mlp.up_proj.weight": (F, D),
    "model.layers.0.input_layernorm.weight": (D,),
    "lm_head.weight": (20, D),
}
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]


def _base(seed=0, shapes=LLAMA):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def _write(path, modules, r, alpha=16, rslora=False, seed=1, shapes=LLAMA, fan_in_fan_out=False, **extra):
    """A random adapter: A (r, in), B (out, r) per module (torch layout of the base)."""
    rng = np.random.default_rng(seed)
    factors = {}
    for m in modules:
        out_f, in_f = shapes[m + ".weight"][::-1] if fan_in_fan_out else shapes[m + ".weight"]
        factors[m] = (rng.standard_normal((r, in_f)).astype(np.float32), rng.standard_normal((out_f, r)).astype(np.float32))
    peft.save_adapter(path, factors, fan_in_fan_out=fan_in_fan_out,
                      extra_config={"lora_alpha": alpha, "use_rslora": rslora, **extra})
    return factors


def _scale(r, alpha, rslora):
    return alpha / (np.sqrt(r) if rslora else r)


# ---------------------------------------------------------------------------- numpy PEFT reference
def np_trim(t, density):
    k = int(density * t.size)
    flat = np.abs(t).ravel()
    keep = np.zeros(t.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return t * keep.reshape(t.shape)


def np_method(kind, tensors, weights, density=None, sign="total"):
    ts = np.stack([np_trim(t, density) if kind in ("ties", "magnitude_prune") else t for t in tensors])
    w = np.asarray(weights, np.float64).reshape(-1, *[1] * (ts.ndim - 1))
    if kind in ("linear", "magnitude_prune"):
        return (ts * w).sum(0)
    mag = ts.sum(0) if sign == "total" else np.sign(ts).sum(0)
    majority = np.where(mag >= 0, 1.0, -1.0)
    mask = np.sign(ts) == majority
    return (ts * w * mask).sum(0) / np.maximum(mask.sum(0), 1)


# ---------------------------------------------------------------------------- reading and applying
@pytest.mark.parametrize("rslora", [False, True])
def test_apply_adds_scaled_product(tmp_path, rslora):
    base = _base()
    f = _write(tmp_path / "a", MODULES, r=4, alpha=6, rslora=rslora)
    adapter = peft.open_adapter(tmp_path / "a")
    out = lora.apply_adapter(base, adapter, scale=0.5)
    s = _scale(4, 6, rslora)
    for m in MODULES:
        a, b = f[m]
        np.testing.assert_allclose(out[m + ".weight"], base[m + ".weight"] + 0.5 * s * (b @ a), rtol=1e-5, atol=1e-5)
    assert out["lm_head.weight"] is base["lm_head.weight"]


def test_gpt2_fan_in_fan_out_and_prefix(tmp_path):
    shapes = {"h.0.attn.c_attn.weight": (D, 3 * D), "h.0.mlp.c_fc.weight": (D, F), "wte.weight": (20, D)}
    base = _base(shapes=shapes)
    rng = np.random.default_rng(3)
    factors = {"transformer.h.0.attn.c_attn": (rng.standard_normal((2, D)), rng.standard_normal((3 * D, 2)))}
    peft.save_adapter(tmp_path / "g", factors, fan_in_fan_out=True, extra_config={"lora_alpha": 4, "target_modules": ["c_attn"]})
    out = lora.apply_adapter(base, peft.open_adapter(tmp_path / "g"))
    a, b = factors["transformer.h.0.attn.c_attn"]
    np.testing.assert_allclose(out["h.0.attn.c_attn.weight"], base["h.0.attn.c_attn.weight"] + 2.0 * (b @ a).T, rtol=1e-5, atol=1e-5)


def test_embedding_lora_is_transposed(tmp_path):
    base = _base()
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3, 20)), rng.standard_normal((D, 3))
    peft.save_adapter(tmp_path / "e", {"model.embed_tokens": (a, b)}, embeddings=["model.embed_tokens"])
    adapter = peft.open_adapter(tmp_path / "e")
    assert adapter.modules["model.embed_tokens"].embedding
    out = lora.apply_adapter(base, adapter)
    np.testing.assert_allclose(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"] + (b @ a).T, rtol=1e-5, atol=1e-5)


def test_rank_pattern_and_alpha_pattern(tmp_path):
    _write(tmp_path / "p", MODULES[:1], r=2, alpha=4)
    cfg = json.loads((tmp_path / "p" / peft.CONFIG_NAME).read_text())
    cfg.update(r=8, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 1})
    (tmp_path / "p" / peft.CONFIG_NAME).write_text(json.dumps(cfg))
    m = peft.open_adapter(tmp_path / "p").modules[MODULES[0]]
    assert (m.rank, m.alpha, m.scaling) == (2, 1.0, 0.5)


def test_bad_adapters_are_refused_naming_the_module(tmp_path):
    base = _base()
    _write(tmp_path / "r", MODULES[:1], r=4)
    cfg = json.loads((tmp_path / "r" / peft.CONFIG_NAME).read_text())
    (tmp_path / "r" / peft.CONFIG_NAME).write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(AdapterError, match=re.escape(
            "module 'model.layers.0.self_attn.q_proj' has rank 4 (A[4, 8], B[8, 4]) but the config says r=8")):
        peft.open_adapter(tmp_path / "r")

    wrong = {n: ((D + 1, D) if "q_proj" in n else s) for n, s in LLAMA.items()}
    _write(tmp_path / "s", MODULES[:1], r=2, shapes=wrong)
    with pytest.raises(AdapterError, match=re.escape(
            "module 'model.layers.0.self_attn.q_proj': factors A[2, 8] B[9, 2] give a [9, 8] update, "
            "but base tensor 'model.layers.0.self_attn.q_proj.weight' is [8, 8]")):
        lora.apply_adapter(base, peft.open_adapter(tmp_path / "s"))

    _write(tmp_path / "t", MODULES[:1], r=2, target_modules=["q_proj", "o_proj"])
    with pytest.raises(AdapterError, match=re.escape("target_modules ['o_proj'] match no module of the base model")):
        lora.apply_adapter(base, peft.open_adapter(tmp_path / "t"))

    _write(tmp_path / "u", MODULES[:1], r=2, target_modules=["v_proj"])
    with pytest.raises(AdapterError, match=re.escape(
            "module 'model.layers.0.self_attn.q_proj' is not in target_modules ['v_proj']")):
        peft.open_adapter(tmp_path / "u")

    other = {"model.layers.0.self_attn.k_proj.weight": (D, D)}
    _write(tmp_path / "k", ["model.layers.0.self_attn.k_proj"], r=2, shapes=other)
    with pytest.raises(AdapterError, match=re.escape(
            "adapter module 'model.layers.0.self_attn.k_proj' has no weight in the base model")):
        lora.apply_adapter(base, peft.open_adapter(tmp_path / "k"))

    _write(tmp_path / "d", MODULES[:1], r=2, use_dora=True)
    with pytest.raises(AdapterError, match=re.escape("use_dora=True: DoRA adapters are not supported")):
        peft.open_adapter(tmp_path / "d")


def test_refusals_come_before_reading_tensors(tmp_path, monkeypatch):
    _write(tmp_path / "t", MODULES[:1], r=2, target_modules=["q_proj", "o_proj"])
    adapter = peft.open_adapter(tmp_path / "t")
    monkeypatch.setattr(type(adapter.checkpoint), "read", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(AdapterError, match="o_proj"):
        lora.apply_adapter(_base(), adapter)


# ---------------------------------------------------------------------------- combining
def _pair(tmp_path, ranks=(4, 4), alphas=(8, 2)):
    fs = [_write(tmp_path / f"a{i}", MODULES, r=r, alpha=al, seed=10 + i) for i, (r, al) in enumerate(zip(ranks, alphas))]
    return [peft.open_adapter(tmp_path / f"a{i}") for i in range(len(ranks))], fs


def _delta(combined, module):
    a, b = combined.factors[module]
    return b @ a


def test_cat_is_exact_weighted_sum(tmp_path):
    adapters, fs = _pair(tmp_path, ranks=(4, 2), alphas=(8, 3))
    out = lora.combine_adapters(adapters, [0.7, -0.4], "cat")
    for m in MODULES:
        want = 0.7 * 2.0 * fs[0][m][1] @ fs[0][m][0] - 0.4 * 1.5 * fs[1][m][1] @ fs[1][m][0]
        np.testing.assert_allclose(_delta(out, m), want, rtol=1e-5, atol=1e-5)
        assert out.factors[m][0].shape[0] == 6


@pytest.mark.parametrize("kind,majority", [("linear", "total"), ("ties", "total"), ("ties", "frequency"),
                                            ("magnitude_prune", "total")])
def test_factorwise_matches_peft_reference(tmp_path, kind, majority):
    adapters, fs = _pair(tmp_path)
    weights = [0.6, -0.9]
    out = lora.combine_adapters(adapters, weights, kind, density=0.5, majority_sign_method=majority)
    scales = [2.0, 0.5]
    mag = [np.sqrt(abs(w * s)) for w, s in zip(weights, scales)]
    w_a = [np.sign(w) * g for w, g in zip(weights, mag)]
    for m in MODULES:
        a = np_method(kind, [f[m][0] for f in fs], w_a, 0.5, majority)
        b = np_method(kind, [f[m][1] for f in fs], mag, 0.5, majority)
        np.testing.assert_allclose(out.factors[m][0], a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.factors[m][1], b, rtol=1e-5, atol=1e-6)


def test_single_adapter_is_identity_with_sign(tmp_path):
    adapters, fs = _pair(tmp_path)
    for w in (1.0, -1.0):
        out = lora.combine_adapters(adapters[:1], [w], "svd")  # one adapter: linear, as PEFT
        for m in MODULES:
            np.testing.assert_allclose(_delta(out, m), w * 2.0 * fs[0][m][1] @ fs[0][m][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["svd", "ties_svd", "magnitude_prune_svd"])
def test_svd_types_are_best_rank_r_of_the_method_on_delta(tmp_path, kind):
    adapters, fs = _pair(tmp_path, ranks=(4, 2), alphas=(8, 2))
    weights = [0.5, 1.5]
    out = lora.combine_adapters(adapters, weights, kind, density=0.6, svd_rank=3)
    for m in MODULES:
        deltas = [2.0 * fs[0][m][1] @ fs[0][m][0], 1.0 * fs[1][m][1] @ fs[1][m][0]]
        method = {"svd": "linear", "ties_svd": "ties", "magnitude_prune_svd": "magnitude_prune"}[kind]
        full = np_method(method, deltas, weights, 0.6)
        u, s, vt = np.linalg.svd(full)
        np.testing.assert_allclose(_delta(out, m), (u[:, :3] * s[:3]) @ vt[:3], rtol=1e-4, atol=1e-4)
        assert out.factors[m][0].shape == (3, full.shape[1])


def test_dare_keeps_density_and_is_unbiased(tmp_path):
    adapters, fs = _pair(tmp_path)
    key = jax.random.key(0)
    out = lora.combine_adapters(adapters, [1.0, 1.0], "dare_linear_svd", density=0.5, svd_rank=8, key=key)
    again = lora.combine_adapters(adapters, [1.0, 1.0], "dare_linear_svd", density=0.5, svd_rank=8, key=key)
    m = MODULES[2]
    np.testing.assert_array_equal(out.factors[m][0], again.factors[m][0])  # one key, one result
    full = 2.0 * fs[0][m][1] @ fs[0][m][0] + 0.5 * fs[1][m][1] @ fs[1][m][0]
    assert not np.allclose(_delta(out, m), full, atol=1e-3)
    draws = [_delta(lora.combine_adapters(adapters, [1.0, 1.0], "dare_linear_svd", density=0.5, svd_rank=8,
                                          key=jax.random.key(s)), m) for s in range(40)]
    rel = np.linalg.norm(np.mean(draws, 0) - full) / np.linalg.norm(full)
    assert rel < 0.25  # E[drop / density] = identity; 40 draws of an 8x12 matrix
    with pytest.raises(MergeInputError, match=re.escape("combination_type 'dare_ties' is stochastic: pass key=")):
        lora.combine_adapters(adapters, [1.0, 1.0], "dare_ties", density=0.5)


def test_combination_refusals(tmp_path):
    adapters, _ = _pair(tmp_path, ranks=(4, 2))
    with pytest.raises(AdapterError, match=re.escape(
            "module 'model.layers.0.self_attn.q_proj': combination_type 'linear' needs one rank for every adapter, got [4, 2] "
            "(use 'cat' or an '_svd' type)")):
        lora.combine_adapters(adapters, [1, 1], "linear")
    with pytest.raises(MergeInputError, match=re.escape("combination_type 'ties' needs a density in (0, 1], got None")):
        lora.combine_adapters(adapters, [1, 1], "ties")
    with pytest.raises(MergeInputError, match=re.escape("unknown combination_type 'tie'")):
        lora.combine_adapters(adapters, [1, 1], "tie")
    _write(tmp_path / "few", MODULES[:2], r=4)
    with pytest.raises(AdapterError, match="adapts other modules than"):
        lora.combine_adapters([adapters[0], peft.open_adapter(tmp_path / "few")], [1, 1], "svd")


def test_combined_round_trips_through_the_file(tmp_path):
    adapters, _ = _pair(tmp_path)
    out = lora.combine_adapters(adapters, [0.3, 0.7], "svd", svd_rank=5)
    lora.save_combined(tmp_path / "c", out)
    back = peft.open_adapter(tmp_path / "c")
    cfg = back.config
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (5, 5, False)
    for m in MODULES:
        np.testing.assert_allclose(back.delta(m), _delta(out, m), rtol=1e-6, atol=1e-6)
    with pytest.raises(OutputError, match="already exists; pass --force"):
        lora.save_combined(tmp_path / "c", out)


# ---------------------------------------------------------------------------- extracting
def test_extract_recovers_best_rank_r_and_round_trips(tmp_path):
    base = _base(0)
    ft = {n: a + (0.1 * np.random.default_rng(7).standard_normal(a.shape).astype(np.float32) if a.ndim == 2 else 0)
          for n, a in base.items()}
    ft["model.layers.0.input_layernorm.weight"] = base["model.layers.0.input_layernorm.weight"] + 1
    ex = lora.extract_lora(base, ft, rank=3)
    assert set(ex.ranks) == set(MODULES)  # embeddings and lm_head excluded by default
    assert set(ex.skipped) == {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"}
    peft.save_adapter(tmp_path / "x", ex.factors)
    applied = lora.apply_adapter(base, peft.open_adapter(tmp_path / "x"))
    for m in MODULES:
        tau = ft[m + ".weight"] - base[m + ".weight"]
        u, s, vt = np.linalg.svd(tau.astype(np.float64))
        np.testing.assert_allclose(applied[m + ".weight"] - base[m + ".weight"], (u[:, :3] * s[:3]) @ vt[:3], rtol=1e-4, atol=1e-5)


def test_extract_energy_threshold_and_padding():
    base = _base(0)
    rng = np.random.default_rng(2)
    ft = dict(base)
    u, _ = np.linalg.qr(rng.standard_normal((F, F)))
    v, _ = np.linalg.qr(rng.standard_normal((D, D)))
    s = np.array([4.0, 2.0, 1.0, 0.5, 0, 0, 0, 0])
    ft["model.layers.0.mlp.up_proj.weight"] = base["model.layers.0.mlp.up_proj.weight"] + ((u[:, :D] * s) @ v.T).astype(np.float32)
    ft["model.layers.0.self_attn.q_proj.weight"] = base["model.layers.0.self_attn.q_proj.weight"] + np.outer(v[:, 0], v[:, 1]).astype(np.float32)
    ex = lora.extract_lora(base, ft, energy=0.95)
    # energies 16, 4, 1, 0.25 of 21.25: two values keep 94.1 %, three 98.8 %
    assert ex.ranks == {"model.layers.0.mlp.up_proj": 3, "model.layers.0.self_attn.q_proj": 1}
    assert ex.factors["model.layers.0.self_attn.q_proj"][0].shape == (3, D)  # padded to the largest rank
    np.testing.assert_allclose(ex.energy["model.layers.0.mlp.up_proj"], 21.0 / 21.25, rtol=1e-5)
    with pytest.raises(MergeInputError, match=re.escape("extract_lora needs rank=, energy= or both")):
        lora.extract_lora(base, ft)
