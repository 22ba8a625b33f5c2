"""jmerge's cache directory and JAX's persistent compilation cache inside it.

``$JMERGE_CACHE_DIR`` (default ``~/.cache/jmerge``) holds fine-tuned experts of the
experiments, data sets and, under ``xla/``, compiled XLA programs. With the compilation cache
on, a later process reuses the programs an earlier one compiled: a streamed merge compiles
one program per distinct tensor shape (9 for GPT-2).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_root() -> Path:
    """``$JMERGE_CACHE_DIR``, or ``~/.cache/jmerge``."""
    return Path(os.environ.get("JMERGE_CACHE_DIR", Path.home() / ".cache" / "jmerge"))


def enable_compilation_cache(min_compile_seconds: float = 0.0) -> Path:
    """Turns on JAX's persistent compilation cache in ``cache_root() / "xla"`` for programs
    that took at least ``min_compile_seconds`` to compile (JAX's default, 1 s, would skip the
    many small per-shape programs of a streamed merge). Returns the directory."""
    directory = cache_root() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return directory
