"""Data parallelism with jax.sharding: one mesh axis, "data", over every device.

The global batch (config `batch_size`) is split along the mesh; parameters, BatchNorm
statistics and optimizer state are replicated. XLA inserts the gradient and batch-statistic
reductions itself, so a step on N devices computes what one device computes on the whole
batch (up to float summation order). There is no hand-written communication.

Multi-host: every process runs the same command. `initialize()` calls
`jax.distributed.initialize()` when a launcher says there are several processes:
  * JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (any launcher),
  * or Slurm / Open MPI, whose variables JAX reads itself.
Each process then feeds its own slice of every global batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def split_cpu(n: int) -> None:
    """Presents the CPU as `n` JAX devices, so training runs data-parallel across them.

    On a 2-core host, isolated backbone steps of the cifar config ran 1.2-1.26x faster on
    2 devices than on 1 (experiments/data_parallel.py), though a real training run did not
    (docs/experiments.md §1). It must run before JAX starts its backends; GPUs/TPUs are not
    affected.
    """
    if n < 1:
        raise ValueError(f"the CPU device count must be at least 1, got {n}")
    if jax._src.xla_bridge.backends_are_initialized():
        raise RuntimeError("split_cpu must be called before JAX uses any device")
    flag = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    os.environ["XLA_FLAGS"] = " ".join(kept + [f"{flag}={n}"])


def initialize() -> None:
    """Joins the multi-host run described by the environment; a no-op on one host."""
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
        jax.distributed.initialize()


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def check_batch(batch_size: int, what: str = "batch_size") -> None:
    n = jax.device_count()
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} must be a multiple of the {n} devices "
                         f"(the global batch is split evenly across them)")


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Global host arrays (every process holds the same ones) -> arrays split along the
    mesh; each process contributes only its own rows."""
    sharding = batch_sharded(mesh)
    out = []
    for a in arrays:
        per_process = len(a) // jax.process_count()
        local = a[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
        out.append(jax.make_array_from_process_local_data(sharding, local, a.shape))
    return tuple(out)


def process_rows(batch_size: int) -> slice:
    """This process's rows of every global batch."""
    per_process = batch_size // jax.process_count()
    return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def shard_local(mesh: Mesh, global_batch: int, *local: np.ndarray) -> tuple[jax.Array, ...]:
    """This process's rows (`process_rows`) -> global arrays split along the mesh."""
    sharding = batch_sharded(mesh)
    return tuple(jax.make_array_from_process_local_data(
        sharding, a, (global_batch,) + a.shape[1:]) for a in local)


def replicate(mesh: Mesh, tree):
    return jax.device_put(tree, replicated(mesh))


def to_host(tree):
    """Device arrays (possibly spread over several hosts) -> numpy on every host."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
