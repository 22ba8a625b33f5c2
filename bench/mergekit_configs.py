"""jmerge vs mergekit 0.1.5 on mergekit's own test configs and config keys, on tiny random
Llama, Mistral, Qwen2 and GPT-2 models: max |difference| per output, and config.json.

The models are made in mergekit's venv by transformers (as mergekit's ``tests/common.py``
makes its ``picollama``; 6 layers, hidden size 32, vocab 64, float32): a random base per
architecture and three experts = base + 0.01 N(0, 1). Each config of :data:`CASES` runs through
mergekit's ``run_merge`` (one process for all, :mod:`bench._mergekit_driver`) and through
``jmerge run`` (in this process); the outputs are compared tensor by tensor
(:func:`bench.mergekit_bench.compare`) and by their config.json layer count and dtype.

    .venv/bin/python -m bench.mergekit_configs            # writes bench/results/mergekit_configs.md
    .venv/bin/python -m bench.mergekit_configs --only slices
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from bench import table_report
from bench.mergekit_bench import compare, ensure_mergekit, versions
from bench.mergekit_methods import parse_args

RESULTS = Path(__file__).parent / "results" / "mergekit_configs.md"
DRIVER = Path(__file__).parent / "_mergekit_driver.py"
LAYER_KEYS = ("num_hidden_layers", "n_layer")


def two(method: str, base: str | None = "base", params: str = "") -> str:
    """mergekit's ``two_model_config`` (tests/test_basic_merges.py): e0 weight 0.6, e1 weight 0.4."""
    text = (f"merge_method: {method}\nmodels:\n  - model: e0\n    parameters: {{weight: 0.6}}\n"
            "  - model: e1\n    parameters: {weight: 0.4}\n")
    return text + (f"base_model: {base}\n" if base else "") + (f"parameters: {params}\n" if params else "")


def src(model: str, lo: int, hi: int, params: str = "") -> str:
    return f"      - model: {model}\n        layer_range: [{lo}, {hi}]\n" + (f"        parameters: {params}\n" if params else "")


GRADIENT_T = ("parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
              "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n")

