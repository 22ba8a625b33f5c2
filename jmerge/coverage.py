"""Coverage: which parameters a merge method merges by its own rule, and which fall back.

Some methods merge only some leaves by their rule: the SVD merges (TSV-M, Iso-C, Iso-CTS)
factorise matrices and give every other leaf the mean of the task vectors. A method says so
with ``Method.covers(path, shape, hparams, num_experts)`` (``None``: its rule merges every leaf), and
:func:`of` counts the parameters on each side. :func:`jmerge.merge` and the streamed merges
(:mod:`jmerge.streaming`) :func:`report` every merge once: one ``logging`` INFO line on the
``jmerge.coverage`` logger and, when the rule covers under half the parameters
(:data:`MIN_FRACTION`), a :class:`CoverageWarning`. ``jmerge run`` writes
:meth:`Coverage.markdown` into the model card; the experiments store :attr:`Coverage.fraction`
as their rows' ``coverage`` field.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from jmerge import tree as jtree

logger = logging.getLogger("jmerge.coverage")

MIN_FRACTION = 0.5  # a merge whose rule covers less than this fraction of the parameters warns
_EXAMPLES = 3  # fallback tensors named in a warning
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("jmerge_coverage_quiet", default=False)


class CoverageWarning(UserWarning):
    """The merge method's own rule covers under half of the parameters; the rest fall back."""


@dataclass(frozen=True)
class Coverage:
    """What a merge of ``method`` does leaf by leaf: ``rule`` and ``fallback`` are the paths
    its rule merges and those that fall back, ``*_params`` their parameter counts."""

    method: str
    rule: tuple[str, ...]
    fallback: tuple[str, ...]
    rule_params: int
    fallback_params: int

    @property
    def total_params(self) -> int:
        return self.rule_params + self.fallback_params

    @property
    def fraction(self) -> float:
        """Fraction of the parameters merged by the method's rule (1.0 for a model with none)."""
        return self.rule_params / self.total_params if self.total_params else 1.0

    def line(self) -> str:
        """One sentence: the fraction merged by rule, and how many tensors fall back."""
        text = (
            f"{self.method}: its rule merges {self.rule_params:,} of {self.total_params:,} parameters "
            f"({100 * self.fraction:.2f} %, {len(self.rule)} of {len(self.rule) + len(self.fallback)} tensors)"
        )
        if self.fallback:
            text += f"; {self.fallback_params:,} in {len(self.fallback)} tensors fall back (e.g. {', '.join(self.fallback[:_EXAMPLES])})"
        return text

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts (no path lists)."""
        return {"method": self.method, "fraction": self.fraction, "rule_params": self.rule_params,
                "fallback_params": self.fallback_params, "rule_tensors": len(self.rule),
                "fallback_tensors": len(self.fallback)}

    def markdown(self) -> str:
        """A model-card section: the fraction and every tensor that fell back."""
        text = f"## Coverage\n\n{self.line()}.\n\n"
        if self.fallback:
            text += "Tensors merged by the fallback:\n\n" + "\n".join(f"- `{p}`" for p in self.fallback) + "\n\n"
        return text


def _method(method):
    if isinstance(method, str):
        from jmerge.methods import registry  # lazy: the registry imports this module

        return registry.get(method)
    return method


def from_shapes(
    method, shapes: Mapping[str, tuple[int, ...]], hparams: Mapping[str, Any] | None = None, num_experts: int | None = None
) -> Coverage:
    """The :class:`Coverage` of ``method`` (a name or ``Method``) on parameters ``{path: shape}``
    merged from ``num_experts`` experts (``None``: not known; some rules need enough rank);
    ``hparams`` (checked by the merge, not here) are completed with the method's defaults."""
    m = _method(method)
    hp = {**m.defaults, **(hparams or {})}
    sides: dict[bool, list[tuple[str, int]]] = {True: [], False: []}
    for path, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        sides[m.covers is None or bool(m.covers(path, shape, hp, num_experts))].append((path, math.prod(shape)))
    return Coverage(
        m.name,
        tuple(p for p, _ in sides[True]),
        tuple(p for p, _ in sides[False]),
        sum(n for _, n in sides[True]),
        sum(n for _, n in sides[False]),
    )


def of(method, params, hparams: Mapping[str, Any] | None = None, num_experts: int | None = None) -> Coverage:
    """The :class:`Coverage` of ``method`` on the pytree ``params`` (arrays, tracers or
    ``jax.ShapeDtypeStruct``; only shapes are read)."""
    return from_shapes(method, {path: np.shape(x) for path, x in jtree.flatten(params).items()}, hparams, num_experts)


def of_checkpoint(method, ckpt, hparams: Mapping[str, Any] | None = None, num_experts: int | None = None) -> Coverage:
    """The :class:`Coverage` of ``method`` on the float tensors of an opened checkpoint
    (``jmerge.io.safetensors_io.Checkpoint``; headers only)."""
    return from_shapes(method, {n: t.shape for n, t in ckpt.tensors.items() if t.is_float}, hparams, num_experts)


def report(cov: Coverage) -> Coverage:
    """Logs ``cov`` (INFO) and warns (:class:`CoverageWarning`) if its rule covers under
    :data:`MIN_FRACTION` of the parameters; nothing inside :func:`quiet`."""
    if _QUIET.get():
        return cov
    logger.info("coverage %s", cov.line())
    if cov.fraction < MIN_FRACTION:
        warnings.warn(
            f"{cov.method} merges only {100 * cov.fraction:.2f} % of the parameters by its own rule "
            f"(under {100 * MIN_FRACTION:.0f} %): {cov.fallback_params:,} of {cov.total_params:,} parameters in "
            f"{len(cov.fallback)} tensors fall back (e.g. {', '.join(cov.fallback[:_EXAMPLES])})",
            CoverageWarning,
            stacklevel=3,
        )
    return cov


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No :func:`report` inside: for merges that are parts of one reported merge (streamed tensors)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


__all__ = ["Coverage", "CoverageWarning", "MIN_FRACTION", "from_shapes", "of", "of_checkpoint", "quiet", "report"]
