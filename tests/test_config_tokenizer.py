"""mergekit's tokenizer_source / tokenizer / chat_template keys: accepted when every model has
the base's vocabulary (mergekit's row permutation is then the identity), refused otherwise."""

import json
import re

import numpy as np
import pytest

from jmerge import cli, config
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


@pytest.mark.parametrize("setup, text, message", [
    (lambda r: (r / "e1" / "tokenizer.json").write_text(tokenizer_json({"a": 0, "c": 1, "b": 2})),
     MODELS + "tokenizer_source: union\n",
     "`tokenizer_source: union`: the vocabularies of e1 differ from the base's (base); jmerge merges models of one "
     "vocabulary (mergekit's embedding-row remapping is not implemented)"),
    (lambda r: (r / "e0" / "tokenizer.json").write_text(tokenizer_json(VOCAB, [(3, "<x>")])),
     MODELS + "tokenizer: {source: base}\n",
     "`tokenizer.source: base`: the vocabularies of e0 differ from the base's (base); jmerge merges models of one "
     "vocabulary (mergekit's embedding-row remapping is not implemented)"),
    (None, MODELS + "tokenizer: {source: base, pad_to_multiple_of: 8}\n",
     "`tokenizer.pad_to_multiple_of` (mergekit's new-token embeddings) is not supported"),
    (None, MODELS + "tokenizer_source: base\ntokenizer: {source: base}\n",
     "give one of `tokenizer_source` and `tokenizer` (mergekit refuses both)"),
    (None, MODELS + "chat_template: chatml\n",
     "`chat_template: chatml`: jmerge takes a Jinja template or `auto`, not mergekit's built-in template names"),
])
def test_conflicting_vocabularies_and_unsupported_keys_are_refused(root, setup, text, message):
    if setup:
        setup(root)
    with pytest.raises(config.ConfigError, match="^" + re.escape(message) + "$"):
        config.plan_from_yaml(text)
