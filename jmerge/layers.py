"""Layer grouping: which "layer" each parameter belongs to.

A rule maps a parameter path (see ``jmerge.tree.paths``) to a layer name:

* ``None`` or ``"tensor"``: one layer per tensor (the default; AdaMerging's "layer-wise").
* a regex string: the layer is the text matched by the regex (its first group when it has
  groups), e.g. ``r"layer/\\d+"`` puts every tensor of a BERT block in one layer.
* a callable ``path -> str | None``.

A parameter a rule leaves unassigned (no match, or ``None``) is an error unless
``unassigned="own"`` (it becomes its own layer) or ``unassigned="rest"`` (all of them
share a layer called ``"rest"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

import jax
import numpy as np

from jmerge import tree as jtree

LayerRule = Union[None, str, Callable[[str], Union[str, None]]]


@dataclass(frozen=True)
class LayerGrouping:
    """Layer names in first-seen order, and the layer index of each leaf (leaf order)."""

    names: tuple[str, ...]
    leaf_layer: tuple[int, ...]
    leaf_paths: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def members(self, layer: int | str) -> list[str]:
        """Paths of the parameters in one layer."""
        idx = self.names.index(layer) if isinstance(layer, str) else layer
        return [p for p, l in zip(self.leaf_paths, self.leaf_layer) if l == idx]

    def leaf_values(self, per_layer) -> list:
        """Expands a length-L sequence (or an array whose last axis is L) to one value per leaf."""
        arr = per_layer
        return [arr[..., l] if hasattr(arr, "shape") else arr[l] for l in self.leaf_layer]


def _rule_fn(rule: LayerRule) -> Callable[[str], str | None]:
    if rule is None or rule == "tensor":
        return lambda p: p
    if isinstance(rule, str):
        pattern = re.compile(rule)

        def by_regex(path: str) -> str | None:
            m = pattern.search(path)
            if m is None:
                return None
            return m.group(1) if m.groups() else m.group(0)

        return by_regex
    if callable(rule):
        return rule
    raise TypeError(f"layer rule must be None, 'tensor', a regex string or a callable, got {rule!r}")


def group_layers(params, rule: LayerRule = None, *, unassigned: str = "error") -> LayerGrouping:
    """Groups the leaves of ``params`` into layers by ``rule`` (see module docstring)."""
    if unassigned not in ("error", "own", "rest"):
        raise ValueError(f"unassigned must be 'error', 'own' or 'rest', got {unassigned!r}")
    fn = _rule_fn(rule)
    leaf_paths = jtree.paths(params)
    names: dict[str, int] = {}
    leaf_layer, missing = [], []
    for path in leaf_paths:
        name = fn(path)
        if name is None:
            if unassigned == "error":
                missing.append(path)
                continue
            name = path if unassigned == "own" else "rest"
        leaf_layer.append(names.setdefault(str(name), len(names)))
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(
            f"layer rule {rule!r} assigns no layer to {len(missing)} parameter(s): {shown}; "
            "extend the rule or pass unassigned='own' or 'rest'"
        )
    if not names:
        raise ValueError("params has no leaves to group into layers")
    return LayerGrouping(tuple(names), tuple(leaf_layer), tuple(leaf_paths))


def layer_sizes(params, grouping: LayerGrouping) -> np.ndarray:
    """Number of scalars in each layer."""
    sizes = np.zeros(grouping.num_layers, np.int64)
    leaves = jax.tree.leaves(params)
    if len(leaves) != len(grouping.leaf_layer):
        raise ValueError(f"params has {len(leaves)} leaves but the grouping was made for {len(grouping.leaf_layer)}")
    for leaf, l in zip(leaves, grouping.leaf_layer):
        sizes[l] += int(np.prod(leaf.shape))
    return sizes
