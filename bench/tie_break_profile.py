"""What TIES' exact-k trim costs (``tie_break="first"``, the rule mergekit configs run with) against
keeping every entry tied with the k-th largest (``tie_break="all"``), in memory, per tensor.

Inputs: GPT-2 small's word embedding (50257 x 768) and one MLP matrix (3072 x 768), base + 4 experts
(base + 2e-3 N(0, 1)), float32; ``jmerge.merge(..., "ties", density=0.2, trim="tensor", tie_break=...)``,
the first call (compilation) and the median of 3 more.

Run ``python -m bench.tie_break_profile``; writes ``bench/results/tie_break_profile.md``.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np

import jmerge
from bench import write_report

RESULTS = Path(__file__).parent / "results" / "tie_break_profile.md"


def main() -> None:
    r = np.random.default_rng(0)
    base = {"wte": r.standard_normal((50257, 768), dtype=np.float32), "mlp": r.standard_normal((3072, 768), dtype=np.float32)}
    experts = [{k: v + 2e-3 * r.standard_normal(v.shape, dtype=np.float32) for k, v in base.items()} for _ in range(4)]
    rows = []
    for tie_break in ("all", "first"):
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            jax.block_until_ready(jmerge.merge(base, experts, "ties", density=0.2, trim="tensor", tie_break=tie_break))
            times.append(time.perf_counter() - t0)
        rows.append(f"| {tie_break} | {times[0]:.2f} | {statistics.median(times[1:]):.2f} |")
        print(rows[-1])
    write_report(RESULTS, "\n".join([
        "# TIES trim: exact k vs every tie kept", "", "Command: `.venv/bin/python -m bench.tie_break_profile`", "",
        __doc__.split("\n\n")[1].replace("\n", " "), f"Load average at the end: {os.getloadavg()[0]:.1f}.", "",
        "| tie_break | first call s | median s |", "|---|---|---|", *rows, ""]))


if __name__ == "__main__":
    main()
