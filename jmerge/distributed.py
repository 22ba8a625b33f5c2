"""Many processes, one merge: a thin entry over JAX's own distributed runtime.

Every process runs the same program (SPMD, "multi-controller"): call :func:`initialize`
first, build the mesh over all devices of all processes (``jmerge.shard.make_mesh``), place
the inputs (each process supplies only the blocks its own devices hold:
``jmerge.shard.shard_params`` or ``jmerge.io.sharded.read_sharded``), merge, save with
``jmerge.io.sharded.save_sharded`` (orbax writes each process's blocks). Launch, e.g. two
hosts with four devices each::

    # on host 0 and host 1 (process_id 0 and 1), same command otherwise
    python my_merge.py --coordinator 10.0.0.1:1234 --num-processes 2 --process-id $ID

    jmerge.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=ID)
    mesh = jmerge.shard.make_mesh(model=jax.device_count())

On Cloud TPU, Slurm and Open MPI every argument may be omitted (JAX detects them). On CPU
(tests, or CPU clusters) pass ``cpu_devices`` to give each process several devices;
cross-process collectives then go through gloo over TCP, the default CPU collectives of
jax 0.10 (``jax_cpu_collectives_implementation="gloo"``).
"""

from __future__ import annotations

import jax

from jmerge.validate import MergeInputError


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_devices: int | None = None,
    timeout: int = 300,
) -> None:
    """Joins this process to the job; call before any other JAX work.

    Args:
      coordinator_address: ``host:port`` of process 0, where it serves the coordinator
        (any free port, the same for all processes). ``None`` on TPU / Slurm / Open MPI.
      num_processes: processes in the job.
      process_id: this process's index in ``0 .. num_processes - 1``.
      cpu_devices: CPU devices of this process (sets ``jax_num_cpu_devices``, which must be
        set before the backend starts); ``None`` leaves the platform's devices alone.
      timeout: seconds to wait for all processes to connect.

    Wraps ``jax.distributed.initialize`` (docs.jax.dev/en/latest/multi_process.html); after
    it, ``jax.devices()`` lists the devices of every process and ``jax.local_devices()``
    this process's own.
    """
    if num_processes is not None and num_processes < 1:
        raise MergeInputError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise MergeInputError(f"process_id {process_id} must lie in [0, {num_processes})")
    if cpu_devices is not None:
        if cpu_devices < 1:
            raise MergeInputError(f"cpu_devices must be >= 1, got {cpu_devices}")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
    )


def shutdown() -> None:
    """Leaves the job (``jax.distributed.shutdown``); all processes should call it at the end."""
    jax.distributed.shutdown()


def is_coordinator() -> bool:
    """True in process 0, the one that writes shared metadata and prints reports."""
    return jax.process_index() == 0
