"""The jmerge command line, run in-process: mergekit-style YAML configs, convert, inspect, bad input."""


import numpy as np
import pytest

import jmerge
from helpers import BUFFERS, random_models, write_checkpoint, write_checkpoints
from reference import mergekit_gta
from jmerge import cli, config
from jmerge.io import flax_io
from jmerge.io import safetensors_io as st

NAMES = ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "layers.1.b"]


def _shape(n):
    return (6,) if n.endswith(".b") else (6, 6)


@pytest.fixture()
def models(tmp_path, monkeypatch):
    """base + 3 experts as HF directories (2 shards each, config.json, tokenizer.json) under tmp_path."""
    monkeypatch.chdir(tmp_path)
    base, experts = random_models({n: _shape(n) for n in NAMES}, 3, numpy=True)
    write_checkpoints(tmp_path, base, experts, shard_size=400, buffers=True, config={"model_type": "toy"},
                      files={"tokenizer.json": "{}"})
    return tmp_path, base, experts


def _yaml(tmp_path, text, name="merge.yaml"):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def _run(*argv):
    return cli.main(["run", *map(str, argv), "--no-progress"])


TIES_YAML = """\
models:
  - model: e0
    parameters: {weight: 1.0, density: 0.3}
  - model: e1
    parameters: {weight: 0.5, density: 0.5}
  - model: e2
    parameters: {weight: 0.8}
  - model: base
base_model: base
merge_method: ties
parameters: {lambda: 0.9, density: 0.7, int8_mask: true}
dtype: float32
"""


def test_mergekit_ties_config_gives_mergekit_result(models):
    root, base, experts = models
    assert _run(_yaml(root, TIES_YAML), root / "out") == 0
    out = st.load(root / "out")
    for n in NAMES:
        ref = mergekit_gta(base[n], [e[n] for e in experts], [1.0, 0.5, 0.8], [0.3, 0.5, 0.7], lam=0.9, normalize=True,
                            consensus=True, sparsify=True)
        np.testing.assert_allclose(out[n], ref, rtol=0, atol=1e-6, err_msg=n)
    np.testing.assert_array_equal(out["position_ids"], BUFFERS["position_ids"])
    listing = sorted(p.name for p in (root / "out").iterdir())
    assert {"config.json", "tokenizer.json", "README.md", "jmerge_config.yml"} <= set(listing)
    assert (root / "out" / "jmerge_config.yml").read_text() == TIES_YAML
    card = (root / "out" / "README.md").read_text()
    assert TIES_YAML.strip() in card and jmerge.__version__ in card and "`trim`: `'tensor'`" in card
    assert [p.name for p in root.iterdir() if p.name.startswith(".out.")] == []


@pytest.mark.parametrize("normalize", [False, True])
def test_mergekit_task_arithmetic_and_linear(models, normalize):
    root, base, experts = models
    ta = f"""\
models:
  - {{model: e0, parameters: {{weight: 0.7}}}}
  - {{model: e1, parameters: {{weight: 0.2}}}}
base_model: base
merge_method: task_arithmetic
parameters: {{lambda: 1.5, normalize: {str(normalize).lower()}}}
"""
    assert _run(_yaml(root, ta), root / "ta") == 0
    out = st.load(root / "ta")
    for n in NAMES:
        ref = mergekit_gta(base[n], [e[n] for e in experts[:2]], [0.7, 0.2], [1, 1], lam=1.5, normalize=normalize, consensus=False,
                            sparsify=False)
        np.testing.assert_allclose(out[n], ref, atol=1e-6)
    linear = "models:\n  - {model: e0, parameters: {weight: 3}}\n  - {model: e1, parameters: {weight: 1}}\nmerge_method: linear\n"
    assert _run(_yaml(root, linear), root / "lin") == 0
    out = st.load(root / "lin")
    for n in NAMES:
        np.testing.assert_allclose(out[n], (3 * experts[0][n] + experts[1][n]) / 4, atol=1e-6)


def test_jmerge_keys_select_paper_semantics(models):
    root, base, experts = models
    text = TIES_YAML.replace("dtype: float32\n", "dtype: float32\njmerge: {trim: global}\n")
    assert _run(_yaml(root, text), root / "out") == 0
    ref = jmerge.merge(base, experts, "ties", trim="global", density=(0.3, 0.5, 0.7), weights=(1.0, 0.5, 0.8),
                       scale=0.9, normalize=True)
    out = st.load(root / "out")
    for n in NAMES:
        np.testing.assert_array_equal(out[n], np.asarray(ref[n]))


