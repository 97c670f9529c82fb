"""Compile targets: the chips ``l4jax plan`` compiles for without having them, and their figures.

    h100            one H100 (SXM, 80 GB)                    topology 1x1x1: slices x hosts x devices per host
    h100x8          one host of 8 H100s                      1x1x8
    h100x8x4        4 hosts of 8 H100s                       1x4x8
    v5e:4x4         a TPU slice by its topology name         v4, v5e, v5p, v6e
    cpu             this machine's CPU devices (simulated ones too): the program that runs here

XLA compiles for a GPU from a description of the card (``H100_TARGET``, the fields of XLA's GpuTargetConfig) with
the CUDA plugin, and for a TPU from a topology name with libtpu; neither needs the device. Both compilers are
optional extras (``pip install -e .[aot-gpu]``, ``.[aot-tpu]``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax
from jax.experimental import topologies


class PlanError(ValueError):
    """A target, a task or its settings that cannot be planned; the message says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Datasheet figures: HBM per device in bytes, dense bf16 FLOP/s, HBM bytes/s (None where unknown)."""

    name: str
    platform: str  # the XLA platform compiled for: "cuda", "tpu" or "cpu"
    memory: int | None
    peak_flops: float | None
    bandwidth: float | None


CHIPS = {
    # H100 SXM 80 GB: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3 (measured here: 799 TFLOP/s, 2.94 TB/s copy).
    "h100": Chip("NVIDIA H100 80GB HBM3", "cuda", 84_929_347_584, 989e12, 3.35e12),
    "v4": Chip("TPU v4", "tpu", 32 << 30, 275e12, 1.228e12),
    "v5e": Chip("TPU v5e", "tpu", 16 << 30, 197e12, 0.819e12),
    "v5p": Chip("TPU v5p", "tpu", 95 << 30, 459e12, 2.765e12),
    "v6e": Chip("TPU v6e", "tpu", 32 << 30, 918e12, 1.64e12),
    "cpu": Chip("CPU", "cpu", None, None, None),
}

# The card's description, as XLA's GpuTargetConfig text proto (an H100 SXM 80GB HBM3).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# Compiling without the device: the CUDA plugin must not check its libraries against a GPU, and libtpu must neither
# look for the TPU hosts it would run on nor refuse a second process compiling beside this one.
COMPILE_ONLY_ENV = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "TPU_SKIP_MDS_QUERY": "1",
                    "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

EXTRAS = {"cuda": ("aot-gpu", "jax_cuda12_plugin", "cuda12"), "tpu": ("aot-tpu", "libtpu", "tpu")}


@dataclasses.dataclass(frozen=True)
class Target:
    text: str          # as given: "h100x8", "v5p:4x4x4", "cpu"
    chip: Chip
    topology: str      # "1x1x8" (GPU), "v5p:4x4x4" (TPU), "" (CPU)
    devices: int

    def device_list(self) -> list[jax.Device]:
        """The target's devices: abstract ones from the topology (compile only), or this machine's CPUs."""
        if self.chip.platform == "cpu":
            return jax.devices("cpu")
        _require_compiler(self.chip.platform)
        for name, value in COMPILE_ONLY_ENV.items():
            os.environ.setdefault(name, value)
        if self.chip.platform == "cuda":
            topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET, topology=self.topology)
        else:
            topo = topologies.get_topology_desc(topology_name=self.topology, platform="tpu")
        return list(topo.devices)


def parse_target(text: str) -> Target:
    """'h100', 'h100x8', 'h100x8x2' (8 per host, 2 hosts), 'v5e:4x4', 'v5p:4x4x4', 'v6e:2x2', 'v4:2x2x1' or 'cpu'."""
    text = text.strip().lower()
    if text == "cpu":
        return Target(text, CHIPS["cpu"], "", len(jax.devices("cpu")))
    m = re.fullmatch(r"h100(?:x(\d+))?(?:x(\d+))?", text)
    if m:
        per_host, hosts = int(m.group(1) or 1), int(m.group(2) or 1)
        if per_host < 1 or hosts < 1:
            raise PlanError(f"--target {text}: device and host counts must be positive")
        return Target(text, CHIPS["h100"], f"1x{hosts}x{per_host}", per_host * hosts)
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)", text)
    if m:
        return Target(text, CHIPS[m.group(1)], text, math.prod(int(d) for d in m.group(2).split("x")))
    raise PlanError(f"--target {text!r}: expected h100[xN[xHOSTS]], a TPU slice such as v5e:4x4, v5p:4x4x4 or "
                    f"v6e:2x2, or cpu")


def _require_compiler(platform: str) -> None:
    extra, module, jax_extra = EXTRAS[platform]
    if importlib.util.find_spec(module) is None:
        raise PlanError(f"compiling for {'an H100' if platform == 'cuda' else 'a TPU'} needs the "
                        f"{'CUDA plugin' if platform == 'cuda' else 'TPU compiler (libtpu)'}, which is not "
                        f"installed: pip install -e .[{extra}]   (or: pip install \"jax[{jax_extra}]=="
                        f"{jax.__version__}\")")
