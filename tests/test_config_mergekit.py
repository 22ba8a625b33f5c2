"""mergekit YAML for the methods of jmerge/methods/mergekit_extra.py and mergekit's config
semantics: ignored parameters warn, linear ``normalize: false``, ties ``rescale``, multislerp
and nuslerp without ``base_model``, the base listed among ``models``, unimplemented methods."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge import cli, config
from jmerge.io import safetensors_io as st
from helpers import as_np, assert_matches, method_models


@pytest.fixture()
def root(tmp_path, monkeypatch):
    """Empty model directories base, e0, e1, e2 (the plan only checks that they exist)."""
    monkeypatch.chdir(tmp_path)
    for name in ("base", "e0", "e1", "e2"):
        (tmp_path / name).mkdir()
    return tmp_path


def plan(text):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConfigWarning unless a test expects one
        return config.plan_from_yaml(text)


def models(*names, **params):
    out = "models:\n"
    for n in names:
        out += f"  - model: {n}\n"
        if n in params:
            out += f"    parameters: {params[n]}\n"
    return out


@pytest.mark.parametrize("method, text, hparams, experts", [
    ("della_linear", models("e0", "e1", e0="{weight: 1.0, density: 0.5}", e1="{weight: 0.5, density: 0.5}")
     + "base_model: base\nparameters: {epsilon: 0.1}\n",
     {"weights": (1.0, 0.5), "scale": 1.0, "density": 0.5, "epsilon": 0.1, "rescale": True, "normalize": False},
     ("e0", "e1")),
    ("della_linear", models("e0", "e1", e0="{weight: 1.0, density: 0.5}", e1="{weight: 3.0, density: 0.4}")
     + "base_model: base\nparameters: {normalize: true, rescale: false, lambda: 0.5}\n",
     {"weights": (1.0, 3.0), "scale": 0.5, "density": (0.5, 0.4), "epsilon": 0.15, "rescale": False, "normalize": True},
     ("e0", "e1")),
    ("sce", models("e0", "e1", "e2") + "base_model: base\nparameters: {select_topk: 0.3, int8_mask: true}\n",
     {"select_topk": 0.3}, ("e0", "e1", "e2")),
    ("nearswap", models("e0") + "base_model: base\nparameters: {t: 0.001}\n", {"t": 0.001}, ("e0",)),
    ("arcee_fusion", models("base", "e0") + "base_model: base\n", {}, ("e0",)),
    ("karcher", models("e0", "e1") + "parameters: {max_iter: 5, tol: 1e-6}\n", {"max_iter": 5, "tol": 1e-6}, ("e0", "e1")),
    ("karcher", models("e0", "e1") + "base_model: base\n", {"max_iter": 10, "tol": 1e-5}, ("base", "e0", "e1")),
    ("karcher", models("e0", "base") + "base_model: ./base\n", {"max_iter": 10, "tol": 1e-5}, ("e0", "base")),
    ("nuslerp", models("e0", "e1", e0="{weight: 1.0}", e1="{weight: 0.5}"),
     {"weights": (1.0, 0.5), "space": "weights", "flatten": True, "row_wise": False}, ("e0", "e1")),
    ("nuslerp", models("e0", "e1", e0="{weight: 1.0}", e1="{weight: 0.5}")
     + "base_model: base\nparameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
     {"weights": (1.0, 0.5), "space": "task_vectors", "flatten": False, "row_wise": True}, ("e0", "e1")),
    ("ram", models("e0", "e1") + "base_model: base\nparameters: {epsilon: 1e-4}\n", {"epsilon": 1e-4}, ("e0", "e1")),
    ("ramplus_tl", models("e0", "e1") + "base_model: base\nparameters: {r: 0.3}\n", {"r": 0.3, "alpha": 0.2, "epsilon": 1e-5},
     ("e0", "e1")),
    ("multislerp", models("e0", "e1", e0="{weight: 1.0}", e1="{weight: 2.0}"),
     {"weights": (1.0, 2.0), "space": "weights"}, ("e0", "e1")),
    ("linear", models("e0", "e1", e0="{weight: 0.7}", e1="{weight: 0.6}") + "parameters: {normalize: false}\n",
     {"weights": (0.7, 0.6), "normalize": False}, ("e0", "e1")),
    ("ties", models("./base", "e0", "e1", e0="{weight: 1.0, density: 0.3}", e1="{weight: 0.5, density: 0.3}")
     + "base_model: base\nparameters: {rescale: true}\n",
     {"weights": (1.0, 0.5), "density": 0.3, "normalize": True, "rescale": True, "scale": 1.0, "trim": "tensor", "tie_break": "first",
      "sign": "sum"}, ("e0", "e1")),
])
def test_mergekit_configs_map_to_jmerge(root, method, text, hparams, experts):
    p = plan(text + f"merge_method: {method}\n")
    assert p.method == {"linear": "average"}.get(method, method)
    assert p.hparams == hparams
    assert [e.name for e in p.experts] == list(experts)
    assert p.base.name == ("base" if "base_model" in text else experts[0])


@pytest.mark.parametrize("text, message", [
    (models("base", "e0", base="{weight: 1.0}", e0="{weight: 0.5}") + "base_model: base\nmerge_method: slerp\n"
     "parameters: {t: 0.3}\n", "`models[e0].parameters.weight` is ignored: merge_method 'slerp' does not use it "
     "(mergekit ignores it too)"),
    (models("e0", "e1", e0="{weight: 1.0}", e1="{weight: 1.0}") + "base_model: base\nmerge_method: model_stock\n",
     "`models[e0].parameters.weight` is ignored: merge_method 'model_stock' does not use it (mergekit ignores it too)"),
    (models("e0", "e1") + "base_model: base\nmerge_method: ties\nparameters: {t: 0.5}\n",
     "`parameters.t` is ignored: merge_method 'ties' does not use it (mergekit ignores it too)"),
    (models("e0", "e1") + "base_model: base\nmerge_method: karcher\nparameters: {density: 0.5}\n",
     "`parameters.density` is ignored: merge_method 'karcher' does not use it (mergekit ignores it too)"),
])
def test_parameters_mergekit_ignores_are_accepted_with_a_warning(root, text, message):
    with pytest.warns(config.ConfigWarning, match="^" + re.escape(message) + "$"):
        p = config.plan_from_yaml(text)
    cleaned = re.sub(r"\n    parameters: \{weight: [0-9.]+\}|, ?density: 0.5|t: 0.5", "", text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert p.hparams == config.plan_from_yaml(cleaned.replace("parameters: {}\n", "")).hparams


@pytest.mark.parametrize("text, message", [
    (models("e0") + "base_model: base\nmerge_method: passthrough\n",
     "models: merge_method 'passthrough' takes no `base_model` (mergekit would merge it as one more model)"),
    (models("e0", "e1") + "merge_method: passthrough\n",
     "merge_method 'passthrough': passthrough merges one model (per slice: a frankenmerge lists one source per "
     "slice), got 2 experts"),
    (models("e0", "e1") + "merge_method: nuslerp\n",
     "merge_method 'nuslerp' needs a `weight` for every model; missing for e0, e1"),
    (models("e0") + "base_model: base\nmerge_method: nearswap\n",
     "merge_method 'nearswap': nearswap needs the parameter t (the distance below which the model's value is taken)"),
    (models("e0", "e1") + "base_model: base\nmerge_method: della_linear\n",
     "della_linear needs `density` < 1 (with density 1 it prunes nothing; use ties or dare_ties)"),
    (models("e0", "e1") + "base_model: base\nmerge_method: ties\nparameters: {densty: 0.5}\n",
     "merge_method 'ties' has no parameter 'densty'; did you mean 'density'? (parameters: density, int8_mask, lambda, "
     "normalize, rescale, weight)"),
    (models("e0") + "merge_method: sce\n", "merge_method 'sce' needs `base_model`"),
    (models("e0", "e1") + "merge_method: karcher\nparameters: {max_iter: 2.5}\n",
     "`parameters.max_iter` must be an int, got 2.5"),
    (models("e0", "e1") + "merge_method: karcher\nparameters: {tol: small}\n",
     "`parameters.tol` must be a float, got 'small'"),
])
def test_bad_mergekit_configs_get_a_precise_error(root, text, message):
    with pytest.raises(config.ConfigError, match="^" + re.escape(message) + "$"):
        plan(text)


def test_average_without_normalize_is_the_weighted_sum_of_the_models():
    base, experts = method_models(40, 2)
    out = jmerge.merge(base, experts, "average", weights=(0.7, 0.6), normalize=False)
    e0, e1 = as_np(experts[0]), as_np(experts[1])
    assert_matches(out, {p: 0.7 * e0[p] + 0.6 * e1[p] for p in e0}, jnp.float32)


def test_multislerp_on_whole_weights_equals_task_vectors_from_a_zero_base():
    base, experts = method_models(41, 3)
    zero = jax.tree.map(jnp.zeros_like, base)
    whole = as_np(jmerge.merge(base, experts, "multislerp", weights=(1.0, 2.0, 0.5), space="weights"))
    ref = as_np(jmerge.merge(zero, experts, "multislerp", weights=(1.0, 2.0, 0.5)))
    for p in whole:
        np.testing.assert_allclose(whole[p], ref[p], rtol=1e-5, atol=1e-6, err_msg=p)
    with_base = as_np(jmerge.merge(base, experts, "multislerp", weights=(1.0, 2.0, 0.5)))
    assert max(np.max(np.abs(whole[p] - with_base[p])) for p in whole) > 1e-3


def test_jmerge_run_merges_a_new_method_config(root):
    r = np.random.default_rng(0)
    b = {"w": r.standard_normal((4, 6)).astype(np.float32), "v": r.standard_normal(6).astype(np.float32)}
    es = [{k: x + 0.1 * r.standard_normal(x.shape).astype(np.float32) for k, x in b.items()} for _ in range(3)]
    for name, tensors in [("base", b), ("e0", es[0]), ("e1", es[1]), ("e2", es[2])]:
        st.save_safetensors(root / name, tensors)
    (root / "ram.yaml").write_text(models("e0", "e1", "e2") + "base_model: base\nmerge_method: ram\n")
    assert cli.main(["run", str(root / "ram.yaml"), str(root / "out"), "--no-progress"]) == 0
    out = st.open_checkpoint(root / "out")
    for k in b:  # every entry changed by all three: the mean of the changes
        np.testing.assert_allclose(out.read(k), b[k] + sum(e[k] - b[k] for e in es) / 3, rtol=1e-5, atol=1e-6)
