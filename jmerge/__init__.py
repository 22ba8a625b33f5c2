"""jmerge: model merging for JAX, as pure functions on parameter pytrees."""

from jmerge import layers, learn, lwptv, stages, tree, validate
from jmerge.methods import available, get, merge, merge_task_vectors
from jmerge.tree import apply, task_vector, task_vectors
from jmerge.validate import MergeInputError

__version__ = "0.1.0"

__all__ = [
    "MergeInputError",
    "apply",
    "available",
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
