"""Scaling of merges: time and memory vs number of tasks and model size, and per-device
memory of the sharded program vs number of devices.

Run: ``.venv/bin/python -m bench.scale_bench`` (writes ``bench/results/scale_bench.md``;
about 3-5 minutes on 2 cores; ``--quick`` for a smoke run).

Synthetic decoder-shaped float32 models: ``L`` blocks of width ``d = 1024`` (q, k, v, o
``d x d``; MLP up/gate ``d x 4d``, down ``4d x d``; two norms), 16.8 M parameters per
block. Experts are ``base + 0.01 * noise`` (noise drawn once, rolled per expert).

* **Tasks and size** (1 device, executed): ``jmerge.merge(..., check_finite=False)``
  wall time (median of ``--reps`` after a warm-up call) and XLA's own memory account of
  the compiled program (``compiled.memory_analysis()``: arguments + outputs + temporaries
  - aliased), for task arithmetic and TIES (global trim 0.2). Sizes stop at 18 blocks
  (302 M parameters; with 4 experts 6 GB of inputs, and TIES would need about
  (2K + 0.5) float32 model copies more, 10 GB): the 24 GiB machine is shared with other
  jobs, and a config is skipped (its predicted memory reported) when XLA predicts more
  than ``--budget-gib``. TIES is timed at 17 and 34 M parameters only: its compilation
  (one exact threshold search per task) takes tens of seconds on 2 shared cores, and its
  growth with K is the tasks sweep.
* **Devices** (compiled only, never executed): the same merges on 1, 2, 4 and 8 fake
  CPU devices with inputs placed by ``jmerge.shard.spec_for``; per-device argument,
  output and temporary bytes from ``memory_analysis()`` (fake devices share 2 cores, so
  wall time would say nothing), and the collectives in the compiled HLO. Compiling needs
  no arrays, so this also covers task arithmetic on a 1 B parameter model (60 blocks).
* **Collectives per method** (compiled only): what every registered method moves between
  8 devices under plain ``jax.jit``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jmerge  # noqa: E402
from jmerge import shard, stages  # noqa: E402
from jmerge.thresholds import mesh as tmesh  # noqa: E402
from jmerge import tree as jtree  # noqa: E402
from bench import write_report as write_file

RESULTS = Path(__file__).parent / "results" / "scale_bench.md"
D = 1024
GIB = 2**30


def block_shapes(layers: int, d: int = D) -> dict:
    """A decoder stack: per block attention q/k/v/o, MLP gate/up/down, two norms."""
    block = {
        "attn": {n: (d, d) for n in ("q", "k", "v", "o")},
        "mlp": {"gate": (d, 4 * d), "up": (d, 4 * d), "down": (4 * d, d)},
        "norm1": (d,),
        "norm2": (d,),
    }
    return {f"block_{i}": block for i in range(layers)}


def num_params(shapes: dict) -> int:
    return sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))


def make_models(shapes: dict, num_experts: int, seed: int = 0):
    """Base ~ N(0, 1), expert i = base + 0.01 * roll(noise, i): one noise draw per leaf."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    base, experts = [], [[] for _ in range(num_experts)]
    for s in leaves:
        b = rng.standard_normal(s, dtype=np.float32)
        noise = np.float32(0.01) * rng.standard_normal(s, dtype=np.float32)
        base.append(jax.device_put(b))
        for i in range(num_experts):
            experts[i].append(jax.device_put(b + np.roll(noise, 7 * i)))
        del b, noise
    return jax.tree.unflatten(treedef, base), [jax.tree.unflatten(treedef, e) for e in experts]


def abstract_models(shapes: dict, num_experts: int, mesh, rule):
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))
    placed = shard.abstract_for(abstract, mesh, rule)
    return placed, [placed] * num_experts


def merge_fn(method: str, mesh=None, rule=None):
    """The jitted merge of ``(base, experts)``: a registered method, or TIES with the shard_map trim."""
    if method == "ties_shard_map":

        def run(base, experts):
            trimmed = tmesh.magnitude_trim(0.2, mesh, rule)(jtree.task_vectors(base, experts))
            masks = stages.agreement_masks(trimmed, stages.elect_sign(trimmed))
            return jtree.apply(base, stages.combine(trimmed, masks=masks, normalize=True))

        return jax.jit(run)
    m = jmerge.get(method)
    hp = m.resolve(2, {"density": 0.2} if method == "ties" else {})
    return jax.jit(lambda base, experts: m.fn(base, jtree.task_vectors(base, experts), key=None, **hp))


def memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    out = {
        "args": ma.argument_size_in_bytes,
        "out": ma.output_size_in_bytes,
        "temp": ma.temp_size_in_bytes,
        "alias": ma.alias_size_in_bytes,
    }
    out["total"] = out["args"] + out["out"] + out["temp"] - out["alias"]
    return out


