"""TSV-M, Iso-C and Iso-CTS against plain-numpy (float64) references of the papers' formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmerge
from jmerge import MergeInputError
from jmerge.coverage import CoverageWarning
from jmerge.methods.svd import iso_cts_sizes
from jmerge import tree as jtree
from helpers import as_np, assert_matches, method_models, nest, np_task_vectors, transpose_matrices

DTYPES = [jnp.float32, jnp.bfloat16]


# ----------------------------------------------------------------------------- numpy references
def np_svd(x):
    return np.linalg.svd(x, full_matrices=False)


def np_procrustes(x):
    p, _, qt = np_svd(x)
    return p @ qt


def np_tsv(ts):
    k = min(ts[0].shape) // len(ts)
    if k == 0:
        return np.zeros_like(ts[0])
    parts = [np_svd(x) for x in ts]
    u = np_procrustes(np.hstack([u[:, :k] for u, _, _ in parts]))
    s = np.concatenate([s[:k] for _, s, _ in parts])
    vt = np_procrustes(np.vstack([vt[:k] for _, _, vt in parts]))
    return u @ np.diag(s) @ vt


def np_iso_c(ts):
    u, s, vt = np_svd(sum(ts))
    return s.mean() * u @ vt


def np_iso_cts_torch(ts, fraction):
    """Iso-CTS on (out, in) matrices: project out the sum's top-k *left* singular space."""
    r, n_tasks = min(ts[0].shape), len(ts)
    k = int(r * fraction)
    per_task = round((r - k) / n_tasks)
    if per_task * n_tasks > r:
        per_task = r // n_tasks
    k = r - per_task * n_tasks
    u, s, vt = np_svd(sum(ts))
    us, ss, vts = [u[:, :k]], [s[:k]], [vt[:k]]
    for x in ts:
        ut, st, vtt = np_svd(x - u[:, :k] @ u[:, :k].T @ x)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vts.append(vtt[:per_task])
    return np.concatenate(ss).mean() * np_procrustes(np.hstack(us)) @ np_procrustes(np.vstack(vts))


def np_iso_cts_flax(ts, fraction):
    return np_iso_cts_torch([x.T for x in ts], fraction).T


def np_matrix(x, layout):
    """A conv kernel's matrix view: Flax ``[kh, kw, in, out] -> [kh*kw*in, out]``, torch
    ``[out, in, kh, kw] -> [out, in*kh*kw]`` (2-D leaves unchanged)."""
    return x.reshape(-1, x.shape[-1]) if layout == "flax" else x.reshape(x.shape[0], -1)


def np_merge(base, experts, matrix_fn, scale=1.0, selected=lambda path: True, conv="matrix", layout="flax"):
    """``theta_0 + scale * Delta``: ``matrix_fn`` on selected 2-D leaves and (``conv="matrix"``)
    on the matrix views of selected >2-D kernels, the task-vector mean elsewhere."""
    b, taus = np_task_vectors(base, experts)
    out = {}
    for p in b:
        ts = [tau[p] for tau in taus]
        if selected(p) and (ts[0].ndim == 2 or (ts[0].ndim > 2 and conv == "matrix")):
            delta = matrix_fn([np_matrix(x, layout) for x in ts]).reshape(ts[0].shape)
        else:
            delta = np.mean(ts, axis=0)
        out[p] = b[p] + scale * delta
    return out


REFERENCES = {
    "tsv": np_tsv,
    "iso_c": np_iso_c,
    "iso_cts": lambda ts: np_iso_cts_flax(ts, 0.8),
}