def test_native_method_seeded_dare_and_out_dtype(models):
    root, base, experts = models
    text = """\
models: [{model: e0}, {model: e1}]
base_model: base
merge_method: dare_ties
parameters: {density: 0.5}
jmerge: {seed: 3}
"""
    assert _run(_yaml(root, text), root / "a", "--out-dtype", "bfloat16") == 0
    assert _run(_yaml(root, text), root / "b", "--out-dtype", "bfloat16") == 0
    a, b = st.load(root / "a"), st.load(root / "b")
    assert all(np.array_equal(a[n], b[n]) for n in NAMES)
    assert st.open_checkpoint(root / "a").tensors["layers.0.w"].code == "BF16"
    iso = "models: [{model: e0}, {model: e1}]\nbase_model: base\nmerge_method: iso_c\nparameters: {scale: 0.5}\n"
    assert _run(_yaml(root, iso), root / "iso") == 0
    ref = jmerge.merge(base, experts[:2], "iso_c", scale=0.5)
    np.testing.assert_allclose(st.load(root / "iso")["layers.1.w"], np.asarray(ref["layers.1.w"]), atol=1e-5)


def test_lwptv_key_runs_in_memory(models):
    root, base, experts = models
    text = TIES_YAML + "jmerge:\n  lwptv: {layers: 'layers\\.\\d+', unassigned: own, rule: keep_ratio, value: 0.5}\n"
    assert _run(_yaml(root, text), root / "out") == 0
    from jmerge.lwptv import LwPTV

    ref = jmerge.merge(base, experts, "ties", lwptv=LwPTV(layers=r"layers\.\d+", unassigned="own", rule="keep_ratio",
                                                            value=0.5), **config.plan_from_yaml(root / "merge.yaml").hparams)
    out = st.load(root / "out")
    for n in NAMES:
        np.testing.assert_array_equal(out[n], np.asarray(ref[n]))


def _error(capsys, *argv):
    assert cli.main(list(map(str, argv))) == 2
    return capsys.readouterr().err


def test_bad_configs_name_the_problem(models, capsys):
    root, _, _ = models
    cases = [
        (TIES_YAML.replace("merge_method: ties", "merge_method: tie"), "unknown merge_method 'tie'; did you mean 'ties'?"),
        (TIES_YAML.replace("density: 0.3", "densty: 0.3"), "no parameter 'densty'; did you mean 'density'?"),
        (TIES_YAML.replace("lambda: 0.9", "lamda: 0.9"), "no parameter 'lamda'; did you mean 'lambda'?"),
        (TIES_YAML + "merge_methd: x\n", "unknown key `merge_methd`; did you mean 'merge_method'?"),
        (TIES_YAML + "jmerge: {trimm: global}\n", "unknown key `jmerge.trimm`; did you mean 'trim'?"),
        (TIES_YAML + "slices: []\n", "give exactly one of `models`, `slices` and `modules`"),
        (TIES_YAML.replace("model: e1", "model: missing-model"), "model 'missing-model' not found"),
        (TIES_YAML.replace("density: 0.3}", "density: [0.1, 0.5, 0.9]}"),
         "`models[e0].parameters.density`: a gradient of 3 values cannot be spread over 2 layers"),
        (TIES_YAML.replace("dtype: float32", "dtype: float33"), "did you mean 'float32'?"),
        (TIES_YAML + "jmerge: {learn: {prompts: [], objective: js}}\n", "unknown key `jmerge.learn.objective`"),
        (TIES_YAML + "jmerge: {learn: {prompts: []}}\n", "merge_method must be task_arithmetic"),
        (TIES_YAML + "jmerge: {lwptv: {layerz: bert}}\n", "`jmerge.lwptv`: LwPTV.__init__() got an unexpected keyword argument 'layerz'"),
        (TIES_YAML.replace("base_model: base\n", ""), "needs `base_model`"),
        (TIES_YAML.replace("density: 0.3", "density: 1.3"), "merge_method 'ties': density=(1.3, 0.5, 0.7) is outside (0, 1.0]"),
    ]
    for text, message in cases:
        err = _error(capsys, "run", _yaml(root, text), root / "out", "--no-progress")
        assert message in " ".join(err.split()), (message, err)
        assert not (root / "out").exists()


