"""Task-vector norms and pairwise cosines, streamed tensor by tensor over checkpoints
(``jmerge inspect``): ``cos(τ_i, τ_j) = <τ_i, τ_j> / (‖τ_i‖ ‖τ_j‖)``, τ_t = θ_t − θ_0 in float32."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def task_vector_stats(base, experts: Sequence, progress: Callable[[str, str], None] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Streams ``(norms (K,), Gram matrix (K, K))`` of the float32 task vectors over all float
    tensors of :class:`~jmerge.io.safetensors_io.Checkpoint` s; ``progress(phase, name)`` after each."""
    k = len(experts)
    gram = np.zeros((k, k), np.float64)
    for name, info in base.tensors.items():
        if not info.is_float:
            continue
        b = base.read(name).astype(np.float32).ravel()
        tvs = np.stack([e.read(name).astype(np.float32).ravel() - b for e in experts]).astype(np.float64)
        gram += tvs @ tvs.T
        if progress:
            progress("task vectors", name)
    return np.sqrt(np.diag(gram)), gram


def cosines(norms: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """The (K, K) cosine matrix of a Gram matrix and its norms (zero vectors give 0)."""
    return gram / np.maximum(np.outer(norms, norms), 1e-30)
