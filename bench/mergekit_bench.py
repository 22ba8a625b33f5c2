"""jmerge vs mergekit, side by side: the same YAML on the same GPT-2 124M checkpoints.

Builds base + 4 experts with GPT-2 small's tensor names and shapes (float32 safetensors,
random weights: no real GPT-2 weights are available offline; merging cost does not depend on
the values), then runs task arithmetic and TIES (per-tensor density 0.2, mergekit's
semantics) with ``mergekit-yaml`` and with ``jmerge run`` on the *same config file*, each in a
child process whose wall time and peak RSS (``os.wait4`` ``ru_maxrss``) are recorded, and
compares the two outputs tensor by tensor (max |difference|).

jmerge runs twice per repeat, as a user meets it: **cold** (a new process and an empty
persistent compilation cache, ``$JMERGE_CACHE_DIR`` pointing at a new directory) and then
**warm** (a new process reusing the programs the cold run cached). Start-up is measured in
the same run: ``python -c "import jax"`` against ``jmerge run`` from interpreter start to the
first tensor read (imports, argument parsing, config validation, checkpoint headers), each
the median of 5 processes. Times are medians over ``--repeats``.

mergekit runs in its own venv (default ``~/.cache/jmerge/mergekit-venv``, created on first
use with ``pip install torch==2.13.0`` (the CPU wheel on this machine's disk) then
``pip install mergekit``); torch never enters jmerge's venv.

    .venv/bin/python -m bench.mergekit_bench            # writes bench/results/mergekit_bench.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import write_report
from bench.streaming_bench import run_child
from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st

RESULTS = Path(__file__).parent / "results" / "mergekit_bench.md"
VENV = Path(os.environ.get("JMERGE_MERGEKIT_VENV", Path.home() / ".cache" / "jmerge" / "mergekit-venv"))

GPT2 = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}


def ensure_mergekit(venv: Path) -> Path:
    """The venv's ``mergekit-yaml``, installing torch 2.13.0 (CPU) and mergekit when missing."""
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["mergekit"], check=True)
    return exe


def versions(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return f"mergekit {out[0]}, torch {out[1]}"


def gpt2_shapes() -> dict[str, tuple[int, ...]]:
    """GPT-2 small's tensors as in the Hub checkpoint (no ``transformer.`` prefix, tied head)."""
    d, v, p = GPT2["n_embd"], GPT2["vocab_size"], GPT2["n_positions"]
    shapes = {"wte.weight": (v, d), "wpe.weight": (p, d)}
    for i in range(GPT2["n_layer"]):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (d,), h + "ln_1.bias": (d,),
            h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_attn.bias": (3 * d,),
            h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
            h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
            h + "mlp.c_fc.weight": (d, 4 * d), h + "mlp.c_fc.bias": (4 * d,),
            h + "mlp.c_proj.weight": (4 * d, d), h + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def make_models(root: Path, experts: int, seed: int = 0) -> list[Path]:
    r = np.random.default_rng(seed)
    shapes = gpt2_shapes()
    plan = st.ShardPlan.build([(n, s, "F32") for n, s in shapes.items()], 10**9)
    dirs = [root / "base"] + [root / f"expert{i}" for i in range(experts)]
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_ctx": GPT2["n_positions"], **GPT2}
    writers = []
    for d in dirs:
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config, indent=2))
        writers.append(st.ShardWriter(d, plan))
    for n, s in shapes.items():
        base = r.standard_normal(s, dtype=np.float32) * np.float32(0.02)
        writers[0].write(n, base)
        for w in writers[1:]:
            w.write(n, base + r.standard_normal(s, dtype=np.float32) * np.float32(0.002))
    for w in writers:
        w.close()
    return dirs


def compare(mergekit_out: Path, jmerge_out: Path, tol: float = 1e-6) -> dict:
    """Max |difference| over all entries, the number of entries differing by more than ``tol``,
    the max |difference| over the others, and the entries whose bits differ (``bits``; every
    entry of a tensor stored in different dtypes). mergekit 0.1.5 (transformers 5) writes GPT-2's
    names with a ``transformer.`` prefix; jmerge keeps the input names (with or without it)."""
    cm, cj = st.open_checkpoint(mergekit_out), st.open_checkpoint(jmerge_out)
    names = {n.removeprefix("transformer."): n for n in cm.tensors}
    jnames = {n.removeprefix("transformer."): n for n in cj.tensors}
    common = [n for n in jnames if n in names]
    worst, rest, differing, bits = 0.0, 0.0, 0, 0
    for n in common:
        a, b = cm.read(names[n]), cj.read(jnames[n])
        d = np.abs(a.astype(np.float32) - b.astype(np.float32))
        worst = max(worst, float(d.max()))
        differing += int(np.count_nonzero(d > tol))
        rest = max(rest, float(np.max(np.where(d > tol, 0.0, d))))
        same = a.dtype == b.dtype and a.shape == b.shape
        bits += int(np.count_nonzero(_raw(a) != _raw(b))) if same else a.size
    return {"max": worst, "differing": differing, "rest": rest, "bits": bits, "tensors": len(common),
            "only": sorted(set(names) ^ set(jnames))}


