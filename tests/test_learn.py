"""jmerge.learn: objectives vs numpy, the coefficient engine on problems with a known optimum,
caching, determinism, composition with trimmed task vectors, sharding, the causal-LM
protocol, NaN handling and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmerge
import jmerge.learn as L
from helpers import place
from jmerge.learn import objectives, targets as targets_mod
from jmerge.validate import MergeInputError
pytestmark = pytest.mark.standard_promotion("optax 0.2.8's adam computes decay ** count (float ** int32)")


# ---------------------------------------------------------------------------- numpy references
def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0.0), -1)


def np_js(p, q):
    m = 0.5 * (np.asarray(p, np.float64) + np.asarray(q, np.float64))
    return 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)


def np_entropy(q):
    q = np.asarray(q, np.float64)
    return -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0.0), -1)


def random_logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# ---------------------------------------------------------------------------- objectives
def test_divergences_match_numpy():
    lp, lq = np_log_softmax(random_logits(0, (6, 7))), np_log_softmax(random_logits(1, (6, 7)))
    p, q = np.exp(lp), np.exp(lq)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    np.testing.assert_allclose(L.kl(f32(lp), f32(lq)), np_kl(p, q), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(objectives.OBJECTIVES["reverse_kl"](f32(lp), f32(lq)), np_kl(q, p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(L.js(f32(lp), f32(lq)), np_js(p, q), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(L.entropy(f32(lq)), np_entropy(q), rtol=1e-5, atol=1e-6)


def test_js_properties():
    lp, lq = (jnp.asarray(np_log_softmax(random_logits(s, (50, 9))), jnp.float32) for s in (2, 3))
    d = np.asarray(L.js(lp, lq))
    assert np.all(d >= 0) and np.all(d <= np.log(2) + 1e-6)
    np.testing.assert_array_equal(d, np.asarray(L.js(lq, lp)))  # exactly symmetric
    assert np.all(d > 1e-4)  # different distributions
    np.testing.assert_array_equal(np.asarray(L.js(lp, lp)), 0.0)
    # disjoint supports reach log 2
    a = jnp.log(jnp.asarray([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(L.js(a[:1], a[1:]), np.log(2), rtol=1e-6)


def test_near_zero_probabilities_are_finite():
    # log-probs of -1e4 and -inf (probability 0) on both sides, value and gradient
    lp = jnp.asarray([[0.0, -1e4, -jnp.inf], [-jnp.inf, -1e-30, -1e4]])
    lq = jnp.asarray([[-1e4, 0.0, -jnp.inf], [-jnp.inf, 0.0, -80.0]])
    for name in ("js", "entropy", "kl"):  # KL(p||q)'s gradient in q is -p: finite too
        f = objectives.OBJECTIVES[name]
        value, grad = jax.jit(jax.value_and_grad(lambda q: jnp.sum(f(lp, q))))(lq)
        assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(L.js(lp[:1], lq[:1]), np.log(2), rtol=1e-5)


def test_masked_mean_matches_numpy():
    vals = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    expected = np.mean([vals[i][mask[i]].mean() for i in range(3)])
    np.testing.assert_allclose(L.masked_mean(jnp.asarray(vals), jnp.asarray(mask)), expected, rtol=1e-6)
    vals[0, 3] = np.nan  # masked-out NaN does not leak
    np.testing.assert_allclose(L.masked_mean(jnp.asarray(vals), jnp.asarray(mask)), expected, rtol=1e-6)
    np.testing.assert_allclose(L.masked_mean(jnp.asarray(vals[1:2])), vals[1].mean(), rtol=1e-6)


# ---------------------------------------------------------------------------- synthetic problems
def linear_problem(seed=0, d=8, c=5, n=32):
    """Softmax regression; task 1 inputs use features 0..3 and tau_1 only touches their rows,
    task 2 likewise on 4..7: Gamma = (1, 1) reproduces both experts exactly."""
    rng = np.random.default_rng(seed)
    h = d // 2
    base = {"w": jnp.asarray(rng.normal(size=(d, c)), jnp.float32), "b": jnp.asarray(rng.normal(size=c), jnp.float32)}
    taus, xs = [], []
    for rows in (slice(0, h), slice(h, d)):
        t = np.zeros((d, c), np.float32)
        t[rows] = 2 * rng.normal(size=(h, c))
        taus.append({"w": jnp.asarray(t), "b": jnp.zeros(c)})
        x = np.zeros((n, d), np.float32)
        x[:, rows] = rng.normal(size=(n, h))
        xs.append(x)
    return base, taus, xs


def linear_apply(p, x):
    return x @ p["w"] + p["b"]


def mlp_problem(seed=0, d=8, hidden=8, c=5, n=32):
    """Two-layer tanh MLP with block-diagonal first layer: task t's inputs reach only its
    hidden units, and tau_t only touches its own blocks of both layers."""
    rng = np.random.default_rng(seed)
    h, hh = d // 2, hidden // 2
    w1 = np.zeros((d, hidden), np.float32)
    w1[:h, :hh] = rng.normal(size=(h, hh))
    w1[h:, hh:] = rng.normal(size=(h, hh))
    base = {"dense1": {"kernel": jnp.asarray(w1)}, "dense2": {"kernel": jnp.asarray(rng.normal(size=(hidden, c)), jnp.float32)}}
    taus, xs = [], []
    for rows, units in ((slice(0, h), slice(0, hh)), (slice(h, d), slice(hh, hidden))):
        t1 = np.zeros((d, hidden), np.float32)
        t1[rows, units] = rng.normal(size=(h, hh))
        t2 = np.zeros((hidden, c), np.float32)
        t2[units] = 1.5 * rng.normal(size=(hh, c))
        taus.append({"dense1": {"kernel": jnp.asarray(t1)}, "dense2": {"kernel": jnp.asarray(t2)}})
        x = np.zeros((n, d), np.float32)
        x[:, rows] = rng.normal(size=(n, h))
        xs.append(x)
    return base, taus, xs


def mlp_apply(p, x):
    return jnp.tanh(x @ p["dense1"]["kernel"]) @ p["dense2"]["kernel"]


FIT = dict(optimizer=optax.adam(0.05), epochs=20, progress=False)


@pytest.mark.parametrize("objective", ["js", "kl", "reverse_kl"])
def test_task_level_recovers_known_optimum(objective):
    base, taus, xs = linear_problem()
    r = L.fit_coefficients(base, taus, linear_apply, xs, objective=objective, **FIT)
    assert r.coefficients.shape == (2,) and r.layer_names is None
    np.testing.assert_allclose(r.coefficients, [1.0, 1.0], atol=2e-3)
    assert r.losses[-1] < 1e-5 < r.losses[0]
    assert r.losses.shape == (20 * 8,) and r.task_losses.shape == (160, 2)
    np.testing.assert_allclose(r.losses, r.task_losses.sum(1), rtol=1e-5)
    # params are theta_0 + sum_t Gamma_t tau_t
    expected = {k: np.asarray(base[k]) + sum(c * np.asarray(t[k]) for c, t in zip(r.coefficients, taus)) for k in base}
    for k in base:
        np.testing.assert_allclose(r.params[k], expected[k], rtol=1e-6, atol=1e-6)


def test_layer_level_recovers_per_layer_optimum():
    base, taus, xs = mlp_problem()
    targets = L.classifier_targets(base, taus, mlp_apply, xs)  # the real experts
    optimum = np.array([[1.5, 0.5], [0.8, 1.25]])  # (task, layer)
    scaled = [{"dense1": {"kernel": t["dense1"]["kernel"] / g[0]}, "dense2": {"kernel": t["dense2"]["kernel"] / g[1]}} for t, g in zip(taus, optimum)]
    r = L.fit_coefficients(base, scaled, mlp_apply, targets=targets, granularity="layer", layers=r"dense\d", init=1.0, optimizer=optax.adam(optax.cosine_decay_schedule(0.1, 240)), epochs=30, progress=False)
    assert r.layer_names == ("dense1", "dense2")
    np.testing.assert_allclose(r.coefficients, optimum, atol=1e-2)
    # per-tensor granularity: the same two tensors, the same answer
    t = L.fit_coefficients(base, scaled, mlp_apply, targets=targets, granularity="tensor", init=1.0, optimizer=optax.adam(optax.cosine_decay_schedule(0.1, 240)), epochs=30, progress=False)
    assert t.layer_names == ("dense1/kernel", "dense2/kernel")
    np.testing.assert_allclose(t.coefficients, r.coefficients, atol=1e-5)
    # task level cannot reach it
    tl = L.fit_coefficients(base, scaled, mlp_apply, targets=targets, init=1.0, optimizer=optax.adam(optax.cosine_decay_schedule(0.1, 240)), epochs=30, progress=False)
    assert tl.losses[-1] > 10 * r.losses[-1]


def test_progress_loop_equals_scan():
    base, taus, xs = linear_problem()
    a = L.fit_coefficients(base, taus, linear_apply, xs, optimizer=optax.adam(0.05), epochs=2, progress=False)
    b = L.fit_coefficients(base, taus, linear_apply, xs, optimizer=optax.adam(0.05), epochs=2, progress=True)
    np.testing.assert_allclose(a.coefficients, b.coefficients, rtol=1e-6)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6)


def heads_problem(seed=0, n=12):
    """A shared body and one head per task (different class counts); apply_t uses head t."""
    rng = np.random.default_rng(seed)
    shapes = {"body": (6, 4), "head0": (4, 3), "head1": (4, 5)}
    base = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    taus = [{k: jnp.asarray(0.5 * rng.normal(size=s), jnp.float32) for k, s in shapes.items()} for _ in range(2)]
    xs = [rng.normal(size=(n, 6)).astype(np.float32), rng.normal(size=(n + 4, 6)).astype(np.float32)]
    fns = [lambda p, x, h=h: jnp.tanh(x @ p["body"]) @ p[h] for h in ("head0", "head1")]
    return base, taus, xs, fns


def np_merged(base, taus, coeffs):
    return {k: np.asarray(base[k], np.float64) + sum(c * np.asarray(t[k], np.float64) for c, t in zip(coeffs, taus)) for k in base}


def np_heads_logits(p, x, head):
    return np.tanh(np.asarray(x, np.float64) @ p["body"]) @ p[head]


@pytest.mark.parametrize("objective", ["js", "kl", "reverse_kl", "entropy"])
def test_first_step_loss_matches_numpy_with_task_heads(objective):
    base, taus, xs, fns = heads_problem()
    key = jax.random.key(3)
    r = L.fit_coefficients(base, taus, fns, xs, objective=objective, init=[0.4, 0.7], epochs=1, key=key, progress=False, optimizer=optax.sgd(0.0))
    idx = L.batch_schedule(key, [len(x) for x in xs], 4, 1)
    assert r.losses.shape == (len(idx),) and idx.shape[1:] == (2, 4)
    merged = np_merged(base, taus, [0.4, 0.7])
    for s in (0, len(idx) - 1):
        expected = 0.0
        for t, head in enumerate(("head0", "head1")):
            x = xs[t][idx[s, t]]
            lq = np_log_softmax(np_heads_logits(merged, x, head))
            lp = np_log_softmax(np_heads_logits(np_merged(base, [taus[t]], [1.0]), x, head))
            ref = {"js": np_js, "kl": np_kl, "reverse_kl": lambda p, q: np_kl(q, p), "entropy": lambda p, q: np_entropy(q)}[objective]
            expected += ref(np.exp(lp), np.exp(lq)).mean()
        np.testing.assert_allclose(r.losses[s], expected, rtol=1e-4, atol=1e-6)


def test_step_gradient_and_memory():
    """The sequential-task gradient equals plain autodiff, and the step's scratch memory does
    not grow with the number of tasks (one task's gradient alive at a time)."""
    from jmerge.learn import coefficients as coef, engine

    rng = np.random.default_rng(0)
    shapes = {"w1": (64, 256), "w2": (256, 64)}
    base = {k: jnp.asarray(rng.normal(size=s) / 16, jnp.float32) for k, s in shapes.items()}
    apply = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    temps = {}
    for k in (2, 5):
        taus = [{n: jnp.asarray(rng.normal(size=s) / 16, jnp.float32) for n, s in shapes.items()} for _ in range(k)]
        xs = [rng.normal(size=(4, 64)).astype(np.float32) for _ in range(k)]
        data = L.classifier_targets(base, taus, apply, xs)
        lay = coef.layout(base, k, "layer", r"w\d")
        c = jnp.asarray(rng.random(lay.shape), jnp.float32)
        idx = np.tile(np.arange(4, dtype=np.int32), (k, 1))
        vg = engine._value_and_grad_fn([apply] * k, lay, objectives.OBJECTIVES["js"])
        compiled = jax.jit(vg).lower(c, base, taus, data, idx).compile()
        temps[k] = compiled.memory_analysis().temp_size_in_bytes
        (loss, per), grad = compiled(c, base, taus, data, idx)

        def plain(c):
            p = coef.merged_params(base, taus, c, lay)
            return sum(L.masked_mean(L.js(d.log_probs, jax.nn.log_softmax(apply(p, d.inputs)))) for d in data)

        ref_loss, ref_grad = jax.jit(jax.value_and_grad(plain))(c)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    assert temps[5] - temps[2] < 0.5 * param_bytes, (temps, param_bytes)  # unrolled: +1.7 copies
    assert temps[2] < 4 * param_bytes


def test_batch_schedule_covers_each_task_per_epoch():
    idx = L.batch_schedule(jax.random.key(0), [12, 7], 4, 2)
    assert idx.shape == (6, 2, 4)  # ceil(12/4) = 3 steps per epoch
    for e in range(2):
        assert sorted(idx[3 * e : 3 * e + 3, 0].ravel()) == list(range(12))
    first = idx[:, 1].ravel()
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:14]) == list(range(7))
    np.testing.assert_array_equal(idx, L.batch_schedule(jax.random.key(0), [12, 7], 4, 2))
    assert not np.array_equal(idx, L.batch_schedule(jax.random.key(1), [12, 7], 4, 2))