# ----------------------------------------------------------------------------- agreement with numpy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_matches_numpy(method, dtype):
    base, experts = method_models(0, 3, dtype)
    out = jmerge.merge(base, experts, method)
    assert_matches(out, np_merge(base, experts, REFERENCES[method]), dtype)


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_an_svd_that_fails_to_converge_is_recomputed_by_the_qr_algorithm(method, monkeypatch):
    # LAPACK's sgesdd returns NaN where it does not converge (an Iso-CTS merge on Suite T v2 was NaN
    # in one attention kernel): every matrix's first SVD is made to fail; the merge must still
    # match the numpy reference, through the QR-based algorithm.
    from jmerge.methods import svd

    calls = []

    def failing(x):
        calls.append(x.shape)
        u, s, vt = jnp.linalg.svd(x, full_matrices=False)
        return jnp.full_like(u, jnp.nan), s, vt

    base, experts = method_models(0, 3)
    jmerge.clear_caches()
    monkeypatch.setattr(svd, "_gesdd", failing)
    try:
        out = jmerge.merge(base, experts, method)
    finally:
        jmerge.clear_caches()
    assert calls, "the merge did not go through _gesdd"
    assert_matches(out, np_merge(base, experts, REFERENCES[method]), jnp.float32)


@pytest.mark.parametrize("fraction", [0.5, 0.0, 1.0])
def test_iso_cts_fraction_and_scale_match_numpy(fraction):
    base, experts = method_models(1, 3)
    out = jmerge.merge(base, experts, "iso_cts", common_space_fraction=fraction, scale=1.5)
    assert_matches(out, np_merge(base, experts, lambda ts: np_iso_cts_flax(ts, fraction), scale=1.5), jnp.float32)


