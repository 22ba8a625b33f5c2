"""The learn path's prompts (jmerge.learn.causal_lm, issue 14 §3): padded on the left so every
prompt keeps its last token, masked with positions counting real tokens; prompts too long for
the model's context and chat templates the tokenizer lacks are refused by name."""

import json

import jax
import numpy as np
import pytest

from helpers import CHAT_TEMPLATE, byte_tokenizer, tiny_llama, tiny_transformer, write_pt_dir
from jmerge import config
from jmerge.io import flax_io
from jmerge.io import safetensors_io as st
from jmerge.learn import causal_lm, lm_targets
from jmerge.validate import MergeInputError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.standard_promotion("transformers' Flax models mix int32 and bool; optax 0.2.8's adam computes decay ** count (float ** int32)")


def test_prompts_of_different_lengths_keep_their_last_tokens(caplog):
    rows = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
    with caplog.at_level("WARNING"):
        got = causal_lm.prompt_array(rows, samples=3, length=6, seed=0, where="p.jsonl")
    np.testing.assert_array_equal(got, [[-1, -1, -1, 5, 6, 7], [3, 4, 5, 6, 7, 8], [-1, 9, 10, 11, 12, 13]])
    assert "p.jsonl: 1 of 3 prompts are longer than prompt_tokens=6 and keep only their last 6 tokens" in caplog.text
    short = causal_lm.prompt_array(rows, samples=3, length=32, seed=0, where="p.jsonl")
    assert short.shape == (3, 8) and [r[-1] for r in short] == [7, 8, 13]


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_transformer("gpt2", vocab_size=32, n_positions=24, eos_token_id=0)
    params = jax.tree.map(lambda x: np.asarray(x) * 4, model.params)  # sharper logits, varied greedy tokens
    return model, params


def test_padded_prompts_give_each_prompts_own_logits_and_continuation(gpt2):
    model, params = gpt2
    apply = causal_lm.model_apply(model)
    rows = [[3, 9, 4, 17, 8, 2, 5], [12, 6], [7, 1, 30, 22]]
    padded = causal_lm.prompt_array(rows, samples=3, length=32, seed=0, where="p")
    logits = np.asarray(apply(params, padded))
    targets = lm_targets(apply, params, padded, 5, eos_id=0)
    p = padded.shape[1]
    for i, r in enumerate(rows):
        alone = np.asarray(model(np.asarray([r]), params=params).logits)[0]
        np.testing.assert_allclose(logits[i, p - len(r):], alone, atol=1e-4)  # its last token's logits included
        own = lm_targets(apply, params, np.asarray([r], np.int32), 5, eos_id=0)
        np.testing.assert_array_equal(targets.inputs[i, p:], own.inputs[0, len(r):])
    assert len({tuple(x) for x in np.asarray(targets.inputs[:, p:])}) > 1


def _base(tmp_path, chat_template: str | None, n_positions: int = 24):
    """A tiny GPT-2 HF directory with the byte-level tokenizer (267 tokens)."""
    model = tiny_transformer("gpt2", n_layer=1, vocab_size=267, n_positions=n_positions, eos_token_id=2)
    base = write_pt_dir(tmp_path / "base", model, jax.tree.map(np.asarray, model.params))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), eos_token="<|im_end|>")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(base)
    return base


