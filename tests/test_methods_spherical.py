"""SLERP, Multi-SLERP and Model Stock against plain-numpy references of their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge import MergeInputError
from helpers import as_np, assert_matches, method_models, np_task_vectors

DTYPES = [jnp.float32, jnp.bfloat16]
EPS = 1e-8


# ----------------------------------------------------------------------------- numpy references
def np_slerp(t, a, b):
    """mergekit's slerp on flattened tensors: normalised dot, lerp above 0.9995."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua = a / na if na > EPS else a
    ub = b / nb if nb > EPS else b
    dot = np.sum(ua * ub)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    omega = np.arccos(dot)
    return np.sin((1 - t) * omega) / np.sin(omega) * a + np.sin(t * omega) / np.sin(omega) * b


def np_slerp_merge(base, experts, t, space):
    b, (tau1, tau2) = np_task_vectors(base, experts)
    if space == "weights":
        return {p: np_slerp(t, b[p] + tau1[p], b[p] + tau2[p]) for p in b}
    return {p: b[p] + np_slerp(t, tau1[p], tau2[p]) for p in b}


def np_multislerp(ts, w):
    """mergekit's description, tangent step included: unit vectors, weighted mean direction,
    weighted tangent-space mean, exponential map, times the weighted mean norm."""
    w = np.asarray(w, np.float64) / np.sum(w)
    norms = [np.linalg.norm(x) for x in ts]
    units = [x / n if n > EPS else np.zeros_like(x) for x, n in zip(ts, norms)]
    m = sum(wi * u for wi, u in zip(w, units))
    if np.linalg.norm(m) <= 1e-6:  # jmerge's float32-aware threshold (mergekit: 1e-8)
        return sum(wi * x for wi, x in zip(w, ts))
    mu = m / np.linalg.norm(m)
    tangent = sum(wi * (u - np.sum(u * mu) * mu) for wi, u in zip(w, units))
    tn = np.linalg.norm(tangent)
    direction = mu if tn <= EPS else np.cos(tn) * mu + np.sin(tn) / tn * tangent
    return direction * sum(wi * n for wi, n in zip(w, norms))


def np_multislerp_merge(base, experts, weights=None):
    b, taus = np_task_vectors(base, experts)
    w = np.ones(len(taus)) if weights is None else np.asarray(weights)
    return {p: b[p] + np_multislerp([tau[p] for tau in taus], w) for p in b}


def np_model_stock_merge(base, experts, filter_wise=False):
    b, taus = np_task_vectors(base, experts)
    k = len(taus)
    out = {}
    for p in b:
        ts = [tau[p] for tau in taus]
        rows = filter_wise and ts[0].ndim >= 2  # mergekit: cosines over the last axis, one t per other index
        flat = [x if rows else x.reshape(1, -1) for x in ts]
        cos = []
        for i in range(k):
            for j in range(i + 1, k):
                num = np.sum(flat[i] * flat[j], axis=-1)
                den = np.linalg.norm(flat[i], axis=-1) * np.linalg.norm(flat[j], axis=-1)
                cos.append(np.clip(num / np.maximum(den, 1e-6), -1, 1))
        c = np.mean(cos, axis=0)
        t = k * c / ((k - 1) * c + 1)
        t = t[..., None] if rows else t.reshape(())
        out[p] = b[p] + t * np.mean(ts, axis=0)
    return out


# ----------------------------------------------------------------------------- agreement with numpy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("space", ["weights", "task_vectors"])
@pytest.mark.parametrize("t", [0.5, 0.3])
def test_slerp_matches_numpy(dtype, space, t):
    base, experts = method_models(0, 2, dtype)
    out = jmerge.merge(base, experts, "slerp", t=t, space=space)
    assert_matches(out, np_slerp_merge(base, experts, t, space), dtype)


def test_slerp_is_not_lerp_on_random_inputs():
    base, experts = method_models(1, 2)
    for space in ("weights", "task_vectors"):
        out = as_np(jmerge.merge(base, experts, "slerp", space=space))
        lerp = as_np(jmerge.merge(base, experts, "average"))
        gap = max(np.max(np.abs(out[p] - lerp[p])) for p in out)
        assert gap > 1e-3, space


