"""YAML merge configurations: mergekit's format for the methods both tools have, plus jmerge's own.

A config is validated whole (unknown keys, methods and parameters are named, with the
closest known name) and resolved to a :class:`MergePlan` before any tensor is read::

    models:
      - model: ./math-ft
        parameters: {weight: 1.0, density: 0.2}
      - model: ./code-ft
        parameters: {weight: 0.5, density: 0.2}
    base_model: ./base
    merge_method: ties
    parameters: {lambda: 1.0, normalize: true}
    dtype: float32
    jmerge:                    # jmerge's own keys (all optional)
      trim: global             # the TIES paper's global trim instead of mergekit's per tensor
      seed: 0                  # PRNG seed of DARE / DELLA
      parameters: {sign: count}  # any jmerge hyper-parameter of the method, passed as is
      lwptv: {layers: gpt2, score: trim_survival, rule: keep_ratio, value: 0.8}  # LwPTV (in memory)
      # method: iso_cts        # run this jmerge method instead, global parameters passed as is
      # in_memory: false       # load whole models instead of streaming
      # check_finite: true     # refuse NaN/inf inputs
      # learn:                 # DivMerge / AdaMerging coefficients for causal LMs (merge_method
      #   prompts: [math.txt, code.jsonl]   # task_arithmetic; one prompt file per model)
      #   method: divmerge       # or adamerging; granularity: task | layer | tensor; layers: gpt2

mergekit methods and how they map (defaults are mergekit's, read from
``mergekit/merge_methods/registry.py`` and ``generalized_task_arithmetic.py``; a model's
``parameters`` override the global ``parameters``, as in mergekit):

=================  ==================  ==========================================================
mergekit           jmerge              mapping
=================  ==================  ==========================================================
linear             average             weight -> weights; normalize (true; false: sum_t w_t theta_t)
task_arithmetic    task_arithmetic     lambda (1.0) -> scale; weight -> weights; normalize
                                       (default false) divides the weights by their sum
ties               ties                trim="tensor" (mergekit ranks per tensor), sign="sum";
                                       density (1.0), normalize (true), lambda -> scale,
                                       rescale (false; true: each trimmed tensor to its L1 norm)
dare_linear        dare_linear         density (1.0), rescale (true), lambda; normalize (false)
                                       divides the weights by their sum
dare_ties          dare_ties           density (1.0), rescale (true), normalize (false), lambda
breadcrumbs        breadcrumbs         density (1.0), gamma (0.01), lambda; normalize (false)
                                       divides the weights by their sum
breadcrumbs_ties   breadcrumbs_ties    density (1.0), gamma (0.01), normalize (false), lambda
della              della               density (< 1 needed), epsilon (0.15), rescale (true),
                                       normalize (true), lambda
della_linear       della_linear        density (< 1 needed), epsilon (0.15), rescale (true, L1 norm),
                                       lambda; normalize (false) divides the weights by their sum
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
passthrough        -                   "not implemented in jmerge"
=================  ==================  ==========================================================

A parameter mergekit reads for some method but not for this one (e.g. a per-model
``weight`` for ``slerp`` or ``model_stock``) is ignored with a ``ConfigWarning`` naming it, as
mergekit ignores it; any other unknown name is an error (mergekit would silently ignore a
misspelt ``densty``). The ``base_model`` may also be listed among ``models`` (under any
spelling of its path); it is then not merged as an expert, except for ``linear`` and
``karcher``, which average every listed model (``karcher`` the base_model too).

Any other registered jmerge method (``magmax``, ``consensus``, ``tsv``, ``iso_c``,
``iso_cts``...) may be named in ``merge_method`` directly: its global ``parameters`` are
jmerge hyper-parameters and per-model values become per-task tuples (``weight`` ->
``weights``).

Known differences from mergekit, where semantics cannot match exactly:

* ``dtype`` is mergekit's compute dtype; jmerge always computes in float32 and uses
  ``dtype`` (or ``out_dtype``) only as the output dtype, so low-precision outputs are
  rounded once instead of at every step.
* DARE/DELLA ``rescale``: jmerge divides survivors by the keep probability (the papers);
  current mergekit rescales each sparsified tensor to its original L1 norm. Random masks
  differ in any case (different generators).
* ``int8_mask`` (a mergekit memory option) is accepted and has no effect.
* ``rescale: true`` for ``breadcrumbs`` (mergekit's L1 rescaling), parameter gradients
  (lists over layers) and ``filter`` conditionals, ``slices``/``modules``, LoRA ``model+lora`` references and tokenizer
  surgery are rejected with an error saying so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError

from jmerge._util import did_you_mean
from jmerge.methods import registry
from jmerge.validate import MergeInputError

DTYPES = ("float32", "float16", "bfloat16")


class LearnOptions(BaseModel):
    """The ``jmerge: learn:`` block of a YAML config (see :mod:`jmerge.config`): one prompt
    file per merged model, in the order of ``models``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompts: tuple[Path, ...]
    method: Literal["divmerge", "adamerging"] = "divmerge"
    granularity: Literal["task", "layer", "tensor"] = "task"
    layers: str | None = None  # a jmerge.lwptv preset or regex, for granularity "layer"
    samples: PositiveInt = 200
    prompt_tokens: PositiveInt = 32  # longer prompts keep their last prompt_tokens tokens
    chat_template: bool = False  # wrap each text prompt as a user turn with the tokenizer's chat template
    max_new_tokens: PositiveInt = 32
    epochs: PositiveInt = 4
    learning_rate: PositiveFloat = 1e-2
    batch_per_task: PositiveInt = 4
    init: float | None = None  # initial Γ: None is the method's (1/K DivMerge, 0.3 AdaMerging)
    seed: int = 0


