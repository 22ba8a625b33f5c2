"""Coverage reports: what each method's own rule merges vs what falls back, logged, warned, in cards and rows."""

import logging
import math
import types
import warnings

import numpy as np
import pytest

import jmerge
from jmerge import cli, coverage, streaming
from jmerge.coverage import CoverageWarning
from helpers import as_np, nest, np_task_vectors, write_checkpoint

SVD = ["tsv", "iso_c", "iso_cts"]
# No 2-D parameter (as MobileNetV2): conv kernels (HWIO, depthwise, 1x1) and 1-D vectors.
SHAPES = {
    "stem/conv/kernel": (3, 3, 3, 16),
    "stem/norm/scale": (16,),
    "block/dw/kernel": (3, 3, 1, 16),
    "block/pw/kernel": (1, 1, 16, 24),
    "block/norm/scale": (24,),
    "block/norm/bias": (24,),
}
KERNELS = [p for p, s in SHAPES.items() if len(s) == 4]
KERNEL_PARAMS = sum(math.prod(SHAPES[p]) for p in KERNELS)  # 432 + 144 + 384 = 960
TOTAL = sum(math.prod(s) for s in SHAPES.values())  # 960 + 64 = 1024


def conv_models(num_experts=3, seed=0):
    rng = np.random.default_rng(seed)
    base = {p: rng.normal(size=s).astype(np.float32) for p, s in SHAPES.items()}
    experts = [{p: (b + 0.3 * rng.normal(size=b.shape)).astype(np.float32) for p, b in base.items()} for _ in range(num_experts)]
    return nest(base), [nest(e) for e in experts]


def _coverage_records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "jmerge.coverage"]


@pytest.mark.parametrize("method", SVD)
def test_conv_matrix_covers_the_kernels_without_warning(method, caplog):
    base, experts = conv_models()
    caplog.set_level(logging.INFO, logger="jmerge.coverage")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        out = as_np(jmerge.merge(base, experts, method))
    cov = coverage.of(method, base)
    assert (cov.rule_params, cov.fallback_params) == (KERNEL_PARAMS, TOTAL - KERNEL_PARAMS)
    assert sorted(cov.rule) == sorted(KERNELS) and cov.fraction == 960 / 1024
    assert _coverage_records(caplog) == [
        f"coverage {method}: its rule merges 960 of 1,024 parameters (93.75 %, 3 of 6 tensors); 64 in 3 tensors "
        f"fall back (e.g. block/norm/bias, block/norm/scale, stem/norm/scale)"  # pytree (sorted) order
    ]
    # what coverage says is what the merge did: fallback leaves hold the mean task vector, rule leaves do not
    b, taus = np_task_vectors(base, experts)
    for p in SHAPES:
        mean = b[p] + np.mean([t[p] for t in taus], axis=0)
        if p in cov.fallback:
            np.testing.assert_allclose(out[p], mean, rtol=1e-6, atol=1e-6, err_msg=p)
        else:
            assert np.max(np.abs(out[p] - mean)) > 1e-2, p


@pytest.mark.parametrize("method", SVD)
def test_conv_average_warns_that_the_rule_covers_nothing(method, caplog):
    base, experts = conv_models()
    caplog.set_level(logging.INFO, logger="jmerge.coverage")
    message = (
        rf"^{method} merges only 0\.00 % of the parameters by its own rule \(under 50 %\): 1,024 of 1,024 parameters "
        r"in 6 tensors fall back \(e\.g\. block/dw/kernel, block/norm/bias, block/norm/scale\)$"
    )
    with pytest.warns(CoverageWarning, match=message):
        out = as_np(jmerge.merge(base, experts, method, conv="average"))
    assert coverage.of(method, base, {"conv": "average"}).fraction == 0.0
    assert len(_coverage_records(caplog)) == 1
    b, taus = np_task_vectors(base, experts)  # it is weight averaging, as the review found
    for p in SHAPES:
        np.testing.assert_allclose(out[p], b[p] + np.mean([t[p] for t in taus], axis=0), rtol=1e-6, atol=1e-6)


def test_half_is_enough_and_the_filter_counts():
    """Exactly half covered does not warn; ``svd_filter`` moves leaves to the fallback side."""
    shapes = {"a": (4, 4), "b": (16,)}
    assert coverage.from_shapes("tsv", shapes).fraction == 0.5
    base = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    experts = [{k: np.random.default_rng(i).normal(size=s).astype(np.float32) for k, s in shapes.items()} for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        jmerge.merge(base, experts, "tsv")
    cov = coverage.from_shapes("iso_c", {**shapes, "c": (4, 2)}, {"svd_filter": "^a$"})
    assert (cov.rule, cov.fallback, cov.rule_params, cov.fallback_params) == (("a",), ("b", "c"), 16, 24)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "model_stock", "magmax"])
def test_elementwise_methods_cover_every_leaf(method):
    base, _ = conv_models()
    cov = coverage.of(method, base)
    assert cov.fraction == 1.0 and cov.fallback == () and cov.rule_params == TOTAL
    assert cov.as_dict() == {"method": method, "fraction": 1.0, "rule_params": TOTAL, "fallback_params": 0,
                             "rule_tensors": 6, "fallback_tensors": 0}


