"""Sharding: the spec rule, every method sharded == unsharded with sharded outputs, what
each compiled merge moves between devices, and the shard_map TIES threshold."""

import functools
import re

import chex
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jmerge
from helpers import (REQUIRED, RULE, all_gathers, assert_trees_equal, data_statistics, place, sweep_models,
                     ties_with_sharded_trim)
from jmerge import shard
from jmerge.methods import registry, svd
from jmerge import tree as jtree
from jmerge.validate import MergeInputError


def _gathers(name, hp):
    """Whether the compiled merge all-gathers: the SVD methods factorise whole matrices
    (docs/scaling.md), RegMean solves over each kernel's whole input axis, DELLA ranks entries along the last axis, arcee_fusion sorts each tensor
    for its quantiles, and sce for its variance top-k (when it selects: select_topk < 1)."""
    return name in {"tsv", "iso_c", "iso_cts", "regmean", "della", "della_linear", "arcee_fusion"} or (
        name == "sce" and hp.get("select_topk", jmerge.get("sce").defaults["select_topk"]) < 1)


def _hparams(name):
    return {**({"key": jax.random.key(0)} if jmerge.get(name).needs_key else {}), **REQUIRED.get(name, {})}


def _compiled(name, base, experts):
    """The method compiled for these inputs, and a call running it (one compilation for both)."""
    m = jmerge.get(name)
    hp = m.resolve(len(experts), REQUIRED.get(name, {}))
    static = tuple(sorted(k for k in hp if k in m.static))
    key = _hparams(name).get("key")
    fn = jax.jit(lambda b, e, key, **hp: m.fn(b, jtree.task_vectors(b, e), key=key, **hp), static_argnames=static)
    compiled = fn.lower(base, experts, key, **hp).compile()
    return compiled, lambda: compiled(base, experts, key, **{k: v for k, v in hp.items() if k not in static})


# ---------------------------------------------------------------------------- mesh and rule
def test_make_mesh_axes_and_errors():
    mesh = shard.make_mesh(data=2)
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert shard.make_mesh(model=8, explicit=True).axis_types == (AxisType.Explicit, AxisType.Explicit)
    assert dict(shard.make_mesh(devices=jax.devices()[:2]).shape) == {"data": 1, "model": 2}
    with pytest.raises(MergeInputError, match="data=3"):
        shard.make_mesh(data=3)
    with pytest.raises(MergeInputError, match="needs 6 devices"):
        shard.make_mesh(data=2, model=3)


@pytest.mark.parametrize(
    "shape, spec",
    [
        ((64, 32), P("model")),  # both divisible: the largest
        ((16, 128), P(None, "model")),  # largest is the last
        ((12, 24), P(None, "model")),  # only the last is divisible
        ((24, 12), P("model")),
        ((32, 32), P("model")),  # tie: the earliest
        ((3, 3, 4, 16), P(None, None, None, "model")),
        ((6, 10), P()),  # indivisible: replicated
        ((5,), P()),
        ((), P()),
    ],
)
def test_spec_for_shards_largest_divisible_dimension(mesh8, shape, spec):
    assert RULE("w", shape, mesh8) == spec


def test_spec_for_replicates_small_tensors(mesh8):
    assert shard.spec_for("w", (64, 32), mesh8) == P()  # 2048 < DEFAULT_MIN_SIZE
    assert shard.spec_for("w", (512, 128), mesh8) == P("model")
    assert shard.spec_for("w", (64, 32), mesh8, min_size=2048) == P("model")
    assert shard.spec_for("w", (64, 32), mesh8, min_size=2049) == P()


def test_spec_for_axis_of_size_one_and_tuple_axes():
    assert RULE("w", (64, 32), shard.make_mesh(data=8)) == P()  # model axis has 1 device
    mesh = shard.make_mesh(data=2, model=4)
    assert RULE("w", (12, 8), mesh) == P("model")  # 12 % 4 == 0
    assert RULE("w", (12, 8), mesh, axis=("data", "model")) == P(None, ("data", "model"))
    with pytest.raises(MergeInputError, match="no axis 'x'"):
        RULE("w", (8,), mesh, axis="x")


def test_spec_for_overrides_first_match_wins(mesh8):
    overrides = [(r"emb", P(None, "model")), (r"emb|dense", P()), (re.compile(r"kernel$"), P("model", None))]
    rule = functools.partial(RULE, overrides=overrides)
    assert rule("emb", (40, 24), mesh8) == P(None, "model")  # default would shard dim 0
    assert rule("dense/kernel", (64, 32), mesh8) == P()  # second pattern before the third
    assert rule("proj/kernel", (16, 128), mesh8) == P("model", None)
    assert rule("other", (16, 128), mesh8) == P(None, "model")  # no match: default rule