class ConfigError(MergeInputError):
    """A merge configuration that cannot be run, with what is wrong and where."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = {}


class JmergeOptions(BaseModel):
    """jmerge's own keys (under ``jmerge:``)."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    parameters: dict[str, Any] = {}
    trim: str | None = None
    seed: int = 0
    lwptv: dict[str, Any] | None = None
    learn: LearnOptions | None = None
    check_finite: bool = True
    in_memory: bool = False


class MergeConfig(BaseModel):
    """The YAML document (mergekit's top-level keys plus ``jmerge``)."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelSpec]
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    jmerge: JmergeOptions = JmergeOptions()


# mergekit top-level keys jmerge does not support, and why
_UNSUPPORTED_TOP = {
    "slices": "layer slicing (frankenmerges) is not supported; list whole models under `models`",
    "modules": "multi-module configs are not supported; list whole models under `models`",
    "tokenizer": "tokenizer merging is not supported; the base model's tokenizer files are copied",
    "tokenizer_source": "tokenizer merging is not supported; the base model's tokenizer files are copied",
    "chat_template": "chat templates are not supported; the base model's tokenizer files are copied",
    "name": "multi-stage configs (mergekit-multi) are not supported",
}


@dataclass(frozen=True)
class MethodMap:
    """A mergekit method: its jmerge method, mergekit's parameters with defaults, fixed jmerge hparams."""

    jmerge: str
    global_params: dict[str, Any]
    model_params: dict[str, Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    optional_base: bool = False  # with a base_model: task vectors, the base not merged; without: whole weights
    passed: dict[str, str] = field(default_factory=dict)  # mergekit global parameter -> jmerge hparam, as is


_GTA = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}
MERGEKIT: dict[str, MethodMap] = {
    "linear": MethodMap("average", {"normalize": True}, {"weight": 1.0}, needs_base=False),
    "task_arithmetic": MethodMap("task_arithmetic", _GTA, {"weight": 1.0, "density": 1.0}),
    "ties": MethodMap("ties", {**_GTA, "normalize": True}, {"weight": 1.0, "density": 1.0}, {"trim": "tensor", "sign": "sum"}),
    "dare_linear": MethodMap("dare_linear", {**_GTA, "rescale": True}, {"weight": 1.0, "density": 1.0}),
    "dare_ties": MethodMap("dare_ties", {**_GTA, "rescale": True}, {"weight": 1.0, "density": 1.0}, {"sign": "sum"}),
    "breadcrumbs": MethodMap("breadcrumbs", _GTA, {"weight": 1.0, "density": 1.0, "gamma": 0.01}),
    "breadcrumbs_ties": MethodMap("breadcrumbs_ties", _GTA, {"weight": 1.0, "density": 1.0, "gamma": 0.01}, {"sign": "sum"}),
    "della": MethodMap(
        "della", {**_GTA, "normalize": True, "rescale": True}, {"weight": 1.0, "density": 1.0, "epsilon": 0.15}, {"sign": "sum"}
    ),
    "slerp": MethodMap("slerp", {"t": None}, {}, {"space": "weights"}),
    "multislerp": MethodMap("multislerp", {"normalize_weights": True, "eps": 1e-8}, {"weight": 1.0}, needs_base=False,
                            optional_base=True),
    "model_stock": MethodMap("model_stock", {"filter_wise": False}, {}),
    # mergekit_extra (jmerge/methods/mergekit_extra.py)
    "della_linear": MethodMap(
        "della_linear", {**_GTA, "rescale": True}, {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    ),
    "sce": MethodMap("sce", {"select_topk": 1.0, "int8_mask": False}, {}, passed={"select_topk": "select_topk"}),
    "nearswap": MethodMap("nearswap", {"t": None}, {}, passed={"t": "t"}),
    "arcee_fusion": MethodMap("arcee_fusion", {}, {}),
    "karcher": MethodMap("karcher", {"max_iter": 10, "tol": 1e-5}, {}, needs_base=False,
                         passed={"max_iter": "max_iter", "tol": "tol"}),
    "nuslerp": MethodMap("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": None},
                         needs_base=False, optional_base=True,
                         passed={"nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"}),
    "ram": MethodMap("ram", {"epsilon": 1e-5}, {}, passed={"epsilon": "epsilon"}),
    "ramplus_tl": MethodMap("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {},
                            passed={"r": "r", "alpha": "alpha", "epsilon": "epsilon"}),
}
# every method mergekit 0.1.5 registers (mergekit/merge_methods/registry.py and the decorated modules)
MERGEKIT_METHODS = frozenset(MERGEKIT) | {"passthrough"}
# every parameter name a mergekit method reads: for another method mergekit ignores them, so jmerge warns
MERGEKIT_PARAMS = frozenset(k for mk in MERGEKIT.values() for k in (*mk.global_params, *mk.model_params)) | {"scale"}


