"""A validated config resolved to a :class:`MergePlan`: paths found, the method and its
hyper-parameters fixed (mergekit's through :mod:`jmerge.config.mergekit`, jmerge's own as is),
before any tensor is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jmerge.config.mergekit import UNIMPLEMENTED, map_mergekit, table
from jmerge.config.schema import (
    ConfigError, LearnOptions, MergeConfig, ModelSpec, check_dtype, closest, load_config, per_model, scalar,
)
from jmerge.methods import registry
from jmerge.methods.data_driven import MEASURED, STATISTICS
from jmerge.validate import MergeInputError


@dataclass(frozen=True)
class MergePlan:
    """A validated config: what to merge, with which jmerge method and hyper-parameters."""

    method: str
    base: Path
    experts: tuple[Path, ...]
    hparams: dict[str, Any]
    seed: int
    out_dtype: str | None
    lwptv: dict[str, Any] | None
    learn: LearnOptions | None
    in_memory: bool
    check_finite: bool
    config_text: str
    source_method: str

    @property
    def needs_key(self) -> bool:
        return registry.get(self.method).needs_key

    def lwptv_config(self):
        """The ``jmerge.lwptv.LwPTV`` of ``jmerge.lwptv``, or None."""
        return None if self.lwptv is None else _lwptv(self.lwptv)


def _resolve_path(ref: str, where: Path, what: str) -> Path:
    if "+" in ref and not (Path(ref).exists() or (where / ref).exists()):  # mergekit's model+lora
        from jmerge.lora import split_reference

        try:
            parts = split_reference(ref)
        except MergeInputError as e:
            raise ConfigError(f"{what}: {e}") from None
        model, adapter = (_resolve_path(p, where, what) for p in parts)
        return Path(f"{model}+{adapter}")
    p = Path(ref).expanduser()
    for cand in ([p] if p.is_absolute() else [p, where / p]):
        if cand.exists():
            return cand
    raise ConfigError(
        f"{what} {ref!r} not found (looked in {Path.cwd()} and {where}); jmerge reads local HF directories, "
        ".safetensors or .gguf files: download hub models first (e.g. `huggingface-cli download`)"
    )


def resolve(cfg: MergeConfig, config_text: str = "", where: Path | None = None) -> MergePlan:
    """Checks the whole config and maps it to a jmerge method and hyper-parameters."""
    where = where or Path.cwd()
    opts = cfg.jmerge
    name = opts.method or cfg.merge_method
    mergekit_names = table()
    mapped = mergekit_names.get(name) if opts.method is None else None  # a method named as mergekit names it
    mk = mapped.mergekit if mapped else None
    if mk is None and name in UNIMPLEMENTED and name not in registry.available():
        raise ConfigError(f"merge_method {name!r} (a mergekit method) is not implemented in jmerge")
    if mk is None and name not in registry.available():
        known = sorted(set(mergekit_names) | set(registry.available()))
        raise ConfigError(f"unknown merge_method {name!r}{closest(name, known)} (known: {', '.join(known)})")
    method = mapped.name if mapped else name
    check_dtype(cfg.dtype, "dtype")
    check_dtype(cfg.out_dtype, "out_dtype")
    if not cfg.models:
        raise ConfigError("`models` is empty")

    base_ref = cfg.base_model
    refs = [m.model for m in cfg.models]
    if base_ref is None:
        if mk is not None and mk.base == "required":
            raise ConfigError(f"merge_method {name!r} needs `base_model`")
        if mk is None:
            raise ConfigError("`base_model` is required (the pre-trained model the task vectors start from)")
        base_ref = refs[0]
    base = _resolve_path(base_ref, where, "base_model")
    paths = [_resolve_path(m.model, where, "model") for m in cfg.models]
    if mk is None or mk.base == "required" or (mk.base == "optional" and cfg.base_model is not None):
        # the base_model may also be listed among `models` (mergekit's examples do), under any spelling of its path
        kept = [(m, p) for m, p in zip(cfg.models, paths) if cfg.base_model is None or p.resolve() != base.resolve()]
    else:
        kept = list(zip(cfg.models, paths))
    if not kept:
        raise ConfigError("no models to merge besides base_model")
    expert_specs = [m for m, _ in kept]
    experts = tuple(p for _, p in kept)
    if mk is not None and mk.base_merged and cfg.base_model is not None and all(p.resolve() != base.resolve() for p in experts):
        experts = (base, *experts)  # e.g. mergekit's slerp: t=0 is the base model; karcher averages it with the models

    hp = map_mergekit(name, mapped, cfg, expert_specs) if mk else _map_native(method, cfg, expert_specs)
    for key, value in opts.parameters.items():
        hp[key] = scalar(value, f"jmerge.parameters.{key}")
    if opts.trim is not None:
        if "trim" not in registry.get(method).defaults:
            raise ConfigError(f"`jmerge.trim` applies to methods with a `trim` hyper-parameter (ties), not {method!r}")
        if opts.trim not in ("global", "tensor"):
            raise ConfigError(f"`jmerge.trim` must be 'global' or 'tensor', got {opts.trim!r}")
        hp["trim"] = opts.trim
    if opts.lwptv is not None:
        _lwptv(opts.lwptv).check()
    if opts.learn is not None and opts.lwptv is not None:
        raise ConfigError("`jmerge.learn` with `jmerge.lwptv` is not supported by `jmerge run`; "
                          "use jmerge.learn in Python on LwPTV-pruned task vectors")
    learn = _learn(opts.learn, method, experts, where) if opts.learn is not None else None
    if learn is not None and method in STATISTICS:
        hp[STATISTICS[method]] = MEASURED  # measured on the prompts by `jmerge run`
    try:
        registry.get(method).resolve(len(experts), hp)
    except MergeInputError as e:
        raise ConfigError(f"merge_method {name!r}: {e}") from None
    return MergePlan(
        method=method,
        base=base,
        experts=experts,
        hparams=hp,
        seed=opts.seed,
        out_dtype=cfg.out_dtype or cfg.dtype,
        lwptv=opts.lwptv,
        learn=learn,
        in_memory=opts.in_memory or opts.lwptv is not None or learn is not None,
        check_finite=opts.check_finite,
        config_text=config_text,
        source_method=cfg.merge_method,
    )


def _learn(opts: LearnOptions, method: str, experts: tuple[Path, ...], where: Path) -> LearnOptions:
    """Checks the ``jmerge.learn`` block against the plan and resolves its prompt files; with
    ``merge_method: regmean | fisher`` the prompts are the data those methods measure."""
    if method in STATISTICS:
        if "method" in opts.model_fields_set and opts.method != method:
            raise ConfigError(f"`jmerge.learn.method` is {opts.method!r} but merge_method is {method!r}")
        opts = opts.model_copy(update={"method": method})
    elif method != "task_arithmetic" or opts.method in STATISTICS:
        raise ConfigError(f"`jmerge.learn` learns task-arithmetic coefficients, so merge_method must be task_arithmetic "
                          f"(or regmean / fisher, whose data the prompts are), not {method!r} with learn.method {opts.method!r}")
    if len(opts.prompts) != len(experts):
        raise ConfigError(f"`jmerge.learn.prompts` lists {len(opts.prompts)} files for {len(experts)} models "
                          f"(one per model, in the order of `models`)")
    if opts.layers is not None and opts.granularity != "layer":
        raise ConfigError(f"`jmerge.learn.layers` applies to granularity 'layer', not {opts.granularity!r}")
    prompts = tuple(_resolve_path(str(p), where, "jmerge.learn.prompts") for p in opts.prompts)
    return opts.model_copy(update={"prompts": prompts})


def _lwptv(fields: dict[str, Any]):
    """``jmerge.lwptv.LwPTV(**fields)``, with a config error for unknown fields."""
    from jmerge.lwptv import LwPTV

    try:
        return LwPTV(**fields)
    except TypeError as e:
        known = [f for f in LwPTV.__dataclass_fields__]
        raise ConfigError(f"`jmerge.lwptv`: {e} (fields: {', '.join(known)})") from None


def _map_native(method: str, cfg: MergeConfig, experts: list[ModelSpec]) -> dict[str, Any]:
    m = registry.get(method)
    hp = {k: scalar(v, f"parameters.{k}") for k, v in cfg.parameters.items()}
    per_model_keys = {k for spec in experts for k in spec.parameters}
    for key in sorted(per_model_keys):
        target = "weights" if key == "weight" else key
        if target not in m.per_model:
            known = sorted(m.per_model)
            raise ConfigError(f"method {method!r} has no per-model parameter {key!r}{closest(target, known)} "
                              f"(per-model: {', '.join(known) or 'none'})")
        missing = [spec.model for spec in experts if key not in spec.parameters and key not in cfg.parameters]
        if missing:
            raise ConfigError(f"per-model parameter {key!r} is missing for {', '.join(missing)}")
        values = [scalar(spec.parameters.get(key, cfg.parameters.get(key)), f"models.parameters.{key}") for spec in experts]
        hp[target] = tuple(values) if target == "weights" else per_model(values)
    return hp


def plan_from_yaml(source: str | Path) -> MergePlan:
    """Loads and resolves a config file (or YAML text) in one step."""
    cfg, text, where = load_config(source)
    return resolve(cfg, text, where)
