"""Learned merge coefficients for Hugging Face causal LMs, as ``jmerge run`` does them.

DivMerge's language-model protocol (arXiv 2509.02108 §2): each expert
continues its task's prompts greedily until EOS or ``max_new_tokens``; Γ then minimizes the
JS divergence, per generated token, between each expert and θ(Γ) = θ0 + Σ_t Γ_t τ_t
(:func:`jmerge.learn.lm_targets`, :func:`jmerge.learn.fit_coefficients`). AdaMerging
instead minimizes the entropy of θ(Γ)'s next-token distributions over the prompts.

The model: a Llama (``model_type: llama``) runs as :mod:`jmerge.learn.llama` on the
checkpoint's HF-named tensors, honouring ``rope_theta`` and a tied head (transformers 4.57's
Flax Llama ignores both and would silently compute another model); other architectures run as
the transformers Flax class built from the base's ``config.json`` (the ``hf`` extra), with the
PyTorch-layout safetensors mapped to the Flax layout (:mod:`jmerge.io.flax_io`).

Prompts: one file per expert, ``.txt`` (one prompt per line; needs the base's tokenizer
files) or ``.jsonl`` with ``"text"`` or ``"ids"`` (token ids) per line; with
``chat_template: true`` each text prompt becomes a user turn of the tokenizer's chat template
(after a ``"system"`` turn when the ``.jsonl`` line has one), ending in the assistant's
generation prompt. Each task's prompts are padded on the left to its longest one (a prompt
longer than ``prompt_tokens`` keeps its last ``prompt_tokens`` tokens, logged), so every prompt
ends at the same position with its last token kept; padding is the id ``-1``, which the model
sees as masked out, with positions counting real tokens only (:func:`model_apply`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmerge import tree as jtree
from jmerge.io import flax_io
from jmerge.io import safetensors_io as st
from jmerge.learn import engine, llama
from jmerge.learn.coefficients import layout as coefficient_layout
from jmerge.learn.targets import TaskTargets, lm_targets
from jmerge.validate import MergeInputError

log = logging.getLogger(__name__)
PAD = -1  # the prompt padding id: masked out of attention (model_apply)


class LearnOptions(Protocol):
    """What :func:`learn` reads from its options (the CLI's ``jmerge.learn`` block satisfies
    it; the library does not import the CLI's config)."""

    method: str
    granularity: str
    layers: Any
    prompts: Sequence[Path]
    samples: int
    prompt_tokens: int
    max_new_tokens: int
    learning_rate: float
    epochs: int
    batch_per_task: int
    init: Any
    seed: int
    chat_template: bool

def _tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_dir)
    except Exception as e:
        raise MergeInputError(f"{base_dir}: text prompts need the base model's tokenizer files ({e}); "
                              f"give token ids instead ({{\"ids\": [...]}} per line of a .jsonl file)") from None