class ConfigWarning(UserWarning):
    """A config key jmerge accepts but does not use (mergekit ignores it too)."""


def _ignored(where: str, key: str, name: str) -> None:
    warnings.warn(f"`{where}{key}` is ignored: merge_method {name!r} does not use it (mergekit ignores it too)",
                  ConfigWarning, stacklevel=4)


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


def _closest(name: str, known) -> str:
    return did_you_mean(name, known, cutoff=0.5)


def _pydantic_error(e: ValidationError) -> ConfigError:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            parent = err["loc"][:-1]
            if not parent and key in _UNSUPPORTED_TOP:
                lines.append(f"`{key}`: {_UNSUPPORTED_TOP[key]}")
                continue
            known = _known_keys(parent)
            lines.append(f"unknown key `{loc}`{_closest(key, known)} (known: {', '.join(sorted(known))})")
        elif err["type"] == "missing":
            lines.append(f"missing required key `{loc}`")
        else:
            lines.append(f"`{loc}`: {err['msg']} (got {err.get('input')!r})")
    return ConfigError("invalid merge config:\n  " + "\n  ".join(lines))


def _known_keys(parent: tuple) -> list[str]:
    if not parent:
        return list(MergeConfig.model_fields)
    if parent[:2] == ("jmerge", "learn"):
        return list(LearnOptions.model_fields)
    if parent[0] == "jmerge":
        return list(JmergeOptions.model_fields)
    if parent[0] == "models":
        return list(ModelSpec.model_fields)
    return []


def load_config(source: str | Path) -> tuple[MergeConfig, str, Path]:
    """Reads a YAML file (or YAML text): ``(config, exact text, directory for relative paths)``."""
    path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        text, where = path.read_text(), path.parent
    else:
        text, where = str(source), Path.cwd()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError("config must be a YAML mapping with `models`, `merge_method`, ...")
    try:
        return MergeConfig.model_validate(raw), text, where
    except ValidationError as e:
        raise _pydantic_error(e) from None


def _resolve_path(ref: str, where: Path, what: str) -> Path:
    if "+" in ref and not Path(ref).exists():
        raise ConfigError(f"{what} {ref!r}: LoRA references (model+lora) are not supported")
    p = Path(ref).expanduser()
    for cand in ([p] if p.is_absolute() else [p, where / p]):
        if cand.exists():
            return cand
    raise ConfigError(
        f"{what} {ref!r} not found (looked in {Path.cwd()} and {where}); jmerge reads local HF directories, "
        ".safetensors or .gguf files: download hub models first (e.g. `huggingface-cli download`)"
    )


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            raise ConfigError(f"{where}: `filter` conditionals are not supported yet; give one value")
        raise ConfigError(f"{where}: gradients (lists of values over layers) are not supported yet; give one value")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: expected a single value, got a mapping {value!r}")
    return value


