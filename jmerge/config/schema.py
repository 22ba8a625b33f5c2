"""The YAML document's schema (pydantic): mergekit's top-level keys plus ``jmerge:``, read and
validated whole, with every unknown key named beside the closest known one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, ValidationError

from jmerge._util import did_you_mean
from jmerge.validate import MergeInputError

DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(MergeInputError):
    """A merge configuration that cannot be run, with what is wrong and where."""


class LearnOptions(BaseModel):
    """The ``jmerge: learn:`` block of a YAML config (see :mod:`jmerge.config`): one prompt
    file per merged model, in the order of ``models``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompts: tuple[Path, ...]
    method: Literal["divmerge", "adamerging", "regmean", "fisher"] = "divmerge"  # regmean/fisher: merge_method's
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


class ModelSpec(BaseModel):
    """A model and its parameter settings (values, gradients or filter lists: :mod:`.settings`)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = {}


class SourceSpec(ModelSpec):
    """A slice's source: a model's layers ``[start, stop)``."""

    layer_range: tuple[int, int]


class SliceSpec(BaseModel):
    """An output slice (mergekit's ``slices``): its sources, merged layer by layer."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SourceSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = {}


class ModuleSpec(BaseModel):
    """A module merged on its own (mergekit's ``modules: {name: ...}``): its ``models`` or
    ``slices``, and ``parameters`` over the global ones (a slice's and a model's over these)."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelSpec] | None = None
    slices: list[SliceSpec] | None = None
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
    compute_dtype: Literal["float32", "model"] = "float32"  # "model": mergekit's arithmetic in `dtype`


class TokenizerSpec(BaseModel):
    """mergekit's ``tokenizer:`` block (``source``; ``tokens`` and ``pad_to_multiple_of`` are refused)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class MergeConfig(BaseModel):
    """The YAML document (mergekit's top-level keys plus ``jmerge``)."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelSpec] | None = None
    slices: list[SliceSpec] | None = None
    modules: dict[str, ModuleSpec] | None = None
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    jmerge: JmergeOptions = JmergeOptions()


# mergekit top-level keys jmerge does not support, and why
_UNSUPPORTED_TOP = {
    "name": "multi-stage configs (mergekit-multi) are not supported",
}


def closest(name: str, known) -> str:
    """The config's "did you mean" hint (a looser cutoff than the library's)."""
    return did_you_mean(name, known, cutoff=0.5)


def scalar(value: Any, where: str) -> Any:
    """``value`` if it is one value; a config error naming ``where`` for lists and mappings."""
    if isinstance(value, list):
        raise ConfigError(f"{where}: gradients and `filter` lists apply to mergekit's methods; give one value")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: expected a single value, got a mapping {value!r}")
    return value


def per_model(values: list):
    """One value for all experts, or a tuple when they differ."""
    return values[0] if all(v == values[0] for v in values) else tuple(values)


def check_dtype(value: str | None, key: str) -> str | None:
    if value is not None and value not in DTYPES:
        raise ConfigError(f"`{key}: {value}` is not supported; use one of {', '.join(DTYPES)}{closest(value, DTYPES)}")
    return value


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
            lines.append(f"unknown key `{loc}`{closest(key, known)} (known: {', '.join(sorted(known))})")
        elif err["type"] == "missing":
            lines.append(f"missing required key `{loc}`")
        else:
            lines.append(f"`{loc}`: {err['msg']} (got {err.get('input')!r})")
    return ConfigError("invalid merge config:\n  " + "\n  ".join(lines))


def _known_keys(parent: tuple) -> list[str]:
    if not parent:
        return list(MergeConfig.model_fields)
    if parent[0] == "modules":  # modules.<name>, then a module's keys as the top level's
        return list(ModuleSpec.model_fields) if len(parent) == 2 else _known_keys(parent[2:])
    if parent[:2] == ("jmerge", "learn"):
        return list(LearnOptions.model_fields)
    if parent[0] == "jmerge":
        return list(JmergeOptions.model_fields)
    if parent[0] == "tokenizer":
        return list(TokenizerSpec.model_fields)
    if parent[0] == "models":
        return list(ModelSpec.model_fields)
    if parent[0] == "slices":
        return list(SourceSpec.model_fields if "sources" in parent else SliceSpec.model_fields)
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
