"""Out-of-core merge benchmark: inputs larger than a memory budget, peak RSS measured.

Writes a synthetic base + K experts (float32 safetensors HF directories, sharded), then runs
``jmerge run`` on them in child processes and reads each child's peak RSS from
``os.wait4`` (``ru_maxrss``). The claim checked: a streamed merge's peak RSS stays under the
budget (``--cap-mb``) although the inputs together are several times larger; the in-memory
run of the same merge is shown for contrast. Results: ``bench/results/streaming_bench.md``.

    .venv/bin/python -m bench.streaming_bench                    # 5 x 640 MB inputs, 1 GiB budget
    .venv/bin/python -m bench.streaming_bench --tensors 8 --experts 2   # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import write_report
from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st

RESULTS = Path(__file__).parent / "results" / "streaming_bench.md"


def make_models(root: Path, tensors: int, side: int, experts: int, seed: int = 0) -> int:
    """base + experts, each ``tensors`` float32 (side, side) matrices plus a bias, 1 GB shards."""
    r = np.random.default_rng(seed)
    names = [f"model.layers.{i}.mlp.weight" for i in range(tensors)] + ["model.norm.bias"]
    shapes = {n: ((side, side) if n.endswith("weight") else (side,)) for n in names}
    specs = [(n, shapes[n], "F32") for n in names]
    plan = st.ShardPlan.build(specs, 10**9)
    dirs = [root / "base"] + [root / f"expert{i}" for i in range(experts)]
    writers = []
    for d in dirs:
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "synthetic"}')
        writers.append(st.ShardWriter(d, plan))
    for n in names:  # one tensor of every model in memory at a time
        base = r.standard_normal(shapes[n], dtype=np.float32)
        writers[0].write(n, base)
        for w in writers[1:]:
            w.write(n, base + r.standard_normal(shapes[n], dtype=np.float32) * np.float32(0.01))
    for w in writers:
        w.close()
    return sum(hf_dir.dir_size(d) for d in dirs)


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit status) of one child process (``env``: its environment)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            print(err.read().decode(), file=sys.stderr)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, default=40, help="matrices per model (default %(default)s)")
    p.add_argument("--side", type=int, default=2048, help="matrix side (default %(default)s: 16 MiB each)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--cap-mb", type=int, default=1024, help="memory budget the streamed runs must stay under")
    p.add_argument("--skip-in-memory", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="jmerge-streaming-bench-"))
    try:
        t0 = time.perf_counter()
        input_bytes = make_models(root, args.tensors, args.side, args.experts)
        print(f"wrote {input_bytes / 1e9:.2f} GB of inputs in {time.perf_counter() - t0:.1f} s under {root}")
        models = "".join(f"  - {{model: {root / f'expert{i}'}, parameters: {{weight: 1.0, density: 0.2}}}}\n" for i in range(args.experts))
        configs = {
            "task_arithmetic": "merge_method: task_arithmetic\nparameters: {lambda: 0.3}\n",
            "ties (per tensor, mergekit)": "merge_method: ties\n",
            "ties (global trim, 3 passes)": "merge_method: ties\njmerge: {trim: global}\n",
        }
        rows = []
        runs = [(name, text, False) for name, text in configs.items()]
        if not args.skip_in_memory:
            runs.append(("task_arithmetic", configs["task_arithmetic"], True))
        for name, text, in_memory in runs:
            cfg = root / "config.yaml"
            cfg.write_text(f"models:\n{models}base_model: {root / 'base'}\n{text}dtype: float32\n")
            out = root / "out"
            cmd = [sys.executable, "-m", "jmerge.cli", "run", str(cfg), str(out), "--force", "--no-progress"]
            cmd += ["--in-memory"] if in_memory else []
            seconds, rss, status = run_child(cmd)
            size = hf_dir.dir_size(out) if out.exists() else 0
            mode = "in memory" if in_memory else "streamed"
            rows.append((name, mode, seconds, rss, size, status))
            print(f"{name:32s} {mode:10s} {seconds:7.1f} s  peak RSS {rss / 2**20:8.0f} MiB  output {size / 1e9:.2f} GB  exit {status}")
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cap = args.cap_mb * 2**20
    lines = [
        "# Streaming merge benchmark",
        "",
        "Command: `" + " ".join([".venv/bin/python -m bench.streaming_bench", *(argv if argv is not None else sys.argv[1:])]) + "`",
        "",
        f"Inputs: base + {args.experts} experts, each {args.tensors} float32 {args.side}x{args.side} matrices "
        f"(+ a bias), {input_bytes / 1e9:.2f} GB together on disk. Memory budget: {args.cap_mb} MiB "
        f"(the inputs are {input_bytes / cap:.1f}x the budget). Each run is `jmerge run CONFIG OUT` in a child "
        "process; peak RSS is the child's `ru_maxrss` from `os.wait4` (memory-mapped input pages included). "
        f"Machine: 2 CPU cores, 24 GiB; load average at the end {os.getloadavg()[0]:.1f}, this benchmark's own "
        "processes included.",
        "",
        "| merge | mode | wall time | peak RSS | under budget | output |",
        "|---|---|---|---|---|---|",
    ]
    for name, mode, seconds, rss, size, status in rows:
        ok = "yes" if rss < cap else "no"
        lines.append(
            f"| {name} | {mode} | {seconds:.1f} s | {rss / 2**20:.0f} MiB | {ok} | {size / 1e9:.2f} GB"
            + ("" if status == 0 else f" (exit {status})") + " |"
        )
    lines += [
        "",
        "Peak RSS includes the Python interpreter and the JAX runtime (about 250 MiB before any tensor is read).",
        "",
    ]
    write_report(args.out, "\n".join(lines))
    streamed = [r for r in rows if r[1] == "streamed"]
    return 0 if all(r[5] == 0 and r[3] < cap for r in streamed) else 1


if __name__ == "__main__":
    sys.exit(main())
