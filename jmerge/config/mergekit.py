"""mergekit's YAML methods as jmerge methods. The mapper reads one source, the facts each
registered method declares (``register(..., mergekit=Mergekit(...))``, see
:class:`jmerge.methods.registry.Mergekit`); the table below documents them.

mergekit methods and how they map (defaults are mergekit's, read from
``mergekit/merge_methods/registry.py`` and ``generalized_task_arithmetic.py``; a model's
``parameters`` override the global ``parameters``, as in mergekit):

=================  ==================  ==========================================================
mergekit           jmerge              mapping
=================  ==================  ==========================================================
linear             average             weight -> weights; normalize (true; false: sum_t w_t theta_t)
task_arithmetic    task_arithmetic     lambda (1.0) -> scale; weight -> weights; normalize
                                       (default false) divides the sum by the weights' sum
ties               ties                trim="tensor" (mergekit ranks per tensor), tie_break="first"
                                       (exactly max(1, int(d n)) kept per tensor), sign="sum";
                                       density (1.0), normalize (true), lambda -> scale,
                                       rescale (false; true: each trimmed tensor to its L1 norm)
dare_linear        dare_linear         density (1.0), rescale (true), lambda, normalize (false)
dare_ties          dare_ties           density (1.0), rescale (true), normalize (false), lambda
breadcrumbs        breadcrumbs         density (1.0), gamma (0.01), lambda, normalize (false)
breadcrumbs_ties   breadcrumbs_ties    density (1.0), gamma (0.01), normalize (false), lambda
della              della               density (< 1 needed), epsilon (0.15), rescale (true),
                                       normalize (true), lambda
della_linear       della_linear        density (< 1 needed), epsilon (0.15), rescale (true, L1 norm),
                                       lambda, normalize (false)
slerp              slerp               t; experts = [base_model, the other model]
multislerp         multislerp          weight -> weights (normalised); with base_model on task
                                       vectors, without it on whole weights (space)
model_stock        model_stock         filter_wise (false); base_model required
sce                sce                 select_topk (1.0); base_model required
nearswap           nearswap            t (required); base_model + one model
arcee_fusion       arcee_fusion        base_model + one model
karcher            karcher             max_iter (10), tol (1e-5); every listed model and the
                                       base_model if given (as mergekit 0.1.5), no base needed
nuslerp            nuslerp             weight (required) -> weights, nuslerp_flatten (true) -> flatten,
                                       nuslerp_row_wise (false) -> row_wise; base_model optional
                                       (task vectors with it, whole weights without)
ram                ram                 epsilon (1e-5); base_model required
ramplus_tl         ramplus_tl          r (0.1), alpha (0.2), epsilon (1e-5); base_model required
passthrough        passthrough         scale (1.0, per model); one model (per slice), no base
=================  ==================  ==========================================================

Known differences from mergekit, where semantics cannot match exactly:

* ``dtype`` is mergekit's compute dtype (it rounds every input to it); jmerge by default
  merges the stored inputs in float32 and rounds once, to ``out_dtype`` or ``dtype``;
  ``jmerge: {compute_dtype: model}`` rounds the inputs to ``dtype`` first, as mergekit does
  (mergekit's per-step rounding inside a method is not reproduced; docs/mergekit.md).
* DARE/DELLA ``rescale``: jmerge divides survivors by the keep probability (the papers);
  current mergekit rescales each sparsified tensor to its original L1 norm. Random masks
  differ in any case (different generators).
* ``int8_mask`` (a mergekit memory option) is accepted and has no effect.
* ``rescale: true`` for ``breadcrumbs`` (mergekit's L1 rescaling) and ``tokenizer.tokens`` are
  rejected with an error saying so (``tokenizer_source``: :mod:`.tokenizer`). ``slices``, ``modules``,
  gradients and ``filter`` conditionals: :mod:`jmerge.config.slices`.
* ``model+lora`` references (any model, or ``base_model``): the model with the PEFT adapter's
  ``ΔW`` added on read (:func:`jmerge.lora.open_with_lora`), where mergekit writes a merged copy
  to its LoRA cache first; the sum is cast to the model's dtype as mergekit stores it.
"""

from __future__ import annotations

import warnings
from typing import Any

from jmerge.config.schema import ConfigError, MergeConfig, ModelSpec, closest, per_model, scalar
from jmerge.methods import registry


def table() -> dict[str, registry.Method]:
    """mergekit's method names -> the registered jmerge methods that declare them."""
    return {m.mergekit.name: m for m in map(registry.get, registry.available()) if m.mergekit is not None}


def mergekit_params() -> frozenset[str]:
    """Every parameter name a mergekit method reads: for another method mergekit ignores them, so jmerge warns."""
    return frozenset(k for m in table().values() for k in (*m.mergekit.global_params, *m.mergekit.model_params)) | {"scale"}


