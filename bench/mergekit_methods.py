"""jmerge vs mergekit 0.1.5 on one tiny float32 config per method or config key: max |difference|.

Writes a 2-layer GPT-2 (``n_embd`` 16, vocab 64; float32 safetensors, random values) as base
plus three experts (dense deltas of scale 1e-2, or sparse ones for RAM), runs every config of
:data:`CASES` through ``mergekit-yaml`` (in the venv of :mod:`bench.mergekit_bench`) and
``jmerge run``, and compares the outputs tensor by tensor (:func:`bench.mergekit_bench.compare`).

    .venv/bin/python -m bench.mergekit_methods            # writes bench/results/mergekit_methods.md
    .venv/bin/python -m bench.mergekit_methods --only sce nuslerp
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.mergekit_bench import VENV, compare, ensure_mergekit, versions
from jmerge.io import safetensors_io as st
from bench import table_report

RESULTS = Path(__file__).parent / "results" / "mergekit_methods.md"
TINY = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 16}


def tiny_shapes() -> dict[str, tuple[int, ...]]:
    d, v, p = TINY["n_embd"], TINY["vocab_size"], TINY["n_positions"]
    shapes = {"wte.weight": (v, d), "wpe.weight": (p, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(TINY["n_layer"]):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (d,), h + "ln_1.bias": (d,), h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
            h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_attn.bias": (3 * d,),
            h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
            h + "mlp.c_fc.weight": (d, 4 * d), h + "mlp.c_fc.bias": (4 * d,),
            h + "mlp.c_proj.weight": (4 * d, d), h + "mlp.c_proj.bias": (d,),
        })
    return shapes


def make_models(root: Path, sparse: bool, seed: int = 0) -> None:
    """``root/{base,e0,e1,e2}``: base ~ 0.1 N(0,1), experts base + 1e-2 N(0,1) (on a random 30 % of
    the entries when ``sparse``, as RL fine-tunes change few weights)."""
    r = np.random.default_rng(seed)
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_ctx": TINY["n_positions"], **TINY}
    shapes = tiny_shapes()
    base = {n: (0.1 * r.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
    models = {"base": base}
    for i in range(3):
        delta = {n: (0.01 * r.standard_normal(b.shape)).astype(np.float32) for n, b in base.items()}
        if sparse:
            delta = {n: np.where(r.random(x.shape) < 0.3, x, 0).astype(np.float32) for n, x in delta.items()}
        models[f"e{i}"] = {n: base[n] + delta[n] for n in base}
    for name, tensors in models.items():
        (root / name).mkdir()
        st.save_safetensors(root / name, tensors)
        (root / name / "config.json").write_text(json.dumps(config))


W = "    parameters: {weight: %s}\n"
# (name, uses sparse models, config body without dtype); models e0, e1, e2 and base (made absolute when run)
CASES: list[tuple[str, bool, str]] = [
    ("della_linear", False, "models:\n  - model: e0\n    parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}\n"
     "  - model: e1\n    parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}\nbase_model: base\nmerge_method: della_linear\n"),
    ("sce", False, "models:\n  - model: e0\n  - model: e1\n  - model: e2\nbase_model: base\nmerge_method: sce\n"
     "parameters: {select_topk: 0.5}\n"),
    ("nearswap", False, "models:\n  - model: e0\nbase_model: base\nmerge_method: nearswap\nparameters: {t: 0.005}\n"),
    ("arcee_fusion", False, "models:\n  - model: e0\nbase_model: base\nmerge_method: arcee_fusion\n"),
    ("karcher", False, "models:\n  - model: e0\n  - model: e1\n  - model: e2\nmerge_method: karcher\n"),
    ("karcher with base_model", False, "models:\n  - model: e0\n  - model: e1\nbase_model: base\nmerge_method: karcher\n"),
    ("nuslerp (no base)", False, "models:\n  - model: e0\n" + W % 1.0 + "  - model: e1\n" + W % 0.5
     + "merge_method: nuslerp\n"),
    ("nuslerp (base, row-wise)", False, "models:\n  - model: e0\n" + W % 1.0 + "  - model: e1\n" + W % 0.5
     + "base_model: base\nmerge_method: nuslerp\nparameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n"),
    ("ram", True, "models:\n  - model: e0\n  - model: e1\n  - model: e2\nbase_model: base\nmerge_method: ram\n"),
    ("ramplus_tl", True, "models:\n  - model: e0\n  - model: e1\n  - model: e2\nbase_model: base\n"
     "merge_method: ramplus_tl\nparameters: {r: 0.5, alpha: 0.5}\n"),
    ("multislerp (no base)", False, "models:\n  - model: e0\n" + W % 1.0 + "  - model: e1\n" + W % 2.0
     + "merge_method: multislerp\n"),
    ("linear normalize: false", False, "models:\n  - model: e0\n" + W % 0.7 + "  - model: e1\n" + W % 0.6
     + "merge_method: linear\nparameters: {normalize: false}\n"),
    ("ties rescale: true", False, "models:\n  - model: e0\n    parameters: {weight: 1.0, density: 0.3}\n"
     "  - model: e1\n    parameters: {weight: 0.5, density: 0.3}\nbase_model: base\nmerge_method: ties\n"
     "parameters: {rescale: true}\n"),
    ("slerp with per-model weight", False, "models:\n  - model: base\n" + W % 1.0 + "  - model: e0\n" + W % 1.0
     + "base_model: base\nmerge_method: slerp\nparameters: {t: 0.3}\n"),
    ("model_stock with per-model weight", False, "models:\n  - model: e0\n" + W % 1.0 + "  - model: e1\n" + W % 1.0
     + "  - model: e2\n" + W % 1.0 + "base_model: base\nmerge_method: model_stock\n"),
    ("ties, base_model among models", False, "models:\n  - model: base\n" + W % 1.0 + "  - model: e0\n    parameters: "
     "{weight: 1.0, density: 0.5}\n  - model: e1\n    parameters: {weight: 1.0, density: 0.5}\nbase_model: base\n"
     "merge_method: ties\n"),
]


STOCHASTIC = {"della_linear"}


def changed_fraction(out: Path, base: Path) -> float:
    """Fraction of all entries of ``out`` that differ from ``base`` (names as in :func:`compare`)."""
    co, cb = st.open_checkpoint(out), st.open_checkpoint(base)
    changed = total = 0
    for n in co.tensors:
        x, b = co.read(n), cb.read(n.removeprefix("transformer."))
        changed += int(np.count_nonzero(x != b))
        total += x.size
    return changed / total


def run(cmd: list[str], cwd: Path) -> tuple[int, str]:
    """``(exit code, stderr then stdout)`` of ``cmd`` run in ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    return p.returncode, (p.stderr + p.stdout).strip() or "(no output)"


