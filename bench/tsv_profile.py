"""Where a TSV-M merge of two Suite T v2 experts spends its time (issue 13 §4).

Times, on the cached Suite T v2 experts (the first two tasks):

- ``jmerge.merge(base, experts, "tsv")`` end to end, twice (the second call reuses the compiled merge);
- the same with ``svd_filter`` leaving out the word embeddings (they then get the task-vector mean);
- the thin SVD of the word-embedding task vector (30522 x 384) three ways: ``jnp.linalg.svd``
  eagerly, the same under ``jax.jit``, and ``numpy.linalg.svd`` (LAPACK gesdd via OpenBLAS);
- the same three on a 384 x 1536 block matrix, for scale.

Run ``python -m bench.tsv_profile``; writes ``bench/results/tsv_profile.md``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jmerge
from bench import write_report
from jmerge import tree as jtree

EMBEDDING = "embeddings/word/"
NO_EMBEDDING = rf"^(?!{EMBEDDING})"


def _timed(fn, repeat: int = 1) -> list[tuple[float, float]]:
    """``(wall, cpu)`` seconds of each call; cpu is the process's CPU time over all threads (on a
    shared machine the wall time mostly measures the other jobs)."""
    out = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def _leaf(tree, needle: str):
    hits = [(p, x) for p, x in zip(jtree.paths(tree), jax.tree.leaves(tree)) if needle in p]
    if not hits:
        raise KeyError(f"no leaf path contains {needle!r}")
    return hits[0]


def main() -> None:
    from experiments import suite_t
    from experiments.suite import build_suite

    s = build_suite(suite_t.V2, log=lambda m: None)
    names = s.names[:2]
    load = os.getloadavg()[0]
    experts = s.experts_for(names)
    lines = [f"Suite T v2 experts {', '.join(names)}; jax {jax.__version__}, {jax.device_count()} CPU device(s), "
             f"{os.cpu_count()} cores, load average {load:.1f} at the start.", ""]
    lines.append("| what | wall s, CPU s (per call) |")
    lines.append("|---|---|")

    def row(what, secs):
        lines.append(f"| {what} | {'; '.join(f'{w:.1f}, {c:.1f}' for w, c in secs)} |")
        print(lines[-1], flush=True)

    tvs = s.task_vectors(names)
    path, emb = _leaf(tvs[0], EMBEDDING)
    blk_path, blk = _leaf(tvs[0], "mlp/intermediate/kernel")
    for label, x in ((f"{path} {tuple(emb.shape)}", emb), (f"{blk_path} {tuple(blk.shape)}", blk)):
        x = jnp.asarray(x, jnp.float32)
        jitted = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False))
        row(f"jnp.linalg.svd eager, {label}", _timed(lambda: jnp.linalg.svd(x, full_matrices=False)))
        row(f"jnp.linalg.svd under jit (1st call compiles), {label}", _timed(lambda: jitted(x), 2))
        xn = np.asarray(x)
        row(f"numpy.linalg.svd, {label}", _timed(lambda: np.linalg.svd(xn, full_matrices=False)))
    row("jmerge.merge tsv, without the embeddings (svd_filter), 1st/2nd call",
        _timed(lambda: jmerge.merge(s.base, experts, "tsv", svd_filter=NO_EMBEDDING), 2))
    row("jmerge.merge tsv, all 2-D leaves (1 call)", _timed(lambda: jmerge.merge(s.base, experts, "tsv")))
    text = "# TSV-M on Suite T v2: where the time goes\n\nCommand: `python -m bench.tsv_profile`\n\n" + "\n".join(lines) + "\n"
    write_report(Path(__file__).parent / "results" / "tsv_profile.md", text)


if __name__ == "__main__":
    main()
