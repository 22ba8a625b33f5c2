"""Speed of learned merge coefficients (jmerge.learn): seconds per optimisation step and in
total, task- and layer-level, as the number of merged tasks grows (2, 4, 8).

Model: a synthetic transformer encoder (float inputs, ``--depth`` blocks of single-head
self-attention and a ReLU MLP, mean pooling) with one fixed head per task (as CLIP's
zero-shot heads: not merged). Experts are the base plus random task vectors. Each run is
DivMerge's protocol: JS objective, Adam 1e-2, ``batch_per_task`` inputs of every task per
step, ``--epochs`` passes over ``--samples`` unlabelled inputs per task.

"cold" is the first call (expert targets, tracing and XLA compilation included); "warm" is
the same call again (targets cached in memory, compiled step reused): warm / steps is the
cost of one step. "temp" is XLA's scratch memory for one step (``memory_analysis``) in
units of one copy of the parameters; "total" adds the step's inputs (base and K task
vectors, K + 1 copies).

    .venv/bin/python bench/learn_bench.py            # writes bench/results/learn_bench.md
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

from jmerge import learn
from jmerge.learn import coefficients as coef
from jmerge.learn import engine
from bench import write_report


def init_encoder(key, d_in: int, width: int, depth: int, mlp: int) -> dict:
    keys = iter(jax.random.split(key, 2 + 6 * depth))
    dense = lambda i, o: jax.random.normal(next(keys), (i, o), jnp.float32) / np.sqrt(i)
    params = {"embed": dense(d_in, width)}
    for b in range(depth):
        params[f"block{b}"] = {
            "attn": {n: dense(width, width) for n in ("q", "k", "v", "o")},
            "mlp": {"w1": dense(width, mlp), "w2": dense(mlp, width)},
        }
    return params


def encode(params: dict, x: jax.Array) -> jax.Array:
    """(B, S, d_in) -> (B, width)."""
    h = x @ params["embed"]
    for name in sorted(k for k in params if k.startswith("block")):
        a, m = params[name]["attn"], params[name]["mlp"]
        att = jax.nn.softmax((h @ a["q"]) @ (h @ a["k"]).swapaxes(1, 2) / np.sqrt(h.shape[-1]), -1)
        h = h + (att @ (h @ a["v"])) @ a["o"]
        h = h + jax.nn.relu(h @ m["w1"]) @ m["w2"]
    return h.mean(1)


def setup(num_tasks: int, args):
    key = jax.random.key(0)
    base = init_encoder(key, args.d_in, args.width, args.depth, args.mlp)
    tvs = [jax.tree.map(lambda p, k=t: 0.05 * jax.random.normal(jax.random.fold_in(key, 100 + k), p.shape), base) for t in range(num_tasks)]
    heads = [jax.random.normal(jax.random.fold_in(key, 200 + t), (args.width, args.classes)) for t in range(num_tasks)]
    apply_fns = [lambda p, x, h=h: encode(p, x) @ h for h in heads]
    unlabeled = [np.asarray(jax.random.normal(jax.random.fold_in(key, 300 + t), (args.samples, args.seq, args.d_in))) for t in range(num_tasks)]
    return base, tvs, apply_fns, unlabeled


def step_temp_bytes(base, tvs, apply_fns, unlabeled, granularity, layers) -> int:
    """XLA temp memory of one jitted step (engine internals: the same function fit_coefficients runs)."""
    lay = coef.layout(base, len(tvs), granularity, layers)
    data = learn.classifier_targets(base, tvs, apply_fns, unlabeled)
    c = coef.initial(lay)
    jstep, _, _ = engine._get_compiled(tuple(apply_fns), lay, "js", engine.DEFAULT_OPTIMIZER, None)
    idx = np.zeros((len(tvs), 4), np.int32)
    compiled = jstep.lower(c, engine.DEFAULT_OPTIMIZER.init(c), base, tvs, data, idx).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def run(args) -> str:
    rows = []
    nbytes = None
    for k in args.tasks:
        base, tvs, fns, xs = setup(k, args)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
        for granularity, layers in (("task", None), ("layer", r"^(embed|block\d+)")):
            kw = dict(granularity=granularity, layers=layers, epochs=args.epochs, batch_per_task=4, progress=False)
            learn.clear_cache()
            t0 = time.perf_counter()
            r = learn.fit_coefficients(base, tvs, fns, xs, **kw)
            jax.block_until_ready(r.params)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = learn.fit_coefficients(base, tvs, fns, xs, **kw)
            jax.block_until_ready(r.params)
            warm = time.perf_counter() - t0
            steps = len(r.losses)
            temp = step_temp_bytes(base, tvs, fns, xs, granularity, layers)
            shape = "×".join(map(str, r.coefficients.shape))
            rows.append((k, granularity, shape, steps, cold, warm, warm / steps, temp / nbytes))
            print(f"tasks={k} {granularity:5s} coeffs={shape:5s} steps={steps} cold={cold:.2f}s warm={warm:.2f}s "
                  f"step={1e3 * warm / steps:.1f}ms temp={temp / nbytes:.2f}x params", flush=True)

    lines = [
        "# jmerge.learn: seconds per optimisation step (DivMerge protocol, JS, Adam)",
        "",
        f"Command: `.venv/bin/python bench/learn_bench.py {' '.join(args.argv)}`".rstrip() + "  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"load average at the end {os.getloadavg()[0]:.1f} (other jobs share the cores: absolute times are noisy).  ",
        f"Model: transformer encoder, {args.depth} blocks, width {args.width}, MLP {args.mlp}, sequence {args.seq}, "
        f"{nbytes / 4 / 1e6:.2f} M float32 parameters; one fixed head per task ({args.classes} classes).  ",
        f"Data: {args.samples} unlabelled inputs per task, 4 per task per step, {args.epochs} epoch(s).  ",
        "cold = first call (targets + compile + steps); warm = same call again; step = warm / steps; "
        "temp = XLA scratch memory of one step in parameter copies; total = temp + the inputs (K + 1 copies).",
        "",
        "| tasks | level | coefficients | steps | cold s | warm s | s / step | temp (× params) | total (× params) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, g, shape, steps, cold, warm, per, temp in rows:
        lines.append(f"| {k} | {g} | {shape} | {steps} | {cold:.2f} | {warm:.2f} | {per:.4f} | {temp:.2f} | {temp + k + 1:.2f} |")
    by = {(k, g): per for k, g, _, _, _, _, per, _ in rows}
    ks = sorted({k for k, *_ in rows})
    if len(ks) > 1:
        lines += ["", "Growth of the step time from the fewest to the most tasks: " + ", ".join(
            f"{g} ×{by[(ks[-1], g)] / by[(ks[0], g)]:.2f} for ×{ks[-1] / ks[0]:.0f} tasks" for g in ("task", "layer"))]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--d-in", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "learn_bench.md")
    args = p.parse_args(argv)
    args.argv = [] if argv is None else list(argv)
    if argv is None:
        import sys

        args.argv = sys.argv[1:]
    text = run(args)
    print(text)
    write_report(args.out, text)


if __name__ == "__main__":
    main()
