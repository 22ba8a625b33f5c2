"""examples/: the SmolLM2 DivMerge YAML, as committed, runs through `jmerge run` on a tiny random
Llama (RoPE base 1e5, tied head) laid out as its README says, to an HF directory and to GGUF."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jmerge import cli
from jmerge.io import gguf as gg
from jmerge.io import safetensors_io as st

from helpers import tiny_llama, write_llama_dir

pytest.importorskip("transformers")
pytestmark = pytest.mark.standard_promotion("the learn path (optax 0.2.8's adam computes decay ** count) is not strict-promotion clean")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2_divmerge"
# the experts the YAML names (models/<task>)
TASKS = tuple(Path(m["model"]).name for m in yaml.safe_load((EXAMPLE / "divmerge.yml").read_text())["models"])


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example's YAML and prompts, with a tiny base and one expert per task in models/."""
    root = tmp_path_factory.mktemp("example") / "smollm2_divmerge"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("models", "*.md", "*.py"))
    base = tiny_llama(root / "models" / "base", seed=0, tied=True, rope_theta=100000.0)
    cfg = {**json.loads((base / "config.json").read_text()), "max_position_embeddings": 256}  # prompt_tokens 128
    (base / "config.json").write_text(json.dumps(cfg))
    tensors = st.load(base)
    for i, task in enumerate(TASKS):
        rng = np.random.default_rng(20 + i)
        write_llama_dir(root / "models" / task, cfg,
             {n: a + 0.3 * np.abs(a).mean() * rng.standard_normal(a.shape).astype(np.float32) for n, a in tensors.items()})
    return root


def _check_output():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_output", EXAMPLE / "check_output.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smollm2_divmerge_example_runs_to_hf_and_gguf(example, tmp_path, capsys):
    yml = example / "divmerge.yml"
    assert cli.main(["run", str(yml), str(tmp_path / "merged"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "merged" / "coefficients.json").read_text())
    gamma = np.asarray(saved["coefficients"])
    assert saved["method"] == "divmerge" and saved["granularity"] == "layer"
    assert saved["layer_names"] == ["embeddings", "layer.0", "layer.1", "final_norm"] and gamma.shape == (len(TASKS), 4)
    assert saved["steps_per_epoch"] == 4 and len(saved["losses"]) == 12  # 16 prompts, 4 per step, 3 epochs
    assert np.abs(gamma - 1 / len(TASKS)).max() > 0.005  # learning moved Γ from 1/K
    merged = st.load(tmp_path / "merged")
    assert "lm_head.weight" not in merged and (tmp_path / "merged" / "tokenizer.json").is_file()

    assert cli.main(["run", str(yml), str(tmp_path / "merged.gguf"), "--out-format", "gguf", "--no-progress"]) == 0
    back = gg.open_gguf(tmp_path / "merged.gguf")
    assert back.fields["jmerge.method"] == "task_arithmetic"
    for name, x in back.items():  # F32 GGUF: the same learned merge, read back through jmerge
        np.testing.assert_array_equal(x, merged[name])

    # one learning run to both formats: the HF output converted, its merge record carried along
    assert cli.main(["convert", str(tmp_path / "merged"), str(tmp_path / "converted.gguf")]) == 0
    conv = gg.open_gguf(tmp_path / "converted.gguf")
    assert conv.fields["jmerge.config"] == yml.read_text()
    assert json.loads(conv.fields["jmerge.coefficients"])["coefficients"] == saved["coefficients"]
    for name, x in conv.items():
        np.testing.assert_array_equal(x, merged[name])

    capsys.readouterr()
    assert _check_output().main([str(tmp_path / "merged"), str(tmp_path / "merged.gguf")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "rope_theta 100000.0, tied head True" in lines[0]
    k = len(TASKS)
    assert sum(l.startswith("  HF ") for l in lines) == k and sum(l.startswith("  GGUF ") for l in lines) == k
    assert "max |GGUF - HF| over all tensors 0" in lines[1 + k]
    assert [l.split(" -> ")[1] for l in lines if l.startswith("  HF ")] == \
           [l.split(" -> ")[1] for l in lines if l.startswith("  GGUF ")]
