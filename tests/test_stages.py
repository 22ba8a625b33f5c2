"""jmerge.stages against the plain-numpy formulas of tests/reference.py."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from jmerge import stages, thresholds
from jmerge import tree as jtree
from jmerge.thresholds import xla

SEARCH_SHAPES = [(150, 130), (7,), (40, 30)]  # 20707 entries: above the sort cut-off
SMALL_SHAPES = [(30, 20), (5,)]  # 605 entries: sorted


def _split(values: np.ndarray, shapes) -> list[np.ndarray]:
    out, i = [], 0
    for s in shapes:
        size = int(np.prod(s))
        out.append(values[i : i + size].reshape(s))
        i += size
    return out


def _distributions(n: int, rng) -> dict[str, np.ndarray]:
    base = rng.standard_normal(n).astype(ml_dtypes.bfloat16)
    expert = (base.astype(np.float32) + 0.01 * rng.standard_normal(n)).astype(ml_dtypes.bfloat16)
    normal = rng.standard_normal(n).astype(np.float32)
    return {
        "normal": normal,
        "half zeros": np.where(rng.random(n) < 0.5, 0.0, normal).astype(np.float32),
        "90% zeros": np.where(rng.random(n) < 0.9, 0.0, normal).astype(np.float32),
        "quantized": (np.round(normal * 100) / 100).astype(np.float32),
        "bf16 deltas": expert.astype(np.float32) - base.astype(np.float32),
        "mixed scales": (normal * 10.0 ** rng.integers(-6, 3, n)).astype(np.float32),
        "sorted": np.sort(normal),
        "constant": np.full(n, -0.25, np.float32),
        "tiny (below 2**-100)": (normal * 1e-35).astype(np.float32),
        "subnormal": (normal * 1e-40).astype(np.float32),
        "huge (above 2**100)": (normal * 1e35).astype(np.float32),
        "with inf": np.where(rng.random(n) < 0.3, np.inf, normal).astype(np.float32),
    }


@functools.partial(jax.jit, static_argnums=1)
def _kth_many(groups, ks):
    return xla.kth_largest_magnitudes(groups, list(ks))


@pytest.mark.parametrize("shapes", [SEARCH_SHAPES, SMALL_SHAPES], ids=["search", "sort"])
def test_kth_largest_equals_numpy_sort(shapes):
    n = sum(int(np.prod(s)) for s in shapes)
    rng = np.random.default_rng(0)
    ks = (1, 2, 10, 333, n // 5, n // 2, n - 1, n)
    groups, want = [], []
    for values in _distributions(n, rng).values():
        desc = np.sort(np.abs(values))[::-1]
        for k in ks:
            groups.append([jnp.asarray(a) for a in _split(values, shapes)])
            want.append(desc[k - 1])
    got = np.asarray(_kth_many(groups, ks * (len(groups) // len(ks))))
    names = [name for name in _distributions(n, rng) for _ in ks]
    bad = [(name, k, g, w) for name, k, g, w in zip(names, ks * len(names), got, want) if g != w]
    assert not bad, bad[:5]


def test_kth_largest_single_group_and_bad_k():
    rng = np.random.default_rng(1)
    leaves = [jnp.asarray(a) for a in _split(rng.standard_normal(20707).astype(np.float32), SEARCH_SHAPES)]
    desc = np.sort(np.abs(np.concatenate([np.asarray(x).ravel() for x in leaves])))[::-1]
    f = jax.jit(xla.kth_largest_magnitude, static_argnums=1)
    assert f(leaves, 4141) == desc[4140]
    assert f(leaves, 20707) == desc[-1]
    with pytest.raises(ValueError, match="k=0|one k in"):
        xla.kth_largest_magnitude(leaves, 0)
    with pytest.raises(ValueError, match="same shapes"):
        xla.kth_largest_magnitudes([leaves, leaves[:2]], [1, 1])


def test_kth_largest_over_many_chunks_and_under_vmap(monkeypatch):
    monkeypatch.setattr(xla, "_CHUNK", 3000)  # 7 chunks of different sizes, counted separately
    rng = np.random.default_rng(4)
    values = (rng.standard_normal(20707) * 10.0 ** rng.integers(-3, 2, 20707)).astype(np.float32)
    leaves = [jnp.asarray(a) for a in _split(values, SEARCH_SHAPES)]
    chunks = xla._magnitude_chunks(leaves)
    sizes = [int(c.size) for c in chunks]
    assert len(set(sizes)) == len(sizes) == 7 and max(sizes) <= 3000 and sum(sizes) == 20707
    desc = np.sort(np.abs(values))[::-1]
    got = jax.jit(lambda ls: xla.kth_largest_magnitudes([ls] * 3, [1, 4141, 20000]))(leaves)
    np.testing.assert_array_equal(got, desc[[0, 4140, 19999]])
    batch = jnp.stack([jnp.asarray(values[:19500].reshape(150, 130)), jnp.zeros((150, 130))])
    got = jax.vmap(lambda a: xla.kth_largest_magnitude([a], 777))(batch)
    np.testing.assert_array_equal(got, [np.sort(np.abs(values[:19500]))[::-1][776], 0.0])


def _distinct(shapes, seed):
    """Values with pairwise distinct magnitudes (a shuffled ramp with random signs)."""
    rng = np.random.default_rng(seed)
    n = sum(int(np.prod(s)) for s in shapes)
    mags = (1.0 + rng.permutation(n)) * np.float32(1e-3)
    return [jnp.asarray(a) for a in _split((mags * rng.choice([-1, 1], n)).astype(np.float32), shapes)]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), density=st.sampled_from([0.37, 0.93]), scope=st.sampled_from(["global", "tensor"]))
def test_trim_keeps_exactly_int_density_n(seed, density, scope):
    leaves = _distinct(SEARCH_SHAPES, seed)
    (out,) = _trim(density, scope, [leaves])
    kept = [int(jnp.count_nonzero(x)) for x in out]
    if scope == "global":
        assert sum(kept) == int(density * 20707)
    else:
        assert kept == [int(density * int(np.prod(s))) for s in SEARCH_SHAPES]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _trim(density, scope, tvs):
    return stages.magnitude_trim(density, scope)(tvs)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.2, (0.3, 0.05, 1.0)])
def test_magnitude_trim_matches_reference(scope, density):
    rng = np.random.default_rng(2)
    tvs = [
        {"a": jnp.asarray(rng.standard_normal((150, 130)), jnp.float32) * s, "b": jnp.asarray(rng.standard_normal(7), jnp.float32)}
        for s in (1.0, 0.1, 3.0)
    ]
    out = _trim(density, scope, tvs)
    for t, d in enumerate(stages.per_task(density, 3)):
        chex.assert_trees_all_equal(ref.flat(out[t]), ref.trim(ref.flat(tvs[t]), d, scope))


def _top_k_mask(arrays, k):
    """Masks keeping the k largest |x| jointly over ``arrays``: the solved threshold, then the keep rule."""
    (lower,) = thresholds.solve(thresholds.Query("global", lambda t, n: (k,)), [arrays])[0]
    return [thresholds.keep(a, lower) for a in arrays]


def test_top_k_masks_edge_counts():
    x = [jnp.arange(6.0).reshape(2, 3)]
    assert bool(_top_k_mask(x, 6)[0].all()) and bool(_top_k_mask(x, 9)[0].all())
    assert not bool(_top_k_mask(x, 0)[0].any())
    np.testing.assert_array_equal(_top_k_mask(x, 2)[0], np.arange(6).reshape(2, 3) >= 4)
    ties = [jnp.asarray([1.0, -2.0, 2.0, 0.5])]  # ties with the k-th largest are all kept
    np.testing.assert_array_equal(_top_k_mask(ties, 1)[0], [False, True, True, False])


def test_breadcrumbs_matches_reference():
    rng = np.random.default_rng(3)
    tvs = [{"w": jnp.asarray(rng.standard_normal((150, 130)), jnp.float32), "b": jnp.asarray(rng.standard_normal(49), jnp.float32)} for _ in range(2)]
    for density, gamma in [(0.3, 0.1), (15 / 49, 0.0)]:
        out = jax.jit(lambda tv: stages.breadcrumbs(density, gamma)(tv))(tvs)
        for tv, o in zip(tvs, out):
            f = ref.flat(tv)
            want = {p: np.where(ref.breadcrumbs_mask(x, density, gamma), x, 0) for p, x in f.items()}
            chex.assert_trees_all_equal(ref.flat(o), want)
    # int(15/49 * 49) == 14 in floating point: the kept count follows int(density * n) exactly
    assert int(jnp.count_nonzero(out[0]["b"])) == int(15 / 49 * 49)


# ---------------------------------------------------------------------------- stochastic sparsifiers
def _big_tv(seed=4):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((200, 100)), jnp.float32), "v": jnp.asarray(rng.standard_normal(500), jnp.float32)}


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_keeps_entries_rescaled_at_rate_density(rescale):
    tv, density = _big_tv(), 0.3
    (out,) = stages.dare(density, rescale)([tv], jax.random.key(0))
    for x, y in zip(jax.tree.leaves(tv), jax.tree.leaves(out)):
        kept = np.asarray(y) != 0
        expect = np.asarray(x) / density if rescale else np.asarray(x)
        np.testing.assert_allclose(np.asarray(y)[kept], expect[kept], rtol=1e-6)
    frac = sum(int(jnp.count_nonzero(y)) for y in jax.tree.leaves(out)) / 20500
    assert abs(frac - density) < 5 * np.sqrt(density * (1 - density) / 20500)


def test_dare_draws_are_per_leaf_bernoulli():
    """Batched draws give exactly jax.random.bernoulli(fold_in(fold_in(key, path_hash(path_i)), t), d_t)."""
    tvs, key, densities = [_big_tv(s) for s in (5, 6)], jax.random.key(9), (0.3, 0.6)
    out = stages.dare(densities)(tvs, key)
    for t, (tv, d) in enumerate(zip(tvs, densities)):
        for path, x, y in zip(jtree.paths(tv), jax.tree.leaves(tv), jax.tree.leaves(out[t])):
            keep = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, jtree.path_hash(path)), t), d, x.shape)
            np.testing.assert_array_equal(np.asarray(y) != 0, keep)
            np.testing.assert_allclose(y, np.where(keep, np.asarray(x) / np.float32(d), 0.0), rtol=1e-6)


def test_dare_keys_fixed_vs_different_and_tasks_independent():
    tv = _big_tv()
    a = stages.dare(0.5)([tv, tv], jax.random.key(7))
    b = stages.dare(0.5)([tv, tv], jax.random.key(7))
    c = stages.dare(0.5)([tv, tv], jax.random.key(8))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a[0]["w"], c[0]["w"])
    assert not np.array_equal(a[0]["w"], a[1]["w"])  # each task gets its own mask
    with pytest.raises(ValueError, match="PRNG key"):
        stages.dare(0.5)([tv], None)


def test_della_keep_probability_follows_magnitude_rank():
    tv, density, eps = _big_tv(), 0.5, 0.2
    (out,) = stages.della(density, eps)([tv], jax.random.key(1))
    x, y = np.asarray(tv["w"]), np.asarray(out["w"])
    ranks = np.argsort(np.argsort(np.abs(x), axis=-1), axis=-1) / (x.shape[-1] - 1)
    p = density - eps + 2 * eps * ranks  # mergekit's row-wise rank normalisation
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / p[kept], rtol=1e-5)
    assert abs(kept.mean() - density) < 0.02
    top, bottom = ranks > 0.5, ranks < 0.5
    assert kept[top].mean() > kept[bottom].mean() + 0.1  # larger magnitudes survive more
    (again,) = stages.della(density, eps)([tv], jax.random.key(1))
    (other,) = stages.della(density, eps)([tv], jax.random.key(2))
    chex.assert_trees_all_equal(out, again)
    assert not np.array_equal(out["w"], other["w"])
    (plain,) = stages.della(density, eps, rescale=False)([tv], jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(plain["w"]) != 0, kept)
    np.testing.assert_array_equal(np.asarray(plain["w"])[kept], x[kept])


def test_chain_composes_in_order_with_folded_keys():
    tv, key = _big_tv(), jax.random.key(3)
    trim, drop = stages.magnitude_trim(0.5), stages.dare(0.5)
    got = stages.chain(trim, drop)([tv], key)
    want = drop(trim([tv], jax.random.fold_in(key, 1000)), jax.random.fold_in(key, 1001))
    chex.assert_trees_all_equal(got, want)
    survivors = np.asarray(trim([tv])[0]["w"]) != 0
    kept = np.asarray(got[0]["w"]) != 0
    assert kept.sum() < survivors.sum() and not (kept & ~survivors).any()


# ---------------------------------------------------------------------------- election and combiners
def _tvs(k=3, seed=5, zeros=True):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(k):
        w = rng.standard_normal((6, 5)).astype(np.float32)
        if zeros:
            w[rng.random(w.shape) < 0.3] = 0
        out.append({"w": jnp.asarray(w), "b": jnp.asarray(rng.standard_normal(4).astype(np.float32))})
    return out


@pytest.mark.parametrize("method", ["sum", "count"])
def test_elect_sign_matches_reference(method):
    tvs = _tvs()
    chex.assert_trees_all_equal(ref.flat(stages.elect_sign(tvs, method)), ref.elect_sign([ref.flat(t) for t in tvs], method))
    ties = [{"x": jnp.asarray([1.0, 0.0, -1.0])}, {"x": jnp.asarray([-1.0, 0.0, 2.0])}]
    np.testing.assert_array_equal(stages.elect_sign(ties, "sum")["x"], [1.0, 1.0, 1.0])  # a tie elects +1
    with pytest.raises(ValueError, match="sign election"):
        stages.elect_sign(tvs, "mean")


def test_agreement_masks_never_keep_zeros():
    tvs = _tvs()
    gamma = stages.elect_sign(tvs)
    for tv, m in zip(tvs, stages.agreement_masks(tvs, gamma)):
        for x, g, keep in zip(jax.tree.leaves(tv), jax.tree.leaves(gamma), jax.tree.leaves(m)):
            np.testing.assert_array_equal(keep, (np.sign(x) == g) & (np.asarray(x) != 0))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [None, (0.5, 2.0, 1.0)])
def test_disjoint_combine_matches_reference(normalize, weights):
    tvs = _tvs()
    weighted = tvs if weights is None else [jax.tree.map(lambda x, w=w: w * x, tv) for tv, w in zip(tvs, weights)]
    masks = stages.agreement_masks(weighted, stages.elect_sign(weighted))
    got = stages.combine(tvs, weights, masks=masks, normalize=normalize)
    want = ref.disjoint_merge([ref.flat(t) for t in tvs], weights, "sum", normalize)
    chex.assert_trees_all_close(ref.flat(got), {p: v.astype(np.float32) for p, v in want.items()}, rtol=1e-6, atol=1e-7)


def test_combine_sum_mean_and_empty_divisor():
    tvs = _tvs()
    w = (0.2, 0.3, 0.5)
    chex.assert_trees_all_close(ref.flat(stages.combine(tvs, w)), {p: v.astype(np.float32) for p, v in ref.weighted_sum([ref.flat(t) for t in tvs], w).items()}, rtol=1e-6)
    mean = stages.combine(tvs, normalize=True)
    chex.assert_trees_all_close(mean, jax.tree.map(lambda *x: sum(x) / 3, *tvs), rtol=1e-6)
    none = [jax.tree.map(lambda x: jnp.zeros(x.shape, bool), tvs[0])] * 3
    assert not any(bool(x.any()) for x in jax.tree.leaves(stages.combine(tvs, masks=none, normalize=True)))


def test_magnitude_max_matches_reference_first_wins_ties():
    tvs = _tvs(zeros=False)
    tvs.append(jax.tree.map(jnp.negative, tvs[0]))  # |tau_0| == |tau_3|: task 0 wins
    got = stages.magnitude_max(tvs)
    base = {p: np.zeros(x.shape, np.float32) for p, x in ref.flat(tvs[0]).items()}
    want = ref.magmax(base, [ref.flat(t) for t in tvs], scale=1.0)
    chex.assert_trees_all_equal(ref.flat(got), want)


@pytest.mark.parametrize("lambdas", [0.6, (0.2, 0.4, 0.5)])
def test_tall_and_consensus_masks_match_reference(lambdas):
    tvs = _tvs(zeros=False)
    masks = stages.tall_masks(tvs, lambdas)
    want = ref.tall_masks([ref.flat(t) for t in tvs], lambdas)
    for m, w in zip(masks, want):
        chex.assert_trees_all_equal(ref.flat(m), w)
    for k in (0, 1, 2, 3):
        got = stages.consensus_mask(masks, k)
        for p, x in ref.flat(got).items():
            np.testing.assert_array_equal(x, sum(w[p].astype(int) for w in want) >= k)


def test_per_task_values():
    assert stages.per_task(0.5, 3) == [0.5, 0.5, 0.5]
    assert stages.per_task((0.1, 0.2), 2) == [0.1, 0.2]
    assert all(type(v) is float for v in stages.per_task(np.float32(0.5), 2))
    with pytest.raises(ValueError, match="one per task"):
        stages.per_task((0.1, 0.2), 3)
