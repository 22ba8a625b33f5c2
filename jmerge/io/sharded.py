"""Streaming and sharding together: safetensors blocks straight onto a mesh, merge, orbax out.

:func:`read_sharded` places every tensor of a safetensors checkpoint (one file, or HF shards
with an index) on a mesh with the sharding rule of :mod:`jmerge.shard`, reading from disk
only the blocks this process's devices hold: each block is sliced from the checkpoint's one
reader, :meth:`jmerge.io.Checkpoint.read` (a copy-on-write memory map of the tensor's
bytes), and copied out inside ``jax.make_array_from_callback``; the map is dropped with the
slice, so only the pages the block touches are read and none stay mapped. No process ever
holds a whole tensor it does not own, and a host's memory never holds more than one block.
(Checkpoints that compute tensors on read, GGUF dequantization or a LoRA applied on read, go
through the same reader and compute the whole tensor for each block.)
:func:`save_sharded` writes a sharded pytree with orbax, every process writing its own
blocks, atomically, in the layout :mod:`jmerge.io.orbax_io` restores.
:func:`jmerge.streaming.merge_to_orbax` chains them: headers checked first, base and experts
read sharded, one jitted merge, sharded save.

Memory per device for a model of P parameters, K experts, N devices: about
``(K + 1) P b / N`` for the inputs (b bytes per stored parameter) plus the merge's float32
intermediates (see bench/results/scale_bench.md); host memory: one block.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jmerge.io import hf_dir, orbax_io
from jmerge.io import safetensors_io as st
from jmerge.shard import Rule, spec_for


def _read_block(ckpt: st.Checkpoint, name: str, index: tuple) -> np.ndarray:
    """Block ``index`` of tensor ``name``: a view of the checkpoint's memory map."""
    return ckpt.read(name)[index]


def read_tensor_sharded(ckpt: st.Checkpoint, name: str, sharding: NamedSharding, dtype: Any = None) -> jax.Array:
    """Tensor ``name`` of ``ckpt`` as a global array with ``sharding`` (in ``dtype``, default as
    stored); reads only this process's blocks, each distinct block once (devices holding the
    same replica share the read)."""
    blocks: dict[tuple, np.ndarray] = {}

    def block(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            blocks[key] = np.array(_read_block(ckpt, name, tuple(index)), dtype=dtype)  # copied out: the map is dropped
        return blocks[key]

    return jax.make_array_from_callback(ckpt.tensors[name].shape, sharding, block)


def read_sharded(
    checkpoint: str | os.PathLike | st.Checkpoint, mesh: Mesh, rule: Rule = spec_for, *, names: Sequence[str] | None = None,
    dtypes: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """A safetensors checkpoint as a flat ``{name: global array}`` dict placed by ``rule``.

    ``checkpoint`` is a path (file, ``*.index.json`` or HF directory) or an opened
    :class:`jmerge.io.Checkpoint`; ``names`` restricts the tensors read (default all);
    ``dtypes`` maps names to the dtype their blocks are cast to as they are read (others stay as stored).
    """
    ckpt = checkpoint if isinstance(checkpoint, st.Checkpoint) else st.open_checkpoint(checkpoint)
    names = ckpt.names if names is None else list(names)
    unknown = [n for n in names if n not in ckpt.tensors]
    if unknown:
        raise st.CheckpointError(f"{ckpt.path}: no tensor(s) named {unknown[:5]}")
    out = {}
    for name in names:
        sharding = NamedSharding(mesh, rule(name, ckpt.tensors[name].shape, mesh))
        out[name] = read_tensor_sharded(ckpt, name, sharding, (dtypes or {}).get(name))
    return out


def save_sharded(path: str | os.PathLike, tree, *, metadata: dict | None = None, force: bool = False) -> Path:
    """Saves a (sharded, possibly multi-process) pytree with orbax in :mod:`jmerge.io.orbax_io`'s
    layout (``PATH/pytree`` + ``PATH/jmerge.json``); every process must call it.

    Atomic: all processes write into one temporary directory beside ``path`` (its name
    chosen by process 0 and broadcast), and process 0 renames it into place once orbax has
    committed; ``path`` must not exist unless ``force``. Restore with
    ``jmerge.io.orbax_io.restore(path, jmerge.shard.abstract_for(like, mesh))``.
    """
    path = Path(path).absolute()
    hf_dir.refuse_existing(path, force, "pass force=True")
    token = int(multihost_utils.broadcast_one_to_all(np.int32(random.getrandbits(31))))
    tmp = path.with_name(f".{path.name}.tmp-{token:08x}")
    lead = jax.process_index() == 0
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / orbax_io.PYTREE_DIR, tree)
        ckptr.wait_until_finished()
        ckptr.close()
        if lead:
            (tmp / orbax_io.META_NAME).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True) + "\n")
            hf_dir.replace_dir(tmp, path)
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    multihost_utils.sync_global_devices(f"jmerge.save_sharded:{path}")
    return path
