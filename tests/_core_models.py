"""Small random models (pytrees) for the core tests: nested dicts with mixed shapes and
dtypes, flat name->array dicts, and the ``nnx.State`` of a tiny flax.nnx module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

BF16 = ml_dtypes.bfloat16


def nested_shapes() -> dict:
    """Mixed shapes (0-d to 3-d) and dtypes (float32, bfloat16), nested two levels."""
    return {
        "embed": ((24, 8), np.float32),
        "block": {
            "attn": {"kernel": ((8, 16), np.float32), "bias": ((16,), np.float32)},
            "mlp": {"kernel": ((16, 8), BF16), "bias": ((8,), BF16)},
            "conv": ((3, 2, 4), np.float32),
        },
        "scale": ((), np.float32),
    }


def flat_shapes() -> dict:
    """A flat safetensors-style ``name -> array`` dict."""
    return {
        "encoder.layer.0.attention.query.weight": ((8, 8), np.float32),
        "encoder.layer.0.attention.query.bias": ((8,), np.float32),
        "encoder.layer.1.output.dense.weight": ((8, 12), BF16),
        "pooler.dense.weight": ((12, 4), np.float32),
    }


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def random_models(shapes: dict, num_experts: int, seed: int = 0, spread: float = 0.1):
    """``(base, experts)`` as pytrees of jax arrays: base ~ N(0, 1), expert = base + spread * N(0, 1),
    each rounded to the leaf's dtype (so every value is exactly representable)."""
    rng = np.random.default_rng(seed)
    specs, treedef = jax.tree.flatten(shapes, is_leaf=_is_spec)
    base = [rng.standard_normal(s).astype(np.float32).astype(d) for s, d in specs]
    experts = []
    for _ in range(num_experts):
        leaves = [(b.astype(np.float32) + spread * rng.standard_normal(b.shape).astype(np.float32)).astype(b.dtype) for b in base]
        experts.append(jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]))
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in base]), experts


class TinyNet(nnx.Module):
    """Two linear layers and a layer norm: the smallest nnx module with nested parameters."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(6, 5, rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)
        self.dense2 = nnx.Linear(5, 3, rngs=rngs)


def nnx_models(num_experts: int, seed: int = 0):
    """``(base, experts)`` as ``nnx.State`` of :class:`TinyNet` (experts: base + noise)."""
    state = nnx.state(TinyNet(nnx.Rngs(seed)), nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed + 1)
    experts = [
        jax.tree.unflatten(treedef, [x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) for x in leaves])
        for _ in range(num_experts)
    ]
    return state, experts