def test_tsv_scale_and_svd_filter_match_numpy():
    base, experts = method_models(2, 4)
    # e.g. leave embeddings (or here the head) out of the SVD: they get the mean task vector
    out = jmerge.merge(base, experts, "tsv", scale=0.6, svd_filter=r"^(?!head/)")
    want = np_merge(base, experts, np_tsv, scale=0.6, selected=lambda p: not p.startswith("head/"))
    assert_matches(out, want, jnp.float32)
    head_mean = np_merge(base, experts, np_tsv, scale=0.6, selected=lambda p: False)["head/kernel"]
    np.testing.assert_allclose(as_np(out)["head/kernel"], head_mean, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- conv kernels
CONV_SHAPES = {  # MobileNetV2-like: no 2-D leaf (HWIO kernels, depthwise [3, 3, 1, C], 1x1 pointwise)
    "stem/kernel": (3, 3, 3, 8),
    "dw/kernel": (3, 3, 1, 8),
    "pw/kernel": (1, 1, 8, 12),
    "pw/bias": (12,),
    "norm/scale": (8,),
}


def conv_models(seed, num_experts, layout="flax"):
    """``(base, experts)`` with only conv kernels and 1-D leaves; ``layout="torch"`` stores the
    same kernels as ``[out, in, kh, kw]``."""
    rng = np.random.default_rng(seed)
    base = {p: rng.normal(size=s) for p, s in CONV_SHAPES.items()}
    experts = [{p: b + 0.3 * rng.normal(size=b.shape) for p, b in base.items()} for _ in range(num_experts)]
    to_torch = lambda x: x.transpose(3, 2, 0, 1) if x.ndim == 4 else x  # noqa: E731
    cast = lambda d: nest({p: jnp.asarray(to_torch(x) if layout == "torch" else x, jnp.float32) for p, x in d.items()})  # noqa: E731
    return cast(base), [cast(e) for e in experts]


TORCH_REFERENCES = {"tsv": np_tsv, "iso_c": np_iso_c, "iso_cts": lambda ts: np_iso_cts_torch(ts, 0.8)}


@pytest.mark.parametrize("layout", ["flax", "torch"])
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_conv_kernels_match_numpy_on_their_matrix_view(method, layout):
    base, experts = conv_models(20, 3, layout)
    out = jmerge.merge(base, experts, method, layout=layout)
    refs = REFERENCES if layout == "flax" else TORCH_REFERENCES
    assert_matches(out, np_merge(base, experts, refs[method], layout=layout), jnp.float32)
    # the SVD rule, not the mean: the kernels differ from weight averaging
    mean = np_merge(base, experts, refs[method], conv="average")
    assert np.max(np.abs(as_np(out)["pw/kernel"] - mean["pw/kernel"])) > 1e-2


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_conv_average_is_the_task_vector_mean(method):
    base, experts = conv_models(21, 3)
    with pytest.warns(CoverageWarning, match=rf"^{method} merges only 0\.00 % of the parameters by its own rule"):
        out = jmerge.merge(base, experts, method, conv="average", scale=0.7)
    assert_matches(out, np_merge(base, experts, REFERENCES[method], scale=0.7, conv="average"), jnp.float32)


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_torch_conv_kernels_merge_as_the_flax_ones(method):
    """The two views differ by a permutation of the input rows, which the methods commute with."""
    flax_base, flax_experts = conv_models(22, 3)
    torch_base, torch_experts = conv_models(22, 3, "torch")
    flax_out = as_np(jmerge.merge(flax_base, flax_experts, method))
    torch_out = as_np(jmerge.merge(torch_base, torch_experts, method, layout="torch"))
    for p, x in flax_out.items():
        back = torch_out[p].transpose(2, 3, 1, 0) if x.ndim == 4 else torch_out[p]
        np.testing.assert_allclose(back, x, rtol=1e-5, atol=5e-5, err_msg=p)


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_pointwise_conv_is_its_dense_matrix(method):
    """A 1x1 kernel ``[1, 1, in, out]`` merges exactly as the Dense kernel ``[in, out]``."""
    base, experts = method_models(23, 3)
    as_conv = lambda t: {**t, "block": {**t["block"], "dense": {**t["block"]["dense"], "kernel": t["block"]["dense"]["kernel"][None, None]}}}  # noqa: E731
    dense = jmerge.merge(base, experts, method)["block"]["dense"]["kernel"]
    conv = jmerge.merge(as_conv(base), [as_conv(e) for e in experts], method)["block"]["dense"]["kernel"]
    np.testing.assert_array_equal(np.asarray(conv)[0, 0], np.asarray(dense))


# ----------------------------------------------------------------------------- LwPTV: dropped tasks left out
LWPTV_MASK = np.array(  # layers block, conv, head, norm; only some tasks drop block, conv and head
    [
        [True, False, True, True],
        [False, True, True, True],
        [True, False, False, True],
    ]
)


@pytest.mark.parametrize("method", ["tsv", "iso_cts", "iso_c"])
def test_lwptv_merges_each_layer_over_the_tasks_that_keep_it(method):
    """A task that drops a layer is left out of that layer's merge: each layer equals the method
    run on the kept tasks alone (and a numpy reference of it), not on zero matrices for the others."""
    from jmerge.lwptv import LayerMask, group

    base, experts = method_models(24, 3)
    layers = r"^([^/]+)/"
    grouping = group(base, layers)
    assert grouping.names == ("block", "conv", "head", "norm")
    out = as_np(jmerge.merge(base, experts, method, lwptv=LayerMask(LWPTV_MASK, grouping.names, layers=layers)))
    zeros = as_np(jmerge.merge(base, [  # the old composition: dropped layers as zero task vectors
        jtree.unflatten(base, {p: (x if LWPTV_MASK[t, grouping.names.index(p.split("/")[0])] else jtree.flatten(base)[p])
                               for p, x in jtree.flatten(e).items()}) for t, e in enumerate(experts)], method))
    for layer, keep in zip(grouping.names, LWPTV_MASK.T):
        kept = [e for e, k in zip(experts, keep) if k]
        direct = as_np(jmerge.merge(base, kept, method))
        numpy_ref = np_merge(base, kept, REFERENCES[method])
        for p in out:
            if p.startswith(layer + "/"):
                np.testing.assert_allclose(out[p], direct[p], rtol=1e-5, atol=2e-5, err_msg=p)
                np.testing.assert_allclose(out[p], numpy_ref[p], rtol=1e-5, atol=2e-5, err_msg=p)
    if method != "iso_c":  # Iso-C sums the task matrices: zeros change nothing there
        assert np.max(np.abs(out["block/dense/kernel"] - zeros["block/dense/kernel"])) > 1e-2


def test_lwptv_layer_dropped_by_all_is_the_base():
    from jmerge.lwptv import LayerMask

    base, experts = method_models(25, 3)
    mask = LWPTV_MASK.copy()
    mask[:, 2] = False  # head
    out = jmerge.merge(base, experts, "iso_cts", lwptv=LayerMask(mask, ("block", "conv", "head", "norm"), layers=r"^([^/]+)/"))
    np.testing.assert_array_equal(np.asarray(out["head"]["kernel"]), np.asarray(base["head"]["kernel"]))


@pytest.mark.parametrize(
    "r, tasks, fraction, want",
    [
        (16, 3, 0.8, (13, 1)),
        (8, 3, 0.8, (5, 1)),
        (768, 8, 0.8, (616, 19)),  # ViT-B: int(614.4) = 614, round(154/8) = 19 per task
        (4, 8, 0.8, (4, 0)),
        (5, 3, 0.0, (2, 1)),  # round(5/3) = 2 would need 6 > r directions: capped at r // T
        (10, 2, 1.0, (10, 0)),
    ],
)
def test_iso_cts_sizes(r, tasks, fraction, want):
    k, s = iso_cts_sizes(r, tasks, fraction)
    assert (k, s) == want
    assert k + s * tasks == r and k >= 0 and s >= 0


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_expert(dtype):
    """TSV-M of one expert keeps all r components: the expert itself. Iso-C flattens the
    expert's singular spectrum to its mean; Iso-CTS of one expert gives the same as Iso-C
    (the common and task-specific spaces together are all of the expert's singular vectors)."""
    base, experts = method_models(3, 1, dtype)
    assert_matches(jmerge.merge(base, experts, "tsv"), as_np(experts[0]), dtype)
    iso = np_merge(base, experts, np_iso_c)
    out = jmerge.merge(base, experts, "iso_c")
    assert_matches(out, iso, dtype)
    assert_matches(jmerge.merge(base, experts, "iso_cts"), iso, dtype)
    if dtype == jnp.float32:
        delta = as_np(out)["block/dense/kernel"] - as_np(base)["block/dense/kernel"]
        s = np.linalg.svd(delta, compute_uv=False)
        np.testing.assert_allclose(s, s.mean(), rtol=1e-4)


def test_tsv_of_orthogonal_low_rank_task_matrices_is_their_sum():
    """Task matrices of rank <= k = floor(r/T) in mutually orthogonal subspaces: nothing to
    truncate or orthogonalise. (With rank < k the extra, arbitrary null directions of one task
    overlap the others' and the Procrustes step rotates everything: TSV-M is not the sum then.)"""
    rng = np.random.default_rng(4)
    base, _ = method_models(4, 3)
    b = as_np(base)
    flat_experts = [dict(b) for _ in range(3)]
    for path in ("block/dense/kernel", "block/out/kernel", "head/kernel"):
        m, n = b[path].shape
        k = min(m, n) // 3
        u, _ = np.linalg.qr(rng.normal(size=(m, 3 * k)))
        v, _ = np.linalg.qr(rng.normal(size=(n, 3 * k)))
        sigma = np.linspace(2.0, 0.5, 3 * k)
        for t in range(3):
            cols = slice(t * k, (t + 1) * k)
            flat_experts[t][path] = b[path] + u[:, cols] @ np.diag(sigma[cols]) @ v[:, cols].T
    experts = [jmerge.tree.unflatten(base, {p: jnp.asarray(x, jnp.float32) for p, x in e.items()}) for e in flat_experts]
    out = as_np(jmerge.merge(base, experts, "tsv"))
    _, taus = np_task_vectors(base, experts)
    for path in ("block/dense/kernel", "block/out/kernel", "head/kernel"):
        np.testing.assert_allclose(out[path], b[path] + sum(t[path] for t in taus), rtol=1e-5, atol=2e-5)


def test_tsv_matrix_of_rank_below_task_count_is_left_unchanged():
    """k = floor(r/T) = 0: the reference code's zero update; svd_filter can average it instead."""
    rng = np.random.default_rng(5)
    base = {"w": jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)}
    experts = [{"w": base["w"] + jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)} for _ in range(3)]
    with pytest.warns(CoverageWarning, match=r"^tsv merges only 0\.00 % of the parameters by its own rule"):
        np.testing.assert_array_equal(jmerge.merge(base, experts, "tsv")["w"], base["w"])
    assert jmerge.coverage.from_shapes("tsv", {"w": (16, 2)}, num_experts=2).fraction == 1.0  # r = T: k = 1
    with pytest.warns(CoverageWarning, match=r"^tsv merges only 0\.00 % of the parameters by its own rule"):
        averaged = jmerge.merge(base, experts, "tsv", svd_filter="^$")
    assert_matches(averaged, np_merge(base, experts, np_tsv, selected=lambda p: False), jnp.float32)