# (name, architecture, config body without dtype, dtypes to run it in, kind): kind "exact" (deterministic),
# "random" (DARE/DELLA masks: different generators)
CASES: list[tuple[str, str, str, tuple[str, ...], str]] = [
    # mergekit's tests/test_basic_merges.py (mergekit runs them in bfloat16)
    ("passthrough: copy", "gpt2", "merge_method: passthrough\nmodels:\n  - model: e0\n", ("bfloat16", "float32"), "exact"),
    ("passthrough: stack, slices [0, 6] x 2", "gpt2",
     "merge_method: passthrough\nslices:\n  - sources:\n" + src("e0", 0, 6) + "  - sources:\n" + src("e0", 0, 6),
     ("bfloat16", "float32"), "exact"),
    ("passthrough: scale with filter (o_proj: 0)", "llama",
     "merge_method: passthrough\nmodels:\n  - model: e0\n    parameters:\n      scale:\n        - filter: o_proj\n"
     "          value: 0\n        - value: 1\n", ("float32",), "exact"),
    ("linear", "llama", two("linear", None), ("bfloat16", "float32"), "exact"),
    ("slerp t 0.35", "llama", two("slerp", "e0", "{t: 0.35}"), ("bfloat16", "float32"), "exact"),
    ("task_arithmetic", "llama", two("task_arithmetic"), ("bfloat16", "float32"), "exact"),
    ("breadcrumbs", "llama", two("breadcrumbs"), ("bfloat16", "float32"), "exact"),
    ("ties density 0.3", "llama", two("ties", params="{density: 0.3}"), ("bfloat16", "float32"), "exact"),
    ("dare_ties density 0.66", "llama", two("dare_ties", params="{density: 0.66}"), ("float32",), "random"),
    ("model_stock", "llama", two("model_stock", "e2"), ("bfloat16", "float32"), "exact"),
    ("model_stock filter_wise", "llama", two("model_stock", "e2", "{filter_wise: true}"), ("float32",), "exact"),
    # every other method, float32
    ("breadcrumbs_ties", "mistral", two("breadcrumbs_ties", params="{density: 0.5, gamma: 0.05}"), ("float32",), "exact"),
    ("dare_linear", "mistral", two("dare_linear", params="{density: 0.5}"), ("float32",), "random"),
    ("della", "mistral", two("della", params="{density: 0.5, epsilon: 0.1}"), ("float32",), "random"),
    ("della_linear", "mistral", two("della_linear", params="{density: 0.5, epsilon: 0.1}"), ("float32",), "random"),
    ("multislerp", "mistral", two("multislerp"), ("float32",), "exact"),
    ("sce", "qwen2", two("sce", params="{select_topk: 0.5}"), ("float32",), "exact"),
    ("nearswap", "qwen2", "merge_method: nearswap\nmodels:\n  - model: e0\nbase_model: base\nparameters: {t: 0.005}\n",
     ("float32",), "exact"),
    ("arcee_fusion", "qwen2", "merge_method: arcee_fusion\nmodels:\n  - model: e0\nbase_model: base\n", ("float32",), "exact"),
    ("karcher", "qwen2", two("karcher", None), ("float32",), "exact"),
    ("nuslerp", "qwen2", two("nuslerp"), ("float32",), "exact"),
    ("ram", "gpt2", two("ram"), ("float32",), "exact"),
    ("ramplus_tl", "gpt2", two("ramplus_tl"), ("float32",), "exact"),
    # config keys: slices, gradients, filters, dtypes
    ("slices: frankenmerge e0 [0, 4] + e1 [2, 6]", "llama",
     "merge_method: passthrough\nslices:\n  - sources:\n" + src("e0", 0, 4) + "  - sources:\n" + src("e1", 2, 6),
     ("bfloat16", "float32"), "exact"),
    ("slices: frankenmerge e0 [0, 4] + e1 [2, 6] (Qwen2: layer_types)", "qwen2",
     "merge_method: passthrough\nslices:\n  - sources:\n" + src("e0", 0, 4) + "  - sources:\n" + src("e1", 2, 6),
     ("float32",), "exact"),
    ("slices + gradient t with filters (examples/gradient-slerp.yml)", "mistral",
     "merge_method: slerp\nbase_model: e0\nslices:\n  - sources:\n" + src("e0", 0, 6) + src("e1", 0, 6) + GRADIENT_T,
     ("bfloat16", "float32"), "exact"),
    ("slices: two slices, ties with a density gradient per slice", "qwen2",
     "merge_method: ties\nbase_model: base\nslices:\n  - sources:\n" + src("base", 0, 3) + src("e0", 0, 3, "{weight: 1.0}")
     + src("e1", 0, 3, "{weight: 0.5}") + "    parameters: {density: [0.2, 0.8]}\n  - sources:\n" + src("base", 3, 6)
     + src("e0", 3, 6, "{weight: 0.5}") + src("e1", 3, 6, "{weight: 1.0}") + "    parameters: {density: 0.6}\n",
     ("float32",), "exact"),
    ("models: weight gradient + filter", "gpt2",
     "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: e0\n    parameters:\n      weight:\n"
     "        - filter: mlp\n          value: [0, 1]\n        - value: 0.5\n  - model: e1\n    parameters: {weight: [1, 0.2]}\n",
     ("float32",), "exact"),
    ("dtype bfloat16, out_dtype float32", "llama", two("linear", None) + "out_dtype: float32\n", ("bfloat16",), "exact"),
    ("ties in float16", "llama", two("ties", params="{density: 0.3}"), ("float16",), "exact"),
]


def _absolute(body: str, root: Path) -> str:
    return re.sub(r"(model: )(\w+)\n", lambda m: f"{m[1]}{root / m[2]}\n", body)


def _layers_and_dtype(out: Path) -> tuple:
    cfg = json.loads((out / "config.json").read_text())
    return next((cfg[k] for k in LAYER_KEYS if k in cfg), None), cfg.get("dtype", cfg.get("torch_dtype"))


def _jmerge(cfg: Path, out: Path) -> tuple[bool, str]:
    """``jmerge run`` in this process: (ok, its error or warnings)."""
    from jmerge import cli

    err = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        code = cli.main(["run", str(cfg), str(out), "--no-progress"])
    text = " ".join(err.getvalue().split()) if code else "; ".join(sorted({
        re.sub(r"models\[[^\]]*/(\w+)\]", r"models[\1]", str(w.message)) for w in caught
        if "Config" in type(w.message).__name__}))
    return code == 0, text


