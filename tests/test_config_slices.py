"""mergekit's slices / layer_range, passthrough, gradients and filter conditionals, and the
output config.json, against numpy references on tiny Llama-named checkpoints."""

import json
import re
import warnings

import numpy as np
import pytest

from jmerge import cli, config
from jmerge.config import settings, slices
from jmerge.config.hf_modules import WHOLE
from jmerge.io import safetensors_io as st

LAYERS = 4
PARTS = {"self_attn.q_proj.weight": (8, 8), "mlp.up_proj.weight": (12, 8), "input_layernorm.weight": (8,)}
OUTER = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,), "lm_head.weight": (16, 8)}


def tensors(seed, layers=LAYERS):
    r = np.random.default_rng(seed)
    shapes = {**OUTER, **{f"model.layers.{i}.{p}": s for i in range(layers) for p, s in PARTS.items()}}
    return {n: r.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


@pytest.fixture()
def root(tmp_path, monkeypatch):
    """base, a, b: Llama-named 4-layer float32 HF directories (config.json with num_hidden_layers)."""
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(("base", "a", "b")):
        (tmp_path / name).mkdir()
        st.save_safetensors(tmp_path / name, tensors(seed))
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"model_type": "llama", "num_hidden_layers": LAYERS, "torch_dtype": "float32", "hidden_size": 8}))
    return tmp_path


def run(root, text):
    (root / "merge.yaml").write_text(text)
    assert cli.main(["run", str(root / "merge.yaml"), str(root / "out"), "--no-progress"]) == 0
    return st.load(root / "out"), json.loads((root / "out" / "config.json").read_text())


def load(root, name):
    return st.load(root / name)


@pytest.mark.parametrize("setting, tensor, t, expected", [
    (0.5, "x", 0.3, 0.5),
    ([0.0, 1.0], "x", 0.25, 0.25),
    ([0, 0.5, 0.3, 0.7, 1], "x", 0.3, 0.8 * 0.5 + 0.2 * 0.3),  # t (n-1) = 1.2: between values 1 and 2
    ([0, 0.5, 0.3, 0.7, 1], "x", 1.0, 1),
    ([True, False], "x", 0.6, True),  # non-numbers are picked, not interpolated: v[int(0.6)]
    (["a", "b", "c"], "x", 1.0, "c"),
    ([{"filter": "self_attn", "value": 0.1}, {"value": 0.9}], "model.layers.0.self_attn.q_proj.weight", 0.0, 0.1),
    ([{"filter": "self_attn", "value": 0.1}, {"value": 0.9}], "model.layers.0.mlp.up_proj.weight", 0.0, 0.9),
    ([{"filter": "mlp", "value": [0, 1]}], "model.layers.0.mlp.up_proj.weight", 0.5, 0.5),
    ([{"filter": "mlp", "value": [0, 1]}], "model.layers.0.self_attn.q_proj.weight", 0.5, None),  # next scope
    ({"filter": "*", "value": 2}, "anything", 0.0, 2),
    ([{"filter": "attn", "value": 3}], "", 0.0, None),  # an empty name matches no filter (mergekit)
])
def test_settings_evaluate_like_mergekit(setting, tensor, t, expected):
    assert settings.evaluate(setting, tensor, t) == pytest.approx(expected) if expected is not None \
        else settings.evaluate(setting, tensor, t) is None


def test_passthrough_frankenmerge_renumbers_layers_and_sets_the_layer_count(root):
    for name in ("a", "b"):  # a per-layer list (Qwen2's layer_types): the output's follows its layers
        cfg = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**cfg, "layer_types": [f"{name}{i}" for i in range(LAYERS)]}))
    out, cfg = run(root, "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 3]\n"
                         "  - sources:\n      - model: b\n        layer_range: [1, 4]\nmerge_method: passthrough\n")
    a, b = load(root, "a"), load(root, "b")
    assert cfg == {"model_type": "llama", "num_hidden_layers": 6, "torch_dtype": "float32", "hidden_size": 8,
                   "layer_types": ["a0", "a1", "a2", "b1", "b2", "b3"]}
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"],  # before the layers: the first slice's
                "model.norm.weight": b["model.norm.weight"], "lm_head.weight": b["lm_head.weight"]}  # after: the last's
    for p in PARTS:
        expected.update({f"model.layers.{j}.{p}": a[f"model.layers.{j}.{p}"] for j in range(3)})
        expected.update({f"model.layers.{3 + j}.{p}": b[f"model.layers.{1 + j}.{p}"] for j in range(3)})
    assert out.keys() == expected.keys()
    for n, x in expected.items():
        np.testing.assert_array_equal(out[n], x, err_msg=n)


