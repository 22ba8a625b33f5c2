"""LoRA adapters as low-rank task vectors: apply, combine, extract.

* :func:`apply_adapter`: ``W + scale · ΔW`` on a base's flat ``{name: array}``;
  :func:`open_with_lora` opens a mergekit ``model+lora`` reference as a checkpoint whose
  adapted tensors are ``W + ΔW`` on read (nothing is written to disk).
* :func:`combine_adapters`: PEFT's ``LoraModel.add_weighted_adapter`` semantics
  (``huggingface/peft: src/peft/tuners/lora/model.py``), one combination per module:

  - ``cat``: ``A = [w_i s_i A_i]`` stacked on the rank axis, ``B = [B_i]``: exactly
    ``ΔW = Σ_i w_i s_i B_i A_i`` at rank ``Σ_i r_i``;
  - ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the method runs
    separately on the A's and on the B's (all adapters of one rank) with weights
    ``sign(w_i) sqrt(|w_i s_i|)`` for A and ``sqrt(|w_i s_i|)`` for B (the sign on A only, so a
    single adapter at weight ``w`` gives ``w ΔW``); cheap, and *not* the method on ΔW
    (cross terms ``B_i A_j`` appear);
  - ``svd`` and ``<method>_svd``: the method on the full ``ΔW_i = s_i B_i A_i`` with weights
    ``w_i``, then a truncated SVD ``U S Vᵀ`` to ``svd_rank`` (default: the largest adapter
    rank): ``B = U S``, ``A = Vᵀ``; ``svd_clamp`` clips both to that quantile of their entries.

  The methods are PEFT's ``merge_utils`` ones, built from :mod:`jmerge.stages`: TIES trims
  each tensor to its top ``density`` magnitudes, elects signs on the trimmed unweighted
  tensors (``majority_sign_method``: ``total`` -> ``sum``, ``frequency`` -> ``count``) and
  averages the agreeing weighted entries over their count; DARE keeps entries with
  probability ``density`` and divides by it (jmerge's PRNG: masks differ from torch's);
  ``magnitude_prune`` trims and sums. The result has ``r = lora_alpha`` (scaling 1).
* :func:`extract_lora`: per 2-D tensor the truncated SVD of the task vector ``τ = θ_ft - θ_0``
  (Eckart-Young: the best rank-r approximation in Frobenius norm), rank ``rank`` or the
  smallest rank keeping an ``energy`` fraction of ``Σ σ²``; factors zero-padded to one rank.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import stages
from jmerge.io import peft
from jmerge.io import safetensors_io as st
from jmerge.io.peft import Adapter, AdapterError
from jmerge.methods.svd import thin_svd
from jmerge.validate import MergeInputError

logger = logging.getLogger("jmerge.lora")

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat",) + FACTORWISE + SVD
_SIGN = {"total": "sum", "frequency": "count"}
DEFAULT_EXCLUDE = r"(^|\.)(embed_tokens|wte|wpe|lm_head|embed_out)\.weight$"


# ---------------------------------------------------------------------------- apply
def apply_adapter(base: Mapping[str, np.ndarray], adapter: Adapter, scale: float = 1.0) -> dict[str, np.ndarray]:
    """``{name: W + scale · ΔW}`` for the base tensors the adapter adapts, the others as they
    are (not copied). The adapter is checked against the base's shapes before any factor is read;
    the sum is computed in float32 and cast back to each base tensor's dtype."""
    mapping = adapter.check_base({n: tuple(np.shape(a)) for n, a in base.items()})
    out = dict(base)
    for module, name in mapping.items():
        w = np.asarray(base[name])
        out[name] = (w.astype(np.float32) + np.float32(scale) * adapter.delta(module)).astype(w.dtype)
    return out


def split_reference(ref: str | os.PathLike) -> tuple[str, str]:
    """``("model", "lora")`` of mergekit's ``model+lora`` reference (exactly one ``+``)."""
    parts = str(ref).split("+")
    if len(parts) != 2 or not all(parts):
        raise MergeInputError(f"model reference {str(ref)!r}: write path/to/model+path/to/lora (one '+')")
    return parts[0], parts[1]


