"""`jmerge run` with a `jmerge.learn` block: DivMerge / AdaMerging coefficients for a tiny
random transformers Flax GPT-2 saved as PyTorch-layout safetensors, then the merge written."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_llama, write_llama_dir
from jmerge import cli, config, lwptv
from jmerge.io import safetensors_io as st

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.standard_promotion("transformers' Flax GPT-2 mixes int32 and bool")


def _config(root, method="divmerge", models=("moved", "same"), **extra):
    learn = {"prompts": ["p1.jsonl", "p2.jsonl"][: len(models)], "method": method, "samples": 8, "prompt_tokens": 8,
             "max_new_tokens": 3, "epochs": 15, "learning_rate": 0.05, **extra}
    text = json.dumps({"models": [{"model": m} for m in models], "base_model": "base",
                       "merge_method": "task_arithmetic", "jmerge": {"learn": learn}})
    path = root / f"cfg-{method}-{len(models)}.yml"
    path.write_text(text)
    return path


def test_run_learns_divmerge_coefficients_and_writes_that_merge(gpt2_learn_dirs, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["run", str(_config(gpt2_learn_dirs)), str(out), "--no-progress"]) == 0
    saved = json.loads((out / "coefficients.json").read_text())
    gamma = np.asarray(saved["coefficients"])
    assert saved["method"] == "divmerge" and gamma.shape == (2,)
    assert abs(gamma[0] - 0.5) > 0.05 and gamma[1] == pytest.approx(0.5)  # τ_same = 0: no gradient
    base, moved, merged = (st.load(p) for p in (gpt2_learn_dirs / "base", gpt2_learn_dirs / "moved", out))
    for name, b in base.items():  # the written tensors are θ0 + Σ Γ_t τ_t with the saved Γ
        np.testing.assert_allclose(merged[name], b + np.float32(gamma[0]) * (moved[name] - b), rtol=1e-5, atol=1e-6)
    assert "Learned coefficients" in (out / "README.md").read_text()
    assert (out / "config.json").exists()


def test_one_expert_coefficient_climbs_to_the_expert(gpt2_learn_dirs, tmp_path):
    """With one expert the JS optimum is the expert itself (Γ = 1); from Γ = 0.2 learning climbs."""
    out = tmp_path / "merged"
    assert cli.main(["run", str(_config(gpt2_learn_dirs, models=("moved",), init=0.2)), str(out), "--no-progress"]) == 0
    saved = json.loads((out / "coefficients.json").read_text())
    losses, per_epoch = np.asarray(saved["losses"]), saved["steps_per_epoch"]
    assert saved["coefficients"][0] > 0.6 and losses[-per_epoch:].mean() < 0.5 * losses[:per_epoch].mean()


def test_run_learns_from_the_checkpoints_it_opened(gpt2_learn_dirs, tmp_path, header_reads):
    """One pipeline: the learn path takes the checkpoints ``open_inputs`` opened, so each input's
    header is read once per ``jmerge run``."""
    cfg = _config(gpt2_learn_dirs, models=("moved",), epochs=1)
    assert cli.main(["run", str(cfg), str(tmp_path / "merged"), "--no-progress"]) == 0
    assert sorted(header_reads) == [gpt2_learn_dirs / m / "model.safetensors" for m in ("base", "moved")]


def test_run_learns_layer_level_adamerging(gpt2_learn_dirs, tmp_path):
    """AdaMerging with one Γ per task and layer (the gpt2 preset): the entropy falls and Γ of the
    expert that moved leaves its init (0.3) in every layer, by different amounts; Γ of the expert
    equal to the base gets no gradient. The written tensors are θ0 + Σ_t Γ[t, layer] τ_t, the layer
    of each PyTorch tensor found here by the preset on the PyTorch names (the CLI maps Flax paths)."""
    out = tmp_path / "merged"
    cfg = _config(gpt2_learn_dirs, "adamerging", granularity="layer", layers="gpt2", learning_rate=0.01, epochs=2)
    assert cli.main(["run", str(cfg), str(out), "--no-progress"]) == 0
    saved = json.loads((out / "coefficients.json").read_text())
    gamma, names = np.asarray(saved["coefficients"]), saved["layer_names"]
    assert saved["method"] == "adamerging" and names == ["embeddings", "layer.0", "layer.1", "final_norm"]
    assert gamma.shape == (2, 4) and np.all((gamma >= 0) & (gamma <= 1))
    assert np.all(np.abs(gamma[0] - 0.3) > 1e-3) and np.ptp(gamma[0]) > 1e-4 and np.all(gamma[1] == np.float32(0.3))
    losses, per_epoch = np.asarray(saved["losses"]), saved["steps_per_epoch"]
    assert losses[-per_epoch:].mean() < losses[:per_epoch].mean()
    base, moved, merged = (st.load(p) for p in (gpt2_learn_dirs / "base", gpt2_learn_dirs / "moved", out))
    grouping = lwptv.group(base, "gpt2")
    layer = {p: names.index(grouping.names[g]) for p, g in zip(grouping.leaf_paths, grouping.leaf_layer)}
    assert set(layer) == set(base) == set(merged)
    for name, b in base.items():
        g = np.float32(gamma[0, layer[name]])
        np.testing.assert_allclose(merged[name], b + g * (moved[name] - b), rtol=1e-5, atol=1e-6, err_msg=name)


def test_learn_block_bad_input_is_named(gpt2_learn_dirs):
    def plan(**learn):
        text = json.dumps({"models": [{"model": "moved"}, {"model": "same"}], "base_model": "base",
                           "merge_method": learn.pop("merge_method", "task_arithmetic"), "jmerge": {"learn": learn}})
        path = gpt2_learn_dirs / "bad.yml"
        path.write_text(text)
        return config.plan_from_yaml(path)

    with pytest.raises(config.ConfigError, match=re.escape(
            "`jmerge.learn.prompts` lists 1 files for 2 models (one per model, in the order of `models`)")):
        plan(prompts=["p1.jsonl"])
    with pytest.raises(config.ConfigError, match=re.escape(
            "`jmerge.learn` learns task-arithmetic coefficients, so merge_method must be task_arithmetic (or regmean / "
            "fisher, whose data the prompts are), not 'ties' with learn.method 'divmerge'")):
        plan(prompts=["p1.jsonl", "p2.jsonl"], merge_method="ties")
    with pytest.raises(config.ConfigError, match=re.escape(
            "invalid merge config:\n  unknown key `jmerge.learn.epoch`; did you mean 'epochs'? (known: batch_per_task, "
            "chat_template, epochs, granularity, init, layers, learning_rate, max_new_tokens, method, prompt_tokens, "
            "prompts, samples, seed)")):
        plan(prompts=["p1.jsonl", "p2.jsonl"], epoch=3)
    with pytest.raises(config.ConfigError, match=re.escape(
            f"jmerge.learn.prompts 'missing.jsonl' not found (looked in {Path.cwd()} and {gpt2_learn_dirs}); ")):
        plan(prompts=["p1.jsonl", "missing.jsonl"])
    with pytest.raises(config.ConfigError, match=re.escape(
            "invalid merge config:\n  `jmerge.learn.granularity`: Input should be 'task', 'layer' or 'tensor' (got 'block')")):
        plan(prompts=["p1.jsonl", "p2.jsonl"], granularity="block")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A tiny random Llama with RoPE base 1e5 and a tied head, two experts moved from it, text prompts."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama(root / "base", seed=0, tied=True, rope_theta=100000.0)
    tensors = st.load(base)
    for i, name in enumerate(("e1", "e2")):
        rng = np.random.default_rng(10 + i)
        moved = {n: a + 0.5 * np.abs(a).mean() * rng.standard_normal(a.shape).astype(np.float32) for n, a in tensors.items()}
        write_llama_dir(root / name, json.loads((base / "config.json").read_text()), moved)
    (root / "p1.txt").write_text("the theory is\nis the answer\nan apple\nthe end\n")
    (root / "p2.txt").write_text("on and on\nthe other\nanother one\nin the air\n")
    return root


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_run_learns_divmerge_on_a_llama_with_rope_theta_and_a_tied_head(llamas, tmp_path, granularity):
    learn = {"prompts": ["p1.txt", "p2.txt"], "method": "divmerge", "chat_template": True, "samples": 4,
             "prompt_tokens": 24, "max_new_tokens": 4, "epochs": 4, "learning_rate": 0.05, "granularity": granularity}
    cfg = llamas / f"llama-{granularity}.yml"
    cfg.write_text(json.dumps({"models": [{"model": "e1"}, {"model": "e2"}], "base_model": "base",
                               "merge_method": "task_arithmetic", "jmerge": {"learn": learn}}))
    out = tmp_path / "merged"
    assert cli.main(["run", str(cfg), str(out), "--no-progress"]) == 0
    saved = json.loads((out / "coefficients.json").read_text())
    gamma = np.asarray(saved["coefficients"])
    if granularity == "layer":  # the llama preset: embeddings, 2 blocks, final norm (the head is tied)
        assert saved["layer_names"] == ["embeddings", "layer.0", "layer.1", "final_norm"] and gamma.shape == (2, 4)
    assert np.abs(gamma - 0.5).max() > 0.01  # learning moved Γ from 1/K
    base, experts, merged = st.load(llamas / "base"), [st.load(llamas / e) for e in ("e1", "e2")], st.load(out)
    assert set(merged) == set(base) and "lm_head.weight" not in merged
    for name, b in base.items():  # θ0 + Σ Γ_t τ_t with the saved Γ of the tensor's layer
        layer = 0 if granularity == "task" else next(i for i, l in enumerate(("embed", "layers.0", "layers.1", "norm"))
                                                      if l in name)
        g = gamma if gamma.ndim == 1 else gamma[:, layer]
        want = b + sum(np.float32(g[t]) * (experts[t][name] - b) for t in range(2))
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 100000.0
    assert (out / "tokenizer.json").exists()