def test_passthrough_scale_filter_zeroes_the_filtered_tensors(root):
    # mergekit's test_passthrough_scale: scale 0 for o_proj-like tensors (here q_proj), 1 elsewhere
    out, _ = run(root, "models:\n  - model: a\n    parameters:\n      scale:\n        - filter: q_proj\n"
                       "          value: 0\n        - value: 1\nmerge_method: passthrough\n")
    a = load(root, "a")
    for n, x in a.items():
        np.testing.assert_array_equal(out[n], 0 * x if "q_proj" in n else x, err_msg=n)


def test_per_slice_task_arithmetic_with_a_gradient_over_each_slice(root):
    text = ("slices:\n"
            "  - sources:\n      - model: base\n        layer_range: [0, 2]\n"
            "      - model: a\n        layer_range: [0, 2]\n        parameters: {weight: [1.0, 0.0]}\n"
            "  - sources:\n      - model: base\n        layer_range: [1, 4]\n"
            "      - model: b\n        layer_range: [1, 4]\n"
            "    parameters: {weight: [0.0, 1.0]}\n"
            "base_model: base\nmerge_method: task_arithmetic\nparameters: {weight: 0.5}\ndtype: float32\n")
    out, cfg = run(root, text)
    base, a, b = load(root, "base"), load(root, "a"), load(root, "b")
    assert cfg["num_hidden_layers"] == 5
    expected = {}
    for n in OUTER:  # outside the layers: t = 0; before from slice 0 (weight 1 at t=0), after from slice 1 (0)
        src, w = (a, 1.0) if n == "model.embed_tokens.weight" else (b, 0.0)
        expected[n] = base[n] + w * (src[n] - base[n])
    for p in PARTS:
        for j, w in enumerate([1.0, 0.0]):  # slice 0: a's gradient, t = 0, 1
            expected[f"model.layers.{j}.{p}"] = base[f"model.layers.{j}.{p}"] + w * (a[f"model.layers.{j}.{p}"]
                                                                                   - base[f"model.layers.{j}.{p}"])
        for j, w in enumerate([0.0, 0.5, 1.0]):  # slice 1: its own gradient over 3 layers, t = 0, 0.5, 1
            src = f"model.layers.{1 + j}.{p}"
            expected[f"model.layers.{2 + j}.{p}"] = base[src] + w * (b[src] - base[src])
    assert out.keys() == expected.keys()
    for n, x in expected.items():
        np.testing.assert_allclose(out[n], x, rtol=1e-6, atol=1e-6, err_msg=n)


def test_models_config_with_filters_and_gradients_per_tensor(root):
    text = ("models:\n  - model: a\n    parameters:\n      weight:\n        - filter: self_attn\n"
            "          value: [0.0, 0.3, 0.9]\n        - value: 0.5\n  - model: b\n    parameters: {weight: 0.25}\n"
            "base_model: base\nmerge_method: task_arithmetic\n")
    out, cfg = run(root, text)
    base, a, b = load(root, "base"), load(root, "a"), load(root, "b")
    assert cfg["num_hidden_layers"] == LAYERS  # unchanged

    def w_a(name, t):
        if "self_attn" not in name:
            return 0.5
        s = t * 2
        i = min(int(s), 1)
        return (1 - (s - i)) * [0.0, 0.3, 0.9][i] + (s - i) * [0.0, 0.3, 0.9][i + 1]

    for n in base:
        t = int(n.split(".")[2]) / (LAYERS - 1) if n.startswith("model.layers.") else 0.0
        ref = base[n] + w_a(n, t) * (a[n] - base[n]) + 0.25 * (b[n] - base[n])
        np.testing.assert_allclose(out[n], ref, rtol=1e-6, atol=1e-6, err_msg=n)