def test_fixed_key_is_reproducible():
    base, taus, xs = linear_problem()
    run = lambda k: L.fit_coefficients(base, taus, linear_apply, xs, epochs=1, key=k, progress=False).coefficients
    a, b, c = run(jax.random.key(7)), run(jax.random.key(7)), run(jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------------- constraints, presets
def test_constraints_and_adamerging():
    base, taus, xs = linear_problem()
    half = [jax.tree.map(lambda a: a / 2, t) for t in taus]  # optimum Gamma = 2 each
    clipped = L.fit_coefficients(base, half, linear_apply, xs, constraint="clip01", init=0.3, **FIT)
    # The optimum (2, 2) lies outside [0, 1]: the iterates reach the bound and stay within it
    # (Adam's last steps may leave them a hair below 1: 0.996-0.998 with jaxlib 0.10.2 here).
    coefficients = np.asarray(clipped.coefficients)
    assert np.all(coefficients <= 1.0) and np.all(coefficients > 0.99)
    simplex = L.fit_coefficients(base, half, linear_apply, xs, constraint="simplex", granularity="tensor", **FIT)
    np.testing.assert_allclose(simplex.coefficients.sum(0), 1.0, atol=1e-5)
    assert np.all(simplex.coefficients >= 0)
    ada = L.adamerging(base, taus, linear_apply, xs, epochs=1, progress=False)
    assert ada.objective == "entropy" and ada.coefficients.shape == (2,)
    assert np.all((ada.coefficients >= 0) & (ada.coefficients <= 1))
    assert not np.allclose(ada.coefficients, 0.3)  # it moved from AdaMerging's 0.3 prior
    div = L.divmerge(base, taus, linear_apply, xs, epochs=1, progress=False)
    assert div.objective == "js" and div.steps_per_epoch == 8


# ---------------------------------------------------------------------------- targets and caching
def test_classifier_targets_and_cache(tmp_path):
    base, taus, xs = linear_problem()
    targets_mod.clear_memory()
    t1 = L.classifier_targets(base, taus, linear_apply, xs, batch_size=5, cache_dir=tmp_path)  # padded chunks
    for t in range(2):
        expert = np_merged(base, [taus[t]], [1.0])
        np.testing.assert_allclose(t1[t].log_probs, np_log_softmax(xs[t] @ expert["w"] + expert["b"]), atol=1e-5)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("targets-") and f.endswith(".npz") for f in files)
    assert t1[0].log_probs is L.classifier_targets(base, taus, linear_apply, xs, cache_dir=tmp_path)[0].log_probs  # memory hit

    def broken(p, x):
        raise AssertionError("targets must come from the disk cache")

    broken.__qualname__ = linear_apply.__qualname__  # same cache key as linear_apply
    broken.__module__ = linear_apply.__module__
    targets_mod.clear_memory()
    t2 = L.classifier_targets(base, taus, broken, xs, cache_dir=tmp_path)
    for a, b in zip(t1, t2):
        np.testing.assert_array_equal(a.log_probs, b.log_probs)
    # closures over different heads are different keys, over equal heads the same key
    head = np.eye(5, dtype=np.float32)
    with_head = lambda h: (lambda p, x: linear_apply(p, x) @ h)
    a = L.classifier_targets(base, taus, with_head(head), xs)[0].log_probs
    assert L.classifier_targets(base, taus, with_head(head.copy()), xs)[0].log_probs is a
    assert L.classifier_targets(base, taus, with_head(2 * head), xs)[0].log_probs is not a
    # a different task vector is another key
    other = [jax.tree.map(lambda a: a * 1.01, taus[0]), taus[1]]
    targets_mod.clear_memory()
    with pytest.raises(AssertionError, match="disk cache"):
        L.classifier_targets(base, other, broken, xs, cache_dir=tmp_path)
    # fitting from cached targets gives identical coefficients
    fresh = L.fit_coefficients(base, taus, linear_apply, xs, epochs=1, progress=False)
    targets_mod.clear_memory()
    from_disk = L.fit_coefficients(base, taus, linear_apply, xs, epochs=1, progress=False, cache_dir=tmp_path)
    np.testing.assert_array_equal(fresh.coefficients, from_disk.coefficients)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


