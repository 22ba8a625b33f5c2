"""mergekit's ``modules:`` (each module of a multimodal checkpoint merged on its own) on tiny
LLaVA-named checkpoints, against numpy references per module; mergekit 0.1.5 itself on a tiny
Mistral3 (an architecture its JSON definitions know) when its venv is there."""

import json
import re
import subprocess

import numpy as np
import pytest

from bench import mergekit_bench, mergekit_configs
from jmerge import cli, config
from jmerge.io import safetensors_io as st

TEXT, VISION = 4, 3
TEXT_PARTS = {"self_attn.q_proj.weight": (8, 8), "mlp.up_proj.weight": (12, 8), "input_layernorm.weight": (8,)}
VISION_PARTS = {"self_attn.q_proj.weight": (8, 8), "mlp.fc1.weight": (12, 8), "layer_norm1.weight": (8,)}
TEXT_OUTER = {"language_model.model.embed_tokens.weight": (16, 8), "language_model.model.norm.weight": (8,),
              "language_model.lm_head.weight": (16, 8)}
VISION_OUTER = {"vision_tower.vision_model.embeddings.patch_embedding.weight": (8, 3, 2, 2),
                "vision_tower.vision_model.pre_layrnorm.weight": (8,), "vision_tower.vision_model.post_layernorm.weight": (8,)}
PROJECTOR = {"multi_modal_projector.linear_1.weight": (8, 8), "multi_modal_projector.linear_1.bias": (8,),
             "multi_modal_projector.linear_2.weight": (8, 8)}
TEXT_LAYER, VISION_LAYER = "language_model.model.layers.{}.{}", "vision_tower.vision_model.encoder.layers.{}.{}"
# transformers >= 4.52 writes LLaVA as model.language_model.*, model.vision_tower.*, ..., lm_head.*
NEW_LAYOUT = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def renamed(name, layout, pairs=NEW_LAYOUT):
    for old, new in pairs if layout == "new" else ():
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def shapes():
    return {**TEXT_OUTER, **VISION_OUTER, **PROJECTOR,
            **{TEXT_LAYER.format(i, p): s for i in range(TEXT) for p, s in TEXT_PARTS.items()},
            **{VISION_LAYER.format(i, p): s for i in range(VISION) for p, s in VISION_PARTS.items()}}


def write_llava(path, seed, layout="old", drop="", extra=None):
    r = np.random.default_rng(seed)
    path.mkdir()
    st.save_safetensors(path, {**{renamed(n, layout): r.standard_normal(s).astype(np.float32)
                                  for n, s in shapes().items() if not (drop and n.startswith(drop))}, **(extra or {})})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "torch_dtype": "float32",
        "text_config": {"model_type": "llama", "num_hidden_layers": TEXT},
        "vision_config": {"model_type": "clip_vision_model", "num_hidden_layers": VISION}}))


@pytest.fixture(params=["old", "new"])
def root(tmp_path, monkeypatch, request):
    """base, a, b: LLaVA-named float32 HF directories (4 text layers, 3 vision layers, a projector),
    in the layout before transformers 4.52 (``old``) or since (``new``)."""
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(("base", "a", "b")):
        write_llava(tmp_path / name, seed, request.param)
    return tmp_path


def run(root, text):
    (root / "merge.yaml").write_text(text)
    assert cli.main(["run", str(root / "merge.yaml"), str(root / "out"), "--no-progress"]) == 0
    return st.load(root / "out"), json.loads((root / "out" / "config.json").read_text())


def old_names(tensors):
    """``{old-layout name: tensor}`` of a checkpoint in either layout."""
    return {renamed(n, "new", [(new, old) for old, new in NEW_LAYOUT]): x for n, x in tensors.items()}


def load(root, name):
    return old_names(st.load(root / name))


MODULE_MODELS = """merge_method: task_arithmetic
base_model: base
modules:
  text_decoder:
    models:
      - model: a
        parameters: {weight: [0.2, 0.8]}
      - model: b
        parameters: {weight: 0.5}
  vision_tower:
    models:
      - model: b
        parameters: {weight: 1.0}
    parameters: {lambda: 0.25}
  multi_modal_projector:
    models:
      - model: a
        parameters: {weight: 0.3}
"""


