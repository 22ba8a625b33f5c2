"""SVD-based merges of weight matrices: TSV-M, Iso-C and Iso-CTS.

Every method works matrix by matrix on the 2-D leaves selected by ``svd_filter`` (a regex
searched in the parameter path; ``None``, the default, selects every 2-D leaf). All other
leaves (biases, norms, >2-D tensors, 2-D leaves the filter leaves out) get the mean of the
task vectors, as in the papers' code. Embedding tables are 2-D too: exclude them with e.g.
``svd_filter=r"^(?!.*embed)"`` (FusionBench's TSV-M also leaves out CLIP's
``text_projection``). The result is ``theta_0 + scale * Delta`` on every leaf.
SVDs run in float32 (``jnp.linalg.svd(full_matrices=False)``), one per matrix, unrolled
in Python since the matrices differ in shape. Orthogonalisation is Procrustes: the
nearest matrix with orthonormal columns (rows) to ``X = P D Q^T`` is ``P Q^T``.

* ``tsv`` (TSV-M, Gargiulo et al., CVPR 2025, arXiv 2412.00081): keep the top
  ``k = floor(r/T)`` singular triplets of each ``tau_t`` (r = min(m, n), T tasks), stack
  ``U = [U_1,k ... U_T,k]``, ``S = diag(S_1,k ... S_T,k)``, ``V = [V_1,k ... V_T,k]``,
  orthogonalise ``U`` and ``V``, ``Delta = U_perp S V_perp^T``. A matrix with ``r < T``
  gets ``Delta = 0`` (k = 0, as in the reference code); exclude it with ``svd_filter`` to
  average it instead. A single expert gives ``Delta = tau`` (the expert itself at scale 1).
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
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

from jmerge import tree as jtree
from jmerge import validate
from jmerge.methods.registry import register


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


def _iso_cts_check(num_experts, hp):
    _check(num_experts, hp)
    validate.check_fraction("common_space_fraction", hp["common_space_fraction"], low_open=False)
    if hp["layout"] not in ("flax", "torch"):
        raise validate.MergeInputError(f"layout must be 'flax' (kernels (in, out)) or 'torch' ((out, in)), got {hp['layout']!r}")


# full float32 products on every backend (TPUs default to bf16 passes for float32 matmuls)
_mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _svd(x):
    return jnp.linalg.svd(x, full_matrices=False)


def _orthogonalise(x):
    """Procrustes: ``P Q^T`` for ``x = P D Q^T``, the nearest matrix with orthonormal columns (or rows)."""
    p, _, qt = _svd(x)
    return _mm(p, qt)


def _mean(ts):
    return sum(ts[1:], ts[0]) / len(ts)


def _per_matrix(tvs, svd_filter, merge_matrix):
    """``merge_matrix(tuple of T matrices)`` on selected 2-D leaves, the task-vector mean elsewhere."""
    pattern = None if svd_filter is None else re.compile(svd_filter)

    def leaf(path, ts):
        if ts[0].ndim == 2 and (pattern is None or pattern.search(path)):
            return merge_matrix(ts)
        return _mean(ts)

    return jtree.map_tasks(leaf, tvs)


def _task_svds(ts, k):
    """Top-``k`` triplets of each matrix, side by side: ``U (m, Tk)``, ``S (Tk,)``, ``V^T (Tk, n)``.

    One SVD per matrix on purpose: batched ``jnp.linalg.svd`` calls (jaxlib's
    ``ParallelBatchMap``) running concurrently in one jit deadlocked XLA:CPU's intra-op pool
    on jaxlib 0.10.2 (40 of them on a 2-core machine; gdb showed every pool thread blocked
    in ``ParallelBatchMap``'s counter).
    """
    us, ss, vts = zip(*(_svd(x) for x in ts))
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
    u, s, vt = _svd(sum(ts[1:], ts[0]))
    return jnp.mean(s) * _mm(u, vt)


def iso_cts_sizes(r: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """``(k, s)``: common-space size and directions per task, ``k + s T = r`` (s >= 0, k >= 0)."""
    k = int(r * fraction)
    s = min(round((r - k) / num_tasks), r // num_tasks)
    return r - s * num_tasks, s


def _iso_cts_matrix(ts, fraction):
    """Iso-CTS on matrices in torch layout (out, in): the common space is the left singular space."""
    k, s = iso_cts_sizes(min(ts[0].shape), len(ts), fraction)
    u, sv, vt = _svd(sum(ts[1:], ts[0]))
    us, svs, vts = [u[:, :k]], [sv[:k]], [vt[:k]]
    if s > 0:
        residuals = [x - _mm(us[0], _mm(us[0].T, x)) for x in ts]  # tau_t - U_k U_k^T tau_t
        for parts, part in zip((us, svs, vts), _task_svds(residuals, s)):
            parts.append(part)
    u_star = _orthogonalise(jnp.concatenate(us, axis=1))
    vt_star = _orthogonalise(jnp.concatenate(vts, axis=0))
    return jnp.mean(jnp.concatenate(svs)) * _mm(u_star, vt_star)


@register("tsv", static=("svd_filter",), check=_check, reference="Gargiulo et al., 2025, arXiv 2412.00081",
          path_params=("svd_filter",))
def tsv(base, tvs, *, key=None, scale=1.0, svd_filter=None):
    """TSV-M (Gargiulo et al., 2025): per matrix, each task's top r/T singular triplets, orthogonalised, summed."""
    return jtree.apply(base, _per_matrix(tvs, svd_filter, _tsv_matrix), scale)


@register("iso_c", static=("svd_filter",), check=_check, reference="Marczak et al., 2025, arXiv 2502.04959",
          path_params=("svd_filter",))
def iso_c(base, tvs, *, key=None, scale=1.0, svd_filter=None):
    """Iso-C (Marczak et al., 2025): the summed task matrix with a flat spectrum at its mean singular value."""
    return jtree.apply(base, _per_matrix(tvs, svd_filter, _iso_c_matrix), scale)


@register("iso_cts", static=("svd_filter", "common_space_fraction", "layout"), check=_iso_cts_check,
          reference="Marczak et al., 2025, arXiv 2502.04959", path_params=("svd_filter",))
def iso_cts(base, tvs, *, key=None, scale=1.0, common_space_fraction=0.8, layout="flax", svd_filter=None):
    """Iso-CTS (Marczak et al., 2025): common top space of the sum plus task-specific directions, flat spectrum."""
    if layout == "torch":
        merge_matrix = lambda ts: _iso_cts_matrix(ts, common_space_fraction)  # noqa: E731
    else:
        merge_matrix = lambda ts: _iso_cts_matrix(tuple(x.T for x in ts), common_space_fraction).T  # noqa: E731
    return jtree.apply(base, _per_matrix(tvs, svd_filter, merge_matrix), scale)