def test_spec_for_bad_override_names_the_parameter(mesh8):
    with pytest.raises(MergeInputError, match=r"'odd'.*not divisible"):
        RULE("odd", (6, 10), mesh8, overrides=[("odd", P("model"))])
    with pytest.raises(MergeInputError, match=r"'b'.*more entries"):
        RULE("b", (8,), mesh8, overrides=[("b", P(None, "model"))])


def test_shard_params_places_host_and_device_leaves(shard_models, mesh8):
    base, _ = shard_models
    host = jax.tree.map(np.asarray, base)
    for tree in (base, host):
        placed = shard.shard_params(tree, mesh8, RULE)
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, placed), host)
        for path, x in jtree.flatten(placed).items():
            assert x.sharding.spec == RULE(path, x.shape, mesh8), path
    assert placed["dense"]["kernel"].addressable_shards[0].data.shape == (8, 32)
    chex.assert_tree_is_sharded(placed["proj"], devices=mesh8.devices.flatten().tolist())


def test_abstract_for_and_shardings_for(shard_models, mesh8):
    base, _ = shard_models
    abstract = shard.abstract_for(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base), mesh8, RULE)
    leaf = abstract["proj"]["kernel"]
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (16, 128)
    assert leaf.sharding == NamedSharding(mesh8, P(None, "model"))
    assert jax.tree.structure(shard.shardings_for(base, mesh8, RULE)) == jax.tree.structure(base)
    table = {p: s for p, _, s in shard.spec_table(base, mesh8, RULE)}
    assert table["odd"] == P() and table["dense/kernel"] == P("model")


# ---------------------------------------------------------------------------- every method
# Non-default settings that take another code path (from the per-family files).
VARIANTS = [
    ("slerp", {"space": "task_vectors", "t": 0.7}),
    ("model_stock", {"filter_wise": True}),
    ("nuslerp", {"weights": (1.0, 2.0), "flatten": False}),
    ("nearswap", {"t": 0.2}),
    ("sce", {"select_topk": 0.5}),
    ("della_linear", {"density": 0.5}),
    ("ties", {"trim": "tensor", "density": 0.3}),
]
BIT_EXACT = {"task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "magmax", "consensus"}


def _spied_merge(monkeypatch, *args, **kwargs):
    """``jmerge.merge(*args, **kwargs)`` and the compiled executable it ran (from jit's cache)."""
    calls = []
    real = registry._jitted

    def spy(*a, **k):
        fn = real(*a, **k)
        return lambda *xs, **kw: calls.append((fn, xs, kw)) or fn(*xs, **kw)

    with monkeypatch.context() as m:
        m.setattr(registry, "_jitted", spy)
        out = jmerge.merge(*args, **kwargs)
    (fn, xs, kw), = calls
    return out, fn.lower(*xs, **kw).compile()


@pytest.mark.parametrize("name,hp", [(m, {}) for m in jmerge.available()] + VARIANTS,
                         ids=list(jmerge.available()) + [f"{m}-{'-'.join(map(str, hp.values()))}" for m, hp in VARIANTS])
def test_every_method_sharded_on_8_devices_equals_unsharded(name, hp, mesh8, monkeypatch):
    """``jmerge.merge`` of inputs sharded over 8 devices equals the unsharded merge (bit for bit for
    the BIT_EXACT methods), with outputs sharded like the base; the compiled merge all-gathers
    nothing, unless the method needs whole tensors (:func:`_gathers`), which then does gather. A method
    whose thresholds ``merge`` solves first (jmerge.thresholds' mesh backend) also runs under the
    caller's jit on the sharded inputs (jmerge.thresholds.xla's search): equal there too."""
    m = jmerge.get(name)
    hp = {**REQUIRED.get(name, {}), **hp}
    base, experts = sweep_models(name, hp)
    hp = {**hp, **data_statistics(name, base, len(experts))}  # regmean's Grams, fisher's Fisher pytrees
    key = {"key": jax.random.key(3)} if m.needs_key else {}
    base_s, experts_s = place(base, mesh8), [place(e, mesh8) for e in experts]
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(base_s))
    plain = jmerge.merge(base, experts, name, **key, **hp)
    out, compiled = _spied_merge(monkeypatch, base_s, experts_s, name, **key, **hp)
    runs = {"merge": out}
    sparsifier = m.sparsifier(m.resolve(len(experts), hp))
    if sparsifier is not None and sparsifier.query is not None:
        inside = jax.jit(lambda b, es: jmerge.merge_task_vectors(b, jtree.task_vectors(b, es), name, **key, **hp))
        runs["under jit"] = inside(base_s, experts_s)
    for run, got in runs.items():
        if name in BIT_EXACT:
            assert_trees_equal(got, plain)
        else:
            chex.assert_trees_all_close(got, plain, rtol=1e-5, atol=1e-5)
        for path, o, b in zip(jtree.paths(base), jax.tree.leaves(got), jax.tree.leaves(base_s)):
            assert o.sharding.is_equivalent_to(b.sharding, o.ndim), (name, run, path, o.sharding, b.sharding)
    gathers = all_gathers(compiled.as_text())
    assert bool(gathers) == _gathers(name, hp), (name, gathers)


