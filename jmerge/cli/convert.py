"""``jmerge convert IN OUT``: Flax msgpack <-> PyTorch-layout safetensors, and GGUF both ways."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jmerge.cli._output import console, human

EXAMPLES = """\
examples:
  jmerge convert ./flax-model ./pt-model        # flax_model.msgpack -> PyTorch-layout safetensors
  jmerge convert ./pt-model ./flax-model        # model.safetensors(.index.json) -> flax_model.msgpack
  jmerge convert ./pt-model ./resharded --to safetensors --shard-size 1GB --dtype bfloat16
  jmerge convert model.gguf ./hf-model           # llama.cpp GGUF -> HF Llama directory (float32)
  jmerge convert ./hf-model out.gguf --quant q8_0   # f32, f16, bf16, q8_0, q4_0, q4_1
"""


def add_parser(sub, fmt) -> None:
    conv = sub.add_parser(
        "convert",
        help="convert between Flax msgpack, PyTorch-layout safetensors and GGUF",
        description="Convert a checkpoint (HF directory or file) between flax_model.msgpack and "
        "PyTorch-layout safetensors (kernels transposed, LayerNorm scale <-> weight, ...), or between a "
        "llama.cpp GGUF file and an HF Llama directory (see the examples). "
        "config.json and tokenizer files are copied.",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    conv.add_argument("src", type=Path, metavar="IN")
    conv.add_argument("dst", type=Path, metavar="OUT")
    conv.add_argument("--to", choices=("flax", "safetensors"), help="target format (default: the other one)")
    conv.add_argument("--model-type", help="config.json model_type, for PyTorch -> Flax names (default: read config.json)")
    conv.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast float tensors")
    conv.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default: %(default)s)")
    conv.add_argument("--quant", help="GGUF output type (OUT ending in .gguf): f32, f16, bf16, q8_0, q4_0, q4_1")
    conv.add_argument("--force", action="store_true", help="replace an existing OUT")
    conv.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from jmerge.io import flax_io
    from jmerge.io import hf_dir

    start = time.perf_counter()
    if args.src.suffix.lower() == ".gguf" or args.dst.suffix.lower() == ".gguf":
        from jmerge.io import gguf as gguf_io

        info = gguf_io.convert(args.src, args.dst, quant=args.quant, dtype=args.dtype, shard_size=args.shard_size, force=args.force)
    else:
        info = flax_io.convert(
            args.src, args.dst, to=args.to, model_type=args.model_type, force=args.force, shard_size=args.shard_size, dtype=args.dtype
        )
    console(stdout=True).print(
        f"converted {info['tensors']} tensors {info['from']} -> {info['to']} into {args.dst} "
        f"(model_type {info['model_type']}; copied {', '.join(info['copied']) or 'no other files'}) "
        f"in {time.perf_counter() - start:.2f} s, {human(hf_dir.dir_size(args.dst))}"
    )
    return 0
