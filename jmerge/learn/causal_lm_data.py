"""RegMean and Fisher merging of Hugging Face causal LMs, as ``jmerge run`` does them.

The ``jmerge: learn:`` block of a ``merge_method: regmean`` (or ``fisher``) config gives one
prompt file per model (:mod:`jmerge.learn.causal_lm`: the same files, sampling, left padding
and transformers Flax model). Each expert's statistics are measured on its own task's prompts:
RegMean's Gram matrices of every linear map's inputs over all positions (padding included, as
FusionBench counts its pad tokens); Fisher's diagonal by FusionBench's batch estimate over the
next-token distributions of the real prompt tokens (the exact expectation over a vocabulary
is out of reach). The merge runs in the model's own layout and comes back under the base's tensor names
(:attr:`jmerge.learn.causal_lm.CausalLM.unload`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jmerge import tree as jtree
from jmerge.io.safetensors_io import Checkpoint
from jmerge.learn import causal_lm
from jmerge.learn.statistics import fisher_diagonal, gram_matrices
from jmerge.methods.registry import merge_task_vectors
from jmerge.validate import MergeInputError


def merged_tensors(base: Path | Checkpoint, experts: Sequence[Path | Checkpoint], options, method: str,
                   hparams: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{PyTorch name: merged float32 tensor}`` of ``method`` ("regmean" or "fisher"); the models
    are paths or checkpoints already opened, as in :func:`jmerge.learn.causal_lm.learn`."""
    if method not in ("regmean", "fisher"):
        raise MergeInputError(f"causal-LM data merges are regmean and fisher, not {method!r}")
    base_dir = causal_lm.model_path(base)
    prompt_sets = [causal_lm.read_prompts(p, base_dir, options.chat_template) for p in options.prompts]
    lm = causal_lm.open_model(base_dir)
    base, names = lm.load(base)
    tvs = [jtree.task_vector(base, lm.load(e)[0]) for e in experts]
    apply = lm.apply
    prompts = [causal_lm.prompt_array(ps, options.samples, options.prompt_tokens, options.seed + t, f)
               for t, (ps, f) in enumerate(zip(prompt_sets, options.prompts))]
    expert = jax.jit(jtree.apply)
    if method == "regmean":
        stats = tuple(gram_matrices(expert(base, tv), apply, p, batch_size=options.batch_per_task)
                      for tv, p in zip(tvs, prompts))
        hp = {**hparams, "grams": stats}
    else:
        stats = tuple(fisher_diagonal(expert(base, tv), apply, p, batch_size=options.batch_per_task, estimator="batch",
                                      mask=p != causal_lm.PAD) for tv, p in zip(tvs, prompts))
        hp = {**hparams, "fishers": stats}
    merged = jax.jit(lambda b, ts, h: merge_task_vectors(b, ts, method, **h))(base, tvs, hp)
    return lm.unload(merged, names)
