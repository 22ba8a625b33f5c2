"""The learn path's prompts (jmerge.learn.causal_lm, issue 14 §3): padded on the left so every
prompt keeps its last token, masked with positions counting real tokens; prompts too long for
the model's context and chat templates the tokenizer lacks are refused by name."""

import json

import jax
import numpy as np
import pytest

from helpers import CHAT_TEMPLATE, byte_tokenizer, tiny_llama, tiny_transformer, write_pt_dir
from jmerge import config
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


def test_a_llama_transformers_flax_would_run_wrongly_is_refused(tmp_path):
    base = tiny_llama(tmp_path / "llama", tied=True, rope_theta=100000.0)
    (tmp_path / "p.jsonl").write_text(json.dumps({"ids": [3, 4]}) + "\n")
    opts = config.LearnOptions(prompts=(tmp_path / "p.jsonl",))
    with pytest.raises(MergeInputError, match=r"learn: transformers' Flax Llama ignores rope_theta \(100000\.0\) and "
                                              r"tie_word_embeddings \(True\), so it cannot run this model correctly"):
        causal_lm.learn(base, [base], opts, progress=False)
