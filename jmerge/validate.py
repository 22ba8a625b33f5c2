"""Input checks run before any heavy work, naming the offending parameter path; and the check
that a merge did not turn finite inputs into NaN or infinities (:class:`MergeOutputError`)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import tree as jtree


class MergeInputError(ValueError):
    """Raised for inputs a merge cannot use (structure, shape, dtype, values, hyper-parameters)."""


class MergeOutputError(FloatingPointError):
    """Raised when a merge of finite inputs produced NaN or infinite values (e.g. an SVD that
    did not converge), naming the method and the parameter, instead of returning them."""


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(np.shape(x)), (x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def check_models(base: Any, experts: Sequence[Any], *, check_finite: bool = True) -> None:
    """Experts exist and match ``base`` in structure, shapes and dtypes; all values finite."""
    if not isinstance(experts, (list, tuple)):
        raise MergeInputError(f"experts must be a list or tuple of pytrees, got {type(experts).__name__}")
    if len(experts) == 0:
        raise MergeInputError("experts is empty: a merge needs at least one fine-tuned model")
    base_flat = jtree.flatten(base)
    if not base_flat:
        raise MergeInputError("base has no array leaves")
    base_specs = {p: _shape_dtype(b) for p, b in base_flat.items()}
    for path, (_, dtype) in base_specs.items():
        if not jnp.issubdtype(dtype, jnp.floating):
            raise MergeInputError(f"parameter {path!r} has non-float dtype {dtype}; merge only float parameters")
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
        for path, (shape, dtype) in base_specs.items():
            e_shape, e_dtype = _shape_dtype(flat[path])
            if e_shape != shape:
                raise MergeInputError(f"parameter {path!r}: expert {i} has shape {e_shape}, base {shape}")
            if e_dtype != dtype:
                raise MergeInputError(f"parameter {path!r}: expert {i} has dtype {e_dtype}, base {dtype}")
    if check_finite:
        check_all_finite(base, experts)


def check_all_finite(base: Any, experts: Sequence[Any]) -> None:
    """Raises naming the first model and parameter holding a NaN or an infinity."""
    for name, model in [("base", base)] + [(f"expert {i}", e) for i, e in enumerate(experts)]:
        check_finite_tree(model, name)


@jax.jit
def _finite_flags(tree: Any) -> Any:
    # x * 0 is 0 for finite x and NaN for NaN or +-inf, so one fused sum per leaf finds any
    # non-finite value (a sum of the values themselves could overflow; an isfinite/all
    # reduction is several times slower on XLA:CPU).
    return jax.tree.map(lambda x: jnp.isfinite(jnp.sum(x.astype(jnp.float32) * 0.0)), tree)


def check_finite_tree(tree: Any, name: str, *, error: type[Exception] = MergeInputError,
                      message: str = "{name}: parameter {path!r} holds NaN or infinite values") -> None:
    """Raises ``error(message)`` naming the first parameter of ``tree`` holding a NaN or an
    infinity (``message`` is formatted with ``name`` and the parameter's ``path``)."""
    flags = jax.device_get(_finite_flags(tree))
    for path, ok in jtree.flatten(flags).items():
        if not bool(ok):
            raise error(message.format(name=name, path=path))


def check_output_finite(tree: Any, method: str) -> None:
    """Raises :class:`MergeOutputError` naming ``method`` and the first parameter of its merged
    ``tree`` holding a NaN or an infinity (run on finite inputs, so the method produced it)."""
    check_finite_tree(tree, method, error=MergeOutputError,
                      message="{name} produced NaN or infinite values in parameter {path!r} from finite inputs")


def concrete(value: Any) -> bool:
    """False for values traced under ``jax.jit`` (they cannot be checked before running)."""
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(value))


def _floats(name: str, value: Any) -> np.ndarray:
    try:
        return np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise MergeInputError(f"{name} must be a number or a sequence of numbers, got {value!r}") from None


def check_finite_number(name: str, value: Any) -> None:
    """``value`` is one finite number (values traced under jit are skipped)."""
    if not concrete(value):
        return
    values = _floats(name, value)
    if values.size != 1 or not np.isfinite(values[0]):
        raise MergeInputError(f"{name} must be one finite number, got {value!r}")


def check_fraction(name: str, value: Any, *, low_open: bool = True, high: float = 1.0, count: int | None = None) -> None:
    """``value`` (a float or one per task) lies in (0, high] (or [0, high] when ``low_open`` is False)."""
    if not concrete(value):
        return
    values = _floats(name, value)
    if count is not None and values.size not in (1, count):
        raise MergeInputError(f"{name} has {values.size} values for {count} experts")
    low_ok = values > 0 if low_open else values >= 0
    if not (np.all(low_ok) and np.all(values <= high) and np.all(np.isfinite(values))):
        interval = f"({'0' if low_open else '[0'}, {high}]".replace("([0", "[0")
        raise MergeInputError(f"{name}={value!r} is outside {interval}")


def check_weights(weights: Any, count: int) -> None:
    """One finite weight per expert."""
    if not concrete(weights):
        return
    values = _floats("weights", weights)
    if values.size != count:
        raise MergeInputError(f"weights has {values.size} values for {count} experts")
    if not np.all(np.isfinite(values)):
        raise MergeInputError(f"weights={weights!r} holds non-finite values")
