"""SVD-based merges of weight matrices: TSV-M, Iso-C and Iso-CTS.

Every method works matrix by matrix on the leaves selected by ``svd_filter`` (a regex
searched in the parameter path; ``None``, the default, selects every leaf) that have a
matrix view: 2-D leaves as they are, and, with ``conv="matrix"`` (the default), conv kernels
(every leaf of 3 or more dimensions) reshaped to a matrix (below). All other leaves (biases,
norms, kernels with ``conv="average"``, leaves the filter leaves out) get the mean of the
task vectors, as in the papers' code. :func:`covers` says which leaves a merge puts through
the SVD rule; :func:`jmerge.coverage.of` counts them and :func:`jmerge.merge` logs the
fraction (and warns when under half the parameters). Embedding tables are 2-D too: exclude
them with e.g. ``svd_filter=r"^(?!.*embed)"`` (FusionBench's TSV-M also leaves out CLIP's
``text_projection``). The result is ``theta_0 + scale * Delta`` on every leaf.
SVDs run in float32 (``jnp.linalg.svd(full_matrices=False)``, recomputed by the QR-based
algorithm where divide and conquer returns NaN: :func:`thin_svd`), one per matrix, unrolled
in Python since the matrices differ in shape. Orthogonalisation is Procrustes: the
nearest matrix with orthonormal columns (rows) to ``X = P D Q^T`` is ``P Q^T``.

* ``tsv`` (TSV-M, Gargiulo et al., CVPR 2025, arXiv 2412.00081): keep the top
  ``k = floor(r/T)`` singular triplets of each ``tau_t`` (r = min(m, n), T tasks), stack
  ``U = [U_1,k ... U_T,k]``, ``S = diag(S_1,k ... S_T,k)``, ``V = [V_1,k ... V_T,k]``,
  orthogonalise ``U`` and ``V``, ``Delta = U_perp S V_perp^T``. A matrix with ``r < T``
  gets ``Delta = 0`` (k = 0, as in the reference code; coverage counts it as a fallback);
  exclude it with ``svd_filter`` to average it instead. A single expert gives ``Delta = tau`` (the expert itself at scale 1).
* ``iso_c`` (Iso-C, Marczak et al., ICML 2025, arXiv 2502.04959): ``sum_t tau_t = U S V^T``,
  ``Delta = mean(S) U V^T`` (the sum's singular spectrum flattened to its mean). A single
  expert gives ``tau`` with its singular values replaced by their mean.
* ``iso_cts`` (Iso-CTS, same paper): common space = top ``k`` left singular vectors of
  ``sum_t tau_t``, ``k = int(r * common_space_fraction)`` then adjusted so that
  ``s = round((r - k)/T)`` (at most ``floor(r/T)``) task-specific directions per task fill
  the rest (``k = r - sT``);
  each task's ``tau_t - U_k U_k^T tau_t`` contributes its top ``s`` triplets;
  ``Delta = mean(all kept singular values) U*_perp V*_perp^T``. A single expert gives the
  same result as ``iso_c``.

Layout: TSV-M and Iso-C are transpose-invariant. Iso-CTS projects onto the common *output*
space, the left singular vectors in torch layout (out, in); ``layout="flax"`` (default)
treats 2-D leaves as Flax kernels (in, out), where the output space is the right singular
vectors, and ``layout="torch"`` takes them as (out, in).

Conv kernels (the papers SVD only 2-D weights, papers.md §5.2; this view is jmerge's): a
kernel is the matrix of its im2col linear map, as spectral normalisation reshapes it
(Miyato et al., ICLR 2018, arXiv 1802.05957, §3: ``W`` of shape ``d_out x (d_in h w)``;
``torch.nn.utils.spectral_norm``'s ``weight.reshape(out, -1)``). In ``layout="flax"``
a kernel ``[kh, kw, in, out]`` is viewed as ``[kh*kw*in, out]`` (``reshape(-1, out)``,
input rows, output columns, like a Dense kernel); in ``layout="torch"`` ``[out, in, kh, kw]``
is viewed as ``[out, in*kh*kw]`` (``reshape(out, -1)``). The two views hold the same matrix up to
a permutation of the input axis, which none of the three methods sees (they are equivariant
to orthogonal maps of either side), so Flax and torch kernels merge alike. The same rule
applies to 1-D and 3-D convs; a grouped or depthwise kernel ``[kh, kw, in/groups, out]`` is
viewed as ``[kh*kw*in/groups, out]`` (its filters side by side, not the block-diagonal
operator). Other tensors of 3 or more dimensions (e.g. Flax ``DenseGeneral`` attention
kernels ``[embed, heads, head_dim]``) would get the same view: leave them out with
``svd_filter`` or ``conv="average"``.

LwPTV (``jmerge.merge(..., lwptv=...)``) passes ``task_mask``, one K-tuple of booleans per
leaf: a task whose layer is dropped is left out of that leaf's merge (SVD or mean), so the
leaf is merged from the tasks that keep it exactly as a merge of those tasks alone would be
(a zero matrix would take TSV-M slots and bring Iso-CTS arbitrary directions at full weight).
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp

from jmerge import tree as jtree
from jmerge import validate
from jmerge.methods.registry import register

LAYOUTS = ("flax", "torch")
CONV_RULES = ("matrix", "average")


def _check(num_experts, hp):
    if num_experts < 1:
        raise validate.MergeInputError(f"this method needs at least 1 expert, got {num_experts}")
    pattern = hp["svd_filter"]
    if pattern is not None:
        if not isinstance(pattern, str):
            raise validate.MergeInputError(f"svd_filter must be a regex string or None, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise validate.MergeInputError(f"svd_filter {pattern!r} is not a valid regex: {err}") from None
    if hp["layout"] not in LAYOUTS:
        raise validate.MergeInputError(f"layout must be 'flax' (kernels (in, out)) or 'torch' ((out, in)), got {hp['layout']!r}")
    if hp["conv"] not in CONV_RULES:
        raise validate.MergeInputError(
            f"conv must be 'matrix' (SVD-merge conv kernels as matrices) or 'average' (their task-vector mean), "
            f"got {hp['conv']!r}"
        )


def _iso_cts_check(num_experts, hp):
    _check(num_experts, hp)
    validate.check_fraction("common_space_fraction", hp["common_space_fraction"], low_open=False)


# full float32 products on every backend (TPUs default to bf16 passes for float32 matmuls)
_mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _gesdd(x):
    """Thin SVD by LAPACK's divide and conquer on CPU (``jnp.linalg.svd``'s default algorithm)."""
    return jnp.linalg.svd(x, full_matrices=False)


def thin_svd(x):
    """Thin SVD ``x = U S V^T`` that does not return NaN where LAPACK's divide and conquer (sgesdd)
    fails to converge: on an ill-conditioned float32 matrix it silently gives NaN (seen on Iso-CTS's
    stacked bases of a MiniLM attention kernel, condition number about 3e3, on Suite T v2), so a
    non-finite result is recomputed by the QR-based algorithm (gesvd), which converged there."""
    u, s, vt = _gesdd(x)
    finite = jnp.isfinite(u).all() & jnp.isfinite(s).all() & jnp.isfinite(vt).all()
    qr = lambda: tuple(jax.lax.linalg.svd(x, full_matrices=False, algorithm=jax.lax.linalg.SvdAlgorithm.QR))  # noqa: E731
    return jax.lax.cond(finite, lambda: (u, s, vt), qr)


def _orthogonalise(x):
    """Procrustes: ``P Q^T`` for ``x = P D Q^T``, the nearest matrix with orthonormal columns (or rows)."""
    p, _, qt = thin_svd(x)
    return _mm(p, qt)


def _mean(ts):
    return sum(ts[1:], ts[0]) / len(ts)


def matrix_shape(shape, layout: str, conv: str) -> tuple[int, int] | None:
    """The matrix a leaf of ``shape`` is merged as (module docstring), or ``None`` (task-vector mean):
    2-D as is; with ``conv="matrix"`` a kernel ``[..., in, out]`` (flax) as ``[prod(shape[:-1]), out]``,
    ``[out, in, ...]`` (torch) as ``[out, prod(shape[1:])]``."""
    shape = tuple(shape)
    if len(shape) == 2:
        return shape
    if len(shape) < 3 or conv != "matrix":
        return None
    return (shape[0], math.prod(shape[1:])) if layout == "torch" else (math.prod(shape[:-1]), shape[-1])


def covers(path: str, shape, hp, num_experts=None) -> bool:
    """Whether the SVD rule merges the leaf at ``path`` (``Method.covers``); other leaves get the task-vector mean."""
    pattern = hp["svd_filter"]
    return matrix_shape(shape, hp["layout"], hp["conv"]) is not None and (pattern is None or re.search(pattern, path) is not None)


def _tsv_covers(path: str, shape, hp, num_experts=None) -> bool:
    """:func:`covers`, less the matrices with ``r < T`` that TSV-M leaves unchanged (``Delta = 0``)."""
    if not covers(path, shape, hp):
        return False
    return num_experts is None or min(matrix_shape(shape, hp["layout"], hp["conv"])) >= num_experts


def _per_matrix(tvs, hp, merge_matrix, task_mask):
    """``merge_matrix(tuple of matrices)`` on the leaves :func:`covers` selects (in their matrix
    view), the task-vector mean elsewhere; with ``task_mask``, over each leaf's kept tasks only."""
    per_leaf, treedef = jtree.transpose_leaves(tvs)
    if task_mask is not None and (len(task_mask) != len(per_leaf) or any(len(m) != len(tvs) for m in task_mask)):
        raise validate.MergeInputError(
            f"task_mask must hold one {len(tvs)}-tuple of booleans per parameter ({len(per_leaf)}), got {len(task_mask)} entries"
        )
    out = []
    for i, (path, ts) in enumerate(zip(jtree.paths(tvs[0]), per_leaf)):
        kept = ts if task_mask is None else tuple(x for x, keep in zip(ts, task_mask[i]) if keep)
        if not kept:  # no task keeps it (LwPTV puts the base back there)
            out.append(jnp.zeros_like(ts[0]))
        elif covers(path, ts[0].shape, hp):
            view = matrix_shape(ts[0].shape, hp["layout"], hp["conv"])
            out.append(merge_matrix(tuple(x.reshape(view) for x in kept)).reshape(ts[0].shape))
        else:
            out.append(_mean(kept))
    return jax.tree.unflatten(treedef, out)


