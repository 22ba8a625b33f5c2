"""mergekit's tokenizer_source / tokenizer / chat_template keys: a shared vocabulary keeps the
merge; differing vocabularies remap the embedding and head rows as mergekit 0.1.5 does (checked
against mergekit on tiny Llamas with real tokenizer.json files); conflicts are refused."""

import json
import re
import subprocess
from importlib import resources

import jinja2
import numpy as np
import pytest

from bench import mergekit_bench
from bench.mergekit_configs import DRIVER
from jmerge import cli, config
from jmerge.config import tokenizer
from jmerge.io import safetensors_io as st

VOCAB = {"a": 0, "b": 1, "c": 2}


def tokenizer_json(vocab, added=()):
    return json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                       "added_tokens": [{"id": i, "content": c} for i, c in added]})


@pytest.fixture()
def root(tmp_path, monkeypatch):
    """base, e0, e1 with one tensor each and the same tokenizer.json; e1's tokenizer_config has a chat template."""
    monkeypatch.chdir(tmp_path)
    r = np.random.default_rng(0)
    for name in ("base", "e0", "e1"):
        (tmp_path / name).mkdir()
        st.save_safetensors(tmp_path / name, {"embed.weight": r.standard_normal((3, 4)).astype(np.float32)})
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "toy"}))
        (tmp_path / name / "tokenizer.json").write_text(tokenizer_json(VOCAB))
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(
            {"model_max_length": 8, **({"chat_template": "{{ e1 }}"} if name == "e1" else {})}))
    return tmp_path


MODELS = "models:\n  - model: e0\n  - model: e1\nbase_model: base\nmerge_method: task_arithmetic\n"


def run(root, text):
    (root / "m.yaml").write_text(text)
    assert cli.main(["run", str(root / "m.yaml"), str(root / "out"), "--no-progress", "--force"]) == 0
    return {p.name: p.read_text() for p in (root / "out").iterdir() if p.suffix in (".json", ".jinja")}


@pytest.mark.parametrize("key", ["tokenizer_source: base", "tokenizer_source: union", "tokenizer: {source: union}"])
def test_a_shared_vocabulary_keeps_the_merge_and_the_bases_tokenizer(root, key):
    plain = st.load((run(root, MODELS), root / "out")[1])
    files = run(root, MODELS + key + "\n")
    assert json.loads(files["tokenizer_config.json"]) == {"model_max_length": 8}
    assert files["tokenizer.json"] == tokenizer_json(VOCAB)
    np.testing.assert_array_equal(st.load(root / "out")["embed.weight"], plain["embed.weight"])


def test_a_model_as_tokenizer_source_gives_its_files(root):
    files = run(root, MODELS + "tokenizer_source: e1\n")
    assert json.loads(files["tokenizer_config.json"])["chat_template"] == "{{ e1 }}"


def test_chat_template_literal_and_auto(root):
    files = run(root, MODELS + "chat_template: '{% for m in messages %}{{ m.content }}{% endfor %}'\n")
    assert json.loads(files["tokenizer_config.json"]) == {
        "model_max_length": 8, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    files = run(root, MODELS + "chat_template: auto\n")  # the only template among the models: e1's
    assert json.loads(files["tokenizer_config.json"])["chat_template"] == "{{ e1 }}"


def added(content, special):
    return {"id": 3, "content": content, "special": special, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False}


def with_added(root, name, token):
    (root / name / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": VOCAB},
                                                            "added_tokens": [token]}))


