"""What the commands print: results on stdout, progress and errors on stderr (rich)."""

from __future__ import annotations

import resource


def console(stdout: bool = False):
    """Results go to stdout; progress and errors to stderr."""
    from rich.console import Console

    return Console(stderr=not stdout, highlight=False)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def progress(disable: bool):
    from jmerge._util import progress_bar

    return progress_bar(disable=disable)
