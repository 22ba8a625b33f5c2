"""jmerge.tree: paths, flatten/unflatten round trips, task-vector algebra, dtype handling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from helpers import BF16, flat_shapes, nested_shapes, nnx_models, random_models
from jmerge import tree as jtree


def _all_models():
    yield "nested", random_models(nested_shapes(), 2)
    yield "flat", random_models(flat_shapes(), 2)
    yield "nnx", nnx_models(2)


@pytest.mark.parametrize("kind", ["nested", "flat", "nnx"])
def test_flatten_unflatten_round_trip(kind):
    base, _ = dict(_all_models())[kind]
    flat = jtree.flatten(base)
    assert list(flat) == jtree.paths(base)
    assert len(set(flat)) == len(jax.tree.leaves(base))
    chex.assert_trees_all_equal(jtree.unflatten(base, flat), base)
    chex.assert_trees_all_equal_structs(jtree.unflatten(base, flat), base)


def test_paths_join_keys_with_slash_and_keep_flat_names():
    assert jtree.paths({"a": {"b": 1.0, "c": [2.0, 3.0]}}) == ["a/b", "a/c/0", "a/c/1"]
    names = list(flat_shapes())
    base, _ = random_models(flat_shapes(), 1)
    assert sorted(jtree.paths(base)) == sorted(names)


def test_nnx_state_paths_name_modules():
    base, _ = nnx_models(1)
    assert "dense1/kernel/value" in jtree.paths(base)
    assert "norm/scale/value" in jtree.paths(base)


def test_map_with_path_passes_path_and_all_trees():
    a = {"x": jnp.ones(2), "y": {"z": jnp.zeros(3)}}
    b = jax.tree.map(lambda v: v + 1, a)
    out = jtree.map_with_path(lambda p, u, v: (p, float(u.sum() + v.sum())), a, b)
    assert out["x"] == ("x", 6.0) and out["y"]["z"] == ("y/z", 3.0)


def test_task_vector_is_float32_and_exact_for_bfloat16():
    base, (expert,) = random_models(nested_shapes(), 1)
    tv = jtree.task_vector(base, expert)
    want = ref.task_vectors(ref.flat(base), [ref.flat(expert)])[0]
    for path, leaf in jtree.flatten(tv).items():
        assert leaf.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(leaf), want[path])
    # the difference of two bfloat16 numbers of similar size is exact in float32
    b16 = {p: x for p, x in ref.flat(base).items() if x.dtype == BF16}
    for p in b16:
        back = (np.asarray(jtree.flatten(base)[p]).astype(np.float32) + want[p]).astype(BF16)
        np.testing.assert_array_equal(back, ref.flat(expert)[p])


def test_task_vectors_one_per_expert():
    base, experts = random_models(nested_shapes(), 3)
    tvs = jtree.task_vectors(base, experts)
    assert len(tvs) == 3
    for tv, e in zip(tvs, experts):
        chex.assert_trees_all_equal(tv, jtree.task_vector(base, e))


@pytest.mark.parametrize("kind", ["nested", "flat", "nnx"])
def test_apply_scale_zero_returns_base_exactly(kind):
    base, experts = dict(_all_models())[kind]
    out = jtree.apply(base, jtree.task_vector(base, experts[0]), 0.0)
    chex.assert_trees_all_equal(out, base)
    chex.assert_trees_all_equal_dtypes(out, base)


def test_apply_scale_one_returns_the_expert():
    base, (expert,) = random_models(nested_shapes(), 1)
    out = jtree.apply(base, jtree.task_vector(base, expert), 1.0)
    chex.assert_trees_all_equal_dtypes(out, base)
    for path, leaf in jtree.flatten(out).items():
        e = jtree.flatten(expert)[path]
        if e.dtype == BF16:  # exact: the float32 difference and sum are exact
            chex.assert_trees_all_equal(leaf, e)
        else:  # base + (e - b) in float32 is within an ulp of e
            chex.assert_trees_all_close(leaf, e, rtol=1e-6, atol=1e-6)


def test_apply_accumulates_in_float32_and_casts_once():
    base, experts = random_models(nested_shapes(), 4, spread=1e-3)
    tv = jtree.add(*jtree.task_vectors(base, experts))
    out = jtree.flatten(jtree.apply(base, tv, 0.3))
    want = ref.apply(ref.flat(base), ref.flat(tv), 0.3)
    for p, x in out.items():
        assert x.dtype == want[p].dtype
        tol = 1e-2 if x.dtype == BF16 else 1e-6  # float64 vs float32 rounding, then one cast
        np.testing.assert_allclose(np.asarray(x, np.float32), want[p].astype(np.float32), rtol=tol, atol=tol)


def test_algebra_add_scale_negate_zeros_masked():
    base, experts = random_models(nested_shapes(), 2)
    t1, t2 = jtree.task_vectors(base, experts)
    chex.assert_trees_all_close(jtree.add(t1, t2), jax.tree.map(jnp.add, t1, t2))
    chex.assert_trees_all_close(jtree.scale(t1, 2.5), jax.tree.map(lambda x: 2.5 * x, t1))
    chex.assert_trees_all_equal(jtree.negate(t1), jax.tree.map(lambda x: -x, t1))
    zeros = jtree.zeros_like(base)
    chex.assert_trees_all_equal_shapes(zeros, base)
    assert all(z.dtype == jnp.float32 and not z.any() for z in jax.tree.leaves(zeros))
    mask = jax.tree.map(lambda x: x > 0, t1)
    chex.assert_trees_all_equal(jtree.masked(t1, mask), jax.tree.map(lambda x: jnp.where(x > 0, x, 0.0), t1))


def test_transpose_leaves_and_map_tasks():
    base, experts = random_models(nested_shapes(), 3)
    tvs = jtree.task_vectors(base, experts)
    per_leaf, treedef = jtree.transpose_leaves(tvs)
    assert treedef == jax.tree.structure(tvs[0]) and len(per_leaf) == len(jax.tree.leaves(base))
    assert all(len(ts) == 3 for ts in per_leaf)
    seen = []
    base32 = jax.tree.map(lambda x: x.astype(jnp.float32), base)  # an extra tree, float32 like the task vectors
    combined = jtree.map_tasks(lambda p, ts, b: (seen.append(p), sum(ts) + b)[1], tvs, base32)
    assert seen == jtree.paths(base)
    chex.assert_trees_all_close(combined, jax.tree.map(lambda a, b, c, x: a + b + c + x, *tvs, base32))
    split = jtree.map_tasks(lambda p, ts: tuple(2 * t for t in ts), tvs)
    assert len(split) == 3
    for s, tv in zip(split, tvs):
        chex.assert_trees_all_close(s, jtree.scale(tv, 2.0))
