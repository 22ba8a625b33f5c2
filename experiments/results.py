"""Writing a study's rows: machine-readable JSON plus a markdown table, atomically.

    write_rows("lwptv", rows, columns=["suite", "method", "lwptv", "id_acc", "ood_acc"],
               title="LwPTV on Suite T", command="python -m experiments.study_lwptv", overwrite=True)

writes ``experiments/results/lwptv.json`` (the rows as given) and ``lwptv.md`` (a title, the
command that produced it, and a table of ``columns``; floats with 2 decimals).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.2f}"
    if isinstance(x, (list, tuple)):
        return ", ".join(map(str, x))
    return "-" if x is None else str(x)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A GitHub-style pipe table of ``columns`` (missing values shown as ``-``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def check_writable(directory: str | os.PathLike, names: Sequence[str], overwrite: bool) -> None:
    """Raises before any work if one of ``names`` exists in ``directory`` and ``overwrite`` is off."""
    existing = [n for n in names if (Path(directory) / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist in {directory}; pass --overwrite to replace them")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_atomic(path: Path, text: str, overwrite: bool) -> None:
    check_writable(path.parent, [path.name], overwrite)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(stem: str, rows, *, directory: str | os.PathLike = RESULTS_DIR, overwrite: bool = False) -> Path:
    """Writes ``<directory>/<stem>.json`` atomically; returns its path."""
    path = Path(directory) / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(list(rows), indent=1) + "\n", overwrite)
    return path


def save_figure(fig, path: str | os.PathLike) -> None:
    """Saves a matplotlib figure as PNG atomically (callers check overwriting up front)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def write_rows(stem: str, rows: Sequence[dict], *, columns: Sequence[str], title: str, command: str,
               notes: str = "", directory: str | os.PathLike = RESULTS_DIR, overwrite: bool = False) -> tuple[Path, Path]:
    """Writes ``<directory>/<stem>.json`` and ``<stem>.md``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unknown = sorted({c for c in columns} - {k for r in rows for k in r})
    if rows and unknown:
        raise ValueError(f"columns {unknown} appear in no row (row keys: {sorted(rows[0])})")
    md = f"# {title}\n\nCommand: `{command}`\n\n" + (notes.strip() + "\n\n" if notes else "")
    md += markdown_table(rows, columns)
    md_path = directory / f"{stem}.md"
    check_writable(directory, [f"{stem}.json", md_path.name], overwrite)
    json_path = write_json(stem, rows, directory=directory, overwrite=overwrite)
    _write_atomic(md_path, md, overwrite)
    return json_path, md_path
