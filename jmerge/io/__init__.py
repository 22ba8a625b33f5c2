"""Checkpoints in and out: safetensors / HF directories (:mod:`jmerge.io.safetensors_io`),
Flax msgpack and Flax <-> PyTorch layout (:mod:`jmerge.io.flax_io`), orbax
(:mod:`jmerge.io.orbax_io`, imported on use: orbax is slow to import)."""

from jmerge.io.safetensors_io import (
    Checkpoint,
    CheckpointError,
    OutputError,
    ShardPlan,
    ShardWriter,
    atomic_dir,
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
