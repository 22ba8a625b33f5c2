"""Bad input is refused before the merge is compiled, with errors naming the culprit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from helpers import nested_shapes, random_models
from jmerge import validate
from jmerge.methods import registry
from jmerge.validate import MergeInputError


@pytest.fixture
def models():
    return random_models(nested_shapes(), 3)


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if jmerge.merge reaches its compiled merge."""

    def refuse(*args, **kwargs):
        raise AssertionError("the merge was compiled before the bad input was refused")

    monkeypatch.setattr(registry, "_jitted", refuse)


def test_missing_parameter_names_its_path(models, no_compile):
    base, experts = models
    bad = jax.tree.map(lambda x: x, experts[1])
    del bad["block"]["attn"]["bias"]
    with pytest.raises(MergeInputError, match=r"expert 1 .*missing \['block/attn/bias'\]"):
        jmerge.merge(base, [experts[0], bad], "ties")


def test_extra_parameter_and_other_structure(models, no_compile):
    base, experts = models
    extra = {**experts[0], "head": jnp.zeros(3)}
    with pytest.raises(MergeInputError, match=r"unexpected \['head'\]"):
        jmerge.merge(base, [extra], "task_arithmetic")
    as_list = {**experts[0], "block": [experts[0]["block"]]}  # same leaves under another container
    with pytest.raises(MergeInputError, match="expert 0"):
        jmerge.merge(base, [as_list], "task_arithmetic")


def test_shape_mismatch_names_its_path(models, no_compile):
    base, experts = models
    bad = {**experts[0], "embed": jnp.zeros((24, 9))}
    with pytest.raises(MergeInputError, match=r"parameter 'embed': expert 0 has shape \(24, 9\), base \(24, 8\)"):
        jmerge.merge(base, [bad], "average")


def test_dtype_mismatch_names_its_path(models, no_compile):
    base, experts = models
    bad = jax.tree.map(lambda x: x, experts[2])
    bad["block"]["mlp"]["kernel"] = bad["block"]["mlp"]["kernel"].astype(jnp.float32)
    with pytest.raises(MergeInputError, match=r"parameter 'block/mlp/kernel': expert 1 has dtype float32, base bfloat16"):
        jmerge.merge(base, [experts[0], bad], "ties")


def test_non_float_parameters_are_refused(no_compile):
    base = {"w": jnp.zeros(3), "steps": jnp.zeros((), jnp.int32)}
    with pytest.raises(MergeInputError, match="'steps' has non-float dtype int32"):
        jmerge.merge(base, [base], "average")


def test_empty_or_wrong_expert_lists(models, no_compile):
    base, experts = models
    with pytest.raises(MergeInputError, match="experts is empty"):
        jmerge.merge(base, [], "ties")
    with pytest.raises(MergeInputError, match="list or tuple"):
        jmerge.merge(base, iter(experts), "ties")
    with pytest.raises(MergeInputError, match="no array leaves"):
        jmerge.merge({}, [{}], "ties")


