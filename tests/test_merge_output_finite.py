"""No silent degradation: a merge whose method turns finite inputs into NaN or infinities raises
``MergeOutputError`` naming the method and the parameter (in memory) or tensor (streamed);
a finite merge that its cast to ``out_dtype`` overflows raises too, naming the dtype;
``check_finite=False`` opts out and returns what the method computed."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from helpers import write_checkpoints
from jmerge import streaming
from jmerge.methods import svd
from jmerge.validate import MergeOutputError

# A bias (merged as the task-vector mean, finite) before a matrix (merged by SVD): the error
# must name the matrix, not the first parameter.
SHAPES = {"a": {"bias": (16,), "w": (6, 4)}}
FLAT_SHAPES = {"bias": (16,), "l0.w": (6, 4)}


def _models(shapes, k=2, seed=0, big=False):
    """Standard normal entries, or with ``big`` entries in [3e37, 6e37): finite, and so is their
    merge by task arithmetic, but a float32 sum of one tensor overflows."""
    rng = np.random.default_rng(seed)
    draw = (lambda s: 3e37 * (1 + rng.random(s))) if big else rng.standard_normal  # noqa: E731
    make = lambda: jax.tree.map(lambda s: draw(s).astype(np.float32), shapes,  # noqa: E731
                                is_leaf=lambda s: isinstance(s, tuple))
    return make(), [make() for _ in range(k)]


@pytest.fixture
def failing_svd(monkeypatch):
    """Both LAPACK algorithms of ``svd.thin_svd`` fail (return NaN), as sgesdd does where it does
    not converge; compiled merges are dropped before and after so the patch is traced."""
    calls = []

    def nan_svd(x, *args, **kwargs):
        calls.append(x.shape)
        u, s, vt = jnp.linalg.svd(x, full_matrices=False)
        return jnp.full_like(u, jnp.nan), jnp.full_like(s, jnp.nan), jnp.full_like(vt, jnp.nan)

    jmerge.clear_caches()
    monkeypatch.setattr(svd, "_gesdd", nan_svd)  # divide and conquer
    monkeypatch.setattr(jax.lax.linalg, "svd", nan_svd)  # thin_svd's QR-algorithm fallback
    yield calls
    jmerge.clear_caches()


def _write(tmp_path, base, experts):
    return write_checkpoints(tmp_path, base, experts)


# ---------------------------------------------------------------------------- in memory
def test_in_memory_merge_that_produces_nan_from_finite_inputs_raises(failing_svd):
    base, experts = _models(SHAPES)
    message = "iso_c produced NaN or infinite values in parameter 'a/w' from finite inputs"
    with pytest.raises(MergeOutputError, match=re.escape(message) + "$"):
        jmerge.merge(base, experts, "iso_c")
    assert len(failing_svd) >= 2, "both SVD algorithms must have been tried"


def test_in_memory_check_finite_false_returns_the_nan(failing_svd):
    base, experts = _models(SHAPES)
    out = jmerge.merge(base, experts, "iso_c", check_finite=False)
    assert np.isnan(np.asarray(out["a"]["w"])).all()
    assert np.isfinite(np.asarray(out["a"]["bias"])).all()


def test_in_memory_finite_merge_passes():
    # Outputs near float32's maximum: finite, though a plain float32 sum of them overflows.
    base, experts = _models(SHAPES, big=True)
    out = jmerge.merge(base, experts, "task_arithmetic", scale=1.0)
    ref = jmerge.merge(base, experts, "task_arithmetic", scale=1.0, check_finite=False)
    jax.tree.map(np.testing.assert_array_equal, out, ref)
    for x in jax.tree.leaves(out):
        assert np.isfinite(np.asarray(x)).all()
        with np.errstate(over="ignore"):
            assert not np.isfinite(np.sum(np.asarray(x), dtype=np.float32)), "the sum must overflow for this test"


def test_output_error_is_exported():
    assert jmerge.MergeOutputError is MergeOutputError
    assert "MergeOutputError" in jmerge.__all__


# ---------------------------------------------------------------------------- streamed
def test_streamed_merge_that_produces_nan_from_finite_inputs_raises(tmp_path, failing_svd):
    base, experts = _models(FLAT_SHAPES)
    paths = _write(tmp_path, base, experts)
    message = "iso_c produced NaN or infinite values in tensor 'l0.w' from finite inputs"
    merged = streaming.iter_merged(paths[0], paths[1:], "iso_c")
    name, bias = next(merged)  # tensors before the failing one are yielded
    assert name == "bias" and np.isfinite(bias).all()
    with pytest.raises(MergeOutputError, match=re.escape(message) + "$"):
        next(merged)


def test_streamed_merge_to_dir_raises_and_writes_nothing(tmp_path, failing_svd):
    base, experts = _models(FLAT_SHAPES)
    paths = _write(tmp_path / "in", base, experts)
    out = tmp_path / "out"
    message = "iso_c produced NaN or infinite values in tensor 'l0.w' from finite inputs"
    with pytest.raises(MergeOutputError, match=re.escape(message) + "$"):
        streaming.merge_to_dir(out, paths[0], paths[1:], "iso_c")
    assert not out.exists()


def test_streamed_check_finite_false_returns_the_nan(tmp_path, failing_svd):
    base, experts = _models(FLAT_SHAPES)
    paths = _write(tmp_path, base, experts)
    got = dict(streaming.iter_merged(paths[0], paths[1:], "iso_c", check_finite=False))
    assert np.isnan(got["l0.w"]).all()
    assert np.isfinite(got["bias"]).all()


def test_streamed_finite_merge_passes(tmp_path):
    # Outputs near float32's maximum: the check's float32 sum overflows, its exact pass settles it.
    base, experts = _models(FLAT_SHAPES, big=True)
    paths = _write(tmp_path, base, experts)
    got = dict(streaming.iter_merged(paths[0], paths[1:], "task_arithmetic", scale=1.0))
    ref = jmerge.merge(base, experts, "task_arithmetic", scale=1.0)
    for name in FLAT_SHAPES:
        assert np.isfinite(got[name]).all()
        with np.errstate(over="ignore"):
            assert not np.isfinite(np.sum(got[name], dtype=np.float32)), "the sum must overflow for this test"
        np.testing.assert_allclose(got[name], np.asarray(ref[name]), rtol=1e-6, err_msg=name)


def _overflowing_models():
    """float32 models whose task-arithmetic merge (scale 1) is 1e5 in tensor 'l0.w': finite in
    float32, beyond float16's largest value (65504); 'bias' stays small."""
    base, experts = _models(FLAT_SHAPES)
    base["l0.w"] = np.full(FLAT_SHAPES["l0.w"], 1e5, np.float32)
    for e in experts:
        e["l0.w"] = base["l0.w"].copy()
    return base, experts


