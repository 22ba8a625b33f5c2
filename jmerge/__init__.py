"""jmerge: model merging for JAX, as pure functions on parameter pytrees."""

import importlib

from jmerge import coverage, layers, stages, tree, validate
from jmerge._util import clear_caches
from jmerge.methods import available, get, merge, merge_task_vectors
from jmerge.tree import apply, task_vector, task_vectors
from jmerge.validate import MergeInputError

__version__ = "0.1.0"

_LAZY = ("learn", "lwptv")  # optax and friends load on first use (0.3 s off `jmerge run`)


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"jmerge.{name}")
    raise AttributeError(f"module 'jmerge' has no attribute {name!r}")


__all__ = [
    "MergeInputError",
    "apply",
    "coverage",
    "available",
    "clear_caches",
    "get",
    "layers",
    "learn",
    "lwptv",
    "merge",
    "merge_task_vectors",
    "stages",
    "task_vector",
    "task_vectors",
    "tree",
    "validate",
]