class ConfigWarning(UserWarning):
    """A config key jmerge accepts but does not use (mergekit ignores it too)."""


def _ignored(where: str, key: str, name: str) -> None:
    warnings.warn(f"`{where}{key}` is ignored: merge_method {name!r} does not use it (mergekit ignores it too)",
                  ConfigWarning, stacklevel=4)


def _gather(name: str, allowed: dict[str, Any], cfg: MergeConfig, experts: list[ModelSpec]) -> dict[str, Any]:
    """Global and per-model parameter values with mergekit's precedence, unknown names rejected."""
    known = mergekit_params()
    for key, value in cfg.parameters.items():
        if key not in allowed and key in known:
            _ignored("parameters.", key, name)
            continue
        if key not in allowed:
            raise ConfigError(
                f"merge_method {name!r} has no parameter {key!r}{closest(key, allowed)} "
                f"(parameters: {', '.join(sorted(allowed)) or 'none'})"
            )
        scalar(value, f"parameters.{key}")
    for m in experts:
        for key, value in m.parameters.items():
            if key not in allowed and key in known:
                _ignored(f"models[{m.model}].parameters.", key, name)
                continue
            if key not in allowed:
                raise ConfigError(
                    f"model {m.model!r}: merge_method {name!r} has no parameter {key!r}{closest(key, allowed)}"
                )
            scalar(value, f"models[{m.model}].parameters.{key}")
    return {k: cfg.parameters.get(k, d) for k, d in allowed.items()}


def map_mergekit(name: str, method: registry.Method, cfg: MergeConfig, experts: list[ModelSpec]) -> dict[str, Any]:
    """jmerge hyper-parameters for mergekit's ``merge_method: name``, from the facts ``method.mergekit``
    declares (:class:`jmerge.methods.registry.Mergekit`) and the method's own defaults."""
    mk = method.mergekit
    allowed = {**mk.global_params, **mk.model_params}
    glob = _gather(name, allowed, cfg, experts)

    def model_values(key: str) -> list:
        return [m.parameters.get(key, glob[key]) for m in experts]

    hp: dict[str, Any] = dict(mk.fixed)
    jm = method.defaults
    for key in mk.required:
        if glob[key] is None:
            raise ConfigError(f"{name} needs the parameter `{key}`")
    if mk.models is not None and len(experts) != mk.models:
        raise ConfigError(f"{name} needs `base_model` and exactly {mk.models} other model{'s' * (mk.models != 1)}")
    for key, value in mk.only.items():
        given = _like(glob[key], value, f"parameters.{key}")
        if given != value:
            raise ConfigError(f"{name}: `{key}: {given!r}` is not supported (jmerge fixes it at {value!r})")
    if "weight" in mk.model_params:
        missing = [m.model for m, w in zip(experts, model_values("weight")) if w is None]
        if missing:
            raise ConfigError(f"merge_method {name!r} needs a `weight` for every model; missing for {', '.join(missing)}")
        hp["weights"] = tuple(float(w) for w in model_values("weight"))
    if "normalize" in mk.global_params and "normalize" in jm:
        hp["normalize"] = bool(glob["normalize"])
    if "lambda" in mk.global_params:
        hp["scale"] = float(glob["lambda"])
    for key in sorted((mk.model_params.keys() - {"weight"}) & jm.keys()):
        values = [float(v) for v in model_values(key)]
        bound, why = mk.below.get(key, (None, ""))
        if bound is not None and any(v >= bound for v in values):
            raise ConfigError(f"{name} needs `{key}` < {bound:g} ({why})")
        if key in method.per_model:
            hp[key] = per_model(values)
        elif len(set(values)) > 1:
            raise ConfigError(f"merge_method {name!r}: jmerge takes one {key} for all models, got {values}")
        else:
            hp[key] = values[0]
    if "rescale" in mk.global_params and glob["rescale"]:
        if "rescale" not in jm:
            raise ConfigError(f"merge_method {name!r}: `rescale: true` (mergekit's L1-norm rescaling) is not supported")
    if "rescale" in jm and "rescale" in mk.global_params:
        hp["rescale"] = bool(glob["rescale"])
    if mk.base == "optional":  # mergekit: task vectors with a base_model, else whole weights
        hp["space"] = "weights" if cfg.base_model is None else "task_vectors"
    for key, jm_key in mk.passed.items():
        if glob[key] is not None:
            hp[jm_key] = _like(glob[key], mk.global_params[key], f"parameters.{key}")
    return hp


def _like(value: Any, default: Any, where: str) -> Any:
    """``value`` as the type of mergekit's default (YAML reads ``1e-6`` as a string; mergekit's
    pydantic parameters coerce it)."""
    kind = type(default) if default is not None else float
    try:
        if (kind is bool and not isinstance(value, bool)) or (kind is int and float(value) != int(float(value))):
            raise ValueError
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`{where}` must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}") from None
