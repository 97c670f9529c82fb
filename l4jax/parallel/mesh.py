"""The device mesh: building one, placing host arrays on it, and padding a batch to its batch axes."""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from ..model.axes import ShardingError
from .rules import MESH_AXES, batch_multiple


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *, context: int = 1,
              devices: Sequence[jax.Device] | None = None, **unknown) -> Mesh:
    """A mesh with axes (data, fsdp, context, expert, tensor), all of type ``Auto``. ``context`` splits the
    sequence of prefill and training rows (long context: ``l4jax.model.context``).

    The product of the sizes must equal the number of devices (``jax.devices()``, i.e. every process's devices,
    unless ``devices`` is given). Auto, not Explicit (the default of ``jax.make_mesh`` on current JAX): the model
    annotates parameters and a few activations and lets the partitioner (Shardy) propagate the rest; under
    Explicit axes every contraction over a sharded dimension would need an ``out_sharding``.
    """
    if unknown:
        raise ShardingError(f"make_mesh: unknown mesh axis {sorted(unknown)}; the axes are {list(MESH_AXES)}")
    sizes = dict(data=data, fsdp=fsdp, context=context, expert=expert, tensor=tensor)
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ShardingError(f"make_mesh: {name} must be a positive integer, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes.values()) != len(devices):
        raise ShardingError(f"make_mesh: {_shape(sizes)} = {math.prod(sizes.values())} devices, but there are "
                            f"{len(devices)}; the product of the axis sizes must equal the device count")
    shape, types = tuple(sizes.values()), (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:  # an axis is no product of whole torus axes (tensor=2 on a v5p 8x8x8): split them
        pass
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError) as e:
        raise ShardingError(f"make_mesh: {_shape(sizes)} does not map onto the devices' {_topology(devices)} "
                            f"interconnect: {str(e).splitlines()[0]}") from None
    return Mesh(grid, MESH_AXES, axis_types=types)


def _shape(sizes: dict[str, int]) -> str:
    return " x ".join(f"{k}={v}" for k, v in sizes.items())


def _topology(devices: Sequence[jax.Device]) -> str:
    coords = [getattr(d, "coords", None) for d in devices]
    if any(c is None for c in coords):
        return f"{len(devices)}-device"
    return "x".join(str(max(c[i] for c in coords) + 1) for i in range(len(coords[0])))


def platform(mesh: Mesh | None) -> str:
    """The platform ("gpu", "tpu", "cpu") of the mesh's devices (of jax's default devices without a mesh): the
    chip a program for this mesh is compiled for, abstract topology devices included."""
    return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,expert=2,tensor=2' -> {'data': 2, 'expert': 2, 'tensor': 2}."""
    axes = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if not size.strip().isdigit():
            raise ValueError(f"--mesh: expected AXIS=SIZE pairs like data=2,tensor=4, got {part!r}")
        axes[name.strip()] = int(size)
    return axes


def simulate_cpu_devices(n: int) -> None:
    """On a CPU-only machine, split the host into ``n`` XLA devices so that a mesh of n fits.

    XLA reads the flag when its first backend starts, so call this before anything asks jax for devices; it is a
    no-op when the flag is already set, and it only affects the CPU backend (a GPU run keeps its GPUs).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def put(host: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    """Place a host array that every process holds in full onto ``sharding``, one local shard at a time.

    Works with several processes: each one copies only the slices its own devices hold, and no device ever
    receives more than its shard.
    """
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def pad_batch(mesh: Mesh | None, *arrays, fill=0):
    """Rows of ``fill`` appended to each array (numpy or jax, rows on axis 0) until the mesh's batch axes divide
    the batch; returns (the padded arrays, the original row count). Callers cut the rows off again after."""
    B = arrays[0].shape[0]
    extra = -B % batch_multiple(mesh)
    if not extra:
        return arrays, B
    lib = [np if isinstance(a, np.ndarray) else jax.numpy for a in arrays]
    return tuple(m.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
                 for m, a in zip(lib, arrays)), B