# ---------------------------------------------------------------------------- composition
def test_composes_with_ties_trimmed_task_vectors():
    base, taus, xs = mlp_problem()
    targets = L.classifier_targets(base, taus, mlp_apply, xs)  # from the untrimmed experts
    trimmed = jmerge.stages.magnitude_trim(0.2)(taus)  # keeps int(0.2 * 104) = 20 of 36 nonzeros
    r = L.fit_coefficients(base, trimmed, mlp_apply, targets=targets, granularity="layer", layers=r"dense\d", **FIT)
    assert r.losses[-8:].mean() < 0.8 * r.losses[:8].mean()  # last epoch vs first
    for name in ("dense1", "dense2"):
        l = r.layer_names.index(name)
        expected = np.asarray(base[name]["kernel"]) + sum(r.coefficients[t, l] * np.asarray(trimmed[t][name]["kernel"]) for t in range(2))
        np.testing.assert_allclose(r.params[name]["kernel"], expected, rtol=1e-5, atol=1e-6)
    assert all(sum(int(np.count_nonzero(a)) for a in jax.tree.leaves(t)) == 20 for t in trimmed)
    # masked (LwPTV-style: dense1 dropped for task 0) task vectors compose the same way
    masked = [jmerge.tree.masked(taus[0], {"dense1": {"kernel": False}, "dense2": {"kernel": True}}), taus[1]]
    m = L.fit_coefficients(base, masked, mlp_apply, targets=targets, epochs=2, progress=False)
    assert np.all(np.isfinite(m.coefficients))


