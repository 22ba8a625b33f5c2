"""A method owns its facts: registering one is all it takes for `jmerge methods` to list it,
the YAML config to map its per-model and global parameters, and `jmerge run` to stream it."""

import inspect
import re

import numpy as np
import pytest

import jmerge
from jmerge import cli, config, stages, streaming
from jmerge import tree as jtree
from jmerge.io import safetensors_io as st
from jmerge.methods import registry

NAMES = ["a.weight", "b.bias"]


@pytest.fixture
def scaled_sum():
    """A new method, registered for one test: ``theta_0 + scale sum_t w_t g_t tau_t``."""

    @registry.register("test_scaled_sum", static=("gain",), per_model=("weights", "gain"), reference="Nobody et al., 2026, arXiv 0000.00001")
    def fn(base, tvs, *, key=None, weights=None, gain=1.0, scale=1.0):
        """Test method: gained, weighted task arithmetic."""
        w = [1.0] * len(tvs) if weights is None else weights
        factors = [wi * g for wi, g in zip(w, stages.per_task(gain, len(tvs)))]
        return jtree.apply(base, stages.combine(tvs, factors), scale)

    try:
        yield
    finally:
        registry._REGISTRY.pop("test_scaled_sum")


def _checkpoints(root):
    r = np.random.default_rng(0)
    models = [{n: r.standard_normal((4, 3) if n == "a.weight" else (3,)).astype(np.float32) for n in NAMES} for _ in range(3)]
    paths = []
    for name, tensors in zip(["base", "e0", "e1"], models):
        (root / name).mkdir()
        st.save_safetensors(root / name, tensors)
        paths.append(root / name)
    return models, paths


