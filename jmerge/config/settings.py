"""mergekit's parameter settings: a value, a gradient, or a list of ``filter`` conditionals
(mergekit 0.1.5 ``config.py``: ``evaluate_setting``), checked whole before any tensor is read.

* a value: ``0.5``;
* a gradient, a list of values over the layers: at position ``t`` in [0, 1] (a layer's index
  in its slice over the slice's layers minus one; 0 for embeddings, norms and heads) numbers
  interpolate linearly, ``(1 - f) v[i] + f v[i+1]`` with ``i + f = t (n - 1)``; other values
  (bools, strings) take ``v[int(t (n - 1))]``;
* conditionals, ``[{filter: self_attn, value: 0.5}, {value: 1.0}]``: the first entry whose
  ``filter`` is a substring of the tensor's name (or is absent or ``*``) gives the value (a
  value or a gradient); when none matches, the next scope's setting applies (a source's over
  its slice's over the global ``parameters``), then the method's default.
"""

from __future__ import annotations

from typing import Any, Iterator

from jmerge.config.schema import ConfigError

_SCALARS = (bool, int, float, str)


def varies(setting: Any) -> bool:
    """Whether ``setting`` can differ between tensors (a gradient or conditionals)."""
    return isinstance(setting, (list, dict))


def check(setting: Any, where: str, layers: int | None) -> None:
    """Refuses a malformed setting, or a gradient longer than the ``layers`` it is spread over
    (some of its values would apply to no layer), naming ``where``."""
    if isinstance(setting, _SCALARS):
        return
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise ConfigError(f"`{where}`: expected a value, a gradient (list of values) or a list of "
                          f"{{filter, value}} entries, got {setting!r}")
    if all(isinstance(v, _SCALARS) for v in setting):
        if layers is not None and len(setting) > max(layers, 2):
            raise ConfigError(f"`{where}`: a gradient of {len(setting)} values cannot be spread over {layers} "
                              f"layer{'s' * (layers != 1)}")
        return
    for i, cond in enumerate(setting):
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise ConfigError(f"`{where}[{i}]`: a conditional is {{filter: <name part>, value: ...}}, got {cond!r}")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise ConfigError(f"`{where}[{i}].filter` must be a string, got {cond['filter']!r}")
        if isinstance(cond["value"], (dict, list)) and not all(isinstance(v, _SCALARS) for v in cond["value"]):
            raise ConfigError(f"`{where}[{i}].value`: expected a value or a gradient, got {cond['value']!r}")
        check(cond["value"], f"{where}[{i}].value", layers)


def filters(setting: Any) -> Iterator[str]:
    """The ``filter`` strings of a setting (``*`` excluded)."""
    conds = [setting] if isinstance(setting, dict) else setting if isinstance(setting, list) else []
    for cond in conds:
        if isinstance(cond, dict) and cond.get("filter") not in (None, "*"):
            yield cond["filter"]


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """The value of ``setting`` for ``tensor`` at gradient position ``t``; None when no
    conditional matches (the next scope then applies)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, _SCALARS):
        return setting
    if all(isinstance(v, _SCALARS) for v in setting):
        n = len(setting)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (n - 1))]
        scaled = t * (n - 1)
        i0 = int(scaled)
        i1 = min(n - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor and f in tensor):
            return evaluate(cond["value"], tensor, t)
    return None
