"""Shared fixtures for the method tests: small mixed-shape models, numpy views, mesh placement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jmerge import tree as jtree

# 2-D kernels of three shapes (wide, tall, square-ish), 1-D biases/scales, one 3-D tensor.
LEAF_SHAPES = {
    "block/dense/kernel": (16, 24),
    "block/dense/bias": (24,),
    "block/out/kernel": (32, 8),
    "block/out/bias": (8,),
    "head/kernel": (24, 16),
    "norm/scale": (16,),
    "conv/kernel": (4, 6, 5),
}


def nest(flat: dict) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    out: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    return out


def make_models(seed: int, num_experts: int, dtype=jnp.float32, tv_scale: float = 0.3):
    """``(base, experts)`` nested dicts: base ~ N(0, 1), experts = base + tv_scale N(0, 1), cast to ``dtype``."""
    rng = np.random.default_rng(seed)
    base = {p: rng.normal(size=s) for p, s in LEAF_SHAPES.items()}
    experts = [{p: b + tv_scale * rng.normal(size=b.shape) for p, b in base.items()} for _ in range(num_experts)]
    cast = lambda flat: nest({p: jnp.asarray(x, dtype) for p, x in flat.items()})  # noqa: E731
    return cast(base), [cast(e) for e in experts]


def as_np(tree) -> dict[str, np.ndarray]:
    """``{path: float64 array}`` of a pytree (bf16 upcast exactly)."""
    return {p: np.asarray(jnp.asarray(x, jnp.float32), np.float64) for p, x in jtree.flatten(tree).items()}


def np_task_vectors(base, experts):
    """``(base, [tau_t])`` as float64 ``{path: array}`` dicts."""
    b = as_np(base)
    return b, [{p: e[p] - b[p] for p in b} for e in map(as_np, experts)]


def assert_matches(out, ref: dict[str, np.ndarray], dtype, *, rtol32: float = 1e-5, atol32: float = 2e-5):
    """``out`` (a pytree in ``dtype``) equals the float64 reference up to float32 error, or bf16 output rounding."""
    flat = jtree.flatten(out)
    assert set(flat) == set(ref)
    for path, x in flat.items():
        assert x.dtype == dtype, path
        got = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
        if dtype == jnp.bfloat16:
            # float32 result rounded once to bf16: at most half an ulp, 2^-8 relative.
            np.testing.assert_allclose(got, ref[path], rtol=2.0**-8, atol=1e-5, err_msg=path)
        else:
            np.testing.assert_allclose(got, ref[path], rtol=rtol32, atol=atol32, err_msg=path)


def mesh():
    return jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))


def shard(tree, m):
    """Each leaf split over its largest dimension divisible by 8, else replicated."""

    def place(x):
        dims = [d for d in range(x.ndim) if x.shape[d] % 8 == 0]
        spec = [None] * x.ndim
        if dims:
            spec[max(dims, key=lambda d: x.shape[d])] = "model"
        return jax.device_put(x, NamedSharding(m, PartitionSpec(*spec)))

    return jax.tree.map(place, tree)


def transpose_matrices(tree):
    """Every 2-D leaf transposed (Flax (in, out) <-> torch (out, in)), other leaves unchanged."""
    return jax.tree.map(lambda x: x.T if x.ndim == 2 else x, tree)


def data_statistics(method: str, base, num_experts: int, seed: int = 0) -> dict:
    """The statistics hyper-parameter of a data-driven method (``regmean``'s Grams, ``fisher``'s
    Fisher pytrees) for ``base``'s shapes, random but valid; ``{}`` for the other methods."""
    from jmerge.methods.data_driven import Grams

    rng = np.random.default_rng(seed)
    flat = jtree.flatten(base)
    if method == "regmean":
        def spd(n):
            x = rng.normal(size=(3 * n, n)).astype(np.float32)
            return x.T @ x / (3 * n)
        mats = [{p: spd(np.shape(x)[0]) for p, x in flat.items() if np.ndim(x) == 2} for _ in range(num_experts)]
        axes = tuple((p, 0) for p in mats[0])
        return {"grams": tuple(Grams(m, axes) for m in mats)}
    if method == "fisher":
        return {"fishers": tuple(jax.tree.map(lambda x: jnp.asarray(rng.random(np.shape(x)), jnp.float32), base)
                                 for _ in range(num_experts))}
    return {}