def test_task_arithmetic_learned_coefficients_and_the_checkpoint_writer_are_one_kernel(tmp_path):
    """θ0 + Σ_t Γ_t^l τ_t: learn.merged_params (the learned model), causal_lm.merged_tensors (what
    `jmerge run` writes) and the task_arithmetic method (Γ_t = λ w_t, jitted like jmerge.merge)
    agree bit for bit, and with numpy."""
    from jmerge.io import safetensors_io as st
    from jmerge.learn import causal_lm

    rng = np.random.default_rng(5)
    shapes = {"blocks.0.w": (8, 6), "blocks.0.b": (6,), "blocks.1.w": (6, 4), "head.w": (4, 3)}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    experts = [{n: a + rng.standard_normal(a.shape).astype(np.float32) for n, a in base.items()} for _ in range(3)]
    taus = jmerge.tree.task_vectors(base, experts)
    lay = L.layout(base, 3, "layer", r"blocks\.\d|head")
    gamma = rng.uniform(-0.5, 1.5, lay.shape).astype(np.float32)
    learned = L.merged_params(base, taus, jnp.asarray(gamma), lay)
    layer_of = dict(zip(lay.grouping.leaf_paths, lay.grouping.leaf_layer))
    for n, b in base.items():
        want = b.astype(np.float64) + sum(gamma[t, layer_of[n]] * (experts[t][n] - b.astype(np.float64)) for t in range(3))
        np.testing.assert_allclose(learned[n], want, rtol=1e-5, atol=1e-5)
    for name, tensors in (("base", base), *((f"e{t}", e) for t, e in enumerate(experts))):
        (tmp_path / name).mkdir()
        st.save_safetensors(tmp_path / name, tensors)
    per_tensor = {n: gamma[:, layer_of[n]] for n in base}
    written = dict(causal_lm.merged_tensors(st.open_checkpoint(tmp_path / "base"),
                                            [st.open_checkpoint(tmp_path / f"e{t}") for t in range(3)], per_tensor))
    for n in base:
        np.testing.assert_array_equal(written[n], learned[n])
    w = np.asarray([0.5, 1.0, 2.0], np.float32)
    ta = jmerge.merge(base, experts, "task_arithmetic", scale=0.3, weights=w)
    task_level = jax.jit(L.merged_params, static_argnums=3)(base, taus, jnp.asarray(0.3 * w), L.layout(base, 3))
    for n in base:
        np.testing.assert_array_equal(ta[n], task_level[n])