def read_prompts(path: Path, base_dir: Path, chat_template: bool = False) -> list[list[int]]:
    """Token ids of every prompt in ``path`` (``.txt`` or ``.jsonl``, see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"prompt file {path} does not exist")
    lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise MergeInputError(f"prompt file {path} holds no prompts")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MergeInputError(f"{path}, line {i}: not JSON ({e})") from None
        if all(isinstance(r, dict) and "ids" in r for r in rows):
            if chat_template:
                raise MergeInputError(f"{path}: learn.chat_template applies to text prompts; these are token ids")
            return [[int(t) for t in r["ids"]] for r in rows]
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            raise MergeInputError(f"{path}: every line needs a \"text\" string or an \"ids\" list")
        if not all(isinstance(r.get("system", ""), str) for r in rows):
            raise MergeInputError(f"{path}: \"system\" must be a string")
        texts, systems = [r["text"] for r in rows], [r.get("system") for r in rows]
        if any(systems) and not chat_template:
            raise MergeInputError(f"{path}: a \"system\" turn needs learn.chat_template: true")
    elif path.suffix == ".txt":
        texts, systems = lines, [None] * len(lines)
    else:
        raise MergeInputError(f"prompt file {path}: use .txt (one prompt per line) or .jsonl")
    tok = _tokenizer(base_dir)
    if not chat_template:
        return [tok(t)["input_ids"] for t in texts]
    if not getattr(tok, "chat_template", None):
        raise MergeInputError(f"{path}: learn.chat_template is true but the tokenizer of {base_dir} has no chat template")
    turns = [[*([{"role": "system", "content": sy}] if sy else []), {"role": "user", "content": t}]
             for t, sy in zip(texts, systems)]
    return [list(tok.apply_chat_template(m, add_generation_prompt=True)) for m in turns]


def prompt_array(prompts: list[list[int]], samples: int, length: int, seed: int, where: Path) -> np.ndarray:
    """``(N, P)`` int32: up to ``samples`` seeded prompts padded on the left with :data:`PAD`
    to the longest, ``P <= length``; a longer prompt keeps its last ``length`` tokens."""
    rng = np.random.default_rng(seed)
    chosen = [prompts[i] for i in np.sort(rng.permutation(len(prompts))[:samples])]
    if any(not x for x in chosen):
        raise MergeInputError(f"{where}: a prompt has no tokens")
    cut = sum(len(x) > length for x in chosen)
    if cut:
        log.warning("%s: %d of %d prompts are longer than prompt_tokens=%d and keep only their last %d tokens",
                    where, cut, len(chosen), length, length)
    p = min(length, max(len(x) for x in chosen))
    out = np.full((len(chosen), p), PAD, np.int32)
    for i, x in enumerate(chosen):
        x = x[-p:]
        out[i, p - len(x):] = x
    return out


def model_apply(model) -> Callable:
    """``apply(params, tokens) -> logits`` of a transformers Flax causal LM for left-padded
    ``tokens`` (:data:`PAD` = -1): padding is masked out of attention and each token's position
    is the number of real tokens before it, so a padded prompt's logits are the unpadded ones."""

    def apply(params, tokens):
        real = tokens != PAD
        positions = jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0)
        return model(jnp.where(real, tokens, 0), attention_mask=real.astype(jnp.int32), position_ids=positions,
                     params=params).logits

    return apply


def llama_apply(cfg: llama.LlamaConfig) -> Callable:
    """``apply(params, tokens) -> logits`` of :mod:`jmerge.learn.llama` on HF-named ``params``
    for left-padded ``tokens`` (:data:`PAD` = -1), masked and positioned as :func:`model_apply`."""

    def apply(params, tokens):
        real = tokens != PAD
        return llama.logits(llama.stack(params, cfg), cfg, jnp.where(real, tokens, 0), real)

    return apply


@dataclass(frozen=True)
class CausalLM:
    """How the learn path runs a base's architecture: ``apply(params, tokens) -> logits``,
    ``load(checkpoint) -> (params, {checkpoint tensor name: params path})`` (a path or an
    opened :class:`jmerge.io.Checkpoint`), its context length
    (``None``: unbounded), EOS id, model type, and ``tag`` (its ``config.json`` text, which
    keys the expert-target cache: ``apply`` closes over a config the cache cannot see), and
    ``unload(params, names) -> {checkpoint tensor name: array}``, the inverse of ``load`` (the
    checkpoint's layout: Flax kernels transposed back where the checkpoint stores them so)."""

    apply: Callable
    load: Callable[[Path | st.Checkpoint], tuple[Any, dict[str, str]]]
    context: int | None
    eos: int
    model_type: str | None
    tag: str
    unload: Callable[[Any, dict[str, str]], dict[str, np.ndarray]]


def _check_context(context: int | None, prompts: np.ndarray, max_new_tokens: int, where: Path) -> None:
    """The longest prompt plus the generated tokens fit the model's positions."""
    need = prompts.shape[1] + int(max_new_tokens)
    if context is not None and need > context:
        raise MergeInputError(f"{where}: prompts of {prompts.shape[1]} tokens plus max_new_tokens={max_new_tokens} "
                              f"need {need} positions, more than the model's context of {context}; "
                              f"lower learn.prompt_tokens or learn.max_new_tokens")


def _eos(eos) -> int:
    eos = 0 if eos is None else eos
    return int(eos[0] if isinstance(eos, list) else eos)