def test_chat_template_wraps_text_prompts_and_its_absence_is_named(tmp_path):
    (tmp_path / "p.txt").write_text("the answer is\nthe theory\n")
    with_template = _base(tmp_path / "a", CHAT_TEMPLATE)
    ids = causal_lm.read_prompts(tmp_path / "p.txt", with_template, chat_template=True)
    tok = transformers.AutoTokenizer.from_pretrained(with_template)
    assert tok.decode(ids[0]) == "<|im_start|>user\nthe answer is<|im_end|>\n<|im_start|>assistant\n"
    assert causal_lm.read_prompts(tmp_path / "p.txt", with_template)[1] == tok("the theory")["input_ids"]
    without = _base(tmp_path / "b", None)
    with pytest.raises(MergeInputError, match=r"p\.txt: learn\.chat_template is true but the tokenizer of .*b/base has no chat template"):
        causal_lm.read_prompts(tmp_path / "p.txt", without, chat_template=True)
    (tmp_path / "ids.jsonl").write_text(json.dumps({"ids": [1, 2]}) + "\n")
    with pytest.raises(MergeInputError, match=r"ids\.jsonl: learn\.chat_template applies to text prompts; these are token ids"):
        causal_lm.read_prompts(tmp_path / "ids.jsonl", with_template, chat_template=True)


def test_a_system_turn_precedes_the_user_turn_and_needs_the_chat_template(tmp_path):
    base = _base(tmp_path, CHAT_TEMPLATE)
    rows = [{"system": "Answer in one word.", "text": "the answer is"}, {"text": "the theory"}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = causal_lm.read_prompts(tmp_path / "s.jsonl", base, chat_template=True)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    assert tok.decode(ids[0]) == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n"
                                  "<|im_start|>user\nthe answer is<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids[1]) == "<|im_start|>user\nthe theory<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(MergeInputError, match=r"s\.jsonl: a \"system\" turn needs learn\.chat_template: true$"):
        causal_lm.read_prompts(tmp_path / "s.jsonl", base)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"system": 3, "text": "x"}) + "\n")
    with pytest.raises(MergeInputError, match=r"bad\.jsonl: \"system\" must be a string$"):
        causal_lm.read_prompts(tmp_path / "bad.jsonl", base, chat_template=True)


def test_prompts_longer_than_the_context_are_refused(tmp_path):
    base = _base(tmp_path, None, n_positions=24)
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps({"ids": list(range(3, 25))}) for _ in range(2)) + "\n")
    opts = config.LearnOptions(prompts=(tmp_path / "long.jsonl",), prompt_tokens=64, max_new_tokens=4, samples=2)
    with pytest.raises(MergeInputError, match=r"long\.jsonl: prompts of 22 tokens plus max_new_tokens=4 need 26 positions, "
                                              r"more than the model's context of 24"):
        causal_lm.learn(base, [base], opts, progress=False)


def test_gguf_models_in_a_learn_block_are_refused_by_name(tmp_path):
    opts = config.LearnOptions(prompts=(tmp_path / "p.jsonl",))
    with pytest.raises(MergeInputError, match=r"learn: convert GGUF models to HF directories first \(`jmerge convert model\.gguf dir/`\)"):
        causal_lm.learn(tmp_path / "base.gguf", [tmp_path / "e.gguf"], opts, progress=False)


def _flax_llama_logits(monkeypatch, cfg: dict, flat: dict, ids: np.ndarray, fix_rope: bool = True) -> np.ndarray:
    """transformers' Flax Llama with lm_head tied to the embedding and (``fix_rope``) the RoPE
    base read from the config: with both fixes it matched torch to 1.1e-4 on SmolLM2 (issue 14)."""
    from transformers.models.llama import modeling_flax_llama as mfl

    def sinusoidal(num_pos, dim):
        inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, dim, 2) / dim))
        freqs = np.einsum("i , j -> i j", np.arange(num_pos), inv_freq).astype("float32")
        emb = np.concatenate((freqs, freqs), axis=-1)
        return jax.numpy.asarray(np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1))

    if fix_rope:
        monkeypatch.setattr(mfl, "create_sinusoidal_positions", sinusoidal)
    model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**{**cfg, "tie_word_embeddings": False}),
                                              _do_init=False)
    like = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, 1)))
    params = flax_io.torch_to_flax({**flat, "lm_head.weight": flat["model.embed_tokens.weight"]}, like=like)
    return np.asarray(model(ids, params=params).logits)