@pytest.mark.parametrize("setup, text, message", [
    (lambda r: (with_added(r, "e0", added("<x>", True)), with_added(r, "e1", added("<x>", False))),
     MODELS + "tokenizer_source: union\n",
     "`tokenizer_source: union`: e0 and e1 add the token '<x>' with different settings (special=True/False); "
     "give `tokenizer_source` one model's vocabulary instead"),
    (lambda r: (r / "e1" / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0]]}})),
     MODELS + "tokenizer: {source: base}\n",
     "e1/tokenizer.json: tokenizer model 'Unigram' has no token -> id vocabulary (jmerge remaps WordLevel, WordPiece and BPE tokenizers)"),
    (None, MODELS + "chat_template: chatm\n",
     "`chat_template: chatm`: not a Jinja template, `auto` or a built-in name (alpaca, chatml, exaone, llama3, "
     "mistral); did you mean 'chatml'?"),
    (None, MODELS + "tokenizer: {source: base, pad_to_multiple_of: 8}\n",
     "`tokenizer.pad_to_multiple_of` (mergekit's new-token embeddings) is not supported"),
    (None, MODELS + "tokenizer_source: base\ntokenizer: {source: base}\n",
     "give one of `tokenizer_source` and `tokenizer` (mergekit refuses both)"),
    (lambda r: with_added(r, "e1", added("<x>", True)), MODELS + "tokenizer_source: union\njmerge: {lwptv: {layers: llama}}\n",
     "`jmerge.lwptv` needs whole models; it does not combine with tokenizer_source's embedding-row remapping"),
])
def test_conflicting_vocabularies_and_unsupported_keys_are_refused(root, setup, text, message):
    if setup:
        setup(root)
    with pytest.raises(config.ConfigError, match="^" + re.escape(message) + "$"):
        config.plan_from_yaml(text)


# --- differing vocabularies: jmerge's remapped rows against mergekit 0.1.5 (its venv) ---

needs_mergekit = pytest.mark.skipif(not (mergekit_bench.VENV / "bin" / "mergekit-yaml").exists(),
                                    reason=f"no mergekit venv at {mergekit_bench.VENV} (`python -m bench.mergekit_bench`)")
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
VOCAB_CASES = {
    "union, task_arithmetic": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: e0\n"
                              "    parameters: {weight: 1.0}\n  - model: e1\n    parameters: {weight: 0.5}\n"
                              "tokenizer_source: union\n",
    "base, ties": "merge_method: ties\nbase_model: base\nmodels:\n  - model: e0\n    parameters: {weight: 1.0}\n"
                  "  - model: e1\n    parameters: {weight: 0.5}\nparameters: {density: 0.5}\ntokenizer: {source: base}\n",
    "model e1, task_arithmetic": "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: e0\n"
                                 "    parameters: {weight: 1.0}\n  - model: e1\n    parameters: {weight: 1.0}\n"
                                 "tokenizer_source: e1\n",
    "union, linear without base_model": "merge_method: linear\nmodels:\n  - model: e0\n    parameters: {weight: 0.6}\n"
                                        "  - model: e1\n    parameters: {weight: 0.4}\ntokenizer_source: union\n",
}


def _vocab_of(out):
    data = json.loads((out / "tokenizer.json").read_text())
    return {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}