def test_bad_checkpoints_are_named_before_any_read(models, capsys, monkeypatch):
    root, base, experts = models
    # names and shapes differing from the base
    write_checkpoint(root / "renamed", {("x." + n if n == "layers.1.b" else n): v for n, v in experts[0].items()}, buffers=True)
    write_checkpoint(root / "reshaped", {**experts[0], "layers.0.w": np.zeros((3, 12), np.float32)}, buffers=True)
    # a truncated shard
    files = sorted(write_checkpoint(root / "trunc", experts[1], shard_size=400, buffers=True).glob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:-7])
    write_checkpoint(root / "llama", experts[1], buffers=True, config={"model_type": "llama"})
    read = []
    monkeypatch.setattr(st.Checkpoint, "read", lambda self, name: read.append(name))
    for model, message in [("renamed", "missing 1 tensor(s) of the base: layers.1.b; 1 tensor(s) not in the base: x.layers.1.b"),
                           ("reshaped", "layers.0.w [3, 12] vs base [6, 6]"),
                           ("trunc", f"{files[0].name}: truncated"),
                           ("llama", "is a 'llama' model but base base is 'toy' (mixed architectures)")]:
        text = f"models: [{{model: e0}}, {{model: {model}}}]\nbase_model: base\nmerge_method: task_arithmetic\n"
        err = _error(capsys, "run", _yaml(root, text), root / "out", "--no-progress")
        assert message in " ".join(err.split()), err
    assert read == [] and not (root / "out").exists()


def test_existing_output_needs_force(models, capsys):
    root, base, experts = models
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")
    err = _error(capsys, "run", _yaml(root, TIES_YAML), root / "out", "--no-progress")
    assert f"output {root / 'out'} already exists; pass --force to replace it" in err and (root / "out" / "keep.txt").read_text() == "mine"
    assert _run(_yaml(root, TIES_YAML), root / "out", "--force") == 0
    assert not (root / "out" / "keep.txt").exists() and (root / "out" / "model.safetensors").exists()
    err = _error(capsys, "run", _yaml(root, TIES_YAML), root / "base", "--force", "--no-progress")
    assert f"output {root / 'base'} would overwrite or nest with input base" in err
    assert (root / "base" / "config.json").exists()


def test_failure_mid_run_leaves_no_output(models, capsys):
    root, base, experts = models
    bad = dict(experts[2])
    bad["layers.1.w"] = np.full((6, 6), np.inf, np.float32)  # found only when that tensor is merged
    write_checkpoint(root / "bad", bad, buffers=True)
    text = "models: [{model: e0}, {model: bad}]\nbase_model: base\nmerge_method: task_arithmetic\n"
    err = _error(capsys, "run", _yaml(root, text), root / "out", "--no-progress", "--shard-size", "100")
    assert "tensor 'layers.1.w' holds NaN or infinite values" in err
    assert not (root / "out").exists() and [p for p in root.iterdir() if p.name.startswith(".out.")] == []


def test_convert_command(tmp_path, capsys):
    params = {"enc": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "ln": {"scale": np.ones(3, np.float32)}}}
    (tmp_path / "flax").mkdir()
    flax_io.write_msgpack(tmp_path / "flax" / "flax_model.msgpack", params)
    (tmp_path / "flax" / "config.json").write_text('{"model_type": "bert"}')
    assert cli.main(["convert", str(tmp_path / "flax"), str(tmp_path / "pt")]) == 0
    pt = st.load(tmp_path / "pt")
    np.testing.assert_array_equal(pt["enc.dense.weight"], params["enc"]["dense"]["kernel"].T)
    assert "enc.ln.weight" in pt and (tmp_path / "pt" / "config.json").exists()
    assert cli.main(["convert", str(tmp_path / "pt"), str(tmp_path / "flax2")]) == 0
    back = flax_io.read_msgpack(tmp_path / "flax2")
    np.testing.assert_array_equal(back["enc"]["dense"]["kernel"], params["enc"]["dense"]["kernel"])
    assert "already exists; pass --force" in _error(capsys, "convert", tmp_path / "pt", tmp_path / "flax2")


def test_inspect_command(models, capsys):
    root, base, experts = models
    assert cli.main(["inspect", "base", "e0", "e1", "--png", "tv.png", "--layers", r"layers\.\d+|embed",
                     "--rule", "top_k", "--value", "1"]) == 0
    out = capsys.readouterr().out
    tvs = [np.concatenate([(e[n] - base[n]).ravel() for n in NAMES]) for e in experts[:2]]
    assert f"{np.linalg.norm(tvs[0]):.4g}" in out
    cos = tvs[0] @ tvs[1] / np.linalg.norm(tvs[0]) / np.linalg.norm(tvs[1])
    assert f"{cos:+.3f}" in out
    assert "LwPTV" in out and (root / "tv.png").stat().st_size > 0 and (root / "tv-lwptv.png").stat().st_size > 0
    assert "output tv.png already exists; pass --force to replace it" in _error(capsys, "inspect", "base", "e0", "--png", "tv.png")


def test_help_and_methods(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--shard-size" in text and "merge_method" in text
    assert cli.main(["methods"]) == 0
    rows = [line.split("│")[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    listed = {cell.strip() for row in rows for cell in row[:1]} - {""}
    assert listed == set(jmerge.available())  # every method, its name whole
    assert {"linear", "ties"} <= {cell.strip() for row in rows for cell in row[1:2]}  # mergekit names