def _dtype(value: str | None, key: str) -> str | None:
    if value is not None and value not in DTYPES:
        raise ConfigError(f"`{key}: {value}` is not supported; use one of {', '.join(DTYPES)}{_closest(value, DTYPES)}")
    return value


def _per_model(values: list):
    """One value for all experts, or a tuple when they differ."""
    return values[0] if all(v == values[0] for v in values) else tuple(values)


def resolve(cfg: MergeConfig, config_text: str = "", where: Path | None = None) -> MergePlan:
    """Checks the whole config and maps it to a jmerge method and hyper-parameters."""
    where = where or Path.cwd()
    opts = cfg.jmerge
    name = opts.method or cfg.merge_method
    mk = MERGEKIT.get(name) if opts.method is None else None
    if mk is None and name in MERGEKIT_METHODS and name not in registry.available():
        raise ConfigError(f"merge_method {name!r} (a mergekit method) is not implemented in jmerge")
    if mk is None and name not in registry.available():
        known = sorted(set(MERGEKIT) | set(registry.available()))
        raise ConfigError(f"unknown merge_method {name!r}{_closest(name, known)} (known: {', '.join(known)})")
    method = mk.jmerge if mk else name
    if method not in registry.available():
        raise ConfigError(f"merge_method {name!r} needs jmerge method {method!r}, which this jmerge does not have")
    _dtype(cfg.dtype, "dtype")
    _dtype(cfg.out_dtype, "out_dtype")
    if not cfg.models:
        raise ConfigError("`models` is empty")

    base_ref = cfg.base_model
    refs = [m.model for m in cfg.models]
    if base_ref is None:
        if mk is not None and mk.needs_base:
            raise ConfigError(f"merge_method {name!r} needs `base_model`")
        if mk is None:
            raise ConfigError("`base_model` is required (the pre-trained model the task vectors start from)")
        base_ref = refs[0]
    base = _resolve_path(base_ref, where, "base_model")
    paths = [_resolve_path(m.model, where, "model") for m in cfg.models]
    if mk is None or mk.needs_base or (mk.optional_base and cfg.base_model is not None):
        # the base_model may also be listed among `models` (mergekit's examples do), under any spelling of its path
        kept = [(m, p) for m, p in zip(cfg.models, paths) if cfg.base_model is None or p.resolve() != base.resolve()]
    else:
        kept = list(zip(cfg.models, paths))
    if not kept:
        raise ConfigError("no models to merge besides base_model")
    expert_specs = [m for m, _ in kept]
    experts = tuple(p for _, p in kept)
    if method == "slerp" and mk is not None:  # mergekit: t=0 is the base model, t=1 the other one
        experts = (base, *experts)
    if name == "karcher" and cfg.base_model is not None and all(p.resolve() != base.resolve() for p in experts):
        experts = (base, *experts)  # mergekit 0.1.5 averages the base_model with the models

    hp = _map_mergekit(name, mk, cfg, expert_specs) if mk else _map_native(method, cfg, expert_specs)
    for key, value in opts.parameters.items():
        hp[key] = _scalar(value, f"jmerge.parameters.{key}")
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
    """Checks the ``jmerge.learn`` block against the plan and resolves its prompt files."""
    if method != "task_arithmetic":
        raise ConfigError(f"`jmerge.learn` learns task-arithmetic coefficients; merge_method must be "
                          f"task_arithmetic, not {method!r}")
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


def _gather(name: str, allowed: dict[str, Any], cfg: MergeConfig, experts: list[ModelSpec]) -> dict[str, Any]:
    """Global and per-model parameter values with mergekit's precedence, unknown names rejected."""
    for key, value in cfg.parameters.items():
        if key not in allowed and key in MERGEKIT_PARAMS:
            _ignored("parameters.", key, name)
            continue
        if key not in allowed:
            raise ConfigError(
                f"merge_method {name!r} has no parameter {key!r}{_closest(key, allowed)} "
                f"(parameters: {', '.join(sorted(allowed)) or 'none'})"
            )
        _scalar(value, f"parameters.{key}")
    for m in experts:
        for key, value in m.parameters.items():
            if key not in allowed and key in MERGEKIT_PARAMS:
                _ignored(f"models[{m.model}].parameters.", key, name)
                continue
            if key not in allowed:
                raise ConfigError(
                    f"model {m.model!r}: merge_method {name!r} has no parameter {key!r}{_closest(key, allowed)}"
                )
            _scalar(value, f"models[{m.model}].parameters.{key}")
    return {k: cfg.parameters.get(k, d) for k, d in allowed.items()}


