"""Which kernels each chip gets: the automatic choices and the checks of an explicit one."""

import pytest

from l4jax.config import ConfigError
from l4jax.model.kernels import Kernels


def test_auto_picks_by_chip_and_task():
    assert Kernels.for_platform("gpu") == Kernels("mgpu", "flash")  # the local CPU does not rule out Hopper
    assert Kernels.for_platform("tpu") == Kernels("ragged_dot", "flash_tpu")
    # Training keeps the tile schedule on TPUs: ragged_dot's backward fails in Mosaic (v5e, jax 0.10.2).
    assert Kernels.for_platform("tpu", training=True).moe == "scan"
    assert Kernels.for_platform("cpu") == Kernels("scan", "xla")
    assert Kernels.for_platform("tpu", moe="scan", attention="flash_interpret").attention == "flash_interpret"
    with pytest.raises(ConfigError, match="moe_impl: unknown 'dense'"):
        Kernels.for_platform("cpu", moe="dense")
    with pytest.raises(ConfigError, match="moe_impl: 'mgpu' is the Hopper GPU kernel; this program is for cpu"):
        Kernels.for_platform("cpu", moe="mgpu")
    with pytest.raises(ConfigError, match="attention_impl: 'flash_tpu' is the TPU kernel; this program is for gpu"):
        Kernels.for_platform("gpu", attention="flash_tpu")
