"""Merge speed against the memory-bandwidth floor, on a GPT-2-124M-shaped pytree.

Run: ``.venv/bin/python -m bench.merge_bench`` (writes ``bench/results/merge_bench.md``).

A merge must read the base and every expert once and write the result once, so its floor
is ``(K + 2) * model_bytes / streaming_rate``, the rate measured in the same run with a
jitted ``a + b`` over large float32 arrays (best of several; it includes allocating the
output, as a merge must). Each method is timed through :func:`jmerge.merge` (validation
included, ``check_finite=False``), median of several runs after a compile/warm-up run;
``check_finite`` is timed on its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jmerge
from jmerge import stages, thresholds, validate
from jmerge.thresholds import xla
from bench import write_report

RESULTS = Path(__file__).parent / "results" / "merge_bench.md"


def gpt2_shapes(vocab: int = 50257, positions: int = 1024, d: int = 768, layers: int = 12) -> dict:
    """Parameter shapes of GPT-2 124M as in Hugging Face's FlaxGPT2LMHeadModel."""
    block = {
        "ln_1": {"scale": (d,), "bias": (d,)},
        "attn": {"c_attn": {"kernel": (d, 3 * d), "bias": (3 * d,)}, "c_proj": {"kernel": (d, d), "bias": (d,)}},
        "ln_2": {"scale": (d,), "bias": (d,)},
        "mlp": {"c_fc": {"kernel": (d, 4 * d), "bias": (4 * d,)}, "c_proj": {"kernel": (4 * d, d), "bias": (d,)}},
    }
    return {
        "transformer": {
            "wte": {"embedding": (vocab, d)},
            "wpe": {"embedding": (positions, d)},
            "h": {str(i): block for i in range(layers)},
            "ln_f": {"scale": (d,), "bias": (d,)},
        }
    }


def random_models(shapes: dict, num_experts: int, seed: int = 0):
    """A random float32 base (N(0, 1)) and experts = base + N(0, 0.01^2) noise (numpy's fast
    generator: threefry on 620 M values takes minutes on 2 cores)."""
    is_shape = lambda s: isinstance(s, tuple)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
    rng = np.random.default_rng(seed)
    base_np = [rng.standard_normal(s, dtype=np.float32) for s in leaves]
    base = jax.tree.unflatten(treedef, [jnp.asarray(b) for b in base_np])
    experts = []
    for _ in range(num_experts):
        noisy = [b + np.float32(0.01) * rng.standard_normal(b.shape, dtype=np.float32) for b in base_np]
        experts.append(jax.tree.unflatten(treedef, [jnp.asarray(x) for x in noisy]))
    jax.block_until_ready((base, experts))
    return base, experts


def timed(fn, reps: int) -> list[float]:
    jax.block_until_ready(fn())  # compile / warm up
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out


def streaming_rate(num_floats: int = 1 << 26, reps: int = 7) -> tuple[float, float]:
    """Bytes per second of a jitted ``a + b`` (reads 2 arrays, writes 1), best of ``reps``:
    into a fresh output (allocation included, as in a merge) and into ``a``'s donated buffer
    (pure memory traffic). The floor uses the faster of the two."""
    b = jnp.full((num_floats,), 2.0, jnp.float32)
    fresh = jax.jit(lambda x, y: x + y)
    a = jnp.ones((num_floats,), jnp.float32)
    best_fresh = min(timed(lambda: fresh(a, b), reps))
    donated = jax.jit(lambda x, y: x + y, donate_argnums=0)
    state = {"a": jnp.ones((num_floats,), jnp.float32)}

    def run():
        state["a"] = donated(state["a"], b)
        return state["a"]

    best_donated = min(timed(run, reps))
    return 3 * 4 * num_floats / best_fresh, 3 * 4 * num_floats / best_donated


CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"donate_base": True}),
    ("ties", {"trim": "global"}),
    ("ties", {"trim": "global", "donate_base": True}),
    ("ties", {"trim": "tensor"}),
    ("dare_linear", {}),
    ("dare_ties", {}),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (12 for the real 124M shapes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    base, experts = random_models(gpt2_shapes(layers=args.layers), args.experts)
    print(f"models ready in {time.perf_counter() - start:.1f} s", flush=True)
    n_params = sum(int(x.size) for x in jax.tree.leaves(base))
    model_bytes = 4 * n_params
    rate_fresh, rate_donated = streaming_rate()
    rate = max(rate_fresh, rate_donated)
    print(f"streaming rate {rate_fresh / 1e9:.2f} GB/s (fresh output), {rate_donated / 1e9:.2f} GB/s (donated)", flush=True)
    floor = (args.experts + 2) * model_bytes / rate
    key = jax.random.key(0)

    rows = []
    for method, hp in CASES:
        kwargs = dict(hp, key=key) if jmerge.get(method).needs_key else dict(hp)
        if hp.get("donate_base"):  # each call consumes a fresh copy of the base, made outside the timing
            copies = [jax.tree.map(jnp.copy, base) for _ in range(args.reps + 2)]
            run = lambda: jmerge.merge(copies.pop(), experts, method, check_finite=False, **kwargs)
        else:
            run = lambda: jmerge.merge(base, experts, method, check_finite=False, **kwargs)
        compile_start = time.perf_counter()
        jax.block_until_ready(run())
        first = time.perf_counter() - compile_start
        times = timed(run, args.reps)
        med = statistics.median(times)
        label = method + "".join(f" {k}={v}" for k, v in hp.items())
        rows.append((label, med, min(times), first, med / floor))
        print(f"{label:28s} median {med:7.3f} s  min {min(times):7.3f} s  first call {first:6.1f} s  {med / floor:5.2f}x floor", flush=True)

    # where TIES' time goes: the exact global thresholds (density 0.2) vs the rest of the merge
    k = int(0.2 * n_params)
    leaves = lambda b, es: [jax.tree.leaves(tv) for tv in jmerge.task_vectors(b, es)]
    search_all = jax.jit(lambda b, es: xla.kth_largest_magnitudes(leaves(b, es), [k] * len(es)))
    t_thresholds = statistics.median(timed(lambda: search_all(base, experts), args.reps))
    given = [[float(t)] for t in search_all(base, experts)]
    t_given = statistics.median(timed(lambda: jmerge.merge(base, experts, "ties", answers=given, check_finite=False), args.reps))
    query = stages.magnitude_trim(0.2).query
    t_host = statistics.median(timed(lambda: thresholds.solve(query, experts, base, using="host"), args.reps))
    assert thresholds.solve(query, experts, base, using="host") == given  # the host search is exact too
    search = jax.jit(lambda b, e: xla._search(xla._magnitude_chunks(jax.tree.leaves(jmerge.task_vector(b, e))), n_params, k)[1])
    passes = [int(search(base, e)) for e in experts]
    chunks = jax.jit(lambda b, e: xla._magnitude_chunks(jax.tree.leaves(jmerge.task_vector(b, e))))(base, experts[0])
    count = jax.jit(lambda c, bits: xla._pass(c, xla._COUNT, bits))
    read = jax.jit(lambda c: sum(jnp.sum(x) for x in c))
    bits = jnp.int32(np.float32(0.01).view(np.int32))
    t_count = min(timed(lambda: count(chunks, bits), args.reps))
    t_read = min(timed(lambda: read(chunks), args.reps))
    print(f"thresholds {t_thresholds:.3f} s (host {t_host:.3f} s), ties with given thresholds {t_given:.3f} s, passes {passes}, "
          f"count pass {t_count:.4f} s vs plain sum {t_read:.4f} s", flush=True)

    finite = timed(lambda: validate.check_models(base, experts, check_finite=True), args.reps)
    finite_med = statistics.median(finite)
    print(f"check_finite (base + {args.experts} experts): median {finite_med:.3f} s", flush=True)

    lines = [
        "# Merge speed vs the memory-bandwidth floor",
        "",
        f"Command: `.venv/bin/python -m bench.merge_bench{' ' + ' '.join(argv) if argv else ''}`",
        "",
        f"GPT-2-124M-shaped float32 pytree ({n_params / 1e6:.1f} M parameters, {model_bytes / 2**20:.0f} MiB per model), "
        f"base + {args.experts} random experts; jax {jax.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, backend {jax.default_backend()}.",
        f"Streaming rate (jitted `a + b` over 3 x 256 MiB, best of 7): {rate_fresh / 1e9:.2f} GB/s into a fresh "
        f"output, {rate_donated / 1e9:.2f} GB/s into a donated buffer; the floor uses the faster. "
        f"Floor = {args.experts + 2} model reads/writes / rate = {floor:.3f} s.",
        f"Times: `jmerge.merge(..., check_finite=False)`, median of {args.reps} after a warm-up call "
        "(validation and dispatch included). 'first call' includes compilation.",
        "",
        "| method | median s | min s | first call s | floor s | median / floor |",
        "|---|---|---|---|---|---|",
    ]
    for label, med, lo, first, ratio in rows:
        lines.append(f"| {label} | {med:.3f} | {lo:.3f} | {first:.1f} | {floor:.3f} | {ratio:.2f} |")
    lines += [
        "",
        f"`check_finite=True` adds one read of every model: {finite_med:.3f} s median "
        f"(`validate.check_models` on base + {args.experts} experts).",
        "",
        "Where TIES' time goes (same run, medians): the exact global thresholds of the 4 task vectors (density "
        f"0.2) take {t_host:.3f} s on the host (`jmerge.thresholds.host`: numpy introselect on parallel threads, "
        f"what `jmerge.merge` runs for CPU inputs) and {t_thresholds:.3f} s in XLA (`jmerge.thresholds.xla.kth_largest_magnitudes`, "
        f"the jitted search used on accelerators and under tracing); the rest of the merge (`ties` with those "
        f"`answers=` given: trim, elect, disjoint mean, apply) takes {t_given:.3f} s. "
        f"The XLA search made {passes} passes over each task's magnitudes (one fused count, min or max reduction "
        f"each) after writing them once; one counting pass over a task's {n_params / 1e6:.0f} M magnitudes "
        f"takes {t_count:.4f} s (best), a plain `sum` over the same data {t_read:.4f} s.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