def run_cases(venv: Path, cases) -> list[dict]:
    """Every ``(case, dtype)`` through both tools: one result row each."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="jmerge-mergekit-configs-") as tmp:
        tmp = Path(tmp)
        subprocess.run([str(venv / "bin" / "python"), str(DRIVER), "make", str(tmp)], check=True, capture_output=True)
        jobs, todo = [], []
        for i, (name, arch, body, dtypes, kind) in enumerate(cases):
            for dtype in dtypes:  # low precision: also with jmerge's switch to mergekit's input rounding
                for compute in ("float32",) if dtype == "float32" else ("float32", "model"):
                    cfg = tmp / f"case{i}-{dtype}-{compute}.yaml"
                    cfg.write_text(_absolute(body, tmp / arch) + f"dtype: {dtype}\njmerge: {{compute_dtype: {compute}}}\n")
                    jobs.append([str(cfg), str(cfg.with_name(cfg.stem + "-mergekit"))])
                    todo.append((name, arch, dtype, compute, kind, cfg))
        (tmp / "jobs.json").write_text(json.dumps(jobs))
        p = subprocess.run([str(venv / "bin" / "python"), str(DRIVER), "merge", str(tmp / "jobs.json")],
                           capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        status = {s["config"]: s for s in map(json.loads, filter(None, p.stdout.splitlines()))}
        for name, arch, dtype, compute, kind, cfg in todo:
            mk = status.get(str(cfg), {"ok": False, "error": f"mergekit crashed: {p.stderr[-300:]}"})
            jm_out = cfg.with_name(cfg.stem + "-jmerge")
            ok, note = _jmerge(cfg, jm_out)
            row = {"case": name, "arch": arch, "dtype": dtype, "compute": compute, "kind": kind,
                   "mergekit": mk.get("error", "ok"),
                   "jmerge": "ok" if ok else note, "warnings": note if ok else ""}
            if mk["ok"] and ok:
                mk_out = cfg.with_name(cfg.stem + "-mergekit")
                row.update(compare(mk_out, jm_out))
                row["config"] = (_layers_and_dtype(mk_out), _layers_and_dtype(jm_out))
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    if "max" not in row:
        outcome = "; ".join(f"{t} failed: {row[t]}" for t in ("mergekit", "jmerge") if row[t] != "ok")
        return f"| {row['case']} | {row['arch']} | {row['dtype']} | {row['compute']} | - | - | - | - | {outcome} |"
    (mk_layers, mk_dtype), (jm_layers, jm_dtype) = row["config"]
    cfg = "same" if (mk_layers, mk_dtype) == (jm_layers, jm_dtype) else \
        f"mergekit {mk_layers} layers {mk_dtype}, jmerge {jm_layers} {jm_dtype}"
    only = f"; {len(row['only'])} names in one output only" if row["only"] else ""
    note = (row["warnings"] + only).strip("; ")
    return (f"| {row['case']} | {row['arch']} | {row['dtype']} | {row['compute']} | {row['max']:.2e} | {row['differing']} "
            f"| {row['bits']} | {cfg} | "
            f"{'random masks; ' if row['kind'] == 'random' else ''}{note} |")


def main(argv=None) -> int:
    args, cases = parse_args(__doc__, RESULTS, CASES, argv)
    rows = run_cases(ensure_mergekit(args.venv).parents[1], cases)
    table_report(
        args.out, "jmerge vs mergekit on mergekit's test configs and config keys, tiny real architectures",
        "bench.mergekit_configs", argv,
        f"{versions(args.venv)}. Models: transformers' Llama, Mistral, Qwen2 and GPT-2 with 6 layers, hidden size 32, "
        "vocab 64 (random init), float32; experts = base + 0.01 N(0,1). `dtype` is each row's; low-precision rows run "
        "jmerge twice: its default (float32 inputs, rounded once) and `jmerge: {compute_dtype: model}` (inputs "
        "rounded to `dtype` first, as mergekit loads them). Entries per model: Llama 56736, Mistral 50592, Qwen2 "
        "50976, GPT-2 79360.",
        ["case", "architecture", "dtype", "jmerge compute_dtype", "max abs difference", "entries differing by > 1e-6",
         "entries whose bits differ",
         "config.json (layers, dtype)", "notes (jmerge's ConfigWarnings)"],
        map(_line, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
