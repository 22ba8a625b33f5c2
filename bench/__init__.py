

def write_report(path, text: str) -> None:
    """Writes a benchmark's results file atomically (replacing the previous one) and says so."""
    from pathlib import Path

    from jmerge._util import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    print(f"wrote {path}")


def table_report(path, title: str, module: str, argv, about: str, header, rows) -> None:
    """A results file of one table: title, the command that made it (``python -m module argv``),
    what was measured, then ``header`` and the ``rows`` (markdown table lines)."""
    import sys

    command = " ".join([f".venv/bin/python -m {module}", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# {title}", "", f"Command: `{command}`", "", about, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header), *rows, ""]
    write_report(path, "\n".join(lines))