def _map_mergekit(name: str, mk: MethodMap, cfg: MergeConfig, experts: list[ModelSpec]) -> dict[str, Any]:
    allowed = {**mk.global_params, **mk.model_params}
    glob = _gather(name, allowed, cfg, experts)

    def model_values(key: str) -> list:
        return [m.parameters.get(key, glob[key]) for m in experts]

    hp: dict[str, Any] = dict(mk.fixed)
    jm = registry.get(mk.jmerge).defaults
    if "weight" in mk.model_params:
        missing = [m.model for m, w in zip(experts, model_values("weight")) if w is None]
        if missing:
            raise ConfigError(f"merge_method {name!r} needs a `weight` for every model; missing for {', '.join(missing)}")
        weights = [float(w) for w in model_values("weight")]
        if "normalize" in mk.global_params and "normalize" not in jm:
            if glob["normalize"]:  # mergekit divides the mixed delta by the summed weights
                total = sum(weights)
                weights = [w / total for w in weights] if abs(total) >= 1e-8 else weights
        hp["weights"] = tuple(weights)
    if "normalize" in mk.global_params and "normalize" in jm:
        hp["normalize"] = bool(glob["normalize"])
    if "lambda" in mk.global_params:
        hp["scale"] = float(glob["lambda"])
    if "density" in mk.model_params and "density" in jm:
        hp["density"] = _per_model([float(d) for d in model_values("density")])
    for key in ("gamma", "epsilon"):
        if key in mk.model_params:
            values = [float(v) for v in model_values(key)]
            if len(set(values)) > 1:
                raise ConfigError(f"merge_method {name!r}: jmerge takes one {key} for all models, got {values}")
            hp[key] = values[0]
    if "rescale" in mk.global_params and glob["rescale"]:
        if "rescale" not in jm:
            raise ConfigError(f"merge_method {name!r}: `rescale: true` (mergekit's L1-norm rescaling) is not supported")
    if "rescale" in jm and "rescale" in mk.global_params:
        hp["rescale"] = bool(glob["rescale"])
    if mk.jmerge in ("della", "della_linear") and any(float(d) >= 1 for d in model_values("density")):
        raise ConfigError(f"{name} needs `density` < 1 (with density 1 it prunes nothing; use ties or dare_ties)")
    if mk.jmerge == "slerp":
        if glob["t"] is None:
            raise ConfigError("slerp needs the parameter `t`")
        if len(experts) != 1 or cfg.base_model is None:
            raise ConfigError("slerp needs `base_model` and exactly one other model")
        hp["t"] = float(glob["t"])
    if mk.jmerge == "multislerp":
        if not glob["normalize_weights"]:
            raise ConfigError("multislerp with `normalize_weights: false` is not supported")
        if float(glob["eps"]) != 1e-8:
            raise ConfigError("multislerp `eps` is fixed at 1e-8 in jmerge")
    if mk.jmerge == "model_stock":
        hp["filter_wise"] = bool(glob["filter_wise"])
    if mk.optional_base:  # mergekit: task vectors with a base_model, else whole weights
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


def _map_native(method: str, cfg: MergeConfig, experts: list[ModelSpec]) -> dict[str, Any]:
    m = registry.get(method)
    hp = {k: _scalar(v, f"parameters.{k}") for k, v in cfg.parameters.items()}
    per_model_keys = {k for spec in experts for k in spec.parameters}
    for key in sorted(per_model_keys):
        target = "weights" if key == "weight" else key
        if target not in m.per_model:
            known = sorted(m.per_model)
            raise ConfigError(f"method {method!r} has no per-model parameter {key!r}{_closest(target, known)} "
                              f"(per-model: {', '.join(known) or 'none'})")
        missing = [spec.model for spec in experts if key not in spec.parameters and key not in cfg.parameters]
        if missing:
            raise ConfigError(f"per-model parameter {key!r} is missing for {', '.join(missing)}")
        values = [_scalar(spec.parameters.get(key, cfg.parameters.get(key)), f"models.parameters.{key}") for spec in experts]
        hp[target] = tuple(values) if target == "weights" else _per_model(values)
    return hp


def plan_from_yaml(source: str | Path) -> MergePlan:
    """Loads and resolves a config file (or YAML text) in one step."""
    cfg, text, where = load_config(source)
    return resolve(cfg, text, where)