@dataclass
class LoraCheckpoint(st.Checkpoint):
    """A checkpoint with a LoRA adapter applied on read: tensor ``W`` of an adapted module
    reads as ``W + ΔW`` (float32 sum, cast to ``W``'s dtype, as mergekit's merged copy stores it);
    names, shapes and dtypes are the base's."""

    model: st.Checkpoint | None = None
    adapter: Adapter | None = None
    adapted: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter module

    def read(self, name: str) -> np.ndarray:
        x = self.model.read(name)
        module = self.adapted.get(name)
        if module is None:
            return x
        return (np.asarray(x, np.float32) + self.adapter.delta(module)).astype(x.dtype)


def open_with_lora(ref: str | os.PathLike) -> LoraCheckpoint:
    """Opens ``model+lora`` (headers only) and checks the adapter against the model, naming both."""
    model_ref, lora_ref = split_reference(ref)
    model = st.open_checkpoint(model_ref)
    adapter = peft.open_adapter(lora_ref)
    try:
        mapping = adapter.check_base({n: t.shape for n, t in model.tensors.items()})
    except AdapterError as e:
        raise AdapterError(f"model {model_ref}+{lora_ref}: {e}") from None
    return LoraCheckpoint(model.path, model.tensors, model.metadata, model=model, adapter=adapter,
                          adapted={name: module for module, name in mapping.items()})


# ---------------------------------------------------------------------------- combine
@dataclass(frozen=True)
class Combined:
    """A combined adapter: ``factors`` ``{module: (A, B)}`` at scaling 1, and which modules are embeddings."""

    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    embeddings: frozenset[str]
    fan_in_fan_out: bool


def _method(kind: str, tensors: list, weights: Sequence[float], density: float, sign: str, key) -> jax.Array:
    """PEFT's ``merge_utils`` method ``kind`` (``linear`` = ``task_arithmetic``) on one tensor per adapter."""
    if kind in ("ties", "magnitude_prune"):
        tensors = stages.magnitude_trim(density, "tensor")(tensors)
    elif kind in ("dare_linear", "dare_ties"):
        tensors = stages.dare(density, rescale=True)(tensors, key)
    if kind in ("ties", "dare_ties"):
        masks = stages.agreement_masks(tensors, stages.elect_sign(tensors, sign))
        weighted = [w * t for w, t in zip(weights, tensors)]
        return stages.combine(weighted, masks=masks, normalize=True)
    return stages.combine(tensors, weights)


