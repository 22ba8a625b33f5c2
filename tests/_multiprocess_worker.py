"""One process of tests/test_multiprocess.py (and the models both sides use).

    python tests/_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT CKPT_DIR OUT_DIR

Joins a job of NUM_PROCESSES processes with 4 CPU devices each (coordinator on
127.0.0.1:PORT), builds one global ("data", "model") = (1, 4 * NUM_PROCESSES) mesh, and on it:
task arithmetic and TIES through ``jmerge.merge``, TIES with the shard_map trim of
``jmerge.thresholds.mesh``, a DivMerge run of ``jmerge.learn.fit_coefficients``, and a
safetensors -> sharded merge -> orbax run (``jmerge.streaming.merge_to_orbax``) that logs
which tensor blocks this process read. Process 0 writes the gathered results to
OUT_DIR/results.npz; every process writes OUT_DIR/reads_<id>.json.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np

LOCAL_DEVICES = 4
SHAPES = {"dense/kernel": (64, 32), "dense/bias": (5,), "proj/kernel": (16, 128), "odd": (6, 10)}
NUM_EXPERTS = 2
DENSITY = 0.2


def make_models():
    """Base and expert parameters as flat ``{name: float32 numpy}`` dicts (same on every process)."""
    from helpers import random_models  # here, not at the top: it imports jax, after distributed.initialize in main

    return random_models(SHAPES, NUM_EXPERTS, seed=0, numpy=True)


def make_inputs():
    """One batch of 8 unlabelled inputs per task for the learned-coefficient run."""
    rng = np.random.default_rng(1)
    return [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(NUM_EXPERTS)]


def apply_fn(params, x):
    """A linear classifier reading one sharded matrix: logits (batch, 10)."""
    return x @ params["proj/kernel"][:, :10]


def rule():
    from jmerge import shard

    return functools.partial(shard.spec_for, min_size=0)


def ties_with_sharded_trim(mesh):
    """TIES (global trim ``DENSITY``, sum election, disjoint mean) with the mesh backend's trim."""
    import jax

    from jmerge import stages
    from jmerge.thresholds import mesh as tmesh
    from jmerge import tree as jtree

    @jax.jit
    def ties(base, experts):
        trimmed = tmesh.magnitude_trim(DENSITY, mesh, rule())(jtree.task_vectors(base, experts))
        masks = stages.agreement_masks(trimmed, stages.elect_sign(trimmed))
        return jtree.apply(base, stages.combine(trimmed, masks=masks, normalize=True))

    return ties


def main(process_id: int, num_processes: int, port: int, ckpt_dir: str, out_dir: str) -> None:
    from jmerge import distributed

    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, cpu_devices=LOCAL_DEVICES, timeout=90)

    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P

    import jmerge
    from jmerge import shard
    from jmerge.thresholds import mesh as tmesh
    from jmerge import tree as jtree
    from jmerge import streaming
    from jmerge.io import sharded
    from jmerge.learn import fit_coefficients

    assert jax.device_count() == LOCAL_DEVICES * num_processes and jax.local_device_count() == LOCAL_DEVICES
    mesh = shard.make_mesh(model=jax.device_count())
    base_np, experts_np = make_models()
    base = shard.shard_params(base_np, mesh, rule())  # each process hands over only its devices' blocks
    experts = [shard.shard_params(e, mesh, rule()) for e in experts_np]
    assert not base["dense/kernel"].is_fully_addressable

    results = {}
    for method, hp in (("task_arithmetic", {}), ("ties", {"density": DENSITY})):
        merged = jmerge.merge(base, experts, method, **hp)
        assert merged["dense/kernel"].sharding.spec == P("model")
        results.update({f"{method}/{k}": v for k, v in multihost_utils.process_allgather(merged, tiled=True).items()})
    merged = ties_with_sharded_trim(mesh)(base, experts)
    results.update({f"ties_sharded_trim/{k}": v for k, v in multihost_utils.process_allgather(merged, tiled=True).items()})
    tv0 = jtree.task_vectors(base, experts)[0]
    results["threshold"] = np.asarray(tmesh.kth_largest_magnitude(list(tv0.values()), 100, mesh))

    # Learned coefficients (DivMerge, JS): targets computed here, since fit_coefficients'
    # target cache hashes parameter bytes, which no single process holds.
    replicated = lambda x: shard.shard_params(x, mesh, lambda *_: P())  # noqa: E731
    inputs = [replicated(x) for x in make_inputs()]
    tvs = jtree.task_vectors(base, experts)
    expert_lp = jax.jit(lambda b, tv, x: jax.nn.log_softmax(apply_fn(jtree.apply(b, tv), x)))
    targets = [expert_lp(base, tv, x) for tv, x in zip(tvs, inputs)]
    fit = fit_coefficients(base, tvs, apply_fn, inputs, targets=targets, epochs=2, batch_per_task=4, progress=False)
    results["coefficients"] = np.asarray(fit.coefficients)
    assert fit.params["proj/kernel"].sharding.spec == P(None, "model")

    # Safetensors blocks straight onto the mesh, merged, saved sharded with orbax.
    reads = []
    read_block = sharded._read_block

    def logged(ckpt, name, index):
        reads.append([name, [[s.start, s.stop] for s in index]])
        return read_block(ckpt, name, index)

    sharded._read_block = logged
    streaming.merge_to_orbax(
        f"{ckpt_dir}/base.safetensors",
        [f"{ckpt_dir}/expert_{i}.safetensors" for i in range(NUM_EXPERTS)],
        f"{out_dir}/merged_orbax",
        "task_arithmetic",
        mesh=mesh,
        rule=rule(),
    )
    with open(f"{out_dir}/reads_{process_id}.json", "w") as f:
        json.dump(reads, f)
    if process_id == 0:
        np.savez(f"{out_dir}/results.npz", **results)
    multihost_utils.sync_global_devices("done")
    distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
