"""mergekit's ``model+lora`` references in `jmerge run` configs (jmerge.lora.open_with_lora)."""

import json

import numpy as np
import pytest

from jmerge import cli
from jmerge.io import peft
from jmerge.io import safetensors_io as st

NAMES = {"model.layers.0.self_attn.q_proj.weight": (6, 6), "model.layers.0.mlp.up_proj.weight": (8, 6),
         "model.norm.weight": (6,)}


@pytest.fixture()
def models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = np.random.default_rng(0)
    base = {n: r.standard_normal(s).astype(np.float32) for n, s in NAMES.items()}
    expert = {n: x + 0.1 * r.standard_normal(x.shape).astype(np.float32) for n, x in base.items()}
    for name, tensors in (("base", base), ("e0", expert)):
        (tmp_path / name).mkdir()
        st.save_safetensors(tmp_path / name, tensors)
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    a, b = r.standard_normal((2, 6)).astype(np.float32), r.standard_normal((6, 2)).astype(np.float32)
    peft.save_adapter(tmp_path / "lora", {"model.layers.0.self_attn.q_proj": (a, b)}, extra_config={"lora_alpha": 4})
    return tmp_path, base, expert, 2.0 * (b @ a)


def _run(tmp_path, text):
    (tmp_path / "m.yaml").write_text(text)
    return cli.main(["run", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--no-progress"])


def test_model_plus_lora_is_the_model_with_the_update(models):
    tmp_path, base, expert, delta = models
    q = "model.layers.0.self_attn.q_proj.weight"
    assert _run(tmp_path, "models:\n  - model: e0\n    parameters: {weight: 0.5}\n  - model: base+lora\n"
                          "    parameters: {weight: 0.5}\nmerge_method: linear\ndtype: float32\n") == 0
    out = st.load(tmp_path / "out")
    np.testing.assert_allclose(out[q], 0.5 * expert[q] + 0.5 * (base[q] + delta), rtol=1e-6, atol=1e-6)
    n = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(out[n], 0.5 * expert[n] + 0.5 * base[n], rtol=1e-6, atol=1e-6)


def test_lora_on_the_base_model(models):
    tmp_path, base, expert, delta = models
    q = "model.layers.0.self_attn.q_proj.weight"
    assert _run(tmp_path, "models:\n  - model: e0\nbase_model: base+lora\nmerge_method: task_arithmetic\n"
                          "parameters: {weight: 1.0}\ndtype: float32\n") == 0
    np.testing.assert_allclose(st.load(tmp_path / "out")[q], expert[q], rtol=1e-6, atol=1e-6)  # θ0' + (θ1 - θ0') = θ1


def test_bad_lora_references(models, capsys):
    tmp_path, *_ = models
    cfg = json.loads((tmp_path / "lora" / peft.CONFIG_NAME).read_text())
    (tmp_path / "lora" / peft.CONFIG_NAME).write_text(json.dumps({**cfg, "target_modules": ["q_proj", "k_proj"]}))
    assert _run(tmp_path, "models:\n  - model: base+lora\n  - model: e0\nmerge_method: linear\n") != 0
    assert "error: model base+lora: lora: target_modules ['k_proj'] match no module of the base model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert _run(tmp_path, "models:\n  - model: base+lora+lora\n  - model: e0\nmerge_method: linear\n") != 0
    assert ("model: model reference 'base+lora+lora': write path/to/model+path/to/lora (one '+')"
            in capsys.readouterr().err)