# ---------------------------------------------------------------------------- sharding
def test_sharded_equals_unsharded(mesh8):
    base, taus, xs = mlp_problem(d=16, hidden=16, c=8)
    kw = dict(granularity="layer", layers=r"dense\d", optimizer=optax.adam(0.05), epochs=3, progress=False)
    plain = L.fit_coefficients(base, taus, mlp_apply, xs, **kw)
    targets_mod.clear_memory()
    sharded = L.fit_coefficients(place(base, mesh8), [place(t, mesh8) for t in taus], mlp_apply, xs, **kw)
    assert len(sharded.params["dense1"]["kernel"].sharding.device_set) == 8
    np.testing.assert_allclose(sharded.coefficients, plain.coefficients, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- causal LM protocol
V, D = 11, 8


def lm_init(seed):
    rng = np.random.default_rng(seed)
    shapes = {"embed": (V, D), "pos": (16, D), "q": (D, D), "k": (D, D), "v": (D, D), "out": (D, V)}
    return {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0] if k != "embed" else 1), jnp.float32) for k, s in shapes.items()}


def lm_apply(p, tokens, xp=jnp):
    """One causal self-attention layer and an unembedding: (B, S) -> (B, S, V); ``xp=np``
    runs it in numpy (float64) as the reference."""
    s = tokens.shape[1]
    h = p["embed"][tokens] + p["pos"][:s]
    att = (h @ p["q"]) @ (h @ p["k"]).transpose(0, 2, 1) / np.sqrt(D)
    att = xp.where(np.tril(np.ones((s, s), bool)), att, -1e9)
    att = xp.exp(att - att.max(-1, keepdims=True))
    h = h + (att / att.sum(-1, keepdims=True)) @ (h @ p["v"])
    return h @ p["out"]