def _check_combination(adapters: Sequence[Adapter], weights, combination_type, density, majority_sign_method, svd_rank):
    if not adapters:
        raise MergeInputError("combine_adapters needs at least one adapter")
    if len(weights) != len(adapters):
        raise MergeInputError(f"{len(weights)} weights for {len(adapters)} adapters")
    if combination_type not in COMBINATIONS:
        raise MergeInputError(f"unknown combination_type {combination_type!r} (known: {', '.join(COMBINATIONS)})")
    if majority_sign_method not in _SIGN:
        raise MergeInputError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    needs_density = combination_type.replace("_svd", "") in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if needs_density and (density is None or not 0 < float(density) <= 1):
        raise MergeInputError(f"combination_type {combination_type!r} needs a density in (0, 1], got {density!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise MergeInputError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    flags = {a.fan_in_fan_out for a in adapters}
    if len(flags) > 1:
        raise MergeInputError("adapters disagree on fan_in_fan_out: " + ", ".join(f"{a.path}={a.fan_in_fan_out}" for a in adapters))
    names = set(adapters[0].modules)
    for a in adapters[1:]:
        if set(a.modules) != names:
            diff = sorted(names ^ set(a.modules))
            raise AdapterError(f"{a.path} adapts other modules than {adapters[0].path}: {diff[:5]}")
    for module in adapters[0].modules:
        shapes = {(a.modules[module].b.shape[0], a.modules[module].a.shape[1]) for a in adapters}
        if len(shapes) > 1:
            raise AdapterError(f"module {module!r}: adapters give updates of different shapes {sorted(shapes)}")
        ranks = [a.modules[module].rank for a in adapters]
        if combination_type in FACTORWISE and len(set(ranks)) > 1:
            raise AdapterError(f"module {module!r}: combination_type {combination_type!r} needs one rank for every "
                               f"adapter, got {ranks} (use 'cat' or an '_svd' type)")


def combine_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    key: jax.Array | None = None,
) -> Combined:
    """Combines LoRA adapters of one base into one (PEFT ``add_weighted_adapter``, module docstring).

    Everything is checked on the headers first (same modules, shapes, ranks for the
    factor-wise types, density where needed, a key for DARE). One adapter always combines
    ``linear``, as in PEFT.
    """
    weights = [float(w) for w in weights]
    if len(adapters) == 1:
        combination_type = "linear"
    _check_combination(adapters, weights, combination_type, density, majority_sign_method, svd_rank)
    if "dare" in combination_type and key is None:
        raise MergeInputError(f"combination_type {combination_type!r} is stochastic: pass key=jax.random.key(seed)")
    sign = _SIGN[majority_sign_method]
    ref = adapters[0]
    factors, embeddings = {}, set()
    for i, module in enumerate(ref.modules):
        mods = [a.modules[module] for a in adapters]
        if ref.modules[module].embedding:
            embeddings.add(module)
        k = None if key is None else jax.random.fold_in(key, i)
        if combination_type == "cat":
            parts = [a.factors(module) for a in adapters]
            a_cat = np.concatenate([w * m.scaling * a for (a, _), w, m in zip(parts, weights, mods)], 0)
            factors[module] = (a_cat, np.concatenate([b for _, b in parts], 1))
        elif combination_type in FACTORWISE:
            parts = [a.factors(module) for a in adapters]
            mag = [float(np.sqrt(abs(w * m.scaling))) for w, m in zip(weights, mods)]
            w_a = [float(np.sign(w)) * g for w, g in zip(weights, mag)]
            ka, kb = (None, None) if k is None else jax.random.split(k)
            a = _method(combination_type, [jnp.asarray(p[0]) for p in parts], w_a, density, sign, ka)
            b = _method(combination_type, [jnp.asarray(p[1]) for p in parts], mag, density, sign, kb)
            factors[module] = (np.asarray(a), np.asarray(b))
        else:
            kind = "linear" if combination_type == "svd" else combination_type[: -len("_svd")]
            delta = _method(kind, [jnp.asarray(a.product(module)) for a in adapters], weights, density, sign, k)
            rank = svd_rank or max(m.rank for m in mods)
            factors[module] = _svd_factors(np.asarray(delta), rank, svd_clamp)
    return Combined(factors, frozenset(embeddings), ref.fan_in_fan_out)


def _svd_factors(delta: np.ndarray, rank: int, clamp: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B) = (Vᵀ_r, U_r S_r)`` of the truncated SVD of ``delta`` (factor layout); ``rank``
    above ``min(delta.shape)`` is zero-padded."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    r = min(rank, s.size)
    b, a = u[:, :r] * s[:r], vt[:r]
    if clamp is not None:
        hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), clamp)
        a, b = np.clip(a, -hi, hi), np.clip(b, -hi, hi)
    if r < rank:
        a = np.concatenate([a, np.zeros((rank - r, a.shape[1]))], 0)
        b = np.concatenate([b, np.zeros((b.shape[0], rank - r))], 1)
    return a.astype(np.float32), b.astype(np.float32)


def save_combined(out, combined: Combined, *, base_model: str | None = None, force: bool = False):
    """Writes a :class:`Combined` adapter as a PEFT directory (atomic)."""
    return peft.save_adapter(out, combined.factors, embeddings=combined.embeddings,
                             fan_in_fan_out=combined.fan_in_fan_out, base_model=base_model, force=force)


