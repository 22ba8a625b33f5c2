"""jmerge: model merging for JAX, as pure functions on parameter pytrees."""

import importlib

from jmerge import coverage, layers, stages, tree, validate
from jmerge._util import clear_caches
from jmerge.tree import apply, task_vector, task_vectors
from jmerge.validate import MergeInputError, MergeOutputError

__version__ = "0.1.0"

_LAZY = ("learn", "lwptv")  # optax and friends load on first use (0.3 s off `jmerge run`)
# The method registry loads on first use too, so `jmerge.io` and the other layers below it
# import without it (tests/test_layering.py).
_FROM_METHODS = ("available", "get", "merge", "merge_task_vectors")


def __getattr__(name: str):
    if name in _FROM_METHODS:
        value = getattr(importlib.import_module("jmerge.methods"), name)
    elif name in _LAZY or name == "methods":
        value = importlib.import_module(f"jmerge.{name}")
    else:
        raise AttributeError(f"module 'jmerge' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "MergeInputError",
    "MergeOutputError",
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