def test_each_module_merged_with_its_own_models_parameters_and_layer_gradient(root):
    out, cfg = run(root, MODULE_MODELS)
    out = old_names(out)
    base, a, b = (load(root, n) for n in ("base", "a", "b"))
    assert sorted(out) == sorted(shapes())
    assert (cfg["text_config"]["num_hidden_layers"], cfg["vision_config"]["num_hidden_layers"]) == (TEXT, VISION)

    def reference(n):
        if n.startswith("language_model."):  # a's weight gradient over the module's own 4 layers
            m = re.match(r"language_model\.model\.layers\.(\d+)\.", n)
            t = int(m[1]) / (TEXT - 1) if m else 0.0
            return base[n] + (0.2 + 0.6 * t) * (a[n] - base[n]) + 0.5 * (b[n] - base[n])
        if n.startswith("vision_tower."):  # the module's lambda
            return base[n] + 0.25 * (b[n] - base[n])
        return base[n] + 0.3 * (a[n] - base[n])

    for n in shapes():
        np.testing.assert_allclose(out[n], reference(n), rtol=1e-6, atol=1e-6, err_msg=n)


FRANKENMERGE = """merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources:
          - model: a
            layer_range: [0, 3]
      - sources:
          - model: b
            layer_range: [1, 4]
  vision_tower:
    slices:
      - sources:
          - model: b
            layer_range: [1, 3]
  multi_modal_projector:
    models:
      - model: a
"""


def test_a_frankenmerge_within_a_module_numbers_its_layers_and_sets_its_layer_count(root):
    out, cfg = run(root, FRANKENMERGE)
    out = old_names(out)
    a, b = load(root, "a"), load(root, "b")
    assert cfg["text_config"]["num_hidden_layers"] == 6 and cfg["vision_config"]["num_hidden_layers"] == 2
    expected = {"language_model.model.embed_tokens.weight": a["language_model.model.embed_tokens.weight"],
                **{n: b[n] for n in ("language_model.model.norm.weight", "language_model.lm_head.weight")},
                **{n: b[n] for n in VISION_OUTER}, **{n: a[n] for n in PROJECTOR}}
    for p in TEXT_PARTS:
        expected.update({TEXT_LAYER.format(j, p): a[TEXT_LAYER.format(j, p)] for j in range(3)})
        expected.update({TEXT_LAYER.format(3 + j, p): b[TEXT_LAYER.format(1 + j, p)] for j in range(3)})
    for p in VISION_PARTS:
        expected.update({VISION_LAYER.format(j, p): b[VISION_LAYER.format(1 + j, p)] for j in range(2)})
    assert sorted(out) == sorted(expected)
    for n, x in expected.items():
        np.testing.assert_array_equal(out[n], x, err_msg=n)


def test_a_single_module_architecture_has_its_one_module_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        st.save_safetensors(tmp_path / name, {f"model.layers.{i}.mlp.up_proj.weight": r.standard_normal((4, 4)).astype(np.float32)
                                              for i in range(3)} | {"lm_head.weight": r.standard_normal((6, 4)).astype(np.float32)})
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3}))
    slices_ = "[{sources: [{model: a, layer_range: [0, 2]}]}, {sources: [{model: b, layer_range: [1, 3]}]}]"
    top, cfg = run(tmp_path, f"merge_method: passthrough\nslices: {slices_}\n")
    (tmp_path / "out").rename(tmp_path / "top")
    per_module, cfg_module = run(tmp_path, f"merge_method: passthrough\nmodules:\n  default:\n    slices: {slices_}\n")
    assert cfg_module == cfg and cfg["num_hidden_layers"] == 4
    assert sorted(per_module) == sorted(top)
    for n in top:
        np.testing.assert_array_equal(per_module[n], top[n], err_msg=n)


def modules_yaml(**modules):
    return "merge_method: linear\nmodules:\n" + "".join(f"  {name}:\n    {body}\n" for name, body in modules.items())


MODELS_A = "models: [{model: a}, {model: b}]"


