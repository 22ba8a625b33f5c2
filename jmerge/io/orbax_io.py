"""orbax checkpoints of merged pytrees and learned merge coefficients.

Layout: ``PATH/pytree`` is a plain orbax ``StandardCheckpointer`` checkpoint (restorable
with orbax alone) and ``PATH/jmerge.json`` holds JSON metadata (e.g. the method, task and
layer names of learned coefficients). ``PATH`` is written atomically (temporary directory,
then rename) and never replaced unless ``force=True``.

Restoring onto another mesh: pass ``sharding`` (one ``jax.sharding.Sharding`` for every
leaf, a pytree of them, or ``fn(path, shape) -> Sharding``) or a ``like`` pytree of arrays /
``jax.ShapeDtypeStruct`` with shardings; orbax re-shards while reading
(orbax's ``ArrayRestoreArgs``). Without either, leaves land on the default device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from jmerge import tree as jtree
from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st

PYTREE_DIR = "pytree"
META_NAME = "jmerge.json"

ShardingSpec = jax.sharding.Sharding | Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | Any


def save(path: str | os.PathLike, tree: Any, *, metadata: dict | None = None, force: bool = False) -> Path:
    """Saves a pytree of arrays (sharded or not) and optional JSON ``metadata`` to ``path``."""
    path = Path(path)
    with hf_dir.atomic_dir(path, force=force) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PYTREE_DIR, tree)
        ckptr.wait_until_finished()
        ckptr.close()
        (tmp / META_NAME).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True) + "\n")
    return path


def metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata saved with the checkpoint."""
    meta = _checked(path) / META_NAME
    return json.loads(meta.read_text()) if meta.is_file() else {}


def _checked(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not (path / PYTREE_DIR).is_dir():
        raise st.CheckpointError(f"{path}: not a jmerge orbax checkpoint (no {PYTREE_DIR}/ inside)")
    return path


def _sharding_for(sharding: ShardingSpec, path: str, shape: tuple[int, ...], leaf_sharding=None):
    if sharding is None:
        return leaf_sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return sharding
    if callable(sharding):
        return sharding(path, shape)
    raise TypeError(f"sharding must be a Sharding, a pytree of them or a callable, got {type(sharding).__name__}")


def restore(path: str | os.PathLike, like: Any = None, *, sharding: ShardingSpec = None) -> Any:
    """Restores the pytree saved at ``path``, placed by ``sharding`` (see module docstring).

    ``like`` (arrays or ``jax.ShapeDtypeStruct``) fixes the structure, shapes, dtypes and,
    when its leaves carry them, the shardings; otherwise they come from the checkpoint.
    """
    path = _checked(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        if like is None:
            like = ckptr.metadata(path / PYTREE_DIR).item_metadata.tree
            like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), like)
        is_tree = sharding is not None and not isinstance(sharding, jax.sharding.Sharding) and not callable(sharding)
        if is_tree:
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, sharding)
        else:
            abstract = jtree.map_with_path(
                lambda p, x: jax.ShapeDtypeStruct(
                    tuple(x.shape), x.dtype, sharding=_sharding_for(sharding, p, tuple(x.shape), getattr(x, "sharding", None))
                ),
                like,
            )
        return ckptr.restore(path / PYTREE_DIR, abstract)
    except (ValueError, KeyError) as e:
        raise st.CheckpointError(f"{path}: cannot restore onto the requested structure: {e}") from None
    finally:
        ckptr.close()
