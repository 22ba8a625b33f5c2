

def write_report(path, text: str) -> None:
    """Writes a benchmark's results file atomically (replacing the previous one) and says so."""
    from pathlib import Path

    from jmerge._util import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    print(f"wrote {path}")
