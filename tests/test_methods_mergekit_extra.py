"""mergekit's remaining methods (della_linear, sce, nearswap, arcee_fusion, karcher, nuslerp,
ram, ramplus_tl) and TIES ``rescale``, against plain-numpy transcriptions of mergekit's
per-tensor code (mergekit/merge_methods/*.py, mergekit/sparsify.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge import MergeInputError
from helpers import as_np, assert_matches, method_models, np_task_vectors

DTYPES = [jnp.float32, jnp.bfloat16]


# ----------------------------------------------------------------------------- numpy references
def np_l1_rescale(x, kept, eps=1e-7):
    before, after = np.abs(x).sum(), np.abs(kept).sum()
    return kept if before < eps or after < eps else kept * (before / after)


def np_sce(ts, topk):
    x = np.stack(ts)
    if topk < 1:
        var = x.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        mask = np.zeros(var.size, bool)
        mask[np.argsort(-var.reshape(-1), kind="stable")[:k]] = True
        x = x * mask.reshape(var.shape)
    majority = np.where(x.sum(0) >= 0, 1.0, -1.0)
    erase = np.sign(x) == majority
    w = (x**2).reshape(len(ts), -1).mean(1)
    w = np.ones_like(w) / len(w) if abs(w.sum()) < 1e-6 else w / w.sum()
    ew = w.reshape((-1,) + (1,) * (x.ndim - 1)) * erase
    return (x * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


def np_nearswap(a, tau, t):
    b = a + tau
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    return w * b + (1 - w) * a


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_arcee_fusion(a, tau):
    b = a + tau
    p, q = np_softmax(b) + 1e-8, np_softmax(a) + 1e-8
    s = np.abs(b - a) * np.sum(p * np.log(p / q), -1, keepdims=True)
    srt = np.sort(s.reshape(-1))
    quant = lambda q_: srt[int(q_ * (srt.size - 1))]  # noqa: E731
    threshold = quant(0.5) + 1.5 * (quant(0.75) - quant(0.25))
    return a + (b - a) * (s >= threshold)


def np_karcher(ts, max_iter=10, tol=1e-5):
    """mergekit's karcher_merge_tensors, line by line, equal weights."""
    alphas = [1.0 / len(ts)] * len(ts)
    norms = [float(np.linalg.norm(t)) for t in ts]
    units = [t / n if n else np.zeros_like(t) for t, n in zip(ts, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return np.zeros_like(ts[0])
    a = np.asarray([alphas[i] for i in valid]) / sum(alphas[i] for i in valid)
    vu = [units[i] for i in valid]
    u = sum(ai * ui for ai, ui in zip(a, vu))
    nu = np.linalg.norm(u)
    u = vu[0].copy() if nu < tol else u / nu
    for _ in range(max_iter):
        T = np.zeros_like(u)
        for ai, ui in zip(a, vu):
            dot = np.clip(np.sum(u * ui), -1, 1)
            theta = np.arccos(dot)
            if theta < tol:
                continue
            T += ai * (theta / np.sin(theta)) * (ui - dot * u)
        nT = np.linalg.norm(T)
        if nT < tol:
            break
        u = np.cos(nT) * u + np.sin(nT) * (T / nT)
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return sum(al * n for al, n in zip(alphas, norms)) * u


def np_nuslerp(t, v0, v1, row_wise, flatten, eps=1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise and v0.ndim > 1:
        v0, v1 = np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)  # noqa: E731
    cos = np.clip(np.sum(unit(v0) * unit(v1), -1, keepdims=True), -1, 1)
    colinear = 1 - cos**2 <= eps**2
    theta = np.arccos(np.where(colinear, 0, cos))
    sin = np.sin(theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        res = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / sin
    res = np.where(colinear, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten and res.ndim > 1:
        res = np.swapaxes(res, 0, -1)
    return res.reshape(shape)


def np_ram(ts, epsilon, r=None, alpha=None):
    x = np.stack(ts).reshape(len(ts), -1)
    nz = np.abs(x) > epsilon
    count = nz.sum(0, keepdims=True)
    shared, unique = count > 1, count == 1
    lam = np.ones((len(ts), 1))
    if r is not None:
        rho = (nz & shared).sum(1) / np.maximum((nz & unique).sum(1), epsilon)
        lam = (1 + r * np.clip(rho, 0, alpha))[:, None]
    xz = x * nz
    return (xz * unique * lam + xz * shared / np.maximum(count, 1)).sum(0).reshape(ts[0].shape)


def per_tensor(base, experts, fn):
    b, taus = np_task_vectors(base, experts)
    return {p: fn(b[p], [tau[p] for tau in taus]) for p in b}


# ----------------------------------------------------------------------------- agreement with numpy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_matches_numpy(dtype, topk):
    base, experts = method_models(20, 3, dtype)
    out = jmerge.merge(base, experts, "sce", select_topk=topk)
    assert_matches(out, per_tensor(base, experts, lambda b, ts: b + np_sce(ts, topk)), dtype)


def test_sce_topk_keeps_the_high_variance_entries_only():
    base, experts = method_models(21, 3)
    b, taus = np_task_vectors(base, experts)
    out = as_np(jmerge.merge(base, experts, "sce", select_topk=0.25))
    for p in b:
        var = np.var(np.stack([t[p] for t in taus]), axis=0)
        changed = out[p] != b[p]
        assert changed.sum() <= int(0.25 * var.size), p
        assert var[changed].min() >= np.sort(var.reshape(-1))[::-1][int(0.25 * var.size) - 1] - 1e-12, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.05, 0.3])
def test_nearswap_matches_numpy(dtype, t):
    base, experts = method_models(22, 1, dtype)
    out = jmerge.merge(base, experts, "nearswap", t=t)
    assert_matches(out, per_tensor(base, experts, lambda b, ts: np_nearswap(b, ts[0], t)), dtype)


def test_nearswap_takes_close_values_and_keeps_far_ones_near_the_base():
    base, experts = method_models(23, 1, spread=1.0)
    b, (tau,) = np_task_vectors(base, experts)
    out = as_np(jmerge.merge(base, experts, "nearswap", t=0.1))
    for p in b:
        close = np.abs(tau[p]) <= 0.1
        np.testing.assert_allclose(out[p][close], (b[p] + tau[p])[close], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[p][~close], b[p][~close] + 0.1 * np.sign(tau[p][~close]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcee_fusion_matches_numpy(dtype):
    base, experts = method_models(24, 1, dtype)
    out = jmerge.merge(base, experts, "arcee_fusion")
    ref = per_tensor(base, experts, lambda b, ts: np_arcee_fusion(b, ts[0]))
    assert_matches(out, ref, dtype)
    kept = [np.mean(ref[p] != as_np(base)[p]) for p in ref]
    assert 0 < np.mean(kept) and max(kept) < 0.5  # the threshold keeps a minority of entries


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, max_iter", [(3, 10), (2, 1), (4, 0)])
def test_karcher_matches_numpy(dtype, n, max_iter):
    base, experts = method_models(25, n, dtype, spread=1.0)
    out = jmerge.merge(base, experts, "karcher", max_iter=max_iter)
    ref = per_tensor(base, experts, lambda b, ts: np_karcher([b + t for t in ts], max_iter))
    assert_matches(out, ref, dtype, rtol32=2e-5, atol32=5e-5)


def test_karcher_of_one_direction_is_the_mean_norm_times_it():
    base, (e,) = method_models(26, 1)
    out = jmerge.merge(base, [e, jax.tree.map(lambda x: 3 * x, e)], "karcher")
    assert_matches(out, {p: 2 * x for p, x in as_np(e).items()}, jnp.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("space", ["weights", "task_vectors"])
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_numpy(dtype, space, flatten, row_wise):
    base, experts = method_models(27, 2, dtype)
    w = (1.0, 3.0)
    out = jmerge.merge(base, experts, "nuslerp", weights=w, flatten=flatten, row_wise=row_wise, space=space)

    def ref(b, ts):
        if space == "weights":
            return np_nuslerp(0.75, b + ts[0], b + ts[1], row_wise, flatten)
        return b + np_nuslerp(0.75, ts[0], ts[1], row_wise, flatten)

    assert_matches(out, per_tensor(base, experts, ref), dtype)


def test_nuslerp_row_wise_differs_from_whole_tensor_on_matrices():
    base, experts = method_models(28, 2)
    whole = as_np(jmerge.merge(base, experts, "nuslerp", weights=(1.0, 1.0)))
    rows = as_np(jmerge.merge(base, experts, "nuslerp", weights=(1.0, 1.0), flatten=False))
    assert max(np.max(np.abs(whole[p] - rows[p])) for p in whole if whole[p].ndim >= 2) > 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method, hp", [("ram", {}), ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.5, "alpha": 1.0})])
def test_ram_matches_numpy(dtype, method, hp):
    base, experts = method_models(29, 3, dtype)
    # RL-style sparse task vectors: each expert changes a random ~40 % of the entries
    rng = np.random.default_rng(0)
    experts = [jax.tree.map(lambda b, e: jnp.where(jnp.asarray(rng.random(b.shape) < 0.4), e, b), base, e) for e in experts]
    out = jmerge.merge(base, experts, method, **hp)
    r = None if method == "ram" else hp.get("r", 0.1)
    alpha = hp.get("alpha", 0.2)
    assert_matches(out, per_tensor(base, experts, lambda b, ts: b + np_ram(ts, 1e-5, r, alpha)), dtype)


def test_della_linear_l1_rescale_and_weighted_sum():
    """With a key, della_linear's masks are those of stages.della; given them, the output is
    mergekit's ``sum_t w_t l1_rescale(tau_t, kept_t)``, and ``keep_probability`` divides by p."""
    base, experts = method_models(30, 2)
    key = jax.random.key(3)
    b, taus = np_task_vectors(base, experts)
    plain = as_np(jmerge.merge(base, experts, "della_linear", key=key, density=0.5, epsilon=0.1, rescale=False))
    ref = as_np(jmerge.merge(base, experts, "della_linear", key=key, density=0.5, epsilon=0.1, weights=(0.7, 0.4)))
    kept = jmerge.stages.della(0.5, 0.1, rescale=False)(jmerge.tree.task_vectors(base, experts), key)
    kept = [as_np(k) for k in kept]
    for p in b:
        np.testing.assert_allclose(plain[p], b[p] + kept[0][p] + kept[1][p], rtol=1e-5, atol=1e-5)
        want = b[p] + sum(w * np_l1_rescale(t[p], k[p]) for w, t, k in zip((0.7, 0.4), taus, kept))
        np.testing.assert_allclose(ref[p], want, rtol=1e-5, atol=1e-5, err_msg=p)
    kept_all = np.concatenate([k[p].ravel() for k in kept for p in b])  # a tiny bias alone is too few draws
    assert abs(np.mean(kept_all != 0) - 0.5) < 0.05, np.mean(kept_all != 0)
    by_p = as_np(jmerge.merge(base, experts, "della_linear", key=key, density=0.5, epsilon=0.1,
                              rescale_norm="keep_probability"))
    divided = [as_np(k) for k in jmerge.stages.della(0.5, 0.1)(jmerge.tree.task_vectors(base, experts), key)]
    for p in b:
        np.testing.assert_allclose(by_p[p], b[p] + divided[0][p] + divided[1][p], rtol=1e-5, atol=1e-5, err_msg=p)
        survivors = kept[0][p] != 0
        assert np.all(np.abs(divided[0][p][survivors]) > np.abs(kept[0][p][survivors])), p  # divided by p < 1


def test_ties_rescale_restores_each_trimmed_tensor_l1_norm():
    base, experts = method_models(31, 2)
    b, taus = np_task_vectors(base, experts)
    out = as_np(jmerge.merge(base, experts, "ties", density=0.3, trim="tensor", rescale=True, normalize=False))
    for p in b:
        trimmed = []
        for t in taus:
            k = int(0.3 * t[p].size)
            thr = np.sort(np.abs(t[p]).reshape(-1))[::-1][k - 1]
            trimmed.append(np_l1_rescale(t[p], np.where(np.abs(t[p]) >= thr, t[p], 0.0)))
        x = np.stack(trimmed)
        agree = np.sign(x) == np.where(x.sum(0) >= 0, 1.0, -1.0)
        np.testing.assert_allclose(out[p], b[p] + (x * agree).sum(0), rtol=1e-5, atol=1e-5, err_msg=p)


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("method, hp", [
    ("sce", {}), ("karcher", {}), ("nuslerp", {"weights": (1.0, 2.0)}),
    ("nuslerp", {"weights": (1.0, 2.0), "space": "task_vectors"}), ("ram", {}), ("ramplus_tl", {}),
])
def test_identical_experts_give_that_expert(method, hp):
    base, (e,) = method_models(32, 1)
    n = 2 if method == "nuslerp" else 3
    out = jmerge.merge(base, [e] * n, method, **hp)
    assert_matches(out, as_np(e), jnp.float32)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "method, n, hp, match",
    [
        ("nearswap", 1, {}, r"^nearswap needs the parameter t \(the distance"),
        ("nearswap", 2, {"t": 0.1}, r"^nearswap merges one model into the base, got 2 experts$"),
        ("arcee_fusion", 2, {}, r"^arcee_fusion merges one model into the base, got 2 experts$"),
        ("nuslerp", 3, {"weights": (1.0, 1.0, 1.0)}, r"^nuslerp merges exactly two models \(plus an optional base\), got 3"),
        ("nuslerp", 2, {"weights": (1.0,)}, r"^weights has 1 values for 2 experts$"),
        ("nuslerp", 2, {"weights": (1.0, 1.0), "space": "angles"}, r"^space must be 'weights' or 'task_vectors', got 'angles'$"),
        ("karcher", 2, {"max_iter": 2.5}, r"^max_iter must be an integer >= 0, got 2.5$"),
        ("sce", 2, {"select_topk": 1.5}, r"^select_topk=1.5 is outside \[0, 1.0\]$"),
        ("ram", 2, {"epsilon": -1.0}, r"^epsilon=-1.0 is outside \[0, inf\]$"),
        ("della_linear", 2, {"rescale_norm": "l2"}, r"^rescale_norm must be 'l1' or 'keep_probability', got 'l2'$"),
        ("della_linear", 2, {"density": 0.9, "epsilon": 0.2}, r"^della needs 0 < density - epsilon and density \+ epsilon <= 1"),
    ],
)
def test_bad_input(method, n, hp, match):
    base, experts = method_models(33, n)
    with pytest.raises(MergeInputError, match=match):
        jmerge.merge(base, experts, method, key=jax.random.key(0), **hp)
