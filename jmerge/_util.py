"""Small helpers written once: the "did you mean" hint, the refusal to replace an existing output,
atomic file writes, the registry of module caches, the progress bar."""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

_CACHE_CLEARS: list[Callable[[], None]] = []


def did_you_mean(name, known: Iterable, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known if k is not None], n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


def register_cache(clear: Callable[[], None]) -> Callable[[], None]:
    """Registers a module-level cache's ``clear`` with :func:`clear_caches` (as equinox does)."""
    _CACHE_CLEARS.append(clear)
    return clear


def clear_caches() -> None:
    """Empties every module-level cache of jmerge: compiled merges, searches, scores and
    learning steps, and in-memory learning targets (files on disk stay)."""
    for clear in _CACHE_CLEARS:
        clear()


class OutputError(OSError):
    """The output cannot be written (exists, unwritable, disk full); nothing was left behind."""


def refuse_existing(out: str | os.PathLike, force: bool, how: str = "pass --force (force=True)") -> None:
    """Raises :class:`OutputError` if ``out`` exists (or is a dangling link) and not ``force``."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputError(f"output {out} already exists; {how} to replace it")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, overwrite: bool = False) -> Path:
    """Calls ``write(tmp_path)``, syncs and renames ``tmp_path`` to ``path``: readers see the old
    file or the whole new one, never a part. Refuses to replace an existing ``path`` unless
    ``overwrite`` (:func:`refuse_existing`). The temporary file sits beside ``path`` and keeps its suffix."""
    path = Path(path)
    refuse_existing(path, overwrite, "pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def progress_bar(*, disable: bool = False, transient: bool = True, loss: bool = False):
    """jmerge's one progress bar (rich, on stderr): description, bar, n/total, elapsed time, and with
    ``loss=True`` the time remaining and each task's ``loss`` field."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if loss:
        columns += [TimeRemainingColumn(), TextColumn("loss {task.fields[loss]:.5g}")]
    return Progress(*columns, console=Console(stderr=True, highlight=False), transient=transient, disable=disable)
