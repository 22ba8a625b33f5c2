"""The ``jmerge`` command line: ``run`` a YAML merge, ``convert`` checkpoints, ``inspect`` task
vectors, list ``methods``; one module per command, each with its ``add_parser`` and ``cmd_*``.

``main(argv)`` returns the exit status (0 success, 2 bad input, 3 a numerical failure: a merge or a
learned fit that turned finite inputs into NaN/inf; 130 interrupted), so tests call it in-process.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jmerge.cli import convert, inspect, methods, run
from jmerge.cli._output import console


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="jmerge",
        formatter_class=fmt,
        description="Merge fine-tuned models of one base model (task arithmetic, TIES, DARE, SLERP, "
        "SVD merges, LwPTV, ...) on CPU, GPU or TPU, streaming tensors from disk.",
        epilog="Run `jmerge COMMAND --help` for a command's options and examples.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (run, convert, inspect, methods):
        command.add_parser(sub, fmt)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``jmerge`` command; returns the exit status."""
    from jmerge.io.hf_dir import OutputError
    from jmerge.validate import MergeInputError

    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (MergeInputError, OutputError, ValueError) as e:
        from rich.text import Text

        console().print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        return 2
    except FloatingPointError as e:  # jmerge.MergeOutputError, jmerge.learn.NonFiniteLossError
        from rich.text import Text

        console().print(Text.assemble(("numerical failure: ", "bold red"), str(e), "; no output was written"),
                        soft_wrap=True)
        return 3
    except KeyboardInterrupt:
        console().print("interrupted: no output was written", soft_wrap=True)
        return 130


def entry() -> None:
    """The console script: :func:`main` with JAX's persistent compilation cache on
    (``jmerge.cache``; tests call ``main`` and leave the cache alone)."""
    from jmerge.cache import enable_compilation_cache

    enable_compilation_cache()
    sys.exit(main())
