"""Checkpoints in and out: safetensors (:mod:`jmerge.io.safetensors_io`), output directories
(:mod:`jmerge.io.hf_dir`: atomic writes, model files, the card),
Flax msgpack and Flax <-> PyTorch layout (:mod:`jmerge.io.flax_io`), orbax
(:mod:`jmerge.io.orbax_io`, imported on use: orbax is slow to import)."""

from jmerge.io.hf_dir import OutputError, atomic_dir
from jmerge.io.safetensors_io import (
    Checkpoint,
    CheckpointError,
    ShardPlan,
    ShardWriter,
    check_compatible,
    load,
    open_checkpoint,
    parse_size,
    save_safetensors,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "OutputError",
    "ShardPlan",
    "ShardWriter",
    "atomic_dir",
    "check_compatible",
    "load",
    "open_checkpoint",
    "parse_size",
    "save_safetensors",
]