@pytest.fixture(scope="module")
def vocab_runs(tmp_path_factory):
    """Every VOCAB_CASES config through mergekit and `jmerge run`: ``{case: (mergekit out, jmerge out)}``."""
    root = tmp_path_factory.mktemp("vocab")
    python = str(mergekit_bench.VENV / "bin" / "python")
    subprocess.run([python, str(DRIVER), "make_vocab", str(root)], check=True, capture_output=True)
    jobs = []
    for i, text in enumerate(VOCAB_CASES.values()):
        cfg = root / f"case{i}.yaml"
        cfg.write_text(re.sub(r"(model: |source: |tokenizer_source: )(base|e0|e1)\b", rf"\g<1>{root}/\g<2>", text)
                       + "dtype: float32\n")
        jobs.append([str(cfg), str(root / f"case{i}-mergekit")])
    (root / "jobs.json").write_text(json.dumps(jobs))
    p = subprocess.run([python, str(DRIVER), "merge", str(root / "jobs.json")], capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert all(json.loads(line)["ok"] for line in p.stdout.splitlines()), p.stdout + p.stderr[-2000:]
    for cfg, _ in jobs:
        assert cli.main(["run", cfg, cfg.replace(".yaml", "-jmerge"), "--no-progress"]) == 0
    return {case: (root / f"case{i}-mergekit", root / f"case{i}-jmerge") for i, case in enumerate(VOCAB_CASES)}


@needs_mergekit
@pytest.mark.parametrize("case", VOCAB_CASES)
def test_differing_vocabularies_give_mergekits_rows_token_by_token(vocab_runs, case):
    mk_out, jm_out = vocab_runs[case]
    mk_vocab, jm_vocab = _vocab_of(mk_out), _vocab_of(jm_out)
    assert set(jm_vocab) == set(mk_vocab) and len(jm_vocab) == len(mk_vocab)
    mk, jm = st.load(mk_out), st.load(jm_out)
    assert set(mk) == set(jm)
    for name in mk:
        if name in VOCAB_TENSORS:  # mergekit's new ids follow a set's order: compare token by token
            order = sorted(mk_vocab)
            a, b = mk[name][[mk_vocab[t] for t in order]], jm[name][[jm_vocab[t] for t in order]]
        else:
            a, b = mk[name], jm[name]
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0, err_msg=f"{case}: {name}")
    assert json.loads((jm_out / "config.json").read_text())["vocab_size"] == \
        json.loads((mk_out / "config.json").read_text())["vocab_size"] == len(mk_vocab)


# --- chat_template's built-in names: jmerge's own files, rendered as mergekit 0.1.5's ---

MERGEKIT_TEMPLATES = next(mergekit_bench.VENV.glob("lib/python*/site-packages/mergekit/_data/chat_templates"), None)
S, U, A, C = ({"role": r, "content": c} for r, c in [("system", " Be brief. "), ("user", "Hi there\n"),
                                                       ("assistant", " Hello!"), ("user_context", "ctx")])
CONVERSATIONS = [[U], [S, U], [U, A], [S, U, A, U], [U, A, U, A], [U, C, A]]


def render(template: str, messages, generation: bool) -> str:
    """As transformers renders a chat template (trim_blocks, lstrip_blocks, a sandbox)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        return _compile_jinja_template(template).render(messages=messages, add_generation_prompt=generation,
                                                        bos_token="<s>", eos_token="</s>")
    except jinja2.TemplateError as e:  # e.g. mistral's refusal of roles other than user and assistant
        return f"TemplateError: {e}"


def test_a_built_in_chat_template_name_writes_that_template(root):
    files = run(root, MODELS + "chat_template: chatml\n")
    template = json.loads(files["tokenizer_config.json"])["chat_template"]
    assert render(template, [S, U], True) == ("<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\nHi there\n"
                                              "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.skipif(MERGEKIT_TEMPLATES is None, reason=f"no mergekit venv at {mergekit_bench.VENV}")
@pytest.mark.parametrize("name", [n for n in tokenizer.CHAT_TEMPLATES if n != "exaone"])
def test_built_in_chat_templates_render_as_mergekits(name):
    ours = resources.files("jmerge.config").joinpath("chat_templates", name + ".jinja").read_text()
    theirs = (MERGEKIT_TEMPLATES / f"{name}.jinja").read_text()
    for messages in CONVERSATIONS:
        for generation in (False, True):
            assert render(ours, messages, generation) == render(theirs, messages, generation), (name, messages)


def test_exaone_renders_the_exaone_format():
    """mergekit 0.1.5's exaone.jinja leaks its indentation into the prompt; jmerge's gives the format itself."""
    ours = resources.files("jmerge.config").joinpath("chat_templates", "exaone.jinja").read_text()
    assert render(ours, [U, A], True) == "[|system|][|endofturn|]\n[|user|]Hi there\n\n[|assistant|] Hello![|endofturn|]\n[|assistant|]"
    assert render(ours, [S, U], False) == "[|system|] Be brief. [|endofturn|]\n[|user|]Hi there\n\n"
