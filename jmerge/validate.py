"""Input checks run before any heavy work, naming the offending parameter path."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import tree as jtree


class MergeInputError(ValueError):
    """Raised for inputs a merge cannot use (structure, shape, dtype, values, hyper-parameters)."""


def check_models(base: Any, experts: Sequence[Any], *, check_finite: bool = True) -> None:
    """Experts exist and match ``base`` in structure, shapes and dtypes; all values finite."""
    if not isinstance(experts, (list, tuple)):
        raise MergeInputError(f"experts must be a list or tuple of pytrees, got {type(experts).__name__}")
    if len(experts) == 0:
        raise MergeInputError("experts is empty: a merge needs at least one fine-tuned model")
    base_flat = jtree.flatten(base)
    if not base_flat:
        raise MergeInputError("base has no array leaves")
    for i, expert in enumerate(experts):
        flat = jtree.flatten(expert)
        missing = [p for p in base_flat if p not in flat]
        extra = [p for p in flat if p not in base_flat]
        if missing or extra:
            raise MergeInputError(
                f"expert {i} does not match the base's parameters: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
        if jax.tree.structure(expert) != jax.tree.structure(base):
            raise MergeInputError(f"expert {i} has the base's parameter paths but another pytree structure")
        for path, b in base_flat.items():
            e = flat[path]
            if tuple(e.shape) != tuple(b.shape):
                raise MergeInputError(f"parameter {path!r}: expert {i} has shape {tuple(e.shape)}, base {tuple(b.shape)}")
            if e.dtype != b.dtype:
                raise MergeInputError(f"parameter {path!r}: expert {i} has dtype {e.dtype}, base {b.dtype}")
            if not jnp.issubdtype(b.dtype, jnp.floating):
                raise MergeInputError(f"parameter {path!r} has non-float dtype {b.dtype}; merge only float parameters")
    if check_finite:
        for name, model in [("base", base)] + [(f"expert {i}", e) for i, e in enumerate(experts)]:
            check_finite_tree(model, name)


def check_finite_tree(tree: Any, name: str) -> None:
    """Raises naming the first parameter of ``tree`` holding a NaN or an infinity."""
    flags = jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)
    for path, ok in jtree.flatten(flags).items():
        if not bool(ok):
            raise MergeInputError(f"{name}: parameter {path!r} holds NaN or infinite values")


def check_fraction(name: str, value: Any, *, low_open: bool = True, high: float = 1.0, count: int | None = None) -> None:
    """``value`` (a float or one per task) lies in (0, high] (or [0, high] when ``low_open`` is False)."""
    values = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if count is not None and values.size not in (1, count):
        raise MergeInputError(f"{name} has {values.size} values for {count} experts")
    low_ok = values > 0 if low_open else values >= 0
    if not (np.all(low_ok) and np.all(values <= high) and np.all(np.isfinite(values))):
        interval = f"({'0' if low_open else '[0'}, {high}]".replace("([0", "[0")
        raise MergeInputError(f"{name}={value!r} is outside {interval}")


def check_weights(weights: Any, count: int) -> None:
    """One finite weight per expert."""
    values = np.atleast_1d(np.asarray(weights, dtype=np.float64))
    if values.size != count:
        raise MergeInputError(f"weights has {values.size} values for {count} experts")
    if not np.all(np.isfinite(values)):
        raise MergeInputError(f"weights={weights!r} holds non-finite values")
