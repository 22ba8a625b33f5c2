"""``jmerge run CONFIG OUT.gguf --out-format gguf``: the merge into an HF directory beside the
output, then written as one GGUF file (:func:`jmerge.io.gguf.from_hf`)."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Callable


def run_to_gguf(args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    """``run`` (``jmerge run``'s command) merges into a temporary HF directory beside
    ``args.out``, which is then written as one GGUF file: the base's GGUF metadata kept when the
    base is a GGUF, the config recorded under ``jmerge.*`` keys."""
    from jmerge import __version__, config
    from jmerge.io import gguf as gguf_io
    from jmerge.io import hf_dir

    hf_dir.refuse_existing(args.out, args.force, "pass --force")
    plan = config.plan_from_yaml(args.config)
    quant = args.quant or "f32"
    if quant.lower() not in gguf_io.QUANTS:
        raise gguf_io.GGUFError(f"unsupported GGUF output type {args.quant!r}; choose one of {', '.join(gguf_io.QUANTS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{args.out.name}.hf-", dir=args.out.parent) as tmp:
        inner = copy.copy(args)
        inner.out, inner.out_format, inner.quant, inner.force = Path(tmp) / "merged", "hf", None, False
        status = run(inner)
        if status:
            return status
        info = gguf_io.from_hf(inner.out, args.out, quant=quant, template=plan.base,
                               record={"version": __version__, "config": plan.config_text, "method": plan.method,
                                       "base": str(plan.base), "models": json.dumps([str(e) for e in plan.experts])},
                               force=args.force)
    print(f"wrote {args.out} (GGUF {quant}: {info['tensors']} tensors, {info['types']}, "
          f"{info['fallback_f16']} stored F16 for block size)")
    return 0