def test_markdown_lists_every_fallback_tensor():
    base, _ = conv_models()
    text = coverage.of("iso_cts", base).markdown()
    assert text.startswith("## Coverage\n\niso_cts: its rule merges 960 of 1,024 parameters (93.75 %, 3 of 6 tensors)")
    assert text.endswith("Tensors merged by the fallback:\n\n- `block/norm/bias`\n- `block/norm/scale`\n- `stem/norm/scale`\n\n")


# ----------------------------------------------------------------------------- streamed merges and jmerge run
def _write(root, name, tensors):
    return write_checkpoint(root / name, tensors, shard_size=4000, config={"model_type": "toy"})


@pytest.fixture()
def torch_ckpts(tmp_path, monkeypatch):
    """The conv model as torch-layout safetensors (``[out, in, kh, kw]`` kernels, '.'-separated names)."""
    monkeypatch.chdir(tmp_path)
    base, experts = conv_models(2)
    flat = lambda t: {p.replace("/", "."): (x.transpose(3, 2, 0, 1) if x.ndim == 4 else x).copy()  # noqa: E731
                      for p, x in as_np(t).items()}
    dirs = [_write(tmp_path, "base", {k: v.astype(np.float32) for k, v in flat(base).items()})]
    dirs += [_write(tmp_path, f"e{i}", {k: v.astype(np.float32) for k, v in flat(e).items()}) for i, e in enumerate(experts)]
    return tmp_path, dirs


def test_streamed_merge_reports_once_for_the_checkpoint(torch_ckpts, caplog):
    _, (base, *experts) = torch_ckpts
    caplog.set_level(logging.INFO, logger="jmerge.coverage")
    with pytest.warns(CoverageWarning, match=r"^iso_cts merges only 0\.00 % .* 1,024 of 1,024 parameters in 6 tensors"):
        dict(streaming.iter_merged(base, experts, "iso_cts", layout="torch", conv="average"))
    assert len(_coverage_records(caplog)) == 1  # not one per tensor
    caplog.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        merged = dict(streaming.iter_merged(base, experts, "iso_cts", layout="torch"))
    assert _coverage_records(caplog) == [
        "coverage iso_cts: its rule merges 960 of 1,024 parameters (93.75 %, 3 of 6 tensors); 64 in 3 tensors "
        "fall back (e.g. block.norm.bias, block.norm.scale, stem.norm.scale)"
    ]
    # the torch kernels merged per tensor equal the in-memory merge of the Flax ones, transposed
    flax_base, flax_experts = conv_models(2)
    want = as_np(jmerge.merge(flax_base, flax_experts, "iso_cts"))
    for p, x in want.items():
        got = merged[p.replace("/", ".")]
        np.testing.assert_allclose(got.transpose(2, 3, 1, 0) if got.ndim == 4 else got, x, rtol=1e-5, atol=5e-5, err_msg=p)


def test_jmerge_run_writes_coverage_into_the_card(torch_ckpts, capsys):
    root, _ = torch_ckpts
    text = "models: [{model: e0}, {model: e1}]\nbase_model: base\nmerge_method: tsv\nparameters: {layout: torch, conv: %s}\n"
    (root / "matrix.yaml").write_text(text % "matrix")
    assert cli.main(["run", "matrix.yaml", "out", "--no-progress"]) == 0
    card = (root / "out" / "README.md").read_text()
    line = "tsv: its rule merges 960 of 1,024 parameters (93.75 %, 3 of 6 tensors); 64 in 3 tensors fall back"
    assert f"## Coverage\n\n{line}" in card and "- `stem.norm.scale`" in card
    assert f"coverage: {line}" in " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    (root / "average.yaml").write_text(text % "average")
    with pytest.warns(CoverageWarning, match=r"^tsv merges only 0\.00 % of the parameters by its own rule"):
        assert cli.main(["run", "average.yaml", "avg", "--no-progress"]) == 0
    assert "tsv: its rule merges 0 of 1,024 parameters (0.00 %, 0 of 6 tensors)" in (root / "avg" / "README.md").read_text()


# ----------------------------------------------------------------------------- the experiments' rows
def test_study_rows_carry_coverage():
    from experiments import study_divmerge, study_lwptv

    base, _ = conv_models()
    s = types.SimpleNamespace(base=base, config=types.SimpleNamespace(name="V"))
    res = {"folds": [{"ood": {"digits": 50.0}}], "id_acc": 70.0, "normalized_acc": 80.0, "heldout_acc": 50.0, "ood_acc": None}
    assert study_lwptv._row(s, "iso_cts", None, res, 1.0)["coverage"] == 960 / 1024
    assert study_lwptv._row(s, "ties", None, res, 1.0)["coverage"] == 1.0
    assert study_divmerge._coverage(s, "task_arithmetic") == 1.0
    assert study_divmerge._coverage(s, "divmerge_layer") == 1.0
