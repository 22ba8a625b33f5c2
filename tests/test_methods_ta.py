"""The task-arithmetic family through jmerge.merge, against tests/reference.py; identities;
permutation invariance; keys (the all-methods sharding sweep is in test_shard.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jmerge
import reference as ref
from helpers import BF16, assert_matches, flat_shapes, nested_shapes, nnx_models, random_models, sweep_models
from jmerge import stages
from jmerge import tree as jtree

STRUCTURES = {
    "nested": lambda k, seed=0: random_models(nested_shapes(), k, seed),
    "flat": lambda k, seed=0: random_models(flat_shapes(), k, seed),
    "nnx": lambda k, seed=0: nnx_models(k, seed),
}

REFERENCES = {
    "average": lambda b, es, weights=None: ref.average(b, es, weights),
    "task_arithmetic": lambda b, es, scale=0.3, weights=None: ref.task_arithmetic(b, es, scale, weights),
    "ties": lambda b, es, density=0.2, scale=1.0, trim="global", sign="sum", weights=None, normalize=True: ref.ties(
        b, es, density, scale, trim, sign, weights, normalize
    ),
    "breadcrumbs": lambda b, es, density=0.9, gamma=0.01, scale=1.0, weights=None: ref.breadcrumbs(b, es, density, gamma, scale, weights),
    "breadcrumbs_ties": lambda b, es, density=0.9, gamma=0.01, scale=1.0, sign="sum", weights=None, normalize=True: ref.breadcrumbs_ties(
        b, es, density, gamma, scale, sign, weights, normalize
    ),
    "magmax": lambda b, es, scale=0.5: ref.magmax(b, es, scale),
    "consensus": lambda b, es, k=2, tall_lambda=0.6, scale=0.3: ref.consensus(b, es, k, tall_lambda, scale),
}


# hyper-parameters used by every test of a method on the nested 3-expert models, so that
# the tests share one compilation per method
HP = {
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1},
    "dare_linear": {"density": 0.4},
    "dare_ties": {"density": 0.4},
    "della": {"density": 0.4, "epsilon": 0.1},
}


def assert_trees_close(a, b):
    """Leaf by leaf; float32 to 1e-5, bfloat16 leaves to one bfloat16 rounding."""
    assert_matches(a, ref.flat(b), rtol32=1e-5, atol32=1e-5, bf16=(2**-7, 2**-7))


def assert_close_to_reference(got, want: dict):
    """float32 leaves to 1e-5; bfloat16 leaves to one bfloat16 rounding (float64 vs float32 sums)."""
    assert_matches(got, want, rtol32=1e-5, atol32=1e-5, bf16=(1e-2, 1e-2))


@pytest.mark.parametrize(
    "method,structure",
    [(m, "nested") for m in REFERENCES] + [(m, s) for m in ("average", "task_arithmetic", "ties") for s in ("flat", "nnx")],
)
def test_method_matches_numpy(method, structure):
    base, experts = STRUCTURES[structure](3)
    hp = HP.get(method, {})
    out = jmerge.merge(base, experts, method, **hp)
    chex.assert_trees_all_equal_structs(out, base)
    assert_close_to_reference(out, REFERENCES[method](ref.flat(base), [ref.flat(e) for e in experts], **hp))


VARIANTS = [
    ("average", {"weights": (1.0, 2.0, 0.5)}),
    ("task_arithmetic", {"scale": 0.7, "weights": (1.0, -0.5, 2.0)}),
    ("ties", {"trim": "tensor", "sign": "count", "normalize": False, "density": (0.3, 0.5, 0.9), "weights": (1.0, 0.5, 2.0)}),
    ("ties", {"trim": "global", "density": 0.35, "scale": 0.6}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05, "sign": "count", "normalize": False}),
    ("consensus", {"k": 1, "tall_lambda": (0.2, 0.4, 0.6), "scale": 1.0}),
]


@pytest.mark.parametrize("method,hp", VARIANTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(VARIANTS)])
def test_method_variants_match_numpy(method, hp):
    base, experts = STRUCTURES["nested"](3, seed=1)
    out = jmerge.merge(base, experts, method, **hp)
    assert_close_to_reference(out, REFERENCES[method](ref.flat(base), [ref.flat(e) for e in experts], **hp))


def test_ties_global_trim_on_a_large_model_matches_numpy():
    """Above the sort cut-off the threshold comes from the counting search."""
    rng = np.random.default_rng(3)
    base = {"w": jnp.asarray(rng.standard_normal((160, 128)), jnp.float32), "b": jnp.asarray(rng.standard_normal(64), jnp.float32)}
    experts = [jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), base) for _ in range(3)]
    for trim in ("global", "tensor"):
        out = jmerge.merge(base, experts, "ties", trim=trim, density=0.3)
        assert_close_to_reference(out, ref.ties(ref.flat(base), [ref.flat(e) for e in experts], 0.3, 1.0, trim))


@pytest.mark.parametrize("method,sparsify", [
    ("dare_linear", lambda tvs, key: stages.dare(0.4)(tvs, key)),
    ("dare_ties", lambda tvs, key: stages.dare(0.4)(tvs, key)),
    ("della", lambda tvs, key: stages.della(0.4, 0.1)(tvs, key)),
])
def test_stochastic_methods_compose_their_masks_like_numpy(method, sparsify):
    """The method's output equals numpy's combination of the sparsifier's output for the same
    key (the sparsifiers themselves are checked statistically in test_stages.py)."""
    base, experts = STRUCTURES["nested"](2)
    key = jax.random.key(11)

    @jax.jit
    def both(base, experts, key):  # one compilation: the shared random draws are computed once
        tvs = jtree.task_vectors(base, experts)
        return jmerge.merge_task_vectors(base, tvs, method, key=key, scale=0.8, **HP[method]), sparsify(tvs, key)

    out, dropped = both(base, experts, key)
    dropped, fb = [ref.flat(t) for t in dropped], ref.flat(base)
    combined = ref.weighted_sum(dropped) if method == "dare_linear" else ref.disjoint_merge(dropped)
    assert_close_to_reference(out, ref.apply(fb, combined, 0.8))


# ---------------------------------------------------------------------------- identities
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_average_of_identical_experts_is_that_expert(structure):
    base, (expert,) = STRUCTURES[structure](1)
    out = jmerge.merge(base, [expert] * 3, "average")
    for p, x in ref.flat(out).items():
        e = ref.flat(expert)[p]
        tol = 2**-8 if e.dtype == BF16 else 1e-6  # (t + t + t) / 3 may round by one ulp
        np.testing.assert_allclose(x.astype(np.float32), e.astype(np.float32), rtol=tol, atol=tol)


SCALED = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "magmax", "consensus"]


@pytest.mark.parametrize("method", SCALED)
def test_scale_zero_returns_base_exactly(method):
    if jmerge.get(method).needs_key:  # the sharding test's models: one compilation for both
        base, experts = sweep_models(method)
        out = jmerge.merge(base, experts, method, key=jax.random.key(3), scale=0.0)
    else:
        base, experts = STRUCTURES["nested"](3)
        out = jmerge.merge(base, experts, method, scale=0.0, **HP.get(method, {}))
    chex.assert_trees_all_equal(out, base)
    chex.assert_trees_all_equal_dtypes(out, base)


@pytest.mark.parametrize("method,hp", [("task_arithmetic", {"scale": 1.0}), ("ties", {"density": 1.0, "scale": 1.0})])
def test_single_expert_at_scale_one_is_that_expert(method, hp):
    base, (expert,) = STRUCTURES["nested"](1)
    out = jmerge.merge(base, [expert], method, **hp)
    for p, x in ref.flat(out).items():
        e = ref.flat(expert)[p]
        if e.dtype == BF16:  # the float32 difference and sum of bfloat16 values are exact
            np.testing.assert_array_equal(x, e)
        else:
            np.testing.assert_allclose(x, e, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- permutation invariance
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), perm=st.permutations([0, 1, 2, 3]))
def test_permuting_experts_leaves_the_merge_unchanged(seed, perm):
    base, experts = random_models(nested_shapes(), 4, seed)
    shuffled = [experts[i] for i in perm]
    for method in ("task_arithmetic", "ties", "average"):
        assert_trees_close(jmerge.merge(base, experts, method), jmerge.merge(base, shuffled, method))
    # MagMax picks one task's value per entry: the same magnitude whatever the order, and the
    # same value unless two magnitudes tie (bfloat16 deltas do tie; float32 random ones do not)
    tvs = jtree.task_vectors(base, experts)
    picked, picked_shuffled = stages.magnitude_max(tvs), stages.magnitude_max([tvs[i] for i in perm])
    chex.assert_trees_all_equal(jax.tree.map(jnp.abs, picked), jax.tree.map(jnp.abs, picked_shuffled))
    merged, merged_shuffled = jmerge.merge(base, experts, "magmax"), jmerge.merge(base, shuffled, "magmax")
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(merged_shuffled)):
        if x.dtype == jnp.float32:
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------- keys
@pytest.mark.parametrize("method", [m for m in jmerge.available() if jmerge.get(m).needs_key])
def test_stochastic_methods_are_deterministic_per_key(method):
    base, experts = sweep_models(method)
    a = jmerge.merge(base, experts, method, key=jax.random.key(1))
    b = jmerge.merge(base, experts, method, key=jax.random.key(1))
    c = jmerge.merge(base, experts, method, key=jax.random.key(2))
    chex.assert_trees_all_equal(a, b)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_merge_task_vectors_under_a_callers_jit_equals_merge():
    base, experts = STRUCTURES["nested"](3)

    @jax.jit
    def inside(base, experts, scale):
        return jmerge.merge_task_vectors(base, jtree.task_vectors(base, experts), "ties", density=0.5, scale=scale)

    assert_trees_close(inside(base, experts, 0.7), jmerge.merge(base, experts, "ties", density=0.5, scale=0.7))


def test_donate_base_gives_the_same_merge():
    base, experts = STRUCTURES["nested"](3)
    want = jmerge.merge(base, experts, "ties")
    copy = jax.tree.map(jnp.copy, base)
    chex.assert_trees_all_equal(jmerge.merge(copy, experts, "ties", donate_base=True), want)


def test_ties_tie_break_first_keeps_exactly_k_per_tensor_like_numpy():
    """mergekit's rule: exactly max(1, int(d n)) entries per tensor, tied ones first in row-major order."""
    rng = np.random.default_rng(4)
    # "wide": a last axis past the 2**14 row width, so the tie count runs over rows of another width
    base = {"w": jnp.zeros((12, 10), jnp.float32), "b": jnp.zeros(7, jnp.float32),
            "conv": jnp.zeros((3, 4, 5, 2), jnp.float32), "wide": jnp.zeros((2, 16390), jnp.float32)}
    experts = [{p: jnp.asarray(rng.integers(-3, 4, x.shape), jnp.float32) for p, x in base.items()} for _ in range(2)]

    def first_k(tv, density):
        out = {}
        for p, x in tv.items():
            flat = x.reshape(-1)
            k = max(1, int(density * flat.size))
            order = np.argsort(-np.abs(flat), kind="stable")[:k]  # ties: the lowest index first
            kept = np.zeros_like(flat)
            kept[order] = flat[order]
            out[p] = kept.reshape(x.shape)
        return out

    for density in (0.35, 0.05):  # 0.05 * 7 < 1: mergekit still keeps one entry of the bias
        tvs = [first_k(ref.flat(e), density) for e in experts]
        want = {p: x for p, x in ref.disjoint_merge(tvs).items()}
        out = jmerge.merge(base, experts, "ties", trim="tensor", tie_break="first", density=density)
        for p, x in ref.flat(out).items():
            np.testing.assert_array_equal(x, want[p], err_msg=p)
        kept = jmerge.merge(base, experts[:1], "ties", trim="tensor", tie_break="first", density=density)
        assert {p: int(np.count_nonzero(x)) for p, x in ref.flat(kept).items()} == {
            p: int(np.count_nonzero(x)) for p, x in tvs[0].items()}
    everything = jmerge.merge(base, experts[:1], "ties", trim="tensor", density=0.35)  # "all" keeps the ties
    assert int(np.count_nonzero(ref.flat(everything)["w"])) > int(0.35 * 120)
    with pytest.raises(jmerge.MergeInputError, match=r"^tie_break='first' \(mergekit's exactly k per tensor\) needs trim='tensor'$"):
        jmerge.merge(base, experts, "ties", tie_break="first")
