"""``jmerge methods``: every registered method, its mergekit names, hyper-parameters and reference."""

from __future__ import annotations

import argparse

from jmerge.cli._output import console


def add_parser(sub, fmt) -> None:
    meth = sub.add_parser("methods", help="list merge methods and their hyper-parameters")
    meth.set_defaults(func=cmd_methods)


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.table import Table

    from jmerge.methods import registry

    table = Table(title="jmerge merge methods")
    table.add_column("method", no_wrap=True)  # names are what users type: never truncated
    table.add_column("mergekit name", no_wrap=True)
    table.add_column("hyper-parameters (defaults; * per model)")
    table.add_column("streamed")
    table.add_column("reference")
    for name in registry.available():
        m = registry.get(name)
        hp = ", ".join(f"{k}{'*' if k in m.per_model else ''}={v!r}" for k, v in m.defaults.items())
        table.add_row(name, m.mergekit.name if m.mergekit else "", hp, "yes" if m.streamable else "no", m.reference)
    console(stdout=True).print(table)
    return 0
