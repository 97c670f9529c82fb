"""Multi-host (multi-process) runs: one Python process per host, each seeing only its local devices.

Every process runs the same program (SPMD). After ``initialize``, ``jax.devices()`` lists the devices of every
process and ``l4jax.make_mesh`` spans all of them; ``l4jax.load(path, mesh=mesh)`` is called on every process,
each reading the checkpoint and placing only its own devices' shards; a forward is called on every process with
the same host batch and returns a global array, which ``to_numpy`` gathers.

    import l4jax, l4jax.distributed as dist
    dist.initialize("10.0.0.1:1234", num_processes=2, process_id=rank)   # or no arguments on TPU / SLURM
    mesh = l4jax.make_mesh(expert=4, tensor=4)                         # 16 devices over 2 hosts
    model = l4jax.load(path, mesh=mesh)
    logits = dist.to_numpy(model(ids, mask))                           # the same [B, T, V] on every process
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None, **kwargs) -> None:
    """``jax.distributed.initialize`` (same arguments); call it first, before anything touches a device.

    On TPU pods, SLURM and Open MPI the arguments may be left out (JAX detects them). On CPU the collectives
    between processes go through gloo, which is JAX's default.
    """
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids, **kwargs)


def shutdown() -> None:
    """``jax.distributed.shutdown``: leave the job cleanly (every process should call it)."""
    jax.distributed.shutdown()


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    """True on process 0, the one that should write logs and files."""
    return jax.process_index() == 0


def to_numpy(x: jax.Array | np.ndarray) -> np.ndarray:
    """The whole value of a (possibly multi-process) global array, as numpy, on every process (a host array is
    returned as it is).

    Every process must call it (it is a collective when the array spans processes).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str = "l4jax") -> None:
    """Barrier: wait until every process reaches this point (returns at once in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


__all__ = ["initialize", "shutdown", "process_index", "process_count", "is_main", "to_numpy", "sync"]