# ----------------------------------------------------------------------------- layout
def test_iso_cts_torch_layout_is_the_transpose_of_flax_layout():
    base, experts = method_models(6, 3)  # (conv kernels in torch layout: test_torch_conv_kernels_merge_as_the_flax_ones)
    flax_out = jmerge.merge(base, experts, "iso_cts", conv="average")
    torch_out = jmerge.merge(transpose_matrices(base), [transpose_matrices(e) for e in experts], "iso_cts", layout="torch",
                             conv="average")
    np.testing.assert_equal(jax.device_get(transpose_matrices(torch_out)), jax.device_get(flax_out))
    # and the layout matters: the projection picks the output side of the matrix
    wrong = as_np(jmerge.merge(base, experts, "iso_cts", layout="torch", conv="average"))
    assert np.max(np.abs(wrong["block/dense/kernel"] - as_np(flax_out)["block/dense/kernel"])) > 1e-3


@pytest.mark.parametrize("method", ["tsv", "iso_c"])
def test_tsv_and_iso_c_are_transpose_invariant(method):
    base, experts = method_models(7, 3)
    out = as_np(jmerge.merge(base, experts, method))
    out_t = as_np(transpose_matrices(jmerge.merge(transpose_matrices(base), [transpose_matrices(e) for e in experts], method)))
    for p in out:
        # float32 SVDs of A and A^T take different LAPACK paths: agreement to ~1e-5 of entries of size ~1.
        np.testing.assert_allclose(out_t[p], out[p], rtol=1e-5, atol=5e-5, err_msg=p)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "method, hp, match",
    [
        ("iso_cts", {"layout": "jax"}, r"layout must be 'flax' \(kernels \(in, out\)\) or 'torch' \(\(out, in\)\), got 'jax'"),
        ("tsv", {"layout": "hwio"}, r"layout must be 'flax' .*got 'hwio'"),
        ("iso_c", {"conv": "svd"}, r"conv must be 'matrix' \(SVD-merge conv kernels as matrices\) or 'average' .*got 'svd'"),
        ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
        ("iso_cts", {"common_space_fraction": -0.1}, "common_space_fraction"),
        ("tsv", {"svd_filter": "(kernel"}, "not a valid regex"),
        ("iso_c", {"svd_filter": 3}, "regex string"),
        ("tsv", {"rank": 4}, "no hyper-parameter 'rank'"),
    ],
)
def test_bad_input(method, hp, match):
    base, experts = method_models(8, 2)
    with pytest.raises(MergeInputError, match=match):
        jmerge.merge(base, experts, method, **hp)