SLICE = "  - sources:\n      - model: {m}\n        layer_range: [{lo}, {hi}]\n"


@pytest.mark.parametrize("text, message", [
    ("slices:\n" + SLICE.format(m="a", lo=0, hi=2) + SLICE.format(m="b", lo=2, hi=5) + "merge_method: passthrough\n",
     "slices[1]: layer_range [2, 5] of b is out of bounds (it has 4 layers)"),
    ("slices:\n" + SLICE.format(m="a", lo=0, hi=2) + "      - model: b\n        layer_range: [0, 3]\n"
     "merge_method: linear\n",
     "slices[0]: its sources' layer ranges have unequal lengths [2, 3] (a [0, 2], b [0, 3])"),
    ("slices:\n" + SLICE.format(m="a", lo=0, hi=2) + "merge_method: ties\nbase_model: base\n",
     "slices[0]: base_model 'base' is not among its sources"),
    ("slices:\n" + SLICE.format(m="a", lo=0, hi=2) + "models:\n  - model: a\nmerge_method: passthrough\n",
     "give exactly one of `models`, `slices` and `modules`"),
    ("slices:\n" + SLICE.format(m="a", lo=0, hi=2) + "      - model: base\n        layer_range: [0, 2]\n"
     "base_model: base\nmerge_method: magmax\n",
     "slices apply to mergekit's methods, not 'magmax'"),
    ("models:\n  - model: a\n    parameters: {weight: [0, 0.1, 0.2, 0.3, 0.4]}\nbase_model: base\n"
     "merge_method: task_arithmetic\n",
     "`models[a].parameters.weight`: a gradient of 5 values cannot be spread over 4 layers"),
    ("models:\n  - model: a\nbase_model: base\nmerge_method: task_arithmetic\n"
     "parameters:\n  lambda:\n    - filtr: mlp\n      value: 1\n",
     "`parameters.lambda[0]`: a conditional is {filter: <name part>, value: ...}, got {'filtr': 'mlp', 'value': 1}"),
    ("models:\n  - model: a\nbase_model: base\nmerge_method: task_arithmetic\nparameters: {lambda: []}\n",
     "`parameters.lambda`: expected a value, a gradient (list of values) or a list of {filter, value} entries, got []"),
    ("models:\n  - model: a\nbase_model: base\nmerge_method: task_arithmetic\nparameters: {lambda: [0.5, 1]}\n"
     "jmerge: {lwptv: {layers: llama}}\n",
     "`jmerge.lwptv` needs whole models; it does not combine with gradients and filters"),
])
def test_bad_slices_and_settings_are_refused_before_any_tensor_is_read(root, text, message):
    with pytest.raises(config.ConfigError, match="^" + re.escape(message) + "$"):
        config.plan_from_yaml(text)


def test_a_bad_value_at_some_layer_is_refused_while_planning(root):
    plan = config.plan_from_yaml("models:\n  - model: a\n    parameters: {weight: 1.0, density: [0.5, 1.5]}\n"
                                 "base_model: base\nmerge_method: ties\n")
    with pytest.raises(config.ConfigError, match=r"^models, tensor 'model\.layers\.2\.[a-z_.]+' \(t = 0\.666667\): "
                       + re.escape("merge_method 'ties': density=1.1666666666666667 is outside (0, 1.0]") + "$"):
        slices.jobs(plan)


