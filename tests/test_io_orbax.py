"""orbax save/restore of merged pytrees and learned coefficients, including onto another mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jmerge
from jmerge.io import hf_dir, orbax_io
from jmerge.io import safetensors_io as st


def _merged():
    r = np.random.default_rng(0)
    base = {"dense": {"kernel": jnp.asarray(r.standard_normal((16, 8)), jnp.float32), "bias": jnp.zeros(8, jnp.bfloat16)}}
    experts = [jax.tree.map(lambda x, s=s: x + jnp.asarray(0.1 * s, x.dtype), base) for s in (1, 2)]
    return jmerge.merge(base, experts, "task_arithmetic", scale=0.5)


def test_save_on_8_devices_restore_on_4x2_mesh(tmp_path, mesh8):
    merged = _merged()
    sharded = {
        "dense": {
            "kernel": jax.device_put(merged["dense"]["kernel"], NamedSharding(mesh8, P("model"))),
            "bias": jax.device_put(merged["dense"]["bias"], NamedSharding(mesh8, P())),
        }
    }
    orbax_io.save(tmp_path / "ckpt", sharded, metadata={"method": "task_arithmetic"})
    assert orbax_io.metadata(tmp_path / "ckpt") == {"method": "task_arithmetic"}

    mesh42 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    rule = lambda path, shape: NamedSharding(mesh42, P("data", "model") if len(shape) == 2 else P())  # noqa: E731
    restored = orbax_io.restore(tmp_path / "ckpt", sharding=rule)
    k = restored["dense"]["kernel"]
    assert k.sharding.spec == P("data", "model") and k.addressable_shards[0].data.shape == (4, 4)
    assert restored["dense"]["bias"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # a pytree of shardings, and the default (one device)
    tree = {"dense": {"kernel": NamedSharding(mesh42, P(None, "model")), "bias": NamedSharding(mesh42, P())}}
    assert orbax_io.restore(tmp_path / "ckpt", sharding=tree)["dense"]["kernel"].sharding.spec == P(None, "model")
    single = orbax_io.restore(tmp_path / "ckpt")
    assert len(single["dense"]["kernel"].devices()) == 1


def test_learned_coefficients(tmp_path):
    coeffs = {"task": jnp.array([0.3, 0.7]), "layer": jnp.arange(6.0).reshape(2, 3)}
    meta = {"tasks": ["a", "b"], "layers": ["l0", "l1", "l2"], "objective": "js"}
    orbax_io.save(tmp_path / "coeffs", coeffs, metadata=meta)
    back = orbax_io.restore(tmp_path / "coeffs", like=coeffs)
    np.testing.assert_array_equal(back["layer"], coeffs["layer"])
    assert orbax_io.metadata(tmp_path / "coeffs") == meta


def test_existing_and_missing_checkpoints(tmp_path):
    tree = {"a": jnp.ones(3)}
    orbax_io.save(tmp_path / "c", tree)
    with pytest.raises(hf_dir.OutputError, match="already exists"):
        orbax_io.save(tmp_path / "c", {"a": jnp.zeros(3)})
    orbax_io.save(tmp_path / "c", {"a": jnp.zeros(3)}, force=True)
    np.testing.assert_array_equal(orbax_io.restore(tmp_path / "c")["a"], np.zeros(3))
    with pytest.raises(st.CheckpointError, match="not a jmerge orbax checkpoint"):
        orbax_io.restore(tmp_path / "nothing")