def test_the_learn_path_runs_a_llama_with_rope_theta_and_a_tied_head_correctly(tmp_path, monkeypatch):
    base = tiny_llama(tmp_path / "llama", seed=3, tied=True, rope_theta=100000.0)
    lm = causal_lm.open_model(base)
    params, names = lm.load(base)
    assert "lm_head.weight" not in params and names["model.norm.weight"] == "model.norm.weight"
    assert (lm.context, lm.eos, lm.model_type) == (64, 2, "llama")
    rows = [[5, 9, 3, 7, 1, 8, 40, 41], [4, 2, 6], [11, 12, 13, 14, 15]]
    padded = causal_lm.prompt_array(rows, samples=3, length=32, seed=0, where="p")
    got = np.asarray(jax.jit(lm.apply)(params, padded))
    cfg = json.loads((base / "config.json").read_text())
    for i, r in enumerate(rows):
        want = _flax_llama_logits(monkeypatch, cfg, params, np.asarray([r]))[0]
        assert np.abs(want).max() > 0.5
        np.testing.assert_allclose(got[i, padded.shape[1] - len(r):], want, atol=2e-5, rtol=1e-4)
    monkeypatch.undo()  # transformers' own RoPE base (10000) computes another model
    stock = _flax_llama_logits(monkeypatch, cfg, params, np.asarray([rows[0]]), fix_rope=False)[0]
    assert np.abs(stock - got[0]).max() > 1e-3


def test_a_llama_jmerge_cannot_run_is_refused_by_name(tmp_path):
    base = tiny_llama(tmp_path / "llama")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(MergeInputError, match=r"llama/config\.json: learn: jmerge's Llama does not implement "
                                              r"rope_scaling=\{'rope_type': 'llama3', 'factor': 8\.0\}$"):
        causal_lm.open_model(base)
    (base / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(MergeInputError, match=r"learn: jmerge's Llama does not implement hidden_act='gelu'$"):
        causal_lm.open_model(base)
    (base / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "short").mkdir()
    st.save_safetensors(tmp_path / "short", {"model.embed_tokens.weight": np.zeros((3, 4), np.float32)})
    with pytest.raises(MergeInputError, match=r"short: learn: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' "
                                              r"of the Llama in config\.json is missing \(20 missing\)"):
        causal_lm.open_model(base).load(tmp_path / "short")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unload_is_the_inverse_of_load(tmp_path, arch):
    """jmerge's Llama keeps the checkpoint's names and layout; transformers' Flax classes
    transpose kernels, and unload transposes them back."""
    if arch == "llama":
        base = tiny_llama(tmp_path / "llama", seed=1)
    else:
        base = _base(tmp_path, None)
    lm = causal_lm.open_model(base)
    params, names = lm.load(base)
    back = lm.unload(params, names)
    want = st.load(base)
    assert set(back) == set(want)
    for n, x in want.items():
        np.testing.assert_array_equal(back[n], x, err_msg=n)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_data_merge_of_copies_of_a_llama_is_the_llama(tmp_path, method):
    """RegMean / Fisher of experts equal to the base give the base back, under its names and layout."""
    from jmerge.learn import causal_lm_data

    base = tiny_llama(tmp_path / "llama", seed=2, tied=True, rope_theta=100000.0)
    (tmp_path / "p.txt").write_text("the theory is\nan apple\non and on\nthe end\n")
    opts = config.LearnOptions(prompts=(tmp_path / "p.txt", tmp_path / "p.txt"), samples=4, prompt_tokens=8)
    hp = {"alpha": 0.9} if method == "regmean" else {}
    got = causal_lm_data.merged_tensors(base, [base, base], opts, method, hp)
    want = st.load(base)
    assert set(got) == set(want)
    for n, x in want.items():
        np.testing.assert_allclose(got[n], x, rtol=1e-5, atol=1e-6, err_msg=n)