def test_a_filter_matching_no_tensor_warns_naming_it(root):
    plan = config.plan_from_yaml("models:\n  - model: a\n    parameters:\n      scale:\n        - filter: o_proj\n"
                                 "          value: 0\n        - value: 1\nmerge_method: passthrough\n")
    with pytest.warns(config.ConfigWarning, match="^" + re.escape("filter 'o_proj' matches no tensor of the output") + "$"):
        jobs, layers = slices.jobs(plan)
    assert [(p.name, i) for p, i in layers[WHOLE]] == [("a", i) for i in range(LAYERS)]
    assert len(jobs) == len(OUTER) + LAYERS * len(PARTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slices.jobs(config.plan_from_yaml("models:\n  - model: a\n    parameters: {scale: [{filter: q_proj, value: 0}, "
                                          "{value: 1}]}\nmerge_method: passthrough\n"))


def test_source_tensors_are_checked_before_reading(root):
    st.save_safetensors(root / "b", {**tensors(2), "model.layers.1.mlp.up_proj.weight": np.zeros((8, 8), np.float32)},
                        )
    plan = config.plan_from_yaml("slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n"
                                 "      - model: b\n        layer_range: [0, 2]\nmerge_method: linear\n")
    with pytest.raises(config.ConfigError, match="^" + re.escape(
            "b: tensor 'model.layers.1.mlp.up_proj.weight' has shape (8, 8) (float32), the base's (12, 8) (float32) "
            "(output tensor 'model.layers.1.mlp.up_proj.weight')") + "$"):
        slices.jobs(plan)


def test_config_json_gets_the_output_dtype_and_bf16_inputs_written_as_float32_keep_float32(root):
    for name in ("base", "a", "b"):  # bf16 copies of the models
        (root / f"{name}16").mkdir()
        st.save_safetensors(root / f"{name}16", {n: x.astype(st.numpy_dtype("bfloat16")) for n, x in load(root, name).items()})
        (root / f"{name}16" / "config.json").write_text((root / name / "config.json").read_text())
    out, cfg = run(root, "models:\n  - model: a16\n    parameters: {weight: 0.3}\n  - model: b16\n"
                         "    parameters: {weight: 0.6}\nbase_model: base16\nmerge_method: task_arithmetic\n"
                         "dtype: float32\n")
    assert cfg["torch_dtype"] == "float32"
    base, a, b = (load(root, f"{n}16") for n in ("base", "a", "b"))
    rounded = 0
    for n in base:
        b0, x, y = (m[n].astype(np.float32) for m in (base, a, b))
        ref = b0 + 0.3 * (x - b0) + 0.6 * (y - b0)
        assert out[n].dtype == np.float32
        np.testing.assert_allclose(out[n], ref, rtol=1e-6, atol=1e-6, err_msg=n)
        rounded += int(np.sum(out[n] != ref.astype(st.numpy_dtype("bfloat16")).astype(np.float32)))
    assert rounded > 0  # not bf16-rounded
    _, cfg16 = run_again(root, "models:\n  - model: a\n  - model: b\nbase_model: base\nmerge_method: task_arithmetic\n"
                               "dtype: bfloat16\n")
    assert cfg16["torch_dtype"] == "bfloat16"


def run_again(root, text):
    import shutil

    shutil.rmtree(root / "out")
    return run(root, text)


def test_compute_dtype_model_rounds_the_inputs_to_dtype_first_as_mergekit(root):
    """mergekit casts every input to `dtype` before merging; `jmerge: {compute_dtype: model}` does too
    (its default merges the float32 inputs and rounds once)."""
    bf16 = st.numpy_dtype("bfloat16")
    text = ("models:\n  - model: a\n    parameters: {weight: 0.6}\n  - model: b\n    parameters: {weight: 0.4}\n"
            "merge_method: linear\ndtype: bfloat16\n")
    a, b = load(root, "a"), load(root, "b")
    default, _ = run(root, text)
    model, cfg = run_again(root, text + "jmerge: {compute_dtype: model}\n")
    assert cfg["torch_dtype"] == "bfloat16"
    same = {"model": 0, "default": 0}
    total = 0
    for n in a:
        x, y = (m[n].astype(bf16).astype(np.float32) for m in (a, b))
        want = ((0.6 * x + 0.4 * y) / np.float32(1.0)).astype(bf16)  # mergekit's linear: float32 sum of the bf16 inputs
        assert model[n].dtype == bf16
        same["model"] += int(np.sum(model[n] == want))
        same["default"] += int(np.sum(default[n] == want))
        total += x.size
    # 933 of 936 measured: jmerge sums base + w (x - base) where mergekit sums w x, in float32 either way
    assert same["model"] >= 0.99 * total and same["default"] < 0.9 * total, (same, total)