def collectives_in(text: str) -> str:
    """Collective ops of a compiled HLO module, with the bytes of the largest array one of
    them produces (an op may produce a tuple: XLA combines small collectives)."""
    found = {}
    sizes = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8, "u64": 8}
    ops = "all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute"
    for line in text.splitlines():
        m = re.search(rf"^\s*%?\S+ = (.*?) ({ops})(?:-start)?\(", line)
        if not m:
            continue
        arrays = re.findall(r"([a-z]+[0-9]*)\[([\d,]*)\]", m.group(1))
        nbytes = max((sizes.get(t, 4) * int(np.prod([int(x) for x in d.split(",") if x] or [1])) for t, d in arrays), default=0)
        count, biggest = found.get(m.group(2), (0, 0))
        found[m.group(2)] = (count + 1, max(biggest, nbytes))
    if not found:
        return "none"
    return ", ".join(f"{op} x{c} (largest {_fmt_bytes(b)})" for op, (c, b) in sorted(found.items()))


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def timed(fn, reps: int) -> tuple[float, float]:
    """(median seconds of ``reps`` calls after one warm-up call, first-call seconds)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def run_point(layers: int, num_experts: int, methods, reps: int, budget: float, rows: list, label: str) -> None:
    shapes = block_shapes(layers)
    p = num_params(shapes)
    mesh1 = shard.make_mesh(devices=jax.devices()[:1])
    abstract = abstract_models(shapes, num_experts, mesh1, shard.spec_for)
    predicted = {m: memory(merge_fn(m).lower(*abstract).compile()) for m in methods}
    if max(v["total"] for v in predicted.values()) > budget:
        for m in methods:
            rows.append((label, m, p, num_experts, None, None, predicted[m]))
            print(f"{label}: {m} {p / 1e6:.0f}M x{num_experts}: skipped, XLA predicts {_fmt_bytes(predicted[m]['total'])}", flush=True)
        return
    base, experts = make_models(shapes, num_experts)
    for m in methods:
        med, first = timed(lambda: jmerge.merge(base, experts, m, check_finite=False, **({"density": 0.2} if m == "ties" else {})), reps)
        rows.append((label, m, p, num_experts, med, first, predicted[m]))
        print(f"{label}: {m} {p / 1e6:.0f}M x{num_experts}: {med:.3f} s (first {first:.1f} s), "
              f"XLA {_fmt_bytes(predicted[m]['total'])}", flush=True)
    del base, experts


def device_point(layers: int, num_experts: int, n: int, method: str, rule) -> dict:
    mesh = shard.make_mesh(devices=jax.devices()[:n])
    abstract = abstract_models(block_shapes(layers), num_experts, mesh, rule)
    start = time.perf_counter()
    compiled = merge_fn(method, mesh, rule).lower(*abstract).compile()
    return {**memory(compiled), "collectives": collectives_in(compiled.as_text()), "compile": time.perf_counter() - start}


def method_collectives(method: str, num_experts: int = 2) -> str:
    """Collectives of every registered method's compiled program on 8 devices (two small
    decoder blocks of width 256, placed by the default rule; compiled, not executed)."""
    mesh = shard.make_mesh(model=8)
    shapes = block_shapes(2, d=256)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))
    base = shard.abstract_for(abstract, mesh)
    m = jmerge.get(method)
    hp = m.resolve(num_experts, {})
    static = tuple(sorted(k for k in hp if k in m.static))
    key = jax.random.key(0) if m.needs_key else None
    fn = jax.jit(lambda b, e, key, **hp: m.fn(b, jtree.task_vectors(b, e), key=key, **hp), static_argnames=static)
    return collectives_in(fn.lower(base, [base] * num_experts, key, **hp).compile().as_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=13.0, help="skip executed configs XLA predicts above this")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budget = args.budget_gib * GIB
    load_before = os.getloadavg()
    start_all = time.perf_counter()

    task_counts, task_layers = ([2, 4], 1) if args.quick else ([2, 4, 8, 16], 1)
    size_layers, size_experts = ([1, 2], 2) if args.quick else ([1, 2, 6, 18], 4)
    ties_max_layers = 2  # TIES compiles slowly (one threshold search per task): timed at 17 and 34 M
    dev_layers, dev_experts = (1, 2) if args.quick else (1, 4)
    big_layers = None if args.quick else 60

    rows: list = []
    for k in task_counts:
        run_point(task_layers, k, ["task_arithmetic", "ties"], args.reps, budget, rows, "tasks")
    for layers in size_layers:
        methods = ["task_arithmetic", "ties"] if layers <= ties_max_layers else ["task_arithmetic"]
        run_point(layers, size_experts, methods, args.reps, budget, rows, "size")

    dev_rows = []
    rule = shard.spec_for
    for method in ("task_arithmetic", "ties", "ties_shard_map"):
        for n in (1, 2, 4, 8):
            r = device_point(dev_layers, dev_experts, n, method, rule)
            dev_rows.append((dev_layers, method, n, r))
            print(f"devices={n} {method}: per device total {_fmt_bytes(r['total'])}, temp {_fmt_bytes(r['temp'])}; {r['collectives']}", flush=True)
    if big_layers:
        for n in (1, 8):
            r = device_point(big_layers, dev_experts, n, "task_arithmetic", rule)
            dev_rows.append((big_layers, "task_arithmetic", n, r))
            print(f"1B devices={n}: per device {_fmt_bytes(r['total'])} (compiled in {r['compile']:.0f} s)", flush=True)
    method_rows = [(m, method_collectives(m)) for m in jmerge.available()]
    for m, text in method_rows:
        print(f"{m}: {text}", flush=True)
    elapsed = time.perf_counter() - start_all
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write_report(args, rows, dev_rows, method_rows, dev_experts, load_before, os.getloadavg(), elapsed, peak_rss, argv)


def write_report(args, rows, dev_rows, method_rows, dev_experts, load_before, load_after, elapsed, peak_rss, argv) -> None:
    lines = [
        "# Scaling: tasks, model size, devices",
        "",
        f"Command: `.venv/bin/python -m bench.scale_bench{' ' + ' '.join(argv) if argv else ''}` "
        f"({elapsed:.0f} s in all; process peak RSS {_fmt_bytes(peak_rss)}).",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, jax {jax.__version__}, backend {jax.default_backend()}; "
        f"shared with other jobs (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after), so wall "
        "times are indicative. Synthetic float32 decoder blocks of width 1024 (16.8 M parameters per block), "
        "experts = base + noise. TIES is the global trim at density 0.2 (the paper's).",
        "",
        "## Time and memory vs tasks and model size (1 device, executed)",
        "",
        f"`jmerge.merge(..., check_finite=False)`, median of {args.reps} calls after a warm-up call; "
        "'XLA memory' is `compiled.memory_analysis()` (arguments + outputs + temporaries - aliased), "
        "the program's whole device-memory footprint. 'ns / param / model' divides the time by the "
        "parameter count and the K + 2 model copies a merge must read or write (flat = linear growth).",
        "",
        "| sweep | method | params | experts | median s | first call s | XLA memory | temp | ns / param / model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m, p, k, med, first, mem in rows:
        if med is None:
            lines.append(f"| {label} | {m} | {p / 1e6:.1f} M | {k} | over budget | | {_fmt_bytes(mem['total'])} (predicted) | {_fmt_bytes(mem['temp'])} | |")
            continue
        per = med / (p * (k + 2)) * 1e9
        lines.append(f"| {label} | {m} | {p / 1e6:.1f} M | {k} | {med:.3f} | {first:.1f} | {_fmt_bytes(mem['total'])} | {_fmt_bytes(mem['temp'])} | {per:.2f} |")
    lines += [
        "",
        "## Per-device memory of the sharded program vs devices (compiled, not executed)",
        "",
        f"Base + {dev_experts} experts placed by `jmerge.shard.spec_for` (largest dimension divisible by the "
        "`model` axis, tensors under 65536 entries replicated) on a 1 x n mesh of fake CPU devices; "
        "bytes per device from `memory_analysis()` of the SPMD-partitioned program, collectives read from "
        "its HLO. `ties` is `jmerge.merge`'s TIES (threshold from `jmerge.stages`), `ties_shard_map` the same "
        "merge with `jmerge.thresholds.mesh.magnitude_trim` (one psum of the counts per bisection step).",
        "",
        "| params | method | devices | arguments | outputs | temp | total per device | total x devices | collectives |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layers, m, n, r in dev_rows:
        p = num_params(block_shapes(layers))
        lines.append(
            f"| {p / 1e6:.0f} M | {m} | {n} | {_fmt_bytes(r['args'])} | {_fmt_bytes(r['out'])} | {_fmt_bytes(r['temp'])} | "
            f"{_fmt_bytes(r['total'])} | {_fmt_bytes(r['total'] * n)} | {r['collectives']} |"
        )
    lines += [
        "",
        "## What each method moves between devices (plain `jax.jit`, 8 devices)",
        "",
        "Every registered method, 2 experts, two decoder blocks of width 256 placed by the default rule "
        "(matrices sharded over 8 devices, norms replicated); collectives of the compiled program, with the "
        "size of the largest result. A full-tensor all-gather of a 256 x 1024 float32 matrix is 1.00 MiB; "
        "an all-gather of a 256 x 256 one 256 KiB.",
        "",
        "| method | collectives |",
        "|---|---|",
    ]
    lines += [f"| {m} | {text} |" for m, text in method_rows]
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_file(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
