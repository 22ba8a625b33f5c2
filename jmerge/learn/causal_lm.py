"""Learned merge coefficients for Hugging Face causal LMs, as ``jmerge run`` does them.

DivMerge's language-model protocol (arXiv 2509.02108 §2): each expert
continues its task's prompts greedily until EOS or ``max_new_tokens``; Γ then minimizes the
JS divergence, per generated token, between each expert and θ(Γ) = θ0 + Σ_t Γ_t τ_t
(:func:`jmerge.learn.lm_targets`, :func:`jmerge.learn.fit_coefficients`). AdaMerging
instead minimizes the entropy of θ(Γ)'s next-token distributions over the prompts.

The model runs as a transformers Flax class built from the base's ``config.json`` (the
``hf`` extra); weights are read from PyTorch-layout safetensors and mapped to the Flax
layout (:mod:`jmerge.io.flax_io`). Prompts: one file per expert, ``.txt`` (one prompt per
line; needs the base's tokenizer files) or ``.jsonl`` with ``"text"`` or ``"ids"`` (token
ids) per line. Each task's prompts are cut to one length (``prompt_tokens``, or the task's
shortest prompt if shorter), as :func:`jmerge.learn.lm_targets` needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence

import jax
import numpy as np
import optax

from jmerge import tree as jtree
from jmerge.io import flax_io
from jmerge.io import safetensors_io as st
from jmerge.learn import engine
from jmerge.learn.coefficients import layout as coefficient_layout
from jmerge.learn.targets import lm_targets
from jmerge.validate import MergeInputError


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

def _tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_dir)
    except Exception as e:
        raise MergeInputError(f"{base_dir}: text prompts need the base model's tokenizer files ({e}); "
                              f"give token ids instead ({{\"ids\": [...]}} per line of a .jsonl file)") from None


def read_prompts(path: Path, base_dir: Path) -> list[list[int]]:
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
            return [[int(t) for t in r["ids"]] for r in rows]
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            raise MergeInputError(f"{path}: every line needs a \"text\" string or an \"ids\" list")
        texts = [r["text"] for r in rows]
    elif path.suffix == ".txt":
        texts = lines
    else:
        raise MergeInputError(f"prompt file {path}: use .txt (one prompt per line) or .jsonl")
    tok = _tokenizer(base_dir)
    return [tok(t)["input_ids"] for t in texts]


def prompt_array(prompts: list[list[int]], samples: int, length: int, seed: int, where: Path) -> np.ndarray:
    """``(N, P)`` int32: up to ``samples`` seeded prompts, each cut to ``P = min(length,
    shortest chosen prompt)`` tokens."""
    rng = np.random.default_rng(seed)
    chosen = [prompts[i] for i in np.sort(rng.permutation(len(prompts))[:samples])]
    p = min(length, min(len(x) for x in chosen))
    if p < 1:
        raise MergeInputError(f"{where}: a prompt has no tokens")
    return np.asarray([x[:p] for x in chosen], np.int32)


def _model(base_dir: Path):
    from transformers import AutoConfig, FlaxAutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    arch = config.architectures or []
    if arch and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in arch):
        raise MergeInputError(f"{base_dir}/config.json: learn: needs a causal language model, "
                              f"got architectures {config.architectures}")
    try:
        return FlaxAutoModelForCausalLM.from_config(config, _do_init=False), config
    except ValueError as e:
        raise MergeInputError(f"{base_dir}: transformers has no Flax causal-LM class for {config.model_type!r} ({e})") from None


def _flax_params(path: Path, like) -> tuple[dict, dict[str, str]]:
    """Flax params of the checkpoint at ``path`` and the Flax path of every PyTorch tensor name."""
    tensors = {n: np.asarray(a, np.float32) for n, a in st.load(path).items()}
    rules = flax_io.NamingRules.make(like=like)
    names = {n: rules.flax_name(n, a.ndim)[0] for n, a in tensors.items()}
    return flax_io.torch_to_flax(tensors, like=like), names


def learn(base_dir: Path, expert_dirs: Sequence[Path], options: LearnOptions, *, progress: bool = True):
    """Learns Γ; returns ``(LearnResult, coefficient per task for every PyTorch tensor name)``."""
    if len(options.prompts) != len(expert_dirs):
        raise MergeInputError(f"learn: {len(options.prompts)} prompt files for {len(expert_dirs)} models")
    prompt_sets = [read_prompts(p, base_dir) for p in options.prompts]
    model, config = _model(base_dir)
    like = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), (1, 1)))
    base, names = _flax_params(base_dir, like)
    tvs = [jtree.task_vector(base, _flax_params(e, like)[0]) for e in expert_dirs]

    def apply(params, tokens):
        return model(tokens, params=params).logits

    eos = config.eos_token_id if config.eos_token_id is not None else 0
    prompts = [prompt_array(ps, options.samples, options.prompt_tokens, options.seed + t, f)
               for t, (ps, f) in enumerate(zip(prompt_sets, options.prompts))]
    layers = _grouping(base, options, config.model_type)
    common = dict(granularity=options.granularity, layers=layers, optimizer=optax.adam(options.learning_rate),
                  epochs=options.epochs, batch_per_task=options.batch_per_task, key=options.seed, progress=progress,
                  **({} if options.init is None else {"init": options.init}))
    if options.method == "divmerge":
        targets = [lm_targets(apply, jtree.apply(base, tv), p, options.max_new_tokens, int(eos))
                   for tv, p in zip(tvs, prompts)]
        result = engine.divmerge(base, tvs, apply, targets=targets, **common)
    else:
        result = engine.adamerging(base, tvs, apply, prompts, **common)
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
    """Yields ``(name, θ0 + Σ_t Γ_t τ_t)`` tensor by tensor, computed in float32 and stored in
    ``out_dtype`` (default: the base tensor's dtype); non-float tensors are the base's."""
    for name, info in base_ckpt.tensors.items():
        b = base_ckpt.read(name)
        if not info.is_float:
            yield name, b
            continue
        b32 = np.asarray(b, np.float32)
        out = b32 + sum(np.float32(g) * (np.asarray(e.read(name), np.float32) - b32)
                        for g, e in zip(per_tensor[name], expert_ckpts))
        yield name, out.astype(st.numpy_dtype(out_dtype) if out_dtype else info.dtype, copy=False)