def np_lm_apply(p, tokens):
    return lm_apply({k: np.asarray(v, np.float64) for k, v in p.items()}, np.asarray(tokens), xp=np)


def np_greedy(params, prompt, steps, eos):
    """Reference greedy decoding with a growing sequence (no fixed buffer)."""
    seq, lps = list(prompt), []
    for _ in range(steps):
        logits = np_lm_apply(params, [seq])[0, -1]
        lps.append(np_log_softmax(logits))
        seq.append(int(np.argmax(logits)))
        if seq[-1] == eos:
            break
    return seq[len(prompt) :], np.stack(lps)


def test_lm_targets_greedy_protocol(tmp_path):
    params = lm_init(0)
    prompts = np.random.default_rng(1).integers(0, V, size=(5, 3))
    eos = int(np.argmax(np_lm_apply(params, prompts[:1])[0, -1]))  # prompt 0 ends at once
    T = 6
    tt = L.lm_targets(lm_apply, params, prompts, T, eos, batch_size=2, cache_dir=tmp_path)
    assert tt.inputs.shape == (5, 3 + T) and tt.log_probs.shape == (5, T, V) and tt.mask.shape == (5, T)
    assert tt.logits_slice == (2, 2 + T)
    assert tt.mask[0].tolist() == [True] + [False] * (T - 1)
    for i, prompt in enumerate(prompts):
        gen, lps = np_greedy(params, prompt, T, eos)
        n = len(gen)
        assert tt.mask[i].sum() == n
        np.testing.assert_array_equal(tt.inputs[i, 3 : 3 + n], gen)
        assert np.all(tt.inputs[i, 3 + n :] == eos)  # padded with eos after the end
        np.testing.assert_allclose(tt.log_probs[i, :n], lps, atol=1e-4)
    targets_mod.clear_memory()
    again = L.lm_targets(lm_apply, params, prompts, T, eos, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.log_probs, tt.log_probs)


