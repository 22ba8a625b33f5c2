"""Output directories and files: written atomically, never over what the user had unasked.

:func:`atomic_dir` builds an output directory in a temporary directory beside it and renames
it into place at the end: an interrupted or failed write (disk full, permissions) leaves no
half-written model, and an existing output is replaced only with ``force=True``, the new
directory being complete before the old one is removed. :func:`refuse_existing` (from
:mod:`jmerge._util`, where :func:`~jmerge._util.atomic_write` uses it) is the same check for
single-file outputs. The HF extras of a merged model directory: the base's ``config.json`` and
tokenizer files (:func:`copy_model_files`) and a model card recording the merge (:func:`model_card`).
:func:`write_dir` writes a model, ``(name, array)`` pairs streamed into safetensors shards
(:func:`jmerge.io.safetensors_io.output_plan`), with those extras, as one atomic directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from jmerge._util import OutputError as OutputError  # re-exported: the outputs' one error and check
from jmerge._util import refuse_existing as refuse_existing
from jmerge.io import safetensors_io as st


def describe_os_error(e: OSError, where: Path) -> str:
    """What went wrong writing ``where``, in words (disk full, permission denied, other)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {where}: {e.strerror}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {where}: {e.strerror}"
    return f"error writing {where}: {e}"


def _same_or_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents or a in b.parents


@contextlib.contextmanager
def atomic_dir(
    out: str | os.PathLike, *, force: bool = False, protect: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``out``; renames it to ``out`` on success.

    ``out`` must not exist unless ``force`` (then the complete new directory replaces it,
    and the old one is removed only after the rename). ``protect`` lists input paths that
    ``out`` may not be, contain, or lie inside. On any error the temporary directory is
    removed and ``out`` is untouched; OS errors become :class:`OutputError` saying what
    went wrong (disk full, permission denied).
    """
    out = Path(out).absolute()
    for p in protect:
        if _same_or_inside(out, Path(p).absolute()):
            raise OutputError(f"output {out} would overwrite or nest with input {p}; choose another directory")
    refuse_existing(out, force)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise OutputError(describe_os_error(e, parent)) from None
    try:
        yield tmp
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError):
            raise
        raise OutputError(describe_os_error(e, out) + "; nothing was written") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Renames ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed only once
    ``tmp`` is in place (put back if the rename fails)."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


_MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.*",
    "preprocessor_config.json",
)


def copy_model_files(source: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Copies ``config.json`` and tokenizer files of an HF directory (no weights) into ``directory``."""
    source = Path(source)
    if not source.is_dir():
        return []
    copied = []
    for pattern in _MODEL_FILE_PATTERNS:
        for p in sorted(source.glob(pattern)):
            if p.is_file() and p.name not in copied:
                shutil.copy2(p, Path(directory) / p.name)
                copied.append(p.name)
    return copied


def model_card(*, method: str, base: str, experts: Sequence[str], config_text: str, version: str, extra: str = "") -> str:
    """A README.md model card recording the exact merge configuration and jmerge version."""
    tags = "\n".join(f"- {t}" for t in ("merge", "jmerge", method))
    models = "\n".join(f"- `{e}`" for e in experts)
    return (
        f"---\nlibrary_name: transformers\ntags:\n{tags}\n---\n"
        f"# Merged model\n\n"
        f"Merged with jmerge {version}, method `{method}`.\n\n"
        f"Base model: `{base}`\n\nMerged models:\n{models}\n\n"
        f"{extra}"
        f"## Configuration\n\nReproduce with `jmerge run jmerge_config.yml OUT` (the same text):\n\n```yaml\n{config_text.strip()}\n```\n"
    )


def dir_size(path: str | os.PathLike) -> int:
    """Total bytes of the files under ``path``."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_dir` (and :func:`jmerge.streaming.merge_to_dir`) wrote."""

    out: Path
    files: tuple[str, ...]
    tensors: int
    bytes_written: int
    seconds: float


def write_dir(
    out: str | os.PathLike,
    base: st.Checkpoint,
    tensors: Iterator[tuple[str, np.ndarray]],
    plan: st.ShardPlan,
    *,
    protect: Sequence[str | os.PathLike] = (),
    force: bool = False,
    card: str | None = None,
    extra_files: Mapping[str, str] | None = None,
    progress: Callable[[str, str], None] | None = None,
    start: float | None = None,
) -> WriteResult:
    """Writes ``(name, array)`` pairs as the HF directory ``out`` (shards by ``plan``), with the
    base's ``config.json`` and tokenizer files, ``card`` as README.md and ``extra_files``;
    atomically (see :func:`atomic_dir`). ``progress("write", name)`` is called after each tensor."""
    start = time.perf_counter() if start is None else start
    with atomic_dir(out, force=force, protect=[base.path, *protect]) as tmp:
        writer = st.ShardWriter(tmp, plan)
        try:
            for name, array in tensors:
                writer.write(name, array)
                if progress:
                    progress("write", name)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        if base.path.is_dir():
            copy_model_files(base.path, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    out = Path(out)
    return WriteResult(out, tuple(p.name for p in files), sum(map(len, plan.members)), dir_size(out), time.perf_counter() - start)
