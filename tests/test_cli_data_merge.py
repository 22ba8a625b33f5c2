"""`jmerge run` with merge_method regmean / fisher and a `jmerge.learn` block of prompts, on a tiny
random transformers Flax GPT-2 (jmerge.learn.causal_lm_data)."""

import json
import re

import numpy as np
import pytest

from jmerge import cli, config, learn
from jmerge import tree as jtree
from jmerge.io import flax_io
from jmerge.io import safetensors_io as st
from jmerge.learn import causal_lm

pytestmark = pytest.mark.standard_promotion("transformers' Flax GPT-2 mixes int32 and bool")

transformers = pytest.importorskip("transformers")


def _config(root, method, **params):
    text = json.dumps({"models": [{"model": "moved"}, {"model": "same"}], "base_model": "base", "merge_method": method,
                       "parameters": params, "dtype": "float32",
                       "jmerge": {"learn": {"prompts": ["p1.jsonl", "p2.jsonl"], "samples": 6, "prompt_tokens": 8}}})
    path = root / f"{method}.yml"
    path.write_text(text)
    return path


def test_regmean_run_is_the_library_merge(gpt2_learn_dirs, tmp_path):
    root = gpt2_learn_dirs
    lm = causal_lm.open_model(root / "base")
    out = tmp_path / "merged"
    assert cli.main(["run", str(_config(root, "regmean", alpha=0.9)), str(out), "--no-progress"]) == 0
    base, _ = lm.load(root / "base")
    tvs = [jtree.task_vector(base, lm.load(root / e)[0]) for e in ("moved", "same")]
    prompts = [causal_lm.prompt_array(causal_lm.read_prompts(root / f"p{t + 1}.jsonl", root / "base"), 6, 8, t, root)
               for t in range(2)]
    apply = lm.apply
    grams = learn.gram_matrices(jtree.apply(base, tvs[0]), apply, prompts[0])
    # GPT-2's Conv1D kernels, and the token embedding as the tied LM head (its lookup is a gather)
    assert {p.rsplit("/", 2)[-2] for p, _ in grams.axes} == {"c_attn", "c_proj", "c_fc", "wte"}
    assert dict(grams.axes)["transformer/wte/embedding"] == 1 and grams.untapped == ("transformer/wpe/embedding",)
    want = flax_io.flax_to_torch(learn.regmean(base, tvs, apply, prompts, alpha=0.9, batch_size=4))
    got = st.load(out)
    for name, x in want.items():
        np.testing.assert_allclose(got[name], x, rtol=1e-4, atol=1e-5, err_msg=name)


def test_data_merge_reads_each_header_once(gpt2_learn_dirs, tmp_path, header_reads):
    """The statistics are measured on the checkpoints ``open_inputs`` opened: one header read per input."""
    assert cli.main(["run", str(_config(gpt2_learn_dirs, "fisher")), str(tmp_path / "merged"), "--no-progress"]) == 0
    assert sorted(header_reads) == [gpt2_learn_dirs / m / "model.safetensors" for m in ("base", "moved", "same")]


def test_fisher_run_writes_a_weighted_mean(gpt2_learn_dirs, tmp_path):
    root = gpt2_learn_dirs
    out = tmp_path / "merged"
    assert cli.main(["run", str(_config(root, "fisher")), str(out), "--no-progress"]) == 0
    e1, e2, got = (st.load(p) for p in (root / "moved", root / "same", out))
    name = "transformer.h.0.attn.c_attn.weight"
    lo, hi = np.minimum(e1[name], e2[name]), np.maximum(e1[name], e2[name])
    assert np.all(got[name] >= lo - 1e-6) and np.all(got[name] <= hi + 1e-6)  # elementwise convex combination
    assert not np.allclose(got[name], (e1[name] + e2[name]) / 2, atol=1e-4)


def test_data_merge_config_errors(gpt2_learn_dirs):
    root = gpt2_learn_dirs
    cfg = json.loads(_config(root, "regmean").read_text())
    cfg["jmerge"]["learn"]["method"] = "divmerge"
    (root / "bad.yml").write_text(json.dumps(cfg))
    with pytest.raises(config.ConfigError, match="`jmerge.learn.method` is 'divmerge' but merge_method is 'regmean'"):
        config.plan_from_yaml(root / "bad.yml")
    with pytest.raises(config.ConfigError, match=re.escape("merge_method 'regmean': alpha=1.5 is outside [0, 1.0]")):
        config.plan_from_yaml(_config(root, "regmean", alpha=1.5))
    cfg = json.loads(_config(root, "regmean").read_text())
    del cfg["jmerge"]
    (root / "nodata.yml").write_text(json.dumps(cfg))
    with pytest.raises(config.ConfigError, match="regmean needs grams="):
        config.plan_from_yaml(root / "nodata.yml")
