"""A validated config resolved to a :class:`MergePlan`: paths found, the method and its
hyper-parameters fixed (mergekit's through :mod:`jmerge.config.mergekit`, jmerge's own as is),
before any tensor is read."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jmerge.config import settings, tokenizer
from jmerge.config.hf_layers import architecture, layers_of
from jmerge.config.hf_modules import MODULES, WHOLE, Module, modules_of
from jmerge.config.mergekit import map_mergekit, table
from jmerge.config.schema import (
    ConfigError, LearnOptions, MergeConfig, ModelSpec, ModuleSpec, check_dtype, closest, load_config, per_model, scalar,
)
from jmerge.io import safetensors_io as st
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
    config: MergeConfig
    compute_dtype: str | None  # mergekit's arithmetic in it (its `dtype`, jmerge.compute_dtype: model)
    extra_files: dict[str, str]  # tokenizer files written over the base's (tokenizer_source, chat_template)
    vocab: tokenizer.Vocab | None  # embedding rows remapped onto the output vocabulary (tokenizer_source)
    slices: tuple["SlicePlan", ...] | None  # a per-tensor plan (slices, gradients, filters): jmerge.config.slices

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


@dataclass(frozen=True)
class SlicePlan:
    """One output slice (a ``models:`` config is one slice of every layer) of ``module`` (the whole
    checkpoint but in a ``modules:`` config): the model the task vectors start from, the merged
    models with their layer ranges (None: every layer), and the settings that give each tensor's
    hyper-parameters (:func:`tensor_hparams`)."""

    where: str
    base: Path
    base_range: tuple[int, int] | None
    experts: tuple[Path, ...]
    ranges: tuple[tuple[int, int] | None, ...]
    specs: tuple[ModelSpec, ...]  # the models whose per-model parameters are read (the base's are not)
    parameters: dict[str, Any]  # the slice's settings (over its module's), over the global ones
    module: Module = WHOLE

    @property
    def length(self) -> int | None:
        return None if self.base_range is None else self.base_range[1] - self.base_range[0]


def _slice(mk, name: str, members, base_ref: str | None, where: Path, label: str, parameters: dict[str, Any],
           module: Module) -> SlicePlan:
    """The base and merged models of one slice (``members``: ``(spec, layer range or None)``),
    by the method's mergekit facts: the base_model may be listed among them (under any spelling
    of its path) and is then not merged, except where the method averages every model."""
    paths = [_resolve_path(m.model, where, "model") for m, _ in members]
    if mk is not None and mk.base == "refused" and base_ref is not None:
        raise ConfigError(f"{label}: merge_method {name!r} takes no `base_model` (mergekit would merge it as "
                          "one more model)")
    base = None if base_ref is None else _resolve_path(base_ref, where, "base_model")
    if base is None:
        if mk is not None and mk.base == "required":
            raise ConfigError(f"merge_method {name!r} needs `base_model`")
        if mk is None:
            raise ConfigError("`base_model` is required (the pre-trained model the task vectors start from)")
    listed = [i for i, p in enumerate(paths) if base is not None and p.resolve() == base.resolve()]
    slices = members[0][1] is not None
    if slices and base is not None and not listed and (mk is None or mk.base != "none"):
        raise ConfigError(f"{label}: base_model {base_ref!r} is not among its sources")
    base_i = listed[0] if listed else (0 if base is None or slices else None)
    base = paths[0] if base is None else base
    if mk is None or mk.base == "required" or (mk.base == "optional" and base_ref is not None):
        kept = [i for i in range(len(paths)) if i not in listed]
    else:
        kept = list(range(len(paths)))
    if not kept:
        raise ConfigError(f"{label}: no models to merge besides base_model")
    experts = [(paths[i], members[i][1]) for i in kept]
    base_range = None if base_i is None else members[base_i][1]
    if mk is not None and mk.base_merged and base_ref is not None and not any(i in listed for i in kept):
        experts = [(base, base_range), *experts]  # e.g. mergekit's slerp: t=0 is the base model
    return SlicePlan(label, base if base_i is None else paths[base_i], base_range, tuple(p for p, _ in experts),
                     tuple(r for _, r in experts), tuple(members[i][0] for i in kept), parameters, module)


def _groups(cfg: MergeConfig, where: Path):
    """``(label, members, base_model, slice parameters, module)`` per slice (a ``models:`` list is
    one slice; a ``modules:`` config gives each module's), and the architecture's modules by name
    (:func:`_known_modules`; none without ``modules:``)."""
    if [cfg.models, cfg.slices, cfg.modules].count(None) != 2:
        raise ConfigError("give exactly one of `models`, `slices` and `modules`")
    if cfg.modules is None:
        return _scope_groups(cfg, "", cfg.base_model, {}, WHOLE), {}
    if not cfg.modules:
        raise ConfigError("`modules` is empty")
    known = _known_modules(cfg, where)
    return [g for name, spec in cfg.modules.items()
            for g in _scope_groups(spec, f"modules.{name}.", cfg.base_model, spec.parameters, known[name])], known


def _scope_groups(scope: MergeConfig | ModuleSpec, label: str, base_ref: str | None, parameters: dict[str, Any],
                  module: Module):
    """:func:`_groups` of the top level or of one module (``label``: its keys' prefix, ``parameters``: its own)."""
    if (scope.models is None) == (scope.slices is None):
        raise ConfigError(f"give exactly one of `{label}models` and `{label}slices`")
    if scope.models is not None:
        if not scope.models:
            raise ConfigError(f"`{label}models` is empty")
        return [(f"{label}models", [(m, None) for m in scope.models], base_ref, dict(parameters), module)]
    if not scope.slices:
        raise ConfigError(f"`{label}slices` is empty")
    groups = []
    for i, s in enumerate(scope.slices):
        at = f"{label}slices[{i}]"
        if not s.sources:
            raise ConfigError(f"{at}: `sources` is empty")
        lengths = [hi - lo for lo, hi in (src.layer_range for src in s.sources)]
        if len(set(lengths)) > 1:
            raise ConfigError(f"{at}: its sources' layer ranges have unequal lengths {lengths} "
                              f"({', '.join(f'{src.model} {list(src.layer_range)}' for src in s.sources)})")
        groups.append((at, [(src, tuple(src.layer_range)) for src in s.sources], s.base_model or base_ref,
                       {**parameters, **s.parameters}, module))
    return groups


def _module_refs(cfg: MergeConfig) -> list[str]:
    """Every model a ``modules:`` config names, its base_model first."""
    refs = [cfg.base_model] if cfg.base_model else []
    for spec in cfg.modules.values():
        refs += [m.model for m in spec.models or []] + [src.model for s in spec.slices or [] for src in s.sources]
    return list(dict.fromkeys(refs))


def _known_modules(cfg: MergeConfig, where: Path) -> dict[str, Module]:
    """The modules of the models' architecture (config.json's ``architectures``, the same for
    every model), each name of ``modules:`` checked against them."""
    archs = {}
    for ref in _module_refs(cfg):
        archs.setdefault(architecture(_resolve_path(ref, where, "model")), ref)
    archs.pop(None, None)
    if len(archs) > 1:
        raise ConfigError(f"`modules`: the models' architectures differ ({', '.join(f'{r}: {a}' for a, r in archs.items())})")
    arch = next(iter(archs), None)
    known = modules_of(arch)
    for name in cfg.modules:
        if name not in known:
            raise ConfigError(f"modules.{name}: {_no_module(arch, name, known)}")
    return known


def _no_module(arch: str | None, name: str, known: dict[str, Module]) -> str:
    if arch in MODULES:
        return f"{arch} has no module {name!r}{closest(name, known)} (modules: {', '.join(known)})"
    return (f"jmerge has no module map for {arch or 'models without a config.json `architectures`'}, so its one "
            f"module is `default` (multi-module architectures: {', '.join(sorted(MODULES))})")


def _check_modules(plans: list[SlicePlan], known: dict[str, Module]) -> None:
    """Each listed module holds tensors of its first model, and every tensor of the first model is
    in a listed module (mergekit 0.1.5 would leave it out of the output); headers only."""
    listed: dict[Module, Path] = {}
    for sp in plans:
        listed.setdefault(sp.module, sp.base)
    for module, path in listed.items():
        if not any(map(module.owns, st.open_checkpoint(path).tensors)):
            raise ConfigError(f"modules.{module.name}: no tensor of {path} starts with "
                              f"{' or '.join(map(repr, module.prefixes))}")
    left = sorted(n for n in st.open_checkpoint(plans[0].base).tensors if not any(m.owns(n) for m in listed))
    unlisted = [m.name for m in known.values() if any(map(m.owns, left))]
    if left:
        what = f"{', '.join(unlisted)} not listed" if unlisted else f"tensors in no module ({', '.join(known)})"
        raise ConfigError(f"modules: {what}; mergekit 0.1.5 would leave {len(left)} tensor(s) of {plans[0].base} "
                          f"out of the output ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})")


def _check_ranges(plans: list[SlicePlan]) -> None:
    """Each source's layer range lies inside its model (its module's layers; headers only)."""
    counts: dict[tuple[Path, Module], int] = {}
    for sp in plans:
        for path, (lo, hi) in {(sp.base, sp.base_range), *zip(sp.experts, sp.ranges)}:
            if (path, sp.module) not in counts:
                counts[path, sp.module] = layers_of(st.open_checkpoint(path), sp.module).count
            if not 0 <= lo < hi <= counts[path, sp.module]:
                raise ConfigError(f"{sp.where}: layer_range [{lo}, {hi}] of {path} is out of bounds "
                                  f"(it has {counts[path, sp.module]} layers)")


def _every_layer(sp: SlicePlan) -> SlicePlan:
    """A ``models:`` slice as one slice of every layer (of its module)."""
    count = layers_of(st.open_checkpoint(sp.base), sp.module).count
    return replace(sp, base_range=(0, count), ranges=((0, count),) * len(sp.experts))


def _all_settings(cfg: MergeConfig, plans: list[SlicePlan]):
    """``(where, setting, layers it spreads over or None)`` for every parameter setting of the config."""
    length = plans[0].length if cfg.models is not None else None
    for key, value in cfg.parameters.items():
        yield f"parameters.{key}", value, length
    for sp in plans:
        for key, value in sp.parameters.items():
            yield f"{sp.where}.parameters.{key}", value, sp.length
        for spec in sp.specs:
            for key, value in spec.parameters.items():
                yield f"{sp.where}[{spec.model}].parameters.{key}", value, sp.length


def tensor_hparams(cfg: MergeConfig, method: str, sp: SlicePlan, tensor: str, t: float) -> dict[str, Any]:
    """The hyper-parameters of output ``tensor`` of slice ``sp`` at gradient position ``t``:
    every setting evaluated (:func:`jmerge.config.settings.evaluate`; filters match the output
    tensor's name), mapped as a scalar config, jmerge's overrides applied, checked."""
    glob = {k: v for k, v in ((k, settings.evaluate(v, tensor, t)) for k, v in {**cfg.parameters, **sp.parameters}.items())
            if v is not None}
    specs = [s.model_copy(update={"parameters": {k: v for k, v in ((k, settings.evaluate(v, tensor, t))
                                                                     for k, v in s.parameters.items()) if v is not None}})
             for s in sp.specs]
    scalar_cfg = cfg.model_copy(update={"parameters": glob})
    return _hparams(cfg.jmerge.method or cfg.merge_method, method, scalar_cfg, specs, len(sp.experts))


def _hparams(name: str, method: str, cfg: MergeConfig, specs: list[ModelSpec], num_experts: int) -> dict[str, Any]:
    """Hyper-parameters of a scalar config: mergekit's mapping (or a jmerge method's own), then
    the ``jmerge:`` overrides, checked by the method."""
    opts = cfg.jmerge
    mapped = table().get(name) if opts.method is None else None
    hp = map_mergekit(name, mapped, cfg, specs) if mapped else _map_native(method, cfg, specs)
    if mapped and opts.compute_dtype == "model" and "tie_break" in registry.get(method).defaults:
        hp["tie_break"] = "torch"  # mergekit's trim exactly: ties kept in torch's sort order
    for key, value in opts.parameters.items():
        hp[key] = scalar(value, f"jmerge.parameters.{key}")
    if opts.trim is not None:
        if "trim" not in registry.get(method).defaults:
            raise ConfigError(f"`jmerge.trim` applies to methods with a `trim` hyper-parameter (ties), not {method!r}")
        if opts.trim not in ("global", "tensor"):
            raise ConfigError(f"`jmerge.trim` must be 'global' or 'tensor', got {opts.trim!r}")
        hp["trim"] = opts.trim
        if opts.trim == "global" and hp.get("tie_break") in ("first", "torch"):
            hp["tie_break"] = "all"  # mergekit's exactly-k rule counts per tensor; the paper's global trim keeps ties
    if opts.learn is not None and method in STATISTICS:
        hp[STATISTICS[method]] = MEASURED  # measured on the prompts by `jmerge run`
    try:
        registry.get(method).resolve(num_experts, hp)
    except MergeInputError as e:
        raise ConfigError(f"merge_method {name!r}: {e}") from None
    return hp


def resolve(cfg: MergeConfig, config_text: str = "", where: Path | None = None) -> MergePlan:
    """Checks the whole config and maps it to a jmerge method and hyper-parameters."""
    where = where or Path.cwd()
    opts = cfg.jmerge
    name = opts.method or cfg.merge_method
    mergekit_names = table()
    mapped = mergekit_names.get(name) if opts.method is None else None  # a method named as mergekit names it
    mk = mapped.mergekit if mapped else None
    if mk is None and name not in registry.available():
        known = sorted(set(mergekit_names) | set(registry.available()))
        raise ConfigError(f"unknown merge_method {name!r}{closest(name, known)} (known: {', '.join(known)})")
    method = mapped.name if mapped else name
    check_dtype(cfg.dtype, "dtype")
    check_dtype(cfg.out_dtype, "out_dtype")
    groups, known = _groups(cfg, where)
    plans = [_slice(mk, name, members, base_ref, where, label, params, module)
             for label, members, base_ref, params, module in groups]
    for key, value, _ in _all_settings(cfg, plans):
        settings.check(value, key, None)
    base_given = cfg.base_model is not None or (cfg.slices is not None and cfg.slices[0].base_model is not None)
    extra_files, vocab = _tokenizer_files(cfg, plans[0].base if base_given else None, plans[0].base,
                                          list(dict.fromkeys(p for s in plans for p in (s.base, *s.experts))), where)
    varies = any(settings.varies(v) for _, v, _ in _all_settings(cfg, plans))
    used = [label for label, on in (("slices", cfg.slices is not None), ("modules", cfg.modules is not None),
                                    ("gradients and filters", varies),
                                    ("tokenizer_source's embedding-row remapping", vocab is not None)) if on]
    per_tensor = bool(used)
    if per_tensor:
        used = " and ".join(used)  # what makes this a per-tensor plan, named in every refusal below
        if mk is None:
            raise ConfigError(f"{used} apply to mergekit's methods, not {name!r}")
        for what, given in (("jmerge.lwptv", opts.lwptv), ("jmerge.learn", opts.learn)):
            if given is not None:
                raise ConfigError(f"`{what}` needs whole models; it does not combine with {used}")
        if opts.trim == "global":
            raise ConfigError(f"`jmerge.trim: global` ranks over the whole model; it does not combine with {used}")
    if cfg.modules is not None:
        _check_modules(plans, known)
    _check_ranges([sp for sp in plans if sp.base_range is not None])
    if per_tensor:  # `models:` with gradients or filters, or in a module: one slice of every layer
        plans = [sp if sp.base_range is not None else _every_layer(sp) for sp in plans]
    for key, value, layers in _all_settings(cfg, plans):
        settings.check(value, key, layers)
    sp = plans[0]
    hp = tensor_hparams(cfg, method, sp, "", 0.0)  # a scalar config's only values; else checks the names and the t = 0 values
    if opts.lwptv is not None:
        _lwptv(opts.lwptv).check()
    if opts.learn is not None and opts.lwptv is not None:
        raise ConfigError("`jmerge.learn` with `jmerge.lwptv` is not supported by `jmerge run`; "
                          "use jmerge.learn in Python on LwPTV-pruned task vectors")
    learn = _learn(opts.learn, method, sp.experts, where) if opts.learn is not None else None
    return MergePlan(
        method=method,
        base=sp.base,
        experts=sp.experts,
        hparams=hp,
        seed=opts.seed,
        out_dtype=cfg.out_dtype or cfg.dtype,
        lwptv=opts.lwptv,
        learn=learn,
        in_memory=opts.in_memory or opts.lwptv is not None or learn is not None,
        check_finite=opts.check_finite,
        config_text=config_text,
        source_method=cfg.merge_method,
        config=cfg,
        compute_dtype=cfg.dtype if opts.compute_dtype == "model" else None,
        extra_files=extra_files,
        vocab=vocab,
        slices=tuple(plans) if per_tensor else None,
    )


def _tokenizer_files(cfg: MergeConfig, base_model: Path | None, base: Path, models: list[Path],
                     where: Path) -> tuple[dict[str, str], tokenizer.Vocab | None]:
    """The tokenizer files ``tokenizer_source`` / ``tokenizer`` / ``chat_template`` give, and the
    embedding rows' remapping when the vocabularies differ (:mod:`.tokenizer`); headers only."""
    if cfg.tokenizer_source is not None and cfg.tokenizer is not None:
        raise ConfigError("give one of `tokenizer_source` and `tokenizer` (mergekit refuses both)")
    key, source = ("tokenizer_source", cfg.tokenizer_source) if cfg.tokenizer is None else ("tokenizer.source", cfg.tokenizer.source)
    if cfg.tokenizer is not None:
        for field in ("tokens", "pad_to_multiple_of"):
            if getattr(cfg.tokenizer, field) is not None:
                raise ConfigError(f"`tokenizer.{field}` (mergekit's new-token embeddings) is not supported")
    files: dict[str, str] = {}
    vocab = None
    if source is not None:
        if source not in ("base", "union"):
            source = str(_resolve_path(source, where, key))
        files, vocab = tokenizer.build(source, key, base_model, base, [m for m in models if m != base])
    if cfg.chat_template is not None:
        files.update(tokenizer.chat_template_files(cfg.chat_template, files, base, models))
    return files, vocab


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
