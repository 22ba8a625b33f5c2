"""The exact k-th largest |tau| (TIES/Breadcrumbs thresholds): every backend equal bit for bit.

Host (numpy introselect) vs the jitted XLA search, shard_map collectives vs one device,
streamed passes over checkpoints vs in memory, and LwPTV's thresholds on the host vs jitted.
Moved here unchanged from test_methods_ta, test_shard, test_streaming and test_lwptv."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import PartitionSpec as P

import jmerge
from helpers import (BF16, RULE, STREAM_NAMES, all_gathers, assert_trees_equal, bert_like_models, drop_mask, stream_shape,
                     streamed, ties_with_sharded_trim)
from jmerge import lwptv, shard, stages, thresholds
from jmerge import tree as jtree
from jmerge.io import safetensors_io as st
from jmerge.lwptv import scores as lscores
from jmerge.methods import registry
from jmerge.thresholds import host as thost, mesh as tmesh, xla

# ---------------------------------------------------------------------------- host vs jitted (from test_methods_ta)
@pytest.mark.parametrize("hp", [{}, {"trim": "tensor"}, {"density": (0.05, 0.5, 1.0)}, {"trim": "tensor", "density": 1e-3},
                                {"trim": "tensor", "tie_break": "first"}, {"trim": "tensor", "tie_break": "first", "density": 0.6}])
@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_ties_host_thresholds_equal_the_jitted_search(hp, dtype, monkeypatch):
    """jmerge.merge on CPU finds TIES thresholds with numpy's introselect; the result equals
    the method run inside jit (jmerge.stages' exact search) bit for bit, with many exactly
    tied magnitudes, subnormal differences and zeros."""
    r = np.random.default_rng(3)
    shapes = {"w": (300, 200), "b": (77,), "conv": (5, 4, 3)}
    base = {k: r.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    experts = [{k: v + np.round(r.standard_normal(v.shape) * 4) / 8 for k, v in base.items()} for _ in range(3)]
    base["b"][:10] = 0.0
    experts[0]["b"][:10] = np.float32(1e-40) * np.arange(10)  # subnormal task-vector entries
    experts[1]["conv"][...] = base["conv"]  # an all-zero task-vector tensor
    base = {k: v.astype(dtype) for k, v in base.items()}
    experts = [{k: v.astype(dtype) for k, v in e.items()} for e in experts]
    calls = []
    real = thost.magnitude_threshold
    monkeypatch.setattr(thost, "magnitude_threshold", lambda *a: calls.append(1) or real(*a))
    host = jmerge.merge(base, experts, "ties", **hp)
    m = jmerge.get("ties")
    resolved = m.resolve(3, hp)
    static = {k: resolved.pop(k) for k in list(resolved) if k in m.static}
    jitted = jax.jit(lambda b, es, **h: m.fn(b, jtree.task_vectors(b, es), **static, **h))(base, experts, **resolved)
    assert calls  # the host path ran
    assert_trees_equal(host, jitted)


def _reference_first_k(x, k):
    """The first-k rule by a stable numpy sort: the kept mask and the row-major index of the
    last tied entry kept (-1 for none, the size for k >= size)."""
    mags = np.abs(np.asarray(x, np.float32)).ravel()
    order = np.argsort(-mags, kind="stable")  # ties in row-major order
    mask = np.zeros(mags.size, bool)
    mask[order[:k]] = True
    if k <= 0 or k >= mags.size:
        return mask.reshape(np.shape(x)), -1 if k <= 0 else mags.size
    kept = order[:k]
    return mask.reshape(np.shape(x)), int(kept[mags[kept] == mags[order[k - 1]]].max())


@pytest.mark.parametrize("k", [0, 1, 7, 500, 2999, 3000, 3001, 5999, 6000])
def test_tie_positions_host_and_xla_equal_a_stable_sort(k):
    """The first-k rule's cut (jmerge.thresholds.last_tied_kept) from the host scan and the XLA
    row counts, traced and not, on a tensor of mostly tied magnitudes and a subnormal row."""
    r = np.random.default_rng(0)
    x = np.round(r.standard_normal((40, 150)) * 2).astype(np.float32) / 4
    x[3] = np.float32(1e-40)
    query = thresholds.Query("tensor", lambda t, n: (k,), positions=True)
    (kth, host_cut), = thresholds.solve(query, [{"w": x}])
    (_, xla_cut), = thresholds.solve(query, [{"w": jnp.asarray(x)}], using="xla")
    traced = jax.jit(lambda v: thresholds.solve(query, [{"w": v}])[0][1])(jnp.asarray(x))
    mask, cut = _reference_first_k(x, k)
    assert int(host_cut["w"]) == int(xla_cut["w"]) == int(traced["w"]) == cut
    np.testing.assert_array_equal(stages._kept_first({"w": x}, kth, host_cut)["w"], np.where(mask, x, 0.0))


def test_tie_positions_need_tensor_scope_and_one_rank():
    x = [{"w": np.ones((4, 4), np.float32)}]
    with pytest.raises(ValueError, match="^tie positions are answered per tensor of in-memory arrays, not scope 'global'"):
        thresholds.solve(thresholds.Query("global", lambda t, n: (3,), positions=True), x)
    with pytest.raises(ValueError, match="^tie positions answer one rank per tensor; the query asks 2$"):
        thresholds.solve(thresholds.Query("tensor", lambda t, n: (3, 5), positions=True), x)


# ---------------------------------------------------------------------------- mesh vs one device (from test_shard)


@pytest.fixture(scope="module")
def big_task_vector(mesh8):
    """About 140k entries (counts above 2**16 exercise the carry of the split count), mixed specs."""
    k = jax.random.split(jax.random.key(3), 3)
    tv = {"a": jax.random.normal(k[0], (256, 512)), "b": jax.random.laplace(k[1], (24, 320)), "c": jax.random.normal(k[2], (7, 9))}
    return tv, shard.shard_params(tv, mesh8, RULE)

KS = [1, 2, 1000, 65535, 65536, 65537, 100_000, 256 * 512 + 24 * 320 + 63]

def _reference_thresholds(leaves, ks):
    """The exact k-th largest |x| by a numpy sort, and jmerge.stages agreeing on two of them."""
    mags = np.sort(np.abs(np.concatenate([np.asarray(x, np.float32).ravel() for x in leaves])))[::-1]
    ref = mags[np.asarray(ks) - 1]
    for i in (0, len(ks) // 2):
        assert np.asarray(xla.kth_largest_magnitude(leaves, ks[i])).view(np.int32) == ref[i].view(np.int32)
    return ref

def test_sharded_threshold_equals_single_device(big_task_vector, mesh8):
    tv, tv_s = big_task_vector
    leaves_s = jax.tree.leaves(tv_s)
    out = tmesh.kth_largest_magnitudes([leaves_s] * len(KS), KS, mesh8)
    np.testing.assert_array_equal(np.asarray(out), _reference_thresholds(jax.tree.leaves(tv), KS))
    assert np.asarray(tmesh.kth_largest_magnitude(leaves_s, 1000, mesh8)) == out[2]

def test_sharded_threshold_on_2d_mesh_counts_replicas_once(big_task_vector):
    tv, _ = big_task_vector
    mesh = shard.make_mesh(data=2, model=4)
    leaves_s = jax.tree.leaves(shard.shard_params(tv, mesh, RULE))  # replicated over "data", "c" everywhere
    assert leaves_s[2].sharding.is_fully_replicated
    out = tmesh.kth_largest_magnitudes([leaves_s] * len(KS), KS, mesh)
    np.testing.assert_array_equal(np.asarray(out), _reference_thresholds(jax.tree.leaves(tv), KS))

def test_sharded_threshold_subnormals_and_zeros(mesh8):
    """Counts compare bit patterns where XLA:CPU would flush subnormal floats to zero."""
    tiny = np.finfo(np.float32).tiny
    x = np.zeros((16, 8), np.float32)
    x[:4] = np.linspace(tiny / 64, tiny / 2, 32, dtype=np.float32).reshape(4, 8)  # subnormal
    x[4, 0] = -3 * tiny / 4
    xs = shard.shard_params({"x": x}, mesh8, RULE)["x"]
    ks = [1, 2, 20, 33, 128]
    out = np.asarray(tmesh.kth_largest_magnitudes([[xs]] * len(ks), ks, mesh8))
    np.testing.assert_array_equal(out.view(np.int32), _reference_thresholds([jnp.asarray(x)], ks).view(np.int32))

def test_sharded_thresholds_batched_and_in_jit(big_task_vector, mesh8):
    tv, tv_s = big_task_vector
    leaves, leaves_s = jax.tree.leaves(tv), jax.tree.leaves(tv_s)
    specs = [x.sharding.spec for x in leaves_s]
    groups, ks = [leaves, leaves[:1], leaves[2:]], [10, 300, 7]
    fn = jax.jit(lambda ls: tmesh.kth_largest_magnitudes([ls, ls[:1], ls[2:]], ks, mesh8, [specs, specs[:1], specs[2:]]))
    out = np.asarray(fn(leaves_s))
    ref = np.asarray([xla.kth_largest_magnitude(g, k) for g, k in zip(groups, ks)])
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="k=0"):
        tmesh.kth_largest_magnitude(leaves_s, 0, mesh8)

@pytest.mark.parametrize("scope, density", [("global", 0.2), ("tensor", (0.1, 1.0)), ("global", (1e-5, 0.3))])
def test_sharded_magnitude_trim_equals_stages(shard_models, shard_models_placed, mesh8, scope, density):
    base, experts = shard_models
    base_s, experts_s = shard_models_placed
    ref = stages.magnitude_trim(density, scope)(jtree.task_vectors(base, experts))
    trim = tmesh.magnitude_trim(density, mesh8, RULE, scope)
    out = jax.jit(lambda b, es: trim(jtree.task_vectors(b, es)))(base_s, experts_s)
    assert_trees_equal(out, ref)

def test_ties_with_sharded_trim_equals_ties(shard_models, shard_models_placed, mesh8):
    base, experts = shard_models
    ties = ties_with_sharded_trim(mesh8)
    out = ties(*shard_models_placed)
    assert_trees_equal(out, jmerge.merge(base, experts, "ties"))
    assert out["proj"]["kernel"].sharding.spec == P(None, "model")
    text = ties.lower(*shard_models_placed).compile().as_text()
    assert all_gathers(text) == []
    # one bisection loop for both tasks: one psum of a (2, 2) count vector per step
    assert len(re.findall(r"u32\[2,2\]\S* all-reduce", text)) == 1

@pytest.mark.parametrize("name, hp", [
    ("ties", {}),
    ("ties", {"trim": "tensor", "density": (0.1, 0.5), "weights": (1.0, 0.5)}),
    ("ties", {"trim": "tensor", "tie_break": "first", "density": 0.3}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("breadcrumbs_ties", {"density": (0.3, 0.8), "gamma": 0.05}),
])
def test_merge_finds_thresholds_by_collectives_on_a_mesh(shard_models, shard_models_placed, mesh8, monkeypatch, name, hp):
    """jmerge.merge on sharded inputs: the trim thresholds come from the mesh backend (the
    gathering XLA search never runs), the merge itself moves nothing, and the
    result equals the single-device merge bit for bit."""
    base, experts = shard_models
    ref = jmerge.merge(base, experts, name, **hp)
    calls = []
    real = tmesh.kth_largest_magnitudes
    monkeypatch.setattr(tmesh, "kth_largest_magnitudes", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(xla, "kth_largest_magnitudes", lambda *a, **k: pytest.fail("gathering search ran"))
    out = jmerge.merge(*shard_models_placed, name, **hp)
    assert_trees_equal(out, ref)
    assert calls == [1] and out["proj"]["kernel"].sharding.spec == P(None, "model")
    m = jmerge.get(name)
    resolved = m.resolve(2, hp)
    answers = thresholds.solve(m.sparsifier(resolved).query, shard_models_placed[1], shard_models_placed[0])
    first = answers[0]  # task 0's: [a magnitude], [a pytree], or [lower, upper] pytrees
    if name != "ties" or hp.get("trim") == "tensor":  # per-tensor thresholds: pytrees shaped like the model
        assert jax.tree.structure(first[0]) == jax.tree.structure(base)
    merge = registry._jitted(m, registry.static_names(m, resolved))
    assert all_gathers(merge.lower(*shard_models_placed, None, answers, **resolved).compile().as_text()) == []


# ---------------------------------------------------------------------------- streamed vs in memory (from test_streaming)


@pytest.mark.parametrize("density", [0.2, (0.05, 0.5, 0.9)])
def test_global_ties_equals_in_memory(stream_ckpts, density):
    _, base, experts, paths = stream_ckpts
    got = streamed(paths, "ties", density=density, weights=(1.0, 0.5, 2.0))  # trim="global" is the default
    ref = jmerge.merge(base, experts, "ties", density=density, weights=(1.0, 0.5, 2.0))
    for n in STREAM_NAMES:
        np.testing.assert_array_equal(got[n], np.asarray(ref[n]), err_msg=n)
    tensor_trim = streamed(paths, "ties", density=density, trim="tensor", weights=(1.0, 0.5, 2.0))
    assert any(not np.array_equal(got[n], tensor_trim[n]) for n in STREAM_NAMES)  # the scopes really differ

def _global_thresholds(base, experts, density, **options):
    """Per task, the streamed global TIES threshold (``thresholds.solve`` on checkpoints)."""
    found = thresholds.solve(stages.magnitude_trim(density).query, [st.open_checkpoint(e) for e in experts],
                             st.open_checkpoint(base), **options)
    return np.asarray([a[0] for a in found], np.float32)


def test_global_thresholds_are_exact(stream_ckpts):
    _, base, experts, paths = stream_ckpts
    n_total = sum(np.prod(stream_shape(n)) for n in STREAM_NAMES)
    densities = [1e-4, 0.37, 1.0]  # k = 0, a middle k, k = N
    th = _global_thresholds(paths[0], paths[1:], densities)
    assert th[0] == np.inf and th[2] == 0.0
    tv = [np.concatenate([(e[n] - base[n]).ravel() for n in STREAM_NAMES]) for e in experts]
    k = int(0.37 * n_total)
    assert th[1] == float(xla.kth_largest_magnitude([tv[1]], k)) == np.sort(np.abs(tv[1]))[::-1][k - 1]

@pytest.mark.parametrize("sample", [7, 64, 1 << 20])  # bracketed by a tiny, small, whole sample
def test_global_thresholds_from_a_sampled_bracket(stream_ckpts, sample):
    _, base, experts, paths = stream_ckpts
    tv = [np.concatenate([(e[n] - base[n]).ravel() for n in STREAM_NAMES]) for e in experts]
    densities = [0.01, 0.5, 0.99]
    th = _global_thresholds(paths[0], paths[1:], densities, sample=sample)
    for t, d in enumerate(densities):
        assert th[t] == np.sort(np.abs(tv[t]))[::-1][int(d * tv[t].size) - 1]

def test_a_missed_bracket_is_widened_and_the_pass_repeated(stream_ckpts, monkeypatch):
    _, base, experts, paths = stream_ckpts
    calls = []
    real = thost.bracket

    def first_misses(sample, k, n, z):
        calls.append(z)
        return (0.0, 1e-30) if len(calls) == 1 else real(sample, k, n, z)  # nothing inside: a miss

    monkeypatch.setattr(thost, "bracket", first_misses)
    th = _global_thresholds(paths[0], paths[1:2], 0.3)
    tv = np.concatenate([(experts[0][n] - base[n]).ravel() for n in STREAM_NAMES])
    assert calls == [5.0, 20.0]
    assert th[0] == np.sort(np.abs(tv))[::-1][int(0.3 * tv.size) - 1]

def test_kth_in_bracket_and_kth_largest_on_ties():
    v = np.array([3, 1, 2, 2, 2, 5], np.float32)
    assert [thost.kth_largest(v.copy(), k) for k in range(1, 7)] == [5, 3, 2, 2, 2, 1]
    inside = [np.array([2, 2], np.float32), np.array([2], np.float32)]  # [lo, hi) = [2, 3)
    assert thost.kth_in_bracket(inside, 2, 4) == 2.0  # 5, 3 above
    assert thost.kth_in_bracket(inside, 2, 2) is None and thost.kth_in_bracket(inside, 2, 6) is None
    with pytest.raises(ValueError, match="k=0"):
        thost.kth_largest(v, 0)

def test_tensor_thresholds_are_exact():
    r = np.random.default_rng(5)
    b = r.standard_normal((33, 17)).astype(np.float32)
    es = [b + 0.1 * r.standard_normal(b.shape).astype(np.float32) for _ in range(3)]
    th = [a[0] for a in thost.solve(stages.magnitude_trim((0.001, 0.3, 1.0)).query, es, b)]  # k = 0, k = 168, k = n
    assert th[0] == np.inf and th[2] == 0.0
    assert th[1] == np.sort(np.abs(es[1] - b).ravel())[::-1][int(0.3 * b.size) - 1]


# ---------------------------------------------------------------------------- LwPTV host vs jitted (from test_lwptv)


class TestLwPTV:  # its own `models` (BERT-like), not the mesh tests' ones
    @pytest.fixture(scope="class")
    @classmethod
    def models(cls):
        return bert_like_models()

    @pytest.fixture(scope="class")
    @classmethod
    def grouping(cls, models):
        return lwptv.group(models[0], "bert")

    @pytest.mark.parametrize("hp", [{}, {"trim": "tensor", "density": 0.3}])
    def test_lwptv_ties_thresholds_on_the_host_equal_the_jitted_search(self, models, grouping, monkeypatch, hp):
        """With ``lwptv=``, jmerge.merge finds the TIES thresholds of the pruned task vectors on
        the host (numpy, CPU inputs); the result equals the jitted search inside the merge."""
        base, experts = models
        mask = drop_mask(grouping)
        calls = []
        real = thost.solve
        monkeypatch.setattr(thost, "solve", lambda *a, **k: calls.append(1) or real(*a, **k))
        host = jmerge.merge(base, experts, "ties", lwptv=mask, **hp)
        monkeypatch.setattr(thost, "on_host_cpu", lambda tree: False)  # the jitted search instead
        jitted = jmerge.merge(base, experts, "ties", lwptv=mask, **hp)
        assert calls == [1]
        assert_trees_equal(host, jitted)


# ---------------------------------------------------------------------------- paths the refactor added
@pytest.mark.parametrize("name, hp", [("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
                                      ("breadcrumbs_ties", {"density": (0.3, 0.8), "gamma": 0.05})])
def test_breadcrumbs_host_thresholds_equal_the_jitted_search(name, hp, monkeypatch):
    """Breadcrumbs on CPU inputs: its two per-tensor thresholds come from the host backend,
    and the merge equals the method run inside jit (the XLA search) bit for bit."""
    r = np.random.default_rng(4)
    base = {"w": r.standard_normal((300, 200)).astype(np.float32), "b": r.standard_normal(77).astype(np.float32)}
    experts = [{k: (v + np.round(r.standard_normal(v.shape) * 4) / 8).astype(np.float32) for k, v in base.items()} for _ in range(2)]
    calls = []
    real = thost.solve
    monkeypatch.setattr(thost, "solve", lambda *a, **k: calls.append(1) or real(*a, **k))
    host = jmerge.merge(base, experts, name, **hp)
    m = jmerge.get(name)
    resolved = m.resolve(2, hp)
    static = {k: resolved.pop(k) for k in list(resolved) if k in m.static}
    jitted = jax.jit(lambda b, es, **h: m.fn(b, jtree.task_vectors(b, es), **static, **h))(base, experts, **resolved)
    assert calls == [1]
    assert_trees_equal(host, jitted)


@pytest.mark.parametrize("score, kwargs", [("trim_survival", {"density": 0.3}), ("energy_concentration", {"top": 0.1})])
def test_lwptv_magnitude_scores_on_the_host_equal_the_jitted_search(score, kwargs, monkeypatch):
    """LwPTV's magnitude-ranking scores find their thresholds on the host for CPU inputs; the
    scores equal those of the XLA search bit for bit."""
    base, experts = bert_like_models()
    grouping = lwptv.group(base, "bert")
    calls = []
    real = thost.solve
    monkeypatch.setattr(thost, "solve", lambda *a, **k: calls.append(1) or real(*a, **k))
    host = np.asarray(lscores.compute_from_experts(base, experts, grouping, score, **kwargs))
    monkeypatch.setattr(thost, "on_host_cpu", lambda tree: False)  # the XLA search instead
    jitted = np.asarray(lscores.compute_from_experts(base, experts, grouping, score, **kwargs))
    assert calls == [1]
    np.testing.assert_array_equal(host, jitted)