@pytest.mark.parametrize("text, message", [
    (modules_yaml(vision_towr=MODELS_A),
     "modules.vision_towr: LlavaForConditionalGeneration has no module 'vision_towr'; did you mean 'vision_tower'? "
     "(modules: text_decoder, vision_tower, multi_modal_projector)"),
    (modules_yaml(text_decoder=MODELS_A, vision_tower=MODELS_A),
     "modules: multi_modal_projector not listed; mergekit 0.1.5 would leave 3 tensor(s) of a out of the output "
     "({m}multi_modal_projector.linear_1.bias, {m}multi_modal_projector.linear_1.weight, "
     "{m}multi_modal_projector.linear_2.weight)"),
    (modules_yaml(text_decoder=MODELS_A, vision_tower=MODELS_A, multi_modal_projector="slices: [{sources: [{model: a, "
                  "layer_range: [0, 1]}]}]"),
     "modules.multi_modal_projector.slices[0]: layer_range [0, 1] of a is out of bounds (it has 0 layers)"),
    (modules_yaml(text_decoder=MODELS_A, vision_tower="{}", multi_modal_projector=MODELS_A),
     "give exactly one of `modules.vision_tower.models` and `modules.vision_tower.slices`"),
    (modules_yaml(text_decoder=MODELS_A + "\n    merge_method: ties"),
     "invalid merge config:\n  unknown key `modules.text_decoder.merge_method` (known: models, parameters, slices)"),
    (modules_yaml(text_decoder=MODELS_A) + "models: [{model: a}]\n", "give exactly one of `models`, `slices` and `modules`"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2]}]}]\n",
     "a: slices and gradients need one stack of layers named <prefix>.<i>.<part> (prefix ending in layers, h or blocks); "
     "found: {lm}.layers, {m}vision_tower.vision_model.encoder.layers; merge each stack's module with `modules:`"),
])
def test_bad_modules_are_refused_before_any_tensor_is_read(root, text, message):
    new = "lm_head.weight" in st.open_checkpoint(root / "a").tensors
    message = message.format(m="model." if new else "", lm="model.language_model" if new else "language_model.model")
    with pytest.raises(config.ConfigError, match="^" + re.escape(message) + "$"):
        config.plan_from_yaml(text)


