"""Writing a study's rows: machine-readable JSON plus a markdown table, atomically.

    write_rows("lwptv", rows, suite="V", columns=["suite", "method", "lwptv", "id_acc", "ood_acc"],
               title="LwPTV on Suite V", command="python -m experiments.study_lwptv --suite V")

writes ``experiments/results/lwptv.json`` (every suite's rows: those of other suites already
in the file are kept, this suite's are replaced) and ``lwptv_v.md`` (a title, the command that
produced it, and a table of ``columns``; floats with 2 decimals). Suite T's files carry no
suffix (``lwptv.md``); other suites' markdown, plots and raw files get ``_<suite>``
(:func:`suite_stem`).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Sequence

from jmerge._util import atomic_write

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


def suite_stem(stem: str, suite: str) -> str:
    """``stem`` for suite T, ``<stem>_<suite>`` (lower case) for the others."""
    return stem if suite == "T" else f"{stem}_{suite.lower()}"


def _other_suites_rows(path: Path, suite: str, overwrite: bool) -> list[dict]:
    """The rows of ``path`` (a JSON list) whose suite is not ``suite``; raises if ``suite``
    already has rows there and ``overwrite`` is off."""
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    if not overwrite and any(r.get("suite") == suite for r in rows):
        raise FileExistsError(f"{path} already holds suite {suite} rows; pass --overwrite to replace them")
    return [r for r in rows if r.get("suite") != suite]


def check_study_writable(directory: str | os.PathLike, stem: str, suite: str, suffixes: Sequence[str],
                         overwrite: bool) -> None:
    """Raises before any work if ``<stem>.json`` holds rows of ``suite`` or one of this suite's
    files ``suite_stem(stem, suite) + suffix`` exists, unless ``overwrite``."""
    _other_suites_rows(Path(directory) / f"{stem}.json", suite, overwrite)
    check_writable(directory, [suite_stem(stem, suite) + s for s in suffixes], overwrite)


def check_writable(directory: str | os.PathLike, names: Sequence[str], overwrite: bool) -> None:
    """Raises before any work if one of ``names`` exists in ``directory`` and ``overwrite`` is off."""
    existing = [n for n in names if (Path(directory) / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist in {directory}; pass --overwrite to replace them")


def _write_atomic(path: Path, text: str, overwrite: bool) -> None:
    check_writable(path.parent, [path.name], overwrite)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)


def _directory(directory: str | os.PathLike | None) -> Path:
    """``directory``, or :data:`RESULTS_DIR` as it is at call time (tests point it elsewhere)."""
    return Path(RESULTS_DIR if directory is None else directory)


def write_json(stem: str, rows, *, directory: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Writes ``<directory>/<stem>.json`` atomically (``directory`` None: :data:`RESULTS_DIR`, read
    at call time); returns its path."""
    path = _directory(directory) / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(list(rows), indent=1) + "\n", overwrite)
    return path


def load_folds(stem: str) -> list[dict]:
    """The per-fold rows stored in ``RESULTS_DIR/<stem>.json``, or [] before the first."""
    path = RESULTS_DIR / f"{stem}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def save_folds(stem: str, new: Sequence[dict], key) -> None:
    """Adds ``new`` folds to ``RESULTS_DIR/<stem>.json`` as soon as they exist, replacing stored
    folds with the same ``key(fold)``; runs in parallel add to one file, so the file is re-read
    and rewritten under an exclusive ``flock`` of the results directory."""
    done = {key(f) for f in new}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(RESULTS_DIR, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        write_json(stem, [f for f in load_folds(stem) if key(f) not in done] + list(new), overwrite=True)
    finally:
        os.close(fd)  # releases the lock


def save_figure(fig, path: str | os.PathLike) -> None:
    """Saves a matplotlib figure as PNG atomically (callers check overwriting up front)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), overwrite=True)


def write_rows(stem: str, rows: Sequence[dict], *, suite: str, columns: Sequence[str], title: str, command: str,
               notes: str = "", directory: str | os.PathLike | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """Merges ``rows`` (all of ``suite``) into ``<directory>/<stem>.json`` and writes their
    table to ``<suite_stem>.md``; returns both paths."""
    directory = _directory(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unknown = sorted({c for c in columns} - {k for r in rows for k in r})
    if rows and unknown:
        raise ValueError(f"columns {unknown} appear in no row (row keys: {sorted(rows[0])})")
    md = f"# {title}\n\nCommand: `{command}`\n\n" + (notes.strip() + "\n\n" if notes else "")
    md += markdown_table(rows, columns)
    if any(r.get("suite") != suite for r in rows):
        raise ValueError(f"every row must have suite {suite!r}")
    md_path = directory / f"{suite_stem(stem, suite)}.md"
    check_writable(directory, [md_path.name], overwrite)
    kept = _other_suites_rows(directory / f"{stem}.json", suite, overwrite)
    json_path = write_json(stem, kept + list(rows), directory=directory, overwrite=True)
    _write_atomic(md_path, md, overwrite)
    return json_path, md_path