def open_model(base_dir: Path) -> CausalLM:
    """The :class:`CausalLM` of the base's ``config.json``: jmerge's Llama for ``model_type:
    llama``, else transformers' Flax class; a clear error for what neither runs."""
    path = Path(base_dir) / "config.json"
    if not path.is_file():
        raise MergeInputError(f"{base_dir}: learn: needs the base model's config.json")
    text = path.read_text()
    c = json.loads(text)
    arch = c.get("architectures") or []
    if arch and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in arch):
        raise MergeInputError(f"{path}: learn: needs a causal language model, got architectures {arch}")
    if c.get("model_type") == "llama":
        try:
            cfg = llama.LlamaConfig.from_dict(c)
        except (KeyError, TypeError, ValueError) as e:
            raise MergeInputError(f"{path}: learn: {e}") from None
        return CausalLM(llama_apply(cfg), lambda p: _llama_params(p, cfg), c.get("max_position_embeddings"),
                        _eos(cfg.eos_token_id), "llama", text,
                        unload=lambda params, names: {n: np.asarray(params[p]) for n, p in names.items()})
    return _transformers_flax(base_dir, text)


def model_path(model: Path | st.Checkpoint) -> Path:
    """Where a model given as a path or an opened checkpoint is."""
    return model.path if isinstance(model, st.Checkpoint) else Path(model)


def _float32_tensors(model: Path | st.Checkpoint) -> dict[str, np.ndarray]:
    """Every tensor of ``model`` (a path, or a checkpoint already opened: no header is read again) in float32."""
    ckpt = model if isinstance(model, st.Checkpoint) else st.open_checkpoint(model)
    return {n: np.asarray(a, np.float32) for n, a in ckpt.items()}


def _llama_params(model: Path | st.Checkpoint, cfg: llama.LlamaConfig) -> tuple[dict, dict[str, str]]:
    tensors = _float32_tensors(model)
    missing = [n for n in llama.param_names(cfg) if n not in tensors]
    if missing:
        raise MergeInputError(f"{model_path(model)}: learn: tensor {missing[0]!r} of the Llama in config.json is missing "
                              f"({len(missing)} missing)")
    return tensors, {n: n for n in tensors}


def _transformers_flax(base_dir: Path, tag: str) -> CausalLM:
    from transformers import AutoConfig, FlaxAutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    try:
        model = FlaxAutoModelForCausalLM.from_config(config, _do_init=False)
    except ValueError as e:
        raise MergeInputError(f"{base_dir}: transformers has no Flax causal-LM class for {config.model_type!r} ({e})") from None
    like = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, 1)))
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return CausalLM(model_apply(model), lambda p: _flax_params(p, like), context, _eos(config.eos_token_id),
                    config.model_type, tag, unload=lambda params, names: _torch_tensors(params, names, like))


def _torch_tensors(params, names: dict[str, str], like) -> dict[str, np.ndarray]:
    """Flax ``params`` back under the PyTorch names (``names``: name -> Flax path) and layout
    :func:`_flax_params` read them from."""
    rules = flax_io.NamingRules.make(like=like)
    flat = {p: np.asarray(x) for p, x in jtree.flatten(params).items()}
    return {n: flax_io._kernel_to_torch(flat[p]) if rules.flax_name(n, flat[p].ndim)[1] else flat[p]
            for n, p in names.items()}


def _flax_params(model: Path | st.Checkpoint, like) -> tuple[dict, dict[str, str]]:
    """Flax params of the checkpoint ``model`` and the Flax path of every PyTorch tensor name."""
    tensors = _float32_tensors(model)
    rules = flax_io.NamingRules.make(like=like)
    names = {n: rules.flax_name(n, a.ndim)[0] for n, a in tensors.items()}
    return flax_io.torch_to_flax(tensors, like=like), names