def _raw(x: np.ndarray) -> np.ndarray:
    """The entries' bit patterns as unsigned integers of their width."""
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}")


# Runs `jmerge run` in this process and exits at its first tensor read: start-up as a user meets it.
STARTUP_PROBE = """
import os, sys, time
from jmerge.io import safetensors_io as st
def first_read(self, name):
    print(time.perf_counter() - float(os.environ["JMERGE_BENCH_T0"]))
    os._exit(0)
st.Checkpoint.read = first_read
from jmerge import cli
cli.main(sys.argv[1:])
raise SystemExit("no tensor was read")
"""


def startup_seconds(argv: list[str], runs: int = 5, env: dict[str, str] | None = None) -> float:
    """Median wall seconds from ``perf_counter`` in the parent to the child's report (or its exit);
    the child's environment is ``env`` (default: this process's)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        child_env = {**(os.environ if env is None else env), "JMERGE_BENCH_T0": repr(t0)}
        out = subprocess.run(argv, capture_output=True, text=True, env=child_env, check=True).stdout.strip()
        times.append(float(out.splitlines()[-1]) if out else time.perf_counter() - t0)  # the probe prints last
    return statistics.median(times)


CONFIGS = {  # the merges both tools run, as mergekit YAML after `models` and `base_model`
    "task_arithmetic": "merge_method: task_arithmetic\nparameters: {lambda: 0.3}\n",
    "ties (density 0.2 per tensor)": "merge_method: ties\nparameters: {lambda: 1.0}\n",
}


def side_by_side(mergekit_yaml: Path, root: Path, dirs: list[Path], configs: dict[str, str], repeats: int) -> list:
    """Runs each of ``configs`` on base ``dirs[0]`` + experts ``dirs[1:]`` (weight 1, density 0.2)
    with mergekit, then jmerge cold and warm, ``repeats`` times, each in a child process; returns
    ``(name, {tool: (median seconds, max peak RSS)}, compare(...))`` per config. Leaves the last
    config file at ``root / "config.yaml"``."""
    models = "".join(f"  - model: {d}\n    parameters: {{weight: 1.0, density: 0.2}}\n" for d in dirs[1:])
    jmerge_run = [sys.executable, "-m", "jmerge.cli", "run"]
    rows = []
    for name, body in configs.items():
        cfg = root / "config.yaml"
        cfg.write_text(f"models:\n{models}base_model: {dirs[0]}\n{body}dtype: float32\n")
        runs: dict[str, list[tuple[float, int]]] = {"mergekit": [], "jmerge cold": [], "jmerge warm": []}
        for r in range(repeats):
            xla_cache = root / f"jmerge-cache-{name.split()[0]}-{r}"  # empty: the cold run fills it
            for tool, cmd, env in (
                ("mergekit", [str(mergekit_yaml), str(cfg), str(root / "out-mergekit")], None),
                ("jmerge cold", jmerge_run + [str(cfg), str(root / "out-jmerge"), "--no-progress"], xla_cache),
                ("jmerge warm", jmerge_run + [str(cfg), str(root / "out-jmerge"), "--no-progress"], xla_cache),
            ):
                shutil.rmtree(root / ("out-mergekit" if tool == "mergekit" else "out-jmerge"), ignore_errors=True)
                seconds, rss, code = run_child(cmd, env=None if env is None else {**os.environ, "JMERGE_CACHE_DIR": str(env)})
                if code != 0:
                    raise SystemExit(f"{tool} failed on {name} (exit {code})")
                runs[tool].append((seconds, rss))
                print(f"{name:30s} {tool:12s} {seconds:6.1f} s  peak RSS {rss / 2**20:6.0f} MiB")
        cmp = compare(root / "out-mergekit", root / "out-jmerge")
        med = {t: (statistics.median(s for s, _ in v), max(m for _, m in v)) for t, v in runs.items()}
        rows.append((name, med, cmp))
        print(f"{name}: {cmp}")
    shutil.rmtree(root / "out-jmerge", ignore_errors=True)
    return rows


def protocol(venv: Path) -> str:
    """How :func:`side_by_side` runs the tools, for a report."""
    return ("Both tools run the same YAML file (`models` with `weight: 1.0, density: 0.2`, `base_model`, "
            "`merge_method`, `parameters`, `dtype: float32`) in a child process; peak RSS is the child's `ru_maxrss` "
            f"(the largest over the repeats). {versions(venv)}; jmerge in its own venv (jax, no torch). Each repeat "
            "runs mergekit, then jmerge cold (new process, empty compilation cache) and warm (new process, the cold "
            "run's cache).")


def table_rows(rows: list, entries: int) -> list[str]:
    """The markdown table of :func:`side_by_side`'s rows (``entries``: values per model)."""
    lines = ["| merge | mergekit | jmerge cold | jmerge warm | speed-up cold | speed-up warm | max abs diff "
             "| entries differing by > 1e-6 | max abs diff elsewhere |", "|---|---|---|---|---|---|---|---|---|"]
    for name, med, cmp in rows:
        (mt, mr), (ct, cr), (wt, wr) = med["mergekit"], med["jmerge cold"], med["jmerge warm"]
        lines.append(
            f"| {name} | {mt:.1f} s, {mr / 2**20:.0f} MiB | {ct:.1f} s, {cr / 2**20:.0f} MiB | {wt:.1f} s, {wr / 2**20:.0f} MiB "
            f"| {mt / ct:.1f}x | {mt / wt:.1f}x | {cmp['max']:.2e} | {cmp['differing']} of {entries} | {cmp['rest']:.2e} |"
            + (f" names in one output only: {', '.join(cmp['only'][:5])}" if cmp["only"] else "")
        )
    return lines


