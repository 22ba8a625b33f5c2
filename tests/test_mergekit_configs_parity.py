"""mergekit 0.1.5 and jmerge on mergekit's own test configs and its config language (slices,
gradients, filters, passthrough) on tiny random Llama, Mistral, Qwen2 and GPT-2 models
(bench/mergekit_configs.py): the same tensors and config.json; skipped without mergekit's venv."""

import json
import subprocess

import pytest

from bench import mergekit_bench, mergekit_configs
from jmerge.config import settings

PYTHON = mergekit_bench.VENV / "bin" / "python"
needs_mergekit = pytest.mark.skipif(not (mergekit_bench.VENV / "bin" / "mergekit-yaml").exists(),
                                    reason=f"no mergekit venv at {mergekit_bench.VENV} (`python -m bench.mergekit_bench`)")
CASES = ["passthrough: stack, slices [0, 6] x 2", "passthrough: scale with filter (o_proj: 0)", "ties density 0.3",
         "model_stock filter_wise", "slices: frankenmerge e0 [0, 4] + e1 [2, 6]",
         "slices + gradient t with filters (examples/gradient-slerp.yml)",
         "slices: two slices, ties with a density gradient per slice", "models: weight gradient + filter", "nuslerp"]


@needs_mergekit
def test_mergekit_configs_give_mergekits_tensors_and_config():
    cases = [(n, a, body, ("float32",), kind) for n, a, body, _, kind in mergekit_configs.CASES if n in CASES]
    assert len(cases) == len(CASES)
    for row in mergekit_configs.run_cases(mergekit_bench.VENV, cases):
        assert "max" in row, row
        assert row["max"] < 1e-6 and not row["only"], row
        assert row["config"][0] == row["config"][1], row


SETTINGS = [
    ([0, 0.5, 0.3, 0.7, 1], "model.layers.1.mlp.up_proj.weight", 0.3),
    ([0, 0.5, 0.3, 0.7, 1], "x", 0.9),
    ([1.0, 0.25], "x", 0.4),
    ([True, False, True], "x", 0.7),
    (["a", "b"], "x", 0.99),
    ([{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}], "model.layers.0.self_attn.q_proj.weight", 0.6),
    ([{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}], "model.layers.0.mlp.up_proj.weight", 0.6),
    ([{"filter": "self_attn", "value": 0.1}], "lm_head.weight", 0.0),
    ({"filter": "*", "value": [2, 4]}, "lm_head.weight", 0.5),
    (7, "x", 0.2),
]

MERGEKIT_EVALUATE = """
import json, sys
from mergekit.config import ConditionalParameter, evaluate_setting
def parse(s):
    if isinstance(s, dict):
        return ConditionalParameter(**s)
    if isinstance(s, list) and s and isinstance(s[0], dict):
        return [ConditionalParameter(**c) for c in s]
    return s
print(json.dumps([evaluate_setting(n, parse(s), t, validate=lambda v: v) for s, n, t in json.loads(sys.stdin.read())]))
"""


@needs_mergekit
def test_settings_evaluate_as_mergekits_evaluate_setting():
    out = subprocess.run([str(PYTHON), "-c", MERGEKIT_EVALUATE], input=json.dumps(SETTINGS), capture_output=True,
                         text=True, check=True).stdout
    assert [settings.evaluate(s, n, t) for s, n, t in SETTINGS] == pytest.approx(json.loads(out))