def _task_svds(ts, k):
    """Top-``k`` triplets of each matrix, side by side: ``U (m, Tk)``, ``S (Tk,)``, ``V^T (Tk, n)``.

    One SVD per matrix on purpose: batched ``jnp.linalg.svd`` calls (jaxlib's
    ``ParallelBatchMap``) running concurrently in one jit deadlocked XLA:CPU's intra-op pool
    on jaxlib 0.10.2 (40 of them on a 2-core machine; gdb showed every pool thread blocked
    in ``ParallelBatchMap``'s counter).
    """
    us, ss, vts = zip(*(thin_svd(x) for x in ts))
    return (
        jnp.concatenate([u[:, :k] for u in us], axis=1),
        jnp.concatenate([s[:k] for s in ss]),
        jnp.concatenate([vt[:k] for vt in vts], axis=0),
    )


def _tsv_matrix(ts):
    k = min(ts[0].shape) // len(ts)
    if k == 0:
        return jnp.zeros_like(ts[0])
    u, s, vt = _task_svds(ts, k)
    return _mm(_orthogonalise(u) * s, _orthogonalise(vt))


def _iso_c_matrix(ts):
    u, s, vt = thin_svd(sum(ts[1:], ts[0]))
    return jnp.mean(s) * _mm(u, vt)