# ---------------------------------------------------------------------------- extract
@dataclass(frozen=True)
class Extracted:
    """An extracted adapter: ``factors`` ``{module: (A, B)}`` (scaling 1, zero-padded to the
    largest rank), each module's own ``ranks`` and kept ``energy`` fraction, and ``skipped``:
    tensors that differ from the base but a LoRA cannot carry (not 2-D, or excluded)."""

    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    ranks: dict[str, int]
    energy: dict[str, float]
    skipped: tuple[str, ...]


def _rank_for(s: np.ndarray, rank: int | None, energy: float | None) -> int:
    """``rank``, or the smallest rank with ``Σ_{i<r} σ_i² >= energy · Σ σ²``, whichever is smaller."""
    r = s.size if rank is None else min(rank, s.size)
    if energy is not None:
        cum = np.cumsum(s.astype(np.float64) ** 2)
        r = min(r, int(np.searchsorted(cum, energy * cum[-1] * (1 - 1e-12))) + 1)
    return r


def extract_lora(
    base: Mapping[str, np.ndarray],
    finetuned: Mapping[str, np.ndarray],
    *,
    rank: int | None = None,
    energy: float | None = None,
    fan_in_fan_out: bool = False,
    exclude: str = DEFAULT_EXCLUDE,
) -> Extracted:
    """A LoRA of ``finetuned - base`` over HF-named flat dicts (module docstring).

    Every 2-D float tensor named ``<module>.weight`` whose name does not match ``exclude``
    (default: embeddings and the LM head) is factorised; an exactly unchanged tensor is left
    out. Tensors that changed but cannot be carried are listed in ``skipped`` and logged
    (never silently dropped). ``fan_in_fan_out``: the tensors are stored ``(in, out)`` (GPT-2).
    """
    if rank is None and energy is None:
        raise MergeInputError("extract_lora needs rank=, energy= or both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeInputError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise MergeInputError(f"energy must lie in (0, 1], got {energy!r}")
    missing = sorted(set(base) ^ set(finetuned))
    if missing:
        raise MergeInputError(f"base and fine-tuned model differ in tensor names: {missing[:5]}")
    for name in base:
        if np.shape(base[name]) != np.shape(finetuned[name]):
            raise MergeInputError(f"tensor {name!r}: base {np.shape(base[name])}, fine-tuned {np.shape(finetuned[name])}")
    pattern = re.compile(exclude) if exclude else None
    svd = jax.jit(thin_svd)  # a non-converging float32 SVD is recomputed, not returned as NaN
    raw, ranks, kept, skipped = {}, {}, {}, []
    for name in base:
        tau = np.asarray(finetuned[name], np.float32) - np.asarray(base[name], np.float32)
        if not np.any(tau):
            continue
        if tau.ndim != 2 or not name.endswith(".weight") or (pattern is not None and pattern.search(name)):
            skipped.append(name)
            continue
        m = tau.T if fan_in_fan_out else tau  # factor layout (out, in)
        u, s, vt = (np.asarray(x) for x in svd(m))
        r = _rank_for(s, rank, energy)
        module = name[: -len(".weight")]
        raw[module] = (vt[:r], u[:, :r] * s[:r])
        ranks[module] = r
        kept[module] = float(np.sum(s[:r].astype(np.float64) ** 2) / np.sum(s.astype(np.float64) ** 2))
    if skipped:
        logger.warning("extract_lora: %d changed tensor(s) are not carried by the adapter (not 2-D or excluded): %s",
                       len(skipped), ", ".join(skipped[:5]))
    if not raw:
        raise MergeInputError("no 2-D tensor differs from the base: nothing to extract")
    top = max(ranks.values())
    factors = {m: (np.pad(a, ((0, top - a.shape[0]), (0, 0))), np.pad(b, ((0, 0), (0, top - b.shape[1]))))
               for m, (a, b) in raw.items()}
    return Extracted(factors, ranks, kept, tuple(skipped))
