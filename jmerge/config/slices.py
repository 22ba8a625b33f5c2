"""The per-tensor jobs (:class:`jmerge.streaming.Job`) of a plan with mergekit ``slices``,
gradients or filters, as mergekit 0.1.5's ``MergePlanner`` lays them out (``plan.py``):

* output layers are numbered on through the slices: layer ``j`` of slice ``s`` is output
  layer ``L_0 + ... + L_{s-1} + j``, merged from layer ``start + j`` of each source;
* tensors before the layers (embeddings) are merged from the first slice's sources, those
  after them (final norm, head) from the last slice's, at gradient position ``t = 0``;
* layer ``j`` of a slice of ``L`` layers has ``t = j / (L - 1)`` (1 when ``L = 1``);
* a ``models:`` config with gradients or filters is one slice of every layer;
* each module of a ``modules:`` config (:mod:`.hf_modules`) is laid out so on its own tensors,
  its layers numbered from 0.

Every tensor's hyper-parameters are resolved and checked, and every source tensor's name
and shape, before any tensor is read. A ``filter`` that matches no output tensor gets a
:class:`~jmerge.config.mergekit.ConfigWarning` naming it.
"""

from __future__ import annotations

import warnings
from functools import partial
from itertools import groupby
from pathlib import Path

from jmerge.config import settings, tokenizer
from jmerge.config.hf_layers import Layers, layers_of
from jmerge.config.hf_modules import WHOLE, Module
from jmerge.config.mergekit import ConfigWarning
from jmerge.config.plan import MergePlan, SlicePlan, tensor_hparams
from jmerge.config.schema import ConfigError
from jmerge.io import safetensors_io as st
from jmerge.streaming import Job


class _Models:
    """Checkpoints opened once each (headers only), with their layer stacks."""

    def __init__(self):
        self.ckpts: dict[Path, st.Checkpoint] = {}
        self.stacks: dict[tuple[Path, Module], Layers] = {}

    def ckpt(self, path: Path) -> st.Checkpoint:
        if path not in self.ckpts:
            self.ckpts[path] = st.open_checkpoint(path)
        return self.ckpts[path]

    def layers(self, path: Path, module: Module = WHOLE) -> Layers:
        if (path, module) not in self.stacks:
            self.stacks[path, module] = layers_of(self.ckpt(path), module)
        return self.stacks[path, module]

    def source(self, path: Path, name: str, like: st.TensorInfo | None, out: str,
               rows: int | None = None) -> tuple[st.Checkpoint, str]:
        """``(checkpoint, name)`` of a source tensor shaped as ``like``; a vocabulary tensor
        (``rows``: the highest row the remapping takes, plus one) only in its other axes."""
        ckpt = self.ckpt(path)
        info = ckpt.tensors.get(name)
        if info is None:
            raise ConfigError(f"{path}: no tensor {name!r} (needed for output tensor {out!r})")
        if rows is not None and (len(info.shape) < 1 or info.shape[0] < rows):
            raise ConfigError(f"{path}: tensor {name!r} has {info.shape[0] if info.shape else 0} rows; its tokenizer "
                              f"gives token ids up to {rows - 1}")
        axes = slice(None) if rows is None else slice(1, None)
        if like is not None and (info.shape[axes] != like.shape[axes] or info.is_float != like.is_float):
            raise ConfigError(f"{path}: tensor {name!r} has shape {info.shape} ({info.dtype}), the base's "
                              f"{like.shape} ({like.dtype}) (output tensor {out!r})")
        return ckpt, name


def jobs(plan: MergePlan) -> tuple[list[Job], dict[Module, list[tuple[Path, int]]]]:
    """``(jobs in output order, output layers per module)`` of a per-tensor plan; output layer ``j``
    of a module is layer ``index`` of ``model`` (its slice's base) for ``layers[module][j] = (model, index)``."""
    models, out, layers = _Models(), [], {}
    cfg = plan.config
    vocab = plan.vocab

    def job(sp: SlicePlan, name: str, base_name: str, expert_names: list[str], t: float) -> Job:
        remapped = vocab is not None and tokenizer.VOCAB_TENSORS.search(name) is not None
        paths = [sp.base, *sp.experts]
        need = {p: int(vocab.rows[p].max()) + 1 for p in paths} if remapped else {}
        base = models.source(sp.base, base_name, None, name, need.get(sp.base))
        info = base[0].tensors[base_name]
        experts = tuple(models.source(p, n, info, name, need.get(p)) for p, n in zip(sp.experts, expert_names))
        extra = dict(rows=partial(vocab.remap, paths), shape=(vocab.size, *info.shape[1:])) if remapped else {}
        try:
            return Job(name, base, experts, tensor_hparams(cfg, plan.method, sp, name, t), **extra)
        except ConfigError as e:
            raise ConfigError(f"{sp.where}, tensor {name!r} (t = {t:g}): {e}") from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # reported once, when the config was resolved
        for module, group in groupby(plan.slices, key=lambda sp: sp.module):
            module_jobs, layers[module] = _module_jobs(list(group), module, models, job)
            out += module_jobs
    _warn_unmatched(plan, [j.name for j in out])
    return out, layers


def _module_jobs(group: list[SlicePlan], module: Module, models: _Models, job) -> tuple[list[Job], list[tuple[Path, int]]]:
    """The jobs and output layers of one module's slices (``job(slice, name, base name, expert names, t)``)."""
    first, last = group[0], group[-1]
    donor = models.layers(first.base, module)
    out = [job(first, n, n, [n] * len(first.experts), 0.0) for n in donor.before]
    offset, layers = 0, []
    for sp in group:
        stacks = [models.layers(p, module) for p in (sp.base, *sp.experts)]
        starts = [r[0] for r in (sp.base_range, *sp.ranges)]
        for j in range(sp.length):
            t = j / (sp.length - 1) if sp.length > 1 else 1.0
            for part in donor.parts:
                names = [s.name(lo + j, part) for s, lo in zip(stacks, starts)]
                out.append(job(sp, donor.name(offset + j, part), names[0], names[1:], t))
        offset += sp.length
        layers += [(sp.base, sp.base_range[0] + j) for j in range(sp.length)]
    out += [job(last, n, n, [n] * len(last.experts), 0.0) for n in donor.after]
    return out, layers


def _warn_unmatched(plan: MergePlan, names: list[str]) -> None:
    cfg = plan.config
    scopes = [cfg.parameters, *(sp.parameters for sp in plan.slices),
              *(spec.parameters for sp in plan.slices for spec in sp.specs)]
    wanted = dict.fromkeys(f for scope in scopes for v in scope.values() for f in settings.filters(v))
    for f in wanted:
        if not any(f in n for n in names):
            warnings.warn(f"filter {f!r} matches no tensor of the output", ConfigWarning, stacklevel=2)