def run_cases(mergekit_yaml: Path, cases) -> list[tuple[str, dict | None, str, list[str]]]:
    """Runs each ``(name, sparse, body)`` case through both tools: ``(name, comparison or None
    when a tool failed, table cells, jmerge's ConfigWarning lines)`` per case."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="jmerge-mergekit-methods-") as tmp:
        for sparse in (False, True):
            (Path(tmp) / f"models-{int(sparse)}").mkdir()
            make_models(Path(tmp) / f"models-{int(sparse)}", sparse)
        for name, sparse, body in cases:
            root = Path(tmp) / f"models-{int(sparse)}"
            cfg = root / "config.yaml"
            absolute = re.sub(r"(model: )(\./)?(\w+)", lambda m: f"{m[1]}{root}/{m[2] or ''}{m[3]}", body)
            cfg.write_text(absolute + "dtype: float32\n")
            results = {}
            for tool, cmd in (
                ("mergekit", [str(mergekit_yaml), str(cfg), str(root / "out-mergekit"), "--allow-crimes"]),
                ("jmerge", [sys.executable, "-m", "jmerge.cli", "run", str(cfg), str(root / "out-jmerge"), "--no-progress"]),
            ):
                subprocess.run(["rm", "-rf", str(root / f"out-{tool}")], check=True)
                results[tool] = run(cmd, root)
            cmp = None
            if all(code == 0 for code, _ in results.values()):
                cmp = compare(root / "out-mergekit", root / "out-jmerge")
                total = sum(int(np.prod(s)) for s in tiny_shapes().values())
                outcome = f"{cmp['max']:.2e} | {cmp['differing']} of {total}"
                if name in STOCHASTIC:
                    outcome += " (random masks; entries changed from the base: mergekit {:.3f}, jmerge {:.3f})".format(
                        *(changed_fraction(root / f"out-{t}", root / "base") for t in ("mergekit", "jmerge")))
                if cmp["only"]:
                    outcome += f" ({len(cmp['only'])} names in one output only)"
            else:
                outcome = "- | " + "; ".join(f"{t} failed: {msg.splitlines()[-1][:160]}" for t, (c, msg) in results.items() if c)
            warns = [ln for ln in results["jmerge"][1].splitlines() if "ConfigWarning" in ln] if results["jmerge"][0] == 0 else []
            rows.append((name, cmp, outcome, warns))
            print(f"{name:36s} {outcome}", *warns, sep="\n    " if warns else "", flush=True)
    return rows


def parse_args(doc: str, results: Path, cases: list, argv) -> tuple[argparse.Namespace, list]:
    """``--venv``, ``--only`` (case names starting with these words), ``--out``: the args and the chosen cases."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--only", nargs="*", help="case names starting with these words")
    p.add_argument("--out", type=Path, default=results)
    args = p.parse_args(argv)
    return args, [c for c in cases if not args.only or any(c[0].startswith(o) for o in args.only)]


def main(argv=None) -> int:
    args, cases = parse_args(__doc__, RESULTS, CASES, argv)
    rows = run_cases(ensure_mergekit(args.venv), cases)
    table_report(
        args.out, "jmerge vs mergekit: one tiny float32 config per method / config key", "bench.mergekit_methods", argv,
        f"{versions(args.venv)}. Models: a 2-layer GPT-2 (n_embd 16, vocab 64), base ~ 0.1 N(0,1), experts "
        "base + 0.01 N(0,1) (RAM rows: on 30 % of the entries). `dtype: float32`.",
        ["case", "max abs difference (mergekit vs jmerge)", "entries differing by > 1e-6"],
        (f"| {n} | {o} |" for n, _, o, _ in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