def test_a_registered_method_is_listed_configured_from_yaml_and_streamed(scaled_sum, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    assert cli.main(["methods"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "test_scaled_sum" in line)
    assert "gain*=1.0" in row and "scale=1.0" in row and "weights*=None" in row and "arXiv 0000.00001" in row
    assert jmerge.get("test_scaled_sum").streamable

    (base, e0, e1), paths = _checkpoints(tmp_path)
    yaml = tmp_path / "merge.yml"
    yaml.write_text(
        f"merge_method: test_scaled_sum\nbase_model: {paths[0]}\nparameters: {{scale: 0.5}}\nmodels:\n"
        f"  - model: {paths[1]}\n    parameters: {{weight: 1.0, gain: 0.25}}\n"
        f"  - model: {paths[2]}\n    parameters: {{weight: 2.0, gain: 1.5}}\n"
    )
    plan = config.plan_from_yaml(yaml)
    assert plan.method == "test_scaled_sum" and plan.hparams == {"scale": 0.5, "weights": (1.0, 2.0), "gain": (0.25, 1.5)}

    got = dict(streaming.iter_merged(plan.base, plan.experts, plan.method, **plan.hparams))
    for n in NAMES:
        want = base[n] + 0.5 * (1.0 * 0.25 * (e0[n] - base[n]) + 2.0 * 1.5 * (e1[n] - base[n]))
        np.testing.assert_allclose(got[n], want, rtol=1e-6, atol=1e-6)

    yaml.write_text(yaml.read_text().replace("gain: 0.25}", "gain: 0.25, scale: 2.0}"))
    with pytest.raises(config.ConfigError, match=r"method 'test_scaled_sum' has no per-model parameter 'scale' \(per-model: gain, weights\)"):
        config.plan_from_yaml(yaml)


def test_facts_name_real_hyper_parameters():
    with pytest.raises(ValueError, match=r"method 'test_bad_facts': per_model/path_params name no hyper-parameter of it: \['densty'\]"):
        registry.register("test_bad_facts", per_model=("densty",))(lambda base, tvs, *, key=None, density=0.5: base)
    assert "test_bad_facts" not in jmerge.available()
    assert jmerge.get("ties").per_model == {"weights", "density"} and jmerge.get("ties").reference.endswith("arXiv 2306.01708")
    assert jmerge.get("iso_cts").path_params == {"svd_filter"} and jmerge.get("slerp").per_model == frozenset()


def test_clear_caches_empties_every_module_cache():
    import jax
    import optax
    from jax.sharding import Mesh, PartitionSpec

    from jmerge import _util
    from jmerge.learn import engine, targets
    from jmerge.lwptv import scores
    from jmerge.thresholds import mesh, xla

    caches = {  # the module-level caches and how many entries each holds
        "registry._JITTED": (registry._JITTED.clear, lambda: len(registry._JITTED)),
        "lwptv.scores._JITTED": (scores._JITTED.clear, lambda: len(scores._JITTED)),
        "learn.targets._MEMORY": (targets._MEMORY.clear, lambda: len(targets._MEMORY)),
        "learn.engine._compiled": (engine._compiled.cache_clear, lambda: engine._compiled.cache_info().currsize),
        "thresholds.xla._jitted": (xla._jitted.cache_clear, lambda: xla._jitted.cache_info().currsize),
        "thresholds.xla._jitted_cuts": (xla._jitted_cuts.cache_clear, lambda: xla._jitted_cuts.cache_info().currsize),
        "thresholds.mesh._bisection": (mesh._bisection.cache_clear, lambda: mesh._bisection.cache_info().currsize),
    }
    registered = [clear for clear, _ in caches.values()]
    assert len(_util._CACHE_CLEARS) == len(registered) and set(_util._CACHE_CLEARS) == set(registered)

    base = {"w": np.ones((3, 4), np.float32)}
    experts = [{"w": np.full((3, 4), 2.0, np.float32)}, {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}]
    jmerge.merge(base, experts, "ties")
    xla.solve(stages.magnitude_trim(0.5).query, experts, base)
    xla._jitted_cuts((1,))
    mesh._bisection(Mesh(np.array(jax.devices()[:1]), ("x",)), (PartitionSpec(),), (1,))
    engine._compiled((lambda params, inputs: inputs,), None, "kl", optax.sgd(0.1), None)
    scores._JITTED["test"] = None  # filled by hand: what is cached does not matter here
    targets._MEMORY["test"] = {}
    assert {name: size() for name, (_, size) in caches.items() if not size()} == {}
    jmerge.clear_caches()
    assert {name: size() for name, (_, size) in caches.items() if size()} == {}


_SECTION = re.compile(r"^(Args|Returns|References|Warning|Note|Raises):$")


def _sections(doc: str) -> dict[str, list[str]]:
    """A Google-style docstring's sections: header -> its indented lines (blank ones dropped)."""
    out, current = {}, None
    for line in inspect.cleandoc(doc).splitlines():
        if _SECTION.match(line):
            current = out.setdefault(line[:-1], [])
        elif line and not line[0].isspace():
            current = None  # unindented text closes a section
        elif current is not None and line.strip():
            current.append(line)
    return out


@pytest.mark.parametrize("name", jmerge.available())
def test_every_method_documents_its_arguments_result_and_references(name):
    fn = jmerge.get(name).fn  # TIES & co. are wrapped by their sparsifier: the signature follows __wrapped__
    sections = _sections(fn.__doc__ or "")
    assert {"Args", "Returns", "References"} <= set(sections), f"{name}: sections {sorted(sections)}"
    args = sections["Args"]
    indent = min(len(line) - len(line.lstrip()) for line in args)
    entries = [line.strip() for line in args if len(line) - len(line.lstrip()) == indent]
    documented = [m.group(1) if (m := re.match(r"(\w+): \S", e)) else e for e in entries]
    assert documented == list(inspect.signature(fn).parameters), f"{name}: Args: in the signature's order"
    refs = " ".join(sections["References"])
    assert re.search(r"\d{4}\.\d{4,5}", refs) or "no paper" in refs, f"{name}: References: {refs}"


def test_a_method_declaring_a_mergekit_name_is_mapped_by_its_facts_alone(tmp_path, capsys, monkeypatch):
    from jmerge.methods.registry import Mergekit

    @registry.register("test_mk_sum", per_model=("weights", "gain"),
                       mergekit=Mergekit("mk_sum", {"lambda": 1.0, "eps": 1e-8}, {"weight": 1.0, "gain": 1.0, "cap": 0.5},
                                         models=2, only={"eps": 1e-8}, below={"gain": (2.0, "a test bound")}))
    def fn(base, tvs, *, key=None, weights=None, gain=1.0, cap=0.5, scale=1.0):
        """Test method."""
        return base

    try:
        monkeypatch.setenv("COLUMNS", "400")
        assert cli.main(["methods"]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if "test_mk_sum" in line)
        assert row.split("│")[2].strip() == "mk_sum"
        _, paths = _checkpoints(tmp_path)

        def plan(params0, params1, glob="{lambda: 0.5}"):
            return config.plan_from_yaml(
                f"merge_method: mk_sum\nbase_model: {paths[0]}\nparameters: {glob}\nmodels:\n"
                f"  - model: {paths[1]}\n    parameters: {params0}\n  - model: {paths[2]}\n    parameters: {params1}\n")

        p = plan("{weight: 1.0, gain: 0.25, cap: 0.1}", "{weight: 2.0, gain: 1.5, cap: 0.1}")
        assert p.method == "test_mk_sum" and p.source_method == "mk_sum"
        assert p.hparams == {"weights": (1.0, 2.0), "scale": 0.5, "gain": (0.25, 1.5), "cap": 0.1}
        with pytest.raises(config.ConfigError, match=r"^merge_method 'mk_sum': jmerge takes one cap for all models, got \[0.1, 0.2\]$"):
            plan("{cap: 0.1}", "{cap: 0.2}")
        with pytest.raises(config.ConfigError, match=r"^mk_sum needs `gain` < 2 \(a test bound\)$"):
            plan("{gain: 2.0}", "{}")
        with pytest.raises(config.ConfigError, match=r"^mk_sum: `eps: 0.001` is not supported \(jmerge fixes it at 1e-08\)$"):
            plan("{}", "{}", "{eps: 0.001}")
    finally:
        registry._REGISTRY.pop("test_mk_sum")


def test_the_documented_mergekit_table_is_the_registered_one():
    from jmerge.config import mergekit

    rows = [line.split()[:2] for line in mergekit.__doc__.splitlines() if line[:1].isalpha() and "  " in line]
    documented = {mk: jm for mk, jm in rows if mk != "mergekit"}
    assert documented == {mk: m.name for mk, m in mergekit.table().items()}
