"""Named merge methods, all reached through :func:`jmerge.merge`.

``available()`` lists them; ``get(name).defaults`` shows a method's hyper-parameters.
"""

from jmerge.methods.registry import Method, available, get, merge, merge_task_vectors, register
from jmerge.methods import task_arithmetic  # noqa: F401  (registers the methods)

__all__ = ["Method", "available", "get", "merge", "merge_task_vectors", "register"]