def test_lm_fit_token_level_js():
    base = lm_init(0)
    experts = [lm_init(1), lm_init(2)]
    taus = jmerge.task_vectors(base, [jax.tree.map(lambda b, e: b + 0.3 * (e - b), base, ex) for ex in experts])
    rng = np.random.default_rng(3)
    prompt_sets = [rng.integers(0, V, size=(8, 3)), rng.integers(0, V, size=(8, 4))]  # per-task prompt lengths
    eos = 0
    tts = [L.lm_targets(lm_apply, jmerge.apply(base, tau), ps, 5, eos) for tau, ps in zip(taus, prompt_sets)]
    key = jax.random.key(0)
    r = L.fit_coefficients(base, taus, lm_apply, targets=tts, epochs=1, key=key, optimizer=optax.sgd(0.0), progress=False)
    # first step: JS per generated token, masked mean per sequence, mean over sequences, summed over tasks
    idx = L.batch_schedule(key, [8, 8], 4, 1)[0]
    merged = np_merged(base, taus, [0.5, 0.5])
    expected = 0.0
    for t, tt in enumerate(tts):
        p = prompt_sets[t].shape[1]
        logits = np_lm_apply(merged, tt.inputs[idx[t]])
        lq = np_log_softmax(logits[:, p - 1 : p - 1 + 5])
        d = np_js(np.exp(tt.log_probs[idx[t]]), np.exp(lq))
        m = tt.mask[idx[t]]
        expected += np.mean((d * m).sum(1) / m.sum(1))
    np.testing.assert_allclose(r.losses[0], expected, rtol=1e-4)
    # one task: the expert itself (Gamma = 1) is the optimum
    one = L.fit_coefficients(base, taus[:1], lm_apply, targets=tts[:1], init=0.3, optimizer=optax.adam(0.1), epochs=30, progress=False)
    np.testing.assert_allclose(one.coefficients, [1.0], atol=0.05)


