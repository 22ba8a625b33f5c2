"""Two processes on localhost, 4 CPU devices each, one global mesh of 8 devices (JAX's
distributed runtime, gloo collectives over loopback): sharded merges, the shard_map TIES
threshold, a learned-coefficient run and a safetensors -> orbax sharded merge give the
single-process results, and each process reads only its devices' blocks from disk."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jmerge
from jmerge.thresholds import xla
from jmerge import shard
from jmerge import tree as jtree
from jmerge.io import orbax_io
from jmerge.learn import fit_coefficients

import _multiprocess_worker as worker
pytestmark = pytest.mark.standard_promotion("optax 0.2.8's adam computes decay ** count (float ** int32): the reference fixture fits coefficients")

NUM_PROCESSES = 2
TIMEOUT = 180  # seconds for the whole job; generous, the 2 cores may be shared with other work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Runs the worker job once; returns its output directory."""
    ckpt, out = tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("out")
    base, experts = worker.make_models()
    save_file(base, str(ckpt / "base.safetensors"))
    for i, e in enumerate(experts):
        save_file(e, str(ckpt / f"expert_{i}.safetensors"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]))
    script = str(Path(__file__).parent / "_multiprocess_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(i), str(NUM_PROCESSES), str(port), str(ckpt), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=TIMEOUT)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"multi-process job did not finish within {TIMEOUT} s")
        for i, (p, log) in enumerate(zip(procs, logs)):
            assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.fixture(scope="module")
def reference():
    """The single-process results, computed here on one device."""
    base_np, experts_np = worker.make_models()
    base, experts = jax.tree.map(jnp.asarray, base_np), [jax.tree.map(jnp.asarray, e) for e in experts_np]
    out = {}
    for method, hp in (("task_arithmetic", {}), ("ties", {"density": worker.DENSITY})):
        out.update({f"{method}/{k}": np.asarray(v) for k, v in jmerge.merge(base, experts, method, **hp).items()})
    tvs = jtree.task_vectors(base, experts)
    inputs = [jnp.asarray(x) for x in worker.make_inputs()]
    targets = [jax.nn.log_softmax(worker.apply_fn(jtree.apply(base, tv), x)) for tv, x in zip(tvs, inputs)]
    fit = fit_coefficients(base, tvs, worker.apply_fn, inputs, targets=targets, epochs=2, batch_per_task=4, progress=False)
    out["coefficients"] = np.asarray(fit.coefficients)
    out["threshold"] = np.asarray(xla.kth_largest_magnitude(list(tvs[0].values()), 100))
    return out


@pytest.fixture(scope="module")
def results(job):
    with np.load(job / "results.npz") as f:
        return dict(f)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_sharded_merge_across_processes_equals_single_process(results, reference, method):
    for name in worker.SHAPES:
        np.testing.assert_array_equal(results[f"{method}/{name}"], reference[f"{method}/{name}"], err_msg=name)


def test_shard_map_threshold_across_processes(results, reference):
    assert results["threshold"] == reference["threshold"]
    for name in worker.SHAPES:
        np.testing.assert_array_equal(results[f"ties_sharded_trim/{name}"], reference[f"ties/{name}"], err_msg=name)


def test_learned_coefficients_across_processes(results, reference):
    np.testing.assert_allclose(results["coefficients"], reference["coefficients"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(results["coefficients"], 1.0 / worker.NUM_EXPERTS)  # it learned something


def test_safetensors_to_orbax_across_processes(job, reference, mesh8):
    like = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in worker.SHAPES.items()}
    restored = orbax_io.restore(job / "merged_orbax", shard.abstract_for(like, mesh8, worker.rule()))
    for name in worker.SHAPES:
        np.testing.assert_array_equal(np.asarray(restored[name]), reference[f"task_arithmetic/{name}"], err_msg=name)
    assert restored["dense/kernel"].sharding.spec == jax.sharding.PartitionSpec("model")
    assert orbax_io.metadata(job / "merged_orbax")["method"] == "task_arithmetic"


def test_each_process_reads_only_its_blocks(job, mesh8):
    """Sharded tensors: the two processes read disjoint halves, each block once; replicated
    tensors: each process reads the whole tensor once."""
    reads = [json.loads((job / f"reads_{i}.json").read_text()) for i in range(NUM_PROCESSES)]
    files = 1 + worker.NUM_EXPERTS
    for name, shape in worker.SHAPES.items():
        spec = worker.rule()(name, shape, mesh8)
        per_process = [[tuple(map(tuple, idx)) for n, idx in r if n == name] for r in reads]
        if spec == jax.sharding.PartitionSpec():
            assert all(len(blocks) == files for blocks in per_process), name
            continue
        dim = list(spec).index("model")
        spans = [sorted({b[dim] for b in blocks}) for blocks in per_process]
        assert all(len(blocks) == files * 4 and len(s) == 4 for blocks, s in zip(per_process, spans)), (name, spans)
        rows = [set().union(*(range(a, b) for a, b in s)) for s in spans]
        assert rows[0].isdisjoint(rows[1]) and len(rows[0] | rows[1]) == shape[dim], name