def test_della_gathers_nothing_when_the_last_axis_is_local(shard_models, mesh8):
    """DELLA ranks entries along the last axis: a rule that never shards it moves nothing."""
    base, experts = shard_models
    rule = lambda path, shape, mesh: RULE(path, tuple(shape[:-1]) + (1,), mesh)  # noqa: E731
    base_s, experts_s = shard.shard_params(base, mesh8, rule), [shard.shard_params(e, mesh8, rule) for e in experts]
    assert base_s["conv"].sharding.is_fully_replicated  # (3, 3, 4): nothing divisible by 8
    compiled, _ = _compiled("della", base_s, experts_s)
    assert not re.search(r" (all-gather|all-to-all)(-start)?\(", compiled.as_text())


def test_svd_methods_gather_each_matrix_whole(shard_models_placed):
    """TSV-M factorises whole matrices: XLA all-gathers each sharded 2-D task vector and the
    matrix view of each sharded conv kernel ((3, 3, 4, 16) as (36, 16))."""
    base_s, experts_s = shard_models_placed
    gathered = " ".join(all_gathers(_compiled("tsv", base_s, experts_s)[0].as_text()))
    shapes = {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", gathered)}
    sharded = {svd.matrix_shape(x.shape, "flax", "matrix") for x in jax.tree.leaves(base_s)
               if x.ndim >= 2 and not x.sharding.is_fully_replicated}
    assert (36, 16) in sharded
    assert {s[-2:] for s in shapes} == sharded  # whole matrices (possibly stacked over tasks)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "breadcrumbs_ties", "ties_sharded_trim"])
def test_explicit_mesh_merges(name, shard_models):
    """With Explicit axes shardings are types; the elementwise merges and TIES with the
    shard_map trim type-check (jmerge.stages' threshold reshapes, which Explicit mode rejects)."""
    base, experts = shard_models
    mesh = shard.make_mesh(model=8, explicit=True)
    base_s, experts_s = shard.shard_params(base, mesh, RULE), [shard.shard_params(e, mesh, RULE) for e in experts]
    with jax.set_mesh(mesh):
        if name == "ties_sharded_trim":
            out, ref = ties_with_sharded_trim(mesh)(base_s, experts_s), jmerge.merge(base, experts, "ties")
        else:
            out, ref = jmerge.merge(base_s, experts_s, name, **_hparams(name)), jmerge.merge(base, experts, name, **_hparams(name))
    assert_trees_equal(out, ref)
    assert jax.typeof(out["proj"]["kernel"]).sharding.spec == P(None, "model")


def test_lwptv_merge_sharded_equals_unsharded(shard_models, shard_models_placed):
    from jmerge.lwptv import LwPTV

    base, experts = shard_models
    config = LwPTV(layers="tensor", score="relative_update", rule="top_k", value=3)
    ref = jmerge.merge(base, experts, "ties", lwptv=config)
    out = jmerge.merge(*shard_models_placed, "ties", lwptv=config)
    chex.assert_trees_all_close(out, ref, rtol=1e-6, atol=1e-6)
    assert out["dense"]["kernel"].sharding.spec == P("model")


@pytest.mark.standard_promotion("optax 0.2.8's adam computes decay ** count (float ** int32)")
def test_learned_coefficients_sharded_equal_unsharded(shard_models, shard_models_placed):
    from jmerge.learn import fit_coefficients

    base, experts = shard_models
    base_s, experts_s = shard_models_placed
    x = jax.random.normal(jax.random.key(5), (8, 16))

    def apply_fn(params, batch):
        return batch @ params["proj"]["kernel"][:, :10]

    def fit(b, es):
        return fit_coefficients(b, jtree.task_vectors(b, es), apply_fn, [x] * 2, epochs=1, batch_per_task=4, progress=False)

    ref, out = fit(base, experts), fit(base_s, experts_s)
    np.testing.assert_allclose(out.coefficients, ref.coefficients, rtol=1e-5, atol=1e-6)
    assert out.params["proj"]["kernel"].sharding.spec == P(None, "model")


# ---------------------------------------------------------------------------- shard_map threshold