@pytest.mark.parametrize(
    "method,hp,message",
    [
        ("ties", {"density": 0.0}, r"density=0.0 is outside \(0, 1.0\]"),
        ("ties", {"density": 1.5}, r"density=1.5 is outside"),
        ("ties", {"density": float("nan")}, r"density=nan is outside"),
        ("ties", {"density": (0.2, 0.3)}, "density has 2 values for 3 experts"),
        ("ties", {"density": "high"}, "density must be a number"),
        ("dare_linear", {"density": -0.1}, "density=-0.1 is outside"),
        ("dare_ties", {"density": 1.01}, "density=1.01 is outside"),
        ("breadcrumbs", {"gamma": 1.2}, r"gamma=1.2 is outside \[0, 1.0\]"),
        ("della", {"density": 0.1, "epsilon": 0.15}, "della needs 0 < density - epsilon"),
        ("della", {"epsilon": -0.1}, "epsilon=-0.1 is outside"),
        ("consensus", {"k": 4}, r"consensus k=4 must lie in \[0, 3\]"),
        ("consensus", {"tall_lambda": -1.0}, "tall_lambda=-1.0 is outside"),
        ("ties", {"trim": "layer"}, "trim must be 'global' or 'tensor'"),
        ("ties", {"sign": "mean"}, "sign must be 'sum' or 'count'"),
        ("dare_ties", {"sign": "vote"}, "sign must be 'sum' or 'count'"),
        ("breadcrumbs_ties", {"sign": "vote"}, "sign must be 'sum' or 'count'"),
        ("ties", {"normalize": "yes"}, "normalize must be True or False"),
        ("task_arithmetic", {"weights": (1.0, 2.0)}, "weights has 2 values for 3 experts"),
        ("task_arithmetic", {"weights": (1.0, np.inf, 2.0)}, "non-finite"),
        ("task_arithmetic", {"scale": float("nan")}, "scale must be one finite number"),
        ("average", {"weights": (1.0, -1.0, 0.0)}, "non-zero sum"),
    ],
)
def test_bad_hyper_parameters(models, no_compile, method, hp, message):
    base, experts = models
    key = jax.random.key(0) if jmerge.get(method).needs_key else None
    with pytest.raises(MergeInputError, match=message):
        jmerge.merge(base, experts, method, key=key, **hp)


def test_unknown_method_suggests_the_closest(models, no_compile):
    base, experts = models
    with pytest.raises(MergeInputError, match=r"unknown merge method 'tie'; did you mean 'ties'\?"):
        jmerge.merge(base, experts, "tie")
    with pytest.raises(MergeInputError, match="available: .*task_arithmetic"):
        jmerge.get("zzz")


def test_unknown_hyper_parameter_suggests_the_closest(models, no_compile):
    base, experts = models
    with pytest.raises(MergeInputError, match=r"no hyper-parameter 'densty'; did you mean 'density'\?"):
        jmerge.merge(base, experts, "ties", densty=0.3)
    with pytest.raises(MergeInputError, match=r"known: .*scale"):
        jmerge.merge(base, experts, "magmax", lam=0.3)


def test_stochastic_method_without_key(models, no_compile):
    base, experts = models
    with pytest.raises(MergeInputError, match="stochastic: pass key="):
        jmerge.merge(base, experts, "dare_linear")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_model_and_path(models, no_compile, value):
    base, experts = models
    bad = jax.tree.map(lambda x: x, experts[2])
    bad["block"]["attn"]["kernel"] = bad["block"]["attn"]["kernel"].at[3, 5].set(value)
    with pytest.raises(MergeInputError, match=r"expert 2: parameter 'block/attn/kernel' holds NaN or infinite"):
        jmerge.merge(base, [experts[0], experts[1], bad], "task_arithmetic")
    bad_base = {**base, "scale": jnp.float32(value)}
    with pytest.raises(MergeInputError, match=r"base: parameter 'scale'"):
        jmerge.merge(bad_base, experts, "task_arithmetic")


def test_bfloat16_non_finite_values_are_found(models):
    base, experts = models
    bad = jax.tree.map(lambda x: x, experts[0])
    bad["block"]["mlp"]["bias"] = bad["block"]["mlp"]["bias"].at[0].set(jnp.inf)
    with pytest.raises(MergeInputError, match="block/mlp/bias"):
        validate.check_models(base, [bad])
    validate.check_models(base, [bad], check_finite=False)  # the check can be turned off


def test_traced_hyper_parameters_are_not_checked_under_jit(models):
    base, experts = models

    @jax.jit
    def run(scale, weights):
        tvs = jmerge.task_vectors(base, experts)
        return jmerge.merge_task_vectors(base, tvs, "task_arithmetic", scale=scale, weights=weights)

    out = run(0.5, jnp.asarray([1.0, 2.0, 3.0]))
    assert jax.tree.structure(out) == jax.tree.structure(base)
    want = jmerge.merge(base, experts, "task_arithmetic", scale=0.5, weights=(1.0, 2.0, 3.0))
    chex.assert_trees_all_close(out, want, rtol=1e-6, atol=1e-6)  # the traced values were used
    chex.assert_trees_all_equal_dtypes(out, base)
