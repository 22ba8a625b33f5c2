"""RegMean and Fisher merging (jmerge.learn.statistics, jmerge.methods.data_driven) against plain numpy."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy.special import erf

import jmerge
from jmerge import coverage, learn, shard
from jmerge import tree as jtree
from jmerge.validate import MergeInputError

D_IN, D_H, C, N = 6, 5, 4, 12


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(D_H)(x), approximate=False)
        return nn.Dense(C)(h)


MLP = Mlp()


def _models(k=3, seed=0):
    base = MLP.init(jax.random.key(seed), jnp.zeros((1, D_IN)))
    experts = [jax.tree.map(lambda b, i=i: b + 0.3 * jax.random.normal(jax.random.key(100 + i), b.shape), base) for i in range(k)]
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((N, D_IN)).astype(np.float32) + t for t in range(k)]
    return base, experts, xs


def np_hidden(p, x):
    d0 = p["params"]["Dense_0"]
    z = x @ np.asarray(d0["kernel"], np.float64) + np.asarray(d0["bias"], np.float64)
    return 0.5 * z * (1 + erf(z / np.sqrt(2)))


def np_regmean(base, experts, xs, alpha):
    flat = [jtree.flatten(e) for e in experts]
    grams = {"params/Dense_0/kernel": [x.astype(np.float64).T @ x / len(x) for x in xs],
             "params/Dense_1/kernel": [np_hidden(e, x).T @ np_hidden(e, x) / len(x) for e, x in zip(experts, xs)]}
    out = {}
    for path in jtree.flatten(base):
        ws = [np.asarray(f[path], np.float64) for f in flat]
        if path not in grams:
            out[path] = np.mean(ws, 0)
            continue
        shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams[path]]
        out[path] = np.linalg.solve(sum(shrunk), sum(s @ w for s, w in zip(shrunk, ws)))
    return out


def test_gram_matrices_are_the_layer_inputs_grams():
    base, experts, xs = _models()
    g = learn.gram_matrices(experts[1], MLP.apply, xs[1], batch_size=5)  # 5 + 5 + 2: three batches
    assert dict(g.axes) == {"params/Dense_0/kernel": 0, "params/Dense_1/kernel": 0} and g.untapped == ()
    assert dict(g.rows) == {"params/Dense_0/kernel": N, "params/Dense_1/kernel": N}
    h = np_hidden(experts[1], xs[1])
    np.testing.assert_allclose(g.matrices["params/Dense_0/kernel"], xs[1].T @ xs[1] / N, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.matrices["params/Dense_1/kernel"], h.T @ h / N, rtol=1e-4, atol=1e-6)


def test_torch_layout_and_untapped_parameters():
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((3, D_IN)).astype(np.float32), "stack": rng.standard_normal((2, 3, 3)).astype(np.float32),
              "emb": rng.standard_normal((7, 3)).astype(np.float32)}

    def apply(p, x):
        h = x @ p["w"].T  # torch (out, in)
        h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])
        return h @ p["emb"].T  # a 2-D leaf contracted on axis 1 after a transpose
    x = rng.standard_normal((N, 2, D_IN)).astype(np.float32)  # positions count as rows
    g = learn.gram_matrices(params, apply, x)
    assert dict(g.axes) == {"w": 1, "emb": 1} and dict(g.rows)["w"] == 2 * N
    rows = x.reshape(-1, D_IN)
    np.testing.assert_allclose(g.matrices["w"], rows.T @ rows / (2 * N), rtol=1e-5, atol=1e-6)
    assert g.untapped == ()  # "stack" is 3-D: no RegMean weight, averaged

    tvs = [jax.tree.map(lambda a, s=s: 0.1 * s * np.ones_like(a), params) for s in (1.0, 3.0)]
    grams = tuple(learn.gram_matrices(jtree.apply(params, tv), apply, x) for tv in tvs)
    merged = jmerge.merge_task_vectors(params, tvs, "regmean", grams=grams, alpha=0.5)
    np.testing.assert_allclose(merged["stack"], params["stack"] + 0.2, rtol=1e-6)  # the mean of 0.1 and 0.3
    cov = coverage.of("regmean", params, {"grams": grams}, 2)
    assert cov.fraction == pytest.approx((3 * D_IN + 21) / (3 * D_IN + 18 + 21))


@pytest.mark.parametrize("alpha", [0.95, 1.0, 0.0])
def test_regmean_matches_numpy(alpha):
    base, experts, xs = _models()
    tvs = jtree.task_vectors(base, experts)
    merged = learn.regmean(base, tvs, MLP.apply, xs, alpha=alpha, batch_size=5)
    want = np_regmean(base, experts, xs, alpha)
    for path, x in jtree.flatten(merged).items():
        np.testing.assert_allclose(x, want[path], rtol=2e-4, atol=2e-5, err_msg=path)


def test_regmean_identities():
    base, experts, xs = _models()
    tvs = jtree.task_vectors(base, experts)
    one = learn.regmean(base, tvs[:1], MLP.apply, xs[:1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), one, experts[0])
    same = [learn.gram_matrices(base, MLP.apply, xs[0])] * 3  # one Gram for all: RegMean is the average
    merged = jmerge.merge(base, experts, "regmean", grams=same, alpha=1.0)
    avg = jmerge.merge(base, experts, "average")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), merged, avg)


def test_regmean_sharded_on_8_devices():
    base, experts, xs = _models(k=2)
    mesh = shard.make_mesh(data=8, model=1)  # jmerge's meshes: Auto axes
    xs8 = [np.concatenate([x] * 2)[:16] for x in xs]  # 16 rows: 2 per device
    sharded = [jax.device_put(x, NamedSharding(mesh, P(shard.DATA))) for x in xs8]
    plain = [learn.gram_matrices(e, MLP.apply, x, batch_size=16) for e, x in zip(experts, xs8)]
    dist = [learn.gram_matrices(e, MLP.apply, x, batch_size=16) for e, x in zip(experts, sharded)]
    for a, b in zip(plain, dist):
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a.matrices, b.matrices)
    rep = NamedSharding(mesh, P())
    base_s = jax.device_put(base, rep)
    out = jmerge.merge(base_s, [jax.device_put(e, rep) for e in experts], "regmean", grams=dist)
    assert all(x.sharding.is_equivalent_to(rep, x.ndim) for x in jax.tree.leaves(out))


# ---------------------------------------------------------------------------- Fisher
def _linear(seed=0, k=2):
    rng = np.random.default_rng(seed)
    base = {"w": rng.standard_normal((D_IN, C)).astype(np.float32), "b": rng.standard_normal(C).astype(np.float32)}
    experts = [jax.tree.map(lambda a: a + 0.5 * rng.standard_normal(a.shape).astype(np.float32), base) for _ in range(k)]
    xs = [rng.standard_normal((N, D_IN)).astype(np.float32) for _ in range(k)]
    return base, experts, xs


def _apply(p, x):
    return x @ p["w"] + p["b"]


def np_fisher(p, x, estimator, batch):
    """Closed form for softmax(xW + b): d log p_c / dz = e_c - p."""
    w, b = np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)
    z = x @ w + b
    prob = np.exp(z - z.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    eye = np.eye(C)
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    if estimator == "exact":
        for n in range(len(x)):
            for c in range(C):
                dz = eye[c] - prob[n]
                fw += prob[n, c] * np.outer(x[n], dz) ** 2
                fb += prob[n, c] * dz ** 2
    else:
        for s in range(0, len(x), batch):
            dz = [sum(np.sqrt(prob[n, c]) * (eye[c] - prob[n]) for c in range(C)) for n in range(s, min(s + batch, len(x)))]
            fw += sum(np.outer(x[s + i], d) for i, d in enumerate(dz)) ** 2
            fb += sum(dz) ** 2
    return {"w": fw / len(x), "b": fb / len(x)}


@pytest.mark.parametrize("estimator", ["exact", "batch"])
def test_fisher_diagonal_matches_closed_form(estimator):
    _, experts, xs = _linear()
    f = learn.fisher_diagonal(experts[0], _apply, xs[0], batch_size=5, estimator=estimator)
    want = np_fisher(experts[0], xs[0], estimator, 5)
    for k in ("w", "b"):
        np.testing.assert_allclose(f[k], want[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_merge_matches_numpy(normalize):
    base, experts, xs = _linear(k=3)
    tvs = jtree.task_vectors(base, experts)
    merged = learn.fisher_merge(base, tvs, _apply, xs, normalize=normalize, weights=[0.2, 0.3, 0.5])
    fs = [np_fisher(e, x, "exact", 8) for e, x in zip(experts, xs)]
    c = np.array([0.2, 0.3, 0.5])
    if normalize:
        inv = 1 / (np.array([np.sqrt(sum(np.sum(f[k] ** 2) for k in f)) for f in fs]) + 1e-6)
        c = c * inv / inv.sum()
    for k in ("w", "b"):
        num = sum(ci * (f[k] + 1e-6) * np.asarray(e[k], np.float64) for ci, f, e in zip(c, fs, experts))
        den = sum(ci * (f[k] + 1e-6) for ci, f in zip(c, fs))
        np.testing.assert_allclose(merged[k], num / den, rtol=1e-4, atol=1e-6)


def test_fisher_with_equal_fishers_is_the_average():
    base, experts, _ = _linear(k=3)
    ones = [jax.tree.map(np.ones_like, base)] * 3
    merged = jmerge.merge(base, experts, "fisher", fishers=ones)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), merged, jmerge.merge(base, experts, "average"))


def test_bad_input():
    base, experts, xs = _linear()
    with pytest.raises(MergeInputError, match=re.escape("regmean needs grams=: one jmerge.learn.gram_matrices(...) per expert")):
        jmerge.merge(base, experts, "regmean")
    g = learn.gram_matrices(base, _apply, xs[0])
    with pytest.raises(MergeInputError, match=re.escape("regmean needs one Grams per expert: got 1 for 2 experts")):
        jmerge.merge(base, experts, "regmean", grams=[g])
    with pytest.raises(MergeInputError, match=re.escape("fisher needs one Fisher pytree per expert: got 1 for 2 experts")):
        jmerge.merge(base, experts, "fisher", fishers=[base])
    with pytest.raises(MergeInputError, match=re.escape(
            "fisher_diagonal's exact estimator needs classifier logits (batch, classes), got shape (1, 2, 4)")):
        learn.fisher_diagonal(base, lambda p, x: jnp.stack([_apply(p, x)] * 2, 1), xs[0])
    with pytest.raises(MergeInputError, match=re.escape("estimator must be 'exact' or 'batch', got 'sampled'")):
        learn.fisher_diagonal(base, _apply, xs[0], estimator="sampled")
    with pytest.raises(MergeInputError, match=re.escape("unlabeled must be a list with one input set per task: got 1 for 2 task vectors")):
        learn.regmean(base, jtree.task_vectors(base, experts), _apply, xs[:1])


def test_fisher_batch_estimator_on_positions_with_a_mask():
    _, experts, _ = _linear()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, 3, D_IN)).astype(np.float32)
    mask = rng.random((N, 3)) > 0.3
    f = learn.fisher_diagonal(experts[0], _apply, x, batch_size=5, estimator="batch", mask=mask)
    w, b = np.asarray(experts[0]["w"], np.float64), np.asarray(experts[0]["b"], np.float64)
    eye, fw, fb = np.eye(C), 0.0, 0.0
    for s in range(0, N, 5):
        gw, gb = np.zeros_like(w), np.zeros_like(b)
        for n in range(s, min(s + 5, N)):
            for t in range(3):
                z = x[n, t] @ w + b
                p = np.exp(z - z.max())
                p /= p.sum()
                dz = mask[n, t] * sum(np.sqrt(p[c]) * (eye[c] - p) for c in range(C))
                gw, gb = gw + np.outer(x[n, t], dz), gb + dz
        fw, fb = fw + gw ** 2, fb + gb ** 2
    np.testing.assert_allclose(f["w"], fw / N, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(f["b"], fb / N, rtol=1e-4, atol=1e-7)
    with pytest.raises(MergeInputError, match=re.escape("mask has shape (12, 2); the outputs need (12, 3)")):
        learn.fisher_diagonal(experts[0], _apply, x, estimator="batch", mask=mask[:, :2])
