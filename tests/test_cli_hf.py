"""End to end with transformers: tiny random GPT-2, BERT and Llama saved as PyTorch-layout
safetensors HF directories, merged by `jmerge run`, loaded back by transformers' own loader,
logits checked against a reference merge computed in numpy on the Flax params."""

import json

import jax
import numpy as np
import pytest

from helpers import tiny_transformer, write_pt_dir
from reference import mergekit_gta
from jmerge import cli
from jmerge.io import safetensors_io as st

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.standard_promotion("transformers' Flax models mix int32 and bool")

IDS = np.array([[5, 3, 9, 1, 7, 2, 8, 4]], np.int32)


def _logits(model, params):
    out = model(IDS, params=params)
    return np.asarray(out.logits if hasattr(out, "logits") else out.last_hidden_state)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_jmerge_run_output_loads_in_transformers(tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_transformer(kind)
    r = np.random.default_rng(1)
    base = jax.tree.map(lambda x: np.asarray(x) + 0.02 * r.standard_normal(x.shape).astype(np.float32), model.params)
    experts = [jax.tree.map(lambda x: x + 0.05 * r.standard_normal(x.shape).astype(np.float32), base) for _ in range(2)]
    for name, params in [("base", base), ("ft0", experts[0]), ("ft1", experts[1])]:
        write_pt_dir(tmp_path / name, model, params, shard_size=6000)
    (tmp_path / "ties.yaml").write_text(
        "models:\n"
        "  - {model: ft0, parameters: {weight: 1.0}}\n"
        "  - {model: ft1, parameters: {weight: 0.6}}\n"
        "base_model: base\nmerge_method: ties\nparameters: {density: 0.4, lambda: 0.8}\ndtype: float32\n"
    )
    assert cli.main(["run", "ties.yaml", "merged", "--no-progress", "--shard-size", "8KB"]) == 0
    assert (tmp_path / "merged" / st.INDEX_NAME).exists()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == model.config.model_type

    # transformers' loader takes a single-file PT checkpoint (its Flax loader does not read
    # sharded safetensors, checked with transformers 4.57.6): reshard with jmerge convert
    assert cli.main(["convert", "merged", "merged1", "--to", "safetensors", "--shard-size", "1GB"]) == 0
    loaded = type(model).from_pretrained(tmp_path / "merged1")
    reference = jax.tree.map(lambda b, *es: mergekit_gta(b, list(es), [1.0, 0.6], [0.4, 0.4], lam=0.8, normalize=True,
                                                         consensus=True, sparsify=True), base, *experts)
    np.testing.assert_allclose(_logits(loaded, loaded.params), _logits(model, reference), rtol=0, atol=1e-5)
    assert not np.allclose(_logits(model, reference), _logits(model, base), atol=1e-3)  # the merge did something
