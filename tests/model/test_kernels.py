"""Which kernels each chip gets: the automatic choices and the checks of an explicit one."""

import jax
import pytest

from l4jax.config import ConfigError
from l4jax.model.kernels import Kernels


def test_auto_picks_by_chip_and_task():
    assert Kernels.for_platform("gpu") == Kernels("mgpu", "flash")  # the local CPU does not rule out Hopper
    assert Kernels.for_platform("tpu") == Kernels("ragged_dot", "flash_tpu")
    # Training takes the native ragged dot on TPUs at jax's default matmul precision; under this suite's "highest"
    # Mosaic refuses its backward's bf16 products (v5e, jax 0.10.2), so the tile schedule.
    assert Kernels.for_platform("tpu", training=True).moe == "scan"
    with jax.default_matmul_precision("default"):
        assert Kernels.for_platform("tpu", training=True) == Kernels("ragged_dot", "flash_tpu")
    assert Kernels.for_platform("cpu") == Kernels("scan", "xla")
    assert Kernels.for_platform("tpu", moe="scan", attention="flash_interpret").attention == "flash_interpret"
    with pytest.raises(ConfigError, match="moe_impl: unknown 'dense'"):
        Kernels.for_platform("cpu", moe="dense")
    with pytest.raises(ConfigError, match="moe_impl: 'mgpu' is the Hopper GPU kernel; this program is for cpu"):
        Kernels.for_platform("cpu", moe="mgpu")
    with pytest.raises(ConfigError, match="attention_impl: 'flash_tpu' is the TPU kernel; this program is for gpu"):
        Kernels.for_platform("gpu", attention="flash_tpu")