@pytest.mark.parametrize("in_memory", [False, True])
def test_cast_to_an_out_dtype_that_overflows_raises_naming_the_tensor_and_dtype(tmp_path, in_memory):
    base, experts = _overflowing_models()
    paths = _write(tmp_path, base, experts)
    merged = (streaming.iter_merged_in_memory if in_memory else streaming.iter_merged)(
        paths[0], paths[1:], "task_arithmetic", scale=1.0, out_dtype="float16")
    message = "task_arithmetic: tensor 'l0.w' overflows its output dtype float16 (largest magnitude 100000)"
    with pytest.raises(MergeOutputError, match=re.escape(message) + "$"):
        dict(merged)


def test_cast_overflow_check_can_be_opted_out_of(tmp_path):
    base, experts = _overflowing_models()
    paths = _write(tmp_path, base, experts)
    with pytest.warns(RuntimeWarning, match="^overflow encountered in cast$"):  # numpy's own warning is kept
        got = dict(streaming.iter_merged(paths[0], paths[1:], "task_arithmetic", scale=1.0, out_dtype="float16",
                                         check_finite=False))
    assert got["l0.w"].dtype == np.float16 and np.isinf(got["l0.w"]).all()
    assert np.isfinite(got["bias"]).all()


# ---------------------------------------------------------------------------- command line
def test_cli_reports_a_numerical_failure_with_exit_status_3_and_writes_nothing(tmp_path, failing_svd, capsys):
    from jmerge import cli

    base, experts = _models(FLAT_SHAPES)
    _write(tmp_path, base, experts)
    (tmp_path / "merge.yaml").write_text(
        f"models: [{{model: {tmp_path / 'e0'}}}, {{model: {tmp_path / 'e1'}}}]\n"
        f"base_model: {tmp_path / 'base'}\nmerge_method: iso_c\n")
    out = tmp_path / "out"
    assert cli.main(["run", str(tmp_path / "merge.yaml"), str(out), "--no-progress"]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert err == ("numerical failure: iso_c produced NaN or infinite values in tensor 'l0.w' from finite inputs; "
                   "no output was written")
    assert not out.exists()
