"""How the hot paths compute, as one setting: the same numbers whichever is chosen, different programs.

    moe          the grouped matmul of the routed experts: "scan" (a tile schedule in plain XLA, everywhere),
                 "ragged_dot" (``jax.lax.ragged_dot``: native and sparse on TPU, dense on GPU and CPU) or "mgpu"
                 (Pallas' Mosaic GPU kernels: Hopper GPUs); the small batches of decoding take a gathered or a
                 dense path whichever this says (moe.py)
    attention    training and prefill attention: "xla" (the blockwise XLA paths of attention.py, everywhere),
                 "flash" (the fused Pallas kernel of flash.py: GPU), "flash_interpret" (that kernel in Pallas'
                 interpret mode, for tests on the CPU), "flash_tpu" (Pallas' TPU flash kernel, flash.py; on the
                 CPU inside ``pltpu.force_tpu_interpret_mode()``); decode steps always score the cache in XLA
    query_block  the XLA path scores at most this many queries at once

``Kernels.for_platform`` picks the defaults of the chip a program is compiled for: what ``l4jax.load``, the trainer
and ``l4jax plan`` use unless told otherwise.
"""

from __future__ import annotations

import dataclasses

import jax

from ..config import ConfigError
from .gmm import IMPLS as MOE_IMPLS

ATTENTION_IMPLS = ("xla", "flash", "flash_interpret", "flash_tpu")
# Values of jax_default_matmul_precision under which Mosaic compiles a TPU kernel's bf16 products (a higher one,
# "highest", gives "Bad lhs type"; bf16 products are exact either way).
DEFAULT_PRECISIONS = (None, "default", "DEFAULT", "bfloat16", "fastest")


def mosaic_takes_bf16() -> bool:
    """Whether TPU kernels (Mosaic) compile bf16 products under the current default matmul precision."""
    return jax.config.jax_default_matmul_precision in DEFAULT_PRECISIONS
# The XLA path scores at most this many queries at once: [B, H, 1024, S] fp32 is 2 GiB for the bench preset at
# S = 32768, where all T queries at once would need 64 GiB.
QUERY_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class Kernels:
    moe: str = "scan"
    attention: str = "xla"
    query_block: int = QUERY_BLOCK

    def __post_init__(self):
        if self.moe not in MOE_IMPLS:
            raise ConfigError(f"moe_impl: unknown {self.moe!r}; expected one of {MOE_IMPLS} or 'auto'")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl: unknown {self.attention!r}; expected one of {ATTENTION_IMPLS} or "
                              f"'auto'")
        if isinstance(self.query_block, bool) or not isinstance(self.query_block, int) or self.query_block < 1:
            raise ConfigError(f"query_block: must be a positive integer, got {self.query_block!r}")

    @classmethod
    def for_platform(cls, platform: str, *, moe: str = "auto", attention: str = "auto",
                     query_block: int = QUERY_BLOCK, training: bool = False) -> "Kernels":
        """The kernels for ``platform`` ("gpu", "tpu", "cpu"): ``moe="auto"`` is the native ragged dot on a
        TPU (training: see below), the Mosaic GPU kernels on a Hopper (or newer) GPU and the tile schedule elsewhere;
        ``attention="auto"`` the fused kernel on a GPU and on a TPU (each its own), the XLA paths elsewhere. A
        program compiled ahead for a GPU target (``l4jax plan``) counts as Hopper: the targets are H100s.

        Training on a TPU takes the native ragged dot too, at jax's default matmul precision: under a higher one
        (``jax_default_matmul_precision="highest"``, as this project's tests set) Mosaic refuses the bf16 products
        of its backward pass ("Bad lhs type", compiled for a v5e with jax 0.10.2), and training keeps the tile
        schedule."""
        gpu = platform in ("gpu", "cuda")
        if moe == "auto":
            native = not training or mosaic_takes_bf16()
            moe = ("ragged_dot" if platform == "tpu" and native else
                   "mgpu" if gpu and _hopper_or_no_local_gpu() else "scan")
        elif moe == "mgpu" and not gpu:
            raise ConfigError(f"moe_impl: 'mgpu' is the Hopper GPU kernel; this program is for {platform}")
        if attention == "auto":
            attention = "flash" if gpu else "flash_tpu" if platform == "tpu" else "xla"
        elif attention == "flash_tpu" and gpu:
            raise ConfigError(f"attention_impl: 'flash_tpu' is the TPU kernel; this program is for {platform}")
        return cls(moe, attention, query_block)


def _hopper_or_no_local_gpu() -> bool:
    """False when the local devices are GPUs older than Hopper (compute capability < 9: no wgmma), else True."""
    dev = jax.local_devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if dev.platform != "gpu" or not cc:
        return True
    return float(cc) >= 9.0