def iso_cts_sizes(r: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """``(k, s)``: common-space size and directions per task, ``k + s T = r`` (s >= 0, k >= 0)."""
    k = int(r * fraction)
    s = min(round((r - k) / num_tasks), r // num_tasks)
    return r - s * num_tasks, s


def _iso_cts_matrix(ts, fraction):
    """Iso-CTS on matrices in torch layout (out, in): the common space is the left singular space."""
    k, s = iso_cts_sizes(min(ts[0].shape), len(ts), fraction)
    u, sv, vt = thin_svd(sum(ts[1:], ts[0]))
    us, svs, vts = [u[:, :k]], [sv[:k]], [vt[:k]]
    if s > 0:
        residuals = [x - _mm(us[0], _mm(us[0].T, x)) for x in ts]  # tau_t - U_k U_k^T tau_t
        for parts, part in zip((us, svs, vts), _task_svds(residuals, s)):
            parts.append(part)
    u_star = _orthogonalise(jnp.concatenate(us, axis=1))
    vt_star = _orthogonalise(jnp.concatenate(vts, axis=0))
    return jnp.mean(jnp.concatenate(svs)) * _mm(u_star, vt_star)


_STATIC = ("svd_filter", "layout", "conv")


@register("tsv", static=_STATIC, check=_check, covers=_tsv_covers, reference="Gargiulo et al., 2025, arXiv 2412.00081",
          path_params=("svd_filter",))
def tsv(base, tvs, *, key=None, scale=1.0, svd_filter=None, layout="flax", conv="matrix", task_mask=None):
    """TSV-M: per matrix, each task's top r/T singular triplets, orthogonalised, summed.

    Per matrix (r = min(m, n), T tasks, k = ⌊r/T⌋): ``U = [U_1,k … U_T,k]``,
    ``S = diag(S_1,k … S_T,k)``, ``V = [V_1,k … V_T,k]`` from each ``τ_t = U_t S_t V_tᵀ``;
    ``Δ = U⊥ S V⊥ᵀ`` with ``X⊥ = P Qᵀ`` for ``X = P D Qᵀ`` (Procrustes); ``θ = θ0 + α Δ``.
    Leaves without a matrix view, or left out by ``svd_filter``, get the task vectors' mean.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, merged matrix by matrix.
      key: unused (the SVDs are deterministic).
      scale: α; 1.0 (the paper finds that α needs no tuning).
      svd_filter: a regex searched in each parameter path: the leaves to SVD-merge; None: all.
      layout: ``"flax"``: matrices (in, out), kernels [..., in, out]; ``"torch"``: (out, in), [out, in, ...].
      conv: ``"matrix"``: kernels of 3 or more dimensions merged as their im2col matrix;
        ``"average"``: their task-vector mean, as the paper.
      task_mask: LwPTV's tasks kept per leaf (``jmerge.merge(lwptv=...)`` passes it); None: every task.

    Returns:
      The merged parameters: the base's structure, shapes and dtypes.

    Warning:
      The paper SVDs only 2-D weights and averages the rest. With ``conv="matrix"`` jmerge also
      merges conv kernels as the matrix of their im2col map (Flax ``[kh, kw, in, out]`` as
      ``[kh·kw·in, out]``, torch ``[out, in, kh, kw]`` as ``[out, in·kh·kw]``), so conv nets merge
      otherwise than in the paper. A matrix with r < T gets Δ = 0 (k = 0, as the reference
      code). Embeddings are 2-D too; FusionBench leaves out CLIP's ``text_projection``.

    References:
      Gargiulo et al., 2025, "Task Singular Vectors: reducing task interference in model merging",
      CVPR 2025, arXiv 2412.00081; the conv view: Miyato et al., 2018, arXiv 1802.05957.
    """
    hp = dict(svd_filter=svd_filter, layout=layout, conv=conv)
    return jtree.apply(base, _per_matrix(tvs, hp, _tsv_matrix, task_mask), scale)


@register("iso_c", static=_STATIC, check=_check, covers=covers, reference="Marczak et al., 2025, arXiv 2502.04959",
          path_params=("svd_filter",))
def iso_c(base, tvs, *, key=None, scale=1.0, svd_filter=None, layout="flax", conv="matrix", task_mask=None):
    """Iso-C: the summed task matrix with its singular values flattened to their mean.

    Per matrix, ``Σ_t τ_t = U S Vᵀ`` and ``Δ = mean(S) U Vᵀ``; ``θ = θ0 + α Δ``. Leaves without
    a matrix view, or outside ``svd_filter``, get the mean of the task vectors.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, summed per matrix.
      key: unused (one deterministic SVD per matrix).
      scale: α on Δ; 1.0 (FusionBench; the paper picks α on validation data).
      svd_filter: a regex over parameter paths selecting the SVD-merged leaves; None: every one.
      layout: ``"flax"`` (default) or ``"torch"``: how a conv kernel is viewed as a matrix (Iso-C
        itself is transpose-invariant).
      conv: ``"matrix"`` (default): conv kernels by their im2col matrix; ``"average"``: their mean.
      task_mask: per leaf, which tasks enter it (LwPTV); None: all of them.

    Returns:
      The merged parameters, shaped and typed like ``base``.

    Warning:
      The paper flattens the spectrum of 2-D weights only; ``conv="matrix"`` (jmerge's default) also
      flattens that of each conv kernel's im2col matrix, so conv nets differ from the paper's
      merge unless ``conv="average"``.

    References:
      Marczak et al., 2025, "No task left behind: isotropic model merging with common and
      task-specific subspaces", ICML 2025, arXiv 2502.04959.
    """
    hp = dict(svd_filter=svd_filter, layout=layout, conv=conv)
    return jtree.apply(base, _per_matrix(tvs, hp, _iso_c_matrix, task_mask), scale)


@register("iso_cts", static=(*_STATIC, "common_space_fraction"), check=_iso_cts_check, covers=covers,
          reference="Marczak et al., 2025, arXiv 2502.04959", path_params=("svd_filter",))
def iso_cts(
    base, tvs, *, key=None, scale=1.0, common_space_fraction=0.8, layout="flax", svd_filter=None, conv="matrix", task_mask=None
):
    """Iso-CTS: the sum's top common space plus task-specific directions, with a flat spectrum.

    Per matrix, ``k`` top left singular vectors ``U_k`` of ``Σ_t τ_t`` (``k ≈ r ·
    common_space_fraction``, adjusted so ``k + sT = r``), plus each task's top ``s`` triplets of
    ``τ_t - U_k U_kᵀ τ_t``; ``Δ = mean(kept singular values) U*⊥ V*⊥ᵀ``, ``θ = θ0 + α Δ``.

    Args:
      base: the pre-trained parameters θ0.
      tvs: the experts' float32 task vectors τ_t, one matrix per leaf.
      key: unused (Iso-CTS is deterministic).
      scale: α applied to Δ; 1.0.
      common_space_fraction: the share of the rank r given to the common space; 0.8 (the official code's).
      layout: ``"flax"``: 2-D leaves are kernels (in, out), the output space is on the right;
        ``"torch"``: (out, in). The common space is the *output* space.
      svd_filter: the regex choosing which paths go through the SVD rule; None: any with a matrix view.
      conv: ``"matrix"``: conv kernels viewed as im2col matrices; ``"average"``: averaged instead.
      task_mask: LwPTV's per-leaf tuple of kept tasks; None: all tasks enter every leaf.

    Returns:
      The merged parameters with the base's structure, shapes and dtypes.

    Warning:
      As :func:`iso_c`: the paper merges 2-D weights only, jmerge's default ``conv="matrix"`` also
      the im2col matrices of conv kernels. A wrong ``layout`` projects on the input space.

    References:
      Marczak et al., 2025, ICML 2025, arXiv 2502.04959 (Iso-CTS, with Iso-C).
    """
    if layout == "torch":
        merge_matrix = lambda ts: _iso_cts_matrix(ts, common_space_fraction)  # noqa: E731
    else:
        merge_matrix = lambda ts: _iso_cts_matrix(tuple(x.T for x in ts), common_space_fraction).T  # noqa: E731
    hp = dict(svd_filter=svd_filter, layout=layout, conv=conv)
    return jtree.apply(base, _per_matrix(tvs, hp, merge_matrix, task_mask), scale)
