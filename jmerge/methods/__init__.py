"""Named merge methods, all reached through :func:`jmerge.merge`.

``available()`` lists them; ``get(name).defaults`` shows a method's hyper-parameters.
"""

from jmerge.methods.registry import Method, available, get, merge, merge_task_vectors, register
from jmerge.methods import task_arithmetic  # noqa: F401  (registers the methods)
from jmerge.methods import model_stock  # noqa: F401
from jmerge.methods import spherical  # noqa: F401
from jmerge.methods import svd  # noqa: F401
from jmerge.methods import mergekit_extra  # noqa: F401
from jmerge.methods import data_driven  # noqa: F401

__all__ = ["Method", "available", "get", "merge", "merge_task_vectors", "register"]