def ties_note(rows: list) -> str:
    """What the TIES row's difference means, from the measured comparison."""
    differing = sum(cmp["differing"] for name, _, cmp in rows if name.startswith("ties"))
    if differing == 0:
        return ("TIES: no entry differs by more than 1e-6. jmerge runs a mergekit config with `tie_break: first` "
                "(exactly k = int(density * n) entries per tensor, as mergekit's argsort), so ties at the threshold "
                "no longer add entries.")
    return (f"TIES: {differing} entries differ by more than 1e-6. With `tie_break: first` both tools keep exactly "
            "k = int(density * n) entries per tensor, but which of the entries tied with the k-th largest |value| "
            "survive follows torch's argsort in mergekit and row-major order in jmerge.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--repeats", type=int, default=3, help="runs of each tool per merge; medians are reported")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    mergekit_yaml = ensure_mergekit(args.venv)
    root = Path(tempfile.mkdtemp(prefix="jmerge-mergekit-bench-"))
    try:
        t0 = time.perf_counter()
        dirs = make_models(root, args.experts)
        input_bytes = sum(hf_dir.dir_size(d) for d in dirs)
        print(f"wrote {input_bytes / 1e9:.2f} GB (GPT-2 124M x {len(dirs)}, float32) in {time.perf_counter() - t0:.0f} s")
        rows = side_by_side(mergekit_yaml, root, dirs, CONFIGS, args.repeats)
        cfg = root / "config.yaml"
        jax_import = startup_seconds([sys.executable, "-c", "import jax"])
        jmerge_start = startup_seconds([sys.executable, "-c", STARTUP_PROBE, "run", str(cfg), str(root / "out-jmerge"), "--no-progress"])
        print(f"start-up: import jax {jax_import:.2f} s, jmerge run to its first tensor read {jmerge_start:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    load = os.getloadavg()
    lines = [
        "# jmerge vs mergekit",
        "",
        "Command: `" + " ".join([".venv/bin/python -m bench.mergekit_bench", *(argv if argv is not None else sys.argv[1:])]) + "`",
        "",
        f"Inputs: base + {args.experts} experts with GPT-2 small's 148 tensors (124M parameters, random values), "
        f"float32 safetensors, {input_bytes / 1e9:.2f} GB together. {protocol(args.venv)} "
        f"Machine: 2 CPU cores, 24 GiB; load average at the end {load[0]:.1f}, the benchmark's own processes "
        f"included; medians of {args.repeats} repeats.",
        "",
    ]
    lines += table_rows(rows, sum(int(np.prod(x)) for x in gpt2_shapes().values()))
    lines += [
        "",
        f"Start-up (median of 5 processes each): `python -c \"import jax\"` {jax_import:.2f} s; `jmerge run` from "
        f"interpreter start to its first tensor read {jmerge_start:.2f} s ({jmerge_start - jax_import:+.2f} s).",
        "",
        ties_note(rows),
        "",
    ]
    write_report(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