def learn(base: Path | st.Checkpoint, experts: Sequence[Path | st.Checkpoint], options: LearnOptions, *,
          progress: bool = True):
    """Learns Γ; returns ``(LearnResult, coefficient per task for every PyTorch tensor name)``.

    The models are HF directories, given as paths or as checkpoints already opened (``jmerge
    run`` passes those of :func:`jmerge.streaming.open_inputs`, so no header is read twice)."""
    if len(options.prompts) != len(experts):
        raise MergeInputError(f"learn: {len(options.prompts)} prompt files for {len(experts)} models")
    base_dir = model_path(base)
    if any(str(model_path(p)).lower().endswith(".gguf") for p in (base, *experts)):
        raise MergeInputError("learn: convert GGUF models to HF directories first (`jmerge convert model.gguf dir/`)")
    prompt_sets = [read_prompts(p, base_dir, options.chat_template) for p in options.prompts]
    lm = open_model(base_dir)
    prompts = [prompt_array(ps, options.samples, options.prompt_tokens, options.seed + t, f)
               for t, (ps, f) in enumerate(zip(prompt_sets, options.prompts))]
    for p, f in zip(prompts, options.prompts):
        _check_context(lm.context, p, options.max_new_tokens, f)
    base, names = lm.load(base)
    base = jax.device_put(base)  # one copy: the engine would otherwise keep the host arrays and a device copy
    tvs = [jtree.task_vector(base, lm.load(e)[0]) for e in experts]
    layers = _grouping(base, options, lm.model_type)
    common = dict(granularity=options.granularity, layers=layers, optimizer=optax.adam(options.learning_rate),
                  epochs=options.epochs, batch_per_task=options.batch_per_task, key=options.seed, progress=progress,
                  **({} if options.init is None else {"init": options.init}))
    if options.method == "divmerge":
        targets = [lm_targets(lm.apply, jtree.apply(base, tv), p, options.max_new_tokens, lm.eos, cache_tag=lm.tag)
                   for tv, p in zip(tvs, prompts)]
        result = engine.divmerge(base, tvs, lm.apply, targets=targets, **common)
    else:
        targets = [TaskTargets(p, mask=p != PAD) for p in prompts]  # entropy over real tokens only
        result = engine.adamerging(base, tvs, lm.apply, None, targets=targets, **common)
    return result, _per_tensor(result, base, len(tvs), options.granularity, layers, names)


def _grouping(base, options: LearnOptions, model_type: str | None):
    """The layers of ``granularity="layer"``: ``options.layers`` (a :mod:`jmerge.lwptv` preset
    or regex), else the preset named after the model type when there is one, else per tensor."""
    from jmerge import lwptv

    if options.granularity != "layer":
        return None
    rule = options.layers or (model_type if model_type in lwptv.PRESETS else "tensor")
    try:
        return lwptv.group(base, rule)
    except ValueError as e:
        raise MergeInputError(f"learn.layers {rule!r}: {e}") from None


def _per_tensor(result, base, num_tasks: int, granularity: str, layers, names: dict[str, str]) -> dict[str, np.ndarray]:
    """The ``(K,)`` coefficients that scale each PyTorch tensor's task vectors."""
    lay = coefficient_layout(base, num_tasks, granularity, layers)
    coeffs = np.asarray(result.coefficients)
    leaf_layer = lay.grouping.leaf_layer
    by_path = {p: (coeffs if coeffs.ndim == 1 else coeffs[:, g]) for p, g in zip(jtree.paths(base), leaf_layer)}
    return {n: by_path[p] for n, p in names.items()}


def merged_tensors(base_ckpt: st.Checkpoint, expert_ckpts: Sequence[st.Checkpoint], per_tensor: dict[str, np.ndarray],
                   out_dtype=None):
    """Yields ``(name, θ0 + Σ_t Γ_t τ_t)`` tensor by tensor (:func:`jmerge.tree.apply_tasks` in
    float32, as the learn path merged them), stored in ``out_dtype`` (default: the base tensor's
    dtype); non-float tensors are the base's."""
    for name, info in base_ckpt.tensors.items():
        b = base_ckpt.read(name)
        if not info.is_float:
            yield name, b
            continue
        b32 = np.asarray(b, np.float32)
        tvs = [{name: np.asarray(e.read(name), np.float32) - b32} for e in expert_ckpts]
        out = np.asarray(jtree.apply_tasks({name: b32}, tvs, per_tensor[name])[name])
        yield name, out.astype(st.numpy_dtype(out_dtype) if out_dtype else info.dtype, copy=False)