def test_slerp_falls_back_to_lerp_for_nearly_parallel_inputs():
    base, experts = method_models(2, 2, spread=1e-3)  # cos(w1, w2) ~ 1 - 1e-6 > 0.9995
    out = jmerge.merge(base, experts, "slerp", t=0.25)
    b, (t1, t2) = np_task_vectors(base, experts)
    assert_matches(out, {p: 0.75 * (b[p] + t1[p]) + 0.25 * (b[p] + t2[p]) for p in b}, jnp.float32)
    # task vectors of one direction with different norms: lerp in task-vector space
    e2 = jax.tree.map(lambda b_, e: b_ + 3.0 * (e - b_), base, experts[0])
    out = jmerge.merge(base, [experts[0], e2], "slerp", t=0.25, space="task_vectors")
    _, (t1, t2) = np_task_vectors(base, [experts[0], e2])
    assert_matches(out, {p: b[p] + 0.75 * t1[p] + 0.25 * t2[p] for p in b}, jnp.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [None, (1.0, 2.0, 0.5)])
def test_multislerp_matches_numpy(dtype, weights):
    base, experts = method_models(3, 3, dtype)
    out = jmerge.merge(base, experts, "multislerp", weights=weights)
    assert_matches(out, np_multislerp_merge(base, experts, weights), dtype)


def test_multislerp_two_opposite_task_vectors_fall_back_to_weighted_sum():
    base, (e1,) = method_models(4, 1)
    base = jax.tree.map(jnp.zeros_like, base)
    e2 = jax.tree.map(jnp.negative, e1)  # tau_2 = -tau_1 exactly
    out = jmerge.merge(base, [e1, e2], "multislerp")
    b, (t1, t2) = np_task_vectors(base, [e1, e2])
    assert_matches(out, {p: b[p] + 0.5 * (t1[p] + t2[p]) for p in b}, jnp.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_numpy(dtype, filter_wise):
    base, experts = method_models(5, 3, dtype)
    out = jmerge.merge(base, experts, "model_stock", filter_wise=filter_wise)
    assert_matches(out, np_model_stock_merge(base, experts, filter_wise), dtype)


def test_model_stock_filter_wise_changes_matrices_only():
    base, experts = method_models(6, 3)
    whole = as_np(jmerge.merge(base, experts, "model_stock"))
    rows = as_np(jmerge.merge(base, experts, "model_stock", filter_wise=True))
    for p in whole:
        if whole[p].ndim >= 2:
            assert np.max(np.abs(whole[p] - rows[p])) > 1e-4, p
        else:
            np.testing.assert_array_equal(whole[p], rows[p], err_msg=p)


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_experts_give_that_expert(dtype):
    base, (e,) = method_models(7, 1, dtype)
    want = as_np(e)
    for method, n, hp in [
        ("slerp", 2, {"space": "weights"}),
        ("slerp", 2, {"space": "task_vectors", "t": 0.3}),
        ("multislerp", 3, {"weights": (0.2, 0.5, 0.3)}),
        ("model_stock", 3, {}),  # cos = 1 -> t = 1
        ("model_stock", 2, {"filter_wise": True}),
    ]:
        assert_matches(jmerge.merge(base, [e] * n, method, **hp), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("space", ["weights", "task_vectors"])
def test_slerp_endpoints_are_the_experts(dtype, space):
    base, experts = method_models(8, 2, dtype)
    for t, e in [(0.0, experts[0]), (1.0, experts[1])]:
        assert_matches(jmerge.merge(base, experts, "slerp", t=t, space=space), as_np(e), dtype)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "method, n, hp, match",
    [
        ("slerp", 3, {}, "exactly two"),
        ("slerp", 1, {}, "exactly two"),
        ("slerp", 2, {"t": 1.5}, "t=1.5"),
        ("slerp", 2, {"t": -0.1}, "t=-0.1"),
        ("slerp", 2, {"space": "angles"}, "space"),
        ("multislerp", 1, {}, "at least 2"),
        ("multislerp", 2, {"weights": (1.0, -1.0)}, ">= 0"),
        ("multislerp", 2, {"weights": (1.0, 1.0, 1.0)}, "3 values for 2"),
        ("model_stock", 1, {}, "at least 2"),
    ],
)
def test_bad_input(method, n, hp, match):
    base, experts = method_models(9, n)
    with pytest.raises(MergeInputError, match=match):
        jmerge.merge(base, experts, method, **hp)