# ---------------------------------------------------------------------------- failures
def nan_at(step):
    """An optax transformation that turns the update of ``step`` into NaN."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        bad = count == step
        return jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates), count + 1

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("progress", [False, True])
def test_nan_stops_naming_the_step(progress):
    base, taus, xs = linear_problem()
    with pytest.raises(L.NonFiniteLossError, match=r"step 3 \(epoch 1, batch 4 of 8\)") as err:
        L.fit_coefficients(base, taus, linear_apply, xs, optimizer=optax.chain(optax.adam(0.01), nan_at(3)), epochs=1, progress=progress)
    assert err.value.step == 3 and np.all(np.isfinite(err.value.coefficients))
    # a NaN input makes the loss NaN at the first step that draws it
    xs_nan = [xs[0].copy(), xs[1]]
    xs_nan[0][5, 0] = np.nan
    step = int(np.argmax((L.batch_schedule(jax.random.key(0), [32, 32], 4, 1)[:, 0] == 5).any(1)))
    with pytest.raises(L.NonFiniteLossError, match=rf"step {step} .*loss is nan"):
        L.fit_coefficients(base, taus, linear_apply, xs_nan, objective="entropy", epochs=1, progress=progress)
    with pytest.raises(MergeInputError, match="task 0: the expert's targets hold NaN"):
        L.fit_coefficients(base, taus, linear_apply, xs_nan, epochs=1, progress=progress)


def test_bad_input():
    base, taus, xs = linear_problem()
    fit = lambda **kw: L.fit_coefficients(**{"base": base, "tvs": taus, "apply_fn": linear_apply, "unlabeled": xs, "progress": False, **kw})
    with pytest.raises(MergeInputError, match="task 1 has no unlabelled inputs"):
        fit(unlabeled=[xs[0], None])
    with pytest.raises(MergeInputError, match="task 0 has no unlabelled inputs"):
        fit(unlabeled=[xs[0][:0], xs[1]])
    with pytest.raises(MergeInputError, match="1 unlabelled data sets for 2 task vectors"):
        fit(unlabeled=xs[:1])
    with pytest.raises(MergeInputError, match="3 apply functions"):
        fit(apply_fn=[linear_apply] * 3)
    with pytest.raises(MergeInputError, match="did you mean 'js'"):
        fit(objective="jss")
    with pytest.raises(MergeInputError, match="did you mean 'layer'"):
        fit(granularity="layr")
    with pytest.raises(MergeInputError, match="did you mean 'simplex'"):
        fit(constraint="simplx")
    with pytest.raises(MergeInputError, match="only used with granularity='layer'"):
        fit(layers=r"w")
    with pytest.raises(MergeInputError, match="assigns no layer"):
        fit(granularity="layer", layers=r"^w$")
    with pytest.raises(MergeInputError, match=r"init has shape \(3,\)"):
        fit(init=[0.1, 0.2, 0.3])
    with pytest.raises(MergeInputError, match="epochs must be a positive integer"):
        fit(epochs=0)
    with pytest.raises(MergeInputError, match=r"parameter 'w': task vector 1 has shape \(8, 4\)"):
        fit(tvs=[taus[0], {"w": taus[1]["w"][:, :4], "b": taus[1]["b"]}])
    # precomputed targets whose class count disagrees with apply_fn's logits
    wrong = [np.zeros((32, 4), np.float32), np.zeros((32, 5), np.float32)]
    with pytest.raises(MergeInputError, match=r"task 0: apply_fn gives logits of shape \(5,\) per example but the targets have \(4,\)"):
        fit(targets=wrong)
    with pytest.raises(MergeInputError, match="2 task vectors"):
        fit(targets=wrong[:1])
    with pytest.raises(MergeInputError, match="task 1: apply_fn failed"):
        fit(unlabeled=[xs[0], xs[1][:, :3]])
    with pytest.raises(MergeInputError, match="one logits array"):
        fit(apply_fn=lambda p, x: {"logits": linear_apply(p, x)})
    tts = L.classifier_targets(base, taus, linear_apply, xs)
    with pytest.raises(MergeInputError, match="pass unlabeled=None"):
        fit(targets=tts)
    with pytest.raises(MergeInputError, match="needs expert targets"):
        fit(unlabeled=None, targets=[L.TaskTargets(x) for x in xs])
    with pytest.raises(MergeInputError, match="non-empty"):
        L.lm_targets(lm_apply, lm_init(0), np.zeros((2, 0), np.int32), 3, 0)