def test_modules_of_unknown_architectures_and_missing_tensors_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_llava(tmp_path / "a", 0)
    write_llava(tmp_path / "blind", 1, drop="vision_tower.")
    write_llava(tmp_path / "next", 2, extra={"image_newline": np.zeros(8, np.float32)})
    (tmp_path / "l").mkdir()
    st.save_safetensors(tmp_path / "l", {"model.layers.0.mlp.up_proj.weight": np.zeros((2, 2), np.float32)})
    (tmp_path / "l" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    cases = [
        (modules_yaml(text_decoder="models: [{model: l}]"),
         "modules.text_decoder: jmerge has no module map for LlamaForCausalLM, so its one module is `default` "
         "(multi-module architectures: Gemma3ForConditionalGeneration, LlavaForConditionalGeneration, "
         "Mistral3ForConditionalGeneration)"),
        (modules_yaml(text_decoder="models: [{model: blind}]", vision_tower="models: [{model: blind}]",
                      multi_modal_projector="models: [{model: blind}]"),
         "modules.vision_tower: no tensor of blind starts with 'vision_tower.' or 'model.vision_tower.'"),
        (modules_yaml(text_decoder="models: [{model: next}]", vision_tower="models: [{model: next}]",
                      multi_modal_projector="models: [{model: next}]"),
         "modules: tensors in no module (text_decoder, vision_tower, multi_modal_projector); mergekit 0.1.5 would "
         "leave 1 tensor(s) of next out of the output (image_newline)"),
        (modules_yaml(text_decoder="models: [{model: a}, {model: l}]"),
         "`modules`: the models' architectures differ (a: LlavaForConditionalGeneration, l: LlamaForCausalLM)"),
    ]
    for text, message in cases:
        with pytest.raises(config.ConfigError, match="^" + re.escape(message) + "$"):
            config.plan_from_yaml(text)


# mergekit 0.1.5's mistral3.json: module -> (prefix, tensors before the layers, per-layer tensors, after)
MISTRAL3 = {
    "text_decoder": ("language_model.", ["model.embed_tokens.weight"],
                     ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                      "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                      "mlp.up_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight"],
                     ["model.norm.weight", "lm_head.weight"]),
    "vision_tower": ("vision_tower.", ["patch_conv.weight", "ln_pre.weight"],
                     ["ffn_norm.weight", "feed_forward.down_proj.weight", "feed_forward.gate_proj.weight",
                      "feed_forward.up_proj.weight", "attention_norm.weight", "attention.k_proj.weight",
                      "attention.o_proj.weight", "attention.q_proj.weight", "attention.v_proj.weight"], []),
    "multi_modal_projector": ("multi_modal_projector.", ["linear_1.weight", "linear_2.weight", "norm.weight",
                                                         "patch_merger.merging_layer.weight"], [], []),
}
STACKS = {"text_decoder": ("model.layers", TEXT), "vision_tower": ("transformer.layers", VISION)}


def mistral3_shape(name):
    if "norm" in name and "merging" not in name:
        return (8,)
    return {"patch_conv.weight": (8, 3, 2, 2), "merging_layer.weight": (8, 32), "embed_tokens.weight": (16, 8),
            "lm_head.weight": (16, 8)}.get(name.split(".", name.count(".") - 1)[-1], (8, 8))


def write_mistral3(path, seed):
    r = np.random.default_rng(seed)
    names = []
    for module, (prefix, before, layer, after) in MISTRAL3.items():
        stack, count = STACKS.get(module, ("", 0))
        names += [prefix + n for n in [*before, *(f"{stack}.{i}.{p}" for i in range(count) for p in layer), *after]]
    path.mkdir()
    st.save_safetensors(path, {n: r.standard_normal(mistral3_shape(n)).astype(np.float32) for n in names})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "torch_dtype": "float32",
        "text_config": {"model_type": "mistral", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": TEXT,
                        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 16},
        "vision_config": {"model_type": "pixtral", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": VISION,
                          "num_attention_heads": 2, "head_dim": 4, "patch_size": 2, "image_size": 8}}))


needs_mergekit = pytest.mark.skipif(not (mergekit_bench.VENV / "bin" / "mergekit-yaml").exists(),
                                    reason=f"no mergekit venv at {mergekit_bench.VENV} (`python -m bench.mergekit_bench`)")


@needs_mergekit
@pytest.mark.parametrize("text", [FRANKENMERGE, MODULE_MODELS], ids=["passthrough slices", "task_arithmetic models"])
def test_modules_give_mergekits_tensors_and_layer_counts(tmp_path, text):
    for seed, name in enumerate(("base", "a", "b")):
        write_mistral3(tmp_path / name, seed)
    text = re.sub(r"(model: )(\w+)", lambda m: f"{m[1]}{tmp_path / m[2]}", text)
    text = text.replace("base_model: base", f"base_model: {tmp_path / 'base'}")
    (tmp_path / "merge.yaml").write_text(text)
    (tmp_path / "jobs.json").write_text(json.dumps([[str(tmp_path / "merge.yaml"), str(tmp_path / "mk")]]))
    done = subprocess.run([str(mergekit_bench.VENV / "bin" / "python"), str(mergekit_configs.DRIVER), "merge",
                           str(tmp_path / "jobs.json")], capture_output=True, text=True, check=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert json.loads(done.stdout.splitlines()[-1])["ok"], done.stdout
    assert cli.main(["run", str(tmp_path / "merge.yaml"), str(tmp_path / "jm"), "--no-progress"]) == 0
    row = mergekit_bench.compare(tmp_path / "mk", tmp_path / "jm")
    assert row["max"] < 1e-6 and not row["only"] and row["tensors"] > 0, row
    counts = [[json.loads((tmp_path / d / "config.json").read_text())[k]["num_hidden_layers"]
               for k in ("text_config", "vision_config")] for d in ("mk", "jm")]
    assert counts[0] == counts[1], counts
