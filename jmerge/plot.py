"""The task-vector overview figure of ``jmerge inspect``: the cosine matrix beside the norms
(LwPTV's saliency figures are :mod:`jmerge.lwptv.plot`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from jmerge._util import atomic_write


def overview(path: str | Path, names: Sequence[str], norms: np.ndarray, cos: np.ndarray) -> Path:
    """Writes the PNG at ``path`` atomically (replacing it): ``cos(τ_i, τ_j)`` and ``‖τ_t‖``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(4 + 1.2 * len(names), 3 + 0.3 * len(names)))
    im = a.imshow(cos, vmin=-1, vmax=1, cmap="coolwarm")
    a.set_xticks(range(len(names)), names, rotation=45, ha="right")
    a.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            a.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=8)
    a.set_title("cosine(tau_i, tau_j)")
    fig.colorbar(im, ax=a, fraction=0.046)
    b.bar(range(len(names)), norms)
    b.set_xticks(range(len(names)), names, rotation=45, ha="right")
    b.set_title("||tau||")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), overwrite=True)
    finally:
        plt.close(fig)
